//! ICMP errors about NATed flows, translated so that they reach the flow's other end.
//!
//! A router (or the host itself) answers a packet it cannot deliver with an ICMP error that
//! quotes the packet's headers, sent to the packet's source. For a balanced flow that source
//! is the balancer: the SNAT address (a packet towards a backend) or the VIP (a packet
//! towards a client). Path-MTU discovery lives on these errors ("fragmentation needed"):
//! dropped or left to the host, the flow's true end never learns the path's MTU and a large
//! transfer hangs. So the error is rewritten as the NAT would have rewritten it had the flow
//! gone the other way — outer and quoted addresses, quoted ports, three checksums — and sent
//! on:
//!
//! - about a packet to a backend (quoted SNAT address:port → backend): to the client, from
//!   the VIP, quoting the client's own packet (client → VIP);
//! - about a packet to a client (quoted VIP → client): to the backend, from the SNAT address,
//!   quoting the backend's own packet (backend → SNAT address:port).
//!
//! Only errors whose outer and quoted IPv4 headers have no options are translated (the
//! offsets are then constant, which the verifier follows easily; the quoted header is one the
//! balancer sent, which has options only if the client's had). The quoted TCP checksum is
//! updated when the router quoted it; the quoted TCP options (a shifted timestamp) are left as
//! they are: no stack reads them.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, Tunables, csum::CsumDiff, flow::FlowKey, flow::v4,
    stats::Stat,
};

use crate::{
    conntrack, forward,
    maps::{LB_CONNTRACK, LB_REVERSE_NAT, LB_SCRATCH_KEY},
    parse::ptr_at,
    stats,
};

/// ICMP types that quote the packet they are about.
const DEST_UNREACH: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;

// Offsets in the frame (Ethernet, then IPv4 without options).
const IP: usize = 14;
const ICMP: usize = IP + 20;
const INNER_IP: usize = ICMP + 8;
const INNER_L4: usize = INNER_IP + 20;
/// Everything up to the quoted ports and the quoted UDP checksum (8 bytes of L4).
const QUOTED: usize = INNER_L4 + 8;
/// The quoted TCP checksum, when the router quoted that much.
const INNER_TCP_CSUM: usize = INNER_L4 + 16;

/// The frame's first `N` bytes, if it has them.
#[inline(always)]
pub(crate) fn head<const N: usize>(ctx: &XdpContext) -> Option<*mut [u8; N]> {
    ptr_at::<[u8; N]>(ctx, 0)
}

