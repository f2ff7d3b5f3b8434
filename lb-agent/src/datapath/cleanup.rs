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
    /// Backend ids removed from the maps: flows still naming them go.
    pub backends_gone: BTreeSet<u32>,
    /// Per rev-NAT id of a frontend written or removed: which of its
    /// affinity entries went stale.
    pub affinity: BTreeMap<u32, StaleAffinity>,
}

/// Affinity entries of one frontend that no longer hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StaleAffinity {
    /// Every one (affinity turned off, or the frontend gone).
    All,
    /// Those naming these backends (they left the frontend's slots).
    Backends(BTreeSet<u32>),
}

impl CleanupRequest {
    pub fn is_empty(&self) -> bool {
        self.backends_gone.is_empty() && self.affinity.is_empty()
    }

    /// Name one frontend's stale affinity entries.
    pub fn merge_affinity(&mut self, rev_nat: u32, stale: StaleAffinity) {
        self.merge(CleanupRequest {
            backends_gone: BTreeSet::new(),
            affinity: [(rev_nat, stale)].into(),
        });
    }

    /// Fold a later request in.
    fn merge(&mut self, later: CleanupRequest) {
        self.backends_gone.extend(later.backends_gone);
        for (rev_nat, stale) in later.affinity {
            match (self.affinity.get_mut(&rev_nat), stale) {
                (Some(StaleAffinity::All), _) => {}
                (Some(StaleAffinity::Backends(mine)), StaleAffinity::Backends(theirs)) => {
                    mine.extend(theirs);
                }
                (_, stale) => {
                    self.affinity.insert(rev_nat, stale);
                }
            }
        }
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
    // Only ids still absent from the backend map (one lookup each; a walk
    // of a map the sync rewrites meanwhile can miss live keys): ids are not
    // handed out again at once, so an absent id is really gone.
    let gone: BTreeSet<u32> = request
        .backends_gone
        .iter()
        .copied()
        .filter(|id| {
            matches!(
                maps.backends.get(id, 0),
                Err(aya::maps::MapError::KeyNotFound)
            )
        })
        .collect();
    if !gone.is_empty() {
        let stale: Vec<_> = maps
            .conntrack()
            .into_iter()
            .flat_map(|(_, ct)| ct.iter().filter_map(Result::ok))
            .filter(|(_, v)| gone.contains(&v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for key in stale {
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
            .filter(|(k, v)| match request.affinity.get(&k.rev_nat_id) {
                Some(StaleAffinity::All) => true,
                Some(StaleAffinity::Backends(gone)) => gone.contains(&v.backend_id),
                None => false,
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
