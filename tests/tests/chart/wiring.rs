//! Identity and wiring: the projected token issued for the controller's audience, ports,
//! probes and the controller's address line up, standard labels,
//! the disruption budget, values reaching arguments, images and resources, the CRD equal to the
//! Rust type, rendered flags accepted by the binaries.

use super::optional::{federation_enabled, gateways_enabled};
use super::*;

// ---------------------------------------------------------------------------------------------
// identity, wiring, values

#[test]
fn projected_token_audience_is_the_controllers() -> anyhow::Result<()> {
    let helm = need_helm!();
    let audiences = [
        chart_values()?["controller"]["tokenAudience"].clone(),
        fixture_values()?["controller"]["tokenAudience"].clone(),
    ];
    for (r, audience) in [defaults(&helm)?, custom(&helm)?].iter().zip(audiences) {
        let ds = r.daemonset()?;
        let token = volume(ds, "token")?;
        let sources = token["projected"]["sources"]
            .as_array()
            .context("sources")?;
        ensure!(sources.len() == 1, "token volume: {token}");
        let sat = &sources[0]["serviceAccountToken"];
        assert_eq!(sat["audience"], audience, "projected token audience");
        ensure!(sat["expirationSeconds"].as_u64().is_some_and(|s| s >= 600));

        let controller = container(r.deployment()?, "membrane-ca")?;
        assert_eq!(flag1(controller, "token-audience")?, str_of(&audience));

        let ztunnel = container(ds, "ztunnel")?;
        let mount = mount(ztunnel, "token").context("token mount")?;
        assert_eq!(
            flag1(ztunnel, "token-file")?,
            format!("{}/{}", str_of(&mount["mountPath"]), str_of(&sat["path"]))
        );
        // The controller accepts tokens of exactly the DaemonSet's account.
        assert_eq!(
            flag(controller, "ztunnel-service-account"),
            [format!(
                "{NAMESPACE}/{}",
                str_of(&pod_spec(ds)["serviceAccountName"])
            )]
        );
        // The node name comes from the downward API.
        assert_eq!(
            env(ztunnel, "MEMBRANE_NODE_NAME").context("MEMBRANE_NODE_NAME")?["valueFrom"]["fieldRef"]
                ["fieldPath"],
            "spec.nodeName"
        );
    }
    Ok(())
}

