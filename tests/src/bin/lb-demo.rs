//! `cargo xtask demo`: the migration story in network namespaces. Two services share the
//! legacy and k8s pools at the same split: `web` in connection mode (XDP, one backend per
//! connection) and `web-req` in request mode (the proxy, one backend per request). The split
//! moves 95/5 → 80/20 → 50/50 → 0/100 live (`lbctl set split`), and at each stage the same two
//! workloads go through both services: one request per connection, and a few keep-alive
//! clients sending many requests. The table shows what "k8s = 5 %" really means in each case;
//! `target/demo/compare.svg` plots it. Everything is cleaned up on exit, Ctrl-C included.

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
    Ok(())
}
