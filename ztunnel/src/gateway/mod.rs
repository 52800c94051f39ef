//! Gateway mode (DESIGN.md §10): the ztunnel binary serving one gateway pod instead of
//! capturing a node's pods.
//!
//! A gateway pod carries the labels `membrane.dev/gateway: egress|ingress|east-west` and
//! `gateway.networking.k8s.io/gateway-name: <name>`. The controller publishes it as a mesh
//! workload (in any namespace) that its node's ztunnel never captures, and issues its identity
//! under node authorization like any pod's. The gateway process (`ztunnel --gateway egress
//! --gateway-pod <namespace>/<name>`) authenticates as its node, watches the discovery stream
//! like a node ztunnel, and once the stream names its pod — on its node, with that role — it
//! takes the pod's identity, binds its listeners inside the pod's network namespace
//! (`--gateway-netns`, else the process's own) and turns ready. Metrics, readiness, admin and
//! access records are the node ztunnel's.
//!
//! - [`egress`]: HBONE on 15008 from source ztunnels whose EgressPolicy rule says `via` this
//!   gateway; decided again here and carried out from the gateway's address.
//! - [`ingress`]: the `Gateway` the pod's label names (in its namespace), streamed with its
//!   routes; external TCP/TLS on its listener ports carried over HBONE to mesh pods.
//! - [`east_west`]: HBONE on 15008 from federated clusters' ztunnels, each tunnel relayed,
//!   still encrypted end to end, to a local pod's HBONE port (double HBONE).

pub mod east_west;
pub mod egress;
pub mod ingress;
pub mod metrics;
pub mod resolve;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use membrane_api::ports;
use membrane_policy::egress::GatewayRef;
use membrane_runtime::listener::LogLimiter;
use tokio_util::sync::CancellationToken;

use crate::netns::PodNetns;
use crate::proxy::{PodContext, Proxy, serve_listener};
use crate::state::{GatewayKind, MeshState, Workload};
use metrics::GatewayMetrics;
use resolve::Resolver;

/// Which gateway pod this process serves.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Egress, ingress or east-west.
    pub kind: GatewayKind,
    /// The gateway pod's namespace.
    pub namespace: String,
    /// The gateway pod's name.
    pub pod: String,
    /// The pod's network namespace; `None`: the process's own (a gateway container).
    pub netns: Option<PathBuf>,
    /// Where an egress gateway resolves names.
    pub resolver: Resolver,
    /// An ingress gateway closes a client connection that carried no byte either way for
    /// this long (`None`: never).
    pub idle_timeout: Option<std::time::Duration>,
}

/// Parses `--gateway-pod`: `<namespace>/<name>`.
pub fn parse_pod(text: &str) -> Result<(String, String), String> {
    let (ns, name) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected <namespace>/<pod name>"))?;
    membrane_identity::spiffe_id::validate_namespace(ns).map_err(|e| format!("{text:?}: {e}"))?;
    if name.is_empty() || name.len() > 253 || name.contains('/') {
        return Err(format!("{text:?}: the pod name is not a Kubernetes name"));
    }
    Ok((ns.to_owned(), name.to_owned()))
}

/// How often a gateway whose pod is not (yet) published looks again.
const RETRY: Duration = Duration::from_secs(1);

/// The gateway's own workload in `state`, if published on this node with this role.
fn own_workload(state: &MeshState, config: &GatewayConfig, node: &str) -> Option<Arc<Workload>> {
    state
        .workloads()
        .into_iter()
        .find(|w| w.namespace == config.namespace && w.name == config.pod)
        .filter(|w| w.node == node && w.gateway.as_ref().is_some_and(|r| r.kind == config.kind))
}

/// Runs the gateway until `accepting` is cancelled: waits for its pod, binds, turns ready.
pub async fn run(
    config: GatewayConfig,
    proxy: Arc<Proxy>,
    metrics: GatewayMetrics,
    ready: tokio::sync::watch::Sender<bool>,
    accepting: CancellationToken,
    cancel: CancellationToken,
) {
    let Some(workload) = wait_for_pod(&config, &proxy, &accepting).await else {
        return;
    };
    let netns = match &config.netns {
        // The process's own namespace named by path is used as its own.
        Some(path) => match PodNetns::open(path) {
            Err(crate::netns::NetnsError::OwnNetns { .. }) => PodNetns::own(),
            other => other,
        },
        None => PodNetns::own(),
    };
    let netns = match netns {
        Ok(n) => Arc::new(n),
        Err(e) => {
            tracing::error!(error = %e, "cannot use the gateway pod's network namespace; not serving");
            return;
        }
    };
    // Ready means the identity is issued: wait for the first certificate.
    loop {
        match proxy.certs.svid(&workload.identity).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(identity = %workload.identity, error = %e, "no certificate for the gateway yet; retrying");
                tokio::select! {
                    _ = accepting.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
    let pod = Arc::new(PodContext {
        workload: crate::proxy::WorkloadCell::new(workload.clone()),
        netns: netns.clone(),
        accepting: accepting.clone(),
        cancel,
        tunnels: Default::default(),
    });
    // Both kinds serve HBONE on 15008: source ztunnels (egress), mesh pods (ingress).
    let listeners = match bind_hbone(&netns).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen on the gateway's HBONE port; not serving");
            return;
        }
    };
    let name = workload.gateway.clone().map(|r| r.name).unwrap_or_default();
    match config.kind {
        GatewayKind::Egress => {
            let handler = Arc::new(egress::EgressGateway {
                pod: pod.clone(),
                proxy: proxy.clone(),
                me: GatewayRef {
                    namespace: workload.namespace.clone(),
                    name,
                },
                resolver: resolve::CachingResolver::new(config.resolver),
                metrics,
            });
            let tasks = serve_hbone(listeners, &pod, &proxy, handler, "egress_gateway");
            serving(config.kind, &workload, &ready, tasks).await;
        }
        GatewayKind::EastWest => {
            let handler = Arc::new(east_west::EastWestGateway {
                pod: pod.clone(),
                proxy: proxy.clone(),
                metrics,
                open: east_west::SourceSlots::default(),
            });
            let tasks = serve_hbone(listeners, &pod, &proxy, handler, "east_west_gateway");
            serving(config.kind, &workload, &ready, tasks).await;
        }
        GatewayKind::Ingress => {
            let gateway = Arc::new(ingress::IngressGateway {
                pod: pod.clone(),
                proxy: proxy.clone(),
                gateway: format!("{}/{name}", workload.namespace),
                metrics,
                idle_timeout: config.idle_timeout,
            });
            let handler = Arc::new(ingress::IngressHbone(gateway.clone()));
            let tasks = serve_hbone(listeners, &pod, &proxy, handler, "ingress_gateway_hbone");
            // Ready (and logged as serving) once its table is known and bound.
            ingress::run(gateway, ready).await;
            for task in tasks {
                task.abort();
            }
        }
    }
}

