//! The chart against a real kube-apiserver (etcd, RBAC, service-account tokens, the audit log;
//! `scripts/lib/kube.sh` installs them): `helm template` applied, the controller run with a
//! token of the chart's ServiceAccount, the ztunnel's bound token through TokenReview, policy
//! status written — and every request the controller made compared with what the chart's
//! ClusterRole and Role grant: a permission it lacks fails the test, named; a permission it
//! never used fails it too.

use std::time::Duration;

use anyhow::{Context, ensure};
use membrane_testbed::kube::{KubeApi, KubeController};
use membrane_tests::identity;
use membrane_tests::kube::{
    Chart, NAMESPACE, RbacReport, accepted, apply, ca_client, create_pod, install,
    start_controller, until, ztunnel_token,
};
use serde_json::json;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: training, labels: {membrane.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: inference, labels: {membrane.dev/mesh: enabled}}
---
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata: {name: trainer-only, namespace: inference}
spec:
  selector: {matchLabels: {app: model-server}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/training/sa/trainer"]}}]
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: model-hub, namespace: training}
spec:
  selector: {matchLabels: {app: trainer}}
  rules:
    - to: [{hosts: [huggingface.co], ports: [443]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: inference}
spec:
  gatewayClassName: membrane
  listeners: [{name: api, port: 8443, protocol: TLS, tls: {mode: Passthrough}}]
"#;

/// The trainer's Pod on node-a, running.
async fn trainer_pod(api: &KubeApi) -> anyhow::Result<String> {
    let labels = json!({"app": "trainer"});
    create_pod(
        api,
        "training",
        "trainer",
        "trainer",
        "node-a",
        "10.244.1.10",
        &labels,
    )
    .await
}

/// Waits until `token` obtains the trainer's identity (the controller's view catches up).
async fn trainer_identity_issued(controller: &KubeController, token: &str) -> anyhow::Result<()> {
    let trainer = identity("training", "trainer");
    until(
        "the trainer's identity is issued",
        Duration::from_secs(20),
        || {
            let trainer = &trainer;
            async move {
                let mut client = ca_client(controller, token).await?;
                Ok(client.request_svid(trainer, Duration::ZERO).await.is_ok())
            }
        },
    )
    .await
}

/// Runs everything the controller's permissions exist for: its reflectors start, both policy
/// kinds get status, a ztunnel's bound token is reviewed and an identity issued, the status
/// Lease is created and renewed. Returns the controller (still running).
async fn exercise(api: &KubeApi, chart: &Chart) -> anyhow::Result<KubeController> {
    apply(api, OBJECTS)?;
    trainer_pod(api).await?;
    let controller = start_controller(api, chart, "membrane-ca-0").await?;
    let token = ztunnel_token(api, chart, "node-a").await?;
    trainer_identity_issued(&controller, &token).await?;
    for (plural, ns, name) in [
        ("authorizationpolicies", "inference", "trainer-only"),
        ("egresspolicies", "training", "model-hub"),
    ] {
        until(
            &format!("{plural} {ns}/{name} has status"),
            Duration::from_secs(20),
            || async move { Ok(accepted(api, plural, ns, name).await?.is_some()) },
        )
        .await?;
    }
    // The holder renews the Lease every 5 s (get, update): wait for one renewal.
    tokio::time::sleep(Duration::from_secs(7)).await;
    Ok(controller)
}

#[tokio::test]
async fn the_chart_grants_exactly_what_the_controller_uses() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    let chart = Chart::render(&[])?;
    install(&api, &chart)?;
    // A permission the chart lacks shows first as a denial in the audit log: report that
    // (named) before whatever the missing permission broke downstream.
    let outcome = exercise(&api, &chart).await;
    let report = RbacReport::of(&api, &chart)?;
    ensure!(
        report.requests > 20,
        "too few audited requests ({}): is the audit log wired?",
        report.requests
    );
    report.check()?;
    let controller = outcome?;
    let condition = accepted(&api, "authorizationpolicies", "inference", "trainer-only")
        .await?
        .context("no Accepted condition")?;
    ensure!(
        condition["status"] == "True",
        "the valid policy is not accepted: {condition}"
    );
    controller.stop()?;
    Ok(())
}

#[tokio::test]
async fn a_verb_missing_from_the_chart_is_named() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    let mut chart = Chart::render(&[])?;
    chart.remove_verb("pods", "watch")?;
    install(&api, &chart)?;
    let controller = start_controller(&api, &chart, "membrane-ca-0").await?;
    apply(&api, OBJECTS)?;
    until("the denial is audited", Duration::from_secs(20), || async {
        Ok(!RbacReport::of(&api, &chart)?.denied.is_empty())
    })
    .await?;
    let report = RbacReport::of(&api, &chart)?;
    let error = report
        .check()
        .err()
        .context("the check passed without the pods watch permission")?;
    let text = format!("{error:#}");
    ensure!(
        text.contains("denied watch pods (core)"),
        "the missing permission is not named: {text}"
    );
    controller.stop()?;
    Ok(())
}

#[tokio::test]
async fn a_token_of_another_account_or_audience_gets_no_identity() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    let chart = Chart::render(&[])?;
    install(&api, &chart)?;
    apply(&api, OBJECTS)?;
    trainer_pod(&api).await?;
    let controller = start_controller(&api, &chart, "membrane-ca-0").await?;
    let trainer = identity("training", "trainer");
    // The ztunnel's account, bound to a pod on node-a, but for the API server's audience.
    let ztunnel = chart.ztunnel_account()?;
    let wrong_audience = api
        .token(NAMESPACE, &ztunnel, membrane_testbed::kube::ISSUER, None)
        .await?;
    // The controller's own account with the right audience: not a ztunnel.
    let audience = chart.controller_flag("token-audience")?;
    let wrong_account = api
        .token(NAMESPACE, &chart.controller_account()?, &audience, None)
        .await?;
    let good = ztunnel_token(&api, &chart, "node-a").await?;
    trainer_identity_issued(&controller, &good).await?;
    for (what, token) in [
        ("another audience", &wrong_audience),
        ("another account", &wrong_account),
    ] {
        let mut client = ca_client(&controller, token).await?;
        let answer = client.request_svid(&trainer, Duration::ZERO).await;
        ensure!(answer.is_err(), "a token of {what} got an identity");
    }
    controller.stop()?;
    Ok(())
}
