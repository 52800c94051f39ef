//! The CNI plugin's parsers of what the container runtime hands it: the network configuration
//! on stdin (with its `prevResult`) and `CNI_ARGS`. Never panics; an accepted configuration
//! yields its addresses and a result that is a JSON object carrying a `cniVersion`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_cni::NetConf;
use membrane_cni::env::parse_cni_args;

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = NetConf::parse(data) {
        assert!(conf.pod_ips().is_ok(), "parse validated the addresses");
        let result = conf.result();
        assert!(result["cniVersion"].is_string());
        assert!(membrane_cni::config::declared_version(data).is_some());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_cni_args(text);
    }
});
