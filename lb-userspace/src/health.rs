//! Health checks: one tokio task per checked backend (`tcp` connect or `http` GET, 2xx),
//! with interval, timeout, rise and fall. Tasks never wait on each other; each starts at a
//! random offset and jitters its interval so that checks of many backends do not align.
//! A task only reports *transitions*; the daemon applies them to the state and the table.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rand::Rng as _;
use tokio::{net::TcpStream, sync::mpsc, task::AbortHandle};

use crate::{
    config::{CheckKind, Health},
    state::{AdminState, State},
};

/// Names a backend: (service, pool, backend).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service: String,
    pub pool: String,
    pub backend: String,
}

impl std::fmt::Display for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.service, self.pool, self.backend)
    }
}

/// What a check task reports to the daemon.
#[derive(Debug)]
pub enum Event {
    /// The backend crossed `rise` successes or `fall` failures.
    Transition {
        key: BackendKey,
        /// Which task sent it: a report from a task that has since been replaced is stale.
        task: u64,
        healthy: bool,
        /// The last check's outcome, e.g. `connect: Connection refused` or `HTTP 503`.
        reason: String,
    },
    /// One check finished (for the check-duration histogram).
    Checked {
        key: BackendKey,
        took: Duration,
        ok: bool,
    },
}

/// What a task checks; a change of any of it restarts the task.
#[derive(Clone, Debug, PartialEq)]
struct Spec {
    addr: SocketAddr,
    kind: CheckKind,
    path: String,
    interval: Duration,
    timeout: Duration,
    rise: u32,
    fall: u32,
    send: String,
    expect_reply: bool,
}

impl Spec {
    fn new(addr: SocketAddr, h: &Health) -> Spec {
        Spec {
            addr: h.port.map_or(addr, |p| SocketAddr::new(addr.ip(), p)),
            kind: h.check,
            path: h.path.clone(),
            interval: h.interval,
            timeout: h.timeout,
            rise: h.rise,
            fall: h.fall,
            send: h.send.clone(),
            expect_reply: h.expect_reply,
        }
    }
}

