//! Taking over a node from kube-proxy: find the rules it left (iptables
//! chains in both the nf_tables and the legacy backend, for IPv4 and IPv6;
//! its nftables `kube-proxy` tables; its IPVS dummy device, virtual servers
//! and ipsets) and, with `--cleanup-kube-proxy true`, remove them, as
//! `kube-proxy --cleanup` does; and refuse to start while kube-proxy still
//! runs (it would put them back, and it holds port 10256).
//!
//! Only kube-proxy's own chains go, by the names its iptables and IPVS
//! modes use (pkg/proxy/iptables and ipvs cleanup), not everything named
//! `KUBE-*`: kubelet (`KUBE-FIREWALL`, `KUBE-MARK-DROP`, the canaries),
//! kube-router's network policy (`KUBE-ROUTER-*`, `KUBE-POD-FW-*`),
//! cri-dockerd's hostPorts (`KUBE-HOSTPORTS`) and others share the prefix.
//! A chain another component still jumps to stays, and of the rules outside
//! kube-proxy's chains only its jumps from the built-in chains are deleted.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
};

use thiserror::Error;
use tracing::{info, warn};

/// kube-proxy's chains by table (iptables and IPVS modes, current and
/// earlier releases).
fn kube_proxy_chain(table: &str, chain: &str) -> bool {
    const NAT: [&str; 8] = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-PROXY-CANARY",
        "KUBE-NODE-PORT",
        "KUBE-LOAD-BALANCER",
        // IPVS mode's nat firewall (kubelet's KUBE-FIREWALL is in filter).
        "KUBE-FIREWALL",
    ];
    const NAT_PREFIXES: [&str; 6] = [
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SEP-",
        "KUBE-XLB-",
    ];
    const FILTER: [&str; 10] = [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
        "KUBE-NODE-PORT",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
    ];
    match table {
        "nat" => NAT.contains(&chain) || NAT_PREFIXES.iter().any(|p| chain.starts_with(p)),
        "filter" => FILTER.contains(&chain),
        "mangle" => chain == "KUBE-PROXY-CANARY",
        _ => false,
    }
}

/// IPVS mode's ipsets (IPv6 ones carry a `KUBE-6-` prefix instead).
fn kube_proxy_ipset(name: &str) -> bool {
    const SETS: [&str; 17] = [
        "LOOP-BACK",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "EXTERNAL-IP-LOCAL",
        "LOAD-BALANCER",
        "LOAD-BALANCER-LOCAL",
        "LOAD-BALANCER-FW",
        "LOAD-BALANCER-SOURCE-IP",
        "LOAD-BALANCER-SOURCE-CIDR",
        "NODE-PORT-TCP",
        "NODE-PORT-LOCAL-TCP",
        "NODE-PORT-UDP",
        "NODE-PORT-LOCAL-UDP",
        "NODE-PORT-SCTP-HASH",
        "NODE-PORT-LOCAL-SCTP-HASH",
        "HEALTH-CHECK-NODE-PORT",
        "IPVS-IPS",
    ];
    let base = name
        .strip_prefix("KUBE-6-")
        .or_else(|| name.strip_prefix("KUBE-"));
    base.is_some_and(|b| SETS.contains(&b))
}

const BUILTIN_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// kube-proxy's health port.
pub const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;

#[derive(Debug, Error)]
pub enum TakeoverError {
    #[error(
        "kube-proxy is still running on this node ({0}): it would put its rules back. \
         Remove its DaemonSet first, or run lb beside it as a canary with --service-proxy-name"
    )]
    StillRunning(String),
    #[error("{tool}: {reason}")]
    Tool { tool: String, reason: String },
}

/// What to remove from one iptables table: kube-proxy's chains, and the
/// rules of other chains that jump into them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TablePlan {
    pub chains: BTreeSet<String>,
    /// Rules to delete, as `iptables-save` prints them with `-A` (without it).
    pub jumps: Vec<String>,
}

