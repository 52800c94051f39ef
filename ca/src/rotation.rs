//! Root rotation without downtime (DESIGN.md §2): add the new root to the trust bundle →
//! wait until every connected ztunnel has it → sign with the new root → remove the old root
//! once every leaf it signed has expired.
//!
//! The state lives in the state directory, so a rotation survives a controller restart at any
//! step:
//!
//! | phase | files | signs with | bundle |
//! |---|---|---|---|
//! | idle | `root-*.pem` | root | root |
//! | distributing | + `next-root-*.pem`, `rotation.json` | root | root + next |
//! | signing | same, `rotation.json` says when the old root retires | next | root + next |
//! | finalizing | `next-root-*` copied over `root-*`, then removed | (new) root | (new) root |
//!
//! `membrane-ca rotate-root` ([`request`]) only creates the next root (key first, 0600) and
//! writes the `distributing` phase; the running controller notices within [`POLL`] and does
//! the rest ([`Rotator::run`]): it publishes the two-root bundle on the discovery stream, waits
//! at least the grace period (from the start, and again after a restart, so ztunnels that were
//! connected reconnect) and for every connected node's `Discovery.Ack` of an update carrying
//! it — but no longer than the acknowledgement timeout, so a node that never acknowledges
//! cannot hold the rotation back: past it, signing switches anyway and the silent nodes are
//! reported (warning, metric, and `unacknowledged` in the state file) — then switches signing (and
//! re-issues its own serving certificate) and records when the old root may go — `max_ttl`
//! after the switch, when the last leaf it signed has expired. Each transition writes the new
//! phase before acting on it; the finalizing copy is idempotent, so a crash in the middle is
//! completed at the next start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use membrane_identity::{TrustBundle, TrustDomain};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::authority::{
    AuthorityError, NEXT_ROOT_CERT_FILE, NEXT_ROOT_KEY_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE,
    SigningAuthority,
};
use crate::discovery::AckBook;
use crate::fsutil::{self, FileError};
use crate::signer::{BACKDATE, Signer};

/// The rotation state file in the state directory.
pub const ROTATION_FILE: &str = "rotation.json";
/// How often the running controller looks at the rotation state.
pub const POLL: Duration = Duration::from_millis(250);

/// Where a rotation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// No rotation.
    Idle,
    /// The next root is in the bundle; signing still uses the current root.
    Distributing {
        /// When the rotation was requested (Unix seconds).
        started_unix: i64,
    },
    /// Signing uses the next root; the old one stays in the bundle until its leaves expire.
    Signing {
        /// When signing switched (Unix seconds).
        switched_unix: i64,
        /// When the old root may leave the bundle (Unix seconds).
        retire_after_unix: i64,
        /// Connected nodes that had not acknowledged the two-root bundle when the
        /// acknowledgement timeout made signing switch anyway (empty when all did).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unacknowledged: Vec<String>,
    },
    /// The next root is being moved into place.
    Finalizing,
}

impl Phase {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Distributing { .. } => "distributing",
            Self::Signing { .. } => "signing",
            Self::Finalizing => "finalizing",
        }
    }

    fn number(&self) -> i64 {
        match self {
            Self::Idle => 0,
            Self::Distributing { .. } => 1,
            Self::Signing { .. } => 2,
            Self::Finalizing => 3,
        }
    }
}

/// Why a rotation step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    /// A root could not be loaded or created.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// A state file could not be read or written.
    #[error(transparent)]
    Io(#[from] FileError),
    /// The rotation state file is not understood.
    #[error("{path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A rotation is already under way.
    #[error("a root rotation is already in progress (phase {0}); wait for it to finish")]
    InProgress(&'static str),
    /// There is no self-managed root to rotate.
    #[error(
        "{0} holds no self-managed root ({ROOT_CERT_FILE}); with a plug-in CA, rotate by replacing the plug-in files"
    )]
    NoSelfManagedRoot(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RotationError + '_ {
    move |source| RotationError::Io(FileError::at(path)(source))
}

