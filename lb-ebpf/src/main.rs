//! lb's data plane: an XDP full-NAT layer-4 balancer.
//!
//! Per packet: parse → VIP? (this CPU's copy of the flow's entry (`flowcache`), a conntrack
//! hit, or a SYN → Maglev bucket → backend, new flow) → full-NAT rewrite → cached next hop →
//! TX/REDIRECT. Return traffic (backend → SNAT address:port) is reverse-NATed back to the
//! client; ICMP errors about a flow are translated to its other end (`icmp`). A
//! direct-server-return service's packets skip the NAT (`dsr`). Everything else is passed to
//! the kernel untouched. Tables, weights and health are userspace's business; this program
//! only reads them.
#![no_std]
#![no_main]

mod clock;
mod conntrack;
mod dsr;
mod flowcache;
mod forward;
mod guard;
mod icmp;
mod icmp6;
mod maps;
mod nat;
mod parse;
mod reset;
mod select;
mod signals;
mod stats;
mod tcpts;

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, Tunables, service::ServiceKey, stats::Stat};

use crate::{
    maps::{LB_CONNTRACK, LB_PORTS, LB_REVERSE_NAT, LB_SERVICES},
    nat::Rewrite,
    parse::Packet,
    stats::Direction,
};

/// The balancer. Attached to every configured interface.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    count(match try_balance(&ctx) {
        Ok(a) => a,
        Err(()) => XDP_ABORTED,
    })
}

/// The new-flow half of the balancer, tail-called by `lb_xdp` for a packet to a VIP without
/// a live flow (never attached itself). A program of its own so that it has a whole stack:
/// the new-flow path's frames (service, backend, next hop, SNAT port) do not fit on top of
/// the per-packet path's.
#[xdp]
pub fn lb_new_flow(ctx: XdpContext) -> u32 {
    count(match try_new_flow(&ctx) {
        Ok(a) => a,
        Err(()) => XDP_ABORTED,
    })
}

/// Counts the verdict (the first entries of the counter array) and returns it.
#[inline(always)]
fn count(action: u32) -> u32 {
    if let Some(c) = maps::LB_XDP_STATS.get_ptr_mut(action) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    action
}

/// A program that passes everything: the baseline that benchmarks subtract.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The benchmarks' ideal forwarder (fib lookup + redirect per packet): the ceiling that
/// `cargo xtask bench` compares the balancer with. Not used by lbd.
#[xdp]
pub fn lb_ideal_fwd(ctx: XdpContext) -> u32 {
    forward::ideal(&ctx)
}

#[inline(always)]
fn pass(reason: Stat) -> u32 {
    stats::bump(reason);
    XDP_PASS
}

#[inline(always)]
fn drop(reason: Stat) -> u32 {
    stats::bump(reason);
    XDP_DROP
}

fn try_balance(ctx: &XdpContext) -> Result<u32, ()> {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(Stat::IcmpNotTranslated) => return Ok(icmp::handle(ctx, maps::tunables())),
        Err(reason) => return Ok(pass(reason)),
    };
    let t = maps::tunables();
    // An array lookup (inlined by the verifier) instead of hashing a service key for every
    // packet: packets to other ports, or to other addresses on a served port, end here.
    if let Some(on_port) = LB_PORTS.get(u16::from_be(pkt.key.dport) as u32) {
        let dst_v4 = if pkt.key.family == FAMILY_V4 {
            u32::from_ne_bytes(pkt.key.dst.v4_octets())
        } else {
            0
        };
        if on_port.may_serve(dst_v4) {
            return to_backend(ctx, &pkt, on_port.ids, t);
        }
    }
    from_backend::<true>(ctx, &pkt, t)
}

/// The new-flow program's body: the packet is parsed again (the tail call keeps only the
/// frame), then [`open_flow`].
#[inline(always)]
fn try_new_flow(ctx: &XdpContext) -> Result<u32, ()> {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(reason) => return Ok(pass(reason)),
    };
    let t = maps::tunables();
    let now = crate::clock::now();
    match open_flow(ctx, &pkt, t, now) {
        NOT_A_SERVICE => from_backend::<false>(ctx, &pkt, t),
        action => Ok(action),
    }
}

/// What is not for a service: a backend's answer to a SNAT address:port (to its client), or
/// not ours at all (passed). `IN_MAIN`: the return path is inlined (the per-packet program,
/// where a BPF subprogram's call and return cost ~10 ns on hosts with return thunks), or
/// called as a subprogram (the new-flow program, whose own frames leave no room for it).
#[inline(always)]
fn from_backend<const IN_MAIN: bool>(
    ctx: &XdpContext,
    pkt: &Packet,
    t: &Tunables,
) -> Result<u32, ()> {
    let dport = u16::from_be(pkt.key.dport);
    if dport >= t.snat_port_min && dport <= t.snat_port_max {
        if let Some(r) = LB_REVERSE_NAT.get_ptr_mut(&pkt.key) {
            return if IN_MAIN {
                to_client::<true>(ctx, pkt, r, t)
            } else {
                Ok(to_client_call(ctx, pkt, r, t))
            };
        }
    }
    Ok(pass(Stat::NotOurs))
}

