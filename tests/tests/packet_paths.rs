//! Packet tables for replies that come back another way than they left, and
//! for flows whose reply tuples would clash.
//!
//! A reply is restored by the reply-only programs wherever it arrives: on
//! the ingress of a device that is neither a pod device nor in --devices (a
//! second NIC, an overlay, a tunnel), and on a pod device's egress, the last
//! hop before the client pod. Those programs never balance nor refuse.

use std::net::IpAddr;

use lb_common::{
    IPPROTO_TCP as TCP, IPPROTO_UDP as UDP, backend_flags, config_flags, frontend_kind, stat,
};
use lb_tests::packet::*;

const CLIENT: &str = "10.1.1.2:40000";
const WEB: &str = "10.96.0.10:80";
const WEB_2: &str = "10.96.0.11:80";
const DNS: &str = "10.96.0.10:53";
const DNS_2: &str = "10.96.0.11:53";
/// The only endpoint, a pod on another node.
const POD_B: &str = "10.1.2.2:8080";
const POD_B_DNS: &str = "10.1.2.2:5353";
const CLIENT6: &str = "[fd00:1:1::2]:40000";
const WEB6: &str = "[fd00:96::10]:80";
const POD_B6: &str = "[fd00:1:2::2]:8080";
const SNAT_PORT: u16 = 61_000;
const HAIRPIN: &str = "169.254.42.1";

const SYN_ACK: Tcp = Tcp {
    syn: true,
    ack: Some(1001),
    fin: false,
    rst: false,
    seq: 5000,
};

/// One port in the allocation range, so the port a flow gets is known.
fn one_port_range(dp: &mut Datapath) {
    dp.set_config(|c| {
        c.snat_port_min = SNAT_PORT;
        c.snat_port_max = SNAT_PORT;
        c.hairpin_snat_addr4 = be32(HAIRPIN.parse::<IpAddr>().unwrap());
    });
}

/// web (TCP 80) and dns (UDP 53) on 10.96.0.10 and, sharing the same
/// backends, 10.96.0.11; web on fd00:96::10.
fn services(dp: &mut Datapath) {
    one_port_range(dp);
    dp.backend(1, ep(POD_B), TCP);
    dp.backend(2, ep(POD_B_DNS), UDP);
    dp.backend(3, ep(POD_B6), TCP);
    dp.frontend(ep(WEB), TCP, 1, &[1]);
    dp.frontend(ep(DNS), UDP, 2, &[2]);
    dp.frontend(ep(WEB_2), TCP, 3, &[1]);
    dp.frontend(ep(DNS_2), UDP, 4, &[2]);
    dp.frontend(ep(WEB6), TCP, 5, &[3]);
    dp.address_only(ep(WEB).addr);
}

fn with_port(at: &str, port: u16) -> Ep {
    Ep { port, ..ep(at) }
}

#[test]
fn replies_are_restored_on_any_device_and_into_the_pod() {
    run_case(Case::on(
        REPLY_ONLY,
        "replies_are_restored_on_any_device_and_into_the_pod",
        services,
        vec![
            send_on(
                Prog::Tc,
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(POD_B))),
            ),
            send(
                tcp(ep(POD_B), ep(CLIENT), SYN_ACK, b""),
                Expect::RevNat(ep(WEB)),
            ),
            send(
                tcp(ep(POD_B), ep(CLIENT), ACK, b"payload"),
                Expect::RevNat(ep(WEB)),
            ),
            send_on(
                Prog::Tc,
                udp(ep(CLIENT), ep(DNS), b"query"),
                Expect::Dnat(Target::Exact(ep(POD_B_DNS))),
            ),
            send(
                udp(ep(POD_B_DNS), ep(CLIENT), b"answer"),
                Expect::RevNat(ep(DNS)),
            ),
            send_on(
                Prog::Tc,
                tcp(ep(CLIENT6), ep(WEB6), SYN, b""),
                Expect::Dnat(Target::Exact(ep(POD_B6))),
            ),
            send(
                tcp(ep(POD_B6), ep(CLIENT6), SYN_ACK, b""),
                Expect::RevNat(ep(WEB6)),
            ),
            counters(&[(stat::NEW_FLOW, 3), (stat::REPLY, 4)]),
        ],
    ));
}

