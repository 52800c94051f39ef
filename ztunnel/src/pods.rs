//! The pods of this node the ztunnel knows, and the captured (enrolled) ones among them.
//!
//! A pod becomes *known* when the node side tells the ztunnel about it (`add` on the
//! enrollment socket: the CNI plugin does it for every new pod) or when the ztunnel finds it
//! by itself ([`scan`]). A known pod that the mesh state says is a mesh workload of this node
//! is *enrolled*: 15001/15006/15008 and the DNS capture's 15053 are bound inside its network
//! namespace ([`listeners`]) *before* the redirect rules are installed (so captured traffic
//! never meets a closed port), then the accept loops start. Removal cancels the pod's token (listeners close, open connections
//! end), deletes the rules and stops the namespace worker: nothing is left behind.
//!
//! Known pods outside the mesh are remembered, not refused: when the mesh state changes (a
//! namespace gets or loses its label, a pod appears or goes), the [`reconcile`] pass enrolls
//! or unenrolls them without anyone asking again. Everything known is persisted
//! (`<state-dir>/enrolled.json`), so a restarted ztunnel captures again what it captured, and
//! keeps knowing the rest. An explicit `remove` (the CNI plugin's DEL) forgets a pod; a pod
//! whose namespace is gone is forgotten by itself.

mod error;
pub mod listeners;
pub mod reconcile;
pub mod scan;

pub use error::EnrollError;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::dns::Dns;
use crate::netns::PodNetns;
use crate::proxy::{PodContext, Proxy, WorkloadCell};
use crate::redirect;
use crate::redirect::PodRules;
use crate::state::{MeshState, Workload};

/// How long an enrollment waits for the first mesh state.
pub const ENROLL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an enrollment waits for a pod the mesh state does not know yet, when its
/// namespace may be in the mesh (see [`PodRegistry::add`]).
pub const UNKNOWN_POD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the node side says about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Pod UID (what the mesh state is keyed on).
    pub uid: String,
    /// Its network namespace.
    pub netns: PathBuf,
    /// Its Kubernetes namespace, when the caller knows it.
    pub namespace: Option<String>,
    /// Its name, when the caller knows it.
    pub name: Option<String>,
    /// Its addresses, when the caller knows them.
    pub ips: Vec<IpAddr>,
}

/// One known pod, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// Pod UID.
    pub uid: String,
    /// Network namespace path.
    pub netns: PathBuf,
    /// Whether it was captured. Files written before pods outside the mesh were remembered
    /// list only captured pods, hence the default.
    #[serde(default = "captured")]
    pub enrolled: bool,
    /// Kubernetes namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pod name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
}

fn captured() -> bool {
    true
}

pub use membrane_api::enrollment::PodStatus;

/// A known pod.
#[derive(Debug, Clone)]
struct Known {
    netns: PathBuf,
    namespace: Option<String>,
    name: Option<String>,
    ips: Vec<IpAddr>,
    /// A previous run captured it: its rules may still be in its namespace.
    stale_rules: bool,
    /// The last enrollment failure.
    error: Option<String>,
}

/// A captured pod.
struct Enrolled {
    netns_path: PathBuf,
    context: Arc<PodContext>,
    /// The rule set's variable part, as installed.
    rules: PodRules,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Known pods (every enrolled one among them).
#[derive(Default)]
struct Pods {
    known: BTreeMap<String, Known>,
    enrolled: BTreeMap<String, Enrolled>,
}

/// The node's pods.
pub struct PodRegistry {
    proxy: Arc<Proxy>,
    dns: Arc<Dns>,
    pods: tokio::sync::Mutex<Pods>,
    persist: Option<PathBuf>,
    shutdown: CancellationToken,
    draining: CancellationToken,
    names: Mutex<BTreeMap<String, String>>,
    /// Whether the node's view of the mesh is current (see [`PodRegistry::with_current_view`]).
    current: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for PodRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodRegistry").finish_non_exhaustive()
    }
}