/// Client → VIP: a packet of a live flow is rewritten towards its backend and sent; any
/// other goes to the new-flow program.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    services_on_port: u32,
    t: &Tunables,
) -> Result<u32, ()> {
    let now = crate::clock::now();
    let slot = flowcache::slot_of(&pkt.key);
    // This CPU's copy of the flow's entry when this packet would change nothing in it (see
    // `flowcache`): no hashing of the key, no bucket walk.
    let cached = flowcache::get(pkt, slot, now)
        .filter(|c| serves(services_on_port, c.service_id))
        .filter(|_| nat::ttl(pkt) > 1);
    let e = match cached {
        Some(c) => c,
        None => match track(ctx, pkt, services_on_port, slot, now, t) {
            Ok(e) => e,
            Err(verdict) => return Ok(verdict),
        },
    };
    deliver(ctx, pkt, e, None, now, t)
}

/// Whether the service with id `service_id` is among `services_on_port` (a bit per id).
#[inline(always)]
fn serves(services_on_port: u32, service_id: u8) -> bool {
    services_on_port
        .checked_shr(service_id as u32)
        .is_some_and(|m| m & 1 != 0)
}

/// The full path of a client packet: its flow's conntrack entry, updated by the packet and
/// copied to this CPU's flow cache (in `slot`) when the next packets may use the copy. `Err`:
/// the packet's verdict, when it is not forwarded as a packet of a live full-NAT flow (a new
/// flow, TTL exceeded, a direct-server-return flow).
#[inline(always)]
fn track(
    ctx: &XdpContext,
    pkt: &Packet,
    services_on_port: u32,
    slot: u32,
    now: u64,
    t: &Tunables,
) -> Result<&'static lb_common::conntrack::CtValue, u32> {
    let proto = pkt.key.proto;
    let syn = pkt.is_tcp() && conntrack::is_syn(pkt.tcp_flags);
    // Before the lookup: a change to the entry after this read makes the copy stale.
    let generation = flowcache::generation(slot);
    // Conntrack first: a hit needs no service lookup, only the check that its service still
    // listens here (a removed service's flows end, as they would without the entry).
    let existing = LB_CONNTRACK.get_ptr_mut(&pkt.key).and_then(|p| {
        // SAFETY: LRU entry; fields are plain integers, races only lose a refresh.
        let e = unsafe { &mut *p };
        let reusable = conntrack::alive(e.last_seen_ns, e.state, proto, now, t)
            && !(syn && e.state == lb_common::conntrack::state::CLOSING)
            && serves(services_on_port, e.service_id);
        reusable.then_some(e)
    });
    let Some(e) = existing else {
        // The new-flow program may put a new entry under this key: this program's copies of
        // the flow go stale now, before it. (The tail-call slot is pinned: while lbd restarts,
        // it holds the new build's new-flow program, whose generations are not this
        // program's; and what it replaces, no CPU keeps a copy of, see `flowcache`.)
        flowcache::invalidate(slot);
        // SAFETY: a tail call with this program's context; it returns only when the slot is
        // empty (lbd fills it at load).
        unsafe { maps::LB_PROGRAMS.tail_call(ctx, lb_common::layout::NEW_FLOW_PROGRAM) };
        return Err(drop(Stat::FlowNotCreated));
    };
    if nat::ttl(pkt) <= 1 {
        return Err(pass(Stat::TtlExceeded));
    }
    if e.flags & lb_common::conntrack::CtValue::DSR != 0 {
        return Err(dsr::forward(ctx, pkt, e, syn, now, t));
    }
    if pkt.is_tcp() && e.signals & lb_common::conntrack::signal::REQUEST == 0 {
        signals::from_client(pkt, e, syn);
    }
    if conntrack::observe(
        &mut e.last_seen_ns,
        &mut e.state,
        pkt.tcp_flags,
        proto,
        true,
        now,
    ) {
        let rkey = conntrack::reverse_key(e, &pkt.key);
        if let Some(r) = LB_REVERSE_NAT.get_ptr_mut(&rkey) {
            // SAFETY: as above.
            let r = unsafe { &mut *r };
            conntrack::sync(&mut r.last_seen_ns, &mut r.state, e.last_seen_ns, e.state);
        }
    }
    flowcache::put(slot, generation, &pkt.key, e, now);
    Ok(e)
}

