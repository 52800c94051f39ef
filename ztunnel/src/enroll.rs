//! The enrollment socket: how the node side (the CNI plugin, `membrane`, tests) tells the
//! ztunnel about pods.
//!
//! A Unix stream socket (mode 0600), one JSON request per line, one JSON response per line; the
//! messages are `membrane_api::enrollment`'s (re-exported here), which the CNI plugin shares.
//!
//! `add` answers only once the redirect rules are in place and the listeners are bound, so the
//! caller can start the pod's containers safely. A pod that is not a mesh workload is not an
//! error: it is remembered and the answer says `"enrolled":false` (it is enrolled later if its
//! namespace joins the mesh) — provided the node's view is current: while the discovery stream
//! is down, a pod the state does not know is refused, so it cannot start outside the mesh. A
//! refusal that a retry may cure (no mesh state yet, a view that is not current) carries
//! `"retry":true`. `list` reports every known pod: `uid`, `netns`, `enrolled`, `mesh` (the
//! state says it is a mesh workload of this node), `namespace`, `name`, `ips`, `error`.
//! Which identity a pod has never comes from this socket: only the UID does, and the identity
//! is looked up in the mesh state.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

pub use membrane_api::enrollment::{PodStatus, Request, Response};

use crate::pods::{PodInfo, PodRegistry};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Most addresses one `add` may carry.
pub const MAX_IPS: usize = 16;
/// Longest Kubernetes namespace or pod name accepted.
const MAX_NAME: usize = 253;

/// Labels of the refusal counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Why (`EnrollError::reason`).
    pub reason: &'static str,
}

/// Enrollment socket metrics.
#[derive(Debug, Clone, Default)]
pub struct EnrollMetrics {
    refused: Family<RefusalLabels, Counter>,
}

impl EnrollMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "enroll_refused",
            "Pods the enrollment socket refused to add, by reason (stale_view: the discovery stream was down and the pod unknown)",
            m.refused.clone(),
        );
        m
    }
}

fn valid_name(value: &Option<String>) -> bool {
    value
        .as_ref()
        .is_none_or(|v| !v.is_empty() && v.len() <= MAX_NAME && !v.chars().any(char::is_control))
}

/// The pod an `add` request describes; any other request is handed back.
fn added_pod(request: Request) -> Result<PodInfo, Request> {
    match request {
        Request::Add {
            uid,
            netns,
            namespace,
            name,
            ips,
        } => Ok(PodInfo {
            uid,
            netns,
            namespace,
            name,
            ips,
        }),
        other => Err(other),
    }
}

/// Checks what a node-side caller says about a pod.
fn check_pod(pod: &PodInfo) -> Result<(), String> {
    if pod.uid.is_empty() || pod.uid.len() > 256 {
        return Err("uid must be 1 to 256 characters".into());
    }
    if !pod.netns.is_absolute() {
        return Err("netns must be an absolute path".into());
    }
    if !valid_name(&pod.namespace) || !valid_name(&pod.name) {
        return Err(format!(
            "namespace and name must be 1 to {MAX_NAME} printable characters"
        ));
    }
    if pod.ips.len() > MAX_IPS {
        return Err(format!("at most {MAX_IPS} ips"));
    }
    Ok(())
}

/// Parses one request line. Never panics.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let request: Request =
        serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))?;
    match added_pod(request.clone()) {
        Ok(pod) => check_pod(&pod)?,
        Err(Request::Remove { uid }) if uid.is_empty() => {
            return Err("uid must not be empty".into());
        }
        Err(_) => {}
    }
    Ok(request)
}

