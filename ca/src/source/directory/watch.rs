//! Watching the manifest directory: the poll loop, change detection (size, mtime, inode, then a
//! content hash), the last good objects of each file, and the merged [`ClusterState`] published
//! on change. Parsing is [`super::manifest`]'s; this module must not interpret a document.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::SourceMetrics;
use crate::source::model::ClusterState;

use super::fallback::{self, Unidentified};
use super::manifest::{DirService, DocumentError, Object, parse_manifests, resolve_service};

/// Files larger than this are refused (a manifest directory is not a data store).
pub const MAX_FILE_LEN: u64 = 8 * 1024 * 1024;

/// Why a file (or the directory) could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The directory or a file could not be read.
    #[error("{path}: {message}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error, as text.
        message: String,
    },
    /// A file is larger than [`MAX_FILE_LEN`].
    #[error("{path}: file is {len} bytes; the limit is {MAX_FILE_LEN}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// A document in a file is not acceptable.
    #[error("{path}: {error}")]
    Document {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        error: Box<DocumentError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: i128,
    inode: u64,
}

#[derive(Debug)]
struct FileEntry {
    stamp: Stamp,
    hash: u64,
    /// The last version of the file that parsed; kept while a newer version is broken. For a
    /// file that never parsed: deny-all stand-ins for its policy documents
    /// ([`fallback::stand_ins`]).
    objects: Vec<Object>,
    /// Whether `objects` is a version of the file that parsed.
    parsed: bool,
    /// A file that never parsed and whose documents cannot all be identified: why.
    unidentified: Option<Unidentified>,
    error: Option<SourceError>,
}

/// A manifest directory and the last good contents of each of its files.
#[derive(Debug)]
pub struct DirectorySource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    pod_networks: Vec<membrane_policy::IpNet>,
}

