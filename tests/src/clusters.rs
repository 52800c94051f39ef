//! Two federated clusters on one host, for the multi-cluster tests: separate controllers,
//! roots and trust domains (`cluster-a.example`, `cluster-b.example`). A is the mesh's own
//! controller (node-a: trainer, scraper, store); B runs its own controller with node-b (the
//! exported model server) and, when the pod networks are not flat, node-c (B's east-west
//! gateway). The fabric stands for the WAN between them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dns::{addresses, resolve};
use crate::mesh::{Mesh, MeshSpec, NodeController, PodDef};
use crate::{TestCa, node_token};

/// Cluster A's trust domain (the mesh's controller).
pub const A: &str = "cluster-a.example";
/// Cluster B's trust domain.
pub const B: &str = "cluster-b.example";
/// The namespaces in either cluster's mesh.
const MESH_NAMESPACES: [&str; 3] = ["training", "monitoring", "inference"];
/// A resolver address nothing serves: only the DNS capture answers it.
const UNSERVED: &str = "192.0.2.53:53";
/// The name A's pods reach B's exported model server by.
pub const MODEL_SERVER: &str = "model-server.inference.svc.clusterset.local";
/// B's east-west gateway pod (namespace, service account) when pod networks are not flat.
pub const GATEWAY: (&str, &str) = ("mesh-gateways", "east-west");

/// How the two clusters are joined.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Both clusters' workload certificate lifetime (`None`: the default).
    pub cert_ttl: Option<Duration>,
    /// B's pod network is unreachable from A's (routes removed both ways) and A reaches B's
    /// pods through B's east-west gateway on node-c (double HBONE).
    pub east_west: bool,
    /// With `east_west`: keep the routes between the pod networks, so the gateway can be
    /// switched off again ([`TwoClusters::use_gateway`]) and both paths compared.
    pub keep_routes: bool,
    /// Arguments added to every ztunnel's command line.
    pub ztunnel_args: Vec<String>,
}

/// The running clusters: A's mesh (every node, B's included), B's controller, and the model
/// server's clusterset address as A's trainer resolved it.
pub struct TwoClusters {
    /// The testbed and A's controller.
    pub mesh: Mesh,
    /// B's controller.
    pub b: TestCa,
    /// `<clusterset VIP>:8080`.
    pub dst: SocketAddr,
    /// A's `TrustFederation` for B without and (when set up) with B's east-west gateway.
    federation_b: (String, Option<String>),
}

impl TwoClusters {
    /// Makes A reach B's pods through B's east-west gateway (`true`) or directly, and waits
    /// until node-a's ztunnel holds the change. Needs [`Options::east_west`].
    pub async fn use_gateway(&self, on: bool) -> anyhow::Result<()> {
        let manifest = match (on, &self.federation_b) {
            (false, (flat, _)) => flat,
            (true, (_, Some(gateway))) => gateway,
            (true, (_, None)) => anyhow::bail!("these clusters have no east-west gateway"),
        };
        self.mesh.write_manifest("federation-b.yaml", manifest)?;
        let model_server = self.mesh.ip("model-server").to_string();
        let seen = std::sync::Mutex::new(serde_json::Value::Null);
        let result = until(
            "node-a follows the gateway setting",
            Duration::from_secs(20),
            || async {
                let dump = self.mesh.config_dump("node-a").await?;
                let found = (dump["workloads"].as_array().into_iter().flatten()).find(|w| {
                    w["ips"].as_array().is_some_and(|ips| {
                        ips.iter()
                            .any(|ip| ip.as_str() == Some(model_server.as_str()))
                    })
                });
                let held = found.is_some_and(|w| w["networkGateway"].is_null() != on);
                if let (Some(w), Ok(mut seen)) = (found, seen.lock()) {
                    *seen = w.clone();
                }
                Ok(held)
            },
        )
        .await;
        result.with_context(|| format!("node-a holds the model server as {:?}", seen.lock()))
    }
}

