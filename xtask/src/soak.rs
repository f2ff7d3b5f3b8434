//! `cargo xtask soak`: the long load-and-churn run with a written report.

use std::{fs, time::Duration};

use anyhow::{Result, anyhow, bail};
use lb_testnet::soak::{SoakParams, run as soak};

use crate::{build, setup};

pub fn run(duration_s: u64, services: u32, changes_per_second: u32) -> Result<()> {
    if !setup::is_root() {
        bail!("soak builds namespaces and loads BPF programs: run it as root");
    }
    setup::run()?;
    let root = build::workspace_root();
    let agent = build::binary("lb-agent", "lb-agent", true)?;
    let params = SoakParams {
        services,
        endpoints_per_service: 10,
        changes_per_second,
        duration: Duration::from_secs(duration_s),
        agent,
    };
    println!(
        "soak: {services} Services x 10 endpoints, {changes_per_second} changes/s for {duration_s} s ..."
    );
    let report = soak(&params).map_err(|e| anyhow!(e))?;
    let out = root.join("target/soak");
    fs::create_dir_all(&out)?;
    let md = report.markdown(&params);
    fs::write(out.join("report.md"), &md)?;
    print!("{md}");
    println!("soak: wrote {}", out.join("report.md").display());
    if report.connections_failed > 0 {
        bail!("{} connections failed", report.connections_failed);
    }
    Ok(())
}
