//! [`HbonePool`]: outbound HBONE connections, pooled and multiplexed per [`PoolKey`].
//!
//! A key names everything that must be equal for two tunnels to share a connection: the
//! source address and identity (the connection is dialled from the source pod and presents its
//! SVID) and the destination identity and address. Identities are never mixed.
//!
//! - A new tunnel takes the least-loaded live connection of its key; a new connection is
//!   dialled when all are full (`max_streams_per_connection`), or while the key has fewer than
//!   `spread_connections` connections and all of them are busy (bulk flows between the same
//!   pods then use separate connections, tasks and cores).
//! - Dialling is single-flight per key: concurrent callers wait for the one dial in progress
//!   and share its failure; other keys are not held up (the map lock is never held across an
//!   await).
//! - Certificates: a connection takes new tunnels only until the earlier of its two leaves'
//!   (local and peer) `not_after`, and only from callers whose TLS configuration presents the
//!   very leaf it was dialled with. After a
//!   renewal, new tunnels therefore go over a new connection presenting the new certificate,
//!   while tunnels already open keep their connection until they end (the connection drains:
//!   it takes no new tunnel, and leaves the pool once idle). A connection whose local or peer
//!   certificate expired drains the same way.
//! - A connection leaves the pool when its HTTP/2 connection ends (GOAWAY, error, peer close),
//!   when it is idle and can take no new tunnel (replaced or expired certificate), or, via
//!   [`HbonePool::idle_sweep`] / [`HbonePool::run_reaper`], once it has carried no tunnel for
//!   `idle_timeout`. Leaving the pool drops the pool's handle; the connection then closes with
//!   GOAWAY as soon as its last stream ends.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::client::SendRequest;
use membrane_identity::{PeerTrust, SharedTrustBundle, SpiffeId};
use membrane_runtime::lock;
use rustls::sign::CertifiedKey;
use rustls_pki_types::UnixTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::HboneError;
use super::client::{self, ConnectFailure, ConnectHeaders, Dial};
use super::early::EarlyData;
use super::stream::H2Stream;

/// What must be equal for two tunnels to share one connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The source pod's address (the connection is dialled from it).
    pub src_ip: IpAddr,
    /// The source identity (the SVID the connection presents).
    pub src: SpiffeId,
    /// The destination identity (the only one the connection accepts).
    pub dst: SpiffeId,
    /// The destination's HBONE address (`<pod ip>:15008`).
    pub dst_addr: SocketAddr,
    /// The east-west gateway the connection goes through (double HBONE), if any: its
    /// address and the identity it must present.
    pub via: Option<(SocketAddr, SpiffeId)>,
}

/// Pool tuning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Tunnels one connection carries at most before another is opened (at least 1).
    pub max_streams_per_connection: usize,
    /// While a key has fewer connections than this and every one of them carries a tunnel, a
    /// new tunnel gets a connection of its own (at least 1). Several bulk flows between the
    /// same two pods then run on separate TLS connections and tasks — separate cores —
    /// instead of being funnelled through one.
    pub spread_connections: usize,
    /// A connection that carried no tunnel for this long is closed by the reaper.
    pub idle_timeout: Duration,
    /// Bounds establishing a connection (dial, TLS, HTTP/2) and, separately, waiting for the
    /// CONNECT response.
    pub connect_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            spread_connections: 4,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Pooled, multiplexed outbound HBONE connections. Cheap to clone (shared state); no global
/// state. Each pooled connection is driven by a task spawned on the current runtime that ends
/// with the connection.
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: PoolConfig,
    /// When set, a pooled connection's peer is checked against these bundles again after
    /// they change, before it takes a new tunnel.
    trust: Option<SharedTrustBundle>,
    keys: Mutex<HashMap<PoolKey, Arc<KeyEntry>>>,
    next_id: AtomicU64,
}

