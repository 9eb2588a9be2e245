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
}

/// Number of entries in the per-CPU XDP counter array.
pub const STAT_COUNT: u32 = 19;
