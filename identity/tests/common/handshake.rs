//! A mutual-TLS handshake between Membrane's client and server configurations, in memory.
#![allow(dead_code, missing_docs)]

use std::sync::Arc;

use membrane_identity::verify::{mtls_client_config, mtls_server_config};
use membrane_identity::{KeyExchange, PeerCheck, SharedTrustBundle, WorkloadSvid};

use super::TestCa;

pub const CLIENT: &str = "spiffe://cluster.local/ns/training/sa/trainer";
pub const SERVER: &str = "spiffe://cluster.local/ns/inference/sa/model-server";

/// Both ends' configurations: a client with key exchange `client`, a server with `server`.
pub struct Pair {
    pub client: Arc<rustls::ClientConfig>,
    pub server: Arc<rustls::ServerConfig>,
}

fn svid(ca: &TestCa, id: &str, kx: KeyExchange) -> WorkloadSvid {
    let leaf = ca.leaf(id);
    WorkloadSvid::new(leaf.chain, leaf.key, &kx.provider()).expect("svid")
}

impl Pair {
    pub fn new(client: KeyExchange, server: KeyExchange) -> Self {
        let ca = TestCa::new("root");
        let bundle = SharedTrustBundle::new(ca.bundle());
        let expected = membrane_identity::spiffe_id::parse_spiffe_id(SERVER).expect("id");
        let client_cfg = mtls_client_config(
            &svid(&ca, CLIENT, client),
            bundle.clone(),
            PeerCheck::Exact(expected),
            Arc::new(client.provider()),
        )
        .expect("client config");
        let server_cfg = mtls_server_config(
            &svid(&ca, SERVER, server),
            bundle,
            PeerCheck::TrustDomain(super::td()),
            Arc::new(server.provider()),
        )
        .expect("server config");
        Self {
            client: Arc::new(client_cfg),
            server: Arc::new(server_cfg),
        }
    }

    /// Runs one full handshake and returns the group both ends agreed on, or the first error
    /// either end raised.
    pub fn handshake(&self) -> Result<String, rustls::Error> {
        let name = rustls_pki_types::ServerName::try_from("model-server").expect("name");
        let mut c = rustls::ClientConnection::new(self.client.clone(), name)?;
        let mut s = rustls::ServerConnection::new(self.server.clone())?;
        for _ in 0..10 {
            transfer(&mut c, &mut s)?;
            transfer(&mut s, &mut c)?;
            if !c.is_handshaking() && !s.is_handshaking() {
                let group = membrane_identity::kx::negotiated_group(&c);
                assert_eq!(group, membrane_identity::kx::negotiated_group(&s));
                return Ok(group.expect("a group"));
            }
        }
        panic!("the handshake did not finish in 10 flights");
    }
}

/// Moves everything `from` has to send into `to` and lets `to` process it.
fn transfer<A, B>(from: &mut A, to: &mut B) -> Result<(), rustls::Error>
where
    A: std::ops::DerefMut<Target = rustls::ConnectionCommon<A::Data>> + Side,
    B: std::ops::DerefMut<Target = rustls::ConnectionCommon<B::Data>> + Side,
{
    let mut wire = Vec::new();
    from.write_tls(&mut wire).expect("writes to memory");
    let mut read = &wire[..];
    while !read.is_empty() {
        to.read_tls(&mut read).expect("reads from memory");
    }
    to.process_new_packets()?;
    Ok(())
}

/// The connection-data type of a client or server connection.
pub trait Side {
    type Data;
}

impl Side for rustls::ClientConnection {
    type Data = rustls::client::ClientConnectionData;
}

impl Side for rustls::ServerConnection {
    type Data = rustls::server::ServerConnectionData;
}
