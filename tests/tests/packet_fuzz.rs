//! Packet fuzzing through BPF_PROG_TEST_RUN: at least 100,000 random and
//! mutated frames per program (truncated headers, IP options, bad IHL and
//! total length, fragments, VLAN tags, ICMP, random protocols), a quarter of
//! them IPv6 (the same flows, addresses mapped into fd00::/96, against the
//! same Services mirrored in IPv6), with services, conntrack and affinity
//! populated. Properties:
//! - a frame not addressed to a Service IP and not from a backend passes
//!   byte-identical;
//! - a translated frame differs from its input only in addresses, ports and
//!   checksums, and its checksums are valid whenever the input's were;
//! - a refusal is a well-formed RST / ICMP error with valid checksums;
//! - ICMP / ICMPv6 errors quoting live flows (and others) are translated
//!   only in outer addresses, the quote's addresses, ports and checksums,
//!   with every checksum valid (the quoted IPv4 header's too);
//! - fragment trains (IPv4, IPv6 Fragment header), in order, reordered or
//!   with fragments lost, change only addresses and checksums (later
//!   fragments: addresses and the IPv4 header checksum);
//! - no counter of an impossible state moves.
//!
//! Seeded and reproducible: LB_FUZZ_SEED and LB_FUZZ_FRAMES override.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    IPPROTO_TCP as TCP, IPPROTO_UDP as UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, backend_flags,
    config_flags, frontend_kind, service_flags, stat,
};
use lb_tests::packet::*;

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const SERVICE_IPS: [&str; 4] = ["10.96.0.10", "10.96.0.53", "10.96.0.99", "10.96.0.77"];
const BACKEND_IPS: [&str; 5] = ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.2.1", "10.0.2.2"];

/// The IPv6 twin of an IPv4 address in these tests: fd00::a.b.c.d.
fn six(v4: Ipv4Addr) -> Ipv6Addr {
    let o = v4.octets();
    Ipv6Addr::new(
        0xfd00,
        0,
        0,
        0,
        0,
        0,
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([o[2], o[3]]),
    )
}

fn six_ep(e: Ep) -> Ep {
    Ep {
        addr: IpAddr::V6(six(e.v4())),
        port: e.port,
    }
}

fn setup(dp: &mut Datapath) {
    setup_family(dp, false);
    setup_family(dp, true);
}

