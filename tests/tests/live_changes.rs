//! Changes made while traffic runs: a split change, `kill -9` and restart of lbd, SIGHUP
//! reloads with a valid and an invalid file, and `lbd down`. Established connections must
//! never break or move; new connections must keep succeeding.

use std::time::{Duration, Instant};

use lb_tests::{
    check_share,
    http::Client,
    require_root,
    topology::Topology,
    traffic::{Report, Traffic},
};

fn assert_nothing_broke(r: &Report, what: &str) {
    assert!(
        r.keepalive_errors.is_empty(),
        "{what}: established connections broke: {:?}",
        r.keepalive_errors
    );
    assert_eq!(
        r.keepalive_moved, 0,
        "{what}: established connections changed backend"
    );
    assert!(
        r.new_failed.is_empty(),
        "{what}: new connections failed: {:?}",
        r.new_failed
    );
}

fn connections_of(t: &Topology, backend: &str) -> u64 {
    let stat: serde_json::Value =
        serde_json::from_str(&t.control("show stat json").unwrap()).unwrap();
    stat.as_array()
        .unwrap()
        .iter()
        .find(|r| r["backend"] == backend)
        .and_then(|r| r["connections"].as_u64())
        .unwrap()
}

#[test]
fn split_change_under_traffic_resets_nothing_and_applies_at_once() {
    if !require_root("split_change_under_traffic") {
        return;
    }
    let mut t = Topology::new("s", "skb").unwrap();
    t.start_lbd().unwrap();

    // How long from `set split` returning to new flows following it: all legacy → all k8s.
    t.control("set split web legacy=100 k8s=0").unwrap();
    let traffic = Traffic::start(&t, 20).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    t.control("set split web legacy=0 k8s=100").unwrap();
    let applied = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let r = traffic.stop().unwrap();
    assert_nothing_broke(&r, "100/0 -> 0/100");
    let after: Vec<&(Instant, String)> =
        r.new_flows.iter().filter(|(s, _)| *s >= applied).collect();
    assert!(after.len() > 20, "too little traffic: {}", after.len());
    assert!(
        after.iter().all(|(_, b)| b.starts_with("k8s")),
        "a connection started after `set split` returned went to the old pool"
    );
    let first = r
        .new_flows
        .iter()
        .find(|(s, b)| *s >= asked && b.starts_with("k8s"))
        .map(|(s, _)| s.duration_since(asked))
        .unwrap();
    eprintln!(
        "set split took {:?} to return; first new flow on the new split started {first:?} after the command was sent",
        applied.duration_since(asked)
    );

    // 90/10 → 10/90 with 20 keep-alive connections busy: none breaks or moves.
    t.control("set split web legacy=90 k8s=10").unwrap();
    let traffic = Traffic::start(&t, 20).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    t.control("set split web legacy=10 k8s=90").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let r = traffic.stop().unwrap();
    eprintln!(
        "90/10 -> 10/90: {} keep-alive requests, {} new connections, 0 broken",
        r.keepalive_requests,
        r.new_flows.len()
    );
    assert_nothing_broke(&r, "90/10 -> 10/90");

    // Drain under load: k8s-1's established connections carry on, it gets no new flow.
    let traffic = Traffic::start(&t, 20).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    t.control("set state web/k8s/k8s-1 drain").unwrap();
    let drained = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let r = traffic.stop().unwrap();
    assert_nothing_broke(&r, "drain");
    let late: Vec<_> = r
        .new_flows
        .iter()
        .filter(|(s, b)| *s >= drained && b == "k8s-1")
        .collect();
    assert!(
        late.is_empty(),
        "{} new flows reached a drained backend",
        late.len()
    );
    assert!(
        r.new_flows
            .iter()
            .any(|(s, b)| *s >= drained && b == "k8s-2")
    );
}

