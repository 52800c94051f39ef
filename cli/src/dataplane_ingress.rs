//! The ingress step of `membrane demo`: an external client in the simulated internet reaches
//! the model server through the ingress gateway (`examples/genai/ingress.yaml`) by TLS server
//! name — passed through, never opened — while the model server's node sees the gateway's
//! identity and the client's address; a server name no route takes is refused at the
//! gateway. Every `ok` is computed from the bytes that came back and the access records.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use membrane_testbed::mesh::Mesh;
use membrane_testbed::world::World;
use membrane_testbed::world::client::{client_hello, echo_from_internet};
use serde_json::json;

use crate::narrator::Narrator;

/// The Gateway and its routes (they send to the model server's Service, below).
const INGRESS: &str = include_str!("../../examples/genai/ingress.yaml");
/// The model server's Service (the demo's pod carries `app: model-server-0`).
const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: model-server, namespace: inference}
spec:
  clusterIP: 10.96.0.20
  selector: {app: model-server-0}
  ports: [{name: http, port: 80, targetPort: 8080}]
";
/// An external client's address.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);

/// The ingress part of the tour (the model server already echoes on 8080).
pub async fn tour(out: &mut Narrator, mesh: &Mesh, world: &World) -> anyhow::Result<()> {
    out.step("an external client reaches the model server through the ingress gateway");
    mesh.write_manifest("demo-model-service.yaml", SERVICE)?;
    mesh.write_manifest("demo-ingress.yaml", INGRESS)?;
    let gateway = SocketAddr::new(mesh.ip("ingress-gateway-0"), 443);
    let mut request = client_hello("api.models.example")?;
    request.extend_from_slice(b"POST /v1/generate");
    // The gateway turns ready once its routes have arrived (the controller reloads manifests
    // within a fraction of a second).
    let mut reply = Err(anyhow::anyhow!("not tried"));
    for _ in 0..50 {
        reply = echo_from_internet(world, CLIENT, gateway, &request).await;
        if reply.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let intact = reply.as_ref().is_ok_and(|got| *got == request);
    let at_model = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["forwarded_for"] == CLIENT.to_string(),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_default();
    let unknown = client_hello("evil.example")?;
    let refused = echo_from_internet(world, CLIENT, gateway, &unknown)
        .await
        .is_err();
    let refusal = mesh.ztunnels["node-ingress-gw"]
        .wait_for_record(
            |r| r["direction"] == "ingress_gateway" && r["result"] == "refused",
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_default();
    out.say(
        intact
            && at_model["src_identity"] == mesh.spiffe_id("ingress-gateway-0").as_str()
            && refused,
        "carried by server name, unopened and intact, over HBONE with the gateway's identity; the model server's node saw the gateway and the client's address; an unknown server name was refused at the gateway",
        json!({
            "bytesIntact": intact,
            "model server saw": at_model["src_identity"],
            "client address it saw": at_model["forwarded_for"],
            "unknown server name refused": refused,
            "gateway record": refusal["reason"],
        }),
    );
    Ok(())
}
