//! Per-packet cost of the XDP program via BPF_PROG_TEST_RUN, net of a bare XDP_PASS program
//! measured the same way in the same round. Run by `cargo xtask bench` (ignored in
//! `cargo xtask test`); writes its section of BENCHMARKS.md.
//!
//! test_run with `repeat` runs the program again and again on the *same* buffer: after the
//! first run a forwarded packet is the rewritten one, so repeating a VIP packet would measure
//! whatever the rewritten packet costs. Paths that do not rewrite are measured with a large
//! `repeat`; the forward and return paths with two flows whose rewrites turn each one's
//! packet into the other's (each run a genuine conntrack or reverse-NAT hit, bounded by the
//! TTL the rewrite decrements), as the slope of a call's time over its number of runs; new
//! flows with single runs, each a distinct SYN.

use std::{fmt::Write as _, time::Duration};

use lb_common::{
    conntrack::flow_cache_slot,
    flow::{FlowKey, v4},
};
use lb_tests::{
    packets::{ACK, LB_MAC, SYN, SYN_ACK, check, tcp, tcp_seq, with_ttl},
    require_root,
    xdp::{self, SNAT},
};
use lb_userspace::dataplane::{Dataplane, PASS_PROGRAM, PROGRAM};

const VIP: [u8; 4] = [10, 99, 0, 10];
const CLIENT: [u8; 4] = [10, 99, 1, 2];
const BACKEND: [u8; 4] = [10, 20, 0, 11];
const REPEAT: u32 = 1_000_000;
/// Runs per call in the two-flow cycle (each run decrements the TTL, which starts at 255).
const CYCLE_REPEATS: [u32; 5] = [50, 100, 150, 200, 250];
/// Calls per point of the cycle's line.
const CALLS: usize = 15;

fn ns_per_packet(dp: &mut Dataplane, prog: &str, pkt: &[u8], repeat: u32) -> f64 {
    xdp::run(dp, prog, pkt, repeat).2
}

