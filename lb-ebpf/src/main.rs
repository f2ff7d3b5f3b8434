//! lb's kernel programs. Entry points only; each calls the shared logic in
//! `lb.rs` through the `Packet` view of its context.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod ct;
#[cfg(target_arch = "bpf")]
mod dsr;
#[cfg(target_arch = "bpf")]
mod icmp_error;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod monitor;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod sock;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{cgroup_sock_addr, classifier, xdp},
        programs::{SockAddrContext, TcContext, XdpContext},
    };

    use crate::{
        lb::{self, Origin},
        packet::{TcPacket, XdpPacket},
        sock::{self, Family},
    };

    /// tc ingress (TCX) on pod devices: in-cluster traffic.
    #[classifier]
    pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
        try_tc::<true>(&ctx, Origin::Pod, false)
    }

    /// tc egress (TCX) on pod devices: replies restored on their way into
    /// the client pod, whichever device brought them to the node.
    #[classifier]
    pub fn lb_tc_to_pod(ctx: TcContext) -> i32 {
        try_tc::<true>(&ctx, Origin::Reply, true)
    }

    /// tc egress (TCX) on every device but pod devices: answers of the
    /// node's own sockets restored, and its sockets bound to a Service
    /// address masqueraded.
    #[classifier]
    pub fn lb_tc_node_egress(ctx: TcContext) -> i32 {
        try_tc::<true>(&ctx, Origin::NodeOut, true)
    }

    /// `lb_tc_node_egress` for devices without an Ethernet header.
    #[classifier]
    pub fn lb_tc_node_egress_l3(ctx: TcContext) -> i32 {
        try_tc::<false>(&ctx, Origin::NodeOut, true)
    }

    /// tc ingress (TCX) on node devices where XDP is not used.
    #[classifier]
    pub fn lb_tc_node(ctx: TcContext) -> i32 {
        try_tc::<true>(&ctx, Origin::Node, false)
    }

    /// `lb_tc_node` for node devices without an Ethernet header.
    #[classifier]
    pub fn lb_tc_node_l3(ctx: TcContext) -> i32 {
        try_tc::<false>(&ctx, Origin::Node, false)
    }

    /// tc ingress (TCX) on every other device: replies to the node's SNAT
    /// address (and to pods) restored wherever they come in.
    #[classifier]
    pub fn lb_tc_reply(ctx: TcContext) -> i32 {
        try_tc::<true>(&ctx, Origin::Reply, false)
    }

    /// `lb_tc_reply` for devices without an Ethernet header.
    #[classifier]
    pub fn lb_tc_reply_l3(ctx: TcContext) -> i32 {
        try_tc::<false>(&ctx, Origin::Reply, false)
    }

    #[inline(always)]
    fn try_tc<const ETH: bool>(ctx: &TcContext, origin: Origin, egress: bool) -> i32 {
        lb::process(&mut TcPacket::<ETH> { ctx, egress }, origin)
    }

    /// XDP with the pod-side logic, for packet tables and perf comparisons.
    #[xdp]
    pub fn lb_xdp(ctx: XdpContext) -> u32 {
        try_xdp(&ctx, Origin::Pod)
    }

    /// XDP on node devices: external traffic translated before the stack sees it.
    #[xdp]
    pub fn lb_xdp_node(ctx: XdpContext) -> u32 {
        try_xdp(&ctx, Origin::Node)
    }

    #[inline(always)]
    fn try_xdp(ctx: &XdpContext, origin: Origin) -> u32 {
        lb::process(&mut XdpPacket { ctx }, origin) as u32
    }

    /// connect() of the node's TCP and UDP sockets: a frontend becomes a backend.
    #[cgroup_sock_addr(connect4)]
    pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
        sock::translate_forward(&ctx, Family::V4)
    }

    /// sendmsg() with an address on the node's unconnected UDP sockets.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
        sock::translate_forward(&ctx, Family::V4)
    }

    /// recvmsg() on UDP sockets: a backend's datagram shows the Service as source.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
        sock::translate_reverse(&ctx, Family::V4)
    }

    /// getpeername(): a socket connected through a Service shows the Service.
    #[cgroup_sock_addr(getpeername4)]
    pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
        sock::translate_reverse(&ctx, Family::V4)
    }

    /// connect() of IPv6 sockets (IPv6 Services, and IPv4 ones by mapped address).
    #[cgroup_sock_addr(connect6)]
    pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
        sock::translate_forward(&ctx, Family::V6)
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
        sock::translate_forward(&ctx, Family::V6)
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
        sock::translate_reverse(&ctx, Family::V6)
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
        sock::translate_reverse(&ctx, Family::V6)
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

    /// The throughput floor for `cargo xtask perf`: an XDP program that
    /// sends every frame back out (XDP_TX), as Katran and the XDP paper
    /// report forwarding rates against.
    #[xdp]
    pub fn lb_noop_xdp_tx(_ctx: XdpContext) -> u32 {
        aya_ebpf::bindings::xdp_action::XDP_TX
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