#[test]
fn reply_only_programs_never_balance_nor_refuse() {
    run_case(Case::on(
        REPLY_ONLY,
        "reply_only_programs_never_balance_nor_refuse",
        |dp| {
            services(dp);
            dp.set_config(|c| c.flags |= config_flags::ECHO_REPLY);
        },
        vec![
            send(tcp(ep(CLIENT), ep(WEB), SYN, b""), Expect::Unchanged),
            send(udp(ep(CLIENT), ep(DNS), b"query"), Expect::Unchanged),
            // An undeclared port of a Service IP, a ping of it.
            send(
                udp(ep(CLIENT), with_port(WEB, 9999), b"x"),
                Expect::Unchanged,
            ),
            send(
                echo_request(ep(CLIENT).v4(), ep(WEB).v4(), 1, 1, b"ping"),
                Expect::Unchanged,
            ),
            counters(&[
                (stat::NEW_FLOW, 0),
                (stat::REJECT_ICMP, 0),
                (stat::REJECT_UNDECLARED, 0),
                (stat::ECHO_REPLY, 0),
            ]),
        ],
    ));
}

#[test]
fn a_restored_reply_is_not_translated_again() {
    // A local backend's reply is restored on its pod device's ingress; on
    // the client pod's egress it no longer matches a reply tuple.
    run_case(Case::on(
        &[Prog::TcToPod],
        "a_restored_reply_is_not_translated_again",
        services,
        vec![
            send_on(
                Prog::Tc,
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(POD_B))),
            ),
            send_on(
                Prog::Tc,
                tcp(ep(POD_B), ep(CLIENT), SYN_ACK, b""),
                Expect::RevNat(ep(WEB)),
            ),
            send(tcp(ep(WEB), ep(CLIENT), SYN_ACK, b""), Expect::Unchanged),
            counters(&[(stat::REPLY, 1)]),
        ],
    ));
}

/// A NodePort on this node's address whose only endpoint is POD_B on
/// another node: external flows to it are source-NATed to SNAT_PORT.
const NODE_PORT: &str = "192.168.50.1:30080";
const OUTSIDE: &str = "192.168.50.100:50000";

fn snat() -> Ep {
    with_port(NODE_PORT, SNAT_PORT)
}

fn remote_node_port(dp: &mut Datapath) {
    one_port_range(dp);
    dp.set_config(|c| c.nodeport_snat_addr4 = be32(ep(NODE_PORT).addr));
    dp.backend(1, ep(POD_B), TCP);
    dp.set_backend_state(1, 0, backend_flags::REMOTE);
    dp.external_frontend(ep(NODE_PORT), TCP, 1, &[1], frontend_kind::NODE_PORT);
}

#[test]
fn nodeport_snat_reply_is_restored_on_another_device() {
    let (node_port, snat, outside) = (ep(NODE_PORT), snat(), ep(OUTSIDE));
    run_case(Case::on(
        &[Prog::TcReply],
        "nodeport_snat_reply_is_restored_on_another_device",
        remote_node_port,
        vec![
            send_on(
                Prog::TcNode,
                tcp(outside, node_port, SYN, b""),
                Expect::Nat {
                    src: snat,
                    dst: ep(POD_B),
                },
            ),
            // The other node answers over a device that is not in --devices.
            send(
                tcp(ep(POD_B), snat, SYN_ACK, b""),
                Expect::Nat {
                    src: node_port,
                    dst: outside,
                },
            ),
        ],
    ));
}

