//! The control plane in process, without root: the daemon over an in-memory data plane
//! (`FakeKernel`), the control grammar, health transitions from fake probes in virtual time,
//! reloads and restart adoption. What needs a real kernel (the XDP path, real checks, pins,
//! kill -9) stays in the namespace tests under `tests/`.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_userspace::{
    config::Config,
    control::handle_line,
    daemon::{Daemon, keep_from_dataplane},
    dataplane::{FakeKernel, Write},
    health::{Checker, Event, FakeProbe, ProbeError},
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

[service.health]
interval = "100ms"
timeout = "50ms"
rise = 2
fall = 2

[[service.pool]]
name = "legacy"
weight = 90
backends = ["10.20.0.11:8080", "10.20.0.12:8080"]

[[service.pool]]
name = "k8s"
weight = 10
backends = ["10.20.0.21:8080", "10.20.0.22:8080"]
"#;

fn config(text: &str) -> Config {
    Config::parse(text, Path::new("lb.toml")).unwrap()
}

/// A daemon over a fresh fake kernel, its tables published; and the kernel to look at.
fn daemon(text: &str) -> (Daemon, FakeKernel) {
    let kernel = FakeKernel::default();
    let state = State::from_config(&config(text)).unwrap();
    let mut d = Daemon::new(state, Box::new(kernel.clone()));
    d.sync_all().unwrap();
    (d, kernel)
}

/// Buckets per backend id in the live table of service index 0 (`web`).
fn buckets(k: &FakeKernel) -> HashMap<u32, usize> {
    let st = k.state();
    let mut by = HashMap::new();
    for id in st.table(0).expect("web's table is published") {
        *by.entry(*id).or_insert(0) += 1;
    }
    by
}

fn id(d: &Daemon, backend: &str) -> u32 {
    d.state
        .backends()
        .find(|(_, _, b)| b.name == backend)
        .map(|(_, _, b)| b.id)
        .unwrap()
}

fn run(d: &mut Daemon, line: &str) -> String {
    let (reply, _, ok) = handle_line(d, line);
    assert!(ok, "{line}: {reply}");
    reply
}

#[test]
fn every_bad_command_is_an_error_that_changes_nothing() {
    let (mut d, k) = daemon(CONFIG);
    let before = format!("{:?}", d.state);
    let writes = k.state().writes.len();
    let bad = [
        "",
        "   ",
        "frobnicate",
        "show",
        "show nothing",
        "show table",
        "show table nosuch",
        "show backends nosuch",
        "show stat xml",
        "explain web",
        "explain web 1.2.3.4",
        "explain nosuch 1.2.3.4:5",
        "set",
        "set weight",
        "set weight web/legacy",
        "set weight web/legacy -1",
        "set weight web/legacy 1001",
        "set weight web/legacy 1.5",
        "set weight web/nosuch 10",
        "set weight nosuch/legacy 10",
        "set weight web/legacy/10.20.0.99:8080 10",
        "set weight web 10",
        "set split web",
        "set split web legacy=50",
        "set split web legacy=50 k8s",
        "set split web legacy=50 k8s=x",
        "set split web legacy=50 k8s=2000",
        "set split web legacy=50 k8s=50 nosuch=1",
        "set split web legacy=50 legacy=50",
        "set split nosuch legacy=50 k8s=50",
        "set state web/legacy/10.20.0.11:8080",
        "set state web/legacy/10.20.0.11:8080 sleeping",
        "set state web/legacy 10.20.0.11:8080 drain",
        "set state web/legacy/10.20.0.99:8080 drain",
        "set\rweight web/legacy 0",
        "set weight web/legacy 0\u{0}",
        "set\u{a0}weight web/legacy 0",
    ];
    for line in bad {
        let (reply, _, ok) = handle_line(&mut d, line);
        assert!(!ok && reply.starts_with("error: "), "{line:?}: {reply}");
        assert!(
            reply.ends_with("\n\n"),
            "{line:?}: a reply ends with an empty line"
        );
        assert_eq!(
            format!("{:?}", d.state),
            before,
            "{line:?} changed the state"
        );
        assert_eq!(
            k.state().writes.len(),
            writes,
            "{line:?} wrote to the kernel"
        );
    }
}