/// The Services of one family; IPv6 ids are offset by 100.
fn setup_family(dp: &mut Datapath, v6: bool) {
    let fam = |s: &str| if v6 { six_ep(ep(s)) } else { ep(s) };
    let id = |n: u32| if v6 { n + 100 } else { n };
    let rid = |n: u32| if v6 { n + 100 } else { n };
    let addr = |s: &str| -> IpAddr {
        let a: Ipv4Addr = s.parse().unwrap();
        if v6 {
            IpAddr::V6(six(a))
        } else {
            IpAddr::V4(a)
        }
    };
    let ids = |list: &[u32]| -> Vec<u32> { list.iter().map(|n| id(*n)).collect() };
    dp.backend(id(1), fam("10.0.1.1:8080"), TCP);
    dp.backend(id(2), fam("10.0.1.2:8080"), TCP);
    dp.backend(id(3), fam("10.0.1.3:8080"), TCP);
    dp.backend(id(4), fam("10.0.2.1:5353"), UDP);
    dp.backend(id(5), fam("10.0.2.2:5353"), UDP);
    dp.frontend(fam("10.96.0.10:80"), TCP, rid(1), &ids(&[1, 2, 3]));
    dp.frontend_with_flags(
        fam("10.96.0.10:443"),
        TCP,
        rid(2),
        &ids(&[1, 2]),
        service_flags::AFFINITY,
    );
    dp.set_head(fam("10.96.0.10:443"), TCP, |h| h.affinity_timeout_s = 60);
    dp.frontend(fam("10.96.0.53:53"), UDP, rid(3), &ids(&[4, 5]));
    dp.frontend_with_flags(
        fam("10.96.0.53:53"),
        TCP,
        rid(4),
        &ids(&[1, 2, 3]),
        service_flags::MAGLEV,
    );
    dp.maglev_table(rid(4), &ids(&[1, 2, 3, 1, 2, 3, 1]));
    dp.frontend(fam("10.96.0.99:80"), TCP, rid(5), &ids(&[]));
    dp.frontend(fam("10.96.0.99:53"), UDP, rid(6), &ids(&[]));
    dp.frontend_with_flags(
        fam("10.96.0.77:80"),
        TCP,
        rid(7),
        &[],
        service_flags::DROP_IF_EMPTY,
    );
    for ip in SERVICE_IPS {
        dp.address_only(addr(ip));
    }
    // The same frontends for traffic from outside (node programs), with one
    // backend on another node (SNAT), and pings answered for one address.
    for (n, (fe, proto)) in FRONTENDS.into_iter().enumerate() {
        let backends: &[u32] = match (fe, proto) {
            ("10.96.0.10:80", _) => &[1, 2, 3],
            ("10.96.0.10:443", _) => &[1, 2],
            ("10.96.0.53:53", UDP) => &[4, 5],
            ("10.96.0.53:53", _) => &[1, 2, 3],
            _ => &[],
        };
        dp.external_frontend(
            fam(fe),
            proto,
            rid(10 + n as u32),
            &ids(backends),
            frontend_kind::NODE_PORT,
        );
    }
    dp.external_frontend(
        fam("10.96.0.77:80"),
        TCP,
        rid(20),
        &[],
        frontend_kind::NODE_PORT | service_flags::DROP_IF_EMPTY,
    );
    dp.set_backend_state(id(2), 0, backend_flags::REMOTE);
    dp.set_backend_state(id(5), 0, backend_flags::REMOTE);
    dp.address_entry(
        addr("10.96.0.10"),
        SCOPE_INTERNAL,
        service_flags::ADDRESS_ONLY | service_flags::ECHO,
    );
    dp.address_entry(addr("10.96.0.10"), SCOPE_EXTERNAL, service_flags::ECHO);
    dp.set_config(|c| {
        let node = addr("192.168.50.1");
        let hairpin = addr("169.254.42.1");
        if v6 {
            c.nodeport_snat_addr6 = be32(node);
            c.hairpin_snat_addr6 = be32(hairpin);
        } else {
            c.nodeport_snat_addr4 = be32(node);
            c.hairpin_snat_addr4 = be32(hairpin);
        }
        c.snat_port_min = 61_000;
        c.snat_port_max = 61_100;
        c.flags |= config_flags::ECHO_REPLY;
    });
}

fn ip(rng: &mut Rng, pool: &[&str]) -> Ipv4Addr {
    match rng.below(4) {
        0 => Ipv4Addr::from(rng.next() as u32),
        1 => Ipv4Addr::new(10, 0, 0, 1 + rng.below(20) as u8),
        _ => rng.pick(pool).parse().unwrap(),
    }
}

fn port(rng: &mut Rng) -> u16 {
    match rng.below(3) {
        0 => rng.next() as u16,
        _ => *rng.pick(&[80u16, 443, 53, 8080, 5353, 40000, 40001]),
    }
}

fn tcp_flags(rng: &mut Rng) -> Tcp {
    let raw = rng.next();
    Tcp {
        syn: raw & 1 != 0,
        ack: (raw & 2 != 0).then_some(raw as u32 >> 8),
        fin: raw & 4 != 0,
        rst: raw & 8 != 0,
        seq: (raw >> 32) as u32,
    }
}

const FRONTENDS: [(&str, u8); 5] = [
    ("10.96.0.10:80", TCP),
    ("10.96.0.10:443", TCP),
    ("10.96.0.53:53", UDP),
    ("10.96.0.53:53", TCP),
    ("10.96.0.99:80", TCP),
];
const BACKENDS: [(&str, u8); 5] = [
    ("10.0.1.1:8080", TCP),
    ("10.0.1.2:8080", TCP),
    ("10.0.1.3:8080", TCP),
    ("10.0.2.1:5353", UDP),
    ("10.0.2.2:5353", UDP),
];

