//! Typed handles on lb's maps, opened from a loaded object (the agent) or
//! from their pins (dump, tests, another process).

use std::path::{Path, PathBuf};

use aya::maps::{
    Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues, lpm_trie::LpmTrie,
};
use lb_common::{
    Addr, AffinityKey, AffinityValue, BackendSetValue, BackendSlotKey, BackendValue, ConfigValue,
    CtKey, CtValue, MaglevKey, MonitorConfig, NotProgrammedKey, NotProgrammedValue, RevNatValue,
    ServiceCidrs, ServiceCounters, ServiceKey, ServiceName, ServiceValue, SetMemberKey,
    SockAffinityKey, SockNatKey, SockNatValue, SourceRange, map_names, map_sizes, stat,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MapsError {
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {name} is not in the loaded object")]
    Missing { name: &'static str },
    #[error("pinned map {path}: {source}")]
    Pin { path: PathBuf, source: MapError },
    #[error(
        "pinned map {path} has another layout ({found}; this agent needs {expected}); \
         it was written by an incompatible lb version: remove the pins under its directory \
         (established connections through it will be re-balanced) or run the matching agent"
    )]
    Incompatible {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

/// Key size, value size and capacity a map must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "key {} bytes, value {} bytes, {} entries",
            self.key_size, self.value_size, self.max_entries
        )
    }
}

/// Capacities the agent may size differently (`--lb-map-max` for the
/// frontend, backend, backend set and slot maps, `--ct-max-tcp`,
/// `--ct-max-other`), in entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    pub backend_sets: u32,
    pub backend_slots: u32,
    pub ct_tcp: u32,
    pub ct_other: u32,
    /// `LB_SERVICE_STATS` slots: 1 (off) or one per rev-NAT id.
    pub service_counters: u32,
}

impl Default for Capacities {
    /// As the object declares them.
    fn default() -> Self {
        Capacities {
            services: map_sizes::SERVICES,
            backends: map_sizes::BACKENDS,
            backend_sets: map_sizes::BACKEND_SETS,
            backend_slots: map_sizes::BACKEND_SLOTS,
            ct_tcp: map_sizes::CT_TCP,
            ct_other: map_sizes::CT_OTHER,
            service_counters: 1,
        }
    }
}

/// The shapes lb-common declares for every pinned map.
pub fn expected_shapes() -> [MapShape; 24] {
    shapes_with(Capacities::default())
}

