//! Request mode's client side for the requests nearly every client sends: no body (no
//! `Content-Length`, no `Transfer-Encoding`), an origin-form target, no upgrade, no
//! `Expect`, one `Host` (HTTP/1.1). Their heads are parsed where they were read (httparse, no
//! header map), the backend's head is written from the client's fields in one pass, and the
//! response goes back in one write with its body when the body came with its head.
//!
//! hyper's HTTP/1 server did this before, through a dispatcher, a header map per message and
//! a re-encoding of each head: with it lbd spent ~3.3 µs of user time per keep-alive request
//! where nginx spends ~2.6 (BENCHMARKS.md).
//!
//! Every other request — one with a body, an upgrade or `CONNECT`, an absolute-form target,
//! a head that does not parse or is larger than [`MAX_HEAD`], a `Connection` header that
//! names other headers, a missing or doubled `Host` — hands the connection over to hyper's
//! server, with the bytes read and not yet used, for the rest of its life. The cases whose
//! framing is subtle stay with the parser hardened for them, and their answers (the 400s of
//! a request a backend could read differently included) stay what they were.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::{StatusCode, body::Body as _};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
    sync::watch,
};

use super::{
    DRAIN_GRACE, Shared, Target, UPSTREAM_TIMEOUT, connection_named, hop_by_hop, no_backend,
    upstream_failure,
};
use crate::upstream::h1::{self, H1Body, Head, split_list};

/// The most header fields a request handled here may have (hyper's default limit too).
const MAX_HEADERS: usize = 100;
/// The largest request head handled here; a larger one goes to hyper, which has its own
/// limit.
const MAX_HEAD: usize = 16 * 1024;
/// What one read asks for at least.
const READ_CHUNK: usize = 4096;
/// A body up to this size is copied behind its head, so both leave in one write.
const COPY_BODY: usize = 16 * 1024;

/// How a connection left this loop.
pub(super) enum Ended {
    /// Closed (by either side, a timeout, or a drain).
    Closed,
    /// hyper's server takes the connection, and the bytes read from it that no response has
    /// used yet.
    Handoff(TcpStream, Bytes),
}

/// A client connection as responses are written to it.
struct Client {
    io: TcpStream,
    /// TCP_NODELAY is set. Only from when it can matter: Nagle holds back a small segment
    /// only while an earlier one is unacknowledged, so a connection's first response,
    /// written whole in one write, never waits for it; a second response, or one written
    /// in pieces, could wait for the client's delayed ACK (up to 40 ms). Connections that
    /// carry one response (`Connection: close`) save the system call, as nginx's do.
    nodelay: bool,
    /// A response has been written on it.
    answered: bool,
}

impl Client {
    /// Writes `bytes`; `whole`: they are a response from its first byte to its last.
    async fn write(&mut self, bytes: &[u8], whole: bool) -> io::Result<()> {
        // Only a connection's first response, whole, may go with Nagle on.
        let alone = whole && !self.answered;
        if !self.nodelay && !alone {
            self.nodelay = true;
            let _ = self.io.set_nodelay(true);
        }
        self.io.write_all(bytes).await
    }
}

/// A request whose head has been read and turned into its backend's head.
struct Prepared {
    target: Arc<Target>,
    /// The method's length at the start of the backend's head.
    method_len: usize,
    http10: bool,
    /// The client lets the connection stay open after this response.
    keep: bool,
}

/// What the bytes at the start of the buffer are.
enum Step {
    /// A complete head of `len` bytes handled here: its request, or no backend to send it to
    /// (the request's version and `keep`).
    Ready(usize, Result<Prepared, (bool, bool)>),
    /// Not a complete head yet.
    More,
    /// For hyper.
    Handoff,
}

