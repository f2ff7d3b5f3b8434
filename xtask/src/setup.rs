//! Idempotent machine set-up: one line per step, installing only what is missing.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Debian packages the build and the test suite use.
pub const APT_PACKAGES: &[&str] = &[
    // bpf-linker links the kernel programs against LLVM 22.
    "llvm-22-dev",
    // End-to-end tests: namespaces, veth, addresses, checksum offload, clients.
    "iproute2",
    "ethtool",
    "curl",
    "python3",
    "procps",
    // Pings to Service addresses.
    "iputils-ping",
    // `cargo xtask perf` measures kube-proxy's rule shapes with these.
    "iptables",
    "nftables",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";

/// Setup could not run here (not root, not Debian): the user must act.
#[derive(Debug)]
pub struct NeedsManualSetup;

impl std::fmt::Display for NeedsManualSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("setup needs root on Debian; run the commands above, then retry")
    }
}

impl std::error::Error for NeedsManualSetup {}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists()
}

fn step(name: &str, outcome: &str) {
    println!("setup: {name:<28} {outcome}");
}

/// Run a command quietly; its output is shown only when it fails.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_missing() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect()
}

fn nightly_installed() -> bool {
    output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|list| list.lines().any(|l| l.starts_with("nightly")))
}

/// Nightly components: rust-src for `-Z build-std=core`, clippy to lint the
/// kernel programs for the BPF target.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

fn nightly_components_missing() -> Vec<&'static str> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    NIGHTLY_COMPONENTS
        .iter()
        .copied()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect()
}

fn bpf_linker_ok() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(&format!("bpf-linker {BPF_LINKER_VERSION}")))
}

fn bpf_linker_install_cmd() -> String {
    format!(
        "LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version '~{BPF_LINKER_VERSION}' \
         --locked --no-default-features --features llvm-22"
    )
}

/// What is missing, as the exact commands that would install it.
fn missing_commands() -> Vec<String> {
    let mut cmds = Vec::new();
    let apt = apt_missing();
    if !apt.is_empty() {
        cmds.push("apt-get update".to_string());
        cmds.push(format!(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
            apt.join(" ")
        ));
    }
    if !nightly_installed() {
        cmds.push("rustup toolchain install nightly --profile minimal".into());
    }
    let components = nightly_components_missing();
    if !components.is_empty() {
        cmds.push(format!(
            "rustup component add {} --toolchain nightly",
            components.join(" ")
        ));
    }
    if !bpf_linker_ok() {
        cmds.push(bpf_linker_install_cmd());
    }
    cmds
}

pub fn run() -> Result<()> {
    if !is_root() || !is_debian() {
        let missing = missing_commands();
        if missing.is_empty() {
            step("toolchain and test tools", "present");
            return Ok(());
        }
        let why = if is_debian() {
            "not root"
        } else {
            "not Debian"
        };
        eprintln!("setup: cannot install here ({why}); run these as root on Debian:");
        for cmd in &missing {
            eprintln!("    {cmd}");
        }
        return Err(NeedsManualSetup.into());
    }

    let apt = apt_missing();
    if apt.is_empty() {
        step("apt packages", "present");
    } else {
        step("apt-get update", "running");
        run_quiet(Command::new("apt-get").arg("update"))?;
        step("apt packages", &format!("installing {}", apt.join(" ")));
        run_quiet(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&apt)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    if nightly_installed() {
        step("rust nightly", "present");
    } else {
        step("rust nightly", "installing (builds the eBPF programs)");
        run_quiet(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }

    let components = nightly_components_missing();
    if components.is_empty() {
        step("nightly rust-src, clippy", "present");
    } else {
        step(
            "nightly components",
            &format!("installing {}", components.join(" ")),
        );
        run_quiet(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", "nightly"])
                .args(&components),
        )?;
    }

    if bpf_linker_ok() {
        step("bpf-linker", "present");
    } else {
        step("bpf-linker", "installing against LLVM 22 (about a minute)");
        run_quiet(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    &format!("~{BPF_LINKER_VERSION}"),
                ])
                .args(["--locked", "--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }
    Ok(())
}
