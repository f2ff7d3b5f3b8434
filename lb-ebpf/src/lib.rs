//! Empty on purpose: the programs are the `lb` binary (main.rs). This library
//! target only lets lb-agent declare a build-dependency on lb-ebpf, so cargo
//! rebuilds the agent when the kernel programs change.
#![no_std]
