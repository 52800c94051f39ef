//! The manifest-directory source's file parser: never panics on any UTF-8 text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_ca::source::directory::parse_manifests;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_manifests(text);
    }
});
