//! Accepting connections so that a flood cannot hurt the process.
//!
//! Owns what every TCP listener of Membrane's binaries shares: a back-off after accept errors
//! (at the descriptor limit `accept` fails at once, and retrying at once burns a core), a cap on
//! the connections a listener holds (globally and per peer IP — a caller may name relay
//! addresses, e.g. a relay of its own that speaks for many sources, which get half the
//! listener's cap instead of one peer's share; a connection over a cap is accepted and closed
//! at once, counted and logged at a bounded rate);
//! [`crate::idle`] adds an
//! idle timeout to an accepted stream. The counts are `*_listener_*` Prometheus metrics labelled by
//! listener. It must not know what a listener serves: protocol timeouts (HTTP headers, TLS
//! handshakes) belong to the servers that use it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// First wait after a failed `accept`; doubled on each consecutive failure.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait after a failed `accept`.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per listener and kind of event in this interval; the lines left out
/// are counted in the next one (`suppressed`).
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Connections held by every [`GuardedListener`] of the process.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Connections held now by every [`GuardedListener`] of this process.
pub fn open_connections() -> usize {
    OPEN.load(Ordering::Relaxed)
}

// === metrics ===

/// Why a connection was closed right after `accept` (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The listener holds its maximum number of connections.
    ListenerLimit,
    /// The peer IP holds its maximum number of connections on this listener.
    PeerLimit,
    /// The peer IP has its share of the handshakes in progress (HBONE).
    PeerHandshakes,
}

impl RefusalReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ListenerLimit => "listener_limit",
            Self::PeerLimit => "peer_limit",
            Self::PeerHandshakes => "peer_handshakes",
        }
    }
}

impl EncodeLabelValue for RefusalReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// What timed out on an accepted connection (the `stage` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutStage {
    /// A TLS (and, for HBONE, HTTP/2) handshake.
    Handshake,
    /// An HTTP request's headers.
    Header,
    /// Nothing was received (or sent) for the idle timeout.
    Idle,
    /// No call on the connection authenticated in time (the controller's node port).
    Unauthenticated,
    /// A handshake held its turn past the limit while another connection waited for one
    /// (HBONE); its turn was taken back.
    HandshakeEvicted,
}

impl TimeoutStage {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Header => "header",
            Self::Idle => "idle",
            Self::Unauthenticated => "unauthenticated",
            Self::HandshakeEvicted => "handshake_evicted",
        }
    }
}

impl EncodeLabelValue for TimeoutStage {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// `listener` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ListenerLabel {
    /// Which listener (`metrics`, `outbound`, `grpc`, …).
    pub listener: String,
}

/// Labels of the refusal counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    /// Which listener.
    pub listener: String,
    /// Which cap.
    pub reason: RefusalReason,
}

/// Labels of the timeout counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TimeoutLabels {
    /// Which listener.
    pub listener: String,
    /// What timed out.
    pub stage: TimeoutStage,
}

/// Listener metrics, shared by every listener of a process.
#[derive(Debug, Clone, Default)]
pub struct ListenerMetrics {
    refused: Family<RefusedLabels, Counter>,
    accept_errors: Family<ListenerLabel, Counter>,
    timeouts: Family<TimeoutLabels, Counter>,
    open: Family<ListenerLabel, Gauge>,
}

impl ListenerMetrics {
    /// Registers the listener metrics on `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "listener_connections_refused",
            "Connections closed right after accept because a cap was reached, by listener and cap",
            m.refused.clone(),
        );
        registry.register(
            "listener_accept_errors",
            "Failed accept calls (for example at the descriptor limit), by listener; each is followed by a back-off",
            m.accept_errors.clone(),
        );
        registry.register(
            "listener_timeouts",
            "Connections closed because a handshake, request headers or the peer took too long, by listener and stage",
            m.timeouts.clone(),
        );
        registry.register(
            "listener_connections_open",
            "Connections a listener holds now",
            m.open.clone(),
        );
        m
    }

    /// Counts a timeout on `listener`.
    pub fn timed_out(&self, listener: &str, stage: TimeoutStage) {
        self.timeouts
            .get_or_create(&TimeoutLabels {
                listener: listener.to_owned(),
                stage,
            })
            .inc();
    }

    /// The counter of `reason` refusals on `listener` (for a server that counts them itself).
    pub fn refused_counter(&self, listener: &str, reason: RefusalReason) -> Counter {
        self.refused
            .get_or_create(&RefusedLabels {
                listener: listener.to_owned(),
                reason,
            })
            .clone()
    }

    /// The counter of `stage` timeouts on `listener` (for a server that counts them itself).
    pub fn timeout_counter(&self, listener: &str, stage: TimeoutStage) -> Counter {
        self.timeouts
            .get_or_create(&TimeoutLabels {
                listener: listener.to_owned(),
                stage,
            })
            .clone()
    }
}

