//! The ztunnel's well-known ports, bound inside every enrolled pod's network namespace.
//!
//! The capture rules redirect to them, the listeners bind them, the loop guard refuses them as
//! destinations and peers dial [`HBONE`]. Only the numbers live here.

/// Outbound capture: the pod's own TCP connections are redirected here.
pub const OUTBOUND: u16 = 15001;
/// Inbound plaintext capture: TCP arriving at the pod other than HBONE.
pub const INBOUND_PLAINTEXT: u16 = 15006;
/// Inbound HBONE: mTLS + HTTP/2 CONNECT tunnels from other ztunnels.
pub const HBONE: u16 = 15008;
/// DNS capture (reserved: no application may be reached on it).
pub const DNS: u16 = 15053;

/// Every port the ztunnel owns in an enrolled pod's namespace.
pub const POD_PORTS: [u16; 4] = [OUTBOUND, INBOUND_PLAINTEXT, HBONE, DNS];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_ports_are_distinct_and_complete() {
        let mut ports = POD_PORTS.to_vec();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports, [15001, 15006, 15008, 15053]);
    }
}
