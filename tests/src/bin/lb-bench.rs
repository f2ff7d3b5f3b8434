//! Per-packet cost of lb's programs through BPF_PROG_TEST_RUN, for
//! `cargo xtask perf`: the kernel's own in-program time per packet, at
//! several numbers of programmed Services, for IPv4 and IPv6, against no-op
//! tc and XDP programs as the floor. Prints one JSON document.
//!
//! A program that translates a packet changes it, and BPF_PROG_TEST_RUN's
//! repeat runs the program again on the changed packet: a repeated
//! established packet would be measured once and then as a packet to the
//! backend (a miss). So the Service under test is a pair: frontend A's
//! backend is frontend B's address and port, and B's backend is A's. An
//! established packet to A leaves as one to B, which the next run finds
//! established and sends back to A: every repeated run is an established
//! translation, with warm caches as on a busy node (replies the same way).
//! A new flow cannot repeat: it is timed one run per packet against the
//! no-op programs timed the same way (the timer's own cost, and cold
//! caches, are in both).
//!
//! lb-bench [--services 10,1000,10000,100000] [--repeat N] [--runs N] [--samples N]

use std::net::Ipv4Addr;

use lb_common::{CT_DIR_REPLY, CtKey, CtValue, IPPROTO_TCP as TCP, backend_flags, frontend_kind};
use lb_tests::packet::*;
use serde_json::json;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn nth(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n)
}

/// One family's client, frontend and backend for the Service under test.
struct Family {
    name: &'static str,
    client: Ep,
    frontend: Ep,
    backend: Ep,
    /// An address that is neither a frontend's nor a backend's.
    elsewhere: Ep,
}

fn main() {
    let services: Vec<u32> = arg("--services", "10,1000,10000,100000")
        .split(',')
        .map(|s| s.parse().expect("--services"))
        .collect();
    let repeat: u32 = arg("--repeat", "1000000").parse().expect("--repeat");
    let runs: usize = arg("--runs", "5").parse().expect("--runs");
    let samples: u16 = arg("--samples", "2000").parse().expect("--samples");

    let mut floor = Datapath::load_sized(64, 64);
    let probe = tcp(ep("10.0.0.5:40000"), ep("10.96.0.1:80"), ACK, b"x");
    let repeated = |dp: &mut Datapath, prog: &str, frame: &[u8]| {
        median((0..runs).map(|_| dp.time(prog, frame, repeat)).collect())
    };
    let single = |dp: &mut Datapath, prog: &str, frame: &dyn Fn(u16) -> Vec<u8>| {
        median((0..samples).map(|i| dp.time(prog, &frame(i), 1)).collect())
    };
    let floors = [
        (
            "tc",
            repeated(&mut floor, "lb_noop_tc", &probe),
            single(&mut floor, "lb_noop_tc", &|_| probe.clone()),
        ),
        (
            "xdp",
            repeated(&mut floor, "lb_noop_xdp", &probe),
            single(&mut floor, "lb_noop_xdp", &|_| probe.clone()),
        ),
    ];
    let families = [
        Family {
            name: "ipv4",
            client: ep("10.0.0.5:40000"),
            frontend: ep("10.95.0.1:80"),
            backend: ep("10.127.0.1:8080"),
            elsewhere: ep("192.0.2.1:80"),
        },
        Family {
            name: "ipv6",
            client: ep("[fd00::5]:40000"),
            frontend: ep("[fd00:96::1]:80"),
            backend: ep("[fd00:128::1]:8080"),
            elsewhere: ep("[2001:db8::1]:80"),
        },
    ];
    let mut rows = Vec::new();
    for &n in &services {
        let mut dp = Datapath::load_sized(2 * n + 64, n + 64);
        for i in 0..n {
            let fe = Ep {
                addr: nth(Ipv4Addr::new(10, 96, 0, 1), i).into(),
                port: 80,
            };
            let be = Ep {
                addr: nth(Ipv4Addr::new(10, 128, 0, 1), i).into(),
                port: 8080,
            };
            dp.backend(i + 1, be, TCP);
            dp.frontend(fe, TCP, i + 1, &[i + 1]);
        }
        // The Services under test, a pair per family, programmed last.
        for (k, family) in families.iter().enumerate() {
            let (a, b) = (n + 1 + 2 * k as u32, n + 2 + 2 * k as u32);
            dp.backend(a, family.backend, TCP);
            dp.frontend(family.frontend, TCP, a, &[a]);
            dp.backend(b, family.frontend, TCP);
            dp.frontend(family.backend, TCP, b, &[b]);
        }
        for family in &families {
            for (prog, name) in [(Prog::Tc, "lb_tc_ingress"), (Prog::Xdp, "lb_xdp")] {
                let (program, floor_repeated, floor_single) = if prog == Prog::Tc {
                    floors[0]
                } else {
                    floors[1]
                };
                let (client, fe, be) = (family.client, family.frontend, family.backend);
                // A new flow per sample: distinct source ports.
                let first_port: u16 = if prog == Prog::Tc { 1000 } else { 30000 };
                let new_flow = single(&mut dp, name, &|i| {
                    tcp(
                        Ep {
                            port: first_port + i,
                            ..client
                        },
                        fe,
                        SYN,
                        b"",
                    )
                });
                // Both flows of the pair: client -> A (to B) and client -> B (to A).
                let _ = dp.run(prog, &tcp(client, fe, SYN, b""));
                let _ = dp.run(prog, &tcp(client, be, SYN, b""));
                let ack = tcp(client, fe, ACK, b"x");
                let (_, to_b) = dp.run(prog, &ack);
                let (_, back) = dp.run(prog, &to_b[..ack.len()]);
                assert!(
                    to_b[..ack.len()] != ack[..] && back[..ack.len()] == ack[..],
                    "{} {name}: the frontend pair does not alternate",
                    family.name
                );
                let established = repeated(&mut dp, name, &ack);
                let reply = repeated(&mut dp, name, &tcp(be, client, ACK, b"y"));
                let miss = repeated(&mut dp, name, &tcp(client, family.elsewhere, ACK, b"z"));
                rows.push(json!({
                    "services": n,
                    "family": family.name,
                    "program": program,
                    "floor_ns": floor_repeated,
                    "floor_single_ns": floor_single,
                    "new_flow_ns": new_flow,
                    "established_ns": established,
                    "reply_ns": reply,
                    "miss_ns": miss,
                }));
                eprintln!(
                    "lb-bench: {n} services {} {name}: new {new_flow:.0} ns (single-run floor {floor_single:.0}); established {established:.0}, reply {reply:.0}, miss {miss:.0} (floor {floor_repeated:.0})",
                    family.name
                );
            }
        }
    }
    let throughput = nodeport_throughput(&repeated);
    println!(
        "{}",
        json!({
            "repeat": repeat,
            "runs": runs,
            "samples": samples,
            "floor_tc_ns": floors[0].1,
            "floor_xdp_ns": floors[1].1,
            "floor_tc_single_ns": floors[0].2,
            "floor_xdp_single_ns": floors[1].2,
            "rows": rows,
            "throughput": throughput
        })
    );
}

