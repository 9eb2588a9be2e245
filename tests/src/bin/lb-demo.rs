//! `cargo xtask demo`: the migration story in network namespaces. A connection-mode service
//! at 95/5 → 80/20 → 50/50 → 0/100 (changed live with `set split`), driven at each stage by
//! new connections (one request each) and by a few keep-alive clients, with the measured k8s
//! share printed beside the configured one. Everything is cleaned up on exit, Ctrl-C included.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Result;
use lb_tests::{
    http::{Client, get_once},
    topology::Topology,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn k8s_pct(by: &HashMap<String, usize>) -> f64 {
    let k8s: usize = by
        .iter()
        .filter(|(k, _)| k.starts_with("k8s"))
        .map(|(_, v)| v)
        .sum();
    let total: usize = by.values().sum();
    if total == 0 {
        0.0
    } else {
        100.0 * k8s as f64 / total as f64
    }
}

fn main() -> Result<()> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "setting up namespaces: client → lb (XDP) → bridge → legacy-1, legacy-2, k8s-1, k8s-2"
    );
    let mut t = Topology::new("d", "auto")?;
    t.start_lbd()?;
    println!("lbd is up. Stages change the split live with `set split web legacy=L k8s=K`.\n");
    println!(
        "{:<8} {:>10} {:>22} {:>24} {:>10}",
        "stage", "k8s conf", "k8s of new conns", "k8s of keep-alive reqs", "deviation"
    );
    for (legacy, k8s) in [(95u32, 5u32), (80, 20), (50, 50), (0, 100)] {
        if STOP.load(Ordering::Relaxed) {
            println!("interrupted: cleaning up");
            return Ok(());
        }
        t.control(&format!("set split web legacy={legacy} k8s={k8s}"))?;
        let vip = t.vip();
        let (conns, reqs) = t.in_client(move || {
            let mut conns = HashMap::new();
            for _ in 0..500 {
                if STOP.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(n) = get_once(vip) {
                    *conns.entry(n).or_insert(0) += 1;
                }
            }
            // Few long-lived clients: each connection sticks to one backend, so the request
            // share moves in steps of 1/4 — the connection-level effect the request mode fixes.
            let mut reqs = HashMap::new();
            for _ in 0..4 {
                if let Ok(mut c) = Client::connect(vip) {
                    for _ in 0..100 {
                        if let Ok(n) = c.get(false) {
                            *reqs.entry(n).or_insert(0) += 1;
                        }
                    }
                }
            }
            (conns, reqs)
        })?;
        let (c, r) = (k8s_pct(&conns), k8s_pct(&reqs));
        println!(
            "{:<8} {:>9}% {:>21.1}% {:>23.1}% {:>+9.1}pp",
            format!("{legacy}/{k8s}"),
            k8s,
            c,
            r,
            c - k8s as f64
        );
    }
    println!("\nconnection mode follows the split per connection; with 4 keep-alive clients the");
    println!("request share can only be 0/25/50/75/100 %. Request mode (per-request) comes next.");
    Ok(())
}
