//! The PKI the hbone module's tests share: one offline root for `cluster.local`, SVIDs from
//! it, and the mutual-TLS configurations the ztunnel builds (client: exactly [`SERVER`];
//! server: any peer of the trust domain; both offering `h2`).

use std::sync::Arc;
use std::time::Duration;

use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::verify::{mtls_client_config, mtls_server_config};
use membrane_identity::{
    PeerCheck, SharedTrustBundle, SpiffeId, TrustBundle, WorkloadSvid, crypto_provider,
};
use membrane_testbed::OfflineCa;

pub(crate) const SERVER: &str = "spiffe://cluster.local/ns/data/sa/store";
pub(crate) const CLIENT: &str = "spiffe://cluster.local/ns/ml/sa/trainer";

pub(crate) struct TestCa(OfflineCa);

impl TestCa {
    pub(crate) fn new() -> Self {
        Self(OfflineCa::root("test root").expect("root"))
    }

    pub(crate) fn bundle(&self) -> SharedTrustBundle {
        let td = parse_trust_domain("cluster.local").expect("td");
        SharedTrustBundle::new(TrustBundle::new(td, [self.0.der().clone()]).expect("bundle"))
    }

    pub(crate) fn svid(&self, uri: &str, lifetime: Duration) -> WorkloadSvid {
        self.0.svid_valid_for(uri, &[], lifetime).expect("svid")
    }

    /// A client presenting `svid` that accepts exactly [`SERVER`].
    pub(crate) fn client_config(&self, svid: &WorkloadSvid) -> rustls::ClientConfig {
        let mut cfg = mtls_client_config(
            svid,
            self.bundle(),
            PeerCheck::Exact(SpiffeId::new(SERVER).expect("id")),
            crypto_provider(),
        )
        .expect("client config");
        cfg.alpn_protocols = vec![super::ALPN_H2.to_vec()];
        cfg
    }

    /// [`Self::client_config`], shared.
    pub(crate) fn client_tls(&self, svid: &WorkloadSvid) -> Arc<rustls::ClientConfig> {
        Arc::new(self.client_config(svid))
    }

    /// A server presenting `svid` that accepts any client of the trust domain in `bundle`.
    pub(crate) fn server_config(
        svid: &WorkloadSvid,
        bundle: SharedTrustBundle,
    ) -> rustls::ServerConfig {
        let td = parse_trust_domain("cluster.local").expect("td");
        let mut cfg =
            mtls_server_config(svid, bundle, PeerCheck::TrustDomain(td), crypto_provider())
                .expect("server config");
        cfg.alpn_protocols = vec![super::ALPN_H2.to_vec()];
        cfg
    }
}
