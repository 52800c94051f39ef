//! Where a captured outbound connection goes: the decision, and nothing else.
//!
//! [`route`] takes the mesh state, the source pod and the original destination and returns a
//! [`Route`]: through HBONE to a mesh workload, passed through unchanged, or refused. It is a
//! pure function of its arguments (a Service's endpoint is picked at random among equals),
//! so every case is a table test below. It must not touch a socket, a certificate or a
//! metric: `outbound` does the I/O the route asks for. Egress decisions plug in here.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::guard::SelfDestination;
use crate::state::{MeshState, Protocol, Workload};

/// What to do with one outbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through an HBONE tunnel to `workload`'s ztunnel, for the application at `dst`.
    Hbone {
        /// The destination after Service resolution: the workload's address and port.
        dst: SocketAddr,
        /// The mesh workload that owns `dst`; the tunnel requires its identity.
        workload: Arc<Workload>,
    },
    /// Not a mesh destination: connected to unchanged, from the pod's namespace.
    Passthrough {
        /// The destination (after Service resolution).
        dst: SocketAddr,
        /// The workload at `dst`, if it is known but not in the mesh.
        workload: Option<Arc<Workload>>,
    },
    /// Never relayed: the destination is the ztunnel itself (see [`crate::guard`]).
    Refused {
        /// The destination (after Service resolution).
        dst: SocketAddr,
        /// The workload at `dst`, if known.
        workload: Option<Arc<Workload>>,
        /// Why.
        reason: SelfDestination,
    },
}

impl Route {
    /// The destination the route leads to.
    pub fn dst(&self) -> SocketAddr {
        match self {
            Route::Hbone { dst, .. }
            | Route::Passthrough { dst, .. }
            | Route::Refused { dst, .. } => *dst,
        }
    }

    /// The transport the access record names: `hbone` or `passthrough`.
    pub fn transport(&self) -> &'static str {
        match self {
            Route::Hbone { .. } => "hbone",
            Route::Refused {
                workload: Some(w), ..
            } if w.protocol == Protocol::Hbone => "hbone",
            Route::Passthrough { .. } | Route::Refused { .. } => "passthrough",
        }
    }
}

