//! IPv6 packet tables: the same translation as IPv4 (DNAT, conntrack,
//! reverse NAT, rejects, ping, affinity, NodePort SNAT, source ranges) with
//! IPv6 headers; every translated frame's checksums are verified from scratch
//! (IPv6 has no header checksum: the pseudo-header sum in TCP, UDP and
//! ICMPv6 carries the addresses).

use lb_common::{
    IPPROTO_TCP as TCP, IPPROTO_UDP as UDP, backend_flags, config_flags, frontend_kind,
    service_flags, stat,
};
use lb_tests::packet::*;

const CLIENT: &str = "[fd00:10::5]:40000";
const WEB: &str = "[fd00:96::10]:80";
const DNS: &str = "[fd00:96::53]:53";
const EMPTY: &str = "[fd00:96::99]:80";
const WEB_1: &str = "[fd00:1::1]:8080";
const WEB_2: &str = "[fd00:1::2]:8080";
const DNS_1: &str = "[fd00:2::1]:5353";
const NODE_ADDR: &str = "2001:db8::1";
const NODE_PORT: &str = "[2001:db8::1]:30080";
const REMOTE_POD: &str = "[fd00:3::2]:8080";
const OUTSIDE: &str = "[2001:db8:f::7]:50000";
const SNAT_PORT: u16 = 61_000;

fn services(dp: &mut Datapath) {
    dp.backend(1, ep(WEB_1), TCP);
    dp.backend(2, ep(WEB_2), TCP);
    dp.backend(4, ep(DNS_1), UDP);
    dp.frontend(ep(WEB), TCP, 1, &[1, 2]);
    dp.frontend(ep(DNS), UDP, 2, &[4]);
    dp.frontend(ep(EMPTY), TCP, 3, &[]);
    dp.frontend(ep("[fd00:96::99]:53"), UDP, 4, &[]);
    dp.address_only("fd00:96::10".parse::<std::net::Ipv6Addr>().unwrap());
}

fn case(name: &'static str, setup: fn(&mut Datapath), steps: Vec<Step>) -> Case {
    Case::on(BOTH, name, setup, steps)
}

fn webs() -> Vec<Ep> {
    vec![ep(WEB_1), ep(WEB_2)]
}

#[test]
fn tcp_flow_is_dnated_tracked_and_reverse_translated() {
    run_case(case(
        "ipv6_tcp_flow_is_dnated_tracked_and_reverse_translated",
        services,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::OneOf(webs())),
            ),
            send(
                tcp(ep(CLIENT), ep(WEB), ACK, b"GET / HTTP/1.1\r\n\r\n"),
                Expect::Dnat(Target::SameAs(0)),
            ),
            counters(&[(stat::NEW_FLOW, 1), (stat::ESTABLISHED, 1)]),
        ],
    ));
}

#[test]
fn replies_are_translated_back_to_the_frontend() {
    // One backend, so the reply's source is known.
    fn one(dp: &mut Datapath) {
        dp.backend(1, ep(WEB_1), TCP);
        dp.frontend(ep(WEB), TCP, 1, &[1]);
    }
    run_case(case(
        "ipv6_replies_are_translated_back_to_the_frontend",
        one,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(ep(WEB_1), ep(CLIENT), SYN_ACK, b""),
                Expect::RevNat(ep(WEB)),
            ),
            counters(&[(stat::NEW_FLOW, 1), (stat::REPLY, 1)]),
        ],
    ));
}

const SYN_ACK: Tcp = Tcp {
    syn: true,
    ack: Some(1001),
    fin: false,
    rst: false,
    seq: 5000,
};

#[test]
fn udp_is_dnated_and_answered_from_the_service() {
    run_case(case(
        "ipv6_udp_is_dnated_and_answered_from_the_service",
        services,
        vec![
            send(
                udp(ep(CLIENT), ep(DNS), b"\x12\x34query"),
                Expect::Dnat(Target::Exact(ep(DNS_1))),
            ),
            send(
                udp(ep(DNS_1), ep(CLIENT), b"answer"),
                Expect::RevNat(ep(DNS)),
            ),
        ],
    ));
}

