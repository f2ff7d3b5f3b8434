//! Per-packet cost of lb's programs through BPF_PROG_TEST_RUN, for
//! `cargo xtask perf`: the kernel's own in-program time per packet, median of
//! several runs, at several numbers of programmed Services, against no-op
//! tc and XDP programs as the floor. Prints one JSON document.
//!
//! lb-bench [--services 10,1000,10000,100000] [--repeat N] [--runs N] [--new-flows N]

use std::net::Ipv4Addr;

use lb_common::IPPROTO_TCP as TCP;
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

fn main() {
    let services: Vec<u32> = arg("--services", "10,1000,10000,100000")
        .split(',')
        .map(|s| s.parse().expect("--services"))
        .collect();
    let repeat: u32 = arg("--repeat", "1000000").parse().expect("--repeat");
    let runs: usize = arg("--runs", "5").parse().expect("--runs");
    let new_flows: u16 = arg("--new-flows", "2000").parse().expect("--new-flows");
    let client = Ep {
        addr: Ipv4Addr::new(10, 0, 0, 5).into(),
        port: 40000,
    };

    let mut floor = Datapath::load_sized(64, 64);
    let probe = tcp(client, ep("10.96.0.1:80"), ACK, b"x");
    let floor_tc = median(
        (0..runs)
            .map(|_| floor.time("lb_noop_tc", &probe, repeat))
            .collect(),
    );
    let floor_xdp = median(
        (0..runs)
            .map(|_| floor.time("lb_noop_xdp", &probe, repeat))
            .collect(),
    );
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
        // The Service under test is the last one programmed.
        let fe = Ep {
            addr: nth(Ipv4Addr::new(10, 96, 0, 1), n - 1).into(),
            port: 80,
        };
        let be = Ep {
            addr: nth(Ipv4Addr::new(10, 128, 0, 1), n - 1).into(),
            port: 8080,
        };
        for (prog, name) in [(Prog::Tc, "lb_tc_ingress"), (Prog::Xdp, "lb_xdp")] {
            let floor = if prog == Prog::Tc {
                floor_tc
            } else {
                floor_xdp
            };
            // A new flow per run: distinct source ports, one run each.
            let first_port: u16 = if prog == Prog::Tc { 1000 } else { 30000 };
            let new_flow = median(
                (0..new_flows)
                    .map(|i| {
                        dp.time(
                            name,
                            &tcp(
                                Ep {
                                    port: first_port + i,
                                    ..client
                                },
                                fe,
                                SYN,
                                b"",
                            ),
                            1,
                        )
                    })
                    .collect(),
            );
            let syn = tcp(client, fe, SYN, b"");
            let _ = dp.run(prog, &syn);
            let established = median(
                (0..runs)
                    .map(|_| dp.time(name, &tcp(client, fe, ACK, b"x"), repeat))
                    .collect(),
            );
            let reply = median(
                (0..runs)
                    .map(|_| dp.time(name, &tcp(be, client, ACK, b"y"), repeat))
                    .collect(),
            );
            let miss = median(
                (0..runs)
                    .map(|_| dp.time(name, &tcp(client, ep("192.0.2.1:80"), ACK, b"z"), repeat))
                    .collect(),
            );
            rows.push(json!({
                "services": n,
                "program": if prog == Prog::Tc { "tc" } else { "xdp" },
                "floor_ns": floor,
                "new_flow_ns": new_flow,
                "established_ns": established,
                "reply_ns": reply,
                "miss_ns": miss,
            }));
            eprintln!(
                "lb-bench: {n} services {name}: new {new_flow:.0} ns, established {established:.0}, reply {reply:.0}, miss {miss:.0} (floor {floor:.0})"
            );
        }
    }
    println!(
        "{}",
        json!({"repeat": repeat, "runs": runs, "floor_tc_ns": floor_tc, "floor_xdp_ns": floor_xdp, "rows": rows})
    );
}
