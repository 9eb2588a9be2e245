//! Getting a rewritten packet out: the next hop towards a backend (fib lookup, cached per
//! backend and CPU) and the TX/REDIRECT verdict.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use core::mem::size_of;
use lb_common::{FAMILY_V4, backend::NextHop, flow::IpBytes, stats::Stat};
use network_types::eth::EthHdr;

use crate::{maps::LB_NEXT_HOPS, parse::Packet, stats};

const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
/// The route is there but the neighbour is not resolved: the egress interface is known.
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// The next hop towards `backend_id` at `dst` (from `src`, both of `family`), from the cache
/// or a fresh fib lookup. `Err(ifindex)` when the kernel must forward it (the neighbour is
/// not resolved yet): the egress interface of the route, or 0 when there is no usable route.
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    backend_id: u32,
    family: u8,
    addrs: (&IpBytes, &IpBytes),
    now: u64,
    ttl_ns: u64,
) -> Result<NextHop, u32> {
    cached_hop(ctx, backend_id, family, addrs, now, ttl_ns, false)
}

/// As [`next_hop`], for direct server return: only the backend itself can be the next hop
/// (a packet still addressed to the VIP would come back from a gateway). A route through a
/// gateway is `Err(0)`, never cached. A backend id belongs to one service, so its cache slot
/// only ever holds lookups of one kind.
#[inline(always)]
pub fn on_link_hop(
    ctx: &XdpContext,
    backend_id: u32,
    family: u8,
    addrs: (&IpBytes, &IpBytes),
    now: u64,
    ttl_ns: u64,
) -> Result<NextHop, u32> {
    cached_hop(ctx, backend_id, family, addrs, now, ttl_ns, true)
}

#[inline(always)]
fn cached_hop(
    ctx: &XdpContext,
    backend_id: u32,
    family: u8,
    (src, dst): (&IpBytes, &IpBytes),
    now: u64,
    ttl_ns: u64,
    on_link: bool,
) -> Result<NextHop, u32> {
    let slot = LB_NEXT_HOPS.get_ptr_mut(backend_id).ok_or(0u32)?;
    // SAFETY: per-CPU slot: no other CPU writes it.
    let cached = unsafe { &mut *slot };
    if cached.expires_ns > now {
        return Ok(*cached);
    }
    let rc = resolve(ctx, cached, family as u32 | (on_link as u32) << 8, src, dst);
    if rc == 0 {
        cached.expires_ns = now + ttl_ns;
        Ok(*cached)
    } else {
        Err(rc.max(0) as u32)
    }
}

/// A fib lookup from `src` to `dst`: on success fills `out` (the caller sets its expiry) and
/// returns 0; when only the neighbour is missing returns the egress interface; else -1.
/// `kind` is the address family, plus 256 for "on link only" (then a route through a
/// gateway is -1 too): one argument, as a BPF call has at most five.
/// Not inlined: its 64-byte parameter block gets a stack frame of its own, which the
/// callers' frames (the new-flow path above all) have no room for.
#[inline(never)]
fn resolve(ctx: &XdpContext, out: &mut NextHop, kind: u32, src: &IpBytes, dst: &IpBytes) -> i64 {
    let (family, on_link) = (kind as u8, kind >> 8 != 0);
    // SAFETY: plain C struct, all-zero is valid.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = family;
    p.ifindex = ctx.ingress_ifindex() as u32;
    // The IPv6 address fields start where the IPv4 ones are, and an IPv4 address sits in an
    // `IpBytes`' first four bytes: one copy serves both families. (`IpBytes` is 16 bytes
    // whose memory is the address, so the transmute is the address's four words.)
    // SAFETY: two plain 16-byte values.
    unsafe {
        p.__bindgen_anon_3.ipv6_src = core::mem::transmute::<IpBytes, [u32; 4]>(*src);
        p.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<IpBytes, [u32; 4]>(*dst);
    }
    // SAFETY: helper call with a valid context and a stack struct of the size passed.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut p, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        return p.ifindex as i64;
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return -1;
    }
    // On success the destination field holds the next hop: the gateway's address, if any (an
    // IPv4 lookup writes the first four bytes; the other twelve stay as `dst` left them).
    // SAFETY: two plain 16-byte values.
    if on_link
        && unsafe { core::mem::transmute::<[u32; 4], IpBytes>(p.__bindgen_anon_4.ipv6_dst) } != *dst
    {
        return -1;
    }
    *out = NextHop {
        expires_ns: 0,
        ifindex: p.ifindex,
        dmac: p.dmac,
        smac: p.smac,
    };
    0
}

/// The benchmarks' ideal forwarder: per packet a fib lookup, the TTL decremented, the MACs
/// set and a redirect — the least any XDP forwarder does, so the ceiling for this balancer.
/// Anything it cannot route goes to the kernel.
#[inline(always)]
pub fn ideal(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = crate::parse::parse(ctx) else {
        return xdp_action::XDP_PASS;
    };
    if pkt.is_v6() || crate::nat::ttl(&pkt) <= 1 {
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
    out(ctx, ifindex)
}

/// As [`send`], for a frame that is not a parsed [`Packet`] (a translated ICMP error).
#[inline(always)]
pub fn send_frame(ctx: &XdpContext, ifindex: u32, smac: &[u8; 6], dmac: &[u8; 6]) -> u32 {
    let Some(eth) = crate::parse::ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: the Ethernet header is in bounds (checked by `ptr_at`).
    unsafe {
        let eth = &mut *eth;
        eth.src_addr = *smac;
        eth.dst_addr = *dmac;
    }
    out(ctx, ifindex)
}

/// The verdict that sends the frame out of `ifindex`.
#[inline(always)]
fn out(ctx: &XdpContext, ifindex: u32) -> u32 {
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
