//! Building the workspace's binaries for the tasks that run them (demo,
//! perf, soak, test).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The cargo that runs us, with `args`.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args);
    cmd
}

/// Build `bin` of `package` and return the path of the binary.
pub fn binary(package: &str, bin: &str, release: bool) -> Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = cargo(&["build", "--quiet", "-p", package, "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .current_dir(&root)
        .status()
        .with_context(|| format!("building {bin}"))?;
    if !status.success() {
        bail!("building {bin} failed");
    }
    Ok(root
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join(bin))
}