/// A well-formed frame, IPv4 or (a quarter of them) its IPv6 twin; one in
/// ten an ICMP error quoting a flow, one in twenty the first of a fragment
/// train (the rest queued in `pending`, sometimes reordered or thinned).
fn base(rng: &mut Rng, pending: &mut Vec<Vec<u8>>) -> Vec<u8> {
    if let Some(next) = pending.pop() {
        return next;
    }
    let v6 = rng.below(4) == 0;
    match rng.below(20) {
        0 | 1 => return icmp_error_frame(rng, v6),
        2 => {
            let mut train = fragment_train(rng, v6);
            match rng.below(4) {
                // Reordered.
                0 => {
                    let other = rng.below(train.len());
                    train.swap(0, other);
                }
                // One lost.
                1 if train.len() > 2 => {
                    train.remove(rng.below(train.len()));
                }
                _ => {}
            }
            train.reverse();
            let first = train.pop().expect("a train has fragments");
            *pending = train;
            return first;
        }
        _ => {}
    }
    let frame = base4(rng);
    if v6 {
        to_ipv6(&frame).unwrap_or(frame)
    } else {
        frame
    }
}

/// An ICMP or ICMPv6 error from a backend or a router quoting a packet of a
/// flow as it left us (client -> backend), or a reply as the client saw it
/// (frontend -> client), in 8 bytes or whole.
fn icmp_error_frame(rng: &mut Rng, v6: bool) -> Vec<u8> {
    let fam = |e: Ep| if v6 { six_ep(e) } else { e };
    let client = fam(Ep {
        addr: ip(rng, &["10.0.0.5", "10.0.1.1"]).into(),
        port: *rng.pick(&[40000u16, 40001, 40002]),
    });
    let payload: Vec<u8> = (0..rng.below(32)).map(|_| rng.next() as u8).collect();
    let (quote_src, quote_dst, proto, outer_src, outer_dst) = if rng.below(3) == 0 {
        let (fe, proto) = *rng.pick(&FRONTENDS);
        (fam(ep(fe)), client, proto, client.addr, fam(ep(fe)).addr)
    } else {
        let (be, proto) = *rng.pick(&BACKENDS);
        let from = if rng.below(2) == 0 {
            fam(ep(be)).addr
        } else {
            fam(ep("10.9.9.9:0")).addr
        };
        (client, fam(ep(be)), proto, from, client.addr)
    };
    let quoted = if proto == TCP {
        tcp(quote_src, quote_dst, tcp_flags(rng), &payload)
    } else {
        udp(quote_src, quote_dst, &payload)
    };
    let (kind, code) = if v6 {
        *rng.pick(&[(1u8, 4u8), (2, 0), (3, 0), (4, 0)])
    } else {
        *rng.pick(&[(3u8, 3u8), (3, 4), (3, 1), (11, 0), (12, 0)])
    };
    let quote_len = if rng.below(2) == 0 {
        Some(if v6 { 48 } else { 28 })
    } else {
        None
    };
    icmp_error(
        outer_src,
        outer_dst,
        kind,
        code,
        [0, 0, 5, 0x78],
        &quoted,
        quote_len,
    )
}

/// The fragments of a UDP datagram to a frontend or from a backend.
fn fragment_train(rng: &mut Rng, v6: bool) -> Vec<Vec<u8>> {
    let fam = |e: Ep| if v6 { six_ep(e) } else { e };
    let client = fam(Ep {
        addr: ip(rng, &["10.0.0.5", "10.0.1.1"]).into(),
        port: *rng.pick(&[40000u16, 40001, 40002]),
    });
    // Longer than the largest fragment: two fragments at least.
    let payload: Vec<u8> = (0..80 + rng.below(200)).map(|_| rng.next() as u8).collect();
    let frame = match rng.below(3) {
        0 => udp(fam(ep("10.0.2.1:5353")), client, &payload),
        1 => udp(client, fam(ep("10.96.0.99:53")), &payload),
        _ => udp(client, fam(ep("10.96.0.53:53")), &payload),
    };
    fragment(&frame, 8 * (1 + rng.below(8)), rng.next() as u32)
}

