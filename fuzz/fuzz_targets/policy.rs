//! The AuthorizationPolicy parser (operator input): never panics on any UTF-8 text; whatever
//! it accepts compiles into an index and can be decided against.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use membrane_policy::eval::{Request, decide};
use membrane_policy::{PolicyIndex, parse_policies};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(checked) = parse_policies(text) {
        let index = PolicyIndex::build(checked.into_iter().map(|c| c.policy), "membrane-system");
        let labels = BTreeMap::from([("app".to_owned(), "x".to_owned())]);
        let _ = decide(
            &index,
            &Request {
                source: None,
                source_ip: [10, 0, 0, 1].into(),
                remote_ip: Some([192, 0, 2, 1].into()),
                destination_namespace: "default",
                destination_labels: &labels,
                destination_ip: [10, 0, 0, 2].into(),
                destination_port: 8080,
            },
        );
    }
});