/// Whether two paths name the same network namespace (same nsfs inode), e.g.
/// `/var/run/netns/x` and `/run/netns/x`.
fn same_netns(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The workload `uid` if the state says it is a mesh workload of `node`.
fn local_mesh_workload(state: &MeshState, node: &str, uid: &str) -> Option<Arc<Workload>> {
    state
        .by_uid(uid)
        .filter(|w| w.node == node && w.captured())
        .cloned()
}

// === impl PodRegistry ===

impl PodRegistry {
    /// A registry persisting to `persist` (if set), answering its pods' DNS with `dns`. Pod
    /// listeners close when `draining` fires; open connections stop when `shutdown` fires.
    pub fn new(
        proxy: Arc<Proxy>,
        dns: Arc<Dns>,
        persist: Option<PathBuf>,
        draining: CancellationToken,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            proxy,
            dns,
            pods: tokio::sync::Mutex::new(Pods::default()),
            persist,
            shutdown,
            draining,
            names: Mutex::new(BTreeMap::new()),
            current: tokio::sync::watch::channel(true).1,
        }
    }

    /// Follows whether the node's view is current (the discovery stream is open and synced;
    /// a registry without it, as in local mode, always is). A pod the state does not know is
    /// answered "not in the mesh" only while the view is current.
    #[must_use]
    pub fn with_current_view(mut self, current: tokio::sync::watch::Receiver<bool>) -> Self {
        self.current = current;
        self
    }

    /// The first loaded mesh state, waiting up to [`ENROLL_WAIT`] for it.
    async fn loaded_state(&self) -> Option<Arc<MeshState>> {
        let mut state = self.proxy.state.clone();
        let loaded = tokio::time::timeout(ENROLL_WAIT, state.wait_for(|s| s.is_loaded())).await;
        match loaded {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Waits for the state to know pod `uid`: a pod can reach the CNI plugin before the
    /// controller announced it, so an unknown pod is waited for ([`UNKNOWN_POD_WAIT`]) —
    /// unless its namespace has no captured mesh workload at all (gateway pods do not count:
    /// they run in namespaces outside the mesh too). The state cannot say "this
    /// namespace is not in the mesh" (it holds only mesh workloads); a namespace without any
    /// is the closest it comes, and such a pod is answered at once. If it is the first pod of
    /// a namespace that just joined the mesh, the reconciler enrolls it as soon as the
    /// controller announces it.
    async fn wait_for_workload(&self, state: &MeshState, uid: &str, namespace: Option<&str>) {
        if state.by_uid(uid).is_some() {
            return;
        }
        if let Some(ns) = namespace
            && !state
                .workloads()
                .iter()
                .any(|w| w.namespace == ns && w.captured())
        {
            return;
        }
        let mut rx = self.proxy.state.clone();
        let _ =
            tokio::time::timeout(UNKNOWN_POD_WAIT, rx.wait_for(|s| s.by_uid(uid).is_some())).await;
    }

    /// Takes a pod from the node side. A mesh workload of this node is captured before this
    /// returns `Ok(true)`; any other pod of this node is remembered (`Ok(false)`) and enrolled
    /// later if it joins the mesh — but only while the node's view is current: with the
    /// discovery stream down, a pod the state does not know is refused
    /// ([`EnrollError::StaleView`], retryable) so that it cannot start outside the mesh. A
    /// pod of another node, or one whose namespace path does not exist or is not a network
    /// namespace other than the ztunnel's own, is refused. Idempotent:
    /// the same pod and namespace again re-installs the rules; another namespace replaces the
    /// old enrollment.
    pub async fn add(&self, pod: PodInfo) -> Result<bool, EnrollError> {
        // Checked before anything else (never blocks: see `open_netns_file`); a refused
        // path is not remembered.
        crate::netns::open_netns_file(&pod.netns).map_err(EnrollError::from_open)?;
        let Some(state) = self.loaded_state().await else {
            let mut pods = self.pods.lock().await;
            pods.remember(&pod);
            self.save(&pods);
            return Err(EnrollError::NotReady);
        };
        if state.by_uid(&pod.uid).is_none() && !*self.current.borrow() {
            // The stream may be reconnecting: give it the same short wait as an unknown pod.
            let mut current = self.current.clone();
            let _ = tokio::time::timeout(UNKNOWN_POD_WAIT, current.wait_for(|c| *c)).await;
        }
        let state = self.proxy.state.borrow().clone();
        self.wait_for_workload(&state, &pod.uid, pod.namespace.as_deref())
            .await;
        let uid = pod.uid.clone();
        let mut pods = self.pods.lock().await;
        // Decide on the newest state, read under the lock: the reconciler decides under it
        // too, so the two never act on states in the wrong order.
        let state = self.proxy.state.borrow().clone();
        let workload = state.by_uid(&uid).cloned();
        if let Some(w) = &workload
            && w.node != self.proxy.node
        {
            return Err(EnrollError::OtherNode {
                uid,
                node: w.node.clone(),
                this: self.proxy.node.clone(),
            });
        }
        pods.remember(&pod);
        let current = *self.current.borrow();
        let result = match workload.filter(|w| w.captured()) {
            Some(w) => self.enroll(&mut pods, &uid, w).await.map(|()| true),
            None if !current && state.by_uid(&uid).is_none() => {
                tracing::warn!(uid, namespace = ?pod.namespace, name = ?pod.name, "pod unknown while the node's view is not current; refused until the controller is reachable");
                Err(EnrollError::StaleView { uid: uid.clone() })
            }
            None => {
                if self.unenroll(&mut pods, &uid).await {
                    tracing::info!(uid, "pod is no longer a mesh workload; capture removed");
                }
                tracing::info!(uid, namespace = ?pod.namespace, name = ?pod.name, "pod is not a mesh workload; remembered");
                Ok(false)
            }
        };
        if let (Err(e), Some(k)) = (&result, pods.known.get_mut(&uid)) {
            k.error = Some(e.to_string());
        }
        self.save(&pods);
        result
    }

    /// Captures known pod `uid` as `workload` (see the module documentation for the order).
    async fn enroll(
        &self,
        pods: &mut Pods,
        uid: &str,
        workload: Arc<Workload>,
    ) -> Result<(), EnrollError> {
        let Some(netns) = pods.known.get(uid).map(|k| k.netns.clone()) else {
            return Ok(());
        };
        let rules = self.proxy.state.borrow().pod_rules(&workload);
        if let Some(existing) = pods.enrolled.get_mut(uid)
            && same_netns(&existing.netns_path, &netns)
        {
            existing.context.workload.set(&workload);
            redirect::install(&existing.context.netns, &rules).await?;
            existing.rules = rules;
            return Ok(());
        }
        self.unenroll(pods, uid).await;
        let pod_netns = Arc::new(PodNetns::open(&netns)?);
        let bound = listeners::bind(&pod_netns).await?;
        redirect::install(&pod_netns, &rules).await?;
        // Only once captured (a failed enrollment leaves the pod as it was); connections
        // accepted on 15001 take the namespace's default at their handshake.
        pod_congestion(&pod_netns, crate::congestion::enroll_job()).await;
        let context = Arc::new(PodContext {
            workload: WorkloadCell::new(workload.clone()),
            netns: pod_netns,
            accepting: self.draining.child_token(),
            cancel: self.shutdown.child_token(),
            tunnels: Default::default(),
        });
        let proxy = self.proxy.clone();
        let tasks = listeners::spawn(bound, &self.dns, &context, &proxy);
        // Fetch the certificate now so the first connection does not wait for it.
        let (certs, identity) = (proxy.certs.clone(), workload.identity.clone());
        tokio::spawn(async move {
            if let Err(e) = certs.svid(&identity).await {
                tracing::warn!(%identity, error = %e, "could not obtain the workload certificate yet");
            }
        });
        tracing::info!(uid, pod = %workload.name, namespace = %workload.namespace, netns = %netns.display(), "pod enrolled");
        crate::lock(&self.names).insert(
            uid.to_owned(),
            format!("{}/{}", workload.namespace, workload.name),
        );
        pods.enrolled.insert(
            uid.to_owned(),
            Enrolled {
                netns_path: netns,
                context,
                rules,
                tasks,
            },
        );
        if let Some(k) = pods.known.get_mut(uid) {
            k.stale_rules = false;
            k.error = None;
        }
        Ok(())
    }

    /// Stops capturing pod `uid` (it stays known); whether it was captured.
    async fn unenroll(&self, pods: &mut Pods, uid: &str) -> bool {
        let Some(enrolled) = pods.enrolled.remove(uid) else {
            return false;
        };
        let identity = enrolled.context.workload().identity.clone();
        Self::teardown(enrolled).await;
        if !pods
            .enrolled
            .values()
            .any(|p| p.context.workload().identity == identity)
        {
            self.proxy.certs.forget(&identity);
            self.proxy.tls.forget(identity.spiffe_id());
        }
        crate::lock(&self.names).remove(uid);
        self.proxy.pins.forget(uid);
        true
    }

    /// Forgets pod `uid`, removing its capture; unknown pods are not an error (removal is
    /// idempotent). Returns whether it was captured. With `netns` (the namespace of the
    /// sandbox being torn down), a pod known in another namespace is kept: a runtime may send
    /// the DEL of an older sandbox after the ADD of its successor, and removing by UID alone
    /// would leave the running pod uncaptured.
    pub async fn remove(&self, uid: &str, netns: Option<&Path>) -> Result<bool, EnrollError> {
        let mut pods = self.pods.lock().await;
        if let (Some(del), Some(known)) = (netns, pods.known.get(uid))
            && !same_namespace(del, &known.netns)
        {
            tracing::info!(uid, netns = %del.display(), enrolled_in = %known.netns.display(), "DEL of another sandbox of the pod ignored: it is known in another namespace");
            return Ok(false);
        }
        let was_enrolled = self.unenroll(&mut pods, uid).await;
        let was_known = pods.known.remove(uid).is_some();
        if was_enrolled || was_known {
            tracing::info!(uid, was_enrolled, "pod removed");
            self.save(&pods);
        }
        Ok(was_enrolled)
    }

    async fn teardown(enrolled: Enrolled) {
        enrolled.context.accepting.cancel();
        enrolled.context.cancel.cancel();
        for task in enrolled.tasks {
            let _ = task.await;
        }
        // Restored while still captured: no connection of the pod's leaves the node with it.
        pod_congestion(&enrolled.context.netns, crate::congestion::unenroll_job()).await;
        if let Err(e) = redirect::remove(&enrolled.context.netns).await {
            tracing::warn!(netns = %enrolled.netns_path.display(), error = %e, "could not remove redirect rules");
        }
    }

    /// Every known pod, captured or not.
    pub async fn list(&self) -> Vec<PodStatus> {
        let state = self.proxy.state.borrow().clone();
        let pods = self.pods.lock().await;
        pods.known
            .iter()
            .map(|(uid, k)| {
                let workload = local_mesh_workload(&state, &self.proxy.node, uid);
                let enrolled = pods.enrolled.contains_key(uid);
                PodStatus {
                    uid: uid.clone(),
                    netns: k.netns.clone(),
                    enrolled,
                    mesh: workload.is_some(),
                    namespace: k.namespace.clone(),
                    name: k.name.clone(),
                    ips: match (&workload, k.ips.is_empty()) {
                        (Some(w), true) => w.ips.clone(),
                        _ => k.ips.clone(),
                    },
                    error: k.error.clone().filter(|_| !enrolled),
                }
            })
            .collect()
    }

    /// Each enrolled pod's UID and context (for reading its counters).
    pub async fn enrolled_pods(&self) -> Vec<(String, Arc<PodContext>)> {
        let pods = self.pods.lock().await;
        pods.enrolled
            .iter()
            .map(|(uid, e)| (uid.clone(), e.context.clone()))
            .collect()
    }

    /// The DNS capture of the node's pods.
    pub fn dns(&self) -> &Dns {
        &self.dns
    }

    /// `namespace/name` of each enrolled pod by UID (for the config dump; never blocks).
    pub fn names(&self) -> BTreeMap<String, String> {
        crate::lock(&self.names).clone()
    }

    /// Loads the pods persisted by a previous run. They are enrolled (or their leftover
    /// rules lifted) by the next [`reconcile`] pass, which the caller runs.
    pub async fn restore(&self) {
        let Some(path) = &self.persist else { return };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let saved: Vec<PodRecord> = match serde_json::from_str(&text) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable enrollment state");
                return;
            }
        };
        let mut pods = self.pods.lock().await;
        for record in saved {
            pods.known.insert(
                record.uid,
                Known {
                    netns: record.netns,
                    namespace: record.namespace,
                    name: record.name,
                    ips: record.ips,
                    stale_rules: record.enrolled,
                    error: None,
                },
            );
        }
        tracing::info!(pods = pods.known.len(), "pods of the previous run loaded");
    }

    /// Removes every pod's capture (used at shutdown when `unenroll` is requested; a normal
    /// restart keeps the rules so traffic stays captured). The pods stay known, so a
    /// restarted ztunnel captures the mesh workloads among them again.
    pub async fn remove_all(&self) {
        let mut pods = self.pods.lock().await;
        let uids: Vec<String> = pods.enrolled.keys().cloned().collect();
        for uid in uids {
            self.unenroll(&mut pods, &uid).await;
        }
        self.save(&pods);
    }

    fn save(&self, pods: &Pods) {
        let Some(path) = &self.persist else { return };
        let list: Vec<PodRecord> = pods
            .known
            .iter()
            .map(|(uid, k)| PodRecord {
                uid: uid.clone(),
                netns: k.netns.clone(),
                enrolled: pods.enrolled.contains_key(uid),
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                ips: k.ips.clone(),
            })
            .collect();
        let result = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| membrane_runtime::fsutil::write_atomic(path, &bytes, 0o600));
        if let Err(e) = result {
            tracing::warn!(file = %path.display(), error = %e, "could not persist enrollment state");
        }
    }
}

