//! Open egress connections, kept so a policy change decides them again (as
//! [`crate::conntrack`] does for inbound): each is registered with what it was decided on
//! (its pins *at admission*, so a pin expiring later does not cut a live download) and a
//! token its relay watches; after every discovery update [`OpenEgress::recheck`] decides each
//! one against the new EgressPolicies and closes those now denied, logging the deciding
//! policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use membrane_policy::egress::{EgressDecision, EgressVerdict};
use tokio_util::sync::CancellationToken;

use super::{EgressAttrs, decide_attrs};
use crate::state::{MeshState, Workload};

struct Entry {
    source: Arc<Workload>,
    attrs: EgressAttrs,
    cancel: CancellationToken,
    revoked: Arc<OnceLock<EgressDecision>>,
}

/// The registry of open egress connections.
#[derive(Default)]
pub struct OpenEgress {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry>>,
}

impl std::fmt::Debug for OpenEgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenEgress")
            .field("open", &crate::lock(&self.map).len())
            .finish()
    }
}

/// One registered connection: its relay stops when `cancel` fires; `revoked` then holds the
/// decision that closed it. Dropping the handle unregisters it.
#[derive(Debug)]
pub struct OpenHandle {
    id: u64,
    registry: Arc<OpenEgress>,
    /// Fires when the connection must close.
    pub cancel: CancellationToken,
    /// The decision that closed it, when a policy change did.
    pub revoked: Arc<OnceLock<EgressDecision>>,
}

impl Drop for OpenHandle {
    fn drop(&mut self) {
        crate::lock(&self.registry.map).remove(&self.id);
    }
}

impl OpenEgress {
    /// Registers a connection of `source` decided on `attrs`; `cancel` is the token its relay
    /// watches (a budget window's child, when it has one).
    pub fn register(
        self: &Arc<Self>,
        source: Arc<Workload>,
        attrs: EgressAttrs,
        cancel: CancellationToken,
    ) -> OpenHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::new(OnceLock::new());
        crate::lock(&self.map).insert(
            id,
            Entry {
                source,
                attrs,
                cancel: cancel.clone(),
                revoked: revoked.clone(),
            },
        );
        OpenHandle {
            id,
            registry: self.clone(),
            cancel,
            revoked,
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        crate::lock(&self.map).len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides every open connection against `state` and closes the ones now denied.
    /// Returns how many were closed.
    pub fn recheck(&self, state: &MeshState) -> usize {
        let map = crate::lock(&self.map);
        let mut closed = 0;
        for entry in map.values() {
            if entry.cancel.is_cancelled() {
                continue;
            }
            // The source as the state describes it now: a relabelled pod is selected by
            // other EgressPolicies.
            let source = state.by_uid(&entry.source.uid).unwrap_or(&entry.source);
            let decision = decide_attrs(state, source, &entry.attrs);
            if decision.verdict != EgressVerdict::Deny {
                continue;
            }
            tracing::info!(
                src = %entry.source.identity,
                dst = %entry.attrs.dst,
                host = entry.attrs.pinned.first().map(String::as_str),
                sni = entry.attrs.sni.as_deref(),
                policy = decision.policy.as_deref(),
                reason = decision.reason.as_str(),
                "closing an open egress connection that policy no longer allows"
            );
            let _ = entry.revoked.set(decision);
            entry.cancel.cancel();
            closed += 1;
        }
        closed
    }
}
