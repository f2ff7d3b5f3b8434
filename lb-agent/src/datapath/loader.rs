//! Load the kernel programs, pin maps and links under --bpffs so traffic
//! keeps flowing while the agent is down, and attach the tc program to every
//! pod device, now and as devices appear.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs,
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use lb_common::{ConfigValue, LAYOUT_VERSION, map_names, program_names};
use thiserror::Error;
use tracing::{info, warn};

use super::maps::{Capacities, ConfigMap, MapShape, Maps, MapsError, check_pin, shapes_with};

/// statfs f_type of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error(
        "the pinned maps under {path} hold layout version {found}, this agent writes {expected}: \
         remove the pins or run the matching agent"
    )]
    LayoutVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("writing {what}: {source}")]
    Map {
        what: &'static str,
        source: aya::maps::MapError,
    },
}

/// Attached devices, by ifindex.
struct Attached {
    name: String,
}

pub struct Datapath {
    ebpf: Ebpf,
    bpffs: PathBuf,
    attached: BTreeMap<u32, Attached>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_bpffs(path: &Path) -> Result<(), LoadError> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| LoadError::Io {
            path: path.into(),
            source: std::io::Error::other(e),
        })?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(LoadError::Io {
            path: path.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(LoadError::NotBpffs { path: path.into() });
    }
    Ok(())
}

