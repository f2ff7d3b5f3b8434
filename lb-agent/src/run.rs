//! `lb-agent run`: the loop that moves data one way, source -> ClusterState
//! -> translate -> DesiredState -> sync -> maps, and keeps the program
//! attached to pod devices as they come and go.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_common::{ConfigValue, stat};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::RunConfig,
    datapath::{loader::Datapath, sync::Syncer},
    model::{DesiredState, Problem, translate},
    source::{manifests::ManifestDir, watch::DirWatch},
};

/// How often the directory (besides inotify) and the device list are looked at.
const POLL: Duration = Duration::from_millis(200);
const RETRY: Duration = Duration::from_secs(5);

/// Agent-side counters mirrored into LB_STATS for `dump stats`.
#[derive(Default)]
struct AgentCounters {
    map_full: u64,
    invalid_objects: u64,
    bad_files: u64,
}

pub async fn run(config: RunConfig) -> Result<()> {
    let node_config = ConfigValue {
        hairpin_snat_addr_be: u32::from_ne_bytes(config.node.hairpin_snat_addr.octets()),
        ..Default::default()
    };
    let (mut datapath, maps) = Datapath::load(&config.bpffs, node_config)
        .with_context(|| format!("loading the datapath under {}", config.bpffs.display()))?;
    let mut syncer = Syncer::new(maps).context("reading the pinned maps")?;
    let mut counters = AgentCounters::default();
    if let Ok(stats) = syncer.maps().read_stats() {
        // Continue the agent counters across restarts.
        counters.map_full = stats[stat::AGENT_MAP_FULL as usize];
        counters.invalid_objects = stats[stat::AGENT_INVALID_OBJECTS as usize];
        counters.bad_files = stats[stat::AGENT_BAD_FILES as usize];
    }
    info!(
        manifests = %config.manifests.display(),
        node = %config.node.node_name,
        bpffs = %config.bpffs.display(),
        pod_devices = ?config.pod_devices,
        "lb-agent running"
    );

    let mut source = ManifestDir::new(&config.manifests);
    let watch = match DirWatch::new(&config.manifests) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "inotify unavailable; polling the manifests directory only");
            None
        }
    };
    let mut reported: BTreeSet<Problem> = BTreeSet::new();
    let mut last_desired: Option<DesiredState> = None;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut tick = tokio::time::interval(POLL);
    let mut first = true;
    // A sync that failed partly (a full map) is retried on this schedule.
    let mut retry_at: Option<Instant> = None;

    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(result) = async { Some(watch.as_ref()?.changed().await) } => {
                if let Err(e) = result {
                    warn!(error = %e, "inotify read failed; relying on polling");
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        datapath.attach_matching(&config.pod_devices);

        let poll = match source.poll() {
            Ok(p) => p,
            Err(e) => {
                // The last programmed state stays in force.
                if first {
                    return Err(e).context("reading the manifests directory");
                }
                warn!(error = %e, "manifests directory unreadable; keeping the programmed state");
                continue;
            }
        };
        for err in &poll.new_errors {
            counters.bad_files += 1;
            error!(file = %err.path.display(), reason = %err.reason, "manifest file rejected; its last good content stays in force");
        }
        let retry_due = retry_at.is_some_and(|t| Instant::now() >= t);
        if !poll.changed && !first && !retry_due {
            continue;
        }
        first = false;
        let started = Instant::now();
        let (state, mut problems) = source.cluster_state();
        let assembled = started.elapsed();
        let translation = translate(&state, &config.node);
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

        if last_desired.as_ref() != Some(&translation.desired) {
            let report = syncer.sync(&translation.desired);
            for e in &report.errors {
                if e.full {
                    counters.map_full += 1;
                }
                error!(object = %e.object, reason = %e.reason, "could not program");
            }
            info!(
                frontends = translation.desired.frontends.len(),
                written = report.frontends_written,
                removed = report.frontends_removed,
                backends_written = report.backends_written,
                backends_removed = report.backends_removed,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                assemble_ms = assembled.as_secs_f64() * 1e3,
                translate_ms = (translated - assembled).as_secs_f64() * 1e3,
                "synced"
            );
            if report.errors.is_empty() {
                retry_at = None;
                last_desired = Some(translation.desired);
            } else {
                retry_at = Some(Instant::now() + RETRY);
                last_desired = None;
            }
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
