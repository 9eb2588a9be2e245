//! `cargo xtask setup | build | test | demo | bench` — the project's own install-and-run steps.
//!
//! xtask depends on nothing of the project's, so it compiles on a fresh machine before the
//! eBPF toolchain exists; `setup` then installs that toolchain (idempotent, quick when done).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages, bpf-linker, a bpf filesystem.
    Setup,
    /// Set up, then build release lbd/lbctl (and the XDP program they embed) into
    /// target/dist/: stripped binaries to install, and their debug info beside them.
    Build,
    /// Set up, build, run every test (unit, property, BPF_PROG_TEST_RUN fixtures, namespaces).
    Test,
    /// Set up, build, and walk the migration story in network namespaces.
    Demo,
    /// Set up, build, and measure per-packet cost (BPF_PROG_TEST_RUN) into BENCHMARKS.md.
    Bench,
}

/// Debian packages the build and the tests need.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "ethtool",
    "procps",
    "socat",
    // promtool checks the deploy/ files; the metrics test scrapes lbd with a real Prometheus.
    "prometheus",
    // systemd-analyze verifies deploy/lbd.service.
    "systemd",
    // lbd's forward filter (and the tests' fault injection: dropped SYNs).
    "nftables",
    // objcopy and readelf: `cargo xtask build` splits the debug info off the binaries.
    "binutils",
    // BIRD: the scale-out tests' router and the balancer hosts' BGP speakers.
    "bird2",
];
/// What `cargo xtask bench` compares against (not needed by the tests).
const BENCH_PACKAGES: &[&str] = &["wrk", "nginx", "libnginx-mod-stream", "haproxy"];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    install(PACKAGES)?;
    setup_rest()
}

/// Installs the Debian packages of `packages` that are missing.
fn install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root");
        }
        eprintln!("setup: installing {missing:?}");
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn setup_rest() -> Result<()> {
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !have_linker {
        eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22");
        // Both variables are needed: without LLVM_PREFIX its build script finds an older LLVM.
        sh(Command::new("cargo")
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    // No bpffs mount here: the tests, the demo and the benchmarks pin under private bpf
    // filesystems they mount and unmount themselves, and `lbd run` mounts /sys/fs/bpf when its
    // pin_dir is there and nothing is mounted. Mounting the host's /sys/fs/bpf would leave
    // host state behind (the kernel's preload files appear in it).
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    c
}

/// `cargo test` of the ignored benchmark tests `tests` in lb-tests, one at a time.
fn bench_tests(release: bool, tests: &[&str]) -> Command {
    let mut args = bench_test_args(release, tests);
    args.extend(["--", "--ignored", "--nocapture", "--test-threads=1"]);
    cargo(&args)
}

/// `cargo test` arguments selecting the benchmark tests `tests` (without running them).
fn bench_test_args<'a>(release: bool, tests: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["test"];
    if release {
        args.push("--release");
    }
    args.extend(["-p", "lb-tests"]);
    for t in tests {
        args.extend(["--test", t]);
    }
    args
}

fn build(release: bool) -> Result<()> {
    let mut args = vec!["build", "--bins"];
    if release {
        args.push("--release");
    }
    sh(&mut cargo(&args))
}

/// The binaries a user installs: release builds without their debug info (tens of MB of
/// DWARF that a running lbd never reads), which goes to `<bin>.debug` beside each, linked by
/// `.gnu_debuglink` so that gdb and perf find it when it is installed with the binary (or
/// under /usr/lib/debug). The release profile keeps debug info for profiling.
fn dist() -> Result<()> {
    build(true)?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let dist = target.join("dist");
    std::fs::create_dir_all(&dist)?;
    for bin in ["lbd", "lbctl"] {
        let built = target.join("release").join(bin);
        let out = dist.join(bin);
        let debug = dist.join(format!("{bin}.debug"));
        sh(Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&built)
            .arg(&debug))?;
        sh(Command::new("objcopy")
            .args(["--strip-debug", "--strip-unneeded"])
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(&built)
            .arg(&out))?;
        // What is shipped must really be without its DWARF, and must point at it.
        let sections = Command::new("readelf").arg("-S").arg(&out).output()?;
        let sections = String::from_utf8_lossy(&sections.stdout);
        if sections.contains(".debug_info") || !sections.contains(".gnu_debuglink") {
            bail!(
                "{} still carries debug info or lacks its debug link",
                out.display()
            );
        }
        let mib = |p: &std::path::Path| -> Result<f64> {
            Ok(std::fs::metadata(p)?.len() as f64 / (1 << 20) as f64)
        };
        eprintln!(
            "dist: {} {:.1} MiB (built {:.1} MiB; debug info in {} {:.1} MiB)",
            out.display(),
            mib(&out)?,
            mib(&built)?,
            debug.display(),
            mib(&debug)?
        );
    }
    Ok(())
}

