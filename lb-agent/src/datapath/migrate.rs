//! Flows survive a replaced map: an upgrade to another map layout, or a
//! conntrack or frontend map resized by a flag. Before the old pins go, the
//! maps whose entries are state (conntrack, affinity, socket-level
//! translations) and the id maps that state refers to (backends, rev-NAT)
//! are opened and kept; their entries are converted to this layout and
//! written into the new maps before the agent's first sync (the ids they
//! name are adopted with them, so a flow's backend id keeps naming its
//! backend). The programs already attached keep serving from the old maps
//! until the new programs replace them, after the first sync; entries the
//! old programs created meanwhile are copied right before and right after
//! that swap, and while it runs the new programs drop (rather than
//! re-balance) a mid-connection TCP packet that has no entry yet.

use std::{collections::BTreeMap, path::Path};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData, MapError},
};
use lb_common::{
    AffinityKey, AffinityValue, BackendValue, CtKey, CtValue, LAYOUT_VERSION, RevNatValue,
    SockAffinityKey, SockNatKey, SockNatValue, map_names,
};
use tracing::{info, warn};

use super::maps::Maps;

/// Maps whose entries are state the cluster cannot give back.
pub const STATE_MAPS: [&str; 5] = [
    map_names::CT_TCP,
    map_names::CT_OTHER,
    map_names::AFFINITY,
    map_names::SOCK_NAT,
    map_names::SOCK_AFFINITY,
];

/// Maps holding the ids state entries name: carried over so the ids keep
/// their meaning (the first sync prunes what is no longer desired).
pub const ID_MAPS: [&str; 2] = [map_names::BACKENDS, map_names::REV_NAT];

/// Layout versions whose maps this agent can convert: the previous one
/// and its own (a resized map).
pub const MIGRATES_FROM: [u32; 2] = [4, LAYOUT_VERSION];

/// Where replaced pins wait (under the bpffs directory) until the new
/// programs have taken over the devices.
pub const PREVIOUS_DIR: &str = "previous-layout";

/// The layout version an `LB_CONFIG` pin records (0: unreadable).
pub fn layout_version(config_pin: &Path) -> u32 {
    MapData::from_pin(config_pin)
        .ok()
        .and_then(|data| {
            aya::maps::Array::<_, lb_common::ConfigValue>::try_from(Map::Array(data)).ok()
        })
        .and_then(|config| config.get(&0, 0).ok())
        .map_or(0, |c| c.layout_version)
}

/// The maps an unfinished hand-over left in `PREVIOUS_DIR`, to carry over
/// again (their entries are in the current maps already, mostly: the copy
/// adds what is missing and what they used last).
pub fn resume(bpffs: &Path, names: &[&'static str]) -> Option<Migration> {
    let previous = bpffs.join(PREVIOUS_DIR);
    if !previous.exists() {
        return None;
    }
    let config = previous.join(map_names::CONFIG);
    // A resized map's pins come without a config: this layout's.
    let version = if config.exists() {
        layout_version(&config)
    } else {
        LAYOUT_VERSION
    };
    let migration = Migration::open(&previous, version, names);
    match &migration {
        Some(_) => info!(
            from = version,
            "resuming the hand-over from the previous layout's maps an earlier start left"
        ),
        None => remove_previous(bpffs),
    }
    migration
}

/// Remove `PREVIOUS_DIR` and its pins (a program still using one keeps it).
pub fn remove_previous(bpffs: &Path) {
    let previous = bpffs.join(PREVIOUS_DIR);
    if let Ok(entries) = std::fs::read_dir(&previous) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(&previous);
}

/// Which copy: the first (before the agent's first sync) also brings the
/// ids; the catch-ups, around the swap, only state. Every copy adds what
/// the new maps lack and refreshes what the old programs used last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    First,
    CatchUp,
}

/// Entries copied and entries that could not be (the new map is full, or
/// an entry has no counterpart in this layout), per map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub maps: BTreeMap<&'static str, (usize, usize)>,
}

impl Copied {
    pub fn total(&self) -> usize {
        self.maps.values().map(|(n, _)| n).sum()
    }
}