/// Serves requests on a client connection until it closes or needs hyper's server.
/// `header_timeout`: how long a client may take to send a request's head (idle keep-alive
/// included); once `drain` turns true, an idle connection gets [`DRAIN_GRACE`] to bring one
/// more request, answered with `Connection: close`.
pub(super) async fn serve(
    io: TcpStream,
    peer_ip: &[u8],
    shared: &Shared,
    drain: &mut watch::Receiver<bool>,
    header_timeout: Duration,
) -> Ended {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // The backend's request head and the client's response head, reused request after
    // request.
    let (mut up, mut out) = (Vec::with_capacity(512), Vec::with_capacity(1024));
    // One timer for the connection, moved for each head it waits for.
    let timer = tokio::time::sleep(header_timeout);
    tokio::pin!(timer);
    let mut draining = false;
    let mut client = Client {
        io,
        nodelay: false,
        answered: false,
    };
    loop {
        let mut waiting = false;
        let (len, prepared) = loop {
            if !buf.is_empty() {
                match prepare(&buf, peer_ip, shared, &mut up) {
                    Step::Ready(len, p) => break (len, p),
                    Step::More if buf.len() < MAX_HEAD => {}
                    Step::More | Step::Handoff => {
                        let _ = client.io.set_nodelay(true);
                        return Ended::Handoff(client.io, buf.freeze());
                    }
                }
            }
            if !waiting {
                waiting = true;
                let limit = if draining {
                    header_timeout.min(DRAIN_GRACE)
                } else {
                    header_timeout
                };
                timer.as_mut().reset(tokio::time::Instant::now() + limit);
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                r = client.io.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) => {}
                },
                () = timer.as_mut() => return Ended::Closed,
                _ = drain.wait_for(|d| *d), if !draining => {
                    draining = true;
                    let grace = tokio::time::Instant::now() + DRAIN_GRACE;
                    if grace < timer.deadline() {
                        timer.as_mut().reset(grace);
                    }
                }
            }
        };
        buf.advance(len);
        let draining = draining || shared.draining.load(Ordering::Relaxed);
        let p = match prepared {
            Ok(p) => p,
            Err((http10, keep)) => {
                let text = no_backend(&shared.service);
                let keep = keep && !draining;
                plain(
                    &mut out,
                    http10,
                    StatusCode::SERVICE_UNAVAILABLE,
                    &text,
                    keep,
                );
                if client.write(&out, true).await.is_err() || !keep {
                    return Ended::Closed;
                }
                client.answered = true;
                continue;
            }
        };
        let started = Instant::now();
        let up_addr = p.target.up.addr;
        let result = tokio::time::timeout(
            UPSTREAM_TIMEOUT,
            shared.h1.send_head(up_addr, &up, &up[..p.method_len]),
        )
        .await
        // `None`: no answer in time.
        .map_or(Err(None), |r| r.map_err(Some));
        let keep = p.keep && !draining;
        let head_only = &up[..p.method_len] == b"HEAD";
        let sent = match result {
            Ok((head, body)) => {
                p.target.observe(
                    &shared.service,
                    &shared.metrics,
                    head.status.as_u16(),
                    started.elapsed(),
                );
                respond(
                    &mut client,
                    &mut out,
                    &head,
                    body,
                    p.http10,
                    keep,
                    head_only,
                )
                .await
            }
            Err(e) => {
                let (status, text) = upstream_failure(&p.target.up, e.as_ref());
                p.target.observe(
                    &shared.service,
                    &shared.metrics,
                    status.as_u16(),
                    started.elapsed(),
                );
                plain(&mut out, p.http10, status, &text, keep);
                client.write(&out, true).await.map(|()| keep)
            }
        };
        if !matches!(sent, Ok(true)) {
            return Ended::Closed;
        }
        client.answered = true;
    }
}

