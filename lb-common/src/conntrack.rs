//! Connection tracking and reverse-NAT entries.

use crate::flow::{FlowKey, IpBytes};

/// Flow state, as far as the balancer needs it for timeouts.
pub mod state {
    /// Only the client's SYN has been seen.
    pub const SYN: u8 = 0;
    /// The client has sent more than a SYN (or: a UDP flow).
    pub const ESTABLISHED: u8 = 1;
    /// A FIN or RST has been seen in either direction.
    pub const CLOSING: u8 = 2;
}

/// Which of a flow's L4 signals (connect failures, time to first byte) have been taken: bits
/// of [`CtValue::signals`] and [`RnatValue::signals`]. Each is taken once per flow, so only a
/// flow's first few packets do any of this work.
pub mod signal {
    /// Forward: the client's first payload was seen (its time is in the reverse entry's
    /// [`super::RnatValue::request_ns`]).
    pub const REQUEST: u8 = 1;
    /// Forward: a retransmission of the client's SYN was counted as a connect timeout.
    pub const TIMEOUT: u8 = 2;
    /// Return: the backend's first payload, or its reset, was seen: nothing more to measure.
    pub const ANSWERED: u8 = 1;
}

/// The XDP program refreshes an entry's `last_seen` at most this often: a write per packet
/// would bounce the entry's cache line between CPUs for no gain in precision. No idle timeout
/// is shorter (lbd's config refuses one), so an entry refreshed within it is alive.
pub const REFRESH_NS: u64 = 1_000_000_000;

/// How long the XDP program may use a CPU's cached copy of an established flow's conntrack
/// entry after taking it (its per-CPU flow cache, `lb-ebpf/src/flowcache.rs`). A new entry
/// under the key reaches the copies at once (a generation they are checked against); an
/// entry the LRU evicts does not, so a copy may outlive its entry by this long, and lbd's flow
/// collector leaves an orphaned flow's SNAT port alone for longer than this
/// (`dataplane/gc.rs`).
pub const FLOW_CACHE_TTL_NS: u64 = 250_000_000;

// A closed flow's copies must be gone before its SNAT port can go to another flow.
const _: () = assert!(FLOW_CACHE_TTL_NS < crate::Tunables::DEFAULT.tcp_closed_reuse_ns);

/// Slots of each CPU's flow cache (a power of two).
pub const FLOW_CACHE_SLOTS: u32 = 1 << FLOW_CACHE_BITS;
const FLOW_CACHE_BITS: u32 = 12;

/// The flow cache slot of flow `k`, in every CPU's cache and in the shared generations. Not
/// a strong hash: a collision costs a miss, never a wrong copy (the whole key is compared).
#[inline(always)]
pub const fn flow_cache_slot(k: &FlowKey) -> u32 {
    let a = k.src.lo ^ k.src.hi ^ k.dst.lo ^ k.dst.hi;
    let w = (a as u32) ^ ((a >> 32) as u32) ^ ((k.sport as u32) << 16 | k.dport as u32);
    w.wrapping_mul(0x9E37_79B1) >> (32 - FLOW_CACHE_BITS)
}

/// Forward direction (client → VIP): where the flow goes and as whom.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// The chosen backend's address (copied, so a reused backend id cannot redirect the flow).
    pub backend_addr: IpBytes,
    /// The SNAT source address towards the backend.
    pub snat_addr: IpBytes,
    /// Monotonic ns of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// The chosen backend's id (for counters and the next-hop cache).
    pub backend_id: u32,
    /// Backend port, network byte order.
    pub backend_port: u16,
    /// SNAT source port, network byte order.
    pub snat_port: u16,
    /// One of [`state`].
    pub state: u8,
    /// The id of the service the flow belongs to: a hit counts only while that service
    /// still listens on the port ([`crate::map_names::PORTS`]).
    pub service_id: u8,
    /// Bits of [`signal`] taken on the forward side.
    pub signals: u8,
    /// Bits of [`CtValue::DSR`].
    pub flags: u8,
    /// Added to the client's TCP timestamp (TSval) on the way to the backend: it makes the
    /// timestamps a backend sees on one SNAT address:port follow the balancer's clock from
    /// flow to flow (see `lb-ebpf`'s `tcpts`). 0 when the flow has none.
    pub ts_delta: u32,
}

const _: () = assert!(core::mem::size_of::<CtValue>() == 56);

