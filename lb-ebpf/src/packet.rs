//! One offset-based view of a packet for both tc (skb) and XDP, so the
//! translation logic is written once. Headers are read in place where the
//! frame holds them (direct packet access, bounds checked against the end);
//! anything else goes through the kernel's bounds-checked load/store
//! helpers, so a truncated packet makes a load fail instead of reading past
//! the end.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT, bpf_adj_room_mode, bpf_fib_lookup as FibLookup,
        xdp_action,
    },
    helpers::generated::{
        bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_adjust_room, bpf_skb_change_head, bpf_skb_change_tail, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::{TcContext, XdpContext},
};
use core::{mem::MaybeUninit, ptr};

use crate::csum;

/// Helper failures carry no detail we act on; the caller counts and bails.
pub struct PacketError;

pub type Result<T> = core::result::Result<T, PacketError>;

/// How a checksum field reacts to a rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4Csum {
    /// TCP: always present.
    Tcp,
    /// UDP: zero means "no checksum" and must stay zero.
    Udp,
    /// ICMP: always present, no pseudo header.
    Icmp,
}

pub trait Packet {
    fn len(&self) -> u32;
    /// The device the packet is seen on (the monitor's `device`).
    fn ifindex(&self) -> u32;
    /// Where the IP header starts: after the Ethernet header, or at 0 on an
    /// L3 device (a TUN, WireGuard or IPIP device has no link-layer header).
    fn l3_off(&self) -> u32;
    /// The EtherType of the packet (network order), read from the frame on
    /// Ethernet, from the skb on any device under tc.
    fn l3_proto_be(&self) -> Result<u16>;
    fn load<T: Copy>(&self, off: u32) -> Result<T>;
    /// `load` for the headers parsing reads (offset below 128): XDP reads
    /// them in place, saving a helper call each.
    #[inline(always)]
    fn load_header<T: Copy>(&self, off: u32) -> Result<T> {
        self.load(off)
    }
    fn store<T: Copy>(&mut self, off: u32, v: &T) -> Result<()>;
    /// Store an IPv6 address: on tc the skb's CHECKSUM_COMPLETE sum follows
    /// the change (no IPv6 header checksum absorbs it, and the L4 helper's
    /// pseudo-header update takes it out of `skb->csum`).
    #[inline(always)]
    fn store_addr6(&mut self, off: u32, v: &lb_common::Addr) -> Result<()> {
        self.store_uncovered(off, v)
    }
    /// Store a field no checksum in the packet covers (the IPv6 hop limit):
    /// on tc the skb's CHECKSUM_COMPLETE sum follows the change.
    #[inline(always)]
    fn store_uncovered<T: Copy>(&mut self, off: u32, v: &T) -> Result<()> {
        self.store(off, v)
    }
    /// Mark the packet as translated on this node, so the reply-only
    /// program on a pod device's egress does not take it for a reply.
    #[inline(always)]
    fn mark_translated(&mut self) {}
    /// Whether an earlier program on this node translated the packet.
    #[inline(always)]
    fn translated_here(&self) -> bool {
        false
    }
    /// Mark a packet of a DSR flow for the node's egress program.
    #[inline(always)]
    fn mark_dsr(&mut self) {}
    /// Whether `mark_dsr` marked the packet.
    #[inline(always)]
    fn marked_dsr(&self) -> bool {
        false
    }
    /// Whether one of the node's own sockets sent the packet (not forwarded).
    #[inline(always)]
    fn sent_by_local_socket(&self) -> bool {
        false
    }
    /// The sending socket's cookie (0 without one).
    #[inline(always)]
    fn socket_cookie(&self) -> u64 {
        0
    }
    /// Patch the IPv4 header checksum at `csum_off` for a 4-byte field change.
    fn l3_csum_replace4(&mut self, csum_off: u32, from: u32, to: u32) -> Result<()>;
    /// Patch the L4 checksum at `csum_off` for a field change of `size` (2 or
    /// 4) bytes; `pseudo` when the field is part of the pseudo header.
    fn l4_csum_replace(
        &mut self,
        kind: L4Csum,
        csum_off: u32,
        from: u32,
        to: u32,
        size: u32,
        pseudo: bool,
    ) -> Result<()>;
    /// Add `len` bytes in front of the packet.
    fn push_head(&mut self, len: u32) -> Result<()>;
    /// Whether the packet, `grow` bytes longer, still fits the MTU of the
    /// device it leaves by (an egress program's). A GSO packet does not:
    /// its segments cannot be grown one by one.
    #[inline(always)]
    fn fits_mtu_grown(&self, _grow: u32) -> bool {
        true
    }
    /// An egress program (tc only).
    #[inline(always)]
    fn is_egress(&self) -> bool {
        false
    }
    /// Open `len` bytes of room right after the fixed IP header (20 bytes
    /// for IPv4, 40 for IPv6): the link and IP headers move to the front,
    /// the rest stays. The room's bytes are the caller's to write.
    fn open_after_ip(&mut self, v6: bool, len: u32) -> Result<()>;
    /// Cut the packet to `len` bytes.
    fn truncate(&mut self, len: u32) -> Result<()>;
    /// The verdict sending the (rewritten) packet back where it came from.
    fn bounce(&self) -> i32;
    /// The verdict letting the packet continue.
    fn pass(&self) -> i32;
    /// The verdict dropping the packet.
    fn drop_verdict(&self) -> i32;
    /// Hand the packet, now `src -> dst`, to the device the FIB routes it
    /// to, skipping the host stack; None when that is not possible here
    /// (XDP, a local destination, no route) and the packet should pass.
    fn redirect_routed(&mut self, to: &Routed) -> Option<i32>;
}

