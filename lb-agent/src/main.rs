use std::process::ExitCode;

use clap::Parser;
use lb_agent::{
    config::{Cli, Command, LogFormat},
    dump, monitor, run, uninstall,
};
use tracing_subscriber::{EnvFilter, fmt};

/// Default filter: kube_client logs every retried request at ERROR; the
/// watcher errors that matter reach our own log with context.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_client=off"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let config = match (*args).resolve() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("lb-agent: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("lb-agent: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain(args) => match dump::explain(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-agent explain: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Uninstall(args) => match uninstall::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-agent uninstall: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Monitor(args) => match monitor::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-agent monitor: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Dump(args) => match dump::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-agent dump: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