/// The shapes with the given capacities.
pub fn shapes_with(cap: Capacities) -> [MapShape; 24] {
    use std::mem::size_of;
    let shape = |name, k: usize, v: usize, max| MapShape {
        name,
        key_size: k as u32,
        value_size: v as u32,
        max_entries: max,
    };
    [
        shape(
            map_names::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            cap.services,
        ),
        shape(
            map_names::BACKENDS,
            4,
            size_of::<BackendValue>(),
            cap.backends,
        ),
        shape(
            map_names::BACKEND_SETS,
            4,
            size_of::<BackendSetValue>(),
            cap.backend_sets,
        ),
        shape(
            map_names::BACKEND_SLOTS,
            size_of::<BackendSlotKey>(),
            4,
            cap.backend_slots,
        ),
        // One member entry per slot.
        shape(
            map_names::SET_MEMBERS,
            size_of::<SetMemberKey>(),
            4,
            cap.backend_slots,
        ),
        // One rev-NAT entry per frontend: as many as frontends can be.
        shape(
            map_names::REV_NAT,
            4,
            size_of::<RevNatValue>(),
            cap.services,
        ),
        shape(
            map_names::CT_TCP,
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            cap.ct_tcp,
        ),
        shape(
            map_names::CT_OTHER,
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            cap.ct_other,
        ),
        shape(
            map_names::AFFINITY,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            map_sizes::AFFINITY,
        ),
        shape(map_names::STATS, 4, 8, stat::CAPACITY),
        shape(map_names::CONFIG, 4, size_of::<ConfigValue>(), 1),
        shape(
            map_names::MAGLEV,
            size_of::<MaglevKey>(),
            4,
            map_sizes::MAGLEV,
        ),
        // LPM trie keys carry the 4-byte prefix length in front of the data.
        shape(
            map_names::SOURCE_RANGES,
            4 + size_of::<SourceRange>(),
            4,
            map_sizes::SOURCE_RANGES,
        ),
        shape(
            map_names::SOCK_NAT,
            size_of::<SockNatKey>(),
            size_of::<SockNatValue>(),
            map_sizes::SOCK_NAT,
        ),
        shape(
            map_names::SOCK_AFFINITY,
            size_of::<SockAffinityKey>(),
            size_of::<AffinityValue>(),
            map_sizes::SOCK_AFFINITY,
        ),
        shape(
            map_names::NOT_PROGRAMMED,
            size_of::<NotProgrammedKey>(),
            size_of::<NotProgrammedValue>(),
            map_sizes::NOT_PROGRAMMED,
        ),
        // One address per frontend and per backend at most.
        shape(
            map_names::PREFILTER4,
            4,
            4,
            cap.services.saturating_add(cap.backends),
        ),
        shape(
            map_names::PREFILTER6,
            size_of::<Addr>(),
            4,
            cap.services.saturating_add(cap.backends),
        ),
        // A ring buffer has no keys or values: its capacity is in bytes.
        shape(map_names::EVENTS, 0, 0, map_sizes::EVENTS_BYTES),
        shape(map_names::MONITOR, 4, size_of::<MonitorConfig>(), 1),
        // One name per rev-NAT id.
        shape(
            map_names::SERVICE_NAMES,
            4,
            size_of::<ServiceName>(),
            cap.services,
        ),
        shape(
            map_names::SERVICE_STATS,
            4,
            size_of::<ServiceCounters>(),
            cap.service_counters,
        ),
        shape(map_names::SERVICE_CIDRS, 4, size_of::<ServiceCidrs>(), 1),
        // One held address per Service at most (its own map: holds never
        // take the prefilter's room).
        shape(map_names::ALLOCATED, size_of::<Addr>(), 4, cap.services),
    ]
}

/// Refuse a pinned map whose shape is not ours (aya would adopt it blindly).
pub fn check_pin(path: &Path, expected: &MapShape) -> Result<(), MapsError> {
    check_pin_layout(path, expected, true)
}

/// `check_pin`, optionally accepting any capacity (readers like dump do not
/// care how large the agent sized a map, only how its entries are laid out).
pub fn check_pin_layout(
    path: &Path,
    expected: &MapShape,
    capacity_too: bool,
) -> Result<(), MapsError> {
    let info = MapInfo::from_pin(path).map_err(|source| MapsError::Pin {
        path: path.into(),
        source,
    })?;
    let found = MapShape {
        name: expected.name,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: if capacity_too {
            info.max_entries()
        } else {
            expected.max_entries
        },
    };
    if found != *expected {
        return Err(MapsError::Incompatible {
            path: path.into(),
            found: found.to_string(),
            expected: expected.to_string(),
        });
    }
    Ok(())
}

pub type ServicesMap = HashMap<MapData, ServiceKey, ServiceValue>;
pub type BackendsMap = HashMap<MapData, u32, BackendValue>;
pub type BackendSetsMap = HashMap<MapData, u32, BackendSetValue>;
pub type BackendSlotsMap = HashMap<MapData, BackendSlotKey, u32>;
pub type SetMembersMap = HashMap<MapData, SetMemberKey, u32>;
pub type RevNatMap = HashMap<MapData, u32, RevNatValue>;
/// LRU hash maps read and write through aya's HashMap.
pub type CtMap = HashMap<MapData, CtKey, CtValue>;
pub type AffinityMap = HashMap<MapData, AffinityKey, AffinityValue>;
pub type StatsMap = PerCpuArray<MapData, u64>;
pub type ConfigMap = Array<MapData, ConfigValue>;
pub type MaglevMap = HashMap<MapData, MaglevKey, u32>;
pub type SourceRangesMap = LpmTrie<MapData, SourceRange, u32>;
pub type SockNatMap = HashMap<MapData, SockNatKey, SockNatValue>;
pub type SockAffinityMap = HashMap<MapData, SockAffinityKey, AffinityValue>;
pub type NotProgrammedMap = HashMap<MapData, NotProgrammedKey, NotProgrammedValue>;
pub type Prefilter4Map = HashMap<MapData, u32, u32>;
pub type Prefilter6Map = HashMap<MapData, Addr, u32>;
pub type MonitorMap = Array<MapData, MonitorConfig>;
pub type ServiceNamesMap = HashMap<MapData, u32, ServiceName>;
pub type ServiceStatsMap = PerCpuArray<MapData, ServiceCounters>;
pub type ServiceCidrsMap = Array<MapData, ServiceCidrs>;
pub type AllocatedMap = HashMap<MapData, Addr, u32>;

