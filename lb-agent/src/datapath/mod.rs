//! The only module that touches BPF: loading and attaching (`loader`),
//! typed maps (`maps`), keeping them equal to the desired state (`sync`), and
//! closing UDP sockets whose socket-level backend went away (`sockets`),
//! and removing conntrack and affinity entries that no longer hold
//! (`cleanup`), carrying flows over when maps are replaced (`migrate`).

pub mod cleanup;
pub mod explain;
pub mod link_events;
pub mod loader;
pub mod maps;
pub mod migrate;
pub mod sockets;
pub mod sync;
