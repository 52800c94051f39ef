//! The Helm chart `charts/membrane`, checked with the real `helm` binary: `helm lint` is clean,
//! `helm template` renders with the default values and with a production-shaped values file
//! (`tests/fixtures/chart-values.yaml`), and the rendered objects are inspected — RBAC without
//! wildcards and exactly what the controller calls, a ztunnel without Kubernetes API access,
//! unprivileged but for the two capabilities the chart documents, only the host paths it
//! needs, the projected token issued for the controller's audience, labels, the disruption
//! budget, values reaching the arguments, flags the binaries accept, the CRD equal to the Rust
//! type — and the CNI install script run against a fake node's directories.
//!
//! helm is found as `$MEMBRANE_HELM`, on `PATH`, or where `scripts/lib/helm.sh` caches it; when
//! it is missing these tests run `membrane_install_helm`. If helm still cannot be found they
//! fail, saying how to install it — never a silent pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

const RELEASE: &str = "membrane";
const NAMESPACE: &str = "membrane-system";
const FIXTURE: &str = "tests/fixtures/chart-values.yaml";

// ---------------------------------------------------------------------------------------------
// helm and rendering

use membrane_tests::helm::{chart_dir, helm, repo_root, run_helm};

/// The documents `helm template` renders, parsed.
struct Rendered {
    docs: Vec<Value>,
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> anyhow::Result<&Value> {
        let found = self.all(kind);
        ensure!(
            found.len() == 1,
            "expected one {kind}, found {}",
            found.len()
        );
        Ok(found[0])
    }

    fn named(&self, kind: &str, name: &str) -> anyhow::Result<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .with_context(|| format!("no {kind} named {name}"))
    }

    /// The controller's Deployment (gateways, when enabled, are Deployments too).
    fn deployment(&self) -> anyhow::Result<&Value> {
        let found: Vec<&Value> = self
            .all("Deployment")
            .into_iter()
            .filter(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
            .collect();
        ensure!(
            found.len() == 1,
            "expected one controller Deployment, found {}",
            found.len()
        );
        Ok(found[0])
    }

    /// The gateway Deployments, by kind (`egress`, `ingress`).
    fn gateways(&self) -> BTreeMap<String, &Value> {
        self.all("Deployment")
            .into_iter()
            .filter_map(|d| {
                let component = str_of(&d["metadata"]["labels"]["app.kubernetes.io/component"]);
                let kind = component.strip_suffix("-gateway")?;
                Some((kind.to_owned(), d))
            })
            .collect()
    }

    fn daemonset(&self) -> anyhow::Result<&Value> {
        self.one("DaemonSet")
    }
}

/// `helm template membrane charts/membrane -n membrane-system EXTRA…`.
fn template(helm: &Path, extra: &[&str]) -> anyhow::Result<Rendered> {
    let chart = chart_dir();
    let chart = chart.to_str().context("chart path is UTF-8")?;
    let mut args = vec!["template", RELEASE, chart, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    let out = run_helm(helm, &args)?;
    ensure!(
        out.status.success(),
        "helm {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).context("helm template output is YAML")?;
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    ensure!(!docs.is_empty(), "helm template rendered nothing");
    Ok(Rendered { docs })
}

fn fixture_path() -> PathBuf {
    repo_root().join(FIXTURE)
}

fn defaults(helm: &Path) -> anyhow::Result<Rendered> {
    template(helm, &[])
}

fn custom(helm: &Path) -> anyhow::Result<Rendered> {
    let fixture = fixture_path();
    template(helm, &["-f", fixture.to_str().context("UTF-8 path")?])
}

fn fixture_values() -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(fixture_path())?;
    Ok(serde_saphyr::from_str(&text)?)
}

fn chart_values() -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml"))?;
    Ok(serde_saphyr::from_str(&text)?)
}

macro_rules! need_helm {
    () => {
        helm()?
    };
}

