//! `lb-agent run`. Data moves one way, and each step is its own type:
//! the source (API watchers or the manifests directory) reports object
//! changes -> the `Reconciler`'s change tracker -> incremental translation
//! -> a delta -> incremental sync -> maps. The device watcher (its own
//! thread) keeps programs attached as devices come and go and reports the
//! node's addresses; the health, metrics and health-check servers are their
//! own tasks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use axum::Router;
use lb_common::{
    Addr, ConfigValue, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, LAYOUT_VERSION, config_flags,
    stat,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    config::{RunConfig, SourceConfig},
    datapath::{
        link_events::LinkEvents,
        loader::{
            Datapath, default_cgroup_root, default_route_devices, device_addresses, glob_match,
            global_rp_filter, interfaces,
        },
        maps::Capacities,
        migrate::{Migration, Pass},
        sockets,
        sync::{SyncError, Syncer},
    },
    health::Health,
    healthcheck::HealthCheckServers,
    metrics::Metrics,
    metrics::TriggerTimes,
    model::{
        Change, ChangeTracker, NodeConfig, Problem, Scope, Translator, cluster::node_eligible,
    },
    source::{
        kube::KubeSource,
        manifests::{ManifestDir, PollResult},
        watch::DirWatch,
    },
};

/// How often the directory (besides inotify) and the devices are looked at.
const POLL: Duration = Duration::from_millis(200);
/// Devices are looked at again this often without a link event (events
/// can be lost; an attach that failed is retried).
const DEVICE_RESCAN: Duration = Duration::from_secs(2);
/// A sync that failed partly (a full map) is retried on this schedule.
const RETRY: Duration = Duration::from_secs(5);

/// Agent-side counters mirrored into LB_STATS for `dump stats`.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct AgentCounters {
    map_full: u64,
    invalid_objects: u64,
    bad_files: u64,
}

enum Source {
    Manifests {
        dir: Box<ManifestDir>,
        watch: Option<DirWatch>,
        /// The directory's first reading, done while the kernel verified
        /// the programs: its changes are handed out with the next ones.
        first: Option<PollResult>,
    },
    Kube(KubeSource),
}

/// The source, started before the programs are loaded: reading (or
/// listing) the cluster and verifying the programs overlap.
enum SourceStart {
    Manifests(std::thread::JoinHandle<(ManifestDir, Result<PollResult>)>),
    Kube(KubeSource),
}

impl SourceStart {
    async fn begin(config: &RunConfig) -> Result<Self> {
        Ok(match &config.source {
            SourceConfig::Manifests(dir) => {
                let mut dir = ManifestDir::new(dir);
                let reading = std::thread::Builder::new()
                    .name("manifests".into())
                    .spawn(move || {
                        let started = Instant::now();
                        let first = dir.poll().context("reading the manifests directory");
                        if first.is_ok() {
                            info!(
                                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                                "manifests directory read"
                            );
                        }
                        (dir, first)
                    })
                    .context("starting the manifests reader")?;
                SourceStart::Manifests(reading)
            }
            SourceConfig::Kube {
                kubeconfig,
                api_servers,
            } => {
                let client = crate::source::kube::client(kubeconfig.as_ref(), api_servers).await?;
                SourceStart::Kube(KubeSource::start(
                    client,
                    &config.node.node_name,
                    config.node.service_proxy_name.as_deref(),
                ))
            }
        })
    }

    fn finish(self) -> Result<Source> {
        Ok(match self {
            SourceStart::Manifests(reading) => {
                let (dir, first) = reading
                    .join()
                    .map_err(|_| anyhow::anyhow!("the manifests reader panicked"))?;
                // A directory that cannot be read yet is reported by the
                // loop's own reading, as before.
                let first = first.ok();
                let watch = match DirWatch::new(dir.dir()) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        warn!(error = %e, "inotify unavailable; polling the manifests directory only");
                        None
                    }
                };
                Source::Manifests {
                    dir: Box::new(dir),
                    watch,
                    first,
                }
            }
            SourceStart::Kube(k) => Source::Kube(k),
        })
    }
}

/// What a source reports since it was last asked.
#[derive(Default)]
struct SourceChanges {
    changes: Vec<Change>,
    /// The source's own problems (duplicate definitions); None: unchanged.
    problems: Option<Vec<Problem>>,
    /// When the oldest change arrived, when the source knows.
    since: Option<Instant>,
}

impl Source {
    fn changes(&mut self, counters: &mut AgentCounters) -> Result<SourceChanges> {
        match self {
            Source::Manifests { dir, first, .. } => {
                let mut poll = dir.poll().context("reading the manifests directory")?;
                if let Some(first) = first.take() {
                    poll.changed |= first.changed;
                    let mut errors = first.new_errors;
                    errors.append(&mut poll.new_errors);
                    poll.new_errors = errors;
                }
                for err in &poll.new_errors {
                    counters.bad_files += 1;
                    error!(file = %err.path.display(), reason = %err.reason, "manifest file rejected; its last good content stays in force");
                }
                if !poll.changed {
                    return Ok(SourceChanges::default());
                }
                let (changes, problems) = dir.changes();
                Ok(SourceChanges {
                    changes,
                    problems: Some(problems),
                    since: Some(Instant::now()),
                })
            }
            Source::Kube(k) => {
                if !k.ready() {
                    return Ok(SourceChanges::default());
                }
                let (changes, since) = k.take_changes();
                Ok(SourceChanges {
                    changes,
                    problems: None,
                    since,
                })
            }
        }
    }

