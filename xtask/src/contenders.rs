//! The alternatives `cargo xtask perf` measures lb against, generated from
//! the same Services: kube-proxy's iptables mode rule shape (KUBE-SERVICES ->
//! KUBE-SVC-* -> KUBE-SEP-* with `statistic --mode random`, loaded by
//! iptables-restore) and its nftables mode shape (a `service-ips` verdict map,
//! `numgen random` to endpoint chains, loaded by `nft -f`).

use std::{fmt::Write as _, net::Ipv4Addr};

/// One Service port and its endpoints, as every contender programs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// type NodePort with this nodePort (externalTrafficPolicy Cluster).
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

fn nth_ip(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n)
}

/// `n` Services (ClusterIPs from 10.96.0.1, port 80) with `endpoints` each
/// (from 10.128.0.1, port 8080): the benchmark's cluster.
pub fn service_set(n: u32, endpoints: u32) -> Vec<ServicePort> {
    (0..n)
        .map(|i| ServicePort {
            cluster_ip: nth_ip(Ipv4Addr::new(10, 96, 0, 1), i),
            port: 80,
            node_port: None,
            endpoints: (0..endpoints)
                .map(|j| {
                    (
                        nth_ip(Ipv4Addr::new(10, 128, 0, 1), i * endpoints + j),
                        8080,
                    )
                })
                .collect(),
        })
        .collect()
}

/// The same Services for lb's manifests source: (Services, EndpointSlices)
/// as multi-document YAML; Service i is `svc-i` in namespace `perf`, every
/// endpoint on node `node`.
pub fn manifests(services: &[ServicePort], node: &str) -> (String, String) {
    let mut svc = String::with_capacity(services.len() * 200);
    let mut slices = String::with_capacity(services.len() * 900);
    for (i, s) in services.iter().enumerate() {
        let (kind, node_port) = match s.node_port {
            Some(n) => ("NodePort", format!(", nodePort: {n}")),
            None => ("ClusterIP", String::new()),
        };
        let _ = writeln!(
            svc,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: perf}}\nspec:\n  type: {kind}\n  clusterIP: {}\n  ports: [{{name: http, port: {}, targetPort: 8080{node_port}}}]",
            s.cluster_ip, s.port
        );
        let port = s.endpoints.first().map_or(8080, |e| e.1);
        let _ = writeln!(
            slices,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  name: svc-{i}-a\n  namespace: perf\n  labels: {{kubernetes.io/service-name: svc-{i}}}\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints:"
        );
        for (addr, _) in &s.endpoints {
            let _ = writeln!(
                slices,
                "- {{addresses: [\"{addr}\"], conditions: {{ready: true}}, nodeName: {node}}}"
            );
        }
    }
    (svc, slices)
}

/// kube-proxy names chains by a hash of the service port name; an index
/// keeps them unique and readable here.
fn svc_chain(i: usize) -> String {
    format!("KUBE-SVC-{i:08X}")
}

fn ext_chain(i: usize) -> String {
    format!("KUBE-EXT-{i:08X}")
}

fn sep_chain(i: usize, j: usize) -> String {
    format!("KUBE-SEP-{i:08X}{j:04X}")
}

/// The rules of one Service: its KUBE-SVC chain (random choice, as
/// kube-proxy writes it: endpoint k of n taken with probability 1/(n-k))
/// and one KUBE-SEP chain per endpoint (masquerade hairpin, DNAT).
fn iptables_service(out: &mut String, i: usize, svc: &ServicePort) {
    let chain = svc_chain(i);
    let n = svc.endpoints.len();
    for (j, (addr, port)) in svc.endpoints.iter().enumerate() {
        let sep = sep_chain(i, j);
        if j + 1 < n {
            let p = 1.0 / (n - j) as f64;
            let _ = writeln!(
                out,
                "-A {chain} -m statistic --mode random --probability {p:.10} -j {sep}"
            );
        } else {
            let _ = writeln!(out, "-A {chain} -j {sep}");
        }
        let _ = writeln!(out, "-A {sep} -s {addr}/32 -j KUBE-MARK-MASQ");
        let _ = writeln!(
            out,
            "-A {sep} -p tcp -m tcp -j DNAT --to-destination {addr}:{port}"
        );
    }
}

