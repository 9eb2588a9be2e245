//! Per-CPU counters: one increment per event, no atomics needed.

use lb_common::stats::{BackendStats, Stat};

use crate::maps::{LB_BACKEND_STATS, LB_XDP_STATS};

/// Counts one event.
#[inline(always)]
pub fn bump(stat: Stat) {
    if let Some(c) = LB_XDP_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Which way a packet goes, for the per-backend counters.
#[derive(Clone, Copy)]
pub enum Direction {
    ToBackend,
    ToClient,
}

/// Counts one packet of `bytes` to or from `backend_id`, and a new flow if `new_flow`.
#[inline(always)]
pub fn backend(backend_id: u32, dir: Direction, bytes: u64, new_flow: bool) {
    let Some(s) = LB_BACKEND_STATS.get_ptr_mut(backend_id) else {
        return;
    };
    // SAFETY: per-CPU slot, see `bump`.
    let s: &mut BackendStats = unsafe { &mut *s };
    match dir {
        Direction::ToBackend => {
            s.packets_to_backend += 1;
            s.bytes_to_backend += bytes;
        }
        Direction::ToClient => {
            s.packets_to_client += 1;
            s.bytes_to_client += bytes;
        }
    }
    if new_flow {
        s.new_flows += 1;
    }
}