#[test]
fn ports_probes_and_the_controller_address_line_up() -> anyhow::Result<()> {
    let helm = need_helm!();
    for r in [defaults(&helm)?, custom(&helm)?] {
        let deployment = r.deployment()?;
        let ca = container(deployment, "membrane-ca")?;
        assert_eq!(flag1(ca, "listen")?, "0.0.0.0:15012");
        assert_eq!(flag1(ca, "metrics-listen")?, "0.0.0.0:15014");
        assert_eq!(flag1(ca, "source")?, "kubernetes");
        let ports: BTreeMap<&str, u64> = ca["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    str_of(&p["name"]),
                    p["containerPort"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            BTreeMap::from([("grpc-tls", 15012), ("http-metrics", 15014)])
        );
        assert_eq!(
            ca["readinessProbe"]["httpGet"],
            json!({"path": "/ready", "port": "http-metrics"})
        );
        ensure!(
            ca["livenessProbe"]["tcpSocket"] == json!({"port": "http-metrics"})
                && ca["livenessProbe"].get("httpGet").is_none(),
            "controller liveness probe: {}",
            ca["livenessProbe"]
        );

        let service = r.one("Service")?;
        ensure!(
            contains_labels(
                &deployment["spec"]["template"]["metadata"]["labels"],
                &service["spec"]["selector"]
            ),
            "the Service does not select the controller's pods"
        );
        let service_ports: BTreeMap<&str, (u64, &str)> = service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    str_of(&p["name"]),
                    (
                        p["port"].as_u64().unwrap_or_default(),
                        str_of(&p["targetPort"]),
                    ),
                )
            })
            .collect();
        assert_eq!(
            service_ports,
            BTreeMap::from([
                ("grpc-tls", (15012, "grpc-tls")),
                ("http-metrics", (15014, "http-metrics"))
            ])
        );

        // The ztunnel dials the Service and checks a name the serving certificate carries.
        let ds = r.daemonset()?;
        let zt = container(ds, "ztunnel")?;
        let host = format!("{}.{NAMESPACE}.svc", str_of(&service["metadata"]["name"]));
        assert_eq!(flag1(zt, "ca-address")?, format!("https://{host}:15012"));
        assert_eq!(flag1(zt, "ca-server-name")?, host);
        ensure!(
            flag(ca, "server-name").contains(&host),
            "serving certificate lacks {host}"
        );
        assert_eq!(flag1(zt, "readiness-addr")?, "0.0.0.0:15021");
        assert_eq!(flag1(zt, "metrics-addr")?, "0.0.0.0:15020");
        assert_eq!(
            flag1(zt, "admin-addr")?,
            "127.0.0.1:15000",
            "admin stays on loopback"
        );
        assert_eq!(
            zt["readinessProbe"]["httpGet"],
            json!({"path": "/healthz/ready", "port": "http-ready"})
        );
        // Liveness must not depend on winning a slot under the HTTP connection caps.
        ensure!(
            zt["livenessProbe"]["tcpSocket"] == json!({"port": "http-metrics"})
                && zt["livenessProbe"].get("httpGet").is_none(),
            "ztunnel liveness probe: {}",
            zt["livenessProbe"]
        );
        let ready_port = zt["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "http-ready")
            .context("http-ready port")?;
        assert_eq!(ready_port["containerPort"], 15021);
        // The bootstrap root is the trust root ConfigMap's key.
        let root = volume(ds, "ca-root")?;
        let mount = mount(zt, "ca-root").context("ca-root mount")?;
        assert_eq!(
            flag1(zt, "ca-root")?,
            format!("{}/root-cert.pem", str_of(&mount["mountPath"]))
        );
        assert_eq!(
            root["configMap"]["items"],
            json!([{"key": "root-cert.pem", "path": "root-cert.pem"}])
        );
    }
    Ok(())
}

#[test]
fn every_object_carries_the_standard_labels() -> anyhow::Result<()> {
    let helm = need_helm!();
    for (r, extra) in [
        (defaults(&helm)?, json!({})),
        (custom(&helm)?, fixture_values()?["commonLabels"].clone()),
    ] {
        for d in &r.docs {
            let what = format!("{} {}", d["kind"], d["metadata"]["name"]);
            let labels = &d["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/name"], "membrane", "{what}");
            assert_eq!(labels["app.kubernetes.io/instance"], RELEASE, "{what}");
            ensure!(
                !str_of(&labels["app.kubernetes.io/component"]).is_empty(),
                "{what} has no component label"
            );
            for (k, v) in extra.as_object().into_iter().flatten() {
                assert_eq!(&labels[k], v, "{what}: common label {k}");
            }
            if !d["spec"]["template"].is_null() {
                let pod = &d["spec"]["template"]["metadata"]["labels"];
                for k in [
                    "app.kubernetes.io/name",
                    "app.kubernetes.io/instance",
                    "app.kubernetes.io/component",
                ] {
                    assert_eq!(pod[k], labels[k], "{what}: pod label {k}");
                }
                assert_eq!(
                    pod["membrane.dev/mesh"], "disabled",
                    "{what}: never captured"
                );
                ensure!(
                    contains_labels(pod, &d["spec"]["selector"]["matchLabels"]),
                    "{what}: the selector does not match the pod labels"
                );
            }
        }
        assert_eq!(
            r.deployment()?["metadata"]["labels"]["app.kubernetes.io/component"],
            "controller"
        );
        assert_eq!(
            r.daemonset()?["metadata"]["labels"]["app.kubernetes.io/component"],
            "ztunnel"
        );
    }
    Ok(())
}

