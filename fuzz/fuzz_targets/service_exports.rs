//! A federated peer's service export message (`membrane.v1.Exports`), checked the way the
//! importing controller checks it: any bytes decode or fail, any decoded message is accepted
//! or refused whole — never a panic — and accepted names get distinct clusterset addresses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_ca::federation::services::{clusterset_vips, validate};
use membrane_proto::v1::Exports;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(exports) = Exports::decode(data) else {
        return;
    };
    let td = membrane_identity::spiffe_id::parse_trust_domain("cluster-b.example").expect("td");
    if validate(&exports, &td, &[]).is_ok() {
        let names: Vec<String> = (exports.services.iter())
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        let vips = clusterset_vips(names.iter().map(String::as_str));
        assert_eq!(vips.len(), names.len(), "validated names are unique");
    }
});
