//! State that no longer holds, removed off the sync path: conntrack entries
//! of backends that are gone (removed at once, not aged out) and affinity
//! entries naming a backend that left its frontend's slots (or of a
//! frontend without affinity now). A sync names what may have gone stale;
//! the cleaner thread walks the maps through its own handles on the pins,
//! so a sync never waits for a walk of conntrack.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::mpsc,
};

use tracing::{debug, warn};

use super::maps::Maps;

/// What a sync found may have gone stale.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupRequest {
    /// Backends were removed: flows still naming them go.
    pub backends_gone: bool,
    /// Per rev-NAT id of a frontend written or removed: the backends its
    /// affinity may still name (its slots), or None (no affinity, or gone).
    pub affinity: BTreeMap<u16, Option<BTreeSet<u32>>>,
}

impl CleanupRequest {
    pub fn is_empty(&self) -> bool {
        !self.backends_gone && self.affinity.is_empty()
    }

    /// Fold a later request in: its view of a frontend wins.
    fn merge(&mut self, later: CleanupRequest) {
        self.backends_gone |= later.backends_gone;
        self.affinity.extend(later.affinity);
    }
}

/// What one pass removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    pub flows: usize,
    pub affinities: usize,
}

/// Remove what `request` names as stale.
pub fn clean(maps: &mut Maps, request: &CleanupRequest) -> Cleaned {
    let mut cleaned = Cleaned::default();
    if request.backends_gone {
        // Candidates first, then the backends that exist: a flow seen in
        // the walk existed before the read, so its backend (ids are not
        // reused at once) is in it unless it is really gone.
        let candidates: Vec<_> = maps
            .conntrack()
            .into_iter()
            .flat_map(|(_, ct)| ct.iter().filter_map(Result::ok))
            .filter(|(_, v)| v.backend_id != lb_common::CT_NO_BACKEND)
            .collect();
        let live: BTreeSet<u32> = maps.backends.keys().filter_map(Result::ok).collect();
        for (key, value) in candidates {
            if live.contains(&value.backend_id) {
                continue;
            }
            if removed(maps.conntrack_of_mut(key.proto).remove(&key)) {
                cleaned.flows += 1;
            }
        }
    }
    if !request.affinity.is_empty() {
        let stale: Vec<_> = maps
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                request.affinity.get(&k.rev_nat_id).is_some_and(|slots| {
                    !slots
                        .as_ref()
                        .is_some_and(|slots| slots.contains(&v.backend_id))
                })
            })
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            if removed(maps.affinity.remove(&key)) {
                cleaned.affinities += 1;
            }
        }
    }
    cleaned
}

fn removed(result: Result<(), aya::maps::MapError>) -> bool {
    match result {
        Ok(()) => true,
        Err(aya::maps::MapError::KeyNotFound) => false,
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            false
        }
        Err(e) => {
            warn!(error = %e, "removing a stale entry failed");
            false
        }
    }
}

/// The cleaner thread; requests queue up and are merged while it works.
pub struct Cleaner {
    requests: mpsc::Sender<CleanupRequest>,
}

impl Cleaner {
    pub fn spawn(mut maps: Maps) -> std::io::Result<Self> {
        let (requests, queue) = mpsc::channel::<CleanupRequest>();
        std::thread::Builder::new()
            .name("cleanup".into())
            .spawn(move || {
                while let Ok(mut request) = queue.recv() {
                    while let Ok(later) = queue.try_recv() {
                        request.merge(later);
                    }
                    let cleaned = clean(&mut maps, &request);
                    debug!(
                        flows = cleaned.flows,
                        affinities = cleaned.affinities,
                        "stale entries removed"
                    );
                }
            })?;
        Ok(Cleaner { requests })
    }

    pub fn request(&self, request: CleanupRequest) {
        if self.requests.send(request).is_err() {
            warn!(
                "the cleanup thread is gone; stale conntrack and affinity entries age out instead"
            );
        }
    }
}
