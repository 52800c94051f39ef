//! The reconciler: makes the captured pods follow the mesh state.
//!
//! One pass, run at start (after the previous run's pods are loaded) and on every change of
//! the mesh state:
//!
//! 1. a captured pod that is no longer a mesh workload of this node (its namespace lost the
//!    label, it opted out, it was deleted) is unenrolled: its listeners close and its open
//!    connections end (the application sees them closed or reset); its new connections go
//!    out uncaptured. It stays known, so a label set again captures it again;
//! 2. a known pod that became a mesh workload of this node (its namespace got the label) is
//!    enrolled; connections it opened before stay as they were (uncaptured) until they end,
//!    new ones are captured. A known pod whose network namespace is gone is forgotten; one
//!    that a previous run captured and that is no longer in the mesh gets its leftover rules
//!    lifted;
//! 3. with a [`NetnsScanner`] (`--netns-dir`): a mesh workload of this node that nobody told
//!    the ztunnel about (a pod that existed before Membrane, or whose CNI call was missed) is
//!    looked up by address among the node's network namespaces and enrolled. A namespace the
//!    registry already knows under another pod's UID is never a candidate (it is that pod's,
//!    whatever addresses it carries: a recycled address, or one a pod with `NET_ADMIN` put
//!    on its own interface): it is left out, logged and counted
//!    (`membrane_netns_scan_skipped_total{reason="known_pod"}`).
//!
//! A pass that could not finish (an enrollment failed, a workload's namespace was not found)
//! is retried after [`RETRY_INTERVAL`] even if the state does not change.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::scan::{Located, NetnsScanner};
use super::{Known, PodRegistry, local_mesh_workload, same_netns};
use crate::netns::PodNetns;
use crate::redirect;
use crate::state::MeshState;

/// Delay before an unfinished pass is retried.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(3);

/// What a pass left undone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Something failed or was not found: run again after [`RETRY_INTERVAL`].
    pub retry: bool,
}

/// Runs passes until `cancel` fires: after every change of the mesh state, and after
/// [`RETRY_INTERVAL`] when one was left unfinished.
#[derive(Debug)]
pub struct Reconciler {
    pods: Arc<PodRegistry>,
    state: watch::Receiver<Arc<MeshState>>,
    scanner: Option<NetnsScanner>,
}

// === impl Reconciler ===

impl Reconciler {
    /// A reconciler of `pods`; with `scanner`, it also finds pods nobody told it about.
    pub fn new(pods: Arc<PodRegistry>, scanner: Option<NetnsScanner>) -> Self {
        let state = pods.proxy.state.clone();
        Self {
            pods,
            state,
            scanner,
        }
    }

    /// One pass over the current state.
    pub async fn pass(&mut self) -> Pass {
        // Changes from here on trigger another pass; the pass itself reads the newest state.
        self.state.borrow_and_update();
        self.pods.reconcile(self.scanner.as_mut()).await
    }

    /// Passes until `cancel` fires (the first one right away).
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let pass = self.pass().await;
            let retry = async {
                if pass.retry {
                    tokio::time::sleep(RETRY_INTERVAL).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = self.state.changed() => if changed.is_err() { return },
                () = retry => {}
            }
        }
    }
}

