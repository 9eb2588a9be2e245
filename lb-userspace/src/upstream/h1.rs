//! Requests without a body (GETs, mostly: nearly every request a proxy carries) go to their
//! backend on hand-written HTTP/1.1 connections: the request head is written in one system
//! call, the response head parsed (httparse) where it was read, and a body that came with its
//! head is handed on whole. hyper's client, which the proxy keeps for requests with a body,
//! costs a task and two channels per connection and the hand-offs between them on every
//! request: lbd spent 4.0–4.6 µs of user time per keep-alive request through it, 3.1–3.6 µs
//! this way (nginx: 2.2–2.6), in the same runs (BENCHMARKS.md's topology, 4 runs against 11).
//!
//! The response is read as RFC 9112 §6.3 frames it: no body for a HEAD or a 204/304; chunked
//! when the last transfer coding is chunked (any other transfer coding is refused); else
//! `Content-Length` (values that disagree are refused); else until the backend closes. 1xx
//! interim responses are skipped. A connection is kept for the next request only when its
//! response was read to its end with nothing after it, by its length or its last chunk, and
//! neither side said `close` (HTTP/1.0: unless the backend said `keep-alive`).
//!
//! A kept connection the backend closes while idle is seen at checkout (the reactor has
//! marked it readable) and dropped. One that closes after the request was written, before a
//! byte of response, is retried on another connection for a safe method (GET, HEAD,
//! OPTIONS, TRACE: RFC 9110 §9.2.2 allows it) and a 502 otherwise.