/// One client port to two Services sharing a backend ip:port (Linux hands
/// out the same ephemeral port for different destinations): the second flow
/// gets another source port, and each keeps its own replies.
#[test]
fn one_client_port_to_two_services_sharing_a_backend() {
    let remapped = with_port(CLIENT, SNAT_PORT);
    let tcp_steps = vec![
        send(
            tcp(ep(CLIENT), ep(WEB), SYN, b""),
            Expect::Dnat(Target::Exact(ep(POD_B))),
        ),
        send(
            tcp(ep(CLIENT), ep(WEB_2), SYN, b""),
            Expect::Nat {
                src: remapped,
                dst: ep(POD_B),
            },
        ),
        counters(&[(stat::PORT_REMAPPED, 1), (stat::NEW_FLOW, 2)]),
        send(
            tcp(ep(POD_B), ep(CLIENT), SYN_ACK, b""),
            Expect::RevNat(ep(WEB)),
        ),
        send(
            tcp(ep(POD_B), remapped, SYN_ACK, b""),
            Expect::Nat {
                src: ep(WEB_2),
                dst: ep(CLIENT),
            },
        ),
        // Both flows go on with their own tuples.
        send(
            tcp(ep(CLIENT), ep(WEB_2), ACK, b"data"),
            Expect::Nat {
                src: remapped,
                dst: ep(POD_B),
            },
        ),
        send(
            tcp(ep(CLIENT), ep(WEB), ACK, b"data"),
            Expect::Dnat(Target::Exact(ep(POD_B))),
        ),
        counters(&[(stat::ESTABLISHED, 2), (stat::REPLY, 2)]),
    ];
    run_case(Case::on(
        BOTH,
        "one_client_port_to_two_services_sharing_a_backend",
        services,
        tcp_steps,
    ));
    run_case(Case::on(
        BOTH,
        "one_udp_client_port_to_two_services_sharing_a_backend",
        services,
        vec![
            send(
                udp(ep(CLIENT), ep(DNS), b"q1"),
                Expect::Dnat(Target::Exact(ep(POD_B_DNS))),
            ),
            send(
                udp(ep(CLIENT), ep(DNS_2), b"q2"),
                Expect::Nat {
                    src: remapped,
                    dst: ep(POD_B_DNS),
                },
            ),
            send(
                udp(ep(POD_B_DNS), ep(CLIENT), b"a1"),
                Expect::RevNat(ep(DNS)),
            ),
            send(
                udp(ep(POD_B_DNS), remapped, b"a2"),
                Expect::Nat {
                    src: ep(DNS_2),
                    dst: ep(CLIENT),
                },
            ),
        ],
    ));
}

#[test]
fn a_taken_tuple_with_no_free_port_drops_and_keeps_the_live_flow() {
    let third = ep("10.96.0.12:80");
    run_case(Case::on(
        BOTH,
        "a_taken_tuple_with_no_free_port_drops_and_keeps_the_live_flow",
        move |dp| {
            services(dp);
            dp.frontend(third, TCP, 6, &[1]);
        },
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(POD_B))),
            ),
            send(
                tcp(ep(CLIENT), ep(WEB_2), SYN, b""),
                Expect::Nat {
                    src: with_port(CLIENT, SNAT_PORT),
                    dst: ep(POD_B),
                },
            ),
            // The one port of the range is taken too.
            send(tcp(ep(CLIENT), third, SYN, b""), Expect::Dropped),
            counters(&[(stat::ERR_SNAT_PORTS, 1)]),
            send(
                tcp(ep(POD_B), ep(CLIENT), ACK, b""),
                Expect::RevNat(ep(WEB)),
            ),
        ],
    ));
}

#[test]
fn hairpin_flows_of_one_port_to_two_services_do_not_clash() {
    // The backend pod reaches itself through both Services from one port.
    let pod = with_port(POD_B, 40000);
    let hairpin = |port| Ep {
        addr: HAIRPIN.parse().unwrap(),
        port,
    };
    run_case(Case::on(
        BOTH,
        "hairpin_flows_of_one_port_to_two_services_do_not_clash",
        services,
        vec![
            send(
                tcp(pod, ep(WEB), SYN, b""),
                Expect::Nat {
                    src: hairpin(40000),
                    dst: ep(POD_B),
                },
            ),
            send(
                tcp(pod, ep(WEB_2), SYN, b""),
                Expect::Nat {
                    src: hairpin(SNAT_PORT),
                    dst: ep(POD_B),
                },
            ),
            send(
                tcp(ep(POD_B), hairpin(40000), SYN_ACK, b""),
                Expect::Nat {
                    src: ep(WEB),
                    dst: pod,
                },
            ),
            send(
                tcp(ep(POD_B), hairpin(SNAT_PORT), SYN_ACK, b""),
                Expect::Nat {
                    src: ep(WEB_2),
                    dst: pod,
                },
            ),
        ],
    ));
}