#[test]
fn kill_9_and_restart_breaks_no_connection_and_lbd_down_removes_everything() {
    if !require_root("kill_9_and_restart") {
        return;
    }
    let mut t = Topology::new("r", "skb").unwrap();
    t.start_lbd().unwrap();
    t.control("set split web legacy=50 k8s=50").unwrap();
    let (_, failed) = t.new_connections(100);
    assert_eq!(failed, 0);
    let counted_before = connections_of(&t, "legacy-1");
    assert!(counted_before > 0);

    let traffic = Traffic::start(&t, 50).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    t.kill_lbd();
    let killed = Instant::now();
    // The data plane runs on without its daemon.
    std::thread::sleep(Duration::from_millis(500));
    t.start_lbd().unwrap();
    let restarted = killed.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let r = traffic.stop().unwrap();
    let during = r
        .new_flows
        .iter()
        .filter(|(s, _)| *s >= killed && s.duration_since(killed) < restarted)
        .count();
    eprintln!(
        "kill -9 + restart ({restarted:?}): {} keep-alive requests on 50 connections, {} broken; {during} new connections while lbd was down or starting, {} failed",
        r.keepalive_requests,
        r.keepalive_errors.len(),
        r.new_failed.len()
    );
    assert_nothing_broke(&r, "kill -9 and restart");
    assert!(
        during > 10,
        "too little traffic while lbd was down: {during}"
    );
    // The restarted lbd adopted the counters instead of resetting them.
    assert!(connections_of(&t, "legacy-1") >= counted_before);
    let log = t.lbd_log();
    assert!(log.contains("adopted the pinned XDP link"), "{log}");
    // And the operator's 50/50 came back from the state file (the config says 90/10): the
    // table and the traffic follow it.
    let b = t.control("show backends web").unwrap();
    assert!(b.contains("web k8s k8s-1 1 25.00% ready up"), "{b}");
    let k8s = |t: &Topology| connections_of(t, "k8s-1") + connections_of(t, "k8s-2");
    let legacy = |t: &Topology| connections_of(t, "legacy-1") + connections_of(t, "legacy-2");
    let (k0, l0) = (k8s(&t), legacy(&t));
    let (_, failed) = t.new_connections(400);
    assert_eq!(failed, 0);
    let (k, l) = (k8s(&t) - k0, legacy(&t) - l0);
    let share = k as f64 / (k + l) as f64;
    eprintln!(
        "after kill -9 + restart: restored split legacy=50 k8s=50; 400 new connections: k8s {k}, legacy {l} ({:.1} % k8s)",
        share * 100.0
    );
    assert!(
        (0.4..=0.6).contains(&share),
        "k8s took {share:.3} of new flows"
    );

    // SIGTERM leaves the data plane running too.
    t.stop_lbd();
    let (_, failed) = t.new_connections(50);
    assert_eq!(failed, 0, "traffic must flow while lbd is stopped");

    // `lbd down`: detached, pins gone; the VIP is then just a local address with no listener.
    let out = std::process::Command::new(&t.lbd_bin)
        .args(["down", "--config"])
        .arg(&t.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let link = t.lb.ip(&["link", "show", "eth0"]).unwrap();
    assert!(!link.contains("xdp"), "still attached: {link}");
    let pins = std::fs::read_dir(&t.dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.ends_with("bpf"))
        .unwrap()
        .join("lb/v1");
    assert!(!pins.exists(), "{} still exists", pins.display());
}

#[test]
fn sighup_applies_a_valid_file_and_keeps_running_on_an_invalid_one() {
    if !require_root("sighup_reload") {
        return;
    }
    let mut t = Topology::new("u", "skb").unwrap();
    t.start_lbd().unwrap();
    t.control("set split web legacy=50 k8s=50").unwrap();
    let vip = t.vip();
    // A keep-alive connection on legacy-2, which the new file removes.
    let kept = t
        .in_client(move || {
            for _ in 0..200 {
                let mut c = Client::connect(vip).unwrap();
                if c.get(false).unwrap() == "legacy-2" {
                    return Some(c);
                }
            }
            None
        })
        .unwrap()
        .expect("a connection to legacy-2");

    let original = t.config_text();
    let edited = original
        .replace(r#", { addr = "10.20.0.12:8080", name = "legacy-2" }"#, "")
        .replace("weight = 90", "weight = 30")
        .replace("weight = 10", "weight = 70");
    assert_ne!(edited, original);
    std::fs::write(&t.config, &edited).unwrap();
    t.reload_lbd().unwrap();
    t.wait_backends(Duration::from_secs(10), |s| !s.contains("legacy-2"))
        .unwrap();
    let b = t.control("show backends web").unwrap();
    assert!(b.contains("web legacy legacy-1 1 30.00%"), "{b}");
    let (by, failed) = t.new_connections(300);
    assert_eq!(failed, 0);
    assert_eq!(by.get("legacy-2"), None, "{by:?}");
    let k8s = by
        .iter()
        .filter(|(k, _)| k.starts_with("k8s"))
        .map(|(_, v)| v)
        .sum::<usize>();
    if let Err(e) = check_share(k8s, 300, 0.7) {
        panic!("k8s pool at 30/70: {e}; {by:?}");
    }
    // The established flow to the removed backend carries on.
    let mut kept = kept;
    let still = t.in_client(move || kept.get(false)).unwrap().unwrap();
    assert_eq!(still, "legacy-2");

    // An invalid file: refused with file:line:col in the log, the running config stays.
    let before = t.control("show backends").unwrap();
    let broken = edited.replace("weight = 70", "weight = 7000");
    std::fs::write(&t.config, &broken).unwrap();
    t.reload_lbd().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.lbd_log().contains("reload refused") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            t.lbd_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = t.lbd_log();
    let line = broken
        .lines()
        .position(|l| l.contains("weight = 7000"))
        .unwrap()
        + 1;
    let at = format!("{}:{line}:", t.config.display());
    assert!(log.contains(&at), "the log names {at}:\n{log}");
    assert_eq!(before, t.control("show backends").unwrap());
    let (_, failed) = t.new_connections(50);
    assert_eq!(failed, 0);
}
