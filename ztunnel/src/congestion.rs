//! TCP congestion control on the two kinds of connections a ztunnel touches.
//!
//! In a captured pod every TCP connection of the application runs over the pod's loopback to
//! the ztunnel: its outgoing connections are redirected to the outbound listener, its incoming
//! ones are made by the ztunnel from inside the pod. Congestion control there has nothing to
//! control, but it still costs: with BBR and no `fq` qdisc (loopback has none) the kernel
//! paces every socket with its own timer, one per burst, and the sender sleeps between them.
//! So the ztunnel sets an enrolled pod's default (`net.ipv4.tcp_congestion_control` of its
//! network namespace) to `--pod-tcp-congestion` (`cubic` unless told otherwise; `node` leaves
//! pods alone, including ones an earlier run changed) once the pod is captured, and back to
//! the node's default before its capture is removed (if it still holds the pod setting — a
//! pod that asked for that same value itself gets the node's back too). In a pod's namespace
//! the kernel only takes a name listed in the node's `net.ipv4.tcp_allowed_congestion_control`
//! (cubic and reno by default). The sysctl is written by
//! a thread inside the pod's namespace through `--proc-sys-net` (`/proc/sys/net` shows the
//! reader's namespace; in a container whose own `/proc/sys` is read-only, the host's mounted
//! elsewhere).
//!
//! The connections that do cross the network keep the node's choice: the ztunnel's sockets
//! made inside a pod for HBONE, passthrough and gateways, and the listeners whose peers are
//! remote (HBONE, inbound plaintext), get the node's default by `TCP_CONGESTION`. "The node's
//! default" is read once at start in the ztunnel's own namespace: the node's itself when it
//! runs there, else (a ztunnel pod) the copy its namespace got from the node when it was
//! created, as every pod's namespace does. When it already is the pod setting, nothing is
//! changed anywhere.
//!
//! None of this decides whether traffic flows: a failure is logged, counted
//! (`membrane_tcp_congestion_errors_total`) and the connection or enrollment goes on with whatever
//! the kernel had.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;

/// `--pod-tcp-congestion`'s default.
pub const DEFAULT_POD: &str = "cubic";
/// `--proc-sys-net`'s default.
pub const DEFAULT_PROC_SYS_NET: &str = "/proc/sys/net";
/// The sysctl holding a network namespace's default congestion control, under `/proc/sys/net`.
const SYSCTL: &str = "ipv4/tcp_congestion_control";
/// The kernel's limit on a congestion control name (`TCP_CA_NAME_MAX` less the NUL).
const MAX_NAME: usize = 15;

/// `--pod-tcp-congestion`: a congestion control for enrolled pods, or `node` (leave them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodCongestion {
    /// Pods keep what they have (the node's default, unless they changed it).
    Node,
    /// Enrolled pods' default congestion control.
    Named(String),
}

impl FromStr for PodCongestion {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "node" {
            return Ok(Self::Node);
        }
        let valid = !text.is_empty()
            && text.len() <= MAX_NAME
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(Self::Named(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a congestion control name (lowercase letters, digits and '_', \
                 at most {MAX_NAME}) or \"node\""
            ))
        }
    }
}

/// What is in force, when pods get something other than the node's default.
#[derive(Debug)]
struct Settings {
    pod: String,
    node: String,
    /// The sysctl's file, as this process reaches it.
    sysctl: PathBuf,
}

static SETTINGS: OnceLock<Option<Settings>> = OnceLock::new();

/// Failures to read or set a congestion control, for the whole process; the app registers it
/// as `membrane_tcp_congestion_errors`.
pub fn errors() -> &'static Counter {
    static ERRORS: OnceLock<Counter> = OnceLock::new();
    ERRORS.get_or_init(Counter::default)
}