// ICMP and ICMPv6 errors about translated flows (netfilter's
// nf_nat_icmp_reply_translation): the quote becomes what the receiver sent,
// the outer header an answer about it. Expected frames are built from
// scratch by the harness, so every checksum (outer, ICMP, quoted IPv4
// header, quoted L4) is checked by its own arithmetic.

const DNS6: &str = "[fd00:96::10]:53";
const POD_B6_DNS: &str = "[fd00:1:2::2]:5353";
const ROUTER: &str = "10.9.9.9";
const ROUTER6: &str = "fd00:9::9";
/// The second word of "fragmentation needed": next-hop MTU 1400.
const MTU_1400: [u8; 4] = [0, 0, 0x05, 0x78];
/// The second word of "packet too big": MTU 1280.
const MTU_1280: [u8; 4] = [0, 0, 0x05, 0x00];
/// IPv4 header + 8 bytes of L4: what a router quotes at least.
const QUOTE_8: Option<usize> = Some(28);

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `services` plus dns on fd00:96::10.
fn services_dual(dp: &mut Datapath) {
    services(dp);
    dp.backend(4, ep(POD_B6_DNS), UDP);
    dp.frontend(ep(DNS6), UDP, 6, &[4]);
}

/// The quote of a translated error carries checksums that verify.
fn quote_checks_out(frame: &[u8]) {
    let ip_hlen = if frame[12..14] == [0x86, 0xdd] {
        40
    } else {
        (frame[14] & 0x0f) as usize * 4
    };
    let mut quoted = frame[..14].to_vec();
    quoted.extend_from_slice(&frame[14 + ip_hlen + 8..]);
    verify_checksums(&quoted).unwrap_or_else(|e| panic!("quoted packet: {e}"));
}

#[test]
fn port_unreachable_from_the_backend_names_the_service() {
    let query = udp(ep(CLIENT), ep(POD_B_DNS), b"query");
    let sent = udp(ep(CLIENT), ep(DNS), b"query");
    let query6 = udp(ep(CLIENT6), ep(POD_B6_DNS), b"query");
    let sent6 = udp(ep(CLIENT6), ep(DNS6), b"query");
    let want = icmp_error(ep(DNS).addr, ep(CLIENT).addr, 3, 3, [0; 4], &sent, None);
    let want6 = icmp_error(ep(DNS6).addr, ep(CLIENT6).addr, 1, 4, [0; 4], &sent6, None);
    quote_checks_out(&want);
    quote_checks_out(&want6);
    run_case(Case::on(
        ALL,
        "port_unreachable_from_the_backend_names_the_service",
        services_dual,
        vec![
            send_on(
                Prog::Tc,
                sent.clone(),
                Expect::Dnat(Target::Exact(ep(POD_B_DNS))),
            ),
            // The backend's host refuses: UDP to a closed port.
            send(
                icmp_error(ep(POD_B).addr, ep(CLIENT).addr, 3, 3, [0; 4], &query, None),
                Expect::Frame(want),
            ),
            send_on(
                Prog::Tc,
                sent6.clone(),
                Expect::Dnat(Target::Exact(ep(POD_B6_DNS))),
            ),
            send(
                icmp_error(
                    ep(POD_B6).addr,
                    ep(CLIENT6).addr,
                    1,
                    4,
                    [0; 4],
                    &query6,
                    None,
                ),
                Expect::Frame(want6),
            ),
            counters(&[(stat::ICMP_ERROR_TRANSLATED, 2)]),
        ],
    ));
}

