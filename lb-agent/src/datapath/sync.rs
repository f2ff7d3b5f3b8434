//! Keep the maps equal to a DesiredState: diff against a mirror of what was
//! written, and write in make-before-break order (backends, slots 1..N,
//! slot 0; removal in reverse) so the kernel never reads a count that points
//! past written slots or a slot naming a missing backend.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{MapError, lpm_trie::Key};
use ipnet::IpNet;
use lb_common::{
    Addr, BACKEND_ACTIVE, BACKEND_STANDBY, BackendValue, MaglevKey, RevNatValue, ServiceKey,
    ServiceValue, SourceRange, backend_flags, frontend_kind, map_sizes, service_flags,
};
use tracing::{debug, warn};

use super::{
    cleanup::{self, Cleaner, CleanupRequest, StaleAffinity},
    maps::Maps,
};
use crate::model::{
    AddressEntry, DesiredState, Frontend, FrontendKey, Protocol, Scope, ids::IdAllocator, maglev,
};

/// A backend is identified by where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

/// What one frontend looks like in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AppliedFrontend {
    head: ServiceValue,
    slots: Vec<u32>,
    /// Maglev table (backend id per index); empty without Maglev.
    maglev: Vec<u32>,
}

/// One frontend's use of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BackendUse {
    id: u32,
    /// In the frontend's slots (new flows), not only standby.
    selectable: bool,
    terminating: bool,
    remote: bool,
    on_node: bool,
}

impl BackendUse {
    fn new(id: u32, b: &crate::model::Backend, selectable: bool) -> Self {
        BackendUse {
            id,
            selectable,
            terminating: b.terminating,
            remote: b.remote,
            on_node: b.on_node,
        }
    }
}

/// How many desired frontends use a backend, and how: its map value
/// follows from these alone, whatever order the frontends come in.
#[derive(Clone, Copy, Debug, Default)]
struct UseCounts {
    all: i32,
    selected: i32,
    selected_terminating: i32,
    remote: i32,
    on_node: i32,
    key: Option<BackendKey>,
}

impl UseCounts {
    fn add(&mut self, u: &BackendUse, sign: i32) {
        self.all += sign;
        self.selected += sign * u.selectable as i32;
        self.selected_terminating += sign * (u.selectable && u.terminating) as i32;
        self.remote += sign * u.remote as i32;
        self.on_node += sign * u.on_node as i32;
    }

    fn is_empty(&self) -> bool {
        self.all <= 0
    }

    /// The backend's map entry.
    fn value(&self) -> Option<BackendValue> {
        let key = self.key?;
        Some(BackendValue {
            addr_be: be32(key.addr),
            port_be: key.port.to_be(),
            proto: key.proto.number(),
            state: if self.selected > 0 {
                BACKEND_ACTIVE
            } else {
                BACKEND_STANDBY
            },
            flags: if self.remote > 0 {
                backend_flags::REMOTE
            } else {
                0
            } | if self.on_node > 0 {
                backend_flags::ON_NODE
            } else {
                0
            } | if self.selected_terminating > 0 {
                backend_flags::FALLBACK
            } else {
                0
            },
        })
    }
}

/// Something that could not be programmed, naming the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncError {
    pub object: String,
    pub reason: String,
    /// A map (or an id space) was full.
    pub full: bool,
}

#[derive(Debug, Default)]
pub struct SyncReport {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    pub errors: Vec<SyncError>,
}

