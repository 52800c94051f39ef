//! The bootstrap token file parser: never panics, and every token it accepts finds its node.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_ca::node_auth::BootstrapTokens;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(tokens) = BootstrapTokens::parse("fuzz", text) else {
        return;
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        if let (Some(node), Some(token)) = (fields.next(), fields.next()) {
            assert_eq!(tokens.node_for(token), Some(node));
        }
    }
});