impl CtValue {
    /// [`CtValue::flags`] bit: a direct-server-return flow. It has no SNAT port and no
    /// reverse entry (the backend answers the client directly); `snat_addr` is the VIP.
    pub const DSR: u8 = 1;
}

/// Return direction (backend → SNAT address:port): whom to give the packet back to, and how
/// to reach them (the client side's L2 as seen on the flow's first packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RnatValue {
    /// The client's address.
    pub client_addr: IpBytes,
    /// The VIP the client connected to.
    pub vip_addr: IpBytes,
    /// Monotonic ns of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// The backend's id (for counters).
    pub backend_id: u32,
    /// Interface the client's packets arrive on; replies leave through it.
    pub ifindex: u32,
    /// Client port, network byte order.
    pub client_port: u16,
    /// VIP port, network byte order.
    pub vip_port: u16,
    /// MAC of the client-side next hop (the client's packets' source MAC).
    pub client_mac: [u8; 6],
    /// Our MAC on that interface (the client's packets' destination MAC).
    pub local_mac: [u8; 6],
    /// One of [`state`].
    pub state: u8,
    /// Bits of [`signal`] taken on the return side.
    pub signals: u8,
    /// Explicit padding.
    pub _pad2: u16,
    /// The flow's [`CtValue::ts_delta`], taken back off the timestamp the backend echoes
    /// (TSecr) on the way to the client.
    pub ts_delta: u32,
    /// The interface the backend's packets must arrive on: where the route towards the
    /// backend pointed when the flow was created. 0 = no route then (nothing is accepted).
    /// Return traffic from anywhere else is spoofed: it is dropped, never translated.
    pub backend_ifindex: u32,
    /// TCP: before the backend's SYN-ACK, the acknowledgment number it must carry (the
    /// client's ISN + 1); after it, the backend's next sequence number (the highest
    /// `seq + len` seen from it). A return segment is translated only near it (see
    /// [`window_ok`]).
    pub seq_next: u32,
    /// The next hop's MAC towards the backend when the flow was created (all zero when the
    /// neighbour was not resolved yet: then only the interface is checked).
    pub backend_mac: [u8; 6],
    /// The client's TCP window scale (from its SYN; 14, the largest, when its options were
    /// not understood): a backend segment may lie at most `65535 << wscale` from `seq_next`.
    pub wscale: u8,
    /// 1 once the backend's SYN-ACK has set `seq_next`.
    pub seq_synced: u8,
    /// Monotonic ns (precise clock) of the client's first payload packet, 0 before it: the
    /// start of the backend's time to first byte.
    pub request_ns: u64,
}

const _: () = assert!(core::mem::size_of::<RnatValue>() == 96);

/// Whether an entry last seen at `last_seen` (monotonic ns) in state `st` is still alive at
/// `now`: the idle timeouts the XDP program and lbd both judge flows by.
#[inline(always)]
pub fn alive(last_seen: u64, st: u8, proto: u8, now: u64, t: &crate::Tunables) -> bool {
    let timeout = if proto != crate::PROTO_TCP {
        t.udp_timeout_ns
    } else if st == state::ESTABLISHED {
        t.tcp_established_timeout_ns
    } else if st == state::SYN {
        t.tcp_syn_timeout_ns
    } else {
        t.tcp_transient_timeout_ns
    };
    now.saturating_sub(last_seen) <= timeout
}

/// Whether the reverse-NAT entry `r` is a half-open flow whose port a new flow may take at
/// `now`: only its client's SYN seen, idle at least `tcp_syn_reclaim_ns`, still alive (a dead
/// entry is the flow collector's to remove, never replaced under it).
///
/// A real client answers the backend's SYN-ACK within its round trip; a spoofed SYN's
/// "client" never does. A port is wanted again only when the CPU's port walk towards that
/// backend comes back to it, about every `ports / new flows per second` (16 s for 1 000/s
/// with the default range): only a flood comes back within the reclaim age.
#[inline(always)]
pub fn half_open_reclaimable(r: &RnatValue, proto: u8, now: u64, t: &crate::Tunables) -> bool {
    proto == crate::PROTO_TCP
        && r.state == state::SYN
        && now.saturating_sub(r.last_seen_ns) >= t.tcp_syn_reclaim_ns
        && alive(r.last_seen_ns, r.state, proto, now, t)
}

