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

#[test]
fn nodeport_snat_reply_is_restored_on_another_device() {
    let node_port = ep("192.168.50.1:30080");
    let snat = Ep {
        addr: node_port.addr,
        port: SNAT_PORT,
    };
    let outside = ep("192.168.50.100:50000");
    run_case(Case::on(
        &[Prog::TcReply],
        "nodeport_snat_reply_is_restored_on_another_device",
        move |dp| {
            one_port_range(dp);
            dp.set_config(|c| c.nodeport_snat_addr4 = be32(node_port.addr));
            dp.backend(1, ep(POD_B), TCP);
            dp.set_backend_state(1, 0, backend_flags::REMOTE);
            dp.external_frontend(node_port, TCP, 1, &[1], frontend_kind::NODE_PORT);
        },
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