    /// Everything listed at least once: nothing is synced before.
    fn ready(&self) -> bool {
        match self {
            Source::Manifests { .. } => true,
            Source::Kube(k) => k.ready(),
        }
    }

    /// Wait until the source may have changed (or forever, if it cannot say).
    async fn changed(&self) {
        match self {
            Source::Manifests { watch: Some(w), .. } => {
                if let Err(e) = w.changed().await {
                    warn!(error = %e, "inotify read failed; relying on polling");
                    std::future::pending::<()>().await;
                }
            }
            Source::Manifests { watch: None, .. } => std::future::pending().await,
            Source::Kube(k) => k.changed().await,
        }
    }
}

async fn serve(what: &'static str, addr: SocketAddr, router: Router) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} server to {addr}"))?;
    info!(%addr, "{what} server listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!(error = %e, "{what} server stopped");
        }
    });
    Ok(())
}

/// The datapath's node-wide settings for the current node view.
fn datapath_config(
    config: &RunConfig,
    node: &NodeConfig,
    snat: SnatAddresses,
    netns_cookie: u64,
) -> ConfigValue {
    ConfigValue {
        layout_version: LAYOUT_VERSION,
        flags: if config.ping_services {
            config_flags::ECHO_REPLY
        } else {
            0
        } | if config.fast_path {
            config_flags::FAST_PATH
        } else {
            0
        } | if config.conntrack_accounting {
            config_flags::CT_ACCOUNTING
        } else {
            0
        } | match &config.socket_lb {
            Some(socket_lb) if socket_lb.all_namespaces => {
                config_flags::SOCKET_LB | config_flags::SOCKET_LB_ALL_NETNS
            }
            Some(_) => config_flags::SOCKET_LB,
            None => 0,
        },
        snat_port_min: DEFAULT_SNAT_PORT_MIN,
        snat_port_max: DEFAULT_SNAT_PORT_MAX,
        _pad: 0,
        netns_cookie,
        hairpin_snat_addr4: Addr::from(node.hairpin_snat_addr),
        hairpin_snat_addr6: Addr::from(IpAddr::V6(node.hairpin_snat_addr6)),
        nodeport_snat_addr4: snat.v4.map_or(Addr::NONE, Addr::from),
        nodeport_snat_addr6: snat.v6.map_or(Addr::NONE, |a| Addr::from(IpAddr::V6(a))),
    }
}

/// The node address, per family, external flows to other nodes' backends
/// are source-NATed to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SnatAddresses {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl SnatAddresses {
    fn addresses(self) -> Vec<IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
            .collect()
    }
}

/// The node devices' addresses: NodePort addresses (filtered by
/// --nodeport-addresses) and the SNAT addresses masqueraded flows get (per
/// family, the first address of the first node device that has one; without
/// one, the address of the default route's device, as kube-proxy's
/// MASQUERADE would pick the outgoing device's).
fn node_addresses(config: &RunConfig) -> std::io::Result<(Vec<IpAddr>, SnatAddresses)> {
    let found = device_addresses(&config.devices)?;
    let first_v4 = |found: &[(String, IpAddr)]| {
        found.iter().find_map(|(_, a)| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    };
    let first_v6 = |found: &[(String, IpAddr)]| {
        found.iter().find_map(|(_, a)| match a {
            // Link-local addresses are no masquerade source.
            IpAddr::V6(v6) if !v6.is_unicast_link_local() => Some(*v6),
            _ => None,
        })
    };
    let mut snat = SnatAddresses {
        v4: first_v4(&found),
        v6: first_v6(&found),
    };
    if snat.v4.is_none() || snat.v6.is_none() {
        let (dev4, dev6) = default_route_devices();
        if snat.v4.is_none() {
            snat.v4 = match dev4 {
                Some(d) => first_v4(&device_addresses(&[d])?),
                None => None,
            };
        }
        if snat.v6.is_none() {
            snat.v6 = match dev6 {
                Some(d) => first_v6(&device_addresses(&[d])?),
                None => None,
            };
        }
    }
    let mut nodeport: Vec<IpAddr> = found
        .into_iter()
        .map(|(_, a)| a)
        .filter(|a| {
            config
                .nodeport_cidrs
                .as_ref()
                .is_none_or(|cidrs| cidrs.iter().any(|c| c.contains(a)))
        })
        .collect();
    nodeport.sort();
    nodeport.dedup();
    Ok((nodeport, snat))
}

/// What the node's devices say about the node: NodePort addresses, SNAT
/// addresses and every address it has.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeView {
    nodeport: Vec<IpAddr>,
    snat: SnatAddresses,
    host: BTreeSet<IpAddr>,
}

/// Err when the devices or addresses cannot be listed (not: there are none).
fn node_view(config: &RunConfig) -> std::io::Result<NodeView> {
    let (nodeport, snat) = node_addresses(config)?;
    Ok(NodeView {
        nodeport,
        snat,
        host: host_addresses()?,
    })
}

