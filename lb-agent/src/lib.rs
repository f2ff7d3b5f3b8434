//! lb's node agent as a library: the CLI in main.rs and the integration
//! tests in `tests/` use the same modules.

/// The compiled kernel programs (lb-ebpf), embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
