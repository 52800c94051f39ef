//! The per-identity certificate cache and its renewal scheduler.
//!
//! Each local identity has a slot: the current SVID, when the next attempt is planned, and how
//! the last attempts went. [`CertificateManager::svid`] reads the slot without waiting while
//! the SVID is valid; only when there is none, or it expired, does the caller ask the
//! controller itself (one request per identity at a time; when the controller was unreachable
//! less than a second ago the caller fails at once). [`CertificateManager::run_renewals`] is
//! the one task that keeps every slot current: it sleeps until the earliest planned attempt
//! and runs due attempts concurrently.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use membrane_identity::{SharedTrustBundle, WorkloadIdentity, WorkloadSvid};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::controller::{Controller, Issued, SvidSource};
use super::metrics::{CertMetrics, ExpiryCollector};
use super::schedule::{self, Jitter, Validity};
use super::{CaConfig, CertError};
use crate::telemetry::rfc3339;
use membrane_runtime::lock;

/// A caller that needs a certificate fails at once, rather than asking again, when the
/// controller was found unreachable less than this long ago.
const FAIL_FAST: Duration = Duration::from_secs(1);
/// The scheduler looks at the slots at least this often (the wall clock can jump).
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Shortest interval between two planned attempts for one identity (guards against a
/// certificate issued already expired).
const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// One identity's certificate, for the admin config dump.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateStatus {
    /// SPIFFE ID.
    pub identity: String,
    /// Serial of the current certificate (hex); none before the first issuance.
    pub serial: Option<String>,
    /// Seconds since the epoch when the certificate expires (0: none).
    pub not_after_unix: u64,
    /// When the certificate expires (RFC 3339).
    pub not_after: Option<String>,
    /// Seconds until expiry (0 when expired or none).
    pub expires_in_seconds: u64,
    /// The certificate has expired (it is no longer presented).
    pub expired: bool,
    /// The next planned renewal (or retry) attempt (RFC 3339).
    pub next_renewal: Option<String>,
    /// The same, in milliseconds since the epoch.
    pub next_renewal_unix_ms: Option<u64>,
    /// Failed attempts since the last success.
    pub renewal_failures: u32,
    /// Why the last attempt failed, while it is the latest word.
    pub last_error: Option<String>,
}

/// Issues, caches and renews the SVIDs of this node's workloads.
#[derive(Debug)]
pub struct CertificateManager {
    source: Arc<dyn SvidSource>,
    bundle: SharedTrustBundle,
    slots: Mutex<HashMap<WorkloadIdentity, Arc<Slot>>>,
    /// Wakes the scheduler when a plan changed.
    replan: tokio::sync::Notify,
    jitter: Jitter,
    metrics: CertMetrics,
}

#[derive(Debug)]
struct Slot {
    identity: WorkloadIdentity,
    state: Mutex<SlotState>,
    /// Held while asking the controller: one request per identity at a time.
    fetch: tokio::sync::Mutex<()>,
    /// Cancelled when the identity's last pod left: its renewals stop.
    forgotten: CancellationToken,
}

#[derive(Debug, Clone, Default)]
struct SlotState {
    svid: Option<WorkloadSvid>,
    /// Next attempt: the planned renewal, or a retry after a failure.
    next_attempt: Option<SystemTime>,
    failures: u32,
    last_error: Option<CertError>,
    last_failure: Option<SystemTime>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn until(t: SystemTime, now: SystemTime) -> Duration {
    t.duration_since(now).unwrap_or_default()
}

// === impl SlotState ===

impl SlotState {
    /// The current SVID if it is valid at `now`: the only one ever handed out.
    fn valid(&self, now: SystemTime) -> Option<WorkloadSvid> {
        self.svid.as_ref().filter(|s| s.is_valid_at(now)).cloned()
    }

    fn remaining(&self, now: SystemTime) -> Duration {
        self.valid(now)
            .map_or(Duration::ZERO, |s| until(s.info().not_after, now))
    }

