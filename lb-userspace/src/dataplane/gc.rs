//! The flow collector: frees the SNAT ports of flows that are over.
//!
//! A SNAT port is held by its flow's reverse-NAT entry. The XDP program only ever creates
//! those (insert-if-absent) and never evicts them, so a port cannot be handed to a new flow
//! while the old one still uses it — the failure of two LRU maps that evict independently,
//! where a reverse entry could vanish under a live conntrack entry. Freeing ports is this
//! collector's job instead, once a second on a thread of its own:
//!
//! - **finished** flows: idle past their timeout, or closed (FIN/RST) and idle for
//!   `tcp_closed_reuse` (what only strays still follow);
//! - **orphaned** entries: their conntrack entry is gone (evicted from its LRU map when the
//!   table is full) or now belongs to another flow, at two passes in a row — so the moment
//!   between a new flow's two inserts is never mistaken for an orphan — the first of them
//!   more than [`ORPHAN_AGE`] ago: a CPU may still forward the flow's client packets from
//!   its flow cache for [`FLOW_CACHE_TTL_NS`] after the entry went (`lb-ebpf`'s
//!   `flowcache`), and must not do so onto the port's next owner. After that the flow's
//!   client packets find no flow (the host resets them); its port is free again.
//!
//! Only the collector removes entries (besides a new flow taking back the entry it has just
//! made, when its conntrack insert fails). The XDP program replaces an entry with another
//! flow's only when it takes a half-open flow's port (`tcp_syn_reclaim`), and only an entry
//! that is alive and still has its own conntrack entry — never one this collector judges
//! finished (dead) or orphaned (no conntrack entry at two passes): what the collector removes
//! is the flow it judged. (A closed flow's stray packet may refresh it in between; its port
//! is freed all the same, as a closed flow's port always was after `tcp_closed_reuse`.)

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{HashMap, Map, MapData};

use super::batch;
use lb_common::{
    Tunables,
    conntrack::{CtValue, FLOW_CACHE_TTL_NS, RnatValue, forward_key, holds, port_reusable},
    flow::FlowKey,
};

/// How often the collector passes over the reverse-NAT map.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What passes removed, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Entries of finished flows (idle past their timeout, or closed).
    pub finished: u64,
    /// Entries whose conntrack entry was gone at two passes in a row, [`ORPHAN_AGE`] apart.
    pub orphaned: u64,
    /// Entries left in place.
    pub kept: u64,
}

/// How long after a pass first finds a flow's conntrack entry gone its SNAT port may be
/// freed: past the XDP flow cache's lifetime of a copy, plus two ticks of the coarse clock
/// that copies are timed by (up to 10 ms each at HZ=100).
pub const ORPHAN_AGE: Duration = Duration::from_nanos(FLOW_CACHE_TTL_NS + 20_000_000);

/// The collector's memory between passes: entries without their conntrack entry, and when
/// (CLOCK_MONOTONIC ns) a pass had found that out, at the latest.
#[derive(Debug, Default)]
pub struct Suspects(std::collections::HashMap<FlowKey, u64>);

/// One pass: judges every reverse-NAT entry (map id `reverse_id`) against its conntrack entry
/// (map id `conntrack_id`) at `now_ns` (CLOCK_MONOTONIC, the XDP program's clock) and removes
/// the finished and the orphaned.
pub fn pass(
    reverse_id: u32,
    conntrack_id: u32,
    t: &Tunables,
    now_ns: u64,
    suspects: &mut Suspects,
) -> Result<Collected> {
    let mut reverse = Map::HashMap(MapData::from_id(reverse_id)?);
    let conntrack: HashMap<MapData, FlowKey, CtValue> =
        HashMap::try_from(Map::LruHashMap(MapData::from_id(conntrack_id)?))?;
    // Judge first, remove after: removing while walking would restart the walk. The walk
    // reads thousands of entries per system call (`batch`); what is left per entry is its
    // conntrack lookup.
    let mut finished = Vec::new();
    let mut orphaned = Vec::new();
    let mut next = std::collections::HashMap::new();
    let mut new_suspects = Vec::new();
    let mut kept = 0u64;
    batch::for_each::<FlowKey, RnatValue>(&reverse, |k, r| {
        if port_reusable(r.last_seen_ns, r.state, k.proto, now_ns, t) {
            finished.push(k);
            return;
        }
        let ours = conntrack
            .get(&forward_key(&r, &k), 0)
            .is_ok_and(|c| holds(&c, &k));
        if ours {
            kept += 1;
            return;
        }
        match suspects.0.get(&k) {
            Some(&seen) if now_ns.saturating_sub(seen) > ORPHAN_AGE.as_nanos() as u64 => {
                orphaned.push(k)
            }
            Some(&seen) => {
                next.insert(k, seen);
                kept += 1;
            }
            None => {
                new_suspects.push(k);
                kept += 1;
            }
        }
    })?;
    // Every lookup of this walk is over by now: an entry found gone was gone by then.
    let walked = monotonic_ns();
    next.extend(new_suspects.into_iter().map(|k| (k, walked)));
    suspects.0 = next;
    Ok(Collected {
        kept,
        finished: batch::remove::<FlowKey, RnatValue>(&mut reverse, &finished)?,
        orphaned: batch::remove::<FlowKey, RnatValue>(&mut reverse, &orphaned)?,
    })
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_coarse_ns` reads (coarsely).
pub fn monotonic_ns() -> u64 {
    // SAFETY: an out-parameter of the right type.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Totals since the collector started, for metrics.
#[derive(Debug, Default)]
pub struct Totals {
    pub finished: AtomicU64,
    pub orphaned: AtomicU64,
    /// Reverse-NAT entries left after the last pass: the SNAT ports in use.
    pub in_use: AtomicU64,
}

/// The running collector; stops (within a pass) when dropped.
pub struct Collector {
    stop: Arc<AtomicBool>,
    /// What it removed so far.
    pub totals: Arc<Totals>,
}

impl Collector {
    /// Starts passing over the maps every [`INTERVAL`] on a thread of its own.
    pub fn start(reverse_id: u32, conntrack_id: u32, t: Tunables) -> Result<Collector> {
        let stop = Arc::new(AtomicBool::new(false));
        let totals = Arc::new(Totals::default());
        let (s, tot) = (stop.clone(), totals.clone());
        std::thread::Builder::new()
            .name("flow-collector".into())
            .spawn(move || {
                let mut suspects = Suspects::default();
                while !s.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    match pass(reverse_id, conntrack_id, &t, monotonic_ns(), &mut suspects) {
                        Ok(c) => {
                            tot.finished.fetch_add(c.finished, Ordering::Relaxed);
                            tot.orphaned.fetch_add(c.orphaned, Ordering::Relaxed);
                            tot.in_use.store(c.kept, Ordering::Relaxed);
                            tracing::debug!(
                                finished = c.finished,
                                orphaned = c.orphaned,
                                kept = c.kept,
                                took_ms = started.elapsed().as_millis() as u64,
                                "flows collected"
                            );
                        }
                        Err(e) => {
                            tracing::warn!(error = format!("{e:#}"), "cannot collect flows")
                        }
                    }
                    std::thread::sleep(INTERVAL.saturating_sub(started.elapsed()));
                }
            })?;
        Ok(Collector { stop, totals })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