/// Per table, from one `iptables-save` output: what kube-proxy left.
pub fn plan_iptables(save: &str) -> BTreeMap<String, TablePlan> {
    let mut out = BTreeMap::new();
    let mut table = String::new();
    let mut chains: BTreeSet<String> = BTreeSet::new();
    let mut rules: Vec<(String, String)> = Vec::new();
    let mut finish = |table: &str, chains: &BTreeSet<String>, rules: &[(String, String)]| {
        let plan = plan_table(table, chains, rules);
        if !plan.chains.is_empty() || !plan.jumps.is_empty() {
            out.insert(table.to_string(), plan);
        }
    };
    for line in save.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_string();
            chains.clear();
            rules.clear();
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                chains.insert(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("").to_string();
            rules.push((chain, rule.to_string()));
        } else if line == "COMMIT" {
            finish(&table, &chains, &rules);
        }
    }
    out
}

/// The target of a rule (`-j X` or `-g X`), if any.
fn target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
            return words.next();
        }
    }
    None
}

fn plan_table(table: &str, chains: &BTreeSet<String>, rules: &[(String, String)]) -> TablePlan {
    let mut remove: BTreeSet<&str> = chains
        .iter()
        .map(String::as_str)
        .filter(|c| kube_proxy_chain(table, c))
        .collect();
    // A chain that a kept user chain jumps to stays (deleting it would fail,
    // and the rule is another component's), and so does what it reaches.
    loop {
        let still_used: Vec<&str> = rules
            .iter()
            .filter(|(chain, _)| {
                !remove.contains(chain.as_str()) && !BUILTIN_CHAINS.contains(&chain.as_str())
            })
            .filter_map(|(_, rule)| target(rule))
            .filter(|t| remove.contains(t))
            .collect();
        if still_used.is_empty() {
            break;
        }
        for chain in still_used {
            remove.remove(chain);
        }
    }
    let jumps = rules
        .iter()
        .filter(|(chain, _)| BUILTIN_CHAINS.contains(&chain.as_str()))
        .filter(|(_, rule)| target(rule).is_some_and(|t| remove.contains(t)))
        .map(|(_, rule)| rule.clone())
        .collect();
    TablePlan {
        chains: remove.into_iter().map(String::from).collect(),
        jumps,
    }
}

