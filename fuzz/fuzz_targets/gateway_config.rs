//! Gateway API documents (operator input): parse and validate, build every gateway's routing
//! table against a fixed set of Services, and route a few connections. Never panics; a built
//! table routes only to Services that exist, on their ports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_policy::gateway::{IngressTable, parse_gateway_config};

fn services(namespace: &str, name: &str) -> Option<Vec<u16>> {
    match (namespace, name) {
        ("inference", "model-server") => Some(vec![8443, 8080]),
        ("data", "feature-store") => Some(vec![9000]),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = parse_gateway_config(text) else {
        return;
    };
    for gateway in &config.gateways {
        let Ok(table) = IngressTable::build(gateway, &config.routes, services) else {
            continue;
        };
        for port in [443, 9000, 80] {
            for sni in [None, Some("api.models.example"), Some("x.y.example")] {
                if let Ok(target) = table.route(port, sni) {
                    for b in &target.backends {
                        let ports = services(&b.namespace, &b.service).expect("a known Service");
                        assert!(ports.contains(&b.port));
                    }
                }
            }
        }
    }
});