#[test]
fn disruption_budget_exists_exactly_when_there_are_several_replicas() -> anyhow::Result<()> {
    let helm = need_helm!();
    let r = defaults(&helm)?;
    assert_eq!(r.deployment()?["spec"]["replicas"], 1);
    assert!(
        r.all("PodDisruptionBudget").is_empty(),
        "a PDB for one replica blocks drains"
    );
    for (r, replicas) in [
        (custom(&helm)?, 3),
        (
            template(
                &helm,
                &[
                    "--set",
                    "controller.replicas=2",
                    "--set",
                    "ca.pluginSecret=cacerts",
                ],
            )?,
            2,
        ),
    ] {
        let deployment = r.deployment()?;
        assert_eq!(deployment["spec"]["replicas"], replicas);
        let pdb = r.one("PodDisruptionBudget")?;
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        ensure!(
            contains_labels(
                &deployment["spec"]["template"]["metadata"]["labels"],
                &pdb["spec"]["selector"]["matchLabels"]
            ),
            "the PDB does not select the controller's pods"
        );
        // Several replicas roll one by one; a self-managed root (one owner) is recreated.
        ensure!(deployment["spec"]["strategy"]["type"] != "Recreate");
    }
    assert_eq!(r.deployment()?["spec"]["strategy"]["type"], "Recreate");
    Ok(())
}