#[test]
fn a_split_is_published_whole_in_one_table_swap() {
    let (mut d, k) = daemon(CONFIG);
    let generation = d.generation("web");
    let writes = k.state().writes.len();
    run(&mut d, "set split web legacy=50 k8s=50");
    let st = k.state();
    let new: Vec<&Write> = st.writes[writes..].iter().collect();
    assert_eq!(
        new,
        vec![&Write::Publish {
            id: 0,
            generation: generation + 1
        }],
        "one table write for the whole split"
    );
    drop(st);
    let by = buckets(&k);
    let total = lb_common::TABLE_SIZE as f64;
    let share = |name| by[&id(&d, name)] as f64 / total;
    // Each pool gets its share exactly (to a bucket); each backend half its pool's, up to
    // the draw of which of its pool-table buckets fall in the pool's ranks.
    for pool in [
        ["10.20.0.11:8080", "10.20.0.12:8080"],
        ["10.20.0.21:8080", "10.20.0.22:8080"],
    ] {
        let got = share(pool[0]) + share(pool[1]);
        assert!((got - 0.5).abs() < 1.0 / total, "{pool:?}: {got}");
        for name in pool {
            assert!(
                (share(name) - 0.25).abs() < 0.005,
                "{name}: {}",
                share(name)
            );
        }
    }
}

#[test]
fn drain_and_maint_take_a_backend_out_of_new_flows_and_ready_brings_it_back() {
    let (mut d, k) = daemon(CONFIG);
    let b = id(&d, "10.20.0.21:8080");
    assert!(buckets(&k).contains_key(&b));
    for state in ["drain", "maint"] {
        run(
            &mut d,
            &format!("set state web/k8s/10.20.0.21:8080 {state}"),
        );
        let by = buckets(&k);
        assert!(!by.contains_key(&b), "{state}: still in the table");
        // The pool's other backend takes the whole k8s share.
        let other = by[&id(&d, "10.20.0.22:8080")] as f64 / lb_common::TABLE_SIZE as f64;
        assert!((other - 0.10).abs() < 1e-4, "{state}: {other}");
    }
    run(&mut d, "set state web/k8s/10.20.0.21:8080 ready");
    assert!(buckets(&k).contains_key(&b));
}

#[test]
fn a_change_the_kernel_refuses_is_rolled_back_whole() {
    let (mut d, k) = daemon(CONFIG);
    let before = format!("{:?}", d.state);
    let table = buckets(&k);
    k.state().fail_next_write = true;
    let (reply, _, ok) = handle_line(&mut d, "set split web legacy=0 k8s=100");
    assert!(!ok && reply.contains("data plane"), "{reply}");
    assert_eq!(format!("{:?}", d.state), before);
    assert_eq!(buckets(&k), table, "the kernel still has the old table");
    // The next command works.
    run(&mut d, "set split web legacy=0 k8s=100");
}

