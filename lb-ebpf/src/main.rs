//! lb's kernel programs. Entry points only; each calls the shared logic in
//! `lb.rs` through the `Packet` view of its context.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod ct;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod reject;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };

    use crate::{
        lb,
        packet::{TcPacket, XdpPacket},
    };

    /// tc ingress (TCX) on pod and node devices.
    #[classifier]
    pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
        try_tc_ingress(&ctx)
    }

    #[inline(always)]
    fn try_tc_ingress(ctx: &TcContext) -> i32 {
        lb::process(&mut TcPacket { ctx })
    }

    /// XDP on node devices: the same translation before the stack sees the packet.
    #[xdp]
    pub fn lb_xdp(ctx: XdpContext) -> u32 {
        try_xdp(&ctx)
    }

    #[inline(always)]
    fn try_xdp(ctx: &XdpContext) -> u32 {
        lb::process(&mut XdpPacket { ctx }) as u32
    }

    /// The floor for `cargo xtask perf`: a tc program that only passes.
    #[classifier]
    pub fn lb_noop_tc(_ctx: TcContext) -> i32 {
        aya_ebpf::bindings::TC_ACT_OK
    }

    /// The floor for `cargo xtask perf`: an XDP program that only passes.
    #[xdp]
    pub fn lb_noop_xdp(_ctx: XdpContext) -> u32 {
        aya_ebpf::bindings::xdp_action::XDP_PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // The verifier rejects any reachable panic; this is never executed.
        loop {}
    }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
#[cfg(target_arch = "bpf")]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// The host build only exists so `cargo build --workspace` works.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