fn iptables_chains(out: &mut String, i: usize, svc: &ServicePort) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(i));
    if svc.node_port.is_some() {
        let _ = writeln!(out, ":{} - [0:0]", ext_chain(i));
    }
    for j in 0..svc.endpoints.len() {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(i, j));
    }
}

/// The whole nat table, for `iptables-restore` (a full resync).
pub fn iptables_full(services: &[ServicePort]) -> String {
    let mut out = String::with_capacity(services.len() * 1200);
    out.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    for (i, svc) in services.iter().enumerate() {
        iptables_chains(&mut out, i, svc);
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str("-A POSTROUTING -j KUBE-POSTROUTING\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n");
    for (i, svc) in services.iter().enumerate() {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {} -j {}",
            svc.cluster_ip,
            svc.port,
            svc_chain(i)
        );
    }
    // NodePorts: last in KUBE-SERVICES, for the node's own addresses;
    // external traffic (policy Cluster) is masqueraded.
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for (i, svc) in services.iter().enumerate() {
        if let Some(node_port) = svc.node_port {
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -p tcp -m tcp --dport {node_port} -j {}",
                ext_chain(i)
            );
            let _ = writeln!(out, "-A {} -j KUBE-MARK-MASQ", ext_chain(i));
            let _ = writeln!(out, "-A {} -j {}", ext_chain(i), svc_chain(i));
        }
    }
    for (i, svc) in services.iter().enumerate() {
        iptables_service(&mut out, i, svc);
    }
    out.push_str("COMMIT\n");
    out
}

/// One Service's endpoints changed, as kube-proxy (>= 1.27) writes it: only
/// that Service's chains, with `iptables-restore --noflush`.
pub fn iptables_one_change(i: usize, svc: &ServicePort) -> String {
    let mut out = String::from("*nat\n");
    iptables_chains(&mut out, i, svc);
    iptables_service(&mut out, i, svc);
    out.push_str("COMMIT\n");
    out
}

fn nft_service_chain(i: usize) -> String {
    format!("service-{i:08x}")
}

fn nft_endpoint_chain(i: usize, j: usize) -> String {
    format!("endpoint-{i:08x}-{j:04x}")
}

/// One Service's chains; `flush` when they may exist already (a change).
fn nft_service(out: &mut String, i: usize, svc: &ServicePort, flush: bool) {
    let chain = nft_service_chain(i);
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    if flush {
        let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
    }
    let targets: Vec<String> = (0..svc.endpoints.len())
        .map(|j| format!("{j} : goto {}", nft_endpoint_chain(i, j)))
        .collect();
    for (j, (addr, port)) in svc.endpoints.iter().enumerate() {
        let ep = nft_endpoint_chain(i, j);
        let _ = writeln!(out, "add chain ip kube-proxy {ep}");
        if flush {
            let _ = writeln!(out, "flush chain ip kube-proxy {ep}");
        }
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ep} ip saddr {addr} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ep} meta l4proto tcp dnat to {addr}:{port}"
        );
    }
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        svc.endpoints.len(),
        targets.join(", ")
    );
}

/// The kube-proxy table for `nft -f` (a full sync: the table is replaced).
pub fn nft_full(services: &[ServicePort]) -> String {
    let mut out = String::with_capacity(services.len() * 1500);
    out.push_str("add table ip kube-proxy\ndelete table ip kube-proxy\nadd table ip kube-proxy\n");
    out.push_str("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n");
    out.push_str("add chain ip kube-proxy mark-for-masquerade\n");
    out.push_str("add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n");
    out.push_str(
        "add chain ip kube-proxy masquerading { type nat hook postrouting priority srcnat ; }\n",
    );
    out.push_str("add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n");
    out.push_str("add rule ip kube-proxy masquerading mark set mark xor 0x4000\n");
    out.push_str("add rule ip kube-proxy masquerading masquerade fully-random\n");
    out.push_str("add chain ip kube-proxy services\n");
    out.push_str(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    out.push_str(
        "add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; }\n",
    );
    out.push_str("add rule ip kube-proxy services fib daddr type local meta l4proto . th dport vmap @service-nodeports\n");
    out.push_str(
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; }\n",
    );
    out.push_str("add rule ip kube-proxy nat-prerouting jump services\n");
    out.push_str("add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n");
    out.push_str("add rule ip kube-proxy nat-output jump services\n");
    // Chains first, then the map's elements in one statement: nft checks
    // each statement against the ruleset, so 10,000 single-element
    // statements cost minutes where one list costs seconds.
    let mut elements = Vec::with_capacity(services.len());
    let mut node_ports = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        nft_service(&mut out, i, svc, false);
        elements.push(format!(
            "{} . tcp . {} : goto {}",
            svc.cluster_ip,
            svc.port,
            nft_service_chain(i)
        ));
        if let Some(node_port) = svc.node_port {
            let ext = format!("external-{i:08x}");
            let _ = writeln!(out, "add chain ip kube-proxy {ext}");
            let _ = writeln!(out, "add rule ip kube-proxy {ext} jump mark-for-masquerade");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {ext} goto {}",
                nft_service_chain(i)
            );
            node_ports.push(format!("tcp . {node_port} : goto {ext}"));
        }
    }
    for (map, list) in [("service-ips", elements), ("service-nodeports", node_ports)] {
        if !list.is_empty() {
            let _ = writeln!(
                out,
                "add element ip kube-proxy {map} {{ {} }}",
                list.join(", ")
            );
        }
    }
    out
}

