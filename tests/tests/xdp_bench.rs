//! Per-packet cost of the XDP program via BPF_PROG_TEST_RUN, net of a bare XDP_PASS program
//! measured in the same run. Run by `cargo xtask bench` (ignored in `cargo xtask test`);
//! writes its section of BENCHMARKS.md.

use std::fmt::Write as _;

use lb_tests::{
    packets::{ACK, SYN, check, tcp},
    require_root,
    xdp::{self, SNAT},
};
use lb_userspace::dataplane::{Dataplane, PASS_PROGRAM, PROGRAM};

const VIP: [u8; 4] = [10, 99, 0, 10];
const CLIENT: [u8; 4] = [10, 99, 1, 2];
const BACKEND: [u8; 4] = [10, 20, 0, 11];
const REPEAT: u32 = 1_000_000;

fn ns_per_packet(dp: &mut Dataplane, prog: &str, pkt: &[u8], repeat: u32) -> f64 {
    xdp::run(dp, prog, pkt, repeat).2
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run by `cargo xtask bench`"]
fn per_packet_cost() {
    if !require_root("per_packet_cost") {
        return;
    }
    let _ns = xdp::private_netns("bn", &[(BACKEND, [0x02, 0, 0, 0, 0x02, 0x01])]);
    let mut dp = xdp::load(|_| {});
    let cpus = aya::util::nr_cpus().unwrap();
    xdp::set_backend(&mut dp, 1, BACKEND);
    xdp::single_backend_table(&mut dp, 0, VIP, 80, 6, 1);

    let non_vip = tcp((CLIENT, 40000), ([10, 99, 0, 99], 80), ACK);
    let syn = tcp((CLIENT, 40000), (VIP, 80), SYN);
    // Establish the flow, learn its SNAT port.
    let (_, out, _) = xdp::run(&mut dp, PROGRAM, &syn, 1);
    let snat_port = check(&out).src.1;
    let hit = tcp((CLIENT, 40000), (VIP, 80), ACK);
    let ret = tcp((BACKEND, 8080), (SNAT, snat_port), ACK);

    let rounds = 5;
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("non-VIP pass", vec![], vec![]),
        ("conntrack-hit forward", vec![], vec![]),
        ("return path (reverse NAT)", vec![], vec![]),
        ("new flow (SYN)", vec![], vec![]),
    ];
    for _ in 0..rounds {
        // Interleaved, each against a baseline from the same round.
        let base = ns_per_packet(&mut dp, PASS_PROGRAM, &hit, REPEAT);
        for (i, pkt) in [&non_vip, &hit, &ret].iter().enumerate() {
            let g = ns_per_packet(&mut dp, PROGRAM, pkt, REPEAT);
            rows[i].1.push(g);
            rows[i].2.push(g - base);
        }
        // New flows: each SYN needs a distinct tuple, so one run per packet (repeat = 1) and a
        // baseline measured the same way.
        let mut gross = Vec::new();
        let mut bases = Vec::new();
        for port in 0..2000u16 {
            let s = tcp(
                (CLIENT, 1024 + port + 2000 * rows[3].1.len() as u16),
                (VIP, 80),
                SYN,
            );
            bases.push(ns_per_packet(&mut dp, PASS_PROGRAM, &s, 1));
            gross.push(ns_per_packet(&mut dp, PROGRAM, &s, 1));
        }
        let (g, b) = (median(gross), median(bases));
        rows[3].1.push(g);
        rows[3].2.push(g - b);
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let mut md = String::new();
    writeln!(md, "## Per packet (BPF_PROG_TEST_RUN)\n").unwrap();
    writeln!(md, "Kernel {}, CPU {cpu}, {cpus} CPUs.", kernel.trim()).unwrap();
    writeln!(md, "Median of {rounds} interleaved rounds; `repeat` = {REPEAT} (new flows: median of 2000 single runs, each a distinct SYN). Net = gross − a bare XDP_PASS program measured in the same round. The redirect itself is not performed by test_run.\n").unwrap();
    writeln!(md, "| path | gross ns/packet | net ns/packet (min–max) |").unwrap();
    writeln!(md, "|---|---|---|").unwrap();
    for (name, g, n) in &rows {
        let lo = n.iter().cloned().fold(f64::MAX, f64::min);
        let hi = n.iter().cloned().fold(f64::MIN, f64::max);
        writeln!(
            md,
            "| {name} | {:.1} | {:.1} ({lo:.1}–{hi:.1}) |",
            median(g.clone()),
            median(n.clone())
        )
        .unwrap();
    }
    print!("{md}");
    lb_tests::bench::write_section("1-per-packet", &md);
}
