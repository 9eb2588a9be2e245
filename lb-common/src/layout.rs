//! Each pinned map's shape, described once: the kernel crate sizes its maps from it and
//! userspace checks pinned maps against it before adopting them (a map pinned by a build
//! with another layout must never be misread).

use core::mem::size_of;

use crate::{
    DEFAULT_CONNTRACK_MAX, MAX_BACKENDS, MAX_SERVICES,
    backend::{BackendInfo, NextHop},
    conntrack::{CtValue, RnatValue},
    flow::FlowKey,
    guard::{MAX_SOURCE_RULES, SourceAddr, SourceRule},
    map_names,
    service::{MaglevTable, PortServices, ServiceKey, ServiceValue},
    stats::{BackendStats, L4Stats, STAT_SLOTS},
};

/// The kind of a BPF map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
    LpmTrie,
    ProgramArray,
}

/// One map's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub kind: MapKind,
    /// Key size in bytes as the kernel sees it (an LPM trie's includes its 4-byte prefix
    /// length).
    pub key_size: usize,
    pub value_size: usize,
    /// Entries the kernel crate declares.
    pub max_entries: u32,
    /// Whether userspace sizes it at load time from the config (then a pinned map of any
    /// size is adopted as it is).
    pub sized_by_config: bool,
}

const fn map(
    name: &'static str,
    kind: MapKind,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
) -> MapLayout {
    MapLayout {
        name,
        kind,
        key_size,
        value_size,
        max_entries,
        sized_by_config: false,
    }
}

pub const SERVICES: MapLayout = map(
    map_names::SERVICES,
    MapKind::Hash,
    size_of::<ServiceKey>(),
    size_of::<ServiceValue>(),
    MAX_SERVICES,
);
/// One entry per port number.
pub const PORTS: MapLayout = map(
    map_names::PORTS,
    MapKind::Array,
    4,
    size_of::<PortServices>(),
    65536,
);
/// Two table slots per service.
pub const TABLES: MapLayout = map(
    map_names::TABLES,
    MapKind::Array,
    4,
    size_of::<MaglevTable>(),
    MAX_SERVICES * 2,
);
pub const BACKENDS: MapLayout = map(
    map_names::BACKENDS,
    MapKind::Array,
    4,
    size_of::<BackendInfo>(),
    MAX_BACKENDS,
);
pub const CONNTRACK: MapLayout = MapLayout {
    sized_by_config: true,
    ..map(
        map_names::CONNTRACK,
        MapKind::LruHash,
        size_of::<FlowKey>(),
        size_of::<CtValue>(),
        DEFAULT_CONNTRACK_MAX,
    )
};
pub const REVERSE_NAT: MapLayout = MapLayout {
    sized_by_config: true,
    ..map(
        map_names::REVERSE_NAT,
        MapKind::Hash,
        size_of::<FlowKey>(),
        size_of::<RnatValue>(),
        DEFAULT_CONNTRACK_MAX,
    )
};
pub const NEXT_HOPS: MapLayout = map(
    map_names::NEXT_HOPS,
    MapKind::PerCpuArray,
    4,
    size_of::<NextHop>(),
    MAX_BACKENDS,
);
pub const BACKEND_STATS: MapLayout = map(
    map_names::BACKEND_STATS,
    MapKind::PerCpuArray,
    4,
    size_of::<BackendStats>(),
    MAX_BACKENDS,
);
pub const BACKEND_L4: MapLayout = map(
    map_names::BACKEND_L4,
    MapKind::PerCpuArray,
    4,
    size_of::<L4Stats>(),
    MAX_BACKENDS,
);
pub const XDP_STATS: MapLayout = map(
    map_names::XDP_STATS,
    MapKind::PerCpuArray,
    4,
    size_of::<u64>(),
    STAT_SLOTS,
);
pub const SOURCES: MapLayout = map(
    map_names::SOURCES,
    MapKind::LpmTrie,
    4 + size_of::<SourceAddr>(),
    size_of::<SourceRule>(),
    MAX_SOURCE_RULES,
);

/// Index → program, for tail calls: [`NEW_FLOW_PROGRAM`] holds the new-flow program. Pinned
/// like the maps it shares, so that new flows keep opening while lbd restarts (the kernel
/// empties a program array when no process or pin holds it any more).
pub const PROGRAMS: MapLayout = map(map_names::PROGRAMS, MapKind::ProgramArray, 4, 4, 1);

/// The index of the new-flow program in [`PROGRAMS`].
pub const NEW_FLOW_PROGRAM: u32 = 0;

/// Every pinned map, in the order userspace pins them.
pub const PINNED: [MapLayout; 12] = [
    SERVICES,
    PORTS,
    TABLES,
    BACKENDS,
    CONNTRACK,
    REVERSE_NAT,
    NEXT_HOPS,
    BACKEND_STATS,
    BACKEND_L4,
    XDP_STATS,
    SOURCES,
    PROGRAMS,
];

const _: () = {
    let mut i = 0;
    while i < PINNED.len() {
        assert!(PINNED[i].max_entries > 0);
        i += 1;
    }
};
