//! Rollouts in process, in virtual time, on the fake data plane: every transition and gate,
//! table-driven. Each interval the test plays the traffic of that window into the fake
//! kernel's counters (new flows, connect failures, first-byte times) and lets the daemon
//! judge it, as lbd's owner loop does.

use std::{collections::HashMap, path::Path, time::Duration};

use lb_common::stats::{BackendStats, L4Stats, first_byte_bucket};
use lb_userspace::{
    config::Config,
    control::handle_line,
    daemon::Daemon,
    dataplane::FakeKernel,
    persist::{Saved, Store},
    rollout::{Phase, Verdict},
    state::State,
};

const CONFIG: &str = r#"
[daemon]
interfaces = ["eth0"]

[[service]]
name = "web"
vip = "10.99.0.10"
port = 80
snat = "10.20.0.1"

[[service.pool]]
name = "legacy"
weight = 90
backends = ["10.20.0.11:8080", "10.20.0.12:8080"]

[[service.pool]]
name = "k8s"
weight = 10
backends = ["10.20.0.21:8080", "10.20.0.22:8080"]

[service.rollout]
baseline = "legacy"
canary = "k8s"
steps = [5, 20, 50, 100]
interval = "1s"
threshold = 2
min_samples = 100
max_error_ratio = 0.05
max_p99 = "200ms"
"#;

fn daemon(text: &str) -> (Daemon, FakeKernel) {
    let kernel = FakeKernel::default();
    let cfg = Config::parse(text, Path::new("lb.toml")).unwrap();
    let mut d = Daemon::new(State::from_config(&cfg).unwrap(), Box::new(kernel.clone()));
    d.sync_all().unwrap();
    (d, kernel)
}

fn run(d: &mut Daemon, line: &str) -> String {
    let (reply, _, ok) = handle_line(d, line);
    assert!(ok, "{line}: {reply}");
    reply
}

/// What one pool's backends do during a window.
#[derive(Clone, Copy, Debug)]
struct Traffic {
    flows: u64,
    failures: u64,
    first_byte_ms: u64,
}

const OK: Traffic = Traffic {
    flows: 200,
    failures: 0,
    first_byte_ms: 20,
};
const ERRORS: Traffic = Traffic {
    flows: 200,
    failures: 30,
    first_byte_ms: 20,
};
const SLOW: Traffic = Traffic {
    flows: 200,
    failures: 0,
    first_byte_ms: 300,
};
const FEW: Traffic = Traffic {
    flows: 40,
    failures: 0,
    first_byte_ms: 20,
};

/// Adds a window's traffic to each backend of `pool` in the fake kernel.
fn play(d: &Daemon, k: &FakeKernel, pool: &str, t: Traffic) {
    let ids: Vec<u32> = d
        .state
        .backends()
        .filter(|(_, p, _)| p.name == pool)
        .map(|(_, _, b)| b.id)
        .collect();
    let mut st = k.state();
    for id in ids {
        let s: &mut BackendStats = st.backend_stats.entry(id).or_default();
        s.new_flows += t.flows;
        let l4: &mut L4Stats = st.backend_l4.entry(id).or_default();
        l4.connect_reset += t.failures;
        l4.answered += t.flows - t.failures;
        l4.first_byte[first_byte_bucket(t.first_byte_ms * 1_000_000)] += t.flows - t.failures;
    }
}

/// One interval in virtual time: the window opens, `canary` traffic (and healthy baseline
/// traffic) is played, the window ends and is judged. Returns the verdict.
async fn interval(d: &mut Daemon, k: &FakeKernel, canary: Traffic) -> Verdict {
    let until = d.next_judgement().expect("a window is open");
    play(d, k, "k8s", canary);
    play(d, k, "legacy", OK);
    tokio::time::sleep_until(until).await;
    d.judge_due();
    d.state.services["web"].rollout.as_ref().unwrap().judgements[0].result
}

