//! kube-proxy's own packet-flow tables, ported to real traffic.
//!
//! The cases of `runPacketFlowTests` in kube-proxy's
//! pkg/proxy/nftables/proxier_test.go (TestInternalExternalMasquerade,
//! TestExternalTrafficPolicyLocal / Cluster, TestLoadBalancer, TestNodePorts,
//! TestInternalTrafficPolicy, TestTerminatingEndpointsTrafficPolicyLocal /
//! Cluster, TestNoEndpointsReject), with their names, run as curl requests
//! through node A running lb with its defaults (plus `--cluster-cidr`, the
//! local-traffic detector those tables assume, and `--nodeport-addresses`,
//! kube-proxy's default of the primary node IP), in IPv4 and IPv6. Each case
//! says which endpoints may answer, whether the endpoint sees a node address
//! (masqueraded) or the client's own, or that the connection is dropped /
//! rejected.
//!
//! Upstream addresses map onto the rig: the node is node A; "pod" is a client
//! pod on node A; "external" a host on the LAN (inside the source ranges),
//! "blocked" one outside them; "local" endpoints are addresses of a pod on
//! node A, "remote" ones of a pod on node B (no agent there: nothing of lb
//! helps the remote side). Endpoint `a3` is the fourth address of the pod on
//! node A, `b0` the first of the one on node B.
//!
//! "same node to LB1, SNATted to LB1" is a LAN host whose traffic to the LB
//! IPs is source-NATed to the LB IP itself (what the tables assume a cloud
//! load balancer's hairpin does), with node A routing the LB IPs back to it.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::e2e::{Cluster, Lan, Pod, node_addresses, try_field};

const NODE_A: [&str; 2] = ["192.168.50.1", "2001:db8:50::1"];
const NODE_B: [&str; 2] = ["192.168.50.2", "2001:db8:50::2"];
/// A second address on node A's device, outside --nodeport-addresses.
const NODE_A_ALT: [&str; 2] = ["192.168.51.1", "2001:db8:51::1"];
const EXTERNAL: [&str; 2] = ["192.168.50.100", "2001:db8:50::64"];
const BLOCKED: [&str; 2] = ["192.168.50.200", "2001:db8:50::c8"];
const HAIRPIN: [&str; 2] = ["192.168.50.150", "2001:db8:50::96"];
const CLIENT_POD: [&str; 2] = ["10.1.1.2", "fd00:1:1::2"];
/// LoadBalancerSourceRanges of svc4: the LAN's lower half (node A, the
/// external client and the hairpin host; not the blocked client). The
/// leading space is upstream's whitespace regression.
const SOURCE_RANGES: [&str; 2] = ["192.168.50.0/25", " 2001:db8:50::/121"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn i(self) -> usize {
        self as usize
    }

    fn cluster_ip(self, svc: u8) -> String {
        match self {
            Family::V4 => format!("10.96.0.{svc}"),
            Family::V6 => format!("fd00:96::{svc}"),
        }
    }

    fn lb_ip(self, k: u8) -> String {
        match self {
            Family::V4 => format!("198.51.100.{k}"),
            Family::V6 => format!("2001:db8:ff::{k}"),
        }
    }

    fn external_ip(self, k: u8) -> String {
        match self {
            Family::V4 => format!("192.0.2.{k}"),
            Family::V6 => format!("2001:db8:fe::{k}"),
        }
    }

    /// Endpoint "a3" / "b0": the k-th address of the pod on node A / B;
    /// "n0": node A's own address (a hostNetwork endpoint).
    fn endpoint(self, name: &str) -> String {
        if name == "n0" {
            return NODE_A[self.i()].to_string();
        }
        let (node, k) = name.split_at(1);
        let k: u8 = k.parse().expect("endpoint index");
        let subnet = if node == "a" { 1 } else { 2 };
        match self {
            Family::V4 => format!("10.1.{subnet}.{}", 10 + k),
            Family::V6 => format!("fd00:1:{subnet}::{}", 10 + k),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Src {
    Pod,
    Node,
    External,
    Blocked,
    /// Source-NATed to the LB IP it connects to.
    Hairpin,
    /// Node A's socket bound to LB IP k, which node A holds (as a cloud's
    /// guest agent adds it).
    NodeBound(u8),
}

#[derive(Clone, Copy, Debug)]
enum Dst {
    ClusterIp(u8),
    /// The Service's nodePort (30000 + n) on node A's address.
    NodePort(u8),
    NodePortAlt(u8),
    Lb(u8),
    ExternalIp(u8),
}

#[derive(Clone, Copy, Debug)]
enum Want {
    /// These endpoints answer (all of them, over enough requests), seeing
    /// the client as `Seen` says.
    Endpoints(&'static [&'static str], Seen),
    Drop,
    Reject,
    /// No rule: the node's own stack refuses (nothing listens there).
    NotServed,
}

/// The client address an endpoint sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// A node address: masqueraded.
    Masqueraded,
    /// The client's own.
    Kept,
    /// The client's own on this node's endpoints, a node address on the
    /// others' (--masquerade-cluster-policy=false).
    KeptIfLocal,
}

const MASQ: Seen = Seen::Masqueraded;
const KEPT: Seen = Seen::Kept;

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    src: Src,
    dst: Dst,
    want: Want,
}

const fn case(name: &'static str, src: Src, dst: Dst, want: Want) -> Case {
    Case {
        name,
        src,
        dst,
        want,
    }
}

use Dst::*;
use Src::*;
use Want::*;

const BOTH: &[&str] = &["a0", "b0"];
const LOCAL: &[&str] = &["a0"];
const REMOTE: &[&str] = &["b0"];

