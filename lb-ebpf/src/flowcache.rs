//! A per-CPU cache of established flows in front of the conntrack lookup.
//!
//! The conntrack lookup hashes a 40-byte key (jhash, ~16 ns on BENCHMARKS.md's host) and
//! walks a bucket: about half of what a forwarded packet of a live flow cost. Yet almost
//! every such packet writes nothing to its entry: `last_seen` moves once a second, the state
//! only on SYN/FIN/RST, the signals once per flow. So each CPU keeps copies of the entries it
//! used, in a direct-mapped array indexed by a cheap hash of the key, and forwards from a
//! copy when that packet would have written nothing.
//!
//! Why a copy is never wrong:
//! - **Only what the full path would not write.** A copy is taken of an ESTABLISHED,
//!   non-DSR flow whose request was seen (TCP), and used only for packets without SYN, FIN
//!   or RST, while its `last_seen` needs no refresh ([`crate::conntrack::needs_refresh`]).
//! - **A replaced entry reaches every CPU's copy.** A shared array holds a generation per
//!   slot; a copy keeps the generation read *before* the lookup that found its entry
//!   ([`generation`], [`put`]) and is used only while the generation is unchanged. A new
//!   entry goes under a key only through the new-flow program, which the balancer tail-calls
//!   when the key's entry is missing, dead, closing (for a SYN) or of a service no longer on
//!   the port: the balancer writes a new generation for the slot just before that call
//!   ([`invalidate`]), the new-flow program again after its insert. The first makes every
//!   copy taken before it stale, in this program's own generations (while lbd restarts, the
//!   pinned tail-call slot already holds the new build's new-flow program, with generations
//!   of its own); the entry being replaced is one no CPU copies in between (not established,
//!   or past its refresh, or not served). The second covers an entry another CPU made
//!   meanwhile.
//! - **A state change needs nothing.** A flow that closes (FIN or RST either way) still
//!   forwards its client's data on the full path, as its copies do; what ends it is a
//!   timeout, or its SNAT port going to another flow, which lbd's flow collector allows
//!   `tcp_closed_reuse_ns` (2 s) after its last packet: past any copy's
//!   [`FLOW_CACHE_TTL_NS`] (a compile-time check in `lb-common`). A client reusing the
//!   5-tuple sends a SYN, which is never served from a copy, and replaces the entry.
//! - **An eviction changes no generation** (the LRU map evicts without telling anyone). So
//!   a copy is used for at most [`FLOW_CACHE_TTL_NS`] after it was taken, the evicted
//!   flow's packets are forwarded that much longer (as if the entry had lived that long),
//!   and the flow collector frees an orphaned flow's SNAT port only after that time: no copy
//!   of an evicted flow meets the port's next owner.
//!
//! Ordering: the generation is read before the entry, and written before the tail call and
//! after the insert, with compiler fences between; x86 keeps loads and stores in program
//! order (TSO). On weakly ordered CPUs (arm64) a stale copy could in principle be taken in
//! the nanoseconds around a replacement; it would still be bounded by the TTL.

use aya_ebpf::helpers::bpf_get_smp_processor_id;
use core::sync::atomic::{Ordering, compiler_fence};

use lb_common::{
    PROTO_TCP,
    conntrack::{CtValue, FLOW_CACHE_SLOTS, FLOW_CACHE_TTL_NS, signal, state},
    flow::FlowKey,
};

use crate::{
    maps::{LB_FLOW_CACHE, LB_FLOW_CHANGES, LB_FLOW_GEN},
    parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN},
};

pub use lb_common::conntrack::flow_cache_slot as slot_of;

/// Slots per CPU, and generations.
pub const SLOTS: u32 = FLOW_CACHE_SLOTS;

/// One CPU's copy of a flow's conntrack entry.
#[repr(C)]
pub struct Slot {
    /// The flow (all zero while the slot is empty: no real key has family 0).
    pub key: FlowKey,
    /// Its conntrack entry when the copy was taken.
    pub ct: CtValue,
    /// When the copy was taken (the program's coarse clock).
    pub taken_ns: u64,
    /// The slot's generation read before the lookup that found `ct`.
    pub generation: u64,
}

