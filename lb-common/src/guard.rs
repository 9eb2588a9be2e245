//! The source guard: which client source addresses may open a flow, and on which interface.

use crate::flow::IpBytes;

/// The data of a source-guard LPM-trie key: the address family, then the address. The
/// family comes first so that an IPv4 prefix can never match an IPv6 address: a key's
/// prefix length is `32 +` the address prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceAddr {
    /// `FAMILY_V4` or `FAMILY_V6`, as a native u32 (both sides run on the same host).
    pub family: u32,
    /// Explicit padding, always zero (part of the matched bytes: a full-length prefix
    /// covers it).
    pub _pad: u32,
    /// The address (IPv4 in the first four bytes).
    pub addr: IpBytes,
}

const _: () = assert!(core::mem::size_of::<SourceAddr>() == 24);

impl SourceAddr {
    /// Bits of the key before the address: the family word and the padding word.
    pub const HEADER_BITS: u32 = 64;
}

/// What the guard says of the sources inside a prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceRule {
    /// The only interface a SYN from this prefix may arrive on (a subnet of the backends',
    /// on the interface that reaches it); 0 = never a client (martian, or one of our own
    /// addresses).
    pub ifindex: u32,
}

const _: () = assert!(core::mem::size_of::<SourceRule>() == 4);

/// Most prefixes the guard holds.
pub const MAX_SOURCE_RULES: u32 = 1024;

/// IPv4 prefixes no client on the Internet can have as its source (RFC 6890 and RFC 1122):
/// "this network", loopback, multicast, reserved and limited broadcast. (Address, prefix
/// length.)
pub const MARTIAN_V4: [([u8; 4], u8); 4] = [
    ([0, 0, 0, 0], 8),
    ([127, 0, 0, 0], 8),
    ([224, 0, 0, 0], 4),
    ([240, 0, 0, 0], 4),
];

/// IPv6 sources no client can have (RFC 4291, RFC 6890): unspecified, loopback,
/// IPv4-mapped (never on the wire) and multicast. (Address, prefix length.)
pub const MARTIAN_V6: [([u8; 16], u8); 4] = [
    ([0; 16], 128),
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 128),
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0], 96),
    ([0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8),
];
