//! The only module that touches BPF: loading and attaching (`loader`),
//! typed maps (`maps`), and keeping them equal to the desired state (`sync`).

pub mod explain;
pub mod loader;
pub mod maps;
pub mod sync;
