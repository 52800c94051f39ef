//! What the connection handlers refuse to trust: destinations that are the ztunnel itself,
//! and source addresses the destination cannot verify.
//!
//! The ztunnel listens inside every enrolled pod's namespace (15001, 15006, 15008, 15053).
//! Relaying a connection to one of those listeners, or to loopback in the pod, hands it back to
//! the ztunnel, which relays it again: a loop that exhausts descriptors and memory. Every
//! handler checks its destination here before dialing. The source address used for policy is
//! the TCP peer of the HBONE connection (the source ztunnel dials from inside the source pod);
//! a `forwarded` claim that differs is recorded, never believed. This module only decides and
//! counts; it must not dial, log access records or hold state.

use std::net::{IpAddr, SocketAddr};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The ports the ztunnel owns in every enrolled pod's namespace.
pub use membrane_api::ports::POD_PORTS;

/// A destination the ztunnel refuses because it is, or may be, the ztunnel itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SelfDestination {
    /// 127.0.0.0/8, ::1: inside the pod's namespace this is where the ztunnel listens.
    #[error("{0} is a loopback address (the ztunnel's own listeners are there)")]
    Loopback(SocketAddr),
    /// 0.0.0.0, ::: the kernel treats it as a local address.
    #[error("{0} is an unspecified address")]
    Unspecified(SocketAddr),
    /// A ztunnel port (15001, 15006, 15008, 15053) on a pod's address.
    #[error("{} is a ztunnel port, not an application", .0)]
    ZtunnelPort(SocketAddr),
    /// An inbound destination that is not an address of the pod it arrived for.
    #[error("{0} is not an address of this pod")]
    NotThisPod(SocketAddr),
}

impl SelfDestination {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            SelfDestination::Loopback(_) => "loopback",
            SelfDestination::Unspecified(_) => "unspecified",
            SelfDestination::ZtunnelPort(_) => "ztunnel_port",
            SelfDestination::NotThisPod(_) => "not_this_pod",
        }
    }
}

fn local_kind(dst: SocketAddr) -> Result<(), SelfDestination> {
    let ip = dst.ip().to_canonical();
    if ip.is_loopback() {
        return Err(SelfDestination::Loopback(dst));
    }
    if ip.is_unspecified() {
        return Err(SelfDestination::Unspecified(dst));
    }
    Ok(())
}

/// Checks an outbound destination of a pod whose addresses are `pod_ips`. `mesh` tells
/// whether the destination is a mesh workload (reached over HBONE): on a mesh workload the
/// ztunnel ports are never an application, wherever it runs.
pub fn check_outbound(
    dst: SocketAddr,
    pod_ips: &[IpAddr],
    mesh: bool,
) -> Result<(), SelfDestination> {
    local_kind(dst)?;
    let own = pod_ips.contains(&dst.ip().to_canonical());
    if POD_PORTS.contains(&dst.port()) && (own || mesh) {
        return Err(SelfDestination::ZtunnelPort(dst));
    }
    Ok(())
}

/// Checks an inbound destination (HBONE authority or plaintext original destination) of the
/// pod whose addresses are `pod_ips`: one of its addresses, never a ztunnel port.
pub fn check_inbound(dst: SocketAddr, pod_ips: &[IpAddr]) -> Result<(), SelfDestination> {
    local_kind(dst)?;
    if !pod_ips.contains(&dst.ip().to_canonical()) {
        return Err(SelfDestination::NotThisPod(dst));
    }
    if POD_PORTS.contains(&dst.port()) {
        return Err(SelfDestination::ZtunnelPort(dst));
    }
    Ok(())
}

/// Labels of [`GuardMetrics::refused`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GuardLabels {
    /// `outbound`, `inbound_hbone` or `inbound_plaintext`.
    pub listener: &'static str,
    /// [`SelfDestination::label`].
    pub reason: &'static str,
}

/// Counters of this module.
#[derive(Debug, Clone, Default)]
pub struct GuardMetrics {
    refused: Family<GuardLabels, Counter>,
    forwarded_ignored: Counter,
}

impl GuardMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "self_destination_refused",
            "Connections refused because their destination is the ztunnel itself",
            m.refused.clone(),
        );
        registry.register(
            "hbone_forwarded_ignored",
            "CONNECT requests whose forwarded source differs from the verified TCP peer",
            m.forwarded_ignored.clone(),
        );
        m
    }

    /// Counts a refused self destination.
    pub fn refused(&self, listener: &'static str, why: &SelfDestination) {
        self.refused
            .get_or_create(&GuardLabels {
                listener,
                reason: why.label(),
            })
            .inc();
    }

    /// Counts a `forwarded` claim that was not believed.
    pub fn forwarded_ignored(&self) {
        self.forwarded_ignored.inc();
    }
}

/// The source address an inbound HBONE request is decided on: the TCP peer of the HBONE
/// connection. Returns it and, when the peer's `forwarded` claim differs from it, the claim
/// (recorded, never used for policy).
pub fn hbone_source(peer: IpAddr, forwarded: Option<IpAddr>) -> (IpAddr, Option<IpAddr>) {
    let peer = peer.to_canonical();
    match forwarded.map(|f| f.to_canonical()) {
        Some(claim) if claim != peer => (peer, Some(claim)),
        _ => (peer, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test addr")
    }

    #[test]
    fn outbound_refuses_the_ztunnel_itself() {
        let own: Vec<IpAddr> = vec!["10.1.0.5".parse().expect("ip")];
        for dst in [
            "127.0.0.1:15001",
            "127.9.9.9:80",
            "[::1]:15006",
            "0.0.0.0:15008",
        ] {
            assert!(check_outbound(sa(dst), &own, false).is_err(), "{dst}");
        }
        for port in POD_PORTS {
            let dst = SocketAddr::new(own[0], port);
            assert_eq!(
                check_outbound(dst, &own, false),
                Err(SelfDestination::ZtunnelPort(dst))
            );
            assert!(
                check_outbound(SocketAddr::new([10, 2, 0, 9].into(), port), &[], true).is_err()
            );
        }
        assert!(check_outbound(sa("[::ffff:127.0.0.1]:15001"), &own, false).is_err());
        assert!(check_outbound(sa("10.1.0.5:8080"), &own, true).is_ok());
        assert!(check_outbound(sa("10.2.0.9:15001"), &own, false).is_ok());
    }

    #[test]
    fn inbound_accepts_only_the_pods_application_ports() {
        let own: Vec<IpAddr> = vec!["10.1.0.5".parse().expect("ip")];
        assert!(check_inbound(sa("10.1.0.5:8080"), &own).is_ok());
        for port in POD_PORTS {
            assert!(check_inbound(SocketAddr::new(own[0], port), &own).is_err());
        }
        assert_eq!(
            check_inbound(sa("10.1.0.6:8080"), &own),
            Err(SelfDestination::NotThisPod(sa("10.1.0.6:8080")))
        );
        assert!(check_inbound(sa("127.0.0.1:8080"), &own).is_err());
    }

    #[test]
    fn the_source_is_the_tcp_peer() {
        let peer: IpAddr = "10.1.0.5".parse().expect("ip");
        let other: IpAddr = "10.9.9.9".parse().expect("ip");
        assert_eq!(hbone_source(peer, Some(peer)), (peer, None));
        assert_eq!(hbone_source(peer, None), (peer, None));
        assert_eq!(hbone_source(peer, Some(other)), (peer, Some(other)));
    }
}