// === impl LogLimiter ===

/// Lets one log line through per [`LOG_INTERVAL`] and counts the ones it held back.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// A limiter that lets the first line through; `const`, so it can be a `static`.
    pub const fn new() -> Self {
        Self {
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` if a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match *last {
            Some(at) if now.duration_since(at) < LOG_INTERVAL => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

// === impl AcceptBackoff ===

/// Exponential back-off between failed `accept` calls, reset by a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// The wait before the next `accept`, after a failure.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next.unwrap_or(ACCEPT_BACKOFF_MIN);
        self.next = Some((wait * 2).min(ACCEPT_BACKOFF_MAX));
        wait
    }

    /// An `accept` succeeded.
    pub fn succeeded(&mut self) {
        self.next = None;
    }
}

// === impl GuardedListener ===

/// Connection caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// Connections the listener holds at once (at least 1).
    pub max: usize,
    /// Connections one peer IP holds at once; 0: no per-peer cap.
    pub max_per_peer: usize,
}

/// Connections each peer IP holds on one listener.
type PeerCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Says whether a peer address is a relay (one that speaks for many sources and enforces
/// their shares itself): it is held to half the listener's cap instead of the per-peer cap —
/// more than one peer's share, never all of the listener.
pub type RelayPeers = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// A [`RelayPeers`] held by a listener.
struct Relays(RelayPeers);

impl std::fmt::Debug for Relays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayPeers")
    }
}

/// A TCP listener with a back-off after accept errors and connection caps.
#[derive(Debug)]
pub struct GuardedListener {
    listener: TcpListener,
    name: &'static str,
    caps: ConnectionCaps,
    permits: Arc<Semaphore>,
    peers: PeerCounts,
    relays: Option<Relays>,
    metrics: ListenerMetrics,
    backoff: AcceptBackoff,
    error_log: LogLimiter,
    refusal_log: LogLimiter,
}

/// Held for as long as an accepted connection lives: its place under the caps.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    peer: Option<(IpAddr, PeerCounts)>,
    open: Gauge,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.open.dec();
        OPEN.fetch_sub(1, Ordering::Relaxed);
        if let Some((ip, peers)) = self.peer.take() {
            let mut peers = match peers.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if let Some(n) = peers.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    peers.remove(&ip);
                }
            }
        }
    }
}

impl GuardedListener {
    /// Guards `listener`, named `name` in metrics and logs.
    pub fn new(
        listener: TcpListener,
        name: &'static str,
        caps: ConnectionCaps,
        metrics: ListenerMetrics,
    ) -> Self {
        Self {
            listener,
            name,
            caps,
            permits: Arc::new(Semaphore::new(caps.max.max(1))),
            peers: Arc::default(),
            relays: None,
            metrics,
            backoff: AcceptBackoff::default(),
            error_log: LogLimiter::default(),
            refusal_log: LogLimiter::default(),
        }
    }

    /// Holds the addresses `relays` names (asked at every accept) to half the listener's cap
    /// instead of the per-peer cap.
    #[must_use]
    pub fn with_relay_peers(mut self, relays: RelayPeers) -> Self {
        self.relays = Some(Relays(relays));
        self
    }

    /// The listener's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The metrics it counts in.
    pub fn metrics(&self) -> &ListenerMetrics {
        &self.metrics
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection within the caps. Accept errors are counted, logged at a bounded
    /// rate and followed by a back-off; connections over a cap are closed, counted and logged
    /// at a bounded rate. Cancel-safe (a connection is only returned, never lost, once
    /// accepted).
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr, Admission) {
        let label = ListenerLabel {
            listener: self.name.to_owned(),
        };
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(pair) => {
                    self.backoff.succeeded();
                    pair
                }
                Err(e) => {
                    self.metrics.accept_errors.get_or_create(&label).inc();
                    let wait = self.backoff.failed();
                    if let Some(suppressed) = self.error_log.allow() {
                        tracing::warn!(
                            listener = self.name,
                            error = %e,
                            backoff_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                            suppressed,
                            "accept failed; backing off"
                        );
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            match self.admit(peer.ip()) {
                Ok(admission) => return (stream, peer, admission),
                Err(reason) => {
                    drop(stream);
                    self.metrics
                        .refused
                        .get_or_create(&RefusedLabels {
                            listener: self.name.to_owned(),
                            reason,
                        })
                        .inc();
                    if let Some(suppressed) = self.refusal_log.allow() {
                        tracing::warn!(
                            listener = self.name,
                            %peer,
                            reason = reason.as_str(),
                            max = self.caps.max,
                            max_per_peer = self.caps.max_per_peer,
                            suppressed,
                            "connection refused: too many connections"
                        );
                    }
                }
            }
        }
    }

    fn admit(&self, ip: IpAddr) -> Result<Admission, RefusalReason> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| RefusalReason::ListenerLimit)?;
        let relay = self.relays.as_ref().is_some_and(|f| (f.0)(ip));
        let peer = if self.caps.max_per_peer > 0 {
            let share = if relay {
                (self.caps.max / 2).max(self.caps.max_per_peer)
            } else {
                self.caps.max_per_peer
            };
            let mut peers = match self.peers.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let n = peers.entry(ip).or_insert(0);
            if *n >= share {
                return Err(RefusalReason::PeerLimit);
            }
            *n += 1;
            Some((ip, self.peers.clone()))
        } else {
            None
        };
        let open = self
            .metrics
            .open
            .get_or_create(&ListenerLabel {
                listener: self.name.to_owned(),
            })
            .clone();
        open.inc();
        OPEN.fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            _permit: permit,
            peer,
            open,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(waits[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(waits[1], ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(waits[9], ACCEPT_BACKOFF_MAX);
        b.succeeded();
        assert_eq!(b.failed(), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn log_limiter_lets_one_line_per_interval() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(l.allow_at(t0), Some(0));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.allow_at(t0 + Duration::from_secs(2)), None);
        assert_eq!(l.allow_at(t0 + LOG_INTERVAL), Some(2));
    }

    #[tokio::test]
    async fn caps_refuse_over_the_limit_and_free_on_drop() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let metrics = ListenerMetrics::default();
        let mut l = GuardedListener::new(
            tcp,
            "test",
            ConnectionCaps {
                max: 2,
                max_per_peer: 1,
            },
            metrics.clone(),
        );
        let _c1 = TcpStream::connect(addr).await.expect("c1");
        let (_s1, _, a1) = l.accept().await;
        // Same peer IP: over the per-peer cap, closed at once.
        let mut c2 = TcpStream::connect(addr).await.expect("c2");
        let accept = tokio::time::timeout(Duration::from_millis(300), l.accept()).await;
        assert!(
            accept.is_err(),
            "a second connection from one IP is refused"
        );
        let mut byte = [0u8; 1];
        assert_eq!(c2.read(&mut byte).await.unwrap_or(0), 0, "closed");
        let refused = metrics
            .refused
            .get_or_create(&RefusedLabels {
                listener: "test".into(),
                reason: RefusalReason::PeerLimit,
            })
            .get();
        assert_eq!(refused, 1);
        drop(a1);
        let _c3 = TcpStream::connect(addr).await.expect("c3");
        let (_s3, _, _a3) = tokio::time::timeout(Duration::from_secs(2), l.accept())
            .await
            .expect("admitted once the first left");
    }

    /// A connection from `from` (a loopback address) to `addr`.
    async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(from.parse().expect("ip"), 0))
            .expect("bind");
        socket.connect(addr).await.expect("connect")
    }

    #[tokio::test]
    async fn a_relay_gets_half_the_listener_and_the_others_keep_the_rest() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let mut l = GuardedListener::new(
            tcp,
            "test",
            ConnectionCaps {
                max: 4,
                max_per_peer: 1,
            },
            ListenerMetrics::default(),
        )
        .with_relay_peers(Arc::new(|ip: IpAddr| ip == IpAddr::from([127, 0, 0, 1])));
        let mut held = Vec::new();
        for _ in 0..2 {
            let c = connect_from("127.0.0.1", addr).await;
            let (s, _, a) = tokio::time::timeout(Duration::from_secs(2), l.accept())
                .await
                .expect("a relay passes one peer's cap");
            held.push((c, s, a));
        }
        // Half the listener's cap is the relay's bound (a pod that labelled itself a relay
        // cannot take the whole listener)…
        let mut over = connect_from("127.0.0.1", addr).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), l.accept())
                .await
                .is_err(),
            "over the relay's share"
        );
        let mut byte = [0u8; 1];
        assert_eq!(over.read(&mut byte).await.unwrap_or(0), 0, "closed");
        // …and the other peers keep the rest.
        for from in ["127.0.0.2", "127.0.0.3"] {
            let c = connect_from(from, addr).await;
            let (s, _, a) = tokio::time::timeout(Duration::from_secs(2), l.accept())
                .await
                .expect("another peer within its share");
            held.push((c, s, a));
        }
    }
}
