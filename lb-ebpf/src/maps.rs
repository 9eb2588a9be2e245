//! Every map the data plane uses. Userspace writes services, ports, tables, backends and
//! sources; the kernel writes the rest. The pinned maps' sizes come from
//! `lb_common::layout`, which userspace checks pinned maps against.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    Tunables,
    backend::{BackendInfo, NextHop},
    conntrack::{CtValue, RnatValue},
    flow::FlowKey,
    guard::{SourceAddr, SourceRule},
    layout,
    service::{MaglevTable, PortServices, ServiceKey, ServiceValue},
    stats::{BackendStats, L4Stats},
};

/// Index → program for tail calls: `layout::NEW_FLOW_PROGRAM` → `lb_new_flow`.
#[map]
pub static LB_PROGRAMS: ProgramArray =
    ProgramArray::with_max_entries(layout::PROGRAMS.max_entries, 0);

/// (VIP, port, proto) → service index, which of its two tables is live, SNAT address.
#[map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(layout::SERVICES.max_entries, 0);

/// Destination port (host order) → the ids of the services on it, and their VIP if just one.
#[map]
pub static LB_PORTS: Array<PortServices> = Array::with_max_entries(layout::PORTS.max_entries, 0);

/// `service index * 2 + half` → one of the service's two Maglev tables (bucket → backend id).
#[map]
pub static LB_TABLES: Array<MaglevTable> = Array::with_max_entries(layout::TABLES.max_entries, 0);

/// Backend id → backend address and port (id 0 is never used).
#[map]
pub static LB_BACKENDS: Array<BackendInfo> =
    Array::with_max_entries(layout::BACKENDS.max_entries, 0);

/// Client-side 5-tuple (client → VIP) → chosen backend, SNAT port, state, last seen.
#[map]
pub static LB_CONNTRACK: LruHashMap<FlowKey, CtValue> =
    LruHashMap::with_max_entries(layout::CONNTRACK.max_entries, 0);

/// Backend-side 5-tuple (backend → SNAT addr:port) → client, VIP and client-side L2. Its
/// entry is what holds a SNAT port, so it is a plain hash, never evicted behind a live flow's
/// back: new flows only take absent keys, and only lbd's flow collector (`dataplane/gc.rs`)
/// removes entries, once their flow is over or their conntrack entry is gone.
#[map]
pub static LB_REVERSE_NAT: HashMap<FlowKey, RnatValue> =
    HashMap::with_max_entries(layout::REVERSE_NAT.max_entries, 0);

/// Backend id → this CPU's cached fib lookup result towards that backend.
#[map]
pub static LB_NEXT_HOPS: PerCpuArray<NextHop> =
    PerCpuArray::with_max_entries(layout::NEXT_HOPS.max_entries, 0);

/// Backend id → this CPU's packet/byte/flow counters for that backend.
#[map]
pub static LB_BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(layout::BACKEND_STATS.max_entries, 0);

/// Backend id → this CPU's L4 signals for that backend: connect failures, time to first byte.
#[map]
pub static LB_BACKEND_L4: PerCpuArray<L4Stats> =
    PerCpuArray::with_max_entries(layout::BACKEND_L4.max_entries, 0);

/// `Stat` index → this CPU's count of verdicts and reasons.
#[map]
pub static LB_XDP_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(layout::XDP_STATS.max_entries, 0);

/// Source prefix (family, address) → the only interface a new flow from it may arrive on
/// (0 = none: martian sources, our own addresses). Sources not in it are ordinary clients.
#[map]
pub static LB_SOURCES: LpmTrie<SourceAddr, SourceRule> =
    LpmTrie::with_max_entries(layout::SOURCES.max_entries, 0);

/// Backend id → this CPU's next SNAT port index within its port class towards that backend
/// (see `select`). Not pinned: after a restart allocation starts over, and finds the oldest
/// ports anyway.
#[map]
pub static LB_SNAT_CURSOR: PerCpuArray<u32> =
    PerCpuArray::with_max_entries(layout::BACKENDS.max_entries, 0);

/// Index 0 → this CPU's flow under construction (see `select::new_flow`): scratch space
/// that does not fit on the stack. Not pinned.
#[map]
pub static LB_NEW_FLOW: PerCpuArray<crate::select::NewFlow> = PerCpuArray::with_max_entries(1, 0);

/// Index 0 → this CPU's scratch flow key, for lookups whose key would not fit on the stack
/// beside the callers' frames: an ICMP error's quoted flow (`icmp`, `icmp6`), the flow whose
/// half-open port a new flow takes (`select`). Not pinned.
#[map]
pub static LB_SCRATCH_KEY: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(1, 0);

/// Slot (a cheap hash of a flow key) → this CPU's copy of an established flow's conntrack
/// entry (see `flowcache`). Not pinned: a new program starts with an empty cache.
#[map]
pub static LB_FLOW_CACHE: PerCpuArray<crate::flowcache::Slot> =
    PerCpuArray::with_max_entries(crate::flowcache::SLOTS, 0);

/// Slot → the generation of the conntrack entries hashed to it, new after every insert of
/// one of them; shared by all CPUs (see `flowcache`). Not pinned.
#[map]
pub static LB_FLOW_GEN: Array<u64> = Array::with_max_entries(crate::flowcache::SLOTS, 0);

/// Index 0 → how many conntrack entries this CPU inserted: the unique part of the
/// generations it writes (see `flowcache::invalidate`). Not pinned.
#[map]
pub static LB_FLOW_CHANGES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Index 0 → this CPU's cached coarse clock reading (see `clock`). Not pinned.
#[map]
pub static LB_CLOCK: PerCpuArray<crate::clock::Reading> = PerCpuArray::with_max_entries(1, 0);

/// Load-time settings (SNAT port range, timeouts); userspace overrides the default.
#[unsafe(no_mangle)]
pub static LB_TUNABLES: Global<Tunables> = Global::new(Tunables::DEFAULT);

/// The load-time settings, read in place (a copy would take 56 bytes of a stack that the
/// new-flow path has no room for). The pointer is read opaquely so that the compiler cannot
/// fold the fields to the defaults compiled in: userspace overrides them at load time.
#[inline(always)]
pub fn tunables() -> &'static Tunables {
    let p = &LB_TUNABLES as *const Global<Tunables> as *const Tunables;
    // SAFETY: `Global` is a transparent wrapper of an initialised `Tunables`; the volatile
    // read only hides the pointer's origin.
    unsafe { &*core::ptr::read_volatile(&p) }
}