/// Like [`ns_per_packet`], arriving on interface `ifindex`.
fn ns_per_packet_on(dp: &mut Dataplane, prog: &str, pkt: &[u8], repeat: u32, ifindex: u32) -> f64 {
    xdp::run_on(dp, prog, pkt, repeat, ifindex).2
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The cost of one more run: the slope of a call's total time against its number of runs
/// (least squares over [`CYCLE_REPEATS`], each point the median of [`CALLS`] calls). A call
/// with `repeat` > 1 first installs the program in the XDP dispatcher, and its first run
/// starts cold; the slope leaves that fixed cost out.
fn ns_per_extra_run(dp: &mut Dataplane, prog: &str, pkt: &[u8], ifindex: u32) -> f64 {
    let xs: Vec<f64> = CYCLE_REPEATS.iter().map(|&r| r as f64).collect();
    let ys: Vec<f64> = CYCLE_REPEATS
        .iter()
        .map(|&r| {
            r as f64
                * median(
                    (0..CALLS)
                        .map(|_| ns_per_packet_on(dp, prog, pkt, r, ifindex))
                        .collect(),
                )
        })
        .collect();
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    cov / var
}

/// Two services whose flows feed each other: service A (V:80 → backend B:8080, SNAT S)
/// and service B (B:8080 → backend V:80, SNAT C), with the SNAT range one port wide
/// (P, the client's port too). Forward: C:P → V:80 becomes S:P → B:8080, which is
/// service B's flow and becomes C:P → V:80 again. Return: B:8080 → S:P becomes
/// V:80 → C:P, flow B's return packet, which becomes B:8080 → S:P again.
///
/// Return traffic is accepted only from the backend's side and inside the flow's sequence
/// window, so both flows are answered with a SYN-ACK first, every packet arrives on `veth0`
/// (where the routes towards both backends leave), and both neighbours have the MAC the
/// return rewrite writes as source (`LB_MAC`, the client's SYN's destination).
struct Cycle {
    dp: Dataplane,
    forward: Vec<u8>,
    ret: Vec<u8>,
    /// `veth0`'s index: the backends' side.
    ingress: u32,
}

const P: u16 = 20000;
/// The cycle's VIP and client: on `veth0`'s subnet, so that either can be a next hop.
const CY_VIP: [u8; 4] = [10, 20, 0, 10];
const CY_CLIENT: [u8; 4] = [10, 20, 0, 2];

/// The cycle with service A's SNAT address `snat` (S).
fn cycle(snat: [u8; 4]) -> Cycle {
    let mut dp = xdp::load(|t| {
        t.snat_port_min = P;
        t.snat_port_max = P;
        // One port class for every CPU: the range has one port.
        t.cpus = 1;
    });
    xdp::set_backend_at(&mut dp, 1, (BACKEND, 8080));
    xdp::set_backend_at(&mut dp, 2, (CY_VIP, 80));
    xdp::single_backend_service(&mut dp, 0, (CY_VIP, 80), 6, 1, snat);
    xdp::single_backend_service(&mut dp, 1, (BACKEND, 8080), 6, 2, CY_CLIENT);
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &tcp((CY_CLIENT, P), (CY_VIP, 80), SYN), 1);
    assert_eq!(v, 4, "flow A's SYN is redirected");
    assert_eq!(check(&out).src, (snat, P));
    let (v, out, _) = xdp::run(&mut dp, PROGRAM, &tcp((snat, P), (BACKEND, 8080), SYN), 1);
    assert_eq!(v, 4, "flow B's SYN is redirected");
    assert_eq!(check(&out).dst, (CY_VIP, 80));
    let ingress = xdp::ifindex("veth0");
    // `packets::tcp` segments carry sequence number 1000: each SYN-ACK acknowledges 1001.
    let answer = |src, dst, f, seq| tcp_seq(LB_MAC, src, dst, f, (seq, 1001), b"");
    for (name, pkt) in [
        ("flow A", answer((BACKEND, 8080), (snat, P), SYN_ACK, 5000)),
        (
            "flow B",
            answer((CY_VIP, 80), (CY_CLIENT, P), SYN_ACK, 5000),
        ),
    ] {
        let (v, _, _) = xdp::run_on(&mut dp, PROGRAM, &pkt, 1, ingress);
        assert_eq!(v, 4, "{name}'s SYN-ACK is redirected");
    }
    // Ordinary data packets (a payload each way): what a flow carries once its first
    // request and answer are through, so the one-time L4 signal work is behind it.
    let forward = with_ttl(
        &tcp_seq(
            LB_MAC,
            (CY_CLIENT, P),
            (CY_VIP, 80),
            ACK,
            (1001, 5001),
            b"0123456789",
        ),
        255,
    );
    let ret = with_ttl(
        &tcp_seq(
            LB_MAC,
            (BACKEND, 8080),
            (snat, P),
            ACK,
            (5001, 1001),
            b"0123456789",
        ),
        255,
    );
    // Every run of a call must be a hit: the counters show it.
    for pkt in [&forward, &ret] {
        let before = dp.xdp_stats().unwrap();
        let most = CYCLE_REPEATS[CYCLE_REPEATS.len() - 1];
        xdp::run_on(&mut dp, PROGRAM, pkt, most, ingress);
        let after = dp.xdp_stats().unwrap();
        let forwarded = (after[3] + after[4]) - (before[3] + before[4]);
        assert_eq!(forwarded, most as u64, "every run is forwarded");
    }
    Cycle {
        dp,
        forward,
        ret,
        ingress,
    }
}

