//! `lb-agent explain`: where would this flow go, and why. The real tc
//! program runs on a synthetic packet through BPF_PROG_TEST_RUN against the
//! live (pinned) service, backend, rev-NAT, Maglev and config maps. Conntrack,
//! affinity and counters are private copies: the live flow and affinity
//! entries for this client are copied in, so they decide as they would, and
//! nothing live is written.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use lb_common::{
    Addr, AffinityKey, AffinityValue, CT_DIR_FORWARD, CtKey, CtValue, map_names, program_names,
    stat,
};
use thiserror::Error;

use super::maps::{Maps, MapsError};
use crate::model::Protocol;

#[derive(Debug, Error)]
pub enum ExplainError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("loading the program against the pinned maps: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("running the program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("private map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
}

/// What the program did with the synthetic packet.
#[derive(Debug)]
pub struct Outcome {
    /// tc return code: 0 pass, 2 drop, 7 redirect (a reject sent back).
    pub verdict: i32,
    /// Destination after the program ran.
    pub destination: SocketAddr,
    /// Counters that moved, by name (the reason for the verdict).
    pub reasons: Vec<&'static str>,
    /// The live flow entry for this tuple, if any (it decides instead of balancing).
    pub existing_flow: Option<CtValue>,
    /// The live affinity entry for this client and frontend, if any.
    pub affinity: Option<AffinityValue>,
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Octets of an address, 4 or 16 of them.
fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A TCP SYN or a UDP datagram from `from` to `to` (same family), with
/// valid checksums.
pub fn synthetic_packet(from: SocketAddr, to: SocketAddr, proto: Protocol) -> Vec<u8> {
    let l4_len = if proto == Protocol::Tcp { 20 } else { 8 + 4 };
    let v6 = to.is_ipv6();
    let ip_len = if v6 { 40 } else { 20 };
    let mut p = vec![0u8; 14 + ip_len + l4_len];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    let (src, dst) = (octets(from.ip()), octets(to.ip()));
    let ip = &mut p[14..14 + ip_len];
    if v6 {
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        ip[6] = proto.number();
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&dst);
    } else {
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = proto.number();
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let c = !fold(sum16(ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let l4 = &mut p[14 + ip_len..];
    l4[0..2].copy_from_slice(&from.port().to_be_bytes());
    l4[2..4].copy_from_slice(&to.port().to_be_bytes());
    if proto == Protocol::Tcp {
        l4[4..8].copy_from_slice(&1u32.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = 0x02; // SYN
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    } else {
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        l4[8..12].copy_from_slice(b"lb?\n");
    }
    let pseudo = sum16(&src) + sum16(&dst) + proto.number() as u32 + l4_len as u32;
    let csum_at = if proto == Protocol::Tcp { 16 } else { 6 };
    let c = !fold(pseudo + sum16(l4));
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    p
}

/// The tc program loaded against the live shared maps, with private
/// conntrack, affinity and counters: load once, explain many flows (each
/// program load costs its verification, seconds on a busy node).
pub struct Explainer {
    live: Maps,
    ebpf: aya::Ebpf,
    ct_tcp: HashMap<MapData, CtKey, CtValue>,
    ct_other: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    stats: PerCpuArray<MapData, u64>,
}

/// Empty a private map (the previous flow's state must not decide the next).
fn clear<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<(), ExplainError> {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for key in keys {
        map.remove(&key).map_err(|e| ExplainError::Map(name, e))?;
    }
    Ok(())
}

impl Explainer {
    /// Load the program against the maps pinned under `bpffs`.
    pub fn load(bpffs: &Path) -> Result<Self, ExplainError> {
        let live = Maps::open_pinned(bpffs)?;
        let mut loader = EbpfLoader::new();
        let shared = [
            map_names::SERVICES,
            map_names::BACKENDS,
            map_names::BACKEND_SETS,
            map_names::BACKEND_SLOTS,
            map_names::SET_MEMBERS,
            map_names::REV_NAT,
            map_names::MAGLEV,
            map_names::CONFIG,
            map_names::SOURCE_RANGES,
            // Without the live prefilter, every packet would leave as none of lb's.
            map_names::PREFILTER4,
            map_names::PREFILTER6,
        ];
        let paths: Vec<(&str, std::path::PathBuf)> =
            shared.iter().map(|n| (*n, bpffs.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        // Private, small: the live ones are only read, and copied from below.
        loader
            .map_max_entries(map_names::CT_TCP, 16)
            .map_max_entries(map_names::CT_OTHER, 16)
            .map_max_entries(map_names::AFFINITY, 16);
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
        let mut private = |name: &'static str| -> Result<aya::maps::Map, ExplainError> {
            ebpf.take_map(name)
                .ok_or(ExplainError::Maps(MapsError::Missing { name }))
        };
        let hash = |name: &'static str, map| {
            HashMap::try_from(map).map_err(|e| ExplainError::Map(name, e))
        };
        let ct_tcp = hash(map_names::CT_TCP, private(map_names::CT_TCP)?)?;
        let ct_other = hash(map_names::CT_OTHER, private(map_names::CT_OTHER)?)?;
        let affinity = HashMap::try_from(private(map_names::AFFINITY)?)
            .map_err(|e| ExplainError::Map(map_names::AFFINITY, e))?;
        let stats = PerCpuArray::try_from(private(map_names::STATS)?)
            .map_err(|e| ExplainError::Map(map_names::STATS, e))?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(program_names::TC_INGRESS)
            .ok_or(ExplainError::Maps(MapsError::Missing {
                name: program_names::TC_INGRESS,
            }))?
            .try_into()?;
        prog.load()?;
        Ok(Explainer {
            live,
            ebpf,
            ct_tcp,
            ct_other,
            affinity,
            stats,
        })
    }

    /// Run the program on one synthetic packet, from a clean private state
    /// holding only this flow's live conntrack entry and its client's live
    /// affinity entry. `rev_nat_id` is the frontend's (for the affinity
    /// lookup), when it has one.
    pub fn run(
        &mut self,
        from: SocketAddr,
        to: SocketAddr,
        proto: Protocol,
        rev_nat_id: Option<u32>,
    ) -> Result<Outcome, ExplainError> {
        clear(&mut self.ct_tcp, map_names::CT_TCP)?;
        clear(&mut self.ct_other, map_names::CT_OTHER)?;
        clear(&mut self.affinity, map_names::AFFINITY)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            ExplainError::Map(map_names::STATS, aya::maps::MapError::IoError(e))
        })?;
        for i in 0..stat::COUNT {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus]).map_err(|e| {
                ExplainError::Map(map_names::STATS, aya::maps::MapError::IoError(e))
            })?;
            self.stats
                .set(i, zeros, 0)
                .map_err(|e| ExplainError::Map(map_names::STATS, e))?;
        }
        let key = CtKey {
            src_addr_be: Addr::from(from.ip()),
            dst_addr_be: Addr::from(to.ip()),
            src_port_be: from.port().to_be(),
            dst_port_be: to.port().to_be(),
            proto: proto.number(),
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        let (ct_name, live_ct, ct) = if proto.number() == lb_common::IPPROTO_TCP {
            (map_names::CT_TCP, &self.live.ct_tcp, &mut self.ct_tcp)
        } else {
            (map_names::CT_OTHER, &self.live.ct_other, &mut self.ct_other)
        };
        let existing_flow = live_ct.get(&key, 0).ok();
        if let Some(v) = existing_flow {
            ct.insert(key, v, 0)
                .map_err(|e| ExplainError::Map(ct_name, e))?;
        }
        let affinity_key = rev_nat_id.map(|id| AffinityKey {
            client_addr_be: Addr::from(from.ip()),
            rev_nat_id: id,
        });
        let affinity = affinity_key.and_then(|k| self.live.affinity.get(&k, 0).ok());
        if let (Some(k), Some(v)) = (affinity_key, affinity) {
            self.affinity
                .insert(k, v, 0)
                .map_err(|e| ExplainError::Map(map_names::AFFINITY, e))?;
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program_names::TC_INGRESS)
            .ok_or(ExplainError::Maps(MapsError::Missing {
                name: program_names::TC_INGRESS,
            }))?
            .try_into()?;
        let packet = synthetic_packet(from, to, proto);
        let mut out = vec![0u8; packet.len() + 128];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        let (dst_ip, dst_port) = if to.is_ipv6() {
            let o: [u8; 16] = out[38..54].try_into().unwrap_or([0; 16]);
            (IpAddr::from(o), u16::from_be_bytes([out[56], out[57]]))
        } else {
            let o: [u8; 4] = out[30..34].try_into().unwrap_or([0; 4]);
            (IpAddr::from(o), u16::from_be_bytes([out[36], out[37]]))
        };
        let mut reasons = Vec::new();
        for i in 0..stat::COUNT {
            let n: u64 = self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
            if n > 0 {
                reasons.push(stat::NAMES[i as usize]);
            }
        }
        Ok(Outcome {
            verdict: result.return_value as i32,
            destination: SocketAddr::new(dst_ip, dst_port),
            reasons,
            existing_flow,
            affinity,
        })
    }
}

/// Run the program on one synthetic packet (see `Explainer::run`).
pub fn run(
    bpffs: &Path,
    from: SocketAddr,
    to: SocketAddr,
    proto: Protocol,
    rev_nat_id: Option<u32>,
) -> Result<Outcome, ExplainError> {
    Explainer::load(bpffs)?.run(from, to, proto, rev_nat_id)
}
