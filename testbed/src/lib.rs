//! Membrane's testbed: a whole mesh on one Linux host, shipped by `membrane local` and
//! `membrane demo` and used by the end-to-end tests.
//!
//! Owns: the simulated cluster ([`netns`]: nodes and pods as network namespaces, packet
//! capture on the fabric), the controller it runs ([`TestCa`]: the real `membrane_ca::app` on
//! a loopback port with its own temporary state, manifest directory and token file) and the
//! mesh of real `ztunnel` processes ([`mesh`]), and the simulated outside world the mesh's
//! pods reach ([`world`]: a resolver and servers for a few names), and Istio's ztunnel beside
//! them when the user supplies one ([`istio`]). Dropping a testbed removes every namespace,
//! process and directory it created.
//!
//! Must not: touch the host's own network namespace or any namespace it did not create, send
//! traffic anywhere but loopback and its own namespaces, or carry test assertions and
//! test-only helpers (those live in the `membrane-tests` harness, which builds on this crate).

mod controller;
pub mod istio;
pub mod kube;
pub mod mesh;
pub mod netns;
pub mod pki;
pub mod world;

pub use controller::{TestCa, TestCaBuilder};
pub use pki::{OfflineCa, impostor_svid};

/// Whether this process runs as root (the testbed's network namespaces need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// An error unless this process runs as root. Every test that needs root calls this first (and
/// is marked `#[ignore = "needs root"]`, so a non-root `cargo test` reports it ignored; the
/// test script runs ignored tests when it is root): a forced run without root fails loudly
/// instead of passing without its assertions.
pub fn require_root() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "needs root (network namespaces, nftables): run as root, or leave the test ignored"
    );
    Ok(())
}

use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::{TrustDomain, WorkloadIdentity};
use std::net::SocketAddr;

/// Token of the simulated node `node-a`.
pub const NODE_A_TOKEN: &str = "node-a-bootstrap-token-0001";
/// Token of the simulated node `node-b`.
pub const NODE_B_TOKEN: &str = "node-b-bootstrap-token-0002";

/// A small mesh: `training` (enrolled) with a trainer on node-a and an inference server on
/// node-b, and `legacy` (not enrolled) with a pod on node-a.
pub const MESH_MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: training
  labels:
    membrane.dev/mesh: enabled
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata: {name: trainer-0, namespace: training}
spec: {serviceAccountName: trainer, nodeName: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: inference-0, namespace: training}
spec: {serviceAccountName: inference, nodeName: node-b}
---
apiVersion: v1
kind: Pod
metadata: {name: old-app, namespace: legacy}
spec: {serviceAccountName: old-app, nodeName: node-a}
"#;

/// The bootstrap token the harness gives node `node`.
pub fn node_token(node: &str) -> String {
    format!("{node}-bootstrap-token-for-tests")
}

/// The trust domain the harness uses.
pub fn trust_domain() -> TrustDomain {
    parse_trust_domain("cluster.local").expect("valid trust domain")
}

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn identity(ns: &str, sa: &str) -> WorkloadIdentity {
    WorkloadIdentity::new(&trust_domain(), ns, sa).expect("valid identity")
}

/// A plain HTTP/1.1 GET on loopback: the response body, or an error for a non-2xx status.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    read_response(&mut s).await
}

/// A plain HTTP/1.1 POST of a JSON `body` on loopback: the status and the response body.
pub async fn http_post(addr: SocketAddr, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    read_response(&mut s).await
}

/// Reads a whole HTTP/1.1 response (the server closes): its status and body.
async fn read_response(s: &mut tokio::net::TcpStream) -> anyhow::Result<(u16, String)> {
    use tokio::io::AsyncReadExt;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response: {out:?}"))?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}

/// Deterministic pseudo-random bytes (xorshift64): both ends of a test stream can generate
/// and check the same bytes without storing them.
#[derive(Debug, Clone)]
pub struct Pattern(pub u64);

impl Pattern {
    /// Fills `buf` with the next bytes of the sequence.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// The certificates of a PEM bundle, DER, sorted (unparseable blocks are left out).
pub fn pem_certificates(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let mut ders: Vec<Vec<u8>> = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect();
    ders.sort();
    ders
}

/// Waits for a child this process started to exit within `grace`, then kills and reaps it.
pub fn reap(mut child: std::process::Child, grace: std::time::Duration) {
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
