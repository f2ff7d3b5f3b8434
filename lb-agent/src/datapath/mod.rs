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

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads, so
/// the agent can compare and write conntrack timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