/// The device watcher: on its own thread (verifying a program for a new
/// device takes seconds, which must not hold up a sync), attach programs
/// to devices as they come and go, woken by the kernel's link events (a
/// pod device gets its program as the CNI creates it) and, as a fallback,
/// every `DEVICE_RESCAN`. The node's addresses are read by the loop itself
/// before each sync: cheap, and never behind a verification.
fn spawn_device_watcher(
    mut datapath: Datapath,
    config: RunConfig,
    hand_over: Option<HandOver>,
) -> Result<std::thread::JoinHandle<()>> {
    let mut events = match LinkEvents::open() {
        Ok(events) => Some(events),
        Err(e) => {
            warn!(error = %e, "no netlink link events; polling devices every 200 ms");
            None
        }
    };
    std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            if let Some(hand_over) = hand_over {
                match hand_over.run(&mut datapath, &config) {
                    Ok(true) => {}
                    // Stopping before the first sync: the old programs stay.
                    Ok(false) => return,
                    Err(e) => {
                        error!(error = format!("{e:#}"), "replacing the previous layout's programs failed");
                        return;
                    }
                }
            }
            loop {
                datapath.attach_matching(&config.pod_devices, &config.devices, config.device_mode);
                match &events {
                    Some(ev) => {
                        if let Err(e) = ev.wait(DEVICE_RESCAN) {
                            warn!(error = %e, "netlink link events failed; polling devices every 200 ms");
                            events = None;
                        }
                    }
                    None => std::thread::sleep(POLL),
                }
            }
        })
        .context("starting the device watcher thread")
}

/// Live connections in the kernel's conntrack table that a DNAT rule
/// translated (kube-proxy's, on a node lb takes over).
fn kube_proxy_connections() -> usize {
    match crate::kernel_conntrack::count_translated_connections() {
        Ok(n) => {
            if n > 0 {
                info!(
                    connections = n,
                    "the kernel tracks connections a DNAT rule translated (kube-proxy's): lb carries them on after its first sync"
                );
            }
            n
        }
        // No netfilter conntrack here: nothing to carry.
        Err(e) => {
            debug!(error = %e, "cannot read the kernel's conntrack table");
            0
        }
    }
}

/// The socket-level programs on the cgroup (or detached, when turned off).
fn attach_socket_programs(datapath: &mut Datapath, config: &RunConfig) -> Result<()> {
    match &config.socket_lb {
        Some(socket_lb) => {
            let cgroup = socket_lb
                .cgroup_root
                .clone()
                .or_else(default_cgroup_root)
                .context("no cgroup v2 mount found for socket-level LB: pass --cgroup-root, or --socket-lb=false")?;
            datapath.attach_sockets(&cgroup).with_context(|| {
                format!(
                    "attaching socket-level LB to {} (--socket-lb=false turns it off)",
                    cgroup.display()
                )
            })?;
        }
        None => datapath.detach_sockets(),
    }
    Ok(())
}

/// The datapath config has two writers: the loop (node addresses) and,
/// during an upgrade's hand-over, the device thread (`MIGRATING`). The
/// lock guards the flag and every write, so neither undoes the other.
#[derive(Clone, Default)]
struct Migrating(std::sync::Arc<std::sync::Mutex<bool>>);

impl Migrating {
    /// Write `value` with the flag as it stands.
    fn write(
        &self,
        map: &mut crate::datapath::maps::ConfigMap,
        mut value: ConfigValue,
    ) -> Result<()> {
        let on = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if *on {
            value.flags |= config_flags::MIGRATING;
        }
        map.set(0, value, 0).context("writing the datapath config")
    }

    /// Turn the flag on or off in the config the map holds.
    fn set(&self, map: &mut crate::datapath::maps::ConfigMap, on: bool) -> Result<()> {
        let mut flag = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Recorded first: should this write fail, the next config write
        // (node addresses) carries the flag as wanted.
        *flag = on;
        let mut value = map.get(&0, 0).context("reading the datapath config")?;
        if on {
            value.flags |= config_flags::MIGRATING;
        } else {
            value.flags &= !config_flags::MIGRATING;
        }
        map.set(0, value, 0).context("writing the datapath config")
    }
}

/// After a layout change: the programs on the devices serve from the
/// previous maps until the new maps hold every Service (the first completed
/// sync opens `gate`); then the new programs replace them, with the flows
/// the old programs added copied right before and right after.
struct HandOver {
    gate: std::sync::mpsc::Receiver<()>,
    migration: Migration,
    migrating: Migrating,
}

