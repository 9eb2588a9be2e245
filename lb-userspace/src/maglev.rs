//! Weighted Maglev: effective weights → a lookup table of `M` buckets (bucket → backend id).
//!
//! Pure and deterministic: the same backends and weights give the same table on every host, so
//! two balancers with one config send a flow to the same backend. The kernel only does
//! `table[hash % M]`.
//!
//! Each backend first gets an exact bucket count — its share of `M` rounded by largest
//! remainder, so every share is within one bucket of its target. Then the buckets are handed
//! out from per-backend permutations of the table (Maglev's offset/skip), with one change from
//! classic Maglev: every *position* of a backend's permutation has a fixed turn, `(k + ½) / n`
//! for position `k` of a backend with `n` buckets, and a backend takes the bucket at a position
//! only if it is still free at that turn (until it has its `n`). Classic Maglev instead gives
//! the backend's k-th *claim* that turn and walks on to the next free bucket, so one bucket
//! freed by a removal shifts every later claim of the backend that takes it, and those shifts
//! cascade. With fixed turns a freed bucket changes nothing else for its taker except where its
//! count runs out: removing one of N equal backends moves ≈ 1/N + 0.5 % of the buckets at
//! 300–650 backends, against ≈ 1/N + 1.05 % with claim-ordered turns (both measured).
//!
//! A service's table is composed of two layers ([`compose`]), because the change a migration
//! makes most — the split between pools — must be fast and move as few flows as possible:
//! - **pools**: every bucket has a fixed rank (a hash order of the buckets, the same on every
//!   host), and the pools, by name, take consecutive runs of ranks, each exactly its share of
//!   `M` (largest remainder). Moving the split between two pools by Δ moves exactly
//!   the Δ·M buckets between their old and new boundary, and nothing else;
//! - **backends**: each pool has its own table over all `M` buckets, built as above from the
//!   backends' weights within the pool. A bucket goes to the backend that its pool's table
//!   gives it. A pool's table changes only when its own backends do (health, weight, state),
//!   so a split change builds nothing: it is one pass over `M` buckets.
//!
//! A backend then gets its share of its pool's buckets up to the draw of which of its buckets
//! fall in the pool's ranks (the rank order is unrelated to the permutations): with
//! a standard deviation of at most √n buckets for a target of `n` (64 buckets, 0.1 % of 65537,
//! for each of two backends in a pool at 50 %).

use std::{cmp::Ordering, collections::BinaryHeap};

use lb_common::NO_BACKEND;

/// One backend as the table builder sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Stable identity: the permutation derives from it (e.g. "service/addr:port").
    pub key: String,
    /// The id the kernel's backend map knows it by (never [`NO_BACKEND`]).
    pub id: u32,
    /// Effective weight (pool share × backend share); 0 = no buckets.
    pub weight: f64,
}

fn fnv1a(seed: u64, s: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche so that near-identical names get unrelated permutations.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Bucket counts per entry: `m * w / Σw`, rounded by largest remainder. Ties go by a hash of
/// the key, not by position: with equal weights, the backends holding the extra bucket then
/// stay the same set (plus or minus some) when one is added or removed, instead of shifting.
pub fn bucket_counts(entries: &[Entry], m: u32) -> Vec<u32> {
    let total: f64 = entries.iter().map(|e| e.weight.max(0.0)).sum();
    if total <= 0.0 {
        return vec![0; entries.len()];
    }
    let exact: Vec<f64> = entries
        .iter()
        .map(|e| m as f64 * e.weight.max(0.0) / total)
        .collect();
    let mut counts: Vec<u32> = exact.iter().map(|q| q.floor() as u32).collect();
    let given: u32 = counts.iter().sum();
    let mut order: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].weight > 0.0)
        .collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.partial_cmp(&ra)
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(&b))
    });
    for &i in order.iter().cycle().take(m.saturating_sub(given) as usize) {
        counts[i] += 1;
    }
    counts
}

