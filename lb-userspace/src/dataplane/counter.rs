//! The conntrack map's entry count and each backend's active flows, counted on a thread of
//! its own: walking the map costs two syscalls per entry (about half a second at 262 144
//! entries), which must never run on the daemon's owner task, where commands wait.
//!
//! Active flows come from the table itself rather than from opened-minus-closed counters in
//! the XDP program: a flow that idles out or is evicted sends no packet that could count it
//! closed, so counters would only ever drift up.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData};
use lb_common::{
    Tunables,
    conntrack::{CtValue, state},
    flow::FlowKey,
};

/// A count older than this starts a new one (the stale value is still answered).
pub const STALE: Duration = Duration::from_secs(1);

/// Whether a flow counts as active: not closing, and not idle past its timeout (the same rule
/// as the XDP program's, on the same clock).
pub fn is_active(ct: &CtValue, proto: u8, now_ns: u64, t: &Tunables) -> bool {
    ct.state != state::CLOSING
        && lb_common::conntrack::alive(ct.last_seen_ns, ct.state, proto, now_ns, t)
}

/// The last count of a map's entries and of each backend's active flows, recounted in the
/// background when it is stale.
pub struct Counter {
    map_id: u32,
    tunables: Tunables,
    count: Arc<AtomicU64>,
    /// Backend id → active flows, as of the last count.
    active: Arc<Mutex<std::collections::HashMap<u32, u64>>>,
    counting: Arc<AtomicBool>,
    counted_at: Arc<Mutex<Option<Instant>>>,
}

impl Counter {
    /// Counts the entries of the conntrack map with kernel id `map_id`, judging flows alive
    /// by `tunables`' timeouts (a first count starts now).
    pub fn new(map_id: u32, tunables: Tunables) -> Counter {
        let c = Counter {
            map_id,
            tunables,
            count: Arc::new(AtomicU64::new(0)),
            active: Default::default(),
            counting: Arc::new(AtomicBool::new(false)),
            counted_at: Arc::new(Mutex::new(None)),
        };
        c.refresh();
        c
    }

    /// The kernel id of the conntrack map it counts.
    pub fn map_id(&self) -> u32 {
        self.map_id
    }

    /// Active flows per backend id as of the last count (a recount starts when it is stale).
    pub fn active(&self) -> std::collections::HashMap<u32, u64> {
        self.get();
        self.active.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// The last count; starts a recount when it is older than [`STALE`]. Never blocks.
    pub fn get(&self) -> u64 {
        let stale = self
            .counted_at
            .lock()
            .map(|t| t.is_none_or(|t| t.elapsed() >= STALE))
            .unwrap_or(true);
        if stale {
            self.refresh();
        }
        self.count.load(Ordering::Relaxed)
    }

    /// Starts a count on its own thread unless one is running.
    fn refresh(&self) {
        if self.counting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (id, t, count, active, counting, at) = (
            self.map_id,
            self.tunables,
            self.count.clone(),
            self.active.clone(),
            self.counting.clone(),
            self.counted_at.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("conntrack-count".into())
            .spawn(move || {
                // Its own handle on the map (by id): nothing shared with the owner task.
                let started = Instant::now();
                let n = MapData::from_id(id)
                    .map_err(anyhow::Error::from)
                    .and_then(|d| {
                        let now = super::gc::monotonic_ns();
                        let mut by_backend = std::collections::HashMap::new();
                        // Thousands of entries per system call (`batch`): a full table of a
                        // million flows is read in a fraction of a second.
                        let n = super::batch::for_each::<FlowKey, CtValue>(
                            &Map::LruHashMap(d),
                            |k, v| {
                                if is_active(&v, k.proto, now, &t) {
                                    *by_backend.entry(v.backend_id).or_insert(0u64) += 1;
                                }
                            },
                        )?;
                        Ok((n, by_backend))
                    });
                match n {
                    Ok((n, by_backend)) => {
                        count.store(n, Ordering::Relaxed);
                        if let Ok(mut a) = active.lock() {
                            *a = by_backend;
                        }
                        tracing::debug!(
                            entries = n,
                            took_ms = started.elapsed().as_millis() as u64,
                            "conntrack counted"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "cannot count the conntrack map")
                    }
                }
                if let Ok(mut t) = at.lock() {
                    *t = Some(Instant::now());
                }
                counting.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.counting.store(false, Ordering::Release);
        }
    }
}
