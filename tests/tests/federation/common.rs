//! What the federation tests share: a `TrustFederation` document and a federated controller
//! A with node-a's discovery stream.

use membrane_proto::v1 as pb;
use membrane_tests::{MESH_MANIFESTS, TestCa, node_token};

/// A `TrustFederation` named `name` for trust domain `td`, its bundle endpoint at `url`
/// (identity `spiffe://<td>/ns/membrane-system/sa/membrane-ca`), bootstrapped with
/// `bootstrap_pem`.
pub fn federation(name: &str, td: &str, url: &str, bootstrap_pem: &str) -> String {
    let indented: String = bootstrap_pem
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    format!(
        "---\napiVersion: security.membrane.dev/v1\nkind: TrustFederation\nmetadata: {{name: {name}}}\nspec:\n  trustDomain: {td}\n  bundleEndpoint:\n    url: {url}\n    spiffeId: spiffe://{td}/ns/membrane-system/sa/membrane-ca\n  bootstrapBundle: |\n{indented}"
    )
}

/// Controller A (trust domain `cluster-a.example`) with the mesh manifests and the
/// `TrustFederation` document `federation`, and node-a's discovery stream from it.
pub async fn federated_controller(
    federation: &str,
) -> anyhow::Result<(TestCa, tonic::Streaming<pb::Update>)> {
    let a = TestCa::builder()
        .trust_domain("cluster-a.example")
        .nodes(&["node-a".to_owned()])
        .manifest("mesh.yaml", MESH_MANIFESTS)
        .manifest("federation.yaml", federation)
        .start()
        .await?;
    let mut client = a.client(&node_token("node-a")).await?;
    let stream = client.watch("node-a").await?;
    Ok((a, stream))
}
