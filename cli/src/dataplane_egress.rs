//! The egress steps of `membrane demo`: the pods resolve names through their ztunnel's DNS
//! capture against the simulated outside world, and `examples/genai/egress.yaml` decides
//! what leaves — a model download allowed and carried out through the egress gateway, an upload to a paste site denied by name, the same
//! address by literal IP denied, a ClientHello lying about its server name denied, and a bulk
//! upload cut by a byte budget. Every `ok` is computed from what happened: the bytes that
//! arrived (or not) and the access records the ztunnels wrote.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use hickory_proto::rr::RecordType;
use membrane_testbed::mesh::Mesh;
use membrane_testbed::netns::Capture;
use membrane_testbed::world::client::{egress_record, tls_hello};
use membrane_testbed::world::dns_client::{addresses, resolve};
use membrane_testbed::world::{SINK_PORT, World};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::narrator::Narrator;

/// The EgressPolicies of the example.
pub const EGRESS: &str = include_str!("../../examples/genai/egress.yaml");
/// The demo's budget: the model server may upload at most 1 MiB a minute to the object store.
const BUDGET: &str = "apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: bulk-upload-budget, namespace: inference}
spec:
  rules:
  - to: [{hosts: [s3.example], ports: [9000]}]
  budget: {sentBytes: 1Mi, per: 1m}
";

/// Resolves `name` from `pod` through its capture; the first address.
fn lookup(mesh: &Mesh, world: &World, pod: &str, name: &str) -> anyhow::Result<String> {
    let answer = resolve(&mesh.netns_path(pod), world.resolver(), name, RecordType::A)?;
    addresses(&answer)
        .into_iter()
        .next()
        .with_context(|| format!("no address for {name}"))
}

fn verdict(r: &Value) -> Value {
    json!({
        "verdict": r["egress"]["verdict"], "reason": r["egress"]["reason"],
        "policy": r["egress"]["policy"], "pinned name": r["egress"]["host"],
        "sni": r["egress"]["sni"],
    })
}

/// The egress part of the tour; `world` serves the outside.
pub async fn tour(out: &mut Narrator, mesh: &Mesh, world: &World) -> anyhow::Result<()> {
    out.step("egress by identity and name: the trainer downloads from the model hub, through the egress gateway");
    mesh.write_manifest("egress.yaml", EGRESS)?;
    mesh.write_manifest("egress-budget.yaml", BUDGET)?;
    // The controller reloads manifests within a fraction of a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hub = lookup(mesh, world, "trainer-0", "huggingface.co")?;
    let hub: SocketAddr = format!("{hub}:443").parse()?;
    let gateway = mesh.ip("egress-gateway-0");
    let node_a = mesh.testbed.node("node-a").context("node-a")?.clone();
    let uplink = Capture::start(node_a.netns_path(), node_a.ifname())?;
    let line = tls_hello(mesh, "trainer-0", world, hub, "huggingface.co").await;
    let seen = uplink.stop();
    let hub_octets = match hub.ip() {
        std::net::IpAddr::V4(v4) => v4.octets(),
        std::net::IpAddr::V6(_) => [0; 4],
    };
    let direct = seen.contains(&hub_octets);
    let r = egress_record(mesh, "node-a", "trainer-0", hub, 1).await?;
    let at_gateway = mesh.ztunnels["node-egress-gw"]
        .wait_for_record(
            |r| r["direction"] == "egress_gateway" && r["result"] != "refused",
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_default();
    let from_gateway = line
        .as_ref()
        .is_ok_and(|l| l.contains(&format!("client={gateway}")));
    out.say(
        from_gateway
            && !direct
            && r["egress"]["verdict"] == "allow"
            && at_gateway["src_identity"] == mesh.spiffe_id("trainer-0").as_str(),
        "allowed: huggingface.co is a name the trainer resolved itself, on 443, with a matching server name — and it left from the egress gateway's address, decided there again for the trainer's identity; node-a's uplink never carried a packet to the hub",
        json!({"reply": line.as_ref().ok(), "record": verdict(&r), "via": r["egress"]["via"],
               "gateway saw": at_gateway["src_identity"], "gateway address": gateway.to_string(),
               "packet to the hub on node-a's uplink": direct}),
    );

    out.step("the same trainer tries the paste site: by literal address, then by name");
    let paste_ip: SocketAddr = "198.51.100.20:443".parse()?;
    // By address, naming no server either (an IP as the TLS name sends no SNI).
    let literal = tls_hello(mesh, "trainer-0", world, paste_ip, "198.51.100.20").await;
    let by_ip = egress_record(mesh, "node-a", "trainer-0", paste_ip, 1).await?;
    lookup(mesh, world, "trainer-0", "paste.example")?;
    let named = tls_hello(mesh, "trainer-0", world, paste_ip, "paste.example").await;
    let by_name = egress_record(mesh, "node-a", "trainer-0", paste_ip, 2).await?;
    out.say(
        literal.is_err()
            && named.is_err()
            && by_ip["egress"]["reason"] == "not_allowed"
            && by_name["egress"]["policy"] == "membrane-system/no-paste-sites",
        "denied both ways, before a byte left: an address the pod never resolved matches no name, and the name is denied mesh-wide",
        json!({"by literal IP": verdict(&by_ip), "by name": verdict(&by_name)}),
    );

    out.step("a ClientHello that lies about its server name, on the hub's own address");
    let lie = tls_hello(mesh, "trainer-0", world, hub, "uploads.shared.example").await;
    let r = egress_record(mesh, "node-a", "trainer-0", hub, 2).await?;
    out.say(
        lie.is_err() && r["egress"]["reason"] == "sni_mismatch",
        "denied: the address is pinned to huggingface.co, the server name asks for something else",
        json!({"record": verdict(&r)}),
    );

    out.step("the model server's bulk upload runs into its byte budget (1 MiB a minute)");
    let store = lookup(mesh, world, "model-server-0", "s3.example")?;
    let sink: SocketAddr = format!("{store}:{SINK_PORT}").parse()?;
    let before = world.sunk();
    let mut tcp = mesh.connect_from("model-server-0", sink).await?;
    let chunk = vec![0x42u8; 64 * 1024];
    let upload = async {
        for _ in 0..128 {
            tcp.write_all(&chunk).await?;
        }
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(15), upload).await;
    let r = egress_record(mesh, "node-b", "model-server-0", sink, 1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let arrived = world.sunk() - before;
    // A new upload in the same minute.
    if let Ok(mut again) = mesh.connect_from("model-server-0", sink).await {
        let _ = again.write_all(b"more").await;
    }
    let again = egress_record(mesh, "node-b", "model-server-0", sink, 2).await?;
    out.say(
        arrived <= 1 << 20
            && r["egress"]["reason"] == "budget_exhausted"
            && again["result"] == "refused"
            && again["egress"]["reason"] == "budget_exhausted",
        "cut at the limit: the store received at most 1 MiB of the 8 MiB, and a new upload is refused until the minute rolls",
        json!({"bytesArrived": arrived, "bytesSentPerRecord": r["bytes_sent"], "record": verdict(&r),
               "next upload": verdict(&again)}),
    );
    Ok(())
}
