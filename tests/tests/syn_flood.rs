//! A SYN flood from spoofed sources at the VIP, while real clients connect and established
//! keep-alive connections carry requests. Every flood SYN opens a half-open flow (a SNAT
//! port, both flow entries) that no client ever follows up; a new flow takes the port of one
//! that has waited `tcp_syn_reclaim` (250 ms) for its client, so the flood cannot exhaust
//! the ports and real clients keep getting in. And a flood larger than the flow tables never
//! evicts an established flow: the reverse-NAT map, never evicted, caps what the flood can
//! open.
//!
//! `LB_FLOOD_RATE` (SYN/s, default 60 000) and `LB_FLOOD_SYN_TIMEOUT` / `LB_FLOOD_SYN_RECLAIM`
//! (e.g. `"10s"`, `"2900ms"`) let a person compare. `LB_FLOOD_RATE=100000` is the issue's
//! target, which this machine's two cores carry with every real client getting in, the
//! backends and the sender on them too. CI floods at 60 000/s so that the assertions keep
//! their margin on a slower or busier machine: with a busy loop on each core, one real client
//! in 61 failed at 100 000/s (docs/security.md has the figures).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    http::Client,
    packets::{self, SYN},
    raw::RawSender,
    require_root,
    topology::{Topology, VIP},
};

const FLOOD: Duration = Duration::from_secs(6);

/// Held by each test for its whole run: the harness runs a binary's tests two at a time, and
/// two floods at once on two cores (both also running backends) measure the machine rather
/// than the balancer; a real client then waits on a CPU, not on the flood's effect.
static ONE_FLOOD_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The `q`-quantile of `v` (sorted here).
fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// `n` spoofed SYNs to the VIP, each from another source (100.64.0.0/10: routable, not
/// ours) and port, checksums valid so that the backends answer them as they would a real
/// flood; addressed from the client's interface to the balancer's.
fn flood_frames(t: &Topology, n: usize) -> Vec<Vec<u8>> {
    let (lb_mac, client_mac) = (t.lb.mac("eth0").unwrap(), t.client.mac("eth0").unwrap());
    let vip_ip: std::net::Ipv4Addr = VIP.parse().unwrap();
    (0..n)
        .map(|i| {
            let src = [100, 64 + ((i >> 16) & 63) as u8, (i >> 8) as u8, i as u8];
            let mut f = packets::tcp((src, 1024 + (i % 60000) as u16), (vip_ip.octets(), 80), SYN);
            f[..6].copy_from_slice(&lb_mac);
            f[6..12].copy_from_slice(&client_mac);
            f
        })
        .collect()
}

