//! Open inbound connections, kept so they can be re-authorized when policy changes.
//!
//! Each admitted connection registers its attributes (who, to what) and gets a cancellation
//! token its relay watches. When the policy changes, every open connection is decided again;
//! one that is no longer allowed is cancelled — both sides are reset — and the close is
//! logged with the deciding policy. The entry leaves the registry when its guard is dropped
//! (the relay ended).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::state::Workload;

/// What a connection's authorization was decided on.
#[derive(Debug, Clone)]
pub struct ConnAttrs {
    /// Verified SPIFFE ID of the source, if it had one (none for plaintext).
    pub source: Option<membrane_identity::WorkloadIdentity>,
    /// Source address.
    pub source_ip: IpAddr,
    /// The original client's address an ingress gateway of the mesh reported (`forwarded`
    /// from a verified gateway pod), for `remoteIpBlocks`; `None`: the source address.
    pub remote_ip: Option<IpAddr>,
    /// Destination workload.
    pub destination: Arc<Workload>,
    /// Destination address and port.
    pub destination_ip: IpAddr,
    /// Destination port.
    pub destination_port: u16,
}

struct Entry {
    attrs: ConnAttrs,
    cancel: tokio_util::sync::CancellationToken,
}

/// The registry of open inbound connections.
#[derive(Default)]
pub struct OpenConnections {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry>>,
}

impl std::fmt::Debug for OpenConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenConnections")
            .field("open", &crate::lock(&self.map).len())
            .finish()
    }
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct ConnGuard {
    id: u64,
    registry: Arc<OpenConnections>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        crate::lock(&self.registry.map).remove(&self.id);
    }
}

impl OpenConnections {
    /// Registers a connection; its relay must stop when the returned token is cancelled.
    pub fn register(
        self: &Arc<Self>,
        attrs: ConnAttrs,
    ) -> (tokio_util::sync::CancellationToken, ConnGuard) {
        let cancel = tokio_util::sync::CancellationToken::new();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        crate::lock(&self.map).insert(
            id,
            Entry {
                attrs,
                cancel: cancel.clone(),
            },
        );
        (
            cancel,
            ConnGuard {
                id,
                registry: self.clone(),
            },
        )
    }

    /// Replaces each open connection's destination pod with `state`'s description of it now
    /// (by UID; a pod the state no longer has keeps the last one): a relabelled pod's open
    /// connections are then re-checked against the policies that select it now.
    pub fn refresh_destinations(&self, state: &crate::state::MeshState) {
        let mut map = crate::lock(&self.map);
        for entry in map.values_mut() {
            if let Some(now) = state.by_uid(&entry.attrs.destination.uid)
                && !Arc::ptr_eq(now, &entry.attrs.destination)
            {
                entry.attrs.destination = now.clone();
            }
        }
    }

    /// Decides every open connection again with `still_allowed` (returning the reason to close
    /// it, if it is no longer allowed) and cancels the ones it refuses. Returns how many were
    /// closed.
    pub fn recheck(&self, still_allowed: impl Fn(&ConnAttrs) -> Result<(), String>) -> usize {
        let map = crate::lock(&self.map);
        let mut closed = 0;
        for entry in map.values() {
            if let Err(reason) = still_allowed(&entry.attrs) {
                tracing::info!(
                    src = entry.attrs.source.as_ref().map(|s| s.to_string()),
                    src_ip = %entry.attrs.source_ip,
                    dst = %entry.attrs.destination.identity,
                    dst_port = entry.attrs.destination_port,
                    reason,
                    "closing an open connection that policy no longer allows"
                );
                entry.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}