/// svc1: eTP Cluster; svc2: eTP Local; svc3: iTP Local (all LoadBalancer,
/// endpoints a0 and b0).
const INTERNAL_EXTERNAL_MASQUERADE: &[Case] = &[
    case("pod to ClusterIP", Pod, ClusterIp(1), Endpoints(BOTH, KEPT)),
    case("pod to NodePort", Pod, NodePort(1), Endpoints(BOTH, MASQ)),
    case("pod to LB", Pod, Lb(1), Endpoints(BOTH, MASQ)),
    case(
        "node to ClusterIP",
        Node,
        ClusterIp(1),
        Endpoints(BOTH, MASQ),
    ),
    case("node to NodePort", Node, NodePort(1), Endpoints(BOTH, MASQ)),
    case("node to LB", Node, Lb(1), Endpoints(BOTH, MASQ)),
    case(
        "external to ClusterIP",
        External,
        ClusterIp(1),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "external to NodePort",
        External,
        NodePort(1),
        Endpoints(BOTH, MASQ),
    ),
    case("external to LB", External, Lb(1), Endpoints(BOTH, MASQ)),
    case(
        "pod to ClusterIP with eTP:Local",
        Pod,
        ClusterIp(2),
        Endpoints(BOTH, KEPT),
    ),
    case(
        "pod to NodePort with eTP:Local",
        Pod,
        NodePort(2),
        Endpoints(BOTH, KEPT),
    ),
    case(
        "pod to LB with eTP:Local",
        Pod,
        Lb(2),
        Endpoints(BOTH, KEPT),
    ),
    case(
        "node to ClusterIP with eTP:Local",
        Node,
        ClusterIp(2),
        Endpoints(BOTH, MASQ),
    ),
    // Upstream's case sends to svc1's nodePort.
    case(
        "node to NodePort with eTP:Local",
        Node,
        NodePort(1),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "node to LB with eTP:Local",
        Node,
        Lb(2),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "external to ClusterIP with eTP:Local",
        External,
        ClusterIp(2),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "external to NodePort with eTP:Local",
        External,
        NodePort(2),
        Endpoints(LOCAL, KEPT),
    ),
    case(
        "external to LB with eTP:Local",
        External,
        Lb(2),
        Endpoints(LOCAL, KEPT),
    ),
    case(
        "pod to ClusterIP with iTP:Local",
        Pod,
        ClusterIp(3),
        Endpoints(LOCAL, KEPT),
    ),
    case(
        "pod to NodePort with iTP:Local",
        Pod,
        NodePort(3),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "pod to LB with iTP:Local",
        Pod,
        Lb(3),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "node to ClusterIP with iTP:Local",
        Node,
        ClusterIp(3),
        Endpoints(LOCAL, MASQ),
    ),
    case(
        "node to NodePort with iTP:Local",
        Node,
        NodePort(3),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "node to LB with iTP:Local",
        Node,
        Lb(3),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "external to ClusterIP with iTP:Local",
        External,
        ClusterIp(3),
        Endpoints(LOCAL, MASQ),
    ),
    case(
        "external to NodePort with iTP:Local",
        External,
        NodePort(3),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "external to LB with iTP:Local",
        External,
        Lb(3),
        Endpoints(BOTH, MASQ),
    ),
];

/// svc2 (eTP Local, externalIP 2).
const EXTERNAL_TRAFFIC_POLICY_LOCAL: &[Case] = &[
    case(
        "pod to cluster IP hits both endpoints, unmasqueraded",
        Pod,
        ClusterIp(2),
        Endpoints(BOTH, KEPT),
    ),
    case(
        "pod to external IP hits both endpoints, unmasqueraded",
        Pod,
        ExternalIp(2),
        Endpoints(BOTH, KEPT),
    ),
    case(
        "external to external IP hits only local endpoint, unmasqueraded",
        External,
        ExternalIp(2),
        Endpoints(LOCAL, KEPT),
    ),
    case(
        "pod to LB IP hits only both endpoints, unmasqueraded",
        Pod,
        Lb(2),
        Endpoints(BOTH, KEPT),
    ),
    case(
        "external to LB IP hits only local endpoint, unmasqueraded",
        External,
        Lb(2),
        Endpoints(LOCAL, KEPT),
    ),
    case(
        "pod to NodePort hits both endpoints, unmasqueraded",
        Pod,
        NodePort(2),
        Endpoints(BOTH, KEPT),
    ),
    case(
        "external to NodePort hits only local endpoint, unmasqueraded",
        External,
        NodePort(2),
        Endpoints(LOCAL, KEPT),
    ),
];

/// svc1 (eTP Cluster, externalIP 1).
const EXTERNAL_TRAFFIC_POLICY_CLUSTER: &[Case] = &[
    case(
        "pod to cluster IP hits both endpoints, unmasqueraded",
        Pod,
        ClusterIp(1),
        Endpoints(BOTH, KEPT),
    ),
    case(
        "pod to external IP hits both endpoints, masqueraded",
        Pod,
        ExternalIp(1),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "external to external IP hits both endpoints, masqueraded",
        External,
        ExternalIp(1),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "pod to LB IP hits both endpoints, masqueraded",
        Pod,
        Lb(1),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "external to LB IP hits both endpoints, masqueraded",
        External,
        Lb(1),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "pod to NodePort hits both endpoints, masqueraded",
        Pod,
        NodePort(1),
        Endpoints(BOTH, MASQ),
    ),
    case(
        "external to NodePort hits both endpoints, masqueraded",
        External,
        NodePort(1),
        Endpoints(BOTH, MASQ),
    ),
];

