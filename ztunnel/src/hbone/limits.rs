//! Bounds on the listening side's handshakes, process-wide and per peer address: a flood of
//! silent connections to 15008 costs at most `max_pending` handshake buffers, and one address
//! at most its share of them.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::HboneError;

/// Bounds on the server's handshakes, for the whole process: how long the TLS and HTTP/2
/// handshakes of one connection may take, and how many run at once. A connection waits for its
/// turn within the same timeout and holds no buffer meanwhile, so a flood of half-open
/// connections costs `max_pending` handshake buffers at most. One peer address may have at
/// most an eighth of `max_pending` in progress (at least one): a pod that floods 15008 with
/// silent connections exhausts its own share, not the node's.
#[derive(Debug, Clone)]
pub struct HandshakeLimits {
    /// Bound on waiting for a turn plus the TLS and HTTP/2 handshakes.
    pub timeout: Duration,
    /// Handshakes in progress at once.
    pub max_pending: usize,
    /// Incremented for each handshake that timed out.
    pub timed_out: prometheus_client::metrics::counter::Counter,
    /// Incremented for each connection refused because its peer address had its share.
    pub peer_refused: prometheus_client::metrics::counter::Counter,
    /// An established connection that carried no tunnel for this long is closed (GOAWAY;
    /// longer than any pool keeps an idle connection, so only a vanished or idling peer
    /// meets it).
    pub idle_timeout: Duration,
    /// Incremented for each established connection closed for being idle.
    pub idle_closed: prometheus_client::metrics::counter::Counter,
}

impl HandshakeLimits {
    /// Handshakes one peer address may have in progress (waiting or running).
    pub fn max_pending_per_peer(&self) -> usize {
        (self.max_pending / 8).max(1)
    }
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_pending: 256,
            timed_out: Default::default(),
            peer_refused: Default::default(),
            idle_timeout: Duration::from_secs(180),
            idle_closed: Default::default(),
        }
    }
}

pub(super) struct Handshakes {
    pub(super) limits: HandshakeLimits,
    pub(super) pending: Arc<tokio::sync::Semaphore>,
    /// Handshakes in progress per peer address (entries at zero are removed).
    per_peer: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

impl Handshakes {
    fn new(limits: HandshakeLimits) -> Self {
        let pending = Arc::new(tokio::sync::Semaphore::new(limits.max_pending.max(1)));
        Self {
            limits,
            pending,
            per_peer: Default::default(),
        }
    }

    /// [`Handshakes::enter`], unless `peer` is `exempt` from the per-address share (then
    /// only the process-wide bound applies).
    pub(super) fn share(
        &'static self,
        peer: IpAddr,
        exempt: bool,
    ) -> Result<Option<PeerHandshake>, HboneError> {
        if exempt {
            return Ok(None);
        }
        self.enter(peer).map(Some)
    }

    /// Counts a handshake for `peer`, or refuses it when that address has its share.
    fn enter(&'static self, peer: IpAddr) -> Result<PeerHandshake, HboneError> {
        let limit = self.limits.max_pending_per_peer();
        let mut counts = crate::lock(&self.per_peer);
        let n = counts.entry(peer).or_insert(0);
        if *n >= limit {
            self.limits.peer_refused.inc();
            return Err(HboneError::PeerHandshakes { peer, limit });
        }
        *n += 1;
        Ok(PeerHandshake { owner: self, peer })
    }
}

/// One peer's handshake in progress; released when dropped.
pub(super) struct PeerHandshake {
    owner: &'static Handshakes,
    peer: IpAddr,
}

impl Drop for PeerHandshake {
    fn drop(&mut self) {
        let mut counts = crate::lock(&self.owner.per_peer);
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

static HANDSHAKES: OnceLock<Handshakes> = OnceLock::new();

/// Sets the process's [`HandshakeLimits`]; only the first call counts (later ones return
/// `false`). Without a call, the defaults apply.
pub fn set_handshake_limits(limits: HandshakeLimits) -> bool {
    HANDSHAKES.set(Handshakes::new(limits)).is_ok()
}

pub(super) fn handshakes() -> &'static Handshakes {
    HANDSHAKES.get_or_init(|| Handshakes::new(HandshakeLimits::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_gets_only_its_share_of_pending_handshakes() {
        let limits = HandshakeLimits {
            max_pending: 16,
            ..HandshakeLimits::default()
        };
        let refused = limits.peer_refused.clone();
        let handshakes: &'static Handshakes = Box::leak(Box::new(Handshakes::new(limits)));
        let attacker: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = handshakes.enter(attacker).expect("first");
        let _second = handshakes.enter(attacker).expect("second");
        assert!(matches!(
            handshakes.enter(attacker),
            Err(HboneError::PeerHandshakes { limit: 2, .. })
        ));
        assert_eq!(refused.get(), 1);
        // Another peer is unaffected; a finished handshake frees its slot.
        let _other = handshakes.enter(other).expect("other peer");
        drop(first);
        let _third = handshakes.enter(attacker).expect("slot freed");
        // An exempt address (this cluster's east-west gateway) is not held to the share.
        assert!(handshakes.share(attacker, false).is_err());
        assert!(matches!(handshakes.share(attacker, true), Ok(None)));
    }
}
