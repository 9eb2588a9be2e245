//! Backends and the cached next hop towards each.

use crate::flow::IpBytes;

/// Where a backend is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendInfo {
    /// Backend address.
    pub addr: IpBytes,
    /// Backend port, network byte order.
    pub port: u16,
    /// Address family.
    pub family: u8,
    /// [`BackendInfo::VALID`] when the slot holds a backend.
    pub flags: u8,
    /// Explicit padding.
    pub _pad: u32,
}

impl BackendInfo {
    /// Set in `flags` for a configured backend.
    pub const VALID: u8 = 1;
}

const _: () = assert!(core::mem::size_of::<BackendInfo>() == 24);

/// A fib lookup result cached per CPU and backend: resolving the next hop costs ~130 ns, so
/// it is done once per backend per `next_hop_ttl`, not per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    /// Monotonic time (ns) after which the entry must be looked up again; 0 = empty.
    pub expires_ns: u64,
    /// Egress interface.
    pub ifindex: u32,
    /// Next hop's MAC.
    pub dmac: [u8; 6],
    /// Egress interface's MAC.
    pub smac: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<NextHop>() == 24);
