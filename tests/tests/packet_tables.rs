//! Packet-in / packet-out tables for lb's tc and XDP programs through
//! BPF_PROG_TEST_RUN. Each test is one case; `run_case` runs it on every
//! program it lists with fresh maps and names case, program and step on failure.

use lb_common::{Addr, CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, CtValue, ct_lifetime, stat};
use lb_common::{IPPROTO_TCP as TCP, IPPROTO_UDP as UDP};
use lb_tests::packet::*;

const CLIENT: &str = "10.0.0.5:40000";
const WEB: &str = "10.96.0.10:80";
const DNS: &str = "10.96.0.53:53";
const EMPTY: &str = "10.96.0.99:80";
const EMPTY_UDP: &str = "10.96.0.99:53";
const WEB_1: &str = "10.0.1.1:8080";
const WEB_2: &str = "10.0.1.2:8080";
const WEB_3: &str = "10.0.1.3:8080";
const DNS_1: &str = "10.0.2.1:5353";
const DNS_2: &str = "10.0.2.2:5353";

/// Three web backends, two DNS backends, and empty TCP/UDP frontends.
fn services(dp: &mut Datapath) {
    dp.backend(1, ep(WEB_1), TCP);
    dp.backend(2, ep(WEB_2), TCP);
    dp.backend(3, ep(WEB_3), TCP);
    dp.backend(4, ep(DNS_1), UDP);
    dp.backend(5, ep(DNS_2), UDP);
    dp.frontend(ep(WEB), TCP, 1, &[1, 2, 3]);
    dp.frontend(ep(DNS), UDP, 2, &[4, 5]);
    dp.frontend(ep(EMPTY), TCP, 3, &[]);
    dp.frontend(ep(EMPTY_UDP), UDP, 4, &[]);
}

/// One web frontend with only backend 1; backends 2 and 3 exist unused.
fn single_backend(dp: &mut Datapath) {
    dp.backend(1, ep(WEB_1), TCP);
    dp.backend(2, ep(WEB_2), TCP);
    dp.backend(3, ep(WEB_3), TCP);
    dp.frontend(ep(WEB), TCP, 1, &[1]);
}

fn webs() -> Vec<Ep> {
    vec![ep(WEB_1), ep(WEB_2), ep(WEB_3)]
}

fn case(name: &'static str, setup: fn(&mut Datapath), steps: Vec<Step>) -> Case {
    Case::on(BOTH, name, setup, steps)
}

fn from_client(port: u16) -> Ep {
    Ep { port, ..ep(CLIENT) }
}

// ---- forward translation -------------------------------------------------

#[test]
fn tcp_syn_to_frontend_is_dnated_to_a_backend() {
    run_case(case(
        "tcp_syn_to_frontend_is_dnated_to_a_backend",
        services,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::OneOf(webs())),
            ),
            counters(&[(stat::NEW_FLOW, 1)]),
        ],
    ));
}

#[test]
fn tcp_with_payload_is_dnated_with_payload_intact() {
    run_case(case(
        "tcp_with_payload_is_dnated_with_payload_intact",
        services,
        vec![send(
            tcp(
                ep(CLIENT),
                ep(WEB),
                ACK,
                b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
            ),
            Expect::Dnat(Target::OneOf(webs())),
        )],
    ));
}

#[test]
fn udp_to_frontend_is_dnated_to_a_backend() {
    run_case(case(
        "udp_to_frontend_is_dnated_to_a_backend",
        services,
        vec![send(
            udp(ep(CLIENT), ep(DNS), b"\x12\x34query"),
            Expect::Dnat(Target::OneOf(vec![ep(DNS_1), ep(DNS_2)])),
        )],
    ));
}

#[test]
fn udp_zero_checksum_stays_zero() {
    run_case(case(
        "udp_zero_checksum_stays_zero",
        services,
        vec![send(
            udp_no_csum(ep(CLIENT), ep(DNS), b"no checksum here"),
            Expect::Dnat(Target::OneOf(vec![ep(DNS_1), ep(DNS_2)])),
        )],
    ));
}