impl PodRegistry {
    /// One reconciliation pass against the newest mesh state (see the module
    /// documentation). The state is read under the pods' lock, as `add` reads it, so the two
    /// never act on states in the wrong order.
    pub(crate) async fn reconcile(&self, scanner: Option<&mut NetnsScanner>) -> Pass {
        let mut pods = self.pods.lock().await;
        let state: Arc<MeshState> = self.proxy.state.borrow().clone();
        let state = state.as_ref();
        if !state.is_loaded() {
            return Pass::default();
        }
        let node = self.proxy.node.as_str();
        let mut pass = Pass::default();
        let mut changed = false;

        // 1. Captured pods that left the mesh.
        let enrolled: Vec<String> = pods.enrolled.keys().cloned().collect();
        for uid in enrolled {
            let Some(workload) = local_mesh_workload(state, node, &uid) else {
                self.unenroll(&mut pods, &uid).await;
                tracing::info!(
                    uid,
                    "pod is no longer a mesh workload of this node: capture removed, its open connections closed"
                );
                changed = true;
                continue;
            };
            // Its namespace's UDP rule changed (plaintext mode, open ports), or an ALLOW
            // EgressPolicy began or ceased to select it: install anew.
            let rules = state.pod_rules(&workload);
            let Some(e) = pods.enrolled.get_mut(&uid) else {
                continue;
            };
            // Its addresses or labels changed (an address is often published only after the
            // pod was captured): new connections see the pod as the state describes it now.
            if e.context.workload.set(&workload) {
                tracing::info!(uid, ips = ?workload.ips, "pod's workload updated");
            }
            if e.rules != rules {
                match redirect::install(&e.context.netns, &rules).await {
                    Ok(()) => {
                        tracing::info!(uid, udp = ?rules.udp, egress_locked = rules.egress_locked, "rules of the pod updated");
                        e.rules = rules;
                    }
                    Err(error) => {
                        tracing::warn!(uid, error = %error, "could not update the pod's rules; will retry");
                        pass.retry = true;
                    }
                }
            }
        }

        // 2. Known pods that joined the mesh, went away, or kept a previous run's rules.
        let known: Vec<(String, Known)> = pods
            .known
            .iter()
            .filter(|(uid, _)| !pods.enrolled.contains_key(*uid))
            .map(|(uid, k)| (uid.clone(), k.clone()))
            .collect();
        for (uid, k) in known {
            if !k.netns.exists() {
                pods.known.remove(&uid);
                tracing::info!(uid, netns = %k.netns.display(), "pod forgotten: its network namespace is gone");
                changed = true;
                continue;
            }
            if let Some(workload) = local_mesh_workload(state, node, &uid) {
                match self.enroll(&mut pods, &uid, workload).await {
                    Ok(()) => {
                        tracing::info!(uid, "known pod became a mesh workload: captured");
                        changed = true;
                    }
                    Err(e) => {
                        tracing::warn!(uid, error = %e, "could not enroll a mesh workload; will retry");
                        if let Some(k) = pods.known.get_mut(&uid) {
                            k.error = Some(e.to_string());
                        }
                        pass.retry = true;
                    }
                }
            } else if k.stale_rules {
                lift_rules(&uid, &k).await;
                if let Some(k) = pods.known.get_mut(&uid) {
                    k.stale_rules = false;
                }
                changed = true;
            }
        }

        // 3. Mesh workloads of this node nobody told us about.
        if let Some(scanner) = scanner {
            let untold: Vec<_> = state
                .workloads()
                .into_iter()
                .filter(|w| w.node == node && w.captured() && !pods.known.contains_key(&w.uid))
                .collect();
            for workload in untold {
                let found = scanner
                    .locate(&workload.ips, |p| known_as(&pods.known, p).is_some())
                    .await;
                for path in &found.taken {
                    let known_uid = known_as(&pods.known, path).unwrap_or_default();
                    tracing::warn!(
                        uid = workload.uid,
                        netns = %path.display(),
                        known_uid,
                        reason = "known_pod",
                        "a network namespace holding the workload's address is known under another pod's UID; not enrolling the workload into it"
                    );
                    scanner.metrics().skipped("known_pod");
                }
                let netns = match found.located {
                    Located::One(path) => path,
                    Located::Several(paths) => {
                        tracing::warn!(
                            uid = workload.uid,
                            ?paths,
                            "several network namespaces hold the pod's address; not enrolling it until one is left"
                        );
                        pass.retry = true;
                        continue;
                    }
                    Located::None => {
                        tracing::debug!(
                            uid = workload.uid,
                            "no network namespace holds the pod's address yet"
                        );
                        pass.retry = true;
                        continue;
                    }
                };
                let uid = workload.uid.clone();
                pods.known.insert(
                    uid.clone(),
                    Known {
                        netns: netns.clone(),
                        namespace: Some(workload.namespace.clone()),
                        name: Some(workload.name.clone()),
                        ips: workload.ips.clone(),
                        stale_rules: false,
                        error: None,
                    },
                );
                changed = true;
                match self.enroll(&mut pods, &uid, workload).await {
                    Ok(()) => {
                        tracing::info!(uid, netns = %netns.display(), "found a mesh pod nobody enrolled: captured")
                    }
                    Err(e) => {
                        tracing::warn!(uid, error = %e, "could not enroll a pod found on the node; will retry");
                        if let Some(k) = pods.known.get_mut(&uid) {
                            k.error = Some(e.to_string());
                        }
                        pass.retry = true;
                    }
                }
            }
        }

        if changed {
            self.save(&pods);
        }
        pass
    }
}

/// The UID under which a namespace is known (the same nsfs inode as `netns`), if any.
fn known_as(known: &BTreeMap<String, Known>, netns: &Path) -> Option<String> {
    known
        .iter()
        .find(|(_, k)| same_netns(&k.netns, netns))
        .map(|(uid, _)| uid.clone())
}

/// Removes the rules a previous run left in a pod that is no longer a mesh workload (its
/// traffic would otherwise be redirected to ports nobody listens on).
async fn lift_rules(uid: &str, known: &Known) {
    let result = match PodNetns::open(&known.netns) {
        Ok(netns) => {
            // The congestion control the previous run set goes back first (while captured).
            super::pod_congestion(&netns, crate::congestion::unenroll_job()).await;
            redirect::remove(&netns).await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => tracing::info!(
            uid,
            "pod captured by the previous run is no longer a mesh workload: rules removed"
        ),
        Err(error) => {
            tracing::warn!(uid, error, "could not remove the previous run's rules")
        }
    }
}