/// The phase recorded in `dir`. Next-root files without a state file (a crash right after
/// `rotate-root` wrote them) count as a requested rotation.
pub fn read_phase(dir: &Path) -> Result<Phase, RotationError> {
    let path = dir.join(ROTATION_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RotationError::State {
            path: path.clone(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join(NEXT_ROOT_CERT_FILE).exists() {
                Ok(Phase::Distributing {
                    started_unix: OffsetDateTime::now_utc().unix_timestamp(),
                })
            } else {
                Ok(Phase::Idle)
            }
        }
        Err(e) => Err(io(&path)(e)),
    }
}

fn write_phase(dir: &Path, phase: &Phase) -> Result<(), RotationError> {
    let path = dir.join(ROTATION_FILE);
    let json = serde_json::to_vec_pretty(phase).map_err(|e| RotationError::State {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    fsutil::write_atomic(&path, &json, 0o600).map_err(io(&path))
}

/// Starts a rotation (the `rotate-root` command): creates the next root, valid for
/// `root_ttl`, and records the distributing phase. The running controller takes it from there.
pub fn request(
    dir: &Path,
    trust_domain: &TrustDomain,
    root_ttl: Duration,
) -> Result<Phase, RotationError> {
    if !dir.join(ROOT_CERT_FILE).exists() {
        return Err(RotationError::NoSelfManagedRoot(dir.to_owned()));
    }
    match read_phase(dir)? {
        Phase::Idle => {}
        other => return Err(RotationError::InProgress(other.name())),
    }
    // A key left behind by an interrupted request is replaced.
    for file in [NEXT_ROOT_CERT_FILE, NEXT_ROOT_KEY_FILE] {
        let path = dir.join(file);
        if path.exists() {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    SigningAuthority::create_root(
        dir,
        NEXT_ROOT_CERT_FILE,
        NEXT_ROOT_KEY_FILE,
        trust_domain,
        root_ttl,
    )?;
    let phase = Phase::Distributing {
        started_unix: OffsetDateTime::now_utc().unix_timestamp(),
    };
    write_phase(dir, &phase)?;
    Ok(phase)
}

fn load_pair(
    dir: &Path,
    cert: &str,
    key: &str,
    td: &TrustDomain,
) -> Result<SigningAuthority, RotationError> {
    Ok(SigningAuthority::load_root(
        &dir.join(cert),
        &dir.join(key),
        td,
    )?)
}

/// The current and next roots with a bundle of both, signing with `signer_is_next`'s choice.
fn two_roots(
    dir: &Path,
    td: &TrustDomain,
    sign_with_next: bool,
) -> Result<SigningAuthority, RotationError> {
    let current = load_pair(dir, ROOT_CERT_FILE, ROOT_KEY_FILE, td)?;
    let next = load_pair(dir, NEXT_ROOT_CERT_FILE, NEXT_ROOT_KEY_FILE, td)?;
    let mut bundle = current.bundle().clone();
    for root in next.bundle().roots() {
        bundle
            .add_root(root.clone())
            .map_err(|e| RotationError::State {
                path: dir.join(NEXT_ROOT_CERT_FILE),
                reason: e.to_string(),
            })?;
    }
    let signing = if sign_with_next { next } else { current };
    Ok(signing.with_bundle(bundle)?)
}

/// Moves the next root into place; safe to repeat after a crash at any point.
fn finalize_files(dir: &Path) -> Result<(), RotationError> {
    write_phase(dir, &Phase::Finalizing)?;
    for (from, to, mode) in [
        (NEXT_ROOT_KEY_FILE, ROOT_KEY_FILE, 0o600),
        (NEXT_ROOT_CERT_FILE, ROOT_CERT_FILE, 0o644),
    ] {
        let from = dir.join(from);
        if from.exists() {
            let bytes = std::fs::read(&from).map_err(io(&from))?;
            let to = dir.join(to);
            fsutil::write_atomic(&to, &bytes, mode).map_err(io(&to))?;
        }
    }
    for file in [NEXT_ROOT_CERT_FILE, NEXT_ROOT_KEY_FILE, ROTATION_FILE] {
        let path = dir.join(file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Ok(())
}

/// Loads the self-managed authority for the phase recorded in `dir` (creating the root on
/// first start), completing an interrupted finalization.
pub fn load(
    dir: &Path,
    td: &TrustDomain,
    root_ttl: Duration,
) -> Result<(SigningAuthority, Phase), RotationError> {
    let phase = read_phase(dir)?;
    let authority = match &phase {
        Phase::Idle => SigningAuthority::load_or_create(dir, td, root_ttl)?,
        Phase::Distributing { .. } => two_roots(dir, td, false)?,
        Phase::Signing { .. } => two_roots(dir, td, true)?,
        Phase::Finalizing => {
            finalize_files(dir)?;
            tracing::info!(dir = %dir.display(), "finished an interrupted root rotation");
            return Ok((
                load_pair(dir, ROOT_CERT_FILE, ROOT_KEY_FILE, td)?,
                Phase::Idle,
            ));
        }
    };
    Ok((authority, phase))
}

/// Rotation metrics.
#[derive(Debug, Clone, Default)]
pub struct RotationMetrics {
    phase: Gauge,
    waiting_nodes: Gauge,
    unacknowledged_nodes: Gauge,
    ack_timeouts: Counter,
    failures: Counter,
}

impl RotationMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "root_rotation_phase",
            "Root rotation phase: 0 idle, 1 distributing, 2 signing with the new root, 3 finalizing",
            m.phase.clone(),
        );
        registry.register(
            "root_rotation_waiting_nodes",
            "Connected nodes that have not yet acknowledged the rotation's trust bundle",
            m.waiting_nodes.clone(),
        );
        registry.register(
            "root_rotation_unacknowledged_nodes",
            "Connected nodes that had not acknowledged the new root when the acknowledgement timeout switched signing anyway (current rotation)",
            m.unacknowledged_nodes.clone(),
        );
        registry.register(
            "root_rotation_ack_timeouts",
            "Root rotations that switched signing after the acknowledgement timeout, without every node's acknowledgement",
            m.ack_timeouts.clone(),
        );
        registry.register(
            "root_rotation_failures",
            "Root rotation steps that failed (retried)",
            m.failures.clone(),
        );
        m
    }
}

/// Drives a rotation in the running controller.
pub struct Rotator {
    /// The state directory.
    pub dir: PathBuf,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// The signer every service uses.
    pub signer: Signer,
    /// The bundle streamed to the ztunnels.
    pub bundle_tx: watch::Sender<Arc<TrustBundle>>,
    /// Which nodes applied which bundle.
    pub acks: AckBook,
    /// Longest workload lifetime: how long after the switch the old root must stay.
    pub max_ttl: Duration,
    /// The least time the new root is distributed (counted from the rotation's start or
    /// this process's start, whichever is later) before signing switches: ztunnels that were
    /// connected before a restart get time to reconnect and acknowledge.
    pub grace: Duration,
    /// The longest wait for acknowledgements (counted like `grace`): past it, signing switches
    /// even if some connected nodes never acknowledged, and those nodes are reported.
    pub ack_timeout: Duration,
    /// Called after each switch of the signing root (re-issues the serving certificate).
    pub on_switch: Arc<dyn Fn() + Send + Sync>,
    /// Metrics.
    pub metrics: RotationMetrics,
}

impl std::fmt::Debug for Rotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotator")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Rotator {
    fn publish(&self) {
        let bundle = Arc::new(self.signer.bundle());
        tracing::info!(
            roots = bundle.roots().len(),
            "trust bundle published to the ztunnels"
        );
        self.bundle_tx.send_replace(bundle);
    }

    /// One step from `phase`; returns the next phase. `since` is when this process started
    /// following the current phase.
    fn step(&self, phase: Phase, since: std::time::Instant) -> Result<Phase, RotationError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        match phase {
            Phase::Idle | Phase::Finalizing => {
                let recorded = read_phase(&self.dir)?;
                if let Phase::Distributing { .. } = recorded {
                    self.signer
                        .replace(two_roots(&self.dir, &self.trust_domain, false)?);
                    self.publish();
                    self.metrics.unacknowledged_nodes.set(0);
                    tracing::info!("root rotation started: distributing the new root");
                }
                Ok(recorded)
            }
            Phase::Distributing { started_unix } => {
                let started = OffsetDateTime::from_unix_timestamp(started_unix)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                let distributed = (OffsetDateTime::now_utc() - started)
                    .unsigned_abs()
                    .min(since.elapsed());
                if distributed < self.grace {
                    return Ok(phase);
                }
                let bundle = self.signer.bundle();
                let waiting = self.acks.pending(&bundle);
                self.metrics
                    .waiting_nodes
                    .set(i64::try_from(waiting.len()).unwrap_or(i64::MAX));
                if !waiting.is_empty() {
                    if distributed < self.ack_timeout {
                        tracing::debug!(
                            ?waiting,
                            "root rotation waits for nodes to acknowledge the bundle"
                        );
                        return Ok(phase);
                    }
                    self.metrics.ack_timeouts.inc();
                    self.metrics
                        .unacknowledged_nodes
                        .set(i64::try_from(waiting.len()).unwrap_or(i64::MAX));
                    tracing::warn!(
                        unacknowledged = ?waiting,
                        timeout_secs = self.ack_timeout.as_secs_f64(),
                        "root rotation: nodes did not acknowledge the new root in time; signing with it anyway"
                    );
                }
                let ttl = i64::try_from((self.max_ttl + BACKDATE).as_secs()).unwrap_or(i64::MAX);
                let next = Phase::Signing {
                    switched_unix: now,
                    retire_after_unix: now.saturating_add(ttl).saturating_add(1),
                    unacknowledged: waiting,
                };
                write_phase(&self.dir, &next)?;
                self.signer
                    .replace(two_roots(&self.dir, &self.trust_domain, true)?);
                (self.on_switch)();
                tracing::info!(
                    retire_after_unix = now.saturating_add(ttl),
                    "root rotation: signing with the new root"
                );
                Ok(next)
            }
            Phase::Signing {
                retire_after_unix,
                ref unacknowledged,
                ..
            } => {
                self.metrics
                    .unacknowledged_nodes
                    .set(i64::try_from(unacknowledged.len()).unwrap_or(i64::MAX));
                if now < retire_after_unix {
                    return Ok(phase);
                }
                finalize_files(&self.dir)?;
                self.signer.replace(load_pair(
                    &self.dir,
                    ROOT_CERT_FILE,
                    ROOT_KEY_FILE,
                    &self.trust_domain,
                )?);
                self.publish();
                tracing::info!("root rotation finished: the old root left the trust bundle");
                Ok(Phase::Idle)
            }
        }
    }

    /// Follows the rotation state from `phase` until `cancel` fires.
    pub async fn run(self, mut phase: Phase, cancel: CancellationToken) {
        let mut since = std::time::Instant::now();
        let mut ticker = tokio::time::interval(POLL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.metrics.phase.set(phase.number());
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.step(phase.clone(), since) {
                Ok(next) => {
                    if next != phase {
                        since = std::time::Instant::now();
                    }
                    phase = next;
                }
                Err(e) => {
                    self.metrics.failures.inc();
                    tracing::error!(phase = phase.name(), error = %e, "root rotation step failed; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td")
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn request_creates_the_next_root_and_refuses_a_second_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            request(dir.path(), &td(), DAY),
            Err(RotationError::NoSelfManagedRoot(_))
        ));
        let (first, phase) = load(dir.path(), &td(), DAY).expect("created");
        assert_eq!(phase, Phase::Idle);
        assert!(matches!(
            request(dir.path(), &td(), DAY).expect("requested"),
            Phase::Distributing { .. }
        ));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(NEXT_ROOT_KEY_FILE))
                .expect("key")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            request(dir.path(), &td(), DAY),
            Err(RotationError::InProgress("distributing"))
        ));
        // A restart in this phase signs with the old root and announces both.
        let (during, phase) = load(dir.path(), &td(), DAY).expect("loads");
        assert!(matches!(phase, Phase::Distributing { .. }));
        assert_eq!(during.bundle().roots().len(), 2);
        assert!(during.bundle().roots().any(|r| Some(r) == first.own_root()));
    }

    #[test]
    fn finalizing_interrupted_half_way_completes_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        load(dir.path(), &td(), DAY).expect("created");
        request(dir.path(), &td(), DAY).expect("requested");
        let next_cert = std::fs::read(dir.path().join(NEXT_ROOT_CERT_FILE)).expect("next");
        // Crash after the key was copied but before the certificate was.
        write_phase(dir.path(), &Phase::Finalizing).expect("phase");
        let key = std::fs::read(dir.path().join(NEXT_ROOT_KEY_FILE)).expect("key");
        std::fs::write(dir.path().join(ROOT_KEY_FILE), key).expect("copy");
        let (authority, phase) = load(dir.path(), &td(), DAY).expect("completes");
        assert_eq!(phase, Phase::Idle);
        assert_eq!(authority.bundle().roots().len(), 1);
        assert_eq!(
            std::fs::read(dir.path().join(ROOT_CERT_FILE)).expect("root"),
            next_cert
        );
        for gone in [NEXT_ROOT_CERT_FILE, NEXT_ROOT_KEY_FILE, ROTATION_FILE] {
            assert!(!dir.path().join(gone).exists(), "{gone}");
        }
    }

    #[test]
    fn a_broken_state_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        load(dir.path(), &td(), DAY).expect("created");
        std::fs::write(dir.path().join(ROTATION_FILE), "{\"phase\": \"nonsense\"}").expect("w");
        assert!(matches!(
            load(dir.path(), &td(), DAY),
            Err(RotationError::State { .. })
        ));
    }
}
