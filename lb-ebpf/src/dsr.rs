//! Direct server return (`forwarding = "dsr"`): a client packet goes to its backend unchanged
//! but for the Ethernet addresses and the TTL. The backend holds the VIP itself and answers
//! the client directly, so the balancer keeps no SNAT port and no reverse entry, and sees
//! only the client's half of the flow.
//!
//! What makes several balancer hosts interchangeable: a TCP packet without a flow here is
//! sent where the live table says — the backend every host with the same table picks — and
//! tracked from then on, instead of being reset. A host that takes over another's flows (an
//! ECMP router moved them) carries them on.
//!
//! An ICMP error about a packet a DSR backend sent to a client (a router's "fragmentation
//! needed" on the path back) is addressed to the VIP, so it arrives here; it belongs to that
//! backend, which holds the VIP: it is sent there as it is, one hop older. The backend is
//! the flow's, or — a flow this host never saw — the one the live table gives it.

use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use lb_common::{
    Tunables,
    conntrack::{CtValue, signal, state},
    service::ServiceValue,
    stats::Stat,
};

use crate::{
    conntrack, forward, guard,
    maps::{LB_CONNTRACK, LB_NEW_FLOW},
    nat,
    parse::{Packet, TCP_RST},
    select, signals,
    stats::{self, Direction},
};

/// A client packet of the DSR flow `e` (a conntrack hit whose TTL the caller checked).
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    e: &mut CtValue,
    syn: bool,
    now: u64,
    t: &Tunables,
) -> u32 {
    // The one L4 signal the client's half carries: its SYN again while the flow waits for
    // the backend's SYN-ACK (a connect timeout).
    if syn {
        signals::from_client(pkt, e, true);
    }
    conntrack::observe(
        &mut e.last_seen_ns,
        &mut e.state,
        pkt.tcp_flags,
        pkt.key.proto,
        true,
        now,
    );
    send(
        ctx,
        pkt,
        e.backend_id,
        (&e.snat_addr, &e.backend_addr),
        false,
        now,
        t,
    )
}

/// A packet to a DSR service without a flow here (TTL checked by the caller): a SYN, a UDP
/// datagram, or — unlike full-NAT — any other TCP packet opens a flow to the backend the live
/// table gives it, and is sent there. Inlined: its locals share the new-flow program's
/// frame with the full-NAT branch's (as a subprogram its frame, stacked between that one and
/// the fib lookup's, went past the 512-byte stack).
#[inline(always)]
pub fn open(ctx: &XdpContext, pkt: &Packet, svc: &ServiceValue, now: u64) -> u32 {
    let t = crate::maps::tunables();
    let tcp = pkt.is_tcp();
    let syn = tcp && conntrack::is_syn(pkt.tcp_flags);
    // A SYN is checked as in full-NAT (crafted ones take no state). Another packet is some
    // host's flow only if its source is a real client's.
    if syn {
        if let Err(reason) = guard::check_syn(ctx, pkt) {
            return crate::drop(reason);
        }
    }
    if let Err(reason) = guard::check_source(ctx, &pkt.key) {
        return crate::drop(reason);
    }
    let Some(f) = LB_NEW_FLOW.get_ptr_mut(0) else {
        return crate::drop(Stat::FlowNotCreated);
    };
    // SAFETY: this CPU's scratch slot: nothing else touches it while this runs.
    let f = unsafe { &mut *f };
    let id = match select::pick(svc, &pkt.key, &mut f.backend) {
        Ok(id) => id,
        // No backend: the host answers (a SYN gets a RST: nothing listens there).
        Err(_) => return crate::pass(Stat::NoBackend),
    };
    if tcp && !syn {
        stats::bump(Stat::DsrMissForwarded);
    }
    // A reset ends whatever flow it belonged to: forwarded, not tracked.
    if !tcp || pkt.tcp_flags & TCP_RST == 0 {
        f.ct = CtValue {
            backend_addr: f.backend.addr,
            snat_addr: svc.snat_addr,
            last_seen_ns: now,
            backend_id: id,
            backend_port: f.backend.port,
            snat_port: 0,
            state: if syn { state::SYN } else { state::ESTABLISHED },
            service_id: svc.id as u8,
            // A flow picked up mid-way has no request to time (and no reverse entry to time
            // it in).
            signals: if syn { 0 } else { signal::REQUEST },
            flags: CtValue::DSR,
            ts_delta: 0,
        };
        // Not stored (the map is full of live flows): the packet still goes where the table
        // says, as the flow's next packets will while the table stays.
        if LB_CONNTRACK.insert(&pkt.key, &f.ct, BPF_ANY as u64).is_ok() {
            // It may have replaced a full-NAT flow that other CPUs hold copies of.
            crate::flowcache::invalidate(crate::flowcache::slot_of(&pkt.key));
            stats::bump(Stat::NewFlow);
        }
    }
    // The addresses where they are (the scratch map, the caller's copy): no stack copies.
    send(
        ctx,
        pkt,
        id,
        (&svc.snat_addr, &f.backend.addr),
        true,
        now,
        t,
    )
}

