//! Membrane's end-to-end test harness. Today it is the testbed ([`membrane_testbed`]: the
//! network-namespace mesh, the controller with its one builder [`TestCa::builder`], the
//! offline CAs of [`OfflineCa`] and the one root check [`require_root`]) re-exported, so tests
//! write `membrane_tests::mesh::Mesh`; helpers only tests need go here.
//!
//! Must not: hold anything `membrane local` or `membrane demo` needs at run time (that belongs
//! in `membrane-testbed`).

pub mod clusters;
pub mod cni;
pub mod hbone;
pub mod helm;
pub mod kube;

/// Clients of the simulated world run from inside pods.
pub use membrane_testbed::world::client as outside;
/// The DNS client of the simulated world (kept under its old name for the tests).
pub use membrane_testbed::world::dns_client as dns;

pub use membrane_testbed::*;

/// The sum of the samples of ztunnel metric `name` on `node` whose line contains every one of
/// `labels` (e.g. `rcode="SERVFAIL"`).
pub async fn ztunnel_metric(
    mesh: &mesh::Mesh,
    node: &str,
    name: &str,
    labels: &[&str],
) -> anyhow::Result<f64> {
    let (_, body) = http_get(mesh.ztunnels[node].metrics, "/metrics").await?;
    Ok(metric_sum(&body, name, labels))
}

/// The sum of the samples of metric `name` in the exposition `text` whose line contains every
/// one of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
