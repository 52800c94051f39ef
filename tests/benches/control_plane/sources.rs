//! The benchmark's two workload sources, driven the same way: objects in a real
//! kube-apiserver with the chart applied, or manifest files in a directory.

use super::*;

/// Policy `name` in `ns` selecting the pod labelled `app: <app>` (every ALLOW one selects
/// one pod, so its node gets it).
fn policy_yaml(ns: &str, name: &str, app: &str, principal: &str) -> String {
    format!(
        "apiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: ALLOW\n  rules:\n    - from: [{{source: {{principals: [\"{principal}\"]}}}}]\n"
    )
}

/// The edited policy: a DENY in the root namespace, so every node holds it (a node receives
/// only the policies that can apply to its pods), naming a principal no pod has.
fn edit_yaml(principal: &str) -> String {
    format!(
        "apiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bench-edit, namespace: {NAMESPACE}}}\nspec:\n  action: DENY\n  rules:\n    - from: [{{source: {{principals: [\"{principal}\"]}}}}]\n"
    )
}

fn namespaces_yaml(scale: &Scale) -> String {
    (0..scale.namespaces)
        .map(|i| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{i}, labels: {{membrane.dev/mesh: enabled}}}}\n"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn pod_yaml(scale: &Scale, name: &str, pod: usize) -> String {
    let ns = scale.pod_ns(pod);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {ns}-{name}, labels: {{app: {name}}}}}\nspec: {{serviceAccountName: sa-{}, nodeName: {}}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n",
        pod % 50,
        scale.node(pod),
        ip = Scale::ip(pod),
    )
}

pub(super) struct KubeSource {
    api: KubeApi,
    controller: KubeController,
    tokens: Vec<String>,
    scale: Scale,
}

