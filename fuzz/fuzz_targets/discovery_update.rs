//! A discovery update as the controller sends it (`membrane.v1.Update`), applied the way the
//! ztunnel applies it: any bytes decode or fail, any decoded update is applied and built into
//! workloads, Services, policy and a trust bundle, or refused whole — never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_proto::v1::Update;
use membrane_ztunnel::discovery::{apply, build};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(update) = Update::decode(data) else {
        return;
    };
    let td = membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td");
    // As a first message (snapshot or not) and as a delta on top of itself.
    if let Ok(held) = apply(None, &update) {
        let _ = build(&held, &td);
        if let Ok(again) = apply(Some(&held), &update) {
            let _ = build(&again, &td);
        }
    }
});