#[test]
fn tcp_with_ip_options_is_dnated_and_options_kept() {
    let frame = with_ip_options(&tcp(ep(CLIENT), ep(WEB), SYN, b""), &[1, 1, 1, 0]);
    run_case(case(
        "tcp_with_ip_options_is_dnated_and_options_kept",
        services,
        vec![send(frame, Expect::Dnat(Target::OneOf(webs())))],
    ));
}

#[test]
fn backend_on_another_port_of_the_same_address() {
    run_case(case(
        "backend_on_another_port_of_the_same_address",
        |dp| {
            dp.backend(7, ep("10.96.0.10:8443"), TCP);
            dp.frontend(ep("10.96.0.10:443"), TCP, 9, &[7]);
        },
        vec![send(
            tcp(ep(CLIENT), ep("10.96.0.10:443"), SYN, b""),
            Expect::Dnat(Target::Exact(ep("10.96.0.10:8443"))),
        )],
    ));
}

#[test]
fn new_flows_are_spread_over_every_backend() {
    let mut steps: Vec<Step> = (0..60)
        .map(|i| {
            send(
                tcp(from_client(41000 + i), ep(WEB), SYN, b""),
                Expect::Dnat(Target::OneOf(webs())),
            )
        })
        .collect();
    steps.push(change(|dp| {
        let mut used: Vec<u32> = dp
            .ct()
            .iter()
            .filter(|(k, _)| k.dir == CT_DIR_FORWARD)
            .map(|(_, v)| v.backend_id)
            .collect();
        used.sort();
        used.dedup();
        // 60 random picks missing one of 3 backends: p = 3 * (2/3)^60 < 1e-10.
        assert_eq!(
            used,
            vec![1, 2, 3],
            "random selection must reach every slot"
        );
    }));
    steps.push(counters(&[(stat::NEW_FLOW, 60)]));
    run_case(case(
        "new_flows_are_spread_over_every_backend",
        services,
        steps,
    ));
}

// ---- conntrack -----------------------------------------------------------

#[test]
fn tcp_flow_sticks_to_its_backend() {
    let mut steps = vec![send(
        tcp(ep(CLIENT), ep(WEB), SYN, b""),
        Expect::Dnat(Target::OneOf(webs())),
    )];
    for i in 0..8 {
        steps.push(send(
            tcp(ep(CLIENT), ep(WEB), ACK, format!("segment {i}").as_bytes()),
            Expect::Dnat(Target::SameAs(0)),
        ));
    }
    steps.push(counters(&[(stat::NEW_FLOW, 1), (stat::ESTABLISHED, 8)]));
    run_case(case("tcp_flow_sticks_to_its_backend", services, steps));
}

#[test]
fn udp_flow_sticks_to_its_backend() {
    let mut steps = vec![send(
        udp(ep(CLIENT), ep(DNS), b"q1"),
        Expect::Dnat(Target::OneOf(vec![ep(DNS_1), ep(DNS_2)])),
    )];
    for _ in 0..8 {
        steps.push(send(
            udp(ep(CLIENT), ep(DNS), b"q2"),
            Expect::Dnat(Target::SameAs(0)),
        ));
    }
    run_case(case("udp_flow_sticks_to_its_backend", services, steps));
}

#[test]
fn flow_keeps_backend_when_backend_set_changes() {
    run_case(case(
        "flow_keeps_backend_when_backend_set_changes",
        single_backend,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            // Backend 1 leaves the frontend's set but still exists.
            change(|dp| dp.frontend(ep(WEB), TCP, 1, &[2, 3])),
            send(
                tcp(ep(CLIENT), ep(WEB), ACK, b"x"),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            // A new flow only sees the new set.
            send(
                tcp(from_client(40001), ep(WEB), SYN, b""),
                Expect::Dnat(Target::OneOf(vec![ep(WEB_2), ep(WEB_3)])),
            ),
        ],
    ));
}

#[test]
fn flow_is_rebalanced_when_its_backend_is_removed() {
    run_case(case(
        "flow_is_rebalanced_when_its_backend_is_removed",
        single_backend,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            change(|dp| {
                dp.frontend(ep(WEB), TCP, 1, &[2]);
                dp.remove_backend(1);
            }),
            send(
                tcp(ep(CLIENT), ep(WEB), ACK, b"x"),
                Expect::Dnat(Target::Exact(ep(WEB_2))),
            ),
            counters(&[(stat::BACKEND_REPLACED, 1), (stat::NEW_FLOW, 2)]),
        ],
    ));
}