/// The IPv6 twin of a well-formed IPv4 TCP / UDP / ICMP echo frame:
/// addresses mapped with `six`, the same L4 bytes, checksums redone.
fn to_ipv6(f: &[u8]) -> Option<Vec<u8>> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] != 0x45 {
        return None;
    }
    let tot = u16::from_be_bytes([f[16], f[17]]) as usize;
    let (src, dst) = (
        Ipv4Addr::new(f[26], f[27], f[28], f[29]),
        Ipv4Addr::new(f[30], f[31], f[32], f[33]),
    );
    let mut l4 = f.get(34..14 + tot)?.to_vec();
    let proto = match f[23] {
        1 => {
            // ICMP echo request -> ICMPv6 echo request.
            l4[0] = 128;
            58
        }
        p => p,
    };
    let mut out = f[..12].to_vec();
    out.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    out.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    out.extend_from_slice(&[proto, 64]);
    out.extend_from_slice(&six(src).octets());
    out.extend_from_slice(&six(dst).octets());
    // UDP over IPv6 always has a checksum (a zero one gets computed here).
    let csum_at = match proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    };
    if l4.len() < csum_at + 2 {
        return None;
    }
    l4[csum_at] = 0;
    l4[csum_at + 1] = 0;
    let pseudo = sum16(&out[22..54]) + proto as u32 + l4.len() as u32;
    let mut c = !fold(pseudo + sum16(&l4));
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&l4);
    Some(out)
}

/// A well-formed IPv4 frame: to exact frontends, replies from backends to
/// the clients that use them, or anything near or far.
fn base4(rng: &mut Rng) -> Vec<u8> {
    let payload: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
    let client = |rng: &mut Rng| Ep {
        addr: ip(rng, &["10.0.0.5", "10.0.1.1"]).into(),
        port: *rng.pick(&[40000u16, 40001, 40002]),
    };
    let (src, dst, proto) = match rng.below(10) {
        0..=4 => {
            let (fe, proto) = *rng.pick(&FRONTENDS);
            (client(rng), ep(fe), Some(proto))
        }
        5 | 6 => {
            let (be, proto) = *rng.pick(&BACKENDS);
            (ep(be), client(rng), Some(proto))
        }
        7 => (
            Ep {
                addr: ip(rng, &BACKEND_IPS).into(),
                port: port(rng),
            },
            Ep {
                addr: ip(rng, &["10.0.0.5"]).into(),
                port: port(rng),
            },
            None,
        ),
        _ => (
            Ep {
                addr: ip(rng, &["10.0.0.5", "10.0.1.1"]).into(),
                port: port(rng),
            },
            Ep {
                addr: ip(rng, &SERVICE_IPS).into(),
                port: port(rng),
            },
            None,
        ),
    };
    let kind = match proto {
        Some(TCP) => 2,
        Some(_) => 7,
        None => rng.below(10),
    };
    match kind {
        0 => {
            let b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC)
                .ipv4(src.v4().octets(), dst.v4().octets(), 64)
                .icmpv4_echo_request(rng.next() as u16, 1);
            let mut f = Vec::new();
            b.write(&mut f, &payload).unwrap();
            f
        }
        1 => {
            let b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC)
                .ipv6([0xfd; 16], [0xfe; 16], 64)
                .udp(port(rng), port(rng));
            let mut f = Vec::new();
            b.write(&mut f, &payload).unwrap();
            f
        }
        2..=5 => tcp(src, dst, tcp_flags(rng), &payload),
        6 if rng.below(2) == 0 => udp_no_csum(src, dst, &payload),
        _ => udp(src, dst, &payload),
    }
}