/// Parses the head at the start of `buf` and, when it is one handled here, picks its
/// backend and writes the backend's head into `up`: the client's fields as they came, less
/// the hop-by-hop ones, with `Host` (an HTTP/1.0 request may lack it) and the client's
/// address appended to `X-Forwarded-For`.
fn prepare(buf: &[u8], peer_ip: &[u8], shared: &Shared, up: &mut Vec<u8>) -> Step {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Step::More,
        Err(_) => return Step::Handoff,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Step::Handoff;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Step::Handoff;
    }
    let http10 = version == 0;
    let (mut hosts, mut close, mut keep_alive) = (0, false, false);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Step::Handoff;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in split_list(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else {
                    // It names headers to remove as hop-by-hop too: rare, hyper's path does.
                    return Step::Handoff;
                }
            }
        }
    }
    if hosts > 1 || (hosts == 0 && !http10) {
        return Step::Handoff;
    }
    let keep = !close && (!http10 || keep_alive);
    let Some(target) = shared.pick(req.headers) else {
        return Step::Ready(len, Err((http10, keep)));
    };
    up.clear();
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    up.extend_from_slice(path.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for = false;
    for h in req.headers.iter() {
        if hop_by_hop(h.name) {
            continue;
        }
        let xff = h.name.eq_ignore_ascii_case("x-forwarded-for");
        if xff && forwarded_for {
            // Their list continues in the first one's value, which carries the client too.
            continue;
        }
        up.extend_from_slice(h.name.as_bytes());
        up.extend_from_slice(b": ");
        up.extend_from_slice(h.value);
        if xff {
            forwarded_for = true;
            up.extend_from_slice(b", ");
            up.extend_from_slice(peer_ip);
        }
        up.extend_from_slice(b"\r\n");
    }
    if hosts == 0 {
        up.extend_from_slice(b"host: ");
        up.extend_from_slice(target.host.as_bytes());
        up.extend_from_slice(b"\r\n");
    }
    if !forwarded_for {
        up.extend_from_slice(b"x-forwarded-for: ");
        up.extend_from_slice(peer_ip);
        up.extend_from_slice(b"\r\n");
    }
    up.extend_from_slice(b"\r\n");
    Step::Ready(
        len,
        Ok(Prepared {
            target,
            method_len: method.len(),
            http10,
            keep,
        }),
    )
}