/// An `iptables-restore --noflush` script doing `plans`: the jumps deleted,
/// then the chains flushed and deleted.
pub fn restore_script(plans: &BTreeMap<String, TablePlan>) -> String {
    let mut s = String::new();
    for (table, plan) in plans {
        s.push_str(&format!("*{table}\n"));
        for chain in &plan.chains {
            // Declaring a chain in a --noflush restore flushes it.
            s.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in &plan.jumps {
            s.push_str(&format!("-D {rule}\n"));
        }
        for chain in &plan.chains {
            s.push_str(&format!("-X {chain}\n"));
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// `nft list tables` output -> the families that have a `kube-proxy` table.
pub fn nft_kube_proxy_tables(list: &str) -> Vec<String> {
    list.lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                ["table", family, "kube-proxy"] => Some(family.to_string()),
                _ => None,
            }
        })
        .collect()
}

fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, TakeoverError> {
    let err = |reason: String| TakeoverError::Tool {
        tool: format!("{tool} {}", args.join(" ")),
        reason,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tool_missing(e: &TakeoverError) -> bool {
    matches!(e, TakeoverError::Tool { reason, .. } if reason.contains("No such file"))
}

/// The iptables backends and families kube-proxy may have written, with
/// the file that lists a legacy family's tables: without any, there is
/// nothing to read, and running the legacy tools would load their modules.
const IPTABLES: [(&str, &str, Option<&str>); 4] = [
    ("iptables-nft-save", "iptables-nft-restore", None),
    ("ip6tables-nft-save", "ip6tables-nft-restore", None),
    (
        "iptables-legacy-save",
        "iptables-legacy-restore",
        Some("/proc/net/ip_tables_names"),
    ),
    (
        "ip6tables-legacy-save",
        "ip6tables-legacy-restore",
        Some("/proc/net/ip6_tables_names"),
    ),
];

/// What was found (and removed, when asked), one line per place.
pub fn clean_up(remove: bool) -> Vec<String> {
    let mut found = Vec::new();
    for (save, restore, tables) in IPTABLES {
        if let Some(names) = tables
            && std::fs::read_to_string(names).map_or(true, |t| t.trim().is_empty())
        {
            continue;
        }
        let text = match run(save, &[], None) {
            Ok(text) => text,
            Err(e) if tool_missing(&e) => continue,
            Err(e) => {
                warn!(error = %e, "cannot read kube-proxy's iptables rules");
                continue;
            }
        };
        let plans = plan_iptables(&text);
        if plans.is_empty() {
            continue;
        }
        for (table, plan) in &plans {
            let line = format!(
                "{save} -t {table}: {} chains ({}), {} jumps into them",
                plan.chains.len(),
                plan.chains.iter().cloned().collect::<Vec<_>>().join(" "),
                plan.jumps.len()
            );
            found.push(line);
        }
        if remove {
            // Wait for the xtables lock as kube-proxy does (kubelet or a CNI
            // may hold it).
            match run(
                restore,
                &["-w", "5", "-W", "100000", "--noflush"],
                Some(&restore_script(&plans)),
            ) {
                Ok(_) => info!(backend = save, "removed kube-proxy's iptables rules"),
                Err(e) => warn!(error = %e, "removing kube-proxy's iptables rules failed"),
            }
        }
    }
    match run("nft", &["list", "tables"], None) {
        Ok(list) => {
            for family in nft_kube_proxy_tables(&list) {
                found.push(format!("nftables table {family} kube-proxy"));
                if remove {
                    match run("nft", &["delete", "table", &family, "kube-proxy"], None) {
                        Ok(_) => info!(family, "removed kube-proxy's nftables table"),
                        Err(e) => warn!(error = %e, "removing kube-proxy's nftables table failed"),
                    }
                }
            }
        }
        Err(e) if tool_missing(&e) => {}
        Err(e) => warn!(error = %e, "cannot list nftables tables"),
    }
    // IPVS mode: its dummy device holding every Service address, its
    // virtual servers and its ipsets.
    if Path::new("/sys/class/net/kube-ipvs0").exists() {
        found.push("IPVS: device kube-ipvs0".into());
        if remove {
            if let Err(e) = run("ip", &["link", "delete", "kube-ipvs0"], None) {
                warn!(error = %e, "removing kube-ipvs0 failed");
            }
            match run("ipvsadm", &["--clear"], None) {
                Ok(_) => info!("cleared IPVS virtual servers"),
                Err(e) => warn!(error = %e, "clearing IPVS virtual servers failed (ipvsadm)"),
            }
        }
    }
    // Only when the ip_set module is loaded: listing would load it.
    if Path::new("/sys/module/ip_set").exists()
        && let Ok(sets) = run("ipset", &["list", "-n"], None)
    {
        for set in sets.lines().filter(|s| kube_proxy_ipset(s)) {
            found.push(format!("ipset {set}"));
            if remove && let Err(e) = run("ipset", &["destroy", set], None) {
                warn!(error = %e, "removing an ipset failed");
            }
        }
    }
    found
}

/// Is kube-proxy still running here? A process named kube-proxy in this
/// network namespace (one in another, say a kind node's container on the
/// same host, is not this node's), or another process holding its health port.
pub fn still_running() -> Option<String> {
    let own_netns = std::fs::read_link("/proc/self/ns/net").ok();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let kube_proxy = std::fs::read_to_string(entry.path().join("comm"))
                .is_ok_and(|c| c.trim() == "kube-proxy");
            if kube_proxy && std::fs::read_link(entry.path().join("ns/net")).ok() == own_netns {
                return Some(format!("process {pid} is kube-proxy"));
            }
        }
    }
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, KUBE_PROXY_HEALTHZ_PORT));
    match TcpListener::bind(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(format!(
            "another process holds port {KUBE_PROXY_HEALTHZ_PORT}, kube-proxy's health port (an lb agent of the same node would too)"
        )),
        _ => None,
    }
}

/// At start: refuse while kube-proxy runs.
pub fn refuse_while_running() -> Result<(), TakeoverError> {
    match still_running() {
        Some(what) => Err(TakeoverError::StillRunning(what)),
        None => Ok(()),
    }
}