#[test]
fn fragmentation_needed_and_packet_too_big_from_a_router() {
    let syn = tcp(ep(CLIENT), ep(POD_B), SYN, &[7u8; 64]);
    let sent = tcp(ep(CLIENT), ep(WEB), SYN, &[7u8; 64]);
    let syn6 = tcp(ep(CLIENT6), ep(POD_B6), SYN, &[7u8; 64]);
    let sent6 = tcp(ep(CLIENT6), ep(WEB6), SYN, &[7u8; 64]);
    let data_udp = udp(ep(CLIENT), ep(POD_B_DNS), &[1u8; 100]);
    let sent_udp = udp(ep(CLIENT), ep(DNS), &[1u8; 100]);
    run_case(Case::on(
        ALL,
        "fragmentation_needed_and_packet_too_big_from_a_router",
        services_dual,
        vec![
            send_on(
                Prog::Tc,
                sent.clone(),
                Expect::Dnat(Target::Exact(ep(POD_B))),
            ),
            // A router quoting 8 bytes of TCP: no TCP checksum in the quote.
            send(
                icmp_error(addr(ROUTER), ep(CLIENT).addr, 3, 4, MTU_1400, &syn, QUOTE_8),
                Expect::Frame(icmp_error(
                    ep(WEB).addr,
                    ep(CLIENT).addr,
                    3,
                    4,
                    MTU_1400,
                    &sent,
                    QUOTE_8,
                )),
            ),
            // Quoting all of it (Linux quotes up to 576 bytes): the quoted
            // TCP checksum is restored too.
            send(
                icmp_error(addr(ROUTER), ep(CLIENT).addr, 3, 4, MTU_1400, &syn, None),
                Expect::Frame(icmp_error(
                    ep(WEB).addr,
                    ep(CLIENT).addr,
                    3,
                    4,
                    MTU_1400,
                    &sent,
                    None,
                )),
            ),
            // Time exceeded about a UDP flow, quoting its checksum.
            send_on(
                Prog::Tc,
                sent_udp.clone(),
                Expect::Dnat(Target::Exact(ep(POD_B_DNS))),
            ),
            send(
                icmp_error(
                    addr(ROUTER),
                    ep(CLIENT).addr,
                    11,
                    0,
                    [0; 4],
                    &data_udp,
                    QUOTE_8,
                ),
                Expect::Frame(icmp_error(
                    ep(DNS).addr,
                    ep(CLIENT).addr,
                    11,
                    0,
                    [0; 4],
                    &sent_udp,
                    QUOTE_8,
                )),
            ),
            send_on(
                Prog::Tc,
                sent6.clone(),
                Expect::Dnat(Target::Exact(ep(POD_B6))),
            ),
            send(
                icmp_error(addr(ROUTER6), ep(CLIENT6).addr, 2, 0, MTU_1280, &syn6, None),
                Expect::Frame(icmp_error(
                    ep(WEB6).addr,
                    ep(CLIENT6).addr,
                    2,
                    0,
                    MTU_1280,
                    &sent6,
                    None,
                )),
            ),
            counters(&[(stat::ICMP_ERROR_TRANSLATED, 4)]),
        ],
    ));
}

#[test]
fn errors_about_a_snated_nodeport_flow_reach_the_external_client() {
    let (node_port, snat, outside) = (ep(NODE_PORT), snat(), ep(OUTSIDE));
    let translated = tcp(snat, ep(POD_B), SYN, b"");
    let sent = tcp(outside, node_port, SYN, b"");
    run_case(Case::on(
        &[Prog::TcNode, Prog::XdpNode, Prog::TcReply],
        "errors_about_a_snated_nodeport_flow_reach_the_external_client",
        remote_node_port,
        vec![
            send_on(
                Prog::TcNode,
                sent.clone(),
                Expect::Nat {
                    src: snat,
                    dst: ep(POD_B),
                },
            ),
            send(
                icmp_error(
                    addr(ROUTER),
                    snat.addr,
                    3,
                    4,
                    MTU_1400,
                    &translated,
                    QUOTE_8,
                ),
                Expect::Frame(icmp_error(
                    node_port.addr,
                    outside.addr,
                    3,
                    4,
                    MTU_1400,
                    &sent,
                    QUOTE_8,
                )),
            ),
        ],
    ));
}

#[test]
fn an_error_about_a_reply_goes_to_the_backend() {
    // The client's socket is gone when the answer arrives: its host
    // refuses the reply it saw (from the Service), about the backend's flow.
    let seen = udp(ep(DNS), ep(CLIENT), b"answer");
    let answered = udp(ep(POD_B_DNS), ep(CLIENT), b"answer");
    run_case(Case::on(
        BOTH,
        "an_error_about_a_reply_goes_to_the_backend",
        services,
        vec![
            send(
                udp(ep(CLIENT), ep(DNS), b"query"),
                Expect::Dnat(Target::Exact(ep(POD_B_DNS))),
            ),
            send(
                icmp_error(ep(CLIENT).addr, ep(DNS).addr, 3, 3, [0; 4], &seen, None),
                Expect::Frame(icmp_error(
                    ep(CLIENT).addr,
                    ep(POD_B_DNS).addr,
                    3,
                    3,
                    [0; 4],
                    &answered,
                    None,
                )),
            ),
        ],
    ));
}

