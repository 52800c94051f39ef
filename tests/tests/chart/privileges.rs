//! The ztunnel's privileges: only the capabilities charts/README.md documents, only the host
//! paths it needs.

use super::*;

// ---------------------------------------------------------------------------------------------
// ztunnel privileges

/// The capabilities the chart adds to each container, as charts/README.md documents them.
fn documented_capabilities() -> BTreeMap<&'static str, BTreeSet<String>> {
    BTreeMap::from([
        (
            "ztunnel",
            BTreeSet::from(["NET_ADMIN".to_owned(), "SYS_ADMIN".to_owned()]),
        ),
        ("install-cni", BTreeSet::new()),
    ])
}

#[test]
fn ztunnel_is_not_privileged_beyond_its_documented_capabilities() -> anyhow::Result<()> {
    let helm = need_helm!();
    let readme = std::fs::read_to_string(repo_root().join("charts/README.md"))?;
    for r in [defaults(&helm)?, custom(&helm)?] {
        let ds = r.daemonset()?;
        let spec = pod_spec(ds);
        for key in ["hostNetwork", "hostPID", "hostIPC"] {
            ensure!(spec[key] != true, "{key} is on");
        }
        ensure!(
            spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault",
            "no RuntimeDefault seccomp profile"
        );
        let documented = documented_capabilities();
        let all = containers(ds);
        assert_eq!(
            all.iter()
                .map(|c| str_of(&c["name"]))
                .collect::<BTreeSet<_>>(),
            documented.keys().copied().collect::<BTreeSet<_>>(),
            "containers of the DaemonSet"
        );
        for c in all {
            let name = str_of(&c["name"]);
            let sc = &c["securityContext"];
            ensure!(sc["privileged"] != true, "{name} is privileged");
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{name}: allowPrivilegeEscalation"
            );
            assert_eq!(
                sc["readOnlyRootFilesystem"], true,
                "{name}: readOnlyRootFilesystem"
            );
            assert_eq!(
                string_set(&sc["capabilities"]["drop"]),
                BTreeSet::from(["ALL".to_owned()]),
                "{name}: drop"
            );
            let added = string_set(&sc["capabilities"]["add"]);
            assert_eq!(
                Some(&added),
                documented.get(name),
                "{name}: capabilities added"
            );
            for cap in &added {
                ensure!(
                    readme.contains(&format!("`{cap}`")),
                    "charts/README.md does not document {cap}"
                );
            }
        }
    }
    // The controller needs nothing: non-root, no capability.
    let r = defaults(&helm)?;
    let deployment = r.deployment()?;
    assert_eq!(
        pod_spec(deployment)["securityContext"]["runAsNonRoot"],
        true
    );
    let c = container(deployment, "membrane-ca")?;
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    Ok(())
}

#[test]
fn host_paths_are_only_the_documented_ones_and_mounted_where_needed() -> anyhow::Result<()> {
    let helm = need_helm!();
    let host_paths = |workload: &Value| -> BTreeMap<String, String> {
        pod_spec(workload)["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| !v["hostPath"].is_null())
            .map(|v| {
                (
                    str_of(&v["name"]).to_owned(),
                    str_of(&v["hostPath"]["path"]).to_owned(),
                )
            })
            .collect()
    };
    let expect = |cni_bin: &str| -> BTreeMap<String, String> {
        [
            ("run", "/var/run/membrane"),
            ("state", "/var/lib/membrane/ztunnel"),
            ("netns", "/var/run/netns"),
            ("proc-sys-net", "/proc/sys/net"),
            ("cni-bin", cni_bin),
            ("cni-conf", "/etc/cni/net.d"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    };
    for (r, cni_bin) in [
        (defaults(&helm)?, "/opt/cni/bin"),
        (custom(&helm)?, "/home/kubernetes/bin"),
    ] {
        let ds = r.daemonset()?;
        assert_eq!(
            host_paths(ds),
            expect(cni_bin),
            "hostPath volumes of the DaemonSet"
        );
        assert!(
            host_paths(r.deployment()?).is_empty(),
            "the controller mounts no host path"
        );

        let ztunnel = container(ds, "ztunnel")?;
        let netns = mount(ztunnel, "netns").context("netns mount")?;
        assert_eq!(netns["readOnly"], true, "pod namespaces are only opened");
        assert_eq!(netns["mountPropagation"], "HostToContainer");
        for (c, mine, not_mine) in [
            (
                ztunnel,
                ["run", "state", "netns", "proc-sys-net"].as_slice(),
                ["cni-bin", "cni-conf"].as_slice(),
            ),
            (
                container(ds, "install-cni")?,
                ["cni-bin", "cni-conf"].as_slice(),
                ["run", "state", "netns", "proc-sys-net", "token", "ca-root"].as_slice(),
            ),
        ] {
            for v in mine {
                ensure!(mount(c, v).is_some(), "{} does not mount {v}", c["name"]);
            }
            for v in not_mine {
                ensure!(mount(c, v).is_none(), "{} mounts {v}", c["name"]);
            }
        }
        // The enrollment socket the ztunnel serves is the one the CNI entry names, in the
        // shared host directory.
        let socket = flag1(ztunnel, "enroll-socket")?;
        let run_mount = str_of(&mount(ztunnel, "run").context("run mount")?["mountPath"]);
        assert_eq!(socket, format!("{run_mount}/ztunnel.sock"));
        assert_eq!(
            run_mount,
            host_paths(ds)["run"],
            "same path on the host and in the pod"
        );
        let entry: Value = serde_json::from_str(&env_value(
            container(ds, "install-cni")?,
            "MEMBRANE_CNI_ENTRY",
        )?)?;
        assert_eq!(
            entry,
            json!({"type": "membrane-cni", "enrollSocket": socket, "failClosed": true})
        );
        assert_eq!(
            flag1(ztunnel, "state-dir")?,
            str_of(&mount(ztunnel, "state").context("state")?["mountPath"])
        );
        // Pods' sysctls are reached through the host's /proc/sys/net, where it is mounted.
        assert_eq!(
            env_value(ztunnel, "MEMBRANE_PROC_SYS_NET")?,
            str_of(&mount(ztunnel, "proc-sys-net").context("proc-sys-net")?["mountPath"])
        );
    }
    // Without the CNI step: no host CNI directory, no script, no second container.
    let r = template(&helm, &["--set", "cni.enabled=false"])?;
    let ds = r.daemonset()?;
    assert_eq!(
        host_paths(ds)
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["netns", "proc-sys-net", "run", "state"]
    );
    assert_eq!(containers(ds).len(), 1);
    assert!(r.all("ConfigMap").is_empty());
    Ok(())
}
