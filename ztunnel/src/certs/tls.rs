//! [`TlsConfigs`]: the rustls configurations HBONE runs with, built from a workload's SVID and
//! cached per certificate serial.
//!
//! Most tunnels ride a pooled connection and most inbound connections come from peers already
//! seen, so building a configuration per connection was work on the hot path for nothing. A
//! client configuration is keyed by (source identity, expected peer), a server configuration
//! by the identity it presents; each entry remembers the serial of the SVID it was built from,
//! and a new serial (a renewal) replaces it. Every configuration shares the node's trust
//! bundle, so a cached one still sees bundle updates (root rotation) at its next handshake.
//! Every configuration offers exactly ALPN `h2`. An identity whose last pod left is forgotten
//! ([`TlsConfigs::forget`]), as the certificate manager forgets its SVID.
//!
//! What it must not do: obtain or renew certificates (the [`super::CertificateManager`] does;
//! callers pass the SVID it returned), or open connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use membrane_identity::verify::{mtls_client_config, mtls_server_config};
use membrane_identity::{PeerCheck, SharedTrustBundle, SpiffeId, WorkloadSvid};

/// The only ALPN protocol HBONE speaks (the value `crate::hbone::ALPN_H2` checks for).
const ALPN_H2: &[u8] = b"h2";

/// A TLS configuration could not be built from an SVID.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot build the TLS configuration presenting {identity}: {source}")]
pub struct TlsConfigError {
    /// The identity the configuration would present.
    pub identity: SpiffeId,
    /// Why rustls refused.
    #[source]
    pub source: rustls::Error,
}

/// Client and server configurations per identity, rebuilt only when the SVID's serial changes.
#[derive(Debug)]
pub struct TlsConfigs {
    bundle: SharedTrustBundle,
    /// (source, expected peer) → (SVID serial, configuration).
    clients: Mutex<HashMap<(SpiffeId, SpiffeId), Cached<rustls::ClientConfig>>>,
    /// Presented identity → (SVID serial, configuration).
    servers: Mutex<HashMap<SpiffeId, Cached<rustls::ServerConfig>>>,
}

type Cached<T> = (String, Arc<T>);

impl TlsConfigs {
    /// An empty cache. Peers are verified against `bundle` (the local trust domain's roots
    /// and the federated ones, each for its own trust domain).
    pub fn new(bundle: SharedTrustBundle) -> Self {
        Self {
            bundle,
            clients: Mutex::default(),
            servers: Mutex::default(),
        }
    }

    /// The client configuration presenting `svid` and accepting only a server that proves
    /// exactly `expected_peer`.
    pub fn client_config(
        &self,
        svid: &WorkloadSvid,
        expected_peer: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
        let key = (svid.identity().spiffe_id().clone(), expected_peer.clone());
        cached(&self.clients, key, svid, || {
            let mut cfg = mtls_client_config(
                svid,
                self.bundle.clone(),
                PeerCheck::Exact(expected_peer.clone()),
                membrane_identity::crypto_provider(),
            )?;
            cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
            // HBONE takes over the traffic secrets once the handshake is done (hbone::tls).
            cfg.enable_secret_extraction = true;
            Ok(cfg)
        })
    }

    /// The server configuration presenting `svid` and accepting any client whose chain
    /// verifies against the bundle of its own trust domain: the mesh's, or a federated one
    /// (which client may do what is policy's decision, after the handshake).
    pub fn server_config(
        &self,
        svid: &WorkloadSvid,
    ) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
        let key = svid.identity().spiffe_id().clone();
        cached(&self.servers, key, svid, || {
            let mut cfg = mtls_server_config(
                svid,
                self.bundle.clone(),
                PeerCheck::AnyTrusted,
                membrane_identity::crypto_provider(),
            )?;
            cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
            // HBONE takes over the traffic secrets once the handshake is done (hbone::tls).
            cfg.enable_secret_extraction = true;
            Ok(cfg)
        })
    }

    /// Drops every configuration presenting `identity` (its last pod left this node), so its
    /// key is no longer held here. Returns how many were dropped.
    pub fn forget(&self, identity: &SpiffeId) -> usize {
        let mut clients = crate::lock(&self.clients);
        let before = clients.len();
        clients.retain(|(src, _), _| src != identity);
        let dropped = before - clients.len();
        drop(clients);
        dropped + usize::from(crate::lock(&self.servers).remove(identity).is_some())
    }
}

