//! Real BPF maps for sync tests: a private bpffs and the agent's maps
//! created (and pinned) there.

use std::{path::PathBuf, process::Command};

use aya::EbpfLoader;
use lb_agent::datapath::maps::Maps;
use lb_common::map_names;

/// A private bpffs mount, unmounted on drop.
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    pub fn new(tag: &str) -> Self {
        crate::require_root();
        let dir = std::env::temp_dir().join(format!("lbt{}{tag}-bpffs", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mount bpffs at {}", dir.display());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The object's maps pinned under `bpffs`, with room for `capacity`
/// frontends and `capacity` backend slots.
pub fn load(bpffs: &Bpffs, capacity: u32) -> Maps {
    load_with(bpffs, capacity, lb_common::map_sizes::BACKENDS)
}

/// `load` with room for `backends` backends.
pub fn load_with(bpffs: &Bpffs, capacity: u32, backends: u32) -> Maps {
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(map_names::SERVICES, capacity)
        .map_max_entries(map_names::BACKEND_SLOTS, capacity)
        .map_max_entries(map_names::SET_MEMBERS, capacity)
        .map_max_entries(map_names::ALLOCATED, capacity)
        .map_max_entries(map_names::BACKENDS, backends);
    let paths: Vec<(&str, PathBuf)> = map_names::ALL
        .iter()
        .map(|n| (*n, bpffs.0.join(n)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(lb_agent::EBPF_OBJECT).expect("load object");
    Maps::take(&mut ebpf).expect("maps")
}
