//! TCP congestion control on the two kinds of connections a ztunnel touches.
//!
//! In a captured pod every TCP connection of the application runs over the pod's loopback to
//! the ztunnel: its outgoing connections are redirected to the outbound listener, its incoming
//! ones are made by the ztunnel from inside the pod. Congestion control there has nothing to
//! control, but it still costs: with BBR and no `fq` qdisc (loopback has none) the kernel
//! paces every socket with its own timer, one per burst, and the sender sleeps between them.
//! So the ztunnel sets an enrolled pod's default (`net.ipv4.tcp_congestion_control` of its
//! network namespace) once the pod is captured, and back to the node's default before its
//! capture is removed (if it still holds the pod setting — a pod that asked for that same
//! value itself gets the node's back too).
//!
//! `--pod-tcp-congestion` is a list of names in order of preference (`cubic,reno` unless told
//! otherwise; `node` leaves pods alone, including ones an earlier run changed). In a pod's
//! namespace the kernel only takes a name listed in the node's
//! `net.ipv4.tcp_allowed_congestion_control`: by default reno and the kernel's built-in
//! default (cubic on most distributions' kernels; a kernel built with BBR as its default
//! allows "reno bbr"), plus any name made the node's default since; an operator who writes the
//! list replaces it, reno included. So the setting is the first listed name that list allows,
//! read once at start (the list is the node's, seen from every namespace; if it cannot be
//! read, the first name, and each pod's write says); none allowed leaves pods alone, logged
//! and counted. A pod leaving the mesh gets the node's default back if it holds any listed
//! name. The sysctl is written by a thread inside the pod's namespace through
//! `--proc-sys-net` (`/proc/sys/net` shows the reader's namespace; in a container whose own
//! `/proc/sys` is read-only, the host's mounted elsewhere).
//!
//! The connections that do cross the network keep the node's choice: the ztunnel's sockets
//! made inside a pod for HBONE, passthrough and gateways, and the listeners whose peers are
//! remote (HBONE, inbound plaintext), get the node's default by `TCP_CONGESTION`. "The node's
//! default" is read once at start in the ztunnel's own namespace: the node's itself when it
//! runs there, else (a ztunnel pod) the copy its namespace got from the node when it was
//! created, as every pod's namespace does. When the setting chosen already is the node's
//! default, nothing is changed anywhere.
//!
//! None of this decides whether traffic flows: a failure is logged, counted
//! (`membrane_tcp_congestion_errors_total`) and the connection or enrollment goes on with whatever
//! the kernel had.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;

/// `--pod-tcp-congestion`'s default: cubic where a pod may have it, else reno.
pub const DEFAULT_POD: &str = "cubic,reno";
/// `--proc-sys-net`'s default.
pub const DEFAULT_PROC_SYS_NET: &str = "/proc/sys/net";
/// The sysctl holding a network namespace's default congestion control, under `/proc/sys/net`.
const SYSCTL: &str = "ipv4/tcp_congestion_control";
/// The node's list of congestion controls a pod's namespace may choose, under `/proc/sys/net`.
const ALLOWED: &str = "ipv4/tcp_allowed_congestion_control";
/// The kernel's limit on a congestion control name (`TCP_CA_NAME_MAX` less the NUL).
const MAX_NAME: usize = 15;
/// The most names `--pod-tcp-congestion` takes.
const MAX_NAMES: usize = 8;

/// `--pod-tcp-congestion`: congestion controls for enrolled pods in order of preference, or
/// `node` (leave them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodCongestion {
    /// Pods keep what they have (the node's default, unless they changed it).
    Node,
    /// Enrolled pods' default: the first of these the node lets a pod's namespace take.
    Named(Vec<String>),
}

impl FromStr for PodCongestion {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "node" {
            return Ok(Self::Node);
        }
        let names: Vec<&str> = text.split(',').collect();
        if names.len() > MAX_NAMES {
            return Err(format!(
                "{text:?}: at most {MAX_NAMES} congestion control names"
            ));
        }
        let mut list: Vec<String> = Vec::with_capacity(names.len());
        for name in names {
            let valid = !name.is_empty()
                && name.len() <= MAX_NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                return Err(format!(
                    "{name:?} is not a congestion control name (lowercase letters, digits and \
                     '_', at most {MAX_NAME}; several separated by ',') or \"node\""
                ));
            }
            if name == "node" {
                return Err(format!("{text:?}: \"node\" stands alone"));
            }
            if !list.iter().any(|n| n == name) {
                list.push(name.to_owned());
            }
        }
        Ok(Self::Named(list))
    }
}

/// The pod setting: the first of `preferred` that a pod's namespace may take — one the node
/// allows (`allowed`, the node's list) or the node's own default (always allowed). Without the
/// node's list (`None`: it could not be read) the first name, and each pod's write says.
fn choose<'a>(preferred: &'a [String], node: &str, allowed: Option<&str>) -> Option<&'a str> {
    let Some(allowed) = allowed else {
        return preferred.first().map(String::as_str);
    };
    preferred
        .iter()
        .map(String::as_str)
        .find(|name| *name == node || allowed.split_whitespace().any(|a| a == *name))
}

