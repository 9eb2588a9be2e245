//! ICMPv6 errors about NATed flows, translated as `icmp` translates IPv4 ones: above all
//! "packet too big", on which IPv6 path-MTU discovery depends (IPv6 routers never fragment).
//!
//! Only errors with no extension header, outside or in the quoted packet, are translated (the
//! offsets are then constant; the quoted packet is one the balancer sent). IPv6 has no header
//! checksum; the ICMPv6 checksum covers a pseudo-header with the outer addresses, so it
//! changes with them as well as with the quoted addresses, ports and L4 checksum.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V6, PROTO_TCP, PROTO_UDP, Tunables,
    csum::CsumDiff,
    flow::{FlowKey, IpBytes},
    stats::Stat,
};

use crate::{
    conntrack,
    icmp::{NOT_TRANSLATED, Outcome, TO_BACKEND, head, set_word, word},
    maps::{LB_CONNTRACK, LB_REVERSE_NAT, LB_SCRATCH_KEY},
    parse::ptr_at,
    stats,
};

/// ICMPv6 error types that quote the packet they are about: destination unreachable, packet
/// too big, time exceeded, parameter problem.
const ERRORS: core::ops::RangeInclusive<u8> = 1..=4;
const NH_ICMPV6: u8 = 58;

// Offsets in the frame (Ethernet, then IPv6 without extension headers).
const IP: usize = 14;
const ICMP: usize = IP + 40;
const INNER_IP: usize = ICMP + 8;
const INNER_L4: usize = INNER_IP + 40;
/// Everything up to the quoted ports and the quoted UDP checksum (8 bytes of L4).
const QUOTED: usize = INNER_L4 + 8;
/// The quoted TCP checksum, when the router quoted that much.
const INNER_TCP_CSUM: usize = INNER_L4 + 16;

/// The 16-byte address at `at`.
#[inline(always)]
fn addr(b: &[u8], at: usize) -> IpBytes {
    let mut a = IpBytes { lo: 0, hi: 0 };
    for i in 0..4 {
        a.lo |= (word(b, at + 2 * i) as u64) << (16 * i);
        a.hi |= (word(b, at + 8 + 2 * i) as u64) << (16 * i);
    }
    a
}

/// Word `i` (0–7) of an address, as [`word`] reads it from the packet (`IpBytes` holds the
/// address bytes in memory order, and BPF is little-endian).
#[inline(always)]
fn addr_word(a: &IpBytes, i: usize) -> u16 {
    let half = if i < 4 { a.lo } else { a.hi };
    (half >> (16 * (i % 4))) as u16
}

/// Writes `a` at `at`, adding the change to `d`.
#[inline(always)]
fn set_addr(b: &mut [u8], at: usize, a: &IpBytes, mut d: CsumDiff) -> CsumDiff {
    for i in 0..8 {
        let new = addr_word(a, i);
        d = d.word(word(b, at + 2 * i), new);
        set_word(b, at + 2 * i, new);
    }
    d
}