/// Logs the gateway as serving, turns it ready and runs its listener tasks to their end.
async fn serving(
    kind: GatewayKind,
    workload: &Workload,
    ready: &tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    tracing::info!(
        %kind,
        pod = %format_args!("{}/{}", workload.namespace, workload.name),
        identity = %workload.identity,
        ips = ?workload.ips,
        "gateway serving"
    );
    ready.send_replace(true);
    for task in tasks {
        let _ = task.await;
    }
}

/// Serves each of `listeners` (15008) with `handler`, the gateway pod's SVID presented.
fn serve_hbone<H: crate::hbone::ConnectHandler>(
    listeners: Vec<tokio::net::TcpListener>,
    pod: &Arc<PodContext>,
    proxy: &Arc<Proxy>,
    handler: Arc<H>,
    kind: &'static str,
) -> Vec<tokio::task::JoinHandle<()>> {
    listeners
        .into_iter()
        .map(|listener| {
            let handler = handler.clone();
            tokio::spawn(serve_listener(
                listener,
                pod.clone(),
                proxy.clone(),
                kind,
                move |tcp, _peer, pod, proxy| hbone(tcp, pod, proxy, handler.clone()),
            ))
        })
        .collect()
}

async fn wait_for_pod(
    config: &GatewayConfig,
    proxy: &Proxy,
    accepting: &CancellationToken,
) -> Option<Arc<Workload>> {
    let mut state = proxy.state.clone();
    let mut warned = false;
    loop {
        let found = {
            let s = state.borrow_and_update();
            if s.is_loaded() {
                own_workload(&s, config, &proxy.node)
            } else {
                None
            }
        };
        if found.is_some() {
            return found;
        }
        if !warned && state.borrow().is_loaded() {
            warned = true;
            tracing::warn!(
                pod = %format_args!("{}/{}", config.namespace, config.pod),
                node = %proxy.node,
                kind = %config.kind,
                "the gateway pod is not published on this node with this role (labels membrane.dev/gateway and gateway.networking.k8s.io/gateway-name); waiting"
            );
        }
        tokio::select! {
            _ = accepting.cancelled() => return None,
            changed = state.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Binds 15008 on IPv4 and, when the namespace has it, IPv6.
async fn bind_hbone(netns: &PodNetns) -> std::io::Result<Vec<tokio::net::TcpListener>> {
    let mut listeners = vec![
        netns
            .listen(
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports::HBONE)),
                crate::netns::Facing::Network,
            )
            .await?,
    ];
    match netns
        .listen(
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, ports::HBONE)),
            crate::netns::Facing::Network,
        )
        .await
    {
        Ok(l) => listeners.push(l),
        Err(e) => tracing::debug!(error = %e, "no IPv6 HBONE listener for the gateway"),
    }
    Ok(listeners)
}

/// Serves one HBONE connection to the gateway with its own SVID.
async fn hbone<H: crate::hbone::ConnectHandler>(
    tcp: tokio::net::TcpStream,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
    handler: Arc<H>,
) {
    let _ = tcp.set_nodelay(true);
    let identity = &pod.workload().identity;
    let svid = match proxy.certs.svid_for_connection(identity, "gateway").await {
        Ok(svid) => svid,
        Err(e) => {
            tracing::warn!(%identity, error = %e, "no valid certificate to serve HBONE; connection refused");
            return;
        }
    };
    let tls = match proxy.tls.server_config(&svid) {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::warn!(error = %e, "TLS configuration failed; connection refused");
            return;
        }
    };
    // Anyone who reaches the port can fail a handshake: logged at a bounded rate.
    static CONNECTION_LOG: LogLimiter = LogLimiter::new();
    if let Err(e) = crate::hbone::serve_connection(tcp, tls, handler).await
        && let Some(left_out) = CONNECTION_LOG.allow()
    {
        tracing::info!(error = %e, left_out, "gateway HBONE connection refused or failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_pod_is_namespace_slash_name() {
        assert_eq!(
            parse_pod("egress/gw-0"),
            Ok(("egress".to_owned(), "gw-0".to_owned()))
        );
        for bad in ["gw-0", "/gw-0", "Egress/gw-0", "egress/", "egress/a/b"] {
            assert!(parse_pod(bad).is_err(), "{bad}");
        }
    }
}