impl HandOver {
    /// Ok(false): the agent stops before its first sync (the old programs
    /// stay, nothing of this agent's replaces them).
    fn run(self, datapath: &mut Datapath, config: &RunConfig) -> Result<bool> {
        use std::sync::mpsc::RecvTimeoutError;
        // Seconds of verification now, while the old programs serve, so
        // the swap below takes milliseconds from the first device to the last.
        datapath.prepare_matching(&config.pod_devices, &config.devices, config.device_mode);
        loop {
            match self.gate.recv_timeout(POLL) {
                Ok(()) => break,
                // Devices created since the old agent stopped have no
                // program at all: they get the new one now.
                Err(RecvTimeoutError::Timeout) => {
                    datapath.attach_unclaimed(
                        &config.pod_devices,
                        &config.devices,
                        config.device_mode,
                    );
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(false),
            }
        }
        let started = Instant::now();
        let mut maps = crate::datapath::maps::Maps::open_pinned(&config.bpffs)
            .context("opening the new maps for the hand-over")?;
        self.migrating.set(&mut maps.config, true)?;
        // The socket programs first: their links take milliseconds, which
        // must not fall between the copy and the devices' swap.
        let sockets = attach_socket_programs(datapath, config);
        let copied = self.migration.copy(&mut maps, Pass::CatchUp);
        self.migration.report(Pass::CatchUp, &copied);
        let attached = sockets.map(|()| {
            datapath.attach_matching(&config.pod_devices, &config.devices, config.device_mode)
        });
        // Whatever happened, what the old programs added is carried over
        // and the new programs balance again.
        let copied = self.migration.copy(&mut maps, Pass::CatchUp);
        self.migration.report(Pass::CatchUp, &copied);
        self.migrating.set(&mut maps.config, false)?;
        let attached = attached?;
        let from = self.migration.from_version();
        self.migration.finish(&config.bpffs);
        info!(
            from,
            devices = attached.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "the previous layout's programs are replaced; its maps are released"
        );
        Ok(true)
    }
}

/// Every address of the namespace's devices (endpoints there are hostNetwork pods).
fn host_addresses() -> std::io::Result<BTreeSet<IpAddr>> {
    let names: Vec<String> = interfaces()?.into_iter().map(|(_, name)| name).collect();
    Ok(device_addresses(&names)?
        .into_iter()
        .map(|(_, addr)| addr)
        .collect())
}

/// Say which addresses masqueraded flows get, and loudly when there is none:
/// the datapath then leaves those flows' source alone.
fn report_snat_addresses(snat: SnatAddresses) {
    if snat.v4.is_none() && snat.v6.is_none() {
        warn!(
            "no address to masquerade to (no address on --devices, no default route): flows kube-proxy would masquerade keep their client address, and NodePort traffic to other nodes' endpoints is not source-NATed"
        );
    } else {
        info!(v4 = ?snat.v4, v6 = ?snat.v6, "masquerade (SNAT) addresses");
    }
}

/// Source changes in, maps out: the change tracker, the incremental
/// translation and the sync, with what a sync reports (logs, metrics,
/// health, health-check servers, UDP sockets of departed backends).
struct Reconciler {
    config: RunConfig,
    node: NodeConfig,
    snat: SnatAddresses,
    netns_cookie: u64,
    tracker: ChangeTracker,
    /// Guards the datapath config during an upgrade's hand-over.
    migrating: Migrating,
    translator: Translator,
    syncer: Syncer,
    metrics: Metrics,
    health_checks: HealthCheckServers,
    counters: AgentCounters,
    /// What LB_STATS holds of them.
    published: Option<AgentCounters>,
    trigger_times: TriggerTimes,
    /// The source's own problems (duplicate definitions) last reported.
    source_problems: BTreeSet<Problem>,
    /// Slices changed since the last sync (programming latency).
    changed_slices: BTreeSet<crate::model::ObjectKey>,
    /// A sync failed (or none ran yet): the next one compares everything.
    full_sync: bool,
    endpoints_programmed: i64,
    /// What the maps do not hold, per object, as the last sync left it.
    not_programmed: BTreeMap<String, SyncError>,
    /// This node's Node is not being deleted (as last logged).
    node_eligible: bool,
}

/// What one reconcile did.
struct Outcome {
    /// Something failed: retry later.
    failed: bool,
    /// The sync ran through: whatever it could not program is a per-object
    /// problem (a Service that does not fit), not programming failing as a
    /// whole (the kernel refusing writes).
    completed: bool,
}

impl Reconciler {
    fn apply(&mut self, changes: Vec<Change>) {
        for change in changes {
            if let Change::EndpointSlice(key, _) = &change {
                self.changed_slices.insert(key.clone());
            }
            self.tracker.apply(change);
        }
    }

    fn source_problems(&mut self, problems: Vec<Problem>) {
        let current: BTreeSet<Problem> = problems.into_iter().collect();
        for p in current.difference(&self.source_problems) {
            self.counters.invalid_objects += 1;
            warn!(object = %p.object, reason = %p.reason, "object not used");
        }
        for p in self.source_problems.difference(&current) {
            info!(object = %p.object, "object problem resolved");
        }
        self.source_problems = current;
    }