/// Fix the IPv4 header checksum and the L4 checksum of a mutated frame
/// (IPv6: the L4 checksum).
fn fix_checksums(f: &mut [u8]) {
    if f.len() >= 54 && f[12..14] == [0x86, 0xdd] {
        let end = 54 + u16::from_be_bytes([f[18], f[19]]) as usize;
        let proto = f[20];
        let at = match proto {
            TCP if end >= 54 + 20 => 54 + 16,
            UDP if end >= 54 + 8 => 54 + 6,
            58 if end >= 54 + 4 => 54 + 2,
            _ => return,
        };
        if end > f.len() {
            return;
        }
        f[at] = 0;
        f[at + 1] = 0;
        let pseudo = sum16(&f[22..54]) + proto as u32 + (end - 54) as u32;
        let mut c = !fold(pseudo + sum16(&f[54..end]));
        if proto == UDP && c == 0 {
            c = 0xffff;
        }
        f[at..at + 2].copy_from_slice(&c.to_be_bytes());
        return;
    }
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = ((f[14] & 0x0f) as usize * 4).max(20);
    let tot = u16::from_be_bytes([f[16], f[17]]) as usize;
    if 14 + ihl > f.len() {
        return;
    }
    f[24] = 0;
    f[25] = 0;
    let c = !fold(sum16(&f[14..14 + ihl]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    if tot < ihl || 14 + tot > f.len() {
        return;
    }
    let (proto, l4) = (f[23], 14 + ihl);
    let at = match proto {
        TCP if tot >= ihl + 20 => l4 + 16,
        UDP if tot >= ihl + 8 && f[l4 + 6..l4 + 8] != [0, 0] => l4 + 6,
        _ => return,
    };
    f[at] = 0;
    f[at + 1] = 0;
    let pseudo = sum16(&f[26..34]) + proto as u32 + (tot - ihl) as u32;
    let mut c = !fold(pseudo + sum16(&f[l4..14 + tot]));
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Mutate a frame; returns whether its checksums are still meant to be valid.
fn mutate(rng: &mut Rng, f: &mut Vec<u8>) -> bool {
    let mut valid = true;
    for _ in 0..1 + rng.below(3) {
        match rng.below(12) {
            0 => {
                let n = 14 + rng.below(f.len().saturating_sub(13).max(1));
                f.truncate(n.min(f.len()));
            }
            1 => {
                let i = rng.below(f.len());
                f[i] ^= 1 << rng.below(8);
                valid = false;
            }
            2 if f.len() > 14 => f[14] = (f[14] & 0xf0) | rng.below(16) as u8,
            3 if f.len() > 18 => {
                let v = rng.next() as u16;
                f[16..18].copy_from_slice(&v.to_be_bytes());
            }
            4 if f.len() > 21 => {
                let random = rng.next() as u16;
                let v = *rng.pick(&[0x2000u16, 0x0010, 0x2010, 0x4000, random]);
                f[20..22].copy_from_slice(&v.to_be_bytes());
            }
            5 if f.len() >= 34 && f[14] == 0x45 => {
                let words = 1 + rng.below(4);
                let opts: Vec<u8> = (0..words * 4).map(|_| 1).collect();
                *f = with_ip_options(f, &opts);
            }
            6 if f.len() > 23 => f[23] = rng.next() as u8,
            7 if f.len() > 14 => {
                let mut tagged = f[..12].to_vec();
                tagged.extend_from_slice(&[0x81, 0x00, 0x00, rng.below(4095) as u8]);
                tagged.extend_from_slice(&f[12..]);
                *f = tagged;
            }
            8 if f.len() > 14 + 20 + 13 => {
                let at = 14 + 20 + 12;
                f[at] = (rng.below(16) as u8) << 4;
            }
            9 => {
                let extra = rng.below(40);
                f.extend((0..extra).map(|_| rng.next() as u8));
            }
            _ => {}
        }
    }
    if valid {
        fix_checksums(f);
    }
    valid
}

/// The IPv4 address an IPv6 address of `six` stands for, if it is one.
fn unsix(o: &[u8]) -> Option<Ipv4Addr> {
    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(o).ok()?);
    let s = v6.segments();
    (s[..6] == [0xfd00, 0, 0, 0, 0, 0])
        .then(|| Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7])))
}