/// A header read in place (direct packet access) at `off` (below 128)
/// from `data`, if the frame's linear part holds all of it.
///
/// A plain load, not `read_unaligned`: for BPF, LLVM splits an unaligned
/// read into single-byte loads (a header of 40 bytes became 40 loads and
/// as many shifts, most of the parse's cost). The kernel checks packet
/// access alignment only under strict alignment, which architectures with
/// efficient unaligned access (x86-64, arm64: the ones lb runs on) do not
/// have, and their JITs load from any address; C datapaths (Cilium's,
/// Katran's) read their headers the same way.
#[inline(always)]
fn in_place<T: Copy>(data: usize, data_end: usize, off: u32) -> Option<T> {
    let start = header_at::<T>(data, data_end, off)?;
    // SAFETY: [start, start + size_of::<T>()) lies inside the frame,
    // checked against data_end (which the verifier also proves).
    Some(unsafe { ptr::read(start as *const T) })
}

/// Where a `T` at `off` (below 128) starts, if the linear data holds it.
#[inline(always)]
fn header_at<T>(data: usize, data_end: usize, off: u32) -> Option<usize> {
    if off >= 128 {
        return None;
    }
    // The mask restates the bound for the verifier; the barrier keeps LLVM
    // from dropping it (it knows off < 128) and adding an unbounded copy
    // of the offset instead.
    let start = data + (core::hint::black_box(off) & 0x7f) as usize;
    (start + size_of::<T>() <= data_end).then_some(start)
}

/// `out` zeroed (a plain-data struct whose size is a multiple of 8) with
/// one store per 8 bytes. `mem::zeroed` becomes a call to a memset
/// that, for BPF, stores one byte per loop iteration (64 iterations for
/// the FIB lookup's parameters); volatile stores are not merged back into it.
#[inline(always)]
fn zero_words<T: Copy>(out: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() <= 8) };
    let words = out.as_mut_ptr().cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: inside `out`; u64 stores may be unaligned for T's own
        // alignment on BPF (the stack slot is 8-byte aligned).
        unsafe { ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte written; T is plain data (all zeroes is valid).
    unsafe { out.assume_init_mut() }
}

/// A translated packet's tuple, for the FIB lookup of the fast path.
pub struct Routed {
    pub src_be: lb_common::Addr,
    pub dst_be: lb_common::Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub v6: bool,
    /// Where the IP header starts (the hop count is written there).
    pub l3_off: u32,
    /// IP datagram length: the FIB checks it against the route's MTU.
    pub tot_len: u16,
}

