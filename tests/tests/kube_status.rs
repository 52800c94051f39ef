//! Policies through the real CRD and a real Lease (kube-apiserver + etcd): the API server's
//! schema admission refuses a malformed object; the controller writes `Accepted` (or the
//! field path of the problem) into status; with two replicas only the Lease holder writes, and
//! when it dies the other takes the Lease over and carries on.

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use membrane_testbed::kube::{KubeApi, KubeController};
use membrane_tests::kube::{Chart, NAMESPACE, accepted, apply, install, start_controller, until};

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: inference, labels: {membrane.dev/mesh: enabled}}
"#;

fn policy(name: &str, action: &str) -> String {
    format!(
        r#"
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: inference}}
spec:
  selector: {{matchLabels: {{app: model-server}}}}
  action: {action}
  rules:
    - from: [{{source: {{principals: ["cluster.local/ns/training/sa/trainer"]}}}}]
"#
    )
}

/// The sum of every sample of `name` on the controller's metrics page.
async fn metric(controller: &KubeController, name: &str) -> anyhow::Result<f64> {
    let page = controller.metrics().await?;
    Ok(page
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The status Lease's holder.
async fn holder(api: &KubeApi) -> anyhow::Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(api.client.clone(), NAMESPACE);
    Ok(leases
        .get_opt("membrane-ca-status")
        .await?
        .and_then(|l| l.spec?.holder_identity))
}

async fn condition(api: &KubeApi, name: &str) -> anyhow::Result<serde_json::Value> {
    accepted(api, "authorizationpolicies", "inference", name)
        .await?
        .with_context(|| format!("{name} has no Accepted condition"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_written_by_the_lease_holder_and_taken_over_when_it_dies() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    let chart = Chart::render(&[])?;
    install(&api, &chart)?;
    apply(&api, NAMESPACES)?;

    // Schema admission: `spec` must be an object; the API server refuses anything else and
    // stores nothing.
    let refused = apply(
        &api,
        "apiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: not-a-policy, namespace: inference}\nspec: allow everything\n",
    );
    let error = format!("{:#}", refused.err().context("a string spec was admitted")?);
    ensure!(
        error.contains("spec"),
        "the refusal does not name spec: {error}"
    );

    let replicas = [
        start_controller(&api, &chart, "membrane-ca-0").await?,
        start_controller(&api, &chart, "membrane-ca-1").await?,
    ];
    apply(&api, &policy("trainer-only", "ALLOW"))?;
    apply(&api, &policy("maybe", "MAYBE"))?;
    until(
        "both policies have status",
        Duration::from_secs(30),
        || async {
            Ok(
                accepted(&api, "authorizationpolicies", "inference", "trainer-only")
                    .await?
                    .is_some()
                    && accepted(&api, "authorizationpolicies", "inference", "maybe")
                        .await?
                        .is_some(),
            )
        },
    )
    .await?;
    let valid = condition(&api, "trainer-only").await?;
    ensure!(valid["status"] == "True", "valid policy: {valid}");
    let invalid = condition(&api, "maybe").await?;
    ensure!(
        invalid["status"] == "False"
            && invalid["message"]
                .as_str()
                .is_some_and(|m| m.contains("spec.action")),
        "the invalid policy's condition does not name spec.action: {invalid}"
    );

    // Exactly one replica holds the Lease; only it has written status.
    let held_by = holder(&api).await?.context("no Lease holder")?;
    let leader = usize::from(!held_by.starts_with("membrane-ca-0_"));
    ensure!(
        held_by.starts_with(["membrane-ca-0_", "membrane-ca-1_"][leader]),
        "Lease held by {held_by}"
    );
    let [a, b] = replicas;
    let (leader_ca, other) = if leader == 0 { (a, b) } else { (b, a) };
    let writes = "membrane_ca_policy_status_writes_total";
    let gauge = "membrane_ca_policy_status_leader";
    ensure!(
        metric(&leader_ca, gauge).await? == 1.0,
        "holder's leader gauge"
    );
    ensure!(metric(&other, gauge).await? == 0.0, "other's leader gauge");
    ensure!(
        metric(&leader_ca, writes).await? >= 2.0,
        "holder wrote no status"
    );
    ensure!(
        metric(&other, writes).await? == 0.0,
        "the replica without the Lease wrote status"
    );

    // The holder dies without releasing the Lease: the other takes it once it expired
    // (15 s unchanged) and writes the status of a policy created meanwhile.
    leader_ca.kill()?;
    apply(&api, &policy("after-takeover", "ALLOW"))?;
    let survivor = ["membrane-ca-0_", "membrane-ca-1_"][1 - leader];
    until(
        "the survivor takes the Lease",
        Duration::from_secs(40),
        || async { Ok(holder(&api).await?.is_some_and(|h| h.starts_with(survivor))) },
    )
    .await?;
    until(
        "the survivor writes the new status",
        Duration::from_secs(20),
        || async {
            Ok(
                accepted(&api, "authorizationpolicies", "inference", "after-takeover")
                    .await?
                    .is_some_and(|c| c["status"] == "True"),
            )
        },
    )
    .await?;
    ensure!(
        metric(&other, gauge).await? == 1.0,
        "survivor's leader gauge"
    );
    other.stop()?;
    Ok(())
}