#[inline(always)]
fn addr(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

#[inline(always)]
pub(crate) fn word(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

#[inline(always)]
pub(crate) fn set_word(b: &mut [u8], at: usize, w: u16) {
    let w = w.to_ne_bytes();
    b[at] = w[0];
    b[at + 1] = w[1];
}

#[inline(always)]
fn set_addr(b: &mut [u8], at: usize, a: &[u8; 4]) {
    b[at] = a[0];
    b[at + 1] = a[1];
    b[at + 2] = a[2];
    b[at + 3] = a[3];
}

/// What [`translate`] did, in one register (a BPF subprogram returns one): the verdict for an
/// error sent to the client (or dropped), [`TO_BACKEND`] with the backend's id for one to be
/// sent towards a backend, or [`NOT_TRANSLATED`].
pub(crate) type Outcome = u64;
pub(crate) const NOT_TRANSLATED: Outcome = u64::MAX;
pub(crate) const TO_BACKEND: Outcome = 1 << 32;
/// With [`TO_BACKEND`]: a DSR backend's error, sent on untranslated (see `dsr::icmp`).
pub(crate) const UNTRANSLATED: Outcome = 1 << 33;

/// An ICMP packet, or an ICMPv6 error (the parser hands those here): an error about one of
/// the balancer's flows is translated (IPv6: `icmp6`) and sent on; anything else passes to
/// the host.
///
/// The translation is a subprogram of its own, so that its frame is not on the stack beside
/// the fib lookup's (the main program's frame leaves little room).
#[inline(always)]
pub fn handle(ctx: &XdpContext, t: &Tunables) -> u32 {
    let Some(h) = head::<{ ICMP + 8 }>(ctx) else {
        return pass(Stat::Malformed);
    };
    // SAFETY: the bytes are in bounds (checked just above).
    let (ty, ether_type) = unsafe { ((*h)[ICMP], [(*h)[12], (*h)[13]]) };
    let v6 = ether_type != [0x08, 0x00];
    let outcome = if v6 {
        crate::icmp6::translate(ctx, t)
    } else if ty != DEST_UNREACH && ty != TIME_EXCEEDED && ty != PARAMETER_PROBLEM {
        // Echo and the rest: the host's.
        return pass(Stat::NotOurs);
    } else {
        translate(ctx, t)
    };
    if outcome == NOT_TRANSLATED {
        return pass(Stat::IcmpNotTranslated);
    }
    if outcome < TO_BACKEND {
        return outcome as u32;
    }
    if outcome & UNTRANSLATED != 0 {
        return crate::dsr::send_icmp(ctx, outcome as u32, v6);
    }
    towards_backend(ctx, t, outcome as u32, v6)
}

/// Sends a translated error on towards backend `backend_id`: the rewritten outer header says
/// from where to where. A subprogram: the two addresses it reads are not in the main frame.
#[inline(never)]
fn towards_backend(ctx: &XdpContext, t: &Tunables, backend_id: u32, v6: bool) -> u32 {
    let (family, src, dst) = if v6 {
        let Some(b) = head::<{ crate::icmp6::OUTER }>(ctx) else {
            return XDP_DROP;
        };
        // SAFETY: in bounds (checked just above).
        let (src, dst) = crate::icmp6::outer(unsafe { &*b });
        (FAMILY_V6, src, dst)
    } else {
        let Some(b) = head::<ICMP>(ctx) else {
            return XDP_DROP;
        };
        // SAFETY: in bounds (checked just above).
        let b = unsafe { &*b };
        (FAMILY_V4, v4(addr(b, IP + 12)), v4(addr(b, IP + 16)))
    };
    let now = crate::clock::now();
    match forward::next_hop(
        ctx,
        backend_id,
        family,
        (&src, &dst),
        now,
        t.next_hop_ttl_ns,
    ) {
        Ok(nh) => forward::send_frame(ctx, nh.ifindex, &nh.smac, &nh.dmac),
        Err(_) => {
            stats::bump(Stat::FibPass);
            XDP_PASS
        }
    }
}

#[inline(always)]
fn pass(reason: Stat) -> u32 {
    stats::bump(reason);
    XDP_PASS
}

/// Translates an error quoting one of our flows' packets in place (see the module's doc).
#[inline(never)]
fn translate(ctx: &XdpContext, t: &Tunables) -> Outcome {
    let Some(b) = head::<QUOTED>(ctx) else {
        return NOT_TRANSLATED;
    };
    // SAFETY: in bounds (checked by `head`); nothing else holds a reference to the frame.
    let b = unsafe { &mut *b };
    // Outer and quoted headers: IPv4 without options, not fragments (a quoted fragment past
    // the first has no ports).
    if b[IP] != 0x45 || b[INNER_IP] != 0x45 {
        return NOT_TRANSLATED;
    }
    if word(b, IP + 6) & u16::to_be(0x3fff) != 0 || word(b, INNER_IP + 6) & u16::to_be(0x1fff) != 0
    {
        return NOT_TRANSLATED;
    }
    let proto = b[INNER_IP + 9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return NOT_TRANSLATED;
    }
    // An error goes to the source of the packet it quotes; anything else is not one the
    // path sent about our packet.
    if addr(b, IP + 16) != addr(b, INNER_IP + 12) {
        return NOT_TRANSLATED;
    }
    if b[IP + 8] <= 1 {
        stats::bump(Stat::TtlExceeded);
        return XDP_PASS as Outcome;
    }
    let Some(key) = LB_SCRATCH_KEY.get_ptr_mut(0) else {
        return NOT_TRANSLATED;
    };
    // SAFETY: this CPU's scratch slot: nothing else touches it while this runs.
    let key = unsafe { &mut *key };
    // The quoted packet, seen from where it was going: the key of the flow's entry for the
    // other direction.
    *key = FlowKey {
        src: v4(addr(b, INNER_IP + 16)),
        dst: v4(addr(b, INNER_IP + 12)),
        sport: word(b, INNER_L4 + 2),
        dport: word(b, INNER_L4),
        proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    let key: &FlowKey = key;
    let now = crate::clock::now();
    let sport = u16::from_be(key.dport);
    if sport >= t.snat_port_min && sport <= t.snat_port_max {
        // Quoted SNAT address:port → backend: a packet we sent to a backend.
        if let Some(r) = LB_REVERSE_NAT.get_ptr(key) {
            // SAFETY: LRU entry; plain integers, read in place (a copy would not fit the
            // stack beside the caller's frame).
            let r = unsafe { &*r };
            if !conntrack::alive(r.last_seen_ns, r.state, proto, now, t) {
                return NOT_TRANSLATED;
            }
            // From the backend's side only, as its own packets (see `to_client`).
            let src_mac = [b[6], b[7], b[8], b[9], b[10], b[11]];
            if ctx.ingress_ifindex() as u32 != r.backend_ifindex
                || (r.backend_mac != [0; 6] && src_mac != r.backend_mac)
            {
                stats::bump(Stat::ReturnWrongSide);
                return XDP_DROP as Outcome;
            }
            let vip = r.vip_addr.v4_octets();
            let client = r.client_addr.v4_octets();
            rewrite(
                b,
                ctx,
                (vip, client),
                (client, r.client_port),
                (vip, r.vip_port),
            );
            stats::bump(Stat::IcmpToClient);
            return forward::send_frame(ctx, r.ifindex, &r.local_mac, &r.client_mac) as Outcome;
        }
    }
    // Quoted VIP → client: a packet we sent to a client (or a DSR backend did).
    let Some(e) = LB_CONNTRACK.get_ptr(key) else {
        return crate::dsr::icmp_by_table(key);
    };
    // SAFETY: as above.
    let e = unsafe { &*e };
    if !conntrack::alive(e.last_seen_ns, e.state, proto, now, t) {
        return NOT_TRANSLATED;
    }
    if e.flags & lb_common::conntrack::CtValue::DSR != 0 {
        return crate::dsr::icmp(e.backend_id);
    }
    let (snat, backend) = (e.snat_addr.v4_octets(), e.backend_addr.v4_octets());
    rewrite(
        b,
        ctx,
        (snat, backend),
        (backend, e.backend_port),
        (snat, e.snat_port),
    );
    stats::bump(Stat::IcmpToBackend);
    TO_BACKEND | e.backend_id as Outcome
}

/// Rewrites the error in place: the outer addresses (`outer`: source, destination), the
/// quoted source and destination (address, port in network order), the quoted IPv4 and L4
/// checksums, the ICMP checksum (over everything quoted), the outer TTL and checksum.
#[inline(always)]
fn rewrite(
    b: &mut [u8; QUOTED],
    ctx: &XdpContext,
    outer: ([u8; 4], [u8; 4]),
    q_src: ([u8; 4], u16),
    q_dst: ([u8; 4], u16),
) {
    let q_addrs = CsumDiff::new()
        .bytes4(&b[INNER_IP + 12..INNER_IP + 16], &q_src.0)
        .bytes4(&b[INNER_IP + 16..INNER_IP + 20], &q_dst.0);
    let q_ip_old = word(b, INNER_IP + 10);
    let q_ip_new = q_addrs.apply(q_ip_old);
    let ports = CsumDiff::new()
        .word(word(b, INNER_L4), q_src.1)
        .word(word(b, INNER_L4 + 2), q_dst.1);
    // The quoted L4 checksum covers the pseudo-header (addresses) and the ports; the ICMP
    // checksum covers every quoted byte that changes, the quoted checksums included.
    let q_l4 = q_addrs.combine(ports);
    let mut icmp = q_l4.word(q_ip_old, q_ip_new);
    if b[INNER_IP + 9] == PROTO_UDP {
        let old = word(b, INNER_L4 + 6);
        let new = q_l4.apply_udp(old);
        icmp = icmp.word(old, new);
        set_word(b, INNER_L4 + 6, new);
    } else if let Some(c) = ptr_at::<[u8; 2]>(ctx, INNER_TCP_CSUM) {
        // SAFETY: in bounds (checked by `ptr_at`), and past `b`'s bytes.
        let c = unsafe { &mut *c };
        let old = word(c, 0);
        let new = q_l4.apply(old);
        icmp = icmp.word(old, new);
        set_word(c, 0, new);
    }
    set_addr(b, INNER_IP + 12, &q_src.0);
    set_addr(b, INNER_IP + 16, &q_dst.0);
    set_word(b, INNER_IP + 10, q_ip_new);
    set_word(b, INNER_L4, q_src.1);
    set_word(b, INNER_L4 + 2, q_dst.1);
    let icmp_csum = icmp.apply(word(b, ICMP + 2));
    set_word(b, ICMP + 2, icmp_csum);
    // Outer header: new addresses, one hop less.
    let old_ttl = word(b, IP + 8);
    b[IP + 8] -= 1;
    let check = CsumDiff::new()
        .bytes4(&b[IP + 12..IP + 16], &outer.0)
        .bytes4(&b[IP + 16..IP + 20], &outer.1)
        .word(old_ttl, word(b, IP + 8))
        .apply(word(b, IP + 10));
    set_word(b, IP + 10, check);
    set_addr(b, IP + 12, &outer.0);
    set_addr(b, IP + 16, &outer.1);
}