fn progress(d: &Daemon) -> (Phase, usize) {
    let p = d.state.services["web"].rollout.as_ref().unwrap();
    (p.phase, p.stage)
}

/// The canary's share of the kernel's live table (%).
fn table_share(d: &Daemon, k: &FakeKernel) -> f64 {
    let k8s: Vec<u32> = d
        .state
        .backends()
        .filter(|(_, p, _)| p.name == "k8s")
        .map(|(_, _, b)| b.id)
        .collect();
    let st = k.state();
    let t = st.table(0).unwrap();
    t.iter().filter(|id| k8s.contains(id)).count() as f64 * 100.0 / t.len() as f64
}

#[tokio::test(start_paused = true)]
async fn every_transition_and_gate_in_virtual_time() {
    use Verdict::*;
    // (name, canary traffic per interval, verdicts, phase and stage after, canary % then)
    type Row = (
        &'static str,
        Vec<Traffic>,
        Vec<Verdict>,
        (Phase, usize),
        f64,
    );
    let rows: Vec<Row> = vec![
        (
            "a healthy canary is promoted step by step",
            vec![OK, OK, OK],
            vec![Pass, Pass, Pass],
            (Phase::Promoted, 4),
            100.0,
        ),
        (
            "errors at 20 % roll back to 5 % after threshold (2) fails",
            vec![OK, ERRORS, ERRORS],
            vec![Pass, Fail, Fail],
            (Phase::RolledBack, 1),
            5.0,
        ),
        (
            "a slow canary fails the p99 gate; from the first step back to the start split",
            vec![SLOW, SLOW],
            vec![Fail, Fail],
            (Phase::RolledBack, 0),
            10.0,
        ),
        (
            "too few samples hold the stage",
            vec![FEW, FEW, OK],
            vec![Inconclusive, Inconclusive, Pass],
            (Phase::Progressing, 2),
            20.0,
        ),
        (
            "an inconclusive window between two fails neither counts nor resets",
            vec![ERRORS, FEW, ERRORS],
            vec![Fail, Inconclusive, Fail],
            (Phase::RolledBack, 0),
            10.0,
        ),
        (
            "a pass between two fails resets the count",
            vec![ERRORS, OK, ERRORS],
            vec![Fail, Pass, Fail],
            (Phase::Progressing, 2),
            20.0,
        ),
    ];
    for (name, windows, verdicts, after, share) in rows {
        let (mut d, k) = daemon(CONFIG);
        let reply = run(&mut d, "rollout start web");
        assert!(reply.contains("progressing at step 1/4"), "{name}: {reply}");
        assert!(
            (table_share(&d, &k) - 5.0).abs() < 0.5,
            "{name}: stage 1 is 5 %"
        );
        let mut got = Vec::new();
        for w in windows {
            got.push(interval(&mut d, &k, w).await);
        }
        assert_eq!(got, verdicts, "{name}");
        assert_eq!(progress(&d), after, "{name}");
        let live = table_share(&d, &k);
        assert!(
            (live - share).abs() < 0.5,
            "{name}: canary {live:.2} % in the kernel, want {share}"
        );
        let share_now = d.state.services["web"].canary_share().unwrap();
        assert!((share_now - share).abs() < 0.01, "{name}: {share_now}");
        // Held states are not judged any more.
        if matches!(after.0, Phase::Promoted | Phase::RolledBack) {
            assert_eq!(d.next_judgement(), None, "{name}: no window while held");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_canary_pool_without_a_healthy_backend_fails_not_a_silent_zero() {
    let (mut d, k) = daemon(CONFIG);
    run(&mut d, "rollout start web");
    for b in ["10.20.0.21:8080", "10.20.0.22:8080"] {
        d.change("web", |st| {
            st.backend_mut("web", "k8s", b)?.healthy = false;
            Ok(())
        })
        .unwrap();
    }
    let none = Traffic {
        flows: 0,
        failures: 0,
        first_byte_ms: 1,
    };
    assert_eq!(interval(&mut d, &k, none).await, Verdict::Fail);
    let j = &d.state.services["web"].rollout.as_ref().unwrap().judgements[0];
    assert!(j.reason.contains("no healthy backend"), "{}", j.reason);
}

#[tokio::test(start_paused = true)]
async fn on_failure_abort_sets_the_canary_to_zero() {
    let text = CONFIG.replace("threshold = 2", "threshold = 1\non_failure = \"abort\"");
    let (mut d, k) = daemon(&text);
    run(&mut d, "rollout start web");
    interval(&mut d, &k, ERRORS).await;
    assert_eq!(progress(&d).0, Phase::Aborted);
    assert_eq!(table_share(&d, &k), 0.0);
}

#[tokio::test(start_paused = true)]
async fn the_operators_split_pauses_it_and_resume_returns_to_the_stage() {
    let (mut d, k) = daemon(CONFIG);
    run(&mut d, "rollout start web");
    interval(&mut d, &k, OK).await; // stage 2: 20 %
    let reply = run(&mut d, "set split web legacy=70 k8s=30");
    assert!(reply.contains("rollout of web paused"), "{reply}");
    assert_eq!(progress(&d), (Phase::Paused, 2));
    assert!(
        (table_share(&d, &k) - 30.0).abs() < 0.5,
        "the operator's word wins"
    );
    assert_eq!(d.next_judgement(), None, "a paused rollout is not judged");
    // While paused, another weight change says nothing more.
    assert_eq!(run(&mut d, "set weight web/k8s 300"), "\n");
    run(&mut d, "rollout resume web");
    assert_eq!(progress(&d), (Phase::Progressing, 2));
    assert!(
        (table_share(&d, &k) - 20.0).abs() < 0.5,
        "back to the stage's split"
    );
    // The window restarts: a full interval from the resume.
    let started = tokio::time::Instant::now();
    let due = d.next_judgement().unwrap();
    assert_eq!(due - started, Duration::from_secs(1));
    run(&mut d, "rollout pause web");
    run(&mut d, "rollout promote web");
    assert_eq!(progress(&d), (Phase::Promoted, 4));
    assert_eq!(table_share(&d, &k), 100.0);
}

#[test]
fn commands_in_the_wrong_state_are_errors_that_change_nothing() {
    let (mut d, k) = daemon(CONFIG);
    let writes = k.state().writes.len();
    for line in [
        "rollout pause web",
        "rollout resume web",
        "rollout abort web",
        "rollout promote web",
        "rollout start nope",
        "rollout start",
        "rollout start web extra",
        "rollout status",
        "rollout status web yaml",
        "rollout bogus web",
    ] {
        let (reply, _, ok) = handle_line(&mut d, line);
        assert!(!ok && reply.starts_with("error: "), "{line}: {reply}");
    }
    assert_eq!(progress(&d), (Phase::Idle, 0));
    assert_eq!(k.state().writes.len(), writes, "nothing was written");
    run(&mut d, "rollout start web");
    let (reply, _, ok) = handle_line(&mut d, "rollout start web");
    assert!(!ok && reply.contains("progressing"), "{reply}");
    // A service without [service.rollout].
    let plain = CONFIG
        .split("[service.rollout]")
        .next()
        .unwrap()
        .to_string();
    let (mut d, _) = daemon(&plain);
    let (reply, _, ok) = handle_line(&mut d, "rollout start web");
    assert!(!ok && reply.contains("no [service.rollout]"), "{reply}");
}

#[tokio::test(start_paused = true)]
async fn status_shows_the_figures_and_metrics_the_state() {
    let (mut d, k) = daemon(CONFIG);
    let scrape = d.scrape();
    for s in [
        r#"lb_rollout_state{service="web",state="idle"} 1"#,
        r#"lb_rollout_state{service="web",state="progressing"} 0"#,
        r#"lb_rollout_canary_share{service="web"} 10"#,
        r#"lb_rollout_judgements_total{service="web",result="fail"} 0"#,
    ] {
        assert!(scrape.contains(s), "missing {s}");
    }
    run(&mut d, "rollout start web");
    interval(&mut d, &k, OK).await;
    interval(&mut d, &k, ERRORS).await;
    let status = run(&mut d, "rollout status web");
    let kv: HashMap<&str, &str> = status.lines().filter_map(|l| l.split_once(": ")).collect();
    assert_eq!(kv["state"], "progressing");
    assert_eq!(kv["step"], "2/4");
    assert_eq!(kv["canary_share"], "20.0");
    assert_eq!(kv["fails"], "1/2");
    let judgements: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("judgement: "))
        .collect();
    assert_eq!(judgements.len(), 2, "{status}");
    assert!(
        judgements[0].contains("fail: max_error_ratio: canary 15.00% > 5.00%"),
        "{status}"
    );
    assert!(
        judgements[0].contains("canary 60/400 errors"),
        "newest first: {status}"
    );
    assert!(judgements[1].contains("pass"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&run(&mut d, "rollout status web json")).unwrap();
    assert_eq!(json["judgements"][0]["canary"]["errors"], 60);
    assert!(run(&mut d, "show rollouts").contains("web progressing 2/4 20.0%"));
    let scrape = d.scrape();
    for s in [
        r#"lb_rollout_state{service="web",state="progressing"} 1"#,
        r#"lb_rollout_canary_share{service="web"} 20"#,
        r#"lb_rollout_judgements_total{service="web",result="pass"} 1"#,
        r#"lb_rollout_judgements_total{service="web",result="fail"} 1"#,
    ] {
        assert!(scrape.contains(s), "missing {s}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_mid_stage_resumes_the_same_stage_with_a_new_window() {
    let dir = std::env::temp_dir().join(format!("lb-rollout-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = dir.join("state.json");
    let (mut d, k) = daemon(CONFIG);
    d.store = Some(Store::new(&file));
    run(&mut d, "rollout start web");
    interval(&mut d, &k, OK).await;
    interval(&mut d, &k, ERRORS).await; // stage 2, one fail
    // Half a window later lbd dies; it comes back on the same pinned kernel.
    let _ = d.next_judgement();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(d);
    let cfg = Config::parse(CONFIG, Path::new("lb.toml")).unwrap();
    let mut state = State::from_config(&cfg).unwrap();
    let saved: Saved = Store::new(&file).load().unwrap().unwrap();
    saved.restore_into(&mut state);
    let mut d = Daemon::new(state, Box::new(k.clone()));
    d.sync_all().unwrap();
    assert_eq!(
        progress(&d),
        (Phase::Progressing, 2),
        "never lower, never higher"
    );
    assert!((table_share(&d, &k) - 20.0).abs() < 0.5);
    let p = d.state.services["web"].rollout.clone().unwrap();
    assert_eq!(
        (p.fails, p.judgements.len()),
        (1, 2),
        "its history came back too"
    );
    let restarted = tokio::time::Instant::now();
    assert_eq!(
        d.next_judgement().unwrap() - restarted,
        Duration::from_secs(1)
    );
    // The next fail is the second in a row: rolled back to 5 %.
    assert_eq!(interval(&mut d, &k, ERRORS).await, Verdict::Fail);
    assert_eq!(progress(&d), (Phase::RolledBack, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_keeps_the_rollout_and_its_split() {
    let (mut d, _) = daemon(CONFIG);
    run(&mut d, "rollout start web");
    let cfg = Config::parse(CONFIG, Path::new("lb.toml")).unwrap();
    d.reload(&cfg).unwrap();
    assert_eq!(progress(&d), (Phase::Progressing, 1));
    let share = d.state.services["web"].canary_share().unwrap();
    assert!(
        (share - 5.0).abs() < 0.01,
        "the file's 90/10 does not undo the stage: {share}"
    );
}
