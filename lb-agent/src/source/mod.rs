//! Where the cluster comes from. Every source yields the same
//! `model::ClusterState`.

pub mod endpoints;
pub mod manifests;
pub mod watch;