/// The connections of one key.
#[derive(Default)]
struct KeyEntry {
    conns: Mutex<Vec<Arc<PooledConn>>>,
    /// Held while dialling (single flight). Holds the last dial's failure, if it failed.
    dial: tokio::sync::Mutex<Option<HboneError>>,
    /// Number of dials finished, to tell whether a failure happened while a caller waited.
    dials_finished: AtomicU64,
}

struct PooledConn {
    id: u64,
    sender: SendRequest<Bytes>,
    load: Mutex<Load>,
    /// The HTTP/2 connection ended or refused a new stream; never hand it out again.
    closed: AtomicBool,
    /// The certificate this connection presents (from the TLS configuration it was dialled
    /// with); only callers presenting the same leaf may use it.
    local: Option<Arc<CertifiedKey>>,
    /// The earlier of both leaves' expiry: no new tunnel from then on.
    expires_at: Option<SystemTime>,
    /// The peer's chain, checked again after the bundles change: no new tunnel once they
    /// reject it (a root removed, its trust domain no longer federated).
    trust: Option<PeerTrust>,
    /// It was once found unable to take a new tunnel (logged once).
    draining: AtomicBool,
}

struct Load {
    open: usize,
    idle_since: Instant,
}

/// One tunnel's share of a pooled connection; released when the tunnel's stream (which holds
/// it as its guard) is dropped.
struct StreamLease {
    conn: Arc<PooledConn>,
}

// === impl HbonePool ===

impl HbonePool {
    /// An empty pool.
    pub fn new(config: PoolConfig) -> Self {
        Self::build(config, None)
    }

    /// An empty pool whose connections take no new tunnel once `bundles` no longer verify
    /// their peer's chain (checked again after each change of the bundles, [`PeerTrust`]).
    pub fn checking_trust(config: PoolConfig, bundles: SharedTrustBundle) -> Self {
        Self::build(config, Some(bundles))
    }

    fn build(config: PoolConfig, trust: Option<SharedTrustBundle>) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                config,
                trust,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Opens a tunnel to `authority` (the original destination) over a connection for `key`,
    /// reusing one if it has room.
    ///
    /// `tls` presents the source identity's *current* SVID and requires exactly `key.dst`
    /// (`crate::certs::TlsConfigs::client_config`); it is used only when a new connection is
    /// dialled, with ALPN forced to `h2` (a copy is made if the config offers anything else).
    /// `dial` creates the TCP connection to `key.dst_addr`. After the handshake the peer's
    /// SPIFFE ID must equal `key.dst`.
    ///
    /// A pooled connection is reused only if it presents the very certificate `tls` presents
    /// and neither its local nor its peer certificate has expired. Connections dialled with an
    /// earlier certificate (before a renewal) keep their open tunnels but take no new one, and
    /// leave the pool once idle.
    ///
    /// Errors: [`HboneError::Refused`] when the peer answers other than 200; connection
    /// failures as their own variants. A request that found a pooled connection unusable
    /// (closed, GOAWAY) before anything was sent is retried once on another connection.
    pub async fn connect(
        &self,
        key: PoolKey,
        tls: Arc<rustls::ClientConfig>,
        dial: Arc<dyn Dial>,
        authority: SocketAddr,
        headers: ConnectHeaders,
    ) -> Result<H2Stream, HboneError> {
        self.connect_with_early(key, tls, dial, authority, headers, &mut EarlyData::none())
            .await
    }

