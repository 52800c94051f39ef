//! HBONE clients for attacks and edge cases: dialing from inside a pod's namespace as an
//! application would, with the mesh's trust bundle.
//!
//! Must not: bypass the data plane it tests (no ztunnel mark on sockets, no shortcut around
//! TLS).

use std::net::SocketAddr;
use std::pin::Pin;

use membrane_identity::{SharedTrustBundle, TrustBundle};
use membrane_ztunnel::hbone::Dial;

use crate::mesh::{Mesh, socket_in_netns};
use crate::trust_domain;

/// Dials from inside the pod namespace at this path without the ztunnel mark (like an
/// application: the connection is captured).
pub struct FromPod(pub std::path::PathBuf);

impl Dial for FromPod {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<
        Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + '_>,
    > {
        Box::pin(async move {
            let socket = socket_in_netns(self.0.clone()).map_err(std::io::Error::other)?;
            socket.connect(addr).await
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
