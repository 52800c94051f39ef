//! A pod's inbound HBONE tunnels under caps.
//!
//! Every admitted tunnel is a socket to the pod's application, and one HBONE connection
//! carries up to 128 of them, so the inbound listener's connection caps alone let one peer
//! hold hundreds of thousands of the application's sockets (4096 connections × 128 tunnels). The same caps are therefore counted again in tunnels: a
//! pod holds at most `--pod-max-connections` inbound tunnels at once, and one peer address at
//! most `--pod-max-connections-per-peer` of them — one source pod filling its share leaves the
//! rest of the pod's capacity to the others. Gateways of the mesh that carry many clients'
//! tunnels to one backend are exempt from the per-peer share and limit their own sources: an
//! ingress gateway (its address and its identity), and this cluster's east-west gateway for
//! the tunnels it relays (a federated identity at its address; the role is a pod label, which
//! alone must not lift the share). A CONNECT over a cap is answered 503 and counted in
//! `membrane_listener_connections_refused_total{listener="inbound_tunnels"}`.

use std::net::IpAddr;

use membrane_runtime::listener::{ConnectionCaps, RefusalReason};
use membrane_runtime::slots::{KeyedSlots, Slot};

/// The `listener` label of the tunnel caps' refusals.
pub const INBOUND_TUNNELS: &str = "inbound_tunnels";

/// One pod's open inbound tunnels: in total and per peer address.
#[derive(Debug, Default)]
pub struct TunnelSlots {
    total: KeyedSlots<()>,
    per_peer: KeyedSlots<IpAddr>,
}

/// One tunnel's place under the caps, held until the tunnel ends.
#[derive(Debug)]
pub struct TunnelSlot {
    _peer: Option<Slot<IpAddr>>,
    _total: Slot<()>,
}

impl TunnelSlots {
    /// A place for one more tunnel from `peer` under `caps` (the per-peer part skipped for an
    /// `exempt` peer; `max_per_peer == 0` means no per-peer cap), or the cap it is over.
    pub fn take(
        &self,
        peer: IpAddr,
        exempt: bool,
        caps: ConnectionCaps,
    ) -> Result<TunnelSlot, RefusalReason> {
        let peer_slot = if caps.max_per_peer > 0 && !exempt {
            Some(
                self.per_peer
                    .take(&peer, caps.max_per_peer)
                    .ok_or(RefusalReason::PeerLimit)?,
            )
        } else {
            None
        };
        let total = self
            .total
            .take(&(), caps.max.max(1))
            .ok_or(RefusalReason::ListenerLimit)?;
        Ok(TunnelSlot {
            _peer: peer_slot,
            _total: total,
        })
    }

    /// Tunnels held now: in total, and by `peer`.
    pub fn held(&self, peer: IpAddr) -> (usize, usize) {
        (self.total.held(&()), self.per_peer.held(&peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: ConnectionCaps = ConnectionCaps {
        max: 5,
        max_per_peer: 2,
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_peer_holds_its_share_and_the_pod_its_total() {
        let slots = TunnelSlots::default();
        let a: Vec<TunnelSlot> = (0..2)
            .map(|_| slots.take(ip(1), false, CAPS).expect("within a's share"))
            .collect();
        assert_eq!(
            slots.take(ip(1), false, CAPS).err(),
            Some(RefusalReason::PeerLimit)
        );
        // Another peer still gets in: one peer's flood leaves the rest of the pod's capacity.
        let b = slots.take(ip(2), false, CAPS).expect("another peer");
        let c: Vec<TunnelSlot> = (0..2)
            .map(|_| slots.take(ip(3), false, CAPS).expect("a third peer"))
            .collect();
        assert_eq!(slots.held(ip(1)), (5, 2));
        assert_eq!(
            slots.take(ip(4), false, CAPS).err(),
            Some(RefusalReason::ListenerLimit),
            "the pod's total"
        );
        // A refusal at the total gives its per-peer place back.
        assert_eq!(slots.held(ip(4)), (5, 0));
        drop(a);
        let again = slots.take(ip(1), false, CAPS).expect("a's places freed");
        drop((again, b, c));
        assert_eq!(slots.held(ip(1)), (0, 0), "every place given back");
    }

    #[test]
    fn an_exempt_peer_is_held_only_by_the_total() {
        let slots = TunnelSlots::default();
        let gateway: Vec<TunnelSlot> = (0..5)
            .map(|_| slots.take(ip(9), true, CAPS).expect("a gateway: no share"))
            .collect();
        assert_eq!(
            slots.take(ip(9), true, CAPS).err(),
            Some(RefusalReason::ListenerLimit)
        );
        drop(gateway);
        let unlimited = ConnectionCaps {
            max: 5,
            max_per_peer: 0,
        };
        let held: Vec<TunnelSlot> = (0..5)
            .map(|_| {
                slots
                    .take(ip(1), false, unlimited)
                    .expect("no per-peer cap")
            })
            .collect();
        assert_eq!(slots.held(ip(1)), (5, 0));
        drop(held);
    }
}
