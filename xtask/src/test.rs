//! `cargo xtask test`: setup, lints, then every test. The `lb-tests` package
//! holds the privileged tests (BPF loads, namespaces); they run only as root
//! and are counted loudly when they cannot.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{build::cargo, setup};

/// The package whose tests need root.
const PRIVILEGED_PACKAGE: &str = "lb-tests";

fn run_cmd(cmd: &mut Command) -> Result<()> {
    println!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn count_privileged_tests() -> Result<usize> {
    let out = cargo(&[
        "test",
        "-p",
        PRIVILEGED_PACKAGE,
        "--",
        "--list",
        "--format",
        "terse",
    ])
    .stderr(Stdio::inherit())
    .output()
    .context("list privileged tests")?;
    if !out.status.success() {
        bail!("listing the privileged tests failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count())
}

pub fn run_tests(lint: bool, test_args: &[String]) -> Result<()> {
    if lint {
        run_cmd(&mut cargo(&["fmt", "--all", "--check"]))?;
        run_cmd(&mut cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // The kernel programs only compile for BPF: lint them there too.
        run_cmd(Command::new("rustup").args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "lb-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    let extra: Vec<&str> = test_args.iter().map(String::as_str).collect();
    // The end-to-end tests run the real lb-agent binary.
    run_cmd(&mut cargo(&["build", "-p", "lb-agent", "--bins"]))?;
    if setup::is_root() {
        let mut cmd = cargo(&["test", "--workspace", "--exclude", "lb-ebpf", "--"]);
        cmd.args(&extra);
        run_cmd(&mut cmd)?;
        return Ok(());
    }
    let mut cmd = cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--exclude",
        PRIVILEGED_PACKAGE,
        "--",
    ]);
    cmd.args(&extra);
    run_cmd(&mut cmd)?;
    let skipped = count_privileged_tests()?;
    let bar = "!".repeat(72);
    eprintln!("{bar}");
    eprintln!("!! NOT ROOT: {skipped} privileged tests in `{PRIVILEGED_PACKAGE}` did NOT run.");
    eprintln!("!! They load BPF programs and build network namespaces. Run");
    eprintln!("!!     sudo -E cargo xtask test");
    eprintln!("!! (CI runs as root and runs them all.)");
    eprintln!("{bar}");
    Ok(())
}

pub fn run(lint: bool, test_args: &[String]) -> Result<()> {
    setup::run()?;
    run_tests(lint, test_args)
}