    fn due(&self, now: SystemTime) -> bool {
        self.next_attempt.is_some_and(|t| t <= now)
    }

    /// Installs a new SVID received at `now` and plans its renewal (`jitter` in `[0, 1)`).
    /// Returns the one it replaces.
    fn succeeded(&mut self, issued: Issued, now: SystemTime, jitter: f64) -> Option<WorkloadSvid> {
        let info = issued.svid.info();
        let validity = Validity {
            received: now,
            not_before: info.not_before,
            not_after: info.not_after,
            refresh_at: issued.refresh_at,
        };
        let planned = schedule::renewal_time(&validity, jitter).max(now + MIN_INTERVAL);
        self.next_attempt = Some(planned);
        self.failures = 0;
        self.last_error = None;
        self.last_failure = None;
        self.svid.replace(issued.svid)
    }

    /// Records a failed attempt at `now` and plans the retry.
    fn failed(&mut self, error: CertError, now: SystemTime) {
        self.failures = self.failures.saturating_add(1);
        let delay = schedule::retry_delay(self.failures, self.remaining(now));
        self.next_attempt = Some(now + delay.max(MIN_INTERVAL));
        self.last_error = Some(error);
        self.last_failure = Some(now);
    }

    /// The controller was unreachable less than [`FAIL_FAST`] ago.
    fn recently_unreachable(&self, now: SystemTime) -> bool {
        matches!(self.last_error, Some(CertError::Connect(_)))
            && self
                .last_failure
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|ago| ago < FAIL_FAST)
    }

    /// Why there is no valid SVID at `now`.
    fn unavailable(&self, identity: &WorkloadIdentity, now: SystemTime) -> CertError {
        match (&self.svid, &self.last_error) {
            (Some(old), last) if old.info().not_after < now => CertError::Expired {
                identity: identity.to_string(),
                expired_at: rfc3339(old.info().not_after),
                last_error: last
                    .as_ref()
                    .map_or_else(|| "no attempt yet".to_owned(), ToString::to_string),
            },
            (_, Some(last)) => last.clone(),
            (_, None) => CertError::Connect(format!("no certificate for {identity} yet")),
        }
    }
}

// === impl CertificateManager ===

impl CertificateManager {
    /// A manager signing through the controller of `config`; `bundle` is the bootstrap trust
    /// bundle, updated from responses.
    pub fn new(config: CaConfig, bundle: SharedTrustBundle) -> Self {
        Self::with_source(Arc::new(Controller::new(config, bundle.clone())), bundle)
    }

    pub(crate) fn with_source(source: Arc<dyn SvidSource>, bundle: SharedTrustBundle) -> Self {
        Self {
            source,
            bundle,
            slots: Mutex::new(HashMap::new()),
            replan: tokio::sync::Notify::new(),
            jitter: Jitter::random(),
            metrics: CertMetrics::default(),
        }
    }

