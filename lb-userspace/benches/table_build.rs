//! Weights → a 65537-bucket table, for 10, 100 and 1000 equal backends (the work `lbd` does on
//! every weight, state, health or config change). Run by `cargo xtask bench`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb_common::TABLE_SIZE;
use lb_userspace::maglev::{Entry, build};

fn table_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("table_build");
    g.sample_size(20);
    for n in [10usize, 100, 1000] {
        let entries: Vec<Entry> = (0..n)
            .map(|i| Entry {
                key: format!("web/10.20.{}.{}:8080", i / 250, i % 250 + 1),
                id: i as u32 + 1,
                weight: if i % 2 == 0 { 90.0 } else { 10.0 },
            })
            .collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &entries, |b, es| {
            b.iter(|| build(es, TABLE_SIZE))
        });
    }
    g.finish();
}

criterion_group!(benches, table_build);
criterion_main!(benches);
