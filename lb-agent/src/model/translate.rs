//! kube-proxy's Service semantics as a pure function:
//! (ClusterState, NodeConfig) -> DesiredState, plus the problems found in
//! objects that could not be used. A bad object is skipped whole; it never
//! changes what a good one programs.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

#[cfg(test)]
use k8s_openapi::api::core::v1::Service;

use k8s_openapi::jiff::Timestamp;

use super::{
    ClusterState, NodeConfig, ObjectKey,
    cluster::{ANNOTATION_ALGORITHM, ANNOTATION_FORWARDING_MODE, ForwardingMode, LABEL_ZONE},
    desired::{
        Backend, BackendSet, BackendSetKey, DesiredState, Frontend, FrontendKey, FrontendKind,
        HealthCheck, Protocol, Scope, Selection,
    },
    records::{EndpointAddress, ServicePortRecord, ServiceRecord, SliceRecord},
    tracker::{ChangeTracker, Dirty},
};

/// Default and ceiling of sessionAffinityConfig.clientIP.timeoutSeconds.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// An object (or part of one) that was not used, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// "Service default/web", "EndpointSlice default/web-abc".
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

#[derive(Debug, Default)]
pub struct Translation {
    pub desired: DesiredState,
    pub problems: Vec<Problem>,
    /// Which Service holds each Service IP: the next translation keeps it
    /// there (`translate_with`), so a newcomer claiming a taken IP never
    /// takes it over.
    pub ip_owners: BTreeMap<IpAddr, ObjectKey>,
    /// Which Service holds each contested thing (IPs, frontends, health-check
    /// ports): the next translation keeps each with its holder.
    pub owners: Owners,
    /// Service ports with a Local traffic policy and no local endpoint
    /// (kube-proxy's `sync_proxy_rules_no_local_endpoints_total`).
    pub no_local_endpoints: NoLocalEndpoints,
}

/// Service ports ("ns/name:port") whose Local policy finds no endpoint on
/// this node, per policy (either family).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    pub internal: BTreeSet<String>,
    pub external: BTreeSet<String>,
}

/// One endpoint of one service port, after kube-proxy's condition rules.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EndpointInfo {
    addr: IpAddr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    /// Zones this endpoint is hinted for (EndpointSlice hints.forZones).
    zone_hints: Vec<String>,
    /// Nodes this endpoint is hinted for (hints.forNodes).
    node_hints: Vec<String>,
}

pub fn translate(state: &ClusterState, node: &NodeConfig) -> Translation {
    translate_with(state, node, &BTreeMap::new())
}

/// `translate`, where each holder in `prior_owners` keeps what it holds
/// against any other claimant. The from-scratch translation: every Service
/// of `state` merged in one pass, by the same steps `Translator::update`
/// takes for the few Services a change touches.
pub fn translate_with(
    state: &ClusterState,
    node: &NodeConfig,
    prior_owners: &Owners,
) -> Translation {
    let mut tracker = ChangeTracker::default();
    tracker.replace(state.clone());
    let mut translator = Translator::new(node.clone());
    let all: BTreeSet<ObjectKey> = state.services.keys().cloned().collect();
    translator.zone = node_zone(&tracker, node);
    translator.remerge(&tracker, all, Some(prior_owners));
    translator.desired.service_cidrs = service_cidrs(state, node);
    translator.translation()
}

/// The Service CIDRs: every ServiceCIDR object's and --service-cidr's,
/// normalized to their network.
fn service_cidrs(state: &ClusterState, node: &NodeConfig) -> BTreeSet<IpNet> {
    state
        .service_cidrs
        .values()
        .flat_map(|c| c.iter())
        .chain(&node.service_cidrs)
        .map(IpNet::trunc)
        .collect()
}

/// Who holds each contested thing.
pub type Owners = BTreeMap<Claim, ObjectKey>;

/// This node's zone (its Node's `topology.kubernetes.io/zone` label), for topology hints.
fn node_zone(tracker: &ChangeTracker, node: &NodeConfig) -> Option<String> {
    tracker
        .state()
        .nodes
        .get(&node.node_name)
        .and_then(|n| n.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned())
        .filter(|z| !z.is_empty())
}

/// Something one Service asks for that another may ask for too: the
/// claimants of each are re-merged together when one of them changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Claim {
    /// A ClusterIP, externalIP or LoadBalancer IP.
    Ip(IpAddr),
    /// A frontend entry (NodePorts on node addresses, and a Service IP
    /// that is also a node address): links claimants, never reserved.
    Frontend(FrontendKey),
    /// A nodePort on the node addresses of one family (true: IPv6), for
    /// which the holder is kept.
    NodePort(u16, Protocol, bool),
    HealthCheckPort(u16),
}

/// What a Service got once conflicts were settled, to take back when it is
/// merged again.
#[derive(Debug, Default)]
struct Granted {
    frontends: Vec<FrontendKey>,
    ips: Vec<IpAddr>,
    source_ranges: Vec<IpAddr>,
    health_check: Option<u16>,
    problems: Vec<Problem>,
    no_local_endpoints: NoLocalEndpoints,
}

/// What an update changed in the desired state: the sync writes these and
/// nothing else.
#[derive(Debug, Default)]
pub struct Delta {
    /// Frontends whose entry changed, with what they were before (None: new).
    pub frontends: BTreeMap<FrontendKey, Option<Frontend>>,
    /// Address entries added, changed or removed.
    pub addresses: BTreeSet<(IpAddr, Scope)>,
    /// LoadBalancer IPs whose source ranges changed.
    pub source_ranges: BTreeSet<IpAddr>,
    /// healthCheckNodePorts changed.
    pub health_checks: bool,
    /// The Service CIDRs changed.
    pub service_cidrs: bool,
    /// Problems that appeared, and that went away.
    pub new_problems: Vec<Problem>,
    pub resolved_problems: Vec<Problem>,
}

impl Delta {
    /// Nothing for the maps to do.
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.addresses.is_empty()
            && self.source_ranges.is_empty()
            && !self.service_cidrs
    }
}

/// Incremental translation: keeps the desired state and, per Service, what
/// it claimed and was granted, so a change re-translates only the Services
/// it touched and the other claimants of what they claim.
pub struct Translator {
    node: NodeConfig,
    zone: Option<String>,
    claims: BTreeMap<ObjectKey, Vec<Claim>>,
    /// Per claim, its claimants: mostly one, so a Vec (a one-element
    /// BTreeSet allocates a whole node).
    claimants: BTreeMap<Claim, Vec<ObjectKey>>,
    granted: BTreeMap<ObjectKey, Granted>,
    desired: DesiredState,
    ip_owners: BTreeMap<IpAddr, ObjectKey>,
    owners: Owners,
    /// Services whose slices carry zone hints: the ones a zone change concerns.
    zone_hinted: BTreeSet<ObjectKey>,
    /// Every Service's held addresses (ours or not, used or not; see
    /// `held_addresses`): what it adds to `desired.allocated`.
    held_ips: BTreeMap<ObjectKey, Vec<IpAddr>>,
    /// During a merge: what the component's members held before it.
    reserved: Owners,
    /// The change being merged: frontends as they were before it.
    touched: BTreeMap<FrontendKey, Option<Frontend>>,
    touched_ranges: BTreeSet<IpAddr>,
    /// Service ports without a local endpoint (internal, external policy),
    /// over every Service granted: kept as Services are merged, so reading
    /// it after each sync costs nothing.
    no_local_counts: (usize, usize),
}

