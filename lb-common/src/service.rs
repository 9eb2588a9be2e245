//! Services (VIP, port, protocol) and their Maglev tables.

use crate::{
    TABLE_SIZE,
    flow::{FlowKey, IpBytes},
};

/// What identifies a connection-mode service: the address and port clients connect to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// The VIP.
    pub addr: IpBytes,
    /// The service port, network byte order.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Address family.
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);

impl ServiceKey {
    /// The service a client → VIP flow is addressed to: the flow key's destination side.
    #[inline(always)]
    pub fn of_flow(key: &FlowKey) -> ServiceKey {
        ServiceKey {
            addr: key.dst,
            port: key.dport,
            proto: key.proto,
            family: key.family,
            _pad: 0,
        }
    }
}

/// What the data plane knows about a destination port before it hashes anything: most
/// packets that are not for a service end with this one array lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortServices {
    /// Bit `id` set for each service on this port.
    pub ids: u32,
    /// When every service on the port is at one IPv4 VIP: that address's four wire bytes read
    /// as a native u32. 0 when there are several addresses (or IPv6): the maps decide.
    pub only_v4: u32,
}

const _: () = assert!(core::mem::size_of::<PortServices>() == 8);

impl PortServices {
    /// Whether a packet to `dst` (an IPv4 address's wire bytes as a native u32, or 0 for
    /// another family) may belong to a service on this port.
    #[inline(always)]
    pub const fn may_serve(&self, dst_v4: u32) -> bool {
        self.ids != 0 && (self.only_v4 == 0 || self.only_v4 == dst_v4)
    }
}

/// What the data plane needs to know about a service.
///
/// Userspace replaces the whole value to switch tables: a hash-map update swaps the element
/// atomically, so a packet sees either the old slot or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Source address of packets towards backends (full-NAT).
    pub snat_addr: IpBytes,
    /// Index of this service in [`crate::map_names::TABLES`] (`id * 2 + half`).
    pub id: u32,
    /// Which of the service's two tables is live (0 or 1): a new table is written into the
    /// other half, then this entry is swapped to point at it.
    pub half: u32,
    /// Table generation, bumped on every table change (for `show table` and metrics).
    pub generation: u32,
    /// Bits of [`ServiceValue::DSR`].
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceValue>() == 32);

impl ServiceValue {
    /// [`ServiceValue::flags`] bit: direct server return. Packets reach the backend
    /// unchanged but for the Ethernet addresses (and TTL); the backend holds the VIP and
    /// answers the client itself, so no SNAT port and no reverse entry are taken, and
    /// `snat_addr` is the VIP (the source of the fib lookup towards the backend).
    pub const DSR: u32 = 1;

    /// Index of the live table in [`crate::map_names::TABLES`].
    #[inline(always)]
    pub const fn table_index(&self) -> u32 {
        self.id * 2 + (self.half & 1)
    }
}

/// A Maglev lookup table: bucket → backend id (0 = none).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevTable {
    /// `TABLE_SIZE` buckets.
    pub buckets: [u32; TABLE_SIZE as usize],
}

const _: () = assert!(core::mem::size_of::<MaglevTable>() == 4 * TABLE_SIZE as usize);
