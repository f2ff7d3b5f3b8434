//! Command line of `lb-agent`, optionally layered over a config file
//! (`--config FILE`, YAML with the same keys as the long flags).

use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use thiserror::Error;

use crate::model::{NodeConfig, cluster::DEFAULT_HAIRPIN_SNAT_ADDR};

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";
pub const DEFAULT_POD_DEVICES: &str = "veth*,lxc*,cali*";

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF Service load balancer: kube-proxy replacement node agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Watch Services and endpoints and keep the datapath programmed.
    Run(RunArgs),
    /// Show what the datapath holds, read from the pinned maps.
    Dump(DumpArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Read Service, EndpointSlice, Endpoints, Pod and Node objects from this
    /// directory (*.yaml, *.yml, *.json) instead of a cluster.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// This node's name (endpoints with this nodeName are local). Default: $NODE_NAME, then the hostname.
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Host-side pod devices to attach to, as globs. Default: veth*,lxc*,cali*
    #[arg(long, value_name = "GLOB[,GLOB]", value_delimiter = ',')]
    pub pod_devices: Option<Vec<String>>,
    /// Where maps and links are pinned. Default: /sys/fs/bpf/lb
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// Source address for hairpin flows. Default: 169.254.42.1
    #[arg(long, value_name = "ADDR")]
    pub hairpin_snat_address: Option<Ipv4Addr>,
    /// Agent settings as YAML; flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format. RUST_LOG filters (default info).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    #[arg(value_enum)]
    pub what: DumpWhat,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DumpWhat {
    Services,
    Backends,
    Conntrack,
    Affinity,
    Stats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// The config file: the long flags' names as keys.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    pub manifests: Option<PathBuf>,
    pub node_name: Option<String>,
    pub pod_devices: Option<Vec<String>>,
    pub bpffs: Option<PathBuf>,
    pub hairpin_snat_address: Option<Ipv4Addr>,
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(
        "no --manifests DIR given: the Kubernetes API source is not part of this build yet; \
         point the agent at a directory of manifests"
    )]
    NoSource,
    #[error("--pod-devices: empty pattern")]
    EmptyGlob,
}

/// Everything `run` needs, resolved from flags, file and environment.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub manifests: PathBuf,
    pub node: NodeConfig,
    pub pod_devices: Vec<String>,
    pub bpffs: PathBuf,
    pub log_format: LogFormat,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

impl RunArgs {
    pub fn resolve(self) -> Result<RunConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                serde_saphyr::from_str::<FileConfig>(&text).map_err(|e| ConfigError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        let manifests = self
            .manifests
            .or(file.manifests)
            .ok_or(ConfigError::NoSource)?;
        let node_name = self
            .node_name
            .or(file.node_name)
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(hostname);
        let pod_devices = self
            .pod_devices
            .or(file.pod_devices)
            .unwrap_or_else(|| DEFAULT_POD_DEVICES.split(',').map(String::from).collect());
        if pod_devices.iter().any(|g| g.is_empty()) {
            return Err(ConfigError::EmptyGlob);
        }
        Ok(RunConfig {
            manifests,
            node: NodeConfig {
                node_name,
                hairpin_snat_addr: self
                    .hairpin_snat_address
                    .or(file.hairpin_snat_address)
                    .unwrap_or(DEFAULT_HAIRPIN_SNAT_ADDR),
            },
            pod_devices,
            bpffs: self
                .bpffs
                .or(file.bpffs)
                .unwrap_or_else(|| DEFAULT_BPFFS.into()),
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_defaults_fill_the_rest() {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.yaml");
        std::fs::write(
            &file,
            "node-name: from-file\nbpffs: /sys/fs/bpf/x\nmanifests: /m\n",
        )
        .unwrap();
        let args = RunArgs {
            node_name: Some("from-flag".into()),
            config: Some(file),
            ..Default::default()
        };
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.node.node_name, "from-flag");
        assert_eq!(cfg.bpffs, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(cfg.manifests, PathBuf::from("/m"));
        assert_eq!(cfg.pod_devices, vec!["veth*", "lxc*", "cali*"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_config_key_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("lb-config-test2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.yaml");
        std::fs::write(&file, "nodename: typo\n").unwrap();
        let err = RunArgs {
            config: Some(file.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_source_is_a_usage_error() {
        assert!(matches!(
            RunArgs::default().resolve(),
            Err(ConfigError::NoSource)
        ));
    }
}