// ---------------------------------------------------------------------------------------------
// object helpers

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn containers(workload: &Value) -> Vec<&Value> {
    let spec = pod_spec(workload);
    ["initContainers", "containers"]
        .iter()
        .filter_map(|key| spec[key].as_array())
        .flatten()
        .collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    containers(workload)
        .into_iter()
        .find(|c| c["name"] == name)
        .with_context(|| format!("no container {name} in {}", workload["metadata"]["name"]))
}

fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .map(|a| a.iter().map(|v| str_of(v).to_owned()).collect())
        .unwrap_or_default()
}

/// Values of `--name=value` arguments, in order.
fn flag(container: &Value, name: &str) -> Vec<String> {
    let prefix = format!("--{name}=");
    args(container)
        .iter()
        .filter_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

/// The single value of `--name=value`.
fn flag1(container: &Value, name: &str) -> anyhow::Result<String> {
    let values = flag(container, name);
    ensure!(
        values.len() == 1,
        "expected one --{name}= in {:?}, found {values:?}",
        args(container)
    );
    Ok(values[0].clone())
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn env_value(container: &Value, name: &str) -> anyhow::Result<String> {
    let entry = env(container, name).with_context(|| format!("no env {name}"))?;
    Ok(str_of(&entry["value"]).to_owned())
}

fn volume<'a>(workload: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    pod_spec(workload)["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .with_context(|| format!("no volume {name}"))
}

fn mount<'a>(container: &'a Value, volume: &str) -> Option<&'a Value> {
    container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == volume)
}

fn string_set(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| str_of(s).to_owned()).collect())
        .unwrap_or_default()
}

/// `(apiGroup, resource, verb, resourceNames)` for every combination a rule grants.
type Grant = (String, String, String, Vec<String>);

fn grants(role: &Value) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        let names: Vec<String> = string_set(&rule["resourceNames"]).into_iter().collect();
        for group in string_set(&rule["apiGroups"]) {
            for resource in string_set(&rule["resources"]) {
                for verb in string_set(&rule["verbs"]) {
                    out.insert((group.clone(), resource.clone(), verb, names.clone()));
                }
            }
        }
    }
    out
}

fn grant(group: &str, resource: &str, verb: &str, names: &[&str]) -> Grant {
    (
        group.to_owned(),
        resource.to_owned(),
        verb.to_owned(),
        names.iter().map(|n| (*n).to_owned()).collect(),
    )
}

