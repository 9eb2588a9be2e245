//! Getting a rewritten packet out: the next hop towards a backend (fib lookup, cached per
//! backend and CPU) and the TX/REDIRECT verdict.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use core::mem::size_of;
use lb_common::{FAMILY_V4, backend::NextHop, stats::Stat};

use crate::{maps::LB_NEXT_HOPS, parse::Packet, stats};

const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// The next hop towards `backend_id` at `dst`, from the cache or a fresh fib lookup.
/// `None` when the kernel cannot forward it right now (e.g. the neighbour is not resolved).
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    backend_id: u32,
    src: [u8; 4],
    dst: [u8; 4],
    now: u64,
    ttl_ns: u64,
) -> Option<NextHop> {
    let slot = LB_NEXT_HOPS.get_ptr_mut(backend_id)?;
    // SAFETY: per-CPU slot: no other CPU writes it.
    let cached = unsafe { &mut *slot };
    if cached.expires_ns > now {
        return Some(*cached);
    }
    // SAFETY: plain C struct, all-zero is valid.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = FAMILY_V4;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: helper call with a valid context and a stack struct of the size passed.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut p, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    *cached = NextHop {
        expires_ns: now + ttl_ns,
        ifindex: p.ifindex,
        dmac: p.dmac,
        smac: p.smac,
    };
    Some(*cached)
}

/// The benchmarks' ideal forwarder: per packet a fib lookup, the TTL decremented, the MACs
/// set and a redirect — the least any XDP forwarder does, so the ceiling for this balancer.
/// Anything it cannot route goes to the kernel.
#[inline(always)]
pub fn ideal(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = crate::parse::parse(ctx) else {
        return xdp_action::XDP_PASS;
    };
    if crate::nat::ttl(&pkt) <= 1 {
        return xdp_action::XDP_PASS;
    }
    let k = &pkt.key;
    // SAFETY: plain C struct, all-zero is valid.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = FAMILY_V4;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(k.src.v4_octets());
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(k.dst.v4_octets());
    // SAFETY: helper call with a valid context and a stack struct of the size passed.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut p, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return xdp_action::XDP_PASS;
    }
    crate::nat::decrement_ttl(&pkt);
    send(ctx, &pkt, p.ifindex, &p.smac, &p.dmac)
}

/// Sends the (already rewritten) packet out of `ifindex`: back out of the interface it came in
/// on (TX) or through another one (REDIRECT).
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &Packet, ifindex: u32, smac: &[u8; 6], dmac: &[u8; 6]) -> u32 {
    crate::nat::set_macs(pkt, smac, dmac);
    if ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: helper call; it only records the target for after the program returns.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc == xdp_action::XDP_REDIRECT as i64 {
        xdp_action::XDP_REDIRECT
    } else {
        // The interface went away: let the kernel route it.
        stats::bump(Stat::FibPass);
        xdp_action::XDP_PASS
    }
}
