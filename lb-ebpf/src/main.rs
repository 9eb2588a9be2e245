//! lb's data plane: an XDP full-NAT layer-4 balancer.
//!
//! Per packet: parse → VIP? (conntrack hit, or a SYN → Maglev bucket → backend, new flow) →
//! full-NAT rewrite → cached next hop → TX/REDIRECT. Return traffic (backend → SNAT
//! address:port) is reverse-NATed back to the client; ICMP errors about a flow are translated
//! to its other end (`icmp`). Everything else is passed to the kernel untouched. Tables, weights and health are userspace's business; this program only reads them.
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod guard;
mod icmp;
mod maps;
mod nat;
mod parse;
mod select;
mod signals;
mod stats;
mod tcpts;

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_coarse_ns,
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
    let action = match try_balance(&ctx) {
        Ok(a) => a,
        Err(()) => XDP_ABORTED,
    };
    // The verdicts are the first entries of the counter array.
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
    let dport = u16::from_be(pkt.key.dport);
    let t = maps::tunables();
    // An array lookup (inlined by the verifier) instead of hashing a service key for every
    // packet: packets to other ports, or to other addresses on a served port, end here.
    if let Some(on_port) = LB_PORTS.get(dport as u32) {
        let dst_v4 = if pkt.key.family == FAMILY_V4 {
            u32::from_ne_bytes(pkt.key.dst.v4_octets())
        } else {
            0
        };
        if on_port.may_serve(dst_v4) {
            if let Some(action) = to_backend(ctx, &pkt, on_port.ids, t)? {
                return Ok(action);
            }
        }
    }
    if dport >= t.snat_port_min && dport <= t.snat_port_max {
        if let Some(r) = LB_REVERSE_NAT.get_ptr_mut(&pkt.key) {
            return to_client(ctx, &pkt, r, t);
        }
    }
    Ok(pass(Stat::NotOurs))
}

/// Client → VIP: find or create the flow, rewrite towards its backend, send. `None` when
/// the packet belongs to no service (the port is served, but not at this address).
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    services_on_port: u32,
    t: &Tunables,
) -> Result<Option<u32>, ()> {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let proto = pkt.key.proto;
    let syn = pkt.is_tcp() && conntrack::is_syn(pkt.tcp_flags);
    // Conntrack first: a hit needs no service lookup, only the check that its service still
    // listens here (a removed service's flows end, as they would without the entry).
    let existing = LB_CONNTRACK.get_ptr_mut(&pkt.key).and_then(|p| {
        // SAFETY: LRU entry; fields are plain integers, races only lose a refresh.
        let e = unsafe { &mut *p };
        let reusable = conntrack::alive(e.last_seen_ns, e.state, proto, now, t)
            && !(syn && e.state == lb_common::conntrack::state::CLOSING)
            && services_on_port
                .checked_shr(e.service_id as u32)
                .is_some_and(|m| m & 1 != 0);
        reusable.then_some(e)
    });
    let mut new_flow = false;
    let mut hop = None;
    let ct = match existing {
        Some(e) => {
            if nat::ttl(pkt) <= 1 {
                return Ok(Some(pass(Stat::TtlExceeded)));
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
            &*e
        }
        None => {
            let svc_key = ServiceKey {
                addr: pkt.key.dst,
                port: pkt.key.dport,
                proto: pkt.key.proto,
                family: pkt.key.family,
                _pad: 0,
            };
            // SAFETY: userspace replaces service values whole (an atomic element swap);
            // copied at once.
            let Some(svc) = (unsafe { LB_SERVICES.get(&svc_key) }).copied() else {
                return Ok(None);
            };
            if nat::ttl(pkt) <= 1 {
                return Ok(Some(pass(Stat::TtlExceeded)));
            }
            if pkt.is_tcp() && !syn {
                // No flow: the host's stack answers with a RST (the VIP is a local address),
                // so the client learns at once instead of retransmitting into a void.
                return Ok(Some(pass(Stat::NonSynMiss)));
            }
            // Only what a real client sends opens a flow: crafted SYNs are dropped before
            // they take any state (passed, the host would answer them).
            let wscale = if pkt.is_tcp() {
                match guard::check_syn(ctx, pkt) {
                    Ok(w) => w,
                    Err(reason) => return Ok(Some(drop(reason))),
                }
            } else {
                0
            };
            if let Err(reason) = guard::check_source(ctx, &pkt.key) {
                return Ok(Some(drop(reason)));
            }
            let Some(f) = maps::LB_NEW_FLOW.get_ptr_mut(0) else {
                return Ok(Some(drop(Stat::FlowNotCreated)));
            };
            // SAFETY: this CPU's scratch slot: nothing else touches it while this runs.
            let f = unsafe { &mut *f };
            f.backend_id = match select::pick(&svc, &pkt.key, &mut f.backend) {
                Ok(id) => id,
                // No backend: the host answers the SYN with a RST (nothing listens there).
                Err(_) => return Ok(Some(pass(Stat::NoBackend))),
            };
            // The route towards the backend, now: where its answers must come from.
            match forward::next_hop(
                ctx,
                f.backend_id,
                svc.snat_addr.v4_octets(),
                f.backend.addr.v4_octets(),
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
            match select::new_flow(ctx, pkt, &svc, t, wscale as u32) {
                Ok(()) => {
                    new_flow = true;
                    hop = Some(if f.routed != 0 { Ok(f.hop) } else { Err(0) });
                    stats::bump(Stat::NewFlow);
                    &f.ct
                }
                Err(reason) => {
                    stats::bump(reason);
                    return Ok(Some(XDP_DROP));
                }
            }
        }
    };
    let src = ct.snat_addr.v4_octets();
    let dst = ct.backend_addr.v4_octets();
    nat::rewrite(
        pkt,
        &Rewrite {
            src,
            dst,
            sport: ct.snat_port,
            dport: ct.backend_port,
        },
    )?;
    if pkt.is_tcp() {
        tcpts::shift(pkt, tcpts::Field::Val, ct.ts_delta);
    }
    stats::backend(ct.backend_id, Direction::ToBackend, pkt.len, new_flow);
    let hop = match hop {
        Some(h) => h,
        None => forward::next_hop(ctx, ct.backend_id, src, dst, now, t.next_hop_ttl_ns),
    };
    Ok(Some(match hop {
        Ok(nh) => forward::send(ctx, pkt, nh.ifindex, &nh.smac, &nh.dmac),
        // Next hop unknown (e.g. no ARP entry yet): the kernel forwards the rewritten packet
        // and resolves the neighbour; the next packets take the fast path.
        Err(_) => pass(Stat::FibPass),
    }))
}

/// Backend → SNAT address:port: rewrite back to VIP → client and send it the way the client's
/// packets came in. A function of its own (a BPF subprogram): its stack frame is not added
/// to the new-flow path's, which alone comes close to the 512-byte limit.
#[inline(never)]
fn to_client(
    ctx: &XdpContext,
    pkt: &Packet,
    r: *mut lb_common::conntrack::RnatValue,
    t: &Tunables,
) -> Result<u32, ()> {
    // SAFETY: LRU entry; fields are plain integers.
    let e = unsafe { &mut *r };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
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
    nat::rewrite(
        pkt,
        &Rewrite {
            src: e.vip_addr.v4_octets(),
            dst: e.client_addr.v4_octets(),
            sport: e.vip_port,
            dport: e.client_port,
        },
    )?;
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