/// Sends `frames` from the client namespace at `rate` per second, one sender thread pinned to
/// each CPU (1 ms slots each), and clears `flooding` when all are done. Returns frames sent
/// and the time taken. One thread per CPU because a frame's whole way — the balancer's XDP
/// program, the backend's SYN-ACK, its way back — runs in the sender's softirq, on the
/// sender's CPU: one sender tops out at what one CPU can carry (about 75 000 SYN/s here).
fn flood(
    t: &Topology,
    frames: Vec<Vec<u8>>,
    rate: u64,
    flooding: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, Duration)> {
    let client = t.client.name.clone();
    std::thread::spawn(move || {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let share = frames.len().div_ceil(cpus);
        let per_ms = (rate / 1000 / cpus as u64).max(1) as usize;
        let start = Instant::now();
        let senders: Vec<_> = frames
            .chunks(share.max(1))
            .map(<[Vec<u8>]>::to_vec)
            .enumerate()
            .map(|(cpu, frames)| {
                let client = client.clone();
                std::thread::spawn(move || {
                    pin_to_cpu(cpu);
                    lb_tests::netns::Netns { name: client }
                        .enter_no_drop()
                        .unwrap();
                    let tx = RawSender::open("eth0").unwrap();
                    let mut sent = 0usize;
                    for (slot, chunk) in frames.chunks(per_ms).enumerate() {
                        for f in chunk {
                            // A full ring on the balancer's side (ENOBUFS) is waited out, a
                            // little: a sender that gave the frame up would measure the ring,
                            // not the balancer.
                            if (0..100).any(|_| {
                                tx.send(f).is_ok() || {
                                    std::thread::sleep(Duration::from_micros(20));
                                    false
                                }
                            }) {
                                sent += 1;
                            }
                        }
                        let due = start + Duration::from_millis(slot as u64 + 1);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    sent
                })
            })
            .collect();
        let sent = senders.into_iter().map(|s| s.join().unwrap()).sum();
        flooding.store(false, Ordering::Relaxed);
        (sent, start.elapsed())
    })
}

/// Keeps the calling thread on `cpu` (best effort: a machine that refuses still floods).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[test]
fn a_syn_flood_from_spoofed_sources_leaves_real_clients_and_established_flows_alone() {
    if !require_root("a_syn_flood_from_spoofed_sources") {
        return;
    }
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let rate: u64 = std::env::var("LB_FLOOD_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000);
    let mut t = Topology::new("sf", "native").unwrap();
    if let Ok(v) = std::env::var("LB_FLOOD_SYN_TIMEOUT") {
        t.daemon_keys(&format!("tcp_syn_timeout = \"{v}\""));
    }
    if let Ok(v) = std::env::var("LB_FLOOD_SYN_RECLAIM") {
        t.daemon_keys(&format!("tcp_syn_reclaim = \"{v}\""));
    }
    t.start_lbd().unwrap();
    // Real clients and the flood share the client namespace's veth. The flood's sender waits
    // for room when the balancer's receive ring is full; without a queue of their own the
    // real clients' packets would be dropped there instead (a veth has none), a handicap of
    // this rig, not of the balancer. With one, both wait for the same ring.
    t.client
        .exec(&[
            "tc", "qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit", "1000",
        ])
        .unwrap();
    let vip: SocketAddr = t.vip();
    let frames = flood_frames(&t, (rate * FLOOD.as_secs()) as usize);

    // Established keep-alive connections, opened before the flood.
    let victims = t.keepalive(20);
    let new_flows_before = t.metric("lb_xdp_events_total", "reason=\"new_flow\"");
    let refused_before = t.metric("lb_xdp_events_total", "reason=\"flow_not_created\"");
    let reclaimed_before = t.metric("lb_xdp_events_total", "reason=\"half_open_reclaimed\"");
    let resets_before = t.metric("lb_xdp_events_total", "reason=\"backend_stale_reset\"");

    let flooding = Arc::new(AtomicBool::new(true));
    let flood = flood(&t, frames, rate, flooding.clone());
    // lbd while the flood lasts: its control socket every 250 ms, and the SNAT ports its
    // collector counts in use (its view at the end of each pass).
    let (socket, f4) = (t.socket.clone(), flooding.clone());
    let (lb_ns, f5) = (t.lb.name.clone(), flooding.clone());
    let control = std::thread::spawn(move || {
        let mut worst = Duration::ZERO;
        while f4.load(Ordering::Relaxed) {
            let s = Instant::now();
            lb_tests::topology::control_at(&socket, "show services").unwrap();
            worst = worst.max(s.elapsed());
            std::thread::sleep(Duration::from_millis(250));
        }
        worst
    });
    let ports = std::thread::spawn(move || {
        let mut peak = 0.0f64;
        while f5.load(Ordering::Relaxed) {
            peak = peak.max(lb_tests::topology::metric_in(
                &lb_ns,
                "lb_snat_ports_in_use",
                "",
            ));
            std::thread::sleep(Duration::from_secs(1));
        }
        peak
    });
    // Real clients: a new connection (one request) every 10 ms while the flood lasts.
    let f3 = flooding.clone();
    let legit = t.in_client(move || {
        let mut times = Vec::new();
        let mut failed = 0usize;
        let mut errors = Vec::new();
        while f3.load(Ordering::Relaxed) {
            let start = Instant::now();
            match Client::connect(vip).and_then(|mut c| c.get(true)) {
                Ok(_) => times.push(start.elapsed()),
                Err(e) => {
                    failed += 1;
                    errors.push(format!("after {:?}: {e}", start.elapsed()));
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (times, failed, errors)
    });
    let (sent, took) = flood.join().unwrap();
    let (mut times, failed, errors) = legit.unwrap();
    let control_worst = control.join().unwrap();
    let ports_peak = ports.join().unwrap();
    let broken = t.in_client(move || {
        victims
            .into_iter()
            .filter_map(|(mut c, name)| (!matches!(c.get(false), Ok(n) if n == name)).then_some(()))
            .count()
    });
    let new_flows = t.metric("lb_xdp_events_total", "reason=\"new_flow\"") - new_flows_before;
    let refused = t.metric("lb_xdp_events_total", "reason=\"flow_not_created\"") - refused_before;
    let reclaimed =
        t.metric("lb_xdp_events_total", "reason=\"half_open_reclaimed\"") - reclaimed_before;
    let resets = t.metric("lb_xdp_events_total", "reason=\"backend_stale_reset\"") - resets_before;
    let ok = times.len();
    let ratio = ok as f64 / (ok + failed).max(1) as f64;
    let p95 = quantile(&mut times, 0.95);
    let max = times.last().copied().unwrap_or_default();
    eprintln!(
        "SYN flood: {sent} spoofed SYNs in {took:.1?} ({:.0}/s sent, {:.0}/s reached the balancer's new-flow path); {new_flows} flows created ({reclaimed} on a half-open flow's port; {resets} backends' old connections on a reused port reset), {refused} SYNs refused (no SNAT port); SNAT ports in use at the peak: {ports_peak}; real clients {ok} of {} connected ({:.2} %), connect+request p95 {p95:?}, max {max:?}; established broken: {broken:?} of 20; control socket answered within {control_worst:?} all through",
        sent as f64 / took.as_secs_f64(),
        (new_flows + refused) / took.as_secs_f64(),
        ok + failed,
        ratio * 100.0
    );
    assert!(
        ratio >= 0.99,
        "real clients got through {:.2} %: {errors:?}",
        ratio * 100.0
    );
    assert_eq!(broken.unwrap(), 0, "established flows broken by the flood");
    // Half-open flows never hold the ports (or entries) new flows need: a SYN refused for
    // want of one is a one-second wait for its client.
    assert!(
        refused <= sent as f64 / 1_000.0,
        "{refused} of {sent} SYNs refused for want of a port or entry"
    );
    assert!(
        control_worst < Duration::from_secs(1),
        "control socket took {control_worst:?}"
    );
}

/// A flood far larger than the flow tables (`conntrack_max = 4096`, 60 000 spoofed SYNs):
/// the reverse-NAT map, which is never evicted, caps the flows the flood can open at the
/// table's size, so the conntrack LRU is not churned through and no established flow is
/// evicted, even one idle all through the flood (an LRU reverse-NAT map set no such cap).
/// New flows are refused while the flood's
/// half-open flows hold every entry (the table is that small), and get in again once they
/// have timed out.
#[test]
fn a_syn_flood_larger_than_the_flow_table_evicts_no_established_flow() {
    if !require_root("a_syn_flood_larger_than_the_flow_table") {
        return;
    }
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut t = Topology::new("sg", "native").unwrap();
    t.daemon_keys("conntrack_max = 4096");
    t.start_lbd().unwrap();
    let frames = flood_frames(&t, 60_000);
    // Idle through the whole flood: the least recently used flows of all.
    let victims = t.keepalive(20);
    let (sent, took) = flood(&t, frames, 10_000, Arc::new(AtomicBool::new(true)))
        .join()
        .unwrap();
    let broken = t
        .in_client(move || {
            victims
                .into_iter()
                .filter_map(|(mut c, name)| {
                    (!matches!(c.get(false), Ok(n) if n == name)).then_some(())
                })
                .count()
        })
        .unwrap();
    let refused = t.metric("lb_xdp_events_total", "reason=\"flow_not_created\"");
    // The flood's half-open flows time out (3 s), the collector frees their entries.
    std::thread::sleep(Duration::from_secs(5));
    let (by, failed) = t.new_connections(20);
    eprintln!(
        "SYN flood into a 4096-flow table: {sent} SYNs in {took:.1?}, {refused} refused; established broken: {broken} of 20; afterwards {failed} of 20 new connections failed ({by:?})"
    );
    assert_eq!(broken, 0, "established flows evicted by the flood");
    assert_eq!(failed, 0, "new flows get in again after the flood");
}
