//! Passive health: a backend whose new flows fail (reset or unanswered) `passive_failures`
//! times in a row is taken out of the table before the next active check would notice
//! (HAProxy's `observe layer4` with `error-limit`, Envoy's consecutive-failure outlier
//! detection). Fed with the XDP program's per-backend counters; pure, so its rules are
//! unit-tested.
//!
//! The counters say how many flows failed and how many were answered since the last look,
//! not in which order. A look that saw any answered flow resets the run (the failures may
//! have come before it): a backend failing half its flows is degraded, not dead, and is left
//! to the comparison of pools. Looks are frequent (every [`INTERVAL`]), so a dead backend —
//! nothing answered at all — is caught within one look of its `passive_failures`th failure.

use std::collections::HashMap;

use lb_common::stats::L4Stats;

/// How often the daemon looks.
pub const INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Failures in a row per backend id, from successive counter readings.
#[derive(Debug, Default)]
pub struct Passive {
    /// Backend id → (failures, answered) at the last look, failures in a row.
    seen: HashMap<u32, ((u64, u64), u64)>,
}

impl Passive {
    /// Feeds one backend's counters now; returns its failures in a row.
    pub fn observe(&mut self, id: u32, l4: &L4Stats) -> u64 {
        let now = (l4.connect_reset + l4.connect_timeout, l4.answered);
        let Some((last, run)) = self.seen.get_mut(&id) else {
            // The first look sets the baseline: what happened before lbd (re)started is old.
            self.seen.insert(id, (now, 0));
            return 0;
        };
        let failed = now.0.saturating_sub(last.0);
        let answered = now.1.saturating_sub(last.1);
        *last = now;
        *run = if answered > 0 { 0 } else { *run + failed };
        *run
    }

    /// Starts a backend's run over (it was taken out, or came back).
    pub fn reset(&mut self, id: u32) {
        if let Some((_, run)) = self.seen.get_mut(&id) {
            *run = 0;
        }
    }

    /// Forgets backends that are no longer configured.
    pub fn retain(&mut self, live: impl Fn(u32) -> bool) {
        self.seen.retain(|id, _| live(*id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l4(failed: u64, answered: u64) -> L4Stats {
        L4Stats {
            connect_reset: failed,
            answered,
            ..Default::default()
        }
    }

    #[test]
    fn failures_add_up_across_looks_until_a_flow_is_answered() {
        let mut p = Passive::default();
        assert_eq!(
            p.observe(1, &l4(100, 900)),
            0,
            "history before the first look"
        );
        assert_eq!(p.observe(1, &l4(102, 900)), 2);
        assert_eq!(p.observe(1, &l4(105, 900)), 5);
        assert_eq!(
            p.observe(1, &l4(106, 901)),
            0,
            "an answer in the look resets"
        );
        assert_eq!(p.observe(1, &l4(106, 901)), 0);
        assert_eq!(p.observe(1, &l4(109, 901)), 3);
        p.reset(1);
        assert_eq!(p.observe(1, &l4(110, 901)), 1);
    }

    #[test]
    fn timeouts_count_as_failures_and_backends_are_apart() {
        let mut p = Passive::default();
        p.observe(1, &L4Stats::default());
        p.observe(2, &L4Stats::default());
        let t = L4Stats {
            connect_timeout: 4,
            ..Default::default()
        };
        assert_eq!(p.observe(1, &t), 4);
        assert_eq!(p.observe(2, &l4(0, 3)), 0);
        p.retain(|id| id == 2);
        assert_eq!(p.observe(1, &t), 0, "a forgotten backend starts over");
    }
}
