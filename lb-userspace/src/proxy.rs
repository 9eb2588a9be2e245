//! Request mode: an HTTP/1.1 reverse proxy on `vip:port` that picks a backend per request —
//! canary routes first, then smooth weighted round robin (nginx's algorithm) over the healthy
//! `ready` backends of all pools, weighted pool × backend. Upstream connections are kept alive
//! and reused. The daemon publishes every change (weights, states, health, reload) as a new
//! [`View`]; the next request uses it.
//!
//! A request without a body (nearly all of them) is read, forwarded and answered by
//! `proxy/front.rs` without hyper's server; a connection that brings anything else is handed
//! to hyper's HTTP/1 server (`handle`) for the rest of its life.
//!
//! Each service's proxy runs one thread per CPU, each with its own single-threaded runtime,
//! listener (`SO_REUSEPORT`: the kernel spreads connections) and upstream pool, as nginx runs
//! workers: a request never wakes another thread. On lbd's shared two-thread runtime, perf put
//! a quarter of the proxy's time in cross-thread wake-ups. Like nginx's, each worker keeps its
//! own round-robin rotation; every rotation follows the weights exactly.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tokio::sync::watch;

mod front;

pub use crate::view::{Upstream, View};
use crate::{
    config::{Match, Route},
    listener::{Cap, Listeners, accept_loop},
    metrics::{RequestMetrics, Signals, backend_labels},
    swrr::{Swrr, integer_weights},
    upstream::{
        UpstreamBody, UpstreamError, UpstreamLimits, Upstreams,
        h1::{H1Body, H1Pool, split_list},
    },
};

/// How long an upstream may take to answer with headers.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// When draining: how long an idle connection may still bring a request (its first, or one
/// already on its way), to be answered with `Connection: close`, before it is closed.
/// Closing an idle keep-alive connection at once races with a client that is sending: the
/// grace makes that race rare (the client then retries, as RFC 9112 §9.3.1 allows).
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// How a proxy treats its clients: its listener's cap, how long a client may take to send a
/// request's headers (idle keep-alive included), how long a stopping proxy lets in-flight
/// requests finish.
#[derive(Clone)]
pub struct ClientLimits {
    pub cap: Cap,
    pub header_timeout: Duration,
    pub drain_timeout: Duration,
}

/// A backend as a request is sent to it: everything that is the same for each of its
/// requests is made once, when it enters the view (its Host value, its metric handles).
struct Target {
    up: Upstream,
    /// `Host` for a request that came without one (HTTP/1.0).
    host: HeaderValue,
    duration: Histogram,
    signals: Arc<Signals>,
    /// `lb_backend_requests_total` by response code, as codes are seen.
    requests: Mutex<Vec<(u16, Counter)>>,
}

impl Target {
    fn new(service: &str, up: &Upstream, metrics: &RequestMetrics) -> Target {
        let labels = backend_labels(service, &up.pool, &up.name);
        Target {
            up: up.clone(),
            host: HeaderValue::from_str(&up.addr.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            duration: metrics.duration.get_or_create(&labels).clone(),
            signals: metrics.signals.get_or_create(&labels).clone(),
            requests: Mutex::new(Vec::new()),
        }
    }

    /// Counts one answered request.
    fn observe(&self, service: &str, metrics: &RequestMetrics, status: u16, took: Duration) {
        self.duration.observe(took.as_secs_f64());
        self.signals.observe(status, took);
        let Ok(mut by_code) = self.requests.lock() else {
            return;
        };
        if let Some((_, c)) = by_code.iter().find(|(code, _)| *code == status) {
            c.inc();
            return;
        }
        let mut labels = backend_labels(service, &self.up.pool, &self.up.name);
        labels.push(("code", status.to_string()));
        let c = metrics.requests.get_or_create(&labels).clone();
        c.inc();
        by_code.push((status, c));
    }
}

/// The pickers, rebuilt (keeping their rotation) when the view changes.
struct Pickers {
    all: Swrr,
    per_pool: HashMap<String, Swrr>,
    view: Arc<View>,
    /// Every backend of the view by id (kept across views while its name, pool and address
    /// stay the same).
    targets: HashMap<u32, Arc<Target>>,
    metrics: RequestMetrics,
}

impl Pickers {
    fn new(view: Arc<View>, metrics: RequestMetrics) -> Pickers {
        let mut p = Pickers {
            all: Swrr::default(),
            per_pool: HashMap::new(),
            view: Arc::new(View::default()),
            targets: HashMap::new(),
            metrics,
        };
        p.update(view);
        p
    }