/// Every `key: value` of `subset` is in `labels`.
fn contains_labels(labels: &Value, subset: &Value) -> bool {
    subset
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

// ---------------------------------------------------------------------------------------------
// lint and render

#[test]
fn helm_lint_is_clean_with_default_and_custom_values() -> anyhow::Result<()> {
    let helm = need_helm!();
    let fixture = fixture_path();
    for extra in [vec![], vec!["-f", fixture.to_str().context("UTF-8")?]] {
        let mut args = vec!["lint", "charts/membrane", "--strict"];
        args.extend_from_slice(&extra);
        let out = run_helm(&helm, &args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(out.status.success(), "helm {args:?} failed:\n{text}");
        ensure!(
            !text.contains("[ERROR]") && !text.contains("[WARNING]"),
            "helm {args:?} reported problems:\n{text}"
        );
        ensure!(
            text.contains("0 chart(s) failed"),
            "unexpected lint output:\n{text}"
        );
    }
    Ok(())
}

#[test]
fn default_and_custom_values_render_the_expected_objects() -> anyhow::Result<()> {
    let helm = need_helm!();
    let kinds = |r: &Rendered| -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for d in &r.docs {
            *m.entry(str_of(&d["kind"]).to_owned()).or_default() += 1;
        }
        m
    };
    let expect = |pairs: &[(&str, usize)]| -> BTreeMap<String, usize> {
        pairs.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
    };
    let common = [
        ("ServiceAccount", 2),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Service", 1),
        ("Deployment", 1),
        ("DaemonSet", 1),
    ];
    // Defaults: self-managed root on a volume, the CNI script; the trust root ConfigMap is
    // left to the operator.
    let mut want = expect(&common);
    want.insert("ConfigMap".into(), 1);
    want.insert("PersistentVolumeClaim".into(), 1);
    assert_eq!(
        kinds(&defaults(&helm)?),
        want,
        "objects rendered with the defaults"
    );
    // Custom: plug-in CA (no volume), trust root ConfigMap, three replicas with a PDB.
    let mut want = expect(&common);
    want.insert("ConfigMap".into(), 2);
    want.insert("PodDisruptionBudget".into(), 1);
    assert_eq!(
        kinds(&custom(&helm)?),
        want,
        "objects rendered with {FIXTURE}"
    );
    // Every namespaced object lands in the release namespace.
    for r in [defaults(&helm)?, custom(&helm)?] {
        for d in &r.docs {
            let cluster_scoped = matches!(str_of(&d["kind"]), "ClusterRole" | "ClusterRoleBinding");
            let ns = &d["metadata"]["namespace"];
            ensure!(
                if cluster_scoped {
                    ns.is_null()
                } else {
                    ns == NAMESPACE
                },
                "{} {} has namespace {ns}",
                d["kind"],
                d["metadata"]["name"]
            );
        }
    }
    Ok(())
}

#[test]
fn inconsistent_values_are_refused_with_the_reason() -> anyhow::Result<()> {
    let helm = need_helm!();
    let cases: [(&[&str], &str); 4] = [
        (&["--set", "controller.replicas=3"], "needs a plug-in CA"),
        (&["--set", "trustDomain=Not_Valid!"], "trustDomain"),
        (&["--set", "certificates.maxTTL=soon"], "maxTTL"),
        (&["--set", "ztunnel.privileged=true"], "privileged"),
    ];
    for (extra, reason) in cases {
        let chart = chart_dir();
        let mut args = vec!["template", RELEASE, chart.to_str().context("UTF-8")?];
        args.extend_from_slice(extra);
        let out = run_helm(&helm, &args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "helm {args:?} rendered, expected a refusal"
        );
        ensure!(
            stderr.contains(reason),
            "helm {args:?}: expected {reason:?} in:\n{stderr}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RBAC

#[test]
fn rbac_has_no_wildcards() -> anyhow::Result<()> {
    let helm = need_helm!();
    for r in [defaults(&helm)?, custom(&helm)?] {
        let roles: Vec<&Value> = r
            .all("Role")
            .into_iter()
            .chain(r.all("ClusterRole"))
            .collect();
        ensure!(!roles.is_empty(), "no roles rendered");
        for role in roles {
            let rules = role["rules"].as_array().context("rules")?;
            ensure!(
                !rules.is_empty(),
                "{} has no rules",
                role["metadata"]["name"]
            );
            for rule in rules {
                for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                    ensure!(
                        !string_set(&rule[field]).iter().any(|s| s.contains('*')),
                        "wildcard in {field} of {}: {rule}",
                        role["metadata"]["name"]
                    );
                }
                ensure!(
                    rule["nonResourceURLs"].is_null(),
                    "non-resource URLs granted: {rule}"
                );
            }
        }
        for binding in r
            .all("ClusterRoleBinding")
            .into_iter()
            .chain(r.all("RoleBinding"))
        {
            ensure!(
                !matches!(
                    str_of(&binding["roleRef"]["name"]),
                    "cluster-admin" | "admin" | "edit"
                ),
                "binding to a built-in broad role: {binding}"
            );
        }
    }
    Ok(())
}

#[test]
fn controller_rbac_is_exactly_what_it_calls() -> anyhow::Result<()> {
    let helm = need_helm!();
    for r in [defaults(&helm)?, custom(&helm)?] {
        let deployment = r.deployment()?;
        let account = str_of(&pod_spec(deployment)["serviceAccountName"]).to_owned();
        ensure!(
            !account.is_empty(),
            "the controller names no ServiceAccount"
        );
        r.named("ServiceAccount", &account)?;

        // Cluster-wide: list+watch of what the reflectors mirror, status patches, TokenReview.
        let cluster_role = r.one("ClusterRole")?;
        let mut want = BTreeSet::new();
        for (group, resource) in [
            ("", "namespaces"),
            ("", "pods"),
            ("", "serviceaccounts"),
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
            ("security.membrane.dev", "authorizationpolicies"),
            ("security.membrane.dev", "egresspolicies"),
            ("security.membrane.dev", "trustfederations"),
            ("gateway.networking.k8s.io", "gateways"),
            ("gateway.networking.k8s.io", "tcproutes"),
            ("gateway.networking.k8s.io", "tlsroutes"),
        ] {
            want.insert(grant(group, resource, "list", &[]));
            want.insert(grant(group, resource, "watch", &[]));
        }
        want.insert(grant(
            "security.membrane.dev",
            "authorizationpolicies/status",
            "patch",
            &[],
        ));
        want.insert(grant(
            "security.membrane.dev",
            "egresspolicies/status",
            "patch",
            &[],
        ));
        want.insert(grant(
            "authentication.k8s.io",
            "tokenreviews",
            "create",
            &[],
        ));
        assert_eq!(grants(cluster_role), want, "the controller's ClusterRole");

        // Namespaced: its status Lease only, in the namespace it is told to use.
        let container = container(deployment, "membrane-ca")?;
        let lease_ns = flag1(container, "status-lease-namespace")?;
        let role = r.one("Role")?;
        ensure!(
            role["metadata"]["namespace"] == lease_ns.as_str(),
            "Role not in {lease_ns}"
        );
        let want: BTreeSet<Grant> = [
            grant("coordination.k8s.io", "leases", "create", &[]),
            grant(
                "coordination.k8s.io",
                "leases",
                "get",
                &["membrane-ca-status"],
            ),
            grant(
                "coordination.k8s.io",
                "leases",
                "update",
                &["membrane-ca-status"],
            ),
        ]
        .into();
        assert_eq!(grants(role), want, "the controller's Role");

        // The bindings give exactly those roles to exactly the controller's account.
        for (binding_kind, role_kind, role_name) in [
            (
                "ClusterRoleBinding",
                "ClusterRole",
                &cluster_role["metadata"]["name"],
            ),
            ("RoleBinding", "Role", &role["metadata"]["name"]),
        ] {
            let binding = r.one(binding_kind)?;
            assert_eq!(binding["roleRef"]["kind"], role_kind);
            assert_eq!(&binding["roleRef"]["name"], role_name);
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]),
                "{binding_kind} subjects"
            );
        }
        ensure!(
            r.one("RoleBinding")?["metadata"]["namespace"] == role["metadata"]["namespace"],
            "the RoleBinding is not in the Role's namespace"
        );
    }
    Ok(())
}

