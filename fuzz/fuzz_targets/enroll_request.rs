//! The ztunnel's enrollment-socket request parser: never panics; an accepted request
//! serialises and parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_ztunnel::enroll::parse_request;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data)
        && let Ok(request) = parse_request(line)
    {
        let again = serde_json::to_string(&request).expect("serialisable");
        assert_eq!(parse_request(&again), Ok(request));
    }
});