/// svc4: eTP Cluster, LB1 = LB IP 4, LB2 = LB IP 5, source ranges, one
/// remote endpoint.
const LOAD_BALANCER: &[Case] = &[
    case(
        "pod to cluster IP",
        Pod,
        ClusterIp(4),
        Endpoints(REMOTE, KEPT),
    ),
    case(
        "external to nodePort",
        External,
        NodePort(4),
        Endpoints(REMOTE, MASQ),
    ),
    case(
        "nodePort bypasses LoadBalancerSourceRanges",
        Blocked,
        NodePort(4),
        Endpoints(REMOTE, MASQ),
    ),
    case(
        "accepted external to LB1",
        External,
        Lb(4),
        Endpoints(REMOTE, MASQ),
    ),
    case(
        "accepted external to LB2",
        External,
        Lb(5),
        Endpoints(REMOTE, MASQ),
    ),
    case("blocked external to LB1", Blocked, Lb(4), Drop),
    case("blocked external to LB2", Blocked, Lb(5), Drop),
    case(
        "pod to LB1 (blocked by LoadBalancerSourceRanges)",
        Pod,
        Lb(4),
        Drop,
    ),
    case(
        "pod to LB2 (blocked by LoadBalancerSourceRanges)",
        Pod,
        Lb(5),
        Drop,
    ),
    case(
        "node to LB1 (allowed by LoadBalancerSourceRanges)",
        Node,
        Lb(4),
        Endpoints(REMOTE, MASQ),
    ),
    case(
        "node to LB2 (allowed by LoadBalancerSourceRanges)",
        Node,
        Lb(5),
        Endpoints(REMOTE, MASQ),
    ),
    case(
        "same node to LB1, SNATted to LB1 (implicitly allowed)",
        Hairpin,
        Lb(4),
        Endpoints(REMOTE, MASQ),
    ),
    case(
        "same node to LB2, SNATted to LB2 (implicitly allowed)",
        Hairpin,
        Lb(5),
        Endpoints(REMOTE, MASQ),
    ),
];

/// svc1 as a NodePort Service; node A's second address is outside
/// --nodeport-addresses (upstream's "ipv4" / "ipv6" sub-tests).
const NODE_PORTS: &[Case] = &[
    case(
        "pod to cluster IP",
        Pod,
        ClusterIp(1),
        Endpoints(BOTH, KEPT),
    ),
    case(
        "external to nodePort",
        External,
        NodePort(1),
        Endpoints(BOTH, MASQ),
    ),
    case("node to nodePort", Node, NodePort(1), Endpoints(BOTH, MASQ)),
    case(
        "secondary nodeIP ignores NodePorts",
        External,
        NodePortAlt(1),
        NotServed,
    ),
];

/// svc5: LoadBalancer with externalIP 5 and LB IP 8, no endpoints.
const NO_ENDPOINTS_REJECT: &[Case] = &[
    case(
        "pod to cluster IP with no endpoints",
        Pod,
        ClusterIp(5),
        Reject,
    ),
    case(
        "external to external IP with no endpoints",
        External,
        ExternalIp(5),
        Reject,
    ),
    case(
        "pod to NodePort with no endpoints",
        Pod,
        NodePort(5),
        Reject,
    ),
    case(
        "external to NodePort with no endpoints",
        External,
        NodePort(5),
        Reject,
    ),
    case(
        "pod to LoadBalancer IP with no endpoints",
        Pod,
        Lb(8),
        Reject,
    ),
    case(
        "external to LoadBalancer IP with no endpoints",
        External,
        Lb(8),
        Reject,
    ),
];

/// lb's own cases beside kube-proxy's: svc9 (policy Cluster, LB IP 9) whose
/// endpoint is node A's own address, a hostNetwork pod. Locally delivered,
/// it is not masqueraded (netfilter's masquerade does not apply there, and
/// the answer to a node address would never leave the node).
const HOST_NETWORK: &[Case] = &[
    // svc10 (policy Cluster, only endpoint b0): kube-proxy masquerades the
    // node's traffic to LB IPs; socket-level LB cannot change a bound
    // source, so the node's egress program masquerades the connection.
    case(
        "node to LB from a socket bound to the LB IP",
        NodeBound(10),
        Lb(10),
        Endpoints(REMOTE, MASQ),
    ),
    case(
        "pod to LB of a hostNetwork endpoint",
        Pod,
        Lb(9),
        Endpoints(&["n0"], KEPT),
    ),
    case(
        "external to LB of a hostNetwork endpoint",
        External,
        Lb(9),
        Endpoints(&["n0"], KEPT),
    ),
];