#[test]
fn a_reload_keeps_ids_and_runtime_state_and_clears_removed_backends_after_the_table() {
    let (mut d, k) = daemon(CONFIG);
    run(&mut d, "set state web/legacy/10.20.0.12:8080 drain");
    let kept = id(&d, "10.20.0.11:8080");
    let removed = id(&d, "10.20.0.22:8080");
    let writes = k.state().writes.len();
    d.reload(&config(&CONFIG.replace(r#", "10.20.0.22:8080""#, "")))
        .unwrap();
    assert_eq!(id(&d, "10.20.0.11:8080"), kept, "ids stay");
    let drained = d
        .state
        .backends()
        .find(|(_, _, b)| b.name == "10.20.0.12:8080")
        .unwrap()
        .2
        .state;
    assert_eq!(drained.to_string(), "drain", "admin states stay");
    let st = k.state();
    let new = &st.writes[writes..];
    let publish = new
        .iter()
        .position(|w| matches!(w, Write::Publish { .. }))
        .unwrap();
    let clear = new
        .iter()
        .position(|w| *w == Write::Backend(removed, None))
        .expect("the removed backend's slot is cleared");
    assert!(
        publish < clear,
        "cleared only once no table names it: {new:?}"
    );
    drop(st);
    assert!(!buckets(&k).contains_key(&removed));

    // A reload the kernel refuses is rolled back whole: the running config stays in force.
    let before = format!("{:?}", d.state);
    let table = buckets(&k);
    k.state().fail_next_write = true;
    let err = d
        .reload(&config(&CONFIG.replace("weight = 10", "weight = 500")))
        .unwrap_err();
    assert!(format!("{err:#}").contains("old one stays"), "{err:#}");
    assert_eq!(format!("{:?}", d.state), before);
    assert_eq!(buckets(&k), table);
}

#[test]
fn a_restarted_daemon_adopts_the_ids_and_table_index_it_finds_in_the_kernel() {
    let (mut d, k) = daemon(CONFIG);
    // Reorder the config: a fresh start would number the backends differently.
    let reordered = CONFIG.replace(
        r#"["10.20.0.11:8080", "10.20.0.12:8080"]"#,
        r#"["10.20.0.12:8080", "10.20.0.11:8080"]"#,
    );
    let ids: Vec<(String, u32)> = d
        .state
        .backends()
        .map(|(_, _, b)| (b.name.clone(), b.id))
        .collect();
    run(&mut d, "set split web legacy=50 k8s=50");
    let generation = d.generation("web");
    drop(d);
    let keep = keep_from_dataplane(&k).unwrap();
    let state = State::from_config_keeping(&config(&reordered), &keep).unwrap();
    for (name, id) in &ids {
        let now = state
            .backends()
            .find(|(_, _, b)| &b.name == name)
            .unwrap()
            .2
            .id;
        assert_eq!(now, *id, "{name} keeps its id");
    }
    let mut d = Daemon::new(state, Box::new(k.clone()));
    d.sync_all().unwrap();
    assert_eq!(
        d.generation("web"),
        generation + 1,
        "the same table index, next generation"
    );
}

/// A fake network: the addresses in `down` fail their checks, those in `slow` answer after
/// a second (past any timeout here).
#[derive(Clone, Default)]
struct Net {
    down: Arc<Mutex<HashSet<SocketAddr>>>,
    slow: Arc<Mutex<HashSet<SocketAddr>>>,
}

impl Net {
    fn probe(&self) -> FakeProbe {
        let net = self.clone();
        Arc::new(move |addr| {
            let down = net.down.lock().unwrap().contains(&addr);
            let slow = net.slow.lock().unwrap().contains(&addr);
            Box::pin(async move {
                if slow {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if down {
                    Err(ProbeError::Connect(
                        std::io::ErrorKind::ConnectionRefused.into(),
                    ))
                } else {
                    Ok(())
                }
            })
        })
    }
}

/// Runs the daemon's health loop (as lbd's owner task does) until `until` holds on the
/// daemon or `limit` of virtual time passes; returns how long it took.
async fn health_until(
    d: &mut Daemon,
    checker: &Checker,
    rx: &mut tokio::sync::mpsc::Receiver<Event>,
    limit: Duration,
    until: impl Fn(&Daemon) -> bool,
) -> Duration {
    let started = tokio::time::Instant::now();
    while !until(d) {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(ev)) => d.apply_health(checker, ev),
            _ => panic!("condition not met within {limit:?}"),
        }
    }
    started.elapsed()
}

fn healthy(d: &Daemon, name: &str) -> bool {
    d.state
        .backends()
        .find(|(_, _, b)| b.name == name)
        .unwrap()
        .2
        .healthy
}

#[tokio::test(start_paused = true)]
async fn health_fall_and_rise_move_a_backend_out_of_and_back_into_the_table_in_virtual_time() {
    let (mut d, k) = daemon(CONFIG);
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let net = Net::default();
    let mut checker = Checker::with_fake_probe(tx, net.probe());
    checker.reconcile(&d.state);
    let b = "10.20.0.21:8080";
    let bid = id(&d, b);
    // interval 100 ms (±10 %), first check within one interval, fall 2: down within
    // 100 + 2 × 110 ms; rise 2: up within the same.
    let bound = Duration::from_millis(100 + 2 * 110 + 1);

    net.down.lock().unwrap().insert(b.parse().unwrap());
    let took = health_until(&mut d, &checker, &mut rx, Duration::from_secs(5), |d| {
        !healthy(d, b)
    })
    .await;
    assert!(took <= bound, "down after {took:?}");
    assert!(!buckets(&k).contains_key(&bid), "out of the table");

    net.down.lock().unwrap().clear();
    let took = health_until(&mut d, &checker, &mut rx, Duration::from_secs(5), |d| {
        healthy(d, b)
    })
    .await;
    assert!(took <= bound, "up after {took:?}");
    assert!(buckets(&k).contains_key(&bid), "back in the table");

    // A backend that answers too slowly fails by timeout, like one that refuses.
    net.slow.lock().unwrap().insert(b.parse().unwrap());
    let took = health_until(&mut d, &checker, &mut rx, Duration::from_secs(5), |d| {
        !healthy(d, b)
    })
    .await;
    assert!(
        took <= bound + Duration::from_millis(2 * 50),
        "slow: down after {took:?}"
    );

    // maint stops its checks: it stays as it is whatever the network says.
    run(&mut d, &format!("set state web/k8s/{b} maint"));
    checker.reconcile(&d.state);
    net.slow.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok(ev) = rx.try_recv() {
        d.apply_health(&checker, ev);
    }
    assert!(!healthy(&d, b), "no check ran while in maint");
}

#[test]
fn every_series_known_from_the_config_is_exported_at_zero_from_the_first_scrape() {
    let text = format!(
        "{CONFIG}\n[[service]]\nname = \"api\"\nvip = \"127.0.0.1\"\nport = 8080\nmode = \"request\"\n[[service.pool]]\nname = \"k8s\"\nweight = 1\nbackends = [\"10.20.0.31:8080\"]\n"
    );
    let (d, _) = daemon(&text);
    let scrape = d.scrape();
    let conn = r#"service="web",pool="k8s",backend="10.20.0.21:8080""#;
    let req = r#"service="api",pool="k8s",backend="10.20.0.31:8080""#;
    for series in [
        format!("lb_backend_connections_total{{{conn}}} 0"),
        format!("lb_backend_packets_total{{{conn},direction=\"to_backend\"}} 0"),
        format!("lb_backend_up{{{conn}}} 1"),
        r#"lb_pool_weight{service="web",pool="k8s"} 10"#.to_string(),
        format!("lb_health_checks_total{{{conn},result=\"fail\"}} 0"),
        format!("lb_health_check_duration_seconds_count{{{conn}}} 0"),
        format!("lb_backend_requests_total{{{req},code=\"200\"}} 0"),
        format!("lb_backend_requests_total{{{req},code=\"502\"}} 0"),
        format!("lb_backend_request_duration_seconds_count{{{req}}} 0"),
        format!("lb_backend_up{{{req}}} 1"),
        format!("lb_backend_active_flows{{{conn}}} 0"),
        format!("lb_backend_connect_failures_total{{{conn},reason=\"reset\"}} 0"),
        format!("lb_backend_connect_failures_total{{{conn},reason=\"timeout\"}} 0"),
        format!("lb_backend_first_byte_seconds_count{{{conn}}} 0"),
        format!("lb_backend_first_byte_seconds_bucket{{le=\"+Inf\",{conn}}} 0"),
    ] {
        assert!(scrape.contains(&series), "missing {series}\n{scrape}");
    }
}

#[test]
fn the_data_planes_l4_signals_reach_metrics_and_show_stat() {
    use lb_common::stats::{L4Stats, first_byte_bucket};
    let (mut d, k) = daemon(CONFIG);
    let slow = id(&d, "10.20.0.21:8080");
    let mut l4 = L4Stats {
        connect_reset: 3,
        connect_timeout: 2,
        ..Default::default()
    };
    // 99 answers at 1 ms, 1 at 200 ms.
    l4.first_byte[first_byte_bucket(1_000_000)] = 99;
    l4.first_byte[first_byte_bucket(200_000_000)] = 1;
    l4.first_byte_sum_ns = 99 * 1_000_000 + 200_000_000;
    k.state().backend_l4.insert(slow, l4);
    k.state().active_flows.insert(slow, 7);
    let scrape = d.scrape();
    let l = r#"service="web",pool="k8s",backend="10.20.0.21:8080""#;
    for series in [
        format!("lb_backend_active_flows{{{l}}} 7"),
        format!("lb_backend_connect_failures_total{{{l},reason=\"reset\"}} 3"),
        format!("lb_backend_connect_failures_total{{{l},reason=\"timeout\"}} 2"),
        format!("lb_backend_first_byte_seconds_count{{{l}}} 100"),
        format!("lb_backend_first_byte_seconds_sum{{{l}}} 0.299"),
    ] {
        assert!(scrape.contains(&series), "missing {series}\n{scrape}");
    }
    // Cumulative buckets: 99 at or below ~1.05 ms, all 100 at or below ~262 ms.
    let bucket = |le_max: f64| -> u64 {
        scrape
            .lines()
            .filter(|x| x.starts_with("lb_backend_first_byte_seconds_bucket{") && x.contains(l))
            .filter_map(|x| {
                let le: f64 = x.split("le=\"").nth(1)?.split('"').next()?.parse().ok()?;
                (le <= le_max).then(|| x.rsplit(' ').next()?.parse().ok())?
            })
            .max()
            .unwrap_or(0)
    };
    assert_eq!(bucket(0.0009), 0);
    assert_eq!(bucket(0.0011), 99);
    assert_eq!(bucket(0.3), 100);
    let stat: serde_json::Value = serde_json::from_str(&run(&mut d, "show stat json")).unwrap();
    let row = stat
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["backend"] == "10.20.0.21:8080")
        .unwrap();
    assert_eq!(row["active_flows"], 7);
    let backends: serde_json::Value =
        serde_json::from_str(&run(&mut d, "show backends web json")).unwrap();
    let b = backends
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["backend"] == "10.20.0.21:8080")
        .unwrap();
    assert_eq!(
        (b["active_flows"].clone(), b["health"].clone()),
        (7.into(), "up".into())
    );
    // The table keeps its columns (scripts read the last one as health).
    let table = run(&mut d, "show backends web");
    assert!(table.lines().nth(1).unwrap().ends_with(" up"), "{table}");
    assert_eq!(row["connect_resets"], 3);
    assert_eq!(row["connect_timeouts"], 2);
    let p50 = row["first_byte_p50_ms"].as_f64().unwrap();
    let p99 = row["first_byte_p99_ms"].as_f64().unwrap();
    assert!((0.7..=1.1).contains(&p50), "p50 {p50} ms");
    assert!(
        (0.7..=1.1).contains(&p99),
        "p99 {p99} ms: 99 of 100 answers took 1 ms"
    );
    let other = stat
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["backend"] == "10.20.0.11:8080")
        .unwrap();
    assert_eq!(other["first_byte_p99_ms"], serde_json::Value::Null);
}

