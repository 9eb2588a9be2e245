//! Flow keys: one direction of a TCP/UDP flow, sized for IPv6 from the start.

/// An IP address as it appears on the wire: IPv4 in the first 4 bytes, the rest zero.
///
/// Held as two 8-byte words whose memory bytes are the address bytes, not as `[u8; 16]`:
/// the eBPF toolchain turns every fill or copy of a byte array into a call to a
/// byte-at-a-time `memset`/`memmove`, and building one flow key that way cost more than
/// the hash-map lookup it was built for. Two words are copied with two loads and stores.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpBytes {
    /// Bytes 0–7 of the address, in memory (wire) order.
    pub lo: u64,
    /// Bytes 8–15 of the address, in memory (wire) order.
    pub hi: u64,
}

impl IpBytes {
    /// From the 16 address bytes (an IPv6 address, or [`v4`]'s layout).
    #[inline(always)]
    pub const fn from_octets(b: [u8; 16]) -> IpBytes {
        IpBytes {
            lo: u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            hi: u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    /// The 16 address bytes.
    #[inline(always)]
    pub const fn octets(&self) -> [u8; 16] {
        let (l, h) = (self.lo.to_ne_bytes(), self.hi.to_ne_bytes());
        [
            l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], h[0], h[1], h[2], h[3], h[4], h[5],
            h[6], h[7],
        ]
    }

    /// The first four bytes: the address of an IPv4 entry.
    #[inline(always)]
    pub const fn v4_octets(&self) -> [u8; 4] {
        let l = self.lo.to_ne_bytes();
        [l[0], l[1], l[2], l[3]]
    }
}

/// Puts an IPv4 address (wire order) into an [`IpBytes`].
#[inline(always)]
pub const fn v4(addr: [u8; 4]) -> IpBytes {
    IpBytes {
        lo: u64::from_ne_bytes([addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0]),
        hi: 0,
    }
}

/// The address an [`IpBytes`] of `family` holds (IPv4 in the first 4 bytes).
pub fn ip_addr(bytes: &IpBytes, family: u8) -> core::net::IpAddr {
    if family == crate::FAMILY_V4 {
        core::net::IpAddr::from(bytes.v4_octets())
    } else {
        core::net::IpAddr::from(bytes.octets())
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
    /// Explicit padding; always zero so equal flows hash equal. (A word, not a byte array:
    /// see [`IpBytes`].)
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_bytes_are_wire_order_in_memory() {
        // The kernel side reads and writes these bytes as the packet's address bytes, and
        // userspace's maps are compared byte for byte with what the kernel stored.
        let a = v4([10, 99, 0, 10]);
        let mut mem = [0u8; 16];
        // SAFETY: IpBytes is repr(C), 16 bytes, no padding.
        unsafe {
            core::ptr::copy_nonoverlapping(&a as *const IpBytes as *const u8, mem.as_mut_ptr(), 16)
        };
        assert_eq!(mem, [10, 99, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(a.octets(), mem);
        assert_eq!(a.v4_octets(), [10, 99, 0, 10]);
        let v6: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        assert_eq!(IpBytes::from_octets(v6).octets(), v6);
        assert_eq!(
            ip_addr(&IpBytes::from_octets(v6), crate::FAMILY_V6),
            core::net::IpAddr::from(v6)
        );
    }
}
