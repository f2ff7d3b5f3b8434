//! Keep the maps equal to a DesiredState: diff against a mirror of what was
//! written, and write in make-before-break order so the kernel never reads
//! a frontend naming a missing set, a count that points past written slots,
//! or a slot naming a missing backend:
//! backends -> source ranges -> sets (slots, Maglev table, then the header)
//! -> frontends -> address entries; removal in reverse.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use aya::maps::{IterableMap, MapData, MapError, lpm_trie::Key};
use ipnet::IpNet;
use lb_common::{
    Addr, BACKEND_ACTIVE, BACKEND_STANDBY, BackendSetValue, BackendSlotKey, BackendValue,
    MaglevKey, NotProgrammedKey, NotProgrammedValue, Prefix4, Prefix6, RevNatValue,
    SERVICE_CIDRS_PER_FAMILY, ServiceCidrs, ServiceKey, ServiceName, ServiceValue, SetMemberKey,
    SourceRange, backend_flags, frontend_kind, service_flags,
};
use tracing::{debug, warn};

use super::{
    cleanup::{self, Cleaner, CleanupRequest, StaleAffinity},
    maps::Maps,
};
use crate::model::{
    AddressEntry, BackendSet, BackendSetKey, DesiredState, Frontend, FrontendKey, Protocol, Scope,
    ids::IdAllocator, maglev,
};

/// A backend is identified by where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

/// What `Syncer::import_flow` did with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Imported {
    Carried,
    /// Its destination is no frontend lb serves where its packets come in.
    NotAService,
    /// Its endpoint is not one of lb's backends.
    UnknownBackend,
    /// lb tracks this tuple already.
    AlreadyTracked,
}

/// Who holds a backend set id: a set of the desired state, or a set found
/// in the pins at start (whose name the maps do not record), kept until no
/// frontend points at it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SetOwner {
    Named(BackendSetKey),
    Adopted(u32),
}

/// What one backend set looks like in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AppliedSet {
    id: u32,
    /// The header as written; None until it is.
    head: Option<BackendSetValue>,
    /// Backend id per slot (0: a slot whose write failed).
    slots: Vec<u32>,
    /// Maglev table (backend id per index); empty without Maglev.
    maglev: Vec<u32>,
    /// Backends with a `LB_SET_MEMBERS` entry for this set.
    members: BTreeSet<u32>,
}

/// A backend set of the desired state, as the syncer tracks it.
#[derive(Clone, Debug)]
struct DesiredSet {
    /// The content its backend uses were counted from.
    content: Arc<BackendSet>,
    uses: Vec<BackendUse>,
    /// Desired frontends that point at it.
    users: BTreeSet<FrontendKey>,
    /// `uses` were counted from `content`.
    counted: bool,
    /// Its backend ids could not all be assigned: not written.
    failed: Option<SyncError>,
}

/// One set's use of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BackendUse {
    id: u32,
    /// In the set's slots (new flows), not only standby.
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

/// How many desired sets use a backend, and how: its map value follows
/// from these alone, whatever order the sets come in.
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
    pub sets_written: usize,
    pub sets_removed: usize,
    pub errors: Vec<SyncError>,
}

