//! Every socket lbd accepts on (control, metrics, request-mode VIPs) goes through one accept
//! loop: a connection cap per listener (past it a connection is closed at once and counted),
//! accept errors that never end the loop (out of descriptors: back off and try again, marked
//! on [`Listeners`] so that `/ready` says so), and a descriptor budget that keeps room for
//! health checks and the control socket whatever clients do.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Where connections come from: a TCP or Unix listener (or a test's fake).
pub trait Acceptor {
    /// An accepted connection.
    type Conn;
    /// The next connection (cancel-safe, like tokio's `accept`).
    fn accept_one(&mut self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Acceptor for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);
    fn accept_one(&mut self) -> impl Future<Output = io::Result<Self::Conn>> + Send {
        self.accept()
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept_one(&mut self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// What one listener has seen, for `/metrics` and `/ready`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections open now.
    pub open: u64,
    /// Connections closed at once because the listener was at its cap.
    pub refused: u64,
    /// Accept calls that failed for want of resources (descriptors, memory).
    pub accept_errors: u64,
    /// The last accept failed for want of resources and the loop is backing off.
    pub failing: bool,
}

/// The state of every listener, shared by the accept loops (on any thread) and the admin
/// endpoint.
#[derive(Clone, Default)]
pub struct Listeners(Arc<Mutex<BTreeMap<String, ListenerStats>>>);

impl Listeners {
    fn update(&self, name: &str, f: impl FnOnce(&mut ListenerStats)) {
        if let Ok(mut m) = self.0.lock() {
            // Called twice per connection: the name is allocated only the first time.
            match m.get_mut(name) {
                Some(s) => f(s),
                None => f(m.entry(name.to_string()).or_default()),
            }
        }
    }

    /// Every listener's figures, by name.
    pub fn snapshot(&self) -> BTreeMap<String, ListenerStats> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The listeners that cannot accept now.
    pub fn failing(&self) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|(_, s)| s.failing)
            .map(|(n, _)| n)
            .collect()
    }
}

/// A listener's cap, shared by every loop accepting for it (a request-mode service's workers).
#[derive(Clone)]
pub struct Cap {
    name: Arc<str>,
    max: usize,
    slots: Arc<Semaphore>,
    listeners: Listeners,
}

impl Cap {
    /// `max` connections at once on the listener called `name`.
    pub fn new(name: &str, max: usize, listeners: &Listeners) -> Cap {
        listeners.update(name, |_| {});
        Cap {
            name: name.into(),
            max,
            slots: Arc::new(Semaphore::new(max)),
            listeners: listeners.clone(),
        }
    }
}

/// Held for as long as a connection is open: frees its slot and counts it closed.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    name: Arc<str>,
    listeners: Listeners,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.listeners
            .update(&self.name, |s| s.open = s.open.saturating_sub(1));
    }
}

/// Accept errors that mean "out of a resource": the loop backs off and retries.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// First and longest pause after a resource error.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts on `acceptor` forever, handing each connection under the cap to `handle` with
/// its [`Slot`] (drop it when the connection ends). Never returns an error: a client's
/// behaviour must not end a listener.
pub async fn accept_loop<A: Acceptor>(
    mut acceptor: A,
    cap: Cap,
    mut handle: impl FnMut(A::Conn, Slot),
) -> ! {
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    let mut logged_refusal: Option<tokio::time::Instant> = None;
    loop {
        match acceptor.accept_one().await {
            Ok(conn) => {
                if failing {
                    failing = false;
                    backoff = BACKOFF_MIN;
                    cap.listeners.update(&cap.name, |s| s.failing = false);
                    tracing::info!(listener = &*cap.name, "accepting again");
                }
                match cap.slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        cap.listeners.update(&cap.name, |s| s.open += 1);
                        handle(
                            conn,
                            Slot {
                                _permit: permit,
                                name: cap.name.clone(),
                                listeners: cap.listeners.clone(),
                            },
                        );
                    }
                    Err(_) => {
                        // Closed at once: a client at the cap gets a quick refusal rather
                        // than a slot someone else needs.
                        drop(conn);
                        cap.listeners.update(&cap.name, |s| s.refused += 1);
                        let now = tokio::time::Instant::now();
                        if logged_refusal.is_none_or(|t| now - t >= Duration::from_secs(10)) {
                            logged_refusal = Some(now);
                            tracing::warn!(
                                listener = &*cap.name,
                                limit = cap.max,
                                "at its connection limit: closing new connections (see [daemon.limits])"
                            );
                        }
                    }
                }
            }
            Err(e) if out_of_resources(&e) => {
                cap.listeners.update(&cap.name, |s| {
                    s.accept_errors += 1;
                    s.failing = true;
                });
                if !failing {
                    failing = true;
                    tracing::error!(listener = &*cap.name, error = %e, "cannot accept: backing off and retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            // The peer went away before we took it, and the like: nothing to do.
            Err(e) => tracing::debug!(listener = &*cap.name, error = %e, "accept failed"),
        }
    }
}

/// Raises the soft descriptor limit to the hard one and returns it: lbd's connection caps
/// are set within what it then has.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        r.rlim_cur as u64
    }
}

/// The connection caps lbd actually uses: the configured ones, the request-mode one scaled
/// down when all of them together (a proxied connection costs two descriptors, one each
/// side) would not leave `reserve` descriptors out of `nofile` for health checks, maps,
/// logs and the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub control: usize,
    pub metrics: usize,
    /// Per request-mode service.
    pub request: usize,
}