/// The flow key of a TCP packet `src` → `dst`, as the program keys its conntrack entry.
fn flow(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> FlowKey {
    FlowKey {
        src: v4(src.0),
        dst: v4(dst.0),
        sport: src.1.to_be(),
        dport: dst.1.to_be(),
        proto: 6,
        family: lb_common::FAMILY_V4,
        _pad: 0,
    }
}

/// A SNAT address for the cycle under which its two flows share a flow cache slot: each
/// run's copy then replaces the other flow's, and every run takes the full path (the
/// conntrack lookup) and leaves a copy — a CPU's cost when its flows outnumber its slots.
fn colliding_snat() -> [u8; 4] {
    let a = flow_cache_slot(&flow((CY_CLIENT, P), (CY_VIP, 80)));
    (0..=u16::MAX)
        .map(|i| [10, 30, (i >> 8) as u8, i as u8])
        .find(|&s| flow_cache_slot(&flow((s, P), (BACKEND, 8080))) == a)
        .expect("some address of 10.30.0.0/16 shares flow A's slot")
}

/// With `LB_PROFILE_LOOP=<seconds>`, instead of measuring: runs the forward path, then the
/// return path, each for that long (calls of 200 000 runs), then 30 000 SYNs one run each,
/// printing `PROFILE <path> start` before each, for a sampling profiler to watch (`perf
/// record -a -e cpu-clock`: no PMU is needed). The programs' line info maps the samples to
/// source lines.
fn profile_loop(secs: u64, dp: &mut Dataplane, cycle: &mut Cycle) {
    for (name, pkt) in [("forward", &cycle.forward), ("return", &cycle.ret)] {
        eprintln!("PROFILE {name} start");
        let t = std::time::Instant::now();
        while t.elapsed().as_secs() < secs {
            xdp::run_on(&mut cycle.dp, PROGRAM, pkt, 200_000, cycle.ingress);
        }
    }
    eprintln!("PROFILE syn start");
    // A second for the profiler to start: the SYNs take a fraction of one.
    std::thread::sleep(Duration::from_secs(1));
    for port in 0..30_000u16 {
        ns_per_packet(dp, PROGRAM, &tcp((CLIENT, 1024 + port), (VIP, 80), SYN), 1);
    }
    eprintln!("PROFILE done");
}

#[test]
#[ignore = "benchmark: run by `cargo xtask bench`"]
fn per_packet_cost() {
    if !require_root("per_packet_cost") {
        return;
    }
    let _ns = xdp::private_netns(
        "bn",
        &[
            // The cycle's return rewrites write LB_MAC as source: see `Cycle`.
            (BACKEND, LB_MAC),
            (CY_VIP, LB_MAC),
        ],
    );
    let mut dp = xdp::load(|_| {});
    let cpus = aya::util::nr_cpus().unwrap();
    xdp::set_backend(&mut dp, 1, BACKEND);
    xdp::single_backend_table(&mut dp, 0, VIP, 80, 6, 1);
    let mut missing = cycle(colliding_snat());
    let mut cycle = cycle(SNAT);
    assert_ne!(
        flow_cache_slot(&flow((CY_CLIENT, P), (CY_VIP, 80))),
        flow_cache_slot(&flow((SNAT, P), (BACKEND, 8080))),
        "the hit cycle's flows have a flow cache slot each"
    );

    let other_port = tcp((CLIENT, 40000), ([10, 99, 0, 99], 22), ACK);
    let other_addr = tcp((CLIENT, 40000), ([10, 99, 0, 99], 80), ACK);
    let stray = tcp((BACKEND, 8080), (SNAT, 20001), ACK);

    if let Some(secs) = std::env::var("LB_PROFILE_LOOP")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return profile_loop(secs, &mut dp, &mut cycle);
    }
    let quick = lb_tests::bench::quick();
    let rounds = if quick { 1 } else { 9 };
    let syns = if quick { 200 } else { 2000 };
    let names = [
        "non-VIP pass (another port)",
        "non-VIP pass (a served port, another address)",
        "unknown packet to a SNAT port (one reverse-NAT lookup, a miss)",
        "conntrack-hit forward, from this CPU's flow cache",
        "conntrack-hit forward, flow cache miss (conntrack lookup, then a copy kept)",
        "return path (reverse-NAT hit)",
        "new flow (SYN)",
    ];
    let mut rows: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); names.len()];
    for round in 0..rounds {
        // Interleaved, each against a baseline measured the same way in the same round.
        let base = ns_per_packet(&mut dp, PASS_PROGRAM, &other_port, REPEAT);
        for (i, pkt) in [&other_port, &other_addr, &stray].iter().enumerate() {
            let g = ns_per_packet(&mut dp, PROGRAM, pkt, REPEAT);
            rows[i].0.push(g);
            rows[i].1.push(g - base);
        }
        let Cycle {
            dp: cdp,
            forward,
            ret,
            ingress,
        } = &mut cycle;
        let base = ns_per_extra_run(cdp, PASS_PROGRAM, forward, *ingress);
        for (i, pkt) in [(3, &*forward), (5, &*ret)] {
            let g = ns_per_extra_run(cdp, PROGRAM, pkt, *ingress);
            rows[i].0.push(g);
            rows[i].1.push(g - base);
        }
        let g = ns_per_extra_run(&mut missing.dp, PROGRAM, &missing.forward, *ingress);
        rows[4].0.push(g);
        rows[4].1.push(g - base);
        // New flows: each SYN needs a distinct tuple, so one run per packet (repeat = 1) and
        // a baseline measured the same way.
        let mut gross = Vec::new();
        let mut bases = Vec::new();
        for port in 0..syns {
            let s = tcp((CLIENT, 1024 + port + syns * round), (VIP, 80), SYN);
            bases.push(ns_per_packet(&mut dp, PASS_PROGRAM, &s, 1));
            gross.push(ns_per_packet(&mut dp, PROGRAM, &s, 1));
        }
        let (g, b) = (median(gross), median(bases));
        rows[6].0.push(g);
        rows[6].1.push(g - b);
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
    writeln!(
        md,
        "Median of {rounds} interleaved rounds. Net = gross − a bare XDP_PASS program measured the same way in the same round. \
         test_run reruns the program on the same buffer, so each path is measured where every run really takes it: \
         packets that pass untouched with `repeat` = {REPEAT}; the forward and return paths with two flows whose rewrites turn each \
         one's packet into the other's (every run a hit, checked by the counters; the cost of one more run: the slope of a call's time over `repeat` = 50…250, which leaves out the fixed cost of entering the XDP dispatcher); \
         new flows as single runs (`repeat` = 1, median of {syns} distinct SYNs, so they also carry the cache misses of entering the kernel). \
         The conntrack-hit forward is measured twice: served from the CPU's flow cache (the two flows have a slot each), and missing it \
         (the two flows share a slot, so each run replaces the other's copy: the conntrack lookup and a new copy, what a packet pays when \
         its CPU's busy flows outnumber the cache's 4096 slots, or once per 250 ms per flow and CPU). \
         The redirect itself is not performed by test_run.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| path | gross ns/packet | net ns/packet (min–max) | target (net, issue #14) |"
    )
    .unwrap();
    writeln!(md, "|---|---|---|---|").unwrap();
    // The targets, for the paths it sets one for.
    let targets = ["", "", "", "≤ 60", "", "≤ 60", "≤ 500"];
    for ((name, (g, n)), target) in names.iter().zip(&rows).zip(targets) {
        let lo = n.iter().cloned().fold(f64::MAX, f64::min);
        let hi = n.iter().cloned().fold(f64::MIN, f64::max);
        writeln!(
            md,
            "| {name} | {:.1} | {:.1} ({lo:.1}–{hi:.1}) | {target} |",
            median(g.clone()),
            median(n.clone())
        )
        .unwrap();
    }
    print!("{md}");
    lb_tests::bench::write_section("1-per-packet", &md);
}