/// Why a check failed (its text goes into the transition's log line).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("http: {0}")]
    Http(#[source] hyper::Error),
    #[error("http request: {0}")]
    Request(#[source] hyper::http::Error),
    #[error("HTTP {0}")]
    Status(hyper::StatusCode),
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    #[error("udp: {0}")]
    Udp(#[source] std::io::Error),
    #[error("udp: no answer within {0:?}")]
    NoAnswer(Duration),
}

/// A check's outcome.
pub type ProbeResult = Result<(), ProbeError>;

/// A stand-in for the network check, for tests: the backend's address → the outcome (it
/// may take its time: the check's timeout applies as to a real one).
pub type FakeProbe = Arc<
    dyn Fn(SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = ProbeResult> + Send>>
        + Send
        + Sync,
>;

/// The running check tasks. Dropping it stops them all.
pub struct Checker {
    tasks: HashMap<BackendKey, (Spec, u64, AbortHandle)>,
    events: mpsc::Sender<Event>,
    next_task: u64,
    /// `None`: real checks over the network.
    fake: Option<FakeProbe>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, _, h) in self.tasks.values() {
            h.abort();
        }
    }
}

impl Checker {
    /// No tasks yet; events go to `events`.
    pub fn new(events: mpsc::Sender<Event>) -> Checker {
        Checker {
            tasks: HashMap::new(),
            events,
            next_task: 1,
            fake: None,
        }
    }

    /// Like [`Checker::new`], with every check answered by `probe` instead of the network.
    pub fn with_fake_probe(events: mpsc::Sender<Event>, probe: FakeProbe) -> Checker {
        Checker {
            tasks: HashMap::new(),
            events,
            next_task: 1,
            fake: Some(probe),
        }
    }

    /// Makes the running tasks match the state: one per backend not in `maint`. New backends
    /// get a task, removed ones and those in `maint` lose theirs, changed ones are restarted
    /// (from the health they have now).
    pub fn reconcile(&mut self, state: &State) {
        let mut wanted: HashMap<BackendKey, (Spec, bool)> = HashMap::new();
        for (s, p, b) in state.backends() {
            if b.state == AdminState::Maint {
                continue;
            }
            let key = BackendKey {
                service: s.config.name.clone(),
                pool: p.name.clone(),
                backend: b.name.clone(),
            };
            wanted.insert(key, (Spec::new(b.addr, &s.config.health), b.healthy));
        }
        self.tasks.retain(|key, (spec, _, handle)| {
            let keep = wanted.get(key).is_some_and(|(w, _)| w == spec);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (key, (spec, healthy)) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let task = self.next_task;
            self.next_task += 1;
            let handle = tokio::spawn(run(
                key.clone(),
                task,
                spec.clone(),
                healthy,
                self.events.clone(),
                self.fake.clone(),
            ))
            .abort_handle();
            self.tasks.insert(key, (spec, task, handle));
        }
    }

    /// Restarts `key`'s checks from the health the state gives it now (after passive health
    /// took it down: `rise` passes bring it back).
    pub fn restart(&mut self, key: &BackendKey, state: &State) {
        if let Some((_, _, h)) = self.tasks.remove(key) {
            h.abort();
        }
        self.reconcile(state);
    }

    /// Whether `task` is the current task for `key` (else its report is stale).
    pub fn is_current(&self, key: &BackendKey, task: u64) -> bool {
        self.tasks.get(key).is_some_and(|(_, t, _)| *t == task)
    }

    /// The backends being checked.
    pub fn checked(&self) -> impl Iterator<Item = &BackendKey> {
        self.tasks.keys()
    }

    /// How many backends are being checked.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no backend is being checked.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

/// Counts consecutive results against rise and fall. Pure, so its rules are unit-tested.
#[derive(Clone, Debug)]
pub struct Verdict {
    healthy: bool,
    streak: u32,
    rise: u32,
    fall: u32,
}

impl Verdict {
    /// Starts from `healthy`, needing `rise` successes to come up and `fall` failures to go down.
    pub fn new(healthy: bool, rise: u32, fall: u32) -> Verdict {
        Verdict {
            healthy,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Records one result; returns the new health when it changes.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { self.rise } else { self.fall };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// Spreads a period by ±10 %, so that checks started together drift apart.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}

async fn run(
    key: BackendKey,
    task: u64,
    spec: Spec,
    healthy: bool,
    events: mpsc::Sender<Event>,
    fake: Option<FakeProbe>,
) {
    let mut verdict = Verdict::new(healthy, spec.rise, spec.fall);
    // A random first offset: a reload must not fire every check at the same instant.
    let first = spec.interval.mul_f64(rand::rng().random_range(0.0..1.0));
    tokio::time::sleep(first).await;
    loop {
        let started = Instant::now();
        let check = async {
            match &fake {
                Some(f) => f(spec.addr).await,
                None => probe(&spec).await,
            }
        };
        let result = match tokio::time::timeout(spec.timeout, check).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(spec.timeout)),
        };
        let took = started.elapsed();
        let ok = result.is_ok();
        tracing::trace!(backend = %key, ok, took_us = took.as_micros() as u64, "health check");
        let _ = events.try_send(Event::Checked {
            key: key.clone(),
            took,
            ok,
        });
        if let Some(now) = verdict.observe(ok) {
            let reason = match result {
                Ok(()) => format!("{} consecutive checks passed", spec.rise),
                Err(e) => format!("{} consecutive checks failed, last: {e}", spec.fall),
            };
            if events
                .send(Event::Transition {
                    key: key.clone(),
                    task,
                    healthy: now,
                    reason,
                })
                .await
                .is_err()
            {
                return;
            }
        }
        tokio::time::sleep(jittered(spec.interval).saturating_sub(took)).await;
    }
}

/// One check.
async fn probe(spec: &Spec) -> ProbeResult {
    if spec.kind == CheckKind::Udp {
        return udp_probe(spec).await;
    }
    let stream = TcpStream::connect(spec.addr)
        .await
        .map_err(ProbeError::Connect)?;
    match spec.kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Http => http_get(stream, spec).await,
        CheckKind::Udp => Ok(()),
    }
}

/// A UDP check: one datagram from a connected socket, so that the ICMP "port unreachable" a
/// host sends back when nothing listens arrives as an error on it. It waits half the check's
/// timeout (the ICMP error takes a round trip; the other half is the check's own margin):
/// an answer or silence is healthy, an ICMP error is not — silence too with `expect_reply`.
async fn udp_probe(spec: &Spec) -> ProbeResult {
    let local: SocketAddr = if spec.addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(local)
        .await
        .map_err(ProbeError::Udp)?;
    sock.connect(spec.addr).await.map_err(ProbeError::Udp)?;
    sock.send(spec.send.as_bytes())
        .await
        .map_err(ProbeError::Udp)?;
    let wait = spec.timeout / 2;
    let mut buf = [0u8; 512];
    match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ProbeError::Udp(e)),
        Err(_) if spec.expect_reply => Err(ProbeError::NoAnswer(wait)),
        Err(_) => Ok(()),
    }
}

async fn http_get(stream: TcpStream, spec: &Spec) -> ProbeResult {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ProbeError::Http)?;
    // The connection task ends when `sender` is dropped below (or the peer closes).
    tokio::spawn(conn);
    let req = hyper::Request::get(spec.path.as_str())
        .header(hyper::header::HOST, spec.addr.to_string())
        .header(hyper::header::USER_AGENT, "lbd-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(ProbeError::Request)?;
    let resp = sender.send_request(req).await.map_err(ProbeError::Http)?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status(resp.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_on_another_port_probes_that_port_of_the_backend() {
        let backend: SocketAddr = "10.20.0.11:53".parse().unwrap();
        let h = Health {
            port: Some(8081),
            ..Health::default()
        };
        assert_eq!(
            Spec::new(backend, &h).addr,
            "10.20.0.11:8081".parse().unwrap()
        );
        assert_eq!(Spec::new(backend, &Health::default()).addr, backend);
    }

    fn udp_spec(addr: SocketAddr, send: &str, expect_reply: bool) -> Spec {
        Spec {
            addr,
            kind: CheckKind::Udp,
            path: "/".into(),
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(200),
            rise: 1,
            fall: 1,
            send: send.into(),
            expect_reply,
        }
    }

    #[tokio::test]
    async fn a_udp_check_fails_on_an_unreachable_port_and_on_silence_when_an_answer_is_expected() {
        // An echo server: answers every datagram.
        let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        // A silent one: reads, never answers (syslog).
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent_addr = silent.local_addr().unwrap();
        // Nothing listens here: the kernel answers with ICMP port unreachable.
        let closed_addr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        assert!(udp_probe(&udp_spec(echo_addr, "ping", true)).await.is_ok());
        assert!(
            udp_probe(&udp_spec(silent_addr, "log", false))
                .await
                .is_ok()
        );
        assert!(matches!(
            udp_probe(&udp_spec(silent_addr, "query", true)).await,
            Err(ProbeError::NoAnswer(_))
        ));
        let e = udp_probe(&udp_spec(closed_addr, "", false))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        drop(silent);
    }

    #[test]
    fn fall_failures_in_a_row_take_a_backend_down_and_rise_bring_it_back() {
        let mut v = Verdict::new(true, 2, 3);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), None);
        // A success in between restarts the count.
        assert_eq!(v.observe(true), None);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), Some(false));
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(true), None);
        assert_eq!(v.observe(true), Some(true));
        assert_eq!(v.observe(true), None);
    }

    async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    fn spec(addr: SocketAddr, kind: CheckKind) -> Spec {
        Spec {
            addr,
            kind,
            path: "/healthz".into(),
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
            rise: 1,
            fall: 1,
            send: String::new(),
            expect_reply: false,
        }
    }

    /// Serves one HTTP request with `status`, returning the request line it got.
    async fn answer_once(l: tokio::net::TcpListener, status: &'static str) -> String {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (s, _) = l.accept().await.unwrap();
        let mut r = BufReader::new(s);
        let mut first = String::new();
        r.read_line(&mut first).await.unwrap();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).await.unwrap() == 0 || l == "\r\n" {
                break;
            }
        }
        let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        r.get_mut().write_all(resp.as_bytes()).await.unwrap();
        first
    }

    #[tokio::test]
    async fn http_check_wants_a_2xx_on_the_configured_path() {
        let (l, a) = listener().await;
        let server = tokio::spawn(answer_once(l, "204 No Content"));
        assert!(probe(&spec(a, CheckKind::Http)).await.is_ok());
        assert_eq!(server.await.unwrap(), "GET /healthz HTTP/1.1\r\n");

        let (l, a) = listener().await;
        tokio::spawn(answer_once(l, "503 Service Unavailable"));
        let e = probe(&spec(a, CheckKind::Http)).await.unwrap_err();
        assert!(
            matches!(e, ProbeError::Status(s) if s.as_u16() == 503),
            "{e}"
        );
    }

    #[tokio::test]
    async fn tcp_check_fails_on_a_closed_port() {
        let (l, a) = listener().await;
        assert!(probe(&spec(a, CheckKind::Tcp)).await.is_ok());
        drop(l);
        let e = probe(&spec(a, CheckKind::Tcp)).await.unwrap_err();
        assert!(matches!(e, ProbeError::Connect(_)), "{e}");
        assert!(e.to_string().starts_with("connect:"), "{e}");
    }

    #[tokio::test]
    async fn a_task_reports_the_transition_with_its_reason() {
        let (l, a) = listener().await;
        drop(l);
        let (tx, mut rx) = mpsc::channel(16);
        let key = BackendKey {
            service: "web".into(),
            pool: "legacy".into(),
            backend: "b".into(),
        };
        let h = tokio::spawn(run(key.clone(), 7, spec(a, CheckKind::Tcp), true, tx, None));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let ev = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("a transition within 5 s")
                .unwrap();
            if let Event::Transition {
                key: k,
                task,
                healthy,
                reason,
            } = ev
            {
                assert_eq!((k, task, healthy), (key, 7, false));
                assert!(reason.contains("connect:"), "{reason}");
                break;
            }
        }
        h.abort();
    }
}
