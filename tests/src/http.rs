//! A tiny HTTP/1.1 backend and client, run as threads inside network namespaces.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// Faults a test injects into a backend's answers at run time. Health checks (`/healthz`)
/// are always answered at once, so the backend stays healthy while it misbehaves.
#[derive(Debug, Default)]
pub struct Faults {
    /// Wait this long before answering a request.
    pub delay_ms: std::sync::atomic::AtomicU64,
    /// Read the request, then reset the connection (RST) instead of answering.
    pub reset: AtomicBool,
    /// Answer 1 request in N with `500 Internal Server Error` (0: never).
    pub error_every: std::sync::atomic::AtomicU64,
    /// Requests answered so far (health checks aside).
    pub served: std::sync::atomic::AtomicU64,
}

/// A backend that answers every request with its name; stops (and closes its connections)
/// when dropped.
pub struct Backend {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    /// What the test makes it do wrong.
    pub faults: Arc<Faults>,
}

impl Backend {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> Result<Backend> {
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns_name = ns.name.clone();
        let name = name.to_string();
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let setup = (|| -> Result<TcpListener> {
                Netns {
                    name: ns_name.clone(),
                }
                .enter_no_drop()?;
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let listener = match setup {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => {
                        let (name, s, f) = (name.clone(), s.clone(), f.clone());
                        std::thread::spawn(move || serve(c, &name, &s, &f));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        ready_rx.recv().context("backend thread")??;
        Ok(Backend {
            stop,
            handle: Some(handle),
            faults,
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(c: TcpStream, name: &str, stop: &AtomicBool, faults: &Faults) {
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = match c.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(c);
    loop {
        let mut close = false;
        let mut got = false;
        let mut xff_wanted = false;
        let mut health = false;
        let mut xff = String::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if !got && line.starts_with("GET /xff ") {
                        xff_wanted = true;
                    }
                    if !got && line.starts_with("GET /healthz ") {
                        health = true;
                    }
                    got = true;
                    let lower = line.to_ascii_lowercase();
                    if lower.starts_with("connection: close") {
                        close = true;
                    }
                    if let Some(v) = lower.strip_prefix("x-forwarded-for:") {
                        xff = v.trim().to_string();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                Err(_) if stop.load(Ordering::Relaxed) => return,
                Err(_) if !got => continue,
                Err(_) => return,
            }
        }
        let mut status = "200 OK";
        if !health {
            if faults.reset.load(Ordering::Relaxed) {
                // SO_LINGER 0: close() sends a RST instead of a FIN.
                let _ = socket2::SockRef::from(&w).set_linger(Some(Duration::ZERO));
                return;
            }
            let delay = faults.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            let every = faults.error_every.load(Ordering::Relaxed);
            let n = faults.served.fetch_add(1, Ordering::Relaxed) + 1;
            if every > 0 && n.is_multiple_of(every) {
                status = "500 Internal Server Error";
            }
        }
        // `/xff` answers with the X-Forwarded-For it got (request-mode tests); anything
        // else with the backend's name.
        let body = if xff_wanted { xff.as_str() } else { name };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if w.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// A keep-alive client connection.
pub struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    /// Connects from the calling thread's namespace.
    pub fn connect(addr: SocketAddr) -> Result<Client> {
        let c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("connect {addr}"))?;
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(Client {
            w: c.try_clone()?,
            r: BufReader::new(c),
        })
    }

    /// Connects from a chosen local address and port (for `explain`).
    pub fn connect_from(local: SocketAddr, addr: SocketAddr) -> Result<Client> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.bind(&local.into())?;
        s.connect_timeout(&addr.into(), Duration::from_secs(3))
            .with_context(|| format!("connect {local} -> {addr}"))?;
        let c: TcpStream = s.into();
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(Client {
            w: c.try_clone()?,
            r: BufReader::new(c),
        })
    }

    /// How long a request may wait for its answer (3 s from `connect`).
    pub fn set_timeout(&self, d: Duration) -> Result<()> {
        self.w.set_read_timeout(Some(d))?;
        Ok(())
    }

    /// The connection's local address (its client port is what `explain` takes).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.w.local_addr()?)
    }

    /// One request; returns the body (the backend's name).
    pub fn get(&mut self, close: bool) -> Result<String> {
        self.request("/", &[], close)
    }

    /// One request for `path` with extra header lines (`"x-canary: always"`); returns the body.
    pub fn request(&mut self, path: &str, headers: &[&str], close: bool) -> Result<String> {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: lb\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if close {
            req.push_str("Connection: close\r\n");
        }
        req.push_str("\r\n");
        self.w.write_all(req.as_bytes())?;
        let mut status = String::new();
        self.r.read_line(&mut status)?;
        if !status.starts_with("HTTP/1.1 200") {
            bail!("bad status line {status:?}");
        }
        let mut len = 0usize;
        loop {
            let mut l = String::new();
            if self.r.read_line(&mut l)? == 0 {
                bail!("connection closed in headers");
            }
            if l == "\r\n" {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
        }
        let mut body = vec![0; len];
        self.r.read_exact(&mut body)?;
        Ok(String::from_utf8(body)?)
    }
}

/// One request on a new connection (`Connection: close`); returns the body.
pub fn get_once(addr: SocketAddr) -> Result<String> {
    Client::connect(addr)?.get(true)
}

/// A plain `GET` (HTTP/1.0) to `127.0.0.1:port` inside namespace `ns`; returns the status
/// line and the body. For endpoints only reachable there (lbd's metrics, a test Prometheus).
pub fn get_in(ns: &str, port: u16, path_and_query: &str) -> (String, String) {
    let ns = ns.to_string();
    let req = format!("GET {path_and_query} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    std::thread::spawn(move || {
        if let Err(e) = (Netns { name: ns }).enter_no_drop() {
            return (format!("setns: {e}"), String::new());
        }
        let mut s = match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => s,
            Err(e) => return (format!("connect: {e}"), String::new()),
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = s.write_all(req.as_bytes()) {
            return (format!("write: {e}"), String::new());
        }
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    })
    .join()
    .unwrap_or_else(|_| ("thread panicked".into(), String::new()))
}
