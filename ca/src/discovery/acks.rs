//! Which nodes have applied which trust bundle (`Discovery.Ack`): root rotation waits on it.
//!
//! Everything is booked per *ack-book key*: a node's ztunnel credential books under the node's
//! name, a gateway pod's credential under a key of its own (`ack_book_key`), so a
//! gateway never confirms for its node's ztunnel nor the other way round.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use membrane_identity::TrustBundle;

/// What each node was sent and has confirmed (`Discovery.Ack`).
#[derive(Debug, Default)]
struct NodeAcks {
    /// Open streams of the node.
    streams: usize,
    /// The bundle last sent to the node, and the version of the update that carried it.
    bundle_sent: Option<(Arc<TrustBundle>, u64)>,
    /// Highest version sent to the node.
    last_sent: u64,
    /// Highest version the node confirmed (never above `last_sent`).
    acked: u64,
}

/// Which nodes have applied which trust bundle: root rotation waits on it.
#[derive(Debug, Clone, Default)]
pub struct AckBook(Arc<Mutex<HashMap<String, NodeAcks>>>);

impl AckBook {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, NodeAcks>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn opened(&self, node: &str) {
        self.with(|m| m.entry(node.to_owned()).or_default().streams += 1);
    }

    pub(super) fn closed(&self, node: &str) {
        self.with(|m| {
            if let Some(n) = m.get_mut(node) {
                n.streams = n.streams.saturating_sub(1);
            }
        });
    }

    pub(super) fn sent(&self, node: &str, version: u64) {
        self.with(|m| {
            let n = m.entry(node.to_owned()).or_default();
            n.last_sent = n.last_sent.max(version);
        });
    }

    pub(super) fn sent_bundle(&self, node: &str, bundle: Arc<TrustBundle>, version: u64) {
        self.with(|m| m.entry(node.to_owned()).or_default().bundle_sent = Some((bundle, version)));
    }

    /// Records a confirmation; a version never sent to the node counts only up to the last
    /// one that was (a confused or lying node cannot confirm a bundle ahead of receiving it).
    pub(super) fn acked(&self, node: &str, version: u64) {
        self.with(|m| {
            let n = m.entry(node.to_owned()).or_default();
            n.acked = n.acked.max(version.min(n.last_sent));
        });
    }

    /// Whether every node with an open stream has confirmed an update carrying `bundle`
    /// (trivially true with no node connected). Returns the nodes still waited for.
    pub fn pending(&self, bundle: &TrustBundle) -> Vec<String> {
        self.with(|m| {
            let mut waiting: Vec<String> = m
                .iter()
                .filter(|(_, n)| n.streams > 0)
                .filter(|(_, n)| match &n.bundle_sent {
                    Some((sent, version)) => **sent != *bundle || n.acked < *version,
                    None => true,
                })
                .map(|(node, _)| node.clone())
                .collect();
            waiting.sort();
            waiting
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_ack_ahead_of_what_was_sent_does_not_count() {
        let td = membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td");
        let dir = tempfile::tempdir().expect("tempdir");
        let ttl = Duration::from_secs(3600);
        let bundle = Arc::new(
            crate::SigningAuthority::load_or_create(dir.path(), &td, ttl)
                .expect("root")
                .bundle()
                .clone(),
        );
        let book = AckBook::default();
        book.opened("n1");
        assert_eq!(book.pending(&bundle), ["n1"]);
        book.sent("n1", 3);
        book.sent_bundle("n1", bundle.clone(), 5);
        book.acked("n1", u64::MAX);
        assert_eq!(book.pending(&bundle), ["n1"], "5 was never sent");
        book.sent("n1", 5);
        book.acked("n1", 5);
        assert!(book.pending(&bundle).is_empty());
        book.closed("n1");
        book.opened("n2");
        assert_eq!(book.pending(&bundle), ["n2"]);
    }
}