#[test]
fn errors_about_no_tracked_flow_pass_and_reply_programs_only_translate_towards_clients() {
    let seen = udp(ep(DNS), ep(CLIENT), b"answer");
    let stray = udp(ep(CLIENT), ep("10.1.9.9:5353"), b"query");
    run_case(Case::on(
        ALL,
        "errors_about_no_tracked_flow_pass",
        services,
        vec![
            send(
                icmp_error(addr(ROUTER), ep(CLIENT).addr, 3, 3, [0; 4], &stray, None),
                Expect::Unchanged,
            ),
            counters(&[(stat::ICMP_ERROR_TRANSLATED, 0)]),
        ],
    ));
    run_case(Case::on(
        &[Prog::TcReply, Prog::TcToPod],
        "reply_programs_only_translate_towards_clients",
        services,
        vec![
            send_on(
                Prog::Tc,
                udp(ep(CLIENT), ep(DNS), b"query"),
                Expect::Dnat(Target::Exact(ep(POD_B_DNS))),
            ),
            send(
                icmp_error(ep(CLIENT).addr, ep(DNS).addr, 3, 3, [0; 4], &seen, None),
                Expect::Unchanged,
            ),
        ],
    ));
    // A node device's egress carries the node's own errors about answers
    // (its socket gone when the answer arrived): towards the backend.
    let answered = udp(ep(POD_B_DNS), ep(CLIENT), b"answer");
    run_case(Case::on(
        &[Prog::TcNodeEgress],
        "node_egress_translates_errors_towards_backends",
        services,
        vec![
            send_on(
                Prog::Tc,
                udp(ep(CLIENT), ep(DNS), b"query"),
                Expect::Dnat(Target::Exact(ep(POD_B_DNS))),
            ),
            send(
                icmp_error(ep(CLIENT).addr, ep(DNS).addr, 3, 3, [0; 4], &seen, None),
                Expect::Frame(icmp_error(
                    ep(CLIENT).addr,
                    ep(POD_B_DNS).addr,
                    3,
                    3,
                    [0; 4],
                    &answered,
                    None,
                )),
            ),
        ],
    ));
}

// IP fragments: every fragment of a datagram gets the translation of its
// first one (whose ports it records). Each output fragment must equal the
// same fragment of the translated datagram built from scratch: the UDP
// checksum in the first fragment is right for the whole datagram.

const FRAG_ID: u32 = 0x1234;
/// 1480 bytes of payload per fragment: what an MTU of 1500 carries (IPv4);
/// 1448 for IPv6 (40 + 8 bytes of headers, a multiple of 8).
const CHUNK4: usize = 1480;
const CHUNK6: usize = 1448;

/// The fragments of `frame`, each sent expecting the same fragment of `want`.
fn fragment_steps(prog: Option<Prog>, frame: &[u8], want: &[u8], chunk: usize) -> Vec<Step> {
    let sent = fragment(frame, chunk, FRAG_ID);
    let want = fragment(want, chunk, FRAG_ID);
    assert!(sent.len() >= 3, "a datagram of three fragments at least");
    sent.into_iter()
        .zip(want)
        .map(|(f, w)| match prog {
            Some(p) => send_on(p, f, Expect::Frame(w)),
            None => send(f, Expect::Frame(w)),
        })
        .collect()
}

#[test]
fn fragmented_datagrams_are_translated_both_ways() {
    let big = vec![0x5au8; 3000];
    let mut steps = Vec::new();
    for (client, dns, backend, chunk) in [
        (ep(CLIENT), ep(DNS), ep(POD_B_DNS), CHUNK4),
        (ep(CLIENT6), ep(DNS6), ep(POD_B6_DNS), CHUNK6),
    ] {
        // The request on the pod program, the answer on the one under test.
        steps.extend(fragment_steps(
            Some(Prog::Tc),
            &udp(client, dns, &big),
            &udp(client, backend, &big),
            chunk,
        ));
        steps.extend(fragment_steps(
            None,
            &udp(backend, client, &big),
            &udp(dns, client, &big),
            chunk,
        ));
    }
    steps.push(counters(&[
        (stat::NEW_FLOW, 2),
        (stat::FRAGMENT, 12),
        (stat::PASS_FRAGMENT, 0),
    ]));
    run_case(Case::on(
        ALL,
        "fragmented_datagrams_are_translated_both_ways",
        services_dual,
        steps,
    ));
}