fn list_manifests(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let ty = entry.file_type()?;
        if ty.is_dir() {
            list_manifests(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

// === impl DirectorySource ===

impl DirectorySource {
    /// A source over `dir`; nothing is read until [`rescan`](Self::rescan).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            pod_networks: Vec::new(),
        }
    }

    /// The networks pod addresses are allocated from, set on every state; empty (the
    /// default): not checked ([`ClusterState::pod_networks`]).
    pub fn with_pod_networks(mut self, networks: Vec<membrane_policy::IpNet>) -> Self {
        self.pod_networks = networks;
        self
    }

    /// Re-reads what changed. Returns whether the merged state may have changed. A directory
    /// that cannot be listed is an error and changes nothing.
    pub fn rescan(&mut self) -> Result<bool, SourceError> {
        let mut paths = Vec::new();
        list_manifests(&self.dir, &mut paths).map_err(|e| SourceError::Io {
            path: self.dir.clone(),
            message: e.to_string(),
        })?;
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|p, _| paths.contains(p));
        changed |= self.files.len() != before;
        let fresh_window = SystemTime::now() - Duration::from_secs(2);
        for path in paths {
            changed |= self.refresh(&path, fresh_window);
        }
        Ok(changed)
    }

    fn refresh(&mut self, path: &Path, fresh_window: SystemTime) -> bool {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            // Raced with a delete: the next scan drops it.
            Err(_) => return false,
        };
        let stamp = Stamp {
            len: meta.len(),
            mtime: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
        };
        // A file modified in the last moments may change again within the same mtime tick:
        // re-read it by content until it settles.
        let recent = meta.modified().map_or(true, |m| m > fresh_window);
        if let Some(entry) = self.files.get(path)
            && entry.stamp == stamp
            && !recent
        {
            return false;
        }
        let result = if stamp.len > MAX_FILE_LEN {
            Err(SourceError::TooLarge {
                path: path.to_owned(),
                len: stamp.len,
            })
        } else {
            std::fs::read(path).map_err(|e| SourceError::Io {
                path: path.to_owned(),
                message: e.to_string(),
            })
        };
        let (bytes, h) = match result {
            Ok(bytes) => {
                let h = hash(&bytes);
                (Some(bytes), h)
            }
            Err(e) => return self.record_error(path, stamp, 0, e, None),
        };
        if let Some(entry) = self.files.get_mut(path)
            && entry.hash == h
        {
            entry.stamp = stamp;
            return false;
        }
        let text = String::from_utf8(bytes.unwrap_or_default());
        let parsed = match &text {
            Ok(text) => parse_manifests(text).map_err(|error| SourceError::Document {
                path: path.to_owned(),
                error: Box::new(error),
            }),
            Err(_) => Err(SourceError::Io {
                path: path.to_owned(),
                message: "file is not UTF-8".into(),
            }),
        };
        match parsed {
            Ok(objects) => {
                if let Some(old) = self.files.get(path)
                    && old.error.is_some()
                {
                    tracing::info!(file = %path.display(), "manifest file is valid again");
                }
                self.files.insert(
                    path.to_owned(),
                    FileEntry {
                        stamp,
                        hash: h,
                        objects,
                        parsed: true,
                        unidentified: None,
                        error: None,
                    },
                );
                true
            }
            Err(e) => self.record_error(path, stamp, h, e, text.as_deref().ok()),
        }
    }

    /// Records a rejected version (`text`: its text, when it is text). A file that parsed
    /// before keeps its last good objects; one that never did is replaced by the deny-all
    /// stand-ins of its policies, or marked unidentified. Returns whether its objects changed.
    fn record_error(
        &mut self,
        path: &Path,
        stamp: Stamp,
        h: u64,
        error: SourceError,
        text: Option<&str>,
    ) -> bool {
        let entry = self.files.entry(path.to_owned()).or_insert(FileEntry {
            stamp,
            hash: h,
            objects: Vec::new(),
            parsed: false,
            unidentified: None,
            error: None,
        });
        entry.stamp = stamp;
        entry.hash = h;
        let changed = if entry.parsed {
            tracing::warn!(file = %path.display(), error = %error, "manifest file rejected; keeping its last good version");
            false
        } else {
            let (objects, unidentified) = match fallback::stand_ins(text) {
                Ok(objects) => (objects, None),
                Err(why) => (Vec::new(), Some(why)),
            };
            match &unidentified {
                None => tracing::warn!(
                    file = %path.display(),
                    error = %error,
                    stand_ins = objects.len(),
                    "manifest file rejected and never valid; a deny-all stand-in is enforced for each of its policies"
                ),
                Some(why) => tracing::error!(
                    file = %path.display(),
                    error = %error,
                    unidentified = %why,
                    "manifest file rejected and never valid, and its documents cannot be identified: no stand-in can close its policies' scopes (no state is published until it parses, if none was yet)"
                ),
            }
            let changed = entry.objects != objects;
            entry.objects = objects;
            entry.unidentified = unidentified;
            changed
        };
        entry.error = Some(error);
        changed
    }

    /// Files that never parsed and whose documents cannot all be identified, with why: any
    /// of them may hold a policy that no stand-in closes.
    pub fn unidentified(&self) -> Vec<(PathBuf, Unidentified)> {
        self.files
            .iter()
            .filter_map(|(path, f)| Some((path.clone(), f.unidentified.clone()?)))
            .collect()
    }

    /// Deny-all stand-ins in force for files that never parsed.
    pub fn stand_ins(&self) -> usize {
        self.files
            .values()
            .filter(|f| !f.parsed)
            .map(|f| f.objects.len())
            .sum()
    }

    /// Files whose newest version is rejected, with the reason.
    pub fn errors(&self) -> Vec<SourceError> {
        self.files
            .values()
            .filter_map(|f| f.error.clone())
            .collect()
    }

    /// The merged state of every file's last good version. When two files define the same
    /// object, the one whose path sorts first wins and the conflict is logged.
    pub fn state(&self) -> ClusterState {
        let mut state = ClusterState {
            pod_networks: self.pod_networks.clone(),
            ..ClusterState::default()
        };
        let mut services: BTreeMap<(String, String), &DirService> = BTreeMap::new();
        for (path, file) in &self.files {
            for object in &file.objects {
                let duplicate = match object {
                    Object::Namespace(ns) => {
                        let dup = state.namespaces.contains_key(&ns.name);
                        state
                            .namespaces
                            .entry(ns.name.clone())
                            .or_insert_with(|| ns.clone());
                        dup.then(|| format!("Namespace {}", ns.name))
                    }
                    Object::Pod(pod) => {
                        let key = (pod.namespace.clone(), pod.name.clone());
                        let dup = state.pods.contains_key(&key);
                        state.pods.entry(key).or_insert_with(|| pod.clone());
                        dup.then(|| format!("Pod {}/{}", pod.namespace, pod.name))
                    }
                    Object::ServiceAccount(sa) => {
                        let key = (sa.namespace.clone(), sa.name.clone());
                        let dup = state.service_accounts.contains_key(&key);
                        state
                            .service_accounts
                            .entry(key)
                            .or_insert_with(|| sa.clone());
                        dup.then(|| format!("ServiceAccount {}/{}", sa.namespace, sa.name))
                    }
                    Object::Service(svc) => {
                        let key = (svc.namespace.clone(), svc.name.clone());
                        let dup = services.contains_key(&key);
                        services.entry(key).or_insert(svc);
                        dup.then(|| format!("Service {}/{}", svc.namespace, svc.name))
                    }
                    Object::Policy(entry) => {
                        let p = &entry.policy;
                        let key = (p.namespace().to_owned(), p.name().to_owned());
                        let dup = state.policies.contains_key(&key);
                        state.policies.entry(key).or_insert_with(|| entry.clone());
                        dup.then(|| format!("AuthorizationPolicy {}/{}", p.namespace(), p.name()))
                    }
                    Object::Gateway(gateway) => {
                        let key = (gateway.namespace.clone(), gateway.name.clone());
                        let dup = state.gateways.contains_key(&key);
                        state.gateways.entry(key).or_insert_with(|| gateway.clone());
                        dup.then(|| format!("Gateway {}/{}", gateway.namespace, gateway.name))
                    }
                    Object::Route(route) => {
                        let kind = match route.kind {
                            membrane_policy::gateway::RouteKind::Tcp => "TCPRoute",
                            membrane_policy::gateway::RouteKind::Tls => "TLSRoute",
                        };
                        let key = (route.namespace.clone(), route.name.clone(), kind);
                        let dup = state.routes.contains_key(&key);
                        state.routes.entry(key).or_insert_with(|| route.clone());
                        dup.then(|| format!("{kind} {}", route.key()))
                    }
                    Object::Egress(policy) => {
                        let key = (policy.namespace.clone(), policy.name.clone());
                        let dup = state.egress_policies.contains_key(&key);
                        state
                            .egress_policies
                            .entry(key)
                            .or_insert_with(|| policy.clone());
                        dup.then(|| format!("EgressPolicy {}", policy.key()))
                    }
                    Object::Federation(federation) => {
                        let key = federation.name.clone();
                        let dup = state.federations.contains_key(&key);
                        state
                            .federations
                            .entry(key)
                            .or_insert_with(|| federation.as_ref().clone());
                        dup.then(|| format!("TrustFederation {}", federation.name))
                    }
                };
                if let Some(object) = duplicate {
                    tracing::warn!(file = %path.display(), object, "object defined twice; the first definition wins");
                }
            }
        }
        let resolved: Vec<_> = services
            .into_iter()
            .map(|(key, svc)| (key, resolve_service(svc, &state)))
            .collect();
        state.services.extend(resolved);
        state
    }
}