#[test]
fn expired_conntrack_entry_is_not_used() {
    run_case(case(
        "expired_conntrack_entry_is_not_used",
        single_backend,
        vec![
            // A stale forward entry pointing at backend 2, dead since boot.
            change(|dp| {
                let key = CtKey {
                    src_addr_be: Addr::v4(u32::from_ne_bytes([10, 0, 0, 5])),
                    dst_addr_be: Addr::v4(u32::from_ne_bytes([10, 96, 0, 10])),
                    src_port_be: 40000u16.to_be(),
                    dst_port_be: 80u16.to_be(),
                    proto: TCP,
                    dir: CT_DIR_FORWARD,
                    _pad: [0; 2],
                };
                let value = CtValue {
                    backend_id: 2,
                    last_seen_ns: 0,
                    lifetime_s: 1,
                    ..Default::default()
                };
                dp.insert_ct(key, value);
            }),
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            counters(&[(stat::NEW_FLOW, 1), (stat::ESTABLISHED, 0)]),
        ],
    ));
}

#[test]
fn conntrack_records_both_directions() {
    run_case(case(
        "conntrack_records_both_directions",
        single_backend,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            change(|dp| {
                let ct = dp.ct();
                assert_eq!(ct.len(), 2, "forward and reply entries: {ct:?}");
                let (fk, fv) = ct
                    .iter()
                    .find(|(k, _)| k.dir == CT_DIR_FORWARD)
                    .expect("forward");
                let (rk, rv) = ct
                    .iter()
                    .find(|(k, _)| k.dir == CT_DIR_REPLY)
                    .expect("reply");
                assert_eq!(fk.dst_port_be, 80u16.to_be());
                assert_eq!((fv.backend_id, fv.rev_nat_id), (1, 1));
                assert_eq!(fv.nat_addr_be, Addr::v4(u32::from_ne_bytes([10, 0, 1, 1])));
                assert_eq!(fv.nat_port_be, 8080u16.to_be());
                assert_eq!(fv.lifetime_s, ct_lifetime::TCP_SYN);
                assert_eq!(rk.src_addr_be, Addr::v4(u32::from_ne_bytes([10, 0, 1, 1])));
                assert_eq!(rk.dst_port_be, 40000u16.to_be());
                assert_eq!(
                    rv.nat_addr_be,
                    Addr::v4(u32::from_ne_bytes([10, 96, 0, 10]))
                );
                assert_eq!(rv.nat_port_be, 80u16.to_be());
            }),
        ],
    ));
}