#[test]
fn help_lists_every_command_of_the_grammar_and_names_are_the_metric_labels() {
    let (mut d, _) = daemon(CONFIG);
    let help = run(&mut d, "help");
    for c in lb_userspace::control::COMMANDS {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(c.name) && l.contains(c.args))
            .unwrap_or_else(|| panic!("{} {} missing: {help}", c.name, c.args));
        assert!(line.ends_with(c.about), "{line}");
        // Each command's own errors and successes are counted under its name.
        let (_, name, _) = handle_line(&mut d, c.name);
        assert!(name == c.name || name == "invalid", "{}: {name}", c.name);
    }
    let (_, name, ok) = handle_line(&mut d, "show services");
    assert_eq!((name, ok), ("show services", true));
    let (_, name, ok) = handle_line(&mut d, "frobnicate");
    assert_eq!((name, ok), ("unknown", false));
    // Once in the loop above, once here.
    assert!(
        d.scrape()
            .contains(r#"lb_control_commands_total{command="show services",result="ok"} 2"#)
    );
}

#[tokio::test(start_paused = true)]
async fn changes_within_a_tables_grace_are_published_together_once_it_ends_without_blocking() {
    let (mut d, k) = daemon(CONFIG);
    k.state().grace = Some(Duration::from_millis(5));
    // sync_all published at t=0: the table's other half is in its grace for 5 ms.
    let generation = d.generation("web");
    let writes = k.state().writes.len();
    run(&mut d, "set split web legacy=50 k8s=50");
    run(&mut d, "set split web legacy=0 k8s=100");
    run(&mut d, "set split web legacy=20 k8s=80");
    assert_eq!(
        k.state().writes.len(),
        writes,
        "nothing written during the grace (and no command waited for it)"
    );
    assert_eq!(
        d.generation("web"),
        generation,
        "the kernel still has the old table"
    );
    let due = d.next_publish().expect("a publish is scheduled");
    tokio::time::sleep_until(due).await;
    d.publish_due();
    let st = k.state();
    assert_eq!(
        st.writes[writes..],
        [Write::Publish {
            id: 0,
            generation: generation + 1
        }],
        "one publish for the three changes"
    );
    drop(st);
    let by = buckets(&k);
    let k8s = (by[&id(&d, "10.20.0.21:8080")] + by[&id(&d, "10.20.0.22:8080")]) as f64
        / lb_common::TABLE_SIZE as f64;
    assert!((k8s - 0.80).abs() < 1e-4, "the last split is live: {k8s}");
    assert_eq!(d.next_publish(), None);
}