#[test]
fn ztunnel_has_no_kubernetes_api_access() -> anyhow::Result<()> {
    let helm = need_helm!();
    for r in [defaults(&helm)?, custom(&helm)?] {
        let ds = r.daemonset()?;
        let spec = pod_spec(ds);
        let account = str_of(&spec["serviceAccountName"]).to_owned();
        let sa = r.named("ServiceAccount", &account)?;
        assert_eq!(
            sa["automountServiceAccountToken"], false,
            "ztunnel ServiceAccount"
        );
        assert_eq!(spec["automountServiceAccountToken"], false, "ztunnel pod");
        for binding in r
            .all("ClusterRoleBinding")
            .into_iter()
            .chain(r.all("RoleBinding"))
        {
            for subject in binding["subjects"].as_array().into_iter().flatten() {
                ensure!(
                    !(subject["kind"] == "ServiceAccount" && subject["name"] == account.as_str()),
                    "the ztunnel's account is bound by {}",
                    binding["metadata"]["name"]
                );
                ensure!(subject["kind"] != "Group", "a group is bound: {binding}");
            }
        }
        // No Secret volumes, and the one projected token is for the controller only.
        let mut tokens = Vec::new();
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            ensure!(
                volume["secret"].is_null(),
                "Secret mounted into the ztunnel: {volume}"
            );
            for source in volume["projected"]["sources"]
                .as_array()
                .into_iter()
                .flatten()
            {
                ensure!(source["secret"].is_null(), "projected Secret: {source}");
                if !source["serviceAccountToken"].is_null() {
                    tokens.push(&source["serviceAccountToken"]);
                }
            }
        }
        ensure!(
            tokens.len() == 1,
            "expected one projected token, found {tokens:?}"
        );
        let controller = container(r.deployment()?, "membrane-ca")?;
        assert_eq!(
            tokens[0]["audience"],
            flag1(controller, "token-audience")?.as_str(),
            "the ztunnel's token is for the controller's audience, not the API server's"
        );
    }
    Ok(())
}

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
                ["run", "state", "netns"].as_slice(),
                ["cni-bin", "cni-conf"].as_slice(),
            ),
            (
                container(ds, "install-cni")?,
                ["cni-bin", "cni-conf"].as_slice(),
                ["run", "state", "netns", "token", "ca-root"].as_slice(),
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
    }
    // Without the CNI step: no host CNI directory, no script, no second container.
    let r = template(&helm, &["--set", "cni.enabled=false"])?;
    let ds = r.daemonset()?;
    assert_eq!(
        host_paths(ds)
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["netns", "run", "state"]
    );
    assert_eq!(containers(ds).len(), 1);
    assert!(r.all("ConfigMap").is_empty());
    Ok(())
}

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

