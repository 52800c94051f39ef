//! `TrustFederation` through the real CRD (kube-apiserver + etcd): the controller, run as the
//! chart runs it, follows a federation created with kubectl (its fetcher runs and reports the
//! trust domain), keeps it through an invalid edit, and drops it when the object is deleted.

use std::time::Duration;

use anyhow::Context;
use membrane_testbed::kube::{KubeApi, KubeController};
use membrane_tests::OfflineCa;
use membrane_tests::kube::{Chart, apply, install, start_controller, until};

const B: &str = "cluster-b.example";

fn federation(trust_domain: &str, root_pem: &str) -> String {
    let indented: String = root_pem.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: security.membrane.dev/v1\nkind: TrustFederation\nmetadata: {{name: cluster-b}}\nspec:\n  trustDomain: {trust_domain}\n  bundleEndpoint:\n    url: https://127.0.0.1:9/\n    spiffeId: spiffe://{B}/ns/membrane-system/sa/membrane-ca\n  bootstrapBundle: |\n{indented}"
    )
}

/// Whether the controller's metrics hold a line of `name` for trust domain B.
async fn reports(controller: &KubeController, name: &str) -> anyhow::Result<bool> {
    let page = controller.metrics().await?;
    Ok(page
        .lines()
        .any(|l| l.starts_with(name) && l.contains(&format!("trust_domain=\"{B}\""))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_federation_follows_its_custom_resource() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    let chart = Chart::render(&[])?;
    install(&api, &chart)?;
    let controller = start_controller(&api, &chart, "membrane-ca-0").await?;
    let root = OfflineCa::root("cluster B")?;
    apply(&api, &federation(B, &root.pem()))?;
    // The federation is in force: its bootstrap bundle's age is reported and its fetcher
    // tries B's (unreachable) endpoint.
    let age = "membrane_ca_federated_bundle_age_seconds";
    until(
        "the federation is followed",
        Duration::from_secs(30),
        || async {
            Ok(reports(&controller, age).await?
                && reports(&controller, "membrane_ca_federated_bundle_fetches_total").await?)
        },
    )
    .await?;

    // An invalid edit is stored by the API server (the schema is open) and ignored by the
    // controller: the federation stays.
    apply(&api, &federation("Not A Trust Domain", &root.pem()))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    anyhow::ensure!(
        reports(&controller, age).await?,
        "an invalid edit dropped the federation"
    );

    // Deleted: no longer followed.
    api.kubectl(&["delete", "trustfederation", "cluster-b"], None)
        .context("deleting the federation")?;
    until(
        "the federation is dropped",
        Duration::from_secs(30),
        || async { Ok(!reports(&controller, age).await?) },
    )
    .await?;
    controller.stop()?;
    Ok(())
}
