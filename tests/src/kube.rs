//! The chart against a real API server ([`membrane_testbed::kube::KubeApi`]): render
//! `charts/membrane` with helm ([`Chart`]), apply it, run the controller with its
//! ServiceAccount's token, give ztunnels bound tokens of the chart's ztunnel ServiceAccount, do
//! a kubelet's and an endpoint controller's writes, and compare what the controller asked the
//! API server for (its audit events) with what the chart's Roles grant ([`RbacReport`]).

mod rbac;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use membrane_testbed::kube::{ISSUER, KubeApi, KubeController};
pub use rbac::{Grant, RbacReport, Use};
use serde_json::{Value, json};

/// The release namespace the tests install the chart in.
pub const NAMESPACE: &str = "membrane-system";

/// Minimal CustomResourceDefinitions of the Gateway API objects the controller watches (the
/// Gateway API project's own CRDs are not vendored: only names, versions and scope matter).
const GATEWAY_API_CRDS: &str = include_str!("../fixtures/gateway-api-crds.yaml");

/// The objects `helm template --include-crds` renders, parsed.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Every rendered document.
    pub docs: Vec<Value>,
}

impl Chart {
    /// Renders the chart (CRDs included) with `extra` helm arguments (`--set …`).
    pub fn render(extra: &[&str]) -> anyhow::Result<Self> {
        let mut args = vec!["--include-crds"];
        args.extend_from_slice(extra);
        let text = crate::helm::template_text(NAMESPACE, &args)?;
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).context("helm template output is YAML")?;
        Ok(Self {
            docs: docs.into_iter().filter(|d| !d.is_null()).collect(),
        })
    }

    fn of_kind(&self, kind: &str) -> impl Iterator<Item = &Value> {
        self.docs.iter().filter(move |d| d["kind"] == kind)
    }

    fn controller(&self) -> anyhow::Result<&Value> {
        self.of_kind("Deployment")
            .find(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
            .context("no controller Deployment in the chart")
    }

    fn controller_container(&self) -> anyhow::Result<&Value> {
        let containers = self.controller()?["spec"]["template"]["spec"]["containers"]
            .as_array()
            .context("controller containers")?;
        containers
            .iter()
            .find(|c| c["name"] == "membrane-ca")
            .context("no membrane-ca container")
    }

    /// The controller's ServiceAccount name.
    pub fn controller_account(&self) -> anyhow::Result<String> {
        let sa = &self.controller()?["spec"]["template"]["spec"]["serviceAccountName"];
        Ok(sa
            .as_str()
            .context("controller serviceAccountName")?
            .to_owned())
    }

    /// The ztunnel DaemonSet's ServiceAccount name.
    pub fn ztunnel_account(&self) -> anyhow::Result<String> {
        let ds = self.of_kind("DaemonSet").next().context("no DaemonSet")?;
        let sa = &ds["spec"]["template"]["spec"]["serviceAccountName"];
        Ok(sa
            .as_str()
            .context("ztunnel serviceAccountName")?
            .to_owned())
    }

    /// The controller container's arguments, minus the ones a test process sets itself
    /// (`serve`, `--source`, `--listen`, `--metrics-listen`, `--log-format`).
    pub fn controller_args(&self) -> anyhow::Result<Vec<String>> {
        let args = self.controller_container()?["args"]
            .as_array()
            .context("controller args")?;
        let own = [
            "--source=",
            "--listen=",
            "--metrics-listen=",
            "--log-format=",
        ];
        Ok(args
            .iter()
            .filter_map(Value::as_str)
            .filter(|a| *a != "serve" && !own.iter().any(|p| a.starts_with(p)))
            .map(str::to_owned)
            .collect())
    }

    /// The value of the controller's `--name=value` argument.
    pub fn controller_flag(&self, name: &str) -> anyhow::Result<String> {
        let prefix = format!("--{name}=");
        self.controller_args()?
            .iter()
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
            .with_context(|| format!("no --{name} in the controller's arguments"))
    }

    /// Removes `verb` from every rule of the controller's ClusterRole and Role that grants it
    /// on `resource` (as an operator editing the chart would).
    pub fn remove_verb(&mut self, resource: &str, verb: &str) -> anyhow::Result<()> {
        let mut removed = false;
        for doc in &mut self.docs {
            if doc["kind"] != "ClusterRole" && doc["kind"] != "Role" {
                continue;
            }
            for rule in doc["rules"].as_array_mut().into_iter().flatten() {
                let names = rule["resources"].as_array().cloned().unwrap_or_default();
                if !names.iter().any(|r| r == resource) {
                    continue;
                }
                if let Some(verbs) = rule["verbs"].as_array_mut() {
                    let before = verbs.len();
                    verbs.retain(|v| v != verb);
                    removed |= verbs.len() != before;
                }
            }
        }
        ensure!(removed, "no rule grants {verb} on {resource}");
        Ok(())
    }

    /// Every permission the controller's ClusterRole(s) and Role(s) grant.
    pub fn grants(&self) -> Vec<Grant> {
        let mut out = Vec::new();
        for doc in self.docs.iter() {
            let namespace = match doc["kind"].as_str() {
                Some("ClusterRole") => None,
                Some("Role") => Some(doc["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE)),
                _ => continue,
            };
            for rule in doc["rules"].as_array().into_iter().flatten() {
                let list = |key: &str| -> Vec<String> {
                    (rule[key].as_array().into_iter().flatten())
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                };
                let names: BTreeSet<String> = list("resourceNames").into_iter().collect();
                for group in list("apiGroups") {
                    for resource in list("resources") {
                        for verb in list("verbs") {
                            out.push(Grant {
                                group: group.clone(),
                                resource: resource.clone(),
                                verb,
                                namespace: namespace.map(str::to_owned),
                                names: names.clone(),
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// One `v1` List of every rendered object but the CRDs, and one of the CRDs.
    fn lists(&self) -> (String, String) {
        let (crds, rest): (Vec<&Value>, Vec<&Value>) = self
            .docs
            .iter()
            .partition(|d| d["kind"] == "CustomResourceDefinition");
        let list = |items: Vec<&Value>| json!({"apiVersion": "v1", "kind": "List", "items": items});
        (list(crds).to_string(), list(rest).to_string())
    }
}

/// Applies the chart (CRDs first, then every other object, in [`NAMESPACE`]) and the Gateway
/// API CRDs, and waits until every CRD is established.
pub fn install(api: &KubeApi, chart: &Chart) -> anyhow::Result<()> {
    api.kubectl(&["create", "namespace", NAMESPACE], None)?;
    let (crds, rest) = chart.lists();
    api.kubectl(&["apply", "-f", "-"], Some(&crds))?;
    api.kubectl(&["apply", "-f", "-"], Some(GATEWAY_API_CRDS))?;
    api.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=30s",
        ],
        None,
    )?;
    api.kubectl(&["apply", "-f", "-"], Some(&rest))?;
    Ok(())
}

/// Applies YAML/JSON `manifests` as the admin.
pub fn apply(api: &KubeApi, manifests: &str) -> anyhow::Result<String> {
    api.kubectl(&["apply", "-f", "-"], Some(manifests))
}

/// Starts a controller replica `name` (its `POD_NAME`) as the chart runs it: the chart's
/// arguments, authenticated with a token of the chart's controller ServiceAccount.
pub async fn start_controller(
    api: &KubeApi,
    chart: &Chart,
    name: &str,
) -> anyhow::Result<KubeController> {
    let token = api
        .token(NAMESPACE, &chart.controller_account()?, ISSUER, None)
        .await?;
    let kubeconfig = api.token_kubeconfig(name, &token)?;
    let state = api.path().join(format!("{name}-state"));
    if !state.exists() {
        std::fs::create_dir(&state)?;
    }
    KubeController::spawn_with_env(
        &kubeconfig,
        &state,
        &chart.controller_args()?,
        &[("POD_NAME", name)],
    )
}

/// A bound token of the chart's ztunnel ServiceAccount for node `node`, as the DaemonSet's
/// projected volume gets it: bound to a ztunnel Pod scheduled on that node (created here), for
/// the controller's token audience.
pub async fn ztunnel_token(api: &KubeApi, chart: &Chart, node: &str) -> anyhow::Result<String> {
    let account = chart.ztunnel_account()?;
    let name = format!("ztunnel-{node}");
    let pods: Api<Pod> = Api::namespaced(api.client.clone(), NAMESPACE);
    let pod = match pods.get_opt(&name).await? {
        Some(pod) => pod,
        None => {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {
                    "serviceAccountName": account,
                    "nodeName": node,
                    "containers": [{"name": "ztunnel", "image": "ztunnel"}],
                },
            }))?;
            pods.create(&PostParams::default(), &pod).await?
        }
    };
    let uid = pod.metadata.uid.context("pod without uid")?;
    let audience = chart.controller_flag("token-audience")?;
    api.token(NAMESPACE, &account, &audience, Some((&name, &uid)))
        .await
}

/// Creates Pod `namespace/name` (service account `sa`, on `node`, with `labels`) and reports
/// it running at `ip` (the status a kubelet writes). The namespace's ServiceAccount is created
/// when missing. Returns the UID the API server assigned.
pub async fn create_pod(
    api: &KubeApi,
    namespace: &str,
    name: &str,
    sa: &str,
    node: &str,
    ip: &str,
    labels: &Value,
) -> anyhow::Result<String> {
    let client = api.client.clone();
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), namespace);
    if accounts.get_opt(sa).await?.is_none() {
        let account = serde_json::from_value(json!({"metadata": {"name": sa}}))?;
        accounts.create(&PostParams::default(), &account).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "serviceAccountName": sa,
            "nodeName": node,
            "containers": [{"name": "app", "image": "app"}],
        },
    }))?;
    let created = pods.create(&PostParams::default(), &pod).await?;
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    created.metadata.uid.context("created pod without uid")
}

