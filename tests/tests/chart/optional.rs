//! The optional parts: federation listeners and gateways, rendered only when enabled, least-
//! privileged and known to the controller.

use super::*;

/// Both federation listeners enabled.
pub(super) fn federation_enabled(helm: &Path) -> anyhow::Result<Rendered> {
    template(
        helm,
        &[
            "--set",
            "federation.bundleEndpoint.enabled=true",
            "--set",
            "federation.serviceExports.enabled=true",
        ],
    )
}

/// The federation listeners are off by default; enabled, the controller listens on their
/// ports and its Service and container expose them by name.
#[test]
fn federation_listeners_are_optional_and_exposed() -> anyhow::Result<()> {
    let helm = need_helm!();
    // `name=number` of each port of `list`, the number read from `key`.
    let ports = |list: &Value, key: &str| -> Vec<String> {
        (list.as_array().into_iter().flatten())
            .filter_map(|p| Some(format!("{}={}", p["name"].as_str()?, p[key])))
            .collect()
    };
    let r = defaults(&helm)?;
    let ca = container(r.deployment()?, "membrane-ca")?;
    ensure!(
        flag(ca, "bundle-endpoint-listen").is_empty() && flag(ca, "federation-listen").is_empty()
    );
    let service = r.one("Service")?;
    assert_eq!(
        ports(&service["spec"]["ports"], "port"),
        ["grpc-tls=15012", "http-metrics=15014"]
    );
    let r = federation_enabled(&helm)?;
    let ca = container(r.deployment()?, "membrane-ca")?;
    assert_eq!(flag1(ca, "bundle-endpoint-listen")?, "0.0.0.0:15015");
    assert_eq!(flag1(ca, "bundle-refresh-hint")?, "5m");
    assert_eq!(flag1(ca, "federation-listen")?, "0.0.0.0:15016");
    let service = r.one("Service")?;
    assert_eq!(
        ports(&service["spec"]["ports"], "port"),
        [
            "grpc-tls=15012",
            "http-metrics=15014",
            "https-bundle=15015",
            "grpc-exports=15016"
        ]
    );
    assert_eq!(
        ports(&ca["ports"], "containerPort"),
        [
            "grpc-tls=15012",
            "http-metrics=15014",
            "https-bundle=15015",
            "grpc-exports=15016"
        ]
    );
    Ok(())
}

/// Every gateway enabled.
pub(super) fn gateways_enabled(helm: &Path) -> anyhow::Result<Rendered> {
    template(
        helm,
        &[
            "--set",
            "gateways.egress.enabled=true",
            "--set",
            "gateways.ingress.enabled=true",
            "--set",
            "gateways.eastWest.enabled=true",
        ],
    )
}

/// Gateways are rendered only when enabled; each has its own ServiceAccount (no API access),
/// the controller accepts exactly their accounts, their pods carry the gateway labels, run
/// without capability, host path or API token, and present a token for the controller.
#[test]
fn gateways_are_optional_least_privileged_and_known_to_the_controller() -> anyhow::Result<()> {
    let helm = need_helm!();
    for r in [defaults(&helm)?, custom(&helm)?] {
        ensure!(
            r.gateways().is_empty(),
            "a gateway rendered without being enabled"
        );
        let ca = container(r.deployment()?, "membrane-ca")?;
        ensure!(flag(ca, "gateway-service-account").is_empty());
    }
    let r = gateways_enabled(&helm)?;
    let gateways = r.gateways();
    assert_eq!(
        gateways.keys().map(String::as_str).collect::<Vec<_>>(),
        ["east-west", "egress", "ingress"]
    );
    let ca = container(r.deployment()?, "membrane-ca")?;
    let mut accepted = Vec::new();
    for (kind, deployment) in &gateways {
        let spec = pod_spec(deployment);
        let account = str_of(&spec["serviceAccountName"]).to_owned();
        let sa = r.named("ServiceAccount", &account)?;
        assert_eq!(sa["automountServiceAccountToken"], false, "{kind}");
        assert_eq!(spec["automountServiceAccountToken"], false, "{kind}");
        accepted.push(format!("{NAMESPACE}/{account}"));
        for binding in r
            .all("ClusterRoleBinding")
            .into_iter()
            .chain(r.all("RoleBinding"))
        {
            for subject in binding["subjects"].as_array().into_iter().flatten() {
                ensure!(
                    subject["name"] != account.as_str(),
                    "{account} is bound to a role"
                );
            }
        }
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["membrane.dev/gateway"], kind.as_str());
        assert_eq!(
            labels["gateway.networking.k8s.io/gateway-name"],
            kind.as_str()
        );
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{kind}");
        let gw = container(deployment, "gateway")?;
        assert_eq!(flag1(gw, "gateway")?, kind.as_str());
        assert_eq!(
            flag1(gw, "gateway-pod")?,
            "$(MEMBRANE_POD_NAMESPACE)/$(MEMBRANE_POD_NAME)"
        );
        assert_eq!(
            gw["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        ensure!(
            gw["securityContext"]["capabilities"]["add"].is_null(),
            "{kind} adds capabilities"
        );
        assert_eq!(gw["securityContext"]["readOnlyRootFilesystem"], true);
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            ensure!(
                volume["hostPath"].is_null(),
                "{kind} mounts a host path: {volume}"
            );
            ensure!(
                volume["secret"].is_null(),
                "{kind} mounts a Secret: {volume}"
            );
        }
        let token = volume(deployment, "token")?;
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            flag1(ca, "token-audience")?.as_str()
        );
        let service = r.named("Service", str_of(&deployment["metadata"]["name"]))?;
        let port = &service["spec"]["ports"][0];
        match kind.as_str() {
            "egress" => assert_eq!(
                (port["port"].as_u64(), service["spec"]["type"].as_str()),
                (Some(15008), Some("ClusterIP"))
            ),
            // Federated clusters' ztunnels dial it from outside the cluster.
            "east-west" => assert_eq!(
                (
                    port["port"].as_u64(),
                    service["spec"]["type"].as_str(),
                    service["spec"]["externalTrafficPolicy"].as_str()
                ),
                (Some(15008), Some("LoadBalancer"), Some("Local"))
            ),
            _ => assert_eq!(
                (port["port"].as_u64(), service["spec"]["type"].as_str()),
                (Some(443), Some("LoadBalancer"))
            ),
        }
        let pdb = r.named(
            "PodDisruptionBudget",
            str_of(&deployment["metadata"]["name"]),
        )?;
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"],
            deployment["spec"]["selector"]["matchLabels"]
        );
    }
    let mut flags = flag(ca, "gateway-service-account");
    flags.sort();
    assert_eq!(flags, accepted);
    // One replica: no disruption budget.
    let single = template(
        &helm,
        &[
            "--set",
            "gateways.egress.enabled=true",
            "--set",
            "gateways.egress.replicas=1",
        ],
    )?;
    ensure!(
        !single
            .all("PodDisruptionBudget")
            .iter()
            .any(|p| str_of(&p["metadata"]["name"]).ends_with("egress-gateway")),
        "a single gateway replica got a disruption budget"
    );
    Ok(())
}