/// Frames the packet for the backend and sends it: the backend must be on a directly
/// connected network, with its MAC known (else dropped: a packet still addressed to the VIP
/// cannot be handed to the kernel, which would deliver it to this host).
#[inline(always)]
fn send(
    ctx: &XdpContext,
    pkt: &Packet,
    backend_id: u32,
    addrs: (&lb_common::flow::IpBytes, &lb_common::flow::IpBytes),
    new_flow: bool,
    now: u64,
    t: &Tunables,
) -> u32 {
    match forward::on_link_hop(
        ctx,
        backend_id,
        pkt.key.family,
        addrs,
        now,
        t.next_hop_ttl_ns,
    ) {
        Ok(nh) => {
            nat::decrement_hop_limit(pkt);
            stats::backend(backend_id, Direction::ToBackend, pkt.len, new_flow);
            forward::send(ctx, pkt, nh.ifindex, &nh.smac, &nh.dmac)
        }
        Err(_) => crate::drop(Stat::DsrNotOnLink),
    }
}

/// The verdict-to-be of an ICMP error for DSR backend `backend_id` (see the module's doc).
#[inline(always)]
pub fn icmp(backend_id: u32) -> crate::icmp::Outcome {
    stats::bump(Stat::IcmpToBackend);
    crate::icmp::TO_BACKEND | crate::icmp::UNTRANSLATED | backend_id as crate::icmp::Outcome
}

/// An ICMP error quoting `key`'s reverse (VIP → client) with no flow here: for a DSR service,
/// the backend its live table gives the flow; else not ours.
#[inline(always)]
pub fn icmp_by_table(key: &lb_common::flow::FlowKey) -> crate::icmp::Outcome {
    let svc_key = lb_common::service::ServiceKey::of_flow(key);
    // SAFETY: read in place; userspace replaces values whole.
    let Some(svc) = (unsafe { crate::maps::LB_SERVICES.get(&svc_key) }) else {
        return crate::icmp::NOT_TRANSLATED;
    };
    if svc.flags & ServiceValue::DSR == 0 {
        return crate::icmp::NOT_TRANSLATED;
    }
    let Some(f) = LB_NEW_FLOW.get_ptr_mut(0) else {
        return crate::icmp::NOT_TRANSLATED;
    };
    // SAFETY: this CPU's scratch slot: nothing else touches it while this runs.
    let f = unsafe { &mut *f };
    match select::pick(svc, key, &mut f.backend) {
        Ok(id) => icmp(id),
        Err(_) => crate::icmp::NOT_TRANSLATED,
    }
}

/// Sends an ICMP error (whose outer TTL the caller checked) to DSR backend `backend_id`
/// unchanged but for one hop and the Ethernet addresses. A subprogram, as the translated
/// errors' sender is.
#[inline(never)]
pub fn send_icmp(ctx: &XdpContext, backend_id: u32, v6: bool) -> u32 {
    let t = crate::maps::tunables();
    let Some(be) = crate::maps::LB_BACKENDS.get(backend_id) else {
        return crate::drop(Stat::DsrNotOnLink);
    };
    let family = if v6 {
        lb_common::FAMILY_V6
    } else {
        lb_common::FAMILY_V4
    };
    // The outer destination is the VIP: the source of the route lookup towards the backend.
    let vip = if v6 {
        let Some(b) = crate::icmp::head::<{ crate::icmp6::OUTER }>(ctx) else {
            return crate::drop(Stat::Malformed);
        };
        // SAFETY: in bounds (checked just above); nothing else holds the frame.
        let b = unsafe { &mut *b };
        b[14 + 7] -= 1;
        crate::icmp6::outer(b).1
    } else {
        let Some(b) = crate::icmp::head::<34>(ctx) else {
            return crate::drop(Stat::Malformed);
        };
        // SAFETY: as above.
        let b = unsafe { &mut *b };
        let old = crate::icmp::word(b, 14 + 8);
        b[14 + 8] -= 1;
        let check = lb_common::csum::CsumDiff::new()
            .word(old, crate::icmp::word(b, 14 + 8))
            .apply(crate::icmp::word(b, 14 + 10));
        crate::icmp::set_word(b, 14 + 10, check);
        lb_common::flow::v4([b[30], b[31], b[32], b[33]])
    };
    let now = crate::clock::now();
    match forward::on_link_hop(
        ctx,
        backend_id,
        family,
        (&vip, &be.addr),
        now,
        t.next_hop_ttl_ns,
    ) {
        Ok(nh) => forward::send_frame(ctx, nh.ifindex, &nh.smac, &nh.dmac),
        Err(_) => crate::drop(Stat::DsrNotOnLink),
    }
}
