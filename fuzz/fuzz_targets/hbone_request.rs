//! The peer-controlled parts of an HBONE CONNECT request: the `:authority` (address or name) and the
//! `forwarded` header. Never panics; a parsed `forwarded` address formats and parses back to
//! itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_ztunnel::hbone::{
    format_forwarded_for, parse_authority, parse_forwarded_for, parse_named_authority,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (authority, forwarded) = text.split_once('\n').unwrap_or((text, text));
    if let Ok(addr) = parse_authority(Some(authority)) {
        assert_ne!(addr.port(), 0);
    }
    if let Some((host, port)) = parse_named_authority(authority) {
        assert_ne!(port, 0);
        assert!(host.len() <= 253 && host.parse::<std::net::IpAddr>().is_err());
        assert_eq!(
            parse_named_authority(&format!("{host}:{port}")),
            Some((host, port))
        );
    }
    if let Some(ip) = parse_forwarded_for(forwarded) {
        assert_eq!(parse_forwarded_for(&format_forwarded_for(ip)), Some(ip));
    }
});
