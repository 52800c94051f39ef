//! Byte budgets of EgressPolicies (DESIGN.md §9): bytes sent and received per (source
//! identity, host, policy) in a window, counted on the node.
//!
//! A window opens at the first connection of its key and lasts the policy's `per`; counts
//! start from zero when it rolls — at the next connection, or at the next byte of a
//! connection that outlives it (a download longer than the window goes on under the next
//! one, still closed when that one is spent). A window is kept while a connection holds it. Bytes are *reserved* before they move (a write is shortened,
//! a read is given a smaller buffer, so a window never carries more than its limit), and the
//! reservation that reaches the limit exhausts the window: every open connection of the key
//! is closed (their relays watch the window's token) and new ones are refused until the
//! window rolls. The ledger is written to `<state-dir>/budgets.json` every second while it
//! changes and at shutdown, and read back at start, so a restart neither forgets spending
//! nor lifts an exhaustion.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use membrane_policy::egress::Budget;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::relay::ResetOnError;

/// Whose spending a window counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BudgetKey {
    /// The source's SPIFFE ID.
    pub identity: String,
    /// The name the deciding rule matched (or the address, for an `ipBlocks` rule).
    pub host: String,
    /// `namespace/name` of the policy whose budget it is.
    pub policy: String,
}

/// A direction of a connection leaving the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the pod to the outside.
    Sent,
    /// From the outside to the pod.
    Received,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Window {
    /// Unix seconds the window opened.
    start: u64,
    /// Its length in seconds.
    per: u64,
    sent: u64,
    received: u64,
    sent_limit: Option<u64>,
    received_limit: Option<u64>,
    exhausted: bool,
    #[serde(skip)]
    token: CancellationToken,
    /// Held by every meter of the window: a window with meters is never expired.
    #[serde(skip)]
    live: Arc<()>,
}

impl Window {
    fn open(budget: &Budget, now: u64) -> Self {
        Self {
            start: now,
            per: budget.per.as_secs().max(1),
            sent: 0,
            received: 0,
            sent_limit: budget.sent_bytes,
            received_limit: budget.received_bytes,
            exhausted: false,
            token: CancellationToken::new(),
            live: Arc::new(()),
        }
    }

    fn ends(&self) -> u64 {
        self.start.saturating_add(self.per)
    }

    /// Starts the window again at `now` under `budget`, for the connections that hold it (its
    /// token, unless it was spent and its connections closed).
    fn roll(&mut self, budget: &Budget, now: u64) {
        let token = if self.token.is_cancelled() {
            CancellationToken::new()
        } else {
            self.token.clone()
        };
        let live = self.live.clone();
        *self = Self {
            token,
            live,
            ..Self::open(budget, now)
        };
    }
}

/// Why a new connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the egress budget of {policy} is spent until the window rolls in {retry_in:?}")]
pub struct Exhausted {
    /// The policy whose budget it is.
    pub policy: String,
    /// Until the window rolls.
    pub retry_in: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyLabel {
    policy: String,
    direction: &'static str,
}

/// Budget metrics.
#[derive(Debug, Clone, Default)]
pub struct BudgetMetrics {
    exhausted: Family<PolicyLabel, Counter>,
    bytes: Family<PolicyLabel, Counter>,
    refused: Family<PolicyLabel, Counter>,
    persist_failures: Counter,
}

impl BudgetMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "egress_budget_exhausted",
            "Budget windows exhausted, by EgressPolicy and direction",
            m.exhausted.clone(),
        );
        registry.register(
            "egress_budget_bytes",
            "Bytes counted against EgressPolicy budgets, by policy and direction",
            m.bytes.clone(),
        );
        registry.register(
            "egress_budget_refused",
            "New connections refused because their budget window is spent, by policy",
            m.refused.clone(),
        );
        registry.register(
            "egress_budget_persist_failures",
            "Failed writes of the budget ledger",
            m.persist_failures.clone(),
        );
        m
    }
}

/// The node's budget windows.
#[derive(Debug)]
pub struct Ledger {
    windows: Mutex<HashMap<BudgetKey, Window>>,
    file: Option<PathBuf>,
    dirty: AtomicBool,
    metrics: BudgetMetrics,
    /// The time meters count bytes at.
    clock: fn() -> SystemTime,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How the ledger is saved: a list, since JSON object keys must be strings.
type Saved = Vec<(BudgetKey, Window)>;

impl Ledger {
    /// A ledger saved in `file` (none: kept in memory only).
    pub fn new(file: Option<PathBuf>, metrics: BudgetMetrics) -> Self {
        Self {
            windows: Mutex::new(HashMap::new()),
            file,
            dirty: AtomicBool::new(false),
            metrics,
            clock: SystemTime::now,
        }
    }