/// The status line in the client's version: `HTTP/1.x 200 OK`.
fn status_line(out: &mut Vec<u8>, http10: bool, status: StatusCode) {
    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// What keeps (or ends) the connection, said to the client: HTTP/1.1 keeps by default,
/// HTTP/1.0 closes by default.
fn connection(out: &mut Vec<u8>, http10: bool, keep: bool) {
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// A response lbd writes itself (a 502, 503 or 504), into `out`. It is its origin, so it
/// dates it (RFC 9110 §6.6.1); a backend's response keeps the backend's `Date`.
fn plain(out: &mut Vec<u8>, http10: bool, status: StatusCode, text: &str, keep: bool) {
    out.clear();
    status_line(out, http10, status);
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice(text.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    connection(out, http10, keep);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(text.as_bytes());
}

/// Writes a backend's response to the client, its hop-by-hop fields left out (those its
/// `Connection` names too), framed for the client: the backend's `Content-Length`, or the
/// body's length when it is known, or chunked (an HTTP/1.1 client) or until the connection
/// closes (HTTP/1.0). Whether the connection stays open.
async fn respond(
    client: &mut Client,
    out: &mut Vec<u8>,
    head: &Head,
    mut body: H1Body,
    http10: bool,
    keep: bool,
    head_only: bool,
) -> io::Result<bool> {
    let status = head.status;
    let bodiless = head_only
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    let length = if bodiless {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    let chunked = length.is_none() && !http10;
    // A body that ends when the connection does ends the connection.
    let keep = keep && (length.is_some() || chunked);
    out.clear();
    status_line(out, http10, status);
    let mut slots = [const { MaybeUninit::uninit() }; h1::MAX_HEADERS];
    let fields = head.fields(&mut slots);
    // Fields the backend's `Connection` names are hop-by-hop too (rare: gathered only then).
    let mut named: Vec<&[u8]> = Vec::new();
    for f in fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("connection"))
    {
        named.extend(connection_named(f.value));
    }
    let mut has_length = false;
    for f in fields {
        if hop_by_hop(f.name)
            || !head.passes_on(f.name)
            || named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(f.name.as_bytes()))
        {
            continue;
        }
        has_length |= f.name.eq_ignore_ascii_case("content-length");
        out.extend_from_slice(f.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(f.value);
        out.extend_from_slice(b"\r\n");
    }
    let length_field = match head.one_length() {
        Some(n) => Some(n),
        None if !bodiless && !has_length => length,
        None => None,
    };
    if let Some(n) = length_field {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    } else if chunked && !bodiless {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    connection(out, http10, keep);
    out.extend_from_slice(b"\r\n");
    // The head waits in `out` for the body's first bytes: a body that came with its head
    // leaves with it.
    let mut pieces = false;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            // Trailers: this hop's, not forwarded.
            continue;
        };
        if data.is_empty() || bodiless {
            continue;
        }
        if chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if out.len() + data.len() <= COPY_BODY {
            out.extend_from_slice(&data);
        } else {
            client.write(out, false).await?;
            out.clear();
            client.write(&data, false).await?;
            pieces = true;
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        // More to come from the backend: what is gathered goes now.
        if !body.is_end_stream() && !out.is_empty() {
            client.write(out, false).await?;
            out.clear();
            pieces = true;
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    client.write(out, !pieces).await?;
    Ok(keep)
}

/// A client connection for hyper's server: the bytes already read from it first.
pub(super) struct Prefixed {
    read: Bytes,
    io: TcpStream,
}

impl Prefixed {
    pub(super) fn new(io: TcpStream, read: Bytes) -> Prefixed {
        Prefixed { read, io }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
        sync::watch,
    };

    use crate::{
        listener::{Cap, Listeners},
        metrics::RequestMetrics,
        proxy::{ClientLimits, Upstream, View, serve},
    };

    /// The request heads (with any body) a test backend read, in order.
    type Seen = Arc<Mutex<Vec<String>>>;

    /// A raw HTTP/1.1 backend on loopback: it reads each request's head (and a
    /// `Content-Length` body) and answers with what `answer` gives for the request line's
    /// target, keeping the connection.
    async fn backend(answer: fn(&str) -> &'static str) -> (SocketAddr, Seen) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
                            let body_len = head
                                .lines()
                                .find_map(|l| {
                                    let (n, v) = l.split_once(':')?;
                                    n.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() < end + 4 + body_len {
                                break;
                            }
                            let request: Vec<u8> = buf.drain(..end + 4 + body_len).collect();
                            log.lock()
                                .unwrap()
                                .push(String::from_utf8(request).unwrap());
                            let target = head.split(' ').nth(1).unwrap_or("");
                            if s.write_all(answer(target).as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    /// What the test backend answers: a fixed-length body, except where the target asks
    /// for a chunked one.
    fn answer(target: &str) -> &'static str {
        match target {
            "/chunked" => {
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            }
            "/hop" => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok",
            "/named" => {
                "HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 2\r\n\r\nok"
            }
            "/twice" => "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
            _ => "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-From: backend\r\n\r\nhello",
        }
    }

    /// A request-mode proxy on loopback in front of `backend`, with `header_timeout`.
    async fn proxy(backend: SocketAddr, header_timeout: Duration) -> SocketAddr {
        let up = Upstream {
            id: 1,
            name: "b1".into(),
            pool: "legacy".into(),
            addr: backend,
            share: 1.0,
        };
        let view = Arc::new(View {
            service: "web".into(),
            upstreams: vec![up.clone()],
            routable: vec![up],
            routes: vec![],
        });
        let (views_tx, views) = watch::channel(view);
        let (stop_tx, stop) = watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ClientLimits {
            cap: Cap::new("web", 64, &Listeners::default()),
            header_timeout,
            drain_timeout: Duration::from_secs(1),
        };
        tokio::spawn(async move {
            // Held for the proxy's life: a closed channel would read as a stop.
            let _keep = (views_tx, stop_tx);
            serve(listener, views, RequestMetrics::default(), limits, stop).await
        });
        addr
    }

    /// Writes `raw` on a new connection, then reads until the proxy closes it or 300 ms
    /// pass without a byte: everything the client received, and whether it was closed.
    async fn exchange(proxy: SocketAddr, raw: &[u8]) -> (String, bool) {
        let mut c = TcpStream::connect(proxy).await.unwrap();
        c.write_all(raw).await.unwrap();
        read_all(&mut c).await
    }

    async fn read_all(c: &mut TcpStream) -> (String, bool) {
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(300), c.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8(got).unwrap(), true),
                Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
                Err(_) => return (String::from_utf8(got).unwrap(), false),
            }
        }
    }

    /// Header `name`'s value in the response or request head `text`, first occurrence.
    fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        let head = &text[..text.find("\r\n\r\n").unwrap_or(text.len())];
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Each request a client sends, what the client gets back and what the backend reads:
    /// the requests handled without hyper and those handed to it, side by side.
    #[tokio::test]
    async fn requests_are_framed_for_the_backend_and_back_to_the_client() {
        let (b, seen) = backend(answer).await;
        let p = proxy(b, Duration::from_secs(5)).await;
        struct Case {
            name: &'static str,
            send: &'static str,
            /// The responses' status lines, in order.
            statuses: &'static [&'static str],
            /// The client's connection is closed after them.
            closed: bool,
            /// Checks on the whole answer and on what the backend read (`None`: nothing).
            check: fn(&str, Option<&str>) -> Result<(), String>,
        }
        fn ok(_: &str, _: Option<&str>) -> Result<(), String> {
            Ok(())
        }
        let cases = [
            Case {
                name: "a keep-alive GET: the backend's head less hop-by-hop fields, plus XFF",
                send: "GET /a?x=1 HTTP/1.1\r\nHost: lb\r\nConnection: keep-alive\r\nTE: trailers\r\nProxy-Authorization: secret\r\nAccept: */*\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |answer, up| {
                    let up = up.ok_or("the backend saw nothing")?;
                    let want_line = up.starts_with("GET /a?x=1 HTTP/1.1\r\n");
                    let gone = ["connection", "te", "proxy-authorization"]
                        .iter()
                        .all(|h| field(up, h).is_none());
                    let kept = field(up, "host") == Some("lb")
                        && field(up, "accept") == Some("*/*")
                        && field(up, "x-forwarded-for") == Some("127.0.0.1");
                    let back = answer.ends_with("\r\n\r\nhello")
                        && field(answer, "content-length") == Some("5")
                        && field(answer, "x-from") == Some("backend")
                        && field(answer, "connection").is_none();
                    (want_line && gone && kept && back)
                        .then_some(())
                        .ok_or(format!("backend read {up:?}"))
                },
            },
            Case {
                name: "an X-Forwarded-For list is continued with the client",
                send: "GET / HTTP/1.1\r\nHost: lb\r\nX-Forwarded-For: 10.1.1.1\r\nX-Forwarded-For: 10.2.2.2\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |_, up| {
                    let up = up.unwrap_or("");
                    (field(up, "x-forwarded-for") == Some("10.1.1.1, 127.0.0.1")
                        && up.matches("X-Forwarded-For").count() == 1)
                        .then_some(())
                        .ok_or(format!("backend read {up:?}"))
                },
            },
            Case {
                name: "HTTP/1.0 without Host: the backend gets one, the client 1.0 and a close",
                send: "GET / HTTP/1.0\r\n\r\n",
                statuses: &["HTTP/1.0 200 OK"],
                closed: true,
                check: |answer, up| {
                    let up = up.unwrap_or("");
                    (up.starts_with("GET / HTTP/1.1\r\n")
                        && field(up, "host").is_some_and(|h| h.starts_with("127.0.0.1:"))
                        && field(answer, "connection") == Some("close"))
                    .then_some(())
                    .ok_or(format!("backend read {up:?}"))
                },
            },
            Case {
                name: "HTTP/1.0 keep-alive stays open and says so",
                send: "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                statuses: &["HTTP/1.0 200 OK"],
                closed: false,
                check: |answer, _| {
                    (field(answer, "connection") == Some("keep-alive"))
                        .then_some(())
                        .ok_or("no keep-alive".into())
                },
            },
            Case {
                name: "Connection: close is answered, then the connection closes",
                send: "GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: true,
                check: |answer, _| {
                    (field(answer, "connection") == Some("close"))
                        .then_some(())
                        .ok_or("no close".into())
                },
            },
            Case {
                name: "pipelined requests are answered in order",
                send: "GET /1 HTTP/1.1\r\nHost: lb\r\n\r\nGET /chunked HTTP/1.1\r\nHost: lb\r\n\r\nHEAD /3 HTTP/1.1\r\nHost: lb\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.1 200 OK"],
                closed: false,
                check: |answer, _| {
                    let parts: Vec<&str> = answer.split("HTTP/1.1 200 OK").collect();
                    (parts.len() == 4
                        && parts[1].ends_with("\r\n\r\nhello")
                        && field(parts[2], "transfer-encoding") == Some("chunked")
                        && parts[2].ends_with("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                        && field(parts[3], "content-length") == Some("5")
                        && parts[3].ends_with("\r\n\r\n"))
                    .then_some(())
                    .ok_or(format!("{parts:?}"))
                },
            },
            Case {
                name: "a chunked body to an HTTP/1.0 client ends with the connection",
                send: "GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                statuses: &["HTTP/1.0 200 OK"],
                closed: true,
                check: |answer, _| {
                    (answer.ends_with("\r\n\r\nabcde")
                        && field(answer, "transfer-encoding").is_none()
                        && field(answer, "connection") == Some("close"))
                    .then_some(())
                    .ok_or("not close-delimited".into())
                },
            },
            Case {
                name: "the backend's hop-by-hop fields stay on its hop",
                send: "GET /hop HTTP/1.1\r\nHost: lb\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |answer, _| {
                    (field(answer, "keep-alive").is_none() && answer.ends_with("\r\n\r\nok"))
                        .then_some(())
                        .ok_or("keep-alive forwarded".into())
                },
            },
            Case {
                name: "a field the backend's Connection names stays on its hop",
                send: "GET /named HTTP/1.1\r\nHost: lb\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |answer, _| {
                    (field(answer, "x-secret").is_none()
                        && field(answer, "connection").is_none()
                        && answer.ends_with("\r\n\r\nok"))
                    .then_some(())
                    .ok_or("a hop-by-hop field forwarded".into())
                },
            },
            Case {
                name: "a length given as a list is passed on once",
                send: "GET /twice HTTP/1.1\r\nHost: lb\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |answer, _| {
                    (field(answer, "content-length") == Some("2")
                        && answer
                            .to_ascii_lowercase()
                            .matches("content-length")
                            .count()
                            == 1
                        && answer.ends_with("\r\n\r\nok"))
                    .then_some(())
                    .ok_or("not one length".into())
                },
            },
            Case {
                name: "a head that arrives in pieces (sent below as bytes one by one)",
                send: "GET /slow HTTP/1.1\r\nHost: lb\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: ok,
            },
            Case {
                name: "hyper's path: a POST with a body reaches the backend whole",
                send: "POST /p HTTP/1.1\r\nHost: lb\r\nContent-Length: 4\r\n\r\nbody",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |_, up| {
                    let up = up.unwrap_or("");
                    (up.starts_with("POST /p HTTP/1.1\r\n")
                        && up.ends_with("\r\n\r\nbody")
                        && field(up, "x-forwarded-for") == Some("127.0.0.1"))
                    .then_some(())
                    .ok_or(format!("backend read {up:?}"))
                },
            },
            Case {
                name: "hyper's path after a request served here, on the same connection",
                send: "GET /first HTTP/1.1\r\nHost: lb\r\n\r\nPOST /then HTTP/1.1\r\nHost: lb\r\nContent-Length: 2\r\n\r\nhi",
                statuses: &["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"],
                closed: false,
                check: |_, up| {
                    let up = up.unwrap_or("");
                    (up.starts_with("POST /then") && up.ends_with("hi"))
                        .then_some(())
                        .ok_or(format!("backend read {up:?}"))
                },
            },
            Case {
                name: "hyper's path: an absolute-form target reaches the backend in origin form",
                send: "GET http://lb/abs?q HTTP/1.1\r\nHost: lb\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |_, up| {
                    let up = up.unwrap_or("");
                    up.starts_with("GET /abs?q HTTP/1.1\r\n")
                        .then_some(())
                        .ok_or(format!("backend read {up:?}"))
                },
            },
            Case {
                name: "hyper's path: a header named in Connection is not forwarded",
                send: "GET / HTTP/1.1\r\nHost: lb\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |_, up| {
                    let up = up.unwrap_or("");
                    field(up, "x-hop")
                        .is_none()
                        .then_some(())
                        .ok_or(format!("backend read {up:?}"))
                },
            },
            Case {
                name: "hyper's path: a GET with a body is refused, nothing forwarded",
                send: "GET / HTTP/1.1\r\nHost: lb\r\nContent-Length: 2\r\n\r\nhi",
                statuses: &["HTTP/1.1 400 Bad Request"],
                closed: true,
                check: |_, up| up.map_or(Ok(()), |up| Err(format!("backend read {up:?}"))),
            },
            Case {
                name: "hyper's path: HTTP/1.1 with two Hosts is refused",
                send: "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                statuses: &["HTTP/1.1 400 Bad Request"],
                closed: true,
                check: |_, up| up.map_or(Ok(()), |up| Err(format!("backend read {up:?}"))),
            },
            Case {
                name: "hyper's path: a head that does not parse is refused",
                send: "GET / HTTP/1.1\r\nHost lb\r\n\r\n",
                statuses: &["HTTP/1.1 400 Bad Request"],
                closed: true,
                check: |_, up| up.map_or(Ok(()), |up| Err(format!("backend read {up:?}"))),
            },
            // The boundary between the two sides, where a smuggled request would slip through:
            // framing fields in any spelling go to hyper, and what it refuses reaches no backend.
            Case {
                name: "a Content-Length in another case on a GET is still refused",
                send: "GET / HTTP/1.1\r\nHost: lb\r\ncontent-LENGTH: 36\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: lb\r\n\r\n",
                statuses: &["HTTP/1.1 400 Bad Request"],
                closed: true,
                check: |_, up| up.map_or(Ok(()), |up| Err(format!("backend read {up:?}"))),
            },
            Case {
                name: "a space before a framing field's colon is refused",
                send: "GET / HTTP/1.1\r\nHost: lb\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
                statuses: &["HTTP/1.1 400 Bad Request"],
                closed: true,
                check: |_, up| up.map_or(Ok(()), |up| Err(format!("backend read {up:?}"))),
            },
            Case {
                name: "a folded header line is refused",
                send: "GET / HTTP/1.1\r\nHost: lb\r\nX-A: 1\r\n Content-Length: 5\r\n\r\n",
                statuses: &["HTTP/1.1 400 Bad Request"],
                closed: true,
                check: |_, up| up.map_or(Ok(()), |up| Err(format!("backend read {up:?}"))),
            },
            Case {
                name: "a GET with Content-Length: 0 passes (through hyper)",
                send: "GET /zero HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\n\r\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |_, up| {
                    let up = up.unwrap_or("");
                    up.starts_with("GET /zero HTTP/1.1\r\n")
                        .then_some(())
                        .ok_or(format!("backend read {up:?}"))
                },
            },
            Case {
                name: "bare LF line ends reach the backend as CRLF",
                send: "GET /lf HTTP/1.1\nHost: lb\n\n",
                statuses: &["HTTP/1.1 200 OK"],
                closed: false,
                check: |_, up| {
                    let up = up.unwrap_or("");
                    (up.starts_with("GET /lf HTTP/1.1\r\nHost: lb\r\n")
                        && !up.replace("\r\n", "").contains('\n'))
                    .then_some(())
                    .ok_or(format!("backend read {up:?}"))
                },
            },
        ];
        let mut wrong = Vec::new();
        for case in cases {
            let before = seen.lock().unwrap().len();
            let (answer, closed) = if case.name.starts_with("a head that arrives in pieces") {
                let mut c = TcpStream::connect(p).await.unwrap();
                for b in case.send.as_bytes() {
                    c.write_all(&[*b]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                read_all(&mut c).await
            } else {
                exchange(p, case.send.as_bytes()).await
            };
            // Status lines, also where one follows the previous response's body directly.
            let statuses: Vec<&str> = answer
                .match_indices("HTTP/1.")
                .filter_map(|(i, _)| answer[i..].split("\r\n").next())
                .filter(|l| {
                    l.get(8..12).is_some_and(|c| {
                        c.starts_with(' ') && c[1..].bytes().all(|b| b.is_ascii_digit())
                    })
                })
                .collect();
            let up = seen
                .lock()
                .unwrap()
                .get(before..)
                .and_then(|s| s.last().cloned());
            let checked = (case.check)(&answer, up.as_deref());
            if statuses != case.statuses || closed != case.closed || checked.is_err() {
                wrong.push(format!(
                    "{}: statuses {statuses:?}, closed {closed}, {checked:?}\n{answer}",
                    case.name
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    }

    /// Nagle stays on for a connection's first response written whole (a `Connection: close`
    /// client's only one) and goes off before any write that could wait behind an earlier
    /// unacknowledged segment: a second response, or a response written in pieces.
    #[tokio::test]
    async fn nagle_goes_off_before_the_first_write_that_could_wait_for_an_ack() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = || async {
            let _peer = TcpStream::connect(addr).await.unwrap();
            let (io, _) = l.accept().await.unwrap();
            (
                super::Client {
                    io,
                    nodelay: false,
                    answered: false,
                },
                _peer,
            )
        };
        let (mut one, _peer) = accepted().await;
        one.write(b"HTTP/1.1 200 OK\r\n\r\n", true).await.unwrap();
        one.answered = true;
        assert!(!one.io.nodelay().unwrap(), "set for a lone first response");
        one.write(b"HTTP/1.1 200 OK\r\n\r\n", true).await.unwrap();
        assert!(one.io.nodelay().unwrap(), "not set for a second response");

        let (mut pieces, _peer) = accepted().await;
        pieces.write(b"HTTP/1.1 200 OK\r\n", false).await.unwrap();
        assert!(
            pieces.io.nodelay().unwrap(),
            "not set for a response in pieces"
        );
    }

    /// A client that sends nothing within the header timeout is closed, and one whose backend
    /// is gone gets a 502 and keeps its connection for the next request.
    #[tokio::test]
    async fn idle_clients_time_out_and_a_dead_backend_is_a_502() {
        let (b, _) = backend(answer).await;
        let p = proxy(b, Duration::from_millis(100)).await;
        let mut c = TcpStream::connect(p).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
            .await
            .unwrap();
        // `read_all` gives up after 300 ms without a byte: the close must come before.
        let (answer, closed) = read_all(&mut c).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(
            closed,
            "the idle connection stayed open past the header timeout"
        );

        // A port nothing listens on.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = gone.local_addr().unwrap();
        drop(gone);
        let p = proxy(dead, Duration::from_secs(5)).await;
        let mut c = TcpStream::connect(p).await.unwrap();
        for _ in 0..2 {
            c.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
                .await
                .unwrap();
            let mut got = vec![0u8; 4096];
            let n = c.read(&mut got).await.unwrap();
            let answer = String::from_utf8_lossy(&got[..n]).to_string();
            assert!(answer.starts_with("HTTP/1.1 502 Bad Gateway"), "{answer}");
            assert!(answer.contains("502: backend b1"), "{answer}");
            assert!(field(&answer, "connection").is_none(), "{answer}");
            assert!(
                field(&answer, "date").is_some_and(|d| d.ends_with(" GMT")),
                "{answer}"
            );
        }
    }
}