/// One Service's endpoints changed: its chains rewritten in one transaction.
pub fn nft_one_change(i: usize, svc: &ServicePort) -> String {
    let mut out = String::new();
    nft_service(&mut out, i, svc, true);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<ServicePort> {
        vec![
            ServicePort {
                cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
                port: 80,
                node_port: None,
                endpoints: vec![
                    (Ipv4Addr::new(10, 0, 0, 1), 8080),
                    (Ipv4Addr::new(10, 0, 0, 2), 8080),
                    (Ipv4Addr::new(10, 0, 0, 3), 8080),
                ],
            },
            ServicePort {
                cluster_ip: Ipv4Addr::new(10, 96, 0, 2),
                port: 443,
                node_port: Some(30443),
                endpoints: vec![(Ipv4Addr::new(10, 0, 1, 1), 8443)],
            },
        ]
    }

    #[test]
    fn iptables_shape_is_kube_proxys() {
        let rules = iptables_full(&two());
        assert!(rules.contains(
            "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-00000000"
        ));
        // Uniform choice: 1/3, then 1/2, then the rest.
        assert!(rules.contains("--probability 0.3333333333 -j KUBE-SEP-000000000000"));
        assert!(rules.contains("--probability 0.5000000000 -j KUBE-SEP-000000000001"));
        assert!(rules.contains("-A KUBE-SVC-00000000 -j KUBE-SEP-000000000002"));
        assert!(rules.contains(
            "-A KUBE-SEP-000000000002 -p tcp -m tcp -j DNAT --to-destination 10.0.0.3:8080"
        ));
        assert!(rules.ends_with("COMMIT\n"));
        assert!(
            rules.contains("-A KUBE-NODEPORTS -p tcp -m tcp --dport 30443 -j KUBE-EXT-00000001")
        );
        assert!(rules.contains("-A KUBE-EXT-00000001 -j KUBE-SVC-00000001"));
        let change = iptables_one_change(1, &two()[1]);
        assert!(change.starts_with("*nat\n:KUBE-SVC-00000001 - [0:0]\n"));
        assert!(
            !change.contains("KUBE-SERVICES"),
            "only the changed Service"
        );
    }

    #[test]
    fn nftables_shape_is_kube_proxys() {
        let rules = nft_full(&two());
        assert!(rules.contains(
            "add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto service-00000000, 10.96.0.2 . tcp . 443 : goto service-00000001 }"
        ));
        assert!(rules.contains(
            "add rule ip kube-proxy service-00000000 numgen random mod 3 vmap { 0 : goto endpoint-00000000-0000, 1 : goto endpoint-00000000-0001, 2 : goto endpoint-00000000-0002 }"
        ));
        assert!(rules.contains(
            "add rule ip kube-proxy endpoint-00000001-0000 meta l4proto tcp dnat to 10.0.1.1:8443"
        ));
        assert!(rules.contains(
            "add element ip kube-proxy service-nodeports { tcp . 30443 : goto external-00000001 }"
        ));
        assert!(!nft_one_change(0, &two()[0]).contains("service-ips"));
    }
}
