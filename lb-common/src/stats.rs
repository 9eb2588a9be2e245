//! Counters the XDP program keeps (per CPU; userspace sums them at scrape time).

/// Per-backend counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Packets client → backend.
    pub packets_to_backend: u64,
    /// Bytes (whole frames) client → backend.
    pub bytes_to_backend: u64,
    /// Packets backend → client.
    pub packets_to_client: u64,
    /// Bytes backend → client.
    pub bytes_to_client: u64,
    /// Flows created towards this backend.
    pub new_flows: u64,
}

const _: () = assert!(core::mem::size_of::<BackendStats>() == 40);

/// Buckets of the time-to-first-byte histogram (see [`first_byte_bucket`]).
pub const FIRST_BYTE_BUCKETS: usize = 40;

/// log2 of the first bucket's upper bound in ns (2^15 ns = 32.8 µs).
const FIRST_BYTE_MIN_LOG2: u32 = 15;

/// Per-backend L4 signals, measured on the few packets that carry them (SYN retransmissions,
/// the first payload each way, resets before the first byte).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4Stats {
    /// New flows the backend refused or reset before sending its first payload byte.
    pub connect_reset: u64,
    /// New flows whose client had to retransmit its SYN (no SYN-ACK came in time).
    pub connect_timeout: u64,
    /// Flows the backend answered: its first payload byte came (whoever spoke first).
    pub answered: u64,
    /// Sum of the time-to-first-byte samples, ns.
    pub first_byte_sum_ns: u64,
    /// Time-to-first-byte samples by bucket ([`first_byte_bucket`]).
    pub first_byte: [u64; FIRST_BYTE_BUCKETS],
}

impl Default for L4Stats {
    fn default() -> Self {
        L4Stats {
            connect_reset: 0,
            connect_timeout: 0,
            answered: 0,
            first_byte_sum_ns: 0,
            first_byte: [0; FIRST_BYTE_BUCKETS],
        }
    }
}

const _: () = assert!(core::mem::size_of::<L4Stats>() == 32 + 8 * FIRST_BYTE_BUCKETS);

impl L4Stats {
    /// Adds another CPU's (or interval's) counts to these.
    pub fn add(&mut self, o: &L4Stats) {
        self.connect_reset += o.connect_reset;
        self.connect_timeout += o.connect_timeout;
        self.answered += o.answered;
        self.first_byte_sum_ns += o.first_byte_sum_ns;
        let mut i = 0;
        while i < FIRST_BYTE_BUCKETS {
            self.first_byte[i] += o.first_byte[i];
            i += 1;
        }
    }

    /// Time-to-first-byte samples.
    pub fn first_byte_count(&self) -> u64 {
        let mut n = 0;
        let mut i = 0;
        while i < FIRST_BYTE_BUCKETS {
            n += self.first_byte[i];
            i += 1;
        }
        n
    }
}

/// The histogram bucket of a time to first byte: below 2^15 ns (32.8 µs) bucket 0; then two
/// buckets per power of two, split at 1.5 × 2^k (so neighbouring bounds differ by at most
/// 1.5×, fine enough for a p99 ratio gate); the last bucket takes everything from 2^34 ns
/// (17.2 s) on. Loop-free and without `leading_zeros` (no BPF instruction for it).
#[inline(always)]
pub const fn first_byte_bucket(ns: u64) -> usize {
    if ns < 1 << FIRST_BYTE_MIN_LOG2 {
        return 0;
    }
    let mut v = ns;
    let mut log = 0u32;
    if v >= 1 << 32 {
        v >>= 32;
        log += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        log += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        log += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        log += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        log += 2;
    }
    if v >= 1 << 1 {
        log += 1;
    }
    // The bit after the leading one: the upper half of the octave.
    let upper = ((ns >> (log - 1)) & 1) as usize;
    let i = 1 + (log - FIRST_BYTE_MIN_LOG2) as usize * 2 + upper;
    if i >= FIRST_BYTE_BUCKETS {
        FIRST_BYTE_BUCKETS - 1
    } else {
        i
    }
}