/// Interfaces of the current network namespace: (ifindex, name).
pub fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Shell-style glob with `*` and `?`, as --pod-devices uses.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Pinned maps written with another layout are never read as ours: a map
/// whose shape differs, or every map when LB_CONFIG records another layout
/// version, is unpinned (with a log line saying so) and created afresh.
/// Programs still attached keep their old maps until their links get the
/// new program, so traffic flows throughout; tracked flows and affinity are
/// lost and re-balanced.
fn replace_stale_pins(bpffs: &Path, shapes: &[MapShape]) -> Result<(), LoadError> {
    let unpin = |path: &Path| fs::remove_file(path).map_err(io_err(path));
    let config_path = bpffs.join(map_names::CONFIG);
    if config_path.exists()
        && let Some(config_shape) = shapes.iter().find(|s| s.name == map_names::CONFIG)
        && check_pin(&config_path, config_shape).is_ok()
    {
        let version = MapData::from_pin(&config_path)
            .ok()
            .and_then(|data| ConfigMap::try_from(Map::Array(data)).ok())
            .and_then(|config| config.get(&0, 0).ok())
            .map_or(0, |c| c.layout_version);
        if version != 0 && version != LAYOUT_VERSION {
            warn!(
                found = version,
                expected = LAYOUT_VERSION,
                bpffs = %bpffs.display(),
                "pinned maps have another layout version: replacing all of them; tracked flows will be re-balanced"
            );
            for shape in shapes {
                let path = bpffs.join(shape.name);
                if path.exists() {
                    unpin(&path)?;
                }
            }
            return Ok(());
        }
    }
    for shape in shapes {
        let path = bpffs.join(shape.name);
        if !path.exists() {
            continue;
        }
        match check_pin(&path, shape) {
            Ok(()) => {}
            Err(MapsError::Incompatible {
                found, expected, ..
            }) => {
                warn!(
                    map = shape.name,
                    found = %found,
                    expected = %expected,
                    "pinned map has another layout: replacing it; its entries are not carried over"
                );
                unpin(&path)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

impl Datapath {
    /// Load the programs with maps pinned under `bpffs` (adopting existing
    /// pins after checking their shape), and write the node config.
    pub fn load(bpffs: &Path, config: ConfigValue) -> Result<(Self, Maps), LoadError> {
        Self::load_sized(bpffs, config, Capacities::default())
    }

    /// `load` with the service and backend maps sized as given (a pinned map
    /// of another size is replaced, which drops its entries).
    pub fn load_sized(
        bpffs: &Path,
        config: ConfigValue,
        capacities: Capacities,
    ) -> Result<(Self, Maps), LoadError> {
        fs::create_dir_all(bpffs).map_err(io_err(bpffs))?;
        check_bpffs(bpffs)?;
        let links_dir = bpffs.join("links");
        fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
        // The maps hold every flow of the node: root only.
        use std::os::unix::fs::PermissionsExt as _;
        for dir in [bpffs, links_dir.as_path()] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        }

        let shapes = shapes_with(capacities);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::SERVICES, capacities.services)
            .map_max_entries(map_names::BACKENDS, capacities.backends);
        let paths: Vec<(&'static str, PathBuf)> = shapes
            .iter()
            .map(|s| (s.name, bpffs.join(s.name)))
            .collect();
        replace_stale_pins(bpffs, &shapes)?;
        for (name, path) in &paths {
            if path.exists() {
                info!(map = name, path = %path.display(), "adopting pinned map");
            }
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(program_names::TC_INGRESS)
            .ok_or(LoadError::Program {
                name: program_names::TC_INGRESS,
                source: ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| LoadError::Program {
                name: program_names::TC_INGRESS,
                source,
            })?;
        tc.load().map_err(|source| LoadError::Program {
            name: program_names::TC_INGRESS,
            source,
        })?;

        let mut maps = Maps::take(&mut ebpf)?;
        let config = ConfigValue {
            layout_version: LAYOUT_VERSION,
            ..config
        };
        maps.config
            .set(0, config, 0)
            .map_err(|source| LoadError::Map {
                what: "config",
                source,
            })?;
        Ok((
            Datapath {
                ebpf,
                bpffs: bpffs.into(),
                attached: BTreeMap::new(),
            },
            maps,
        ))
    }

    fn link_pin(&self, ifindex: u32, name: &str) -> PathBuf {
        self.bpffs
            .join("links")
            .join(format!("tc-{ifindex}-{name}"))
    }

    /// Attach to every device matching `globs` that is not attached yet, and
    /// forget devices that went away. Returns the devices newly attached.
    pub fn attach_matching(&mut self, globs: &[String]) -> Vec<String> {
        let current = interfaces();
        let live: BTreeMap<u32, &str> = current.iter().map(|(i, n)| (*i, n.as_str())).collect();
        self.attached
            .retain(|i, a| live.get(i) == Some(&a.name.as_str()));
        self.prune_stale_link_pins(&live);

        let mut newly = Vec::new();
        for (ifindex, name) in &current {
            if self.attached.contains_key(ifindex) || !globs.iter().any(|g| glob_match(g, name)) {
                continue;
            }
            match self.attach_one(*ifindex, name) {
                Ok(how) => {
                    info!(device = %name, ifindex, how, "tc program attached");
                    self.attached
                        .insert(*ifindex, Attached { name: name.clone() });
                    newly.push(name.clone());
                }
                Err(e) => {
                    warn!(device = %name, error = %e, "attaching tc program failed; will retry")
                }
            }
        }
        newly
    }

    fn attach_one(&mut self, ifindex: u32, name: &str) -> Result<&'static str, LoadError> {
        let pin = self.link_pin(ifindex, name);
        let prog_err = |source| LoadError::Program {
            name: program_names::TC_INGRESS,
            source,
        };
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(program_names::TC_INGRESS)
            .ok_or(prog_err(ProgramError::NotLoaded))?
            .try_into()
            .map_err(prog_err)?;
        if pin.exists() {
            // A link from an earlier agent: swap its program atomically, so
            // the device is never without one.
            let adopted = PinnedLink::from_pin(&pin)
                .map_err(|e| prog_err(ProgramError::IOError(std::io::Error::other(e))))
                .map(FdLink::from)
                .and_then(|fd| {
                    SchedClassifierLink::try_from(fd)
                        .map_err(|e| prog_err(ProgramError::IOError(std::io::Error::other(e))))
                })
                .and_then(|link| tc.attach_to_link(link).map_err(prog_err));
            match adopted {
                Ok(_) => return Ok("replaced program of pinned link"),
                Err(e) => {
                    warn!(pin = %pin.display(), error = %e, "pinned link unusable; attaching anew");
                    let _ = fs::remove_file(&pin);
                }
            }
        }
        let id = tc
            .attach_with_options(
                name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(prog_err)?;
        let link = tc.take_link(id).map_err(prog_err)?;
        let fd = FdLink::try_from(link)
            .map_err(|e| prog_err(ProgramError::IOError(std::io::Error::other(e))))?;
        fd.pin(&pin).map_err(|e| LoadError::Io {
            path: pin.clone(),
            source: std::io::Error::other(e),
        })?;
        Ok("attached (TCX) and pinned")
    }

    /// Remove link pins of devices that no longer exist (their links are defunct).
    fn prune_stale_link_pins(&self, live: &BTreeMap<u32, &str>) {
        let dir = self.bpffs.join("links");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = file.strip_prefix("tc-") else {
                continue;
            };
            let Some((index, name)) = rest.split_once('-') else {
                continue;
            };
            let alive = index.parse::<u32>().ok().and_then(|i| live.get(&i)) == Some(&name);
            if !alive {
                info!(pin = %file, "removing link pin of a device that is gone");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    pub fn attached_devices(&self) -> Vec<String> {
        self.attached.values().map(|a| a.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        let cases = [
            ("veth*", "veth0", true),
            ("veth*", "veth", true),
            ("veth*", "eth0", false),
            ("lxc*", "lxc12ab", true),
            ("*", "anything", true),
            ("eth?", "eth0", true),
            ("eth?", "eth10", false),
            ("pfx-*-h", "pfx-3-h", true),
            ("pfx-*-h", "pfx-3-p", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(glob_match(pattern, name), want, "{pattern} vs {name}");
        }
    }
}