    /// After the first sync on a node kube-proxy served: its live
    /// connections (kernel conntrack entries a DNAT rule made) get lb
    /// conntrack entries for the endpoint kube-proxy chose, their kernel
    /// entries go (they would clash with the ones netfilter creates for
    /// the packets lb now translates), and new flows are balanced again.
    fn carry_kube_proxy_connections(&mut self) {
        use crate::{datapath::sync::Imported, kernel_conntrack};
        let started = Instant::now();
        let mut outcome: BTreeMap<Imported, usize> = BTreeMap::new();
        let (mut node_sockets, mut deleted) = (0, 0);
        let carried = kernel_conntrack::translated_connections().and_then(|flows| {
            let mut deleter = kernel_conntrack::Deleter::open()?;
            let pod_devices: BTreeSet<u32> = interfaces()?
                .into_iter()
                .filter(|(_, name)| self.config.pod_devices.iter().any(|g| glob_match(g, name)))
                .map(|(ifindex, _)| ifindex)
                .collect();
            let now = crate::datapath::monotonic_ns();
            for flow in &flows {
                let client = flow.original.src.ip();
                if self.node.host_addresses.contains(&client) {
                    // The node's own sockets: lb's programs never change
                    // their destination, so netfilter's entry keeps doing it.
                    node_sockets += 1;
                    continue;
                }
                // Where its packets reach lb: its client's pod device, or a node device.
                let scope = match kernel_conntrack::route_device(client) {
                    Ok(Some(dev)) if pod_devices.contains(&dev) => Scope::Internal,
                    _ => Scope::External,
                };
                let imported = self
                    .syncer
                    .import_flow(flow, scope, now)
                    .map_err(std::io::Error::other)?;
                *outcome.entry(imported).or_default() += 1;
                // At once: while both exist, netfilter would see lb's
                // translated packets clash with the old entry.
                if imported == Imported::Carried && deleter.delete(flow)? {
                    deleted += 1;
                }
            }
            Ok(())
        });
        if let Err(e) = carried {
            warn!(error = %e, "carrying kube-proxy's connections over stopped; the rest are re-balanced");
        }
        if let Err(e) = self
            .migrating
            .set(&mut self.syncer.maps_mut().config, false)
        {
            warn!(
                error = format!("{e:#}"),
                "clearing the datapath's carry-over flag failed"
            );
        }
        let count = |k| outcome.get(&k).copied().unwrap_or(0);
        info!(
            carried = count(Imported::Carried),
            not_a_service = count(Imported::NotAService),
            unknown_endpoint = count(Imported::UnknownBackend),
            already_tracked = count(Imported::AlreadyTracked),
            node_sockets,
            kernel_entries_deleted = deleted,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "kube-proxy's connections carried over to lb's conntrack"
        );
    }

    /// A new view of the node's devices: addresses for NodePorts, SNAT and
    /// hostNetwork endpoints, and the datapath's settings.
    /// True when something changed.
    fn node_changed(&mut self, view: &NodeView) -> bool {
        if view.nodeport == self.node.nodeport_addresses
            && view.snat == self.snat
            && view.host == self.node.host_addresses
        {
            return false;
        }
        info!(nodeport_addresses = ?view.nodeport, snat_addresses = ?view.snat, "node device addresses changed");
        if view.snat != self.snat {
            report_snat_addresses(view.snat);
        }
        self.node.nodeport_addresses = view.nodeport.clone();
        self.node.node_ips = view.snat.addresses();
        self.node.host_addresses = view.host.clone();
        self.snat = view.snat;
        let value = datapath_config(&self.config, &self.node, self.snat, self.netns_cookie);
        if let Err(e) = self
            .migrating
            .write(&mut self.syncer.maps_mut().config, value)
        {
            warn!(
                error = format!("{e:#}"),
                "writing the datapath config failed"
            );
        }
        true
    }

    /// kube-proxy's nodeEligible, from this node's Node, logged when it
    /// changes. Without a Node object it stays what it was (eligible at
    /// first): a Node deleted while being drained stays ineligible, as
    /// kube-proxy re-applies the last one it saw.
    fn node_eligible(&mut self) -> bool {
        let eligible = self
            .tracker
            .state()
            .nodes
            .get(&self.node.node_name)
            .map_or(self.node_eligible, |n| node_eligible(n));
        if eligible != self.node_eligible {
            if eligible {
                info!(node = %self.node.node_name, "this node is eligible again: /healthz follows programming only");
            } else {
                warn!(node = %self.node.node_name, "this node is being deleted (or marked ToBeDeletedByClusterAutoscaler): /healthz answers 503 so load balancers drain it");
            }
            self.node_eligible = eligible;
        }
        eligible
    }

