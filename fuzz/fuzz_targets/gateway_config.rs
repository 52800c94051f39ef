//! Gateway API documents (operator input): parse and validate, build every gateway's routing
//! table against a fixed set of Services (each route accepted or refused on its own), and route
//! a few connections. Never panics; a table routes only to accepted routes and to Services that
//! exist, on their ports, and the wire form of the accepted routes reads back into a table that
//! routes the same, refusing nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_policy::gateway::wire::{from_wire, to_wire};
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
        let built = IngressTable::build(gateway, &config.routes, services);
        let table = &built.table;
        // What the controller streams (the accepted routes only) reads back, on the gateway's
        // side, into the same table, with nothing refused there.
        let attached: Vec<_> = built.accepted.iter().collect();
        let (back, back_routes) =
            from_wire(&to_wire(gateway, &attached)).expect("a valid gateway's wire form reads back");
        let rebuilt = IngressTable::build(&back, &back_routes, services);
        assert!(rebuilt.refused.is_empty(), "accepted routes rebuild");
        assert_eq!(table.ports().collect::<Vec<_>>(), rebuilt.table.ports().collect::<Vec<_>>());
        for port in [443, 9000, 80] {
            for sni in [None, Some("api.models.example"), Some("x.y.example")] {
                assert_eq!(table.route(port, sni), rebuilt.table.route(port, sni));
                if let Ok(target) = table.route(port, sni) {
                    assert!(
                        built.accepted.iter().any(|r| r.key() == target.route),
                        "only accepted routes are routed to"
                    );
                    for b in &target.backends {
                        let ports = services(&b.namespace, &b.service).expect("a known Service");
                        assert!(ports.contains(&b.port));
                    }
                }
            }
        }
    }
});
