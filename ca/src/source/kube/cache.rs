//! A reflector store of *converted* objects: what one watcher has told us, in model form.
//!
//! It follows the watcher's event protocol: `Init` starts a relist into a side buffer,
//! `InitApply` fills it, `InitDone` swaps it in whole (objects not relisted are gone), and
//! `Apply`/`Delete` change single objects. A cache is ready after its first `InitDone` and
//! stays ready through later relists (the old contents serve until the new list is complete).

use std::collections::BTreeMap;

/// One watcher event, already converted (`None` value: the object could not be converted
/// and counts as absent).
#[derive(Debug)]
pub enum Change<K, V> {
    /// A relist started.
    Init,
    /// An object of the relist.
    InitApply(K, Option<V>),
    /// The relist is complete.
    InitDone,
    /// An object was added or modified.
    Apply(K, Option<V>),
    /// An object was deleted.
    Delete(K),
}

/// The converted objects of one resource.
#[derive(Debug)]
pub struct Cache<K, V> {
    items: BTreeMap<K, V>,
    relist: Option<BTreeMap<K, V>>,
    ready: bool,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            relist: None,
            ready: false,
        }
    }
}

impl<K: Ord, V: PartialEq> Cache<K, V> {
    /// Applies one change; `true` when the visible contents (or readiness) changed.
    pub fn apply(&mut self, change: Change<K, V>) -> bool {
        match change {
            Change::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Change::InitApply(key, value) => {
                let relist = self.relist.get_or_insert_with(BTreeMap::new);
                match value {
                    Some(value) => relist.insert(key, value),
                    None => relist.remove(&key),
                };
                false
            }
            Change::InitDone => {
                let relisted = self.relist.take().unwrap_or_default();
                let changed = !self.ready || relisted != self.items;
                self.items = relisted;
                self.ready = true;
                changed
            }
            Change::Apply(key, Some(value)) => {
                if self.items.get(&key) == Some(&value) {
                    return false;
                }
                self.items.insert(key, value);
                true
            }
            Change::Apply(key, None) | Change::Delete(key) => self.items.remove(&key).is_some(),
        }
    }

    /// Whether the first complete list arrived.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// The objects.
    pub fn items(&self) -> &BTreeMap<K, V> {
        &self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relist_replaces_whole_and_single_changes_apply() {
        let mut c: Cache<u32, &str> = Cache::default();
        assert!(!c.ready());
        assert!(!c.apply(Change::Init));
        assert!(!c.apply(Change::InitApply(1, Some("a"))));
        assert!(!c.apply(Change::InitApply(2, Some("b"))));
        assert!(c.items().is_empty(), "a relist shows only when complete");
        assert!(c.apply(Change::InitDone));
        assert!(c.ready());
        assert_eq!(c.items().len(), 2);
        assert!(
            !c.apply(Change::Apply(1, Some("a"))),
            "same value: no change"
        );
        assert!(c.apply(Change::Apply(1, Some("a2"))));
        assert!(c.apply(Change::Delete(2)));
        assert!(!c.apply(Change::Delete(2)));
        // A relist after a watch gap: 1 is gone, 3 appeared; old contents serve meanwhile.
        c.apply(Change::Init);
        c.apply(Change::InitApply(3, Some("c")));
        assert_eq!(c.items().keys().copied().collect::<Vec<_>>(), [1]);
        assert!(c.apply(Change::InitDone));
        assert_eq!(c.items().keys().copied().collect::<Vec<_>>(), [3]);
        c.apply(Change::Init);
        c.apply(Change::InitApply(3, Some("c")));
        assert!(!c.apply(Change::InitDone), "identical relist: no change");
    }
}
