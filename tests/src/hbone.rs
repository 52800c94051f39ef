//! HBONE clients for attacks and edge cases: dialing from inside a pod's namespace as an
//! application would, with the mesh's trust bundle.
//!
//! Must not: bypass the data plane it tests (no ztunnel mark on sockets, no shortcut around
//! TLS).

use std::net::SocketAddr;

use membrane_identity::{SharedTrustBundle, TrustBundle};
use membrane_ztunnel::hbone::{Carrier, Dial, DialFuture};

use crate::mesh::{Mesh, socket_in_netns};
use crate::trust_domain;

/// Dials from inside the pod namespace at this path without the ztunnel mark (like an
/// application: the connection is captured).
pub struct FromPod(pub std::path::PathBuf);

impl Dial for FromPod {
    fn dial(&self, addr: SocketAddr) -> DialFuture<'_> {
        Box::pin(async move {
            let socket = socket_in_netns(self.0.clone()).map_err(std::io::Error::other)?;
            socket.connect(addr).await.map(Carrier::tcp)
        })
    }
}

/// The trust bundle the mesh's controller distributes.
pub fn mesh_bundle(mesh: &Mesh) -> anyhow::Result<SharedTrustBundle> {
    Ok(SharedTrustBundle::new(TrustBundle::from_pem(
        trust_domain(),
        mesh.ca().root_pem().as_bytes(),
    )?))
}

/// Opens an HBONE tunnel from inside pod `from`: presents `svid`, requires exactly `peer` at
/// `peer_ip`:15008 (verified against `bundle`), negotiates with `provider`'s key exchange, and
/// asks for `dst` with `headers`.
#[allow(clippy::too_many_arguments)]
pub async fn connect_as(
    mesh: &Mesh,
    from: &str,
    svid: &membrane_identity::WorkloadSvid,
    bundle: SharedTrustBundle,
    peer: &membrane_identity::SpiffeId,
    peer_ip: std::net::IpAddr,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
    dst: SocketAddr,
    headers: membrane_ztunnel::hbone::ConnectHeaders,
) -> Result<membrane_ztunnel::hbone::H2Stream, membrane_ztunnel::hbone::HboneError> {
    use membrane_ztunnel::hbone::{self, HbonePool, PoolConfig, PoolKey};
    let mut cfg = membrane_identity::verify::mtls_client_config(
        svid,
        bundle,
        membrane_identity::PeerCheck::Exact(peer.clone()),
        provider,
    )
    .expect("a client configuration from a valid SVID");
    cfg.alpn_protocols = vec![hbone::ALPN_H2.to_vec()];
    let key = PoolKey {
        src_ip: mesh.ip(from),
        src: svid.identity().spiffe_id().clone(),
        dst: peer.clone(),
        dst_addr: SocketAddr::new(peer_ip, hbone::HBONE_PORT),
        via: None,
    };
    HbonePool::new(PoolConfig::default())
        .connect(
            key,
            std::sync::Arc::new(cfg),
            std::sync::Arc::new(FromPod(mesh.netns_path(from))),
            dst,
            headers,
        )
        .await
}
