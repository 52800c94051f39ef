//! Counted places per key — per peer address, per source identity, per trust domain — at most
//! a limit each, given back when the holder drops its [`Slot`]. The bookkeeping behind every
//! "at most N per peer" cap.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::lock;

/// How many places each key holds now. Cheap to clone (shared counts).
#[derive(Debug)]
pub struct KeyedSlots<K: Eq + Hash>(Arc<Mutex<HashMap<K, usize>>>);

impl<K: Eq + Hash> Clone for KeyedSlots<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K: Eq + Hash> Default for KeyedSlots<K> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

/// One place of one key, counted until dropped.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash> {
    slots: KeyedSlots<K>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone> KeyedSlots<K> {
    /// A place for `key` if it holds fewer than `limit`; `None` otherwise.
    pub fn take(&self, key: &K, limit: usize) -> Option<Slot<K>> {
        let mut counts = lock(&self.0);
        let count = counts.entry(key.clone()).or_default();
        if *count >= limit {
            if *count == 0 {
                counts.remove(key);
            }
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: self.clone(),
            key: Some(key.clone()),
        })
    }

    /// The places `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        lock(&self.0).get(key).copied().unwrap_or(0)
    }

    /// Whether no key holds a place.
    pub fn is_empty(&self) -> bool {
        lock(&self.0).is_empty()
    }
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut counts = lock(&self.slots.0);
        if let Some(count) = counts.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_limit_and_dropping_frees_a_place() {
        let slots = KeyedSlots::default();
        let mut held: Vec<Slot<&str>> = (0..3)
            .map(|_| slots.take(&"a", 3).expect("under the limit"))
            .collect();
        assert!(slots.take(&"a", 3).is_none());
        let other = slots.take(&"b", 3).expect("another key");
        assert_eq!((slots.held(&"a"), slots.held(&"b")), (3, 1));
        held.pop();
        held.push(slots.take(&"a", 3).expect("a place was freed"));
        drop((held, other));
        assert!(slots.is_empty(), "every place given back");
        assert!(slots.take(&"c", 0).is_none());
        assert!(slots.is_empty(), "a refused key leaves nothing behind");
    }
}