/// A packet under tc. `ETH`: the device has an Ethernet header (the agent
/// attaches the `_l3` programs, built with `ETH = false`, to L3 devices).
pub struct TcPacket<'a, const ETH: bool> {
    pub ctx: &'a TcContext,
    /// Egress programs must not redirect: the packet is already leaving.
    pub egress: bool,
}

impl<const ETH: bool> Packet for TcPacket<'_, ETH> {
    #[inline(always)]
    fn len(&self) -> u32 {
        self.ctx.len()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.ctx.skb.skb).ifindex }
    }

    #[inline(always)]
    fn l3_off(&self) -> u32 {
        if ETH { crate::parse::ETH_HLEN } else { 0 }
    }

    #[inline(always)]
    fn l3_proto_be(&self) -> Result<u16> {
        // skb->protocol holds the EtherType on every device kind.
        Ok(unsafe { (*self.ctx.skb.skb).protocol } as u16)
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: u32) -> Result<T> {
        self.ctx.load::<T>(off as usize).map_err(|_| PacketError)
    }

    /// Headers in the skb's linear part are read in place (direct packet
    /// access, as XDP does); a header beyond it (a paged skb) takes the
    /// helper, which reads the fragments too.
    #[inline(always)]
    fn load_header<T: Copy>(&self, off: u32) -> Result<T> {
        match in_place(self.ctx.data(), self.ctx.data_end(), off) {
            Some(header) => Ok(header),
            None => self.load(off),
        }
    }

    #[inline(always)]
    fn store<T: Copy>(&mut self, off: u32, v: &T) -> Result<()> {
        self.ctx.store(off as usize, v, 0).map_err(|_| PacketError)
    }

    #[inline(always)]
    fn store_uncovered<T: Copy>(&mut self, off: u32, v: &T) -> Result<()> {
        self.ctx
            .store(off as usize, v, BPF_F_RECOMPUTE_CSUM as u64)
            .map_err(|_| PacketError)
    }

    #[inline(always)]
    fn mark_translated(&mut self) {
        // SAFETY: skb->mark is writable from tc programs.
        unsafe { (*self.ctx.skb.skb).mark |= lb_common::MARK_TRANSLATED };
    }

    #[inline(always)]
    fn translated_here(&self) -> bool {
        let mark = unsafe { (*self.ctx.skb.skb).mark };
        mark & lb_common::MARK_TRANSLATED != 0
    }

    #[inline(always)]
    fn mark_dsr(&mut self) {
        // SAFETY: skb->mark is writable from tc programs.
        unsafe { (*self.ctx.skb.skb).mark |= lb_common::MARK_DSR };
    }

    #[inline(always)]
    fn marked_dsr(&self) -> bool {
        let mark = unsafe { (*self.ctx.skb.skb).mark };
        mark & lb_common::MARK_DSR != 0
    }

    #[inline(always)]
    fn sent_by_local_socket(&self) -> bool {
        // skb->sk: the sending socket of a locally generated packet, NULL
        // for a forwarded one.
        !unsafe { (*self.ctx.skb.skb).__bindgen_anon_2.sk }.is_null()
    }

    #[inline(always)]
    fn socket_cookie(&self) -> u64 {
        // SAFETY: the helper reads the skb's socket, if any.
        unsafe { aya_ebpf::helpers::bpf_get_socket_cookie(self.ctx.skb.skb.cast()) }
    }

    #[inline(always)]
    fn l3_csum_replace4(&mut self, csum_off: u32, from: u32, to: u32) -> Result<()> {
        self.ctx
            .l3_csum_replace(csum_off as usize, from as u64, to as u64, 4)
            .map_err(|_| PacketError)
    }

    #[inline(always)]
    fn l4_csum_replace(
        &mut self,
        kind: L4Csum,
        csum_off: u32,
        from: u32,
        to: u32,
        size: u32,
        pseudo: bool,
    ) -> Result<()> {
        // The helper also keeps skb->csum right for CHECKSUM_COMPLETE and
        // updates only the pseudo-header sum for CHECKSUM_PARTIAL (veth).
        let mut flags = size as u64;
        if pseudo {
            flags |= BPF_F_PSEUDO_HDR as u64;
        }
        if kind == L4Csum::Udp {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        self.ctx
            .l4_csum_replace(csum_off as usize, from as u64, to as u64, flags)
            .map_err(|_| PacketError)
    }

    #[inline(always)]
    fn push_head(&mut self, len: u32) -> Result<()> {
        let ret = unsafe { bpf_skb_change_head(self.ctx.skb.skb.cast(), len, 0) };
        if ret == 0 { Ok(()) } else { Err(PacketError) }
    }

    #[inline(always)]
    fn fits_mtu_grown(&self, grow: u32) -> bool {
        if unsafe { (*self.ctx.skb.skb).gso_size } != 0 {
            return false;
        }
        let mut mtu_len = 0u32;
        // ifindex 0: the device the skb is on (leaving by, on egress).
        let ret =
            unsafe { bpf_check_mtu(self.ctx.skb.skb.cast(), 0, &mut mtu_len, grow as i32, 0) };
        ret == 0
    }

    #[inline(always)]
    fn is_egress(&self) -> bool {
        self.egress
    }

    #[inline(always)]
    fn open_after_ip(&mut self, _v6: bool, len: u32) -> Result<()> {
        // BPF_ADJ_ROOM_NET opens the room after the MAC header and the
        // family's fixed IP header, moving both (the kernel knows the
        // family from skb->protocol). Fails for GSO packets, which a TCP
        // SYN never is.
        let ret = unsafe {
            bpf_skb_adjust_room(
                self.ctx.skb.skb.cast(),
                len as i32,
                bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
                0,
            )
        };
        if ret == 0 { Ok(()) } else { Err(PacketError) }
    }

    #[inline(always)]
    fn truncate(&mut self, len: u32) -> Result<()> {
        let ret = unsafe { bpf_skb_change_tail(self.ctx.skb.skb.cast(), len, 0) };
        if ret == 0 { Ok(()) } else { Err(PacketError) }
    }

    #[inline(always)]
    fn bounce(&self) -> i32 {
        // Out of the device the packet came in on: back to the sender.
        let ifindex = unsafe { (*self.ctx.skb.skb).ifindex };
        let ret = unsafe { bpf_redirect(ifindex, 0) };
        if ret == TC_ACT_REDIRECT as i64 {
            TC_ACT_REDIRECT
        } else {
            self.drop_verdict()
        }
    }

    /// TCX_NEXT (TC_ACT_UNSPEC): the packet goes on, and so does the chain
    /// (programs attached after ours, classic tc filters).
    #[inline(always)]
    fn pass(&self) -> i32 {
        aya_ebpf::bindings::TC_ACT_UNSPEC
    }

    #[inline(always)]
    fn drop_verdict(&self) -> i32 {
        aya_ebpf::bindings::TC_ACT_SHOT
    }

    #[inline(always)]
    fn redirect_routed(&mut self, to: &Routed) -> Option<i32> {
        // Egress: the packet is already leaving. No Ethernet header: the
        // kernel's redirect_neigh drops a packet without one (it pulls the
        // MAC header it expects); the stack routes it instead.
        // A VLAN tag the hardware stripped (a VLAN device's parent) would
        // go out with the packet: leave it to the stack.
        if self.egress || !ETH || unsafe { (*self.ctx.skb.skb).vlan_present } != 0 {
            return None;
        }
        let mut fib = MaybeUninit::<FibLookup>::uninit();
        let ifindex = unsafe { (*self.ctx.skb.skb).ifindex };
        // Too big for the egress MTU: the stack forwards it instead and sends
        // the sender "fragmentation needed" / "packet too big" (PMTU). Not
        // for GSO packets: the FIB would compare their whole length.
        let checks_mtu = unsafe { (*self.ctx.skb.skb).gso_size } == 0;
        let fib = fib_params(&mut fib, to, ifindex, checks_mtu);
        let ret = unsafe {
            bpf_fib_lookup(
                self.ctx.skb.skb.cast(),
                fib,
                size_of::<FibLookup>() as i32,
                0,
            )
        };
        // Forwarded routes only; anything local, unroutable or too big for
        // the route's MTU (BPF_FIB_LKUP_RET_FRAG_NEEDED) goes up the stack.
        if ret != BPF_FIB_LKUP_RET_SUCCESS as i64 && ret != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            return None;
        }
        // The stack's forwarding would have counted the hop.
        if !matches!(crate::nat::count_hop(self, to.l3_off, to.v6), Ok(true)) {
            return None;
        }
        // Into a pod on this node whose MAC the FIB knows: straight into
        // the pod's namespace (bpf_redirect_peer: the packet arrives on the
        // pod's eth0 as if it came through the veth, without the backlog
        // queue and softirq a transmit on the veth costs; Cilium's host
        // routing). Only veths lb attached to as pod devices: a peer
        // redirect to any other device drops the packet.
        if ret == BPF_FIB_LKUP_RET_SUCCESS as i64
            && unsafe { crate::maps::LB_POD_DEVICES.get(fib.ifindex) }.is_some()
        {
            let (dmac, smac) = (fib.dmac, fib.smac);
            if self.store(0, &dmac).is_ok() && self.store(6, &smac).is_ok() {
                // Our mark is for the pod device's egress program, which a
                // peer redirect skips; it must not enter the pod.
                unsafe {
                    (*self.ctx.skb.skb).mark &= !(lb_common::MARK_TRANSLATED | lb_common::MARK_DSR)
                };
                // Fails only for flags other than 0: the hop counted above
                // is this redirect's (as it is for redirect_neigh below).
                let verdict = unsafe { bpf_redirect_peer(fib.ifindex, 0) };
                if verdict == TC_ACT_REDIRECT as i64 {
                    return Some(TC_ACT_REDIRECT);
                }
            }
        }
        // The neighbour subsystem fills in the MAC addresses (and resolves
        // them when unknown).
        let verdict = unsafe { bpf_redirect_neigh(fib.ifindex, ptr::null_mut(), 0, 0) };
        (verdict == TC_ACT_REDIRECT as i64).then_some(TC_ACT_REDIRECT)
    }
}

