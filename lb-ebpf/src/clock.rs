//! The clock of flow timeouts and next-hop expiry: `bpf_ktime_get_coarse_ns`, read through a
//! per-CPU cache that is refreshed once per jiffy.
//!
//! The coarse clock only moves on the timer tick, so reading it once per tick loses nothing.
//! Reading it per packet cost a helper call, which on hosts with return-thunk mitigations
//! (`spectre_v2: Retpolines`, `spec_rstack_overflow: Safe RET`) was ~20 ns of an 84 ns hit
//! path (BENCHMARKS.md's host). `bpf_jiffies64` is inlined by the verifier on 64-bit JITs (a
//! load of `jiffies`), and the per-CPU array lookup is inlined too, so a packet now pays two
//! loads and a compare.
//!
//! The cached value can lag the coarse clock by one tick at most (a CPU that sees the new
//! jiffy before the timekeeper's update keeps the previous tick's time for that jiffy): the
//! finest use is the 250 ms SYN reclaim age. It never runs backwards on a CPU, and lbd's flow
//! collector keeps comparing it with `CLOCK_MONOTONIC`, which the coarse clock follows a
//! tick behind.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::LB_CLOCK;

/// One CPU's cached reading: the jiffy it was taken in and the coarse time then.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Reading {
    /// `jiffies` when `ns` was read.
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns()` in that jiffy.
    pub ns: u64,
}

/// The coarse monotonic time in ns (`CLOCK_MONOTONIC_COARSE`), at most one tick behind.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments (inlined to a load of `jiffies`).
    let j = unsafe { bpf_jiffies64() };
    let Some(r) = LB_CLOCK.get_ptr_mut(0) else {
        // SAFETY: helper without arguments.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot: nothing else writes it while the program runs.
    let r = unsafe { &mut *r };
    if r.jiffies != j {
        // SAFETY: helper without arguments.
        r.ns = unsafe { bpf_ktime_get_coarse_ns() };
        r.jiffies = j;
    }
    r.ns
}
