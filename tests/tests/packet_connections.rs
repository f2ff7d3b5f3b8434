//! Packet tables for connection semantics: session affinity, standby
//! (terminating / not ready) backends, restarted flows, Maglev.

use lb_common::{
    BACKEND_STANDBY, IPPROTO_TCP as TCP, IPPROTO_UDP as UDP, backend_flags, service_flags, stat,
};
use lb_tests::packet::*;

const CLIENT: &str = "10.0.0.5:40000";
const WEB: &str = "10.96.0.10:80";
const DNS: &str = "10.96.0.53:53";
const WEB_1: &str = "10.0.1.1:8080";
const WEB_2: &str = "10.0.1.2:8080";
const WEB_3: &str = "10.0.1.3:8080";
const DNS_1: &str = "10.0.2.1:5353";
const DNS_2: &str = "10.0.2.2:5353";

fn webs() -> Vec<Ep> {
    vec![ep(WEB_1), ep(WEB_2), ep(WEB_3)]
}

fn from_client(port: u16) -> Ep {
    Ep { port, ..ep(CLIENT) }
}

fn case(name: &'static str, setup: impl Fn(&mut Datapath) + 'static, steps: Vec<Step>) -> Case {
    Case::on(BOTH, name, setup, steps)
}

fn three_webs(dp: &mut Datapath, flags: u32) {
    dp.backend(1, ep(WEB_1), TCP);
    dp.backend(2, ep(WEB_2), TCP);
    dp.backend(3, ep(WEB_3), TCP);
    dp.frontend_with_flags(ep(WEB), TCP, 1, &[1, 2, 3], flags);
}

/// Web frontend with backends 1 and 2 in its set, affinity (100 s), and a
/// Maglev table that picks only backend 1: an affinity entry alone can
/// send a client to 2. Backend 3 exists but is not in the set.
fn affinity_single(dp: &mut Datapath) {
    three_webs(dp, 0);
    dp.frontend_with_flags(
        ep(WEB),
        TCP,
        1,
        &[1, 2],
        service_flags::AFFINITY | service_flags::MAGLEV,
    );
    dp.maglev_table(1, &[1; 7]);
    dp.set_head(ep(WEB), TCP, |h| h.affinity_timeout_s = 100);
}

#[test]
fn affinity_sends_new_connections_to_the_same_backend() {
    let mut steps = vec![send(
        tcp(from_client(41000), ep(WEB), SYN, b""),
        Expect::Dnat(Target::OneOf(webs())),
    )];
    for port in 41001..41015 {
        steps.push(send(
            tcp(from_client(port), ep(WEB), SYN, b""),
            Expect::Dnat(Target::SameAs(0)),
        ));
    }
    steps.push(Step::Stats(vec![
        (stat::NEW_FLOW, 15),
        (stat::AFFINITY_HIT, 14),
    ]));
    run_case(case(
        "affinity_sends_new_connections_to_the_same_backend",
        |dp| {
            three_webs(dp, service_flags::AFFINITY);
            dp.set_head(ep(WEB), TCP, |h| h.affinity_timeout_s = 100);
        },
        steps,
    ));
}

#[test]
fn live_affinity_entry_decides_the_backend() {
    run_case(case(
        "live_affinity_entry_decides_the_backend",
        |dp| {
            affinity_single(dp);
            dp.insert_affinity(ep(CLIENT).addr, 1, 2, Datapath::now_ns());
        },
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_2))),
            ),
            Step::Stats(vec![(stat::AFFINITY_HIT, 1)]),
        ],
    ));
}

/// An entry naming a backend that left the frontend's set (here: one that
/// still exists, active, for other Services) is not followed: membership is
/// checked in the datapath, as Cilium's LB_AFFINITY_MATCH.
#[test]
fn affinity_to_a_backend_no_longer_in_the_set_is_ignored() {
    run_case(case(
        "affinity_to_a_backend_no_longer_in_the_set_is_ignored",
        |dp| {
            affinity_single(dp);
            dp.insert_affinity(ep(CLIENT).addr, 1, 3, Datapath::now_ns());
        },
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            Step::Stats(vec![(stat::AFFINITY_HIT, 0)]),
        ],
    ));
}