pub struct Syncer {
    maps: Maps,
    backend_ids: IdAllocator<BackendKey>,
    rev_nat_ids: IdAllocator<FrontendKey>,
    backends: BTreeMap<u32, BackendValue>,
    frontends: BTreeMap<FrontendKey, AppliedFrontend>,
    /// Address entries: (address, scope) -> slot 0 flags.
    addresses: BTreeMap<(IpAddr, Scope), u32>,
    source_ranges: BTreeSet<(IpAddr, IpNet)>,
    rev_nat: BTreeMap<u16, RevNatValue>,
    /// Per frontend, the backends its desired entry uses.
    frontend_uses: BTreeMap<FrontendKey, Vec<BackendUse>>,
    /// Per backend id, how the desired frontends use it.
    uses: BTreeMap<u32, UseCounts>,
    /// Backend ids that lost their last use: removed once no applied slot names them.
    released: BTreeSet<u32>,
    /// Frontends whose last write failed: their applied slots may name
    /// backends the desired state no longer uses.
    unwritten: BTreeSet<FrontendKey>,
    /// The keys of backends whose last use went, until their id is freed.
    unused_keys: BTreeMap<u32, BackendKey>,
    /// What this sync made stale (affinity of frontends with affinity
    /// before or after it, flows of removed backends).
    cleanup: CleanupRequest,
    /// Where stale entries are sent to be removed; None: removed inline.
    cleaner: Option<Cleaner>,
    /// Map keys found at start that this agent does not manage: pruned on the first sync.
    stray_service_keys: Vec<ServiceKey>,
    stray_maglev_keys: Vec<MaglevKey>,
}

fn be32(addr: IpAddr) -> Addr {
    Addr::from(addr)
}

fn from_be32(v: Addr) -> IpAddr {
    v.ip()
}

/// Bits of an LPM key's client prefix before the client address: the
/// frontend (128), and the mapped prefix (96) for IPv4.
fn source_range_prefix_base(client: IpAddr) -> u32 {
    if client.is_ipv4() { 128 + 96 } else { 128 }
}

fn service_key(fk: &FrontendKey, slot: u16) -> ServiceKey {
    ServiceKey {
        addr_be: be32(fk.addr),
        port_be: fk.port.to_be(),
        slot,
        proto: fk.proto.number(),
        scope: fk.scope.code(),
        _pad: [0; 2],
    }
}

fn maglev_key(rev_nat_id: u16, index: u32) -> MaglevKey {
    MaglevKey {
        rev_nat_id,
        _pad: 0,
        index,
    }
}

fn address_key(addr: IpAddr, scope: Scope) -> ServiceKey {
    ServiceKey {
        addr_be: be32(addr),
        scope: scope.code(),
        ..Default::default()
    }
}

fn address_flags(entry: &AddressEntry) -> u32 {
    let mut flags = frontend_kind::CLUSTER_IP;
    if entry.reject_undeclared {
        flags |= service_flags::ADDRESS_ONLY;
    }
    if entry.echo {
        flags |= service_flags::ECHO;
    }
    flags
}

fn source_range_key(frontend: IpAddr, net: IpNet) -> Key<SourceRange> {
    Key::new(
        source_range_prefix_base(net.network()) + net.prefix_len() as u32,
        SourceRange {
            frontend_addr_be: be32(frontend),
            client_addr_be: be32(net.network()),
        },
    )
}

fn is_full(err: &MapError) -> bool {
    match err {
        MapError::SyscallError(e) => matches!(
            e.io_error.raw_os_error(),
            Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)
        ),
        _ => false,
    }
}

/// A map removal succeeded or found nothing to remove.
fn removed(result: Result<(), MapError>) -> bool {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => true,
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => true,
        Err(e) => {
            warn!(error = %e, "removing a map entry failed; will retry");
            false
        }
    }
}

