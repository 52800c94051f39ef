//! What the reviewer remembers, by SHA-256 of the token (never the token itself): accepted
//! callers for `cache_ttl`, refusals for `negative_cache_ttl`. Each map is bounded; when full,
//! expired entries go first, then everything (a flood of distinct tokens must not grow it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub(super) use crate::node_auth::{Digest, sha256};

/// Values by token digest, each until its own expiry.
pub(super) struct Expiring<V> {
    entries: Mutex<HashMap<Digest, (V, Instant)>>,
    capacity: usize,
}

impl<V: Clone> Expiring<V> {
    /// An empty map holding at most `capacity` entries.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The value remembered for `digest`, unless it expired.
    pub(super) fn get(&self, digest: &Digest) -> Option<V> {
        let entries = membrane_runtime::lock(&self.entries);
        let (value, expires) = entries.get(digest)?;
        (Instant::now() < *expires).then(|| value.clone())
    }

    /// Remembers `value` for `digest` for `ttl` (nothing for a zero `ttl`).
    pub(super) fn insert(&self, digest: Digest, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = membrane_runtime::lock(&self.entries);
        if entries.len() >= self.capacity && !entries.contains_key(&digest) {
            entries.retain(|_, (_, expires)| *expires > now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(digest, (value, now + ttl));
    }

    /// How many entries are held (expired ones included).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        membrane_runtime::lock(&self.entries).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_expire_and_the_map_stays_bounded() {
        let (long, short) = (Duration::from_secs(60), Duration::from_millis(50));
        let cache = Expiring::new(2);
        cache.insert(sha256("a"), 1, long);
        cache.insert(sha256("b"), 2, short);
        cache.insert(sha256("zero"), 9, Duration::ZERO);
        assert_eq!(
            (cache.get(&sha256("a")), cache.get(&sha256("b"))),
            (Some(1), Some(2))
        );
        assert_eq!(cache.get(&sha256("zero")), None);
        tokio::time::sleep(short * 2).await;
        assert_eq!(cache.get(&sha256("b")), None, "expired");
        // Full: the expired entry makes room, the live one stays.
        cache.insert(sha256("c"), 3, long);
        assert_eq!(
            (cache.get(&sha256("a")), cache.get(&sha256("c"))),
            (Some(1), Some(3))
        );
        // Full of live entries: cleared rather than grown.
        cache.insert(sha256("d"), 4, long);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(&sha256("d")), Some(4));
    }
}