#[test]
fn a_later_fragment_before_its_first_is_dropped_if_addressed_to_a_service() {
    let big = vec![0x5au8; 3000];
    let to_service = fragment(&udp(ep(CLIENT), ep(DNS), &big), CHUNK4, FRAG_ID);
    let translated = fragment(&udp(ep(CLIENT), ep(POD_B_DNS), &big), CHUNK4, FRAG_ID);
    let elsewhere = fragment(&udp(ep(CLIENT), ep("10.1.9.9:53"), &big), CHUNK4, FRAG_ID);
    run_case(Case::on(
        BOTH,
        "a_later_fragment_before_its_first_is_dropped_if_addressed_to_a_service",
        services_dual,
        vec![
            send(to_service[1].clone(), Expect::Dropped),
            send(elsewhere[1].clone(), Expect::Unchanged),
            counters(&[
                (stat::DROP_FRAG_NO_FIRST, 1),
                (stat::PASS_FRAGMENT, 1),
                (stat::NEW_FLOW, 0),
            ]),
            // Its first fragment then arrives: balanced, and the rest follow.
            send(to_service[0].clone(), Expect::Frame(translated[0].clone())),
            send(to_service[2].clone(), Expect::Frame(translated[2].clone())),
        ],
    ));
}

#[test]
fn a_packet_translated_on_its_way_in_is_not_taken_for_a_reply() {
    // Two gossiping pods, each a Service's endpoint on port 7946: B reaches
    // A through svc-a, then A reaches B through svc-b, both from 7946. A's
    // translated packet (A:7946 -> B:7946) carries the tuple of svc-a's
    // reply to B; on B's device it must go in as it is, not as svc-a's reply.
    let (pod_a, pod_b) = (ep("10.1.1.10:7946"), ep("10.1.1.11:7946"));
    let (svc_a, svc_b) = (ep("10.96.0.20:7946"), ep("10.96.0.21:7946"));
    let translated = udp(pod_a, pod_b, b"gossip");
    run_case(Case::on(
        &[Prog::TcToPod],
        "a_packet_translated_on_its_way_in_is_not_taken_for_a_reply",
        move |dp| {
            dp.backend(1, pod_a, UDP);
            dp.backend(2, pod_b, UDP);
            dp.frontend(svc_a, UDP, 1, &[1]);
            dp.frontend(svc_b, UDP, 2, &[2]);
        },
        vec![
            send_on(
                Prog::Tc,
                udp(pod_b, svc_a, b"gossip"),
                Expect::Dnat(Target::Exact(pod_a)),
            ),
            send_on(
                Prog::Tc,
                udp(pod_a, svc_b, b"gossip"),
                Expect::Dnat(Target::Exact(pod_b)),
            ),
            Step::SendMarked {
                frame: translated.clone(),
                expect: Expect::Unchanged,
            },
            // Unmarked (a real reply from A to B's svc-a flow): restored.
            send(translated, Expect::RevNat(svc_a)),
        ],
    ));
}

#[test]
fn a_first_fragment_too_short_for_its_tcp_header_is_not_translated() {
    // 8 bytes of TCP in the first fragment: ports, but not the header
    // translation needs (flags, checksum): treated like a fragment whose
    // first was not seen, so it cannot leak to the Service address.
    let frames = fragment(&tcp(ep(CLIENT), ep(WEB), SYN, &[1u8; 64]), 8, FRAG_ID);
    run_case(Case::on(
        BOTH,
        "a_first_fragment_too_short_for_its_tcp_header_is_not_translated",
        services,
        vec![
            send(frames[0].clone(), Expect::Dropped),
            send(frames[1].clone(), Expect::Dropped),
            counters(&[(stat::DROP_FRAG_NO_FIRST, 2), (stat::NEW_FLOW, 0)]),
        ],
    ));
}