/// Runs every benchmark (each writes a section into target/bench/) and assembles
/// BENCHMARKS.md from them.
fn bench() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let sections = target.join("bench");
    let _ = std::fs::remove_dir_all(&sections);
    let benches = ["xdp_bench", "control_bench", "e2e_bench"];
    // Everything is built first and the build's writes flushed before the first
    // measurement; then one benchmark at a time, the per-packet one first. (One `cargo test`
    // of all three ran them in name order, the per-packet rounds last, right after the
    // end-to-end run and its namespaces' teardown: two full runs got 40 ns outliers there
    // that standalone runs of the same build never showed.)
    sh(&mut cargo(&["build", "--release", "--bins"]))?;
    let mut build_only = bench_test_args(true, &benches);
    build_only.push("--no-run");
    sh(&mut cargo(&build_only))?;
    let table_build = |extra: &[&str]| {
        let mut args = vec!["bench", "-p", "lb-userspace", "--bench", "table_build"];
        args.extend(extra);
        sh(&mut cargo(&args))
    };
    table_build(&["--no-run"])?;
    sh(&mut Command::new("sync"))?;
    std::thread::sleep(std::time::Duration::from_secs(5));
    for b in benches {
        sh(bench_tests(true, &[b]).env("LBD_BIN", target.join("release/lbd")))?;
    }
    table_build(&["--", "--noplot"])?;
    let estimate = |name: &str| -> Result<String> {
        let est = target.join(format!("criterion/{name}/new/estimates.json"));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&est)?)?;
        let ms = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN) / 1e6;
        Ok(format!(
            "{:.2} ms | {:.2}–{:.2} ms",
            ms(&v["median"]["point_estimate"]),
            ms(&v["mean"]["confidence_interval"]["lower_bound"]),
            ms(&v["mean"]["confidence_interval"]["upper_bound"]),
        ))
    };
    let mut md = String::from(
        "## Table build (criterion)\n\nRelease build, 65537 buckets.\n\nA pool's table from its backends' weights (what lbd builds when a backend's health, weight or state changes), alternating weights 90/10:\n\n| backends | median | 95 % interval of the mean |\n|---|---|---|\n",
    );
    for n in [10, 100, 1000] {
        md += &format!("| {n} | {} |\n", estimate(&format!("table_build/{n}"))?);
    }
    md += "\nA service's table for a new split between its two pools (half the backends each), composed from the pools' kept tables (what lbd does on `set split`; target ≤ 1 ms with the map write):\n\n| backends | median | 95 % interval of the mean |\n|---|---|---|\n";
    for n in [4, 100] {
        md += &format!("| {n} | {} |\n", estimate(&format!("split_change/{n}"))?);
    }
    std::fs::write(sections.join("4-table-build.md"), md)?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(&sections)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    names.sort();
    let mut out = String::from(
        "# Benchmarks\n\nWritten by `cargo xtask bench` on one machine: every figure below comes from the same run.\n\n",
    );
    for p in names {
        out += &std::fs::read_to_string(&p)?;
        out += "\n";
    }
    std::fs::write(root.join("BENCHMARKS.md"), out)?;
    eprintln!("wrote BENCHMARKS.md");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Build => setup().and_then(|_| dist()),
        Cmd::Test => setup().and_then(|_| build(false)).and_then(|_| {
            // fmt and clippy first: cheap, and a red lint is as much a failure as a red test.
            sh(&mut cargo(&["fmt", "--all", "--", "--check"]))?;
            sh(&mut cargo(&[
                "clippy",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // Namespace tests run two at a time: 2 cores, and each runs real traffic.
            sh(&mut cargo(&["test", "--", "--test-threads=2"]))?;
            // One quick round of the per-packet and control-plane benchmarks keeps them (and
            // the fixtures they assert) working; the figures come from `cargo xtask bench`.
            sh(bench_tests(false, &["xdp_bench", "control_bench"]).env("LB_BENCH_QUICK", "1"))
        }),
        Cmd::Demo => setup().and_then(|_| build(false)).and_then(|_| {
            sh(&mut cargo(&[
                "run", "--quiet", "-p", "lb-tests", "--bin", "lb-demo",
            ]))
        }),
        Cmd::Bench => setup()
            .and_then(|_| install(BENCH_PACKAGES))
            .and_then(|_| build(true))
            .and_then(|_| bench()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
