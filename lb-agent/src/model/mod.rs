//! The pure middle of the agent: what the cluster declares (`ClusterState`),
//! kube-proxy's rules (`translate`), and what the datapath must hold
//! (`DesiredState`). Nothing here touches files, the API server or BPF.

pub mod cluster;
pub mod desired;
pub mod ids;
pub mod maglev;
pub mod records;
pub mod tracker;
pub mod translate;

pub use cluster::{ClusterState, NodeConfig, ObjectKey};
pub use desired::{
    AddressEntry, Backend, BackendSet, BackendSetKey, DesiredState, Frontend, FrontendKey,
    FrontendKind, HealthCheck, Protocol, Scope, Selection,
};
pub use records::{ServiceRecord, SliceRecord};
pub use tracker::{Change, ChangeTracker, Dirty};
pub use translate::{
    Claim, Delta, Owners, Problem, Translation, Translator, translate, translate_with,
};
