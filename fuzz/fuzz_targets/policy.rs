//! The AuthorizationPolicy parser (operator input): never panics on any UTF-8 text; whatever
//! it accepts compiles into an index for a non-default trust domain and can be decided
//! against, for a plaintext, a local and a federated source.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_policy::eval::{Request, Source, decide};
use membrane_policy::{PolicyIndex, parse_policies};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(td) = parse_trust_domain("cluster-a.example") else {
        return;
    };
    if let Ok(checked) = parse_policies(text) {
        let policies = checked.into_iter().map(|c| c.policy);
        let index = PolicyIndex::build_for(policies, "membrane-system", &td);
        let labels = BTreeMap::from([("app".to_owned(), "x".to_owned())]);
        let sources = [
            None,
            Source::from_principal("cluster-a.example/ns/default/sa/x"),
            Source::from_principal("cluster-b.example/ns/default/sa/x"),
        ];
        for source in sources {
            let _ = decide(
                &index,
                &Request {
                    source,
                    source_ip: [10, 0, 0, 1].into(),
                    remote_ip: Some([192, 0, 2, 1].into()),
                    destination_namespace: "default",
                    destination_labels: &labels,
                    destination_ip: [10, 0, 0, 2].into(),
                    destination_port: 8080,
                },
            );
        }
    }
});
