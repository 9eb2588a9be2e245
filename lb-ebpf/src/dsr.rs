//! Direct server return (`forwarding = "dsr"`): a client packet goes to its backend unchanged
//! but for the Ethernet addresses and the TTL. The backend holds the VIP itself and answers
//! the client directly, so the balancer keeps no SNAT port and no reverse entry, and sees
//! only the client's half of the flow.
//!
//! What makes several balancer hosts interchangeable: a TCP packet without a flow here is
//! sent where the live table says — the backend every host with the same table picks — and
//! tracked from then on, instead of being reset. A host that takes over another's flows (an
//! ECMP router moved them) carries them on.

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
