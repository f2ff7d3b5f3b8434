//! Stable small ids for backends and rev-NAT entries. An id stays with its
//! key for as long as the key is in use, and survives agent restarts because
//! the sync step adopts the ids it finds in the pinned maps.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("all {max} {what} ids are in use")]
pub struct IdsExhausted {
    pub what: &'static str,
    pub max: u32,
}

/// Allocates ids in `1..=max` (0 is never an id) for keys of type K.
/// Never-used ids go first; once they run out, freed ids are handed out
/// from where the last one was found, so a just-freed id is not handed to
/// an unrelated key while stale conntrack entries may still name it. Every
/// operation is O(log n), also with the id space nearly full.
#[derive(Debug)]
pub struct IdAllocator<K: Ord + Clone> {
    what: &'static str,
    max: u32,
    by_key: BTreeMap<K, u32>,
    used: BTreeSet<u32>,
    /// Free ids below `fresh` (freed, or skipped by an adoption).
    free: BTreeSet<u32>,
    /// Every id from here to `max` is free and was never handed out.
    fresh: u32,
    /// Where the search among `free` starts.
    next: u32,
}

impl<K: Ord + Clone> IdAllocator<K> {
    pub fn new(what: &'static str, max: u32) -> Self {
        IdAllocator {
            what,
            max,
            by_key: BTreeMap::new(),
            used: BTreeSet::new(),
            free: BTreeSet::new(),
            fresh: 1,
            next: 1,
        }
    }

    pub fn get(&self, key: &K) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// Record an id found in the maps. False if the id or key is taken.
    pub fn adopt(&mut self, key: K, id: u32) -> bool {
        if id == 0 || id > self.max || self.used.contains(&id) || self.by_key.contains_key(&key) {
            return false;
        }
        if id >= self.fresh {
            self.free.extend(self.fresh..id);
            self.fresh = id + 1;
        } else {
            self.free.remove(&id);
        }
        self.used.insert(id);
        self.by_key.insert(key, id);
        true
    }

    pub fn get_or_assign(&mut self, key: &K) -> Result<u32, IdsExhausted> {
        if let Some(id) = self.by_key.get(key) {
            return Ok(*id);
        }
        let exhausted = IdsExhausted {
            what: self.what,
            max: self.max,
        };
        if self.used.len() as u64 >= self.max as u64 {
            return Err(exhausted);
        }
        let id = if self.fresh <= self.max {
            self.fresh += 1;
            self.fresh - 1
        } else {
            let found = self
                .free
                .range(self.next..)
                .next()
                .or_else(|| self.free.iter().next())
                .copied()
                .ok_or(exhausted)?;
            self.free.remove(&found);
            self.next = if found == self.max { 1 } else { found + 1 };
            found
        };
        self.used.insert(id);
        self.by_key.insert(key.clone(), id);
        Ok(id)
    }

    pub fn release(&mut self, key: &K) -> Option<u32> {
        let id = self.by_key.remove(key)?;
        self.used.remove(&id);
        self.free.insert(id);
        Some(id)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_not_reused_at_once() {
        let mut ids = IdAllocator::new("test", 3);
        assert_eq!(ids.get_or_assign(&"a"), Ok(1));
        assert_eq!(ids.get_or_assign(&"b"), Ok(2));
        assert_eq!(ids.get_or_assign(&"a"), Ok(1));
        assert_eq!(ids.release(&"a"), Some(1));
        assert_eq!(
            ids.get_or_assign(&"c"),
            Ok(3),
            "freed id 1 is not reused first"
        );
        assert_eq!(ids.get_or_assign(&"d"), Ok(1), "wraps to the freed id");
        assert_eq!(
            ids.get_or_assign(&"e"),
            Err(IdsExhausted {
                what: "test",
                max: 3
            })
        );
    }

    #[test]
    fn a_full_id_space_hands_out_freed_ids_quickly() {
        // 200,000 ids in use, then churn: each assignment is a lookup, not a
        // walk over the used ids.
        let max = 200_000;
        let mut ids = IdAllocator::new("test", max);
        for k in 0..max {
            ids.get_or_assign(&k).unwrap();
        }
        for round in 0..50_000u32 {
            let gone = (round * 7919) % max;
            let freed = ids.release(&gone).unwrap();
            assert_eq!(ids.get_or_assign(&(max + round)), Ok(freed));
            ids.release(&(max + round));
            assert_eq!(ids.get_or_assign(&gone), Ok(freed));
        }
        assert_eq!(ids.len(), max as usize);
    }

    #[test]
    fn adopted_ids_are_kept_and_skipped() {
        let mut ids = IdAllocator::new("test", 10);
        assert!(ids.adopt("x", 5));
        assert!(!ids.adopt("y", 5), "id taken");
        assert!(!ids.adopt("x", 6), "key taken");
        assert!(!ids.adopt("z", 0), "0 is never an id");
        assert_eq!(ids.get(&"x"), Some(5));
        assert_eq!(ids.get_or_assign(&"y"), Ok(6));
        // The ids below the adopted one are handed out once fresh ones run out.
        for (k, want) in [("a", 7), ("b", 8), ("c", 9), ("d", 10), ("e", 1), ("f", 2)] {
            assert_eq!(ids.get_or_assign(&k), Ok(want), "{k}");
        }
    }
}
