//! lb's node agent as a library: the CLI in main.rs and the integration
//! tests in `tests/` use the same modules.
//!
//! Data flows one way: `source` -> `model::ClusterState` ->
//! `model::translate` -> `model::DesiredState` -> `datapath::sync` -> maps.

pub mod config;
pub mod datapath;
pub mod dump;
pub mod health;
pub mod healthcheck;
pub mod kernel_conntrack;
pub mod kube_proxy;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod reserved_ports;
pub mod run;
pub mod source;
pub mod uninstall;

/// The compiled kernel programs (lb-ebpf), embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