    /// Translate what changed and write it.
    fn reconcile(&mut self, started: Instant, assembled: Duration) -> Outcome {
        let dirty = self.tracker.take_dirty();
        let delta = self.translator.update(&self.tracker, &self.node, &dirty);
        let translated = started.elapsed();
        for p in &delta.new_problems {
            self.counters.invalid_objects += 1;
            warn!(object = %p.object, reason = %p.reason, "object not used");
        }
        for p in &delta.resolved_problems {
            info!(object = %p.object, "object problem resolved");
        }
        let desired = self.translator.desired();
        if delta.health_checks {
            self.health_checks.update(&desired.health_checks);
        }
        for (fk, before) in &delta.frontends {
            self.endpoints_programmed -= before.as_ref().map_or(0, |f| f.set.backends.len() as i64);
            self.endpoints_programmed += desired
                .frontends
                .get(fk)
                .map_or(0, |f| f.set.backends.len() as i64);
        }
        let full = self.full_sync;
        let report = if !full && delta.is_empty() {
            // Nothing for the maps (a change that translates the same).
            crate::datapath::sync::SyncReport::default()
        } else if full {
            self.syncer.sync(desired)
        } else {
            let frontends = delta.frontends.keys().copied().collect();
            self.syncer
                .sync_changes(desired, &frontends, &delta.addresses, &delta.source_ranges)
        };
        for e in &report.errors {
            if e.full {
                self.counters.map_full += 1;
            }
            self.metrics.sync_errors.inc();
        }
        let elapsed = started.elapsed();
        let metrics = &self.metrics;
        metrics.sync_duration.observe(elapsed.as_secs_f64());
        if report.errors.is_empty() {
            metrics.kube_proxy.synced(
                elapsed.as_secs_f64(),
                self.translator.no_local_endpoint_counts(),
            );
        } else {
            metrics
                .kube_proxy
                .sync_duration
                .observe(elapsed.as_secs_f64());
        }
        metrics
            .services_programmed
            .set(desired.frontends.len() as i64);
        metrics.endpoints_programmed.set(self.endpoints_programmed);
        info!(
            frontends = desired.frontends.len(),
            changed = delta.frontends.len(),
            full,
            written = report.frontends_written,
            removed = report.frontends_removed,
            backends_written = report.backends_written,
            backends_removed = report.backends_removed,
            sets_written = report.sets_written,
            sets_removed = report.sets_removed,
            errors = report.errors.len(),
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            assemble_ms = assembled.as_secs_f64() * 1e3,
            translate_ms = (translated - assembled).as_secs_f64() * 1e3,
            "synced"
        );
        if let Some(socket_lb) = &self.config.socket_lb
            && !full
        {
            let before = delta
                .frontends
                .iter()
                .filter_map(|(fk, f)| Some((fk, f.as_ref()?)));
            let departed = sockets::departed_udp_backends(before, desired);
            match sockets::close_departed(
                &departed,
                &mut self.syncer.maps_mut().sock_nat,
                socket_lb.all_namespaces,
            ) {
                Ok(0) => {}
                Ok(closed) => info!(
                    closed,
                    "closed connected UDP sockets whose Service backend went away; their owners reconnect"
                ),
                Err(e) => warn!(error = %e, "closing UDP sockets of departed backends failed"),
            }
        }
        if full {
            // A full pass (the first one above all) leaves the parse and
            // translation peaks freed but held by the allocator: give them
            // back, so RSS shows what the agent keeps.
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only releases free heap pages.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        self.full_sync = !report.errors.is_empty();
        let changed_slices = std::mem::take(&mut self.changed_slices);
        for latency in
            self.trigger_times
                .programmed(self.tracker.state(), &changed_slices, SystemTime::now())
        {
            metrics.kube_proxy.network_programming.observe(latency);
        }
        // After a full pass, what is not programmed is exactly its errors;
        // a partial pass can only add (a pass with errors makes the next
        // full). Logged when it changes, not on every retry.
        let mut now = if full {
            BTreeMap::new()
        } else {
            self.not_programmed.clone()
        };
        for e in &report.errors {
            now.insert(e.object.clone(), e.clone());
        }
        for (object, e) in &now {
            if self.not_programmed.get(object) != Some(e) {
                error!(object = %object, reason = %e.reason, map_full = e.full, "could not program; retrying, the other Services are served");
            }
        }
        for object in self.not_programmed.keys() {
            if !now.contains_key(object) {
                info!(object = %object, "no longer failing: programmed, or no longer wanted");
            }
        }
        self.not_programmed = now;
        let map_full = self.not_programmed.values().filter(|e| e.full).count();
        self.metrics
            .set_not_programmed(map_full, self.not_programmed.len() - map_full);
        if let Err(e) = self.syncer.publish_not_programmed(&self.not_programmed) {
            warn!(error = %e, "recording what is not programmed in LB_NOT_PROGRAMMED failed");
        }
        Outcome {
            failed: !report.errors.is_empty(),
            completed: report.errors.iter().all(|e| e.full),
        }
    }

    /// Mirror the agent's counters into LB_STATS for `dump stats`, when they moved.
    fn publish_counters(&mut self) {
        if self.published == Some(self.counters) {
            return;
        }
        self.published = Some(self.counters);
        let maps = self.syncer.maps_mut();
        for (index, value) in [
            (stat::AGENT_MAP_FULL, self.counters.map_full),
            (stat::AGENT_INVALID_OBJECTS, self.counters.invalid_objects),
            (stat::AGENT_BAD_FILES, self.counters.bad_files),
        ] {
            if let Err(e) = maps.set_agent_stat(index, value) {
                warn!(error = %e, "updating agent counters failed");
            }
        }
    }
}

pub async fn run(config: RunConfig) -> Result<()> {
    let started = Instant::now();
    let mut node = config.node.clone();
    let view = node_view(&config).context("reading the node's devices and addresses")?;
    node.nodeport_addresses = view.nodeport.clone();
    node.node_ips = view.snat.addresses();
    node.host_addresses = view.host.clone();
    report_snat_addresses(view.snat);
    // Taking over from kube-proxy (not as a canary beside it): never while
    // it runs; what it left is looked at after lb's first sync.
    let takeover = config.node.service_proxy_name.is_none();
    if takeover {
        crate::kube_proxy::refuse_while_running()?;
    }
    let mut kube_proxy_leftovers = takeover;
    // Connections kube-proxy's rules translated: carried into lb's
    // conntrack after the first sync; until then a mid-connection packet
    // lb has no entry for is dropped (TCP resends it), not re-balanced.
    let mut carry_connections = takeover && kube_proxy_connections() > 0;
    let reserved_now = match crate::reserved_ports::reserve(config.nodeport_range) {
        Ok(Some(list)) => {
            info!(range = %config.nodeport_range, reserved = %list, "NodePort range reserved from the node's ephemeral ports (net.ipv4.ip_local_reserved_ports)");
            true
        }
        Ok(None) => false,
        Err(e) => {
            warn!(range = %config.nodeport_range, error = %e, "cannot reserve the NodePort range from ephemeral ports: a host connection may draw a port a NodePort frontend captures");
            false
        }
    };
    if let Some(mode) = global_rp_filter() {
        warn!(rp_filter = %mode, "net.ipv4.conf.all.rp_filter is on: packets lb hands the stack on pod devices with a node address as source (masqueraded flows, NodePort answers) are dropped unless the fast path redirects them; set it to 0, as Cilium does");
    }
    // Socket-level LB acts on this namespace's sockets: the node's.
    let netns_cookie = match &config.socket_lb {
        Some(_) => sockets::netns_cookie().context(
            "reading this network namespace's cookie for socket-level LB \
             (SO_NETNS_COOKIE, Linux 5.14); --socket-lb=false turns it off",
        )?,
        None => 0,
    };
    let source_start = SourceStart::begin(&config).await?;
    let migrating = Migrating::default();
    let mut node_config = datapath_config(&config, &node, view.snat, netns_cookie);
    if carry_connections {
        *migrating.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        node_config.flags |= config_flags::MIGRATING;
    }
    let defaults = Capacities::default();
    let capacities = Capacities {
        services: config.lb_map_max.unwrap_or(defaults.services),
        backends: config.lb_map_max.unwrap_or(defaults.backends),
        backend_sets: config.lb_map_max.unwrap_or(defaults.backend_sets),
        backend_slots: config.lb_map_max.unwrap_or(defaults.backend_slots),
        // Two entries (forward and reply) per flow.
        ct_tcp: 2 * config.ct_max_tcp,
        ct_other: 2 * config.ct_max_other,
        // Rev-NAT ids run 1..=services: slot 0 is never a frontend's.
        service_counters: if config.service_counters {
            config
                .lb_map_max
                .unwrap_or(defaults.services)
                .saturating_add(1)
        } else {
            1
        },
    };
    let (mut datapath, maps) = Datapath::load_sized(&config.bpffs, node_config, capacities)
        .with_context(|| format!("loading the datapath under {}", config.bpffs.display()))?;
    if reserved_now {
        // Remembered beside the pins: `uninstall` takes back only what lb added.
        let marker = crate::reserved_ports::marker(&config.bpffs, config.nodeport_range);
        if let Err(e) = std::fs::create_dir_all(&marker) {
            warn!(path = %marker.display(), error = %e, "cannot record the reserved NodePort range; uninstall will leave it");
        }
    }
    // Adopted before this agent attaches anything: the pinned maps may come
    // from a version without the prefilter, which adoption fills from the
    // pinned frontends and backends; programs reading an empty prefilter
    // would take every packet for none of lb's.
    let mut maps = maps;
    crate::monitor::clear_abandoned(&config.bpffs, &mut maps.monitor);
    let mut syncer = Syncer::new(maps).context("reading the pinned maps")?;
    let migration = datapath.take_migration();
    let (hand_over, mut open_gate) = match migration {
        // The programs on the devices use the previous maps, which hold
        // every Service: they stay until the new maps do too.
        Some(migration) => {
            info!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                from = migration.from_version(),
                "programs verified; they replace the previous layout's after the first sync"
            );
            let (open, gate) = std::sync::mpsc::channel();
            let hand_over = HandOver {
                gate,
                migration,
                migrating: migrating.clone(),
            };
            (Some(hand_over), Some(open))
        }
        None => {
            attach_socket_programs(&mut datapath, &config)?;
            // Programs on the devices there are now, before anything is synced.
            datapath.attach_matching(&config.pod_devices, &config.devices, config.device_mode);
            // Verification is most of a start's time: the log says how much.
            info!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "programs verified and attached"
            );
            (None, None)
        }
    };
    let cleaner_maps = crate::datapath::maps::Maps::open_pinned(&config.bpffs)
        .context("opening the pinned maps for the cleanup thread")?;
    syncer.set_cleaner(
        crate::datapath::cleanup::Cleaner::spawn(cleaner_maps)
            .context("starting the cleanup thread")?,
    );
    let mut counters = AgentCounters::default();
    if let Ok(stats) = syncer.maps().read_stats() {
        // Continue the agent counters across restarts.
        counters.map_full = stats[stat::AGENT_MAP_FULL as usize];
        counters.invalid_objects = stats[stat::AGENT_INVALID_OBJECTS as usize];
        counters.bad_files = stats[stat::AGENT_BAD_FILES as usize];
    }