/// A `TrustFederation` manifest for peer `td`.
pub fn federation(
    name: &str,
    td: &str,
    bundle_endpoint: &str,
    root_pem: &str,
    exports: Option<&str>,
    gateway: Option<(IpAddr, &str)>,
) -> String {
    let indented: String = root_pem.lines().map(|l| format!("    {l}\n")).collect();
    let exports = exports
        .map(|url| {
            // The testbed's pod supernet: the only addresses imported from the peer.
            format!("  serviceExports:\n    url: {url}\n    addresses: [10.77.0.0/16]\n")
        })
        .unwrap_or_default();
    let gateway = gateway
        .map(|(ip, id)| format!("  eastWestGateway:\n    address: {ip}\n    spiffeId: {id}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: security.membrane.dev/v1\nkind: TrustFederation\nmetadata: {{name: {name}}}\nspec:\n  trustDomain: {td}\n  bundleEndpoint:\n    url: {bundle_endpoint}\n    spiffeId: spiffe://{td}/ns/membrane-system/sa/membrane-ca\n  bootstrapBundle: |\n{indented}{exports}{gateway}"
    )
}

/// Cluster B's manifests: its mesh namespace, the model server pod (at its testbed address)
/// behind an exported Service, B's policy (only A's trainer may call it) and, if given, the
/// east-west gateway pod on node-c.
fn b_manifests(model_server: IpAddr, gateway: Option<IpAddr>) -> String {
    let mut text = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: inference, labels: {{membrane.dev/mesh: enabled}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: model-server, namespace: inference, uid: inference-model-server, labels: {{app: model-server}}}}
spec: {{serviceAccountName: model-server, nodeName: node-b}}
status: {{phase: Running, podIP: {model_server}}}
---
apiVersion: v1
kind: Service
metadata: {{name: model-server, namespace: inference, labels: {{membrane.dev/export: "true"}}}}
spec:
  clusterIP: 10.96.0.20
  selector: {{app: model-server}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: trainer-only, namespace: inference}}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["{A}/ns/training/sa/trainer"]}}
"#
    );
    if let Some(ip) = gateway {
        let (ns, sa) = GATEWAY;
        text.push_str(&format!(
            r#"---
apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: ew-gateway, namespace: {ns}, uid: {ns}-ew-gateway, labels: {{membrane.dev/gateway: east-west, gateway.networking.k8s.io/gateway-name: east-west}}}}
spec: {{serviceAccountName: {sa}, nodeName: node-c}}
status: {{phase: Running, podIP: {ip}}}
"#
        ));
    }
    text
}