/// An endpoint of a sub-test's slice: (name, node-local, ready, serving, terminating).
type Ep = (&'static str, bool, bool, bool, bool);

/// A sub-test: the Service's endpoints, then its cases.
struct SubTest {
    name: &'static str,
    endpoints: &'static [Ep],
    cases: &'static [Case],
}

/// svc8: ClusterIP, iTP per sub-test (TestInternalTrafficPolicy).
const ITP_CLUSTER: &[Case] = &[case(
    "pod to ClusterIP hits all endpoints",
    Pod,
    ClusterIp(8),
    Endpoints(&["a1", "b2", "b3"], KEPT),
)];
const ITP_LOCAL_ONE: &[Case] = &[case(
    "pod to ClusterIP hits only local endpoint",
    Pod,
    ClusterIp(8),
    Endpoints(&["a1"], KEPT),
)];
const ITP_LOCAL_MANY: &[Case] = &[case(
    "pod to ClusterIP hits all local endpoints",
    Pod,
    ClusterIp(8),
    Endpoints(&["a1", "a2"], KEPT),
)];
const ITP_LOCAL_NONE: &[Case] = &[case("no endpoints", Pod, ClusterIp(8), Drop)];
const AFTER_DELETE_ITP: &[Case] = &[case("endpoints deleted", Pod, ClusterIp(8), Reject)];

const R: (bool, bool, bool) = (true, true, false);
/// Serving and terminating.
const ST: (bool, bool, bool) = (false, true, true);
/// Terminating, not serving.
const T: (bool, bool, bool) = (false, false, true);
const fn ep(name: &'static str, local: bool, c: (bool, bool, bool)) -> Ep {
    (name, local, c.0, c.1, c.2)
}

/// Upstream endpoint 10.0.1.k is `a<k>` when on this node, `b<k>` elsewhere.
const TERMINATING_LOCAL: &[SubTest] = &[
    SubTest {
        name: "ready endpoints exist",
        endpoints: &[
            ep("a1", true, R),
            ep("a2", true, R),
            ep("a3", true, ST),
            ep("a4", true, T),
            ep("b5", false, R),
        ],
        cases: &[
            case(
                "pod to clusterIP",
                Pod,
                ClusterIp(6),
                Endpoints(&["a1", "a2", "b5"], KEPT),
            ),
            case(
                "external to LB",
                External,
                Lb(6),
                Endpoints(&["a1", "a2"], KEPT),
            ),
        ],
    },
    SubTest {
        name: "only terminating endpoints exist",
        endpoints: &[
            ep("a2", true, ST),
            ep("a3", true, ST),
            ep("a4", true, T),
            ep("b5", false, R),
        ],
        cases: &[
            case(
                "pod to clusterIP",
                Pod,
                ClusterIp(6),
                Endpoints(&["b5"], KEPT),
            ),
            case(
                "external to LB",
                External,
                Lb(6),
                Endpoints(&["a2", "a3"], KEPT),
            ),
        ],
    },
    SubTest {
        name: "terminating endpoints on remote node",
        endpoints: &[ep("b5", false, ST)],
        cases: &[
            case(
                "pod to clusterIP",
                Pod,
                ClusterIp(6),
                Endpoints(&["b5"], KEPT),
            ),
            case(
                "external to LB, no locally-usable endpoints",
                External,
                Lb(6),
                Drop,
            ),
        ],
    },
    SubTest {
        name: "no usable endpoints on any node",
        endpoints: &[ep("a5", true, T), ep("b5", false, T)],
        cases: &[
            case(
                "pod to clusterIP, no usable endpoints",
                Pod,
                ClusterIp(6),
                Reject,
            ),
            case(
                "external to LB, no usable endpoints",
                External,
                Lb(6),
                Reject,
            ),
        ],
    },
];

const TERMINATING_CLUSTER: &[SubTest] = &[
    SubTest {
        name: "ready endpoints exist",
        endpoints: &[
            ep("a1", true, R),
            ep("a2", true, R),
            ep("b3", false, ST),
            ep("b4", false, T),
            ep("b5", false, R),
        ],
        cases: &[
            case(
                "pod to clusterIP",
                Pod,
                ClusterIp(7),
                Endpoints(&["a1", "a2", "b5"], KEPT),
            ),
            case(
                "external to LB",
                External,
                Lb(7),
                Endpoints(&["a1", "a2", "b5"], MASQ),
            ),
        ],
    },
    SubTest {
        name: "only terminating endpoints exist",
        endpoints: &[
            ep("a2", true, ST),
            ep("a3", true, ST),
            ep("b4", false, T),
            ep("b5", false, ST),
        ],
        cases: &[
            case(
                "pod to clusterIP",
                Pod,
                ClusterIp(7),
                Endpoints(&["a2", "a3", "b5"], KEPT),
            ),
            case(
                "external to LB",
                External,
                Lb(7),
                Endpoints(&["a2", "a3", "b5"], MASQ),
            ),
        ],
    },
    SubTest {
        name: "terminating endpoints on remote node",
        endpoints: &[ep("b5", false, ST)],
        cases: &[
            case(
                "pod to clusterIP",
                Pod,
                ClusterIp(7),
                Endpoints(&["b5"], KEPT),
            ),
            case("external to LB", External, Lb(7), Endpoints(&["b5"], MASQ)),
        ],
    },
    SubTest {
        name: "no usable endpoints on any node",
        endpoints: &[ep("a5", true, T), ep("b5", false, T)],
        cases: &[
            case("pod to clusterIP", Pod, ClusterIp(7), Reject),
            case("external to LB", External, Lb(7), Reject),
        ],
    },
];

const INTERNAL_TRAFFIC_POLICY: &[SubTest] = &[
    SubTest {
        name: "internalTrafficPolicy is cluster",
        endpoints: &[ep("a1", true, R), ep("b2", false, R), ep("b3", false, R)],
        cases: ITP_CLUSTER,
    },
    SubTest {
        name: "internalTrafficPolicy is local and there is one local endpoint",
        endpoints: &[ep("a1", true, R), ep("b2", false, R), ep("b3", false, R)],
        cases: ITP_LOCAL_ONE,
    },
    SubTest {
        name: "internalTrafficPolicy is local and there are multiple local endpoints",
        endpoints: &[ep("a1", true, R), ep("a2", true, R), ep("b3", false, R)],
        cases: ITP_LOCAL_MANY,
    },
    SubTest {
        name: "internalTrafficPolicy is local and there are no local endpoints",
        endpoints: &[ep("b1", false, R), ep("b2", false, R), ep("b3", false, R)],
        cases: ITP_LOCAL_NONE,
    },
];

struct Rig {
    a: Cluster,
    _b: Cluster,
    client_pod: Pod,
    node: Pod,
    external: Pod,
    blocked: Pod,
    hairpin: Pod,
    /// Every address of node A (a masqueraded flow shows one of them).
    node_addresses: BTreeSet<IpAddr>,
    _lan: Lan,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

fn in_ns(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(out.status.success(), "{ns}: {args:?}: {out:?}");
}

/// Give a pod more addresses (both families), routed to it from its node.
fn add_addresses(node: &Cluster, pod: &Pod, v4: &[String], v6: &[String]) {
    for (family, addrs, len) in [("-4", v4, 32), ("-6", v6, 128)] {
        for addr in addrs {
            let cidr = format!("{addr}/{len}");
            ip(&["-n", &pod.ns, family, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&[
                "-n",
                &node.topo.node_ns,
                family,
                "route",
                "add",
                &cidr,
                "dev",
                &pod.host_dev,
            ]);
        }
    }
}

impl Rig {
    /// The rig, node A's agent started with `flags` besides the table's own.
    fn new(flags: &[&str]) -> Rig {
        let mut a = Cluster::named("node-a");
        let mut b = Cluster::named("node-b");
        let mut lan = Lan::new(&a.topo).expect("lan");
        let dev_a = lan
            .connect(&a.topo, &format!("{}/24", NODE_A[0]))
            .expect("node A on the lan");
        let dev_b = lan
            .connect(&b.topo, &format!("{}/24", NODE_B[0]))
            .expect("node B on the lan");
        let six = |ns: &str, dev: &str, cidr: &str| {
            ip(&["-n", ns, "-6", "addr", "add", cidr, "dev", dev, "nodad"]);
        };
        six(&a.topo.node_ns, &dev_a, &format!("{}/64", NODE_A[1]));
        six(&b.topo.node_ns, &dev_b, &format!("{}/64", NODE_B[1]));
        ip(&[
            "-n",
            &a.topo.node_ns,
            "addr",
            "add",
            &format!("{}/24", NODE_A_ALT[0]),
            "dev",
            &dev_a,
        ]);
        six(&a.topo.node_ns, &dev_a, &format!("{}/64", NODE_A_ALT[1]));
        for (node, dest, via) in [
            (&a, "10.1.2.0/24", NODE_B[0]),
            (&a, "fd00:1:2::/64", NODE_B[1]),
            (&b, "10.1.1.0/24", NODE_A[0]),
            (&b, "fd00:1:1::/64", NODE_A[1]),
            // Node A's second subnet, as the network would route it (the
            // node's sockets may pick that address as their source).
            (&b, "192.168.51.0/24", NODE_A[0]),
            (&b, "2001:db8:51::/64", NODE_A[1]),
        ] {
            node.topo.route(dest, via).expect("pod route");
        }
        // Service ranges, node A's second subnet, LB IPs and externalIPs
        // are routed to node A, as an upstream router would.
        let to_a = [
            ("10.96.0.0/16", NODE_A[0]),
            ("192.168.51.0/24", NODE_A[0]),
            ("198.51.100.0/24", NODE_A[0]),
            ("192.0.2.0/24", NODE_A[0]),
            ("fd00:96::/64", NODE_A[1]),
            ("2001:db8:51::/64", NODE_A[1]),
            ("2001:db8:ff::/64", NODE_A[1]),
            ("2001:db8:fe::/64", NODE_A[1]),
        ];
        let mut host = |name: &str, addrs: [&str; 2]| {
            let h = lan
                .add_host(name, &format!("{}/24", addrs[0]), &[])
                .expect("lan host");
            six(&h.ns, "eth0", &format!("{}/64", addrs[1]));
            for (dest, via) in to_a {
                ip(&["-n", &h.ns, "route", "add", dest, "via", via]);
            }
            h
        };
        let external = host("outside", EXTERNAL);
        let blocked = host("blocked", BLOCKED);
        let hairpin = host("hairpin", HAIRPIN);
        // The hairpin host source-NATs its traffic to the LB IPs to the LB
        // IP itself; node A routes the LB IPs back to it.
        for (tool, lbs) in [
            ("iptables", [Family::V4.lb_ip(4), Family::V4.lb_ip(5)]),
            ("ip6tables", [Family::V6.lb_ip(4), Family::V6.lb_ip(5)]),
        ] {
            for lb in &lbs {
                in_ns(
                    &hairpin.ns,
                    &[
                        tool,
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-d",
                        lb,
                        "-j",
                        "SNAT",
                        "--to-source",
                        lb,
                    ],
                );
            }
        }
        for (lb, via) in [
            (Family::V4.lb_ip(4), HAIRPIN[0]),
            (Family::V4.lb_ip(5), HAIRPIN[0]),
            (Family::V6.lb_ip(4), HAIRPIN[1]),
            (Family::V6.lb_ip(5), HAIRPIN[1]),
        ] {
            a.topo
                .route(&lb, via)
                .expect("LB IP route to the hairpin host");
        }

        let ep_a = a.dual_pod(
            "ep-a",
            &Family::V4.endpoint("a0"),
            &Family::V6.endpoint("a0"),
            &[8080],
            &[],
        );
        let ep_b = b.dual_pod(
            "ep-b",
            &Family::V4.endpoint("b0"),
            &Family::V6.endpoint("b0"),
            &[8080],
            &[],
        );
        for (node, pod, side) in [(&a, &ep_a, "a"), (&b, &ep_b, "b")] {
            let names: Vec<String> = (1..=5).map(|k| format!("{side}{k}")).collect();
            let v4: Vec<String> = names.iter().map(|n| Family::V4.endpoint(n)).collect();
            let v6: Vec<String> = names.iter().map(|n| Family::V6.endpoint(n)).collect();
            add_addresses(node, pod, &v4, &v6);
        }
        let client_pod = a.dual_pod("client", CLIENT_POD[0], CLIENT_POD[1], &[], &[]);
        // Node A holds LB IP 10 itself, as a cloud's guest agent adds the
        // load balancer's address to the node.
        for (family, len) in [(Family::V4, 32), (Family::V6, 128)] {
            let cidr = format!("{}/{len}", family.lb_ip(10));
            ip(&["-n", &a.topo.node_ns, "addr", "add", &cidr, "dev", "lo"]);
        }
        // A hostNetwork endpoint: the test server in node A's namespace.
        let server = a.topo.dir.join("server.py").display().to_string();
        a.topo
            .start_in_node(
                "host-network server",
                std::path::Path::new("python3"),
                &[
                    server,
                    "--name".into(),
                    "node-a".into(),
                    "--tcp".into(),
                    "8080".into(),
                    "--udp".into(),
                    String::new(),
                ],
            )
            .expect("server on node A");

        for (file, yaml) in services() {
            a.write(&file, &yaml);
        }
        let manifests = a.manifests.display().to_string();
        a.start_agent_with(
            &[
                "--manifests".into(),
                manifests,
                "--devices".into(),
                dev_a.clone(),
                "--cluster-cidr".into(),
                "10.1.0.0/16,fd00:1::/48".into(),
                "--nodeport-addresses".into(),
                "192.168.50.0/24,2001:db8:50::/64".into(),
            ]
            .into_iter()
            .chain(flags.iter().map(|f| f.to_string()))
            .collect::<Vec<String>>(),
        );
        let node = Pod {
            name: "node-a".into(),
            ns: a.topo.node_ns.clone(),
            ip: NODE_A[0].parse().expect("node address"),
            host_dev: String::new(),
        };
        let node_addresses = node_addresses(&a.topo);
        Rig {
            a,
            _b: b,
            client_pod,
            node,
            external,
            blocked,
            hairpin,
            node_addresses,
            _lan: lan,
        }
    }

    fn source(&self, src: Src) -> &Pod {
        match src {
            Pod => &self.client_pod,
            Node | NodeBound(_) => &self.node,
            External => &self.external,
            Blocked => &self.blocked,
            Hairpin => &self.hairpin,
        }
    }

    fn source_ip(src: Src, family: Family) -> Option<IpAddr> {
        let addrs = match src {
            Pod => CLIENT_POD,
            External => EXTERNAL,
            Blocked => BLOCKED,
            // The node shows as a node address anyway; the hairpin host as
            // its LB IP.
            Node | Hairpin | NodeBound(_) => return None,
        };
        addrs[family.i()].parse().ok()
    }

    fn url(dst: Dst, family: Family) -> String {
        let (addr, port) = match dst {
            ClusterIp(n) => (family.cluster_ip(n), 80),
            NodePort(n) => (NODE_A[family.i()].to_string(), 30000 + n as u16),
            NodePortAlt(n) => (NODE_A_ALT[family.i()].to_string(), 30000 + n as u16),
            Lb(k) => (family.lb_ip(k), 80),
            ExternalIp(k) => (family.external_ip(k), 80),
        };
        match family {
            Family::V4 => format!("http://{addr}:{port}/"),
            Family::V6 => format!("http://[{addr}]:{port}/"),
        }
    }

    /// Run one case; Err says how lb answered differently.
    fn run(&self, case: &Case, family: Family) -> Result<(), String> {
        let from = self.source(case.src);
        let url = Self::url(case.dst, family);
        let bound = match case.src {
            NodeBound(k) => vec!["--interface".to_string(), family.lb_ip(k)],
            _ => Vec::new(),
        };
        let bound: Vec<&str> = bound.iter().map(String::as_str).collect();
        let curl = |timeout: f64| self.a.topo.curl_with(from, &bound, &url, timeout);
        match case.want {
            Endpoints(endpoints, seen_as) => {
                let want: BTreeSet<IpAddr> = endpoints
                    .iter()
                    .map(|e| family.endpoint(e).parse().expect("endpoint address"))
                    .collect();
                let mut seen = BTreeSet::new();
                for i in 0..40 {
                    let body = curl(3.0).map_err(|(code, err)| {
                        format!("request {i}: curl exit {code} ({})", err.trim())
                    })?;
                    let endpoint = try_field(&body, "addr").and_then(|a| a.parse::<IpAddr>().ok());
                    // ip:port, the IPv6 address unbracketed.
                    let client = try_field(&body, "client")
                        .and_then(|c| c.rsplit_once(':'))
                        .and_then(|(ip, _)| ip.parse::<IpAddr>().ok());
                    let (Some(endpoint), Some(client)) = (endpoint, client) else {
                        return Err(format!("unexpected answer {body:?}"));
                    };
                    if !want.contains(&endpoint) {
                        return Err(format!("answered by {endpoint}, want one of {want:?}"));
                    }
                    let local = endpoints
                        .iter()
                        .any(|e| e.starts_with('a') && family.endpoint(e).parse() == Ok(endpoint));
                    let masqueraded = match seen_as {
                        Seen::Masqueraded => true,
                        Seen::Kept => false,
                        Seen::KeptIfLocal => !local,
                    };
                    if masqueraded && !self.node_addresses.contains(&client) {
                        return Err(format!(
                            "{endpoint} saw client {client}: want a node address (masqueraded)"
                        ));
                    }
                    if !masqueraded && Some(client) != Self::source_ip(case.src, family) {
                        return Err(format!(
                            "{endpoint} saw client {client}: want the client's own address (unmasqueraded)"
                        ));
                    }
                    seen.insert(endpoint);
                    if seen == want && i >= 3 {
                        return Ok(());
                    }
                }
                Err(format!(
                    "only {seen:?} answered in 40 requests, want {want:?}"
                ))
            }
            Drop => match curl(1.0) {
                Err((28, _)) => Ok(()),
                Err((code, err)) => Err(format!(
                    "want DROP (a timeout), got curl exit {code} ({})",
                    err.trim()
                )),
                Ok(body) => Err(format!("want DROP, answered {body:?}")),
            },
            Reject | NotServed => match curl(2.0) {
                Err((7, _)) => Ok(()),
                Err((code, err)) => Err(format!(
                    "want a refusal, got curl exit {code} ({})",
                    err.trim()
                )),
                Ok(body) => Err(format!("want a refusal, answered {body:?}")),
            },
        }
    }

    /// Write svc's slices (both families) with these endpoints, and wait
    /// until its ClusterIP holds the backends the cases' first expectation implies.
    fn endpoints(&self, svc: &str, endpoints: &[Ep], cluster_ip: Dst, want: Want) {
        for family in [Family::V4, Family::V6] {
            let list: Vec<String> = endpoints
                .iter()
                .map(|(name, local, ready, serving, terminating)| {
                    format!(
                        "- {{addresses: [\"{}\"], conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}, nodeName: {}}}",
                        family.endpoint(name),
                        if *local { "node-a" } else { "node-b" }
                    )
                })
                .collect();
            self.a.write(
                &format!("{svc}-{family:?}.yaml"),
                &slice_yaml(svc, family, &list),
            );
        }
        let ClusterIp(n) = cluster_ip else {
            unreachable!("sub-tests wait on the ClusterIP")
        };
        let want: BTreeSet<String> = match want {
            Endpoints(eps, _) => eps
                .iter()
                .map(|e| format!("{}:8080", Family::V4.endpoint(e)))
                .collect(),
            _ => BTreeSet::new(),
        };
        let frontend = format!("{}:80/TCP", Family::V4.cluster_ip(n));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.a.backends_of(&frontend).unwrap_or_default() != want {
            assert!(
                Instant::now() < deadline,
                "{frontend}: backends {:?}, want {want:?}",
                self.a.backends_of(&frontend)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn remove_endpoints(&self, svc: &str) {
        for family in [Family::V4, Family::V6] {
            self.a.remove(&format!("{svc}-{family:?}.yaml"));
        }
    }
}

fn slice_yaml(svc: &str, family: Family, endpoints: &[String]) -> String {
    let (address_type, suffix) = match family {
        Family::V4 => ("IPv4", "4"),
        Family::V6 => ("IPv6", "6"),
    };
    let list = if endpoints.is_empty() {
        "[]".to_string()
    } else {
        format!("\n{}", endpoints.join("\n"))
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-{suffix}\n  namespace: ns1\n  \
         labels: {{kubernetes.io/service-name: {svc}}}\naddressType: {address_type}\n\
         ports:\n- {{name: p80, port: 8080, protocol: TCP}}\nendpoints: {list}\n"
    )
}

/// Service `svc<n>` in both families: ClusterIP n, nodePort 30000 + n.
struct Svc {
    n: u8,
    kind: &'static str,
    etp: &'static str,
    itp: &'static str,
    node_port: bool,
    lb: &'static [u8],
    external_ip: Option<u8>,
    health_check: bool,
    ranges: bool,
}

impl Svc {
    fn yaml(&self) -> String {
        let n = self.n;
        let ip4 = Family::V4.cluster_ip(n);
        let ip6 = Family::V6.cluster_ip(n);
        let node_port = if self.node_port {
            format!(", nodePort: {}", 30000 + n as u16)
        } else {
            String::new()
        };
        let mut spec = format!(
            "  type: {}\n  clusterIP: {ip4}\n  clusterIPs: [{ip4}, \"{ip6}\"]\n  ipFamilies: [IPv4, IPv6]\n  \
             ipFamilyPolicy: RequireDualStack\n  internalTrafficPolicy: {}\n  ports:\n  - {{name: p80, port: 80, targetPort: 8080, protocol: TCP{node_port}}}\n",
            self.kind, self.itp
        );
        if self.kind != "ClusterIP" {
            spec += &format!("  externalTrafficPolicy: {}\n", self.etp);
        }
        if self.health_check {
            spec += &format!("  healthCheckNodePort: {}\n", 32000 + n as u16);
        }
        if let Some(k) = self.external_ip {
            spec += &format!(
                "  externalIPs: [{}, \"{}\"]\n",
                Family::V4.external_ip(k),
                Family::V6.external_ip(k)
            );
        }
        if self.ranges {
            spec += &format!(
                "  loadBalancerSourceRanges: [\"{}\", \"{}\"]\n",
                SOURCE_RANGES[0], SOURCE_RANGES[1]
            );
        }
        let mut status = String::new();
        if !self.lb.is_empty() {
            let ingress: Vec<String> = self
                .lb
                .iter()
                .flat_map(|k| [Family::V4.lb_ip(*k), Family::V6.lb_ip(*k)])
                .map(|ip| format!("{{ip: \"{ip}\"}}"))
                .collect();
            status = format!(
                "status:\n  loadBalancer:\n    ingress: [{}]\n",
                ingress.join(", ")
            );
        }
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{n}, namespace: ns1}}\nspec:\n{spec}{status}"
        )
    }
}

fn services() -> Vec<(String, String)> {
    let lb = |n, etp, itp, lb: &'static [u8], external_ip| Svc {
        n,
        kind: "LoadBalancer",
        etp,
        itp,
        node_port: true,
        lb,
        external_ip,
        health_check: etp == "Local",
        ranges: false,
    };
    let svcs = [
        lb(1, "Cluster", "Cluster", &[1], Some(1)),
        lb(2, "Local", "Cluster", &[2], Some(2)),
        lb(3, "Cluster", "Local", &[3], None),
        Svc {
            ranges: true,
            ..lb(4, "Cluster", "Cluster", &[4, 5], None)
        },
        lb(5, "Cluster", "Cluster", &[8], Some(5)),
        lb(9, "Cluster", "Cluster", &[9], None),
        lb(10, "Cluster", "Cluster", &[10], None),
        Svc {
            node_port: false,
            ..lb(6, "Local", "Cluster", &[6], None)
        },
        Svc {
            node_port: false,
            ..lb(7, "Cluster", "Cluster", &[7], None)
        },
    ];
    let mut out: Vec<(String, String)> = svcs
        .iter()
        .map(|s| (format!("svc{}.yaml", s.n), s.yaml()))
        .collect();
    // Fixed endpoints: a0 and b0 for svc1-3, b0 for svc4, none for svc5.
    for (svc, eps) in [
        ("svc1", BOTH),
        ("svc2", BOTH),
        ("svc3", BOTH),
        ("svc4", REMOTE),
        ("svc9", &["n0"][..]),
        ("svc10", REMOTE),
    ] {
        for family in [Family::V4, Family::V6] {
            let list: Vec<String> = eps
                .iter()
                .map(|e| {
                    format!(
                        "- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: {}}}",
                        family.endpoint(e),
                        if e.starts_with('b') {
                            "node-b"
                        } else {
                            "node-a"
                        }
                    )
                })
                .collect();
            out.push((
                format!("{svc}-{family:?}.yaml"),
                slice_yaml(svc, family, &list),
            ));
        }
    }
    out
}

/// svc8's Service with the given internalTrafficPolicy.
fn itp_service(itp: &'static str) -> String {
    Svc {
        n: 8,
        kind: "ClusterIP",
        etp: "Cluster",
        itp,
        node_port: false,
        lb: &[],
        external_ip: None,
        health_check: false,
        ranges: false,
    }
    .yaml()
}

#[test]
fn kube_proxy_packet_flow_tables() {
    let rig = Rig::new(&[]);
    rig.wait_programmed();

    let mut failures = Vec::new();
    let mut total = 0;
    let mut check = |table: &str, case: &Case, rig: &Rig| {
        for family in [Family::V4, Family::V6] {
            total += 1;
            if let Err(e) = rig.run(case, family) {
                failures.push(format!("{table}/{} ({family:?}): {e}", case.name));
            }
        }
    };
    for (table, cases) in [
        (
            "TestInternalExternalMasquerade",
            INTERNAL_EXTERNAL_MASQUERADE,
        ),
        (
            "TestExternalTrafficPolicyLocal",
            EXTERNAL_TRAFFIC_POLICY_LOCAL,
        ),
        (
            "TestExternalTrafficPolicyCluster",
            EXTERNAL_TRAFFIC_POLICY_CLUSTER,
        ),
        ("TestLoadBalancer", LOAD_BALANCER),
        ("TestNodePorts", NODE_PORTS),
        ("TestNoEndpointsReject", NO_ENDPOINTS_REJECT),
        ("lb: hostNetwork endpoint", HOST_NETWORK),
    ] {
        for case in cases {
            check(table, case, &rig);
        }
    }

    // Sub-tests: a Service's endpoints change between them; after each
    // table its slices are deleted and everything is rejected.
    let after_delete_terminating = |n| -> [Case; 2] {
        [
            case(
                "pod to clusterIP after endpoints deleted",
                Pod,
                ClusterIp(n),
                Reject,
            ),
            case(
                "external to LB after endpoints deleted",
                External,
                Lb(n),
                Reject,
            ),
        ]
    };
    let itp_policies = ["Cluster", "Local", "Local", "Local"];
    for (table, svc, subtests, after) in [
        (
            "TestTerminatingEndpointsTrafficPolicyLocal",
            "svc6",
            TERMINATING_LOCAL,
            after_delete_terminating(6).to_vec(),
        ),
        (
            "TestTerminatingEndpointsTrafficPolicyCluster",
            "svc7",
            TERMINATING_CLUSTER,
            after_delete_terminating(7).to_vec(),
        ),
        (
            "TestInternalTrafficPolicy",
            "svc8",
            INTERNAL_TRAFFIC_POLICY,
            vec![case(AFTER_DELETE_ITP[0].name, Pod, ClusterIp(8), Reject)],
        ),
    ] {
        for (i, sub) in subtests.iter().enumerate() {
            if svc == "svc8" {
                rig.a.write("svc8.yaml", &itp_service(itp_policies[i]));
            }
            let first = &sub.cases[0];
            rig.endpoints(svc, sub.endpoints, first.dst, first.want);
            for case in sub.cases {
                check(&format!("{table}/{}", sub.name), case, &rig);
            }
            rig.remove_endpoints(svc);
            rig.endpoints_gone(svc, first.dst);
            for case in &after {
                check(&format!("{table}/{}", sub.name), case, &rig);
            }
        }
    }

    assert!(
        failures.is_empty(),
        "lb answers differently from kube-proxy in {} of {total} cases:\n{}\nstats: {}",
        failures.len(),
        failures.join("\n"),
        rig.a.stats()
    );
}

/// `--masquerade-cluster-policy=false`, lb's own difference from kube-proxy:
/// under policy Cluster, endpoints on this node see the client's address
/// (from outside and from pods); those elsewhere still see the node (their
/// answers must come back through it). Policy Local and ClusterIPs as before.
#[test]
fn cluster_policy_keeping_the_client_address() {
    let rig = Rig::new(&["--masquerade-cluster-policy=false"]);
    rig.wait_programmed();
    const KEPT_IF_LOCAL: Seen = Seen::KeptIfLocal;
    let cases = [
        case(
            "external to NodePort",
            External,
            NodePort(1),
            Endpoints(BOTH, KEPT_IF_LOCAL),
        ),
        case(
            "external to LB",
            External,
            Lb(1),
            Endpoints(BOTH, KEPT_IF_LOCAL),
        ),
        case(
            "external to externalIP",
            External,
            ExternalIp(1),
            Endpoints(BOTH, KEPT_IF_LOCAL),
        ),
        case("pod to LB", Pod, Lb(1), Endpoints(BOTH, KEPT)),
        case("pod to NodePort", Pod, NodePort(1), Endpoints(BOTH, KEPT)),
        case(
            "external to LB with eTP:Local",
            External,
            Lb(2),
            Endpoints(LOCAL, KEPT),
        ),
        case(
            "external to ClusterIP",
            External,
            ClusterIp(1),
            Endpoints(BOTH, MASQ),
        ),
    ];
    let mut failures = Vec::new();
    for case in &cases {
        for family in [Family::V4, Family::V6] {
            if let Err(e) = rig.run(case, family) {
                failures.push(format!("{} ({family:?}): {e}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

impl Rig {
    /// Every fixed Service programmed: the last one's last frontend.
    fn wait_programmed(&self) {
        let frontend = format!("[{}]:80/TCP (external)", Family::V6.lb_ip(5));
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.a.backends_of(&frontend).is_none_or(|b| b.len() != 1) {
            assert!(Instant::now() < deadline, "{frontend} not programmed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn endpoints_gone(&self, _svc: &str, cluster_ip: Dst) {
        let ClusterIp(n) = cluster_ip else {
            unreachable!("sub-tests wait on the ClusterIP")
        };
        let frontend = format!("{}:80/TCP", Family::V4.cluster_ip(n));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.a.backends_of(&frontend).is_some_and(|b| !b.is_empty()) {
            assert!(Instant::now() < deadline, "{frontend} keeps its backends");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