/// A frame nothing of ours could claim: not to a Service IP, not from a
/// backend, and (an ICMP error, matched by its quote alone, as netfilter
/// does) not quoting a packet from or to one.
fn foreign(f: &[u8]) -> bool {
    if let Some(q) = quote_of(f) {
        let mut inner = f[..14].to_vec();
        inner[12..14].copy_from_slice(if q.v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        inner.extend_from_slice(&f[q.l3..]);
        if let Some((src, dst)) = addresses(&inner) {
            let ours = |a: &str| SERVICE_IPS.contains(&a) || BACKEND_IPS.contains(&a);
            if ours(&src) || ours(&dst) {
                return false;
            }
        }
    }
    foreign_addresses(f)
}

/// A frame's IP source and destination as IPv4 text (IPv6 ones through `unsix`).
fn addresses(f: &[u8]) -> Option<(String, String)> {
    let text = |a: Option<Ipv4Addr>| a.map(|a| a.to_string()).unwrap_or_default();
    if f.len() >= 54 && f[12..14] == [0x86, 0xdd] {
        Some((text(unsix(&f[22..38])), text(unsix(&f[38..54]))))
    } else if f.len() >= 34 && f[12..14] == [0x08, 0x00] {
        Some((
            Ipv4Addr::new(f[26], f[27], f[28], f[29]).to_string(),
            Ipv4Addr::new(f[30], f[31], f[32], f[33]).to_string(),
        ))
    } else {
        None
    }
}

fn foreign_addresses(f: &[u8]) -> bool {
    let Some((src, dst)) = addresses(f) else {
        return true;
    };
    !SERVICE_IPS.contains(&dst.as_str())
        && !BACKEND_IPS.contains(&src.as_str())
        && !BACKEND_IPS.contains(&dst.as_str())
        && dst != "169.254.42.1"
}

/// Where an ICMP error's quote sits: its IP header at `l3`, L4 at `l4`.
struct Quote {
    l3: usize,
    l4: usize,
    proto: u8,
    v6: bool,
}

/// The quote of an ICMP / ICMPv6 error frame.
fn quote_of(f: &[u8]) -> Option<Quote> {
    let v6 = f.get(12..14)? == [0x86, 0xdd];
    let (icmp, kind) = if v6 {
        (f.get(20) == Some(&58)).then_some(())?;
        (54, *f.get(54)?)
    } else {
        (f.get(23) == Some(&1) && f.get(14)? >> 4 == 4).then_some(())?;
        let icmp = 14 + (f[14] & 0x0f) as usize * 4;
        (icmp, *f.get(icmp)?)
    };
    let error = if v6 {
        (1..=4).contains(&kind)
    } else {
        [3, 11, 12].contains(&kind)
    };
    if !error {
        return None;
    }
    let l3 = icmp + 8;
    let (l4, proto) = if v6 {
        (l3 + 40, *f.get(l3 + 6)?)
    } else {
        (l3 + (*f.get(l3)? & 0x0f) as usize * 4, *f.get(l3 + 9)?)
    };
    (f.len() >= l4 + 8).then_some(Quote { l3, l4, proto, v6 })
}

/// The quoted IPv4 headers of a frame before and after, if both are quotes.
fn quotes<'a>(input: &'a [u8], out: &'a [u8]) -> Option<(&'a [u8], &'a [u8])> {
    let q = quote_of(input)?;
    if q.v6 {
        return None;
    }
    Some((&input[q.l3..q.l4], &out[q.l3..q.l4]))
}

fn quoted_ip_csum_ok(header: &[u8]) -> bool {
    fold(sum16(header)) == 0xffff
}