/// Polls `check` every 100 ms until it returns `Ok(true)` (bounded by `timeout`); the last
/// error or "still false" otherwise.
pub async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("still false");
    while Instant::now() < deadline {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => last = "still false".into(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what}: not within {timeout:?} ({last})")
}

/// The CA client of a controller process, authenticated with `token`.
pub async fn ca_client(
    controller: &KubeController,
    token: &str,
) -> anyhow::Result<membrane_ca::client::CaClient> {
    Ok(membrane_ca::client::CaClient::connect(
        &controller.endpoint(),
        controller.root_pem()?.as_bytes(),
        "membrane-ca",
        token,
    )
    .await?)
}

/// The `Accepted` condition of a namespaced custom object (`plural` of
/// `security.membrane.dev/v1`), when written.
pub async fn accepted(
    api: &KubeApi,
    plural: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<Value>> {
    let resource = kube::discovery::ApiResource {
        group: "security.membrane.dev".into(),
        version: "v1".into(),
        api_version: "security.membrane.dev/v1".into(),
        kind: String::new(),
        plural: plural.into(),
    };
    let objects: Api<kube::api::DynamicObject> =
        Api::namespaced_with(api.client.clone(), namespace, &resource);
    let object = objects.get(name).await?;
    let conditions = object.data["status"]["conditions"].clone();
    Ok(conditions
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Accepted").cloned()))
}
