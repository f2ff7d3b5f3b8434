//! `cargo xtask setup | test | demo | perf`: one-command set-up, the test suite, and the demo.

mod build;
mod chart;
mod contenders;
mod demo;
mod netbench;
mod perf;
mod perf_e2e;
mod setup;
mod soak;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "lb's development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what a fresh Debian machine lacks to build and test lb.
    Setup,
    /// A live ClusterIP demo in throw-away namespaces (needs root).
    Demo,
    /// Benchmarks; writes report.md and report.json (needs root).
    Perf {
        /// Service counts to measure (10 endpoints each).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        services: Vec<u32>,
        /// Endpoint changes timed per Service count.
        #[arg(long, default_value_t = 100)]
        changes: usize,
        /// A short run (100 and 1000 Services, 20 changes).
        #[arg(long)]
        quick: bool,
        /// Only the control plane (no per-packet bench, no end-to-end
        /// contenders); prints the numbers, writes no report.
        #[arg(long)]
        control_plane_only: bool,
        #[arg(long, default_value = "target/perf")]
        out: std::path::PathBuf,
    },
    /// Load and churn: Services x 10 endpoints, endpoint changes per second,
    /// a client connecting continuously; writes target/soak/report.md (needs root).
    Soak {
        #[arg(long, default_value_t = 60)]
        duration: u64,
        #[arg(long, default_value_t = 10_000)]
        services: u32,
        #[arg(long, default_value_t = 100)]
        changes_per_second: u32,
    },
    /// perf's in-namespace TCP server: accepts and closes; prints "ready".
    #[command(hide = true)]
    NetServer {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// perf's connect() latency probe, alternating between targets; JSON out.
    #[command(hide = true)]
    NetLatency {
        #[arg(long, value_delimiter = ',')]
        targets: Vec<std::net::SocketAddr>,
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        #[arg(long, default_value_t = 100)]
        per_round: usize,
    },
    /// perf's connections-per-second load; JSON out.
    #[command(hide = true)]
    NetRate {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Run setup, then the whole test suite (privileged tests need root).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Demo => demo::run(),
        Command::Soak {
            duration,
            services,
            changes_per_second,
        } => soak::run(duration, services, changes_per_second),
        Command::Perf {
            services,
            changes,
            quick,
            control_plane_only,
            out,
        } => {
            let (services, changes) = if quick {
                (vec![100, 1000], 20)
            } else {
                (services, changes)
            };
            perf::run(perf::PerfArgs {
                quick,
                control_plane_only,
                services,
                changes,
                out,
            })
        }
        Command::Test { no_lint, test_args } => test::run(!no_lint, &test_args),
        Command::NetServer { port, threads } => netbench::server(port, threads),
        Command::NetLatency {
            targets,
            rounds,
            per_round,
        } => netbench::latency(&targets, rounds, per_round),
        Command::NetRate {
            target,
            seconds,
            threads,
        } => netbench::rate(target, std::time::Duration::from_secs_f64(seconds), threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            match err.downcast_ref::<setup::NeedsManualSetup>() {
                Some(_) => ExitCode::from(2),
                None => ExitCode::FAILURE,
            }
        }
    }
}
