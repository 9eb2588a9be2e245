//! Benchmarks write their sections into `target/bench/`; `cargo xtask bench` puts them
//! together, in name order, into BENCHMARKS.md.

use std::path::PathBuf;

/// The directory sections go to.
pub fn dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("bench")
}

/// Whether this is `cargo xtask test`'s quick run (`LB_BENCH_QUICK` set): fewer rounds, and
/// nothing written — it only keeps the benchmarks (and the fixtures they assert) working.
pub fn quick() -> bool {
    std::env::var_os("LB_BENCH_QUICK").is_some()
}

/// Writes one section (`name` orders it: "1-per-packet", "2-end-to-end", …); not in a
/// [`quick`] run.
pub fn write_section(name: &str, markdown: &str) {
    if quick() {
        return;
    }
    let d = dir();
    std::fs::create_dir_all(&d).expect("creating target/bench");
    let path = d.join(format!("{name}.md"));
    std::fs::write(&path, markdown).expect("writing a benchmark section");
    eprintln!("wrote {}", path.display());
}