/// The FIB lookup's parameters for `to`, coming in on `ifindex`
/// (`checks_mtu`: with the datagram's length, so a route whose MTU it
/// exceeds answers FRAG_NEEDED).
#[inline(always)]
fn fib_params<'a>(
    fib: &'a mut MaybeUninit<FibLookup>,
    to: &Routed,
    ifindex: u32,
    checks_mtu: bool,
) -> &'a mut FibLookup {
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;
    let fib = zero_words(fib);
    fib.l4_protocol = to.proto;
    fib.sport = to.sport_be;
    fib.dport = to.dport_be;
    fib.ifindex = ifindex;
    if checks_mtu {
        fib.__bindgen_anon_1.tot_len = to.tot_len;
    }
    if to.v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = to.src_be.be;
        fib.__bindgen_anon_4.ipv6_dst = to.dst_be.be;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = to.src_be.v4_be();
        fib.__bindgen_anon_4.ipv4_dst = to.dst_be.v4_be();
    }
    fib
}

pub struct XdpPacket<'a> {
    pub ctx: &'a XdpContext,
}

impl XdpPacket<'_> {
    /// Checksums in XDP have no offload state: patch them in place.
    #[inline(always)]
    fn patch_csum(
        &mut self,
        csum_off: u32,
        from: u32,
        to: u32,
        size: u32,
        udp: bool,
    ) -> Result<()> {
        let old: u16 = self.load_header(csum_off)?;
        if udp && old == 0 {
            return Ok(());
        }
        let mut new = if size == 4 {
            csum::replace4(old, from, to)
        } else {
            csum::replace2(old, from as u16, to as u16)
        };
        if udp && new == 0 {
            new = 0xffff;
        }
        self.store(csum_off, &new)
    }
}

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn len(&self) -> u32 {
        (self.ctx.data_end() - self.ctx.data()) as u32
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.ctx.ctx).ingress_ifindex }
    }

    /// XDP is attached to Ethernet devices only.
    #[inline(always)]
    fn l3_off(&self) -> u32 {
        crate::parse::ETH_HLEN
    }

    #[inline(always)]
    fn l3_proto_be(&self) -> Result<u16> {
        self.load_header::<u16>(12)
    }

    #[inline(always)]
    fn load_header<T: Copy>(&self, off: u32) -> Result<T> {
        match in_place(self.ctx.data(), self.ctx.data_end(), off) {
            Some(header) => Ok(header),
            None => self.load(off),
        }
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: u32) -> Result<T> {
        let mut out = MaybeUninit::<T>::uninit();
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.ctx.ctx.cast(),
                off,
                ptr::from_mut(&mut out).cast(),
                size_of::<T>() as u32,
            )
        };
        if ret == 0 {
            Ok(unsafe { out.assume_init() })
        } else {
            Err(PacketError)
        }
    }

    /// Headers (offset below 128) are written in place: XDP frames are
    /// always writable, and the rewrite's checksum fixes are in-program
    /// arithmetic (`patch_csum`), so a translation calls no helper.
    #[inline(always)]
    fn store<T: Copy>(&mut self, off: u32, v: &T) -> Result<()> {
        if let Some(start) = header_at::<T>(self.ctx.data(), self.ctx.data_end(), off) {
            // SAFETY: inside the frame, checked against data_end (see `in_place`).
            unsafe { ptr::write(start as *mut T, *v) };
            return Ok(());
        }
        let ret = unsafe {
            bpf_xdp_store_bytes(
                self.ctx.ctx.cast(),
                off,
                ptr::from_ref(v).cast_mut().cast(),
                size_of::<T>() as u32,
            )
        };
        if ret == 0 { Ok(()) } else { Err(PacketError) }
    }

    #[inline(always)]
    fn l3_csum_replace4(&mut self, csum_off: u32, from: u32, to: u32) -> Result<()> {
        self.patch_csum(csum_off, from, to, 4, false)
    }

    #[inline(always)]
    fn l4_csum_replace(
        &mut self,
        kind: L4Csum,
        csum_off: u32,
        from: u32,
        to: u32,
        size: u32,
        _pseudo: bool,
    ) -> Result<()> {
        self.patch_csum(csum_off, from, to, size, kind == L4Csum::Udp)
    }

    #[inline(always)]
    fn push_head(&mut self, len: u32) -> Result<()> {
        let ret = unsafe { bpf_xdp_adjust_head(self.ctx.ctx.cast(), -(len as i32)) };
        if ret == 0 { Ok(()) } else { Err(PacketError) }
    }

    /// Not under XDP: DSR's option, the one thing that grows a packet
    /// after its IP header, is added by the egress tc program (`dsr.rs`).
    #[inline(always)]
    fn open_after_ip(&mut self, _v6: bool, _len: u32) -> Result<()> {
        Err(PacketError)
    }

    #[inline(always)]
    fn truncate(&mut self, len: u32) -> Result<()> {
        let cur = self.len();
        if len > cur {
            return Err(PacketError);
        }
        let ret = unsafe { bpf_xdp_adjust_tail(self.ctx.ctx.cast(), -((cur - len) as i32)) };
        if ret == 0 { Ok(()) } else { Err(PacketError) }
    }

    #[inline(always)]
    fn bounce(&self) -> i32 {
        xdp_action::XDP_TX as i32
    }

    #[inline(always)]
    fn pass(&self) -> i32 {
        xdp_action::XDP_PASS as i32
    }

    #[inline(always)]
    fn drop_verdict(&self) -> i32 {
        xdp_action::XDP_DROP as i32
    }

    /// None: XDP runs before the stack; its translated packets take the
    /// stack's path. (XDP_TX back out of the NIC, Cilium's and Katran's
    /// hairpin, would need the FIB lookup and hop count here; the verifier
    /// does not take them on top of this program's paths yet.)
    #[inline(always)]
    fn redirect_routed(&mut self, _to: &Routed) -> Option<i32> {
        None
    }
}
