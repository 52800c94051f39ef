//! The controller's `membrane.dev/plaintext-udp-ports` annotation parser: never panics; an
//! accepted value is sorted, without duplicates or port 0, and bounded; printing it back as
//! the canonical list parses to the same ports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_ca::source::{MAX_PLAINTEXT_UDP_PORTS, parse_plaintext_udp_ports};

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = std::str::from_utf8(data)
        && let Ok(ports) = parse_plaintext_udp_ports(value)
    {
        assert!(ports.len() <= MAX_PLAINTEXT_UDP_PORTS);
        assert!(ports.windows(2).all(|w| w[0] < w[1]));
        assert!(ports.iter().all(|p| *p > 0));
        let canonical: Vec<String> = ports.iter().map(u16::to_string).collect();
        assert_eq!(parse_plaintext_udp_ports(&canonical.join(",")), Ok(ports));
    }
});