/// Binds the socket at `path` (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the enrollment socket until `cancel` fires.
pub async fn serve(
    listener: tokio::net::UnixListener,
    pods: Arc<PodRegistry>,
    metrics: EnrollMetrics,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "enrollment accept failed");
                    continue;
                }
            },
        };
        let (pods, cancel, metrics) = (pods.clone(), cancel.clone(), metrics.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read);
            let mut line = String::new();
            loop {
                line.clear();
                let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
                let n = tokio::select! {
                    _ = cancel.cancelled() => return,
                    n = limited.read_line(&mut line) => n,
                };
                let response = match n {
                    Ok(0) => return,
                    Ok(_) if line.len() > MAX_LINE => Response::error("request line too long"),
                    Ok(_) => handle(&pods, &metrics, line.trim()).await,
                    Err(e) => Response::error(format!("unreadable request: {e}")),
                };
                let Ok(mut out) = serde_json::to_vec(&response) else {
                    return;
                };
                out.push(b'\n');
                if write.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn handle(pods: &PodRegistry, metrics: &EnrollMetrics, line: &str) -> Response {
    let request = match parse_request(line) {
        Ok(r) => r,
        Err(e) => return Response::error(e),
    };
    match added_pod(request) {
        Ok(pod) => {
            let (uid, netns) = (pod.uid.clone(), pod.netns.clone());
            match pods.add(pod).await {
                Ok(enrolled) => Response {
                    ok: true,
                    enrolled: Some(enrolled),
                    ..Response::default()
                },
                Err(e) => {
                    let reason = e.reason();
                    tracing::warn!(uid, netns = %netns.display(), reason, error = %e, "enrollment refused");
                    metrics
                        .refused
                        .get_or_create(&RefusalLabels { reason })
                        .inc();
                    Response {
                        retry: e.retryable().then_some(true),
                        ..Response::error(e)
                    }
                }
            }
        }
        Err(Request::Remove { uid }) => match pods.remove(&uid).await {
            Ok(removed) => Response {
                ok: true,
                removed: Some(removed),
                ..Response::default()
            },
            Err(e) => Response::error(e),
        },
        Err(Request::List) => Response {
            ok: true,
            pods: Some(pods.list().await),
            ..Response::default()
        },
        Err(Request::Add { .. }) => Response::error("add request not recognised as a pod"),
    }
}

/// Sends one request to the enrollment socket at `path` and returns the response (used by the
/// CLI and the tests).
pub async fn call(path: &Path, request: &Request) -> std::io::Result<Response> {
    let stream = tokio::net::UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut reply = String::new();
    BufReader::new(read).read_line(&mut reply).await?;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_rejects_garbage() {
        assert_eq!(
            parse_request(r#"{"op":"add","uid":"u1","netns":"/run/netns/p"}"#),
            Ok(Request::Add {
                uid: "u1".into(),
                netns: "/run/netns/p".into(),
                namespace: None,
                name: None,
                ips: Vec::new(),
            })
        );
        assert_eq!(
            parse_request(
                r#"{"op":"add","uid":"u1","netns":"/run/netns/p","namespace":"shop","name":"web-0","ips":["10.0.0.1"]}"#
            ),
            Ok(Request::Add {
                uid: "u1".into(),
                netns: "/run/netns/p".into(),
                namespace: Some("shop".into()),
                name: Some("web-0".into()),
                ips: vec!["10.0.0.1".parse().expect("ip")],
            })
        );
        assert_eq!(parse_request(r#"{"op":"list"}"#), Ok(Request::List));
        for bad in [
            "",
            "{}",
            "not json",
            r#"{"op":"add","uid":"u1"}"#,
            r#"{"op":"add","uid":"","netns":"/x"}"#,
            r#"{"op":"add","uid":"u","netns":"relative"}"#,
            r#"{"op":"remove","uid":""}"#,
            r#"{"op":"explode"}"#,
            r#"{"op":"add","uid":"u","netns":"/x","extra":1}"#,
            r#"{"op":"add","uid":"u","netns":"/x","namespace":""}"#,
            r#"{"op":"add","uid":"u","netns":"/x","name":"a\nb"}"#,
            r#"{"op":"add","uid":"u","netns":"/x","ips":["nope"]}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }
}