    let health = Health::new(config.health_timeout);
    let metrics = Metrics::new(config.bpffs.clone(), config.service_counters);
    if let Some(addr) = config.healthz_bind {
        serve("healthz", addr, health.router()).await?;
    }
    if let Some(addr) = config.metrics_bind {
        serve("metrics", addr, metrics.router()).await?;
    }

    let mut source = source_start.finish()?;
    info!(
        source = ?config.source,
        node = %config.node.node_name,
        bpffs = %config.bpffs.display(),
        pod_devices = ?config.pod_devices,
        devices = ?config.devices,
        nodeport_addresses = ?node.nodeport_addresses,
        snat_addresses = ?view.snat,
        min_sync_period = ?config.min_sync_period,
        "lb-agent running"
    );

    let devices = spawn_device_watcher(datapath, config.clone(), hand_over)?;
    let mut reconciler = Reconciler {
        translator: Translator::new(node.clone()),
        node,
        snat: view.snat,
        netns_cookie,
        tracker: ChangeTracker::default(),
        syncer,
        metrics: metrics.clone(),
        health_checks: HealthCheckServers::new(None, health.clone()),
        counters,
        published: None,
        trigger_times: TriggerTimes::default(),
        source_problems: BTreeSet::new(),
        changed_slices: BTreeSet::new(),
        full_sync: true,
        endpoints_programmed: 0,
        not_programmed: BTreeMap::new(),
        node_eligible: true,
        migrating,
        config,
    };
    let min_sync_period = reconciler.config.min_sync_period;

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut tick = tokio::time::interval(POLL);
    // After a long sync, one tick, not a burst of the missed ones.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    let mut retry_at: Option<Instant> = None;
    // Changes are waiting (for the min sync period to pass, or the source to be ready).
    let mut dirty = false;
    // Oldest change not yet programmed (for health and programming latency).
    let mut pending_since: Option<Instant> = None;
    let mut last_sync: Option<Instant> = None;