    /// Registers the certificate metrics: the counters and
    /// `workload_certificate_expiry_seconds`, computed from the slots at each scrape.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        self.metrics.register_in(registry);
        let manager = Arc::downgrade(self);
        registry.register_collector(Box::new(ExpiryCollector(Box::new(move || {
            manager.upgrade().map(|m| m.expiries())
        }))));
    }

    /// The certificate metrics (callers count connections refused for want of a certificate).
    pub fn metrics(&self) -> &CertMetrics {
        &self.metrics
    }

    /// The trust bundle peers are verified against.
    pub fn bundle(&self) -> SharedTrustBundle {
        self.bundle.clone()
    }

    fn slot(&self, identity: &WorkloadIdentity) -> Arc<Slot> {
        lock(&self.slots)
            .entry(identity.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    identity: identity.clone(),
                    state: Mutex::new(SlotState::default()),
                    fetch: tokio::sync::Mutex::new(()),
                    forgotten: CancellationToken::new(),
                })
            })
            .clone()
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.slots).values().cloned().collect()
    }

    /// [`Self::svid`] for a connection on the `reporter` side (`source` or `destination`):
    /// when there is no valid SVID, the connection refused for want of one is counted.
    pub async fn svid_for_connection(
        &self,
        identity: &WorkloadIdentity,
        reporter: &'static str,
    ) -> Result<WorkloadSvid, CertError> {
        let svid = self.svid(identity).await;
        if svid.is_err() {
            self.metrics.refused(reporter, identity.to_string());
        }
        svid
    }

    /// The valid SVID for `identity`. Returns the cached one at once while it is valid (the
    /// scheduler renews it ahead of expiry); asks the controller only when there is none or it
    /// expired. Never returns an expired SVID: [`CertError::Expired`] says when it expired and
    /// why renewal failed.
    pub async fn svid(&self, identity: &WorkloadIdentity) -> Result<WorkloadSvid, CertError> {
        let slot = self.slot(identity);
        if let Some(svid) = lock(&slot.state).valid(SystemTime::now()) {
            return Ok(svid);
        }
        let _flight = slot.fetch.lock().await;
        let now = SystemTime::now();
        {
            let state = lock(&slot.state);
            if let Some(svid) = state.valid(now) {
                return Ok(svid);
            }
            if state.recently_unreachable(now) {
                return Err(state.unavailable(identity, now));
            }
        }
        self.attempt(&slot).await
    }

    /// Asks the controller for `slot`'s SVID and records the outcome (the caller holds the
    /// slot's fetch lock). On failure the still-valid SVID, if any, is returned.
    async fn attempt(&self, slot: &Slot) -> Result<WorkloadSvid, CertError> {
        let now_valid = |issued: Issued| {
            let now = SystemTime::now();
            if issued.svid.is_valid_at(now) {
                Ok(issued)
            } else {
                let info = issued.svid.info();
                Err(CertError::BadResponse(format!(
                    "the certificate issued is valid from {} to {}, not now (clock skew?)",
                    rfc3339(info.not_before),
                    rfc3339(info.not_after)
                )))
            }
        };
        let result = self.source.issue(&slot.identity).await.and_then(now_valid);
        let now = SystemTime::now();
        let identity = &slot.identity;
        let mut state = lock(&slot.state);
        let renewal = state.svid.is_some();
        let outcome = match result {
            Ok(issued) => {
                let svid = issued.svid.clone();
                let old = state.succeeded(issued, now, self.jitter.sample());
                let next = state.next_attempt;
                drop(state);
                if renewal {
                    self.metrics.renewal(true);
                }
                tracing::info!(
                    %identity,
                    serial = svid.info().serial,
                    old_serial = old.map(|s| s.info().serial.clone()),
                    not_after = rfc3339(svid.info().not_after),
                    next_renewal = next.map(rfc3339),
                    "workload certificate issued"
                );
                Ok(svid)
            }
            Err(error) => {
                state.failed(error.clone(), now);
                let retry_in_ms = state.next_attempt.map(|t| until(t, now).as_millis());
                let current = state.valid(now);
                let unavailable = state.unavailable(identity, now);
                let failures = state.failures;
                drop(state);
                if renewal {
                    self.metrics.renewal(false);
                }
                match current {
                    Some(svid) => {
                        tracing::warn!(
                            %identity,
                            %error,
                            failures,
                            retry_in_ms,
                            serial = svid.info().serial,
                            expires_in_ms = until(svid.info().not_after, now).as_millis(),
                            "certificate renewal failed; serving the still-valid certificate"
                        );
                        Ok(svid)
                    }
                    None => {
                        tracing::warn!(
                            %identity,
                            error = %unavailable,
                            failures,
                            retry_in_ms,
                            "no valid workload certificate: connections of this identity fail until the controller answers"
                        );
                        Err(unavailable)
                    }
                }
            }
        };
        self.replan.notify_one();
        outcome
    }

    /// One scheduled attempt for `slot`, unless a caller renewed it meanwhile or its identity
    /// was forgotten.
    async fn renew(&self, slot: Arc<Slot>) {
        let _flight = tokio::select! {
            guard = slot.fetch.lock() => guard,
            () = slot.forgotten.cancelled() => return,
        };
        if !lock(&slot.state).due(SystemTime::now()) {
            return;
        }
        tokio::select! {
            _ = self.attempt(&slot) => {}
            () = slot.forgotten.cancelled() => {
                tracing::debug!(identity = %slot.identity, "renewal abandoned: identity forgotten");
            }
        }
    }

    /// The renewal scheduler, until `shutdown`: sleeps until the earliest planned attempt
    /// (or a plan changes), then runs every due attempt, each in its own task. The caller
    /// spawns it.
    pub fn run_renewals(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let manager = self.clone();
        async move {
            let mut running = tokio::task::JoinSet::new();
            let mut in_flight: HashMap<tokio::task::Id, WorkloadIdentity> = HashMap::new();
            loop {
                let now = SystemTime::now();
                let mut wake = now + MAX_SLEEP;
                let busy: HashSet<&WorkloadIdentity> = in_flight.values().collect();
                let mut started = Vec::new();
                for slot in manager.slots() {
                    if busy.contains(&slot.identity) {
                        continue;
                    }
                    let Some(at) = lock(&slot.state).next_attempt else {
                        continue;
                    };
                    if at <= now {
                        let identity = slot.identity.clone();
                        let m = manager.clone();
                        let handle = running.spawn(async move { m.renew(slot).await });
                        started.push((handle.id(), identity));
                    } else {
                        wake = wake.min(at);
                    }
                }
                in_flight.extend(started);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = manager.replan.notified() => {}
                    () = tokio::time::sleep(until(wake, now)) => {}
                    Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                        let id = match done {
                            Ok((id, ())) => id,
                            Err(e) => {
                                tracing::warn!(error = %e, "certificate renewal task failed");
                                e.id()
                            }
                        };
                        in_flight.remove(&id);
                    }
                }
            }
        }
    }

    /// Forgets an identity whose last pod left the node: its certificate is dropped and its
    /// renewals stop.
    pub fn forget(&self, identity: &WorkloadIdentity) {
        let removed = lock(&self.slots).remove(identity);
        if let Some(slot) = removed {
            slot.forgotten.cancel();
            self.replan.notify_one();
            tracing::info!(%identity, "identity left the node; its certificate is no longer renewed");
        }
    }

    /// Expiry of every cached SVID, by SPIFFE ID.
    pub(crate) fn expiries(&self) -> Vec<(String, SystemTime)> {
        self.slots()
            .iter()
            .filter_map(|slot| {
                let state = lock(&slot.state);
                let svid = state.svid.as_ref()?;
                Some((slot.identity.to_string(), svid.info().not_after))
            })
            .collect()
    }

    /// Every identity's certificate, expiry and next planned renewal.
    pub fn status(&self) -> Vec<CertificateStatus> {
        let now = SystemTime::now();
        let mut out: Vec<CertificateStatus> = self
            .slots()
            .iter()
            .map(|slot| {
                let state = lock(&slot.state).clone();
                let info = state.svid.as_ref().map(WorkloadSvid::info);
                let not_after = info.map(|i| i.not_after);
                CertificateStatus {
                    identity: slot.identity.to_string(),
                    serial: info.map(|i| i.serial.clone()),
                    not_after_unix: not_after.map_or(0, |t| unix_ms(t) / 1000),
                    not_after: not_after.map(rfc3339),
                    expires_in_seconds: not_after.map_or(0, |t| until(t, now).as_secs()),
                    expired: not_after.is_some_and(|t| t < now),
                    next_renewal: state.next_attempt.map(rfc3339),
                    next_renewal_unix_ms: state.next_attempt.map(unix_ms),
                    renewal_failures: state.failures,
                    last_error: state.last_error.as_ref().map(ToString::to_string),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