/// Decides where a connection from `source` to `original_dst` goes. A Service's virtual
/// address is resolved to one of its endpoints first; a mesh workload is reached over HBONE;
/// anything else passes through; the ztunnel's own addresses and ports are refused.
pub fn route(state: &MeshState, source: &Workload, original_dst: SocketAddr) -> Route {
    let (dst, workload) = state.resolve(original_dst);
    let mesh = workload
        .as_ref()
        .is_some_and(|w| w.protocol == Protocol::Hbone);
    if let Err(reason) = crate::guard::check_outbound(dst, &source.ips, mesh) {
        return Route::Refused {
            dst,
            workload,
            reason,
        };
    }
    match workload {
        Some(workload) if mesh => Route::Hbone { dst, workload },
        workload => Route::Passthrough { dst, workload },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ServiceTarget;

    fn td() -> membrane_identity::TrustDomain {
        membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td")
    }

    /// trainer (10.0.0.1) and store (10.0.1.1) in the mesh, legacy (10.0.2.1) reached over
    /// plain TCP; Services: `store` at 10.96.0.1:80 → store:8080, `mixed` at 10.96.0.2:80 →
    /// an address no workload has and store, `empty` at 10.96.0.3:80 with no endpoint.
    fn state() -> MeshState {
        let text = "workloads:\n\
            - {uid: t, name: trainer, namespace: training, serviceAccount: trainer, node: a, ips: [10.0.0.1]}\n\
            - {uid: s, name: store, namespace: data, serviceAccount: store, node: b, ips: [10.0.1.1]}\n\
            - {uid: l, name: legacy, namespace: legacy, node: b, ips: [10.0.2.1], protocol: TCP}\n";
        let mut state = MeshState::parse("f", text, &td()).expect("valid");
        let target = |service: &str, endpoints: &[&str]| ServiceTarget {
            service: service.to_owned(),
            endpoints: endpoints.iter().map(|e| e.parse().expect("addr")).collect(),
        };
        state.add_service(
            addr("10.96.0.1:80"),
            target("data/store", &["10.0.1.1:8080"]),
        );
        state.add_service(
            addr("10.96.0.2:80"),
            target("data/mixed", &["10.0.9.9:8080", "10.0.1.1:8080"]),
        );
        state.add_service(addr("10.96.0.3:80"), target("data/empty", &[]));
        state
    }

    #[test]
    fn a_service_address_goes_to_endpoints_of_its_own_family() {
        let mut state = state();
        let dual = ServiceTarget {
            service: "data/dual".to_owned(),
            endpoints: vec![addr("10.0.1.1:8080"), addr("[fd00::1]:8080")],
        };
        state.add_service(addr("10.96.0.4:80"), dual.clone());
        state.add_service(addr("[fd00:96::4]:80"), dual);
        for _ in 0..50 {
            assert_eq!(state.resolve(addr("10.96.0.4:80")).0, addr("10.0.1.1:8080"));
            assert_eq!(
                state.resolve(addr("[fd00:96::4]:80")).0,
                addr("[fd00::1]:8080")
            );
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn trainer(state: &MeshState) -> Arc<Workload> {
        state.by_uid("t").expect("trainer").clone()
    }

    fn hbone_to(route: &Route) -> Option<(SocketAddr, &str)> {
        match route {
            Route::Hbone { dst, workload } => Some((*dst, workload.name.as_str())),
            _ => None,
        }
    }

    #[test]
    fn a_mesh_workload_is_reached_over_hbone() {
        let s = state();
        let r = route(&s, &trainer(&s), addr("10.0.1.1:8080"));
        assert_eq!(hbone_to(&r), Some((addr("10.0.1.1:8080"), "store")));
        assert_eq!(r.transport(), "hbone");
    }

    #[test]
    fn a_service_address_resolves_to_its_endpoint() {
        let s = state();
        let r = route(&s, &trainer(&s), addr("10.96.0.1:80"));
        assert_eq!(hbone_to(&r), Some((addr("10.0.1.1:8080"), "store")));
    }

    #[test]
    fn a_service_prefers_the_endpoints_of_known_workloads() {
        let s = state();
        for _ in 0..32 {
            let r = route(&s, &trainer(&s), addr("10.96.0.2:80"));
            assert_eq!(hbone_to(&r), Some((addr("10.0.1.1:8080"), "store")));
        }
    }

    #[test]
    fn a_service_without_endpoints_passes_through_unchanged() {
        let s = state();
        let r = route(&s, &trainer(&s), addr("10.96.0.3:80"));
        assert_eq!(
            r,
            Route::Passthrough {
                dst: addr("10.96.0.3:80"),
                workload: None
            }
        );
    }

    #[test]
    fn a_workload_outside_the_mesh_passes_through_with_its_name() {
        let s = state();
        let r = route(&s, &trainer(&s), addr("10.0.2.1:8080"));
        match &r {
            Route::Passthrough { dst, workload } => {
                assert_eq!(*dst, addr("10.0.2.1:8080"));
                assert_eq!(workload.as_ref().map(|w| w.name.as_str()), Some("legacy"));
            }
            other => panic!("expected passthrough, got {other:?}"),
        }
        assert_eq!(r.transport(), "passthrough");
    }

    #[test]
    fn an_unknown_address_passes_through() {
        let s = state();
        let r = route(&s, &trainer(&s), addr("93.184.216.34:443"));
        assert_eq!(
            r,
            Route::Passthrough {
                dst: addr("93.184.216.34:443"),
                workload: None
            }
        );
    }

    #[test]
    fn loopback_and_unspecified_destinations_are_refused() {
        let s = state();
        for dst in [
            "127.0.0.1:8080",
            "127.0.0.1:15001",
            "0.0.0.0:80",
            "[::1]:80",
        ] {
            let r = route(&s, &trainer(&s), addr(dst));
            assert!(matches!(r, Route::Refused { .. }), "{dst}: {r:?}");
        }
    }

    #[test]
    fn the_ztunnel_ports_of_the_pod_itself_are_refused() {
        let s = state();
        for port in [15001, 15006, 15008, 15053] {
            let dst = SocketAddr::new("10.0.0.1".parse().expect("ip"), port);
            let r = route(&s, &trainer(&s), dst);
            assert!(
                matches!(&r, Route::Refused { reason: SelfDestination::ZtunnelPort(d), .. } if *d == dst),
                "{dst}: {r:?}"
            );
            assert_eq!(r.transport(), "hbone", "the pod itself is a mesh workload");
        }
    }

    #[test]
    fn the_ztunnel_ports_of_any_mesh_workload_are_refused() {
        let s = state();
        let r = route(&s, &trainer(&s), addr("10.0.1.1:15008"));
        assert!(matches!(r, Route::Refused { .. }), "{r:?}");
    }

    #[test]
    fn the_same_ports_outside_the_mesh_are_an_application() {
        let s = state();
        for dst in ["10.0.2.1:15008", "93.184.216.34:15001"] {
            let r = route(&s, &trainer(&s), addr(dst));
            assert!(matches!(r, Route::Passthrough { .. }), "{dst}: {r:?}");
        }
    }

    #[test]
    fn the_pod_reaching_its_own_application_port_goes_through_its_tunnel() {
        let s = state();
        let r = route(&s, &trainer(&s), addr("10.0.0.1:8080"));
        assert_eq!(hbone_to(&r), Some((addr("10.0.0.1:8080"), "trainer")));
    }
}