impl Syncer {
    /// Adopt what the (possibly pinned) maps already hold: ids stay stable
    /// across restarts, and the first sync prunes what is no longer desired.
    pub fn new(maps: Maps) -> Result<Self, MapError> {
        let mut syncer = Syncer {
            maps,
            backend_ids: IdAllocator::new("backend", map_sizes::BACKENDS),
            rev_nat_ids: IdAllocator::new("rev-NAT", map_sizes::REV_NAT),
            backends: BTreeMap::new(),
            frontends: BTreeMap::new(),
            addresses: BTreeMap::new(),
            source_ranges: BTreeSet::new(),
            rev_nat: BTreeMap::new(),
            frontend_uses: BTreeMap::new(),
            uses: BTreeMap::new(),
            released: BTreeSet::new(),
            unwritten: BTreeSet::new(),
            unused_keys: BTreeMap::new(),
            cleanup: CleanupRequest::default(),
            cleaner: None,
            stray_service_keys: Vec::new(),
            stray_maglev_keys: Vec::new(),
        };
        for entry in syncer.maps.backends.iter() {
            let (id, value) = entry?;
            let key = Protocol::from_number(value.proto).map(|proto| BackendKey {
                addr: from_be32(value.addr_be),
                port: u16::from_be(value.port_be),
                proto,
            });
            match key {
                Some(key) if syncer.backend_ids.adopt(key, id) => {
                    syncer.backends.insert(id, value);
                }
                // Unusable or duplicate: remove after everything referencing it.
                _ => {
                    syncer.backends.insert(id, value);
                }
            }
        }
        for entry in syncer.maps.rev_nat.iter() {
            let (id, value) = entry?;
            if let (Some(proto), Some(scope)) = (
                Protocol::from_number(value.proto),
                Scope::from_code(value.scope),
            ) {
                let fk = FrontendKey {
                    addr: from_be32(value.addr_be),
                    port: u16::from_be(value.port_be),
                    proto,
                    scope,
                };
                syncer.rev_nat_ids.adopt(fk, id as u32);
            }
            syncer.rev_nat.insert(id, value);
        }
        let mut slots: BTreeMap<FrontendKey, BTreeMap<u16, u32>> = BTreeMap::new();
        let mut heads: BTreeMap<FrontendKey, ServiceValue> = BTreeMap::new();
        for entry in syncer.maps.services.iter() {
            let (key, value) = entry?;
            let Some(scope) = Scope::from_code(key.scope) else {
                syncer.stray_service_keys.push(key);
                continue;
            };
            if key.port_be == 0 && key.proto == 0 && key.slot == 0 {
                syncer
                    .addresses
                    .insert((from_be32(key.addr_be), scope), value.flags);
                continue;
            }
            let Some(proto) = Protocol::from_number(key.proto) else {
                syncer.stray_service_keys.push(key);
                continue;
            };
            let fk = FrontendKey {
                addr: from_be32(key.addr_be),
                port: u16::from_be(key.port_be),
                proto,
                scope,
            };
            if key.slot == 0 {
                heads.insert(fk, value);
            } else {
                slots
                    .entry(fk)
                    .or_default()
                    .insert(key.slot, value.backend_id);
            }
        }
        for entry in syncer.maps.source_ranges.iter() {
            let (key, _) = entry?;
            let data = key.data();
            let client = from_be32(data.client_addr_be);
            let prefix = key
                .prefix_len()
                .saturating_sub(source_range_prefix_base(client));
            if let Ok(net) = IpNet::new(client, prefix as u8) {
                syncer
                    .source_ranges
                    .insert((from_be32(data.frontend_addr_be), net));
            }
        }
        let mut tables: BTreeMap<u16, BTreeMap<u32, u32>> = BTreeMap::new();
        for entry in syncer.maps.maglev.iter() {
            let (key, id) = entry?;
            tables
                .entry(key.rev_nat_id)
                .or_default()
                .insert(key.index, id);
        }
        for (fk, head) in heads {
            let mut table = if head.flags & service_flags::MAGLEV != 0 {
                tables.remove(&head.rev_nat_id).unwrap_or_default()
            } else {
                BTreeMap::new()
            };
            let maglev: Vec<u32> = (0..head.backend_id)
                .map(|i| table.remove(&i).unwrap_or(0))
                .collect();
            for index in table.keys() {
                syncer
                    .stray_maglev_keys
                    .push(maglev_key(head.rev_nat_id, *index));
            }
            let mut found = slots.remove(&fk).unwrap_or_default();
            let applied: Vec<u32> = (1..=head.count)
                .map(|s| found.remove(&s).unwrap_or(0))
                .collect();
            // Slots past the count (an interrupted sync) are strays.
            for slot in found.keys() {
                syncer.stray_service_keys.push(service_key(&fk, *slot));
            }
            syncer.frontends.insert(
                fk,
                AppliedFrontend {
                    head,
                    slots: applied,
                    maglev,
                },
            );
        }
        for (fk, orphan) in slots {
            for slot in orphan.keys() {
                syncer.stray_service_keys.push(service_key(&fk, *slot));
            }
        }
        debug!(
            frontends = syncer.frontends.len(),
            backends = syncer.backends.len(),
            "adopted existing map contents"
        );
        Ok(syncer)
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Bring the maps to `desired`: every frontend, address entry and
    /// source range is compared, and whatever the maps hold that `desired`
    /// does not is removed (adopted strays included).
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        let frontends: BTreeSet<FrontendKey> = desired
            .frontends
            .keys()
            .chain(self.frontends.keys())
            .chain(self.frontend_uses.keys())
            .copied()
            .collect();
        let addresses: BTreeSet<(IpAddr, Scope)> = desired
            .addresses
            .keys()
            .chain(self.addresses.keys())
            .copied()
            .collect();
        let ranges: BTreeSet<IpAddr> = desired
            .source_ranges
            .keys()
            .copied()
            .chain(self.source_ranges.iter().map(|(ip, _)| *ip))
            .collect();
        let mut report = self.sync_changes(desired, &frontends, &addresses, &ranges);
        // What no frontend accounts for: rev-NAT entries and backends
        // adopted from the pins, or left by a failed removal.
        let live_rev_nat: BTreeSet<u16> =
            self.frontends.values().map(|f| f.head.rev_nat_id).collect();
        let stale_rev_nat: Vec<u16> = self
            .rev_nat
            .keys()
            .filter(|id| !live_rev_nat.contains(id))
            .copied()
            .collect();
        for id in stale_rev_nat {
            self.remove_rev_nat(id);
        }
        let unused: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !self.uses.contains_key(id))
            .copied()
            .collect();
        self.released.extend(unused);
        report.backends_removed += self.remove_released();
        self.request_cleanup();
        report
    }

    /// Bring the maps to `desired` for the named frontends, address entries
    /// and LoadBalancer IPs' source ranges only (what a translation delta
    /// names): the cost of a change is the change, not the cluster.
    pub fn sync_changes(
        &mut self,
        desired: &DesiredState,
        frontends: &BTreeSet<FrontendKey>,
        addresses: &BTreeSet<(IpAddr, Scope)>,
        source_ranges: &BTreeSet<IpAddr>,
    ) -> SyncReport {
        let mut report = SyncReport::default();

        // 0. Strays (slots no head counts, Maglev entries past a table's
        //    size, left by an interrupted sync) are unreachable by the
        //    kernel: remove them first, before this sync may write the same
        //    keys for real.
        for key in std::mem::take(&mut self.stray_service_keys) {
            self.remove_key(key);
        }
        for key in std::mem::take(&mut self.stray_maglev_keys) {
            removed(self.maps.maglev.remove(&key));
        }

        // 1. Backends: the uses of every named frontend are exchanged for
        //    its new ones; a backend some frontend selects is active, one
        //    only kept for established flows standby (for an endpoint
        //    shared by two Services, active wins).
        let mut frontend_slots: BTreeMap<FrontendKey, Result<Vec<u32>, SyncError>> =
            BTreeMap::new();
        let mut changed_ids: BTreeSet<u32> = BTreeSet::new();
        for fk in frontends {
            let Some(frontend) = desired.frontends.get(fk) else {
                // Going: its uses end now, so what others make of a shared
                // backend is written before the frontend goes.
                for u in self.frontend_uses.remove(fk).unwrap_or_default() {
                    self.count_use(&u, -1);
                    changed_ids.insert(u.id);
                }
                continue;
            };
            let mut uses = Vec::with_capacity(frontend.backends.len() + frontend.standby.len());
            let mut keys = Vec::with_capacity(uses.capacity());
            let mut failed = None;
            let all = frontend
                .backends
                .iter()
                .map(|b| (b, true))
                .chain(frontend.standby.iter().map(|b| (b, false)));
            for (b, selectable) in all {
                let key = BackendKey {
                    addr: b.addr,
                    port: b.port,
                    proto: fk.proto,
                };
                match self.backend_ids.get_or_assign(&key) {
                    Ok(id) => {
                        uses.push(BackendUse::new(id, b, selectable));
                        keys.push(key);
                    }
                    Err(e) => {
                        failed = Some(SyncError {
                            object: frontend.service_port.clone(),
                            reason: format!("backend {}:{}: {e}", b.addr, b.port),
                            full: true,
                        });
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                // Ids assigned for it alone go back.
                for (u, key) in uses.iter().zip(&keys) {
                    if !self.uses.contains_key(&u.id) && !self.backends.contains_key(&u.id) {
                        self.backend_ids.release(key);
                    }
                }
                frontend_slots.insert(*fk, Err(e));
                continue;
            }
            let ids: Vec<u32> = uses.iter().filter(|u| u.selectable).map(|u| u.id).collect();
            for (u, key) in uses.iter().zip(keys) {
                self.count_use(u, 1);
                if let Some(counts) = self.uses.get_mut(&u.id) {
                    counts.key = Some(key);
                }
                changed_ids.insert(u.id);
            }
            for u in self.frontend_uses.insert(*fk, uses).unwrap_or_default() {
                self.count_use(&u, -1);
                changed_ids.insert(u.id);
            }
            frontend_slots.insert(*fk, Ok(ids));
        }
        let mut failed_backends = BTreeSet::new();
        for id in &changed_ids {
            let Some(value) = self.uses.get(id).and_then(UseCounts::value) else {
                self.released.insert(*id);
                continue;
            };
            if self.backends.get(id) == Some(&value) {
                continue;
            }
            match self.maps.backends.insert(id, value, 0) {
                Ok(()) => {
                    self.backends.insert(*id, value);
                    report.backends_written += 1;
                }
                Err(e) => {
                    failed_backends.insert(*id);
                    warn!(backend_id = id, error = %e, "writing backend failed");
                }
            }
        }

        // Source ranges before the frontends that check them.
        let mut stale_ranges = Vec::new();
        for ip in source_ranges {
            let wanted = desired.source_ranges.get(ip);
            let have: Vec<IpNet> = self
                .source_ranges
                .range((*ip, IpNet::default())..)
                .take_while(|(a, _)| a == ip)
                .map(|(_, net)| *net)
                .collect();
            for net in wanted.into_iter().flatten() {
                if have.contains(net) {
                    continue;
                }
                match self
                    .maps
                    .source_ranges
                    .insert(&source_range_key(*ip, *net), 1, 0)
                {
                    Ok(()) => {
                        self.source_ranges.insert((*ip, *net));
                    }
                    Err(e) => report.errors.push(SyncError {
                        object: format!("LoadBalancer IP {ip}"),
                        reason: format!("source range {net}: {e}"),
                        full: is_full(&e),
                    }),
                }
            }
            stale_ranges.extend(
                have.into_iter()
                    .filter(|net| !wanted.is_some_and(|w| w.contains(net)))
                    .map(|net| (*ip, net)),
            );
        }

        // 2. Frontends: slots 1..N, then slot 0, then slots past the new count.
        for (fk, ids) in frontend_slots {
            let Some(frontend) = desired.frontends.get(&fk) else {
                continue;
            };
            let ids = match ids {
                Ok(ids) => ids,
                Err(e) => {
                    report.errors.push(e);
                    self.unwritten.insert(fk);
                    continue;
                }
            };
            if let Some(bad) = ids.iter().find(|id| failed_backends.contains(id)) {
                report.errors.push(SyncError {
                    object: frontend.service_port.clone(),
                    reason: format!("{fk}: backend {bad} could not be written (map full?)"),
                    full: true,
                });
                self.unwritten.insert(fk);
                continue;
            }
            match self.write_frontend(&fk, frontend, ids) {
                Ok(true) => {
                    report.frontends_written += 1;
                    self.unwritten.remove(&fk);
                }
                Ok(false) => {
                    self.unwritten.remove(&fk);
                }
                Err(e) => {
                    report.errors.push(SyncError {
                        object: frontend.service_port.clone(),
                        reason: format!("{fk}: {e}"),
                        full: is_full(&e),
                    });
                    self.unwritten.insert(fk);
                }
            }
        }
        for (addr, scope) in addresses {
            let Some(entry) = desired.addresses.get(&(*addr, *scope)) else {
                continue;
            };
            let flags = address_flags(entry);
            if self.addresses.get(&(*addr, *scope)) == Some(&flags) {
                continue;
            }
            let head = ServiceValue {
                flags,
                ..Default::default()
            };
            match self
                .maps
                .services
                .insert(address_key(*addr, *scope), head, 0)
            {
                Ok(()) => {
                    self.addresses.insert((*addr, *scope), flags);
                }
                Err(e) => report.errors.push(SyncError {
                    object: format!("Service IP {addr}"),
                    reason: format!("address entry: {e}"),
                    full: is_full(&e),
                }),
            }
        }

        // 3. Removals: frontends no longer desired (slot 0 first), address
        //    entries, source ranges, then backends nothing uses.
        for fk in frontends {
            if desired.frontends.contains_key(fk) {
                continue;
            }
            let Some(applied) = self.frontends.get(fk).cloned() else {
                continue;
            };
            // Slot 0 first: while it stands, its slots must too.
            let head_removed = self.remove_key(service_key(fk, 0));
            let mut ok = head_removed;
            if head_removed {
                for slot in 1..=applied.slots.len() as u16 {
                    ok &= self.remove_key(service_key(fk, slot));
                }
                for index in 0..applied.maglev.len() as u32 {
                    ok &= removed(
                        self.maps
                            .maglev
                            .remove(&maglev_key(applied.head.rev_nat_id, index)),
                    );
                }
            }
            if !ok {
                report.errors.push(SyncError {
                    object: fk.to_string(),
                    reason: "removing the frontend failed; retried".into(),
                    full: false,
                });
                if head_removed && let Some(mirror) = self.frontends.get_mut(fk) {
                    // Partly removed: whatever is written next is written whole.
                    mirror.head.flags = u32::MAX;
                    mirror.slots.fill(0);
                    mirror.maglev.fill(0);
                }
            }
            if ok {
                self.frontends.remove(fk);
                self.unwritten.remove(fk);
                report.frontends_removed += 1;
                if applied.head.flags & service_flags::AFFINITY != 0 {
                    self.cleanup
                        .merge_affinity(applied.head.rev_nat_id, StaleAffinity::All);
                }
                self.remove_rev_nat(applied.head.rev_nat_id);
            } else {
                self.unwritten.insert(*fk);
            }
        }
        for key in addresses {
            if desired.addresses.contains_key(key) || !self.addresses.contains_key(key) {
                continue;
            }
            if self.remove_key(address_key(key.0, key.1)) {
                self.addresses.remove(key);
            } else {
                report.errors.push(SyncError {
                    object: format!("Service IP {}", key.0),
                    reason: "removing the address entry failed; retried".into(),
                    full: false,
                });
            }
        }
        for (addr, net) in stale_ranges {
            if removed(self.maps.source_ranges.remove(&source_range_key(addr, net))) {
                self.source_ranges.remove(&(addr, net));
            } else {
                report.errors.push(SyncError {
                    object: format!("LoadBalancer IP {addr}"),
                    reason: format!("removing source range {net} failed; retried"),
                    full: false,
                });
            }
        }
        report.backends_removed += self.remove_released();
        // 4. State that no longer holds: affinity to a backend that left its
        //    frontend's slots (or of a frontend without affinity now), and
        //    flows to backends that are gone (removed at once, not aged out).
        self.request_cleanup();
        report
    }

    /// Run the cleaner on another thread from now on.
    pub fn set_cleaner(&mut self, cleaner: Cleaner) {
        self.cleaner = Some(cleaner);
    }

    fn request_cleanup(&mut self) {
        let request = std::mem::take(&mut self.cleanup);
        if request.is_empty() {
            return;
        }
        match &self.cleaner {
            Some(cleaner) => cleaner.request(request),
            None => {
                cleanup::clean(&mut self.maps, &request);
            }
        }
    }

    /// Count one use of a backend in (+1) or out (-1).
    fn count_use(&mut self, u: &BackendUse, sign: i32) {
        let counts = self.uses.entry(u.id).or_default();
        counts.add(u, sign);
        if counts.is_empty()
            && let Some(gone) = self.uses.remove(&u.id)
            && let Some(key) = gone.key
        {
            // Its id is freed by key when the backend was never written.
            self.unused_keys.insert(u.id, key);
        }
    }

    /// Remove backends released and still unused, unless an applied
    /// frontend's slots still name them (its write failed); returns how
    /// many went.
    fn remove_released(&mut self) -> usize {
        let candidates: Vec<u32> = std::mem::take(&mut self.released)
            .into_iter()
            .filter(|id| !self.uses.contains_key(id))
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        // Only frontends whose write failed can still name them.
        let referenced: BTreeSet<u32> = self
            .unwritten
            .iter()
            .filter_map(|fk| self.frontends.get(fk))
            .flat_map(|f| f.slots.iter().copied())
            .filter(|id| candidates.contains(id))
            .collect();
        let mut count = 0;
        for id in candidates {
            if referenced.contains(&id) {
                self.released.insert(id);
                continue;
            }
            let unused_key = self.unused_keys.remove(&id);
            let Some(value) = self.backends.get(&id).copied() else {
                // Never written (its write failed): only the id to free.
                if let Some(key) = unused_key
                    && self.backend_ids.get(&key) == Some(id)
                {
                    self.backend_ids.release(&key);
                }
                continue;
            };
            if !removed(self.maps.backends.remove(&id)) {
                self.released.insert(id);
                continue;
            }
            count += 1;
            self.backends.remove(&id);
            self.cleanup.backends_gone.insert(id);
            self.release_backend_id(value);
        }
        count
    }

    /// Free a backend id (the allocator holds it back a while before reuse).
    fn release_backend_id(&mut self, value: BackendValue) {
        let Some(proto) = Protocol::from_number(value.proto) else {
            return;
        };
        let key = BackendKey {
            addr: from_be32(value.addr_be),
            port: u16::from_be(value.port_be),
            proto,
        };
        if let Some(id) = self.backend_ids.get(&key)
            && !self.uses.contains_key(&id)
            && !self.backends.contains_key(&id)
        {
            self.backend_ids.release(&key);
        }
    }

    fn remove_rev_nat(&mut self, id: u16) {
        if !removed(self.maps.rev_nat.remove(&id)) {
            return;
        }
        if let Some(value) = self.rev_nat.remove(&id)
            && let Some(proto) = Protocol::from_number(value.proto)
            && let Some(scope) = Scope::from_code(value.scope)
        {
            self.rev_nat_ids.release(&FrontendKey {
                addr: from_be32(value.addr_be),
                port: u16::from_be(value.port_be),
                proto,
                scope,
            });
        }
    }

    /// Remove one SERVICES key; absent counts as removed.
    fn remove_key(&mut self, key: ServiceKey) -> bool {
        match self.maps.services.remove(&key) {
            Ok(()) => true,
            Err(MapError::KeyNotFound) => true,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                true
            }
            Err(e) => {
                warn!(error = %e, "removing a service slot failed");
                false
            }
        }
    }

    /// Write one frontend if it differs; Ok(true) when something was written.
    fn write_frontend(
        &mut self,
        fk: &FrontendKey,
        frontend: &Frontend,
        ids: Vec<u32>,
    ) -> Result<bool, MapError> {
        let rev_nat_id = self
            .rev_nat_ids
            .get_or_assign(fk)
            .map_err(|e| MapError::IoError(std::io::Error::other(e.to_string())))?;
        let rev_nat_id = rev_nat_id as u16;
        let rev = RevNatValue {
            addr_be: be32(fk.addr),
            port_be: fk.port.to_be(),
            proto: fk.proto.number(),
            scope: fk.scope.code(),
        };
        if self.rev_nat.get(&rev_nat_id) != Some(&rev) {
            self.maps.rev_nat.insert(rev_nat_id, rev, 0)?;
            self.rev_nat.insert(rev_nat_id, rev);
        }
        let mut flags = frontend.kind.code();
        if frontend.affinity_timeout_s.is_some() {
            flags |= service_flags::AFFINITY;
        }
        if frontend.internal_local {
            flags |= service_flags::INTERNAL_LOCAL;
        }
        if frontend.drop_if_empty {
            flags |= service_flags::DROP_IF_EMPTY;
        }
        if frontend.source_ranges {
            flags |= service_flags::SOURCE_RANGES;
        }
        if frontend.masquerade {
            flags |= service_flags::MASQUERADE;
        }
        // Maglev: the table (by backend name, the same on every node) and
        // its size in slot 0's backend_id.
        let table: Vec<u32> = if frontend.maglev && !ids.is_empty() {
            flags |= service_flags::MAGLEV;
            let names: Vec<String> = frontend
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.addr, b.port))
                .collect();
            maglev::build(&names, maglev::table_size(ids.len()))
                .into_iter()
                .map(|i| ids[i as usize])
                .collect()
        } else {
            Vec::new()
        };
        let head = ServiceValue {
            backend_id: table.len() as u32,
            count: ids.len() as u16,
            rev_nat_id,
            flags,
            affinity_timeout_s: frontend.affinity_timeout_s.unwrap_or(0),
        };
        let old = self.frontends.get(fk).cloned();
        if old
            .as_ref()
            .is_some_and(|o| o.head == head && o.slots == ids && o.maglev == table)
        {
            return Ok(false);
        }
        if (head.flags | old.as_ref().map_or(0, |o| o.head.flags)) & service_flags::AFFINITY != 0 {
            let stale = if head.flags & service_flags::AFFINITY == 0 {
                Some(StaleAffinity::All)
            } else {
                // Only the backends that left its slots.
                let left: BTreeSet<u32> = old
                    .iter()
                    .flat_map(|o| o.slots.iter().copied())
                    .filter(|id| !ids.contains(id))
                    .collect();
                (!left.is_empty()).then_some(StaleAffinity::Backends(left))
            };
            if let Some(stale) = stale {
                self.cleanup.merge_affinity(rev_nat_id, stale);
            }
        }
        // The table before slot 0 names its size (make before break).
        let old_table = old.as_ref().map(|o| o.maglev.clone()).unwrap_or_default();
        for (i, id) in table.iter().enumerate() {
            if old_table.get(i) == Some(id) {
                continue;
            }
            if let Err(e) = self
                .maps
                .maglev
                .insert(maglev_key(rev_nat_id, i as u32), id, 0)
            {
                self.stray_maglev_keys
                    .extend((old_table.len()..i).map(|j| maglev_key(rev_nat_id, j as u32)));
                return Err(e);
            }
        }
        let mut old_slots = old.as_ref().map(|o| o.slots.clone()).unwrap_or_default();
        for (i, id) in ids.iter().enumerate() {
            if old_slots.get(i) == Some(id) {
                continue;
            }
            let slot = ServiceValue {
                backend_id: *id,
                ..Default::default()
            };
            let key = service_key(fk, i as u16 + 1);
            if let Err(e) = self.maps.services.insert(key, slot, 0) {
                // Keep the mirror true: slots written past the old count are
                // unreachable strays for the next sync to remove.
                self.stray_service_keys
                    .extend((old_slots.len()..i).map(|j| service_key(fk, j as u16 + 1)));
                if let Some(mut applied) = old {
                    applied.slots = old_slots;
                    self.frontends.insert(*fk, applied);
                }
                return Err(e);
            }
            if let Some(existing) = old_slots.get_mut(i) {
                *existing = *id;
            }
        }
        self.maps.services.insert(service_key(fk, 0), head, 0)?;
        let old_count = old.map_or(0, |o| o.slots.len());
        for slot in ids.len() + 1..=old_count.max(old_slots.len()) {
            self.remove_key(service_key(fk, slot as u16));
        }
        for index in table.len()..old_table.len() {
            removed(
                self.maps
                    .maglev
                    .remove(&maglev_key(rev_nat_id, index as u32)),
            );
        }
        self.frontends.insert(
            *fk,
            AppliedFrontend {
                head,
                slots: ids,
                maglev: table,
            },
        );
        Ok(true)
    }
}
