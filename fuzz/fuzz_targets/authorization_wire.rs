//! Compiled policy as a peer sends it (`membrane.v1.Authorization`): any bytes decode or fail,
//! any decoded message converts or is refused — never a panic; what converts re-encodes to
//! the same policy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_policy::policy::Policy;
use membrane_proto::v1::Authorization;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Authorization::decode(data) else {
        return;
    };
    if let Ok(policy) = Policy::try_from(message) {
        let again = Policy::try_from(Authorization::from(&policy)).expect("re-encoded policy");
        assert_eq!(again, policy);
    }
});