#[test]
fn tcp_lifetime_follows_handshake_and_close() {
    let lifetime_of = |dp: &mut Datapath| {
        dp.ct()
            .iter()
            .find(|(k, _)| k.dir == CT_DIR_FORWARD)
            .expect("forward entry")
            .1
            .lifetime_s
    };
    run_case(case(
        "tcp_lifetime_follows_handshake_and_close",
        single_backend,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(
                    ep(WEB_1),
                    ep(CLIENT),
                    Tcp {
                        syn: true,
                        ack: Some(1001),
                        ..ACK
                    },
                    b"",
                ),
                Expect::RevNat(ep(WEB)),
            ),
            change(move |dp| assert_eq!(lifetime_of(dp), ct_lifetime::TCP_ESTABLISHED)),
            // The client half-closes; the backend goes on sending: the
            // flow is not cut short (netfilter's CLOSE_WAIT, kube-proxy's 1 h).
            send(
                tcp(ep(CLIENT), ep(WEB), Tcp { fin: true, ..ACK }, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            change(move |dp| assert_eq!(lifetime_of(dp), ct_lifetime::TCP_HALF_CLOSED)),
            send(
                tcp(ep(WEB_1), ep(CLIENT), ACK, b"more data"),
                Expect::RevNat(ep(WEB)),
            ),
            change(move |dp| assert_eq!(lifetime_of(dp), ct_lifetime::TCP_HALF_CLOSED)),
            // Both sides closed: TIME_WAIT.
            send(
                tcp(ep(WEB_1), ep(CLIENT), Tcp { fin: true, ..ACK }, b""),
                Expect::RevNat(ep(WEB)),
            ),
            change(move |dp| assert_eq!(lifetime_of(dp), ct_lifetime::TCP_TIME_WAIT)),
            send(
                tcp(ep(CLIENT), ep(WEB), Tcp { rst: true, ..ACK }, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            change(move |dp| assert_eq!(lifetime_of(dp), ct_lifetime::TCP_CLOSED)),
        ],
    ));
}

#[test]
fn udp_lifetime_grows_once_answered() {
    let lifetimes =
        |dp: &mut Datapath| -> Vec<u32> { dp.ct().iter().map(|(_, v)| v.lifetime_s).collect() };
    run_case(case(
        "udp_lifetime_grows_once_answered",
        |dp| {
            dp.backend(4, ep(DNS_1), UDP);
            dp.frontend(ep(DNS), UDP, 2, &[4]);
        },
        vec![
            send(
                udp(ep(CLIENT), ep(DNS), b"query"),
                Expect::Dnat(Target::Exact(ep(DNS_1))),
            ),
            change(move |dp| assert_eq!(lifetimes(dp), vec![ct_lifetime::OTHER_UNREPLIED; 2])),
            send(
                udp(ep(DNS_1), ep(CLIENT), b"answer"),
                Expect::RevNat(ep(DNS)),
            ),
            change(move |dp| assert_eq!(lifetimes(dp), vec![ct_lifetime::OTHER_REPLIED; 2])),
        ],
    ));
}

#[test]
fn a_reused_backend_id_does_not_carry_old_flows() {
    // The flow's backend id comes to name another address (the agent
    // freed the id and handed it out again): the flow is balanced afresh.
    run_case(case(
        "a_reused_backend_id_does_not_carry_old_flows",
        single_backend,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            change(|dp| {
                dp.backend(1, ep(WEB_2), TCP);
            }),
            send(
                tcp(ep(CLIENT), ep(WEB), ACK, b""),
                Expect::Dnat(Target::Exact(ep(WEB_2))),
            ),
            counters(&[(stat::BACKEND_REPLACED, 1)]),
        ],
    ));
}

// ---- replies -------------------------------------------------------------

#[test]
fn tcp_reply_is_reverse_translated() {
    run_case(case(
        "tcp_reply_is_reverse_translated",
        single_backend,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(
                    ep(WEB_1),
                    ep(CLIENT),
                    Tcp {
                        syn: true,
                        ack: Some(1001),
                        ..ACK
                    },
                    b"",
                ),
                Expect::RevNat(ep(WEB)),
            ),
            send(
                tcp(ep(WEB_1), ep(CLIENT), ACK, b"HTTP/1.1 200 OK\r\n"),
                Expect::RevNat(ep(WEB)),
            ),
            counters(&[(stat::REPLY, 2)]),
        ],
    ));
}

#[test]
fn udp_reply_is_reverse_translated() {
    run_case(case(
        "udp_reply_is_reverse_translated",
        |dp| {
            dp.backend(4, ep(DNS_1), UDP);
            dp.frontend(ep(DNS), UDP, 2, &[4]);
        },
        vec![
            send(
                udp(ep(CLIENT), ep(DNS), b"query"),
                Expect::Dnat(Target::Exact(ep(DNS_1))),
            ),
            send(
                udp(ep(DNS_1), ep(CLIENT), b"answer"),
                Expect::RevNat(ep(DNS)),
            ),
            send(
                udp_no_csum(ep(DNS_1), ep(CLIENT), b"answer"),
                Expect::RevNat(ep(DNS)),
            ),
        ],
    ));
}

#[test]
fn packet_from_backend_without_flow_is_untouched() {
    run_case(case(
        "packet_from_backend_without_flow_is_untouched",
        services,
        vec![
            send(tcp(ep(WEB_1), ep(CLIENT), ACK, b"hello"), Expect::Unchanged),
            counters(&[(stat::PASS_NOT_FRONTEND, 1), (stat::REPLY, 0)]),
        ],
    ));
}

#[test]
fn reply_to_another_client_port_is_untouched() {
    run_case(case(
        "reply_to_another_client_port_is_untouched",
        single_backend,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(ep(WEB_1), from_client(40001), ACK, b""),
                Expect::Unchanged,
            ),
        ],
    ));
}

// ---- rejects -------------------------------------------------------------

