//! What the in-process tests share: backends that accept TCP (for tcp health checks) and
//! the whole daemon (`server::run`) on a fake kernel, started on a runtime of its own.

#![allow(dead_code)]

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_userspace::{
    config::Config,
    dataplane::FakeKernel,
    host::NoHost,
    server::{self, Signal},
};

/// A backend for TCP health checks: accepts (and drops) connections until dropped.
pub struct Backend {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    pub fn start() -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if l.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Backend {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `[daemon]` table of an lbd run in process whose control socket, pins and state file
/// live in `dir`, with its metrics on a free port.
pub fn daemon_toml(dir: &Path) -> String {
    format!(
        "[daemon]\ninterfaces = [\"test0\"]\ncontrol_socket = \"{}\"\nmetrics = \"127.0.0.1:{}\"\npin_dir = \"{}\"\nstate_file = \"{}\"\n",
        dir.join("lb.sock").display(),
        free_port(),
        dir.join("pins").display(),
        dir.join("state.json").display(),
    )
}

/// The two pools over four backends, named legacy-1, legacy-2 (pool `legacy`, weight
/// `legacy`) and k8s-1, k8s-2 (pool `k8s`, weight `k8s`).
pub fn pools_toml(backends: &[Backend], legacy: u32, k8s: u32) -> String {
    let names = ["legacy-1", "legacy-2", "k8s-1", "k8s-2"];
    let pool = |name: &str, weight: u32, range: std::ops::Range<usize>| {
        let members: Vec<String> = range
            .map(|i| {
                format!(
                    "{{ addr = \"{}\", name = \"{}\" }}",
                    backends[i].addr, names[i]
                )
            })
            .collect();
        format!(
            "[[service.pool]]\nname = \"{name}\"\nweight = {weight}\nbackends = [{}]\n",
            members.join(", ")
        )
    };
    format!(
        "{}\n{}",
        pool("legacy", legacy, 0..2),
        pool("k8s", k8s, 2..4)
    )
}

/// A private directory under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "lb-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// lbd's loop running on a runtime of its own over a fake kernel; stopped on drop.
pub struct Lbd {
    pub kernel: FakeKernel,
    pub socket: PathBuf,
    signals: tokio::sync::mpsc::Sender<Signal>,
    task: Option<tokio::task::JoinHandle<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Lbd {
    /// Starts it on the config file at `path` and waits for its control socket.
    pub fn start(path: &Path) -> Lbd {
        Lbd::start_on(path, FakeKernel::default(), false)
    }

    /// Starts it over `kernel` (a clone of a stopped lbd's is what a restart finds pinned),
    /// ignoring the state file if `fresh`.
    pub fn start_on(path: &Path, kernel: FakeKernel, fresh: bool) -> Lbd {
        let cfg = Config::load(path).unwrap();
        let socket = cfg.daemon.control_socket.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (signals, rx) = tokio::sync::mpsc::channel(4);
        let (k, p) = (kernel.clone(), path.to_path_buf());
        // A stale socket from an lbd stopped a moment ago must not pass for the new one's.
        let _ = std::fs::remove_file(&socket);
        let task = rt.spawn(async move {
            let mut host = NoHost::default();
            if let Err(e) = server::run(
                cfg,
                p,
                Box::new(k),
                &mut host,
                Default::default(),
                rx,
                fresh,
            )
            .await
            {
                panic!("lbd stopped: {e:#}");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Lbd {
            kernel,
            socket,
            signals,
            task: Some(task),
            rt: Some(rt),
        }
    }

    /// Sends SIGHUP's equivalent: reload the config file. Returns once the loop has taken it
    /// (the next command is answered after the reload).
    pub fn reload(&self) {
        self.signals.blocking_send(Signal::Reload).unwrap();
        // The owner loop handles one thing at a time: a command answered now comes after it.
        self.control("help").unwrap();
    }

    /// One command; its reply (`Err` for an `error: ` reply).
    pub fn control(&self, line: &str) -> Result<String, String> {
        let reply = lb_userspace::control::client::request(&self.socket, line)
            .map_err(|e| e.to_string())?;
        match reply.strip_prefix("error: ") {
            Some(e) => Err(format!("{line}: {}", e.trim())),
            None => Ok(reply),
        }
    }
}

impl Drop for Lbd {
    fn drop(&mut self) {
        let _ = self.signals.try_send(Signal::Stop);
        if let (Some(rt), Some(task)) = (&self.rt, self.task.take()) {
            // A clean stop, as SIGTERM gives: the loop returns (and removes its socket).
            let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}