#[test]
fn expired_affinity_entry_is_ignored() {
    run_case(case(
        "expired_affinity_entry_is_ignored",
        |dp| {
            affinity_single(dp);
            // Last used 101 s ago with a 100 s timeout.
            dp.insert_affinity(ep(CLIENT).addr, 1, 2, Datapath::now_ns() - 101_000_000_000);
        },
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            Step::Stats(vec![(stat::AFFINITY_HIT, 0)]),
        ],
    ));
}

#[test]
fn affinity_never_picks_a_standby_or_terminating_backend() {
    for (name, state, flags) in [
        ("affinity_never_picks_a_standby_backend", BACKEND_STANDBY, 0),
        (
            "affinity_never_picks_a_fallback_terminating_backend",
            lb_common::BACKEND_ACTIVE,
            backend_flags::FALLBACK,
        ),
    ] {
        run_case(case(
            name,
            move |dp| {
                affinity_single(dp);
                dp.set_backend_state(2, state, flags);
                dp.insert_affinity(ep(CLIENT).addr, 1, 2, Datapath::now_ns());
            },
            vec![send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            )],
        ));
    }
}

#[test]
fn affinity_off_ignores_entries() {
    run_case(case(
        "affinity_off_ignores_entries",
        |dp| {
            affinity_single(dp);
            dp.set_head(ep(WEB), TCP, |h| h.flags &= !service_flags::AFFINITY);
            dp.insert_affinity(ep(CLIENT).addr, 1, 2, Datapath::now_ns());
        },
        vec![send(
            tcp(ep(CLIENT), ep(WEB), SYN, b""),
            Expect::Dnat(Target::Exact(ep(WEB_1))),
        )],
    ));
}

#[test]
fn tcp_flow_on_a_standby_backend_continues() {
    run_case(case(
        "tcp_flow_on_a_standby_backend_continues",
        |dp| {
            three_webs(dp, 0);
            dp.frontend(ep(WEB), TCP, 1, &[1]);
        },
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            // The endpoint starts terminating: out of the slots, kept as standby.
            change(|dp| {
                dp.frontend(ep(WEB), TCP, 1, &[2]);
                dp.set_backend_state(1, BACKEND_STANDBY, 0);
            }),
            send(
                tcp(ep(CLIENT), ep(WEB), ACK, b"more"),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(from_client(40001), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_2))),
            ),
            Step::Stats(vec![(stat::ESTABLISHED, 1), (stat::FLOW_RESTARTED, 0)]),
        ],
    ));
}

#[test]
fn udp_flow_on_a_standby_backend_moves() {
    run_case(case(
        "udp_flow_on_a_standby_backend_moves",
        |dp| {
            dp.backend(4, ep(DNS_1), UDP);
            dp.backend(5, ep(DNS_2), UDP);
            dp.frontend(ep(DNS), UDP, 2, &[4]);
        },
        vec![
            send(
                udp(ep(CLIENT), ep(DNS), b"q1"),
                Expect::Dnat(Target::Exact(ep(DNS_1))),
            ),
            change(|dp| {
                dp.frontend(ep(DNS), UDP, 2, &[5]);
                dp.set_backend_state(4, BACKEND_STANDBY, 0);
            }),
            // Same source port (a resolver reusing it): the next query moves at once.
            send(
                udp(ep(CLIENT), ep(DNS), b"q2"),
                Expect::Dnat(Target::Exact(ep(DNS_2))),
            ),
            send(
                udp(ep(CLIENT), ep(DNS), b"q3"),
                Expect::Dnat(Target::Exact(ep(DNS_2))),
            ),
            Step::Stats(vec![(stat::FLOW_RESTARTED, 1), (stat::ESTABLISHED, 1)]),
        ],
    ));
}