/// The upper bound of bucket `i` in ns (`None` for the last, which is unbounded).
pub const fn first_byte_bound_ns(i: usize) -> Option<u64> {
    if i == 0 {
        return Some(1 << FIRST_BYTE_MIN_LOG2);
    }
    if i >= FIRST_BYTE_BUCKETS - 1 {
        return None;
    }
    let k = FIRST_BYTE_MIN_LOG2 + ((i - 1) / 2) as u32;
    Some(if (i - 1) & 1 == 0 {
        (1u64 << k) + (1u64 << (k - 1))
    } else {
        1u64 << (k + 1)
    })
}

/// Indexes into the per-CPU XDP counter array. The first five are the XDP verdicts (same
/// numbers as the kernel's `XDP_*`), the rest say why a packet got its verdict.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Verdict XDP_ABORTED (a bug or a failed helper).
    Aborted = 0,
    /// Verdict XDP_DROP.
    Drop = 1,
    /// Verdict XDP_PASS.
    Pass = 2,
    /// Verdict XDP_TX.
    Tx = 3,
    /// Verdict XDP_REDIRECT.
    Redirect = 4,
    /// Passed: not IPv4/TCP/UDP, or not for a VIP nor a SNAT flow.
    NotOurs = 5,
    /// Passed: header cut short (the kernel decides what to do with it).
    Malformed = 6,
    /// Passed: an IP fragment to a VIP (not balanced; see the README).
    Fragment = 7,
    /// Passed: TCP non-SYN to a VIP with no flow (the host answers with a RST).
    NonSynMiss = 8,
    /// Passed: new flow but the service has no backend (the host answers with a RST).
    NoBackend = 9,
    /// Passed after NAT: the next hop is not resolved yet, the kernel resolves and sends it.
    FibPass = 10,
    /// Dropped: no free SNAT port towards that backend, or the flow could not be stored
    /// (the client retries its SYN).
    FlowNotCreated = 11,
    /// Passed: TTL would expire (the kernel sends the ICMP error).
    TtlExceeded = 12,
    /// New flows created.
    NewFlow = 13,
    /// Dropped: return traffic for a flow that did not come from the backend's side (another
    /// interface or next hop than the route towards the backend): spoofed. Dropped, not
    /// passed, because the host would answer it with a RST to the real backend.
    ReturnWrongSide = 14,
    /// Dropped: a backend segment outside the flow's sequence window, or a RST not exactly
    /// at the next sequence number (RFC 5961), or anything but a SYN-ACK/RST before the
    /// backend's SYN-ACK.
    ReturnOutOfWindow = 15,
    /// Dropped: a SYN from a source no real client has (martian: 0/8, 127/8, multicast,
    /// reserved, broadcast; the VIPs and SNAT addresses themselves — "land"; the backends'
    /// subnets arriving on another interface than theirs).
    SpoofedSource = 16,
    /// Dropped: a SYN with FIN, RST or URG also set.
    BadTcpFlags = 17,
    /// Dropped: a SYN whose data offset is below 5 or past the packet, or whose options do
    /// not parse (a length below 2 or past the header).
    BadTcpHeader = 18,
    /// Passed: an ICMP error that quotes no live flow of ours (or whose outer or quoted
    /// header has IPv4 options or the ICMPv6 error an extension header, or is cut short
    /// before the quoted ports).
    IcmpNotTranslated = 19,
    /// An ICMP error about a packet sent to a backend, translated and sent to its client
    /// (e.g. "fragmentation needed" from a router on the backends' side).
    IcmpToClient = 20,
    /// An ICMP error about a packet sent to a client, translated and sent to its backend.
    IcmpToBackend = 21,
    /// A flow whose reverse-NAT entry was evicted (its SNAT port then looks free, and may
    /// already be another flow's) ended at its next client packet: its conntrack entry is
    /// removed and the packet handled as one without a flow (TCP: passed, the host resets;
    /// UDP: a new flow). Never two flows on one port.
    FlowLostPort = 22,
    /// Passed: an IPv6 packet whose extension headers the balancer does not walk (more than
    /// four, a routing header with segments left, AH, ESP, or one cut short); the kernel
    /// handles it.
    Ipv6ExtUnhandled = 23,
    /// A new flow took the SNAT port of a half-open flow (only a SYN seen from its client, for
    /// at least [`crate::conntrack::SYN_RECLAIM_NS`]): what keeps a SYN flood from holding
    /// every port.
    HalfOpenReclaimed = 24,
    /// DSR: a TCP packet other than a SYN to a VIP with no flow on this host, sent to the
    /// backend the live table gives it (the one every host with the same table picks), and
    /// tracked from then on: a flow that another balancer host carried until it failed, or
    /// whose entry was evicted here.
    DsrMissForwarded = 25,
    /// Dropped: DSR towards a backend whose MAC is not known yet (no ARP/NDP entry) or that
    /// is not on a directly connected network (its route has a gateway). A DSR packet keeps
    /// the VIP as its destination, so the kernel cannot forward it in the balancer's place.
    DsrNotOnLink = 26,
    /// Sent back to a backend: a reset for a connection it still held on the SNAT
    /// address:port of a flow that has not had its SYN-ACK yet — it answered that flow's SYN
    /// with an ACK of the old connection. The client's retransmitted SYN then opens the new
    /// one (see `lb-ebpf/src/reset.rs`).
    BackendStaleReset = 27,
}

