//! What `lbd` computes on a change, release build, 65537 buckets. Run by `cargo xtask bench`.
//! - `table_build`: weights → one pool's table, for 10, 100 and 1000 backends (a health,
//!   weight or state change of a backend rebuilds its pool's table);
//! - `split_change`: a new split between two pools (half the backends each, both pools'
//!   tables kept, as lbd keeps them) → the service's table, for 4 and 100 backends.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb_common::TABLE_SIZE;
use lb_userspace::maglev::{Cache, Entry, Pool, build};

fn backends(n: usize, weight: impl Fn(usize) -> f64) -> Vec<Entry> {
    (0..n)
        .map(|i| Entry {
            key: format!("web/10.20.{}.{}:8080", i / 250, i % 250 + 1),
            id: i as u32 + 1,
            weight: weight(i),
        })
        .collect()
}

fn table_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("table_build");
    g.sample_size(20);
    for n in [10usize, 100, 1000] {
        let entries = backends(n, |i| if i % 2 == 0 { 90.0 } else { 10.0 });
        g.bench_with_input(BenchmarkId::from_parameter(n), &entries, |b, es| {
            b.iter(|| build(es, TABLE_SIZE))
        });
    }
    g.finish();
}

fn split_change(c: &mut Criterion) {
    let mut g = c.benchmark_group("split_change");
    for n in [4usize, 100] {
        let all = backends(n, |_| 1.0 / (n / 2) as f64);
        let pools = |legacy: f64| {
            vec![
                Pool {
                    name: "legacy".into(),
                    weight: legacy,
                    backends: all[..n / 2].to_vec(),
                },
                Pool {
                    name: "k8s".into(),
                    weight: 1.0 - legacy,
                    backends: all[n / 2..].to_vec(),
                },
            ]
        };
        let (a, b) = (pools(0.95), pools(0.80));
        let mut cache = Cache::default();
        cache.compose(&a, TABLE_SIZE);
        let mut flip = false;
        g.bench_function(BenchmarkId::from_parameter(n), |bench| {
            bench.iter(|| {
                flip = !flip;
                let (table, built) = cache.compose(if flip { &b } else { &a }, TABLE_SIZE);
                assert!(!built);
                table
            })
        });
    }
    g.finish();
}

criterion_group!(benches, table_build, split_change);
criterion_main!(benches);