#[test]
fn sctp_association_on_a_standby_backend_continues() {
    // As a TCP connection (and as kube-proxy, which clears only UDP flows
    // to departing endpoints): moved, the association would be aborted.
    const SCTP: u8 = lb_common::IPPROTO_SCTP;
    run_case(case(
        "sctp_association_on_a_standby_backend_continues",
        |dp| {
            dp.backend(4, ep(DNS_1), SCTP);
            dp.backend(5, ep(DNS_2), SCTP);
            dp.frontend(ep(DNS), SCTP, 2, &[4]);
        },
        vec![
            send(
                sctp(ep(CLIENT), ep(DNS), b"init"),
                Expect::Frame(sctp(ep(CLIENT), ep(DNS_1), b"init")),
            ),
            change(|dp| {
                dp.frontend(ep(DNS), SCTP, 2, &[5]);
                dp.set_backend_state(4, BACKEND_STANDBY, 0);
            }),
            send(
                sctp(ep(CLIENT), ep(DNS), b"data"),
                Expect::Frame(sctp(ep(CLIENT), ep(DNS_1), b"data")),
            ),
            // A new association goes to the endpoint that takes new flows.
            send(
                sctp(from_client(40001), ep(DNS), b"init"),
                Expect::Frame(sctp(from_client(40001), ep(DNS_2), b"init")),
            ),
            Step::Stats(vec![(stat::FLOW_RESTARTED, 0), (stat::ESTABLISHED, 1)]),
        ],
    ));
}

#[test]
fn new_syn_on_a_closed_tuple_is_a_new_connection() {
    run_case(case(
        "new_syn_on_a_closed_tuple_is_a_new_connection",
        |dp| {
            three_webs(dp, 0);
            dp.frontend(ep(WEB), TCP, 1, &[1]);
        },
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(ep(CLIENT), ep(WEB), Tcp { fin: true, ..ACK }, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            change(|dp| dp.frontend(ep(WEB), TCP, 1, &[2])),
            // The client reuses its port for a new connection: balanced anew.
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_2))),
            ),
            // A retransmitted SYN of a live (not closed) flow stays put.
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_2))),
            ),
            Step::Stats(vec![(stat::FLOW_RESTARTED, 1)]),
        ],
    ));
}

#[test]
fn maglev_frontend_picks_from_its_table() {
    run_case(case(
        "maglev_frontend_picks_from_its_table",
        |dp| {
            three_webs(dp, service_flags::MAGLEV);
            // A 7-entry table that only names backend 3.
            dp.maglev_table(1, &[3; 7]);
        },
        vec![
            send(
                tcp(from_client(41000), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_3))),
            ),
            send(
                tcp(from_client(41001), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_3))),
            ),
            Step::Stats(vec![(stat::MAGLEV, 2)]),
        ],
    ));
}

