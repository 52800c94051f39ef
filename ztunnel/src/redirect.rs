//! The capture rules installed in each enrolled pod's network namespace.
//!
//! nftables rather than iptables: the whole rule set is one table (`inet membrane`) applied in
//! one atomic transaction and removed with one command, so a pod is never half-captured and
//! removal leaves nothing behind; it coexists with whatever other tables the CNI installs.
//!
//! In the pod's namespace (the `inet` family: IPv4 and IPv6 alike):
//! - locally generated UDP and TCP to port 53, whatever the resolver's address (loopback
//!   included), is redirected to the DNS capture on 15053, except sockets carrying the
//!   ztunnel's mark (its own upstream queries);
//! - locally generated TCP (the application's outbound connections) is redirected to 15001,
//!   except loopback traffic and sockets carrying the ztunnel's mark;
//! - locally generated UDP that leaves the pod (not DNS — redirected to a local address —,
//!   not to any local address, not the ztunnel's) is
//!   counted ([`UDP_EGRESS`]) and each new flow's destination and port is added to the sets
//!   [`UDP_FLOWS4`] / [`UDP_FLOWS6`] (entries expire after [`UDP_FLOW_TIMEOUT_S`]), which
//!   [`crate::udp`] reads into metrics and one record per new flow. In a pod an ALLOW
//!   EgressPolicy selects ([`PodRules::egress_locked`]) everything the capture cannot decide
//!   — UDP other than DNS, any protocol but TCP, either family — is dropped first and counted
//!   ([`EGRESS_DROPPED`]); replies of accepted flows and IPv6 neighbour discovery pass;
//! - incoming TCP is redirected to 15006 (plaintext capture), except HBONE (15008),
//!   loopback, and kubelet probes: TCP from [`PROBE_SOURCE`] (169.254.7.127) goes to the
//!   application uncaptured. Only the node can send from that address: the CNI plugin SNATs
//!   the connections the node itself opens towards its pods to it (`cni/src/probes.rs`), the
//!   same scheme as Istio's. Anything in the node's network namespace therefore reaches
//!   captured pods in plaintext, as kubelet probes must;
//! - what needs no connection tracking skips it (raw priority, before conntrack): the
//!   ztunnel's own TCP leaving the pod (its mark: tunnels it opens, answers on the tunnels
//!   the marked HBONE listener accepted, passthroughs) and what arrives for it — TCP to 15008
//!   (which `prerouting` lets through uncaptured anyway) and TCP but a bare SYN for a socket
//!   carrying the mark (nft's `socket mark`) —, and loopback TCP except to or from port 53 and
//!   the captures (15001, 15006, 15053): nothing else on loopback is redirected, and only the
//!   captures read a connection's original destination from conntrack. A bare SYN from the
//!   network is always tracked, so it is redirected as before even to a listener a pod marked
//!   itself (any pod with `CAP_NET_RAW` can): no sender outside the pod opens a connection
//!   that skips the redirect but towards 15008. (A pod with `CAP_NET_RAW` can still work
//!   against its own capture — marked outgoing sockets, forged SYNs on its loopback — as
//!   before; docs/design.md says how far these rules go.);
//! - incoming UDP, which is not tunnelled, is dropped and counted (named counter
//!   [`UDP_DROPPED_INBOUND`]) when the pod's namespace refuses plaintext ([`UdpInbound`]):
//!   replies to the pod's own traffic (conntrack established/related, so DNS answers), loopback
//!   and the namespace's `membrane.dev/plaintext-udp-ports` are let through. Outbound UDP
//!   leaves uncaptured. Other protocols than TCP, UDP and ICMP (SCTP, UDP-Lite, …), which no
//!   listener of the ztunnel sees, are dropped and counted the same way in such a namespace
//!   unless they answer the pod's own traffic: a plaintext-refusing pod takes no
//!   unauthenticated traffic by any protocol.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use membrane_api::ports;

