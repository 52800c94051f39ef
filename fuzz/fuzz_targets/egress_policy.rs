//! EgressPolicy documents (operator input): parse and validate, then decide a connection
//! against every accepted policy. Never panics; an accepted policy's decision names it when
//! it decides; a deny from an ALLOW's default never names a policy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_policy::Source;
use membrane_policy::egress::{
    EgressReason, EgressRequest, EgressVerdict, decide_egress, parse_egress_policies,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = parse_egress_policies(text) else {
        return;
    };
    let refs: Vec<_> = policies.iter().collect();
    let source = Source {
        principal: "cluster.local/ns/training/sa/trainer",
        namespace: "training",
        service_account: "trainer",
    };
    for (pinned, sni, tls) in [
        (&["huggingface.co"][..], Some("huggingface.co"), true),
        (&[][..], None, false),
        (&["a.hf.co", "paste.example"][..], Some("evil.example"), true),
    ] {
        let req = EgressRequest {
            source,
            ip: "198.51.100.10".parse().expect("ip"),
            port: 443,
            pinned,
            sni,
            tls,
            sni_unreadable: false,
        };
        let d = decide_egress(&refs, &req);
        if d.reason == EgressReason::Matched {
            assert!(d.policy.is_some() && d.rule.is_some());
        }
        if d.verdict == EgressVerdict::Passthrough {
            assert_eq!(d.reason, EgressReason::NoPolicy);
        }
    }
});