/// Every map of the datapath.
pub struct Maps {
    pub services: ServicesMap,
    pub backends: BackendsMap,
    pub backend_sets: BackendSetsMap,
    pub backend_slots: BackendSlotsMap,
    pub set_members: SetMembersMap,
    pub rev_nat: RevNatMap,
    pub ct_tcp: CtMap,
    pub ct_other: CtMap,
    pub affinity: AffinityMap,
    pub stats: StatsMap,
    pub config: ConfigMap,
    pub maglev: MaglevMap,
    pub source_ranges: SourceRangesMap,
    pub sock_nat: SockNatMap,
    pub sock_affinity: SockAffinityMap,
    pub not_programmed: NotProgrammedMap,
    pub prefilter4: Prefilter4Map,
    pub prefilter6: Prefilter6Map,
    pub monitor: MonitorMap,
    pub service_names: ServiceNamesMap,
    pub service_stats: ServiceStatsMap,
    pub service_cidrs: ServiceCidrsMap,
    pub allocated: AllocatedMap,
}

fn typed<T>(name: &'static str, map: Map) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(map).map_err(|source| MapsError::Map { name, source })
}

impl Maps {
    /// Take the maps out of a loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing { name });
        Ok(Maps {
            services: typed(map_names::SERVICES, take(map_names::SERVICES)?)?,
            backends: typed(map_names::BACKENDS, take(map_names::BACKENDS)?)?,
            backend_sets: typed(map_names::BACKEND_SETS, take(map_names::BACKEND_SETS)?)?,
            backend_slots: typed(map_names::BACKEND_SLOTS, take(map_names::BACKEND_SLOTS)?)?,
            set_members: typed(map_names::SET_MEMBERS, take(map_names::SET_MEMBERS)?)?,
            rev_nat: typed(map_names::REV_NAT, take(map_names::REV_NAT)?)?,
            ct_tcp: typed(map_names::CT_TCP, take(map_names::CT_TCP)?)?,
            ct_other: typed(map_names::CT_OTHER, take(map_names::CT_OTHER)?)?,
            affinity: typed(map_names::AFFINITY, take(map_names::AFFINITY)?)?,
            stats: typed(map_names::STATS, take(map_names::STATS)?)?,
            config: typed(map_names::CONFIG, take(map_names::CONFIG)?)?,
            maglev: typed(map_names::MAGLEV, take(map_names::MAGLEV)?)?,
            source_ranges: typed(map_names::SOURCE_RANGES, take(map_names::SOURCE_RANGES)?)?,
            sock_nat: typed(map_names::SOCK_NAT, take(map_names::SOCK_NAT)?)?,
            sock_affinity: typed(map_names::SOCK_AFFINITY, take(map_names::SOCK_AFFINITY)?)?,
            not_programmed: typed(map_names::NOT_PROGRAMMED, take(map_names::NOT_PROGRAMMED)?)?,
            prefilter4: typed(map_names::PREFILTER4, take(map_names::PREFILTER4)?)?,
            prefilter6: typed(map_names::PREFILTER6, take(map_names::PREFILTER6)?)?,
            monitor: typed(map_names::MONITOR, take(map_names::MONITOR)?)?,
            service_names: typed(map_names::SERVICE_NAMES, take(map_names::SERVICE_NAMES)?)?,
            service_stats: typed(map_names::SERVICE_STATS, take(map_names::SERVICE_STATS)?)?,
            service_cidrs: typed(map_names::SERVICE_CIDRS, take(map_names::SERVICE_CIDRS)?)?,
            allocated: typed(map_names::ALLOCATED, take(map_names::ALLOCATED)?)?,
        })
    }

    /// Open the maps pinned under `bpffs`, checking each one's shape first.
    pub fn open_pinned(bpffs: &Path) -> Result<Self, MapsError> {
        let shapes = expected_shapes();
        let open = |i: usize, wrap: fn(MapData) -> Map| -> Result<Map, MapsError> {
            let path = bpffs.join(shapes[i].name);
            check_pin_layout(&path, &shapes[i], false)?;
            let data =
                MapData::from_pin(&path).map_err(|source| MapsError::Pin { path, source })?;
            Ok(wrap(data))
        };
        Ok(Maps {
            services: typed(map_names::SERVICES, open(0, Map::HashMap)?)?,
            backends: typed(map_names::BACKENDS, open(1, Map::HashMap)?)?,
            backend_sets: typed(map_names::BACKEND_SETS, open(2, Map::HashMap)?)?,
            backend_slots: typed(map_names::BACKEND_SLOTS, open(3, Map::HashMap)?)?,
            set_members: typed(map_names::SET_MEMBERS, open(4, Map::HashMap)?)?,
            rev_nat: typed(map_names::REV_NAT, open(5, Map::HashMap)?)?,
            ct_tcp: typed(map_names::CT_TCP, open(6, Map::LruHashMap)?)?,
            ct_other: typed(map_names::CT_OTHER, open(7, Map::LruHashMap)?)?,
            affinity: typed(map_names::AFFINITY, open(8, Map::LruHashMap)?)?,
            stats: typed(map_names::STATS, open(9, Map::PerCpuArray)?)?,
            config: typed(map_names::CONFIG, open(10, Map::Array)?)?,
            maglev: typed(map_names::MAGLEV, open(11, Map::HashMap)?)?,
            source_ranges: typed(map_names::SOURCE_RANGES, open(12, Map::LpmTrie)?)?,
            sock_nat: typed(map_names::SOCK_NAT, open(13, Map::LruHashMap)?)?,
            sock_affinity: typed(map_names::SOCK_AFFINITY, open(14, Map::LruHashMap)?)?,
            not_programmed: typed(map_names::NOT_PROGRAMMED, open(15, Map::HashMap)?)?,
            prefilter4: typed(map_names::PREFILTER4, open(16, Map::HashMap)?)?,
            prefilter6: typed(map_names::PREFILTER6, open(17, Map::HashMap)?)?,
            monitor: typed(map_names::MONITOR, open(19, Map::Array)?)?,
            service_names: typed(map_names::SERVICE_NAMES, open(20, Map::HashMap)?)?,
            service_stats: typed(map_names::SERVICE_STATS, open(21, Map::PerCpuArray)?)?,
            service_cidrs: typed(map_names::SERVICE_CIDRS, open(22, Map::Array)?)?,
            allocated: typed(map_names::ALLOCATED, open(23, Map::HashMap)?)?,
        })
    }

    /// Both conntrack maps (TCP, other), with their names.
    pub fn conntrack(&self) -> [(&'static str, &CtMap); 2] {
        [
            (map_names::CT_TCP, &self.ct_tcp),
            (map_names::CT_OTHER, &self.ct_other),
        ]
    }

    /// The conntrack map of a protocol.
    pub fn conntrack_of_mut(&mut self, proto: u8) -> &mut CtMap {
        if proto == lb_common::IPPROTO_TCP {
            &mut self.ct_tcp
        } else {
            &mut self.ct_other
        }
    }

    /// Counters summed over CPUs, indexed by `lb_common::stat`.
    pub fn read_stats(&self) -> Result<Vec<u64>, MapsError> {
        (0..stat::COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(|source| MapsError::Map {
                        name: map_names::STATS,
                        source,
                    })
            })
            .collect()
    }

    /// Set an agent-side counter (kept in CPU 0's slot; the kernel never writes these).
    pub fn set_agent_stat(&mut self, index: u32, value: u64) -> Result<(), MapsError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapsError::Map {
            name: map_names::STATS,
            source: MapError::IoError(e),
        })?;
        let mut values = vec![0u64; cpus];
        values[0] = value;
        let values = PerCpuValues::try_from(values).map_err(|e| MapsError::Map {
            name: map_names::STATS,
            source: MapError::IoError(e),
        })?;
        self.stats
            .set(index, values, 0)
            .map_err(|source| MapsError::Map {
                name: map_names::STATS,
                source,
            })
    }
}