/// Connects from pod `from` to `dst` and echoes one line; the time-bounded result.
pub async fn echo(mesh: &Mesh, from: &str, dst: SocketAddr, line: &[u8]) -> anyhow::Result<()> {
    let attempt = async {
        let mut s = mesh.connect_from(from, dst).await?;
        s.write_all(line).await?;
        let mut back = vec![0; line.len()];
        s.read_exact(&mut back).await?;
        ensure!(back == line, "echo differs");
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .context("timed out")?
}

/// Polls `check` every 200 ms until it says `true`, for at most `limit`.
pub async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = check().await;
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {limit:?} (last: {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts both clusters, federated both ways (A imports B's Services), every pod enrolled,
/// echo servers on model-server:8080 and store:9000, and resolves the model server's
/// clusterset name through the trainer's DNS capture.
pub async fn two_clusters(options: Options) -> anyhow::Result<TwoClusters> {
    let b_nodes: Vec<String> = if options.east_west {
        vec!["node-b".into(), "node-c".into()]
    } else {
        vec!["node-b".into()]
    };
    // Cluster B: its own controller, root and trust domain.
    let mut b = TestCa::builder().trust_domain(B);
    if let Some(ttl) = options.cert_ttl {
        b = b.cert_ttl(ttl);
    }
    let b = b
        .nodes(&b_nodes)
        .bundle_endpoint(Duration::from_secs(1))
        .exports()
        .start()
        .await?;
    let b_bundle = b.bundle_endpoint_addr().context("B's bundle endpoint")?;
    let b_exports = b.exports_addr().context("B's federation listener")?;
    let mut pods = vec![
        PodDef::new("trainer", "training", "trainer", "node-a"),
        PodDef::new("scraper", "monitoring", "scraper", "node-a"),
        PodDef::new("store", "training", "feature-store", "node-a"),
        PodDef::new("model-server", "inference", "model-server", "node-b"),
    ];
    if options.east_west {
        let (ns, sa) = GATEWAY;
        pods.push(PodDef::gateway(
            "ew-gateway",
            ns,
            sa,
            "node-c",
            "east-west",
            "east-west",
        ));
    }
    // Cluster A: the mesh's own controller; B's nodes' ztunnels belong to B.
    let node_controllers = (b_nodes.iter())
        .map(|node| {
            let controller = NodeController {
                endpoint: b.endpoint(),
                root_pem: b.root_pem(),
                token: node_token(node),
                trust_domain: B.into(),
                mesh_namespaces: MESH_NAMESPACES.map(str::to_owned).to_vec(),
            };
            (node.clone(), controller)
        })
        .collect::<BTreeMap<_, _>>();
    let mut spec = MeshSpec {
        cert_ttl: options.cert_ttl,
        trust_domain: Some(A.into()),
        bundle_endpoint: Some(Duration::from_secs(1)),
        node_controllers,
        ztunnel_args: options.ztunnel_args,
        ..MeshSpec::two_nodes(pods, &MESH_NAMESPACES)
    };
    if options.east_west {
        spec.nodes.push("node-c".into());
    }
    let mesh = Mesh::start(spec).await?;
    let gateway_ip = options.east_west.then(|| mesh.ip("ew-gateway"));
    if options.east_west && !options.keep_routes {
        // Not flat: A's pods and B's model server cannot reach each other; only B's gateway
        // (node-c) is reachable from A.
        mesh.testbed.unroute_pods("node-a", "node-b")?;
    }
    let gateway_id = format!("spiffe://{B}/ns/{}/sa/{}", GATEWAY.0, GATEWAY.1);
    let federation_b = |gateway: Option<IpAddr>| {
        federation(
            "cluster-b",
            B,
            &format!("https://{b_bundle}/"),
            &b.root_pem(),
            Some(&format!("https://{b_exports}")),
            gateway.map(|ip| (ip, gateway_id.as_str())),
        )
    };
    let federation_b = (
        federation_b(None),
        gateway_ip.map(|ip| federation_b(Some(ip))),
    );
    let first = federation_b.1.as_ref().unwrap_or(&federation_b.0);
    mesh.write_manifest("federation-b.yaml", first)?;
    let a_bundle = mesh
        .ca()
        .bundle_endpoint_addr()
        .context("A's bundle endpoint")?;
    // B federates with A (mutual), and learns its pods.
    std::fs::write(
        b.manifests_dir().join("federation-a.yaml"),
        federation(
            "cluster-a",
            A,
            &format!("https://{a_bundle}/"),
            &mesh.ca().root_pem(),
            None,
            None,
        ),
    )?;
    std::fs::write(
        b.manifests_dir().join("inference.yaml"),
        b_manifests(mesh.ip("model-server"), gateway_ip),
    )?;
    for pod in ["trainer", "scraper", "store", "model-server"] {
        until(
            &format!("{pod} enrolled"),
            Duration::from_secs(20),
            || async { Ok(mesh.enroll(pod).await.is_ok()) },
        )
        .await?;
    }
    mesh.echo_app("model-server", 8080)?;
    mesh.echo_app("store", 9000)?;

    // The clusterset name resolves, through A's DNS capture, to the imported Service's VIP.
    let unserved: SocketAddr = UNSERVED.parse()?;
    let trainer_ns = mesh.netns_path("trainer");
    let deadline = Instant::now() + Duration::from_secs(30);
    let vip: IpAddr = loop {
        let ns = trainer_ns.clone();
        let answer = tokio::task::spawn_blocking(move || {
            resolve(&ns, unserved, MODEL_SERVER, RecordType::A)
        })
        .await?;
        let got = answer.as_ref().map(addresses);
        if let Ok([one]) = got.as_deref()
            && one.starts_with("240.240.")
        {
            break one.parse()?;
        }
        ensure!(
            Instant::now() < deadline,
            "{MODEL_SERVER} never resolved to a clusterset address: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    Ok(TwoClusters {
        mesh,
        b,
        dst: SocketAddr::new(vip, 8080),
        federation_b,
    })
}
