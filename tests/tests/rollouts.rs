//! Rollouts with real traffic: lbd judges the k8s pool against legacy each (1 s) interval
//! from its own counters and promotes or rolls back on its own. The faults come from the
//! test's own k8s backends (500s, resets, slow answers) while their health checks keep
//! passing: the point is catching what health checks miss.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{require_root, topology::Topology};

const ROLLOUT: &str = r#"baseline = "legacy"
canary = "k8s"
steps = [10, 50, 100]
interval = "1s"
threshold = 2
min_samples = 20
max_error_ratio = 0.05
max_p99 = "100ms"
"#;

const K8S: [usize; 2] = [2, 3];

/// New connections (one request each) from `threads` client threads to `vips`, paced, until
/// dropped. Each thread waits for its answers: slow backends slow it down, so a test with
/// slow answers needs more threads to keep enough samples per interval.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(t: &Topology, vips: &[SocketAddr]) -> Load {
        Load::with_threads(t, vips, 2)
    }

    fn with_threads(t: &Topology, vips: &[SocketAddr], n: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let (stop, name, vips) = (stop.clone(), t.client.name.clone(), vips.to_vec());
                std::thread::spawn(move || {
                    lb_tests::netns::Netns { name }.enter_no_drop().unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        for v in &vips {
                            let _ = lb_tests::http::get_once(*v);
                        }
                        std::thread::sleep(Duration::from_millis(4));
                    }
                })
            })
            .collect();
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn status(t: &Topology, service: &str) -> (HashMap<String, String>, String) {
    let text = t.control(&format!("rollout status {service}")).unwrap();
    let kv = text
        .lines()
        .filter(|l| !l.starts_with("judgement: "))
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (kv, text)
}

