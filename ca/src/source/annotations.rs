//! Parsing of the namespace annotations that carry structured operator input (today
//! `membrane.dev/plaintext-udp-ports`). Both sources validate with these parsers, so an
//! invalid value is reported with the annotation's name; what an invalid value means for the
//! mesh (the narrowest reading) is decided by the callers, never here.

/// The namespace annotation naming UDP ports that keep accepting plaintext from anywhere
/// (`"5353,9999"`).
pub const PLAINTEXT_UDP_PORTS_ANNOTATION: &str = "membrane.dev/plaintext-udp-ports";

/// Most ports the annotation may list.
pub const MAX_PLAINTEXT_UDP_PORTS: usize = 64;

/// Longest value accepted (64 five-digit ports with separators and spaces fit).
const MAX_VALUE_LEN: usize = 1024;

/// Why a `membrane.dev/plaintext-udp-ports` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UdpPortsError {
    /// The value is longer than any valid one.
    #[error(
        "annotation {PLAINTEXT_UDP_PORTS_ANNOTATION}: the value is {0} bytes long, more than {MAX_VALUE_LEN}"
    )]
    TooLong(usize),
    /// An item is not a port number.
    #[error(
        "annotation {PLAINTEXT_UDP_PORTS_ANNOTATION}: {item:?} is not a UDP port (expected a comma-separated list of ports 1-65535, e.g. \"5353,9999\")"
    )]
    NotAPort {
        /// The offending item (at most 32 characters of it).
        item: String,
    },
    /// More ports than [`MAX_PLAINTEXT_UDP_PORTS`].
    #[error(
        "annotation {PLAINTEXT_UDP_PORTS_ANNOTATION}: {0} ports listed, at most {MAX_PLAINTEXT_UDP_PORTS} are allowed"
    )]
    TooMany(usize),
}

/// Parses a `membrane.dev/plaintext-udp-ports` value: comma-separated decimal ports 1-65535,
/// spaces around items allowed, an empty value meaning none. Returns them sorted without
/// duplicates. Never panics.
pub fn parse_plaintext_udp_ports(value: &str) -> Result<Vec<u16>, UdpPortsError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(UdpPortsError::TooLong(value.len()));
    }
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut ports = Vec::new();
    for item in value.split(',') {
        let item = item.trim();
        let port = item
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0 && item.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| UdpPortsError::NotAPort {
                item: item.chars().take(32).collect(),
            })?;
        ports.push(port);
    }
    ports.sort_unstable();
    ports.dedup();
    if ports.len() > MAX_PLAINTEXT_UDP_PORTS {
        return Err(UdpPortsError::TooMany(ports.len()));
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_of_ports_parse_sorted_and_deduplicated() {
        assert_eq!(parse_plaintext_udp_ports("5353,9999"), Ok(vec![5353, 9999]));
        assert_eq!(
            parse_plaintext_udp_ports(" 9999 , 53,53,65535"),
            Ok(vec![53, 9999, 65535])
        );
        assert_eq!(parse_plaintext_udp_ports(""), Ok(vec![]));
        assert_eq!(parse_plaintext_udp_ports("  "), Ok(vec![]));
    }

    #[test]
    fn anything_else_is_refused_naming_the_annotation() {
        for bad in [
            "0",
            "65536",
            "-1",
            "+53",
            "53,",
            ",53",
            "53;54",
            "dns",
            "5000-5010",
            "0x35",
            "5 3",
        ] {
            let e = parse_plaintext_udp_ports(bad).expect_err(bad);
            assert!(
                e.to_string().contains(PLAINTEXT_UDP_PORTS_ANNOTATION),
                "{bad}: {e}"
            );
        }
        let many: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
        assert_eq!(
            parse_plaintext_udp_ports(&many.join(",")),
            Err(UdpPortsError::TooMany(65))
        );
        assert!(matches!(
            parse_plaintext_udp_ports(&"1,".repeat(600)),
            Err(UdpPortsError::TooLong(_))
        ));
    }
}
