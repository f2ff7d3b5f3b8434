//! Packet tables for traffic from outside the node: the node-device programs
//! (`lb_tc_node`, `lb_xdp_node`) with NodePort, LoadBalancer and externalIP
//! frontends, SNAT to remote backends and its reverse, traffic policy Local,
//! loadBalancerSourceRanges, and pings to Service addresses (also from pods).
//! Checksums of every rewritten frame are verified from scratch.

use lb_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, IPPROTO_TCP as TCP, IPPROTO_UDP as UDP, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, ServiceCounters, backend_flags, config_flags, ct_flags, ct_lifetime,
    frontend_kind, service_flags, stat,
};
use lb_tests::packet::*;

const CLIENT: &str = "203.0.113.5:40000";
const OTHER_CLIENT: &str = "203.0.113.6:40000";
const OUTSIDE_RANGES: &str = "192.0.2.9:40000";
/// This node's address: NodePorts and the SNAT source.
const NODE_ADDR: &str = "192.168.50.1";
const NODE_PORT: &str = "192.168.50.1:30080";
const NODE_PORT_UDP: &str = "192.168.50.1:30053";
const LB_IP: &str = "198.51.100.10:80";
const CLUSTER_IP: &str = "10.96.0.10:80";
const LOCAL_POD: &str = "10.1.1.2:8080";
const REMOTE_POD: &str = "10.1.2.2:8080";
const REMOTE_DNS: &str = "10.1.2.3:5353";
const SNAT_PORT: u16 = 61_000;

fn node_addr() -> std::net::IpAddr {
    NODE_ADDR.parse().unwrap()
}

fn snat(port: u16) -> Ep {
    Ep {
        addr: node_addr(),
        port,
    }
}

fn case(name: &'static str, setup: fn(&mut Datapath), steps: Vec<Step>) -> Case {
    Case::on(NODE, name, setup, steps)
}

/// SNAT to the node with one port (61000), so its allocation is predictable.
fn node_config(dp: &mut Datapath, max_port: u16) {
    dp.set_config(|c| {
        c.nodeport_snat_addr4 = lb_tests::packet::be32(node_addr());
        c.snat_port_min = SNAT_PORT;
        c.snat_port_max = max_port;
        c.flags |= config_flags::ECHO_REPLY;
    });
}

/// A NodePort whose only backend is on this node (id 1), one whose only
/// backend is on another node (id 2, UDP id 3), and the ClusterIP of the
/// first for pods.
fn node_ports(dp: &mut Datapath) {
    node_config(dp, SNAT_PORT);
    dp.backend(1, ep(LOCAL_POD), TCP);
    dp.backend(2, ep(REMOTE_POD), TCP);
    dp.set_backend_state(2, 0, backend_flags::REMOTE);
    dp.backend(3, ep(REMOTE_DNS), UDP);
    dp.set_backend_state(3, 0, backend_flags::REMOTE);
    dp.external_frontend(ep(NODE_PORT), TCP, 1, &[1], frontend_kind::NODE_PORT);
    dp.external_frontend(
        Ep {
            port: 30081,
            ..ep(NODE_PORT)
        },
        TCP,
        2,
        &[2],
        frontend_kind::NODE_PORT,
    );
    dp.external_frontend(ep(NODE_PORT_UDP), UDP, 3, &[3], frontend_kind::NODE_PORT);
    dp.frontend(ep(CLUSTER_IP), TCP, 4, &[1]);
}

fn remote_node_port() -> Ep {
    Ep {
        port: 30081,
        ..ep(NODE_PORT)
    }
}

#[test]
fn nodeport_to_a_local_backend_keeps_the_client_address() {
    run_case(case(
        "nodeport_to_a_local_backend_keeps_the_client_address",
        node_ports,
        vec![
            send(
                tcp(ep(CLIENT), ep(NODE_PORT), SYN, b""),
                Expect::Nat {
                    src: ep(CLIENT),
                    dst: ep(LOCAL_POD),
                },
            ),
            send(
                tcp(ep(LOCAL_POD), ep(CLIENT), ACK, b""),
                Expect::RevNat(ep(NODE_PORT)),
            ),
            counters(&[
                (stat::NEW_FLOW, 1),
                (stat::REPLY, 1),
                (stat::NODEPORT_SNAT, 0),
            ]),
        ],
    ));
}