use std::{
    future::Future as _,
    io,
    mem::MaybeUninit,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::{Buf as _, Bytes, BytesMut};
use hyper::{
    Response, StatusCode, Version,
    body::{Body, Frame, SizeHint},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::request::Parts,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{IdleList, Reusable, UpstreamError, UpstreamLimits, connect};

/// The most a response head (status line, headers, interim responses) may take.
const MAX_HEAD: usize = 64 * 1024;
/// The most headers a response may have.
pub const MAX_HEADERS: usize = 100;
/// The most a chunk-size line (with its extensions) or the trailer section may take.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// Read buffer: what one read asks for at least.
const READ_CHUNK: usize = 8 * 1024;

/// One open backend connection and what has been read from it and not yet used.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

impl Reusable for Conn {
    /// Still open with nothing unread, as far as the reactor has seen: a close (or bytes
    /// nobody asked for) marks it readable.
    fn open(&self) -> bool {
        match self
            .io
            .poll_read_ready(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

impl Conn {
    /// Reads more into the buffer's spare room; `Ok(0)` at the end of the stream. Through
    /// `AsyncRead`, which forgets the socket's readiness after a read that did not fill the
    /// buffer: a kept connection then shows readable again only when something arrives, and
    /// [`Reusable::open`] costs no system call.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        // `read_buf`'s future keeps no state of its own between polls: a fresh one per poll
        // reads into the spare capacity as it would.
        std::pin::pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// One worker's hand-written backend connections, per backend address.
pub struct H1Pool {
    limits: UpstreamLimits,
    idle: IdleList<Conn>,
}

/// How a failed attempt on one connection ended.
enum Failed {
    /// The request was not (all) written: no backend acts on part of a head.
    Unsent(UpstreamError),
    /// The connection closed before a byte of response: the backend may or may not have
    /// acted on the request.
    Unanswered(UpstreamError),
    /// Anything after the first byte of response.
    Answered(UpstreamError),
}

impl H1Pool {
    pub fn new(limits: UpstreamLimits) -> Arc<H1Pool> {
        Arc::new(H1Pool {
            limits,
            idle: IdleList::new(limits),
        })
    }

    /// Sends a request without a body (`parts`: origin-form URI, Host set, hop-by-hop
    /// headers gone) to `addr` on a kept connection or a new one, and reads the response's
    /// head.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        parts: &Parts,
    ) -> Result<Response<H1Body>, UpstreamError> {
        let head = encode_head(parts);
        let (head, body) = self
            .send_head(addr, &head, parts.method.as_str().as_bytes())
            .await?;
        head.into_response(body)
    }

    /// Sends a request head already encoded (`method` is its method: whether the response
    /// has a body, whether a failed attempt may be retried) as [`H1Pool::send`] does; the
    /// response's head as it came.
    pub async fn send_head(
        self: &Arc<Self>,
        addr: SocketAddr,
        head: &[u8],
        method: &[u8],
    ) -> Result<(Head, H1Body), UpstreamError> {
        let head_only = method == b"HEAD";
        let safe = matches!(method, b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE");
        while let Some(conn) = self.idle.take(addr) {
            match self.exchange(addr, conn, head, head_only).await {
                Ok(resp) => return Ok(resp),
                Err(Failed::Unsent(_)) => continue,
                Err(Failed::Unanswered(_)) if safe => continue,
                Err(Failed::Unanswered(e) | Failed::Answered(e)) => return Err(e),
            }
        }
        let conn = Conn {
            io: connect(addr, self.limits.connect_timeout).await?,
            buf: BytesMut::with_capacity(READ_CHUNK),
        };
        self.exchange(addr, conn, head, head_only)
            .await
            .map_err(|(Failed::Unsent(e) | Failed::Unanswered(e) | Failed::Answered(e))| e)
    }

    /// Closes the idle connections older than the idle timeout or closed by their backend.
    pub fn sweep(&self) {
        self.idle.sweep();
    }

    /// Keeps a connection whose response was read to its end for the next request, unless
    /// something came after that end (nothing may: it would be taken for the next answer).
    fn checkin(&self, addr: SocketAddr, conn: Conn) {
        if conn.buf.is_empty() {
            self.idle.put(addr, conn);
        }
    }

    async fn exchange(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut conn: Conn,
        head: &[u8],
        head_only: bool,
    ) -> Result<(Head, H1Body), Failed> {
        conn.io
            .write_all(head)
            .await
            .map_err(|e| Failed::Unsent(UpstreamError::Io(e)))?;
        let mut answered = false;
        let parsed = loop {
            match parse_head(&mut conn.buf, head_only).map_err(Failed::Answered)? {
                Some(p) => break p,
                None if conn.buf.len() >= MAX_HEAD => {
                    return Err(Failed::Answered(UpstreamError::Invalid(
                        "the response head is too large",
                    )));
                }
                None => {}
            }
            match conn.fill().await {
                Ok(0) if !answered => return Err(Failed::Unanswered(UpstreamError::Closed)),
                Err(e) if !answered => return Err(Failed::Unanswered(UpstreamError::Io(e))),
                Ok(0) => {
                    return Err(Failed::Answered(UpstreamError::Invalid(
                        "the backend closed the connection inside the response head",
                    )));
                }
                Err(e) => return Err(Failed::Answered(UpstreamError::Io(e))),
                Ok(_) => answered = true,
            }
        };
        let Parsed {
            head,
            framing,
            reusable,
        } = parsed;
        let back = (self.clone(), addr);
        let body = match framing {
            Framing::Length(n) if conn.buf.len() as u64 >= n => {
                let data = conn.buf.split_to(n as usize).freeze();
                H1Body::whole(data, reusable.then_some((back, conn)))
            }
            framing => H1Body {
                inner: Inner::Stream(Box::new(Stream {
                    conn,
                    decode: match framing {
                        Framing::Length(n) => Decode::Length(n),
                        Framing::Chunked => Decode::Chunked(Chunk::Size, 0),
                        Framing::Eof => Decode::Eof,
                    },
                    reusable,
                    back,
                })),
            },
        };
        Ok((head, body))
    }
}

/// The request head: `METHOD target HTTP/1.1`, the headers as they are.
fn encode_head(parts: &Parts) -> Vec<u8> {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let size = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + target.len()
        + 32;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    Eof,
}

struct Parsed {
    head: Head,
    framing: Framing,
    /// The connection may carry another request once this body has been read.
    reusable: bool,
}

/// A backend's final response head (interim responses skipped) as it came, and what of it
/// is this hop's framing: the proxy passes the rest on from these bytes, without a header
/// map ([`Head::fields`]), or as hyper's response ([`Head::into_response`]).
pub struct Head {
    /// Status line to blank line.
    bytes: Bytes,
    pub status: StatusCode,
    pub version: Version,
    /// A chunked body is decoded here and framed anew: its `Transfer-Encoding` and any
    /// `Content-Length` beside it are this hop's.
    dechunked: bool,
    /// A length given as several elements (`6, 6`: one length to us, not to everyone), to be
    /// passed on once, as one number, instead of the fields as they came.
    one_length: Option<u64>,
}

impl Head {
    /// The head's fields, parsed again from its bytes into `slots` (they parsed before).
    pub fn fields<'h>(
        &'h self,
        slots: &'h mut [MaybeUninit<httparse::Header<'h>>; MAX_HEADERS],
    ) -> &'h [httparse::Header<'h>] {
        let mut r = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut r,
            &self.bytes,
            slots,
        ) {
            Ok(httparse::Status::Complete(_)) => r.headers,
            _ => &[],
        }
    }

    /// Whether the field `name` is the message's, not this hop's framing.
    pub fn passes_on(&self, name: &str) -> bool {
        let length = name.eq_ignore_ascii_case("content-length");
        !((self.dechunked && (length || name.eq_ignore_ascii_case("transfer-encoding")))
            || (length && self.one_length.is_some()))
    }

    /// The `Content-Length` to send in place of the backend's, when it gave one as a list.
    pub fn one_length(&self) -> Option<u64> {
        self.one_length.filter(|_| !self.dechunked)
    }

    /// As hyper's response, with the fields [`Head::passes_on`] keeps (values cut from the
    /// head's bytes without a copy).
    pub fn into_response<B>(self, body: B) -> Result<Response<B>, UpstreamError> {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let fields = self.fields(&mut slots);
        let mut map = HeaderMap::with_capacity(fields.len());
        for h in fields.iter().filter(|h| self.passes_on(h.name)) {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| UpstreamError::Invalid("a response header name is invalid"))?;
            let value = HeaderValue::from_maybe_shared(self.bytes.slice_ref(h.value))
                .map_err(|_| UpstreamError::Invalid("a response header value is invalid"))?;
            map.append(name, value);
        }
        if let Some(n) = self.one_length() {
            map.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.version_mut() = self.version;
        *response.headers_mut() = map;
        Ok(response)
    }
}

/// Parses the response head at the start of `buf`, taking it (and any interim responses
/// before it) out; `None` while it is incomplete.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Parsed>, UpstreamError> {
    loop {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut r, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(UpstreamError::Invalid("the response head does not parse")),
        };
        let code = r.code.unwrap_or(0);
        if code == 101 {
            return Err(UpstreamError::Invalid(
                "101 Switching Protocols to a request that asked for no upgrade",
            ));
        }
        if (100..200).contains(&code) {
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code)
            .map_err(|_| UpstreamError::Invalid("the response's status code is invalid"))?;
        let version = if r.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let mut length: Option<u64> = None;
        // Elements of all Content-Length fields: one (nearly always) is passed on as it came.
        let mut lengths = 0;
        let (mut chunked, mut coded, mut close, mut keep_alive) = (false, false, false, false);
        for h in r.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                for v in split_list(h.value) {
                    let n = std::str::from_utf8(v)
                        .ok()
                        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or(UpstreamError::Invalid("Content-Length is not a number"))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(UpstreamError::Invalid("Content-Length values disagree"));
                    }
                    length = Some(n);
                    lengths += 1;
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                for v in split_list(h.value) {
                    coded = true;
                    chunked = v.eq_ignore_ascii_case(b"chunked");
                }
            } else if h.name.eq_ignore_ascii_case("connection") {
                for v in split_list(h.value) {
                    close |= v.eq_ignore_ascii_case(b"close");
                    keep_alive |= v.eq_ignore_ascii_case(b"keep-alive");
                }
            }
        }
        let framing = if head_only || code == 204 || code == 304 {
            Framing::Length(0)
        } else if coded {
            if !chunked {
                return Err(UpstreamError::Invalid(
                    "a transfer coding other than chunked",
                ));
            }
            Framing::Chunked
        } else {
            length.map_or(Framing::Eof, Framing::Length)
        };
        let reusable = !close
            && (version == Version::HTTP_11 || keep_alive)
            && framing != Framing::Eof
            // Both framings named: read as chunked, but not trusted with another request.
            && !(coded && length.is_some());
        let head = Head {
            bytes: buf.split_to(len).freeze(),
            status,
            version,
            dechunked: framing == Framing::Chunked,
            one_length: length.filter(|_| lengths > 1),
        };
        return Ok(Some(Parsed {
            head,
            framing,
            reusable,
        }));
    }
}

