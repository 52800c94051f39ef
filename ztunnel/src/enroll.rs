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
//!
//! Besides the socket's mode, each connection's peer must run as root (`SO_PEERCRED`, uid
//! 0: the CNI plugin runs as root, so does the node's tooling); others get an error line
//! and are closed. At most [`MAX_CONNECTIONS`] connections are served at once; one that
//! sends no complete line for [`IDLE_TIMEOUT`] (or does not take its answer within it) is
//! closed, and so is one whose line is longer than [`MAX_LINE`] (after an error answer:
//! the rest of the line is never read as a request). Each is counted in
//! `membrane_enroll_connections_refused_total{reason}`. A failed `accept` (out of file
//! descriptors) is counted in `membrane_enroll_accept_errors_total` and retried after a pause
//! of 5 ms doubling to 1 s, logged at a bounded rate.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio_util::sync::CancellationToken;

pub use membrane_api::enrollment::{PodStatus, Request, Response};

use membrane_runtime::listener::{AcceptBackoff, LogLimiter};

use crate::pods::{PodInfo, PodRegistry};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Most addresses one `add` may carry.
pub const MAX_IPS: usize = 16;
/// Longest Kubernetes namespace or pod name accepted.
const MAX_NAME: usize = 253;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a connection may take to send a complete request line, or to take an answer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a peer may not use the socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerRefusal {
    /// The peer does not run as root.
    #[error("the enrollment socket serves root (uid 0) only; the peer runs as uid {uid}")]
    NotRoot {
        /// The peer's uid.
        uid: u32,
    },
    /// The peer's credentials could not be read.
    #[error("the enrollment socket could not read the peer's credentials: {0}")]
    Unknown(String),
}

impl PeerRefusal {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotRoot { .. } => "peer_not_root",
            Self::Unknown(_) => "peer_unknown",
        }
    }
}

/// Whether a peer with `uid` (from `SO_PEERCRED`) may use the socket: root only.
pub fn check_peer(uid: u32) -> Result<(), PeerRefusal> {
    if uid == 0 {
        Ok(())
    } else {
        Err(PeerRefusal::NotRoot { uid })
    }
}

/// Labels of the refused-connection counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// Why (`peer_not_root`, `peer_unknown`, `too_many`, `idle`, `line_too_long`).
    pub reason: &'static str,
}

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
    connections_refused: Family<ConnectionLabels, Counter>,
    accept_errors: Counter,
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
        registry.register(
            "enroll_connections_refused",
            "Enrollment connections refused or closed, by reason (peer_not_root, peer_unknown: SO_PEERCRED; too_many: over the cap; idle: no complete line in time; line_too_long)",
            m.connections_refused.clone(),
        );
        registry.register(
            "enroll_accept_errors",
            "Failed accepts on the enrollment socket (out of file descriptors, for one); each is followed by a pause of 5 ms doubling to 1 s",
            m.accept_errors.clone(),
        );
        m
    }

    fn accept_failed(&self) {
        self.accept_errors.inc();
    }

    fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ConnectionLabels { reason })
            .inc();
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
        Err(Request::Remove { uid, .. }) if uid.is_empty() => {
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
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // An accept that fails (out of descriptors: the connection stays pending and the socket
    // readable) is retried after a growing pause, and logged at a bounded rate, not in a loop.
    let mut backoff = AcceptBackoff::default();
    let error_log = LogLimiter::new();
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => {
                    backoff.succeeded();
                    s
                }
                Err(e) => {
                    metrics.accept_failed();
                    let wait = backoff.failed();
                    if let Some(suppressed) = error_log.allow() {
                        tracing::warn!(
                            error = %e,
                            backoff_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                            suppressed,
                            "enrollment accept failed; backing off"
                        );
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            },
        };
        let peer = match stream.peer_cred() {
            Ok(cred) => check_peer(cred.uid()).map(|()| cred),
            Err(e) => Err(PeerRefusal::Unknown(e.to_string())),
        };
        let slot = slots.clone().try_acquire_owned();
        let (pods, cancel, metrics) = (pods.clone(), cancel.clone(), metrics.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let refusal = match (peer, slot) {
                (Err(refusal), _) => {
                    tracing::warn!(reason = refusal.reason(), error = %refusal, "enrollment connection refused");
                    Some((refusal.reason(), refusal.to_string()))
                }
                (Ok(_), Err(_)) => {
                    tracing::warn!(
                        max = MAX_CONNECTIONS,
                        "enrollment connection refused: too many open"
                    );
                    Some((
                        "too_many",
                        format!("too many enrollment connections (at most {MAX_CONNECTIONS})"),
                    ))
                }
                (Ok(_), Ok(_)) => None,
            };
            if let Some((reason, message)) = refusal {
                metrics.connection_refused(reason);
                let _ = answer(&mut write, &Response::error(message)).await;
                return;
            }
            let mut reader = BufReader::new(read);
            let mut line = String::new();
            loop {
                line.clear();
                let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
                let n = tokio::select! {
                    _ = cancel.cancelled() => return,
                    n = tokio::time::timeout(IDLE_TIMEOUT, limited.read_line(&mut line)) => n,
                };
                let (response, last) = match n {
                    Err(_) => {
                        metrics.connection_refused("idle");
                        tracing::debug!("enrollment connection idle; closed");
                        return;
                    }
                    Ok(Ok(0)) => return,
                    Ok(Ok(_)) if line.len() > MAX_LINE => {
                        metrics.connection_refused("line_too_long");
                        tracing::warn!(
                            max = MAX_LINE,
                            "enrollment request line too long; connection closed"
                        );
                        (Response::error("request line too long"), true)
                    }
                    Ok(Ok(_)) => (handle(&pods, &metrics, line.trim()).await, false),
                    Ok(Err(e)) => (Response::error(format!("unreadable request: {e}")), true),
                };
                if !answer(&mut write, &response).await || last {
                    return;
                }
            }
        });
    }
}

/// Writes one response line within [`IDLE_TIMEOUT`]; whether it was written.
async fn answer(write: &mut OwnedWriteHalf, response: &Response) -> bool {
    let Ok(mut out) = serde_json::to_vec(response) else {
        return false;
    };
    out.push(b'\n');
    matches!(
        tokio::time::timeout(IDLE_TIMEOUT, write.write_all(&out)).await,
        Ok(Ok(()))
    )
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
        Err(Request::Remove { uid, netns }) => match pods.remove(&uid, netns.as_deref()).await {
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
    fn only_root_peers_are_served() {
        assert_eq!(check_peer(0), Ok(()));
        for uid in [1, 65534, 1000] {
            let refused = check_peer(uid).expect_err("non-root");
            assert_eq!(refused, PeerRefusal::NotRoot { uid });
            assert_eq!(refused.reason(), "peer_not_root");
            assert!(
                refused.to_string().contains("root (uid 0) only"),
                "{refused}"
            );
        }
    }

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
