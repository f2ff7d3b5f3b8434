//! `lb-agent uninstall`: the node as it was before lb, so kube-proxy can be
//! put back. Every link pin goes (a pinned link whose pin is removed, and
//! that no process holds, detaches: tc, XDP and the socket-level cgroup
//! programs), the NodePort range lb added to the reserved ports is taken
//! back, then the map pins go. Only lb's own pins are touched, whatever
//! directory `--bpffs` names.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use lb_common::map_names;

use crate::{config::UninstallArgs, reserved_ports};

/// Remove lb's pins under `dir/links` (and its `cgroup` subdirectory).
fn remove_links(dir: &Path, done: &mut Vec<String>) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            remove_links(&path, done)?;
            fs::remove_dir(&path).with_context(|| format!("removing {}", path.display()))?;
        } else {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            done.push(format!("detached {}", path.display()));
        }
    }
    Ok(())
}

/// What was done, one line per step.
pub fn uninstall(bpffs: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if !bpffs.exists() {
        return Ok(done);
    }
    let links = bpffs.join("links");
    remove_links(&links, &mut done)?;
    if links.exists() {
        fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for range in reserved_ports::marked(bpffs) {
        match reserved_ports::release(range) {
            Ok(Some(list)) => done.push(format!(
                "NodePort range {range} taken out of net.ipv4.ip_local_reserved_ports (now {list:?})"
            )),
            Ok(None) => {}
            Err(e) => anyhow::bail!("taking {range} out of the reserved ports: {e}"),
        }
        let marker = reserved_ports::marker(bpffs, range);
        fs::remove_dir(&marker).with_context(|| format!("removing {}", marker.display()))?;
    }
    for name in map_names::ALL.iter().chain(map_names::RETIRED.iter()) {
        let path = bpffs.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            done.push(format!("removed map {name}"));
        }
    }
    // The maps an unfinished upgrade hand-over set aside.
    let previous = bpffs.join(crate::datapath::migrate::PREVIOUS_DIR);
    if previous.exists() {
        crate::datapath::migrate::remove_previous(bpffs);
        done.push(format!("removed {}", previous.display()));
    }
    // Left in place if anything that is not lb's is in it.
    if fs::remove_dir(bpffs).is_ok() {
        done.push(format!("removed {}", bpffs.display()));
    }
    Ok(done)
}

pub fn run(args: &UninstallArgs) -> Result<()> {
    let done = uninstall(&args.bpffs)?;
    if done.is_empty() {
        println!("nothing of lb under {}", args.bpffs.display());
    }
    for line in done {
        println!("{line}");
    }
    Ok(())
}
