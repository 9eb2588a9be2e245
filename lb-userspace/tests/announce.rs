//! Announcing VIPs to BIRD, through the whole daemon in process against a stand-in for
//! BIRD's control socket: announced once lbd can serve, withdrawn when no backend can, on
//! `set host drain` (which survives a restart) and when lbd stops.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{Backend, Lbd, TempDir, daemon_toml, pools_toml};

/// BIRD's control socket as lbd sees it: a greeting, then `0003 Reconfigured` for each
/// `configure`. Sends the routes file's contents at each `configure`.
fn fake_bird(sock: PathBuf, routes: PathBuf) -> mpsc::Receiver<String> {
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let _ = c.write_all(b"0001 BIRD 2.0.12 ready.\n");
            let mut line = String::new();
            let mut r = BufReader::new(c.try_clone().unwrap());
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                assert_eq!(line.trim(), "configure");
                let file = std::fs::read_to_string(&routes).unwrap_or_default();
                let _ = c.write_all(b"0003 Reconfigured\n");
                if tx.send(file).is_err() {
                    return;
                }
                line.clear();
            }
        }
    });
    rx
}

/// Waits for a `configure` whose file satisfies `pred`.
fn until(seen: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match seen.recv_timeout(left) {
            Ok(f) if pred(&f) => return,
            Ok(_) => continue,
            Err(_) => panic!("BIRD was never told: {what}"),
        }
    }
}

/// Polls `show host` (at most 10 s) until `pred` holds.
fn show_host_until(t: &Lbd, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = t.control("show host").unwrap();
        if pred(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "show host stayed:\n{s}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const ROUTE: &str = "route 10.99.0.10/32 blackhole;";

fn config(dir: &Path, backends: &[Backend]) -> String {
    format!(
        "{}[daemon.announce]\nbird_socket = \"{}\"\nroutes_file = \"{}\"\n\n[[service]]\nname = \"web\"\nvip = \"10.99.0.10\"\nport = 80\nsnat = \"10.20.0.1\"\n\n[service.health]\ncheck = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"50ms\"\n\n{}",
        daemon_toml(dir),
        dir.join("bird.ctl").display(),
        dir.join("lbd-vips.conf").display(),
        pools_toml(backends, 90, 10)
    )
}

#[test]
fn vips_are_announced_while_the_host_can_serve_and_withdrawn_on_drain_no_backend_and_stop() {
    let dir = TempDir::new("announce");
    let backends: Vec<Backend> = (0..4).map(|_| Backend::start()).collect();
    let path = dir.0.join("lb.toml");
    std::fs::write(&path, config(&dir.0, &backends)).unwrap();
    let seen = fake_bird(dir.0.join("bird.ctl"), dir.0.join("lbd-vips.conf"));

    let t = Lbd::start(&path);
    until(&seen, "the VIP, once every backend was checked", |f| {
        f.contains(ROUTE)
    });
    // BIRD's answer reaches `show host` a moment after BIRD read the file.
    show_host_until(&t, |s| {
        s.contains("host ready") && s.contains("10.99.0.10 yes yes")
    });

    t.control("set host drain").unwrap();
    until(&seen, "the withdrawal on drain", |f| !f.contains(ROUTE));
    show_host_until(&t, |s| {
        s.contains("host drain") && s.contains("10.99.0.10 no no")
    });

    // A drained host stays drained across a restart (and says so before announcing).
    let kernel = t.kernel.clone();
    drop(t);
    let t = Lbd::start_on(&path, kernel, false);
    assert!(t.control("show host").unwrap().starts_with("host drain"));
    t.control("set host ready").unwrap();
    until(&seen, "the VIP again after `set host ready`", |f| {
        f.contains(ROUTE)
    });

    // No backend can take a new connection: nothing to receive traffic for.
    for b in [
        "legacy/legacy-1",
        "legacy/legacy-2",
        "k8s/k8s-1",
        "k8s/k8s-2",
    ] {
        t.control(&format!("set state web/{b} maint")).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    eprintln!(
        "{}\n{}",
        t.control("show host").unwrap(),
        t.control("show backends web").unwrap()
    );
    until(&seen, "the withdrawal when no backend serves", |f| {
        !f.contains(ROUTE)
    });
    t.control("set state web/k8s/k8s-1 ready").unwrap();
    until(&seen, "the VIP once a backend serves again", |f| {
        f.contains(ROUTE)
    });
    assert!(t.control("set host sideways").is_err());

    // Stopping withdraws.
    drop(t);
    until(&seen, "the withdrawal when lbd stops", |f| {
        !f.contains(ROUTE)
    });
}