    fn update(&mut self, view: Arc<View>) {
        let mut targets = HashMap::new();
        // A backend is usually in both lists: made (or kept) once.
        for u in view.upstreams.iter().chain(&view.routable) {
            if targets.contains_key(&u.id) {
                continue;
            }
            let t = match self.targets.remove(&u.id) {
                Some(t) if (&t.up.name, &t.up.pool, t.up.addr) == (&u.name, &u.pool, u.addr) => t,
                _ => Arc::new(Target::new(&view.service, u, &self.metrics)),
            };
            targets.insert(u.id, t);
        }
        self.targets = targets;
        let shares: Vec<(u32, f64)> = view.upstreams.iter().map(|u| (u.id, u.share)).collect();
        self.all.set_weights(&integer_weights(&shares));
        let mut pools: HashMap<String, Vec<(u32, f64)>> = HashMap::new();
        for u in &view.routable {
            pools
                .entry(u.pool.clone())
                .or_default()
                .push((u.id, u.share));
        }
        self.per_pool.retain(|p, _| pools.contains_key(p));
        for (pool, shares) in pools {
            self.per_pool
                .entry(pool)
                .or_default()
                .set_weights(&integer_weights(&shares));
        }
        self.view = view;
    }

    /// Canary routes first (the first that matches and whose pool can answer), then the
    /// weighted pick over every pool.
    fn pick(&mut self, headers: &(impl RequestHeaders + ?Sized)) -> Option<Arc<Target>> {
        let routed = self
            .view
            .routes
            .iter()
            .find(|r| matches(r, headers) && self.per_pool.contains_key(&r.pool))
            .map(|r| r.pool.clone());
        let id = match routed {
            Some(pool) => self.per_pool.get_mut(&pool)?.pick()?,
            None => self.all.pick()?,
        };
        self.targets.get(&id).cloned()
    }
}

/// A request's headers as a route looks at them: hyper's map, or the fields of a head
/// parsed in place ([`front`]).
trait RequestHeaders {
    /// Whether any value of the header `name` (lowercase) satisfies `f`.
    fn any_value(&self, name: &str, f: impl FnMut(&[u8]) -> bool) -> bool;
}

impl RequestHeaders for HeaderMap {
    fn any_value(&self, name: &str, mut f: impl FnMut(&[u8]) -> bool) -> bool {
        self.get_all(name).iter().any(|v| f(v.as_bytes()))
    }
}

impl RequestHeaders for [httparse::Header<'_>] {
    fn any_value(&self, name: &str, mut f: impl FnMut(&[u8]) -> bool) -> bool {
        self.iter()
            .any(|h| h.name.eq_ignore_ascii_case(name) && f(h.value))
    }
}

fn matches(route: &Route, headers: &(impl RequestHeaders + ?Sized)) -> bool {
    match &route.matches {
        Match::Header(name) => headers.any_value(name.as_str(), |v| v == route.value.as_bytes()),
        Match::Cookie(name) => headers.any_value("cookie", |v| {
            std::str::from_utf8(v).is_ok_and(|v| {
                v.split(';')
                    .filter_map(|kv| kv.trim().split_once('='))
                    .any(|(k, v)| k == name && v == route.value)
            })
        }),
    }
}

/// A response's body: the backend's, or one lbd wrote itself (an error).
/// A backend's response body (from a hyper connection for a request with a body, from a
/// hand-written one for a request without), or one the proxy wrote.
type Body = Either<Either<UpstreamBody, H1Body>, Full<Bytes>>;

fn full(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(text))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

struct Shared {
    /// The service's name (fixed for the life of its proxy).
    service: String,
    /// The pickers and where their updates come from, under one lock per request.
    pickers: Mutex<(Pickers, watch::Receiver<Arc<View>>)>,
    /// Backend connections for requests with a body.
    upstreams: Arc<Upstreams>,
    /// Backend connections for requests without one.
    h1: Arc<H1Pool>,
    metrics: RequestMetrics,
    /// Set when the proxy drains: every response then says `Connection: close`.
    draining: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn pick(&self, headers: &(impl RequestHeaders + ?Sized)) -> Option<Arc<Target>> {
        let mut guard = self.pickers.lock().ok()?;
        let (pickers, rx) = &mut *guard;
        if rx.has_changed().unwrap_or(false) {
            let v = rx.borrow_and_update().clone();
            pickers.update(v);
        }
        pickers.pick(headers)
    }
}

/// Serves one request-mode service on `listener` until `stop` turns true, then drains: it
/// stops accepting (the listening socket stays open where a supervisor passed it in, so
/// connections wait in its queue for the next lbd), closes idle keep-alive connections,
/// lets in-flight requests finish with `Connection: close` for up to the drain timeout, and
/// closes what is left.
pub async fn serve(
    listener: tokio::net::TcpListener,
    views: watch::Receiver<Arc<View>>,
    metrics: RequestMetrics,
    limits: ClientLimits,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let limits_up = UpstreamLimits {
        connect_timeout: Duration::from_secs(2),
        idle_timeout: UPSTREAM_IDLE,
        max_idle: 64,
    };
    let upstreams = Upstreams::new(limits_up);
    let h1 = H1Pool::new(limits_up);
    let first = views.borrow().clone();
    let shared = Arc::new(Shared {
        service: first.service.clone(),
        pickers: Mutex::new((Pickers::new(first, metrics.clone()), views)),
        upstreams,
        h1,
        metrics,
        draining: std::sync::atomic::AtomicBool::new(false),
    });
    let mut connections = tokio::task::JoinSet::new();
    let (drain_tx, drain_rx) = watch::channel(false);
    let header_timeout = limits.header_timeout;
    {
        let accepting = accept_loop(listener, limits.cap.clone(), |(stream, peer), slot| {
            while connections.try_join_next().is_some() {}
            let shared = shared.clone();
            let drain = drain_rx.clone();
            connections.spawn(async move {
                let _slot = slot;
                connection(stream, peer, &shared, drain, header_timeout).await;
            });
        });
        // Idle backend connections are closed past their timeout while the proxy serves.
        let sweeping = async {
            let mut every = tokio::time::interval(UPSTREAM_IDLE / 4);
            loop {
                every.tick().await;
                shared.upstreams.sweep();
                shared.h1.sweep();
            }
        };
        tokio::select! {
            never = accepting => match never {},
            _ = sweeping => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
    }
    shared
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = drain_tx.send(true);
    let open = connections.len();
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::debug!(service = shared.service, open, "drained"),
        Err(_) => tracing::warn!(
            service = shared.service,
            left = connections.len(),
            "drain timeout: closing connections with requests still in flight"
        ),
    }
    Ok(())
}

/// One client connection: served by [`front`] while its requests allow, then by hyper's
/// server; draining as [`serve`] says.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    mut drain: watch::Receiver<bool>,
    header_timeout: Duration,
) {
    // The client's address as X-Forwarded-For carries it, written once per
    // connection on the stack (an IPv6 address takes at most 45 bytes).
    let mut text = [0u8; 48];
    let peer_ip = {
        let mut w = &mut text[..];
        let room = w.len();
        let n = std::io::Write::write_fmt(&mut w, format_args!("{}", peer.ip()))
            .map_or(0, |()| room - w.len());
        &text[..n]
    };
    let stream = match front::serve(stream, peer_ip, shared, &mut drain, header_timeout).await {
        front::Ended::Closed => return,
        front::Ended::Handoff(stream, read) => front::Prefixed::new(stream, read),
    };
    // Cloned (a reference count) per request.
    let peer_ip =
        HeaderValue::from_bytes(peer_ip).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let peer_ip = peer_ip.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req, peer_ip).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = drain.wait_for(|d| *d) => None,
    };
    let r = match ended {
        Some(r) => r,
        // Draining: the next request is still read and answered (with
        // `Connection: close`) for a grace; then an idle connection closes, a
        // busy one after its response.
        None => match tokio::time::timeout(DRAIN_GRACE, conn.as_mut()).await {
            Ok(r) => r,
            Err(_) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        },
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, %peer, "proxy connection ended");
    }
}

