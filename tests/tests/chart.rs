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
    let cases: [(&[&str], &str); 5] = [
        (&["--set", "controller.replicas=3"], "needs a plug-in CA"),
        (&["--set", "trustDomain=Not_Valid!"], "trustDomain"),
        (&["--set", "certificates.maxTTL=soon"], "maxTTL"),
        (&["--set", "ztunnel.privileged=true"], "privileged"),
        (
            &[
                "--set",
                "ztunnel.busyPoll=100us",
                "--set",
                "ztunnel.workerThreads=2",
            ],
            "ztunnel.busyPoll as a fixed window runs on one worker thread",
        ),
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
    // The busy-poll values that run on several worker threads render, and YAML's unquoted
    // off (read as false) is off.
    for (value, flag) in [
        ("auto", "auto"),
        ("off", "off"),
        ("false", "off"),
        ("0s", "0s"),
    ] {
        let set = format!("ztunnel.busyPoll={value}");
        let r = template(&helm, &["--set", &set, "--set", "ztunnel.workerThreads=2"])?;
        let zt = container(r.daemonset()?, "ztunnel")?;
        ensure!(
            args(zt).contains(&format!("--busy-poll={flag}")),
            "busyPoll={value}: {:?}",
            args(zt)
        );
    }
    Ok(())
}

#[path = "chart/cni_script.rs"]
mod cni_script;
#[path = "chart/optional.rs"]
mod optional;
#[path = "chart/privileges.rs"]
mod privileges;
#[path = "chart/rbac.rs"]
mod rbac;
#[path = "chart/wiring.rs"]
mod wiring;
