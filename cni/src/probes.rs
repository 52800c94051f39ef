//! The node's kubelet-probe rule: node-originated TCP to a pod leaves with the source
//! 169.254.7.127, which the in-pod capture rules let through to the application.
//!
//! Kubelet probes come from the node itself in plaintext, and a captured pod refuses plaintext
//! (the zero-trust default). Istio's answer, taken here: on the node, SNAT the connections
//! that the node itself originates towards a pod to a link-local address no pod can use as a
//! source; in the pod, exempt that address from capture (`ztunnel/src/redirect.rs`). The rule
//! lives in the node's network namespace, where the plugin runs:
//!
//! ```text
//! table ip membrane-probes {
//!   set pods { type ipv4_addr; }               # pod IPs, added on ADD, removed on DEL
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat - 10; policy accept;
//!     ip daddr @pods meta l4proto tcp fib saddr type local snat to 169.254.7.127
//!   }
//! }
//! ```
//!
//! `fib saddr type local` keeps it to connections whose source is one of the node's own
//! addresses, i.e. originated on the node: forwarded traffic (other pods, other nodes) keeps
//! its source, and the kernel drops packets arriving from outside with a local source address
//! (martians), so nothing else can borrow the exemption. The caveat Istio has too: *anything*
//! running in the node's network namespace (host-network pods, node daemons) gets the same
//! exemption. IPv4 only: IPv6 pod addresses are not added (their probes are not exempted).
//!
//! Every change is one `nft -f` transaction, so concurrent plugin runs never see a half-made
//! table; each is idempotent (`add` of what exists is a no-op; the chain is flushed and its
//! one rule re-added; an element is added then deleted to remove it whether or not it was
//! there).

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// The source node-originated connections to pods get: Istio's kubelet-probe address.
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The table in the node's namespace (family `ip`).
pub const TABLE: &str = "membrane-probes";
/// The set of pod addresses in it.
pub const SET: &str = "pods";

/// Why the node's rule could not be changed or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeRuleError {
    /// `nft` is not installed on the node (or not in the runtime's PATH).
    #[error(
        "cannot run nft on the node ({0}); install nftables on the node, or set \"probeExemption\": false in the CNI configuration"
    )]
    Spawn(#[source] std::io::Error),
    /// `nft` refused the change.
    #[error("nft failed: {0}")]
    Nft(String),
}

/// The node-side probe rule, behind a seam so the plugin's logic can be tested without nft.
pub trait ProbeRules {
    /// Makes sure the table, its rule and these addresses are in place.
    fn ensure(&self, pods: &[Ipv4Addr]) -> Result<(), ProbeRuleError>;
    /// Removes these addresses (absent ones and a missing table are fine).
    fn remove(&self, pods: &[Ipv4Addr]) -> Result<(), ProbeRuleError>;
    /// Whether `pod` is in the set.
    fn contains(&self, pod: Ipv4Addr) -> Result<bool, ProbeRuleError>;
}

fn elements(pods: &[Ipv4Addr]) -> String {
    pods.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The transaction that installs the table and adds `pods`.
pub fn ensure_ruleset(pods: &[Ipv4Addr]) -> String {
    let mut text = format!(
        "add table ip {TABLE}
add set ip {TABLE} {SET} {{ type ipv4_addr; }}
add chain ip {TABLE} postrouting {{ type nat hook postrouting priority srcnat - 10; policy accept; }}
flush chain ip {TABLE} postrouting
add rule ip {TABLE} postrouting ip daddr @{SET} meta l4proto tcp fib saddr type local snat to {PROBE_SOURCE}
"
    );
    if !pods.is_empty() {
        text.push_str(&format!(
            "add element ip {TABLE} {SET} {{ {} }}\n",
            elements(pods)
        ));
    }
    text
}

/// The transaction that removes `pods` (whether or not they are there).
pub fn remove_ruleset(pods: &[Ipv4Addr]) -> String {
    let list = elements(pods);
    format!(
        "add element ip {TABLE} {SET} {{ {list} }}\ndelete element ip {TABLE} {SET} {{ {list} }}\n"
    )
}

/// The real rule: `nft` in the plugin's (the node's) network namespace.
#[derive(Debug, Clone, Default)]
pub struct NftProbeRules;

/// Runs `nft ARGS` with `input` on stdin; `Ok(false)` when nft ran and failed.
fn nft(args: &[&str], input: Option<&str>) -> Result<(bool, String), ProbeRuleError> {
    // Runtimes pass their own PATH, which may lack the sbin directories.
    let mut last = None;
    for program in ["nft", "/usr/sbin/nft", "/sbin/nft"] {
        let child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(ProbeRuleError::Spawn(e)),
        };
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .map_err(ProbeRuleError::Spawn)?;
        }
        let out = child.wait_with_output().map_err(ProbeRuleError::Spawn)?;
        return Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Err(ProbeRuleError::Spawn(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "nft not found")
    })))
}

fn apply(ruleset: &str) -> Result<(), ProbeRuleError> {
    match nft(&["-f", "-"], Some(ruleset))? {
        (true, _) => Ok(()),
        (false, stderr) => Err(ProbeRuleError::Nft(stderr)),
    }
}

impl ProbeRules for NftProbeRules {
    fn ensure(&self, pods: &[Ipv4Addr]) -> Result<(), ProbeRuleError> {
        apply(&ensure_ruleset(pods))
    }

    fn remove(&self, pods: &[Ipv4Addr]) -> Result<(), ProbeRuleError> {
        if pods.is_empty() {
            return Ok(());
        }
        // No table, nothing to remove (and no table is created just to be emptied).
        if !nft(&["list", "set", "ip", TABLE, SET], None)?.0 {
            return Ok(());
        }
        apply(&remove_ruleset(pods))
    }

    fn contains(&self, pod: Ipv4Addr) -> Result<bool, ProbeRuleError> {
        let element = format!("{{ {pod} }}");
        Ok(nft(&["get", "element", "ip", TABLE, SET, &element], None)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rulesets_name_the_probe_source_and_the_pods() {
        let pods = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)];
        let text = ensure_ruleset(&pods);
        assert!(text.contains("snat to 169.254.7.127"), "{text}");
        assert!(text.contains("fib saddr type local"), "{text}");
        assert!(
            text.contains("add element ip membrane-probes pods { 10.0.0.2, 10.0.0.3 }"),
            "{text}"
        );
        assert!(!ensure_ruleset(&[]).contains("add element"));
        let text = remove_ruleset(&pods[..1]);
        assert_eq!(
            text,
            "add element ip membrane-probes pods { 10.0.0.2 }\ndelete element ip membrane-probes pods { 10.0.0.2 }\n"
        );
    }
}
