//! Typed values a compiled policy matches against: string patterns (principals, namespaces),
//! `ns/sa` service accounts, IP networks and ports — each with its parser and its `matches`.
//!
//! This module owns the syntax of one value and the cost of matching it (no allocation when
//! matching). It must not know about documents, field paths or actions: callers (`validate`
//! and `wire`) attach the path to a parse error, and `eval` decides what an absent attribute
//! means.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use membrane_identity::WorkloadIdentity;
use membrane_identity::spiffe_id::{validate_namespace, validate_service_account};

/// The URI scheme principals may carry; stripped for matching.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// A string pattern as Istio writes them: exact, `prefix*`, `*suffix`, or `*` (any present
/// value).
///
/// Principals are stored **without** the `spiffe://` scheme (`cluster.local/ns/a/sa/b`), the
/// form Istio writes and the form `eval::Source::principal` carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StringMatch {
    /// The whole value.
    Exact(Box<str>),
    /// Values starting with this (non-empty) text.
    Prefix(Box<str>),
    /// Values ending with this (non-empty) text.
    Suffix(Box<str>),
    /// Any value that is present (`*`): for principals, any authenticated peer.
    Any,
}

impl StringMatch {
    /// Whether `value` (a present attribute) matches.
    ///
    /// Principals share long common prefixes (`cluster.local/ns/`), so every comparison
    /// first compares the last eight bytes of the pattern with the corresponding bytes of
    /// the value (one integer comparison), and calls the full comparison only when they are
    /// equal: mismatches, the common case, stay cheap.
    #[inline]
    pub fn matches(&self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            StringMatch::Exact(s) => {
                let s = s.as_bytes();
                v.len() == s.len() && v.last_chunk::<8>() == s.last_chunk::<8>() && v == s
            }
            StringMatch::Prefix(s) => {
                let s = s.as_bytes();
                v.len() >= s.len()
                    && v[..s.len()].last_chunk::<8>() == s.last_chunk::<8>()
                    && v.starts_with(s)
            }
            StringMatch::Suffix(s) => {
                let s = s.as_bytes();
                v.len() >= s.len()
                    && (s.len() < 8 || v.last_chunk::<8>() == s.last_chunk::<8>())
                    && v.ends_with(s)
            }
            StringMatch::Any => true,
        }
    }

    /// Parses a principal pattern: `td/ns/N/sa/S` or `spiffe://td/ns/N/sa/S` (exact; must be
    /// a valid, canonical workload identity), `prefix*`, `*suffix` (lower-case SPIFFE
    /// characters `[a-z0-9._-/]`), or `*`. The `spiffe://` scheme is removed.
    pub fn principal(raw: &str) -> Result<Self, String> {
        let s = raw.strip_prefix(SPIFFE_SCHEME).unwrap_or(raw);
        let fixed = |s: &str| {
            let id = format!("{SPIFFE_SCHEME}{s}");
            WorkloadIdentity::from_str(&id).map(|_| ()).map_err(|e| {
                format!(
                    "{e}; write principals as <trust-domain>/ns/<namespace>/sa/<service-account>"
                )
            })
        };
        parse_pattern(raw, s, fixed, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_' | '/')
        })
    }

    /// Parses a namespace pattern: a Kubernetes namespace name, `prefix*`, `*suffix` or `*`.
    pub fn namespace(raw: &str) -> Result<Self, String> {
        parse_pattern(
            raw,
            raw,
            |s| validate_namespace(s).map_err(|e| e.to_string()),
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
        )
    }
}

/// Shared pattern grammar: `*`, at most one `*`, only first or last; the fixed part checked
/// by `exact` (whole value) or made of `allowed` characters (prefix or suffix).
fn parse_pattern(
    raw: &str,
    s: &str,
    exact: impl Fn(&str) -> Result<(), String>,
    allowed: impl Fn(char) -> bool,
) -> Result<StringMatch, String> {
    if raw.is_empty() {
        return Err("empty value".into());
    }
    if s == "*" {
        return Ok(StringMatch::Any);
    }
    let fragment = |part: &str| -> Result<Box<str>, String> {
        if let Some(bad) = part.chars().find(|c| !allowed(*c)) {
            let why = if bad.is_ascii_uppercase() {
                " (Membrane identities and namespaces are lower case)"
            } else {
                ""
            };
            return Err(format!("character {bad:?} cannot appear here{why}"));
        }
        Ok(part.into())
    };
    match s.matches('*').count() {
        0 => exact(s).map(|()| StringMatch::Exact(s.into())),
        1 => {
            if let Some(suffix) = s.strip_prefix('*') {
                Ok(StringMatch::Suffix(fragment(suffix)?))
            } else if let Some(prefix) = s.strip_suffix('*') {
                // `spiffe://*` is `*` once the scheme is gone.
                if prefix.is_empty() {
                    return Ok(StringMatch::Any);
                }
                Ok(StringMatch::Prefix(fragment(prefix)?))
            } else {
                Err("'*' may only be the first or the last character".into())
            }
        }
        _ => Err("at most one '*' is allowed (as prefix, as suffix, or alone)".into()),
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(s) => write!(f, "{s}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Any => f.write_str("*"),
        }
    }
}