/// After lb's first sync (so the node is never without Service
/// forwarding): report, and with `remove` delete, what kube-proxy left.
pub fn report_and_clean_up(remove: bool) {
    let found = clean_up(remove);
    if found.is_empty() {
        return;
    }
    if remove {
        info!(removed = ?found, "kube-proxy's rules removed: lb serves every Service now");
    } else {
        warn!(found = ?found, "kube-proxy's rules are still on this node and match before lb's programs see the packets of some paths; --cleanup-kube-proxy true removes them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape kube-proxy's iptables mode leaves (nat and filter), with
    /// kubelet's chains beside it.
    const SAVE: &str = "\
# Generated by iptables-save
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-DROP - [0:0]
:KUBE-ROUTER-INPUT - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -m comment --comment \"kube-router netpol\" -j KUBE-ROUTER-INPUT
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j KUBE-MARK-DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-XYZ - [0:0]
:KUBE-HOSTPORTS - [0:0]
:KUBE-HP-ABC - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j KUBE-HOSTPORTS
-A KUBE-HOSTPORTS -p tcp --dport 8081 -j KUBE-HP-ABC
-A KUBE-HP-ABC -s 10.244.1.5/32 -j KUBE-MARK-MASQ
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -o eth0 -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -j KUBE-SEP-XYZ
-A KUBE-SEP-XYZ -p tcp -m tcp -j DNAT --to-destination 10.244.1.11:8080
COMMIT
";

    #[test]
    fn kube_proxys_chains_go_kubelets_and_others_stay() {
        let plans = plan_iptables(SAVE);
        let chains = |t: &str| plans[t].chains.iter().cloned().collect::<Vec<_>>();
        assert_eq!(chains("mangle"), ["KUBE-PROXY-CANARY"]);
        // kubelet's KUBE-FIREWALL and KUBE-MARK-DROP stay.
        assert_eq!(chains("filter"), ["KUBE-FORWARD", "KUBE-SERVICES"]);
        // KUBE-MARK-MASQ stays: cri-dockerd's hostPort chain still jumps to it.
        assert_eq!(
            chains("nat"),
            [
                "KUBE-POSTROUTING",
                "KUBE-SEP-XYZ",
                "KUBE-SERVICES",
                "KUBE-SVC-ABC"
            ]
        );
        // Only the built-in chains' jumps go; cri-dockerd's rules are its own.
        assert_eq!(plans["nat"].jumps.len(), 3, "{:?}", plans["nat"].jumps);
        assert!(plans["nat"].jumps.iter().all(|j| !j.contains("MASQUERADE")));
        assert!(plans["nat"].jumps.iter().all(|j| !j.contains("HOSTPORTS")));
        assert_eq!(
            plans["filter"].jumps.len(),
            2,
            "INPUT -> KUBE-FIREWALL is kept"
        );
        assert!(
            !plans
                .values()
                .any(|p| p.chains.iter().any(|c| c.starts_with("KUBE-ROUTER")))
        );
        let script = restore_script(&plans);
        assert!(script.contains(
            "-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
        assert!(script.contains(":KUBE-SVC-ABC - [0:0]\n"));
        assert!(script.contains("-X KUBE-SVC-ABC\n"));
        assert!(!script.contains("KUBE-FIREWALL"));
        assert!(!script.contains("KUBE-HOSTPORTS"));
        // Jumps are deleted after the flushes and before the chains go.
        let nat = &script[script.find("*nat").unwrap()..];
        let d = nat.find("-D PREROUTING").unwrap();
        let x = nat.find("-X KUBE-SERVICES").unwrap();
        assert!(d < x);
    }

    #[test]
    fn ipsets_of_kube_proxys_ipvs_mode_only() {
        for set in ["KUBE-CLUSTER-IP", "KUBE-6-NODE-PORT-TCP", "KUBE-LOOP-BACK"] {
            assert!(kube_proxy_ipset(set), "{set}");
        }
        for set in ["KUBE-SRC-ABC", "KUBE-DST-XYZ", "cali40all", "KUBE-ROUTER-X"] {
            assert!(!kube_proxy_ipset(set), "{set}");
        }
    }

    #[test]
    fn nothing_of_kube_proxy_nothing_to_do() {
        let kubelet_only = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-MARK-DROP - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        assert!(plan_iptables(kubelet_only).is_empty());
        assert!(plan_iptables("").is_empty());
    }

    #[test]
    fn nftables_tables_of_kube_proxy() {
        let list = "table ip nat\ntable ip kube-proxy\ntable ip6 kube-proxy\ntable inet filter\n";
        assert_eq!(nft_kube_proxy_tables(list), ["ip", "ip6"]);
        assert!(nft_kube_proxy_tables("table ip filter\n").is_empty());
    }
}