use crate::netns::{NetnsError, PodNetns, ZTUNNEL_MARK};
pub use crate::state::PodRules;
use crate::state::UdpInbound;

/// The table Membrane owns in each pod namespace.
pub const TABLE: &str = "membrane";

/// The named nft counter of inbound UDP dropped in the pod.
pub const UDP_DROPPED_INBOUND: &str = "udp_dropped_inbound";
/// The named nft counter of UDP packets leaving the pod (DNS excepted).
pub const UDP_EGRESS: &str = "udp_egress";
/// The named nft counter of packets dropped leaving a pod whose egress is locked (an ALLOW
/// EgressPolicy selects it): UDP other than DNS, and anything else that is neither TCP (which
/// is captured) nor IPv6 neighbour discovery.
pub const EGRESS_DROPPED: &str = "egress_dropped";
/// The set of IPv4 UDP flows (destination . port) leaving the pod.
pub const UDP_FLOWS4: &str = "udp_flows4";
/// The set of IPv6 UDP flows (destination . port) leaving the pod.
pub const UDP_FLOWS6: &str = "udp_flows6";
/// Seconds a UDP flow stays in its set after its last new conntrack entry.
pub const UDP_FLOW_TIMEOUT_S: u32 = 600;
/// Most flows each set holds (further new flows are still counted, not recorded).
pub const UDP_FLOW_SET_SIZE: u32 = 4096;

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

/// The `input` chain for inbound UDP and the protocols no listener sees.
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
    meta l4proto {{ tcp, icmp, ipv6-icmp }} accept
    ct state established,related accept
    counter name \"{UDP_DROPPED_INBOUND}\" drop
  }}
"
    )
}

/// The rules of the `egress` chain that drop what a locked pod may not send uncaptured:
/// replies of flows the pod accepted stay allowed, as does IPv6 neighbour discovery (without
/// which no IPv6 works on the link) and TCP (every new TCP connection was redirected to the
/// capture before this chain sees it).
fn egress_lock(locked: bool) -> String {
    if !locked {
        return String::new();
    }
    format!(
        "    ct direction reply accept
    meta l4proto tcp accept
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept
    counter name \"{EGRESS_DROPPED}\" drop
"
    )
}