/// Word by word: the derived `==` may become a call to the object's `bcmp`, a subprogram.
#[inline(always)]
fn same(a: &FlowKey, b: &FlowKey) -> bool {
    a.src.lo == b.src.lo
        && a.src.hi == b.src.hi
        && a.dst.lo == b.dst.lo
        && a.dst.hi == b.dst.hi
        && a.sport == b.sport
        && a.dport == b.dport
        && a.proto == b.proto
        && a.family == b.family
}

/// The current generation of `slot`. Read it before the conntrack lookup whose result
/// [`put`] may keep.
#[inline(always)]
pub fn generation(slot: u32) -> u64 {
    let Some(g) = LB_FLOW_GEN.get_ptr(slot) else {
        return 0;
    };
    // SAFETY: an array element, always mapped; the volatile read keeps it where it is.
    let g = unsafe { core::ptr::read_volatile(g) };
    compiler_fence(Ordering::Acquire);
    g
}

/// Tells every CPU that the conntrack entry in `slot` is being replaced.
///
/// It writes a value never written before (this CPU's count of replacements, and the CPU's
/// number), not an increment: two CPUs' increments of one slot could interleave and bring it
/// back to a value a stale copy holds. (Rust's BPF target has no atomic add to do it with.)
///
/// A BPF subprogram: it runs twice per new flow, and inlined, the values it keeps in
/// registers took stack in the new-flow program, which has none to spare.
#[inline(never)]
pub fn invalidate(slot: u32) {
    let (Some(g), Some(n)) = (
        LB_FLOW_GEN.get_ptr_mut(slot),
        LB_FLOW_CHANGES.get_ptr_mut(0),
    ) else {
        return;
    };
    // SAFETY: this CPU's counter: nothing else touches it while this runs.
    let n = unsafe { &mut *n };
    *n += 1;
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64 & 0xffff;
    compiler_fence(Ordering::Release);
    // SAFETY: an array element, always mapped; other CPUs read it or write it whole (an
    // aligned 8-byte store).
    unsafe { core::ptr::write_volatile(g, *n << 16 | cpu) };
}

/// This CPU's copy of the entry of `pkt`'s flow (in `slot`), when it has one that the full
/// path would use unchanged for this packet.
#[inline(always)]
pub fn get(pkt: &Packet, slot: u32, now: u64) -> Option<&'static CtValue> {
    if pkt.is_tcp() && pkt.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return None;
    }
    // SAFETY: this CPU's slot: only this CPU writes it, never while this runs.
    let s = unsafe { &*LB_FLOW_CACHE.get_ptr(slot)? };
    if !same(&s.key, &pkt.key) || generation(slot) != s.generation {
        return None;
    }
    // No refresh due means alive too: no idle timeout is shorter than the refresh interval
    // (`lb_common::conntrack::REFRESH_NS`).
    let fresh = now.wrapping_sub(s.taken_ns) < FLOW_CACHE_TTL_NS
        && !crate::conntrack::needs_refresh(s.ct.last_seen_ns, now);
    fresh.then_some(&s.ct)
}

/// Keeps a copy of `e`, the entry of `key`'s flow in `slot` after the full path's writes,
/// when packets like this one write nothing to it. `generation`: [`generation`] read before
/// the lookup that found `e`.
#[inline(always)]
pub fn put(slot: u32, generation: u64, key: &FlowKey, e: &CtValue, now: u64) {
    let cacheable = e.flags & CtValue::DSR == 0
        && e.state == state::ESTABLISHED
        && (key.proto != PROTO_TCP || e.signals & signal::REQUEST != 0);
    if !cacheable {
        return;
    }
    let Some(s) = LB_FLOW_CACHE.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: this CPU's slot: nothing else touches it while this runs.
    let s = unsafe { &mut *s };
    s.key = *key;
    s.ct = *e;
    s.taken_ns = now;
    s.generation = generation;
}