/// Both federation listeners enabled.
fn federation_enabled(helm: &Path) -> anyhow::Result<Rendered> {
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
fn gateways_enabled(helm: &Path) -> anyhow::Result<Rendered> {
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

// ---------------------------------------------------------------------------------------------
// the CNI install script

/// sh, jq and cmp for the script; an error when one is missing (never a silent pass).
fn script_tools() -> anyhow::Result<()> {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = ["jq", "cmp"].into_iter().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "{missing:?} missing: `source scripts/lib/helm.sh && membrane_install_helm` (as root) \
         installs jq"
    );
}

struct FakeNode {
    _dir: tempfile::TempDir,
    script: PathBuf,
    bin: PathBuf,
    conf: PathBuf,
    source: PathBuf,
    entry: String,
}

impl FakeNode {
    fn new(helm: &Path) -> anyhow::Result<Self> {
        let r = defaults(helm)?;
        let script_text = str_of(&r.one("ConfigMap")?["data"]["install-cni.sh"]).to_owned();
        let file = std::fs::read_to_string(chart_dir().join("files/install-cni.sh"))?;
        assert_eq!(
            script_text, file,
            "the ConfigMap carries files/install-cni.sh unchanged"
        );
        let entry = env_value(
            container(r.daemonset()?, "install-cni")?,
            "MEMBRANE_CNI_ENTRY",
        )?;
        let dir = tempfile::tempdir()?;
        let node = Self {
            script: dir.path().join("install-cni.sh"),
            bin: dir.path().join("opt/cni/bin"),
            conf: dir.path().join("etc/cni/net.d"),
            source: dir.path().join("image/membrane-cni"),
            entry,
            _dir: dir,
        };
        std::fs::write(&node.script, script_text)?;
        std::fs::create_dir_all(&node.bin)?;
        std::fs::create_dir_all(&node.conf)?;
        std::fs::create_dir_all(node.source.parent().context("parent")?)?;
        std::fs::write(&node.source, b"#!/bin/sh\necho membrane-cni v1\n")?;
        Ok(node)
    }

    fn command(&self, mode: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg(&self.script)
            .arg(mode)
            .env("CNI_BIN_DIR", &self.bin)
            .env("CNI_CONF_DIR", &self.conf)
            .env("MEMBRANE_CNI_SOURCE", &self.source)
            .env("MEMBRANE_CNI_ENTRY", &self.entry)
            .env("MEMBRANE_CNI_INTERVAL", "1");
        cmd
    }

    fn run(&self, mode: &str) -> anyhow::Result<bool> {
        let out = self.command(mode).output()?;
        Ok(out.status.success())
    }

    fn conflist(&self, name: &str) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            self.conf.join(name),
        )?)?)
    }

    fn installed_binary(&self) -> PathBuf {
        self.bin.join("membrane-cni")
    }
}

