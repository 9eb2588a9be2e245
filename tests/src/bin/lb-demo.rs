//! `cargo xtask demo`: the migration story in network namespaces. Two services share the
//! legacy and k8s pools at the same split: `web` in connection mode (XDP, one backend per
//! connection) and `web-req` in request mode (the proxy, one backend per request). The split
//! moves 95/5 → 80/20 → 50/50 → 0/100 live (`lbctl set split`), and at each stage the same two
//! workloads go through both services: one request per connection, and a few keep-alive
//! clients sending many requests. The table shows what "k8s = 5 %" really means in each case;
//! `target/demo/compare.svg` plots it.
//!
//! Act two: automatic rollouts under live traffic. lbd walks `web` through 5 → 20 → 50 → 100 %
//! on its own, judging k8s against legacy every 2 s from what the XDP program measures
//! (connect failures, time to first byte): a healthy k8s pool is promoted; then k8s starts
//! resetting connections when it reaches 20 % (its health checks still pass) and lbd rolls it
//! back. The timeline of judgements is printed and `target/demo/rollout.svg` plots it.
//! Everything is cleaned up on exit, Ctrl-C included.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result};
use lb_tests::{
    http::{Client, get_once},
    topology::Topology,
};
use plotters::prelude::*;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// New connections, one request each.
const CONNECTIONS: usize = 400;
/// Keep-alive clients, and requests each sends.
const CLIENTS: usize = 4;
const REQUESTS: usize = 100;

const STAGES: [(u32, u32); 4] = [(95, 5), (80, 20), (50, 50), (0, 100)];

/// Percentage of answers that came from a k8s backend.
fn k8s_pct(names: &[String]) -> f64 {
    if names.is_empty() {
        return f64::NAN;
    }
    100.0 * names.iter().filter(|n| n.starts_with("k8s")).count() as f64 / names.len() as f64
}

/// Both workloads against one address: (answers of new connections, answers of keep-alive
/// requests).
/// Progress on one line, where stderr is a terminal (a log gets only the stage lines).
fn progress(text: std::fmt::Arguments) {
    use std::io::IsTerminal as _;
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K{text}");
        let _ = std::io::stderr().flush();
    }
}

fn workloads(
    t: &Topology,
    vip: SocketAddr,
    label: &'static str,
) -> Result<(Vec<String>, Vec<String>)> {
    t.in_client(move || {
        let mut conns = Vec::new();
        for i in 0..CONNECTIONS {
            if STOP.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(n) = get_once(vip) {
                conns.push(n);
            }
            if i % 50 == 0 {
                progress(format_args!("  {label}: new connections {i}/{CONNECTIONS}"));
            }
        }
        let mut reqs = Vec::new();
        let mut clients: Vec<Client> = (0..CLIENTS)
            .filter_map(|_| Client::connect(vip).ok())
            .collect();
        for r in 0..REQUESTS {
            if STOP.load(Ordering::Relaxed) {
                break;
            }
            for c in clients.iter_mut() {
                if let Ok(n) = c.get(false) {
                    reqs.push(n);
                }
            }
            if r % 25 == 0 {
                progress(format_args!(
                    "  {label}: keep-alive requests {}/{}",
                    r * CLIENTS,
                    REQUESTS * CLIENTS
                ));
            }
        }
        progress(format_args!(""));
        (conns, reqs)
    })
}

/// One stage's measurements (k8s %): per mode, of new connections and of keep-alive requests.
struct Row {
    k8s: u32,
    conn_new: f64,
    conn_keepalive: f64,
    req_new: f64,
    req_keepalive: f64,
}