/// What is in force, when pods get something other than the node's default.
#[derive(Debug)]
struct Settings {
    pod: String,
    node: String,
    /// Every listed name but the node's: what a pod leaving the mesh may hold from this run or
    /// from an earlier one that chose another (the node's allowed list changed in between).
    listed: Vec<String>,
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
/// it must be writable for pods' sysctls to be set).
pub fn configure(choice: &PodCongestion, proc_sys_net: &Path) {
    let _ = SETTINGS.set(settle(choice, proc_sys_net));
}

/// What pods get under `choice` on this node, logged; `None` when they are left alone.
fn settle(choice: &PodCongestion, proc_sys_net: &Path) -> Option<Settings> {
    let sysctl = proc_sys_net.join(SYSCTL);
    let PodCongestion::Named(preferred) = choice else {
        tracing::info!(
            pods = "unchanged",
            "TCP congestion control: --pod-tcp-congestion node"
        );
        return None;
    };
    let node = match std::fs::read_to_string(&sysctl) {
        Ok(text) => text.trim().to_owned(),
        Err(e) => {
            errors().inc();
            tracing::warn!(path = %sysctl.display(), error = %e, "cannot read the node's TCP congestion control; pods keep theirs");
            return None;
        }
    };
    let allowed_path = proc_sys_net.join(ALLOWED);
    let allowed = match std::fs::read_to_string(&allowed_path) {
        Ok(text) => Some(text.trim().to_owned()),
        Err(e) => {
            tracing::warn!(path = %allowed_path.display(), error = %e, "cannot read which congestion controls pods may have; trying the first listed");
            None
        }
    };
    let pod = choose(preferred, &node, allowed.as_deref());
    if pod.is_none() {
        errors().inc();
        tracing::warn!(
            node = %node,
            allowed = allowed.as_deref().unwrap_or("unknown"),
            wanted = %preferred.join(","),
            "no congestion control of --pod-tcp-congestion may be a pod's (net.ipv4.tcp_allowed_congestion_control); pods keep the node's"
        );
    }
    let settings = pod.filter(|pod| *pod != node).map(|pod| Settings {
        pod: pod.to_owned(),
        listed: preferred.iter().filter(|n| **n != node).cloned().collect(),
        node: node.clone(),
        sysctl,
    });
    tracing::info!(
        node = %node,
        allowed = allowed.as_deref().unwrap_or("unknown"),
        pods = settings.as_ref().map_or("unchanged", |s| s.pod.as_str()),
        "TCP congestion control"
    );
    settings
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
    /// Written when the sysctl holds something else (enroll) or one of these (unenroll).
    from: Option<Vec<String>>,
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

/// Putting the node's default back in a pod leaving the mesh, if it still holds a listed
/// name (this run's choice, or another an earlier run may have made).
pub(crate) fn unenroll_job() -> Option<PodJob> {
    settings().map(|s| PodJob {
        action: "restore",
        from: Some(s.listed.clone()),
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
            Some(from) => from.iter().any(|f| f == current),
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
        let named = |names: &[&str]| {
            Ok(PodCongestion::Named(
                names.iter().map(|n| (*n).to_owned()).collect(),
            ))
        };
        assert_eq!("node".parse(), Ok(PodCongestion::Node));
        assert_eq!("cubic".parse(), named(&["cubic"]));
        assert_eq!("bbr".parse::<PodCongestion>(), named(&["bbr"]));
        assert_eq!("cubic,reno".parse(), named(&["cubic", "reno"]));
        assert_eq!("reno,reno".parse(), named(&["reno"]));
        assert_eq!(DEFAULT_POD.parse(), named(&["cubic", "reno"]));
        for bad in [
            "",
            "Cubic",
            "cu bic",
            "../../etc",
            "a-b",
            "sixteen_chars_xx",
            "cubic,",
            ",reno",
            "cubic,,reno",
            "cubic, reno",
            "node,reno",
            "a,b,c,d,e,f,g,h,i",
        ] {
            let parsed = bad.parse::<PodCongestion>();
            assert!(parsed.is_err(), "{bad:?}: {parsed:?}");
        }
    }

    #[test]
    fn leaving_restores_any_listed_name_and_nothing_else() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let sysctl = dir.path().join("tcp_congestion_control");
        let job = PodJob {
            action: "restore",
            from: Some(vec!["cubic".to_owned(), "reno".to_owned()]),
            to: "bbr".to_owned(),
            sysctl: sysctl.clone(),
        };
        // This run chose reno, an earlier one cubic: both go back; a pod's own choice stays.
        for (held, after) in [("reno", "bbr"), ("cubic\n", "bbr"), ("htcp", "htcp")] {
            std::fs::write(&sysctl, held)?;
            job.run()?;
            assert_eq!(std::fs::read_to_string(&sysctl)?.trim(), after, "{held:?}");
        }
        Ok(())
    }

    #[test]
    fn the_first_name_a_pod_may_have_is_chosen() {
        let list = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let default = list(&["cubic", "reno"]);
        // A kernel whose default is BBR allows reno and bbr only: cubic is refused in a pod.
        assert_eq!(choose(&default, "bbr", Some("reno bbr")), Some("reno"));
        assert_eq!(
            choose(&default, "bbr", Some("reno cubic bbr")),
            Some("cubic")
        );
        // The node's own default is always allowed; cubic on a cubic node changes nothing.
        assert_eq!(choose(&default, "cubic", Some("reno")), Some("cubic"));
        assert_eq!(
            choose(&list(&["bbr2", "htcp"]), "bbr", Some("reno bbr")),
            None
        );
        assert_eq!(
            choose(&list(&["cub"]), "bbr", Some("reno cubic")),
            None,
            "whole names"
        );
        // Unknown list: the first, and each pod's write tells.
        assert_eq!(choose(&default, "bbr", None), Some("cubic"));
        assert_eq!(choose(&[], "bbr", Some("reno")), None);
    }
}
