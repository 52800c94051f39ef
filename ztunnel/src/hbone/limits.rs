//! Bounds on the listening side's handshakes, process-wide and per peer address: a flood of
//! silent connections to 15008 costs at most `max_pending` handshake buffers, and one address
//! at most its share of them (a relay of this cluster, which carries many sources, at most
//! half). Under pressure — a connection waiting for a turn — a handshake that has held its
//! turn for `evict_after` (a quarter of the timeout) is closed and its turn given to the
//! waiter: a real handshake takes milliseconds, or a few round trips across a WAN, so a few
//! addresses of silent connections cannot hold every turn for the whole timeout.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

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
    /// While a connection waits for a turn, a handshake that has held one this long is closed
    /// to give it up (the node agent sets a quarter of `timeout`: 2.5 s by default).
    pub evict_after: Duration,
    /// Incremented for each handshake closed that way.
    pub evicted: prometheus_client::metrics::counter::Counter,
}

impl HandshakeLimits {
    /// Handshakes one peer address may have in progress (waiting or running).
    pub fn max_pending_per_peer(&self) -> usize {
        (self.max_pending / 8).max(1)
    }

    /// Handshakes a relay's address (this cluster's east-west gateway) may have in progress:
    /// half of `max_pending`. More than one peer's share, since it speaks for many sources,
    /// but never all of it — the gateway role is a pod label, and a pod that gave itself the
    /// role must not be able to starve every other peer's handshakes.
    pub fn max_pending_per_relay(&self) -> usize {
        (self.max_pending / 2).max(self.max_pending_per_peer())
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
            evict_after: Duration::from_millis(2500),
            evicted: Default::default(),
        }
    }
}

pub(super) struct Handshakes {
    pub(super) limits: HandshakeLimits,
    pub(super) pending: Arc<tokio::sync::Semaphore>,
    /// Handshakes in progress per peer address (entries at zero are removed).
    per_peer: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
    /// Handshakes holding a turn, oldest first: when each took it, and how to close it.
    holders: std::sync::Mutex<BTreeMap<u64, (Instant, Arc<Notify>)>>,
    next_holder: AtomicU64,
}

impl Handshakes {
    fn new(limits: HandshakeLimits) -> Self {
        let pending = Arc::new(tokio::sync::Semaphore::new(limits.max_pending.max(1)));
        Self {
            limits,
            pending,
            per_peer: Default::default(),
            holders: Default::default(),
            next_holder: AtomicU64::new(0),
        }
    }

    /// Waits for a turn to run a handshake. While it waits, it closes the oldest handshake
    /// that has held a turn for `evict_after` (one per check, a check per half of it).
    pub(super) async fn turn(&'static self) -> Turn {
        let acquire = self.pending.clone().acquire_owned();
        tokio::pin!(acquire);
        let permit = loop {
            if self.pending.available_permits() == 0 {
                self.evict_stalled();
            }
            tokio::select! {
                biased;
                // The semaphore is never closed: the error arm cannot happen.
                permit = &mut acquire => break permit.ok(),
                () = tokio::time::sleep(self.limits.evict_after / 2) => {}
            }
        };
        let seq = self.next_holder.fetch_add(1, Ordering::Relaxed);
        let evict = Arc::new(Notify::new());
        crate::lock(&self.holders).insert(seq, (Instant::now(), evict.clone()));
        Turn {
            _permit: permit,
            owner: self,
            seq,
            evict,
        }
    }

    /// Closes the oldest handshake that has held its turn for `evict_after`, if any.
    fn evict_stalled(&self) {
        let mut holders = crate::lock(&self.holders);
        let Some((&seq, (since, _))) = holders.first_key_value() else {
            return;
        };
        if since.elapsed() < self.limits.evict_after {
            return;
        }
        if let Some((_, evict)) = holders.remove(&seq) {
            evict.notify_one();
            self.limits.evicted.inc();
        }
    }

    /// Counts a handshake for `peer` within its share — a relay's
    /// ([`HandshakeLimits::max_pending_per_relay`]) when `relay` — or refuses it.
    pub(super) fn share(
        &'static self,
        peer: IpAddr,
        relay: bool,
    ) -> Result<PeerHandshake, HboneError> {
        let limit = if relay {
            self.limits.max_pending_per_relay()
        } else {
            self.limits.max_pending_per_peer()
        };
        self.enter(peer, limit)
    }

    /// Counts a handshake for `peer`, or refuses it when that address has `limit`.
    fn enter(&'static self, peer: IpAddr, limit: usize) -> Result<PeerHandshake, HboneError> {
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

/// A turn to run a handshake (one of `max_pending`); given back when dropped.
pub(super) struct Turn {
    _permit: Option<OwnedSemaphorePermit>,
    owner: &'static Handshakes,
    seq: u64,
    evict: Arc<Notify>,
}

impl Turn {
    /// Completes when the turn is taken back for a waiting connection.
    pub(super) async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        crate::lock(&self.owner.holders).remove(&self.seq);
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
        let first = handshakes.share(attacker, false).expect("first");
        let _second = handshakes.share(attacker, false).expect("second");
        assert!(matches!(
            handshakes.share(attacker, false),
            Err(HboneError::PeerHandshakes { limit: 2, .. })
        ));
        assert_eq!(refused.get(), 1);
        // Another peer is unaffected; a finished handshake frees its slot.
        let _other = handshakes.share(other, false).expect("other peer");
        drop(first);
        let _third = handshakes.share(attacker, false).expect("slot freed");
    }

    /// Under pressure the oldest turn held past `evict_after` goes to the waiter; without a
    /// waiter nobody is closed.
    #[tokio::test]
    async fn a_waiting_handshake_takes_the_turn_of_a_stalled_one() {
        let limits = HandshakeLimits {
            max_pending: 2,
            evict_after: Duration::from_millis(100),
            ..HandshakeLimits::default()
        };
        let evicted = limits.evicted.clone();
        let handshakes: &'static Handshakes = Box::leak(Box::new(Handshakes::new(limits)));
        let oldest = handshakes.turn().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let younger = handshakes.turn().await;
        // Nobody waits: both keep their turns past `evict_after`.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(evicted.get(), 0);
        let waiter = tokio::spawn(async move { handshakes.turn().await });
        tokio::time::timeout(Duration::from_secs(2), oldest.evicted())
            .await
            .expect("the oldest turn is taken back");
        assert_eq!(evicted.get(), 1);
        drop(oldest);
        let third = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("the waiter gets the turn")
            .expect("join");
        // The younger one was not closed; the third is new, so nothing else is due.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), younger.evicted())
                .await
                .is_err()
        );
        assert_eq!(evicted.get(), 1);
        drop((younger, third));
    }

    /// A relay (this cluster's east-west gateway, or a pod that labelled itself one) may hold
    /// half of the pending handshakes, never the other half.
    #[test]
    fn a_relay_gets_half_of_the_pending_handshakes() {
        let limits = HandshakeLimits {
            max_pending: 16,
            ..HandshakeLimits::default()
        };
        let handshakes: &'static Handshakes = Box::leak(Box::new(Handshakes::new(limits)));
        let relay: IpAddr = "10.0.0.9".parse().expect("ip");
        let held: Vec<_> = (0..8)
            .map(|i| {
                handshakes
                    .share(relay, true)
                    .unwrap_or_else(|e| panic!("{i}: {e}"))
            })
            .collect();
        assert!(matches!(
            handshakes.share(relay, true),
            Err(HboneError::PeerHandshakes { limit: 8, .. })
        ));
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let _other = handshakes
            .share(other, false)
            .expect("another peer still gets its share");
        drop(held);
    }
}