/// What [`open_flow`] returns when the packet is for no service at its address.
const NOT_A_SERVICE: u32 = u32::MAX;

/// A packet to a VIP without a live flow: a SYN (or a UDP datagram) of a service opens one —
/// backend from the Maglev table, next hop, SNAT port — and is sent; anything else is
/// passed or dropped, counted. [`NOT_A_SERVICE`] when no service listens at the address.
///
#[inline(always)]
fn open_flow(ctx: &XdpContext, pkt: &Packet, t: &Tunables, now: u64) -> u32 {
    let syn = pkt.is_tcp() && conntrack::is_syn(pkt.tcp_flags);
    let svc_key = ServiceKey::of_flow(&pkt.key);
    // SAFETY: userspace replaces service values whole (an atomic element swap); copied at
    // once.
    let Some(svc) = (unsafe { LB_SERVICES.get(&svc_key) }).copied() else {
        return NOT_A_SERVICE;
    };
    if nat::ttl(pkt) <= 1 {
        return pass(Stat::TtlExceeded);
    }
    if svc.flags & lb_common::service::ServiceValue::DSR != 0 {
        return dsr::open(ctx, pkt, &svc, now);
    }
    if pkt.is_tcp() && !syn {
        // No flow: the host's stack answers with a RST (the VIP is a local address), so the
        // client learns at once instead of retransmitting into a void.
        return pass(Stat::NonSynMiss);
    }
    // Only what a real client sends opens a flow: crafted SYNs are dropped before they take
    // any state (passed, the host would answer them).
    let wscale = if pkt.is_tcp() {
        match guard::check_syn(ctx, pkt) {
            Ok(w) => w,
            Err(reason) => return drop(reason),
        }
    } else {
        0
    };
    if let Err(reason) = guard::check_source(ctx, &pkt.key) {
        return drop(reason);
    }
    let Some(f) = maps::LB_NEW_FLOW.get_ptr_mut(0) else {
        return drop(Stat::FlowNotCreated);
    };
    // SAFETY: this CPU's scratch slot: nothing else touches it while this runs.
    let f = unsafe { &mut *f };
    f.backend_id = match select::pick(&svc, &pkt.key, &mut f.backend) {
        Ok(id) => id,
        // No backend: the host answers the SYN with a RST (nothing listens there).
        Err(_) => return pass(Stat::NoBackend),
    };
    // The route towards the backend, now: where its answers must come from.
    match forward::next_hop(
        ctx,
        f.backend_id,
        pkt.key.family,
        (&svc.snat_addr, &f.backend.addr),
        now,
        t.next_hop_ttl_ns,
    ) {
        Ok(nh) => {
            f.hop = nh;
            f.routed = 1;
        }
        Err(ifindex) => {
            f.routed = 0;
            f.route_ifindex = ifindex;
        }
    }
    if let Err(reason) = select::new_flow(ctx, pkt, &svc, t, wscale as u32) {
        return drop(reason);
    }
    // It may have replaced a flow on the same 5-tuple that other CPUs hold copies of.
    flowcache::invalidate(flowcache::slot_of(&pkt.key));
    stats::bump(Stat::NewFlow);
    let hop = if f.routed != 0 { Ok(f.hop) } else { Err(0) };
    deliver(ctx, pkt, &f.ct, Some(hop), now, t).unwrap_or(XDP_ABORTED)
}

/// Rewrites a client packet of flow `ct` towards its backend, counts it and sends it: through
/// `hop` when the caller has it (a new flow), else the cached next hop.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    pkt: &Packet,
    ct: &lb_common::conntrack::CtValue,
    hop: Option<Result<lb_common::backend::NextHop, u32>>,
    now: u64,
    t: &Tunables,
) -> Result<u32, ()> {
    nat::rewrite(
        pkt,
        &Rewrite {
            src: &ct.snat_addr,
            dst: &ct.backend_addr,
            sport: ct.snat_port,
            dport: ct.backend_port,
        },
    )?;
    if pkt.is_tcp() {
        tcpts::shift(pkt, tcpts::Field::Val, ct.ts_delta);
    }
    stats::backend(ct.backend_id, Direction::ToBackend, pkt.len, hop.is_some());
    let hop = match hop {
        Some(h) => h,
        None => forward::next_hop(
            ctx,
            ct.backend_id,
            pkt.key.family,
            (&ct.snat_addr, &ct.backend_addr),
            now,
            t.next_hop_ttl_ns,
        ),
    };
    Ok(match hop {
        Ok(nh) => forward::send(ctx, pkt, nh.ifindex, &nh.smac, &nh.dmac),
        // Next hop unknown (e.g. no ARP/NDP entry yet): the kernel forwards the rewritten
        // packet and resolves the neighbour; the next packets take the fast path.
        Err(_) => pass(Stat::FibPass),
    })
}

