//! The enrolled pods of this node: enrollment and removal.
//!
//! Enrolling a pod binds 15001/15006/15008 inside its network namespace *before* installing
//! the redirect rules (so captured traffic never meets a closed port), then starts the accept
//! loops. Removal cancels the pod's token (listeners close, open connections end), deletes the
//! rules, and stops the namespace worker: nothing is left behind. The set of enrolled pods is
//! persisted so a restarted ztunnel re-enrolls them without the node side asking again.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::netns::{NetnsError, PodNetns};
use crate::proxy::{PodContext, Proxy};
use crate::redirect::{
    self, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, RedirectError,
};
use crate::state::Protocol;

/// How long an enrollment waits for the first mesh state.
pub const ENROLL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an enrollment waits for an unknown pod to appear in the mesh state.
pub const UNKNOWN_POD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
use crate::{inbound, outbound};

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The ztunnel has no mesh state yet (the controller's first snapshot has not arrived).
    #[error("the ztunnel has not received the mesh state from the controller yet; retry shortly")]
    NotReady,
    /// The controller's (or the file's) state has no pod with this UID.
    #[error("unknown pod uid {0}: no such workload in the mesh state")]
    UnknownPod(String),
    /// The pod is scheduled on another node.
    #[error("pod {uid} runs on node {node}, not on this node ({this})")]
    OtherNode {
        /// Pod UID.
        uid: String,
        /// Its node.
        node: String,
        /// This node.
        this: String,
    },
    /// The pod is not a mesh workload.
    #[error("pod {0} is not in the mesh (protocol TCP)")]
    NotInMesh(String),
    /// The namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A listener could not be bound in the pod.
    #[error("cannot listen on port {port} in the pod: {source}")]
    Listen {
        /// Port.
        port: u16,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// The redirect rules could not be installed.
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

/// One enrolled pod, as persisted and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// Pod UID.
    pub uid: String,
    /// Network namespace path.
    pub netns: PathBuf,
}

struct Enrolled {
    netns_path: PathBuf,
    context: Arc<PodContext>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The node's enrolled pods.
pub struct PodRegistry {
    proxy: Arc<Proxy>,
    pods: tokio::sync::Mutex<BTreeMap<String, Enrolled>>,
    persist: Option<PathBuf>,
    shutdown: CancellationToken,
    draining: CancellationToken,
    names: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for PodRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodRegistry").finish_non_exhaustive()
    }
}

// === impl PodRegistry ===

impl PodRegistry {
    /// A registry persisting to `persist` (if set). Pod listeners close when `draining` fires;
    /// open connections stop when `shutdown` fires.
    pub fn new(
        proxy: Arc<Proxy>,
        persist: Option<PathBuf>,
        draining: CancellationToken,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            proxy,
            pods: tokio::sync::Mutex::new(BTreeMap::new()),
            persist,
            shutdown,
            draining,
            names: Mutex::new(BTreeMap::new()),
        }
    }

    /// The workload `uid`, waiting a moment for it: a pod can reach the CNI before the
    /// controller's stream announced it, and nothing is known before the first snapshot.
    async fn workload(&self, uid: &str) -> Result<Arc<crate::state::Workload>, EnrollError> {
        let mut state = self.proxy.state.clone();
        let loaded = tokio::time::timeout(ENROLL_WAIT, state.wait_for(|s| s.is_loaded()))
            .await
            .is_ok_and(|r| r.is_ok());
        if !loaded {
            return Err(EnrollError::NotReady);
        }
        let found = tokio::time::timeout(
            UNKNOWN_POD_WAIT,
            state.wait_for(|s| s.by_uid(uid).is_some()),
        )
        .await;
        match found {
            Ok(Ok(s)) => s
                .by_uid(uid)
                .cloned()
                .ok_or_else(|| EnrollError::UnknownPod(uid.to_owned())),
            _ => Err(EnrollError::UnknownPod(uid.to_owned())),
        }
    }

    /// Enrolls pod `uid` living in the network namespace at `netns`. Idempotent: enrolling the
    /// same pod with the same namespace again re-installs the rules; with another namespace
    /// replaces the old enrollment.
    pub async fn add(&self, uid: &str, netns: &Path) -> Result<(), EnrollError> {
        let workload = self.workload(uid).await?;
        if workload.node != self.proxy.node {
            return Err(EnrollError::OtherNode {
                uid: uid.to_owned(),
                node: workload.node.clone(),
                this: self.proxy.node.clone(),
            });
        }
        if workload.protocol != Protocol::Hbone {
            return Err(EnrollError::NotInMesh(uid.to_owned()));
        }
        let mut pods = self.pods.lock().await;
        if let Some(existing) = pods.get(uid)
            && existing.netns_path == netns
        {
            redirect::install(&existing.context.netns).await?;
            return Ok(());
        }
        if let Some(old) = pods.remove(uid) {
            Self::teardown(old).await;
        }
        let pod_netns = Arc::new(PodNetns::open(netns)?);
        let bind = |port: u16| {
            let netns = pod_netns.clone();
            async move {
                netns
                    .listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
                    .await
                    .map_err(|source| EnrollError::Listen { port, source })
            }
        };
        let outbound_l = bind(OUTBOUND_PORT).await?;
        let plaintext_l = bind(INBOUND_PLAINTEXT_PORT).await?;
        let hbone_l = bind(INBOUND_HBONE_PORT).await?;
        redirect::install(&pod_netns).await?;
        let context = Arc::new(PodContext {
            workload: workload.clone(),
            netns: pod_netns,
            accepting: self.draining.child_token(),
            cancel: self.shutdown.child_token(),
        });
        let proxy = self.proxy.clone();
        let tasks = vec![
            tokio::spawn(outbound::run(outbound_l, context.clone(), proxy.clone())),
            tokio::spawn(inbound::run_plaintext(
                plaintext_l,
                context.clone(),
                proxy.clone(),
            )),
            tokio::spawn(inbound::run_hbone(hbone_l, context.clone(), proxy.clone())),
        ];
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
        pods.insert(
            uid.to_owned(),
            Enrolled {
                netns_path: netns.to_owned(),
                context,
                tasks,
            },
        );
        self.save(&pods);
        Ok(())
    }

    /// Removes pod `uid`; unknown pods are not an error (removal is idempotent).
    pub async fn remove(&self, uid: &str) -> Result<bool, EnrollError> {
        let mut pods = self.pods.lock().await;
        let Some(enrolled) = pods.remove(uid) else {
            return Ok(false);
        };
        let identity = enrolled.context.workload.identity.clone();
        Self::teardown(enrolled).await;
        if !pods
            .values()
            .any(|p| p.context.workload.identity == identity)
        {
            self.proxy.certs.forget(&identity);
        }
        crate::lock(&self.names).remove(uid);
        tracing::info!(uid, "pod removed");
        self.save(&pods);
        Ok(true)
    }

    async fn teardown(enrolled: Enrolled) {
        enrolled.context.accepting.cancel();
        enrolled.context.cancel.cancel();
        for task in enrolled.tasks {
            let _ = task.await;
        }
        if let Err(e) = redirect::remove(&enrolled.context.netns).await {
            tracing::warn!(netns = %enrolled.netns_path.display(), error = %e, "could not remove redirect rules");
        }
    }

    /// The enrolled pods.
    pub async fn list(&self) -> Vec<Enrollment> {
        self.pods
            .lock()
            .await
            .iter()
            .map(|(uid, p)| Enrollment {
                uid: uid.clone(),
                netns: p.netns_path.clone(),
            })
            .collect()
    }

    /// `namespace/name` of each enrolled pod by UID (for the config dump; never blocks).
    pub fn names(&self) -> BTreeMap<String, String> {
        crate::lock(&self.names).clone()
    }

    /// Re-enrolls the pods persisted by a previous run (skipping ones that are gone).
    pub async fn restore(&self) {
        let Some(path) = &self.persist else { return };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let saved: Vec<Enrollment> = match serde_json::from_str(&text) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable enrollment state");
                return;
            }
        };
        for pod in saved {
            match self.add(&pod.uid, &pod.netns).await {
                Ok(()) => tracing::info!(uid = pod.uid, "pod re-enrolled after restart"),
                Err(e) => {
                    tracing::warn!(uid = pod.uid, error = %e, "could not re-enroll pod after restart")
                }
            }
        }
    }

    /// Removes every pod's rules and stops their tasks (used at shutdown when `unenroll` is
    /// requested; a normal restart keeps the rules so traffic stays captured).
    pub async fn remove_all(&self) {
        let uids: Vec<String> = self.pods.lock().await.keys().cloned().collect();
        for uid in uids {
            let _ = self.remove(&uid).await;
        }
    }

    fn save(&self, pods: &BTreeMap<String, Enrolled>) {
        let Some(path) = &self.persist else { return };
        let list: Vec<Enrollment> = pods
            .iter()
            .map(|(uid, p)| Enrollment {
                uid: uid.clone(),
                netns: p.netns_path.clone(),
            })
            .collect();
        let result = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = result {
            tracing::warn!(file = %path.display(), error = %e, "could not persist enrollment state");
        }
    }
}