/// The replaced maps of layout `from`, held open after their pins are gone.
pub struct Migration {
    from: u32,
    old: BTreeMap<&'static str, Map>,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("from", &self.from)
            .field("maps", &self.old.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Migration {
    /// Open the pins of `names` (those present) under `bpffs`, written with
    /// layout `from`. Call before the pins are removed.
    pub fn open(bpffs: &Path, from: u32, names: &[&'static str]) -> Option<Self> {
        if !MIGRATES_FROM.contains(&from) {
            return None;
        }
        let mut old = BTreeMap::new();
        for name in names {
            let path = bpffs.join(name);
            if !path.exists() {
                continue;
            }
            match MapData::from_pin(&path).and_then(Map::from_map_data) {
                Ok(map) => {
                    old.insert(*name, map);
                }
                Err(e) => {
                    warn!(map = name, error = %e, "cannot open the replaced map; its entries are not carried over")
                }
            }
        }
        (!old.is_empty()).then_some(Migration { from, old })
    }

    pub fn from_version(&self) -> u32 {
        self.from
    }

    /// The new programs run: the previous maps go (with their pins).
    pub fn finish(self, bpffs: &Path) {
        drop(self.old);
        remove_previous(bpffs);
    }

    /// Copy the old maps' entries into `maps` (the new layout's).
    pub fn copy(&self, maps: &mut Maps, pass: Pass) -> Copied {
        match self.from {
            4 => self.copy_with(
                maps,
                pass,
                &Conversions {
                    rev_nat: v4::rev_nat,
                    ct: v4::ct,
                    affinity: v4::affinity,
                    sock_nat: v4::sock_nat,
                    sock_affinity: v4::sock_affinity,
                },
            ),
            LAYOUT_VERSION => self.copy_with(
                maps,
                pass,
                &Conversions {
                    rev_nat: same,
                    ct: same,
                    affinity: same,
                    sock_nat: same,
                    sock_affinity: same,
                },
            ),
            _ => Copied::default(),
        }
    }

    /// Every carried map through the conversions of `self.from`'s layout.
    fn copy_with<RK: Pod, CV: Pod, AK: Pod, SV: Pod, SK: Pod>(
        &self,
        maps: &mut Maps,
        pass: Pass,
        convert: &Conversions<RK, CV, AK, SV, SK>,
    ) -> Copied {
        let mut copied = Copied::default();
        let mut note = |name: &'static str, result: Result<(usize, usize), MapError>| match result {
            Ok(counts) => {
                copied.maps.insert(name, counts);
            }
            Err(e) => {
                warn!(map = name, from = self.from, error = %e, "cannot read the replaced map; its entries are not carried over");
            }
        };
        let fresher_ct = |old: &CtValue, new: &CtValue| old.last_seen_ns > new.last_seen_ns;
        let fresher_affinity =
            |old: &AffinityValue, new: &AffinityValue| old.last_used_ns > new.last_used_ns;
        if pass == Pass::First {
            let (backends, rev_nat) = (map_names::BACKENDS, map_names::REV_NAT);
            note(
                backends,
                self.copy_map(
                    backends,
                    &mut maps.backends,
                    same::<u32, BackendValue>,
                    never,
                ),
            );
            note(
                rev_nat,
                self.copy_map(rev_nat, &mut maps.rev_nat, convert.rev_nat, never),
            );
        }
        for (name, ct) in [
            (map_names::CT_TCP, &mut maps.ct_tcp),
            (map_names::CT_OTHER, &mut maps.ct_other),
        ] {
            note(name, self.copy_map(name, ct, convert.ct, fresher_ct));
        }
        let name = map_names::AFFINITY;
        note(
            name,
            self.copy_map(name, &mut maps.affinity, convert.affinity, fresher_affinity),
        );
        let name = map_names::SOCK_NAT;
        note(
            name,
            self.copy_map(name, &mut maps.sock_nat, convert.sock_nat, never),
        );
        let name = map_names::SOCK_AFFINITY;
        note(
            name,
            self.copy_map(
                name,
                &mut maps.sock_affinity,
                convert.sock_affinity,
                fresher_affinity,
            ),
        );
        copied
    }

    /// Copy one map through `convert`: the entries the new map lacks, and
    /// those `fresher` says the old programs used last. Returns (copied,
    /// not copied).
    fn copy_map<K0: Pod, V0: Pod, K: Pod, V: Pod>(
        &self,
        name: &'static str,
        to: &mut HashMap<MapData, K, V>,
        convert: fn(K0, V0) -> Option<(K, V)>,
        fresher: impl Fn(&V, &V) -> bool,
    ) -> Result<(usize, usize), MapError> {
        let Some(old) = self.old.get(name) else {
            return Ok((0, 0));
        };
        let from: HashMap<&MapData, K0, V0> = HashMap::try_from(old)?;
        let (mut copied, mut failed) = (0, 0);
        // Entries may go while we walk (LRU eviction, expiry): skip those.
        for entry in from.iter() {
            let Ok((key, value)) = entry else {
                continue;
            };
            let Some((key, value)) = convert(key, value) else {
                failed += 1;
                continue;
            };
            // What the new maps hold already stays unless the old programs
            // used it last: ids never (a resumed hand-over's maps may have
            // given an id to another backend since).
            if let Ok(current) = to.get(&key, 0)
                && !fresher(&value, &current)
            {
                continue;
            }
            match to.insert(key, value, 0) {
                Ok(()) => copied += 1,
                Err(_) => failed += 1,
            }
        }
        if failed > 0 {
            warn!(
                map = name,
                copied,
                failed,
                "some entries of the replaced map could not be carried over (the new map is smaller, or they have no counterpart)"
            );
        }
        Ok((copied, failed))
    }

    /// Log what a pass carried over.
    pub fn report(&self, pass: Pass, copied: &Copied) {
        let per_map: Vec<String> = copied
            .maps
            .iter()
            .filter(|(_, (n, f))| *n > 0 || *f > 0)
            .map(|(name, (n, f))| {
                if *f > 0 {
                    format!("{name}={n} ({f} not)")
                } else {
                    format!("{name}={n}")
                }
            })
            .collect();
        info!(
            from = self.from,
            to = LAYOUT_VERSION,
            pass = ?pass,
            entries = copied.total(),
            maps = %per_map.join(" "),
            "carried entries over from the replaced maps"
        );
    }
}

/// How one earlier layout's entries become this layout's, per carried map
/// (the backends map has kept its shape in every layout so far).
struct Conversions<RK, CV, AK, SV, SK> {
    rev_nat: fn(RK, RevNatValue) -> Option<(u32, RevNatValue)>,
    ct: fn(CtKey, CV) -> Option<(CtKey, CtValue)>,
    affinity: fn(AK, AffinityValue) -> Option<(AffinityKey, AffinityValue)>,
    sock_nat: fn(SockNatKey, SV) -> Option<(SockNatKey, SockNatValue)>,
    sock_affinity: fn(SK, AffinityValue) -> Option<(SockAffinityKey, AffinityValue)>,
}

fn never<V>(_: &V, _: &V) -> bool {
    false
}

fn same<K, V>(key: K, value: V) -> Option<(K, V)> {
    Some((key, value))
}

/// Layout 4 (before shared backend sets): rev-NAT ids were 16 bits, and
/// the conntrack value was ordered differently. Every other shape the
/// migrated maps use is unchanged.
pub mod v4 {
    use lb_common::{Addr, AffinityKey, AffinityValue, CtKey, RevNatValue, SockAffinityKey};

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct CtValue {
        pub backend_id: u32,
        pub rev_nat_id: u16,
        pub flags: u16,
        pub nat_addr_be: Addr,
        pub nat_port_be: u16,
        pub tcp_flags_seen: u8,
        pub _pad0: u8,
        pub lifetime_s: u32,
        pub created_ns: u64,
        pub last_seen_ns: u64,
        pub snat_addr_be: Addr,
        pub packets: u64,
        pub bytes: u64,
        pub snat_port_be: u16,
        pub _pad1: [u8; 6],
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct AffinityKeyV4 {
        pub client_addr_be: Addr,
        pub rev_nat_id: u16,
        pub _pad: u16,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct SockNatValue {
        pub addr_be: Addr,
        pub port_be: u16,
        pub rev_nat_id: u16,
        pub backend_id: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct SockAffinityKeyV4 {
        pub netns_cookie: u64,
        pub rev_nat_id: u16,
        pub _pad: [u8; 6],
    }

    // SAFETY: plain #[repr(C)] integers and byte arrays, every bit pattern valid.
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKeyV4 {}
    unsafe impl aya::Pod for SockNatValue {}
    unsafe impl aya::Pod for SockAffinityKeyV4 {}

    const _: () = {
        assert!(core::mem::size_of::<CtValue>() == 88);
        assert!(core::mem::size_of::<AffinityKeyV4>() == 20);
        assert!(core::mem::size_of::<SockNatValue>() == 24);
        assert!(core::mem::size_of::<SockAffinityKeyV4>() == 16);
    };

    pub fn rev_nat(id: u16, value: RevNatValue) -> Option<(u32, RevNatValue)> {
        Some((u32::from(id), value))
    }

    pub fn ct(key: CtKey, old: CtValue) -> Option<(CtKey, lb_common::CtValue)> {
        Some((
            key,
            lb_common::CtValue {
                backend_id: old.backend_id,
                rev_nat_id: u32::from(old.rev_nat_id),
                nat_addr_be: old.nat_addr_be,
                nat_port_be: old.nat_port_be,
                snat_port_be: old.snat_port_be,
                flags: old.flags,
                tcp_flags_seen: old.tcp_flags_seen,
                _pad0: 0,
                lifetime_s: old.lifetime_s,
                _pad1: 0,
                created_ns: old.created_ns,
                last_seen_ns: old.last_seen_ns,
                snat_addr_be: old.snat_addr_be,
                packets: old.packets,
                bytes: old.bytes,
            },
        ))
    }

    pub fn affinity(
        key: AffinityKeyV4,
        value: AffinityValue,
    ) -> Option<(AffinityKey, AffinityValue)> {
        Some((
            AffinityKey {
                client_addr_be: key.client_addr_be,
                rev_nat_id: u32::from(key.rev_nat_id),
            },
            value,
        ))
    }

    pub fn sock_nat(
        key: lb_common::SockNatKey,
        old: SockNatValue,
    ) -> Option<(lb_common::SockNatKey, lb_common::SockNatValue)> {
        Some((
            key,
            lb_common::SockNatValue {
                addr_be: old.addr_be,
                port_be: old.port_be,
                _pad: 0,
                rev_nat_id: u32::from(old.rev_nat_id),
                backend_id: old.backend_id,
            },
        ))
    }

    pub fn sock_affinity(
        key: SockAffinityKeyV4,
        value: AffinityValue,
    ) -> Option<(SockAffinityKey, AffinityValue)> {
        Some((
            SockAffinityKey {
                netns_cookie: key.netns_cookie,
                rev_nat_id: u32::from(key.rev_nat_id),
                _pad: 0,
            },
            value,
        ))
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{Addr, ct_flags};

    use super::*;

    /// Layout 4's bytes, as its agent wrote them, read field by field: the
    /// conversion moves each field, none is dropped or shifted.
    #[test]
    fn v4_conntrack_value_keeps_every_field() {
        let old = v4::CtValue {
            backend_id: 7,
            rev_nat_id: 0xfffe,
            flags: ct_flags::SYN_SEEN | ct_flags::REPLY_SEEN,
            nat_addr_be: Addr::v4(u32::from_ne_bytes([10, 0, 0, 5])),
            nat_port_be: 8080u16.to_be(),
            tcp_flags_seen: 0x12,
            _pad0: 0,
            lifetime_s: 86_400,
            created_ns: 11,
            last_seen_ns: 22,
            snat_addr_be: Addr::v4(u32::from_ne_bytes([192, 168, 0, 1])),
            packets: 33,
            bytes: 44,
            snat_port_be: 61_000u16.to_be(),
            _pad1: [0; 6],
        };
        let key = CtKey {
            proto: 6,
            ..Default::default()
        };
        let (k, new) = v4::ct(key, old).unwrap();
        assert_eq!(k, key);
        assert_eq!(
            new,
            CtValue {
                backend_id: 7,
                rev_nat_id: 0xfffe,
                nat_addr_be: old.nat_addr_be,
                nat_port_be: old.nat_port_be,
                snat_port_be: old.snat_port_be,
                flags: old.flags,
                tcp_flags_seen: 0x12,
                _pad0: 0,
                lifetime_s: 86_400,
                _pad1: 0,
                created_ns: 11,
                last_seen_ns: 22,
                snat_addr_be: old.snat_addr_be,
                packets: 33,
                bytes: 44,
            }
        );
    }

    #[test]
    fn v4_keys_widen_rev_nat_ids() {
        let client = Addr::v4(u32::from_ne_bytes([10, 1, 2, 3]));
        let value = AffinityValue {
            backend_id: 3,
            _pad: 0,
            last_used_ns: 9,
        };
        let (key, v) = v4::affinity(
            v4::AffinityKeyV4 {
                client_addr_be: client,
                rev_nat_id: 513,
                _pad: 0,
            },
            value,
        )
        .unwrap();
        assert_eq!(
            key,
            AffinityKey {
                client_addr_be: client,
                rev_nat_id: 513
            }
        );
        assert_eq!(v, value);
        let (key, _) = v4::sock_affinity(
            v4::SockAffinityKeyV4 {
                netns_cookie: 42,
                rev_nat_id: 9,
                _pad: [0; 6],
            },
            value,
        )
        .unwrap();
        assert_eq!((key.netns_cookie, key.rev_nat_id), (42, 9));
        let (_, nat) = v4::sock_nat(
            SockNatKey::default(),
            v4::SockNatValue {
                addr_be: client,
                port_be: 80u16.to_be(),
                rev_nat_id: 65_535,
                backend_id: 12,
            },
        )
        .unwrap();
        assert_eq!(
            (nat.addr_be, nat.port_be, nat.rev_nat_id, nat.backend_id),
            (client, 80u16.to_be(), 65_535, 12)
        );
        assert_eq!(v4::rev_nat(300, RevNatValue::default()).unwrap().0, 300);
    }
}
