//! The `forwarded` header (RFC 7239) as HBONE uses it: `for="<source ip>"`.
//!
//! The value comes from the peer, so parsing is lenient and total: anything that is not a
//! plain IP address (obfuscated identifiers, `unknown`, garbage) yields `None`, never an error.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The header name.
pub(crate) const FORWARDED: &str = "forwarded";
/// W3C baggage.
pub(crate) const BAGGAGE: &str = "baggage";
/// W3C trace context.
pub(crate) const TRACEPARENT: &str = "traceparent";

/// `for="10.0.0.1"` or `for="[2001:db8::1]"`.
pub fn format_forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for=\"{v4}\""),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The IP address of the `for` parameter of the first forwarded element, if it is one.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    // Proxies append elements; the first one names the original client.
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })?;
    let node = match node.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => node,
    };
    parse_node(node)
}

/// A node: `ip`, `ip:port`, `[ipv6]` or `[ipv6]:port`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = ip.parse().ok()?;
        return (after.is_empty() || after.starts_with(':')).then_some(IpAddr::V6(ip));
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    node.parse::<SocketAddr>().ok().map(|sa| sa.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("test ip"))
    }

    #[test]
    fn formats_per_rfc_7239() {
        assert_eq!(
            format_forwarded_for([10, 0, 0, 1].into()),
            r#"for="10.0.0.1""#
        );
        assert_eq!(
            format_forwarded_for("2001:db8::1".parse().expect("ip")),
            r#"for="[2001:db8::1]""#
        );
    }

    #[test]
    fn round_trips() {
        for s in ["10.1.2.3", "::1", "2001:db8::17", "0.0.0.0"] {
            let addr: IpAddr = s.parse().expect("ip");
            assert_eq!(parse_forwarded_for(&format_forwarded_for(addr)), Some(addr));
        }
    }

    #[test]
    fn accepts_the_spellings_peers_use() {
        assert_eq!(parse_forwarded_for("for=10.0.0.1"), ip("10.0.0.1"));
        assert_eq!(parse_forwarded_for("For=\"10.0.0.1:4711\""), ip("10.0.0.1"));
        assert_eq!(parse_forwarded_for("for=\"[::1]:80\""), ip("::1"));
        assert_eq!(
            parse_forwarded_for("proto=http; for=\"10.0.0.2\";by=10.0.0.9"),
            ip("10.0.0.2")
        );
        assert_eq!(
            parse_forwarded_for("for=10.0.0.3, for=10.0.0.4"),
            ip("10.0.0.3")
        );
    }

    #[test]
    fn refuses_what_is_not_an_address() {
        for bad in [
            "",
            "for=",
            "for=unknown",
            "for=_hidden",
            "for=\"10.0.0.1",
            "for=\"[::1\"",
            "for=\"[10.0.0.1]\"",
            "for=\"[::1]x\"",
            "by=10.0.0.1",
            "for=\"_x,10.0.0.1\"",
            "for=example.com",
        ] {
            assert_eq!(parse_forwarded_for(bad), None, "{bad:?}");
        }
    }
}