/// The reverse-NAT key of a flow (backend → SNAT address:port), from its conntrack entry and
/// key (client → VIP).
#[inline(always)]
pub fn reverse_key(ct: &CtValue, client: &FlowKey) -> FlowKey {
    FlowKey {
        src: ct.backend_addr,
        dst: ct.snat_addr,
        sport: ct.backend_port,
        dport: ct.snat_port,
        proto: client.proto,
        family: client.family,
        _pad: 0,
    }
}

/// The conntrack key of a flow (client → VIP), from its reverse-NAT entry and key.
#[inline(always)]
pub fn forward_key(r: &RnatValue, backend: &FlowKey) -> FlowKey {
    FlowKey {
        src: r.client_addr,
        dst: r.vip_addr,
        sport: r.client_port,
        dport: r.vip_port,
        proto: backend.proto,
        family: backend.family,
        _pad: 0,
    }
}

/// Whether conntrack entry `ct` is the flow whose reverse-NAT key is `rkey` (backend → SNAT
/// address:port): the one test the XDP program (before it takes a half-open flow's port) and
/// lbd's flow collector (before it calls an entry orphaned) must agree on.
#[inline(always)]
pub fn holds(ct: &CtValue, rkey: &FlowKey) -> bool {
    ct.snat_port == rkey.dport
        && ct.backend_port == rkey.sport
        && ct.backend_addr == rkey.src
        && ct.snat_addr == rkey.dst
}

/// Whether a flow's SNAT port may go to a new flow: the flow is dead, or closed and idle long
/// enough that nothing but strays can still come. lbd's flow collector frees such ports.
#[inline(always)]
pub fn port_reusable(last_seen: u64, st: u8, proto: u8, now: u64, t: &crate::Tunables) -> bool {
    !alive(last_seen, st, proto, now, t)
        || (proto == crate::PROTO_TCP
            && st == state::CLOSING
            && now.saturating_sub(last_seen) > t.tcp_closed_reuse_ns)
}

/// Largest TCP window scale (RFC 7323).
pub const MAX_WSCALE: u8 = 14;

/// What a backend segment may be, given the flow's [`RnatValue::seq_next`] state: the
/// RFC 5961 idea applied by a middlebox that sees every segment of the backend's direction.
///
/// - Before the backend's SYN-ACK (`synced` false), only that SYN-ACK or a RST refusing the
///   SYN, each acknowledging exactly the client's SYN (`ack == seq_next`), is accepted.
/// - After it, a RST must sit exactly at `seq_next` (a blind attacker has a 1 in 2³² chance);
///   any other segment within the largest window the client can offer (`65535 << wscale`)
///   on either side of it: retransmissions reach back at most that far, and nothing the
///   backend sends can be further ahead.
///
/// Returns the new `seq_next` when the segment is accepted.
#[inline(always)]
pub const fn window_ok(synced: bool, seq_next: u32, wscale: u8, seg: Segment) -> Option<u32> {
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;
    if !synced {
        if seg.flags & ACK == 0 || seg.ack != seq_next {
            return None;
        }
        if seg.flags & SYN != 0 && seg.flags & RST == 0 {
            return Some(seg.seq.wrapping_add(1));
        }
        if seg.flags & RST != 0 {
            return Some(seq_next);
        }
        return None;
    }
    let d = seg.seq.wrapping_sub(seq_next) as i32;
    if seg.flags & RST != 0 {
        return if d == 0 { Some(seq_next) } else { None };
    }
    let ws = if wscale > MAX_WSCALE {
        MAX_WSCALE
    } else {
        wscale
    };
    let window = 65535u32 << ws;
    if d.unsigned_abs() > window {
        return None;
    }
    let end = seg
        .seq
        .wrapping_add(seg.payload_len)
        .wrapping_add((seg.flags & SYN != 0) as u32)
        .wrapping_add((seg.flags & FIN != 0) as u32);
    if (end.wrapping_sub(seq_next) as i32) > 0 {
        Some(end)
    } else {
        Some(seq_next)
    }
}