#[test]
fn values_flow_into_arguments_images_and_resources() -> anyhow::Result<()> {
    let helm = need_helm!();
    let v = fixture_values()?;
    let r = custom(&helm)?;
    let deployment = r.deployment()?;
    let ds = r.daemonset()?;
    let ca = container(deployment, "membrane-ca")?;
    let zt = container(ds, "ztunnel")?;
    let cni = container(ds, "install-cni")?;
    let certs = &v["certificates"];

    let td = str_of(&v["trustDomain"]);
    assert_eq!(flag1(ca, "trust-domain")?, td);
    assert_eq!(flag1(zt, "trust-domain")?, td);
    assert_eq!(flag1(ca, "root-namespace")?, str_of(&v["rootNamespace"]));
    let networks: Vec<String> = (v["podNetworks"].as_array().context("podNetworks")?.iter())
        .map(|n| str_of(n).to_owned())
        .collect();
    assert_eq!(flag1(ca, "pod-networks")?, networks.join(","));
    let plain = defaults(&helm)?;
    let plain_ca = container(plain.deployment()?, "membrane-ca")?;
    ensure!(
        flag(plain_ca, "pod-networks").is_empty(),
        "no --pod-networks by default"
    );
    for (flag_name, key) in [
        ("default-ttl", "defaultTTL"),
        ("max-ttl", "maxTTL"),
        ("rotation-grace", "rotationGrace"),
        ("rotation-ack-timeout", "rotationAckTimeout"),
        ("serving-cert-ttl", "servingCertTTL"),
    ] {
        assert_eq!(flag1(ca, flag_name)?, str_of(&certs[key]), "--{flag_name}");
    }
    assert_eq!(flag1(ca, "renewal-fraction")?, "0.4");
    assert_eq!(flag1(zt, "cert-ttl")?, str_of(&certs["requestedTTL"]));
    // Listener caps and timeouts: fixture values where set, chart defaults elsewhere.
    assert_eq!(flag1(ca, "grpc-max-connections-per-peer")?, "16");
    assert_eq!(flag1(ca, "tls-handshake-timeout")?, "5s");
    assert_eq!(flag1(ca, "grpc-max-connections")?, "1024");
    assert_eq!(flag1(ca, "grpc-idle-timeout")?, "30s");
    assert_eq!(flag1(zt, "pod-max-connections")?, "2048");
    assert_eq!(flag1(zt, "pod-max-connections-per-peer")?, "4096");
    assert_eq!(flag1(zt, "http-idle-timeout")?, "30s");
    assert_eq!(flag1(zt, "http-header-timeout")?, "10s");
    assert_eq!(flag1(zt, "hbone-handshake-timeout")?, "10s");
    assert_eq!(flag1(zt, "pool-idle-timeout")?, "60s");
    // DNS capture: the pod's resolv.conf upstream unless one is set, the chart's bounds.
    assert!(flag(zt, "dns-upstream").is_empty());
    assert_eq!(flag1(zt, "dns-upstream-timeout")?, "2s");
    assert_eq!(flag1(zt, "dns-pin-grace")?, "30s");
    assert_eq!(flag1(zt, "dns-max-pins-per-pod")?, "10000");
    assert_eq!(flag1(zt, "dns-cluster-domain")?, "cluster.local");
    // Plug-in CA: the operator's Secret, mounted read-only into the controller only.
    assert_eq!(flag1(ca, "plugin-ca-dir")?, "/etc/membrane/cacerts");
    assert!(
        flag(ca, "root-ttl").is_empty(),
        "no self-managed root with a plug-in CA"
    );
    assert_eq!(
        volume(deployment, "cacerts")?["secret"]["secretName"],
        v["ca"]["pluginSecret"]
    );
    assert_eq!(
        mount(ca, "cacerts").context("cacerts mount")?["readOnly"],
        true
    );
    // The root file system is read-only: the state directory (federated peers' last good
    // bundles) is a writable emptyDir even without a self-managed root.
    assert!(volume(deployment, "state")?["emptyDir"].is_object());
    assert_eq!(
        mount(ca, "state").context("state mount")?["mountPath"],
        "/var/lib/membrane-ca"
    );
    // Log level and format.
    assert_eq!(
        env_value(ca, "RUST_LOG")?,
        str_of(&v["controller"]["logLevel"])
    );
    assert_eq!(env_value(zt, "RUST_LOG")?, str_of(&v["logLevel"]));
    assert_eq!(flag1(ca, "log-format")?, "text");
    assert_eq!(flag1(zt, "log-format")?, "text");
    assert_eq!(flag1(zt, "worker-threads")?, "4");
    assert!(args(zt).contains(&"--unenroll-on-exit".to_owned()));
    // Images.
    assert_eq!(ca["image"], "registry.example.com/custom/controller:9.9.9");
    let zt_image = format!(
        "registry.example.com/mesh/ztunnel@{}",
        str_of(&v["ztunnel"]["image"]["digest"])
    );
    assert_eq!(zt["image"], zt_image.as_str());
    assert_eq!(
        cni["image"],
        zt_image.as_str(),
        "the CNI step ships in the ztunnel image"
    );
    for c in [ca, zt, cni] {
        assert_eq!(c["imagePullPolicy"], "Always");
    }
    for w in [deployment, ds] {
        assert_eq!(
            pod_spec(w)["imagePullSecrets"],
            json!([{"name": "regcred"}])
        );
    }
    // Resources.
    assert_eq!(ca["resources"], v["controller"]["resources"]);
    assert_eq!(zt["resources"], v["ztunnel"]["resources"]);
    // The trust root the operator gave is what the ztunnels read.
    let root_cm = r.named(
        "ConfigMap",
        str_of(&volume(ds, "ca-root")?["configMap"]["name"]),
    )?;
    assert_eq!(
        str_of(&root_cm["data"]["root-cert.pem"]).trim(),
        str_of(&v["trustRoot"]["pem"]).trim()
    );
    // CNI directories and interval.
    assert_eq!(
        volume(ds, "cni-bin")?["hostPath"]["path"],
        v["cni"]["binDir"]
    );
    assert_eq!(env_value(cni, "MEMBRANE_CNI_INTERVAL")?, "5");

    // Defaults: self-managed root in a state directory on the claim, the documented defaults.
    let defaults_values = chart_values()?;
    let r = defaults(&helm)?;
    let deployment = r.deployment()?;
    let ca = container(deployment, "membrane-ca")?;
    let zt = container(r.daemonset()?, "ztunnel")?;
    assert_eq!(flag1(ca, "trust-domain")?, "cluster.local");
    assert_eq!(flag1(zt, "trust-domain")?, "cluster.local");
    assert_eq!(flag1(ca, "default-ttl")?, "24h");
    assert_eq!(flag1(ca, "max-ttl")?, "24h");
    assert_eq!(flag1(ca, "root-ttl")?, "3650days");
    assert!(flag(ca, "plugin-ca-dir").is_empty());
    assert_eq!(env_value(ca, "RUST_LOG")?, "info");
    assert_eq!(
        env_value(ca, "MEMBRANE_STATE_DIR")?,
        "/var/lib/membrane-ca/ca"
    );
    assert_eq!(
        mount(ca, "state").context("state mount")?["mountPath"],
        "/var/lib/membrane-ca"
    );
    let claim = str_of(&volume(deployment, "state")?["persistentVolumeClaim"]["claimName"]);
    let pvc = r.named("PersistentVolumeClaim", claim)?;
    assert_eq!(
        pvc["spec"]["resources"]["requests"]["storage"],
        defaults_values["ca"]["persistence"]["size"]
    );
    assert_eq!(ca["image"], "ghcr.io/membrane-mesh/membrane-ca:0.1.0");
    assert_eq!(zt["image"], "ghcr.io/membrane-mesh/ztunnel:0.1.0");
    assert_eq!(ca["resources"], defaults_values["controller"]["resources"]);
    Ok(())
}