#[test]
fn tcp_syn_to_frontend_without_backends_gets_rst_ack() {
    run_case(case(
        "tcp_syn_to_frontend_without_backends_gets_rst_ack",
        services,
        vec![
            // RFC 9293: no ACK in the offending segment -> seq 0, ack = seq + len (+1 for SYN).
            send(
                tcp(ep(CLIENT), ep(EMPTY), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            counters(&[(stat::REJECT_TCP_RST, 1)]),
        ],
    ));
}

#[test]
fn tcp_ack_to_frontend_without_backends_gets_rst_at_its_ack() {
    run_case(case(
        "tcp_ack_to_frontend_without_backends_gets_rst_at_its_ack",
        services,
        vec![send(
            tcp(
                ep(CLIENT),
                ep(EMPTY),
                Tcp {
                    ack: Some(777),
                    ..ACK
                },
                b"data",
            ),
            Expect::TcpRst {
                seq: 777,
                ack: None,
            },
        )],
    ));
}

#[test]
fn tcp_rst_to_frontend_without_backends_is_dropped_unanswered() {
    run_case(case(
        "tcp_rst_to_frontend_without_backends_is_dropped_unanswered",
        services,
        vec![
            send(
                tcp(ep(CLIENT), ep(EMPTY), Tcp { rst: true, ..ACK }, b""),
                Expect::Dropped,
            ),
            counters(&[(stat::DROP_NO_BACKEND, 1), (stat::REJECT_TCP_RST, 0)]),
        ],
    ));
}

#[test]
fn udp_to_frontend_without_backends_gets_icmp_port_unreachable() {
    run_case(case(
        "udp_to_frontend_without_backends_gets_icmp_port_unreachable",
        services,
        vec![
            send(
                udp(ep(CLIENT), ep(EMPTY_UDP), b"query payload"),
                Expect::IcmpPortUnreachable,
            ),
            counters(&[(stat::REJECT_ICMP, 1)]),
        ],
    ));
}

#[test]
fn icmp_unreachable_quotes_ip_options() {
    let frame = with_ip_options(
        &udp(ep(CLIENT), ep(EMPTY_UDP), b"x"),
        &[1, 1, 1, 0, 1, 1, 1, 0],
    );
    run_case(case(
        "icmp_unreachable_quotes_ip_options",
        services,
        vec![send(frame, Expect::IcmpPortUnreachable)],
    ));
}

#[test]
fn frontend_emptied_later_rejects_new_flows() {
    run_case(case(
        "frontend_emptied_later_rejects_new_flows",
        single_backend,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            change(|dp| dp.frontend(ep(WEB), TCP, 1, &[])),
            send(
                tcp(from_client(40001), ep(WEB), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
        ],
    ));
}

// ---- not ours: passed byte-identical --------------------------------------

fn passes(name: &'static str, frame: Vec<u8>, reason: u32) {
    run_case(case(
        name,
        services,
        vec![send(frame, Expect::Unchanged), counters(&[(reason, 1)])],
    ));
}

#[test]
fn other_port_on_frontend_address_passes() {
    passes(
        "other_port_on_frontend_address_passes",
        tcp(ep(CLIENT), ep("10.96.0.10:81"), SYN, b""),
        stat::PASS_NOT_FRONTEND,
    );
}

#[test]
fn unrelated_address_passes() {
    passes(
        "unrelated_address_passes",
        tcp(ep(CLIENT), ep("192.0.2.1:80"), SYN, b""),
        stat::PASS_NOT_FRONTEND,
    );
}

#[test]
fn udp_to_tcp_only_frontend_passes() {
    passes(
        "udp_to_tcp_only_frontend_passes",
        udp(ep(CLIENT), ep(WEB), b"x"),
        stat::PASS_NOT_FRONTEND,
    );
}

#[test]
fn arp_passes() {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&[10, 0, 0, 5, 0, 0, 0, 0, 0, 0, 10, 96, 0, 10]);
    passes("arp_passes", frame, stat::PASS_NOT_IP);
}

#[test]
fn ipv6_not_a_frontend_passes() {
    let b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(40000, 80, 1, 1000)
        .syn();
    let mut frame = Vec::new();
    b.write(&mut frame, b"").unwrap();
    passes("ipv6_not_a_frontend_passes", frame, stat::PASS_NOT_FRONTEND);
}

#[test]
fn vlan_tagged_frame_passes() {
    let plain = tcp(ep(CLIENT), ep(WEB), SYN, b"");
    let mut frame = plain[..12].to_vec();
    frame.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    frame.extend_from_slice(&plain[12..]);
    passes("vlan_tagged_frame_passes", frame, stat::PASS_NOT_IP);
}

#[test]
fn icmp_echo_to_frontend_passes() {
    let b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC)
        .ipv4([10, 0, 0, 5], [10, 96, 0, 10], 64)
        .icmpv4_echo_request(1, 1);
    let mut frame = Vec::new();
    b.write(&mut frame, b"ping").unwrap();
    passes(
        "icmp_echo_to_frontend_passes",
        frame,
        stat::PASS_OTHER_PROTO,
    );
}

// Fragments are translated like their datagram: see packet_paths.rs.

// ---- malformed: passed byte-identical, never translated --------------------

#[test]
fn truncated_tcp_header_passes() {
    let full = tcp(ep(CLIENT), ep(WEB), SYN, b"");
    passes(
        "truncated_tcp_header_passes",
        full[..14 + 20 + 10].to_vec(),
        stat::MALFORMED,
    );
}

#[test]
fn frame_shorter_than_ip_header_passes() {
    let full = tcp(ep(CLIENT), ep(WEB), SYN, b"");
    // XDP only: BPF_PROG_TEST_RUN refuses an skb whose IPv4 header is cut
    // (EINVAL), so the tc program cannot be fed this frame here.
    run_case(Case {
        programs: &[Prog::Xdp],
        ..case(
            "frame_shorter_than_ip_header_passes",
            services,
            vec![
                send(full[..24].to_vec(), Expect::Unchanged),
                counters(&[(stat::MALFORMED, 1)]),
            ],
        )
    });
}

#[test]
fn ihl_below_five_passes() {
    let frame = patch_ip(&tcp(ep(CLIENT), ep(WEB), SYN, b""), 0, &[0x44]);
    passes("ihl_below_five_passes", frame, stat::MALFORMED);
}

#[test]
fn total_length_past_frame_end_passes() {
    let frame = patch_ip(&tcp(ep(CLIENT), ep(WEB), SYN, b""), 2, &[0x05, 0xdc]);
    passes("total_length_past_frame_end_passes", frame, stat::MALFORMED);
}

#[test]
fn total_length_below_header_passes() {
    let frame = patch_ip(&udp(ep(CLIENT), ep(DNS), b"x"), 2, &[0x00, 0x10]);
    passes("total_length_below_header_passes", frame, stat::MALFORMED);
}

#[test]
fn ip_version_not_four_passes() {
    let frame = patch_ip(&udp(ep(CLIENT), ep(DNS), b"x"), 0, &[0x65]);
    passes("ip_version_not_four_passes", frame, stat::MALFORMED);
}

#[test]
fn tcp_data_offset_too_small_passes() {
    let mut frame = tcp(ep(CLIENT), ep(WEB), SYN, b"");
    frame[14 + 20 + 12] = 0x40;
    passes("tcp_data_offset_too_small_passes", frame, stat::MALFORMED);
}

#[test]
fn udp_length_past_datagram_passes() {
    let mut frame = udp(ep(CLIENT), ep(DNS), b"x");
    frame[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    passes("udp_length_past_datagram_passes", frame, stat::MALFORMED);
}

#[test]
fn ethernet_padding_is_kept() {
    // A 60-byte minimum frame carrying a short UDP datagram: trailing padding
    // is not part of the datagram and must come out untouched.
    let mut frame = udp(ep(CLIENT), ep(DNS), b"q");
    frame.resize(60, 0);
    run_case(case(
        "ethernet_padding_is_kept",
        services,
        vec![send(
            frame,
            Expect::Dnat(Target::OneOf(vec![ep(DNS_1), ep(DNS_2)])),
        )],
    ));
}

#[test]
fn backend_state_is_read_from_the_backend_map() {
    // Sanity for the shared layout: a backend written by user space is what
    // the program translates to, byte for byte.
    run_case(case(
        "backend_state_is_read_from_the_backend_map",
        |dp| {
            dp.backend(42, ep("172.16.5.4:65535"), UDP);
            dp.frontend(ep("10.96.200.1:1"), UDP, 77, &[42]);
        },
        vec![send(
            udp(ep(CLIENT), ep("10.96.200.1:1"), b"x"),
            Expect::Dnat(Target::Exact(ep("172.16.5.4:65535"))),
        )],
    ));
}

// ---- Service IP semantics --------------------------------------------------

#[test]
fn undeclared_tcp_port_on_service_ip_gets_rst() {
    run_case(case(
        "undeclared_tcp_port_on_service_ip_gets_rst",
        |dp| {
            services(dp);
            dp.address_only(ep(WEB).addr);
        },
        vec![
            send(
                tcp(ep(CLIENT), ep("10.96.0.10:81"), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            // The declared port still works.
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::OneOf(webs())),
            ),
            counters(&[(stat::REJECT_UNDECLARED, 1), (stat::REJECT_TCP_RST, 1)]),
        ],
    ));
}

#[test]
fn undeclared_udp_protocol_on_service_ip_gets_icmp() {
    run_case(case(
        "undeclared_udp_protocol_on_service_ip_gets_icmp",
        |dp| {
            services(dp);
            dp.address_only(ep(WEB).addr);
        },
        vec![
            send(udp(ep(CLIENT), ep(WEB), b"x"), Expect::IcmpPortUnreachable),
            counters(&[(stat::REJECT_UNDECLARED, 1), (stat::REJECT_ICMP, 1)]),
        ],
    ));
}

#[test]
fn reply_to_service_ip_client_is_not_rejected() {
    // A reply whose destination is a Service IP address entry must still be
    // reverse-translated: conntrack is consulted before the address entry.
    run_case(case(
        "reply_to_service_ip_client_is_not_rejected",
        |dp| {
            single_backend(dp);
            dp.address_only(ep(WEB).addr);
        },
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(ep(WEB_1), ep(CLIENT), ACK, b""),
                Expect::RevNat(ep(WEB)),
            ),
        ],
    ));
}

