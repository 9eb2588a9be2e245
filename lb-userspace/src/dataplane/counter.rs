//! The conntrack map's entry count for `/metrics`, counted on a thread of its own: walking
//! the keys costs one syscall each (about a quarter second at 262 144 entries), which must
//! never run on the daemon's owner task, where commands wait.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{conntrack::CtValue, flow::FlowKey};

/// A count older than this starts a new one (the stale value is still answered).
pub const STALE: Duration = Duration::from_secs(5);

/// The last count of a map's entries, recounted in the background when it is stale.
pub struct Counter {
    map_id: u32,
    count: Arc<AtomicU64>,
    counting: Arc<AtomicBool>,
    counted_at: Arc<Mutex<Option<Instant>>>,
}

impl Counter {
    /// Counts the entries of the hash map with kernel id `map_id` (a first count starts now).
    pub fn new(map_id: u32) -> Counter {
        let c = Counter {
            map_id,
            count: Arc::new(AtomicU64::new(0)),
            counting: Arc::new(AtomicBool::new(false)),
            counted_at: Arc::new(Mutex::new(None)),
        };
        c.refresh();
        c
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
        let (id, count, counting, at) = (
            self.map_id,
            self.count.clone(),
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
                        Ok(HashMap::<MapData, FlowKey, CtValue>::try_from(
                            Map::LruHashMap(d),
                        )?)
                    })
                    .map(|m| m.keys().count() as u64);
                match n {
                    Ok(n) => {
                        count.store(n, Ordering::Relaxed);
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