/// Packets per second per core of the XDP node program translating NodePort
/// traffic to an endpoint on another node (masqueraded to the node, as
/// kube-proxy does), beside a no-op XDP_TX program: 1e9 / in-program ns
/// per packet, so it is the program's bound, without a NIC's cost.
///
/// Repeatable as the per-packet rows are: the request (client -> NodePort,
/// established) leaves as node:port -> endpoint, and a reply entry made
/// for that tuple turns it back into the request (a reply translation of
/// both ends, which is what the endpoint's answers get). The runs alternate
/// the two directions of a NodePort flow.
fn nodeport_throughput(repeated: &dyn Fn(&mut Datapath, &str, &[u8]) -> f64) -> serde_json::Value {
    let node = ep("192.168.99.1:30080");
    let endpoint = ep("192.168.99.2:8080");
    let client = ep("203.0.113.7:40000");
    let mut dp = Datapath::load_sized(1024, 1024);
    dp.set_config(|c| {
        c.nodeport_snat_addr4 = be32(node.addr);
        c.snat_port_min = 61_000;
        c.snat_port_max = 65_535;
    });
    dp.backend(1, endpoint, TCP);
    dp.set_backend_state(1, 0, backend_flags::REMOTE);
    dp.external_frontend(node, TCP, 1, &[1], frontend_kind::NODE_PORT);
    let (_, out) = dp.run(Prog::XdpNode, &tcp(client, node, SYN, b""));
    // The SNAT port the flow got: the translated frame's TCP source port.
    let snat_port = u16::from_be_bytes([out[14 + 20], out[14 + 21]]);
    let key = CtKey {
        src_addr_be: be32(node.addr),
        dst_addr_be: be32(endpoint.addr),
        src_port_be: snat_port.to_be(),
        dst_port_be: endpoint.port.to_be(),
        proto: TCP,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let now = Datapath::now_ns();
    dp.insert_ct(
        key,
        CtValue {
            backend_id: 1,
            rev_nat_id: 1,
            nat_addr_be: be32(client.addr),
            nat_port_be: client.port.to_be(),
            snat_addr_be: be32(node.addr),
            snat_port_be: node.port.to_be(),
            flags: lb_common::ct_flags::REPLY_SEEN,
            lifetime_s: 3600,
            created_ns: now,
            last_seen_ns: now,
            ..CtValue::default()
        },
    );
    let request = tcp(client, node, ACK, b"x");
    // The pair really alternates: request -> translated -> request.
    let (_, translated) = dp.run(Prog::XdpNode, &request);
    let (_, back) = dp.run(Prog::XdpNode, &translated[..request.len()]);
    assert!(
        translated[..request.len()] != request[..] && back[..request.len()] == request[..],
        "the NodePort throughput pair does not alternate: each run would not translate"
    );
    let lb_ns = repeated(&mut dp, "lb_xdp_node", &request);
    let floor_ns = repeated(&mut dp, "lb_noop_xdp_tx", &request);
    eprintln!(
        "lb-bench: XDP NodePort to a remote endpoint: {lb_ns:.0} ns per packet ({:.2} Mpps per core); no-op XDP_TX {floor_ns:.0} ns ({:.2} Mpps)",
        1e3 / lb_ns,
        1e3 / floor_ns
    );
    json!({
        "nodeport_remote_ns": lb_ns,
        "nodeport_remote_mpps": 1e3 / lb_ns,
        "noop_xdp_tx_ns": floor_ns,
        "noop_xdp_tx_mpps": 1e3 / floor_ns,
    })
}