    /// Reads the saved ledger, dropping windows that ended before `now`. A missing file is an
    /// empty ledger; an unreadable one is logged and ignored.
    pub fn restore(&self, now: SystemTime) {
        let Some(path) = &self.file else { return };
        let saved: Saved = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(saved) => saved,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable budget ledger; starting empty");
                    return;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the budget ledger; starting empty");
                return;
            }
        };
        let now = unix(now);
        let mut windows = crate::lock(&self.windows);
        for (key, window) in saved {
            if window.ends() > now {
                windows.insert(key, window);
            }
        }
        tracing::info!(windows = windows.len(), "egress budget ledger restored");
    }

    /// Admits a new connection of `key` under `budget` at `now`: its meter, or why not.
    pub fn admit(
        self: &Arc<Self>,
        key: BudgetKey,
        budget: &Budget,
        now: SystemTime,
    ) -> Result<Meter, Exhausted> {
        let now = unix(now);
        let mut windows = crate::lock(&self.windows);
        let window = windows
            .entry(key.clone())
            .or_insert_with(|| Window::open(budget, now));
        if window.ends() <= now {
            window.roll(budget, now);
            self.dirty.store(true, Ordering::Relaxed);
        }
        // The policy may have changed its limits since the window opened.
        window.sent_limit = budget.sent_bytes;
        window.received_limit = budget.received_bytes;
        if window.exhausted {
            self.metrics
                .refused
                .get_or_create(&PolicyLabel {
                    policy: key.policy.clone(),
                    direction: "any",
                })
                .inc();
            return Err(Exhausted {
                policy: key.policy,
                retry_in: Duration::from_secs(window.ends().saturating_sub(now)),
            });
        }
        Ok(Meter {
            ledger: self.clone(),
            token: window.token.clone(),
            live: window.live.clone(),
            key: Arc::new(key),
            budget: *budget,
        })
    }

    /// Reserves up to `want` bytes in `direction` for `meter` at `now`: how many may move (0:
    /// the window is spent). A window that ended is rolled in place (one that is gone is
    /// opened again for the meter), so a connection outliving its window goes on under the
    /// next one; a meter whose window was spent stays spent.
    fn reserve(&self, meter: &Meter, direction: Direction, want: usize, now: SystemTime) -> usize {
        if meter.token.is_cancelled() {
            return 0;
        }
        let now = unix(now);
        let key = &*meter.key;
        let mut windows = crate::lock(&self.windows);
        if !windows.contains_key(key) {
            let window = Window {
                token: meter.token.clone(),
                live: meter.live.clone(),
                ..Window::open(&meter.budget, now)
            };
            windows.insert(key.clone(), window);
            self.dirty.store(true, Ordering::Relaxed);
        }
        let Some(window) = windows.get_mut(key) else {
            return 0;
        };
        if window.ends() <= now {
            window.roll(&meter.budget, now);
            self.dirty.store(true, Ordering::Relaxed);
        }
        if window.exhausted {
            return 0;
        }
        let (used, limit) = match direction {
            Direction::Sent => (&mut window.sent, window.sent_limit),
            Direction::Received => (&mut window.received, window.received_limit),
        };
        let want = want as u64;
        let granted = match limit {
            None => want,
            Some(limit) => want.min(limit.saturating_sub(*used)),
        };
        *used += granted;
        usize::try_from(granted).unwrap_or(usize::MAX)
    }

    /// Settles a reservation of `granted` bytes of which `moved` moved: the rest is given
    /// back, and a window whose count reached its limit is spent (its connections closed).
    fn settle(&self, key: &BudgetKey, direction: Direction, granted: usize, moved: usize) {
        if moved > 0 {
            self.metrics
                .bytes
                .get_or_create(&PolicyLabel {
                    policy: key.policy.clone(),
                    direction: direction.as_str(),
                })
                .inc_by(moved as u64);
            self.dirty.store(true, Ordering::Relaxed);
        }
        let mut windows = crate::lock(&self.windows);
        let Some(window) = windows.get_mut(key) else {
            return;
        };
        let (used, limit) = match direction {
            Direction::Sent => (&mut window.sent, window.sent_limit),
            Direction::Received => (&mut window.received, window.received_limit),
        };
        *used = used.saturating_sub(granted.saturating_sub(moved) as u64);
        if window.exhausted || limit.is_none_or(|l| *used < l) {
            return;
        }
        window.exhausted = true;
        window.token.cancel();
        self.metrics
            .exhausted
            .get_or_create(&PolicyLabel {
                policy: key.policy.clone(),
                direction: direction.as_str(),
            })
            .inc();
        tracing::warn!(
            src = %key.identity,
            host = %key.host,
            policy = %key.policy,
            direction = direction.as_str(),
            limit = limit.unwrap_or_default(),
            "egress budget spent: closing the key's connections and refusing new ones until the window rolls"
        );
    }

    /// Every window, for the admin dump: key, start, length, counts, limits, whether spent.
    pub fn windows(&self) -> Vec<serde_json::Value> {
        let mut out: Vec<(BudgetKey, Window)> = crate::lock(&self.windows)
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter()
            .map(|(k, w)| {
                serde_json::json!({
                    "identity": k.identity, "host": k.host, "policy": k.policy,
                    "start": w.start, "perSeconds": w.per, "sent": w.sent, "received": w.received,
                    "sentLimit": w.sent_limit, "receivedLimit": w.received_limit,
                    "spent": w.exhausted,
                })
            })
            .collect()
    }

    /// Drops windows that ended before `now` and that no open connection holds.
    pub fn expire(&self, now: SystemTime) {
        let now = unix(now);
        let mut windows = crate::lock(&self.windows);
        let before = windows.len();
        windows.retain(|_, w| w.ends() > now || Arc::strong_count(&w.live) > 1);
        if windows.len() != before {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Writes the ledger if it changed since the last write.
    pub fn persist(&self) {
        let Some(path) = &self.file else { return };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let saved: Saved = crate::lock(&self.windows)
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        if let Err(e) = write_file(path, &saved) {
            self.dirty.store(true, Ordering::Relaxed);
            self.metrics.persist_failures.inc();
            tracing::warn!(file = %path.display(), error = %e, "cannot write the budget ledger");
        }
    }
}

fn write_file(path: &Path, saved: &Saved) -> io::Result<()> {
    let bytes = serde_json::to_vec(saved).map_err(io::Error::other)?;
    membrane_runtime::fsutil::write_atomic(path, &bytes, 0o600)
}

/// Expires and writes the ledger every second until `cancel` fires, then a last time.
pub async fn maintain(ledger: Arc<Ledger>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        ledger.expire(SystemTime::now());
        let l = ledger.clone();
        let _ = tokio::task::spawn_blocking(move || l.persist()).await;
    }
    ledger.persist();
}