/// Fits the configured caps (`control`, `metrics`, `request` per each of `request_services`)
/// into `nofile` descriptors less `reserve`.
pub fn budget(
    nofile: u64,
    reserve: u64,
    (control, metrics, request): (usize, usize, usize),
    request_services: usize,
) -> Budget {
    let avail = nofile.saturating_sub(reserve) as usize;
    let fixed = control + metrics;
    let mut b = Budget {
        control,
        metrics,
        request,
    };
    if request_services > 0 {
        let per_service = avail.saturating_sub(fixed) / (2 * request_services);
        b.request = request.min(per_service.max(1));
    }
    if fixed > avail {
        // Even control and metrics do not fit: scale both down to what does (one each at least).
        b.control = (control * avail / fixed.max(1)).max(1);
        b.metrics = (metrics * avail / fixed.max(1)).max(1);
    }
    b
}

/// Listening TCP sockets passed in by a supervisor (systemd socket activation:
/// `LISTEN_PID` = this process, `LISTEN_FDS` = how many, from descriptor 3 on), by the
/// address each is bound to. The variables are removed so that nothing lbd starts inherits
/// them. A restart then refuses nothing: the supervisor keeps the sockets open, and
/// connections wait in their queues while no lbd runs.
pub fn inherited_listeners()
-> std::collections::HashMap<std::net::SocketAddr, std::net::TcpListener> {
    use std::os::fd::FromRawFd as _;
    let mut out = std::collections::HashMap::new();
    let pid = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok());
    // SAFETY: removing variables before any other thread reads the environment (lbd calls
    // this first thing in `run`, before its runtime's threads look at it).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (Some(pid), Some(n)) = (pid, n) else {
        return out;
    };
    if pid != std::process::id() {
        return out;
    }
    for fd in 3..3 + n.clamp(0, 64) {
        // SAFETY: the supervisor passed these descriptors to us and nothing else owns them.
        let sock = unsafe { socket2::Socket::from_raw_fd(fd) };
        let _ = sock.set_cloexec(true);
        let listening = sock.is_listener().unwrap_or(false);
        match sock.local_addr().ok().and_then(|a| a.as_socket()) {
            Some(addr) if listening => {
                tracing::info!(%addr, fd, "using a listening socket passed in (socket activation)");
                out.insert(addr, sock.into());
            }
            _ => {
                tracing::warn!(
                    fd,
                    "ignoring a passed-in descriptor that is not a listening TCP socket"
                );
                // Left open, not closed: what sits there is not ours to close (it may be a
                // descriptor of lbd's own, if the supervisor passed fewer than it said).
                let _ = std::os::fd::IntoRawFd::into_raw_fd(sock);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Hands out a scripted series of accept results, then waits forever.
    struct Script(VecDeque<io::Result<u32>>);

    impl Acceptor for Script {
        type Conn = u32;
        async fn accept_one(&mut self) -> io::Result<u32> {
            match self.0.pop_front() {
                Some(r) => r,
                None => std::future::pending().await,
            }
        }
    }

    fn emfile() -> io::Result<u32> {
        Err(io::Error::from_raw_os_error(libc::EMFILE))
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_backs_off_marks_the_listener_and_recovers() {
        let listeners = Listeners::default();
        let cap = Cap::new("web", 10, &listeners);
        let script = Script(
            [
                emfile(),
                emfile(),
                emfile(),
                Err(io::Error::from_raw_os_error(libc::ECONNABORTED)),
                Ok(7),
            ]
            .into(),
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(script, cap, move |c, slot| {
            let _ = tx.send((c, slot));
        }));
        // After the first error, before the backoff ends: failing.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(listeners.failing(), vec!["web".to_string()]);
        // 10 + 20 + 40 ms of backoff later the connection is taken and the mark cleared.
        let (c, _slot) = rx.recv().await.unwrap();
        assert_eq!(c, 7);
        let s = &listeners.snapshot()["web"];
        assert_eq!((s.failing, s.accept_errors, s.open), (false, 3, 1));
        assert!(!task.is_finished(), "the loop goes on");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_cap_connections_are_closed_and_counted_until_a_slot_frees() {
        let listeners = Listeners::default();
        let cap = Cap::new("control", 2, &listeners);
        let script = Script((1..=5).map(Ok).collect());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(script, cap, move |c, slot| {
            let _ = tx.send((c, slot));
        }));
        let first = rx.recv().await.unwrap();
        let second = rx.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let s = listeners.snapshot()["control"].clone();
        assert_eq!((first.0, second.0), (1, 2));
        assert_eq!((s.open, s.refused), (2, 3), "3, 4 and 5 were refused");
        drop(first);
        assert_eq!(listeners.snapshot()["control"].open, 1);
        task.abort();
    }

    #[test]
    fn caps_are_fitted_into_the_descriptors_left_after_the_reserve() {
        // Plenty: as configured.
        assert_eq!(
            budget(1 << 20, 256, (32, 64, 4096), 2),
            Budget {
                control: 32,
                metrics: 64,
                request: 4096
            }
        );
        // prlimit --nofile=1024: 1024 - 256 - 96 = 672 left, 2 descriptors a connection.
        assert_eq!(budget(1024, 256, (32, 64, 4096), 1).request, 336);
        assert_eq!(budget(1024, 256, (32, 64, 4096), 2).request, 168);
        // Nothing fits: one each, never zero.
        let b = budget(100, 256, (32, 64, 4096), 1);
        assert_eq!((b.control, b.metrics, b.request), (1, 1, 1));
    }
}
