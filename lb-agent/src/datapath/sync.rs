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

use super::maps::Maps;
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

    /// Bring the maps to `desired`.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
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

        // 1. Backends every desired frontend needs: those in slots take new
        //    flows (active), the others are kept for established flows only
        //    (standby). For an endpoint shared by two Services, active wins.
        let mut wanted: BTreeMap<u32, BackendValue> = BTreeMap::new();
        let mut frontend_slots: BTreeMap<FrontendKey, Result<Vec<u32>, SyncError>> =
            BTreeMap::new();
        for (fk, frontend) in &desired.frontends {
            let mut ids = Vec::with_capacity(frontend.backends.len());
            let mut failed = None;
            let uses = frontend
                .backends
                .iter()
                .map(|b| (b, true))
                .chain(frontend.standby.iter().map(|b| (b, false)));
            for (b, selectable) in uses {
                let key = BackendKey {
                    addr: b.addr,
                    port: b.port,
                    proto: fk.proto,
                };
                let id = match self.backend_ids.get_or_assign(&key) {
                    Ok(id) => id,
                    Err(e) => {
                        failed = Some(SyncError {
                            object: frontend.service_port.clone(),
                            reason: format!("backend {}:{}: {e}", b.addr, b.port),
                            full: true,
                        });
                        break;
                    }
                };
                let entry = wanted.entry(id).or_insert(BackendValue {
                    addr_be: be32(b.addr),
                    port_be: b.port.to_be(),
                    proto: fk.proto.number(),
                    state: BACKEND_STANDBY,
                    flags: if b.remote { backend_flags::REMOTE } else { 0 }
                        | if b.on_node { backend_flags::ON_NODE } else { 0 },
                });
                if selectable {
                    ids.push(id);
                    entry.state = BACKEND_ACTIVE;
                    if b.terminating {
                        entry.flags |= backend_flags::FALLBACK;
                    }
                }
            }
            frontend_slots.insert(*fk, failed.map_or(Ok(ids), Err));
        }
        let mut failed_backends = BTreeSet::new();
        for (id, value) in &wanted {
            if self.backends.get(id) == Some(value) {
                continue;
            }
            match self.maps.backends.insert(id, value, 0) {
                Ok(()) => {
                    self.backends.insert(*id, *value);
                    report.backends_written += 1;
                }
                Err(e) => {
                    failed_backends.insert(*id);
                    warn!(backend_id = id, error = %e, "writing backend failed");
                }
            }
        }

        // Source ranges before the frontends that check them.
        let wanted_ranges: BTreeSet<(IpAddr, IpNet)> = desired
            .source_ranges
            .iter()
            .flat_map(|(addr, nets)| nets.iter().map(|n| (*addr, *n)))
            .collect();
        for (addr, net) in wanted_ranges.difference(&self.source_ranges.clone()) {
            match self
                .maps
                .source_ranges
                .insert(&source_range_key(*addr, *net), 1, 0)
            {
                Ok(()) => {
                    self.source_ranges.insert((*addr, *net));
                }
                Err(e) => report.errors.push(SyncError {
                    object: format!("LoadBalancer IP {addr}"),
                    reason: format!("source range {net}: {e}"),
                    full: is_full(&e),
                }),
            }
        }

        // 2. Frontends: slots 1..N, then slot 0, then slots past the new count.
        for (fk, frontend) in &desired.frontends {
            let ids = match frontend_slots.remove(fk) {
                Some(Ok(ids)) => ids,
                Some(Err(e)) => {
                    report.errors.push(e);
                    continue;
                }
                None => continue,
            };
            if let Some(bad) = ids.iter().find(|id| failed_backends.contains(id)) {
                report.errors.push(SyncError {
                    object: frontend.service_port.clone(),
                    reason: format!("{fk}: backend {bad} could not be written (map full?)"),
                    full: true,
                });
                continue;
            }
            match self.write_frontend(fk, frontend, ids) {
                Ok(true) => report.frontends_written += 1,
                Ok(false) => {}
                Err(e) => report.errors.push(SyncError {
                    object: frontend.service_port.clone(),
                    reason: format!("{fk}: {e}"),
                    full: is_full(&e),
                }),
            }
        }
        for ((addr, scope), entry) in &desired.addresses {
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
        //    entries, strays, then backends nothing references.
        let gone: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|fk| !desired.frontends.contains_key(fk))
            .copied()
            .collect();
        for fk in gone {
            if let Some(applied) = self.frontends.get(&fk).cloned() {
                let mut ok = self.remove_key(service_key(&fk, 0));
                for slot in 1..=applied.slots.len() as u16 {
                    ok &= self.remove_key(service_key(&fk, slot));
                }
                for index in 0..applied.maglev.len() as u32 {
                    ok &= removed(
                        self.maps
                            .maglev
                            .remove(&maglev_key(applied.head.rev_nat_id, index)),
                    );
                }
                if ok {
                    self.frontends.remove(&fk);
                    report.frontends_removed += 1;
                }
            }
        }
        let stale_addresses: Vec<(IpAddr, Scope)> = self
            .addresses
            .keys()
            .filter(|k| !desired.addresses.contains_key(k))
            .copied()
            .collect();
        for (addr, scope) in stale_addresses {
            if self.remove_key(address_key(addr, scope)) {
                self.addresses.remove(&(addr, scope));
            }
        }
        let stale_ranges: Vec<(IpAddr, IpNet)> = self
            .source_ranges
            .difference(&wanted_ranges)
            .copied()
            .collect();
        for (addr, net) in stale_ranges {
            if removed(self.maps.source_ranges.remove(&source_range_key(addr, net))) {
                self.source_ranges.remove(&(addr, net));
            }
        }
        let live_rev_nat: BTreeSet<u16> =
            self.frontends.values().map(|f| f.head.rev_nat_id).collect();
        let stale_rev_nat: Vec<u16> = self
            .rev_nat
            .keys()
            .filter(|id| !live_rev_nat.contains(id))
            .copied()
            .collect();
        for id in stale_rev_nat {
            if !removed(self.maps.rev_nat.remove(&id)) {
                continue;
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
        let referenced: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|f| f.slots.iter().copied())
            .collect();
        let unreferenced: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !referenced.contains(id) && !wanted.contains_key(id))
            .copied()
            .collect();
        for id in unreferenced {
            if !removed(self.maps.backends.remove(&id)) {
                continue;
            }
            report.backends_removed += 1;
            if let Some(value) = self.backends.remove(&id)
                && let Some(proto) = Protocol::from_number(value.proto)
            {
                let key = BackendKey {
                    addr: from_be32(value.addr_be),
                    port: u16::from_be(value.port_be),
                    proto,
                };
                if self.backend_ids.get(&key) == Some(id) {
                    self.backend_ids.release(&key);
                }
            }
        }
        // 4. State that no longer holds: affinity to a backend that left its
        //    frontend's slots (or of a frontend without affinity now), and
        //    flows to backends that are gone (removed at once, not aged out).
        if report.frontends_written + report.frontends_removed > 0 {
            self.prune_affinity();
        }
        if report.backends_removed > 0 {
            self.prune_conntrack();
        }
        report
    }

    fn prune_affinity(&mut self) {
        let live: BTreeMap<u16, (bool, BTreeSet<u32>)> = self
            .frontends
            .values()
            .map(|f| {
                let on = f.head.flags & service_flags::AFFINITY != 0;
                (f.head.rev_nat_id, (on, f.slots.iter().copied().collect()))
            })
            .collect();
        let stale: Vec<_> = self
            .maps
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                !live
                    .get(&k.rev_nat_id)
                    .is_some_and(|(on, slots)| *on && slots.contains(&v.backend_id))
            })
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            removed(self.maps.affinity.remove(&key));
        }
    }

    fn prune_conntrack(&mut self) {
        let stale: Vec<_> = self
            .maps
            .conntrack()
            .into_iter()
            .flat_map(|(_, ct)| ct.iter().filter_map(Result::ok))
            .filter(|(_, v)| {
                v.backend_id != lb_common::CT_NO_BACKEND
                    && !self.backends.contains_key(&v.backend_id)
            })
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            removed(self.maps.conntrack_of_mut(key.proto).remove(&key));
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