/// How often a source withholding its first state says why.
const WITHHELD_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Loads `dir` once, then rescans it every `interval` until `cancel` fires, publishing each
/// changed state on `tx`; an unreadable directory is retried. A broken file that parsed before
/// keeps its last good version; one that never parsed contributes only deny-all stand-ins for
/// its policies. The first state is withheld while a file that never parsed cannot even be
/// told apart (its policies would vanish, and "no policy" means "allow"): the controller stays
/// not ready, says which files every 10 s, and counts them
/// (`membrane_ca_source_unidentified_files`). Once a state is out, such a file (new since, so
/// nothing of it was ever enforced) contributes nothing and is logged and counted alike.
pub async fn run(
    mut source: DirectorySource,
    interval: Duration,
    tx: watch::Sender<Option<Arc<ClusterState>>>,
    metrics: SourceMetrics,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld_logged: Option<(Vec<PathBuf>, tokio::time::Instant)> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match source.rescan() {
            Ok(changed) => {
                let errors = source.errors();
                metrics
                    .file_errors
                    .set(i64::try_from(errors.len()).unwrap_or(i64::MAX));
                let unidentified = source.unidentified();
                metrics
                    .unidentified_files
                    .set(i64::try_from(unidentified.len()).unwrap_or(i64::MAX));
                metrics
                    .deny_all_stand_ins
                    .set(i64::try_from(source.stand_ins()).unwrap_or(i64::MAX));
                if tx.borrow().is_none() && !unidentified.is_empty() {
                    log_withheld(&unidentified, &mut withheld_logged);
                    continue;
                }
                if changed || tx.borrow().is_none() {
                    let state = source.state();
                    let new = Some(Arc::new(state));
                    let published = tx.send_if_modified(|current| {
                        if current.as_deref() == new.as_deref() {
                            return false;
                        }
                        *current = new.clone();
                        true
                    });
                    if published {
                        metrics.reloads.inc();
                        if let Some(state) = &new {
                            tracing::info!(
                                dir = %source.dir.display(),
                                namespaces = state.namespaces.len(),
                                pods = state.pods.len(),
                                services = state.services.len(),
                                policies = state.policies.len(),
                                egress_policies = state.egress_policies.len(),
                                gateways = state.gateways.len(),
                                routes = state.routes.len(),
                                broken_files = errors.len(),
                                deny_all_stand_ins = source.stand_ins(),
                                "workload source loaded"
                            );
                            for ((ns, name), built) in state.ingress_tables() {
                                for route in &built.refused {
                                    crate::source::log_refused_route(
                                        &format_args!("{ns}/{name}"),
                                        route,
                                    );
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => {
                metrics.scan_failures.inc();
                tracing::warn!(error = %e, "cannot scan the manifest directory; keeping the last state");
            }
        }
    }
}

/// Says (at most every [`WITHHELD_LOG_PERIOD`], or when the files change) that the first state
/// is withheld, and because of which files.
fn log_withheld(
    unidentified: &[(PathBuf, Unidentified)],
    logged: &mut Option<(Vec<PathBuf>, tokio::time::Instant)>,
) {
    let files: Vec<PathBuf> = unidentified.iter().map(|(p, _)| p.clone()).collect();
    let now = tokio::time::Instant::now();
    if logged
        .as_ref()
        .is_some_and(|(last, at)| *last == files && now < *at + WITHHELD_LOG_PERIOD)
    {
        return;
    }
    for (path, why) in unidentified {
        tracing::error!(
            file = %path.display(),
            unidentified = %why,
            "workload source not loaded: this manifest file never parsed and its documents cannot be identified, so a policy in it could not be enforced or stood in for; fix or remove it"
        );
    }
    *logged = Some((files, now));
}
