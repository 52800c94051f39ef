//! The capture rules installed in each enrolled pod's network namespace.
//!
//! nftables rather than iptables: the whole rule set is one table (`inet membrane`) applied in
//! one atomic transaction and removed with one command, so a pod is never half-captured and
//! removal leaves nothing behind; it coexists with whatever other tables the CNI installs.
//!
//! In the pod's namespace:
//! - locally generated TCP (the application's outbound connections) is redirected to 15001,
//!   except loopback traffic and sockets carrying the ztunnel's mark;
//! - incoming TCP is redirected to 15006 (plaintext capture), except HBONE (15008),
//!   loopback, and kubelet probes: TCP from [`PROBE_SOURCE`] (169.254.7.127) goes to the
//!   application uncaptured. Only the node can send from that address: the CNI plugin SNATs
//!   the connections the node itself opens towards its pods to it (`cni/src/probes.rs`), the
//!   same scheme as Istio's. Anything in the node's network namespace therefore reaches
//!   captured pods in plaintext, as kubelet probes must.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::netns::{NetnsError, PodNetns, ZTUNNEL_MARK};

/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE port.
pub const INBOUND_HBONE_PORT: u16 = 15008;

/// The table Membrane owns in each pod namespace.
pub const TABLE: &str = "membrane";

/// The source address of kubelet probes after the node's SNAT (Istio's choice, link-local so
/// no pod can route from it); exempt from capture.
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// Why rules could not be applied or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedirectError {
    /// The namespace worker failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// `nft` could not be run (not installed?).
    #[error("cannot run nft (is the nftables package installed?): {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` rejected the rules.
    #[error("nft failed: {0}")]
    Nft(String),
}

/// The rule set, replacing any previous version of the table atomically.
pub fn ruleset() -> String {
    format!(
        "add table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {ZTUNNEL_MARK:#x} accept
    oifname \"lo\" accept
    meta l4proto tcp redirect to :{OUTBOUND_PORT}
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    iifname \"lo\" accept
    ip saddr {PROBE_SOURCE} meta l4proto tcp accept
    tcp dport {INBOUND_HBONE_PORT} accept
    meta l4proto tcp redirect to :{INBOUND_PLAINTEXT_PORT}
  }}
}}
"
    )
}

fn nft(input: String) -> Result<(), RedirectError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RedirectError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(RedirectError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(RedirectError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RedirectError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Installs (or replaces) the capture rules in the pod's namespace.
pub async fn install(pod: &PodNetns) -> Result<(), RedirectError> {
    pod.run(|| nft(ruleset())).await?
}

/// Removes the capture rules; a missing table is not an error.
pub async fn remove(pod: &PodNetns) -> Result<(), RedirectError> {
    pod.run(|| {
        nft(format!(
            "add table inet {TABLE}\ndelete table inet {TABLE}\n"
        ))
    })
    .await?
}

/// Whether the pod's namespace currently holds Membrane's table.
pub async fn is_installed(pod: &PodNetns) -> Result<bool, RedirectError> {
    pod.run(|| -> Result<bool, RedirectError> {
        let out = Command::new("nft")
            .args(["list", "table", "inet", TABLE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(RedirectError::Spawn)?;
        Ok(out.success())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_exempted_before_the_plaintext_capture() {
        let rules = ruleset();
        let exempt = rules
            .find("ip saddr 169.254.7.127 meta l4proto tcp accept")
            .expect("probe exemption");
        let capture = rules.find("redirect to :15006").expect("plaintext capture");
        assert!(exempt < capture, "{rules}");
        assert!(
            rules.find("chain prerouting").is_some_and(|p| p < exempt),
            "inbound only: {rules}"
        );
    }
}