/// A Kubernetes service account written `namespace/name` (no wildcards).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccountRef {
    namespace: Box<str>,
    name: Box<str>,
}

impl ServiceAccountRef {
    /// The namespace part.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a peer in `namespace` with service account `name` is this one.
    #[inline]
    pub fn matches(&self, namespace: &str, name: &str) -> bool {
        *self.name == *name && *self.namespace == *namespace
    }
}

impl FromStr for ServiceAccountRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains('*') {
            return Err("wildcards are not supported in service accounts; write ns/sa".into());
        }
        let Some((ns, sa)) = s.split_once('/') else {
            return Err("expected <namespace>/<service-account>".into());
        };
        validate_namespace(ns).map_err(|e| e.to_string())?;
        validate_service_account(sa).map_err(|e| e.to_string())?;
        Ok(Self {
            namespace: ns.into(),
            name: sa.into(),
        })
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An IP network (`10.0.0.0/8`, `2001:db8::/32`); a bare address is a /32 or /128.
///
/// Always normalised: the address has no bits set past the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// What [`IpNet::parse`] returns besides the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetParse {
    /// The network.
    pub net: IpNet,
    /// The text had address bits set past the prefix (`10.0.0.1/8`); they were cleared.
    pub host_bits_cleared: bool,
}

impl IpNet {
    /// Builds a network from an address and a prefix length, clearing host bits. An
    /// IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) becomes the IPv4 one (`10.0.0.0/8`),
    /// since addresses are compared in their canonical form.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix length {prefix} is longer than {max}"));
        }
        if let IpAddr::V6(v6) = addr
            && prefix >= 96
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Self::new(IpAddr::V4(v4), prefix - 96);
        }
        Ok(Self {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Parses `addr` or `addr/len`; host bits are cleared and reported.
    pub fn parse(s: &str) -> Result<IpNetParse, String> {
        let (addr_text, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("{p:?} is not a prefix length"));
                }
                let p: u8 = p
                    .parse()
                    .map_err(|_| format!("{p:?} is not a prefix length"))?;
                (a, Some(p))
            }
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("{addr_text:?} is not an IPv4 or IPv6 address"))?;
        let full = if addr.is_ipv4() { 32 } else { 128 };
        let net = Self::new(addr, prefix.unwrap_or(full))?;
        let host = Self::new(addr, full)?;
        Ok(IpNetParse {
            net,
            host_bits_cleared: net.addr != host.addr,
        })
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network. IPv4 never matches an IPv6 network and the
    /// reverse; callers pass IPv4-mapped IPv6 addresses through `IpAddr::to_canonical` first.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = mask_bits_u32(self.prefix);
                u32::from(ip) & m == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = mask_bits_u128(self.prefix);
                u128::from(ip) & m == u128::from(net)
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).map(|p| p.net)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask_bits_u32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_bits_u128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask_bits_u32(prefix)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask_bits_u128(prefix)).into()),
    }
}

