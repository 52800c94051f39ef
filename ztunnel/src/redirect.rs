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
//!   captured pods in plaintext, as kubelet probes must;
//! - incoming UDP, which is not tunnelled, is dropped and counted (named counter
//!   [`UDP_DROPPED_INBOUND`]) when the pod's namespace refuses plaintext ([`UdpInbound`]):
//!   replies to the pod's own traffic (conntrack established/related, so DNS answers), loopback
//!   and the namespace's `membrane.dev/plaintext-udp-ports` are let through. Outbound UDP
//!   leaves uncaptured.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use membrane_api::ports;

use crate::netns::{NetnsError, PodNetns, ZTUNNEL_MARK};
use crate::state::UdpInbound;

/// The table Membrane owns in each pod namespace.
pub const TABLE: &str = "membrane";

/// The named nft counter of inbound UDP dropped in the pod.
pub const UDP_DROPPED_INBOUND: &str = "udp_dropped_inbound";

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
    /// `nft` printed a counter this code cannot read.
    #[error("unreadable nft counter {counter}: {output:?}")]
    Counter {
        /// The counter.
        counter: &'static str,
        /// What nft printed (at most 200 characters).
        output: String,
    },
}

/// The `input` chain for inbound UDP.
fn udp_chain(udp: &UdpInbound) -> String {
    let UdpInbound::Drop { except } = udp else {
        return String::new();
    };
    let open = if except.is_empty() {
        String::new()
    } else {
        let ports: Vec<String> = except.iter().map(u16::to_string).collect();
        format!("    udp dport {{ {} }} accept\n", ports.join(", "))
    };
    format!(
        "  chain input {{
    type filter hook input priority 0; policy accept;
    iifname \"lo\" accept
    meta l4proto udp ct state established,related accept
{open}    meta l4proto udp counter name \"{UDP_DROPPED_INBOUND}\" drop
  }}
"
    )
}

/// The rule set, replacing any previous version of the table atomically.
pub fn ruleset(udp: &UdpInbound) -> String {
    let udp_chain = udp_chain(udp);
    let (outbound, plaintext, hbone) = (ports::OUTBOUND, ports::INBOUND_PLAINTEXT, ports::HBONE);
    format!(
        "add table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  counter {UDP_DROPPED_INBOUND} {{ }}
{udp_chain}  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {ZTUNNEL_MARK:#x} accept
    oifname \"lo\" accept
    meta l4proto tcp redirect to :{outbound}
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    iifname \"lo\" accept
    ip saddr {PROBE_SOURCE} meta l4proto tcp accept
    tcp dport {hbone} accept
    meta l4proto tcp redirect to :{plaintext}
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

/// Installs (or replaces) the capture rules in the pod's namespace, with `udp` for inbound
/// UDP. Replacing the table resets its counters.
pub async fn install(pod: &PodNetns, udp: &UdpInbound) -> Result<(), RedirectError> {
    let rules = ruleset(udp);
    pod.run(move || nft(rules)).await?
}

/// Reads the packets counted by [`UDP_DROPPED_INBOUND`] in the pod's namespace.
pub async fn udp_dropped(pod: &PodNetns) -> Result<u64, RedirectError> {
    pod.run(|| -> Result<u64, RedirectError> {
        let out = Command::new("nft")
            .args(["list", "counter", "inet", TABLE, UDP_DROPPED_INBOUND])
            .stdin(Stdio::null())
            .output()
            .map_err(RedirectError::Spawn)?;
        if !out.status.success() {
            return Err(RedirectError::Nft(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        parse_packets(&String::from_utf8_lossy(&out.stdout))
    })
    .await?
}

/// The `packets N` of an `nft list counter` output.
fn parse_packets(text: &str) -> Result<u64, RedirectError> {
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| RedirectError::Counter {
            counter: UDP_DROPPED_INBOUND,
            output: text.chars().take(200).collect(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_exempted_before_the_plaintext_capture() {
        let rules = ruleset(&UdpInbound::default());
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

    #[test]
    fn inbound_udp_is_dropped_after_replies_loopback_and_open_ports() {
        let rules = ruleset(&UdpInbound::Drop {
            except: vec![53, 9999],
        });
        let at = |needle: &str| {
            rules
                .find(needle)
                .unwrap_or_else(|| panic!("{needle}: {rules}"))
        };
        let input = at("chain input");
        let lo = at("iifname \"lo\" accept\n    meta l4proto udp");
        let replies = at("meta l4proto udp ct state established,related accept");
        let open = at("udp dport { 53, 9999 } accept");
        let drop = at("meta l4proto udp counter name \"udp_dropped_inbound\" drop");
        assert!(
            input < lo && lo < replies && replies < open && open < drop,
            "{rules}"
        );
        assert!(at("counter udp_dropped_inbound { }") < input);
        // Nothing opened: no empty set (nft refuses one).
        let closed = ruleset(&UdpInbound::default());
        assert!(!closed.contains("udp dport"), "{closed}");
        assert!(closed.contains("counter name \"udp_dropped_inbound\" drop"));
        // A namespace that permits plaintext keeps its UDP; the counter still exists.
        let open = ruleset(&UdpInbound::Accept);
        assert!(!open.contains("chain input") && open.contains("counter udp_dropped_inbound"));
    }

    #[test]
    fn counters_are_read_from_nft_output() {
        let text = "table inet membrane {\n\tcounter udp_dropped_inbound {\n\t\tpackets 12 bytes 480\n\t}\n}\n";
        assert_eq!(parse_packets(text).expect("packets"), 12);
        assert!(parse_packets("table inet membrane {}").is_err());
        assert!(parse_packets("packets lots").is_err());
    }
}
