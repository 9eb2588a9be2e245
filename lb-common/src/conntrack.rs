//! Connection tracking and reverse-NAT entries.

use crate::flow::IpBytes;

/// Flow state, as far as the balancer needs it for timeouts.
pub mod state {
    /// Only the client's SYN has been seen.
    pub const SYN: u8 = 0;
    /// The client has sent more than a SYN (or: a UDP flow).
    pub const ESTABLISHED: u8 = 1;
    /// A FIN or RST has been seen in either direction.
    pub const CLOSING: u8 = 2;
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
    /// Explicit padding, always zero; scalars rather than a byte array, whose zeroing the
    /// eBPF toolchain turns into a byte-at-a-time `memset` call (see [`IpBytes`]).
    pub _pad2: u16,
    /// Added to the client's TCP timestamp (TSval) on the way to the backend: it makes the
    /// timestamps a backend sees on one SNAT address:port follow the balancer's clock from
    /// flow to flow (see `lb-ebpf`'s `tcpts`). 0 when the flow has none.
    pub ts_delta: u32,
}

const _: () = assert!(core::mem::size_of::<CtValue>() == 56);

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
    /// Explicit padding, always zero; scalars rather than `[u8; 7]`, whose zeroing the eBPF
    /// toolchain turns into a byte-at-a-time `memset` call (see [`IpBytes`]).
    pub _pad1: u8,
    /// Explicit padding.
    pub _pad2: u16,
    /// The flow's [`CtValue::ts_delta`], taken back off the timestamp the backend echoes
    /// (TSecr) on the way to the client.
    pub ts_delta: u32,
}

const _: () = assert!(core::mem::size_of::<RnatValue>() == 72);