#[test]
fn maglev_maps_a_flow_to_the_same_backend_on_every_node() {
    // Two independent datapaths (two nodes) with the same table: every flow
    // must land on the same backend on both, and the table's spread shows.
    let table: Vec<u32> = (0..101).map(|i| [1, 2, 3][(i * 7 + i / 3) % 3]).collect();
    let nodes: Vec<Datapath> = (0..2)
        .map(|_| {
            let mut dp = Datapath::load();
            three_webs(&mut dp, service_flags::MAGLEV);
            dp.maglev_table(1, &table);
            dp
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for port in 42000..42060u16 {
        let frame = tcp(from_client(port), ep(WEB), SYN, b"");
        let a = nodes[0].run(Prog::Tc, &frame).1;
        let b = nodes[1].run(Prog::Xdp, &frame).1;
        assert_eq!(
            a[30..34],
            b[30..34],
            "flow from port {port} maps to one backend on both nodes"
        );
        seen.insert(a[33]);
    }
    assert_eq!(seen.len(), 3, "flows spread over every backend: {seen:?}");
}

/// While an upgrade or a takeover carries flows over (MIGRATING), a
/// mid-connection TCP packet with no conntrack entry is dropped for TCP to
/// resend, not balanced to another backend; a SYN and UDP are balanced as
/// ever, and a tracked flow is translated. Without the flag, the same
/// packet is balanced afresh (kube-proxy's loose pickup).
#[test]
fn mid_connection_packets_wait_while_flows_are_carried_over() {
    use lb_common::config_flags::MIGRATING;
    run_case(case(
        "mid_connection_packets_wait_while_flows_are_carried_over",
        |dp| {
            three_webs(dp, 0);
            dp.frontend(ep(WEB), TCP, 1, &[1]);
            dp.backend(4, ep(DNS_1), UDP);
            dp.frontend(ep(DNS), UDP, 2, &[4]);
            dp.set_config(|c| c.flags |= MIGRATING);
        },
        vec![
            send(
                tcp(from_client(42000), ep(WEB), ACK, b"data"),
                Expect::Dropped,
            ),
            send(
                tcp(from_client(42001), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(from_client(42001), ep(WEB), ACK, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                udp(from_client(42002), ep(DNS), b"q"),
                Expect::Dnat(Target::Exact(ep(DNS_1))),
            ),
            Step::Stats(vec![(stat::DROP_MIGRATING, 1)]),
            change(|dp| dp.set_config(|c| c.flags &= !MIGRATING)),
            send(
                tcp(from_client(42000), ep(WEB), ACK, b"data"),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            Step::Stats(vec![(stat::DROP_MIGRATING, 1)]),
        ],
    ));
}

/// The forward entry of the client's flow to WEB, with its key.
fn forward_entry(dp: &mut Datapath) -> (lb_common::CtKey, lb_common::CtValue) {
    dp.ct()
        .into_iter()
        .find(|(k, _)| k.dir == lb_common::CT_DIR_FORWARD && k.dst_port_be == 80u16.to_be())
        .expect("forward entry of the flow")
}

#[test]
fn conntrack_entries_are_written_once_a_second_unless_accounting_counts_every_packet() {
    for prog in [Prog::Tc, Prog::Xdp] {
        let mut dp = Datapath::load_for(&[prog]);
        three_webs(&mut dp, 0);
        let (verdict, _) = dp.run(prog, &tcp(ep(CLIENT), ep(WEB), SYN, b""));
        assert_ne!(verdict, Verdict::Drop, "{prog:?}: SYN balanced");
        let ack = tcp(ep(CLIENT), ep(WEB), ACK, b"x");
        // The first ACK is news (a TCP flag this direction had not seen).
        dp.run(prog, &ack);
        // Without accounting: a packet that changes nothing within the
        // entry's last-seen second leaves it unwritten (a marker in a field
        // every write recomputes shows it). A packet landing in the next
        // second writes it: try again then.
        let mut skipped = false;
        for _ in 0..5 {
            let (key, mut entry) = forward_entry(&mut dp);
            entry.lifetime_s = 12_345;
            let seen = entry.last_seen_ns;
            dp.insert_ct(key, entry);
            dp.run(prog, &ack);
            let (_, after) = forward_entry(&mut dp);
            if after.last_seen_ns / 1_000_000_000 != seen / 1_000_000_000 {
                // A new second: written, as it should be; measure again.
                assert_ne!(after.lifetime_s, 12_345, "{prog:?}: a new second writes");
                continue;
            }
            assert_eq!(
                after.lifetime_s, 12_345,
                "{prog:?}: same second, nothing new: not written"
            );
            assert_eq!(after.packets, 1, "{prog:?}: packets are not counted");
            skipped = true;
            break;
        }
        assert!(
            skipped,
            "{prog:?}: five tries all crossed a second boundary"
        );
        // With accounting: every packet counted.
        dp.set_config(|c| c.flags |= lb_common::config_flags::CT_ACCOUNTING);
        let before = forward_entry(&mut dp).1.packets;
        for _ in 0..3 {
            dp.run(prog, &ack);
        }
        assert_eq!(
            forward_entry(&mut dp).1.packets,
            before + 3,
            "{prog:?}: accounting counts"
        );
    }
}