impl Pods {
    /// Records what the node side says about a pod (its leftover-rules mark survives).
    fn remember(&mut self, pod: &PodInfo) {
        let stale_rules = self.known.get(&pod.uid).is_some_and(|k| k.stale_rules);
        let mut known = Known::from(pod);
        known.stale_rules = stale_rules;
        self.known.insert(pod.uid.clone(), known);
    }
}

impl From<&PodInfo> for Known {
    fn from(pod: &PodInfo) -> Self {
        Self {
            netns: pod.netns.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ips: pod.ips.clone(),
            stale_rules: false,
            error: None,
        }
    }
}

/// Runs a change of the pod's default congestion control inside its namespace, reporting a
/// failure (which changes nothing else).
pub(super) async fn pod_congestion(netns: &PodNetns, job: Option<crate::congestion::PodJob>) {
    let Some(job) = job else { return };
    let job = Arc::new(job);
    let run = job.clone();
    let error = match netns.run(move || run.run()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    job.report(netns.path(), error);
}

/// Whether two namespace paths name the same namespace: the same path, or files on the same
/// device with the same inode (`/run/netns/x` and `/var/run/netns/x`, a bind mount).
fn same_namespace(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_earlier_versions_were_all_captured() {
        let old: Vec<PodRecord> =
            serde_json::from_str(r#"[{"uid":"u1","netns":"/run/netns/p"}]"#).expect("old file");
        assert!(old[0].enrolled);
        let new = PodRecord {
            uid: "u2".into(),
            netns: "/run/netns/q".into(),
            enrolled: false,
            namespace: Some("shop".into()),
            name: None,
            ips: vec!["10.0.0.2".parse().expect("ip")],
        };
        let text = serde_json::to_string(&new).expect("json");
        assert_eq!(
            text,
            r#"{"uid":"u2","netns":"/run/netns/q","enrolled":false,"namespace":"shop","ips":["10.0.0.2"]}"#
        );
        assert_eq!(
            serde_json::from_str::<PodRecord>(&text).expect("again"),
            new
        );
    }

    #[test]
    fn the_same_namespace_under_two_paths_is_recognised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ns");
        std::fs::write(&file, b"").expect("file");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(same_netns(&file, &link));
        assert!(!same_netns(&file, &dir.path().join("absent")));
    }
}