/// Settles the process's choice; call once at start, in the ztunnel's own network namespace
/// (later calls change nothing). `proc_sys_net` is where `/proc/sys/net` is mounted (`--proc-sys-net`:
/// it must be writable for pods' sysctls to be set). Returns the node's default as read.
pub fn configure(choice: &PodCongestion, proc_sys_net: &Path) -> Option<String> {
    let sysctl = proc_sys_net.join(SYSCTL);
    let node = match (choice, std::fs::read_to_string(&sysctl)) {
        (PodCongestion::Node, _) => None,
        (_, Ok(text)) => Some(text.trim().to_owned()),
        (_, Err(e)) => {
            errors().inc();
            tracing::warn!(path = %sysctl.display(), error = %e, "cannot read the node's TCP congestion control; pods keep theirs");
            None
        }
    };
    let settings = match (choice, &node) {
        (PodCongestion::Named(pod), Some(node)) if pod != node => Some(Settings {
            pod: pod.clone(),
            node: node.clone(),
            sysctl,
        }),
        _ => None,
    };
    tracing::info!(
        node = node.as_deref().unwrap_or("unknown"),
        pods = settings.as_ref().map_or("unchanged", |s| s.pod.as_str()),
        "TCP congestion control"
    );
    let _ = SETTINGS.set(settings);
    node
}

fn settings() -> Option<&'static Settings> {
    SETTINGS.get().and_then(Option::as_ref)
}

/// Gives a socket made inside a pod for a connection across the network the node's
/// congestion control (a no-op unless pods get another one).
pub(crate) fn network_socket(socket: &socket2::Socket) {
    if let Some(s) = settings()
        && let Err(e) = socket.set_tcp_congestion(s.node.as_bytes())
    {
        errors().inc();
        tracing::debug!(congestion = %s.node, error = %e, "cannot set a network socket's congestion control");
    }
}

/// A change to a pod's default congestion control, run on a thread inside the pod's
/// namespace ([`PodJob::run`]); the caller reports the outcome with [`PodJob::report`].
#[derive(Debug)]
pub(crate) struct PodJob {
    action: &'static str,
    /// Written when the sysctl holds something else (enroll) or exactly this (unenroll).
    from: Option<String>,
    to: String,
    sysctl: PathBuf,
}

/// Setting an enrolled pod's default (once it is captured), if pods get one.
pub(crate) fn enroll_job() -> Option<PodJob> {
    settings().map(|s| PodJob {
        action: "set",
        from: None,
        to: s.pod.clone(),
        sysctl: s.sysctl.clone(),
    })
}

/// Putting the node's default back in a pod leaving the mesh, if it still holds the pods'.
pub(crate) fn unenroll_job() -> Option<PodJob> {
    settings().map(|s| PodJob {
        action: "restore",
        from: Some(s.pod.clone()),
        to: s.node.clone(),
        sysctl: s.sysctl.clone(),
    })
}

impl PodJob {
    /// Reads the sysctl and writes it if needed; call from inside the pod's namespace.
    pub(crate) fn run(&self) -> std::io::Result<()> {
        let current = std::fs::read_to_string(&self.sysctl)?;
        let current = current.trim();
        let write = match &self.from {
            None => current != self.to,
            Some(from) => current == from,
        };
        if write {
            std::fs::write(&self.sysctl, &self.to)?;
        }
        Ok(())
    }

    /// Logs and counts a failure (`netns`: the pod's, `error`: why it did not run or failed).
    pub(crate) fn report(&self, netns: &Path, error: Option<String>) {
        let Some(error) = error else { return };
        errors().inc();
        tracing::warn!(netns = %netns.display(), action = self.action, congestion = %self.to, %error, "cannot change the pod's TCP congestion control; it keeps its own");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_node_parse_and_garbage_is_refused() {
        assert_eq!("node".parse(), Ok(PodCongestion::Node));
        assert_eq!(
            "cubic".parse(),
            Ok(PodCongestion::Named("cubic".to_owned()))
        );
        assert_eq!(
            "bbr".parse::<PodCongestion>(),
            Ok(PodCongestion::Named("bbr".to_owned()))
        );
        for bad in [
            "",
            "Cubic",
            "cu bic",
            "../../etc",
            "a-b",
            "sixteen_chars_xx",
        ] {
            assert!(bad.parse::<PodCongestion>().is_err(), "{bad:?}");
        }
    }
}
