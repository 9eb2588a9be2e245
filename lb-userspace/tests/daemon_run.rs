//! The whole daemon (`server::run`: owner loop, control socket, metrics endpoint, real TCP
//! health checks) in process, without root: the data plane is a `FakeKernel`, the host a
//! `NoHost`, the backends are listeners on 127.0.0.1.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

mod common;

use common::{Backend, free_port};
use lb_userspace::{
    config::Config,
    control::client::request,
    dataplane::{FakeKernel, Write},
    host::NoHost,
    server::{self, Signal},
};

fn config(dir: &Path, metrics: u16, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"[daemon]
interfaces = ["test0"]
control_socket = "{}"
metrics = "127.0.0.1:{metrics}"
pin_dir = "{}"
forward_filter = false
state_file = ""

[[service]]
name = "web"
vip = "10.99.0.10"
port = 80
snat = "10.20.0.1"

[service.health]
check = "tcp"
interval = "50ms"
timeout = "40ms"
rise = 1
fall = 1

[[service.pool]]
name = "legacy"
weight = 1
backends = [{}]
"#,
        dir.join("lb.sock").display(),
        dir.join("pins").display(),
        list.join(", ")
    )
}

/// Sends a control command from a blocking thread.
async fn control(socket: &Path, line: &str) -> String {
    let (socket, line) = (socket.to_path_buf(), line.to_string());
    tokio::task::spawn_blocking(move || request(&socket, &line).unwrap())
        .await
        .unwrap()
}

/// Polls `show backends web` until `pred` holds (10 s at most).
async fn wait_backends(socket: &Path, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = control(socket, "show backends web").await;
        if pred(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "never reached; last:\n{now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn health_of<'a>(table: &'a str, backend: &SocketAddr) -> Option<&'a str> {
    let b = backend.to_string();
    table
        .lines()
        .find(|l| l.contains(&b))
        .and_then(|l| l.split_whitespace().last())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_daemon_runs_in_process_on_a_fake_kernel() {
    let dir: PathBuf = std::env::temp_dir().join(format!("lb-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (Backend::start(), Backend::start());
    let (addr_a, addr_b) = (a.addr, b.addr);
    let metrics = free_port();
    let path = dir.join("lb.toml");
    std::fs::write(&path, config(&dir, metrics, &[addr_a, addr_b])).unwrap();
    let cfg = Config::load(&path).unwrap();
    let kernel = FakeKernel::default();
    let (signals, rx) = tokio::sync::mpsc::channel(4);
    let running = {
        let (kernel, path) = (kernel.clone(), path.clone());
        tokio::spawn(async move {
            let mut host = NoHost::default();
            server::run(
                cfg,
                path,
                Box::new(kernel),
                &mut host,
                Default::default(),
                rx,
                false,
            )
            .await
        })
    };
    let socket = dir.join("lb.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(kernel.state().attached, vec!["test0".to_string()]);

    // Both healthy; one stops answering: real checks take it out of the table.
    wait_backends(&socket, |t| {
        health_of(t, &addr_a) == Some("up") && health_of(t, &addr_b) == Some("up")
    })
    .await;
    drop(b);
    wait_backends(&socket, |t| health_of(t, &addr_b) == Some("down")).await;
    let b_id = *kernel
        .state()
        .backends
        .iter()
        .find(|(_, a)| **a == addr_b)
        .unwrap()
        .0;
    assert!(
        !kernel.state().table(0).unwrap().contains(&b_id),
        "a down backend has no bucket"
    );

    // The metrics endpoint answers from the same owner loop.
    let text = tokio::task::spawn_blocking(move || get(metrics, "/metrics"))
        .await
        .unwrap();
    assert!(text.contains("lb_backend_up{"), "{text}");
    assert!(
        text.contains(&format!(
            "lb_backend_up{{service=\"web\",pool=\"legacy\",backend=\"{addr_b}\"}} 0"
        )),
        "{text}"
    );

    // Back-to-back changes: the second waits for the first table's grace without holding
    // up the loop, and each reply means the kernel has the change.
    kernel.state().grace = Some(Duration::from_secs(1));
    let generation = || {
        kernel
            .state()
            .services
            .values()
            .next()
            .unwrap()
            .0
            .generation
    };
    let g0 = generation();
    let a_drain = format!("set state web/legacy/{addr_a} drain");
    let reply = control(&socket, &a_drain).await;
    assert!(!reply.starts_with("error"), "{reply}");
    assert_eq!(
        generation(),
        g0 + 1,
        "the reply came once the table was live"
    );
    // Within a second of that publish: this one must wait for its grace.
    let started = Instant::now();
    let a_ready = format!("set state web/legacy/{addr_a} ready");
    let reply = control(&socket, &a_ready).await;
    assert!(!reply.starts_with("error"), "{reply}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the reply waited for the table's grace: {:?}",
        started.elapsed()
    );
    assert_eq!(
        generation(),
        g0 + 2,
        "the reply came once the table was live"
    );
    kernel.state().grace = None;

    // A reload that drops the dead backend: its slot is cleared.
    std::fs::write(&path, config(&dir, metrics, &[addr_a])).unwrap();
    signals.send(Signal::Reload).await.unwrap();
    wait_backends(&socket, |t| !t.contains(&addr_b.to_string())).await;
    assert!(
        kernel.state().writes.contains(&Write::Backend(b_id, None)),
        "the removed backend's slot is cleared"
    );

    // Stop: run returns, the control socket is gone, the data plane was never detached.
    signals.send(Signal::Stop).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("run returns on Stop")
        .unwrap()
        .unwrap();
    assert!(!socket.exists());
    assert_eq!(kernel.state().attached.len(), 1);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}
