//! Harness for lb's privileged tests.
//!
//! `packet` tables run the kernel programs through BPF_PROG_TEST_RUN: each case
//! sets up maps, feeds frames built with etherparse, and checks the verdict and
//! the frame that comes out field by field, verifying checksums with an
//! implementation of its own (not the program's).

pub mod apiserver;
pub mod changes;
pub mod e2e;
pub mod maps;
pub mod packet;
pub mod previous;

/// Privileged tests fail loudly without root instead of passing vacuously.
/// `cargo xtask test` runs them only as root and counts them otherwise.
pub fn require_root() {
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test loads BPF programs and needs root (CAP_BPF, CAP_NET_ADMIN); \
             run `cargo xtask test` as root, which CI does"
        );
    }
}