fn primary_conflist() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "primary",
        "plugins": [
            {"type": "ptp", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

#[test]
fn cni_install_script_installs_idempotently_and_removes_everything() -> anyhow::Result<()> {
    let helm = need_helm!();
    script_tools()?;
    let node = FakeNode::new(&helm)?;
    let entry: Value = serde_json::from_str(&node.entry)?;

    // No configuration yet (the primary CNI has not started): nothing to chain into.
    ensure!(
        !node.run("install")?,
        "install succeeded without a CNI configuration"
    );
    ensure!(
        !node.run("check")?,
        "check passed without a CNI configuration"
    );

    let primary = primary_conflist();
    std::fs::write(
        node.conf.join("10-primary.conflist"),
        serde_json::to_string(&primary)?,
    )?;
    let other = "{\"cniVersion\":\"1.0.0\",\"name\":\"other\",\"plugins\":[{\"type\":\"bridge\"}]}";
    std::fs::write(node.conf.join("20-other.conflist"), other)?;
    std::fs::write(node.conf.join("00-readme.txt"), "not a CNI file")?;

    let mut with_entry = primary.clone();
    with_entry["plugins"]
        .as_array_mut()
        .context("plugins")?
        .push(entry.clone());
    for round in 0..2 {
        ensure!(node.run("install")?, "install failed (round {round})");
        assert_eq!(
            node.conflist("10-primary.conflist")?,
            with_entry,
            "round {round}"
        );
        assert_eq!(
            std::fs::read(node.installed_binary())?,
            std::fs::read(&node.source)?
        );
        ensure!(node.run("check")?, "check failed after install");
    }
    assert_eq!(
        std::fs::read_to_string(node.conf.join("20-other.conflist"))?,
        other
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.installed_binary())?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    // The primary CNI rewrites its file (entry gone), an older entry lingers elsewhere in
    // the list, a new binary ships: install repairs all three, still one entry.
    let mut stale = primary.clone();
    let plugins = stale["plugins"].as_array_mut().context("plugins")?;
    plugins.insert(0, json!({"type": "membrane-cni", "failClosed": false}));
    std::fs::write(
        node.conf.join("10-primary.conflist"),
        serde_json::to_string(&stale)?,
    )?;
    std::fs::write(&node.source, b"#!/bin/sh\necho membrane-cni v2\n")?;
    ensure!(
        !node.run("check")?,
        "check passed with a stale entry and binary"
    );
    ensure!(node.run("install")?, "repair failed");
    assert_eq!(node.conflist("10-primary.conflist")?, with_entry);
    assert_eq!(
        std::fs::read(node.installed_binary())?,
        std::fs::read(&node.source)?
    );

    // Uninstall restores the list and removes the binary; a second one is a no-op.
    for round in 0..2 {
        ensure!(node.run("uninstall")?, "uninstall failed (round {round})");
        assert_eq!(node.conflist("10-primary.conflist")?, primary);
        ensure!(!node.installed_binary().exists(), "binary left behind");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&node.conf)?
        .chain(std::fs::read_dir(&node.bin)?)
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("membrane"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    Ok(())
}

#[test]
fn cni_install_script_keeps_the_entry_and_removes_it_on_termination() -> anyhow::Result<()> {
    let helm = need_helm!();
    script_tools()?;
    let node = FakeNode::new(&helm)?;
    let primary = primary_conflist();
    std::fs::write(
        node.conf.join("05-primary.conflist"),
        serde_json::to_string(&primary)?,
    )?;
    let mut child = node
        .command("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let wait_for = |what: &str, done: &dyn Fn() -> anyhow::Result<bool>| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !done()? {
            ensure!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    let result = (|| -> anyhow::Result<()> {
        wait_for("the install", &|| node.run("check"))?;
        // The primary CNI rewrites its configuration: the loop puts the entry back.
        std::fs::write(
            node.conf.join("05-primary.conflist"),
            serde_json::to_string(&primary)?,
        )?;
        wait_for("the repair", &|| node.run("check"))?;
        Ok(())
    })();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("install-cni.sh run did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    result?;
    ensure!(status.success(), "run exited with {status}");
    assert_eq!(
        node.conflist("05-primary.conflist")?,
        primary,
        "entry removed on termination"
    );
    ensure!(
        !node.installed_binary().exists(),
        "binary removed on termination"
    );
    Ok(())
}