/// How long a backend connection may stay idle in a worker's pool.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Fields that describe one hop, not the message (RFC 9110 §7.6.1): not passed on, either
/// way.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
];

/// Whether the field `name` is one of [`HOP_BY_HOP`].
fn hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// The fields a `Connection` value names, hop-by-hop too: its elements other than the
/// options `close` and `keep-alive`.
fn connection_named(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    split_list(value)
        .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
}

/// The 503 body when `service` has no backend to send a request to.
fn no_backend(service: &str) -> String {
    format!("503: service {service:?} has no healthy ready backend\n")
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names costs less than seven
    // removals, each a parse, a hash and a probe.
    if !h.keys().any(|k| hop_by_hop(k.as_str())) {
        return;
    }
    // Headers named in Connection are hop-by-hop too (rare: allocate only then).
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| connection_named(v.as_bytes()))
        .map(|t| String::from_utf8_lossy(t).to_ascii_lowercase())
        .collect();
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    for n in named {
        h.remove(n.as_str());
    }
}

/// Why a request must not reach a backend as it is framed (RFC 9110/9112), if it must not:
/// an HTTP/1.1 request needs exactly one Host; a GET, HEAD or TRACE carries no body (a
/// backend that ignores such a body would read it as the next request, one the proxy
/// never saw).
fn framing_error(req: &Request<Incoming>) -> Option<&'static str> {
    if req.version() == hyper::Version::HTTP_11
        && req.headers().get_all(header::HOST).iter().count() != 1
    {
        return Some("an HTTP/1.1 request needs exactly one Host header");
    }
    let bodiless = matches!(
        *req.method(),
        hyper::Method::GET | hyper::Method::HEAD | hyper::Method::TRACE
    );
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if bodiless && has_body {
        return Some("a GET, HEAD or TRACE request must not carry a body");
    }
    None
}