/// [`to_client`] as a BPF subprogram: its stack frame is not added to the new-flow
/// program's, which alone comes close to the 512-byte limit. It returns the verdict itself
/// (`XDP_ABORTED` for an error): a `Result` can come back through the caller's stack, with a
/// stack pointer left in R0, which the verifier refuses at the subprogram's exit.
#[inline(never)]
fn to_client_call(
    ctx: &XdpContext,
    pkt: &Packet,
    r: *mut lb_common::conntrack::RnatValue,
    t: &Tunables,
) -> u32 {
    to_client::<false>(ctx, pkt, r, t).unwrap_or(XDP_ABORTED)
}

/// Backend → SNAT address:port: rewrite back to VIP → client and send it the way the client's
/// packets came in. `IN_MAIN`: inlined in the per-packet program, whose frame then leaves
/// room for the IPv6 rewrite as a subprogram; in [`to_client_call`] that would be a third
/// frame, so there the IPv6 rewrite is inlined as well.
#[inline(always)]
fn to_client<const IN_MAIN: bool>(
    ctx: &XdpContext,
    pkt: &Packet,
    r: *mut lb_common::conntrack::RnatValue,
    t: &Tunables,
) -> Result<u32, ()> {
    // SAFETY: LRU entry; fields are plain integers.
    let e = unsafe { &mut *r };
    let now = crate::clock::now();
    let proto = pkt.key.proto;
    if !conntrack::alive(e.last_seen_ns, e.state, proto, now, t) {
        return Ok(pass(Stat::NotOurs));
    }
    // Only the backend can answer: its packets come in where the route towards it goes out
    // (and from its next hop). Anything else claiming to be it is spoofed; passing it would
    // make the host reset the real flow at the backend, so it is dropped.
    // SAFETY: bounds-checked by `parse`.
    let src_mac = unsafe { (*pkt.eth).src_addr };
    if ctx.ingress_ifindex() as u32 != e.backend_ifindex
        || (e.backend_mac != [0; 6] && src_mac != e.backend_mac)
    {
        return Ok(drop(Stat::ReturnWrongSide));
    }
    if pkt.is_tcp() {
        let Some(seg) = pkt.tcp_segment() else {
            return Ok(pass(Stat::Malformed));
        };
        match lb_common::conntrack::window_ok(e.seq_synced != 0, e.seq_next, e.wscale, seg) {
            Some(next) => {
                // Written only when it moves: most return segments leave it as it is.
                if next != e.seq_next {
                    e.seq_next = next;
                }
                if e.seq_synced == 0
                    && seg.flags & (parse::TCP_SYN | parse::TCP_RST) == parse::TCP_SYN
                {
                    e.seq_synced = 1;
                }
                if e.signals & lb_common::conntrack::signal::ANSWERED == 0 {
                    signals::from_backend(e, &seg);
                }
            }
            // Before the backend's SYN-ACK, a plain ACK is its answer to the SYN from a
            // connection it still holds on this four-tuple: reset that connection.
            None if e.seq_synced == 0
                && seg.flags & (parse::TCP_SYN | parse::TCP_RST | parse::TCP_ACK)
                    == parse::TCP_ACK =>
            {
                return Ok(reset::stale_backend(ctx, pkt, seg.ack));
            }
            None => return Ok(drop(Stat::ReturnOutOfWindow)),
        }
    }
    if nat::ttl(pkt) <= 1 {
        return Ok(pass(Stat::TtlExceeded));
    }
    if conntrack::observe(
        &mut e.last_seen_ns,
        &mut e.state,
        pkt.tcp_flags,
        proto,
        false,
        now,
    ) {
        let fkey = conntrack::forward_key(e, &pkt.key);
        if let Some(c) = LB_CONNTRACK.get_ptr_mut(&fkey) {
            // SAFETY: as above.
            let c = unsafe { &mut *c };
            conntrack::sync(&mut c.last_seen_ns, &mut c.state, e.last_seen_ns, e.state);
        }
    }
    let rw = Rewrite {
        src: &e.vip_addr,
        dst: &e.client_addr,
        sport: e.vip_port,
        dport: e.client_port,
    };
    if IN_MAIN {
        nat::rewrite(pkt, &rw)?;
    } else {
        nat::rewrite_inlined(pkt, &rw)?;
    }
    if pkt.is_tcp() {
        tcpts::shift(pkt, tcpts::Field::Ecr, e.ts_delta.wrapping_neg());
    }
    stats::backend(e.backend_id, Direction::ToClient, pkt.len, false);
    Ok(forward::send(
        ctx,
        pkt,
        e.ifindex,
        &e.local_mac,
        &e.client_mac,
    ))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