/// An IPv4 fragment (MF or an offset), or IPv6 with a Fragment header.
fn is_fragment(f: &[u8]) -> bool {
    if f.len() >= 54 && f[12..14] == [0x86, 0xdd] {
        f[20] == 44
    } else {
        f.len() >= 34 && u16::from_be_bytes([f[20], f[21]]) & 0x3fff != 0
    }
}

/// Bytes outside addresses, ports and checksums must be unchanged (for an
/// ICMP error: also the quote's; for a later fragment: no L4 header).
fn only_nat_fields_changed(input: &[u8], out: &[u8]) -> Result<(), String> {
    if input.len() != out.len() {
        return Err(format!("length {} -> {}", input.len(), out.len()));
    }
    let v6 = input[12..14] == [0x86, 0xdd];
    let (mut l4, proto, addrs) = if v6 {
        (54, input[20], 22..54)
    } else {
        (14 + (input[14] & 0x0f) as usize * 4, input[23], 24..34)
    };
    let (proto, later_fragment) = if v6 && proto == 44 {
        l4 += 8;
        let offset = u16::from_be_bytes([input[56], input[57]]) & 0xfff8;
        (input[54], offset != 0)
    } else {
        let offset = u16::from_be_bytes([input[20], input[21]]) & 0x1fff;
        (proto, !v6 && offset != 0)
    };
    let csum = if proto == TCP { l4 + 16 } else { l4 + 6 };
    let quote = quote_of(input);
    let in_quote = |i: usize| {
        quote.as_ref().is_some_and(|q| {
            let (addrs, ip_csum) = if q.v6 {
                (q.l3 + 8..q.l3 + 40, 0..0)
            } else {
                (q.l3 + 12..q.l3 + 20, q.l3 + 10..q.l3 + 12)
            };
            let l4_csum = if q.proto == TCP { q.l4 + 16 } else { q.l4 + 6 };
            addrs.contains(&i)
                || ip_csum.contains(&i)
                || (q.l4..q.l4 + 4).contains(&i)
                || (l4_csum..l4_csum + 2).contains(&i)
                || (l4 + 2..l4 + 4).contains(&i)
        })
    };
    let allowed = |i: usize| {
        addrs.contains(&i)
            || in_quote(i)
            || (!later_fragment
                && quote.is_none()
                && ((l4..l4 + 4).contains(&i) || (csum..csum + 2).contains(&i)))
    };
    match (0..input.len()).find(|&i| input[i] != out[i] && !allowed(i)) {
        Some(i) => Err(format!("byte {i} changed")),
        None => Ok(()),
    }
}

const IMPOSSIBLE: [u32; 4] = [
    stat::ERR_SLOT_MISSING,
    stat::ERR_BACKEND_MISSING,
    stat::ERR_NAT_FAILED,
    stat::ERR_REJECT_FAILED,
];