/// A 400 that also ends the connection: what follows on it cannot be trusted to be framed.
fn bad_request(why: impl std::fmt::Display) -> Response<Body> {
    let mut r = full(StatusCode::BAD_REQUEST, format!("400: {why}\n"));
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn handle(
    shared: &Shared,
    mut req: Request<Incoming>,
    peer_ip: HeaderValue,
) -> Response<Body> {
    if let Some(why) = framing_error(&req) {
        return bad_request(why);
    }
    let Some(target) = shared.pick(req.headers()) else {
        return full(StatusCode::SERVICE_UNAVAILABLE, no_backend(&shared.service));
    };
    let started = Instant::now();
    // Origin form (what a backend expects from a proxy that is not an HTTP proxy): an
    // absolute-form target loses its scheme and authority, an empty path becomes "/".
    if req.uri().scheme().is_some() || req.uri().path_and_query().is_none() {
        let pq = req.uri().path_and_query().map_or_else(
            || hyper::http::uri::PathAndQuery::from_static("/"),
            |p| p.clone(),
        );
        *req.uri_mut() = hyper::Uri::from(pq);
    }
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    if !h.contains_key(header::HOST) {
        h.insert(header::HOST, target.host.clone());
    }
    let xff = match h.get(&X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer_ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer_ip.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        None => Some(peer_ip),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    let up = &target.up;
    let result = if hyper::body::Body::is_end_stream(req.body()) {
        let (parts, _) = req.into_parts();
        tokio::time::timeout(UPSTREAM_TIMEOUT, shared.h1.send(up.addr, &parts))
            .await
            .map(|r| r.map(|resp| resp.map(|b| Either::Left(Either::Right(b)))))
    } else {
        tokio::time::timeout(UPSTREAM_TIMEOUT, shared.upstreams.send(up.addr, req))
            .await
            .map(|r| r.map(|resp| resp.map(|b| Either::Left(Either::Left(b)))))
    };
    let mut resp = match result {
        Ok(Ok(mut resp)) => {
            strip_hop_by_hop(resp.headers_mut());
            resp
        }
        Ok(Err(e)) if e.is_client_body() => {
            bad_request("the request body is malformed (e.g. a bad chunk size)")
        }
        Ok(Err(e)) => {
            let (status, text) = upstream_failure(up, Some(&e));
            full(status, text)
        }
        Err(_) => {
            let (status, text) = upstream_failure(up, None);
            full(status, text)
        }
    };
    target.observe(
        &shared.service,
        &shared.metrics,
        resp.status().as_u16(),
        started.elapsed(),
    );
    if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The answer to a request its backend failed: a 502 saying how (`Some`), or a 504 when it
/// did not answer in time (`None`).
fn upstream_failure(up: &Upstream, e: Option<&UpstreamError>) -> (StatusCode, String) {
    match e {
        Some(e) => (
            StatusCode::BAD_GATEWAY,
            format!("502: backend {} ({}) failed: {e}\n", up.name, up.addr),
        ),
        None => (
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "504: backend {} ({}) did not answer within {UPSTREAM_TIMEOUT:?}\n",
                up.name, up.addr
            ),
        ),
    }
}

/// One service's running proxy: its worker threads, stopped (after draining) when dropped.
struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The running proxies, one per request-mode service. Dropping it stops them (each drains
/// on its own threads); [`Proxies::drain`] stops them and waits.
pub struct Proxies {
    running: HashMap<String, Running>,
    /// Caps and timeouts for every service's clients (each service gets a cap of its own).
    limits: crate::config::Limits,
    /// The per-service cap after the descriptor budget.
    cap: usize,
    listeners: Listeners,
    /// Listening sockets passed in by a supervisor (socket activation), by address.
    inherited: HashMap<SocketAddr, std::net::TcpListener>,
}

impl Proxies {
    /// No proxies yet; those started later use these limits, `cap` connections per service,
    /// and the `inherited` listeners for their addresses.
    pub fn new(
        limits: crate::config::Limits,
        cap: usize,
        listeners: Listeners,
        inherited: HashMap<SocketAddr, std::net::TcpListener>,
    ) -> Proxies {
        Proxies {
            running: HashMap::new(),
            limits,
            cap,
            listeners,
            inherited,
        }
    }

    /// Stops every proxy and waits until each has drained (at most the drain timeout, and
    /// a second more).
    pub fn drain(&mut self) {
        let workers: Vec<_> = self
            .running
            .drain()
            .flat_map(|(_, mut r)| {
                let _ = r.stop.send(true);
                std::mem::take(&mut r.workers)
            })
            .collect();
        let deadline = Instant::now() + self.limits.drain_timeout + Duration::from_secs(1);
        for w in workers {
            while !w.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Makes the running proxies match `wanted` (service → its address and where its views
    /// come from): starts the missing ones (or those that moved to another address), stops
    /// those no longer wanted. Returns what could not start.
    pub fn reconcile(
        &mut self,
        wanted: Vec<(String, SocketAddr, watch::Receiver<Arc<View>>)>,
        metrics: &RequestMetrics,
    ) -> Vec<anyhow::Error> {
        self.running.retain(|name, r| {
            wanted
                .iter()
                .any(|(n, addr, _)| n == name && *addr == r.addr)
        });
        let mut errors = Vec::new();
        for (name, addr, views) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            let limits = ClientLimits {
                cap: Cap::new(&format!("request:{name}"), self.cap, &self.listeners),
                header_timeout: self.limits.request_header_timeout,
                drain_timeout: self.limits.drain_timeout,
            };
            let inherited = self.inherited.get(&addr).and_then(|l| l.try_clone().ok());
            match start(&name, addr, views, metrics.clone(), limits, inherited) {
                Ok(r) => {
                    tracing::info!(service = name, %addr, "request-mode proxy listening");
                    self.running.insert(name, r);
                }
                Err(e) => errors.push(e.context(format!("service {name:?}"))),
            }
        }
        errors
    }
}

/// Binds one listener per CPU on `addr` (all or none) — or shares the `inherited` one among
/// them — then starts a worker thread on each.
fn start(
    name: &str,
    addr: SocketAddr,
    views: watch::Receiver<Arc<View>>,
    metrics: RequestMetrics,
    limits: ClientLimits,
    inherited: Option<std::net::TcpListener>,
) -> Result<Running> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listeners = match inherited {
        // One queue that outlives lbd (its supervisor holds it): every worker accepts on it.
        Some(l) => {
            l.set_nonblocking(true)?;
            (0..workers)
                .map(|_| l.try_clone().context("sharing an inherited listener"))
                .collect::<Result<Vec<_>>>()?
        }
        None => (0..workers)
            .map(|_| bind(addr))
            .collect::<Result<Vec<_>>>()?,
    };
    let (stop, stopped) = watch::channel(false);
    let mut handles = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let (views, metrics, stopped, svc, limits) = (
            views.clone(),
            metrics.clone(),
            stopped.clone(),
            name.to_string(),
            limits.clone(),
        );
        let h = std::thread::Builder::new()
            .name(format!("proxy-{i}"))
            .spawn(move || {
                let run = || -> Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        serve(listener, views, metrics, limits, stopped).await
                    })
                };
                if let Err(e) = run() {
                    tracing::error!(
                        service = svc,
                        error = format!("{e:#}"),
                        "request-mode proxy stopped"
                    );
                }
            })
            .context("starting a proxy thread")?;
        handles.push(h);
    }
    Ok(Running {
        addr,
        stop,
        workers: handles,
    })
}