#[test]
fn nodeport_to_a_remote_backend_is_snated_and_reversed() {
    run_case(case(
        "nodeport_to_a_remote_backend_is_snated_and_reversed",
        node_ports,
        vec![
            send(
                tcp(ep(CLIENT), remote_node_port(), SYN, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            // The other node's backend answers the node address.
            send(
                tcp(ep(REMOTE_POD), snat(SNAT_PORT), ACK, b""),
                Expect::Nat {
                    src: remote_node_port(),
                    dst: ep(CLIENT),
                },
            ),
            send(
                tcp(ep(CLIENT), remote_node_port(), ACK, b"GET /"),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            counters(&[
                (stat::NEW_FLOW, 1),
                (stat::NODEPORT_SNAT, 1),
                (stat::ESTABLISHED, 1),
                (stat::REPLY, 1),
            ]),
        ],
    ));
}

#[test]
fn udp_nodeport_to_a_remote_backend_is_snated_and_reversed() {
    run_case(case(
        "udp_nodeport_to_a_remote_backend_is_snated_and_reversed",
        node_ports,
        vec![
            send(
                udp(ep(CLIENT), ep(NODE_PORT_UDP), b"query"),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_DNS),
                },
            ),
            send(
                udp(ep(REMOTE_DNS), snat(SNAT_PORT), b"answer"),
                Expect::Nat {
                    src: ep(NODE_PORT_UDP),
                    dst: ep(CLIENT),
                },
            ),
            send(
                udp_no_csum(ep(REMOTE_DNS), snat(SNAT_PORT), b"answer"),
                Expect::Nat {
                    src: ep(NODE_PORT_UDP),
                    dst: ep(CLIENT),
                },
            ),
        ],
    ));
}

#[test]
fn snat_ports_never_collide_a_taken_tuple_drops_the_new_flow() {
    // One SNAT port: a second client towards the same backend cannot get a
    // tuple of its own, so it is dropped rather than sharing one.
    run_case(case(
        "snat_ports_never_collide_a_taken_tuple_drops_the_new_flow",
        node_ports,
        vec![
            send(
                tcp(ep(CLIENT), remote_node_port(), SYN, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            send(
                tcp(ep(OTHER_CLIENT), remote_node_port(), SYN, b""),
                Expect::Dropped,
            ),
            counters(&[(stat::NODEPORT_SNAT, 1), (stat::ERR_SNAT_PORTS, 1)]),
            // The first flow is untouched by the attempt.
            send(
                tcp(ep(REMOTE_POD), snat(SNAT_PORT), ACK, b""),
                Expect::Nat {
                    src: remote_node_port(),
                    dst: ep(CLIENT),
                },
            ),
        ],
    ));
}

fn two_snat_ports(dp: &mut Datapath) {
    node_ports(dp);
    node_config(dp, SNAT_PORT + 1);
}

#[test]
fn snat_allocates_a_distinct_port_per_flow() {
    let distinct = change(|dp| {
        let mut ports: Vec<u16> = dp
            .ct()
            .into_iter()
            .filter(|(k, _)| k.dir == CT_DIR_REPLY)
            .map(|(k, _)| u16::from_be(k.dst_port_be))
            .collect();
        ports.sort();
        assert_eq!(
            ports,
            vec![SNAT_PORT, SNAT_PORT + 1],
            "two flows, two SNAT ports in the range"
        );
    });
    run_case(case(
        "snat_allocates_a_distinct_port_per_flow",
        two_snat_ports,
        vec![
            send(
                tcp(ep(CLIENT), remote_node_port(), SYN, b""),
                Expect::Snat {
                    src_addr: node_addr(),
                    ports: (SNAT_PORT, SNAT_PORT + 1),
                    dst: ep(REMOTE_POD),
                },
            ),
            send(
                tcp(ep(OTHER_CLIENT), remote_node_port(), SYN, b""),
                Expect::Snat {
                    src_addr: node_addr(),
                    ports: (SNAT_PORT, SNAT_PORT + 1),
                    dst: ep(REMOTE_POD),
                },
            ),
            distinct,
            counters(&[(stat::NODEPORT_SNAT, 2), (stat::ERR_SNAT_PORTS, 0)]),
        ],
    ));
}

#[test]
fn pods_reaching_a_nodeport_are_not_snated() {
    // The same remote backend through the internal entry: pod sources are
    // routable, so only the destination changes.
    run_case(Case {
        name: "pods_reaching_a_nodeport_are_not_snated",
        programs: BOTH,
        setup: Box::new(|dp| {
            node_ports(dp);
            dp.frontend(remote_node_port(), TCP, 5, &[2]);
        }),
        steps: vec![send(
            tcp(ep("10.1.1.9:40000"), remote_node_port(), SYN, b""),
            Expect::Nat {
                src: ep("10.1.1.9:40000"),
                dst: ep(REMOTE_POD),
            },
        )],
        allowed_errors: &[],
    });
}

#[test]
fn clusterip_is_not_served_from_outside() {
    run_case(case(
        "clusterip_is_not_served_from_outside",
        node_ports,
        vec![
            send(tcp(ep(CLIENT), ep(CLUSTER_IP), SYN, b""), Expect::Unchanged),
            counters(&[(stat::PASS_NOT_FRONTEND, 1)]),
        ],
    ));
}

/// externalTrafficPolicy Local: no local endpoint (drop) and no endpoint at
/// all (reject), with an in-cluster undeclared-port entry on the LB IP.
fn local_policy(dp: &mut Datapath) {
    node_config(dp, SNAT_PORT);
    dp.external_frontend(
        ep(NODE_PORT),
        TCP,
        1,
        &[],
        frontend_kind::NODE_PORT | service_flags::DROP_IF_EMPTY,
    );
    dp.external_frontend(
        ep(NODE_PORT_UDP),
        UDP,
        2,
        &[],
        frontend_kind::NODE_PORT | service_flags::DROP_IF_EMPTY,
    );
    dp.external_frontend(ep(LB_IP), TCP, 3, &[], frontend_kind::LOAD_BALANCER);
    dp.address_entry(ep(LB_IP).addr, SCOPE_INTERNAL, service_flags::ADDRESS_ONLY);
}

#[test]
fn local_policy_without_local_endpoints_drops_and_without_any_rejects() {
    run_case(case(
        "local_policy_without_local_endpoints_drops_and_without_any_rejects",
        local_policy,
        vec![
            send(tcp(ep(CLIENT), ep(NODE_PORT), SYN, b""), Expect::Dropped),
            send(udp(ep(CLIENT), ep(NODE_PORT_UDP), b"q"), Expect::Dropped),
            send(
                tcp(ep(CLIENT), ep(LB_IP), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            // Other ports of the address may be the node's own: passed from
            // outside, though pods get them refused.
            send(
                tcp(
                    ep(CLIENT),
                    Ep {
                        port: 22,
                        ..ep(LB_IP)
                    },
                    SYN,
                    b"",
                ),
                Expect::Unchanged,
            ),
            counters(&[(stat::DROP_NO_BACKEND, 2), (stat::REJECT_TCP_RST, 1)]),
        ],
    ));
}

/// A LoadBalancer IP open to 203.0.113.0/24 only, in both scopes.
fn source_ranges(dp: &mut Datapath) {
    node_config(dp, SNAT_PORT);
    dp.backend(1, ep(LOCAL_POD), TCP);
    let flags = frontend_kind::LOAD_BALANCER | service_flags::SOURCE_RANGES;
    dp.external_frontend(ep(LB_IP), TCP, 1, &[1], flags);
    dp.frontend_with_flags(ep(LB_IP), TCP, 2, &[1], service_flags::SOURCE_RANGES);
    dp.external_frontend(ep(NODE_PORT), TCP, 3, &[1], frontend_kind::NODE_PORT);
    dp.source_range(
        ep(LB_IP).addr,
        "203.0.113.0".parse::<std::net::Ipv4Addr>().unwrap(),
        24,
    );
}

#[test]
fn load_balancer_source_ranges_drop_other_clients_but_not_nodeports() {
    run_case(Case {
        name: "load_balancer_source_ranges_drop_other_clients_but_not_nodeports",
        programs: &[Prog::TcNode, Prog::XdpNode, Prog::Tc, Prog::Xdp],
        setup: Box::new(source_ranges),
        steps: vec![
            send(
                tcp(ep(CLIENT), ep(LB_IP), SYN, b""),
                Expect::Dnat(Target::Exact(ep(LOCAL_POD))),
            ),
            send(
                tcp(ep(OUTSIDE_RANGES), ep(LB_IP), SYN, b""),
                Expect::Dropped,
            ),
            counters(&[(stat::DROP_SOURCE_RANGE, 1)]),
        ],
        allowed_errors: &[],
    });
    // NodePort traffic is not filtered by them.
    run_case(case(
        "source_ranges_do_not_filter_nodeports",
        source_ranges,
        vec![send(
            tcp(ep(OUTSIDE_RANGES), ep(NODE_PORT), SYN, b""),
            Expect::Dnat(Target::Exact(ep(LOCAL_POD))),
        )],
    ));
}

/// Pingable addresses: the LB IP has a usable backend (ECHO), another
/// Service address has none.
fn pingable(dp: &mut Datapath) {
    node_config(dp, SNAT_PORT);
    for scope in [SCOPE_INTERNAL, SCOPE_EXTERNAL] {
        dp.address_entry(ep(LB_IP).addr, scope, service_flags::ECHO);
        dp.address_entry(
            "198.51.100.11".parse::<std::net::Ipv4Addr>().unwrap(),
            scope,
            0,
        );
    }
}

#[test]
fn pings_to_service_addresses_tell_the_truth() {
    let client = ep(CLIENT).v4();
    run_case(Case {
        name: "pings_to_service_addresses_tell_the_truth",
        programs: &[Prog::TcNode, Prog::XdpNode, Prog::Tc, Prog::Xdp],
        setup: Box::new(pingable),
        steps: vec![
            send(
                echo_request(client, ep(LB_IP).v4(), 7, 1, b"abcdefgh"),
                Expect::EchoReply,
            ),
            send(
                echo_request(client, "198.51.100.11".parse().unwrap(), 7, 2, b"x"),
                Expect::Dropped,
            ),
            // Not a Service address: none of our business.
            send(
                echo_request(client, NODE_ADDR.parse().unwrap(), 7, 3, b"x"),
                Expect::Unchanged,
            ),
            counters(&[(stat::ECHO_REPLY, 1), (stat::DROP_ECHO, 1)]),
            // Turned off: pings pass untouched, as with kube-proxy.
            change(|dp| dp.set_config(|c| c.flags &= !config_flags::ECHO_REPLY)),
            send(
                echo_request(client, ep(LB_IP).v4(), 7, 4, b"x"),
                Expect::Unchanged,
            ),
        ],
        allowed_errors: &[],
    });
}

/// A ClusterIP served from outside with --cluster-cidr: masqueraded even to
/// a backend on this node.
fn masqueraded_cluster_ip(dp: &mut Datapath) {
    node_config(dp, SNAT_PORT);
    dp.backend(1, ep(LOCAL_POD), TCP);
    dp.external_frontend(
        ep(CLUSTER_IP),
        TCP,
        1,
        &[1],
        frontend_kind::CLUSTER_IP | service_flags::MASQUERADE,
    );
}

#[test]
fn cluster_ip_from_outside_is_masqueraded_even_to_a_local_backend() {
    run_case(case(
        "cluster_ip_from_outside_is_masqueraded_even_to_a_local_backend",
        masqueraded_cluster_ip,
        vec![
            send(
                tcp(ep(CLIENT), ep(CLUSTER_IP), SYN, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(LOCAL_POD),
                },
            ),
            send(
                tcp(ep(LOCAL_POD), snat(SNAT_PORT), ACK, b""),
                Expect::Nat {
                    src: ep(CLUSTER_IP),
                    dst: ep(CLIENT),
                },
            ),
            counters(&[(stat::NODEPORT_SNAT, 1)]),
        ],
    ));
}

/// A LoadBalancer IP under policy Cluster as pods reach it: masqueraded
/// (kube-proxy's rule), to a backend on this node and to one elsewhere; the
/// answers come back to the node address and are restored for the pod.
fn masqueraded_lb_ip_for_pods(dp: &mut Datapath) {
    // One port: the two flows' reply tuples differ by backend.
    node_config(dp, SNAT_PORT);
    dp.backend(1, ep(LOCAL_POD), TCP);
    dp.backend(2, ep(REMOTE_POD), TCP);
    dp.set_backend_state(2, 0, backend_flags::REMOTE);
    dp.frontend_with_flags(
        ep(LB_IP),
        TCP,
        1,
        &[1],
        frontend_kind::LOAD_BALANCER | service_flags::MASQUERADE,
    );
    dp.frontend_with_flags(
        Ep {
            port: 81,
            ..ep(LB_IP)
        },
        TCP,
        2,
        &[2],
        frontend_kind::LOAD_BALANCER | service_flags::MASQUERADE,
    );
}

#[test]
fn pods_reaching_a_cluster_policy_lb_ip_are_masqueraded() {
    const POD_CLIENT: &str = "10.1.1.9:40000";
    let lb_ip_81 = Ep {
        port: 81,
        ..ep(LB_IP)
    };
    run_case(Case::on(
        BOTH,
        "pods_reaching_a_cluster_policy_lb_ip_are_masqueraded",
        masqueraded_lb_ip_for_pods,
        vec![
            send(
                tcp(ep(POD_CLIENT), ep(LB_IP), SYN, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(LOCAL_POD),
                },
            ),
            send(
                tcp(ep(LOCAL_POD), snat(SNAT_PORT), ACK, b""),
                Expect::Nat {
                    src: ep(LB_IP),
                    dst: ep(POD_CLIENT),
                },
            ),
            send(
                tcp(ep(POD_CLIENT), lb_ip_81, SYN, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            send(
                tcp(ep(REMOTE_POD), snat(SNAT_PORT), ACK, b""),
                Expect::Nat {
                    src: lb_ip_81,
                    dst: ep(POD_CLIENT),
                },
            ),
            counters(&[(stat::NODEPORT_SNAT, 2), (stat::HAIRPIN, 0)]),
        ],
    ));
}

#[test]
fn a_host_network_backend_is_not_masqueraded() {
    // The backend is the node's own address (a hostNetwork pod): the answer
    // to a masqueraded source would stay on loopback, so the client keeps
    // its address, as netfilter (no masquerade for local delivery).
    const POD_CLIENT: &str = "10.1.1.9:40000";
    let host_backend = Ep {
        port: 8080,
        ..snat(0)
    };
    run_case(Case::on(
        BOTH,
        "a_host_network_backend_is_not_masqueraded",
        |dp| {
            node_config(dp, SNAT_PORT);
            dp.backend(
                1,
                Ep {
                    port: 8080,
                    ..snat(0)
                },
                TCP,
            );
            dp.set_backend_state(1, 0, backend_flags::ON_NODE);
            dp.frontend_with_flags(
                ep(LB_IP),
                TCP,
                1,
                &[1],
                frontend_kind::LOAD_BALANCER | service_flags::MASQUERADE,
            );
        },
        vec![
            send(
                tcp(ep(POD_CLIENT), ep(LB_IP), SYN, b""),
                Expect::Nat {
                    src: ep(POD_CLIENT),
                    dst: host_backend,
                },
            ),
            counters(&[(stat::NODEPORT_SNAT, 0), (stat::NEW_FLOW, 1)]),
        ],
    ));
}

#[test]
fn a_closed_flows_snat_port_is_reused_at_once() {
    // FINs both ways: the tuple is in TIME_WAIT, which netfilter's NAT
    // reuses for a new connection; lb does the same, or 120 s of TIME_WAIT
    // per port would cap new connections to one backend.
    let fin = Tcp { fin: true, ..ACK };
    run_case(case(
        "a_closed_flows_snat_port_is_reused_at_once",
        node_ports,
        vec![
            send(
                tcp(ep(CLIENT), remote_node_port(), SYN, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            send(
                tcp(ep(REMOTE_POD), snat(SNAT_PORT), fin, b""),
                Expect::Nat {
                    src: remote_node_port(),
                    dst: ep(CLIENT),
                },
            ),
            send(
                tcp(ep(CLIENT), remote_node_port(), fin, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            send(
                tcp(ep(OTHER_CLIENT), remote_node_port(), SYN, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            send(
                tcp(ep(REMOTE_POD), snat(SNAT_PORT), ACK, b""),
                Expect::Nat {
                    src: remote_node_port(),
                    dst: ep(OTHER_CLIENT),
                },
            ),
            counters(&[(stat::NODEPORT_SNAT, 2), (stat::ERR_SNAT_PORTS, 0)]),
        ],
    ));
}

#[test]
fn a_reset_flows_snat_port_is_free_at_once() {
    let rst = Tcp { rst: true, ..ACK };
    run_case(case(
        "a_reset_flows_snat_port_is_free_at_once",
        node_ports,
        vec![
            send(
                tcp(ep(CLIENT), remote_node_port(), SYN, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            send(
                tcp(ep(CLIENT), remote_node_port(), rst, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            // The only port is taken again right away: an RST leaves no TIME_WAIT.
            send(
                tcp(ep(OTHER_CLIENT), remote_node_port(), SYN, b""),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_POD),
                },
            ),
            send(
                tcp(ep(REMOTE_POD), snat(SNAT_PORT), ACK, b""),
                Expect::Nat {
                    src: remote_node_port(),
                    dst: ep(OTHER_CLIENT),
                },
            ),
            counters(&[(stat::NODEPORT_SNAT, 2), (stat::ERR_SNAT_PORTS, 0)]),
        ],
    ));
}

/// Age every conntrack entry of direction `dir` by `secs` (as if its last
/// packet had passed that long ago).
fn age(dp: &mut Datapath, dir: u8, secs: u64) {
    for (k, mut v) in dp.ct() {
        if k.dir == dir {
            v.last_seen_ns = Datapath::now_ns() - secs * 1_000_000_000;
            dp.insert_ct(k, v);
        }
    }
}

#[test]
fn a_one_way_flow_keeps_its_snat_port_while_it_lives() {
    // UDP the backend never answers: its reply entry sees no packet, yet
    // the tuple is in use as long as the client sends; the forward path
    // keeps it alive (once a second).
    run_case(case(
        "a_one_way_flow_keeps_its_snat_port_while_it_lives",
        node_ports,
        vec![
            send(
                udp(ep(CLIENT), ep(NODE_PORT_UDP), b"stream"),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_DNS),
                },
            ),
            change(|dp| {
                age(dp, CT_DIR_REPLY, 29);
                age(dp, lb_common::CT_DIR_FORWARD, 2);
            }),
            send(
                udp(ep(CLIENT), ep(NODE_PORT_UDP), b"more"),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_DNS),
                },
            ),
            // 29 s old a moment ago, about to die: the client's packet renewed it.
            change(|dp| {
                let reply = dp.ct().into_iter().find(|(k, _)| k.dir == CT_DIR_REPLY);
                let (_, v) = reply.expect("reply entry");
                let idle = Datapath::now_ns() - v.last_seen_ns;
                assert!(
                    idle < 1_000_000_000,
                    "reply entry idle {idle} ns: not refreshed"
                );
            }),
            // Another client cannot take the port.
            send(
                udp(ep(OTHER_CLIENT), ep(NODE_PORT_UDP), b"query"),
                Expect::Dropped,
            ),
            counters(&[(stat::ERR_SNAT_PORTS, 1)]),
            // Once the first flow is gone too, the port is free.
            change(|dp| {
                age(dp, CT_DIR_REPLY, 31);
                age(dp, lb_common::CT_DIR_FORWARD, 31);
            }),
            send(
                udp(ep(OTHER_CLIENT), ep(NODE_PORT_UDP), b"query"),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_DNS),
                },
            ),
        ],
    ));
}

/// While flows are carried over (MIGRATING), a TCP reply to the node's SNAT
/// address at a port of lb's SNAT range that has no entry yet is dropped
/// (the backend resends it once its flow is copied) rather than handed to
/// the node's stack, which would reset the backend's connection. Other
/// ports of the node, and the same packet without the flag, pass.
#[test]
fn replies_awaiting_their_copied_flow_are_held_while_migrating() {
    run_case(case(
        "replies_awaiting_their_copied_flow_are_held_while_migrating",
        |dp| {
            node_ports(dp);
            dp.set_config(|c| c.flags |= config_flags::MIGRATING);
        },
        vec![
            send(
                tcp(ep(REMOTE_POD), snat(SNAT_PORT), ACK, b"reply"),
                Expect::Dropped,
            ),
            // Not lb's SNAT range: the node's own connection.
            send(
                tcp(ep(REMOTE_POD), snat(22), ACK, b"ssh"),
                Expect::Unchanged,
            ),
            counters(&[(stat::DROP_MIGRATING, 1)]),
            change(|dp| dp.set_config(|c| c.flags &= !config_flags::MIGRATING)),
            send(
                tcp(ep(REMOTE_POD), snat(SNAT_PORT), ACK, b"reply"),
                Expect::Unchanged,
            ),
            counters(&[(stat::DROP_MIGRATING, 1)]),
        ],
    ));
}

// ---- monitor events ----------------------------------------------------------

const EVERY_KIND: u32 = 0b1111;

fn event(kind: u8, reason: u8, rev_nat_id: u32, src: &str, dst: &str, scope: u8) -> Event {
    Event {
        kind,
        reason,
        rev_nat_id,
        src: ep(src),
        dst: ep(dst),
        backend: None,
        scope,
    }
}

#[test]
fn the_monitor_hears_why_external_packets_are_dropped_or_refused() {
    use lb_common::{event_kind as kind, event_reason as why};
    run_case(Case::on(
        &[Prog::TcNode, Prog::XdpNode],
        "the_monitor_hears_why_external_packets_are_dropped_or_refused",
        |dp| {
            local_policy(dp);
            dp.monitor(EVERY_KIND, 1);
        },
        vec![
            send(tcp(ep(CLIENT), ep(NODE_PORT), SYN, b""), Expect::Dropped),
            send(
                tcp(ep(CLIENT), ep(LB_IP), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            events(vec![
                event(
                    kind::DROP,
                    why::NO_LOCAL_ENDPOINTS,
                    1,
                    CLIENT,
                    NODE_PORT,
                    SCOPE_EXTERNAL,
                ),
                event(
                    kind::REJECT,
                    why::NO_ENDPOINTS,
                    3,
                    CLIENT,
                    LB_IP,
                    SCOPE_EXTERNAL,
                ),
            ]),
            // Only drops asked for: the refusal is not reported.
            change(|dp| dp.monitor(1 << kind::DROP, 1)),
            send(
                tcp(ep(CLIENT), ep(LB_IP), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            events(vec![]),
            // Nobody listens: nothing is written.
            change(|dp| dp.monitor(0, 0)),
            send(tcp(ep(CLIENT), ep(NODE_PORT), SYN, b""), Expect::Dropped),
            events(vec![]),
        ],
    ));
    run_case(Case::on(
        &[Prog::TcNode, Prog::XdpNode],
        "the_monitor_hears_of_source_range_drops",
        |dp| {
            source_ranges(dp);
            dp.monitor(EVERY_KIND, 1);
        },
        vec![
            send(
                tcp(ep(OUTSIDE_RANGES), ep(LB_IP), SYN, b""),
                Expect::Dropped,
            ),
            events(vec![event(
                kind::DROP,
                why::SOURCE_RANGE,
                1,
                OUTSIDE_RANGES,
                LB_IP,
                SCOPE_EXTERNAL,
            )]),
        ],
    ));
}

#[test]
fn the_monitor_hears_of_new_flows_and_in_cluster_refusals() {
    use lb_common::{event_kind as kind, event_reason as why};
    const POD: &str = "10.1.1.9:40000";
    const EMPTY: &str = "10.96.0.99:80";
    const UNDECLARED: &str = "10.96.0.10:81";
    run_case(Case::on(
        &[Prog::Tc, Prog::Xdp],
        "the_monitor_hears_of_new_flows_and_in_cluster_refusals",
        |dp| {
            dp.backend(1, ep(LOCAL_POD), TCP);
            dp.frontend(ep(CLUSTER_IP), TCP, 5, &[1]);
            dp.frontend(ep(EMPTY), TCP, 6, &[]);
            dp.address_only(ep(CLUSTER_IP).addr);
            dp.monitor(EVERY_KIND, 1);
        },
        vec![
            send(
                tcp(ep(POD), ep(CLUSTER_IP), SYN, b""),
                Expect::Dnat(Target::Exact(ep(LOCAL_POD))),
            ),
            // The flow's next packet is no new flow.
            send(
                tcp(ep(POD), ep(CLUSTER_IP), ACK, b""),
                Expect::Dnat(Target::Exact(ep(LOCAL_POD))),
            ),
            send(
                tcp(ep(POD), ep(EMPTY), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            send(
                tcp(ep(POD), ep(UNDECLARED), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            events(vec![
                Event {
                    backend: Some(ep(LOCAL_POD)),
                    ..event(kind::NEW, why::NEW_FLOW, 5, POD, CLUSTER_IP, SCOPE_INTERNAL)
                },
                event(
                    kind::REJECT,
                    why::NO_ENDPOINTS,
                    6,
                    POD,
                    EMPTY,
                    SCOPE_INTERNAL,
                ),
                event(
                    kind::REJECT,
                    why::UNDECLARED_PORT,
                    0,
                    POD,
                    UNDECLARED,
                    SCOPE_INTERNAL,
                ),
            ]),
        ],
    ));
}

#[test]
fn frontends_count_their_packets_connections_refusals_and_drops() {
    const POD: &str = "10.1.1.9:40000";
    const EMPTY: &str = "10.96.0.99:80";
    const LOCAL_ONLY: &str = "10.96.0.98:80";
    let syn = tcp(ep(POD), ep(CLUSTER_IP), SYN, b"");
    let data = tcp(ep(POD), ep(CLUSTER_IP), ACK, b"hello");
    let bytes = (syn.len() + data.len()) as u64;
    run_case(Case::on(
        &[Prog::Tc, Prog::Xdp],
        "frontends_count_their_packets_connections_refusals_and_drops",
        |dp| {
            dp.backend(1, ep(LOCAL_POD), TCP);
            dp.frontend(ep(CLUSTER_IP), TCP, 5, &[1]);
            dp.frontend(ep(EMPTY), TCP, 6, &[]);
            dp.frontend_with_flags(ep(LOCAL_ONLY), TCP, 7, &[], service_flags::DROP_IF_EMPTY);
        },
        vec![
            send(syn.clone(), Expect::Dnat(Target::Exact(ep(LOCAL_POD)))),
            send(data.clone(), Expect::Dnat(Target::Exact(ep(LOCAL_POD)))),
            send(
                tcp(ep(POD), ep(EMPTY), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            // An RST is never answered: dropped.
            send(
                tcp(ep(POD), ep(EMPTY), Tcp { rst: true, ..ACK }, b""),
                Expect::Dropped,
            ),
            send(tcp(ep(POD), ep(LOCAL_ONLY), SYN, b""), Expect::Dropped),
            change(move |dp| {
                let zero = ServiceCounters::default();
                assert_eq!(
                    dp.service_counters(5),
                    ServiceCounters {
                        packets: 2,
                        bytes,
                        new_connections: 1,
                        ..zero
                    },
                    "the frontend with a backend"
                );
                assert_eq!(
                    dp.service_counters(6),
                    ServiceCounters {
                        refused: 1,
                        dropped: 1,
                        ..zero
                    },
                    "the frontend without endpoints"
                );
                assert_eq!(
                    dp.service_counters(7),
                    ServiceCounters { dropped: 1, ..zero },
                    "the Local frontend without a local endpoint"
                );
            }),
        ],
    ));
}

// ---- unallocated Service IPs -------------------------------------------------

#[test]
fn unallocated_service_ips_are_dropped_from_pods_the_node_and_outside() {
    use lb_common::{event_kind as kind, event_reason as why};
    const POD: &str = "10.1.1.9:40000";
    const UNALLOCATED: &str = "10.96.0.77:80";
    const UNALLOCATED6: &str = "[fd00:96::77]:80";
    const POD6: &str = "[fd00:1:1::9]:40000";
    fn setup(dp: &mut Datapath) {
        dp.backend(1, ep(LOCAL_POD), TCP);
        dp.frontend(ep(CLUSTER_IP), TCP, 5, &[1]);
        dp.address_only(ep(CLUSTER_IP).addr);
        dp.service_cidrs(&["10.96.0.0/16", "fd00:96::/112"]);
        // Another proxy's ClusterIPs: allocated, not lb's.
        dp.allocated("10.96.0.88".parse().unwrap());
        dp.allocated("fd00:96::88".parse().unwrap());
        dp.monitor(1 << kind::DROP, 1);
    }
    // From pods: the unallocated address is dropped (TCP and UDP, both
    // families); an allocated one keeps its refusal of undeclared ports; an
    // address outside the CIDRs passes.
    run_case(Case::on(
        BOTH,
        "unallocated_service_ips_are_dropped_from_pods",
        setup,
        vec![
            send(tcp(ep(POD), ep(UNALLOCATED), SYN, b""), Expect::Dropped),
            send(udp(ep(POD), ep(UNALLOCATED), b"q"), Expect::Dropped),
            send(tcp(ep(POD6), ep(UNALLOCATED6), SYN, b""), Expect::Dropped),
            // A source the prefilter lists (a backend) is checked too.
            send(
                tcp(ep(LOCAL_POD), ep(UNALLOCATED), SYN, b""),
                Expect::Dropped,
            ),
            send(
                tcp(ep(POD), ep("10.96.0.10:81"), SYN, b""),
                Expect::TcpRst {
                    seq: 0,
                    ack: Some(1001),
                },
            ),
            send(
                tcp(ep(POD), ep("10.97.0.1:80"), SYN, b""),
                Expect::Unchanged,
            ),
            // Held by a Service lb does not serve: left to its proxy.
            send(
                tcp(ep(POD), ep("10.96.0.88:80"), SYN, b""),
                Expect::Unchanged,
            ),
            send(
                udp(ep(POD6), ep("[fd00:96::88]:53"), b"q"),
                Expect::Unchanged,
            ),
            counters(&[(stat::DROP_UNALLOCATED, 4), (stat::REJECT_UNDECLARED, 1)]),
            change(|dp| {
                let events = dp.events();
                assert_eq!(events.len(), 4, "{events:?}");
                for e in &events {
                    assert_eq!(
                        (e.kind, e.reason, e.rev_nat_id),
                        (kind::DROP, why::UNALLOCATED_SERVICE_IP, 0),
                        "{e:?}"
                    );
                }
            }),
        ],
    ));
    // From outside: dropped too; an allocated ClusterIP (not served from
    // outside) passes as before.
    run_case(Case::on(
        NODE,
        "unallocated_service_ips_are_dropped_from_outside",
        setup,
        vec![
            send(tcp(ep(CLIENT), ep(UNALLOCATED), SYN, b""), Expect::Dropped),
            send(tcp(ep(CLIENT), ep(CLUSTER_IP), SYN, b""), Expect::Unchanged),
            counters(&[(stat::DROP_UNALLOCATED, 1)]),
        ],
    ));
    // Programs that only restore replies refuse nothing (the node's egress
    // does drop: the node's own sockets and forwarded packets leave there).
    run_case(Case::on(
        &[Prog::TcReply, Prog::TcToPod],
        "reply_programs_pass_unallocated_service_ips",
        setup,
        vec![
            send(tcp(ep(POD), ep(UNALLOCATED), SYN, b""), Expect::Unchanged),
            counters(&[(stat::DROP_UNALLOCATED, 0)]),
        ],
    ));
    // Without Service CIDRs nothing changes.
    run_case(Case::on(
        BOTH,
        "without_service_cidrs_unallocated_addresses_pass",
        |dp| {
            setup(dp);
            dp.service_cidrs(&[]);
        },
        vec![send(
            tcp(ep(POD), ep(UNALLOCATED), SYN, b""),
            Expect::Unchanged,
        )],
    ));
}

/// An SCTP NodePort to a remote endpoint: both ends rewritten (the client
/// to the node's SNAT address and port, the NodePort to the endpoint), so
/// the CRC32c is fixed twice each way; the harness checks it against one
/// computed from scratch. And one to a local endpoint, client kept.
#[test]
fn sctp_nodeport_is_translated_and_masqueraded_with_its_crc32c_fixed() {
    const SCTP: u8 = lb_common::IPPROTO_SCTP;
    const SCTP_PORT: &str = "192.168.50.1:30038";
    const LOCAL_SCTP: &str = "10.1.1.2:3868";
    const REMOTE_SCTP: &str = "10.1.2.4:3868";
    fn setup(dp: &mut Datapath) {
        node_config(dp, SNAT_PORT);
        dp.backend(11, ep(REMOTE_SCTP), SCTP);
        dp.set_backend_state(11, 0, backend_flags::REMOTE);
        dp.backend(12, ep(LOCAL_SCTP), SCTP);
        dp.external_frontend(ep(SCTP_PORT), SCTP, 11, &[11], frontend_kind::NODE_PORT);
        dp.external_frontend(
            Ep {
                port: 30039,
                ..ep(SCTP_PORT)
            },
            SCTP,
            12,
            &[12],
            frontend_kind::NODE_PORT,
        );
    }
    let payload: Vec<u8> = (0..=255u8).cycle().take(600).collect();
    run_case(case(
        "sctp_nodeport_is_translated_and_masqueraded_with_its_crc32c_fixed",
        setup,
        vec![
            send(
                sctp(ep(CLIENT), ep(SCTP_PORT), &payload),
                Expect::Nat {
                    src: snat(SNAT_PORT),
                    dst: ep(REMOTE_SCTP),
                },
            ),
            send(
                sctp(ep(REMOTE_SCTP), snat(SNAT_PORT), b"init-ack"),
                Expect::Nat {
                    src: ep(SCTP_PORT),
                    dst: ep(CLIENT),
                },
            ),
            send(
                sctp(
                    ep(OTHER_CLIENT),
                    Ep {
                        port: 30039,
                        ..ep(SCTP_PORT)
                    },
                    b"init",
                ),
                Expect::Nat {
                    src: ep(OTHER_CLIENT),
                    dst: ep(LOCAL_SCTP),
                },
            ),
            counters(&[(stat::NEW_FLOW, 2), (stat::NODEPORT_SNAT, 1)]),
        ],
    ));
}

// Direct server return (`service_flags::DSR`): Cilium's option mode. The
// first node keeps the client's address and carries the frontend to the
// backend's node in the flow's first packet; that node restores it as the
// source of the backend's answers, which go straight to the client.

const CLIENT6: &str = "[2001:db8:f::7]:50000";
const NODE_PORT6: &str = "[2001:db8::1]:30081";
const REMOTE_POD6: &str = "[fd00:3::2]:8080";

/// This node (A) with DSR NodePorts: TCP and UDP to backends on another
/// node, TCP to one here, and an IPv6 TCP NodePort to another node.
fn dsr_node_ports(dp: &mut Datapath) {
    node_config(dp, SNAT_PORT);
    dp.backend(1, ep(LOCAL_POD), TCP);
    dp.backend(2, ep(REMOTE_POD), TCP);
    dp.set_backend_state(2, 0, backend_flags::REMOTE);
    dp.backend(3, ep(REMOTE_DNS), UDP);
    dp.set_backend_state(3, 0, backend_flags::REMOTE);
    dp.backend(4, ep(REMOTE_POD6), TCP);
    dp.set_backend_state(4, 0, backend_flags::REMOTE);
    let dsr = frontend_kind::NODE_PORT | service_flags::DSR;
    dp.external_frontend(ep(NODE_PORT), TCP, 1, &[1], dsr);
    dp.external_frontend(remote_node_port(), TCP, 2, &[2], dsr);
    dp.external_frontend(ep(NODE_PORT_UDP), UDP, 3, &[3], dsr);
    dp.external_frontend(ep(NODE_PORT6), TCP, 4, &[4], dsr);
}

/// The first node's egress program (every device but pods'), where a
/// DSR flow's packet leaves for the backend's node.
const EGRESS: Prog = Prog::TcNodeEgress;

/// A client packet of a DSR flow through the first node, `build(dst)`
/// being the packet to `dst`: in, DNATed to `backend` with the client kept;
/// out (the egress program: after tc with the node program's mark, after
/// XDP without one), with the frontend added (`option`) or as it is.
fn through_first_node(
    build: impl Fn(Ep) -> Vec<u8>,
    client: Ep,
    frontend: Ep,
    backend: Ep,
    option: bool,
) -> [Step; 2] {
    let out = if option {
        Expect::Frame(with_dsr_option(&build(backend), frontend))
    } else {
        Expect::Unchanged
    };
    [
        send(
            build(frontend),
            Expect::Nat {
                src: client,
                dst: backend,
            },
        ),
        send_on_marked(EGRESS, build(backend), out),
    ]
}

#[test]
fn dsr_carries_the_frontend_in_a_tcp_flows_syn_and_keeps_the_client() {
    let packet =
        |flags: Tcp, payload: &'static [u8]| move |dst: Ep| tcp(ep(CLIENT), dst, flags, payload);
    let (client, frontend, backend) = (ep(CLIENT), remote_node_port(), ep(REMOTE_POD));
    let mut steps = Vec::new();
    // The SYN carries the frontend; a retransmitted one carries it again.
    steps.extend(through_first_node(
        packet(SYN, b""),
        client,
        frontend,
        backend,
        true,
    ));
    steps.extend(through_first_node(
        packet(SYN, b""),
        client,
        frontend,
        backend,
        true,
    ));
    // Later packets follow the backend node's entry: DNAT only.
    steps.extend(through_first_node(
        packet(ACK, b"GET /"),
        client,
        frontend,
        backend,
        false,
    ));
    // The answers go to the client from the other node: none comes
    // here, and nothing would restore one that did.
    steps.push(send(
        tcp(ep(REMOTE_POD), ep(CLIENT), ACK, b""),
        Expect::Unchanged,
    ));
    steps.push(counters(&[
        (stat::NEW_FLOW, 1),
        (stat::ESTABLISHED, 2),
        (stat::DSR_FORWARDED, 2),
        (stat::NODEPORT_SNAT, 0),
        (stat::REPLY, 0),
    ]));
    run_case(case(
        "dsr_carries_the_frontend_in_a_tcp_flows_syn_and_keeps_the_client",
        dsr_node_ports,
        steps,
    ));
}

#[test]
fn dsr_carries_the_frontend_in_every_udp_datagram() {
    let datagram = |payload: &'static [u8], csum: bool| {
        let build = if csum { udp } else { udp_no_csum };
        through_first_node(
            move |dst| build(ep(CLIENT), dst, payload),
            ep(CLIENT),
            ep(NODE_PORT_UDP),
            ep(REMOTE_DNS),
            true,
        )
    };
    let mut steps = Vec::from(datagram(b"query", true));
    steps.extend(datagram(b"second", true));
    // Without a checksum (zero) it stays without.
    steps.extend(datagram(b"third", false));
    steps.push(counters(&[
        (stat::DSR_FORWARDED, 3),
        (stat::NODEPORT_SNAT, 0),
    ]));
    run_case(case(
        "dsr_carries_the_frontend_in_every_udp_datagram",
        dsr_node_ports,
        steps,
    ));
}

#[test]
fn dsr_carries_the_frontend_in_an_ipv6_destination_options_header() {
    let mut steps = Vec::from(through_first_node(
        |dst| tcp(ep(CLIENT6), dst, SYN, b""),
        ep(CLIENT6),
        ep(NODE_PORT6),
        ep(REMOTE_POD6),
        true,
    ));
    steps.push(send(
        tcp(ep(CLIENT6), ep(NODE_PORT6), ACK, b"GET /"),
        Expect::Nat {
            src: ep(CLIENT6),
            dst: ep(REMOTE_POD6),
        },
    ));
    steps.push(counters(&[
        (stat::DSR_FORWARDED, 1),
        (stat::ESTABLISHED, 1),
    ]));
    run_case(case(
        "dsr_carries_the_frontend_in_an_ipv6_destination_options_header",
        dsr_node_ports,
        steps,
    ));
}

#[test]
fn dsr_to_a_local_backend_keeps_the_client_without_an_option() {
    run_case(case(
        "dsr_to_a_local_backend_keeps_the_client_without_an_option",
        dsr_node_ports,
        vec![
            send(
                tcp(ep(CLIENT), ep(NODE_PORT), SYN, b""),
                Expect::Nat {
                    src: ep(CLIENT),
                    dst: ep(LOCAL_POD),
                },
            ),
            send(
                tcp(ep(LOCAL_POD), ep(CLIENT), ACK, b""),
                Expect::RevNat(ep(NODE_PORT)),
            ),
            counters(&[(stat::DSR_FORWARDED, 0), (stat::REPLY, 1)]),
        ],
    ));
}

#[test]
fn dsr_without_room_for_the_option_drops_the_packet() {
    // Forty bytes of IPv4 options (NOPs) leave no room for lb's eight.
    let full = |frame: Vec<u8>| with_ip_options(&frame, &[1; 40]);
    run_case(Case {
        allowed_errors: &[stat::ERR_DSR_OPTION],
        ..case(
            "dsr_without_room_for_the_option_drops_the_packet",
            dsr_node_ports,
            vec![
                send(
                    full(tcp(ep(CLIENT), remote_node_port(), SYN, b"")),
                    Expect::Nat {
                        src: ep(CLIENT),
                        dst: ep(REMOTE_POD),
                    },
                ),
                send_on_marked(
                    EGRESS,
                    full(tcp(ep(CLIENT), ep(REMOTE_POD), SYN, b"")),
                    // Answered by the endpoint's node from its own address, the
                    // client would drop it: dropped here, as Cilium does.
                    Expect::Dropped,
                ),
                counters(&[(stat::ERR_DSR_OPTION, 1), (stat::DSR_FORWARDED, 0)]),
            ],
        )
    });
}

/// The backend's node (B): its endpoint of the Service, and no frontend
/// for the other node's NodePort address.
fn dsr_backend_node(dp: &mut Datapath) {
    node_config(dp, SNAT_PORT);
    dp.backend(1, ep(LOCAL_POD), TCP);
    dp.backend(2, ep(REMOTE_POD6), TCP);
}

/// Where packets from another node arrive: node devices (tc, XDP) and
/// other devices (not pod devices: a pod must not teach the node).
const ARRIVALS: &[Prog] = &[Prog::TcNode, Prog::XdpNode, Prog::TcReply];

#[test]
fn dsr_backend_node_answers_the_client_from_the_frontend() {
    let other_node_port = ep("192.168.50.2:30081");
    let other_node_port6 = ep("[2001:db8::2]:30081");
    run_case(Case::on(
        ARRIVALS,
        "dsr_backend_node_answers_the_client_from_the_frontend",
        dsr_backend_node,
        vec![
            send(
                with_dsr_option(&tcp(ep(CLIENT), ep(LOCAL_POD), SYN, b""), other_node_port),
                Expect::Unchanged,
            ),
            // The backend's answer leaves its pod device: from the frontend.
            send_on(
                Prog::Tc,
                tcp(ep(LOCAL_POD), ep(CLIENT), ACK, b""),
                Expect::RevNat(other_node_port),
            ),
            send(
                tcp(ep(CLIENT), ep(LOCAL_POD), ACK, b"GET /"),
                Expect::Unchanged,
            ),
            send_on(
                Prog::Tc,
                tcp(ep(LOCAL_POD), ep(CLIENT), ACK, b"200 OK"),
                Expect::RevNat(other_node_port),
            ),
            send(
                with_dsr_option(
                    &tcp(ep(CLIENT6), ep(REMOTE_POD6), SYN, b""),
                    other_node_port6,
                ),
                Expect::Unchanged,
            ),
            send_on(
                Prog::Tc,
                tcp(ep(REMOTE_POD6), ep(CLIENT6), ACK, b""),
                Expect::RevNat(other_node_port6),
            ),
            counters(&[(stat::DSR_LEARNED, 2), (stat::REPLY, 3)]),
            // An option naming no frontend (0.0.0.0, port 0) teaches nothing.
            send(
                with_dsr_option(
                    &tcp(ep(OTHER_CLIENT), ep(LOCAL_POD), SYN, b""),
                    ep("0.0.0.0:30081"),
                ),
                Expect::Unchanged,
            ),
            send(
                with_dsr_option(
                    &tcp(ep(OTHER_CLIENT), ep(LOCAL_POD), SYN, b""),
                    ep("192.168.50.2:0"),
                ),
                Expect::Unchanged,
            ),
            send_on(
                Prog::Tc,
                tcp(ep(LOCAL_POD), ep(OTHER_CLIENT), ACK, b""),
                Expect::Unchanged,
            ),
            counters(&[(stat::DSR_LEARNED, 2)]),
        ],
    ));
}

#[test]
fn dsr_options_from_pods_and_from_udp_datagrams() {
    let other_node_port = ep("192.168.50.2:30053");
    run_case(Case::on(
        BOTH,
        "dsr_options_from_pods_and_from_udp_datagrams",
        |dp| {
            dsr_backend_node(dp);
            dp.backend(3, ep(REMOTE_DNS), UDP);
        },
        vec![
            // A pod's packet carrying the option teaches nothing: a pod
            // must not choose the source of another pod's answers.
            send(
                with_dsr_option(&udp(ep(CLIENT), ep(REMOTE_DNS), b"q"), other_node_port),
                Expect::Unchanged,
            ),
            send(udp(ep(REMOTE_DNS), ep(CLIENT), b"a"), Expect::Unchanged),
            // From another node it does.
            send_on(
                Prog::TcReply,
                with_dsr_option(&udp(ep(CLIENT), ep(REMOTE_DNS), b"q"), other_node_port),
                Expect::Unchanged,
            ),
            send(
                udp(ep(REMOTE_DNS), ep(CLIENT), b"a"),
                Expect::RevNat(other_node_port),
            ),
            counters(&[(stat::DSR_LEARNED, 1)]),
        ],
    ));
}

#[test]
fn dsr_egress_adds_the_option_once_on_stacked_devices() {
    // A VLAN device and its parent (a bond and its ports) each run the
    // egress program: the second sees the option and leaves it be.
    let mut steps = Vec::new();
    for (client, frontend, backend) in [
        (ep(CLIENT), remote_node_port(), ep(REMOTE_POD)),
        (ep(CLIENT6), ep(NODE_PORT6), ep(REMOTE_POD6)),
    ] {
        let syn = move |dst| tcp(client, dst, SYN, b"");
        steps.extend(through_first_node(syn, client, frontend, backend, true));
        steps.push(send_on_marked(
            EGRESS,
            with_dsr_option(&syn(backend), frontend),
            Expect::Unchanged,
        ));
    }
    steps.push(counters(&[(stat::DSR_FORWARDED, 2)]));
    run_case(case(
        "dsr_egress_adds_the_option_once_on_stacked_devices",
        dsr_node_ports,
        steps,
    ));
}

#[test]
fn dsr_egress_drops_what_cannot_carry_the_right_frontend() {
    // The client's own option naming another frontend: the endpoint's node
    // would answer for it.
    let forged = with_dsr_option(
        &tcp(ep(CLIENT), ep(REMOTE_POD), SYN, b""),
        ep("192.0.2.99:443"),
    );
    // An IPv6 atomic fragment: a Fragment header before the upper layer,
    // where the endpoint's node reads lb's header only.
    let atomic = |frame: Vec<u8>| fragment(&frame, 64, 7).remove(0);
    run_case(Case {
        allowed_errors: &[stat::ERR_DSR_OPTION],
        ..case(
            "dsr_egress_drops_what_cannot_carry_the_right_frontend",
            dsr_node_ports,
            vec![
                send(
                    tcp(ep(CLIENT), remote_node_port(), SYN, b""),
                    Expect::Nat {
                        src: ep(CLIENT),
                        dst: ep(REMOTE_POD),
                    },
                ),
                send_on_marked(EGRESS, forged, Expect::Dropped),
                send(
                    atomic(tcp(ep(CLIENT6), ep(NODE_PORT6), SYN, b"")),
                    Expect::Frame(atomic(tcp(ep(CLIENT6), ep(REMOTE_POD6), SYN, b""))),
                ),
                send_on_marked(
                    EGRESS,
                    atomic(tcp(ep(CLIENT6), ep(REMOTE_POD6), SYN, b"")),
                    Expect::Dropped,
                ),
                counters(&[(stat::ERR_DSR_OPTION, 2), (stat::DSR_FORWARDED, 0)]),
            ],
        )
    });
}

/// The DSR entries of `dp` (flag `bit`): (direction, lifetime) each.
fn dsr_lifetimes(dp: &mut Datapath, bit: u16) -> Vec<(u8, u32)> {
    dp.ct()
        .iter()
        .filter(|(_, v)| v.flags & bit != 0)
        .map(|(k, v)| (k.dir, v.lifetime_s))
        .collect()
}

#[test]
fn dsr_entries_age_by_the_side_they_see() {
    let fin = Tcp { fin: true, ..ACK };
    let packet = |flags: Tcp| move |dst: Ep| tcp(ep(CLIENT), dst, flags, b"");
    let (client, frontend, backend) = (ep(CLIENT), remote_node_port(), ep(REMOTE_POD));
    let mut steps = Vec::from(through_first_node(
        packet(SYN),
        client,
        frontend,
        backend,
        true,
    ));
    // The client's ACK says the connection is up (no answer is ever seen
    // here): established lifetimes.
    steps.extend(through_first_node(
        packet(ACK),
        client,
        frontend,
        backend,
        false,
    ));
    steps.push(change(|dp| {
        let mut got = dsr_lifetimes(dp, ct_flags::DSR);
        got.sort();
        assert_eq!(
            got,
            [
                (CT_DIR_FORWARD, ct_lifetime::TCP_ESTABLISHED),
                (CT_DIR_REPLY, ct_lifetime::TCP_ESTABLISHED)
            ]
        );
    }));
    // The client's FIN closes it: the other side is never seen.
    steps.extend(through_first_node(
        packet(fin),
        client,
        frontend,
        backend,
        false,
    ));
    steps.push(change(|dp| {
        let got = dsr_lifetimes(dp, ct_flags::DSR);
        assert_eq!(got.len(), 2);
        assert!(
            got.iter().all(|(_, l)| *l == ct_lifetime::TCP_TIME_WAIT),
            "{got:?}"
        );
    }));
    // UDP: a second datagram says the flow is up (120 s, not 30).
    for payload in [&b"one"[..], b"two"] {
        steps.push(send(
            udp(ep(CLIENT), ep(NODE_PORT_UDP), payload),
            Expect::Nat {
                src: ep(CLIENT),
                dst: ep(REMOTE_DNS),
            },
        ));
    }
    steps.push(change(|dp| {
        let udp_forward: Vec<u32> = dp
            .ct()
            .iter()
            .filter(|(k, v)| {
                k.proto == UDP && k.dir == CT_DIR_FORWARD && v.flags & ct_flags::DSR != 0
            })
            .map(|(_, v)| v.lifetime_s)
            .collect();
        assert_eq!(udp_forward, [ct_lifetime::OTHER_REPLIED]);
    }));
    run_case(case(
        "dsr_entries_age_by_the_side_they_see",
        dsr_node_ports,
        steps,
    ));
}

#[test]
fn dsr_learning_spares_live_flows_and_follows_the_clients_close() {
    let other_node_port = ep("192.168.50.2:30081");
    let fin = Tcp { fin: true, ..ACK };
    run_case(Case::on(
        ARRIVALS,
        "dsr_learning_spares_live_flows_and_follows_the_clients_close",
        |dp| {
            dsr_backend_node(dp);
            // This node's own NodePort to its pod, policy Local (client kept).
            dp.external_frontend(ep(NODE_PORT), TCP, 7, &[1], frontend_kind::NODE_PORT);
        },
        vec![
            // A flow this node translated: its reply entry is live.
            send_on(
                Prog::TcNode,
                tcp(ep(CLIENT), ep(NODE_PORT), SYN, b""),
                Expect::Nat {
                    src: ep(CLIENT),
                    dst: ep(LOCAL_POD),
                },
            ),
            // A packet of the same tuple claiming another frontend does not
            // take its answers.
            send(
                with_dsr_option(&tcp(ep(CLIENT), ep(LOCAL_POD), SYN, b""), other_node_port),
                Expect::Unchanged,
            ),
            send_on(
                Prog::Tc,
                tcp(ep(LOCAL_POD), ep(CLIENT), ACK, b""),
                Expect::RevNat(ep(NODE_PORT)),
            ),
            counters(&[(stat::DSR_LEARNED, 0)]),
            // Another client's DSR flow is learnt, and ages by the client's
            // FIN (which carries no option) as well as the backend's.
            send(
                with_dsr_option(
                    &tcp(ep(OTHER_CLIENT), ep(LOCAL_POD), SYN, b""),
                    other_node_port,
                ),
                Expect::Unchanged,
            ),
            send_on(
                Prog::Tc,
                tcp(ep(LOCAL_POD), ep(OTHER_CLIENT), ACK, b""),
                Expect::RevNat(other_node_port),
            ),
            change(|dp| {
                assert_eq!(
                    dsr_lifetimes(dp, ct_flags::DSR_LEARNT),
                    [(CT_DIR_REPLY, ct_lifetime::TCP_ESTABLISHED)]
                );
            }),
            send(
                tcp(ep(OTHER_CLIENT), ep(LOCAL_POD), fin, b""),
                Expect::Unchanged,
            ),
            change(|dp| {
                assert_eq!(
                    dsr_lifetimes(dp, ct_flags::DSR_LEARNT),
                    [(CT_DIR_REPLY, ct_lifetime::TCP_TIME_WAIT)]
                );
            }),
            counters(&[(stat::DSR_LEARNED, 1)]),
        ],
    ));
}