#[test]
fn drop_if_empty_frontend_drops_silently() {
    run_case(case(
        "drop_if_empty_frontend_drops_silently",
        |dp| {
            dp.frontend_with_flags(
                ep(WEB),
                TCP,
                1,
                &[],
                lb_common::service_flags::DROP_IF_EMPTY,
            )
        },
        vec![
            send(tcp(ep(CLIENT), ep(WEB), SYN, b""), Expect::Dropped),
            counters(&[(stat::DROP_NO_BACKEND, 1), (stat::REJECT_TCP_RST, 0)]),
        ],
    ));
}

#[test]
fn hairpin_flow_is_source_translated_both_ways() {
    const POD: &str = "10.0.1.1:40000";
    const HAIRPIN: &str = "169.254.42.1:40000";
    run_case(case(
        "hairpin_flow_is_source_translated_both_ways",
        |dp| {
            single_backend(dp);
            dp.set_hairpin_addr(ep(HAIRPIN).v4());
        },
        vec![
            send(
                tcp(ep(POD), ep(WEB), SYN, b""),
                Expect::Nat {
                    src: ep(HAIRPIN),
                    dst: ep(WEB_1),
                },
            ),
            send(
                tcp(
                    ep(WEB_1),
                    ep(HAIRPIN),
                    Tcp {
                        syn: true,
                        ack: Some(1001),
                        ..ACK
                    },
                    b"",
                ),
                Expect::Nat {
                    src: ep(WEB),
                    dst: ep(POD),
                },
            ),
            send(
                tcp(ep(POD), ep(WEB), ACK, b"GET /"),
                Expect::Nat {
                    src: ep(HAIRPIN),
                    dst: ep(WEB_1),
                },
            ),
            counters(&[(stat::HAIRPIN, 1), (stat::REPLY, 1), (stat::ESTABLISHED, 1)]),
            change(|dp| {
                let fwd = dp
                    .ct()
                    .into_iter()
                    .find(|(k, _)| k.dir == CT_DIR_FORWARD)
                    .unwrap()
                    .1;
                assert_eq!(
                    fwd.lifetime_s,
                    ct_lifetime::TCP_ESTABLISHED,
                    "reply seen reached the forward entry"
                );
            }),
        ],
    ));
}