    loop {
        let next_allowed = last_sync.map_or_else(Instant::now, |t| t + min_sync_period);
        tokio::select! {
            _ = tick.tick() => {}
            _ = source.changed() => {}
            _ = tokio::time::sleep_until(next_allowed.into()), if dirty => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        let started = Instant::now();
        health.beat();
        if devices.is_finished() {
            anyhow::bail!(
                "the device watcher thread stopped; restarting the agent re-attaches every device"
            );
        }
        match node_view(&reconciler.config) {
            Ok(view) => {
                if reconciler.node_changed(&view) {
                    pending_since.get_or_insert(started);
                    dirty = true;
                }
            }
            // Not "the node has no addresses": keep what is programmed.
            Err(e) => warn!(error = %e, "cannot read the node's addresses; keeping the last ones"),
        }
        if let Source::Kube(k) = &source {
            for (kind, n) in k.watch_stats().restarts {
                reconciler.metrics.set_watch_restarts(kind, n);
            }
        }

        // Take what changed, without syncing yet.
        match source.changes(&mut reconciler.counters) {
            Ok(SourceChanges {
                changes,
                problems,
                since,
            }) => {
                // Only a change waits to be programmed: a re-list or a
                // rewritten file that changes no object leaves nothing
                // pending (health would report a sync that never comes).
                if !changes.is_empty() {
                    dirty = true;
                    if let Some(since) = since {
                        pending_since = Some(pending_since.map_or(since, |p| p.min(since)));
                    }
                }
                reconciler.apply(changes);
                health.set_node_eligible(reconciler.node_eligible());
                if let Some(problems) = problems {
                    reconciler.source_problems(problems);
                }
            }
            Err(e) if first => return Err(e),
            // The last programmed state stays in force.
            Err(e) => warn!(error = %e, "source unreadable; keeping the programmed state"),
        }
        reconciler.publish_counters();
        if !source.ready() {
            continue;
        }
        if let Some(t) = pending_since {
            health.queued(t);
        }
        let retry_due = retry_at.is_some_and(|t| Instant::now() >= t);
        if !(dirty || retry_due || first) {
            continue;
        }
        if last_sync.is_some_and(|t| t.elapsed() < min_sync_period) && !retry_due {
            // Coalesce: the sleep_until branch wakes us when the period is over.
            continue;
        }
        dirty = false;
        first = false;
        let outcome = reconciler.reconcile(started, started.elapsed());
        retry_at = outcome.failed.then(|| Instant::now() + RETRY);
        last_sync = Some(Instant::now());
        if let Some(t) = pending_since.take() {
            reconciler
                .metrics
                .network_programming
                .observe(t.elapsed().as_secs_f64());
        }
        if outcome.completed {
            health.updated();
            if std::mem::take(&mut carry_connections) {
                reconciler.carry_kube_proxy_connections();
            }
            if let Some(open) = open_gate.take() {
                // Every Service is in the new maps: the new programs can take over.
                let _ = open.send(());
            }
            if std::mem::take(&mut kube_proxy_leftovers) {
                // lb serves every Service now: kube-proxy's rules can go
                // without leaving the node unserved (external tools: off the loop).
                let remove = reconciler.config.cleanup_kube_proxy;
                if let Err(e) = std::thread::Builder::new()
                    .name("kube-proxy-cleanup".into())
                    .spawn(move || crate::kube_proxy::report_and_clean_up(remove))
                {
                    warn!(error = %e, "cannot look for kube-proxy's rules");
                }
            }
        }
        reconciler.publish_counters();
    }
    info!("stopping; maps and links stay pinned, traffic keeps flowing");
    Ok(())
}