/// The elements of a comma-separated header value, trimmed, empty ones skipped.
pub fn split_list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|v| v.trim_ascii())
        .filter(|v| !v.is_empty())
}

/// A response body from a hand-written connection.
pub struct H1Body {
    inner: Inner,
}

enum Inner {
    /// Came whole with its head (or has none): handed on as one frame.
    Whole(Option<Bytes>),
    /// Read from its connection as it is polled.
    Stream(Box<Stream>),
    Done,
}

struct Stream {
    conn: Conn,
    decode: Decode,
    reusable: bool,
    back: (Arc<H1Pool>, SocketAddr),
}

#[derive(Clone, Copy)]
enum Decode {
    /// Bytes left.
    Length(u64),
    /// Where in the chunked coding, and the trailer bytes seen so far.
    Chunked(Chunk, usize),
    Eof,
}

#[derive(Clone, Copy)]
enum Chunk {
    Size,
    /// Bytes left in this chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

impl H1Body {
    /// A body already read; its connection goes back to the pool now (when it may).
    fn whole(data: Bytes, back: Option<((Arc<H1Pool>, SocketAddr), Conn)>) -> H1Body {
        if let Some(((pool, addr), conn)) = back {
            pool.checkin(addr, conn);
        }
        H1Body {
            inner: Inner::Whole((!data.is_empty()).then_some(data)),
        }
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Stream {
    /// The next data frame from what is buffered: `Some(None)` at the body's end, `None`
    /// when more must be read.
    fn next(&mut self) -> io::Result<Option<Option<Bytes>>> {
        let buf = &mut self.conn.buf;
        loop {
            match &mut self.decode {
                Decode::Length(0) => return Ok(Some(None)),
                Decode::Length(left) | Decode::Chunked(Chunk::Data(left), _) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(buf.len() as u64);
                    *left -= n;
                    let data = buf.split_to(n as usize).freeze();
                    if let Decode::Chunked(c @ Chunk::Data(0), _) = &mut self.decode {
                        *c = Chunk::DataEnd;
                    }
                    return Ok(Some(Some(data)));
                }
                Decode::Eof => {
                    return Ok((!buf.is_empty()).then(|| Some(buf.split().freeze())));
                }
                Decode::Chunked(Chunk::DataEnd, _) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid("a chunk does not end with CRLF"));
                    }
                    buf.advance(2);
                    self.decode = Decode::Chunked(Chunk::Size, 0);
                }
                Decode::Chunked(Chunk::Size, _) => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(invalid("a chunk-size line is too long"));
                        }
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.decode = Decode::Chunked(
                        if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        },
                        0,
                    );
                }
                Decode::Chunked(Chunk::Trailers, seen) => {
                    let Some(end) = find_crlf(buf) else {
                        if *seen + buf.len() > MAX_TRAILERS {
                            return Err(invalid("the trailer section is too large"));
                        }
                        return Ok(None);
                    };
                    // Trailer fields are dropped (as hyper's server would not send them).
                    *seen += end + 2;
                    buf.advance(end + 2);
                    if end == 0 {
                        self.decode = Decode::Length(0);
                    } else if *seen > MAX_TRAILERS {
                        return Err(invalid("the trailer section is too large"));
                    }
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// `1*HEXDIG [ BWS ";" chunk-ext ]`; extensions are ignored.
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 16 || !(rest.is_empty() || rest[0] == b';') {
        return Err(invalid("a chunk size does not parse"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| invalid("chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| invalid("a chunk size does not parse"))
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let s = match &mut this.inner {
            Inner::Whole(data) => {
                let frame = data.take().map(|d| Ok(Frame::data(d)));
                this.inner = Inner::Done;
                return Poll::Ready(frame);
            }
            Inner::Done => return Poll::Ready(None),
            Inner::Stream(s) => s,
        };
        loop {
            match s.next() {
                Err(e) => {
                    this.inner = Inner::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Some(Some(data))) => {
                    if matches!(s.decode, Decode::Length(0)) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Some(None)) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
            }
            match std::task::ready!(s.conn.poll_fill(cx)) {
                Ok(0) if matches!(s.decode, Decode::Eof) => {
                    this.inner = Inner::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.inner = Inner::Done;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed the connection inside the response body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.inner = Inner::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Whole(data) => data.is_none(),
            Inner::Done => true,
            Inner::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Done => SizeHint::with_exact(0),
            Inner::Stream(s) => match s.decode {
                Decode::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
        }
    }
}

impl H1Body {
    /// The body has been read to its end: its connection goes back to the pool when it may
    /// carry another request (nothing read past the end).
    fn finish(&mut self) {
        if let Inner::Stream(s) = std::mem::replace(&mut self.inner, Inner::Done) {
            let Stream {
                conn,
                reusable,
                back,
                ..
            } = *s;
            if reusable {
                back.0.checkin(back.1, conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use http_body_util::BodyExt as _;
    use hyper::{Method, Request};
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    /// What the test backend does with a request.
    enum Act {
        /// Writes these bytes, a few at a time (so that every parser state meets a read
        /// boundary), and keeps the connection.
        Answer(&'static [u8]),
        /// Writes these bytes, then closes.
        AnswerAndClose(&'static [u8]),
        /// Closes without a word (an idle timeout that fired just as the request came).
        Close,
    }

    type Script = fn(conn: usize, request: usize) -> Act;

    /// A raw HTTP/1.1 backend: its address, how many connections it took, and the request
    /// heads it read.
    async fn backend(
        script: impl Fn(usize, usize) -> Act + Send + Sync + 'static,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
        let script = Arc::new(script);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let conn = count.fetch_add(1, Ordering::SeqCst);
                let (seen, script) = (seen.clone(), script.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut request = 0;
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            seen.lock().unwrap().push(String::from_utf8(head).unwrap());
                            let (bytes, close) = match script(conn, request) {
                                Act::Answer(b) => (b, false),
                                Act::AnswerAndClose(b) => (b, true),
                                Act::Close => return,
                            };
                            request += 1;
                            for piece in bytes.chunks(3) {
                                if s.write_all(piece).await.is_err() {
                                    return;
                                }
                                tokio::task::yield_now().await;
                            }
                            if close {
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
        (addr, accepted, heads)
    }

    fn pool() -> Arc<H1Pool> {
        H1Pool::new(UpstreamLimits {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            max_idle: 4,
        })
    }

    fn parts(method: Method) -> Parts {
        Request::builder()
            .method(method)
            .uri("/path?q=1")
            .header("host", "backend")
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    /// One request through `p`: its response's head and its whole body.
    async fn fetch(
        p: &Arc<H1Pool>,
        addr: SocketAddr,
        method: Method,
    ) -> Result<(Response<()>, Bytes), String> {
        let resp = p
            .send(addr, &parts(method))
            .await
            .map_err(|e| e.to_string())?;
        let (head, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((Response::from_parts(head, ()), body))
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Backend: b1\r\n\r\nlegacy";

    #[tokio::test]
    async fn requests_without_a_body_share_one_kept_connection() {
        let (addr, accepted, heads) = backend(|_, _| Act::Answer(OK)).await;
        let p = pool();
        for _ in 0..5 {
            let (resp, body) = fetch(&p, addr, Method::GET).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-backend"], "b1");
            assert_eq!(resp.headers()["content-length"], "6");
            assert_eq!(&body[..], b"legacy");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(
            heads.lock().unwrap()[0],
            "GET /path?q=1 HTTP/1.1\r\nhost: backend\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_chunked_response_is_decoded_across_reads_and_its_connection_kept() {
        let (addr, accepted, _) = backend(|_, _| {
            Act::Answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Backend: b1\r\n\r\n\
                  5;ext=\"a\"\r\nhello\r\n6 \r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
            )
        })
        .await;
        let p = pool();
        for _ in 0..2 {
            let (resp, body) = fetch(&p, addr, Method::GET).await.unwrap();
            assert_eq!(&body[..], b"hello world");
            // The proxy frames the body towards its client itself.
            assert!(resp.headers().get("transfer-encoding").is_none());
            assert_eq!(resp.headers()["x-backend"], "b1");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_without_a_length_is_read_to_the_close_and_its_connection_not_kept() {
        let (addr, accepted, _) =
            backend(|_, _| Act::AnswerAndClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")).await;
        let p = pool();
        for _ in 0..2 {
            assert_eq!(
                &fetch(&p, addr, Method::GET).await.unwrap().1[..],
                b"until the end"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn head_204_and_304_have_no_body_and_interim_responses_are_skipped() {
        let (addr, accepted, _) = backend(|_, request| {
            Act::Answer(match request {
                0 => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                1 => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
                2 => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                _ => OK,
            })
        })
        .await;
        let p = pool();
        let (resp, body) = fetch(&p, addr, Method::HEAD).await.unwrap();
        assert_eq!((resp.status().as_u16(), body.len()), (200, 0));
        // A HEAD's length is the length a GET would have had: passed on as it is.
        assert_eq!(resp.headers()["content-length"], "10");
        let (resp, body) = fetch(&p, addr, Method::GET).await.unwrap();
        assert_eq!((resp.status().as_u16(), body.len()), (204, 0));
        let (resp, body) = fetch(&p, addr, Method::GET).await.unwrap();
        assert_eq!((resp.status().as_u16(), body.len()), (304, 0));
        // None of those left a byte behind: the fourth answer is read whole.
        assert_eq!(
            &fetch(&p, addr, Method::GET).await.unwrap().1[..],
            b"legacy"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_kept_connection_closed_before_answering_is_retried_for_a_get_only() {
        // The first connection answers once, then closes on the next request unanswered.
        let script: Script = |conn, request| match (conn, request) {
            (0, 0) => Act::Answer(OK),
            (0, _) => Act::Close,
            _ => Act::Answer(OK),
        };
        let (addr, accepted, _) = backend(script).await;
        let p = pool();
        fetch(&p, addr, Method::GET).await.unwrap();
        assert_eq!(
            &fetch(&p, addr, Method::GET).await.unwrap().1[..],
            b"legacy"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        let (addr, accepted, _) = backend(script).await;
        let p = pool();
        fetch(&p, addr, Method::POST).await.unwrap();
        let e = fetch(&p, addr, Method::POST).await.unwrap_err();
        assert!(e.contains("closed before a response"), "{e}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_kept_connection_its_backend_closed_while_idle_is_not_used() {
        let (addr, accepted, _) = backend(|_, _| Act::AnswerAndClose(OK)).await;
        let p = pool();
        for _ in 0..3 {
            fetch(&p, addr, Method::POST).await.unwrap();
            // The close reaches lbd while the connection is idle.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn malformed_responses_are_errors_and_their_connections_are_not_kept() {
        // Each answers its first request with this, every later one with OK.
        let cases: [(&str, &[u8]); 6] = [
            (
                "two lengths",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            ),
            (
                "a transfer coding not chunked",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx",
            ),
            (
                "a chunk size that is not hex",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
            ),
            (
                "a chunk longer than its size",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxxx\r\n0\r\n\r\n",
            ),
            ("a status line that is not one", b"HTTP/1.1 2x0 OK\r\n\r\n"),
            (
                "bytes after the response",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nxxHTTP/1.1 200 OK\r\n",
            ),
        ];
        for (what, bad) in cases {
            let (addr, accepted, _) =
                backend(move |c, _| Act::Answer(if c == 0 { bad } else { OK })).await;
            let p = pool();
            let first = fetch(&p, addr, Method::GET).await;
            if what == "bytes after the response" {
                assert_eq!(&first.unwrap().1[..], b"xx", "{what}");
            } else {
                assert!(first.is_err(), "{what}: {first:?}");
            }
            // The next request gets a connection of its own and its whole answer.
            let next = fetch(&p, addr, Method::GET).await.unwrap().1;
            assert!(next == b"legacy"[..], "{what}: {} bytes", next.len());
            assert_eq!(accepted.load(Ordering::SeqCst), 2, "{what}");
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_with_it() {
        static BIG: std::sync::OnceLock<&'static [u8]> = std::sync::OnceLock::new();
        let script: Script = |c, _| {
            Act::Answer(if c == 0 {
                BIG.get_or_init(|| {
                    let mut v = b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n".to_vec();
                    v.resize(v.len() + 65536, b'x');
                    v.leak()
                })
            } else {
                OK
            })
        };
        let (addr, accepted, _) = backend(script).await;
        let p = pool();
        let mut body = p.send(addr, &parts(Method::GET)).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        let next = fetch(&p, addr, Method::GET).await.unwrap().1;
        assert!(next == b"legacy"[..], "{} bytes", next.len());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn chunk_sizes_parse_as_hex_with_extensions_and_nothing_else() {
        assert_eq!(parse_chunk_size(b"1a").unwrap(), 26);
        assert_eq!(parse_chunk_size(b"A;name=value").unwrap(), 10);
        assert_eq!(parse_chunk_size(b"0 ; x").unwrap(), 0);
        for bad in [&b""[..], b";x", b"-1", b"1x", b"0x10", b"11111111111111111"] {
            assert!(
                parse_chunk_size(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