impl Translator {
    pub fn new(node: NodeConfig) -> Self {
        Translator {
            node,
            zone: None,
            claims: BTreeMap::new(),
            claimants: BTreeMap::new(),
            granted: BTreeMap::new(),
            desired: DesiredState::default(),
            ip_owners: BTreeMap::new(),
            owners: Owners::new(),
            zone_hinted: BTreeSet::new(),
            held_ips: BTreeMap::new(),
            reserved: Owners::new(),
            touched: BTreeMap::new(),
            touched_ranges: BTreeSet::new(),
            no_local_counts: (0, 0),
        }
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn ip_owners(&self) -> &BTreeMap<IpAddr, ObjectKey> {
        &self.ip_owners
    }

    /// Every problem of every Service, sorted.
    pub fn problems(&self) -> Vec<Problem> {
        let mut all: Vec<Problem> = self
            .granted
            .values()
            .flat_map(|g| g.problems.iter().cloned())
            .collect();
        all.sort();
        all
    }

    /// Service ports whose Local policy finds no local endpoint.
    /// How many Service ports have no local endpoint: (internalTrafficPolicy
    /// Local, externalTrafficPolicy Local).
    pub fn no_local_endpoint_counts(&self) -> (usize, usize) {
        self.no_local_counts
    }

    pub fn no_local_endpoints(&self) -> NoLocalEndpoints {
        let mut out = NoLocalEndpoints::default();
        for g in self.granted.values() {
            out.internal
                .extend(g.no_local_endpoints.internal.iter().cloned());
            out.external
                .extend(g.no_local_endpoints.external.iter().cloned());
        }
        out
    }

    /// A snapshot in the from-scratch shape.
    pub fn translation(&self) -> Translation {
        Translation {
            desired: self.desired.clone(),
            problems: self.problems(),
            ip_owners: self.ip_owners.clone(),
            owners: self.owners.clone(),
            no_local_endpoints: self.no_local_endpoints(),
        }
    }

    /// Apply what changed: a new node view (addresses, settings) or zone
    /// re-translates every Service, otherwise only `dirty.services` and the
    /// other claimants of what they claim(ed).
    pub fn update(&mut self, tracker: &ChangeTracker, node: &NodeConfig, dirty: &Dirty) -> Delta {
        let zone = node_zone(tracker, node);
        let services: BTreeSet<ObjectKey> = if *node != self.node {
            self.node = node.clone();
            self.zone = zone;
            tracker
                .state()
                .services
                .keys()
                .chain(self.claims.keys())
                .chain(self.granted.keys())
                .cloned()
                .collect()
        } else if zone != self.zone {
            // The zone matters only where slices carry zone hints.
            self.zone = zone;
            dirty
                .services
                .iter()
                .chain(&self.zone_hinted)
                .cloned()
                .collect()
        } else {
            dirty.services.clone()
        };
        let mut delta = self.remerge(tracker, services, None);
        let cidrs = service_cidrs(tracker.state(), &self.node);
        if cidrs != self.desired.service_cidrs {
            self.desired.service_cidrs = cidrs;
            delta.service_cidrs = true;
        }
        delta
    }

    /// Translate `dirty` again, then merge them and every Service sharing a
    /// claim with them (transitively) in the from-scratch order.
    fn remerge(
        &mut self,
        tracker: &ChangeTracker,
        dirty: BTreeSet<ObjectKey>,
        prior: Option<&Owners>,
    ) -> Delta {
        let state = tracker.state();
        let mut translated: BTreeMap<ObjectKey, ServiceTranslation> = BTreeMap::new();
        let mut frontier: BTreeSet<Claim> = BTreeSet::new();
        let mut allocated_changed: BTreeSet<IpAddr> = BTreeSet::new();
        for key in &dirty {
            self.hold_addresses(key, state.services.get(key), &mut allocated_changed);
            for claim in self.claims.remove(key).unwrap_or_default() {
                if let Some(set) = self.claimants.get_mut(&claim) {
                    set.retain(|k| k != key);
                    if set.is_empty() {
                        self.claimants.remove(&claim);
                    }
                }
                frontier.insert(claim);
            }
            let Some(svc) = state.services.get(key) else {
                self.zone_hinted.remove(key);
                continue;
            };
            let t = translate_service(key, svc, tracker, &self.node, self.zone.as_deref());
            if t.zone_hinted {
                self.zone_hinted.insert(key.clone());
            } else {
                self.zone_hinted.remove(key);
            }
            let claims = t.claims();
            for claim in &claims {
                let claimants = self.claimants.entry(*claim).or_default();
                if !claimants.contains(key) {
                    claimants.push(key.clone());
                }
                frontier.insert(*claim);
            }
            if !claims.is_empty() {
                self.claims.insert(key.clone(), claims);
            }
            translated.insert(key.clone(), t);
        }
        // Everyone sharing a claim with the component, transitively.
        let mut component = dirty;
        let mut frontier: Vec<Claim> = frontier.into_iter().collect();
        while let Some(claim) = frontier.pop() {
            for other in self.claimants.get(&claim).into_iter().flatten() {
                if component.insert(other.clone()) {
                    frontier.extend(self.claims.get(other).into_iter().flatten().copied());
                }
            }
        }

        let mut old_problems: BTreeSet<Problem> = BTreeSet::new();
        for key in &component {
            if let Some(granted) = self.granted.get(key) {
                old_problems.extend(granted.problems.iter().cloned());
            }
        }
        // A holder that is itself skipped (its ClusterIP went to another)
        // keeps nothing: merge again without its reservations, until every
        // reservation is honoured.
        // Who held what the component claims (the holders of this moment,
        // unless told otherwise).
        let claims: BTreeSet<Claim> = component
            .iter()
            .flat_map(|k| self.claims.get(k).into_iter().flatten().copied())
            .collect();
        let prior_owners = prior.unwrap_or(&self.owners);
        let mut prior: Owners = claims
            .into_iter()
            .filter_map(|c| Some((c, prior_owners.get(&c)?.clone())))
            .collect();
        loop {
            self.merge_component(tracker, &component, prior, &mut translated);
            let dishonoured = self
                .reserved
                .iter()
                .any(|(claim, owner)| self.owners.get(claim) != Some(owner));
            if !dishonoured {
                break;
            }
            prior = std::mem::take(&mut self.reserved)
                .into_iter()
                .filter(|(claim, owner)| self.owners.get(claim) == Some(owner))
                .collect();
        }
        let new_problems: BTreeSet<Problem> = component
            .iter()
            .filter_map(|key| self.granted.get(key))
            .flat_map(|g| g.problems.iter().cloned())
            .collect();

        let mut delta = Delta {
            new_problems: new_problems.difference(&old_problems).cloned().collect(),
            resolved_problems: old_problems.difference(&new_problems).cloned().collect(),
            ..Delta::default()
        };
        self.reserved.clear();
        let touched = std::mem::take(&mut self.touched);
        let mut addresses: BTreeSet<(IpAddr, Scope)> = BTreeSet::new();
        for (fk, before) in touched {
            if self.desired.frontends.get(&fk) == before.as_ref() {
                continue;
            }
            addresses.insert((fk.addr, fk.scope));
            delta.frontends.insert(fk, before);
        }
        for (addr, scope) in addresses {
            let entry = self.desired.address_entry(addr, scope);
            let before = match entry {
                Some(e) => self.desired.addresses.insert((addr, scope), e),
                None => self.desired.addresses.remove(&(addr, scope)),
            };
            if before != entry {
                delta.addresses.insert((addr, scope));
            }
        }
        // The sync lists (or unlists) an address Services hold with the
        // address entries it visits.
        delta.addresses.extend(
            allocated_changed
                .into_iter()
                .map(|addr| (addr, Scope::Internal)),
        );
        delta.source_ranges = std::mem::take(&mut self.touched_ranges);
        delta.health_checks = true;
        delta
    }

    /// Count `svc`'s ClusterIPs (none when it is gone) in
    /// `desired.allocated` instead of what `key` held before; addresses that
    /// start or stop being held go to `changed`.
    fn hold_addresses(
        &mut self,
        key: &ObjectKey,
        svc: Option<&Arc<ServiceRecord>>,
        changed: &mut BTreeSet<IpAddr>,
    ) {
        let now = svc.map(|s| held_addresses(s)).unwrap_or_default();
        let before = self.held_ips.remove(key).unwrap_or_default();
        if now == before {
            if !now.is_empty() {
                self.held_ips.insert(key.clone(), now);
            }
            return;
        }
        for addr in &before {
            if let Some(n) = self.desired.allocated.get_mut(addr) {
                *n -= 1;
                if *n == 0 {
                    self.desired.allocated.remove(addr);
                    changed.insert(*addr);
                }
            }
        }
        for addr in &now {
            let n = self.desired.allocated.entry(*addr).or_insert(0);
            if *n == 0 {
                changed.insert(*addr);
            }
            *n += 1;
        }
        if !now.is_empty() {
            self.held_ips.insert(key.clone(), now);
        }
    }

    /// Take back what the component's members were granted and merge them
    /// again in the from-scratch order, each contested thing staying with
    /// its holder in `prior` while the holder still claims it.
    fn merge_component(
        &mut self,
        tracker: &ChangeTracker,
        component: &BTreeSet<ObjectKey>,
        prior: Owners,
        translated: &mut BTreeMap<ObjectKey, ServiceTranslation>,
    ) {
        let state = tracker.state();
        self.reserved = prior
            .into_iter()
            .filter(|(claim, owner)| self.claimants.get(claim).is_some_and(|c| c.contains(owner)))
            .collect();
        let held: BTreeSet<&ObjectKey> = self
            .reserved
            .iter()
            .filter(|(claim, _)| matches!(claim, Claim::Ip(_)))
            .map(|(_, owner)| owner)
            .collect();
        let mut order: Vec<(bool, Option<Timestamp>, ObjectKey)> = Vec::new();
        for key in component {
            if let Some(svc) = state.services.get(key) {
                let created = svc.created;
                order.push((held.contains(key), created, key.clone()));
            }
        }
        for key in component {
            if let Some(granted) = self.granted.remove(key) {
                self.no_local_counts.0 -= granted.no_local_endpoints.internal.len();
                self.no_local_counts.1 -= granted.no_local_endpoints.external.len();
                self.take_back(key, granted);
            }
        }
        // When two Services claim one ClusterIP the first keeps it: the one
        // that held it before, then the oldest (as the API server's
        // allocator would have had it), then by name.
        order.sort_by(|(ha, ta, ka), (hb, tb, kb)| {
            hb.cmp(ha).then(ta.cmp(tb)).then_with(|| ka.cmp(kb))
        });
        for (_, _, key) in order {
            let t = match translated.remove(&key) {
                Some(t) => t,
                None => match state.services.get(&key) {
                    Some(svc) => {
                        translate_service(&key, svc, tracker, &self.node, self.zone.as_deref())
                    }
                    None => continue,
                },
            };
            let granted = self.merge(&key, t);
            self.no_local_counts.0 += granted.no_local_endpoints.internal.len();
            self.no_local_counts.1 += granted.no_local_endpoints.external.len();
            self.granted.insert(key, granted);
        }
    }

    /// Remove what a Service was granted from the desired state.
    fn take_back(&mut self, key: &ObjectKey, granted: Granted) {
        for fk in granted.frontends {
            if let Some(old) = self.desired.frontends.remove(&fk) {
                self.touched.entry(fk).or_insert(Some(old));
            }
            self.disown(Claim::NodePort(fk.port, fk.proto, fk.addr.is_ipv6()), key);
        }
        for ip in granted.ips {
            if self.ip_owners.get(&ip) == Some(key) {
                self.ip_owners.remove(&ip);
            }
            self.disown(Claim::Ip(ip), key);
        }
        for ip in granted.source_ranges {
            self.desired.source_ranges.remove(&ip);
            self.touched_ranges.insert(ip);
        }
        if let Some(port) = granted.health_check
            && self
                .desired
                .health_checks
                .get(&port)
                .is_some_and(|h| h.service == *key)
        {
            self.desired.health_checks.remove(&port);
        }
        if let Some(port) = granted.health_check {
            self.disown(Claim::HealthCheckPort(port), key);
        }
    }

    fn disown(&mut self, claim: Claim, key: &ObjectKey) {
        if self.owners.get(&claim) == Some(key) {
            self.owners.remove(&claim);
        }
    }

    /// The other Service that has `ip`: merged before in this pass, or
    /// holding it from before this change.
    fn ip_holder(&self, ip: &IpAddr, key: &ObjectKey) -> Option<ObjectKey> {
        match self.ip_owners.get(ip) {
            Some(owner) if owner != key => Some(owner.clone()),
            Some(_) => None,
            None => self.reserved_for_other(&Claim::Ip(*ip), key).cloned(),
        }
    }

    /// Another Service holds `claim` from before this change and still claims it.
    fn reserved_for_other(&self, claim: &Claim, key: &ObjectKey) -> Option<&ObjectKey> {
        self.reserved.get(claim).filter(|owner| *owner != key)
    }

    fn insert_frontend(&mut self, fk: FrontendKey, frontend: Frontend, granted: &mut Granted) {
        let before = self.desired.frontends.insert(fk, frontend);
        self.touched.entry(fk).or_insert(before);
        granted.frontends.push(fk);
    }

    /// Merge one translated Service into the desired state against what
    /// Services merged before it hold.
    fn merge(&mut self, key: &ObjectKey, t: ServiceTranslation) -> Granted {
        let mut granted = Granted {
            problems: t.problems,
            ..Granted::default()
        };
        let object = format!("Service {key}");
        let service = match t.result {
            Ok(Some(f)) => f,
            Ok(None) => return granted,
            Err(reason) => {
                granted.problems.push(Problem { object, reason });
                return granted;
            }
        };
        // The ClusterIPs (first, one per family) decide for the whole
        // Service; a taken externalIP or LoadBalancer IP is skipped alone.
        if let Some((ip, owner)) = service
            .by_ip
            .iter()
            .take_while(|(_, kind, _)| *kind == FrontendKind::ClusterIP)
            .find_map(|(ip, _, _)| Some((ip, self.ip_holder(ip, key)?)))
        {
            granted.problems.push(Problem {
                object,
                reason: format!("clusterIP {ip} is already used by Service {owner}"),
            });
            return granted;
        }
        // A nodePort another Service holds on this node: that port is skipped.
        let mut taken_node_ports = BTreeSet::new();
        for (fk, _) in &service.node_ports {
            if taken_node_ports.contains(&(fk.port, fk.proto, fk.addr.is_ipv6())) {
                continue;
            }
            let holder = match self.desired.frontends.get(fk) {
                Some(f) => f.service_port.split(':').next().map(str::to_owned),
                None => self
                    .reserved_for_other(&Claim::NodePort(fk.port, fk.proto, fk.addr.is_ipv6()), key)
                    .map(ToString::to_string),
            };
            if let Some(holder) = holder {
                taken_node_ports.insert((fk.port, fk.proto, fk.addr.is_ipv6()));
                granted.problems.push(Problem {
                    object: object.clone(),
                    reason: format!(
                        "nodePort {}/{} is already used by Service {holder}; skipped",
                        fk.port, fk.proto
                    ),
                });
            }
        }
        let lb_ips: Vec<IpAddr> = service
            .by_ip
            .iter()
            .filter(|(_, kind, _)| *kind == FrontendKind::LoadBalancer)
            .map(|(ip, _, _)| *ip)
            .collect();
        for (ip, kind, ports) in service.by_ip {
            if let Some(owner) = self.ip_holder(&ip, key) {
                let what = match kind {
                    FrontendKind::LoadBalancer => "LoadBalancer IP",
                    _ => "externalIP",
                };
                granted.problems.push(Problem {
                    object: object.clone(),
                    reason: format!("{what} {ip} is already used by Service {owner}; skipped"),
                });
                continue;
            }
            self.ip_owners.insert(ip, key.clone());
            self.owners.insert(Claim::Ip(ip), key.clone());
            granted.ips.push(ip);
            if kind == FrontendKind::LoadBalancer && !service.source_ranges.is_empty() {
                // Each family's LoadBalancer IP gets that family's ranges
                // (none of its family: closed, not open to all).
                let mut ranges: BTreeSet<IpNet> = service
                    .source_ranges
                    .iter()
                    .filter(|net| net.addr().is_ipv4() == ip.is_ipv4())
                    .copied()
                    .collect();
                // As kube-proxy: ranges that admit the node admit the
                // Service's LoadBalancer IPs too (the node's own traffic,
                // source-NATed to the LB IP by the load balancer's hairpin).
                if ranges.iter().any(|net| {
                    self.node
                        .nodeport_addresses
                        .iter()
                        .chain(&self.node.node_ips)
                        .any(|a| net.contains(a))
                }) {
                    ranges.extend(
                        lb_ips
                            .iter()
                            .filter(|lb| lb.is_ipv4() == ip.is_ipv4())
                            .map(|lb| IpNet::from(*lb)),
                    );
                }
                self.desired.source_ranges.insert(ip, ranges);
                self.touched_ranges.insert(ip);
                granted.source_ranges.push(ip);
            }
            for (fk, frontend) in ports {
                self.insert_frontend(fk, frontend, &mut granted);
            }
        }
        for (fk, frontend) in service.node_ports {
            if !taken_node_ports.contains(&(fk.port, fk.proto, fk.addr.is_ipv6())) {
                self.owners.insert(
                    Claim::NodePort(fk.port, fk.proto, fk.addr.is_ipv6()),
                    key.clone(),
                );
                self.insert_frontend(fk, frontend, &mut granted);
            }
        }
        granted.no_local_endpoints = service.no_local_endpoints;
        if let Some((port, check)) = service.health_check {
            let holder = match self.desired.health_checks.get(&port) {
                Some(h) => Some(h.service.clone()),
                None => self
                    .reserved_for_other(&Claim::HealthCheckPort(port), key)
                    .cloned(),
            };
            match holder {
                Some(holder) => granted.problems.push(Problem {
                    object: object.clone(),
                    reason: format!(
                        "healthCheckNodePort {port} is already used by Service {holder}; not served"
                    ),
                }),
                None => {
                    self.desired.health_checks.insert(port, check);
                    self.owners
                        .insert(Claim::HealthCheckPort(port), key.clone());
                    granted.health_check = Some(port);
                }
            }
        }
        granted
    }
}

/// One Service translated on its own, before conflicts with other Services.
struct ServiceTranslation {
    result: Result<Option<ServiceFrontends>, String>,
    /// Parts of it (or of its slices) that could not be used.
    problems: Vec<Problem>,
    /// Some endpoint of its slices is hinted for zones.
    zone_hinted: bool,
}

impl ServiceTranslation {
    /// What it asks for that another Service may ask for too.
    fn claims(&self) -> Vec<Claim> {
        let Ok(Some(service)) = &self.result else {
            return Vec::new();
        };
        let mut claims = Vec::new();
        for (ip, _, ports) in &service.by_ip {
            claims.push(Claim::Ip(*ip));
            claims.extend(ports.iter().map(|(fk, _)| Claim::Frontend(*fk)));
        }
        for (fk, _) in &service.node_ports {
            claims.push(Claim::Frontend(*fk));
            claims.push(Claim::NodePort(fk.port, fk.proto, fk.addr.is_ipv6()));
        }
        claims.extend(
            service
                .health_check
                .as_ref()
                .map(|(port, _)| Claim::HealthCheckPort(*port)),
        );
        claims.sort();
        claims.dedup();
        claims
    }
}

fn translate_service(
    key: &ObjectKey,
    svc: &ServiceRecord,
    tracker: &ChangeTracker,
    node: &NodeConfig,
    zone: Option<&str>,
) -> ServiceTranslation {
    let slices: Vec<(&ObjectKey, &SliceRecord)> = tracker.slices_of(key).collect();
    let mut problems = Vec::new();
    let result = service_frontends(key, svc, &slices, node, zone, &mut problems);
    let zone_hinted = slices
        .iter()
        .any(|(_, slice)| slice.endpoints.iter().any(|e| e.zone_hints.is_some()));
    ServiceTranslation {
        result,
        problems,
        zone_hinted,
    }
}

/// The frontends on one Service address, of one kind.
type AddressFrontends = (IpAddr, FrontendKind, Vec<(FrontendKey, Frontend)>);

/// Everything one Service programs.
struct ServiceFrontends {
    /// Frontends per Service address it claims: the ClusterIP first, then
    /// externalIPs and LoadBalancer IPs (each with both scopes' entries).
    by_ip: Vec<AddressFrontends>,
    /// NodePort frontends on the node's addresses (shared, not claimed).
    node_ports: Vec<(FrontendKey, Frontend)>,
    health_check: Option<(u16, HealthCheck)>,
    source_ranges: BTreeSet<IpNet>,
    no_local_endpoints: NoLocalEndpoints,
}

/// The frontends of one Service; Ok(None) when kube-proxy ignores it.
fn service_frontends(
    key: &ObjectKey,
    svc: &ServiceRecord,
    service_slices: &[(&ObjectKey, &SliceRecord)],
    node: &NodeConfig,
    zone: Option<&str>,
    problems: &mut Vec<Problem>,
) -> Result<Option<ServiceFrontends>, String> {
    let Some(spec) = svc.spec.as_ref() else {
        return Err("has no spec".into());
    };
    // kube-proxy's rule: a Service labelled for another proxy is not ours;
    // with --service-proxy-name, only the Services labelled for us are.
    let ours = svc.service_proxy_name.as_deref() == node.service_proxy_name.as_deref();
    if !ours || svc.headless_label {
        return Ok(None);
    }
    if spec.service_type.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let cluster_ips = cluster_ips(spec.cluster_ip.as_deref(), spec.cluster_ips.as_deref())?;
    if cluster_ips.is_empty() {
        return Ok(None);
    }

    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .affinity_timeout_s
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S as i32);
            if t < 1 || t > MAX_AFFINITY_TIMEOUT_S as i32 {
                return Err(format!(
                    "sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1..={MAX_AFFINITY_TIMEOUT_S}"
                ));
            }
            Some(t as u32)
        }
        Some(other) => return Err(format!("sessionAffinity {other:?} is not None or ClientIP")),
    };
    let maglev = match svc.algorithm.as_deref() {
        None => node.default_maglev,
        Some("maglev") => true,
        Some("random") => false,
        Some(other) => {
            return Err(format!(
                "annotation {ANNOTATION_ALGORITHM}: {other:?} is not maglev or random"
            ));
        }
    };
    let forwarding_mode = match svc.forwarding_mode.as_deref() {
        None => node.default_forwarding_mode,
        Some(text) => ForwardingMode::parse(text).ok_or_else(|| {
            format!("annotation {ANNOTATION_FORWARDING_MODE}: {text:?} is not snat, dsr or hybrid")
        })?,
    };
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(format!(
                "internalTrafficPolicy {other:?} is not Cluster or Local"
            ));
        }
    };

    let ports = &spec.ports;
    // Validate every port before using any: an invalid object is skipped whole.
    let mut checked = Vec::with_capacity(ports.len());
    for (i, port) in ports.iter().enumerate() {
        let number = port_number(port.port)
            .ok_or_else(|| format!("spec.ports[{i}].port {} is outside 1..=65535", port.port))?;
        let proto = Protocol::from_k8s(port.protocol.as_deref())
            .map_err(|e| format!("spec.ports[{i}]: {e}"))?;
        checked.push((port, number, proto));
    }

    let service_type = spec.service_type.as_deref().unwrap_or("ClusterIP");
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(format!(
                "externalTrafficPolicy {other:?} is not Cluster or Local"
            ));
        }
    };
    let has_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    let mut source_ranges = BTreeSet::new();
    if service_type == "LoadBalancer" {
        for range in &spec.load_balancer_source_ranges {
            let range = range.trim();
            // Fail closed: a range we cannot read must not open the IP to all.
            let net: IpNet = range
                .parse()
                .map_err(|_| format!("loadBalancerSourceRanges entry {range:?} is not a CIDR"))?;
            source_ranges.insert(net.trunc());
        }
    }

    let mut by_ip = Vec::new();
    let mut external_ports = Vec::new();
    let mut node_ports = Vec::new();
    let mut local_endpoints = BTreeSet::new();
    let mut no_local_endpoints = NoLocalEndpoints::default();
    // kube-proxy's ExternallyAccessible: where externalTrafficPolicy applies.
    let externally_reachable = has_node_ports || !spec.external_ips.is_empty();
    for &cluster_ip in &cluster_ips {
        let family_v6 = cluster_ip.is_ipv6();
        let mut cluster_ip_ports = Vec::new();
        for &(port, number, proto) in &checked {
            let port_name = port.name.as_deref().unwrap_or("");
            let endpoints =
                endpoints_for_port(port_name, proto, family_v6, service_slices, node, problems);
            let sets = backend_sets(&endpoints, &node.node_name, zone);
            let port_name: Arc<str> = service_port_name(key, port).into();
            // One set per selection, shared by every frontend of this port
            // and family that uses it.
            let set_of = |selection: Selection| {
                let selected = match selection {
                    Selection::Cluster => &sets.cluster,
                    Selection::Local => &sets.local,
                };
                let mut set = BackendSet {
                    key: BackendSetKey {
                        service_port: port_name.clone(),
                        proto,
                        v6: family_v6,
                        selection,
                    },
                    backends: selected.clone(),
                    standby: standby(&endpoints, selected),
                    maglev,
                };
                for b in set.backends.iter_mut().chain(&mut set.standby) {
                    b.on_node = node.host_addresses.contains(&b.addr);
                }
                Arc::new(set)
            };
            let cluster_set = set_of(Selection::Cluster);
            let local_set = (internal_local || external_local).then(|| set_of(Selection::Local));
            // The set a traffic policy selects, and whether an empty set
            // drops: with policy Local and endpoints only elsewhere
            // kube-proxy drops rather than rejects.
            let for_policy = |local: bool| match &local_set {
                Some(set) if local => (
                    set.clone(),
                    sets.local.is_empty() && !sets.cluster.is_empty(),
                ),
                _ => (cluster_set.clone(), false),
            };
            // The health check counts ready local endpoints only, as
            // kube-proxy's (a node whose local endpoints all terminate
            // answers 503, so load balancers drain it during a rollout).
            local_endpoints.extend(sets.local.iter().filter(|b| !b.terminating).map(|b| b.addr));
            if sets.local.is_empty() {
                let name = service_port_name(key, port);
                if internal_local {
                    no_local_endpoints.internal.insert(name.clone());
                }
                if external_local && externally_reachable {
                    no_local_endpoints.external.insert(name);
                }
            }
            let in_cluster = |set: Arc<BackendSet>, drop_if_empty: bool| Frontend {
                service_port: port_name.clone(),
                kind: FrontendKind::ClusterIP,
                set,
                drop_if_empty,
                internal_local,
                affinity_timeout_s,
                source_ranges: false,
                masquerade: false,
                dsr: false,
            };
            let (internal, internal_drop) = for_policy(internal_local);
            let cluster_ip_frontend = in_cluster(internal, internal_drop);
            if !node.cluster_cidrs.is_empty() {
                // kube-proxy with --cluster-cidr: off-cluster traffic routed to a
                // ClusterIP is served and masqueraded (its source is outside the
                // cluster CIDR by construction: pods use their own node's entries).
                cluster_ip_ports.push((
                    FrontendKey {
                        addr: cluster_ip,
                        port: number,
                        proto,
                        scope: Scope::External,
                    },
                    Frontend {
                        masquerade: true,
                        ..cluster_ip_frontend.clone()
                    },
                ));
            }
            cluster_ip_ports.push((
                FrontendKey {
                    addr: cluster_ip,
                    port: number,
                    proto,
                    scope: Scope::Internal,
                },
                cluster_ip_frontend,
            ));
            // Externally reachable frontends: from pods and the node they use
            // every endpoint (kube-proxy short-circuits them to the cluster set,
            // whatever the traffic policies); from outside, externalTrafficPolicy.
            // Under policy Cluster kube-proxy masquerades both (only Local keeps
            // the client's address, and pods short-circuit unmasqueraded).
            let masquerade = !external_local && node.masquerade_cluster_policy;
            let from_pods = Frontend {
                internal_local: false,
                masquerade,
                ..in_cluster(cluster_set.clone(), false)
            };
            let (external, external_drop) = for_policy(external_local);
            // DSR replaces the masquerade from outside: the client's address
            // is kept, for endpoints here too (policy Local keeps it anyway
            // and never leaves the node).
            let dsr = !external_local && forwarding_mode.direct(proto);
            let from_outside = Frontend {
                masquerade: masquerade && !dsr,
                dsr,
                ..in_cluster(external, external_drop)
            };
            external_ports.push((
                family_v6,
                number,
                proto,
                from_pods.clone(),
                from_outside.clone(),
            ));
            if has_node_ports && let Some(node_port) = port.node_port {
                let node_port = port_number(node_port).ok_or_else(|| {
                    format!("spec.ports[{port_name:?}].nodePort {node_port} is outside 1..=65535")
                })?;
                for addr in node
                    .nodeport_addresses
                    .iter()
                    .filter(|a| a.is_ipv6() == family_v6)
                {
                    for (scope, frontend) in [
                        (Scope::Internal, &from_pods),
                        (Scope::External, &from_outside),
                    ] {
                        node_ports.push((
                            FrontendKey {
                                addr: *addr,
                                port: node_port,
                                proto,
                                scope,
                            },
                            Frontend {
                                kind: FrontendKind::NodePort,
                                ..frontend.clone()
                            },
                        ));
                    }
                }
            }
        }
        by_ip.push((cluster_ip, FrontendKind::ClusterIP, cluster_ip_ports));
    }

    // The same ports on an external address (its family's), both scopes.
    let on_address = |addr: IpAddr, kind: FrontendKind, ranges: bool| {
        let mut out = Vec::new();
        for (family_v6, number, proto, from_pods, from_outside) in &external_ports {
            if *family_v6 != addr.is_ipv6() {
                continue;
            }
            for (scope, frontend) in [
                (Scope::Internal, from_pods),
                (Scope::External, from_outside),
            ] {
                out.push((
                    FrontendKey {
                        addr,
                        port: *number,
                        proto: *proto,
                        scope,
                    },
                    Frontend {
                        kind,
                        source_ranges: ranges,
                        ..frontend.clone()
                    },
                ));
            }
        }
        (addr, kind, out)
    };
    let reject = |reason: String| Problem {
        object: format!("Service {key}"),
        reason,
    };
    // spec.externalIPs, if the --external-ip-cidrs allow-list admits them
    // (CVE-2020-8554: anyone who can create a Service could otherwise
    // intercept any address).
    for ext in &spec.external_ips {
        let Ok(addr) = ext.parse::<IpAddr>() else {
            problems.push(reject(format!(
                "externalIP {ext:?} is not an IP address; skipped"
            )));
            continue;
        };
        if !cluster_ips.iter().any(|c| c.is_ipv6() == addr.is_ipv6()) {
            // No ClusterIP (and so no endpoints) of its family.
            problems.push(reject(format!(
                "externalIP {addr} is of an IP family the Service does not have; skipped"
            )));
            continue;
        }
        if let Some(allowed) = &node.external_ip_cidrs
            && !allowed.iter().any(|net| net.contains(&addr))
        {
            problems.push(reject(format!(
                "externalIP {addr} is outside --external-ip-cidrs; skipped"
            )));
            continue;
        }
        by_ip.push(on_address(addr, FrontendKind::ExternalIP, false));
    }
    // status.loadBalancer.ingress IPs. ipMode Proxy means the load balancer
    // proxies to the nodes itself: kube-proxy leaves those IPs alone.
    if service_type == "LoadBalancer" {
        for entry in &spec.ingress {
            if entry.proxied {
                continue;
            }
            let Some(ip) = entry.ip.as_deref() else {
                continue;
            };
            match ip.parse::<IpAddr>() {
                Ok(addr) if cluster_ips.iter().any(|c| c.is_ipv6() == addr.is_ipv6()) => by_ip
                    .push(on_address(
                        addr,
                        FrontendKind::LoadBalancer,
                        !source_ranges.is_empty(),
                    )),
                Ok(addr) => problems.push(reject(format!(
                    "status.loadBalancer.ingress IP {addr} is of an IP family the Service does not have; skipped"
                ))),
                Err(_) => problems.push(reject(format!(
                    "status.loadBalancer.ingress IP {ip:?} is not an IP address; skipped"
                ))),
            }
        }
    }
    let health_check = match spec.health_check_node_port {
        Some(port) if service_type == "LoadBalancer" && external_local => {
            let port = port_number(port)
                .ok_or_else(|| format!("healthCheckNodePort {port} is outside 1..=65535"))?;
            Some((
                port,
                HealthCheck {
                    service: key.clone(),
                    local_endpoints: local_endpoints.len(),
                },
            ))
        }
        _ => None,
    };
    Ok(Some(ServiceFrontends {
        by_ip,
        node_ports,
        health_check,
        source_ranges,
        no_local_endpoints,
    }))
}