pub struct Syncer {
    maps: Maps,
    backend_ids: IdAllocator<BackendKey>,
    rev_nat_ids: IdAllocator<FrontendKey>,
    set_ids: IdAllocator<SetOwner>,
    backends: BTreeMap<u32, BackendValue>,
    /// Frontends as written.
    frontends: BTreeMap<FrontendKey, ServiceValue>,
    /// Backend sets as written.
    sets: BTreeMap<SetOwner, AppliedSet>,
    /// Per set id, how many written frontends point at it.
    set_refs: BTreeMap<u32, u32>,
    /// Per backend id, how many written slots name it (a Maglev table names
    /// only backends of its set's slots).
    slot_refs: BTreeMap<u32, u32>,
    /// Address entries: (address, scope) -> flags.
    addresses: BTreeMap<(IpAddr, Scope), u32>,
    source_ranges: BTreeSet<(IpAddr, IpNet)>,
    rev_nat: BTreeMap<u32, RevNatValue>,
    /// Per rev-NAT id, the Service port name written to `LB_SERVICE_NAMES`
    /// (for the monitor and dump; a failed write is retried next sync and
    /// never holds the frontend back).
    service_names: BTreeMap<u32, Arc<str>>,
    /// Names whose write failed, retried every sync.
    unnamed: BTreeMap<u32, Arc<str>>,
    /// `LB_SERVICE_CIDRS` as written.
    service_cidrs: ServiceCidrs,
    /// `LB_ALLOCATED` as written: addresses in a Service CIDR that
    /// Services hold.
    allocated: BTreeSet<IpAddr>,
    /// Held addresses whose write failed: no drop while there are any.
    unheld: BTreeSet<IpAddr>,
    /// Per desired frontend, the set it points at.
    frontend_sets: BTreeMap<FrontendKey, BackendSetKey>,
    /// The sets desired frontends point at.
    desired_sets: BTreeMap<BackendSetKey, DesiredSet>,
    /// Per backend id, how the desired sets use it.
    uses: BTreeMap<u32, UseCounts>,
    /// Backend ids that lost their last use: removed once no written slot names them.
    released: BTreeSet<u32>,
    /// The keys of backends whose last use went, until their id is freed.
    unused_keys: BTreeMap<u32, BackendKey>,
    /// What this sync made stale (affinity of frontends with affinity
    /// before or after it, flows of removed backends).
    cleanup: CleanupRequest,
    /// Where stale entries are sent to be removed; None: removed inline.
    cleaner: Option<Cleaner>,
    /// Map keys found at start (or left by a failed write) that nothing
    /// reaches: removed on the next sync.
    stray_service_keys: Vec<ServiceKey>,
    stray_slot_keys: Vec<BackendSlotKey>,
    stray_member_keys: Vec<SetMemberKey>,
    stray_maglev_keys: Vec<MaglevKey>,
    /// LB_NOT_PROGRAMMED as written: object -> (map full, reason).
    not_programmed: BTreeMap<String, (bool, String)>,
    /// The prefilter as written: address -> how many written frontends,
    /// address entries and backends have it. An address is in the map
    /// before the first entry with it is written and leaves after the last
    /// is removed, so the datapath never skips a packet it must see.
    prefilter: BTreeMap<IpAddr, u32>,
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

fn service_key(fk: &FrontendKey) -> ServiceKey {
    ServiceKey {
        addr_be: be32(fk.addr),
        port_be: fk.port.to_be(),
        proto: fk.proto.number(),
        scope: fk.scope.code(),
        _pad: 0,
    }
}

fn slot_key(set_id: u32, slot: usize) -> BackendSlotKey {
    BackendSlotKey {
        set_id,
        slot: slot as u32,
    }
}

fn member_key(set_id: u32, backend_id: u32) -> SetMemberKey {
    SetMemberKey { set_id, backend_id }
}

fn maglev_key(set_id: u32, index: usize) -> MaglevKey {
    MaglevKey {
        set_id,
        index: index as u32,
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

fn frontend_flags(frontend: &Frontend) -> u32 {
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
    if frontend.dsr {
        flags |= service_flags::DSR;
    }
    if frontend.set.maglev {
        flags |= service_flags::MAGLEV;
    }
    flags
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

fn id_error(e: impl std::fmt::Display) -> MapError {
    MapError::IoError(std::io::Error::other(e.to_string()))
}

impl Syncer {
    /// Adopt what the (possibly pinned) maps already hold: ids stay stable
    /// across restarts, and the first sync prunes what is no longer desired.
    pub fn new(maps: Maps) -> Result<Self, MapError> {
        // Id spaces as large as the maps the ids index (--lb-map-max).
        let capacity = |map: &MapData| map.info().map(|i| i.max_entries());
        let backends = capacity(maps.backends.map())?;
        let rev_nat = capacity(maps.rev_nat.map())?;
        let sets = capacity(maps.backend_sets.map())?;
        let mut syncer = Syncer {
            maps,
            backend_ids: IdAllocator::new("backend", backends),
            rev_nat_ids: IdAllocator::new("rev-NAT", rev_nat),
            set_ids: IdAllocator::new("backend set", sets),
            backends: BTreeMap::new(),
            frontends: BTreeMap::new(),
            sets: BTreeMap::new(),
            set_refs: BTreeMap::new(),
            slot_refs: BTreeMap::new(),
            addresses: BTreeMap::new(),
            source_ranges: BTreeSet::new(),
            rev_nat: BTreeMap::new(),
            service_names: BTreeMap::new(),
            unnamed: BTreeMap::new(),
            service_cidrs: ServiceCidrs::default(),
            allocated: BTreeSet::new(),
            unheld: BTreeSet::new(),
            frontend_sets: BTreeMap::new(),
            desired_sets: BTreeMap::new(),
            uses: BTreeMap::new(),
            released: BTreeSet::new(),
            unused_keys: BTreeMap::new(),
            cleanup: CleanupRequest::default(),
            cleaner: None,
            stray_service_keys: Vec::new(),
            stray_slot_keys: Vec::new(),
            stray_member_keys: Vec::new(),
            stray_maglev_keys: Vec::new(),
            not_programmed: BTreeMap::new(),
            prefilter: BTreeMap::new(),
        };
        // What an earlier agent reported stays until the first report replaces it.
        for entry in syncer.maps.not_programmed.iter() {
            let (key, value) = entry?;
            syncer.not_programmed.insert(
                key.object().to_string(),
                (value.map_full != 0, value.reason().to_string()),
            );
        }
        for entry in syncer.maps.backends.iter() {
            let (id, value) = entry?;
            let key = Protocol::from_number(value.proto).map(|proto| BackendKey {
                addr: from_be32(value.addr_be),
                port: u16::from_be(value.port_be),
                proto,
            });
            if let Some(key) = key {
                syncer.backend_ids.adopt(key, id);
            }
            // Unusable or duplicate keys are removed after everything
            // referencing them (nothing desired uses their id).
            syncer.backends.insert(id, value);
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
                syncer.rev_nat_ids.adopt(fk, id);
            }
            syncer.rev_nat.insert(id, value);
        }
        if let Ok(cidrs) = syncer.maps.service_cidrs.get(&0, 0) {
            syncer.service_cidrs = cidrs;
        }
        for key in syncer.maps.allocated.keys() {
            syncer.allocated.insert(from_be32(key?));
        }
        let mut stray_names = Vec::new();
        for entry in syncer.maps.service_names.iter() {
            let (id, name) = entry?;
            if syncer.rev_nat.contains_key(&id) {
                syncer.service_names.insert(id, name.as_str().into());
            } else {
                stray_names.push(id);
            }
        }
        for id in stray_names {
            let _ = syncer.maps.service_names.remove(&id);
        }
        syncer.adopt_sets()?;
        for entry in syncer.maps.services.iter() {
            let (key, value) = entry?;
            let Some(scope) = Scope::from_code(key.scope) else {
                syncer.stray_service_keys.push(key);
                continue;
            };
            if key.port_be == 0 && key.proto == 0 {
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
            *syncer.set_refs.entry(value.backend_set_id).or_default() += 1;
            syncer.frontends.insert(fk, value);
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
        syncer.adopt_prefilter()?;
        debug!(
            frontends = syncer.frontends.len(),
            sets = syncer.sets.len(),
            backends = syncer.backends.len(),
            prefilter = syncer.prefilter.len(),
            "adopted existing map contents"
        );
        Ok(syncer)
    }

    /// The prefilter for the adopted entries: every address they hold is
    /// written (a map from before the prefilter existed is empty), and any
    /// other pinned address removed.
    fn adopt_prefilter(&mut self) -> Result<(), MapError> {
        let addrs: Vec<IpAddr> = self
            .frontends
            .keys()
            .map(|fk| fk.addr)
            .chain(self.addresses.keys().map(|(addr, _)| *addr))
            .chain(self.backends.values().map(|b| from_be32(b.addr_be)))
            .collect();
        let pinned4: Vec<u32> = self.maps.prefilter4.keys().collect::<Result<_, _>>()?;
        let pinned6: Vec<Addr> = self.maps.prefilter6.keys().collect::<Result<_, _>>()?;
        for addr in addrs {
            self.prefilter_ref(addr)?;
        }
        for key in pinned4 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(key.to_ne_bytes()));
            if !self.prefilter.contains_key(&addr) {
                self.maps.prefilter4.remove(&key)?;
            }
        }
        for key in pinned6 {
            if !self.prefilter.contains_key(&from_be32(key)) {
                self.maps.prefilter6.remove(&key)?;
            }
        }
        Ok(())
    }

    /// One more written entry holds `addr`: the first puts it in the
    /// prefilter (before that entry is written).
    fn prefilter_ref(&mut self, addr: IpAddr) -> Result<(), MapError> {
        let addr = addr.to_canonical();
        if let Some(n) = self.prefilter.get_mut(&addr) {
            *n += 1;
            return Ok(());
        }
        match addr {
            IpAddr::V4(v4) => self
                .maps
                .prefilter4
                .insert(u32::from_ne_bytes(v4.octets()), 1, 0)?,
            IpAddr::V6(_) => self.maps.prefilter6.insert(be32(addr), 1, 0)?,
        }
        self.prefilter.insert(addr, 1);
        Ok(())
    }

    /// One written entry holding `addr` went: the last takes it out of the
    /// prefilter. A failed removal only leaves an address the datapath
    /// looks at more closely than it needs to.
    fn prefilter_unref(&mut self, addr: IpAddr) {
        let addr = addr.to_canonical();
        let Some(n) = self.prefilter.get_mut(&addr) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.prefilter.remove(&addr);
        let result = match addr {
            IpAddr::V4(v4) => self
                .maps
                .prefilter4
                .remove(&u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(_) => self.maps.prefilter6.remove(&be32(addr)),
        };
        if !removed(result) {
            warn!(%addr, "removing a prefilter address failed; it stays until the agent restarts");
        }
    }

    /// Backend sets found in the pins. The maps do not record which Service
    /// port a set was for, so each is kept under its id until no frontend
    /// points at it; desired sets are written afresh beside them.
    fn adopt_sets(&mut self) -> Result<(), MapError> {
        let mut slots: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
        for entry in self.maps.backend_slots.iter() {
            let (key, id) = entry?;
            slots.entry(key.set_id).or_default().insert(key.slot, id);
        }
        let mut tables: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
        for entry in self.maps.maglev.iter() {
            let (key, id) = entry?;
            tables.entry(key.set_id).or_default().insert(key.index, id);
        }
        let mut members: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for entry in self.maps.set_members.iter() {
            let (key, _) = entry?;
            members
                .entry(key.set_id)
                .or_default()
                .insert(key.backend_id);
        }
        let mut heads = Vec::new();
        for entry in self.maps.backend_sets.iter() {
            heads.push(entry?);
        }
        for (id, head) in heads {
            let owner = SetOwner::Adopted(id);
            self.set_ids.adopt(owner.clone(), id);
            let mut found = slots.remove(&id).unwrap_or_default();
            let applied_slots: Vec<u32> = (0..head.count)
                .map(|s| found.remove(&s).unwrap_or(0))
                .collect();
            // Entries past the count or size (an interrupted sync) are strays.
            self.stray_slot_keys
                .extend(found.keys().map(|s| slot_key(id, *s as usize)));
            let mut table = tables.remove(&id).unwrap_or_default();
            let maglev: Vec<u32> = (0..head.maglev_size)
                .map(|i| table.remove(&i).unwrap_or(0))
                .collect();
            self.stray_maglev_keys
                .extend(table.keys().map(|i| maglev_key(id, *i as usize)));
            for backend in applied_slots.iter().filter(|b| **b != 0) {
                *self.slot_refs.entry(*backend).or_default() += 1;
            }
            // Members of backends no longer in the slots are strays.
            let (kept, stray): (BTreeSet<u32>, BTreeSet<u32>) = members
                .remove(&id)
                .unwrap_or_default()
                .into_iter()
                .partition(|b| applied_slots.contains(b));
            self.stray_member_keys
                .extend(stray.into_iter().map(|b| member_key(id, b)));
            self.sets.insert(
                owner,
                AppliedSet {
                    id,
                    head: Some(head),
                    slots: applied_slots,
                    maglev,
                    members: kept,
                },
            );
        }
        for (id, orphan) in members {
            self.stray_member_keys
                .extend(orphan.into_iter().map(|b| member_key(id, b)));
        }
        for (id, orphan) in slots {
            self.stray_slot_keys
                .extend(orphan.keys().map(|s| slot_key(id, *s as usize)));
        }
        for (id, orphan) in tables {
            self.stray_maglev_keys
                .extend(orphan.keys().map(|i| maglev_key(id, *i as usize)));
        }
        Ok(())
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Carry on a connection another proxy translated (kube-proxy's DNAT,
    /// read from the kernel's conntrack table): conntrack entries in both
    /// directions as the programs would have written them for the backend
    /// it chose, so its next packets keep that backend. Only frontends and
    /// backends this sync wrote are used; a tuple lb tracks already is left.
    /// `scope`: where the flow's packets reach lb (a pod device: internal;
    /// a node device: external); without a frontend there, lb's programs
    /// leave the flow to netfilter, whose entry must then stay.
    pub fn import_flow(
        &mut self,
        flow: &crate::kernel_conntrack::KernelFlow,
        scope: Scope,
        now_ns: u64,
    ) -> Result<Imported, MapError> {
        use lb_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, CtValue, ct_flags, ct_lifetime};
        let Some(proto) = Protocol::from_number(flow.proto) else {
            return Ok(Imported::NotAService);
        };
        let frontend = self.frontends.get(&FrontendKey {
            addr: flow.original.dst.ip(),
            port: flow.original.dst.port(),
            proto,
            scope,
        });
        let Some(frontend) = frontend else {
            return Ok(Imported::NotAService);
        };
        let backend = BackendKey {
            addr: flow.reply.src.ip(),
            port: flow.reply.src.port(),
            proto,
        };
        let Some(backend_id) = self.backend_ids.get(&backend) else {
            return Ok(Imported::UnknownBackend);
        };
        let key = |src: std::net::SocketAddr, dst: std::net::SocketAddr, dir| CtKey {
            src_addr_be: be32(src.ip()),
            dst_addr_be: be32(dst.ip()),
            src_port_be: src.port().to_be(),
            dst_port_be: dst.port().to_be(),
            proto: flow.proto,
            dir,
            _pad: [0; 2],
        };
        let tcp = proto == Protocol::Tcp;
        let (flags, lifetime_s) = if tcp {
            (
                ct_flags::SYN_SEEN | ct_flags::REPLY_SEEN,
                ct_lifetime::TCP_ESTABLISHED,
            )
        } else {
            (ct_flags::REPLY_SEEN, ct_lifetime::OTHER_REPLIED)
        };
        // kube-proxy's masquerade: the backend answers the address the
        // client was rewritten to, and the reply entry restores the client.
        let (snat_addr, snat_port, restore_addr, restore_port) = if flow.masqueraded() {
            (
                be32(flow.reply.dst.ip()),
                flow.reply.dst.port(),
                be32(flow.original.src.ip()),
                flow.original.src.port(),
            )
        } else {
            (Addr::NONE, flow.original.src.port(), Addr::NONE, 0)
        };
        let entry = CtValue {
            backend_id,
            rev_nat_id: frontend.rev_nat_id,
            flags,
            tcp_flags_seen: if tcp { 0x12 } else { 0 },
            lifetime_s,
            created_ns: now_ns,
            last_seen_ns: now_ns,
            ..Default::default()
        };
        let reply = CtValue {
            nat_addr_be: be32(flow.original.dst.ip()),
            nat_port_be: flow.original.dst.port().to_be(),
            snat_addr_be: restore_addr,
            snat_port_be: restore_port.to_be(),
            ..entry
        };
        let forward = CtValue {
            nat_addr_be: be32(backend.addr),
            nat_port_be: backend.port.to_be(),
            snat_addr_be: snat_addr,
            snat_port_be: snat_port.to_be(),
            ..entry
        };
        let reply_key = key(flow.reply.src, flow.reply.dst, CT_DIR_REPLY);
        let forward_key = key(flow.original.src, flow.original.dst, CT_DIR_FORWARD);
        let ct = self.maps.conntrack_of_mut(flow.proto);
        let live = |entry: Result<CtValue, MapError>| {
            entry.is_ok_and(|e| e.last_seen_ns + u64::from(e.lifetime_s) * 1_000_000_000 > now_ns)
        };
        if live(ct.get(&forward_key, 0)) || live(ct.get(&reply_key, 0)) {
            return Ok(Imported::AlreadyTracked);
        }
        // Reply first: a forward entry never exists without its way back.
        ct.insert(reply_key, reply, 0)?;
        ct.insert(forward_key, forward, 0)?;
        Ok(Imported::Carried)
    }

    /// Report in LB_NOT_PROGRAMMED (for `dump services`) exactly the
    /// objects in `errors`, writing only differences. Past the map's
    /// capacity the rest are left out: the metric still counts them.
    pub fn publish_not_programmed(
        &mut self,
        errors: &BTreeMap<String, SyncError>,
    ) -> Result<(), MapError> {
        let gone: Vec<String> = self
            .not_programmed
            .keys()
            .filter(|object| !errors.contains_key(*object))
            .cloned()
            .collect();
        for object in gone {
            if removed(
                self.maps
                    .not_programmed
                    .remove(&NotProgrammedKey::new(&object)),
            ) {
                self.not_programmed.remove(&object);
            }
        }
        for (object, error) in errors {
            let entry = (error.full, error.reason.clone());
            if self.not_programmed.get(object) == Some(&entry) {
                continue;
            }
            let value = NotProgrammedValue::new(&error.reason, error.full);
            match self
                .maps
                .not_programmed
                .insert(NotProgrammedKey::new(object), value, 0)
            {
                Ok(()) => {
                    self.not_programmed.insert(object.clone(), entry);
                }
                Err(e) if is_full(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
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
            .chain(self.frontend_sets.keys())
            .copied()
            .collect();
        let addresses: BTreeSet<(IpAddr, Scope)> = desired
            .addresses
            .keys()
            .chain(self.addresses.keys())
            .copied()
            .chain(
                desired
                    .allocated
                    .keys()
                    .chain(&self.allocated)
                    .chain(&self.unheld)
                    .map(|addr| (*addr, Scope::Internal)),
            )
            .collect();
        let ranges: BTreeSet<IpAddr> = desired
            .source_ranges
            .keys()
            .copied()
            .chain(self.source_ranges.iter().map(|(ip, _)| *ip))
            .collect();
        let mut report = self.sync_changes(desired, &frontends, &addresses, &ranges);
        // What no desired object accounts for: rev-NAT entries and sets
        // adopted from the pins, or left by a failed removal.
        let live_rev_nat: BTreeSet<u32> = self.frontends.values().map(|f| f.rev_nat_id).collect();
        let stale_rev_nat: Vec<u32> = self
            .rev_nat
            .keys()
            .filter(|id| !live_rev_nat.contains(id))
            .copied()
            .collect();
        for id in stale_rev_nat {
            self.remove_rev_nat(id);
        }
        let unused_sets: Vec<SetOwner> = self
            .sets
            .keys()
            .filter(|owner| match owner {
                SetOwner::Named(key) => !self.desired_sets.contains_key(key),
                SetOwner::Adopted(_) => true,
            })
            .cloned()
            .collect();
        for owner in unused_sets {
            self.remove_set(&owner, &mut report);
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
    /// names): the cost of a change is the change, not the cluster. The
    /// backend sets those frontends point at, before and after, follow.
    pub fn sync_changes(
        &mut self,
        desired: &DesiredState,
        frontends: &BTreeSet<FrontendKey>,
        addresses: &BTreeSet<(IpAddr, Scope)>,
        source_ranges: &BTreeSet<IpAddr>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        for (id, name) in std::mem::take(&mut self.unnamed) {
            if self.rev_nat.contains_key(&id) {
                self.write_service_name(id, &name);
            }
        }

        // 0. Strays (left by an interrupted or failed sync) are unreachable
        //    by the kernel: remove them first, before this sync may write
        //    the same keys for real.
        for key in std::mem::take(&mut self.stray_service_keys) {
            self.remove_key(key);
        }
        for key in std::mem::take(&mut self.stray_slot_keys) {
            if !removed(self.maps.backend_slots.remove(&key)) {
                self.stray_slot_keys.push(key);
            }
        }
        for key in std::mem::take(&mut self.stray_maglev_keys) {
            if !removed(self.maps.maglev.remove(&key)) {
                self.stray_maglev_keys.push(key);
            }
        }
        for key in std::mem::take(&mut self.stray_member_keys) {
            if !removed(self.maps.set_members.remove(&key)) {
                self.stray_member_keys.push(key);
            }
        }

        // 1. Which set each named frontend points at now, and the content
        //    the delta brings for those sets.
        let mut touched: BTreeSet<BackendSetKey> = BTreeSet::new();
        let mut contents: BTreeMap<BackendSetKey, Arc<BackendSet>> = BTreeMap::new();
        for fk in frontends {
            let new = desired.frontends.get(fk).map(|f| &f.set);
            if let Some(old) = self.frontend_sets.get(fk).cloned()
                && new.is_none_or(|set| set.key != old)
            {
                if let Some(ds) = self.desired_sets.get_mut(&old) {
                    ds.users.remove(fk);
                }
                self.frontend_sets.remove(fk);
                touched.insert(old);
            }
            let Some(set) = new else { continue };
            touched.insert(set.key.clone());
            contents.insert(set.key.clone(), set.clone());
            self.frontend_sets.insert(*fk, set.key.clone());
            self.desired_sets
                .entry(set.key.clone())
                .or_insert_with(|| DesiredSet {
                    content: set.clone(),
                    uses: Vec::new(),
                    users: BTreeSet::new(),
                    counted: false,
                    failed: None,
                })
                .users
                .insert(*fk);
        }

        // 2. Backends: the uses of every changed set are exchanged for its
        //    new ones; a backend some set selects is active, one only kept
        //    for established flows standby (for an endpoint shared by two
        //    Services, active wins).
        let mut changed_ids: BTreeSet<u32> = BTreeSet::new();
        for key in &touched {
            let Some(ds) = self.desired_sets.get(key) else {
                continue;
            };
            if ds.users.is_empty() {
                // Going: its uses end now, so what others make of a shared
                // backend is written before the set goes.
                if let Some(gone) = self.desired_sets.remove(key) {
                    for u in gone.uses {
                        self.count_use(&u, -1);
                        changed_ids.insert(u.id);
                    }
                }
                continue;
            }
            let Some(content) = contents.get(key) else {
                continue;
            };
            if ds.counted
                && ds.failed.is_none()
                && (Arc::ptr_eq(&ds.content, content) || ds.content == *content)
            {
                continue;
            }
            match self.assign_uses(content) {
                Ok(uses) => {
                    for u in &uses {
                        self.count_use(u, 1);
                        changed_ids.insert(u.id);
                    }
                    let Some(ds) = self.desired_sets.get_mut(key) else {
                        continue;
                    };
                    ds.content = content.clone();
                    ds.counted = true;
                    ds.failed = None;
                    let old = std::mem::replace(&mut ds.uses, uses);
                    for u in old {
                        self.count_use(&u, -1);
                        changed_ids.insert(u.id);
                    }
                }
                Err(e) => {
                    if let Some(ds) = self.desired_sets.get_mut(key) {
                        ds.failed = Some(e);
                    }
                }
            }
        }
        // Backends of the sets about to be written whose map entry is not
        // what their uses make it (a write that failed before): retried.
        for key in &touched {
            let Some(ds) = self.desired_sets.get(key) else {
                continue;
            };
            for u in &ds.uses {
                let wanted = self.uses.get(&u.id).and_then(UseCounts::value);
                if self.backends.get(&u.id) != wanted.as_ref() {
                    changed_ids.insert(u.id);
                }
            }
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
            // The prefilter follows the address the id holds (an adopted
            // id may be handed to another backend).
            let old_addr = self.backends.get(id).map(|b| from_be32(b.addr_be));
            let new_addr = from_be32(value.addr_be);
            let moved = old_addr != Some(new_addr);
            let written = match if moved {
                self.prefilter_ref(new_addr)
            } else {
                Ok(())
            } {
                Ok(()) => self.maps.backends.insert(id, value, 0).inspect_err(|_| {
                    if moved {
                        self.prefilter_unref(new_addr);
                    }
                }),
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => {
                    self.backends.insert(*id, value);
                    if moved && let Some(old) = old_addr {
                        self.prefilter_unref(old);
                    }
                    report.backends_written += 1;
                }
                Err(e) => {
                    failed_backends.insert(*id);
                    warn!(backend_id = id, error = %e, "writing backend failed");
                }
            }
        }

        // Source ranges before the frontends that check them.
        let stale_ranges = self.write_source_ranges(desired, source_ranges, &mut report);

        // 3. Sets: slots and Maglev table, then the header.
        let mut ready: BTreeSet<BackendSetKey> = BTreeSet::new();
        for key in &touched {
            let Some(ds) = self.desired_sets.get(key) else {
                continue;
            };
            if let Some(e) = &ds.failed {
                report.errors.push(e.clone());
                continue;
            }
            if let Some(bad) = ds.uses.iter().find(|u| failed_backends.contains(&u.id)) {
                report.errors.push(SyncError {
                    object: ds.content.key.service_port.to_string(),
                    reason: format!(
                        "backend set {key}: backend {} could not be written (map full?)",
                        bad.id
                    ),
                    full: true,
                });
                continue;
            }
            match self.write_set(key) {
                Ok(written) => {
                    report.sets_written += written as usize;
                    ready.insert(key.clone());
                }
                Err(e) => report.errors.push(e),
            }
        }

        // 4. Frontends, pointing at written sets only.
        for fk in frontends {
            let Some(frontend) = desired.frontends.get(fk) else {
                continue;
            };
            let set_key = &frontend.set.key;
            let written = self
                .sets
                .get(&SetOwner::Named(set_key.clone()))
                .filter(|s| s.head.is_some())
                .map(|s| s.id);
            let Some(set_id) = written.filter(|_| ready.contains(set_key)) else {
                // Its set could not be written: reported once, above.
                continue;
            };
            match self.write_frontend(fk, frontend, set_id) {
                Ok(true) => report.frontends_written += 1,
                Ok(false) => {}
                Err(e) => report.errors.push(SyncError {
                    object: frontend.service_port.to_string(),
                    reason: format!("{fk}: {e}"),
                    full: is_full(&e),
                }),
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
            let new_entry = !self.addresses.contains_key(&(*addr, *scope));
            let written = match if new_entry {
                self.prefilter_ref(*addr)
            } else {
                Ok(())
            } {
                Ok(()) => self
                    .maps
                    .services
                    .insert(address_key(*addr, *scope), head, 0)
                    .inspect_err(|_| {
                        if new_entry {
                            self.prefilter_unref(*addr);
                        }
                    }),
                Err(e) => Err(e),
            };
            match written {
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

        // Addresses Services hold in a Service CIDR (every Service's,
        // another proxy's too): spared by the unallocated drop.
        for (addr, _) in addresses {
            self.hold_allocated(desired, *addr, &mut report);
        }

        // 5. Removals: frontends no longer desired, the sets nothing points
        //    at any more, address entries, source ranges, then backends
        //    nothing uses.
        for fk in frontends {
            if desired.frontends.contains_key(fk) {
                continue;
            }
            let Some(applied) = self.frontends.get(fk).copied() else {
                continue;
            };
            if !self.remove_key(service_key(fk)) {
                report.errors.push(SyncError {
                    object: fk.to_string(),
                    reason: "removing the frontend failed; retried".into(),
                    full: false,
                });
                continue;
            }
            self.frontends.remove(fk);
            self.prefilter_unref(fk.addr);
            self.unref_set(applied.backend_set_id);
            report.frontends_removed += 1;
            if applied.flags & service_flags::AFFINITY != 0 {
                self.cleanup
                    .merge_affinity(applied.rev_nat_id, StaleAffinity::All);
            }
            self.remove_rev_nat(applied.rev_nat_id);
        }
        for key in &touched {
            if !self.desired_sets.contains_key(key) {
                self.remove_set(&SetOwner::Named(key.clone()), &mut report);
            }
        }
        for key in addresses {
            if desired.addresses.contains_key(key) || !self.addresses.contains_key(key) {
                continue;
            }
            if self.remove_key(address_key(key.0, key.1)) {
                self.addresses.remove(key);
                self.prefilter_unref(key.0);
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
        // 6. State that no longer holds: affinity to a backend that left its
        //    set's slots (or of a frontend without affinity now), and flows
        //    to backends that are gone (removed at once, not aged out).
        self.request_cleanup();
        // Last: the drop of unallocated addresses only once every address
        // a Service holds is listed.
        self.write_service_cidrs(desired, &mut report);
        report
    }

    /// Hold `addr` in `LB_ALLOCATED` while a Service holds it and it lies
    /// in a Service CIDR (and release it otherwise).
    fn hold_allocated(&mut self, desired: &DesiredState, addr: IpAddr, report: &mut SyncReport) {
        let wanted = desired.allocated.contains_key(&addr)
            && desired.service_cidrs.iter().any(|net| net.contains(&addr));
        let held = self.allocated.contains(&addr);
        if wanted && !held {
            match self.maps.allocated.insert(be32(addr), 1, 0) {
                Ok(()) => {
                    self.allocated.insert(addr);
                    self.unheld.remove(&addr);
                }
                Err(e) => {
                    self.unheld.insert(addr);
                    report.errors.push(SyncError {
                        object: format!("Service IP {addr}"),
                        reason: format!("holding it in LB_ALLOCATED: {e}"),
                        full: is_full(&e),
                    });
                }
            }
        } else if !wanted {
            self.unheld.remove(&addr);
            if held {
                if removed(self.maps.allocated.remove(&be32(addr))) {
                    self.allocated.remove(&addr);
                } else {
                    report.errors.push(SyncError {
                        object: format!("Service IP {addr}"),
                        reason: "releasing it from LB_ALLOCATED failed; retried".into(),
                        full: false,
                    });
                }
            }
        }
    }

    /// Write the missing source ranges of the named LoadBalancer IPs;
    /// returns the ranges to remove once no frontend checks them.
    fn write_source_ranges(
        &mut self,
        desired: &DesiredState,
        source_ranges: &BTreeSet<IpAddr>,
        report: &mut SyncReport,
    ) -> Vec<(IpAddr, IpNet)> {
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
        stale_ranges
    }

    /// Backend ids for every backend of a set (selectable first, in slot
    /// order, then standby). On failure the ids assigned for it alone go back.
    fn assign_uses(&mut self, set: &BackendSet) -> Result<Vec<BackendUse>, SyncError> {
        let mut uses = Vec::with_capacity(use_count(set));
        let mut keys = Vec::with_capacity(uses.capacity());
        let all = set
            .backends
            .iter()
            .map(|b| (b, true))
            .chain(set.standby.iter().map(|b| (b, false)));
        for (b, selectable) in all {
            let key = BackendKey {
                addr: b.addr,
                port: b.port,
                proto: set.key.proto,
            };
            match self.backend_ids.get_or_assign(&key) {
                Ok(id) => {
                    uses.push(BackendUse::new(id, b, selectable));
                    keys.push(key);
                }
                Err(e) => {
                    for (u, key) in uses.iter().zip(&keys) {
                        if !self.uses.contains_key(&u.id) && !self.backends.contains_key(&u.id) {
                            self.backend_ids.release(key);
                        }
                    }
                    return Err(SyncError {
                        object: set.key.service_port.to_string(),
                        reason: format!("backend {}:{}: {e}", b.addr, b.port),
                        full: true,
                    });
                }
            }
        }
        for (u, key) in uses.iter().zip(keys) {
            // The key of a backend counted for the first time.
            self.uses.entry(u.id).or_default().key = Some(key);
        }
        Ok(uses)
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
        if sign > 0 {
            self.unused_keys.remove(&u.id);
        }
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

    /// Remove backends released and still unused, unless a written slot
    /// still names them (a set whose rewrite failed); returns how many went.
    fn remove_released(&mut self) -> usize {
        let candidates: Vec<u32> = std::mem::take(&mut self.released)
            .into_iter()
            .filter(|id| !self.uses.contains_key(id))
            .collect();
        let mut count = 0;
        for id in candidates {
            if self.slot_refs.contains_key(&id) {
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
            self.prefilter_unref(from_be32(value.addr_be));
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

    fn remove_rev_nat(&mut self, id: u32) {
        if !removed(self.maps.rev_nat.remove(&id)) {
            return;
        }
        if self.service_names.remove(&id).is_some() {
            let _ = self.maps.service_names.remove(&id);
        }
        if let Some(value) = self.rev_nat.remove(&id)
            && let Some(proto) = Protocol::from_number(value.proto)
            && let Some(scope) = Scope::from_code(value.scope)
        {
            let fk = FrontendKey {
                addr: from_be32(value.addr_be),
                port: u16::from_be(value.port_be),
                proto,
                scope,
            };
            if self.rev_nat_ids.get(&fk) == Some(id) {
                self.rev_nat_ids.release(&fk);
            }
        }
    }

    /// Zero a rev-NAT id's per-Service counters on every CPU (nothing to do
    /// when counters are off: the id has no slot).
    fn zero_service_counters(&mut self, id: u32) {
        if id >= self.maps.service_stats.len() {
            return;
        }
        let Ok(cpus) = aya::util::nr_cpus() else {
            return;
        };
        if let Ok(zeros) =
            aya::maps::PerCpuValues::try_from(vec![lb_common::ServiceCounters::default(); cpus])
            && let Err(e) = self.maps.service_stats.set(id, zeros, 0)
        {
            warn!(rev_nat_id = id, error = %e, "zeroing a reused id's counters in LB_SERVICE_STATS failed");
        }
    }

    /// Write the Service CIDRs if they changed (a handful of prefixes: one
    /// array entry, compared whole every sync).
    fn write_service_cidrs(&mut self, desired: &DesiredState, report: &mut SyncReport) {
        let (mut value, left_out) = service_cidrs_value(&desired.service_cidrs);
        if value != self.service_cidrs {
            // Other CIDRs hold other addresses: every one is held (or
            // released) first.
            let all: Vec<IpAddr> = desired
                .allocated
                .keys()
                .chain(&self.allocated)
                .chain(&self.unheld)
                .copied()
                .collect();
            for addr in all {
                self.hold_allocated(desired, addr, report);
            }
        }
        if !self.unheld.is_empty() && value != ServiceCidrs::default() {
            // An address a Service holds could not be held: it would be
            // dropped. No drop until it is (a full sync retries it).
            if self.service_cidrs != ServiceCidrs::default() {
                warn!(
                    unheld = self.unheld.len(),
                    "addresses Services hold could not be written: traffic to unallocated Service IPs is not dropped until they are"
                );
            }
            value = ServiceCidrs::default();
        }
        if value == self.service_cidrs {
            return;
        }
        if !left_out.is_empty() {
            warn!(
                left_out = ?left_out,
                max = SERVICE_CIDRS_PER_FAMILY,
                "more Service CIDRs of a family than the datapath holds: traffic to unallocated addresses in these is not dropped"
            );
        }
        match self.maps.service_cidrs.set(0, value, 0) {
            Ok(()) => self.service_cidrs = value,
            Err(e) => report.errors.push(SyncError {
                object: "Service CIDRs".into(),
                reason: format!("writing LB_SERVICE_CIDRS: {e}"),
                full: false,
            }),
        }
    }

    /// Name a rev-NAT id's Service port for the monitor and dump, if the
    /// name written differs.
    fn write_service_name(&mut self, id: u32, service_port: &Arc<str>) {
        if self.service_names.get(&id) == Some(service_port) {
            return;
        }
        match self
            .maps
            .service_names
            .insert(id, ServiceName::new(service_port), 0)
        {
            Ok(()) => {
                self.service_names.insert(id, service_port.clone());
            }
            Err(e) => {
                self.unnamed.insert(id, service_port.clone());
                warn!(service = %service_port, rev_nat_id = id, error = %e, "naming the frontend in LB_SERVICE_NAMES failed: the monitor and dump show its address only");
            }
        }
    }

    /// Remove one SERVICES key; absent counts as removed.
    fn remove_key(&mut self, key: ServiceKey) -> bool {
        removed(self.maps.services.remove(&key))
    }

    fn unref_set(&mut self, set_id: u32) {
        if let Some(n) = self.set_refs.get_mut(&set_id) {
            *n -= 1;
            if *n == 0 {
                self.set_refs.remove(&set_id);
            }
        }
    }

    fn unref_slot(&mut self, backend_id: u32) {
        if let Some(n) = self.slot_refs.get_mut(&backend_id) {
            *n -= 1;
            if *n == 0 {
                self.slot_refs.remove(&backend_id);
            }
        }
    }

    /// Remove a set no desired frontend points at, once no written one does
    /// either (a frontend whose removal failed keeps it): header first, so
    /// nothing reads its slots, then the slots and the Maglev table.
    fn remove_set(&mut self, owner: &SetOwner, report: &mut SyncReport) {
        let Some(applied) = self.sets.get(owner).cloned() else {
            // Never written: only its id, if one was given.
            self.set_ids.release(owner);
            return;
        };
        if self.set_refs.contains_key(&applied.id) {
            return;
        }
        let mut ok = removed(self.maps.backend_sets.remove(&applied.id));
        if ok {
            let mut slots_gone = Vec::new();
            for (slot, backend) in applied.slots.iter().enumerate() {
                if removed(self.maps.backend_slots.remove(&slot_key(applied.id, slot))) {
                    slots_gone.push((slot, *backend));
                } else {
                    ok = false;
                }
            }
            for backend in &applied.members {
                let key = member_key(applied.id, *backend);
                if !removed(self.maps.set_members.remove(&key)) {
                    // Retried as a stray: a member of a set id that may
                    // be handed out again must not outlive it.
                    self.stray_member_keys.push(key);
                }
            }
            if let Some(mirror) = self.sets.get_mut(owner) {
                mirror.members.clear();
            }
            let mut maglev_gone = Vec::new();
            for index in 0..applied.maglev.len() {
                if removed(self.maps.maglev.remove(&maglev_key(applied.id, index))) {
                    maglev_gone.push(index);
                } else {
                    ok = false;
                }
            }
            if !ok && let Some(mirror) = self.sets.get_mut(owner) {
                // Partly removed: the mirror keeps only what is still there,
                // so a later write rewrites the rest.
                for (slot, _) in &slots_gone {
                    mirror.slots[*slot] = 0;
                }
                for index in &maglev_gone {
                    mirror.maglev[*index] = 0;
                }
                for (_, backend) in slots_gone.iter().filter(|(_, b)| *b != 0) {
                    self.unref_slot(*backend);
                }
            }
        }
        if !ok {
            report.errors.push(SyncError {
                object: match owner {
                    SetOwner::Named(key) => key.to_string(),
                    SetOwner::Adopted(id) => format!("backend set {id}"),
                },
                reason: "removing the backend set failed; retried".into(),
                full: false,
            });
            if let Some(mirror) = self.sets.get_mut(owner) {
                // Partly removed: removed again whole.
                mirror.head = None;
            }
            return;
        }
        for backend in applied.slots.iter().filter(|b| **b != 0) {
            self.unref_slot(*backend);
        }
        self.sets.remove(owner);
        self.set_ids.release(owner);
        report.sets_removed += 1;
    }

    /// Write one desired set if it differs from what the maps hold: the
    /// Maglev table and slots first, then the header that names their
    /// sizes, then entries past the new sizes. Ok(true) when written.
    fn write_set(&mut self, key: &BackendSetKey) -> Result<bool, SyncError> {
        let Some(ds) = self.desired_sets.get(key) else {
            return Ok(false);
        };
        let content = ds.content.clone();
        let ids: Vec<u32> = ds
            .uses
            .iter()
            .filter(|u| u.selectable)
            .map(|u| u.id)
            .collect();
        let error = |reason: String, full: bool| SyncError {
            object: key.service_port.to_string(),
            reason: format!("backend set {key}: {reason}"),
            full,
        };
        let owner = SetOwner::Named(key.clone());
        let maglev_size = if content.maglev && !ids.is_empty() {
            maglev::table_size(ids.len())
        } else {
            0
        };
        let head = BackendSetValue {
            count: ids.len() as u32,
            maglev_size,
        };
        if !self.sets.contains_key(&owner) {
            self.take_over_adopted(&owner, head, &ids, || maglev_table(&content, &ids, head));
        }
        let set_id = self
            .set_ids
            .get_or_assign(&owner)
            .map_err(|e| error(e.to_string(), true))?;
        let mut applied = self.sets.remove(&owner).unwrap_or(AppliedSet {
            id: set_id,
            ..AppliedSet::default()
        });
        if applied.head == Some(head) && applied.slots == ids {
            self.sets.insert(owner, applied);
            return Ok(false);
        }
        let left: BTreeSet<u32> = applied
            .slots
            .iter()
            .filter(|id| **id != 0 && !ids.contains(id))
            .copied()
            .collect();
        if !left.is_empty() {
            // Affinity to backends leaving the set no longer holds. Asked
            // for before the write: a write that fails part way has
            // replaced some of them already.
            let users = self.desired_sets.get(key).map(|ds| ds.users.clone());
            for fk in users.iter().flatten() {
                if let Some(v) = self.frontends.get(fk)
                    && v.flags & service_flags::AFFINITY != 0
                {
                    self.cleanup
                        .merge_affinity(v.rev_nat_id, StaleAffinity::Backends(left.clone()));
                }
            }
        }
        let result = self.write_set_entries(&mut applied, &content, &ids, head);
        self.sets.insert(owner, applied);
        result.map_err(|e| error(e.to_string(), is_full(&e)))?;
        Ok(true)
    }

    /// Give `owner` (a set not written yet) the adopted set its users
    /// already point at (a restart), when that set holds exactly `head` and
    /// `ids`: same backends in the same slots. Only theirs: two Service
    /// ports may have identical sets, and each keeps its own id.
    fn take_over_adopted(
        &mut self,
        owner: &SetOwner,
        head: BackendSetValue,
        ids: &[u32],
        table: impl FnOnce() -> Vec<u32>,
    ) {
        let SetOwner::Named(key) = owner else {
            return;
        };
        if self.set_ids.get(owner).is_some() {
            return;
        }
        let pointed = self
            .desired_sets
            .get(key)
            .into_iter()
            .flat_map(|ds| &ds.users)
            .filter_map(|fk| self.frontends.get(fk))
            .map(|v| v.backend_set_id)
            .find(|id| {
                self.sets
                    .get(&SetOwner::Adopted(*id))
                    .is_some_and(|a| a.head == Some(head) && a.slots == ids)
            });
        let Some(id) = pointed else {
            return;
        };
        let adopted = SetOwner::Adopted(id);
        if let Some(mut applied) = self.sets.remove(&adopted) {
            if head.maglev_size != 0 && applied.maglev != table() {
                // A table another version built: rewritten (same id).
                applied.head = None;
            }
            self.set_ids.release(&adopted);
            self.set_ids.adopt(owner.clone(), id);
            self.sets.insert(owner.clone(), applied);
        }
    }

    /// `write_set`'s map writes. The mirror follows every write that
    /// succeeded, so a failure leaves it true and the next sync resumes.
    fn write_set_entries(
        &mut self,
        applied: &mut AppliedSet,
        content: &BackendSet,
        ids: &[u32],
        head: BackendSetValue,
    ) -> Result<(), MapError> {
        let set_id = applied.id;
        let table = maglev_table(content, ids, head);
        for (i, id) in table.iter().enumerate() {
            if applied.maglev.get(i) == Some(id) {
                continue;
            }
            self.maps.maglev.insert(maglev_key(set_id, i), id, 0)?;
            match applied.maglev.get_mut(i) {
                Some(entry) => *entry = *id,
                None => applied.maglev.push(*id),
            }
        }
        // Members before the slots naming them; those leaving after the
        // header no longer counts them.
        for id in ids {
            if applied.members.contains(id) {
                continue;
            }
            self.maps
                .set_members
                .insert(member_key(set_id, *id), 1, 0)?;
            applied.members.insert(*id);
        }
        for (i, id) in ids.iter().enumerate() {
            if applied.slots.get(i) == Some(id) {
                continue;
            }
            self.maps.backend_slots.insert(slot_key(set_id, i), id, 0)?;
            *self.slot_refs.entry(*id).or_default() += 1;
            match applied.slots.get_mut(i) {
                Some(entry) => {
                    let old = std::mem::replace(entry, *id);
                    if old != 0 {
                        self.unref_slot(old);
                    }
                }
                None => applied.slots.push(*id),
            }
        }
        self.maps.backend_sets.insert(set_id, head, 0)?;
        applied.head = Some(head);
        // Past the new sizes: unreachable now. A failed removal is retried
        // as a stray.
        for slot in ids.len()..applied.slots.len() {
            let key = slot_key(set_id, slot);
            if !removed(self.maps.backend_slots.remove(&key)) {
                self.stray_slot_keys.push(key);
            }
        }
        for backend in applied.slots.split_off(ids.len()) {
            if backend != 0 {
                self.unref_slot(backend);
            }
        }
        for index in table.len()..applied.maglev.len() {
            let key = maglev_key(set_id, index);
            if !removed(self.maps.maglev.remove(&key)) {
                self.stray_maglev_keys.push(key);
            }
        }
        applied.maglev.truncate(table.len());
        let wanted: BTreeSet<u32> = ids.iter().copied().collect();
        let leaving: Vec<u32> = applied.members.difference(&wanted).copied().collect();
        for backend in leaving {
            let key = member_key(set_id, backend);
            if !removed(self.maps.set_members.remove(&key)) {
                self.stray_member_keys.push(key);
            }
            applied.members.remove(&backend);
        }
        Ok(())
    }

    /// Write one frontend (and its rev-NAT entry) if it differs; Ok(true)
    /// when something was written.
    fn write_frontend(
        &mut self,
        fk: &FrontendKey,
        frontend: &Frontend,
        set_id: u32,
    ) -> Result<bool, MapError> {
        let rev_nat_id = self.rev_nat_ids.get_or_assign(fk).map_err(id_error)?;
        let rev = RevNatValue {
            addr_be: be32(fk.addr),
            port_be: fk.port.to_be(),
            proto: fk.proto.number(),
            scope: fk.scope.code(),
        };
        if self.rev_nat.get(&rev_nat_id) != Some(&rev) {
            if !self.rev_nat.contains_key(&rev_nat_id) {
                // A reused id must not bring the last frontend's counts.
                self.zero_service_counters(rev_nat_id);
            }
            self.maps.rev_nat.insert(rev_nat_id, rev, 0)?;
            self.rev_nat.insert(rev_nat_id, rev);
        }
        self.write_service_name(rev_nat_id, &frontend.service_port);
        let value = ServiceValue {
            backend_set_id: set_id,
            rev_nat_id,
            flags: frontend_flags(frontend),
            affinity_timeout_s: frontend.affinity_timeout_s.unwrap_or(0),
        };
        let old = self.frontends.get(fk).copied();
        if old == Some(value) {
            return Ok(false);
        }
        if old.is_none() {
            self.prefilter_ref(fk.addr)?;
        }
        if let Err(e) = self.maps.services.insert(service_key(fk), value, 0) {
            if old.is_none() {
                self.prefilter_unref(fk.addr);
            }
            return Err(e);
        }
        if let Some(old) = old {
            // Affinity turned off, or the frontend moved to another set
            // (its traffic policy changed): its entries no longer hold.
            if old.flags & service_flags::AFFINITY != 0
                && (value.flags & service_flags::AFFINITY == 0
                    || old.backend_set_id != set_id
                    || old.rev_nat_id != rev_nat_id)
            {
                self.cleanup
                    .merge_affinity(old.rev_nat_id, StaleAffinity::All);
            }
            self.unref_set(old.backend_set_id);
        }
        *self.set_refs.entry(set_id).or_default() += 1;
        self.frontends.insert(*fk, value);
        Ok(true)
    }
}

/// `LB_SERVICE_CIDRS`' value for `cidrs`, and the CIDRs past its room.
pub fn service_cidrs_value(cidrs: &BTreeSet<IpNet>) -> (ServiceCidrs, Vec<IpNet>) {
    let mut value = ServiceCidrs::default();
    let mut left_out = Vec::new();
    for cidr in cidrs {
        match cidr {
            IpNet::V4(net) if (value.v4_count as usize) < SERVICE_CIDRS_PER_FAMILY => {
                value.v4[value.v4_count as usize] = Prefix4 {
                    addr_be: u32::from(net.network()).to_be(),
                    mask_be: u32::from(net.netmask()).to_be(),
                };
                value.v4_count += 1;
            }
            IpNet::V6(net) if (value.v6_count as usize) < SERVICE_CIDRS_PER_FAMILY => {
                value.v6[value.v6_count as usize] = Prefix6 {
                    addr: Addr::from(IpAddr::V6(net.network())),
                    mask: Addr::from(IpAddr::V6(net.netmask())),
                };
                value.v6_count += 1;
            }
            _ => left_out.push(*cidr),
        }
    }
    (value, left_out)
}

/// A set's Maglev table (backend id per index; empty without Maglev), by
/// backend name, so every node builds the same one.
fn maglev_table(content: &BackendSet, ids: &[u32], head: BackendSetValue) -> Vec<u32> {
    if head.maglev_size == 0 {
        return Vec::new();
    }
    let names: Vec<String> = content
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.addr, b.port))
        .collect();
    maglev::build(&names, head.maglev_size)
        .into_iter()
        .map(|i| ids[i as usize])
        .collect()
}

/// How many backends (selectable and standby) a set uses.
fn use_count(set: &BackendSet) -> usize {
    set.backends.len() + set.standby.len()
}