/// One connection's hold on a budget window.
#[derive(Debug, Clone)]
pub struct Meter {
    ledger: Arc<Ledger>,
    key: Arc<BudgetKey>,
    token: CancellationToken,
    /// Keeps the window from expiring while the connection is open.
    live: Arc<()>,
    /// The budget the window is rolled under.
    budget: Budget,
}

impl Meter {
    /// Fires when the window is spent.
    pub fn spent(&self) -> &CancellationToken {
        &self.token
    }

    /// The policy whose budget it is.
    pub fn policy(&self) -> &str {
        &self.key.policy
    }

    fn spent_error(&self) -> io::Error {
        io::Error::other(format!(
            "egress budget of {} spent for {}",
            self.key.policy, self.key.host
        ))
    }
}

/// The connection to the outside, counted against a budget: writes are bytes sent, reads
/// bytes received.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    meter: Meter,
}

impl<S> Metered<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, meter: Meter) -> Self {
        Self { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let (ledger, key) = (&this.meter.ledger, &this.meter.key);
        let granted = ledger.reserve(
            &this.meter,
            Direction::Received,
            buf.remaining(),
            (ledger.clock)(),
        );
        if granted == 0 {
            return Poll::Ready(Err(this.meter.spent_error()));
        }
        // Read at most what the window still allows (the relay's buffers are initialised,
        // so this zeroes nothing).
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(granted));
        let result = Pin::new(&mut this.inner).poll_read(cx, &mut limited);
        let moved = match &result {
            Poll::Ready(Ok(())) => limited.filled().len(),
            _ => 0,
        };
        ledger.settle(key, Direction::Received, granted, moved);
        buf.advance(moved);
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if data.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        let key = &this.meter.key;
        let ledger = &this.meter.ledger;
        let granted = ledger.reserve(&this.meter, Direction::Sent, data.len(), (ledger.clock)());
        if granted == 0 {
            return Poll::Ready(Err(this.meter.spent_error()));
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, &data[..granted]);
        let written = match &result {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        this.meter
            .ledger
            .settle(key, Direction::Sent, granted, written);
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Metered bytes are counted as they pass `poll_read` and `poll_write`: no chunk paths. Ready
/// to read when the wrapped stream is.
impl<S: crate::relay::Chunks> crate::relay::Chunks for Metered<S> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_readable(cx)
    }
}

impl<S: ResetOnError> ResetOnError for Metered<S> {
    fn reset(self) {
        self.inner.reset();
    }
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