/// The entry of `key` if it was built from `svid`'s serial, else a new one from `build`.
fn cached<K, T>(
    cache: &Mutex<HashMap<K, Cached<T>>>,
    key: K,
    svid: &WorkloadSvid,
    build: impl FnOnce() -> Result<T, rustls::Error>,
) -> Result<Arc<T>, TlsConfigError>
where
    K: std::hash::Hash + Eq,
{
    let serial = &svid.info().serial;
    if let Some((built_from, cfg)) = crate::lock(cache).get(&key)
        && built_from == serial
    {
        return Ok(cfg.clone());
    }
    let cfg = Arc::new(build().map_err(|source| TlsConfigError {
        identity: svid.identity().spiffe_id().clone(),
        source,
    })?);
    crate::lock(cache).insert(key, (serial.clone(), cfg.clone()));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use membrane_identity::TrustBundle;
    use membrane_identity::spiffe_id::parse_trust_domain;
    use membrane_testbed::OfflineCa;

    use super::*;

    const TRAINER: &str = "spiffe://cluster.local/ns/ml/sa/trainer";
    const STORE: &str = "spiffe://cluster.local/ns/data/sa/store";
    const CACHE: &str = "spiffe://cluster.local/ns/data/sa/cache";

    /// A test CA: configs trusting it, and fresh SVIDs (each call: a new key and serial).
    struct Ca(OfflineCa);

    impl Ca {
        fn new() -> Self {
            Self(OfflineCa::root("test root").expect("root"))
        }

        fn configs(&self) -> TlsConfigs {
            let td = parse_trust_domain("cluster.local").expect("td");
            let bundle = TrustBundle::new(td, [self.0.der().clone()]).expect("bundle");
            TlsConfigs::new(SharedTrustBundle::new(bundle))
        }

        fn svid(&self, uri: &str) -> WorkloadSvid {
            self.0.svid(uri, &[]).expect("svid")
        }
    }

    fn id(uri: &str) -> SpiffeId {
        SpiffeId::new(uri).expect("id")
    }

    #[test]
    fn client_configs_are_cached_per_serial_and_expected_peer() {
        let ca = Ca::new();
        let configs = ca.configs();
        let svid = ca.svid(TRAINER);
        let first = configs.client_config(&svid, &id(STORE)).expect("config");
        assert_eq!(first.alpn_protocols, vec![b"h2".to_vec()]);
        let again = configs.client_config(&svid, &id(STORE)).expect("config");
        assert!(Arc::ptr_eq(&first, &again), "same serial: the same config");
        let other_peer = configs.client_config(&svid, &id(CACHE)).expect("config");
        assert!(
            !Arc::ptr_eq(&first, &other_peer),
            "the expected peer is part of the key"
        );
        assert!(
            Arc::ptr_eq(
                &other_peer,
                &configs.client_config(&svid, &id(CACHE)).expect("config")
            ),
            "each expected peer keeps its own entry"
        );
        let renewed = ca.svid(TRAINER);
        assert_ne!(svid.info().serial, renewed.info().serial);
        let after_renewal = configs.client_config(&renewed, &id(STORE)).expect("config");
        assert!(
            !Arc::ptr_eq(&first, &after_renewal),
            "new serial: a new config"
        );
        assert!(Arc::ptr_eq(
            &after_renewal,
            &configs.client_config(&renewed, &id(STORE)).expect("config")
        ));
    }

    #[test]
    fn server_configs_are_cached_per_serial_and_identity() {
        let ca = Ca::new();
        let configs = ca.configs();
        let store = ca.svid(STORE);
        let first = configs.server_config(&store).expect("config");
        assert_eq!(first.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(Arc::ptr_eq(
            &first,
            &configs.server_config(&store).expect("config")
        ));
        let other = configs.server_config(&ca.svid(CACHE)).expect("config");
        assert!(!Arc::ptr_eq(&first, &other), "another identity");
        let renewed = configs.server_config(&ca.svid(STORE)).expect("config");
        assert!(!Arc::ptr_eq(&first, &renewed), "new serial: a new config");
    }

    #[test]
    fn forgetting_an_identity_drops_only_its_configs() {
        let ca = Ca::new();
        let configs = ca.configs();
        let (trainer, store) = (ca.svid(TRAINER), ca.svid(STORE));
        let kept = configs.client_config(&store, &id(CACHE)).expect("config");
        let server = configs.server_config(&store).expect("config");
        configs.client_config(&trainer, &id(STORE)).expect("config");
        configs.client_config(&trainer, &id(CACHE)).expect("config");
        configs.server_config(&trainer).expect("config");
        assert_eq!(configs.forget(&id(TRAINER)), 3);
        assert_eq!(configs.forget(&id(TRAINER)), 0);
        assert!(Arc::ptr_eq(
            &kept,
            &configs.client_config(&store, &id(CACHE)).expect("config")
        ));
        assert!(Arc::ptr_eq(
            &server,
            &configs.server_config(&store).expect("config")
        ));
    }

    /// A cached configuration presents the SVID it was built from and, after a renewal, the
    /// new one: what the pool compares to decide whether a connection may be reused.
    #[test]
    fn a_renewal_changes_the_presented_certificate() {
        let ca = Ca::new();
        let configs = ca.configs();
        let presented = |cfg: &rustls::ClientConfig| {
            let schemes = cfg
                .crypto_provider()
                .signature_verification_algorithms
                .supported_schemes();
            let key = cfg
                .client_auth_cert_resolver
                .resolve(&[], &schemes)
                .expect("a client certificate");
            key.cert[0].clone()
        };
        let old = ca.svid(TRAINER);
        let cfg = configs.client_config(&old, &id(STORE)).expect("config");
        assert_eq!(presented(&cfg), old.chain()[0]);
        let new = ca.svid(TRAINER);
        let cfg = configs.client_config(&new, &id(STORE)).expect("config");
        assert_eq!(presented(&cfg), new.chain()[0]);
    }
}
