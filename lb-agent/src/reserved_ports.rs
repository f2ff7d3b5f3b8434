//! The NodePort range in `net.ipv4.ip_local_reserved_ports` of the node's
//! network namespace, as Cilium does: the kernel then never hands a host
//! socket an ephemeral port inside it, so no connection of the node's own
//! collides with a NodePort frontend (which would capture its replies).
//! What was reserved before is kept, and the entry is left on exit.

use std::{fmt, fs, str::FromStr};

/// Where the sysctl is: the node's /proc/sys, or the host's mounted at
/// /host/proc when the container's /proc/sys is read-only.
const SYSCTL_PATHS: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_local_reserved_ports",
    "/host/proc/sys/net/ipv4/ip_local_reserved_ports",
];

/// An inclusive port range, written like kube-apiserver's
/// `--service-node-port-range` (`30000-32767`, or one port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    /// kube-apiserver's default.
    pub const NODEPORT_DEFAULT: PortRange = PortRange {
        lo: 30000,
        hi: 32767,
    };
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
        };
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("{lo} is above {hi}"));
        }
        Ok(PortRange { lo, hi })
    }
}

/// The reserved-ports list with `range` added, merged and sorted, or None
/// when `existing` already covers it. `existing` is the sysctl's text
/// (`8080,30000-32767`, empty when nothing is reserved).
pub fn with_range(existing: &str, range: PortRange) -> Result<Option<String>, String> {
    let mut ranges: Vec<PortRange> = existing
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            r.parse::<PortRange>()
                .map_err(|e| format!("reserved ports {existing:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if ranges.iter().any(|r| r.lo <= range.lo && range.hi <= r.hi) {
        return Ok(None);
    }
    ranges.push(range);
    ranges.sort();
    let mut merged: Vec<PortRange> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => last.hi = last.hi.max(r.hi),
            _ => merged.push(r),
        }
    }
    Ok(Some(
        merged
            .iter()
            .map(PortRange::to_string)
            .collect::<Vec<_>>()
            .join(","),
    ))
}

/// `existing` without `range` (what `with_range` added), or None when
/// nothing of it is there.
pub fn without_range(existing: &str, range: PortRange) -> Result<Option<String>, String> {
    let ranges: Vec<PortRange> = existing
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            r.parse::<PortRange>()
                .map_err(|e| format!("reserved ports {existing:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if !ranges.iter().any(|r| r.lo <= range.hi && range.lo <= r.hi) {
        return Ok(None);
    }
    let mut left = Vec::new();
    for r in ranges {
        if r.hi < range.lo || range.hi < r.lo {
            left.push(r);
            continue;
        }
        if r.lo < range.lo {
            left.push(PortRange {
                lo: r.lo,
                hi: range.lo - 1,
            });
        }
        if range.hi < r.hi {
            left.push(PortRange {
                lo: range.hi + 1,
                hi: r.hi,
            });
        }
    }
    Ok(Some(
        left.iter()
            .map(PortRange::to_string)
            .collect::<Vec<_>>()
            .join(","),
    ))
}

/// The marker (a directory under the bpffs) saying lb added `range`, so
/// `uninstall` takes back only what lb added.
pub fn marker(bpffs: &std::path::Path, range: PortRange) -> std::path::PathBuf {
    bpffs.join(format!("reserved-ports-{}-{}", range.lo, range.hi))
}

/// The ranges lb's markers under `bpffs` say it added.
pub fn marked(bpffs: &std::path::Path) -> Vec<PortRange> {
    let Ok(entries) = fs::read_dir(bpffs) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            name.to_str()?
                .strip_prefix("reserved-ports-")?
                .parse::<PortRange>()
                .ok()
        })
        .collect()
}

/// Take `range` out of the node's reserved ports (uninstall).
pub fn release(range: PortRange) -> Result<Option<String>, String> {
    let mut errors = Vec::new();
    for path in SYSCTL_PATHS {
        let existing = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                errors.push(format!("{path}: {e}"));
                continue;
            }
        };
        let Some(list) = without_range(&existing, range)? else {
            return Ok(None);
        };
        match fs::write(path, if list.is_empty() { "\n" } else { &list }) {
            Ok(()) => return Ok(Some(list)),
            Err(e) => errors.push(format!("{path}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// Add `range` to the node's reserved ports. Ok(Some(list)): written;
/// Ok(None): already reserved.
pub fn reserve(range: PortRange) -> Result<Option<String>, String> {
    let mut errors = Vec::new();
    for path in SYSCTL_PATHS {
        let existing = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                errors.push(format!("{path}: {e}"));
                continue;
            }
        };
        let Some(list) = with_range(&existing, range)? else {
            return Ok(None);
        };
        match fs::write(path, &list) {
            Ok(()) => return Ok(Some(list)),
            Err(e) => errors.push(format!("{path}: {e}")),
        }
    }
    Err(errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_like_kube_apiservers() {
        assert_eq!(
            "30000-32767".parse::<PortRange>(),
            Ok(PortRange::NODEPORT_DEFAULT)
        );
        assert_eq!(
            "8080".parse::<PortRange>(),
            Ok(PortRange { lo: 8080, hi: 8080 })
        );
        for bad in ["", "0-10", "32767-30000", "30000-70000", "a-b", "1-2-3"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_range_joins_what_was_reserved() {
        let np = PortRange::NODEPORT_DEFAULT;
        let cases = [
            ("", Some("30000-32767")),
            ("\n", Some("30000-32767")),
            ("8080\n", Some("8080,30000-32767")),
            ("30000-32767\n", None),
            ("29000-33000", None),
            ("40000,8080", Some("8080,30000-32767,40000")),
            // Touching and overlapping ranges merge.
            ("29000-30000,32768", Some("29000-32768")),
            ("31000-31100", Some("30000-32767")),
        ];
        for (existing, want) in cases {
            assert_eq!(
                with_range(existing, np).unwrap().as_deref(),
                want,
                "{existing:?}"
            );
        }
        assert!(with_range("x", np).is_err());
    }

    #[test]
    fn taking_the_range_back_leaves_the_rest() {
        let np = PortRange::NODEPORT_DEFAULT;
        let cases = [
            ("8080,30000-32767", Some("8080")),
            ("30000-32767\n", Some("")),
            ("8080", None),
            ("29000-32768", Some("29000-29999,32768")),
        ];
        for (existing, want) in cases {
            assert_eq!(
                without_range(existing, np).unwrap().as_deref(),
                want,
                "{existing:?}"
            );
        }
        // What with_range adds, without_range takes back.
        let added = with_range("8080,40000", np).unwrap().unwrap();
        assert_eq!(
            without_range(&added, np).unwrap().as_deref(),
            Some("8080,40000")
        );
    }
}
