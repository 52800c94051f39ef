//! SPIFFE ID and trust domain parsing: never panics, and whatever parses is canonical, so it
//! prints back to exactly the input and parses again to an equal value.
#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use membrane_identity::WorkloadIdentity;
use membrane_identity::spiffe_id::{parse_spiffe_id, parse_trust_domain};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(id) = parse_spiffe_id(input) {
        let printed = id.to_string();
        assert_eq!(
            printed, input,
            "parse_spiffe_id accepted a non-canonical ID"
        );
        let again = parse_spiffe_id(&printed).expect("a printed SPIFFE ID must parse again");
        assert_eq!(again, id);
    }

    if let Ok(identity) = WorkloadIdentity::from_str(input) {
        let printed = identity.to_string();
        assert_eq!(
            printed, input,
            "WorkloadIdentity accepted a non-canonical ID"
        );
        let again =
            WorkloadIdentity::from_str(&printed).expect("a printed identity must parse again");
        assert_eq!(again, identity);
        // A workload identity is also a plain SPIFFE ID.
        assert_eq!(
            parse_spiffe_id(input).expect("a workload identity is a SPIFFE ID"),
            *identity.spiffe_id()
        );
    }

    if let Ok(td) = parse_trust_domain(input) {
        let printed = td.to_string();
        assert_eq!(
            printed, input,
            "parse_trust_domain accepted a non-canonical name"
        );
        let again = parse_trust_domain(&printed).expect("a printed trust domain must parse again");
        assert_eq!(again, td);
    }
});