#[test]
fn hairpin_without_configured_address_keeps_source() {
    run_case(case(
        "hairpin_without_configured_address_keeps_source",
        single_backend,
        vec![send(
            tcp(ep("10.0.1.1:40000"), ep(WEB), SYN, b""),
            Expect::Dnat(Target::Exact(ep(WEB_1))),
        )],
    ));
}

#[test]
fn direct_connection_reusing_a_closed_flows_tuple_is_not_hijacked() {
    let syn_ack = Tcp {
        syn: true,
        ack: Some(1001),
        ..ACK
    };
    let rst = Tcp { rst: true, ..ACK };
    run_case(case(
        "direct_connection_reusing_a_closed_flows_tuple_is_not_hijacked",
        single_backend,
        vec![
            // A connection through the Service, answered, then reset.
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(ep(WEB_1), ep(CLIENT), syn_ack, b""),
                Expect::RevNat(ep(WEB)),
            ),
            send(
                tcp(ep(CLIENT), ep(WEB), rst, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            // The client reaches the backend directly from the same port:
            // the backend's SYN-ACK must not be rewritten to the Service.
            send(tcp(ep(CLIENT), ep(WEB_1), SYN, b""), Expect::Unchanged),
            send(tcp(ep(WEB_1), ep(CLIENT), syn_ack, b""), Expect::Unchanged),
        ],
    ));
}

// ---- SCTP ------------------------------------------------------------------

const SCTP: u8 = lb_common::IPPROTO_SCTP;

/// SCTP Services (the kernel here has no SCTP, so these tables are the
/// test): the frontend's port differs from the backend's, so the CRC32c
/// must be fixed each way. Exact frames: the expected ones carry a CRC
/// computed from scratch by the harness; the program's incremental fix
/// must produce the same bytes. IPv4 and IPv6, tc and XDP.
#[test]
fn sctp_is_translated_with_its_crc32c_fixed_both_ways() {
    for (client, frontend, backend, empty) in [
        (
            "10.0.0.5:40000",
            "10.96.0.38:38",
            "10.0.3.1:3868",
            "10.96.0.39:38",
        ),
        (
            "[fd00::5]:40000",
            "[fd00:96::38]:38",
            "[fd00:3::1]:3868",
            "[fd00:96::39]:38",
        ),
    ] {
        let (client, frontend, backend, empty) = (ep(client), ep(frontend), ep(backend), ep(empty));
        let setup = move |dp: &mut Datapath| {
            dp.backend(6, backend, SCTP);
            dp.frontend(frontend, SCTP, 5, &[6]);
            dp.frontend(empty, SCTP, 7, &[]);
        };
        let payload: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        run_case(Case::on(
            BOTH,
            "sctp_is_translated_with_its_crc32c_fixed_both_ways",
            setup,
            vec![
                send(
                    sctp(client, frontend, &payload),
                    Expect::Frame(sctp(client, backend, &payload)),
                ),
                send(
                    sctp(backend, client, b"answer"),
                    Expect::Frame(sctp(frontend, client, b"answer")),
                ),
                // A later packet of the association: the flow decides.
                send(
                    sctp(client, frontend, b"more"),
                    Expect::Frame(sctp(client, backend, b"more")),
                ),
                // A CRC not computed yet (offloaded: zero) stays zero, for
                // the device that computes it over the new port.
                send(
                    zero_crc(&sctp(client, frontend, b"offloaded")),
                    Expect::Frame(zero_crc(&sctp(client, backend, b"offloaded"))),
                ),
                // No endpoint: refused as kube-proxy does for SCTP (ICMP).
                send(sctp(client, empty, b"init"), Expect::IcmpPortUnreachable),
                counters(&[
                    (stat::NEW_FLOW, 1),
                    (stat::ESTABLISHED, 2),
                    (stat::REPLY, 1),
                ]),
            ],
        ));
    }
}

/// `frame` (an SCTP frame from the builder) with its CRC32c field zeroed,
/// as a packet whose CRC the device computes is until it leaves.
fn zero_crc(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let l4 = if f[12..14] == [0x86, 0xdd] {
        14 + 40
    } else {
        14 + ((f[14] & 0x0f) as usize) * 4
    };
    f[l4 + 8..l4 + 12].fill(0);
    f
}