#[test]
fn chart_crd_is_the_rust_type() -> anyhow::Result<()> {
    let helm = need_helm!();
    let r = template(&helm, &["--include-crds"])?;
    let crds = r.all("CustomResourceDefinition");
    ensure!(crds.len() == 3, "expected three CRDs, found {}", crds.len());
    for (yaml, path) in [
        (membrane_ca::crd::crd_yaml(), membrane_ca::crd::CRD_PATH),
        (
            membrane_ca::crd::egress_crd_yaml(),
            membrane_ca::crd::EGRESS_CRD_PATH,
        ),
        (
            membrane_ca::crd::federation_crd_yaml(),
            membrane_ca::crd::FEDERATION_CRD_PATH,
        ),
    ] {
        let generated: Value = serde_saphyr::from_str(&yaml)?;
        ensure!(
            crds.contains(&&generated),
            "the chart's CRDs do not include {path} as ca/src/crd.rs generates it"
        );
        let committed: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(repo_root().join(path))?)?;
        assert_eq!(generated, committed, "{path} is out of date");
    }
    // Without --include-crds the CRDs are not templated (Helm installs crds/ itself).
    assert!(defaults(&helm)?.all("CustomResourceDefinition").is_empty());
    Ok(())
}

/// The flags the chart passes exist in the binaries (`--help`); nothing is invented.
#[test]
fn rendered_flags_are_accepted_by_the_binaries() -> anyhow::Result<()> {
    let helm = need_helm!();
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test binary directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("profile directory")?;
    }
    let help = |bin: &str, args: &[&str]| -> anyhow::Result<BTreeSet<String>> {
        let path = dir.join(bin);
        ensure!(
            path.exists(),
            "{} not found: build it with `cargo build -p membrane-ca -p membrane-ztunnel`",
            path.display()
        );
        let out = Command::new(&path).args(args).output()?;
        ensure!(out.status.success(), "{bin} {args:?} failed");
        Ok(String::from_utf8(out.stdout)?
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(str::to_owned)
            .collect())
    };
    let ca_flags = help("membrane-ca", &["serve", "--help"])?;
    let zt_flags = help("ztunnel", &["--help"])?;
    let name = |arg: &str| arg.split('=').next().unwrap_or(arg).to_owned();
    for r in [defaults(&helm)?, custom(&helm)?, federation_enabled(&helm)?] {
        let ca = container(r.deployment()?, "membrane-ca")?;
        let ca_args = args(ca);
        assert_eq!(ca_args.first().map(String::as_str), Some("serve"));
        for arg in &ca_args[1..] {
            ensure!(
                ca_flags.contains(&name(arg)),
                "membrane-ca serve has no {arg}"
            );
        }
        for arg in args(container(r.daemonset()?, "ztunnel")?) {
            ensure!(zt_flags.contains(&name(&arg)), "ztunnel has no {arg}");
        }
    }
    let with_gateways = gateways_enabled(&helm)?;
    for arg in args(container(with_gateways.deployment()?, "membrane-ca")?)
        .iter()
        .skip(1)
    {
        ensure!(
            ca_flags.contains(&name(arg)),
            "membrane-ca serve has no {arg}"
        );
    }
    for (kind, deployment) in with_gateways.gateways() {
        for arg in args(container(deployment, "gateway")?) {
            ensure!(
                zt_flags.contains(&name(&arg)),
                "ztunnel ({kind} gateway) has no {arg}"
            );
        }
    }
    Ok(())
}
