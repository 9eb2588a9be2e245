//! Types and pure functions shared by the XDP program (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Everything here is `no_std`, `#[repr(C)]` and `Copy`, with explicit padding and a
//! compile-time size check, so both sides agree on every byte of every map key and value.
//! With the `user` feature the types implement `aya::Pod`.
#![no_std]

pub mod backend;
pub mod conntrack;
pub mod csum;
pub mod flow;
pub mod guard;
pub mod hash;
pub mod layout;
pub mod service;
pub mod stats;

/// Number of buckets in one Maglev table (prime, so every backend's permutation is complete).
pub const TABLE_SIZE: u32 = 65537;
/// Most connection-mode services one data plane serves (each has two table slots).
pub const MAX_SERVICES: u32 = 16;
// A service's id is one bit of a port's mask in `map_names::PORTS`.
const _: () = assert!(MAX_SERVICES <= 32);
/// Backend ids are `1..MAX_BACKENDS`; id 0 means "no backend".
pub const MAX_BACKENDS: u32 = 4096;
/// The reserved backend id: an empty bucket.
pub const NO_BACKEND: u32 = 0;
/// Default number of flows the conntrack and reverse-NAT maps hold.
pub const DEFAULT_CONNTRACK_MAX: u32 = 262_144;

/// `AF_INET` as the kernel spells it (in `family` fields).
pub const FAMILY_V4: u8 = 2;
/// `AF_INET6`.
pub const FAMILY_V6: u8 = 10;
/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
/// IPv4 protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol numbers.
pub const PROTO_UDP: u8 = 17;

/// Map names, used by the kernel side (`#[map(name = ..)]`) and by userspace to find and pin them.
pub mod map_names {
    /// Services: [`crate::service::ServiceKey`] → [`crate::service::ServiceValue`].
    pub const SERVICES: &str = "LB_SERVICES";
    /// Service ports: destination port (host order) → [`crate::service::PortServices`] (the
    /// ids of the services on it, and their VIP when it is just one). Lets packets to other
    /// ports and addresses skip the services lookup, and a conntrack hit stand without it.
    pub const PORTS: &str = "LB_PORTS";
    /// Maglev tables: `service id * 2 + slot` → [`crate::service::MaglevTable`].
    pub const TABLES: &str = "LB_TABLES";
    /// Backends: backend id → [`crate::backend::BackendInfo`].
    pub const BACKENDS: &str = "LB_BACKENDS";
    /// Forward conntrack: client-side [`crate::flow::FlowKey`] → [`crate::conntrack::CtValue`].
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    /// Reverse NAT: backend-side [`crate::flow::FlowKey`] → [`crate::conntrack::RnatValue`].
    pub const REVERSE_NAT: &str = "LB_REVERSE_NAT";
    /// Per-CPU next hop towards each backend: backend id → [`crate::backend::NextHop`].
    pub const NEXT_HOPS: &str = "LB_NEXT_HOPS";
    /// Per-CPU counters per backend: backend id → [`crate::stats::BackendStats`].
    pub const BACKEND_STATS: &str = "LB_BACKEND_STATS";
    /// Per-CPU array: backend id → L4 signals (connect failures, time to first byte).
    pub const BACKEND_L4: &str = "LB_BACKEND_L4";
    /// Per-CPU counters of XDP verdicts and reasons: [`crate::stats::Stat`] index → u64.
    pub const XDP_STATS: &str = "LB_XDP_STATS";
    /// Source guard (LPM trie): [`crate::guard::SourceAddr`] prefix →
    /// [`crate::guard::SourceRule`] (where SYNs from it may come from, if anywhere).
    pub const SOURCES: &str = "LB_SOURCES";
    /// See [`crate::layout::PROGRAMS`].
    pub const PROGRAMS: &str = "LB_PROGRAMS";
}

/// Name of the load-time global holding [`Tunables`].
pub const TUNABLES_GLOBAL: &str = "LB_TUNABLES";

