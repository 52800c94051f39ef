//! What an HBONE peer can send after the TLS handshake: records sealed under the real traffic
//! key with any inner type and content (application data, post-handshake messages such as
//! KeyUpdate and NewSessionTicket, alerts, garbage), then any raw bytes. The reader never
//! panics; it ends the stream or fails it.
//!
//! Input: records as `type (1) | length (2, big endian, at most 2^14) | content`, until a
//! `0xff` type byte, after which the rest is sent raw.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::verify::{mtls_client_config, mtls_server_config};
use membrane_identity::{PeerCheck, SharedTrustBundle, SpiffeId, TrustBundle, crypto_provider};
use membrane_testbed::OfflineCa;

const SERVER: &str = "spiffe://cluster.local/ns/data/sa/store";
const CLIENT: &str = "spiffe://cluster.local/ns/ml/sa/trainer";

type Configs = (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>);

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let ca = OfflineCa::root("fuzz root").expect("root");
        let td = parse_trust_domain("cluster.local").expect("td");
        let bundle = SharedTrustBundle::new(
            TrustBundle::new(td.clone(), [ca.der().clone()]).expect("bundle"),
        );
        let server = mtls_server_config(
            &ca.svid(SERVER, &[]).expect("svid"),
            bundle.clone(),
            PeerCheck::TrustDomain(td),
            crypto_provider(),
        )
        .expect("server config");
        let client = mtls_client_config(
            &ca.svid(CLIENT, &[]).expect("svid"),
            bundle,
            PeerCheck::Exact(SpiffeId::new(SERVER).expect("id")),
            crypto_provider(),
        )
        .expect("client config");
        (Arc::new(client), Arc::new(server))
    })
}

fn records(mut data: &[u8]) -> (Vec<(u8, &[u8])>, &[u8]) {
    let mut out = Vec::new();
    while let [typ, hi, lo, rest @ ..] = data {
        if *typ == 0xff {
            return (out, &data[1..]);
        }
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(16 * 1024).min(rest.len());
        out.push((*typ, &rest[..len]));
        data = &rest[len..];
    }
    (out, data)
}

fuzz_target!(|data: &[u8]| {
    let (client, server) = configs().clone();
    let (records, raw) = records(data);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let read = runtime
        .block_on(membrane_ztunnel::hbone::fuzz_tls_records(
            client, server, &records, raw,
        ))
        .expect("handshake in memory");
    let sent: usize = records.iter().map(|(_, c)| c.len()).sum();
    assert!(read <= sent, "read {read} bytes of content, {sent} were sent");
});