    /// [`connect`](Self::connect), the tunnel's request carrying what the application already
    /// sent (`early`, taken right before the request goes out; sent again on a retry) so its
    /// first bytes do not wait for the 200. After an `Ok`, `early.len()` bytes of the
    /// application's were sent.
    pub async fn connect_with_early(
        &self,
        key: PoolKey,
        tls: Arc<rustls::ClientConfig>,
        dial: Arc<dyn Dial>,
        authority: SocketAddr,
        headers: ConnectHeaders,
        early: &mut EarlyData<'_>,
    ) -> Result<H2Stream, HboneError> {
        let span = tracing::debug_span!(
            "hbone_connect",
            src = %key.src,
            dst = %key.dst,
            dst_addr = %key.dst_addr,
            %authority,
        );
        let presenting = presented_certificate(&tls);
        let inner = &self.inner;
        async move {
            let entry = inner.entry(&key);
            let mut retried = false;
            loop {
                let reserved = entry.try_reserve(inner.max_streams(), inner.spread(), &presenting, inner.trust.as_ref());
                let lease = match reserved {
                    Some(lease) => lease,
                    None => {
                        inner.reserve_or_dial(&entry, &key, &tls, &*dial, &presenting)
                            .await?
                    }
                };
                let opened = client::open_tunnel(
                    &lease.conn.sender,
                    authority,
                    &headers,
                    early,
                    inner.config.connect_timeout,
                )
                .await;
                match opened {
                    Ok((send, recv)) => {
                        tracing::debug!(conn = lease.conn.id, "HBONE tunnel open");
                        return Ok(H2Stream::new(send, recv).holding(Box::new(lease)));
                    }
                    Err(ConnectFailure::ConnectionUnusable(e)) if !retried => {
                        tracing::debug!(conn = lease.conn.id, error = %e, "pooled connection unusable; retrying");
                        lease.conn.closed.store(true, Ordering::Release);
                        retried = true;
                    }
                    Err(ConnectFailure::ConnectionUnusable(e) | ConnectFailure::Final(e)) => {
                        return Err(e);
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Live pooled connections, all keys together.
    pub fn connection_count(&self) -> usize {
        let keys = lock(&self.inner.keys);
        keys.values()
            .map(|entry| lock(&entry.conns).iter().filter(|c| !c.is_closed()).count())
            .sum()
    }

    /// Removes connections idle for at least `idle_timeout` and connections that ended, and
    /// forgets keys with no connection left. Returns how many connections were removed.
    pub fn idle_sweep(&self) -> usize {
        self.inner.idle_sweep()
    }

    /// Takes every connection of the keys `retired` selects out of the pool (for example
    /// those whose destination's trust domain is no longer trusted): no new tunnel rides
    /// them, so the next one dials and is verified afresh; tunnels already open on them run
    /// on until they end. Returns how many connections were retired.
    pub fn retire(&self, retired: impl Fn(&PoolKey) -> bool) -> usize {
        let mut removed = Vec::new();
        lock(&self.inner.keys).retain(|key, entry| {
            if !retired(key) {
                return true;
            }
            for conn in lock(&entry.conns).drain(..) {
                conn.closed.store(true, Ordering::Release);
                removed.push(conn);
            }
            false
        });
        // Dropped outside the lock, as in `idle_sweep`.
        removed.len()
    }

    /// A future that calls [`idle_sweep`](Self::idle_sweep) every quarter of `idle_timeout`
    /// (between 10 ms and 15 s) until `shutdown` is cancelled or the pool is dropped. The
    /// caller spawns it: `tokio::spawn(pool.run_reaper(token))`. It does not keep the pool
    /// alive.
    pub fn run_reaper(
        &self,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + use<> {
        let pool = Arc::downgrade(&self.inner);
        let period = (self.inner.config.idle_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(15));
        async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let Some(inner) = pool.upgrade() else { return };
                let removed = inner.idle_sweep();
                if removed > 0 {
                    tracing::debug!(removed, "closed idle HBONE connections");
                }
            }
        }
    }
}

impl std::fmt::Debug for HbonePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbonePool")
            .field("config", &self.inner.config)
            .field("connections", &self.connection_count())
            .finish()
    }
}

// === impl PoolInner ===

impl PoolInner {
    fn max_streams(&self) -> usize {
        self.config.max_streams_per_connection.max(1)
    }

    fn spread(&self) -> usize {
        self.config.spread_connections.max(1)
    }

    fn entry(&self, key: &PoolKey) -> Arc<KeyEntry> {
        lock(&self.keys).entry(key.clone()).or_default().clone()
    }

    /// Waits for the key's dial slot; then either a connection dialled meanwhile has room, a
    /// dial that finished meanwhile failed (its error is shared), or this caller dials.
    async fn reserve_or_dial(
        &self,
        entry: &Arc<KeyEntry>,
        key: &PoolKey,
        tls: &Arc<rustls::ClientConfig>,
        dial: &dyn Dial,
        presenting: &Presenting,
    ) -> Result<StreamLease, HboneError> {
        let seen = entry.dials_finished.load(Ordering::Acquire);
        let mut last_failure = entry.dial.lock().await;
        let trust = self.trust.as_ref();
        if let Some(lease) = entry.try_reserve(self.max_streams(), self.spread(), presenting, trust)
        {
            return Ok(lease);
        }
        // A dial that finished while this caller waited failed: share its error rather than
        // queueing one more attempt per waiter against a peer that is down.
        if entry.dials_finished.load(Ordering::Acquire) != seen
            && let Some(e) = &*last_failure
        {
            return Err(e.clone());
        }
        let timeout = self.config.connect_timeout;
        let verified_at = trust.map(SharedTrustBundle::generation);
        let established = client::establish(key.dst_addr, &key.dst, tls.clone(), dial, verified_at);
        let result = tokio::time::timeout(timeout, established)
            .await
            .unwrap_or(Err(HboneError::Timeout {
                stage: "HBONE connection establishment",
                after: timeout,
            }));
        entry.dials_finished.fetch_add(1, Ordering::AcqRel);
        let (sender, connection, peer_not_after, peer_trust) = match result {
            Ok(established) => established,
            Err(e) => {
                tracing::debug!(error = %e, "HBONE connection failed");
                *last_failure = Some(e.clone());
                return Err(e);
            }
        };
        *last_failure = None;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let local_not_after = presenting
            .as_ref()
            .and_then(|ck| ck.end_entity_cert().ok())
            .and_then(|leaf| membrane_identity::svid::parse_leaf(leaf).ok())
            .map(|info| info.not_after);
        let expires_at = match (local_not_after, peer_not_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let conn = Arc::new(PooledConn {
            id,
            sender,
            load: Mutex::new(Load {
                open: 1,
                idle_since: Instant::now(),
            }),
            closed: AtomicBool::new(false),
            local: presenting.clone(),
            expires_at,
            trust: peer_trust,
            draining: AtomicBool::new(false),
        });
        let span = tracing::debug_span!(
            "hbone_pool_conn",
            conn = id,
            src = %key.src,
            dst = %key.dst,
            dst_addr = %key.dst_addr,
        );
        let (weak_conn, weak_entry) = (Arc::downgrade(&conn), Arc::downgrade(entry));
        // The driver holds no strong reference to the pooled handle, so dropping the handle
        // (reaping) lets the connection close once its streams are done.
        tokio::spawn(
            async move {
                tracing::debug!("HBONE connection established");
                let result = connection.await;
                if let Some(conn) = weak_conn.upgrade() {
                    conn.closed.store(true, Ordering::Release);
                }
                if let Some(entry) = weak_entry.upgrade() {
                    lock(&entry.conns).retain(|c| c.id != id);
                }
                match result {
                    Ok(()) => tracing::debug!("HBONE connection closed"),
                    Err(e) => tracing::debug!(error = %e, "HBONE connection ended with an error"),
                }
            }
            .instrument(span),
        );
        lock(&entry.conns).push(conn.clone());
        Ok(StreamLease { conn })
    }

    fn idle_sweep(&self) -> usize {
        let now = Instant::now();
        let wall = SystemTime::now();
        let idle_timeout = self.config.idle_timeout;
        let mut removed = Vec::new();
        {
            let mut keys = lock(&self.keys);
            keys.retain(|_, entry| {
                let mut conns = lock(&entry.conns);
                conns.retain(|c| {
                    let gone = c.is_closed()
                        || c.idle_for(now, idle_timeout)
                        || (c.expired(wall) && c.is_idle());
                    if gone {
                        removed.push(c.clone());
                    }
                    !gone
                });
                // Keep a key some caller is using (it may be dialling) even without connections.
                !conns.is_empty() || Arc::strong_count(entry) > 1
            });
        }
        // Dropped outside the locks: the last handle of a connection starts its GOAWAY.
        removed.len()
    }
}

// === impl KeyEntry ===

impl KeyEntry {
    /// Takes a stream slot on the least-loaded connection that can take a tunnel for
    /// `presenting` (see [`PooledConn::usable`]), unless the key should spread to a new
    /// connection first (see [`PoolConfig::spread_connections`]) or every such connection is
    /// full. Connections that can take no tunnel and carry none leave the pool.
    fn try_reserve(
        &self,
        max_streams: usize,
        spread: usize,
        presenting: &Presenting,
        trust: Option<&SharedTrustBundle>,
    ) -> Option<StreamLease> {
        let now = SystemTime::now();
        let mut leaving = Vec::new();
        let lease = {
            let mut conns = lock(&self.conns);
            conns.retain(|c| {
                let keep = !c.is_closed() && (c.usable(presenting, now, trust) || !c.is_idle());
                if !keep {
                    leaving.push(c.clone());
                }
                keep
            });
            let usable: Vec<&Arc<PooledConn>> = conns
                .iter()
                .filter(|c| c.usable(presenting, now, trust))
                .collect();
            let count = usable.len();
            let least = usable.into_iter().min_by_key(|c| lock(&c.load).open)?;
            let mut load = lock(&least.load);
            let spread_first = load.open > 0 && count < spread;
            if spread_first || load.open >= max_streams {
                return None;
            }
            load.open += 1;
            StreamLease {
                conn: least.clone(),
            }
        };
        // Dropped outside the lock: the last handle of a connection starts its GOAWAY.
        drop(leaving);
        Some(lease)
    }
}

// === impl PooledConn ===

impl PooledConn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn is_idle(&self) -> bool {
        lock(&self.load).open == 0
    }

    fn expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Whether a new tunnel for `presenting` may ride this connection: neither leaf has
    /// expired, the connection presents the caller's leaf, and `trust` (when checked) still
    /// verifies the peer's chain. An unusable connection still carries the tunnels it has
    /// (logged once).
    fn usable(
        &self,
        presenting: &Presenting,
        now: SystemTime,
        trust: Option<&SharedTrustBundle>,
    ) -> bool {
        let same = match (&self.local, presenting) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                Arc::ptr_eq(a, b) || a.end_entity_cert().ok() == b.end_entity_cert().ok()
            }
            _ => false,
        };
        let untrusted = match (&self.trust, trust) {
            (Some(peer), Some(bundles)) if same => peer.recheck(bundles, UnixTime::now()).err(),
            _ => None,
        };
        let usable = same && !self.expired(now) && untrusted.is_none();
        if !usable && !self.draining.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                conn = self.id,
                expired = self.expired(now),
                untrusted = untrusted.as_ref().map(tracing::field::display),
                "HBONE connection drains: its certificate was replaced or expired, or its peer is no longer trusted"
            );
        }
        usable
    }

    fn idle_for(&self, now: Instant, timeout: Duration) -> bool {
        let load = lock(&self.load);
        load.open == 0 && now.saturating_duration_since(load.idle_since) >= timeout
    }
}

/// What a caller presents: the certified key of its TLS configuration. Only connections
/// presenting that same leaf may carry its tunnel.
type Presenting = Option<Arc<CertifiedKey>>;

/// The leaf certificate `tls` presents as a client (its resolver returns the certified key
/// whatever the server asks for; membrane's configurations present one fixed SVID).
fn presented_certificate(tls: &rustls::ClientConfig) -> Option<Arc<CertifiedKey>> {
    let schemes = tls
        .crypto_provider()
        .signature_verification_algorithms
        .supported_schemes();
    tls.client_auth_cert_resolver.resolve(&[], &schemes)
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        let mut load = lock(&self.conn.load);
        load.open = load.open.saturating_sub(1);
        if load.open == 0 {
            load.idle_since = Instant::now();
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