/// Number of counters in the per-CPU XDP counter array (verdicts, then [`Stat`]s).
pub const STAT_COUNT: u32 = 28;

/// Entries of the counter array: room for counters added later without changing the
/// pinned map's size (which makes lbd refuse the pins until `lbd down`).
pub const STAT_SLOTS: u32 = 64;
const _: () = assert!(STAT_COUNT <= STAT_SLOTS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_time_lands_below_its_buckets_bound_and_above_the_previous_one() {
        let mut ns = 1u64;
        while ns < 1 << 40 {
            for t in [ns, ns + ns / 3, ns + ns / 2, ns * 2 - 1] {
                let i = first_byte_bucket(t);
                if let Some(hi) = first_byte_bound_ns(i) {
                    assert!(t < hi, "{t} ns in bucket {i} bounded by {hi}");
                }
                if i > 0 {
                    let lo = first_byte_bound_ns(i - 1).unwrap();
                    assert!(t >= lo, "{t} ns in bucket {i} but below {lo}");
                }
            }
            ns *= 2;
        }
    }

    #[test]
    fn the_buckets_span_50_us_to_10_s_with_at_most_1_5x_between_bounds() {
        assert!(first_byte_bound_ns(0).unwrap() < 50_000);
        let last = first_byte_bound_ns(FIRST_BYTE_BUCKETS - 2).unwrap();
        assert!(last > 10_000_000_000, "{last}");
        for i in 1..FIRST_BYTE_BUCKETS - 1 {
            let (lo, hi) = (
                first_byte_bound_ns(i - 1).unwrap() as f64,
                first_byte_bound_ns(i).unwrap() as f64,
            );
            assert!(hi / lo <= 1.5 + 1e-9 && hi > lo, "bucket {i}: {lo}..{hi}");
        }
        assert_eq!(
            first_byte_bucket(90_000_000),
            first_byte_bucket(100_000_000)
        );
        assert_ne!(
            first_byte_bucket(100_000_000),
            first_byte_bucket(200_000_000)
        );
        assert_eq!(first_byte_bucket(u64::MAX), FIRST_BYTE_BUCKETS - 1);
    }
}
