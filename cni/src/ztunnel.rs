//! The ztunnel's enrollment socket, seen from the plugin: one JSON request line, one JSON
//! answer line, on a Unix stream socket, every step bounded by the configured timeout.
//!
//! The wire types are `membrane_api::enrollment`'s, the same the ztunnel parses and writes
//! (`ztunnel/src/enroll.rs` serves the socket). The plugin links that serde-only crate, not
//! the ztunnel: it must stay a small synchronous binary on the host.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use membrane_api::enrollment::{PodStatus, Request, Response};

/// Longest answer read (a `list` of every pod of a large node fits easily).
const MAX_REPLY: u64 = 4 * 1024 * 1024;

/// Why a call to the ztunnel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// Nothing listens on the socket (the ztunnel is not running on this node).
    #[error("cannot connect to the ztunnel's enrollment socket {socket}: {source}")]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The ztunnel did not answer within the timeout.
    #[error("the ztunnel at {socket} did not answer within {timeout:?}")]
    Timeout {
        /// The socket.
        socket: PathBuf,
        /// The bound.
        timeout: Duration,
    },
    /// The connection broke, or the answer was not the protocol's.
    #[error("broken exchange with the ztunnel at {socket}: {message}")]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// A client of one ztunnel.
#[derive(Debug, Clone)]
pub struct Ztunnel {
    socket: PathBuf,
    timeout: Duration,
}

// === impl Ztunnel ===

impl Ztunnel {
    /// A client of the ztunnel listening at `socket`; each call is bounded by `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Hands a pod to the ztunnel (a [`Request::Add`]); answers once it is captured (or
    /// remembered as not a mesh workload).
    pub fn add(&self, pod: &Request) -> Result<Response, CallError> {
        self.call(pod)
    }

    /// Tells the ztunnel the pod is gone.
    pub fn remove(
        &self,
        uid: &str,
        netns: Option<&std::path::Path>,
    ) -> Result<Response, CallError> {
        self.call(&Request::Remove {
            uid: uid.to_owned(),
            netns: netns.map(std::path::Path::to_path_buf),
        })
    }

    /// Every pod the ztunnel knows.
    pub fn list(&self) -> Result<Vec<PodStatus>, CallError> {
        let reply = self.call(&Request::List)?;
        if !reply.ok {
            return Err(self.protocol(format!("list refused: {}", reply.error.unwrap_or_default())));
        }
        Ok(reply.pods.unwrap_or_default())
    }

    fn protocol(&self, message: String) -> CallError {
        CallError::Protocol {
            socket: self.socket.clone(),
            message,
        }
    }

    fn io_error(&self, e: std::io::Error) -> CallError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => CallError::Timeout {
                socket: self.socket.clone(),
                timeout: self.timeout,
            },
            _ => self.protocol(e.to_string()),
        }
    }

    /// One request, one answer.
    pub fn call(&self, request: &Request) -> Result<Response, CallError> {
        let stream =
            UnixStream::connect(&self.socket).map_err(|source| CallError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| self.io_error(e))?;
        let mut line = serde_json::to_string(request)
            .map_err(|e| self.protocol(format!("cannot encode the request: {e}")))?;
        line.push('\n');
        (&stream)
            .write_all(line.as_bytes())
            .map_err(|e| self.io_error(e))?;
        let mut answer = String::new();
        BufReader::new((&stream).take(MAX_REPLY))
            .read_line(&mut answer)
            .map_err(|e| self.io_error(e))?;
        if !answer.ends_with('\n') {
            return Err(self.protocol("the answer ended early or is too long".into()));
        }
        serde_json::from_str(&answer).map_err(|e| self.protocol(format!("malformed answer: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-connection server answering `reply` (or nothing, when `None`).
    fn serve_once(
        dir: &Path,
        reply: Option<&'static str>,
    ) -> (PathBuf, std::thread::JoinHandle<String>) {
        let path = dir.join("z.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut request = String::new();
            BufReader::new(&stream)
                .read_line(&mut request)
                .expect("read");
            match reply {
                Some(r) => (&stream).write_all(r.as_bytes()).expect("write"),
                None => std::thread::sleep(Duration::from_millis(500)),
            }
            request
        });
        (path, handle)
    }

    #[test]
    fn sends_one_line_and_reads_the_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, server) = serve_once(dir.path(), Some("{\"ok\":true,\"enrolled\":false}\n"));
        let z = Ztunnel::new(&path, Duration::from_secs(5));
        let ips = ["10.0.0.1".parse().expect("ip")];
        let reply = z
            .add(&Request::Add {
                uid: "u1".into(),
                netns: "/run/netns/p".into(),
                namespace: Some("shop".into()),
                name: None,
                ips: ips.to_vec(),
            })
            .expect("reply");
        assert_eq!(reply.enrolled, Some(false));
        let sent: serde_json::Value =
            serde_json::from_str(&server.join().expect("server")).expect("json");
        assert_eq!(
            sent,
            serde_json::json!({"op":"add","uid":"u1","netns":"/run/netns/p","namespace":"shop","ips":["10.0.0.1"]})
        );
    }

    #[test]
    fn unreachable_and_silent_ztunnels_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let z = Ztunnel::new(dir.path().join("absent.sock"), Duration::from_secs(1));
        assert!(matches!(z.list(), Err(CallError::Unreachable { .. })));
        let (path, server) = serve_once(dir.path(), None);
        let z = Ztunnel::new(&path, Duration::from_millis(100));
        assert!(matches!(
            z.remove("u", None),
            Err(CallError::Timeout { .. })
        ));
        server.join().expect("server");
    }
}
