//! Flow keys: one direction of a TCP/UDP flow, sized for IPv6 from the start.

/// An IP address as it appears on the wire: IPv4 in the first 4 bytes, the rest zero.
pub type IpBytes = [u8; 16];

/// Puts an IPv4 address (wire order) into an [`IpBytes`].
#[inline(always)]
pub const fn v4(addr: [u8; 4]) -> IpBytes {
    [
        addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]
}

/// The address an [`IpBytes`] of `family` holds (IPv4 in the first 4 bytes).
pub fn ip_addr(bytes: &IpBytes, family: u8) -> core::net::IpAddr {
    if family == crate::FAMILY_V4 {
        core::net::IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        core::net::IpAddr::from(*bytes)
    }
}

/// One direction of a flow. Ports are in network byte order (the packet's bytes read as a
/// native u16), so the kernel copies them without swapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address.
    pub src: IpBytes,
    /// Destination address.
    pub dst: IpBytes,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// IP protocol ([`crate::PROTO_TCP`] or [`crate::PROTO_UDP`]).
    pub proto: u8,
    /// Address family ([`crate::FAMILY_V4`] or [`crate::FAMILY_V6`]).
    pub family: u8,
    /// Explicit padding; always zero so equal flows hash equal.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