/// The fields of a TCP segment that [`window_ok`] judges.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    /// Sequence number (host order).
    pub seq: u32,
    /// Acknowledgment number (host order).
    pub ack: u32,
    /// TCP flags (byte 13).
    pub flags: u8,
    /// Payload bytes.
    pub payload_len: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;

    fn seg(seq: u32, ack: u32, flags: u8, payload_len: u32) -> Segment {
        Segment {
            seq,
            ack,
            flags,
            payload_len,
        }
    }

    #[test]
    fn before_the_syn_ack_only_an_answer_to_the_clients_syn_is_accepted() {
        // Client ISN 999: the backend must acknowledge 1000.
        assert_eq!(
            window_ok(false, 1000, 7, seg(5000, 1000, SYN | ACK, 0)),
            Some(5001)
        );
        assert_eq!(
            window_ok(false, 1000, 7, seg(0, 1000, RST | ACK, 0)),
            Some(1000)
        );
        assert_eq!(
            window_ok(false, 1000, 7, seg(5000, 1001, SYN | ACK, 0)),
            None
        );
        assert_eq!(window_ok(false, 1000, 7, seg(0, 0, RST, 0)), None);
        assert_eq!(window_ok(false, 1000, 7, seg(5000, 1000, ACK, 10)), None);
        assert_eq!(
            window_ok(false, 1000, 7, seg(5000, 1000, SYN | RST | ACK, 0)),
            Some(1000)
        );
    }

    #[test]
    fn a_reset_must_sit_exactly_at_the_next_sequence_number() {
        assert_eq!(
            window_ok(true, 5001, 7, seg(5001, 1, RST | ACK, 0)),
            Some(5001)
        );
        assert_eq!(window_ok(true, 5001, 7, seg(5002, 1, RST, 0)), None);
        assert_eq!(window_ok(true, 5001, 7, seg(5000, 1, RST, 0)), None);
        assert_eq!(
            window_ok(true, 5001, 7, seg(5001u32.wrapping_add(1 << 31), 1, RST, 0)),
            None
        );
    }

    #[test]
    fn data_is_accepted_within_the_clients_largest_window_and_advances_the_edge() {
        // New data advances seq_next, across the 2^32 wrap too.
        assert_eq!(window_ok(true, 5001, 0, seg(5001, 1, ACK, 100)), Some(5101));
        assert_eq!(
            window_ok(true, u32::MAX - 9, 0, seg(u32::MAX - 9, 1, ACK, 20)),
            Some(10)
        );
        // A retransmission of old data leaves it.
        assert_eq!(window_ok(true, 5101, 0, seg(5001, 1, ACK, 100)), Some(5101));
        // FIN counts one.
        assert_eq!(
            window_ok(true, 5101, 0, seg(5101, 1, FIN | ACK, 0)),
            Some(5102)
        );
        // Without scaling, 65535 either side and no more.
        assert_eq!(
            window_ok(true, 100_000, 0, seg(100_000 - 65535, 1, ACK, 0)),
            Some(100_000)
        );
        assert_eq!(
            window_ok(true, 100_000, 0, seg(100_000 - 65536, 1, ACK, 0)),
            None
        );
        assert_eq!(
            window_ok(true, 100_000, 0, seg(100_000 + 65536, 1, ACK, 0)),
            None
        );
        // With scale 7 the window is 8 MiB; an arbitrary guess is still far off.
        assert!(window_ok(true, 100_000, 7, seg(100_000 + (4 << 20), 1, ACK, 0)).is_some());
        assert_eq!(
            window_ok(true, 100_000, 7, seg(100_000 + (1 << 30), 1, ACK, 0)),
            None
        );
        // An out-of-range scale is capped at 14.
        assert_eq!(window_ok(true, 0, 200, seg(1 << 31, 1, ACK, 0)), None);
    }

    #[test]
    fn the_flows_of_one_client_or_one_port_spread_over_the_flow_cache() {
        extern crate std;
        let flow = |src: [u8; 4], sport: u16| FlowKey {
            src: crate::flow::v4(src),
            dst: crate::flow::v4([10, 99, 0, 10]),
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            _pad: 0,
        };
        let n = FLOW_CACHE_SLOTS as usize;
        let spread = |slots: std::collections::HashSet<u32>| {
            assert!(slots.iter().all(|&s| s < FLOW_CACHE_SLOTS));
            slots.len()
        };
        // As many flows as slots: random slots would fill 63 % of them.
        let one_client = (0..n as u16).map(|p| flow_cache_slot(&flow([10, 99, 1, 2], 32768 + p)));
        assert!(spread(one_client.collect()) > n * 3 / 5);
        let one_port =
            (0..n).map(|i| flow_cache_slot(&flow([10, 99, (i >> 8) as u8, i as u8], 40000)));
        assert!(spread(one_port.collect()) > n * 3 / 5);
    }
}