/// A pending claim: backend `idx` makes its `k`-th claim (of `n`) at time `(2k+1) / 2n`.
#[derive(Eq, PartialEq)]
struct Due {
    k: u64,
    n: u64,
    idx: usize,
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        // Earliest due first (BinaryHeap is a max-heap, so reversed), then lowest index.
        let lhs = (2 * self.k as u128 + 1) * other.n as u128;
        let rhs = (2 * other.k as u128 + 1) * self.n as u128;
        rhs.cmp(&lhs).then(other.idx.cmp(&self.idx))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Builds the table. `m` must be prime (it is [`lb_common::TABLE_SIZE`] in production).
/// Entries may come in any order: they are sorted by key first.
pub fn build(entries: &[Entry], m: u32) -> Vec<u32> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let owned: Vec<Entry> = sorted.into_iter().cloned().collect();
    let counts = bucket_counts(&owned, m);
    let m64 = m as u64;
    let perms: Vec<(u64, u64)> = owned
        .iter()
        .map(|e| {
            let offset = fnv1a(0, &e.key) % m64;
            let skip = fnv1a(0x9e37_79b9_7f4a_7c15, &e.key) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut table = vec![NO_BACKEND; m as usize];
    let mut left: Vec<u64> = counts.iter().map(|&c| c as u64).collect();
    let n_of: Vec<u64> = counts.iter().map(|&c| c as u64).collect();
    // Takes position `k` of backend `idx` if that bucket is still free; returns the backend's
    // next position that is free now, while it still needs buckets. A taken bucket stays
    // taken, so positions taken now can be passed without waiting for their turn; a free one
    // may still be taken before its turn (checked when it comes). Free buckets remain while
    // claims do (Σ counts = m) and every permutation visits every bucket, so the walk ends.
    // The bucket at each backend's pending position, advanced by adding `skip` (no division
    // in the walk, which visits ~m·ln m positions in all).
    let mut cur: Vec<u64> = perms.iter().map(|&(offset, _)| offset).collect();
    // Which buckets are taken, as bits: 8 KiB that stay in L1 while the walk probes them at
    // random (the table itself is 256 KiB).
    let mut taken = vec![0u64; (m as usize).div_ceil(64)];
    let is_taken = |taken: &[u64], s: u64| taken[(s >> 6) as usize] & (1 << (s & 63)) != 0;
    let mut step = |idx: usize, k: u64, table: &mut Vec<u32>| -> Option<u64> {
        let skip = perms[idx].1;
        let mut s = cur[idx];
        if !is_taken(&taken, s) {
            taken[(s >> 6) as usize] |= 1 << (s & 63);
            table[s as usize] = owned[idx].id;
            left[idx] -= 1;
        }
        if left[idx] == 0 {
            return None;
        }
        let mut next = k;
        loop {
            next += 1;
            s += skip;
            if s >= m64 {
                s -= m64;
            }
            if !is_taken(&taken, s) {
                break;
            }
        }
        cur[idx] = s;
        Some(next)
    };
    // Turns are processed in order with a calendar of `m` bins over [0, 1) — bin
    // ⌊(2k+1)·m / 2n⌋, exact in integers — and a heap for turns at or after 1 (backends that
    // walked past their count's worth of positions). A backend's next turn is at least 1/n ≥
    // 1/m later, so it always lands in a later bin: bins never need revisiting. Within a bin,
    // turns are ordered exactly (time, then index), so the order is the heap's order.
    const NONE: u32 = u32::MAX;
    let bin = |k: u64, n: u64| ((2 * k + 1) * m64 / (2 * n)) as usize;
    let mut head = vec![NONE; m as usize];
    let mut link = vec![NONE; owned.len()];
    let mut pos = vec![0u64; owned.len()];
    let mut late: BinaryHeap<Due> = BinaryHeap::new();
    let schedule = |idx: usize,
                    k: u64,
                    head: &mut Vec<u32>,
                    link: &mut Vec<u32>,
                    pos: &mut Vec<u64>,
                    late: &mut BinaryHeap<Due>| {
        let n = n_of[idx];
        let b = bin(k, n);
        if b < head.len() {
            pos[idx] = k;
            link[idx] = head[b];
            head[b] = idx as u32;
        } else {
            late.push(Due { k, n, idx });
        }
    };
    for idx in (0..owned.len()).filter(|&i| n_of[i] > 0) {
        schedule(idx, 0, &mut head, &mut link, &mut pos, &mut late);
    }
    let mut due: Vec<usize> = Vec::new();
    for b in 0..m as usize {
        due.clear();
        let mut i = head[b];
        while i != NONE {
            due.push(i as usize);
            i = link[i as usize];
        }
        if due.len() > 1 {
            due.sort_by(|&a, &c| {
                let ta = (2 * pos[a] as u128 + 1) * n_of[c] as u128;
                let tc = (2 * pos[c] as u128 + 1) * n_of[a] as u128;
                ta.cmp(&tc).then(a.cmp(&c))
            });
        }
        for &idx in &due {
            if let Some(next) = step(idx, pos[idx], &mut table) {
                schedule(idx, next, &mut head, &mut link, &mut pos, &mut late);
            }
        }
    }
    while let Some(Due { k, n, idx }) = late.pop() {
        if let Some(next) = step(idx, k, &mut table) {
            late.push(Due { k: next, n, idx });
        }
    }
    table
}

/// One pool as the composer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    /// Names the pool in the tie-break of [`bucket_counts`].
    pub name: String,
    /// The pool's share of new flows; 0 = no buckets.
    pub weight: f64,
    /// Its backends, each weighted by its share within the pool.
    pub backends: Vec<Entry>,
}

/// Each bucket's rank: a fixed order of the buckets by a hash of their index, the order in
/// which the pools take them.
pub fn ranks(m: u32) -> Vec<u32> {
    let mut order: Vec<u32> = (0..m).collect();
    // splitmix64's finaliser: a bijection of u64, so no two buckets tie.
    order.sort_by_key(|&b| {
        let mut z = (b as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    });
    let mut rank = vec![0u32; m as usize];
    for (r, &b) in order.iter().enumerate() {
        rank[b as usize] = r as u32;
    }
    rank
}

/// Composes a service's table from its pools' tables: the pools, by name, take
/// consecutive runs of bucket ranks sized by their weights (exact to a bucket), and a bucket
/// goes to what its pool's table gives it. `tables[i]` is `pools[i]`'s table ([`build`] of
/// its backends), `rank` is [`ranks`]`(m)`.
pub fn compose(pools: &[Pool], tables: &[&[u32]], rank: &[u32]) -> Vec<u32> {
    let m = rank.len() as u32;
    // By name, not as given: hosts whose configs list the pools in another order must
    // still build the same table.
    let mut order: Vec<usize> = (0..pools.len()).collect();
    order.sort_by(|&a, &b| pools[a].name.cmp(&pools[b].name));
    // A pool without a backend to give a bucket to takes none: its share goes to the
    // others, as if its weight were 0 (which is what lbd's state gives it; this keeps a
    // table from ever sending flows to nothing while another pool could take them).
    let weights: Vec<Entry> = order
        .iter()
        .map(|&i| Entry {
            key: pools[i].name.clone(),
            id: 0,
            weight: if pools[i].backends.iter().any(|e| e.weight > 0.0) {
                pools[i].weight
            } else {
                0.0
            },
        })
        .collect();
    // Ends of each pool's run of ranks, with its table.
    let runs: Vec<(u32, &[u32])> = bucket_counts(&weights, m)
        .iter()
        .zip(&order)
        .scan(0u32, |end, (&c, &i)| {
            *end += c;
            Some((*end, tables[i]))
        })
        .collect();
    rank.iter()
        .enumerate()
        .map(|(b, &r)| match runs.iter().find(|(end, _)| r < *end) {
            Some((_, table)) => table[b],
            None => NO_BACKEND,
        })
        .collect()
}

/// A whole service's table from its pools, built from scratch ([`Cache::compose`] keeps the
/// pools' tables and the ranks between builds).
pub fn build_pools(pools: &[Pool], m: u32) -> Vec<u32> {
    let tables: Vec<Vec<u32>> = pools.iter().map(|p| build(&p.backends, m)).collect();
    let refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
    compose(pools, &refs, &ranks(m))
}

/// The last few tables built, by their inputs: going back to a recent split — the rollback a
/// migration depends on — republishes its table instead of rebuilding it (a build takes
/// milliseconds; a lookup compares a handful of entries).
#[derive(Debug, Default)]
pub struct Cache {
    /// Most recent last; at most [`Cache::CAPACITY`].
    tables: Vec<(Vec<Entry>, std::sync::Arc<Vec<u32>>)>,
    /// [`ranks`] for the table size in use.
    ranks: Option<(u32, std::sync::Arc<Vec<u32>>)>,
}

impl Cache {
    /// Tables kept (256 KiB each at the kernel's table size): a service's pools each have
    /// one, and going back to a recent set of backends reuses it.
    pub const CAPACITY: usize = 16;

    /// The table for `entries` (in any order) with `m` buckets: from the cache, or built and
    /// kept. The second value says whether it was built.
    pub fn get_or_build(&mut self, entries: &[Entry], m: u32) -> (std::sync::Arc<Vec<u32>>, bool) {
        let mut key = entries.to_vec();
        key.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(i) = self
            .tables
            .iter()
            .position(|(k, t)| *k == key && t.len() == m as usize)
        {
            let hit = self.tables.remove(i);
            let table = hit.1.clone();
            self.tables.push(hit);
            return (table, false);
        }
        let table = std::sync::Arc::new(build(&key, m));
        if self.tables.len() == Self::CAPACITY {
            self.tables.remove(0);
        }
        self.tables.push((key, table.clone()));
        (table, true)
    }

    /// A service's table from its pools ([`build_pools`]), building only the pools' tables
    /// that are not kept: a split change builds none. The second value says whether any was
    /// built.
    pub fn compose(&mut self, pools: &[Pool], m: u32) -> (Vec<u32>, bool) {
        let rank = match &self.ranks {
            Some((size, rank)) if *size == m => rank.clone(),
            _ => {
                let rank = std::sync::Arc::new(ranks(m));
                self.ranks = Some((m, rank.clone()));
                rank
            }
        };
        let mut built = false;
        let tables: Vec<std::sync::Arc<Vec<u32>>> = pools
            .iter()
            .map(|p| {
                let (t, fresh) = self.get_or_build(&p.backends, m);
                built |= fresh;
                t
            })
            .collect();
        let refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        (compose(pools, &refs, &rank), built)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::TABLE_SIZE;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn entries(weights: &[u32]) -> Vec<Entry> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Entry {
                key: format!("web/10.20.{}.{}:8080", i / 250, i % 250 + 1),
                id: i as u32 + 1,
                weight: w as f64,
            })
            .collect()
    }

    /// Fraction of buckets that change owner when backend `victim` of `n` equal ones goes.
    fn removal_moved(n: usize, victim: usize) -> f64 {
        let es = entries(&vec![100; n]);
        let before = build(&es, TABLE_SIZE);
        let gone = es[victim].id;
        let rest: Vec<Entry> = es.iter().filter(|e| e.id != gone).cloned().collect();
        let after = build(&rest, TABLE_SIZE);
        before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / TABLE_SIZE as f64
    }

    fn counts_of(table: &[u32]) -> HashMap<u32, u32> {
        let mut c = HashMap::new();
        for &id in table {
            *c.entry(id).or_default() += 1;
        }
        c
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("LB_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32)))]

        /// Every backend gets its share of the table to within one bucket (so within 1 % of
        /// its target whenever that is 100 buckets or more), and weight 0 gets nothing.
        #[test]
        fn shares_follow_weights(weights in prop::collection::vec(0u32..=1000, 1..=650)) {
            let es = entries(&weights);
            let table = build(&es, TABLE_SIZE);
            let c = counts_of(&table);
            let total: f64 = weights.iter().map(|&w| w as f64).sum();
            for e in &es {
                let got = *c.get(&e.id).unwrap_or(&0) as f64;
                if e.weight == 0.0 {
                    prop_assert_eq!(got, 0.0);
                    continue;
                }
                let want = TABLE_SIZE as f64 * e.weight / total;
                prop_assert!((got - want).abs() < 1.0, "{}: {} buckets, want {}", e.key, got, want);
                prop_assert!((got - want).abs() / TABLE_SIZE as f64 <= 0.01);
            }
            if total == 0.0 {
                prop_assert!(table.iter().all(|&id| id == NO_BACKEND));
            } else {
                prop_assert!(table.iter().all(|&id| id != NO_BACKEND));
            }
        }

        /// Removing one of N equal backends moves at most 1/N + 1 % of the buckets, from 2 up
        /// to 650 backends.
        #[test]
        fn removal_moves_few_buckets(n in 2usize..=650, victim in any::<prop::sample::Index>()) {
            let moved = removal_moved(n, victim.index(n));
            prop_assert!(moved <= 1.0 / n as f64 + 0.01, "n={} moved {:.4}", n, moved);
        }
    }

    /// Two pools of backends, `legacy` at `split` % of new flows.
    fn pools(split: u32, legacy: &[u32], k8s: &[u32]) -> Vec<Pool> {
        let pool = |name: &str, weight: u32, ws: &[u32], first: u32| {
            let total: u32 = ws.iter().sum();
            Pool {
                name: name.into(),
                weight: weight as f64 / 100.0,
                backends: ws
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| Entry {
                        key: format!("web/{name}-{i}"),
                        id: first + i as u32,
                        weight: if total == 0 {
                            0.0
                        } else {
                            w as f64 / total as f64
                        },
                    })
                    .collect(),
            }
        };
        vec![
            pool("legacy", split, legacy, 1),
            pool("k8s", 100 - split, k8s, 1000),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("LB_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32)))]

        /// A split change moves exactly the buckets between the pools' old and new boundary,
        /// each from the pool that lost share to the one that gained it; no bucket moves
        /// between two backends of one pool.
        #[test]
        fn a_split_change_moves_exactly_its_delta(
            from in 0u32..=100,
            to in 0u32..=100,
            legacy in prop::collection::vec(1u32..=100, 1..=20),
            k8s in prop::collection::vec(1u32..=100, 1..=20),
        ) {
            let before = build_pools(&pools(from, &legacy, &k8s), TABLE_SIZE);
            let after = build_pools(&pools(to, &legacy, &k8s), TABLE_SIZE);
            let moved: Vec<(u32, u32)> = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b)
                .map(|(&a, &b)| (a, b))
                .collect();
            let is_legacy = |id: u32| id < 1000;
            let legacy_buckets = |t: &[u32]| t.iter().filter(|&&id| is_legacy(id)).count() as i64;
            prop_assert_eq!(
                moved.len() as i64,
                (legacy_buckets(&before) - legacy_buckets(&after)).abs()
            );
            for (a, b) in moved {
                prop_assert_eq!(is_legacy(a), from > to, "{} → {}", a, b);
                prop_assert_eq!(is_legacy(b), from < to, "{} → {}", a, b);
            }
        }

        /// Each pool gets exactly its share of the buckets (to one), and each backend its
        /// share of its pool's up to the draw of which of its pool-table buckets fall in the
        /// pool's ranks: within 6 standard deviations of that draw (√n buckets at most).
        #[test]
        fn pools_get_exact_shares_and_backends_theirs_within_the_draw(
            split in 0u32..=100,
            legacy in prop::collection::vec(0u32..=100, 1..=60),
            k8s in prop::collection::vec(0u32..=100, 1..=60),
        ) {
            let ps = pools(split, &legacy, &k8s);
            let table = build_pools(&ps, TABLE_SIZE);
            let c = counts_of(&table);
            let pool_counts: Vec<f64> = ps
                .iter()
                .map(|p| p.backends.iter().map(|e| *c.get(&e.id).unwrap_or(&0) as f64).sum())
                .collect();
            let live: f64 = ps.iter().zip(&pool_counts).filter(|(p, _)| p.backends.iter().any(|e| e.weight > 0.0)).map(|(p, _)| p.weight).sum();
            for (p, &got) in ps.iter().zip(&pool_counts) {
                let want = if live > 0.0 && p.backends.iter().any(|e| e.weight > 0.0) {
                    TABLE_SIZE as f64 * p.weight / live
                } else {
                    0.0
                };
                prop_assert!((got - want).abs() < 1.0 || p.backends.iter().all(|e| e.weight == 0.0), "{}: {} buckets, want {}", p.name, got, want);
                for e in &p.backends {
                    let got = *c.get(&e.id).unwrap_or(&0) as f64;
                    let want = pool_counts[ps.iter().position(|q| q.name == p.name).unwrap()] * e.weight;
                    prop_assert!((got - want).abs() <= 6.0 * want.sqrt() + 2.0, "{}: {} buckets, want {}", e.key, got, want);
                }
            }
        }
    }

    /// Found by the property test above: a pool whose only backend has weight 0 kept its 1 %
    /// of the buckets, and they sent new flows to no backend.
    #[test]
    fn a_pool_without_a_live_backend_gives_its_share_to_the_others() {
        let table = build_pools(&pools(1, &[0], &[1]), TABLE_SIZE);
        assert!(
            table.iter().all(|&id| id == 1000),
            "every bucket to k8s' one backend"
        );
        let none = build_pools(&pools(50, &[0], &[0]), TABLE_SIZE);
        assert!(none.iter().all(|&id| id == NO_BACKEND));
    }

    #[test]
    fn the_order_pools_are_given_in_changes_nothing() {
        let ps = pools(70, &[3, 1], &[1, 2]);
        let mut rev = ps.clone();
        rev.reverse();
        assert_eq!(build_pools(&ps, TABLE_SIZE), build_pools(&rev, TABLE_SIZE));
    }

    #[test]
    fn a_change_in_one_pool_moves_no_bucket_of_another() {
        let before = build_pools(&pools(90, &[1, 1, 1], &[1, 1]), TABLE_SIZE);
        // One k8s backend goes down: its pool shares among the rest, legacy stays put.
        let after = build_pools(&pools(90, &[1, 1, 1], &[1, 0]), TABLE_SIZE);
        for (a, b) in before.iter().zip(&after) {
            if *a < 1000 || *b < 1000 {
                assert_eq!(a, b, "a legacy bucket moved");
            }
        }
        assert!(after.iter().all(|&id| id != 1001));
    }

    #[test]
    fn the_cache_composes_what_a_fresh_build_gives_and_a_split_builds_nothing() {
        let mut c = Cache::default();
        let (t, built) = c.compose(&pools(95, &[2, 1], &[1]), TABLE_SIZE);
        assert!(built);
        assert_eq!(t, build_pools(&pools(95, &[2, 1], &[1]), TABLE_SIZE));
        let (t, built) = c.compose(&pools(80, &[2, 1], &[1]), TABLE_SIZE);
        assert!(!built, "a split change reuses both pools' tables");
        assert_eq!(t, build_pools(&pools(80, &[2, 1], &[1]), TABLE_SIZE));
    }

    #[test]
    fn without_any_weight_the_table_is_empty() {
        let mut ps = pools(50, &[1], &[1]);
        for p in &mut ps {
            p.weight = 0.0;
        }
        assert!(
            build_pools(&ps, TABLE_SIZE)
                .iter()
                .all(|&id| id == NO_BACKEND)
        );
    }

    #[test]
    fn same_input_in_any_order_gives_the_same_table() {
        let es = entries(&[90, 90, 10, 10]);
        let mut rev = es.clone();
        rev.reverse();
        assert_eq!(build(&es, TABLE_SIZE), build(&rev, TABLE_SIZE));
    }

    #[test]
    fn counts_sum_to_the_table_size() {
        let c = bucket_counts(&entries(&[1, 1, 1]), 7);
        assert_eq!(c.iter().sum::<u32>(), 7);
        assert!(c.iter().all(|&n| n == 2 || n == 3));
    }

    #[test]
    fn weight_change_moves_only_about_the_weight_delta() {
        // 90/10 → 80/20 between two pools of two: ~10 % of flows must move, not half.
        let before = build(&entries(&[45, 45, 5, 5]), TABLE_SIZE);
        let after = build(&entries(&[40, 40, 10, 10]), TABLE_SIZE);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64;
        assert!(moved / (TABLE_SIZE as f64) < 0.15, "moved {moved}");
    }

    #[test]
    fn the_cache_gives_back_exactly_what_build_gives_and_forgets_the_oldest() {
        let entries = |w: f64| {
            vec![
                Entry {
                    key: "web/a".into(),
                    id: 1,
                    weight: w,
                },
                Entry {
                    key: "web/b".into(),
                    id: 2,
                    weight: 1.0 - w,
                },
            ]
        };
        let mut c = Cache::default();
        let (t, built) = c.get_or_build(&entries(0.9), 65537);
        assert!(built);
        assert_eq!(*t, build(&entries(0.9), 65537));
        let mut reversed = entries(0.9);
        reversed.reverse();
        let (again, built) = c.get_or_build(&reversed, 65537);
        assert!(!built, "the same entries in another order hit");
        assert_eq!(again, t);
        let (other, built) = c.get_or_build(&entries(0.1), 65537);
        assert!(built);
        assert_eq!(*other, build(&entries(0.1), 65537));
        for k in 0..Cache::CAPACITY {
            c.get_or_build(&entries(0.2 + k as f64 / 100.0), 65537);
        }
        assert!(
            c.get_or_build(&entries(0.9), 65537).1,
            "the oldest was forgotten"
        );
    }
}