/// The rule set, replacing any previous version of the table atomically.
pub fn ruleset(rules: &PodRules) -> String {
    let udp_chain = udp_chain(&rules.udp);
    let egress_lock = egress_lock(rules.egress_locked);
    let (outbound, plaintext, hbone) = (ports::OUTBOUND, ports::INBOUND_PLAINTEXT, ports::HBONE);
    let dns = ports::DNS;
    // Loopback ports whose connections need conntrack: DNS (redirected to its capture on
    // loopback too) and the captures, which read the original destination from it.
    let tracked = format!("53, {outbound}, {plaintext}, {dns}");
    let flows = |name: &str, family: &str| {
        format!(
            "  set {name} {{ type {family} . inet_service; flags dynamic,timeout; timeout {UDP_FLOW_TIMEOUT_S}s; size {UDP_FLOW_SET_SIZE}; }}\n"
        )
    };
    let (flows4, flows6) = (
        flows(UDP_FLOWS4, "ipv4_addr"),
        flows(UDP_FLOWS6, "ipv6_addr"),
    );
    format!(
        "add table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  counter {UDP_DROPPED_INBOUND} {{ }}
  counter {UDP_EGRESS} {{ }}
  counter {EGRESS_DROPPED} {{ }}
{flows4}{flows6}{udp_chain}  chain untracked_out {{
    type filter hook output priority raw; policy accept;
    meta l4proto tcp meta mark {ZTUNNEL_MARK:#x} oifname != \"lo\" notrack
    oifname \"lo\" tcp dport != {{ {tracked} }} tcp sport != {{ {tracked} }} notrack
  }}
  chain untracked_in {{
    type filter hook prerouting priority raw; policy accept;
    iifname \"lo\" accept
    tcp dport {hbone} notrack accept
    tcp flags & (syn | ack) != syn socket mark {ZTUNNEL_MARK:#x} notrack
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {ZTUNNEL_MARK:#x} accept
    udp dport 53 redirect to :{dns}
    tcp dport 53 redirect to :{dns}
    oifname \"lo\" accept
    meta l4proto tcp redirect to :{outbound}
  }}
  chain egress {{
    type filter hook output priority 0; policy accept;
    meta mark {ZTUNNEL_MARK:#x} accept
    oifname \"lo\" accept
    fib daddr type local accept
{egress_lock}    meta l4proto udp counter name \"{UDP_EGRESS}\"
    meta nfproto ipv4 meta l4proto udp ct state new update @{UDP_FLOWS4} {{ ip daddr . udp dport }}
    meta nfproto ipv6 meta l4proto udp ct state new update @{UDP_FLOWS6} {{ ip6 daddr . udp dport }}
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

/// Installs (or replaces) the capture rules in the pod's namespace. Replacing the table
/// resets its counters.
pub async fn install(pod: &PodNetns, rules: &PodRules) -> Result<(), RedirectError> {
    let rules = ruleset(rules);
    pod.run(move || nft(rules)).await?
}

/// What the pod's table has counted and collected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpObserved {
    /// Packets counted by [`UDP_DROPPED_INBOUND`].
    pub dropped_inbound: u64,
    /// Packets counted by [`UDP_EGRESS`].
    pub egress: u64,
    /// Packets counted by [`EGRESS_DROPPED`].
    pub egress_dropped: u64,
    /// The flows in [`UDP_FLOWS4`] and [`UDP_FLOWS6`] (destination and port).
    pub flows: Vec<std::net::SocketAddr>,
}

/// Reads the pod's UDP counters and flow sets (one `nft -j list table`).
pub async fn udp_observed(pod: &PodNetns) -> Result<UdpObserved, RedirectError> {
    pod.run(|| -> Result<UdpObserved, RedirectError> {
        let out = Command::new("nft")
            .args(["-j", "list", "table", "inet", TABLE])
            .stdin(Stdio::null())
            .output()
            .map_err(RedirectError::Spawn)?;
        if !out.status.success() {
            return Err(RedirectError::Nft(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        parse_table(&String::from_utf8_lossy(&out.stdout))
    })
    .await?
}

/// Reads counters and flow sets out of `nft -j list table` output.
fn parse_table(text: &str) -> Result<UdpObserved, RedirectError> {
    let unreadable = |counter| RedirectError::Counter {
        counter,
        output: text.chars().take(200).collect(),
    };
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|_| unreadable(UDP_DROPPED_INBOUND))?;
    let items = doc["nftables"]
        .as_array()
        .ok_or_else(|| unreadable(UDP_DROPPED_INBOUND))?;
    let counter = |name: &'static str| {
        items
            .iter()
            .find(|i| i["counter"]["name"] == name)
            .and_then(|i| i["counter"]["packets"].as_u64())
            .ok_or_else(|| unreadable(name))
    };
    let mut observed = UdpObserved {
        dropped_inbound: counter(UDP_DROPPED_INBOUND)?,
        egress: counter(UDP_EGRESS)?,
        // Tables installed before the counter existed lack it until the pod's rules are
        // installed again.
        egress_dropped: counter(EGRESS_DROPPED).unwrap_or(0),
        flows: Vec::new(),
    };
    for set in [UDP_FLOWS4, UDP_FLOWS6] {
        let elems = items
            .iter()
            .find(|i| i["set"]["name"] == set)
            .and_then(|i| i["set"]["elem"].as_array());
        for elem in elems.into_iter().flatten() {
            // Elements with a timeout are wrapped: {"elem": {"val": {"concat": [..]}, ..}}.
            let val = if elem["elem"].is_object() {
                &elem["elem"]["val"]
            } else {
                elem
            };
            let parts = val["concat"].as_array();
            let ip = parts
                .and_then(|p| p.first())
                .and_then(|v| v.as_str())
                .and_then(|v| v.parse().ok());
            let port = parts
                .and_then(|p| p.get(1))
                .and_then(|v| v.as_u64())
                .and_then(|p| u16::try_from(p).ok());
            if let (Some(ip), Some(port)) = (ip, port) {
                observed.flows.push(std::net::SocketAddr::new(ip, port));
            }
        }
    }
    Ok(observed)
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
        let rules = ruleset(&PodRules {
            udp: UdpInbound::default(),
            ..PodRules::default()
        });
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

    /// The body of `chain name { … }` in `rules`.
    fn chain<'a>(rules: &'a str, name: &str) -> &'a str {
        let start = rules
            .find(&format!("chain {name} {{"))
            .unwrap_or_else(|| panic!("no chain {name}: {rules}"));
        let body = &rules[start..];
        &body[..body.find("\n  }").expect("chain end")]
    }

    #[test]
    fn the_ztunnels_own_tcp_and_loopback_outside_the_captures_are_untracked() {
        let rules = ruleset(&PodRules::default());
        let untracking = |name: &str| {
            let body = chain(&rules, name);
            assert!(body.contains("priority raw;"), "{body}");
            body.lines()
                .skip(2)
                .map(|l| l.trim().to_owned())
                .collect::<Vec<_>>()
        };
        // Loopback TCP is never redirected but to the DNS capture (port 53); the captures
        // (15001, 15006, 15053) read each connection's original destination from conntrack,
        // also when a pod dials them directly over loopback (to be refused as a loop).
        assert_eq!(
            untracking("untracked_out"),
            [
                "meta l4proto tcp meta mark 0x539 oifname != \"lo\" notrack",
                "oifname \"lo\" tcp dport != { 53, 15001, 15006, 15053 } \
                 tcp sport != { 53, 15001, 15006, 15053 } notrack",
            ]
        );
        // Inbound, never by a source port (a sender chooses it), and by a socket mark (a pod
        // with CAP_NET_RAW chooses it) never for a bare SYN: no sender outside the pod starts
        // an untracked connection but to 15008, which `prerouting` lets through anyway.
        assert_eq!(
            untracking("untracked_in"),
            [
                "iifname \"lo\" accept",
                "tcp dport 15008 notrack accept",
                "tcp flags & (syn | ack) != syn socket mark 0x539 notrack",
            ]
        );
        assert!(
            chain(&rules, "prerouting").contains("tcp dport 15008 accept"),
            "{rules}"
        );
        // …and the nat chain's redirects before its loopback exemption are port 53's only.
        let mut loopback_exempt = false;
        for line in chain(&rules, "output").lines().map(str::trim) {
            loopback_exempt |= line == "oifname \"lo\" accept";
            if line.contains("redirect") {
                assert!(loopback_exempt || line.contains("dport 53 "), "{line}");
            }
        }
        assert!(loopback_exempt, "{rules}");
        assert_eq!(rules.matches("notrack").count(), 4, "{rules}");
    }

    #[test]
    fn inbound_udp_is_dropped_after_replies_loopback_and_open_ports() {
        let rules = ruleset(&PodRules {
            udp: UdpInbound::Drop {
                except: vec![53, 9999],
            },
            ..PodRules::default()
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
        let closed = ruleset(&PodRules {
            udp: UdpInbound::default(),
            ..PodRules::default()
        });
        let input_chain = &closed[closed.find("chain input").expect("input")..];
        let input_chain = &input_chain[..input_chain.find("  }").expect("end")];
        assert!(!input_chain.contains("udp dport"), "{closed}");
        assert!(closed.contains("counter name \"udp_dropped_inbound\" drop"));
        // A namespace that permits plaintext keeps its UDP; the counter still exists.
        let open = ruleset(&PodRules {
            udp: UdpInbound::Accept,
            ..PodRules::default()
        });
        assert!(!open.contains("chain input") && open.contains("counter udp_dropped_inbound"));
    }

    #[test]
    fn dns_to_any_resolver_is_captured_before_loopback_but_never_the_ztunnels_own() {
        let rules = ruleset(&PodRules {
            udp: UdpInbound::default(),
            ..PodRules::default()
        });
        let at = |needle: &str| {
            rules
                .find(needle)
                .unwrap_or_else(|| panic!("{needle}: {rules}"))
        };
        let output = at("chain output");
        let mark = at("meta mark 0x539 accept\n    udp dport 53");
        let udp = at("udp dport 53 redirect to :15053");
        let tcp = at("tcp dport 53 redirect to :15053");
        let lo = at("oifname \"lo\" accept\n    meta l4proto tcp redirect to :15001");
        assert!(
            output < mark && mark < udp && udp < tcp && tcp < lo,
            "{rules}"
        );
        // Non-DNS UDP leaving the pod is counted and its flows collected, not dropped.
        let egress = at("chain egress");
        assert!(egress < at("counter name \"udp_egress\""));
        assert!(rules.contains("update @udp_flows4 { ip daddr . udp dport }"));
        assert!(rules.contains("update @udp_flows6 { ip6 daddr . udp dport }"));
        assert!(!rules[egress..].contains("drop"), "{rules}");
    }

    #[test]
    fn a_locked_pod_drops_what_the_capture_cannot_decide_after_counting_nothing_else() {
        let open = ruleset(&PodRules::default());
        assert!(
            !open.contains("counter name \"egress_dropped\" drop"),
            "{open}"
        );
        let rules = ruleset(&PodRules {
            egress_locked: true,
            ..PodRules::default()
        });
        let at = |needle: &str| {
            rules
                .find(needle)
                .unwrap_or_else(|| panic!("{needle}: {rules}"))
        };
        let chain = at("chain egress");
        let mark = rules[chain..].find("meta mark").expect("mark") + chain;
        let local = at("fib daddr type local accept");
        let replies = at("ct direction reply accept");
        let tcp = at("meta l4proto tcp accept");
        let nd = at("icmpv6 type { nd-neighbor-solicit");
        let drop = at("counter name \"egress_dropped\" drop");
        assert!(
            chain < mark
                && mark < local
                && local < replies
                && replies < tcp
                && tcp < nd
                && nd < drop,
            "{rules}"
        );
        // DNS was redirected to the local capture in the nat chain, before this one.
        assert!(at("udp dport 53 redirect") < chain);
        assert!(at("counter egress_dropped { }") < chain);
    }

    #[test]
    fn counters_and_flows_are_read_from_nft_json() {
        let text = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "membrane"}},
            {"counter": {"name": "udp_dropped_inbound", "packets": 12, "bytes": 480}},
            {"counter": {"name": "udp_egress", "packets": 3, "bytes": 90}},
            {"counter": {"name": "egress_dropped", "packets": 7, "bytes": 90}},
            {"set": {"name": "udp_flows4", "elem": [{"elem": {"val": {"concat": ["198.51.100.10", 443]}, "expires": 599}}]}},
            {"set": {"name": "udp_flows6", "elem": [{"concat": ["2001:db8::1", 4433]}]}}]}"#;
        let seen = parse_table(text).expect("parses");
        assert_eq!(
            (seen.dropped_inbound, seen.egress, seen.egress_dropped),
            (12, 3, 7)
        );
        assert_eq!(
            seen.flows,
            vec![
                "198.51.100.10:443".parse().expect("addr"),
                "[2001:db8::1]:4433".parse().expect("addr")
            ]
        );
        // Empty sets have no "elem"; a missing counter or garbage is an error.
        let empty = r#"{"nftables": [{"counter": {"name": "udp_dropped_inbound", "packets": 0}},
            {"counter": {"name": "udp_egress", "packets": 0}}, {"set": {"name": "udp_flows4"}}]}"#;
        assert!(parse_table(empty).expect("parses").flows.is_empty());
        assert!(parse_table(r#"{"nftables": []}"#).is_err());
        assert!(parse_table("packets lots").is_err());
    }
}
