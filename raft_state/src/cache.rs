//! A fixed-capacity cache with CLOCK eviction (second chance): memory stays bounded by the
//! capacity whatever the size of the volume, and a hit costs one hash lookup and a bit set.
//!
//! Callers key it by block address and keep the content hash in the value: a block may be
//! freed and reused with new content, so a hit counts only when the hash matches too.

use std::collections::HashMap;
use std::hash::Hash;

struct Entry<K, V> {
    key: K,
    /// `None` once removed: the slot waits in `vacant` for the next insert.
    value: Option<V>,
    referenced: bool,
}

/// See the module docs.
pub struct ClockCache<K, V> {
    capacity: usize,
    entries: Vec<Entry<K, V>>,
    index: HashMap<K, usize>,
    vacant: Vec<usize>,
    hand: usize,
}

impl<K, V> std::fmt::Debug for ClockCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClockCache").field("len", &self.entries.len()).field("capacity", &self.capacity).finish()
    }
}

impl<K: Hash + Eq + Copy, V: Clone> ClockCache<K, V> {
    /// A cache of at most `capacity` entries (0 caches nothing).
    pub fn new(capacity: usize) -> Self {
        Self { capacity, entries: Vec::new(), index: HashMap::new(), vacant: Vec::new(), hand: 0 }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn get(&mut self, key: &K) -> Option<V> {
        let at = *self.index.get(key)?;
        let entry = &mut self.entries[at];
        entry.referenced = true;
        entry.value.clone()
    }

    /// Forgets `key` (a superseded entry should not take the place of a live one).
    pub fn remove(&mut self, key: &K) {
        if let Some(at) = self.index.remove(key) {
            self.entries[at].value = None;
            self.entries[at].referenced = false;
            self.vacant.push(at);
        }
    }

    /// Inserts or replaces `key`; when full, evicts the first entry the hand finds that was
    /// not referenced since the hand last passed it.
    pub fn insert(&mut self, key: K, value: V) {
        if self.capacity == 0 {
            return;
        }
        if let Some(&at) = self.index.get(&key) {
            self.entries[at].value = Some(value);
            self.entries[at].referenced = true;
            return;
        }
        if let Some(at) = self.vacant.pop() {
            self.index.insert(key, at);
            self.entries[at] = Entry { key, value: Some(value), referenced: false };
            return;
        }
        if self.entries.len() < self.capacity {
            self.index.insert(key, self.entries.len());
            self.entries.push(Entry { key, value: Some(value), referenced: false });
            return;
        }
        loop {
            let entry = &mut self.entries[self.hand];
            if entry.referenced {
                entry.referenced = false;
                self.hand = (self.hand + 1) % self.capacity;
                continue;
            }
            self.index.remove(&entry.key);
            self.index.insert(key, self.hand);
            *entry = Entry { key, value: Some(value), referenced: false };
            self.hand = (self.hand + 1) % self.capacity;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_capacity_and_keeps_referenced_entries() {
        let mut c = ClockCache::new(4);
        for k in 0..4u64 {
            c.insert(k, k * 10);
        }
        assert_eq!(c.get(&0), Some(0));
        assert_eq!(c.get(&2), Some(20));
        c.insert(4, 40); // evicts 1: the first unreferenced one after the hand
        assert_eq!(c.len(), 4);
        assert_eq!(c.get(&1), None);
        assert_eq!(c.get(&0), Some(0));
        assert_eq!(c.get(&2), Some(20));
        assert_eq!(c.get(&4), Some(40));
        for k in 100..1000u64 {
            c.insert(k, k);
            assert!(c.len() <= 4);
            assert_eq!(c.get(&k), Some(k), "a fresh insert is present");
        }
        c.insert(999, 7);
        assert_eq!(c.get(&999), Some(7), "insert replaces");
        c.remove(&999);
        assert_eq!(c.get(&999), None, "removed");
        assert_eq!(c.len(), 3);
        c.insert(5, 50); // takes the vacant slot, evicts nothing
        assert_eq!(c.len(), 4);
        assert!([996u64, 997, 998, 5].iter().all(|k| c.get(k).is_some()));
        c.remove(&12345); // absent: nothing happens
        assert_eq!(c.len(), 4);
        let mut none = ClockCache::new(0);
        none.insert(1u64, 1u64);
        assert!(none.is_empty());
    }
}