#[test]
fn every_icmp_error_kind_is_translated() {
    // Each kind netfilter relates to a connection, about a UDP flow to the
    // Service, from a router on the way: destination unreachable (net,
    // host, port, fragmentation needed), time exceeded, parameter problem;
    // ICMPv6 destination unreachable (no route, address, port unreachable),
    // packet too big, time exceeded, parameter problem.
    let kinds4: [(u8, u8); 6] = [(3, 0), (3, 1), (3, 3), (3, 4), (11, 0), (12, 0)];
    let kinds6: [(u8, u8); 6] = [(1, 0), (1, 3), (1, 4), (2, 0), (3, 0), (4, 0)];
    let mut steps = Vec::new();
    for (client, dns, backend, router, kinds) in [
        (ep(CLIENT), ep(DNS), ep(POD_B_DNS), addr(ROUTER), kinds4),
        (ep(CLIENT6), ep(DNS6), ep(POD_B6_DNS), addr(ROUTER6), kinds6),
    ] {
        let sent = udp(client, dns, b"query");
        let left = udp(client, backend, b"query");
        steps.push(send_on(
            Prog::Tc,
            sent.clone(),
            Expect::Dnat(Target::Exact(backend)),
        ));
        for (kind, code) in kinds {
            steps.push(send(
                icmp_error(router, client.addr, kind, code, [0; 4], &left, None),
                Expect::Frame(icmp_error(
                    dns.addr,
                    client.addr,
                    kind,
                    code,
                    [0; 4],
                    &sent,
                    None,
                )),
            ));
        }
    }
    steps.push(counters(&[(stat::ICMP_ERROR_TRANSLATED, 12)]));
    run_case(Case::on(
        &[Prog::Tc, Prog::XdpNode, Prog::TcToPod],
        "every_icmp_error_kind_is_translated",
        services_dual,
        steps,
    ));
}

#[test]
fn a_translated_icmp_error_is_reported_with_its_flow() {
    // The monitor hears of a translated error with its type and code, the
    // flow's frontend (rev-NAT id) and backend, on IPv4 and IPv6.
    let mut steps = Vec::new();
    for (client, dns, backend, router, (kind, code), rev_nat_id) in [
        (ep(CLIENT), ep(DNS), ep(POD_B_DNS), addr(ROUTER), (3, 4), 2),
        (
            ep(CLIENT6),
            ep(DNS6),
            ep(POD_B6_DNS),
            addr(ROUTER6),
            (2, 0),
            6,
        ),
    ] {
        let left = udp(client, backend, b"query");
        let sent = udp(client, dns, b"query");
        steps.push(send_on(
            Prog::Tc,
            sent.clone(),
            Expect::Dnat(Target::Exact(backend)),
        ));
        steps.push(send(
            icmp_error(router, client.addr, kind, code, MTU_1400, &left, None),
            Expect::Frame(icmp_error(
                dns.addr,
                client.addr,
                kind,
                code,
                MTU_1400,
                &sent,
                None,
            )),
        ));
        steps.push(change(move |dp| {
            let events = dp.events();
            let [event] = events.as_slice() else {
                panic!("one event for the error, got {events:?}");
            };
            assert_eq!(
                (
                    event.kind,
                    event.reason,
                    event.icmp_type,
                    event.icmp_code,
                    event.rev_nat_id
                ),
                (
                    lb_common::event_kind::ICMP,
                    lb_common::event_reason::ICMP_ERROR,
                    kind,
                    code,
                    rev_nat_id
                ),
                "{event:?}"
            );
            assert_eq!(
                (event.backend_be.ip(), u16::from_be(event.backend_port_be)),
                (backend.addr, backend.port),
                "the flow's backend"
            );
            assert_eq!(
                (event.src_be.ip(), event.dst_be.ip()),
                (router, client.addr),
                "the error as it arrived"
            );
        }));
    }
    run_case(Case::on(
        &[Prog::Tc, Prog::XdpNode, Prog::TcToPod],
        "a_translated_icmp_error_is_reported_with_its_flow",
        |dp| {
            services_dual(dp);
            dp.monitor(1 << lb_common::event_kind::ICMP, 1);
        },
        steps,
    ));
}