/// Binds a request-mode listener (the VIP must be a local address) with `SO_REUSEPORT`, so
/// that each worker has its own.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let what = || format!("request mode: listening on {addr} (is the VIP a local address?)");
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).with_context(what)?;
    s.set_reuse_address(true).with_context(what)?;
    s.set_reuse_port(true).with_context(what)?;
    s.bind(&addr.into()).with_context(what)?;
    s.listen(1024).with_context(what)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(id: u32, pool: &str, share: f64) -> Upstream {
        Upstream {
            id,
            name: format!("b{id}"),
            pool: pool.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            share,
        }
    }

    fn view() -> Arc<View> {
        Arc::new(View {
            service: "web".into(),
            upstreams: vec![up(1, "legacy", 1.0)],
            routable: vec![up(1, "legacy", 1.0), up(2, "k8s", 1.0)],
            routes: vec![
                Route {
                    matches: Match::Header("x-canary".into()),
                    value: "always".into(),
                    pool: "k8s".into(),
                },
                Route {
                    matches: Match::Cookie("canary".into()),
                    value: "1".into(),
                    pool: "k8s".into(),
                },
            ],
        })
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn canary_header_or_cookie_goes_to_its_pool_even_at_weight_0() {
        let mut p = Pickers::new(view(), RequestMetrics::default());
        let id = |p: &mut Pickers, h: &[(&str, &str)]| p.pick(&headers(h)).unwrap().up.id;
        assert_eq!(id(&mut p, &[]), 1);
        assert_eq!(id(&mut p, &[("x-canary", "always")]), 2);
        assert_eq!(id(&mut p, &[("X-Canary", "never")]), 1);
        assert_eq!(id(&mut p, &[("cookie", "a=b; canary=1")]), 2);
        assert_eq!(id(&mut p, &[("cookie", "canary=10")]), 1);
    }

    #[test]
    fn a_route_to_a_pool_without_backends_falls_back_to_the_weighted_pick() {
        let mut v = (*view()).clone();
        v.routable.retain(|u| u.pool != "k8s");
        let mut p = Pickers::new(Arc::new(v), RequestMetrics::default());
        assert_eq!(
            p.pick(&headers(&[("x-canary", "always")])).unwrap().up.id,
            1
        );
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = headers(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none() && h.get("connection").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
        // Tokens in any case, beside the common ones.
        let mut h = headers(&[
            ("connection", "Keep-Alive, X-Other"),
            ("x-other", "1"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-other").is_none() && h.get("connection").is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }
}
