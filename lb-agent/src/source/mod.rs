//! Where the cluster comes from. Every source yields the same
//! `model::ClusterState`.

pub mod endpoints;
pub mod kube;
pub mod manifests;
pub mod watch;