#[test]
fn empty_frontends_are_refused_with_rst_and_icmpv6() {
    run_case(case(
        "ipv6_empty_frontends_are_refused_with_rst_and_icmpv6",
        services,
        vec![
            send(
                tcp(ep(CLIENT), ep(EMPTY), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            send(
                udp(ep(CLIENT), ep("[fd00:96::99]:53"), b"q"),
                Expect::IcmpPortUnreachable,
            ),
            // An undeclared port of a Service IP is refused the same way.
            send(
                tcp(ep(CLIENT), ep("[fd00:96::10]:81"), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            counters(&[
                (stat::REJECT_TCP_RST, 2),
                (stat::REJECT_ICMP, 1),
                (stat::REJECT_UNDECLARED, 1),
            ]),
        ],
    ));
}

#[test]
fn pings_to_a_service_address_are_answered_with_icmpv6() {
    fn pingable(dp: &mut Datapath) {
        services(dp);
        dp.set_config(|c| c.flags |= config_flags::ECHO_REPLY);
        dp.address_entry(
            "fd00:96::10".parse::<std::net::Ipv6Addr>().unwrap(),
            0,
            service_flags::ADDRESS_ONLY | service_flags::ECHO,
        );
    }
    let client = "fd00:10::5".parse().unwrap();
    run_case(case(
        "ipv6_pings_to_a_service_address_are_answered_with_icmpv6",
        pingable,
        vec![
            send(
                echo6_request(client, "fd00:96::10".parse().unwrap(), 9, 1, b"ping6"),
                Expect::EchoReply,
            ),
            // Not a Service address (neighbour discovery and the like pass too).
            send(
                echo6_request(client, "fd00:96::77".parse().unwrap(), 9, 2, b"x"),
                Expect::Unchanged,
            ),
            counters(&[(stat::ECHO_REPLY, 1)]),
        ],
    ));
}

#[test]
fn affinity_keeps_an_ipv6_client_on_its_backend() {
    fn sticky(dp: &mut Datapath) {
        dp.backend(1, ep(WEB_1), TCP);
        dp.backend(2, ep(WEB_2), TCP);
        dp.frontend_with_flags(ep(WEB), TCP, 1, &[1, 2], service_flags::AFFINITY);
        dp.set_head(ep(WEB), TCP, |h| h.affinity_timeout_s = 60);
        dp.insert_affinity(ep(CLIENT).addr, 1, 2, Datapath::now_ns());
    }
    let from = |port| Ep { port, ..ep(CLIENT) };
    run_case(case(
        "ipv6_affinity_keeps_an_ipv6_client_on_its_backend",
        sticky,
        (0..6)
            .map(|i| {
                send(
                    tcp(from(41000 + i), ep(WEB), SYN, b""),
                    Expect::Dnat(Target::Exact(ep(WEB_2))),
                )
            })
            .collect(),
    ));
}

#[test]
fn hairpin_flows_get_the_ipv6_hairpin_source() {
    fn hairpin(dp: &mut Datapath) {
        dp.backend(1, ep("[fd00:10::5]:8080"), TCP);
        dp.frontend(ep(WEB), TCP, 1, &[1]);
        dp.set_config(|c| {
            c.hairpin_snat_addr6 = be32(
                "fd6c:6268:6169:7270::1"
                    .parse::<std::net::IpAddr>()
                    .unwrap(),
            )
        });
    }
    run_case(case(
        "ipv6_hairpin_flows_get_the_ipv6_hairpin_source",
        hairpin,
        vec![
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Nat {
                    src: ep("[fd6c:6268:6169:7270::1]:40000"),
                    dst: ep("[fd00:10::5]:8080"),
                },
            ),
            send(
                tcp(
                    ep("[fd00:10::5]:8080"),
                    ep("[fd6c:6268:6169:7270::1]:40000"),
                    SYN_ACK,
                    b"",
                ),
                Expect::Nat {
                    src: ep(WEB),
                    dst: ep(CLIENT),
                },
            ),
        ],
    ));
}

/// A NodePort on the node's IPv6 address with a backend on another node:
/// SNAT to the node's IPv6 address with an allocated port.
fn node_port(dp: &mut Datapath) {
    dp.set_config(|c| {
        c.nodeport_snat_addr6 = be32(NODE_ADDR.parse::<std::net::IpAddr>().unwrap());
        c.snat_port_min = SNAT_PORT;
        c.snat_port_max = SNAT_PORT;
    });
    dp.backend(2, ep(REMOTE_POD), TCP);
    dp.set_backend_state(2, 0, backend_flags::REMOTE);
    dp.external_frontend(ep(NODE_PORT), TCP, 1, &[2], frontend_kind::NODE_PORT);
}

#[test]
fn nodeport_on_an_ipv6_node_address_snats_to_the_node() {
    let snat = Ep {
        addr: NODE_ADDR.parse().unwrap(),
        port: SNAT_PORT,
    };
    run_case(Case::on(
        NODE,
        "ipv6_nodeport_on_an_ipv6_node_address_snats_to_the_node",
        node_port,
        vec![
            send(
                tcp(ep(OUTSIDE), ep(NODE_PORT), SYN, b""),
                Expect::Snat {
                    src_addr: NODE_ADDR.parse().unwrap(),
                    ports: (SNAT_PORT, SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            send(
                tcp(ep(REMOTE_POD), snat, SYN_ACK, b""),
                Expect::Nat {
                    src: ep(NODE_PORT),
                    dst: ep(OUTSIDE),
                },
            ),
            counters(&[(stat::NODEPORT_SNAT, 1), (stat::REPLY, 1)]),
        ],
    ));
}

#[test]
fn source_ranges_admit_only_listed_ipv6_prefixes() {
    fn guarded(dp: &mut Datapath) {
        dp.backend(1, ep(WEB_1), TCP);
        dp.external_frontend(
            ep("[2001:db8:1::10]:80"),
            TCP,
            1,
            &[1],
            frontend_kind::LOAD_BALANCER | service_flags::SOURCE_RANGES,
        );
        dp.source_range(
            "2001:db8:1::10".parse::<std::net::Ipv6Addr>().unwrap(),
            "2001:db8:f::".parse::<std::net::Ipv6Addr>().unwrap(),
            48,
        );
    }
    run_case(Case::on(
        NODE,
        "ipv6_source_ranges_admit_only_listed_ipv6_prefixes",
        guarded,
        vec![
            send(
                tcp(ep(OUTSIDE), ep("[2001:db8:1::10]:80"), SYN, b""),
                Expect::Dnat(Target::Exact(ep(WEB_1))),
            ),
            send(
                tcp(
                    ep("[2001:db8:e::7]:50000"),
                    ep("[2001:db8:1::10]:80"),
                    SYN,
                    b"",
                ),
                Expect::Dropped,
            ),
            counters(&[(stat::DROP_SOURCE_RANGE, 1)]),
        ],
    ));
}

#[test]
fn ipv4_and_ipv6_frontends_of_one_service_do_not_mix() {
    // A dual-stack Service: both families' ClusterIPs in the same maps.
    fn dual(dp: &mut Datapath) {
        services(dp);
        dp.backend(9, ep("10.0.1.1:8080"), TCP);
        dp.frontend(ep("10.96.0.10:80"), TCP, 9, &[9]);
    }
    run_case(case(
        "ipv6_ipv4_and_ipv6_frontends_of_one_service_do_not_mix",
        dual,
        vec![
            send(
                tcp(ep("10.0.0.5:40000"), ep("10.96.0.10:80"), SYN, b""),
                Expect::Dnat(Target::Exact(ep("10.0.1.1:8080"))),
            ),
            send(
                tcp(ep(CLIENT), ep(WEB), SYN, b""),
                Expect::Dnat(Target::OneOf(webs())),
            ),
            // The IPv4-mapped form of the IPv4 ClusterIP on the IPv6 wire
            // (invalid there, RFC 4291 2.5.5.2) is not the IPv4 frontend.
            send(
                tcp(ep(CLIENT), ep("[::ffff:10.96.0.10]:80"), SYN, b""),
                Expect::Unchanged,
            ),
        ],
    ));
}