/// Parses a destination port: a decimal number from 1 to 65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    let bad = || format!("{s:?} is not a port: expected a number from 1 to 65535");
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(p) => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_patterns() {
        let ok = [
            ("*", StringMatch::Any),
            ("spiffe://*", StringMatch::Any),
            (
                "cluster.local/ns/a/sa/b",
                StringMatch::Exact("cluster.local/ns/a/sa/b".into()),
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b",
                StringMatch::Exact("cluster.local/ns/a/sa/b".into()),
            ),
            (
                "cluster.local/ns/a/*",
                StringMatch::Prefix("cluster.local/ns/a/".into()),
            ),
            (
                "spiffe://cluster.local/*",
                StringMatch::Prefix("cluster.local/".into()),
            ),
            ("*/sa/default", StringMatch::Suffix("/sa/default".into())),
        ];
        for (raw, want) in ok {
            assert_eq!(StringMatch::principal(raw).as_ref(), Ok(&want), "{raw}");
        }
        let bad = [
            "",
            "**",
            "*a*",
            "a*b",
            "cluster.local/ns/*/sa/b",
            "cluster.local/ns/a",
            "cluster.local/ns/a/serviceaccount/b",
            "Cluster.local/ns/a/sa/b",
            "cluster.local/ns/A/*",
            "*spiffe://x",
            "cluster.local/ns/a/sa/b c",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://spiffe://cluster.local/ns/a/sa/b",
        ];
        for raw in bad {
            assert!(
                StringMatch::principal(raw).is_err(),
                "{raw:?} must be refused"
            );
        }
        let upper = StringMatch::principal("cluster.local/ns/A*").expect_err("upper");
        assert!(upper.contains("lower case"), "{upper}");
    }

    #[test]
    fn pattern_matching() {
        let p = |s: &str| StringMatch::principal(s).expect("valid");
        assert!(p("cluster.local/ns/a/sa/b").matches("cluster.local/ns/a/sa/b"));
        assert!(!p("cluster.local/ns/a/sa/b").matches("cluster.local/ns/a/sa/bb"));
        assert!(p("cluster.local/ns/a/*").matches("cluster.local/ns/a/sa/x"));
        assert!(!p("cluster.local/ns/a/*").matches("cluster.local/ns/ab/sa/x"));
        assert!(p("*/sa/x").matches("td/ns/a/sa/x"));
        assert!(p("*").matches("anything"));
        assert_eq!(
            p("spiffe://cluster.local/ns/a/*").to_string(),
            "cluster.local/ns/a/*"
        );
        assert_eq!(p("*/sa/x").to_string(), "*/sa/x");
    }

    #[test]
    fn namespace_patterns() {
        assert_eq!(StringMatch::namespace("*"), Ok(StringMatch::Any));
        assert_eq!(
            StringMatch::namespace("team-*"),
            Ok(StringMatch::Prefix("team-".into()))
        );
        assert_eq!(
            StringMatch::namespace("*-prod"),
            Ok(StringMatch::Suffix("-prod".into()))
        );
        for bad in ["", "A", "a_b", "a/b", "-a", "a*b", "**", "a.b*"] {
            assert!(StringMatch::namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn service_accounts() {
        let sa: ServiceAccountRef = "training/trainer".parse().expect("valid");
        assert_eq!((sa.namespace(), sa.name()), ("training", "trainer"));
        assert!(sa.matches("training", "trainer"));
        assert!(!sa.matches("training", "other"));
        assert_eq!(sa.to_string(), "training/trainer");
        for bad in ["trainer", "a/b/c", "A/b", "a/", "/b", "a/*", "*", "a/B"] {
            assert!(bad.parse::<ServiceAccountRef>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ip_networks() {
        let net = |s: &str| IpNet::parse(s).expect("valid");
        let v4 = net("10.1.0.0/16");
        assert!(!v4.host_bits_cleared);
        assert!(v4.net.contains("10.1.200.3".parse().expect("ip")));
        assert!(!v4.net.contains("10.2.0.1".parse().expect("ip")));
        assert!(!v4.net.contains("::ffff:10.1.0.1".parse().expect("ip")));
        let host = net("192.168.1.7");
        assert_eq!(host.net.prefix(), 32);
        assert!(host.net.contains("192.168.1.7".parse().expect("ip")));
        assert!(!host.net.contains("192.168.1.8".parse().expect("ip")));
        let cleared = net("10.1.2.3/8");
        assert!(cleared.host_bits_cleared);
        assert_eq!(cleared.net.to_string(), "10.0.0.0/8");
        let all = net("0.0.0.0/0");
        assert!(all.net.contains("8.8.8.8".parse().expect("ip")));
        let v6 = net("2001:db8::/32");
        assert!(v6.net.contains("2001:db8:1::5".parse().expect("ip")));
        assert!(!v6.net.contains("2001:db9::1".parse().expect("ip")));
        assert!(!v6.net.contains("10.0.0.1".parse().expect("ip")));
        assert!(net("::/0").net.contains("::1".parse().expect("ip")));
        assert_eq!(net("fd00::1").net.prefix(), 128);
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0/8",
            "010.0.0.1",
            "10.0.0.0/8 ",
            "host.example",
            "10.0.0.0/8/8",
            "*",
            "10.0.0.0/0008",
        ] {
            assert!(IpNet::parse(bad).is_err(), "{bad:?}");
        }
        assert!(IpNet::new("10.0.0.0".parse().expect("ip"), 33).is_err());
        let mapped = net("::ffff:10.0.0.0/104");
        assert!(!mapped.host_bits_cleared);
        let mapped = mapped.net;
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(mapped.contains("10.9.9.9".parse().expect("ip")));
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("8080"), Ok(8080));
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("65535"), Ok(65535));
        for bad in [
            "", "0", "65536", "99999999", "-1", "+80", "80 ", "http", "8O", "1.5",
        ] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
    }
}