fn fuzz(prog: Prog) {
    let seed: u64 = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1b00_c0ff_ee01);
    let frames: usize = std::env::var("LB_FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let mut rng = Rng(seed ^ prog as u64);
    let mut dp = Datapath::load();
    setup(&mut dp);
    let mut pending = Vec::new();
    let (mut untouched, mut translated, mut bounced, mut dropped, mut refused_by_kernel) =
        (0, 0, 0, 0, 0);
    let mut ipv6_translated_or_answered = 0;
    let (mut icmp_errors, mut fragments) = (0, 0);
    for n in 0..frames {
        let mut frame = base(&mut rng, &mut pending);
        let csum_valid = if !pending.is_empty() || is_fragment(&frame) || rng.below(5) == 0 {
            true
        } else {
            mutate(&mut rng, &mut frame)
        };
        let ctx = || format!("[{prog:?}] frame {n} (seed {seed:#x}): {frame:02x?}");
        let (verdict, out) = match dp.try_run(prog, &frame) {
            Ok(r) => r,
            Err(_) => {
                // The kernel itself refuses frames too short for an skb.
                refused_by_kernel += 1;
                continue;
            }
        };
        match verdict {
            Verdict::Pass if out == frame => untouched += 1,
            Verdict::Pass => {
                translated += 1;
                if frame[12..14] == [0x86, 0xdd] {
                    ipv6_translated_or_answered += 1;
                }
                assert!(!foreign(&frame), "{}: a foreign frame was changed", ctx());
                if let Err(e) = only_nat_fields_changed(&frame, &out) {
                    panic!("{}: translation changed more than NAT fields: {e}", ctx());
                }
                if csum_valid
                    && verify_checksums(&frame).is_ok()
                    && let Err(e) = verify_checksums(&out)
                {
                    panic!("{}: translated frame: {e}; out {out:02x?}", ctx());
                }
                if let Some((quote_in, quote_out)) = quotes(&frame, &out) {
                    icmp_errors += 1;
                    if csum_valid && quoted_ip_csum_ok(quote_in) && !quoted_ip_csum_ok(quote_out) {
                        panic!(
                            "{}: quoted IPv4 header checksum broken; out {out:02x?}",
                            ctx()
                        );
                    }
                }
                if is_fragment(&frame) {
                    fragments += 1;
                }
            }
            Verdict::Bounce => {
                bounced += 1;
                if frame[12..14] == [0x86, 0xdd] {
                    ipv6_translated_or_answered += 1;
                }
                assert!(!foreign(&frame), "{}: a foreign frame was answered", ctx());
                let v6 = out[12..14] == [0x86, 0xdd];
                let (l4, proto) = if v6 {
                    (54, out[20])
                } else {
                    (14 + (out[14] & 0x0f) as usize * 4, out[23])
                };
                let kind = out.get(l4).copied();
                let echo_reply =
                    (proto == 1 && kind == Some(0)) || (proto == 58 && kind == Some(129));
                let rst = proto == TCP && out.get(l4 + 13).is_some_and(|f| f & 0x04 != 0);
                let unreachable =
                    (proto == 1 && kind == Some(3)) || (proto == 58 && kind == Some(1));
                assert!(
                    rst || unreachable || echo_reply,
                    "{}: answer is not RST / ICMP unreachable / echo reply",
                    ctx()
                );
                // Refusals are built from scratch: always valid. An echo
                // reply is patched from its request: valid when that was.
                let input_valid = csum_valid && verify_checksums(&frame).is_ok();
                if (!echo_reply || input_valid)
                    && let Err(e) = verify_checksums(&out)
                {
                    panic!("{}: answer: {e}; out {out:02x?}", ctx());
                }
            }
            Verdict::Drop => {
                dropped += 1;
                assert!(!foreign(&frame), "{}: a foreign frame was dropped", ctx());
            }
        }
    }
    let stats = dp.stats();
    for idx in IMPOSSIBLE {
        assert_eq!(
            stats[idx as usize],
            0,
            "[{prog:?}] impossible counter {} moved",
            stat::NAMES[idx as usize]
        );
    }
    println!(
        "[{prog:?}] {frames} frames: {untouched} untouched, {translated} translated, {bounced} refused, {dropped} dropped, {refused_by_kernel} refused by BPF_PROG_TEST_RUN; IPv6 translated or answered: {ipv6_translated_or_answered}; ICMP errors translated: {icmp_errors}; fragments translated: {fragments}"
    );
    assert!(
        icmp_errors > frames / 200 && fragments > frames / 200,
        "the generator reaches the ICMP error and fragment paths"
    );
    assert!(
        ipv6_translated_or_answered > frames / 50,
        "the generator reaches the IPv6 paths"
    );
    assert!(
        translated > frames / 10
            && untouched > frames / 10
            && bounced > frames / 100
            && dropped > 0,
        "the generator reaches every path"
    );
}

#[test]
fn fuzz_tc_program() {
    fuzz(Prog::Tc);
}

#[test]
fn fuzz_xdp_program() {
    fuzz(Prog::Xdp);
}

#[test]
fn fuzz_node_tc_program() {
    fuzz(Prog::TcNode);
}

#[test]
fn fuzz_node_xdp_program() {
    fuzz(Prog::XdpNode);
}