/// Translates an ICMPv6 error quoting one of our flows' packets in place; the outcome as
/// `icmp`'s translation gives it.
#[inline(never)]
pub fn translate(ctx: &XdpContext, t: &Tunables) -> Outcome {
    let Some(b) = head::<QUOTED>(ctx) else {
        return NOT_TRANSLATED;
    };
    // SAFETY: in bounds (checked by `head`); nothing else holds a reference to the frame.
    let b = unsafe { &mut *b };
    if b[IP + 6] != NH_ICMPV6 || !ERRORS.contains(&b[ICMP]) || b[INNER_IP] >> 4 != 6 {
        return NOT_TRANSLATED;
    }
    let proto = b[INNER_IP + 6];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return NOT_TRANSLATED;
    }
    // An error goes to the source of the packet it quotes.
    if (0..8).any(|i| word(b, IP + 24 + 2 * i) != word(b, INNER_IP + 8 + 2 * i)) {
        return NOT_TRANSLATED;
    }
    if b[IP + 7] <= 1 {
        stats::bump(Stat::TtlExceeded);
        return XDP_PASS as Outcome;
    }
    let Some(key) = LB_SCRATCH_KEY.get_ptr_mut(0) else {
        return NOT_TRANSLATED;
    };
    // SAFETY: this CPU's scratch slot: nothing else touches it while this runs.
    let key = unsafe { &mut *key };
    // The quoted packet, seen from where it was going.
    *key = FlowKey {
        src: addr(b, INNER_IP + 24),
        dst: addr(b, INNER_IP + 8),
        sport: word(b, INNER_L4 + 2),
        dport: word(b, INNER_L4),
        proto,
        family: FAMILY_V6,
        _pad: 0,
    };
    let key: &FlowKey = key;
    let now = crate::clock::now();
    let sport = u16::from_be(key.dport);
    if sport >= t.snat_port_min && sport <= t.snat_port_max {
        // Quoted SNAT address:port → backend: a packet we sent to a backend.
        if let Some(r) = LB_REVERSE_NAT.get_ptr(key) {
            // SAFETY: plain integers, read in place.
            let r = unsafe { &*r };
            if !conntrack::alive(r.last_seen_ns, r.state, proto, now, t) {
                return NOT_TRANSLATED;
            }
            let src_mac = [b[6], b[7], b[8], b[9], b[10], b[11]];
            if ctx.ingress_ifindex() as u32 != r.backend_ifindex
                || (r.backend_mac != [0; 6] && src_mac != r.backend_mac)
            {
                stats::bump(Stat::ReturnWrongSide);
                return XDP_DROP as Outcome;
            }
            rewrite(
                b,
                ctx,
                (&r.vip_addr, &r.client_addr),
                (&r.client_addr, r.client_port),
                (&r.vip_addr, r.vip_port),
            );
            stats::bump(Stat::IcmpToClient);
            return crate::forward::send_frame(ctx, r.ifindex, &r.local_mac, &r.client_mac)
                as Outcome;
        }
    }
    // Quoted VIP → client: a packet we sent to a client.
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
    rewrite(
        b,
        ctx,
        (&e.snat_addr, &e.backend_addr),
        (&e.backend_addr, e.backend_port),
        (&e.snat_addr, e.snat_port),
    );
    stats::bump(Stat::IcmpToBackend);
    TO_BACKEND | e.backend_id as Outcome
}

/// Rewrites the error in place: outer addresses (source, destination), quoted source and
/// destination (address, port in network order), the quoted L4 checksum, the ICMPv6
/// checksum (pseudo-header and everything quoted), the outer hop limit.
#[inline(always)]
fn rewrite(
    b: &mut [u8; QUOTED],
    ctx: &XdpContext,
    outer: (&IpBytes, &IpBytes),
    q_src: (&IpBytes, u16),
    q_dst: (&IpBytes, u16),
) {
    // The quoted L4 checksum covers the quoted addresses (its pseudo-header) and ports.
    let q_addrs = set_addr(b, INNER_IP + 8, q_src.0, CsumDiff::new());
    let q_addrs = set_addr(b, INNER_IP + 24, q_dst.0, q_addrs);
    let q_l4 = q_addrs
        .word(word(b, INNER_L4), q_src.1)
        .word(word(b, INNER_L4 + 2), q_dst.1);
    set_word(b, INNER_L4, q_src.1);
    set_word(b, INNER_L4 + 2, q_dst.1);
    // The ICMPv6 checksum: all of that, the quoted checksum's change and the outer addresses.
    let mut icmp = q_l4;
    if b[INNER_IP + 6] == PROTO_UDP {
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
    let icmp = set_addr(b, IP + 8, outer.0, icmp);
    let icmp = set_addr(b, IP + 24, outer.1, icmp);
    let icmp_csum = icmp.apply(word(b, ICMP + 2));
    set_word(b, ICMP + 2, icmp_csum);
    b[IP + 7] -= 1;
}

/// The outer addresses (source, destination) of a translated IPv6 error, for its next hop.
#[inline(always)]
pub fn outer(b: &[u8; ICMP]) -> (IpBytes, IpBytes) {
    (addr(b, IP + 8), addr(b, IP + 24))
}

/// Bytes [`outer`] reads.
pub const OUTER: usize = ICMP;