/// A plotted line: its legend, colour, and which measurement of a stage it shows.
type Series = (&'static str, RGBColor, fn(&Row) -> f64);

fn plot(rows: &[Row], path: &PathBuf) -> Result<()> {
    let root = SVGBackend::new(path, (760, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "k8s share of requests, 4 keep-alive clients: configured vs measured",
            ("sans-serif", 18),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..100f64, 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("configured k8s weight (%)")
        .y_desc("measured k8s share of requests (%)")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (100.0, 100.0)],
            BLACK.mix(0.3),
        ))?
        .label("ideal")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.3)));
    let series: [Series; 2] = [
        ("connection mode (XDP, per connection)", RED, |r| {
            r.conn_keepalive
        }),
        ("request mode (proxy, per request)", BLUE, |r| {
            r.req_keepalive
        }),
    ];
    for (name, color, f) in series {
        let pts: Vec<(f64, f64)> = rows.iter().map(|r| (r.k8s as f64, f(r))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "setting up namespaces: client → lb (XDP + proxy) → bridge → legacy-1, legacy-2, k8s-1, k8s-2"
    );
    let mut t = Topology::new("d", "auto")?;
    t.start_lbd()?;
    println!(
        "lbd is up: `web` {} in connection mode, `web-req` {} in request mode, same pools.",
        t.vip(),
        t.req_vip()
    );
    println!(
        "Each stage: `lbctl set split` on both; {CONNECTIONS} new connections (1 request each) and {CLIENTS} keep-alive clients x {REQUESTS} requests through each.\n"
    );
    let mut rows = Vec::new();
    for (legacy, k8s) in STAGES {
        if STOP.load(Ordering::Relaxed) {
            println!("interrupted: cleaning up");
            return Ok(());
        }
        for svc in ["web", "web-req"] {
            t.control(&format!("set split {svc} legacy={legacy} k8s={k8s}"))?;
        }
        eprintln!("stage {legacy}/{k8s}");
        let (cn, ck) = workloads(&t, t.vip(), "connection mode")?;
        let (rn, rk) = workloads(&t, t.req_vip(), "request mode")?;
        rows.push(Row {
            k8s,
            conn_new: k8s_pct(&cn),
            conn_keepalive: k8s_pct(&ck),
            req_new: k8s_pct(&rn),
            req_keepalive: k8s_pct(&rk),
        });
    }
    println!("k8s share (%) by mode and workload — configured vs measured");
    println!(
        "| {:>10} | {:>22} | {:>22} | {:>22} | {:>22} |",
        "configured",
        "conn mode: new conns",
        "conn mode: keep-alive",
        "req mode: new conns",
        "req mode: keep-alive"
    );
    println!(
        "|{:-<12}|{:-<24}|{:-<24}|{:-<24}|{:-<24}|",
        "", "", "", "", ""
    );
    for r in &rows {
        let cell = |v: f64| format!("{v:5.1} ({:+5.1} pp)", v - r.k8s as f64);
        println!(
            "| {:>10} | {:>22} | {:>22} | {:>22} | {:>22} |",
            r.k8s,
            cell(r.conn_new),
            cell(r.conn_keepalive),
            cell(r.req_new),
            cell(r.req_keepalive)
        );
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let svg = dir.canonicalize()?.join("compare.svg");
    plot(&rows, &svg)?;
    println!("\nplot: {}", svg.display());
    println!(
        "Connection mode balances connections: with {CLIENTS} keep-alive clients each sticks to one"
    );
    println!(
        "backend, so the k8s share of requests moves in steps of {}%. Request mode picks per request",
        100 / CLIENTS
    );
    println!("(smooth weighted round robin) and tracks the configured split on every workload.");
    act_two(&mut t, &dir)
}

/// The rollout section act two gives both services.
const ROLLOUT: &str = r#"baseline = "legacy"
canary = "k8s"
steps = [5, 20, 50, 100]
interval = "2s"
threshold = 2
min_samples = 20
max_error_ratio = 0.02
max_p99 = "100ms"
"#;

/// One judgement as the demo saw it.
struct Seen {
    /// Seconds since act two began.
    at: f64,
    result: String,
    /// Canary share (%) of the stage judged.
    share: f64,
    canary_errors: f64,
    baseline_errors: f64,
    canary_p99: f64,
    baseline_p99: f64,
}

/// What act two recorded: the canary share over time, and every judgement.
#[derive(Default)]
struct Timeline {
    share: Vec<(f64, f64)>,
    judgements: Vec<Seen>,
    /// Where each rollout began and what it was.
    marks: Vec<(f64, &'static str)>,
}

/// New connections from the client, paced, until `stop`.
fn live_traffic(t: &Topology, stop: &'static AtomicBool) -> Vec<std::thread::JoinHandle<()>> {
    let vip = t.vip();
    (0..3)
        .map(|_| {
            let name = t.client.name.clone();
            std::thread::spawn(move || {
                if (lb_tests::netns::Netns { name }).enter_no_drop().is_err() {
                    return;
                }
                while !stop.load(Ordering::Relaxed) && !STOP.load(Ordering::Relaxed) {
                    let _ = get_once(vip);
                    std::thread::sleep(std::time::Duration::from_millis(3));
                }
            })
        })
        .collect()
}

/// Follows `web`'s rollout until `done` says so (or 40 s pass), printing each new judgement
/// and recording the timeline. `on_step` runs once per step reached.
fn follow(
    t: &Topology,
    started: std::time::Instant,
    tl: &mut Timeline,
    mut on_step: impl FnMut(u64),
    done: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let mut newest: Option<serde_json::Value> = None;
    let mut steps_seen = std::collections::HashSet::new();
    loop {
        let st: serde_json::Value = serde_json::from_str(&t.control("rollout status web json")?)?;
        let now = started.elapsed().as_secs_f64();
        let share = st["canary_share"].as_f64().unwrap_or(0.0);
        tl.share.push((now, share));
        let step = st["step"].as_u64().unwrap_or(0);
        if steps_seen.insert(step) {
            on_step(step);
        }
        let js = st["judgements"].as_array().cloned().unwrap_or_default();
        // Newest first: the ones before the newest already printed are new; oldest first.
        let fresh = newest
            .as_ref()
            .and_then(|n| js.iter().position(|j| j == n))
            .unwrap_or(js.len());
        for j in js[..fresh].iter().rev() {
            let fig = |p: &str, k: &str| j[p][k].as_f64().unwrap_or(f64::NAN);
            let stage = j["stage"].as_u64().unwrap_or(0) as usize;
            let steps = [5.0, 20.0, 50.0, 100.0];
            let seen = Seen {
                at: now,
                result: j["result"].as_str().unwrap_or("?").to_string(),
                share: steps.get(stage.wrapping_sub(1)).copied().unwrap_or(0.0),
                canary_errors: fig("canary", "error_ratio") * 100.0,
                baseline_errors: fig("baseline", "error_ratio") * 100.0,
                canary_p99: fig("canary", "p99_ms"),
                baseline_p99: fig("baseline", "p99_ms"),
            };
            let ms = |v: f64| {
                if v.is_finite() {
                    format!("{v:5.1} ms")
                } else {
                    "    - ms".to_string()
                }
            };
            println!(
                "  {:>5.1} s  stage {}/4 ({:>3} %)  {:<12}  k8s {}/{} failed, p99 {} · legacy {}/{} failed, p99 {}{}",
                now,
                stage,
                seen.share,
                seen.result,
                j["canary"]["errors"],
                j["canary"]["samples"],
                ms(seen.canary_p99),
                j["baseline"]["errors"],
                j["baseline"]["samples"],
                ms(seen.baseline_p99),
                if seen.result == "pass" {
                    String::new()
                } else {
                    format!("  ({})", j["reason"].as_str().unwrap_or(""))
                }
            );
            tl.judgements.push(seen);
        }
        if let Some(j) = js.first() {
            newest = Some(j.clone());
        }
        let state = st["state"].as_str().unwrap_or("").to_string();
        if done(&state) || STOP.load(Ordering::Relaxed) {
            return Ok(state);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("rollout still {state} after 40 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn act_two(t: &mut Topology, dir: &std::path::Path) -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        return Ok(());
    }
    println!(
        "\nAct two: rollouts lbd judges itself. `web` gets a [service.rollout] (steps 5/20/50/100 %, judged every 2 s,"
    );
    println!(
        "k8s vs legacy by connect failures and time to first byte measured in XDP; 2 fails in a row roll back)."
    );
    t.rollout(ROLLOUT);
    t.reload_lbd()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t.control("rollout status web").is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the reload did not take the rollout"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    static TRAFFIC_STOP: AtomicBool = AtomicBool::new(false);
    let traffic = live_traffic(t, &TRAFFIC_STOP);
    let started = std::time::Instant::now();
    let mut tl = Timeline::default();

    println!(
        "\n1. A healthy k8s pool, from legacy=100 k8s=0 (live traffic: ~3 new connections every few ms):"
    );
    t.control("set split web legacy=100 k8s=0")?;
    tl.marks
        .push((started.elapsed().as_secs_f64(), "healthy k8s"));
    t.control("rollout start web")?;
    let state = follow(t, started, &mut tl, |_| {}, |s| s == "promoted")?;
    println!("  → {state}: k8s takes 100 % of new connections.");

    println!(
        "\n2. Again from legacy=100 k8s=0; at 20 % k8s starts resetting connections (health checks still pass):"
    );
    t.control("set split web legacy=100 k8s=0")?;
    tl.marks
        .push((started.elapsed().as_secs_f64(), "k8s resets at 20 %"));
    t.control("rollout start web")?;
    let faults: Vec<_> = [2, 3].iter().map(|i| t.faults(*i)).collect();
    let state = follow(
        t,
        started,
        &mut tl,
        |step| {
            if step == 2 {
                for f in &faults {
                    f.reset.store(true, Ordering::Relaxed);
                }
            }
        },
        |s| s == "rolled_back",
    )?;
    let status = t.control("rollout status web")?;
    let share = status
        .lines()
        .find_map(|l| l.strip_prefix("canary_share: "))
        .unwrap_or("?");
    println!("  → {state}: back to {share} % k8s, held until `lbctl rollout resume web`.");
    for f in &faults {
        f.reset.store(false, Ordering::Relaxed);
    }
    t.control("rollout abort web")?;
    TRAFFIC_STOP.store(true, Ordering::Relaxed);
    for h in traffic {
        let _ = h.join();
    }
    let svg = dir.canonicalize()?.join("rollout.svg");
    plot_rollout(&tl, &svg)?;
    println!("\nplot: {}", svg.display());
    Ok(())
}

/// One lower panel: its area, its axis label, and the canary's and the baseline's figure.
type Panel<'r, 'b> = (
    &'r DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    &'static str,
    fn(&Seen) -> f64,
    fn(&Seen) -> f64,
);

/// Canary share over time with each judgement marked, and beneath it the two pools' failure
/// ratio and p99 per judgement.
fn plot_rollout(tl: &Timeline, path: &PathBuf) -> Result<()> {
    let root = SVGBackend::new(path, (860, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(300);
    let (mid, low) = bottom.split_vertically(170);
    let end = tl.share.last().map_or(1.0, |p| p.0).max(1.0);
    let colour = |r: &str| match r {
        "pass" => GREEN.mix(0.9),
        "fail" => RED.mix(0.9),
        _ => RGBColor(128, 128, 128).mix(0.9),
    };
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "web: k8s share as lbd walks the rollout (judged every 2 s)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..end, 0f64..105f64)?;
    chart.configure_mesh().y_desc("k8s share (%)").draw()?;
    chart
        .draw_series(LineSeries::new(tl.share.clone(), BLUE.stroke_width(2)))?
        .label("canary share")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    for r in ["pass", "fail", "inconclusive"] {
        chart
            .draw_series(
                tl.judgements
                    .iter()
                    .filter(|j| j.result == r)
                    .map(|j| Circle::new((j.at, j.share), 5, colour(r).filled())),
            )?
            .label(r)
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, colour(r).filled()));
    }
    for (at, what) in &tl.marks {
        chart.draw_series(std::iter::once(PathElement::new(
            [(*at, 0.0), (*at, 105.0)],
            BLACK.mix(0.3),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            what.to_string(),
            (*at + 0.2, 98.0),
            ("sans-serif", 13),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    let pairs = |f: fn(&Seen) -> f64| -> Vec<(f64, f64)> {
        tl.judgements
            .iter()
            .map(|j| (j.at, f(j)))
            .filter(|p| p.1.is_finite())
            .collect()
    };
    let panels: [Panel<'_, '_>; 2] = [
        (
            &mid,
            "connect failures (%)",
            |j| j.canary_errors,
            |j| j.baseline_errors,
        ),
        (
            &low,
            "first-byte p99 (ms)",
            |j| j.canary_p99,
            |j| j.baseline_p99,
        ),
    ];
    for (area, label, canary, baseline) in panels {
        let (c, b) = (pairs(canary), pairs(baseline));
        let max = c.iter().chain(b.iter()).map(|p| p.1).fold(1.0f64, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(25)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..end, 0f64..max)?;
        chart.configure_mesh().y_desc(label).draw()?;
        for (name, pts, color) in [("k8s", c, RED), ("legacy", b, BLACK)] {
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
