//! Smooth weighted round robin — nginx's per-request algorithm. Each pick adds every
//! backend's weight to its running value, takes the backend with the largest value, and
//! subtracts the total weight from it. Over Σw picks each backend is picked exactly w times,
//! spread out (at 9:1 the light one never comes twice in a row).

/// The picker: ids with weights and running values.
#[derive(Clone, Debug, Default)]
pub struct Swrr {
    entries: Vec<Slot>,
}

#[derive(Clone, Debug)]
struct Slot {
    id: u32,
    weight: i64,
    current: i64,
}

impl Swrr {
    /// A picker over `(id, weight)`; weight-0 entries are never picked.
    pub fn new(weights: &[(u32, u64)]) -> Swrr {
        let mut s = Swrr::default();
        s.set_weights(weights);
        s
    }

    /// Replaces the weights, keeping the running values of ids that stay, so a change takes
    /// effect from the next pick without restarting the rotation.
    pub fn set_weights(&mut self, weights: &[(u32, u64)]) {
        let old = std::mem::take(&mut self.entries);
        self.entries = weights
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|&(id, w)| Slot {
                id,
                weight: w.min(i64::MAX as u64 / 4096) as i64,
                current: old.iter().find(|s| s.id == id).map_or(0, |s| s.current),
            })
            .collect();
    }

    /// The next backend, or `None` when no backend has weight.
    pub fn pick(&mut self) -> Option<u32> {
        let mut total = 0;
        let mut best: Option<usize> = None;
        for i in 0..self.entries.len() {
            let s = &mut self.entries[i];
            s.current += s.weight;
            total += s.weight;
            // Ties go to the first in order, as in nginx.
            if best.is_none_or(|b| self.entries[i].current > self.entries[b].current) {
                best = Some(i);
            }
        }
        let b = best?;
        self.entries[b].current -= total;
        Some(self.entries[b].id)
    }
}

/// Integer weights from fractional shares, reduced by their common divisor so one period
/// (Σw picks) is as short as the shares allow: 0.45/0.45/0.05/0.05 → 9/9/1/1.
pub fn integer_weights(shares: &[(u32, f64)]) -> Vec<(u32, u64)> {
    const SCALE: f64 = 1_000_000.0;
    let raw: Vec<(u32, u64)> = shares
        .iter()
        .map(|&(id, s)| (id, (s.max(0.0) * SCALE).round() as u64))
        .collect();
    let g = raw.iter().fold(0u64, |g, &(_, w)| gcd(g, w));
    if g <= 1 {
        return raw;
    }
    raw.into_iter().map(|(id, w)| (id, w / g)).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period(w: &[(u32, u64)]) -> Vec<u32> {
        let mut s = Swrr::new(w);
        let n: u64 = w.iter().map(|(_, w)| w).sum();
        (0..n).map(|_| s.pick().unwrap()).collect()
    }

    #[test]
    fn one_period_gives_every_backend_exactly_its_weight() {
        for w in [
            vec![(1, 9), (2, 1)],
            vec![(1, 5), (2, 1), (3, 1)],
            vec![(1, 45), (2, 45), (3, 5), (4, 5)],
            vec![(1, 1), (2, 1000), (3, 7), (4, 0)],
        ] {
            let picks = period(&w);
            for &(id, weight) in &w {
                let got = picks.iter().filter(|&&p| p == id).count() as u64;
                assert_eq!(got, weight, "id {id} in {w:?}");
            }
        }
    }

    #[test]
    fn at_90_10_the_light_backend_is_never_picked_twice_in_a_row() {
        // Legacy 90 split over two backends, k8s 10 over two.
        let w = integer_weights(&[(1, 0.45), (2, 0.45), (3, 0.05), (4, 0.05)]);
        assert_eq!(w, vec![(1, 9), (2, 9), (3, 1), (4, 1)]);
        let mut s = Swrr::new(&w);
        let picks: Vec<u32> = (0..200).map(|_| s.pick().unwrap()).collect();
        for pair in picks.windows(2) {
            assert!(
                !(pair[0] >= 3 && pair[1] >= 3),
                "two k8s picks in a row: {picks:?}"
            );
        }
        assert_eq!(picks.iter().filter(|&&p| p >= 3).count(), 20);
    }

    #[test]
    fn a_weight_change_applies_from_the_next_pick() {
        let mut s = Swrr::new(&[(1, 1), (2, 1)]);
        s.pick();
        s.set_weights(&[(1, 0), (2, 1)]);
        for _ in 0..10 {
            assert_eq!(s.pick(), Some(2));
        }
        s.set_weights(&[(1, 3), (2, 1)]);
        let picks: Vec<u32> = (0..4).map(|_| s.pick().unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 3, "{picks:?}");
    }

    #[test]
    fn no_weight_no_pick() {
        assert_eq!(Swrr::new(&[]).pick(), None);
        assert_eq!(Swrr::new(&[(1, 0)]).pick(), None);
    }
}