/// Waits (bounded) until `service`'s rollout is in `state`; returns how long it took and the
/// status text then.
fn wait_state(t: &Topology, service: &str, state: &str, limit: Duration) -> (Duration, String) {
    let started = Instant::now();
    loop {
        let (kv, text) = status(t, service);
        if kv.get("state").map(String::as_str) == Some(state) {
            return (started.elapsed(), text);
        }
        assert!(
            started.elapsed() < limit,
            "{service} never reached {state}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `service`'s rollout reaches step `step` (e.g. "2/3").
fn wait_step(t: &Topology, service: &str, step: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        let (kv, text) = status(t, service);
        if kv.get("step").map(String::as_str) == Some(step) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{service} never reached step {step}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn setup(tag: &str) -> Topology {
    let mut t = Topology::new(tag, "skb").unwrap();
    t.rollout(ROLLOUT);
    t.start_lbd().unwrap();
    t.wait_backends(Duration::from_secs(10), |s| !s.contains(" down"))
        .unwrap();
    t
}

fn fault(t: &Topology, f: impl Fn(&lb_tests::http::Faults)) {
    for i in K8S {
        f(&t.faults(i));
    }
}

#[test]
fn a_healthy_k8s_pool_is_promoted_in_both_modes() {
    if !require_root("a_healthy_k8s_pool_is_promoted") {
        return;
    }
    let t = setup("ro-ok");
    let _load = Load::start(&t, &[t.vip(), t.req_vip()]);
    t.control("rollout start web").unwrap();
    t.control("rollout start web-req").unwrap();
    for s in ["web", "web-req"] {
        let (took, text) = wait_state(&t, s, "promoted", Duration::from_secs(15));
        eprintln!("{s}: promoted after {took:?}\n{text}");
        assert!(text.contains("canary_share: 100.0"), "{text}");
        assert_eq!(
            text.matches(" pass: ").count(),
            2,
            "two stages judged: {text}"
        );
    }
    let b = t.control("show backends web").unwrap();
    assert!(b.contains("web k8s k8s-1 1 50.00%"), "{b}");
    let (by, failed) = t.new_connections(20);
    assert_eq!(failed, 0);
    assert!(by.keys().all(|b| b.starts_with("k8s")), "{by:?}");
}

/// Turns a fault on at the second stage (50 %) and waits for the rollback to the first
/// (10 %); returns the time from the fault to the rollback and the status then.
fn fault_at_the_second_stage(
    t: &Topology,
    service: &str,
    on: impl Fn(&lb_tests::http::Faults),
) -> (Duration, String) {
    t.control(&format!("rollout start {service}")).unwrap();
    wait_step(t, service, "2/3", Duration::from_secs(10));
    let at = Instant::now();
    fault(t, on);
    wait_state(t, service, "rolled_back", Duration::from_secs(10));
    let took = at.elapsed();
    let (kv, text) = status(t, service);
    assert_eq!(kv["step"], "1/3", "{text}");
    assert_eq!(kv["canary_share"], "10.0", "{text}");
    (took, text)
}

#[test]
fn request_mode_500s_roll_back_to_the_previous_stage_within_threshold_intervals() {
    if !require_root("request_mode_500s_roll_back") {
        return;
    }
    let t = setup("ro-500");
    let _load = Load::start(&t, &[t.req_vip()]);
    let (took, text) =
        fault_at_the_second_stage(&t, "web-req", |f| f.error_every.store(5, Ordering::Relaxed));
    eprintln!("web-req: 1 in 5 answers 500 → rolled back {took:?} after the fault\n{text}");
    // Two failing intervals, plus the one under way when the fault began.
    assert!(took <= Duration::from_millis(3 * 1000 + 500), "{took:?}");
    let fail = text.lines().find(|l| l.contains(" fail: ")).unwrap();
    assert!(fail.contains("max_error_ratio"), "{fail}");
    let b = t.control("show backends web-req").unwrap();
    assert!(
        b.contains("web-req k8s k8s-1 1 5.00%"),
        "the split is back at 10 %: {b}"
    );
}

#[test]
fn connection_mode_resets_roll_back_to_the_previous_stage() {
    if !require_root("connection_mode_resets_roll_back") {
        return;
    }
    let t = setup("ro-rst");
    let _load = Load::start(&t, &[t.vip()]);
    let (took, text) =
        fault_at_the_second_stage(&t, "web", |f| f.reset.store(true, Ordering::Relaxed));
    eprintln!("web: k8s resets every connection → rolled back {took:?} after the fault\n{text}");
    assert!(took <= Duration::from_millis(3 * 1000 + 500), "{took:?}");
    let fail = text.lines().find(|l| l.contains(" fail: ")).unwrap();
    assert!(
        fail.contains("max_error_ratio") || fail.contains("no healthy backend"),
        "{fail}"
    );
}

#[test]
fn slow_k8s_answers_roll_back_in_both_modes() {
    if !require_root("slow_k8s_answers_roll_back") {
        return;
    }
    let t = setup("ro-slow");
    let _load = Load::with_threads(&t, &[t.vip(), t.req_vip()], 12);
    t.control("rollout start web").unwrap();
    t.control("rollout start web-req").unwrap();
    wait_step(&t, "web", "2/3", Duration::from_secs(10));
    wait_step(&t, "web-req", "2/3", Duration::from_secs(10));
    let at = Instant::now();
    fault(&t, |f| f.delay_ms.store(150, Ordering::Relaxed));
    for s in ["web", "web-req"] {
        wait_state(&t, s, "rolled_back", Duration::from_secs(10));
        let (kv, text) = status(&t, s);
        eprintln!(
            "{s}: k8s 150 ms late → rolled back {:?} after the fault\n{text}",
            at.elapsed()
        );
        assert_eq!(kv["step"], "1/3", "{text}");
        let fail = text.lines().find(|l| l.contains(" fail: ")).unwrap();
        assert!(fail.contains("max_p99"), "{fail}");
    }
    assert!(at.elapsed() <= Duration::from_millis(3 * 1000 + 1500));
}

#[test]
fn kill_9_mid_rollout_resumes_at_the_same_stage() {
    if !require_root("kill_9_mid_rollout_resumes") {
        return;
    }
    let mut t = setup("ro-kill");
    // Slow stages: the kill lands in the middle of the second.
    let cfg = t
        .config_text()
        .replace("interval = \"1s\"", "interval = \"3s\"");
    std::fs::write(&t.config, cfg).unwrap();
    t.reload_lbd().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _load = Load::start(&t, &[t.vip()]);
    t.control("rollout start web").unwrap();
    wait_step(&t, "web", "2/3", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1000));
    t.kill_lbd();
    t.start_lbd().unwrap();
    let (kv, text) = status(&t, "web");
    eprintln!("after kill -9 at step 2/3:\n{text}");
    assert_eq!(kv["state"], "progressing", "{text}");
    assert_eq!(kv["step"], "2/3", "never lower, never higher: {text}");
    assert_eq!(kv["canary_share"], "50.0", "{text}");
    assert!(text.contains(" pass: "), "its judgements came back: {text}");
    // And it goes on from there.
    let (took, _) = wait_state(&t, "web", "promoted", Duration::from_secs(10));
    eprintln!("promoted {took:?} after the restart");
}
