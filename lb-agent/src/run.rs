//! `lb-agent run`: the loop that moves data one way, source -> ClusterState
//! -> translate -> DesiredState -> sync -> maps, keeps the program attached
//! to pod devices as they come and go, and serves health and metrics.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use axum::Router;
use lb_common::{
    Addr, ConfigValue, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, LAYOUT_VERSION, config_flags,
    stat,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::{RunConfig, SourceConfig},
    datapath::{
        loader::{
            Datapath, default_cgroup_root, default_route_devices, device_addresses,
            global_rp_filter, interfaces,
        },
        maps::Capacities,
        sockets,
        sync::Syncer,
    },
    health::{DEFAULT_HEALTH_TIMEOUT, Health},
    healthcheck::HealthCheckServers,
    metrics::Metrics,
    model::{ClusterState, DesiredState, NodeConfig, Problem, translate_with},
    source::{kube::KubeSource, manifests::ManifestDir, watch::DirWatch},
};

/// How often the directory (besides inotify) and the device list are looked at.
const POLL: Duration = Duration::from_millis(200);
/// A sync that failed partly (a full map) is retried on this schedule.
const RETRY: Duration = Duration::from_secs(5);

/// Agent-side counters mirrored into LB_STATS for `dump stats`.
#[derive(Default)]
struct AgentCounters {
    map_full: u64,
    invalid_objects: u64,
    bad_files: u64,
}

enum Source {
    Manifests {
        dir: ManifestDir,
        watch: Option<DirWatch>,
    },
    Kube(KubeSource),
}