#[test]
fn a_reload_writes_only_what_changed() {
    let two = format!(
        "{CONFIG}\n[[service]]\nname = \"api\"\nvip = \"10.99.0.11\"\nport = 80\nsnat = \"10.20.0.1\"\n[[service.pool]]\nname = \"p\"\nweight = 1\nbackends = [\"10.20.0.31:8080\"]\n"
    );
    let (mut d, k) = daemon(&two);
    let writes = k.state().writes.len();
    d.reload(&config(&two)).unwrap();
    let same: Vec<Write> = k.state().writes[writes..]
        .iter()
        .filter(|w| !matches!(w, Write::Sources(_)))
        .cloned()
        .collect();
    assert!(same.is_empty(), "an unchanged config wrote {same:?}");

    // One service's split changes: only its table is published.
    let web = d.state.services["web"].index.0;
    let writes = k.state().writes.len();
    d.reload(&config(&two.replace("weight = 90", "weight = 50")))
        .unwrap();
    let changed: Vec<Write> = k.state().writes[writes..]
        .iter()
        .filter(|w| !matches!(w, Write::Sources(_)))
        .cloned()
        .collect();
    assert!(
        matches!(changed.as_slice(), [Write::Publish { id, .. }] if *id == web),
        "{changed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn passive_health_takes_out_a_backend_whose_flows_fail_in_a_row_and_rise_brings_it_back() {
    use lb_common::stats::L4Stats;
    use lb_userspace::passive::Passive;
    let text = CONFIG.replace("fall = 2\n", "fall = 2\npassive_failures = 3\n");
    let (mut d, k) = daemon(&text);
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let net = Net::default();
    let mut checker = Checker::with_fake_probe(tx, net.probe());
    checker.reconcile(&d.state);
    let mut passive = Passive::default();
    let (b, other) = ("10.20.0.21:8080", "10.20.0.22:8080");
    let (bid, oid) = (id(&d, b), id(&d, other));
    let set = |k: &FakeKernel, id: u32, failed: u64, answered: u64| {
        k.state().backend_l4.insert(
            id,
            L4Stats {
                connect_reset: failed,
                answered,
                ..Default::default()
            },
        );
    };
    set(&k, bid, 10, 500);
    assert!(
        d.observe_passive(&mut passive).is_empty(),
        "history is not a run"
    );
    // Two failures, an answer, two failures: never three in a row.
    set(&k, bid, 12, 500);
    assert!(d.observe_passive(&mut passive).is_empty());
    set(&k, bid, 14, 501);
    assert!(d.observe_passive(&mut passive).is_empty());
    set(&k, bid, 16, 501);
    assert!(d.observe_passive(&mut passive).is_empty());
    assert!(healthy(&d, b));
    // The third in a row: out at once, though every active check passes.
    set(&k, bid, 17, 501);
    let out = d.observe_passive(&mut passive);
    assert_eq!(out.len(), 1);
    assert!(!healthy(&d, b));
    assert!(!buckets(&k).contains_key(&bid), "out of the table");
    assert!(d.scrape().contains(
        r#"lb_backend_ejections_total{service="web",pool="k8s",backend="10.20.0.21:8080"} 1"#
    ));
    // Its pool's last healthy backend is kept, however its flows fail.
    // (And two failing in the same look: only one goes — checked below with a fresh daemon.)
    set(&k, oid, 0, 0);
    d.observe_passive(&mut passive);
    set(&k, oid, 50, 0);
    assert!(d.observe_passive(&mut passive).is_empty());
    assert!(
        healthy(&d, other),
        "the last healthy backend of k8s stays in"
    );
    // Back through the active checks: rise (2) passes from down.
    for key in out {
        checker.restart(&key, &d.state);
    }
    let took = health_until(&mut d, &checker, &mut rx, Duration::from_secs(5), |d| {
        healthy(d, b)
    })
    .await;
    assert!(
        took <= Duration::from_millis(100 + 2 * 110 + 1),
        "up after {took:?}"
    );
    assert!(buckets(&k).contains_key(&bid), "back in the table");
}

#[tokio::test(start_paused = true)]
async fn two_backends_of_a_pool_failing_in_the_same_look_leave_one_in() {
    use lb_common::stats::L4Stats;
    use lb_userspace::passive::Passive;
    let text = CONFIG.replace("fall = 2\n", "fall = 2\npassive_failures = 3\n");
    let (mut d, k) = daemon(&text);
    let mut passive = Passive::default();
    let ids = [id(&d, "10.20.0.21:8080"), id(&d, "10.20.0.22:8080")];
    d.observe_passive(&mut passive);
    for i in ids {
        k.state().backend_l4.insert(
            i,
            L4Stats {
                connect_reset: 10,
                ..Default::default()
            },
        );
    }
    assert_eq!(d.observe_passive(&mut passive).len(), 1);
    let up = ["10.20.0.21:8080", "10.20.0.22:8080"]
        .iter()
        .filter(|b| healthy(&d, b))
        .count();
    assert_eq!(up, 1, "the pool keeps one backend");
}

/// The `checksum` field of `show table web`.
fn table_checksum(d: &mut Daemon) -> String {
    let reply = run(d, "show table web");
    reply
        .lines()
        .next()
        .and_then(|l| l.split(" checksum ").nth(1))
        .unwrap_or_else(|| panic!("no checksum in {reply:?}"))
        .to_string()
}

/// Balancer hosts behind one ECMP router must send each flow to the same backend. Two lbd
/// instances with the same services publish tables whose checksums agree — though one lists
/// its backends in another order, so that its backend ids differ — and keep agreeing after
/// the same sequence of `lbctl` changes; a different split gives a different checksum.
#[test]
fn two_hosts_with_the_same_config_publish_the_same_table() {
    let reordered = CONFIG
        .replace(
            "backends = [\"10.20.0.11:8080\", \"10.20.0.12:8080\"]",
            "backends = [\"10.20.0.12:8080\", \"10.20.0.11:8080\"]",
        )
        .replace(
            "backends = [\"10.20.0.21:8080\", \"10.20.0.22:8080\"]",
            "backends = [\"10.20.0.22:8080\", \"10.20.0.21:8080\"]",
        );
    assert_ne!(reordered, CONFIG);
    let (mut a, _) = daemon(CONFIG);
    let (mut b, _) = daemon(&reordered);
    assert_ne!(
        id(&a, "10.20.0.11:8080"),
        id(&b, "10.20.0.11:8080"),
        "the hosts number their backends differently"
    );
    let first = table_checksum(&mut a);
    assert_eq!(first, table_checksum(&mut b));
    for line in [
        "set split web legacy=50 k8s=50",
        "set weight web/k8s/10.20.0.21:8080 3",
        "set state web/legacy/10.20.0.12:8080 drain",
    ] {
        run(&mut a, line);
        run(&mut b, line);
        let (ca, cb) = (table_checksum(&mut a), table_checksum(&mut b));
        assert_eq!(ca, cb, "after {line:?}");
        assert_ne!(ca, first, "{line:?} changed the table");
    }
    run(&mut b, "set split web legacy=40 k8s=60");
    assert_ne!(table_checksum(&mut a), table_checksum(&mut b));
}