/// Settings fixed when the program is loaded (read-only data, so the verifier sees constants).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunables {
    /// Lowest SNAT source port (host order). Must lie outside the host's ephemeral range.
    pub snat_port_min: u16,
    /// Highest SNAT source port (host order).
    pub snat_port_max: u16,
    /// Number of possible CPUs. The SNAT port range is split into one class per CPU
    /// (`port % cpus`), so a CPU allocates ports no other CPU can race it for.
    pub cpus: u32,
    /// Idle time after which an established TCP flow is forgotten.
    pub tcp_established_timeout_ns: u64,
    /// Idle time of a TCP flow that has seen FIN/RST (what strays still need).
    pub tcp_transient_timeout_ns: u64,
    /// Idle time after which a UDP flow is forgotten.
    pub udp_timeout_ns: u64,
    /// How long a cached next hop (fib lookup result) is trusted.
    pub next_hop_ttl_ns: u64,
    /// Idle time after which a closed (FIN/RST) TCP flow's SNAT port may go to a new flow,
    /// though its entry is kept for stray packets until `tcp_transient_timeout_ns`. Short, so
    /// that `Connection: close` traffic does not run out of ports: at 10 s per port, a range
    /// of 4536 ports would cap new connections near 450/s per backend.
    pub tcp_closed_reuse_ns: u64,
    /// Idle time of a TCP flow that has only seen the client's SYN (half-open): short, so
    /// that SYNs no client follows up (a flood from spoofed sources) hold their SNAT ports
    /// briefly. A client that has to retransmit its SYN refreshes it; a handshake completes
    /// in one round trip.
    pub tcp_syn_timeout_ns: u64,
    /// Age from which a half-open TCP flow's SNAT port may go to a new flow that wants it
    /// (see `conntrack::half_open_reclaimable`): what keeps a SYN flood from holding every
    /// port. A real client answers the backend's SYN-ACK within its round trip.
    pub tcp_syn_reclaim_ns: u64,
}

const SECOND: u64 = 1_000_000_000;

impl Tunables {
    /// The defaults: SNAT ports 1024–32767 (below Linux's default ephemeral range
    /// 32768–60999, so the host's own connections to backends — health checks, the
    /// request-mode proxy — never use the same 4-tuples), IPVS-like idle timeouts, next hops
    /// re-resolved every second.
    ///
    /// The range is wide on purpose: a backend keeps a closed connection in TIME_WAIT for
    /// 60 s, and accepts a new flow on its (SNAT address, port) sooner only by its TCP
    /// timestamps, which the data plane keeps growing per SNAT tuple (`lb-ebpf`'s `tcpts`).
    /// Flows without timestamps fall back on sequence numbers, which hold about half the time:
    /// the more ports, the longer before a port comes round again.
    pub const DEFAULT: Tunables = Tunables {
        snat_port_min: 1024,
        snat_port_max: 32767,
        cpus: 1,
        tcp_established_timeout_ns: 900 * SECOND,
        tcp_transient_timeout_ns: 10 * SECOND,
        udp_timeout_ns: 120 * SECOND,
        next_hop_ttl_ns: SECOND,
        // The final FIN/ACK exchange takes one round trip; timestamps are refreshed at most
        // once a second, so two seconds idle means the flow is really over.
        tcp_closed_reuse_ns: 2 * SECOND,
        // Covers a client's first SYN retransmission (1 s) and a backend slow to answer.
        tcp_syn_timeout_ns: 3 * SECOND,
        tcp_syn_reclaim_ns: SECOND / 4,
    };
}

const _: () = assert!(core::mem::size_of::<Tunables>() == 64);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is #[repr(C)], Copy, has no implicit padding (checked by the size
    // asserts next to each type) and is valid for any bit pattern.
    unsafe impl aya::Pod for crate::Tunables {}
    unsafe impl aya::Pod for crate::flow::FlowKey {}
    unsafe impl aya::Pod for crate::service::ServiceKey {}
    unsafe impl aya::Pod for crate::service::ServiceValue {}
    unsafe impl aya::Pod for crate::service::PortServices {}
    unsafe impl aya::Pod for crate::service::MaglevTable {}
    unsafe impl aya::Pod for crate::backend::BackendInfo {}
    unsafe impl aya::Pod for crate::backend::NextHop {}
    unsafe impl aya::Pod for crate::conntrack::CtValue {}
    unsafe impl aya::Pod for crate::conntrack::RnatValue {}
    unsafe impl aya::Pod for crate::stats::BackendStats {}
    unsafe impl aya::Pod for crate::stats::L4Stats {}
    unsafe impl aya::Pod for crate::guard::SourceAddr {}
    unsafe impl aya::Pod for crate::guard::SourceRule {}
}