impl Source {
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
fn node_addresses(config: &RunConfig) -> (Vec<IpAddr>, SnatAddresses) {
    let found = device_addresses(&config.devices);
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
            snat.v4 = dev4.and_then(|d| first_v4(&device_addresses(&[d])));
        }
        if snat.v6.is_none() {
            snat.v6 = dev6.and_then(|d| first_v6(&device_addresses(&[d])));
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
    (nodeport, snat)
}

/// Every address of the namespace's devices (endpoints there are hostNetwork pods).
fn host_addresses() -> BTreeSet<IpAddr> {
    let names: Vec<String> = interfaces().into_iter().map(|(_, name)| name).collect();
    device_addresses(&names)
        .into_iter()
        .map(|(_, addr)| addr)
        .collect()
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

pub async fn run(config: RunConfig) -> Result<()> {
    let mut node = config.node.clone();
    let (nodeport_addresses, mut snat_addr) = node_addresses(&config);
    node.nodeport_addresses = nodeport_addresses;
    node.node_ips = snat_addr.addresses();
    node.host_addresses = host_addresses();
    report_snat_addresses(snat_addr);
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
    let node_config = datapath_config(&config, &node, snat_addr, netns_cookie);
    let defaults = Capacities::default();
    let capacities = Capacities {
        services: config.lb_map_max.unwrap_or(defaults.services),
        backends: config.lb_map_max.unwrap_or(defaults.backends),
        // Two entries (forward and reply) per flow.
        ct_tcp: 2 * config.ct_max_tcp,
        ct_other: 2 * config.ct_max_other,
    };
    let (mut datapath, maps) = Datapath::load_sized(&config.bpffs, node_config, capacities)
        .with_context(|| format!("loading the datapath under {}", config.bpffs.display()))?;
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
    let mut syncer = Syncer::new(maps).context("reading the pinned maps")?;
    let mut counters = AgentCounters::default();
    if let Ok(stats) = syncer.maps().read_stats() {
        // Continue the agent counters across restarts.
        counters.map_full = stats[stat::AGENT_MAP_FULL as usize];
        counters.invalid_objects = stats[stat::AGENT_INVALID_OBJECTS as usize];
        counters.bad_files = stats[stat::AGENT_BAD_FILES as usize];
    }

    let health = Health::new(DEFAULT_HEALTH_TIMEOUT);
    let metrics = Metrics::new(config.bpffs.clone());
    if let Some(addr) = config.healthz_bind {
        serve("healthz", addr, health.router()).await?;
    }
    if let Some(addr) = config.metrics_bind {
        serve("metrics", addr, metrics.router()).await?;
    }

    let source = match &config.source {
        SourceConfig::Manifests(dir) => {
            let watch = match DirWatch::new(dir) {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(error = %e, "inotify unavailable; polling the manifests directory only");
                    None
                }
            };
            Source::Manifests {
                dir: ManifestDir::new(dir),
                watch,
            }
        }
        SourceConfig::Kube {
            kubeconfig,
            api_server,
        } => {
            let client =
                crate::source::kube::client(kubeconfig.as_ref(), api_server.as_deref()).await?;
            Source::Kube(KubeSource::start(client, &config.node.node_name))
        }
    };
    let mut source = source;
    info!(
        source = ?config.source,
        node = %config.node.node_name,
        bpffs = %config.bpffs.display(),
        pod_devices = ?config.pod_devices,
        devices = ?config.devices,
        nodeport_addresses = ?node.nodeport_addresses,
        snat_addresses = ?snat_addr,
        min_sync_period = ?config.min_sync_period,
        "lb-agent running"
    );

    let mut reported: BTreeSet<Problem> = BTreeSet::new();
    let mut last_desired: Option<DesiredState> = None;
    let mut ip_owners = std::collections::BTreeMap::new();
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut tick = tokio::time::interval(POLL);
    let mut first = true;
    let mut retry_at: Option<Instant> = None;
    // A change is waiting for the min sync period to pass.
    let mut dirty = false;
    // Oldest change not yet programmed (for health and programming latency).
    let mut pending_since: Option<Instant> = None;
    // EndpointSlice trigger times already measured (kube-proxy's network
    // programming latency).
    let mut trigger_times = crate::metrics::TriggerTimes::default();
    let mut last_sync: Option<Instant> = None;
    let mut health_checks = HealthCheckServers::new(None);

    loop {
        let next_allowed = last_sync.map_or_else(Instant::now, |t| t + config.min_sync_period);
        tokio::select! {
            _ = tick.tick() => {}
            _ = source.changed() => {}
            _ = tokio::time::sleep_until(next_allowed.into()), if dirty => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        datapath.attach_matching(&config.pod_devices, &config.devices, config.device_mode);
        {
            let (nodeport_addresses, snat) = node_addresses(&config);
            let host = host_addresses();
            if nodeport_addresses != node.nodeport_addresses
                || snat != snat_addr
                || host != node.host_addresses
            {
                info!(?nodeport_addresses, snat_addresses = ?snat, "node device addresses changed");
                if snat != snat_addr {
                    report_snat_addresses(snat);
                }
                node.nodeport_addresses = nodeport_addresses;
                node.node_ips = snat.addresses();
                node.host_addresses = host;
                snat_addr = snat;
                let value = datapath_config(&config, &node, snat_addr, netns_cookie);
                if let Err(e) = syncer.maps_mut().config.set(0, value, 0) {
                    warn!(error = %e, "writing the datapath config failed");
                }
                pending_since.get_or_insert_with(Instant::now);
                dirty = true;
            }
        }

        // Note what changed, without syncing yet.
        match &mut source {
            Source::Manifests { dir, .. } => match dir.poll() {
                Ok(poll) => {
                    for err in &poll.new_errors {
                        counters.bad_files += 1;
                        error!(file = %err.path.display(), reason = %err.reason, "manifest file rejected; its last good content stays in force");
                    }
                    if poll.changed || first {
                        pending_since.get_or_insert_with(Instant::now);
                        dirty = true;
                    }
                }
                Err(e) => {
                    if first {
                        return Err(e).context("reading the manifests directory");
                    }
                    // The last programmed state stays in force.
                    warn!(error = %e, "manifests directory unreadable; keeping the programmed state");
                }
            },
            Source::Kube(k) => {
                for (kind, n) in k.watch_stats().restarts {
                    metrics.set_watch_restarts(kind, n);
                }
                if !k.ready() {
                    continue;
                }
                if dirty || first || k.has_pending() {
                    dirty = true;
                }
            }
        }
        if let Some(t) = pending_since {
            health.queued(t);
        }
        let retry_due = retry_at.is_some_and(|t| Instant::now() >= t);
        if !(dirty || retry_due) {
            continue;
        }
        if last_sync.is_some_and(|t| t.elapsed() < config.min_sync_period) && !retry_due {
            // Coalesce: the sleep_until branch wakes us when the period is over.
            continue;
        }
        dirty = false;
        first = false;
        let started = Instant::now();
        let (state, mut problems): (ClusterState, Vec<Problem>) = match &mut source {
            Source::Manifests { dir, .. } => dir.cluster_state(),
            Source::Kube(k) => {
                let (state, since) = k.take_snapshot();
                if let Some(since) = since {
                    pending_since = Some(pending_since.map_or(since, |p| p.min(since)));
                }
                (state, Vec::new())
            }
        };
        let assembled = started.elapsed();
        let translation = translate_with(&state, &node, &ip_owners);
        ip_owners = translation.owners.clone();
        let translated = started.elapsed();
        problems.extend(translation.problems);
        let current: BTreeSet<Problem> = problems.into_iter().collect();
        for p in current.difference(&reported) {
            counters.invalid_objects += 1;
            warn!(object = %p.object, reason = %p.reason, "object not used");
        }
        for p in reported.difference(&current) {
            info!(object = %p.object, "object problem resolved");
        }
        reported = current;

        health_checks.update(&translation.desired.health_checks);
        if last_desired.as_ref() != Some(&translation.desired) || retry_due {
            let report = syncer.sync(&translation.desired);
            for e in &report.errors {
                if e.full {
                    counters.map_full += 1;
                }
                metrics.sync_errors.inc();
                error!(object = %e.object, reason = %e.reason, "could not program");
            }
            let elapsed = started.elapsed();
            metrics.sync_duration.observe(elapsed.as_secs_f64());
            if report.errors.is_empty() {
                metrics
                    .kube_proxy
                    .synced(elapsed.as_secs_f64(), &translation.no_local_endpoints);
            } else {
                metrics
                    .kube_proxy
                    .sync_duration
                    .observe(elapsed.as_secs_f64());
            }
            metrics
                .services_programmed
                .set(translation.desired.frontends.len() as i64);
            metrics.endpoints_programmed.set(
                translation
                    .desired
                    .frontends
                    .values()
                    .map(|f| f.backends.len() as i64)
                    .sum(),
            );
            info!(
                frontends = translation.desired.frontends.len(),
                written = report.frontends_written,
                removed = report.frontends_removed,
                backends_written = report.backends_written,
                backends_removed = report.backends_removed,
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                assemble_ms = assembled.as_secs_f64() * 1e3,
                translate_ms = (translated - assembled).as_secs_f64() * 1e3,
                "synced"
            );
            if let (Some(socket_lb), Some(before)) = (&config.socket_lb, &last_desired) {
                let departed = sockets::departed_udp_backends(before, &translation.desired);
                match sockets::close_departed(
                    &departed,
                    &mut syncer.maps_mut().sock_nat,
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
            if report.errors.is_empty() {
                retry_at = None;
                last_desired = Some(translation.desired);
            } else {
                retry_at = Some(Instant::now() + RETRY);
                last_desired = None;
            }
        }
        last_sync = Some(Instant::now());
        for latency in trigger_times.programmed(&state, std::time::SystemTime::now()) {
            metrics.kube_proxy.network_programming.observe(latency);
        }
        if let Some(t) = pending_since.take() {
            metrics
                .network_programming
                .observe(t.elapsed().as_secs_f64());
        }
        if retry_at.is_none() {
            health.updated();
        }
        let maps = syncer.maps_mut();
        for (index, value) in [
            (stat::AGENT_MAP_FULL, counters.map_full),
            (stat::AGENT_INVALID_OBJECTS, counters.invalid_objects),
            (stat::AGENT_BAD_FILES, counters.bad_files),
        ] {
            if let Err(e) = maps.set_agent_stat(index, value) {
                warn!(error = %e, "updating agent counters failed");
            }
        }
    }
    info!("stopping; maps and links stay pinned, traffic keeps flowing");
    Ok(())
}