/// Endpoints that exist but are not in `selected`: standby backends.
fn standby(endpoints: &[EndpointInfo], selected: &[Backend]) -> Vec<Backend> {
    endpoints
        .iter()
        .filter(|e| {
            !selected
                .iter()
                .any(|x| x.addr == e.addr && x.port == e.port)
        })
        .map(|e| Backend {
            addr: e.addr,
            port: e.port,
            terminating: true,
            remote: !e.local,
            on_node: false,
        })
        .collect()
}

fn service_port_name(key: &ObjectKey, port: &ServicePortRecord) -> String {
    match port.name.as_deref() {
        Some(name) if !name.is_empty() => format!("{key}:{name}"),
        _ => key.to_string(),
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// The addresses a Service holds, whoever serves it and whether or not lb
/// can use it (each one that parses): its ClusterIPs, externalIPs and
/// LoadBalancer IPs (another proxy's may lie in a Service CIDR too).
fn held_addresses(svc: &ServiceRecord) -> Vec<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let cluster: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| &**ip).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let mut held: Vec<IpAddr> = cluster
        .into_iter()
        .chain(spec.external_ips.iter().map(|ip| &**ip))
        .chain(spec.ingress.iter().filter_map(|i| i.ip.as_deref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    held.sort_unstable();
    held.dedup();
    held
}

/// The ClusterIPs, one per family (spec.clusterIPs, else spec.clusterIP);
/// empty for headless / unallocated, Err when malformed.
fn cluster_ips(
    cluster_ip: Option<&str>,
    cluster_ips: Option<&[Box<str>]>,
) -> Result<Vec<IpAddr>, String> {
    let candidates: Vec<&str> = match cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| &**ip).collect(),
        _ => cluster_ip.into_iter().collect(),
    };
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in &candidates {
        if ip.is_empty() || *ip == "None" {
            return Ok(Vec::new());
        }
        let addr = ip
            .parse::<IpAddr>()
            .map_err(|_| format!("spec.clusterIPs entry {ip:?} is not an IP address"))?;
        if out.iter().any(|o| o.is_ipv6() == addr.is_ipv6()) {
            return Err(format!(
                "spec.clusterIPs has two addresses of one family ({})",
                candidates.join(", ")
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

/// kube-proxy's endpointslicecache: the endpoints of one service port, from
/// every slice of the Service, de-duplicated by ip:port.
fn endpoints_for_port(
    port_name: &str,
    proto: Protocol,
    family_v6: bool,
    slices: &[(&ObjectKey, &SliceRecord)],
    node: &NodeConfig,
    problems: &mut Vec<Problem>,
) -> Vec<EndpointInfo> {
    let mut by_addr: BTreeMap<(IpAddr, u16), EndpointInfo> = BTreeMap::new();
    let address_type = if family_v6 { "IPv6" } else { "IPv4" };
    for (slice_key, slice) in slices {
        if slice.address_type != address_type {
            continue;
        }
        let Some(slice_port) = slice.ports.iter().find(|p| {
            p.name == port_name && Protocol::from_k8s(p.protocol.as_deref()).ok() == Some(proto)
        }) else {
            continue;
        };
        // A slice port without a number is skipped, as kube-proxy does.
        let Some(port) = slice_port.port.and_then(port_number) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(first) = &endpoint.address else {
                continue;
            };
            let addr = match first {
                EndpointAddress::Ip(addr) if addr.is_ipv6() == family_v6 => *addr,
                _ => {
                    let text = match first {
                        EndpointAddress::Ip(addr) => addr.to_string(),
                        EndpointAddress::Invalid(text) => text.to_string(),
                    };
                    problems.push(Problem {
                        object: format!("EndpointSlice {slice_key}"),
                        reason: format!(
                            "endpoint address {text:?} is not an {address_type} address; endpoint skipped"
                        ),
                    });
                    continue;
                }
            };
            let info = EndpointInfo {
                addr,
                port,
                ready: endpoint.ready.unwrap_or(true),
                serving: endpoint.serving.unwrap_or(true),
                terminating: endpoint.terminating.unwrap_or(false),
                local: endpoint.node_name.as_deref() == Some(node.node_name.as_str()),
                zone_hints: endpoint
                    .zone_hints
                    .iter()
                    .flatten()
                    .map(|z| z.to_string())
                    .collect(),
                node_hints: endpoint
                    .node_hints
                    .iter()
                    .flatten()
                    .map(|n| n.to_string())
                    .collect(),
            };
            match by_addr.get(&(addr, port)) {
                // A non-terminating duplicate wins over a terminating one.
                Some(existing) if !existing.terminating => {}
                _ => {
                    by_addr.insert((addr, port), info);
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// Which hints pick the topologically available endpoints
/// (kube-proxy's topologyModeFromHints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'a> {
    /// No hints apply: every endpoint.
    All,
    /// PreferSameNode: endpoints hinted for this node.
    Node(&'a str),
    /// PreferSameZone (PreferClose, topology-aware routing): endpoints
    /// hinted for this node's zone.
    Zone(&'a str),
}

/// Node hints are used when every ready endpoint has some and one is for
/// this node; otherwise zone hints, on the same terms for this node's
/// zone; otherwise none (KEP-3015: kube-proxy 1.33 behind the
/// PreferSameTrafficDistribution gate, on by default since 1.34).
fn topology<'a>(endpoints: &[EndpointInfo], node: &'a str, zone: Option<&'a str>) -> Topology<'a> {
    let ready = || endpoints.iter().filter(|e| e.ready);
    if ready().all(|e| !e.node_hints.is_empty())
        && ready().any(|e| e.node_hints.iter().any(|n| n == node))
    {
        return Topology::Node(node);
    }
    if let Some(zone) = zone
        && ready().all(|e| !e.zone_hints.is_empty())
        && ready().any(|e| e.zone_hints.iter().any(|z| z == zone))
    {
        return Topology::Zone(zone);
    }
    Topology::All
}

/// Ready endpoints, else serving-terminating ones (kube-proxy's fallback),
/// among those `available` keeps.
fn usable(endpoints: &[EndpointInfo], available: impl Fn(&EndpointInfo) -> bool) -> Vec<Backend> {
    let backend = |e: &EndpointInfo, terminating: bool| Backend {
        addr: e.addr,
        port: e.port,
        terminating,
        remote: !e.local,
        on_node: false,
    };
    let ready: Vec<Backend> = endpoints
        .iter()
        .filter(|e| e.ready && available(e))
        .map(|e| backend(e, false))
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|e| e.serving && e.terminating && available(e))
        .map(|e| backend(e, true))
        .collect()
}

/// kube-proxy's CategorizeEndpoints: the cluster-wide set (after topology
/// hints) and the node-local set of one service port.
struct BackendSets {
    cluster: Vec<Backend>,
    local: Vec<Backend>,
}

fn backend_sets(endpoints: &[EndpointInfo], node: &str, zone: Option<&str>) -> BackendSets {
    let topology = topology(endpoints, node, zone);
    BackendSets {
        cluster: usable(endpoints, |e| match topology {
            Topology::All => true,
            Topology::Node(node) => e.node_hints.iter().any(|n| n == node),
            Topology::Zone(zone) => e.zone_hints.iter().any(|z| z == zone),
        }),
        local: usable(endpoints, |e| e.local),
    }
}

#[cfg(test)]
mod tests {
    //! Table tests. The cases follow kube-proxy's own tests of the same rules
    //! (pkg/proxy endpointslicecache_test.go, topology_test.go and the
    //! proxiers' TestInternalTrafficPolicy / terminating-endpoint cases).

    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::{Value, json};

    use super::*;
    use crate::model::{
        AddressEntry, NodeConfig,
        cluster::{LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME},
    };

    fn svc(name: &str, spec: Value) -> (ObjectKey, Service) {
        svc_meta(json!({"name": name, "namespace": "ns"}), spec)
    }

    fn svc_meta(meta: Value, spec: Value) -> (ObjectKey, Service) {
        let s: Service = serde_json::from_value(json!({"metadata": meta, "spec": spec})).unwrap();
        let m = &s.metadata;
        (
            ObjectKey::new(m.namespace.clone().unwrap(), m.name.clone().unwrap()),
            s,
        )
    }

    /// A slice of `service` with ports and endpoints.
    fn slice(
        name: &str,
        service: &str,
        ports: Value,
        endpoints: Value,
    ) -> (ObjectKey, EndpointSlice) {
        slice_typed(name, service, "IPv4", ports, endpoints)
    }

    fn slice_typed(
        name: &str,
        service: &str,
        family: &str,
        ports: Value,
        endpoints: Value,
    ) -> (ObjectKey, EndpointSlice) {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {LABEL_SERVICE_NAME: service}},
            "addressType": family,
            "ports": ports,
            "endpoints": endpoints,
        }))
        .unwrap();
        (ObjectKey::new("ns", name), s)
    }

    fn ep(
        ip: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
        node: &str,
    ) -> Value {
        let mut c = serde_json::Map::new();
        if let Some(r) = ready {
            c.insert("ready".into(), json!(r));
        }
        if let Some(s) = serving {
            c.insert("serving".into(), json!(s));
        }
        if let Some(t) = terminating {
            c.insert("terminating".into(), json!(t));
        }
        json!({"addresses": [ip], "conditions": c, "nodeName": node})
    }

    fn ready(ip: &str) -> Value {
        ep(ip, Some(true), Some(true), Some(false), "other")
    }

    fn state(
        services: Vec<(ObjectKey, Service)>,
        slices: Vec<(ObjectKey, EndpointSlice)>,
    ) -> ClusterState {
        ClusterState {
            services: services
                .into_iter()
                .map(|(k, v)| (k, std::sync::Arc::new((&v).into())))
                .collect(),
            endpoint_slices: slices
                .into_iter()
                .map(|(k, v)| (k, std::sync::Arc::new((&v).into())))
                .collect(),
            nodes: Default::default(),
            service_cidrs: Default::default(),
        }
    }

    fn node() -> NodeConfig {
        NodeConfig {
            node_name: "local".into(),
            ..Default::default()
        }
    }

    /// Frontend "ip:port/PROTO" -> backends "ip:port" (+ "~" when terminating).
    fn frontends(t: &Translation) -> Vec<(String, Vec<String>)> {
        t.desired
            .frontends
            .iter()
            .map(|(k, f)| {
                let b = f
                    .set
                    .backends
                    .iter()
                    .map(|b| {
                        format!(
                            "{}{}",
                            std::net::SocketAddr::new(b.addr, b.port),
                            if b.terminating { "~" } else { "" }
                        )
                    })
                    .collect();
                (k.to_string(), b)
            })
            .collect()
    }

    const WEB: &str = "10.96.0.10:80/TCP";

    fn web() -> (ObjectKey, Service) {
        svc(
            "web",
            json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}),
        )
    }

    fn http_port() -> Value {
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
    }

    #[test]
    fn endpoint_conditions() {
        // (case, endpoints, expected backends)
        let cases: Vec<(&str, Value, Vec<&str>)> = vec![
            (
                "all ready",
                json!([ready("10.0.0.1"), ready("10.0.0.2")]),
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            ),
            (
                "nil conditions mean ready",
                json!([{"addresses": ["10.0.0.1"]}]),
                vec!["10.0.0.1:8080"],
            ),
            (
                "terminating ones are ignored while any is ready",
                json!([
                    ready("10.0.0.1"),
                    ep("10.0.0.2", Some(false), Some(true), Some(true), "other")
                ]),
                vec!["10.0.0.1:8080"],
            ),
            (
                "serving-terminating fallback when nothing is ready",
                json!([
                    ep("10.0.0.1", Some(false), Some(true), Some(true), "other"),
                    ep("10.0.0.2", Some(false), Some(false), Some(true), "other"),
                    ep("10.0.0.3", Some(false), Some(true), Some(false), "other"),
                ]),
                vec!["10.0.0.1:8080~"],
            ),
            (
                "nil serving counts as serving in the fallback",
                json!([ep("10.0.0.1", Some(false), None, Some(true), "other")]),
                vec!["10.0.0.1:8080~"],
            ),
            (
                "not ready and not terminating: nothing",
                json!([ep(
                    "10.0.0.1",
                    Some(false),
                    Some(false),
                    Some(false),
                    "other"
                )]),
                vec![],
            ),
            (
                "only the first address of an endpoint is used",
                json!([{"addresses": ["10.0.0.1", "10.0.0.9"]}]),
                vec!["10.0.0.1:8080"],
            ),
        ];
        for (name, endpoints, want) in cases {
            let t = translate(
                &state(
                    vec![web()],
                    vec![slice("s1", "web", http_port(), endpoints)],
                ),
                &node(),
            );
            let want: Vec<String> = want.into_iter().map(String::from).collect();
            assert_eq!(frontends(&t), vec![(WEB.to_string(), want)], "{name}");
        }
    }

    #[test]
    fn slices_are_merged_deduplicated_and_matched_by_port() {
        let slices = vec![
            slice(
                "a",
                "web",
                http_port(),
                json!([
                    ready("10.0.0.1"),
                    ep("10.0.0.2", Some(false), Some(true), Some(true), "x")
                ]),
            ),
            // The same endpoint, not terminating, in another slice wins.
            slice("b", "web", http_port(), json!([ready("10.0.0.2")])),
            // Other port name, no port number, other protocol, other family, other service.
            slice(
                "c",
                "web",
                json!([{"name": "metrics", "port": 9100}]),
                json!([ready("10.0.0.3")]),
            ),
            slice(
                "d",
                "web",
                json!([{"name": "http"}]),
                json!([ready("10.0.0.4")]),
            ),
            slice(
                "e",
                "web",
                json!([{"name": "http", "port": 8080, "protocol": "UDP"}]),
                json!([ready("10.0.0.5")]),
            ),
            slice_typed("f", "web", "IPv6", http_port(), json!([ready("fd00::1")])),
            slice("g", "other", http_port(), json!([ready("10.0.0.7")])),
        ];
        let t = translate(&state(vec![web()], slices), &node());
        assert_eq!(
            frontends(&t),
            vec![(
                WEB.to_string(),
                vec!["10.0.0.1:8080".to_string(), "10.0.0.2:8080".to_string()]
            )]
        );
        assert!(t.problems.is_empty(), "{:?}", t.problems);
    }

    #[test]
    fn internal_traffic_policy_local() {
        let local_svc = || {
            svc(
                "web",
                json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local", "ports": [{"name": "http", "port": 80}]}),
            )
        };
        // (case, endpoints, backends, drop_if_empty)
        let cases: Vec<(&str, Value, Vec<&str>, bool)> = vec![
            (
                "local endpoints only",
                json!([
                    ep("10.0.0.1", Some(true), None, None, "local"),
                    ep("10.0.0.2", Some(true), None, None, "remote")
                ]),
                vec!["10.0.0.1:8080"],
                false,
            ),
            (
                "endpoints only elsewhere: drop, not reject",
                json!([ep("10.0.0.2", Some(true), None, None, "remote")]),
                vec![],
                true,
            ),
            ("no endpoints at all: reject", json!([]), vec![], false),
            (
                "local serving-terminating fallback",
                json!([
                    ep("10.0.0.1", Some(false), Some(true), Some(true), "local"),
                    ep("10.0.0.2", Some(true), None, None, "remote"),
                ]),
                vec!["10.0.0.1:8080~"],
                false,
            ),
        ];
        for (name, endpoints, want, drop) in cases {
            let t = translate(
                &state(
                    vec![local_svc()],
                    vec![slice("s", "web", http_port(), endpoints)],
                ),
                &node(),
            );
            let f = t.desired.frontends.values().next().expect(name);
            let got: Vec<String> = frontends(&t)[0].1.clone();
            assert_eq!(
                got,
                want.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "{name}"
            );
            assert_eq!(f.drop_if_empty, drop, "{name}");
            assert!(f.internal_local, "{name}");
        }
    }

    #[test]
    fn ignored_services() {
        let cases = vec![
            (
                "headless",
                svc("h", json!({"clusterIP": "None", "ports": [{"port": 80}]})),
            ),
            (
                "no cluster IP yet",
                svc("n", json!({"ports": [{"port": 80}]})),
            ),
            (
                "ExternalName",
                svc(
                    "e",
                    json!({"type": "ExternalName", "externalName": "x.example", "ports": [{"port": 80}]}),
                ),
            ),
            (
                "service-proxy-name",
                svc_meta(
                    json!({"name": "p", "namespace": "ns", "labels": {LABEL_SERVICE_PROXY_NAME: "other"}}),
                    json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
                ),
            ),
            (
                "headless label",
                svc_meta(
                    json!({"name": "p", "namespace": "ns", "labels": {LABEL_HEADLESS: ""}}),
                    json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
                ),
            ),
        ];
        for (name, s) in cases {
            let t = translate(&state(vec![s], vec![]), &node());
            assert!(
                t.desired.frontends.is_empty() && t.desired.addresses.is_empty(),
                "{name}"
            );
            assert!(t.problems.is_empty(), "{name}: {:?}", t.problems);
        }
    }

    /// --service-proxy-name inverts kube-proxy's rule: only the Services
    /// labelled with that name are served, so lb can take a subset while
    /// kube-proxy keeps the rest.
    #[test]
    fn service_proxy_name_serves_only_its_own_services() {
        let labelled = |name: &str, ip: &str, proxy: Option<&str>| {
            let labels = proxy.map_or(json!({}), |p| json!({LABEL_SERVICE_PROXY_NAME: p}));
            svc_meta(
                json!({"name": name, "namespace": "ns", "labels": labels}),
                json!({"clusterIP": ip, "ports": [{"port": 80}]}),
            )
        };
        let services = vec![
            labelled("plain", "10.96.0.1", None),
            labelled("ours", "10.96.0.2", Some("lb")),
            labelled("theirs", "10.96.0.3", Some("other")),
        ];
        let served = |node: &NodeConfig| -> Vec<IpAddr> {
            let t = translate(&state(services.clone(), vec![]), node);
            let mut ips: Vec<IpAddr> = t.desired.frontends.keys().map(|fk| fk.addr).collect();
            ips.dedup();
            ips
        };
        assert_eq!(
            served(&node()),
            vec!["10.96.0.1".parse::<IpAddr>().unwrap()]
        );
        let canary = NodeConfig {
            service_proxy_name: Some("lb".into()),
            ..node()
        };
        assert_eq!(
            served(&canary),
            vec!["10.96.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    /// ipFamilies / ipFamilyPolicy as the API server resolves them into
    /// spec.clusterIPs: one frontend set per family, each with the
    /// endpoints of its family's slices; addresses of a family the Service
    /// does not have are reported; source ranges apply per family.
    #[test]
    fn dual_stack_services_program_each_family() {
        let dual = svc(
            "web",
            json!({
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "PreferDualStack",
                "externalIPs": ["192.0.2.10", "2001:db8::10"],
                "loadBalancerSourceRanges": ["203.0.113.0/24"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
            }),
        );
        let mut dual = dual;
        dual.1.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [
                {"ip": "198.51.100.10"}, {"ip": "2001:db8:1::10"}
            ]}}))
            .unwrap(),
        );
        let v6_only = svc(
            "six",
            json!({"clusterIPs": ["fd00:96::20"], "ipFamilies": ["IPv6"],
                   "externalIPs": ["192.0.2.20"],
                   "ports": [{"name": "http", "port": 80}]}),
        );
        let slices = vec![
            slice("w4", "web", http_port(), json!([ready("10.0.0.1")])),
            slice_typed(
                "w6",
                "web",
                "IPv6",
                http_port(),
                json!([ready("fd00:1::1")]),
            ),
            slice_typed(
                "s6",
                "six",
                "IPv6",
                http_port(),
                json!([ready("fd00:1::2")]),
            ),
            slice("s4", "six", http_port(), json!([ready("10.0.0.2")])),
        ];
        let mut n = node();
        n.nodeport_addresses = vec![
            "192.168.1.1".parse().unwrap(),
            "2001:db8:2::1".parse().unwrap(),
        ];
        let t = translate(&state(vec![dual, v6_only], slices), &n);
        let internal: BTreeMap<String, Vec<String>> = frontends(&t)
            .into_iter()
            .filter(|(k, _)| !k.ends_with("(external)"))
            .collect();
        let want: BTreeMap<String, Vec<String>> = [
            ("10.96.0.10:80/TCP", "10.0.0.1:8080"),
            ("[fd00:96::10]:80/TCP", "[fd00:1::1]:8080"),
            ("192.0.2.10:80/TCP", "10.0.0.1:8080"),
            ("[2001:db8::10]:80/TCP", "[fd00:1::1]:8080"),
            ("198.51.100.10:80/TCP", "10.0.0.1:8080"),
            ("[2001:db8:1::10]:80/TCP", "[fd00:1::1]:8080"),
            ("192.168.1.1:30080/TCP", "10.0.0.1:8080"),
            ("[2001:db8:2::1]:30080/TCP", "[fd00:1::1]:8080"),
            ("[fd00:96::20]:80/TCP", "[fd00:1::2]:8080"),
        ]
        .into_iter()
        .map(|(k, b)| (k.to_string(), vec![b.to_string()]))
        .collect();
        assert_eq!(internal, want);
        // An IPv4 externalIP on an IPv6-only Service has nothing to balance to.
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        assert!(
            t.problems[0].reason.contains("externalIP 192.0.2.20"),
            "{:?}",
            t.problems
        );
        // The IPv4 ranges guard the IPv4 LoadBalancer IP; the IPv6 one has
        // none of its family: closed (an empty set), not open to all.
        let ranges = |ip: &str| {
            t.desired
                .source_ranges
                .get(&ip.parse::<IpAddr>().unwrap())
                .cloned()
        };
        assert_eq!(ranges("198.51.100.10").map(|r| r.len()), Some(1));
        assert_eq!(ranges("2001:db8:1::10").map(|r| r.len()), Some(0));
        assert!(t.desired.frontends.iter().any(|(k, f)| k.addr
            == "2001:db8:1::10".parse::<IpAddr>().unwrap()
            && f.source_ranges));
    }

    #[test]
    fn invalid_services_are_skipped_whole_with_a_reason() {
        let cases = vec![
            (
                "bad IP",
                json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}),
                "not an IP address",
            ),
            (
                "two ClusterIPs of one family",
                json!({"clusterIP": "10.96.0.2", "clusterIPs": ["10.96.0.2", "10.96.0.3"], "ports": [{"port": 80}]}),
                "two addresses of one family",
            ),
            (
                "port 0",
                json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80}, {"port": 0}]}),
                "port 0 is outside",
            ),
            (
                "port too big",
                json!({"clusterIP": "10.96.0.2", "ports": [{"port": 65536}]}),
                "outside 1..=65535",
            ),
            (
                "unknown protocol",
                json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80, "protocol": "GRE"}]}),
                "\"GRE\" is not supported",
            ),
            (
                "affinity timeout",
                json!({"clusterIP": "10.96.0.2", "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 90000}}, "ports": [{"port": 80}]}),
                "timeoutSeconds 90000",
            ),
            (
                "traffic policy",
                json!({"clusterIP": "10.96.0.2", "internalTrafficPolicy": "Nearby", "ports": [{"port": 80}]}),
                "internalTrafficPolicy",
            ),
        ];
        for (name, spec, reason) in cases {
            let t = translate(&state(vec![web(), svc("bad", spec)], vec![]), &node());
            assert_eq!(
                t.desired
                    .frontends
                    .keys()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>(),
                vec![WEB],
                "{name}"
            );
            assert_eq!(t.problems.len(), 1, "{name}: {:?}", t.problems);
            assert_eq!(t.problems[0].object, "Service ns/bad", "{name}");
            assert!(
                t.problems[0].reason.contains(reason),
                "{name}: {}",
                t.problems[0].reason
            );
        }
    }

    #[test]
    fn duplicate_cluster_ip_keeps_the_older_service() {
        let older = svc_meta(
            json!({"name": "zz-old", "namespace": "ns", "creationTimestamp": "2024-01-01T00:00:00Z"}),
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
        );
        let newer = svc_meta(
            json!({"name": "aa-new", "namespace": "ns", "creationTimestamp": "2025-01-01T00:00:00Z"}),
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 81}]}),
        );
        let t = translate(&state(vec![newer, older], vec![]), &node());
        let ports: Vec<String> = t.desired.frontends.keys().map(|k| k.to_string()).collect();
        assert_eq!(ports, vec!["10.96.0.10:80/TCP"]);
        assert_eq!(t.problems[0].object, "Service ns/aa-new");
        assert!(
            t.problems[0]
                .reason
                .contains("already used by Service ns/zz-old")
        );
    }

    #[test]
    fn multi_port_multi_protocol_and_sctp() {
        let s = svc(
            "dns",
            json!({"clusterIP": "10.96.0.53", "sessionAffinity": "ClientIP", "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                {"name": "sctp", "port": 99, "protocol": "SCTP"},
            ]}),
        );
        let sl = slice(
            "s",
            "dns",
            json!([{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}, {"name": "sctp", "port": 3868, "protocol": "SCTP"}]),
            json!([ready("10.0.0.1")]),
        );
        let t = translate(&state(vec![s], vec![sl]), &node());
        assert_eq!(
            frontends(&t),
            vec![
                (
                    "10.96.0.53:53/TCP".to_string(),
                    vec!["10.0.0.1:5354".to_string()]
                ),
                (
                    "10.96.0.53:53/UDP".to_string(),
                    vec!["10.0.0.1:5353".to_string()]
                ),
                (
                    "10.96.0.53:99/SCTP".to_string(),
                    vec!["10.0.0.1:3868".to_string()]
                ),
            ]
        );
        for f in t.desired.frontends.values() {
            assert_eq!(f.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
        }
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert_eq!(t.desired.addresses.len(), 1);
    }

    /// An endpoint with zone hints.
    fn hinted(ip: &str, ready: bool, zones: &[&str]) -> Value {
        let for_zones: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
        json!({"addresses": [ip], "conditions": {"ready": ready, "serving": true, "terminating": !ready},
               "nodeName": "other", "hints": {"forZones": for_zones}})
    }

    #[test]
    fn topology_hints_as_kube_proxy_uses_them() {
        // (case, node zone, endpoints, expected backends) after kube-proxy's topology_test.go.
        let cases: Vec<(&str, Option<&str>, Value, Vec<&str>)> = vec![
            (
                "hints for this zone: only those endpoints",
                Some("zone-a"),
                json!([
                    hinted("10.0.0.1", true, &["zone-a"]),
                    hinted("10.0.0.2", true, &["zone-b"]),
                    hinted("10.0.0.3", true, &["zone-a", "zone-b"])
                ]),
                vec!["10.0.0.1:8080", "10.0.0.3:8080"],
            ),
            (
                "no endpoint hinted for this zone: all",
                Some("zone-c"),
                json!([
                    hinted("10.0.0.1", true, &["zone-a"]),
                    hinted("10.0.0.2", true, &["zone-b"])
                ]),
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            ),
            (
                "one ready endpoint without hints: hints ignored",
                Some("zone-a"),
                json!([
                    hinted("10.0.0.1", true, &["zone-a"]),
                    hinted("10.0.0.2", true, &[])
                ]),
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            ),
            (
                "node without a zone label: hints ignored",
                None,
                json!([
                    hinted("10.0.0.1", true, &["zone-a"]),
                    hinted("10.0.0.2", true, &["zone-b"])
                ]),
                vec!["10.0.0.1:8080", "10.0.0.2:8080"],
            ),
            (
                "unready endpoints do not count, fallback keeps the zone",
                Some("zone-a"),
                json!([
                    hinted("10.0.0.1", false, &["zone-a"]),
                    hinted("10.0.0.2", true, &["zone-a"]),
                    hinted("10.0.0.3", true, &["zone-b"])
                ]),
                vec!["10.0.0.2:8080"],
            ),
        ];
        for (name, zone, endpoints, want) in cases {
            let mut st = state(vec![web()], vec![slice("s", "web", http_port(), endpoints)]);
            let labels = zone.map(|z| json!({LABEL_ZONE: z})).unwrap_or(json!({}));
            let node_obj: k8s_openapi::api::core::v1::Node =
                serde_json::from_value(json!({"metadata": {"name": "local", "labels": labels}}))
                    .unwrap();
            st.nodes
                .insert("local".into(), std::sync::Arc::new(node_obj));
            let t = translate(&st, &node());
            let want: Vec<String> = want.into_iter().map(String::from).collect();
            assert_eq!(frontends(&t), vec![(WEB.to_string(), want)], "{name}");
        }
    }

    /// An endpoint with node and zone hints (what the endpointslice
    /// controller writes for trafficDistribution PreferSameNode).
    fn node_hinted(ip: &str, ready: bool, nodes: &[&str], zones: &[&str]) -> Value {
        let for_nodes: Vec<Value> = nodes.iter().map(|n| json!({"name": n})).collect();
        let for_zones: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
        json!({"addresses": [ip], "conditions": {"ready": ready, "serving": true, "terminating": !ready},
               "nodeName": nodes.first().copied().unwrap_or("other"),
               "hints": {"forNodes": for_nodes, "forZones": for_zones}})
    }

    #[test]
    fn node_hints_come_before_zone_hints_as_kube_proxy_uses_them() {
        // (case, node zone, endpoints, expected backends) after kube-proxy's
        // TestCategorizeEndpoints (PreferSameNode cases); this node is "local".
        let cases: Vec<(&str, Option<&str>, Value, Vec<&str>)> = vec![
            (
                "an endpoint for this node: only it",
                Some("zone-a"),
                json!([
                    node_hinted("10.0.0.1", true, &["local"], &["zone-a"]),
                    node_hinted("10.0.0.2", true, &["peer"], &["zone-a"]),
                    node_hinted("10.0.0.3", true, &["far"], &["zone-b"])
                ]),
                vec!["10.0.0.1:8080"],
            ),
            (
                "none for this node: the zone's",
                Some("zone-a"),
                json!([
                    node_hinted("10.0.0.2", true, &["peer"], &["zone-a"]),
                    node_hinted("10.0.0.3", true, &["far"], &["zone-b"])
                ]),
                vec!["10.0.0.2:8080"],
            ),
            (
                "this node's endpoint not ready: the zone's",
                Some("zone-a"),
                json!([
                    node_hinted("10.0.0.1", false, &["local"], &["zone-a"]),
                    node_hinted("10.0.0.2", true, &["peer"], &["zone-a"]),
                    node_hinted("10.0.0.3", true, &["far"], &["zone-b"])
                ]),
                vec!["10.0.0.2:8080"],
            ),
            (
                "one ready endpoint without a node hint: zone hints decide",
                Some("zone-b"),
                json!([
                    node_hinted("10.0.0.1", true, &["local"], &["zone-a"]),
                    hinted("10.0.0.3", true, &["zone-b"])
                ]),
                vec!["10.0.0.3:8080"],
            ),
            (
                "node hints only, none for this node, no zone: all",
                None,
                json!([
                    node_hinted("10.0.0.2", true, &["peer"], &[]),
                    node_hinted("10.0.0.3", true, &["far"], &[])
                ]),
                vec!["10.0.0.2:8080", "10.0.0.3:8080"],
            ),
            (
                "node hints without a zone label on the node still apply",
                None,
                json!([
                    node_hinted("10.0.0.1", true, &["local"], &[]),
                    node_hinted("10.0.0.2", true, &["peer"], &[])
                ]),
                vec!["10.0.0.1:8080"],
            ),
        ];
        for (name, zone, endpoints, want) in cases {
            let mut st = state(vec![web()], vec![slice("s", "web", http_port(), endpoints)]);
            let labels = zone.map(|z| json!({LABEL_ZONE: z})).unwrap_or(json!({}));
            let node_obj: k8s_openapi::api::core::v1::Node =
                serde_json::from_value(json!({"metadata": {"name": "local", "labels": labels}}))
                    .unwrap();
            st.nodes
                .insert("local".into(), std::sync::Arc::new(node_obj));
            let t = translate(&st, &node());
            let want: Vec<String> = want.into_iter().map(String::from).collect();
            assert_eq!(frontends(&t), vec![(WEB.to_string(), want)], "{name}");
        }
    }

    #[test]
    fn service_cidrs_are_the_objects_and_the_flag_normalized_and_deltas_name_changes() {
        let mut st = state(vec![web()], vec![]);
        st.service_cidrs.insert(
            "kubernetes".into(),
            std::sync::Arc::new(vec![
                "10.96.0.1/12".parse().unwrap(),
                "fd00:96::/112".parse().unwrap(),
            ]),
        );
        let node = NodeConfig {
            service_cidrs: vec!["10.100.0.0/16".parse().unwrap()],
            ..node()
        };
        let t = translate(&st, &node);
        let want: BTreeSet<IpNet> = ["10.96.0.0/12", "10.100.0.0/16", "fd00:96::/112"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(t.desired.service_cidrs, want);

        // Incrementally: a ServiceCIDR added is a delta for the maps, the
        // same one again is none.
        let mut tracker = ChangeTracker::default();
        tracker.replace(state(vec![web()], vec![]));
        let mut translator = Translator::new(node.clone());
        let dirty = tracker.take_dirty();
        let first = translator.update(&tracker, &node, &dirty);
        assert!(first.service_cidrs, "the flag's CIDR at first");
        let cidrs = std::sync::Arc::new(vec!["10.96.0.0/12".parse().unwrap()]);
        tracker.apply(crate::model::Change::ServiceCidr(
            "kubernetes".into(),
            Some(cidrs.clone()),
        ));
        let dirty = tracker.take_dirty();
        assert!(dirty.service_cidrs);
        let delta = translator.update(&tracker, &node, &dirty);
        assert!(delta.service_cidrs && !delta.is_empty());
        tracker.apply(crate::model::Change::ServiceCidr(
            "kubernetes".into(),
            Some(cidrs),
        ));
        assert!(!tracker.has_dirty(), "the same CIDRs again change nothing");
    }

    /// Every Service's ClusterIPs are allocated, whoever serves it and
    /// whether or not it could be used (the Service CIDR drop spares them);
    /// an address two Services hold stays until both are gone.
    #[test]
    fn allocated_addresses_are_every_services_cluster_ips_counted() {
        let labelled = |name: &str, ips: serde_json::Value, proxy: Option<&str>, port: i64| {
            let labels = proxy.map_or(json!({}), |p| json!({LABEL_SERVICE_PROXY_NAME: p}));
            svc_meta(
                json!({"name": name, "namespace": "ns", "labels": labels}),
                json!({"clusterIPs": ips, "ports": [{"port": port}]}),
            )
        };
        let services = vec![
            labelled("plain", json!(["10.96.0.1", "fd00:96::1"]), None, 80),
            labelled("theirs", json!(["10.96.0.3"]), Some("other"), 80),
            // Unusable (port 0): not served, its address still allocated.
            labelled("broken", json!(["10.96.0.4"]), None, 0),
            labelled("headless", json!(["None"]), None, 80),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t = translate(&state(services.clone(), vec![]), &node());
        assert!(!t.problems.is_empty(), "broken is reported");
        assert_eq!(
            t.desired.allocated.keys().copied().collect::<Vec<_>>(),
            vec![
                ip("10.96.0.1"),
                ip("10.96.0.3"),
                ip("10.96.0.4"),
                ip("fd00:96::1")
            ]
        );
        let canary = NodeConfig {
            service_proxy_name: Some("lb".into()),
            ..node()
        };
        let t = translate(&state(services.clone(), vec![]), &canary);
        assert!(t.desired.frontends.is_empty(), "none is the canary's");
        assert_eq!(t.desired.allocated.len(), 4, "all allocated all the same");

        // Incrementally: a second holder of one address, then each leaves.
        let mut tracker = ChangeTracker::default();
        tracker.replace(state(services, vec![]));
        let n = node();
        let mut translator = Translator::new(n.clone());
        let dirty = tracker.take_dirty();
        translator.update(&tracker, &n, &dirty);
        let twin = labelled("twin", json!(["10.96.0.3"]), Some("other"), 81);
        let twin_key = twin.0.clone();
        tracker.apply(crate::model::Change::Service(
            twin_key.clone(),
            Some(std::sync::Arc::new((&twin.1).into())),
        ));
        let dirty = tracker.take_dirty();
        let delta = translator.update(&tracker, &n, &dirty);
        assert!(delta.is_empty(), "already allocated: nothing to write");
        assert_eq!(translator.desired().allocated[&ip("10.96.0.3")], 2);
        tracker.apply(crate::model::Change::Service(
            ObjectKey::new("ns", "theirs"),
            None,
        ));
        let dirty = tracker.take_dirty();
        let delta = translator.update(&tracker, &n, &dirty);
        assert!(delta.is_empty(), "the twin still holds it");
        tracker.apply(crate::model::Change::Service(twin_key, None));
        let dirty = tracker.take_dirty();
        let delta = translator.update(&tracker, &n, &dirty);
        assert!(
            delta
                .addresses
                .contains(&(ip("10.96.0.3"), Scope::Internal)),
            "{delta:?}"
        );
        assert!(
            !translator
                .desired()
                .allocated
                .contains_key(&ip("10.96.0.3"))
        );
    }

    #[test]
    fn standby_endpoints_and_algorithm() {
        let s = svc_meta(
            json!({"name": "web", "namespace": "ns", "annotations": {ANNOTATION_ALGORITHM: "maglev"}}),
            json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}),
        );
        let sl = slice(
            "s",
            "web",
            http_port(),
            json!([
                ready("10.0.0.1"),
                ep("10.0.0.2", Some(false), Some(true), Some(true), "x"),
                ep("10.0.0.3", Some(false), Some(false), Some(false), "x")
            ]),
        );
        let t = translate(&state(vec![s], vec![sl]), &node());
        let f = t.desired.frontends.values().next().unwrap();
        assert!(f.set.maglev);
        let standby: Vec<String> = f.set.standby.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(
            standby,
            vec!["10.0.0.2", "10.0.0.3"],
            "present but not selectable: kept for established flows"
        );
        let bad = svc_meta(
            json!({"name": "bad", "namespace": "ns", "annotations": {ANNOTATION_ALGORITHM: "roundrobin"}}),
            json!({"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}),
        );
        let t = translate(&state(vec![bad], vec![]), &node());
        assert!(t.problems[0].reason.contains("not maglev or random"));
        let global = NodeConfig {
            default_maglev: true,
            ..node()
        };
        assert!(
            translate(&state(vec![web()], vec![]), &global)
                .desired
                .frontends
                .values()
                .all(|f| f.set.maglev)
        );
    }

    #[test]
    fn external_ips_follow_the_allow_list() {
        let s = svc(
            "web",
            json!({"clusterIP": "10.96.0.10", "externalIPs": ["192.0.2.10", "198.51.100.7", "bogus"], "ports": [{"name": "http", "port": 80}]}),
        );
        let sl = slice("s", "web", http_port(), json!([ready("10.0.0.1")]));
        let t = translate(&state(vec![s.clone()], vec![sl.clone()]), &node());
        let keys: Vec<String> = t.desired.frontends.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            vec![
                "10.96.0.10:80/TCP",
                "192.0.2.10:80/TCP",
                "192.0.2.10:80/TCP (external)",
                "198.51.100.7:80/TCP",
                "198.51.100.7:80/TCP (external)"
            ],
            "no allow-list: all, like kube-proxy; each for pods and from outside"
        );
        assert!(t.problems.iter().any(|p| p.reason.contains("\"bogus\"")));
        let only = NodeConfig {
            external_ip_cidrs: Some(vec!["192.0.2.0/24".parse().unwrap()]),
            ..node()
        };
        let t = translate(&state(vec![s], vec![sl]), &only);
        let keys: Vec<String> = t.desired.frontends.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            vec![
                "10.96.0.10:80/TCP",
                "192.0.2.10:80/TCP",
                "192.0.2.10:80/TCP (external)"
            ]
        );
        assert!(t.problems.iter().any(|p| {
            p.reason
                .contains("198.51.100.7 is outside --external-ip-cidrs")
        }));
        let ext = &t
            .desired
            .frontends
            .iter()
            .find(|(k, _)| k.addr.to_string() == "192.0.2.10")
            .unwrap()
            .1;
        assert_eq!(ext.kind, FrontendKind::ExternalIP);
        assert_eq!(ext.set.backends.len(), 1);
    }

    #[test]
    fn bad_endpoint_address_is_skipped_not_the_slice() {
        let sl = slice(
            "s",
            "web",
            http_port(),
            json!([{"addresses": ["not-an-ip"]}, ready("10.0.0.1")]),
        );
        let t = translate(&state(vec![web()], vec![sl]), &node());
        assert_eq!(
            frontends(&t),
            vec![(WEB.to_string(), vec!["10.0.0.1:8080".to_string()])]
        );
        assert_eq!(t.problems[0].object, "EndpointSlice ns/s");
    }

    // ---- external traffic ----------------------------------------------

    const NODE_ADDR: &str = "192.168.50.1";

    fn external_node() -> NodeConfig {
        NodeConfig {
            nodeport_addresses: vec![NODE_ADDR.parse().unwrap()],
            ..node()
        }
    }

    /// A LoadBalancer Service reachable every external way: ClusterIP,
    /// NodePort 30080, externalIP 192.0.2.10, ingress IP 198.51.100.10.
    fn lb_service(itp: &str, etp: &str) -> (ObjectKey, Service) {
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.10",
                "externalIPs": ["192.0.2.10"],
                "internalTrafficPolicy": itp,
                "externalTrafficPolicy": etp,
                "healthCheckNodePort": 32000,
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.10"}]}},
        }))
        .unwrap();
        (ObjectKey::new("ns", "web"), s)
    }

    /// Backends of each frontend kind and scope: ("NodePort external", ["10.0.0.1"]).
    fn by_kind(t: &Translation) -> BTreeMap<String, (Vec<String>, bool)> {
        t.desired
            .frontends
            .iter()
            .map(|(k, f)| {
                let scope = match k.scope {
                    Scope::Internal => "internal",
                    Scope::External => "external",
                };
                let backends = f
                    .set
                    .backends
                    .iter()
                    .map(|b| {
                        format!(
                            "{}{}{}",
                            b.addr,
                            if b.remote { "" } else { "(local)" },
                            if b.terminating { "~" } else { "" }
                        )
                    })
                    .collect();
                (format!("{:?} {scope}", f.kind), (backends, f.drop_if_empty))
            })
            .collect()
    }

    #[test]
    fn traffic_policies_per_frontend_kind_and_scope() {
        // After kube-proxy's TestInternalExternalMasquerade and
        // TestExternalTrafficPolicyLocal/Cluster: iTP applies to the
        // ClusterIP only, eTP to traffic from outside only, and pods reaching
        // external addresses get every endpoint.
        let local = ep("10.0.0.1", Some(true), Some(true), None, "local");
        let remote = ep("10.0.0.2", Some(true), Some(true), None, "other");
        let both = json!([local, remote]);
        let remote_only = json!([remote]);
        let all = vec!["10.0.0.1(local)", "10.0.0.2"];
        let one = vec!["10.0.0.1(local)"];
        let none: Vec<&str> = vec![];
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, &str, &str, &Value, Vec<(&str, Vec<&str>, bool)>)> = vec![
            (
                "Cluster/Cluster",
                "Cluster",
                "Cluster",
                &both,
                vec![
                    ("ClusterIP internal", all.clone(), false),
                    ("NodePort internal", all.clone(), false),
                    ("NodePort external", all.clone(), false),
                    ("LoadBalancer external", all.clone(), false),
                    ("ExternalIP external", all.clone(), false),
                ],
            ),
            (
                "eTP Local: outside gets local endpoints, pods all",
                "Cluster",
                "Local",
                &both,
                vec![
                    ("ClusterIP internal", all.clone(), false),
                    ("NodePort internal", all.clone(), false),
                    ("LoadBalancer internal", all.clone(), false),
                    ("NodePort external", one.clone(), false),
                    ("LoadBalancer external", one.clone(), false),
                    ("ExternalIP external", one.clone(), false),
                ],
            ),
            (
                "iTP Local: only the ClusterIP",
                "Local",
                "Cluster",
                &both,
                vec![
                    ("ClusterIP internal", one.clone(), false),
                    ("NodePort internal", all.clone(), false),
                    ("NodePort external", all.clone(), false),
                    ("ExternalIP internal", all.clone(), false),
                ],
            ),
            (
                "both Local, endpoints elsewhere only: drop",
                "Local",
                "Local",
                &remote_only,
                vec![
                    ("ClusterIP internal", none.clone(), true),
                    ("NodePort internal", vec!["10.0.0.2"], false),
                    ("NodePort external", none.clone(), true),
                    ("LoadBalancer external", none.clone(), true),
                ],
            ),
        ];
        for (name, itp, etp, endpoints, want) in cases {
            let sl = slice("s", "web", http_port(), endpoints.clone());
            let t = translate(
                &state(vec![lb_service(itp, etp)], vec![sl]),
                &external_node(),
            );
            assert!(t.problems.is_empty(), "{name}: {:?}", t.problems);
            let got = by_kind(&t);
            for (kind, backends, drop) in want {
                let backends: Vec<String> = backends.into_iter().map(String::from).collect();
                assert_eq!(
                    got.get(kind),
                    Some(&(backends, drop)),
                    "{name}: {kind} (all: {got:?})"
                );
            }
        }
        // No endpoint at all: rejected (not dropped) even with eTP Local.
        let t = translate(
            &state(vec![lb_service("Cluster", "Local")], vec![]),
            &external_node(),
        );
        assert_eq!(by_kind(&t).get("NodePort external"), Some(&(vec![], false)));
    }

    #[test]
    fn frontends_selecting_the_same_endpoints_share_one_backend_set() {
        // (itp, etp, distinct sets, frontends on the node-local set)
        let cases = [
            ("Cluster", "Cluster", 1, 0),
            // Outside gets local endpoints: NodePort, LoadBalancer IP and
            // externalIP from outside share the local set.
            ("Cluster", "Local", 2, 3),
            // Only the ClusterIP is local.
            ("Local", "Cluster", 2, 1),
            ("Local", "Local", 2, 4),
        ];
        let local = ep("10.0.0.1", Some(true), Some(true), None, "local");
        let remote = ep("10.0.0.2", Some(true), Some(true), None, "other");
        for (itp, etp, sets, on_local) in cases {
            let sl = slice("s", "web", http_port(), json!([local, remote]));
            let t = translate(
                &state(vec![lb_service(itp, etp)], vec![sl]),
                &external_node(),
            );
            let name = format!("iTP {itp} eTP {etp}");
            let mut distinct: Vec<&Arc<BackendSet>> = Vec::new();
            for f in t.desired.frontends.values() {
                if !distinct.iter().any(|s| Arc::ptr_eq(s, &f.set)) {
                    distinct.push(&f.set);
                }
            }
            assert_eq!(distinct.len(), sets, "{name}: {distinct:?}");
            let keys: BTreeSet<&BackendSetKey> = distinct.iter().map(|s| &s.key).collect();
            assert_eq!(keys.len(), sets, "{name}: one key per set");
            let local_users = t
                .desired
                .frontends
                .values()
                .filter(|f| f.set.key.selection == Selection::Local)
                .count();
            assert_eq!(local_users, on_local, "{name}");
            for set in distinct {
                assert_eq!(&*set.key.service_port, "ns/web:http", "{name}");
                let want = match set.key.selection {
                    Selection::Cluster => 2,
                    Selection::Local => 1,
                };
                assert_eq!(set.backends.len(), want, "{name}: {:?}", set.key);
            }
        }
    }

    #[test]
    fn forwarding_mode_sets_dsr_on_external_entries_of_cluster_policy() {
        // (default mode, annotation, eTP, protocol, DSR from outside)
        let cases = [
            ("snat", None, "Cluster", "TCP", false),
            ("dsr", None, "Cluster", "TCP", true),
            ("dsr", None, "Cluster", "UDP", true),
            ("hybrid", None, "Cluster", "TCP", true),
            ("hybrid", None, "Cluster", "UDP", false),
            ("snat", Some("dsr"), "Cluster", "UDP", true),
            ("snat", Some("hybrid"), "Cluster", "UDP", false),
            ("dsr", Some("snat"), "Cluster", "TCP", false),
            // Local keeps the client and never leaves the node anyway.
            ("dsr", None, "Local", "TCP", false),
            // SCTP is not carried by DSR (Cilium's neither).
            ("dsr", None, "Cluster", "SCTP", false),
        ];
        let both = json!([
            ep("10.0.0.1", Some(true), Some(true), None, "local"),
            ep("10.0.0.2", Some(true), Some(true), None, "other"),
        ]);
        for (default, annotation, etp, proto, want) in cases {
            let mut node = external_node();
            node.default_forwarding_mode = ForwardingMode::parse(default).unwrap();
            let (key, mut svc) = lb_service("Cluster", etp);
            if let Some(mode) = annotation {
                svc.metadata.annotations =
                    Some([(ANNOTATION_FORWARDING_MODE.to_string(), mode.to_string())].into());
            }
            svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some(proto.into());
            let ports = json!([{"name": "http", "port": 8080, "protocol": proto}]);
            let t = translate(
                &state(
                    vec![(key, svc)],
                    vec![slice("s", "web", ports, both.clone())],
                ),
                &node,
            );
            assert!(t.problems.is_empty(), "{:?}", t.problems);
            let case = format!("default {default}, annotation {annotation:?}, eTP {etp}, {proto}");
            for (k, f) in &t.desired.frontends {
                let external = k.scope == Scope::External && f.kind != FrontendKind::ClusterIP;
                assert_eq!(
                    f.dsr,
                    want && external,
                    "{case}: {:?} {:?}",
                    f.kind,
                    k.scope
                );
                if f.dsr {
                    // The client's address is what DSR keeps.
                    assert!(!f.masquerade, "{case}: {:?} masqueraded", f.kind);
                }
            }
        }
    }

    #[test]
    fn a_bad_forwarding_mode_annotation_is_reported_and_the_service_skipped() {
        let (key, mut svc) = lb_service("Cluster", "Cluster");
        svc.metadata.annotations =
            Some([(ANNOTATION_FORWARDING_MODE.to_string(), "direct".to_string())].into());
        let t = translate(&state(vec![(key, svc)], vec![]), &external_node());
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        assert_eq!(t.problems[0].object, "Service ns/web");
        assert!(
            t.problems[0].reason.contains("lb/forwarding-mode")
                && t.problems[0].reason.contains("\"direct\""),
            "{:?}",
            t.problems[0]
        );
        assert!(t.desired.frontends.is_empty());
    }

    #[test]
    fn masquerade_follows_kube_proxys_internal_external_table() {
        // kube-proxy's TestInternalExternalMasquerade: under eTP Cluster every
        // connection to an external destination is masqueraded, from pods
        // and from outside; under Local neither (pods short-circuit, outside
        // keeps its address); ClusterIPs never (no --cluster-cidr here).
        let both = json!([
            ep("10.0.0.1", Some(true), Some(true), None, "local"),
            ep("10.0.0.2", Some(true), Some(true), None, "other"),
        ]);
        let masqueraded = |t: &Translation| -> BTreeMap<String, bool> {
            t.desired
                .frontends
                .iter()
                .map(|(k, f)| (format!("{:?} {:?}", f.kind, k.scope), f.masquerade))
                .collect()
        };
        for (etp, kube_proxy, want_external) in [
            ("Cluster", true, true),
            ("Local", true, false),
            ("Cluster", false, false),
        ] {
            let mut node = external_node();
            node.masquerade_cluster_policy = kube_proxy;
            let sl = slice("s", "web", http_port(), both.clone());
            let t = translate(&state(vec![lb_service("Cluster", etp)], vec![sl]), &node);
            let got = masqueraded(&t);
            for kind in ["NodePort", "LoadBalancer", "ExternalIP"] {
                for scope in ["Internal", "External"] {
                    assert_eq!(
                        got.get(&format!("{kind} {scope}")),
                        Some(&want_external),
                        "eTP {etp}, masquerade_cluster_policy {kube_proxy}: {kind} {scope} ({got:?})"
                    );
                }
            }
            assert_eq!(got.get("ClusterIP Internal"), Some(&false), "eTP {etp}");
        }
    }

    #[test]
    fn service_ports_without_local_endpoints_are_counted_per_policy() {
        // kube-proxy's sync_proxy_rules_no_local_endpoints_total{traffic_policy}.
        let local = ep("10.0.0.1", Some(true), Some(true), None, "local");
        let remote = ep("10.0.0.2", Some(true), Some(true), None, "other");
        let cases = [
            ("Local", "Local", json!([remote.clone()]), true, true),
            ("Local", "Cluster", json!([remote.clone()]), true, false),
            ("Cluster", "Local", json!([remote.clone()]), false, true),
            ("Local", "Local", json!([local, remote]), false, false),
            ("Cluster", "Cluster", json!([]), false, false),
        ];
        for (itp, etp, endpoints, internal, external) in cases {
            let sl = slice("s", "web", http_port(), endpoints);
            let t = translate(
                &state(vec![lb_service(itp, etp)], vec![sl]),
                &external_node(),
            );
            let name = "ns/web:http".to_string();
            assert_eq!(
                (
                    t.no_local_endpoints.internal.contains(&name),
                    t.no_local_endpoints.external.contains(&name)
                ),
                (internal, external),
                "iTP {itp}, eTP {etp}: {:?}",
                t.no_local_endpoints
            );
        }
    }

    #[test]
    fn terminating_endpoints_with_external_policy_local() {
        // kube-proxy's TestTerminatingEndpointsTrafficPolicyLocal: the local
        // set falls back to the local serving-terminating endpoint while the
        // cluster set keeps the ready remote one.
        let sl = slice(
            "s",
            "web",
            http_port(),
            json!([
                ep("10.0.0.1", Some(false), Some(true), Some(true), "local"),
                ep("10.0.0.2", Some(true), Some(true), None, "other"),
            ]),
        );
        let t = translate(
            &state(vec![lb_service("Cluster", "Local")], vec![sl]),
            &external_node(),
        );
        let got = by_kind(&t);
        assert_eq!(
            got["NodePort external"],
            (vec!["10.0.0.1(local)~".to_string()], false)
        );
        assert_eq!(
            got["NodePort internal"],
            (vec!["10.0.0.2".to_string()], false)
        );
        // kube-proxy's TestHealthCheckNodePortWhenTerminating: only ready
        // local endpoints count, so the node reports none (503).
        assert_eq!(t.desired.health_checks[&32000].local_endpoints, 0);
    }

    #[test]
    fn node_ports_follow_the_type_and_node_addresses() {
        let sl = || slice("s", "web", http_port(), json!([ready("10.0.0.1")]));
        let keys = |t: &Translation| -> Vec<String> {
            t.desired
                .frontends
                .iter()
                .filter(|(_, f)| f.kind == FrontendKind::NodePort)
                .map(|(k, _)| k.to_string())
                .collect()
        };
        let mut node = external_node();
        node.nodeport_addresses
            .push("192.168.60.1".parse().unwrap());
        let t = translate(
            &state(vec![lb_service("Cluster", "Cluster")], vec![sl()]),
            &node,
        );
        assert_eq!(
            keys(&t),
            vec![
                "192.168.50.1:30080/TCP",
                "192.168.50.1:30080/TCP (external)",
                "192.168.60.1:30080/TCP",
                "192.168.60.1:30080/TCP (external)"
            ]
        );
        // Type changes release what is no longer declared.
        for (ty, node_ports, lb_ip) in [
            ("NodePort", 4, false),
            ("ClusterIP", 0, false),
            ("LoadBalancer", 4, true),
        ] {
            let (k, mut s) = lb_service("Cluster", "Cluster");
            s.spec.as_mut().unwrap().type_ = Some(ty.into());
            let t = translate(&state(vec![(k, s)], vec![sl()]), &node);
            assert_eq!(keys(&t).len(), node_ports, "{ty}: node ports");
            let has_lb = t
                .desired
                .frontends
                .keys()
                .any(|k| k.addr.to_string() == "198.51.100.10");
            assert_eq!(has_lb, lb_ip, "{ty}: LoadBalancer IP");
        }
        // Two Services on one nodePort: the first keeps it.
        let (_, mut other) = lb_service("Cluster", "Cluster");
        let spec = other.spec.as_mut().unwrap();
        spec.cluster_ip = Some("10.96.0.11".into());
        spec.external_ips = None;
        other.status = None;
        let t = translate(
            &state(
                vec![
                    lb_service("Cluster", "Cluster"),
                    (ObjectKey::new("ns", "zz"), other),
                ],
                vec![sl()],
            ),
            &node,
        );
        assert_eq!(keys(&t).len(), 4);
        assert!(
            t.problems
                .iter()
                .any(|p| p.object == "Service ns/zz" && p.reason.contains("nodePort 30080/TCP")),
            "{:?}",
            t.problems
        );
    }

    #[test]
    fn source_ranges_health_checks_and_addresses() {
        let (k, mut s) = lb_service("Cluster", "Local");
        s.spec.as_mut().unwrap().load_balancer_source_ranges =
            Some(vec!["203.0.113.0/24".into(), " 10.1.2.3/8 ".into()]);
        let sl = slice("s", "web", http_port(), json!([ready("10.0.0.2")]));
        let t = translate(
            &state(vec![(k.clone(), s.clone())], vec![sl.clone()]),
            &external_node(),
        );
        let lb_ip: IpAddr = "198.51.100.10".parse().unwrap();
        let ranges: Vec<String> = t.desired.source_ranges[&lb_ip]
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(ranges, vec!["10.0.0.0/8", "203.0.113.0/24"]);
        // kube-proxy's TestLoadBalancer "same node to LB1, SNATted to LB1
        // (implicitly allowed)": ranges admitting the node admit the LB IP.
        let mut with_node = s.clone();
        with_node.spec.as_mut().unwrap().load_balancer_source_ranges =
            Some(vec![format!("{NODE_ADDR}/32"), "203.0.113.0/24".into()]);
        let t2 = translate(
            &state(vec![(k.clone(), with_node)], vec![sl.clone()]),
            &external_node(),
        );
        let ranges: Vec<String> = t2.desired.source_ranges[&lb_ip]
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            ranges,
            vec![
                format!("{NODE_ADDR}/32"),
                "198.51.100.10/32".into(),
                "203.0.113.0/24".into()
            ]
        );
        for (fk, f) in &t.desired.frontends {
            assert_eq!(
                f.source_ranges,
                fk.addr == lb_ip,
                "{fk}: ranges filter LoadBalancer IPs only"
            );
        }
        // eTP Local without local endpoints: 503 material.
        assert_eq!(
            t.desired.health_checks[&32000],
            HealthCheck {
                service: k.clone(),
                local_endpoints: 0
            }
        );
        // Addresses: Service IPs in the scopes they have frontends in; the
        // node address carries NodePorts only. From outside the LB IP has no
        // usable (local) endpoint, so pings from outside are not answered.
        let entry = |ip: &str, scope| {
            t.desired
                .addresses
                .get(&(ip.parse().unwrap(), scope))
                .copied()
        };
        let internal = |echo| {
            Some(AddressEntry {
                reject_undeclared: true,
                echo,
            })
        };
        let external = |echo| {
            Some(AddressEntry {
                reject_undeclared: false,
                echo,
            })
        };
        assert_eq!(entry("10.96.0.10", Scope::Internal), internal(true));
        assert_eq!(entry("10.96.0.10", Scope::External), None);
        // Undeclared ports of a LoadBalancer IP pass (kube-proxy rejects on
        // ClusterIPs only; an LB IP may be a node address answers come to).
        assert_eq!(entry("198.51.100.10", Scope::Internal), external(true));
        assert_eq!(entry("198.51.100.10", Scope::External), external(false));
        assert_eq!(entry(NODE_ADDR, Scope::Internal), None);

        // A range we cannot read closes the Service rather than opening it.
        s.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["not-a-cidr".into()]);
        let t = translate(&state(vec![(k, s)], vec![sl]), &external_node());
        assert!(t.desired.frontends.is_empty());
        assert!(
            t.problems[0].reason.contains("\"not-a-cidr\""),
            "{:?}",
            t.problems
        );
    }

    #[test]
    fn proxy_mode_ingress_ips_are_left_to_the_load_balancer() {
        let (k, mut s) = lb_service("Cluster", "Cluster");
        s.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [
                {"ip": "198.51.100.10", "ipMode": "Proxy"},
                {"ip": "198.51.100.11", "ipMode": "VIP"},
                {"hostname": "lb.example.com"}
            ]}}))
            .unwrap(),
        );
        let t = translate(&state(vec![(k, s)], vec![]), &external_node());
        let lb: BTreeSet<String> = t
            .desired
            .frontends
            .iter()
            .filter(|(_, f)| f.kind == FrontendKind::LoadBalancer)
            .map(|(k, _)| k.addr.to_string())
            .collect();
        assert_eq!(lb, BTreeSet::from(["198.51.100.11".to_string()]));
    }

    #[test]
    fn cluster_cidr_serves_cluster_ips_from_outside_masqueraded() {
        let sl = slice("s", "web", http_port(), json!([ready("10.0.0.1")]));
        let t = translate(&state(vec![web()], vec![sl.clone()]), &node());
        assert!(
            t.desired
                .frontends
                .keys()
                .all(|k| k.scope == Scope::Internal),
            "without --cluster-cidr ClusterIPs are in-cluster only"
        );
        let with_cidr = NodeConfig {
            cluster_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            ..node()
        };
        let t = translate(&state(vec![web()], vec![sl]), &with_cidr);
        let external: Vec<(&FrontendKey, &Frontend)> = t
            .desired
            .frontends
            .iter()
            .filter(|(k, _)| k.scope == Scope::External)
            .collect();
        assert_eq!(external.len(), 1);
        let (key, frontend) = external[0];
        assert_eq!(key.to_string(), "10.96.0.10:80/TCP (external)");
        assert!(frontend.masquerade);
        assert_eq!(frontend.set.backends.len(), 1);
        assert!(
            !t.desired.frontends[&FrontendKey {
                scope: Scope::Internal,
                ..*key
            }]
                .masquerade,
            "pods keep their source"
        );
    }
}