impl KubeSource {
    pub(super) async fn start(scale: Scale) -> anyhow::Result<Self> {
        let api = KubeApi::start().await?;
        let chart = Chart::render(&[])?;
        install(&api, &chart)?;
        apply(&api, &namespaces_yaml(&scale))?;
        let started = Instant::now();
        let tokens: Vec<String> = futures_util::stream::iter(0..scale.nodes)
            .map(|i| {
                let (api, chart) = (&api, &chart);
                async move { ztunnel_token(api, chart, &format!("node-{i}")).await }
            })
            .buffered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        eprintln!(
            "kubernetes: {} node tokens in {:?}",
            tokens.len(),
            started.elapsed()
        );
        let started = Instant::now();
        let results: Vec<anyhow::Result<String>> = futures_util::stream::iter(0..scale.workloads)
            .map(|i| {
                let api = &api;
                let (ns, node, ip) = (scale.pod_ns(i), scale.node(i), Scale::ip(i));
                async move {
                    let name = format!("pod-{i}");
                    let labels = serde_json::json!({"app": name});
                    create_pod(
                        api,
                        &ns,
                        &name,
                        &format!("sa-{}", i % 50),
                        &node,
                        &ip,
                        &labels,
                    )
                    .await
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        eprintln!(
            "kubernetes: {} pods in {:?}",
            scale.workloads,
            started.elapsed()
        );
        let started = Instant::now();
        let mut docs = Vec::new();
        for i in 0..scale.policies {
            let ns = format!("ns-{}", i % scale.namespaces);
            let (name, app) = (format!("policy-{i}"), format!("pod-{i}"));
            docs.push(policy_yaml(
                &ns,
                &name,
                &app,
                "cluster.local/ns/ns-0/sa/sa-0",
            ));
        }
        docs.push(edit_yaml("cluster.local/ns/ns-0/sa/initial"));
        for chunk in docs.chunks(500) {
            apply(&api, &chunk.join("---\n"))?;
        }
        eprintln!(
            "kubernetes: {} policies in {:?}",
            docs.len(),
            started.elapsed()
        );
        // 1,000 streams come from one address: lift the chart's per-peer connection cap.
        let mut args: Vec<String> = (chart.controller_args()?.into_iter())
            .filter(|a| !a.starts_with("--grpc-max-connections"))
            .collect();
        args.extend(
            [
                "--grpc-max-connections=4096",
                "--grpc-max-connections-per-peer=4096",
            ]
            .map(str::to_owned),
        );
        let token = api
            .token(
                NAMESPACE,
                &chart.controller_account()?,
                membrane_testbed::kube::ISSUER,
                None,
            )
            .await?;
        let kubeconfig = api.token_kubeconfig("bench", &token)?;
        let state = api.path().join("bench-state");
        std::fs::create_dir(&state)?;
        let controller = KubeController::spawn_with_env(&kubeconfig, &state, &args, &[])?;
        Ok(Self {
            api,
            controller,
            tokens,
            scale,
        })
    }
}

impl Source for KubeSource {
    fn controller(&self) -> &KubeController {
        &self.controller
    }

    fn token(&self, node: usize) -> String {
        self.tokens[node].clone()
    }

    /// A merge patch of the policy's rules through the API (what `kubectl edit` sends).
    async fn edit_policy(&self, principal: &str) -> anyhow::Result<()> {
        let resource = kube::discovery::ApiResource {
            group: "security.membrane.dev".into(),
            version: "v1".into(),
            api_version: "security.membrane.dev/v1".into(),
            kind: "AuthorizationPolicy".into(),
            plural: "authorizationpolicies".into(),
        };
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(self.api.client.clone(), NAMESPACE, &resource);
        let patch = serde_json::json!({"spec": {"rules": [
            {"from": [{"source": {"principals": [principal]}}]}
        ]}});
        api.patch(
            "bench-edit",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
        Ok(())
    }

    async fn add_pod(&self, name: &str, pod: usize) -> anyhow::Result<()> {
        let labels = serde_json::json!({"app": name});
        let (ns, node, ip) = (self.scale.pod_ns(pod), self.scale.node(pod), Scale::ip(pod));
        create_pod(&self.api, &ns, name, "sa-0", &node, &ip, &labels).await?;
        Ok(())
    }
}

pub(super) struct DirectorySource {
    dir: tempfile::TempDir,
    controller: KubeController,
    scale: Scale,
}

impl DirectorySource {
    pub(super) fn start(scale: Scale) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("membrane-bench-cp-")
            .tempdir()?;
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests)?;
        std::fs::write(manifests.join("namespaces.yaml"), namespaces_yaml(&scale))?;
        let pods: Vec<String> = (0..scale.workloads)
            .map(|i| pod_yaml(&scale, &format!("pod-{i}"), i))
            .collect();
        // A manifest file holds at most 1,024 documents: 1,000 pods per file.
        for (n, chunk) in pods.chunks(1000).enumerate() {
            std::fs::write(
                manifests.join(format!("pods-{n}.yaml")),
                chunk.join("---\n"),
            )?;
        }
        for (n, chunk) in (0..scale.policies)
            .collect::<Vec<_>>()
            .chunks(500)
            .enumerate()
        {
            let docs: Vec<String> = chunk
                .iter()
                .map(|i| {
                    policy_yaml(
                        &format!("ns-{}", i % scale.namespaces),
                        &format!("policy-{i}"),
                        &format!("pod-{i}"),
                        "cluster.local/ns/ns-0/sa/sa-0",
                    )
                })
                .collect();
            std::fs::write(
                manifests.join(format!("policies-{n}.yaml")),
                docs.join("---\n"),
            )?;
        }
        write_atomic(
            &manifests.join("edit.yaml"),
            &edit_yaml("cluster.local/ns/ns-0/sa/initial"),
        )?;
        let tokens: String = (0..scale.nodes)
            .map(|i| format!("node-{i} {}\n", Self::node_token(i)))
            .collect();
        std::fs::write(dir.path().join("tokens"), tokens)?;
        let state = dir.path().join("state");
        std::fs::create_dir(&state)?;
        let args: Vec<String> = vec![
            "--grpc-max-connections=4096".into(),
            "--grpc-max-connections-per-peer=4096".into(),
            format!("--source-dir={}", manifests.display()),
            format!("--tokens-file={}", dir.path().join("tokens").display()),
        ];
        let controller = KubeController::spawn_source(&state, &args, "directory")?;
        Ok(Self {
            dir,
            controller,
            scale,
        })
    }

    fn node_token(node: usize) -> String {
        format!("bench-node-token-{node:06}-0123456789")
    }
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

impl Source for DirectorySource {
    fn controller(&self) -> &KubeController {
        &self.controller
    }

    fn token(&self, node: usize) -> String {
        Self::node_token(node)
    }

    async fn edit_policy(&self, principal: &str) -> anyhow::Result<()> {
        let path = self.dir.path().join("manifests/edit.yaml");
        write_atomic(&path, &edit_yaml(principal))
    }

    async fn add_pod(&self, name: &str, pod: usize) -> anyhow::Result<()> {
        let path = self.dir.path().join(format!("manifests/{name}.yaml"));
        write_atomic(&path, &pod_yaml(&self.scale, name, pod))
    }
}
