//! Request mode's connections to backends: each proxy worker keeps its own idle HTTP/1.1
//! connections per backend address and sends each request on one of them, or on a new one.
//! Here, hyper's client, for requests with a body; those without (nearly all) take the
//! hand-written connections of [`h1`].
//!
//! A connection goes back to the idle list when its response body has been read to the end
//! (only then can HTTP/1.1 carry the next request); one the backend closes, or whose
//! response was abandoned, is dropped. A request that never left (the connection turned
//! out closed before it was written) is sent again on another connection; one that was
//! written is not (it may not be idempotent). Idle connections older than the idle timeout
//! are closed by [`Upstreams::sweep`], and at most `max_idle` are kept per backend.
//!
//! Written for the proxy's hot path in place of hyper-util's general client: no pool key
//! to hash from a URI, no absolute URI to build and parse per request, no boxed bodies; one
//! lock a worker never contends with another.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
};
use hyper_util::rt::TokioIo;

pub mod h1;

/// How long a request waits for an idle connection to become ready before it takes
/// another (or a new one).
const READY_WAIT: Duration = Duration::from_millis(10);

/// Why a request got no response from its backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connect: no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Http(#[source] hyper::Error),
    #[error("{0}")]
    Io(#[source] std::io::Error),
    #[error("the connection closed before a response")]
    Closed,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

/// A new connection to `addr`, Nagle off (a request or response is written whole).
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, UpstreamError> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(timeout))?
        .map_err(UpstreamError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

impl UpstreamError {
    /// Whether the request itself was at fault: its body failed to arrive from the client
    /// (a bad chunk size, say), which hyper reports as an error of the body it was given.
    pub fn is_client_body(&self) -> bool {
        matches!(self, UpstreamError::Http(e) if e.is_user())
    }
}

/// How a worker's backend connections behave.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamLimits {
    pub connect_timeout: Duration,
    /// How long a connection may stay idle before it is closed.
    pub idle_timeout: Duration,
    /// Idle connections kept per backend; more are closed as they come back.
    pub max_idle: usize,
}

/// A backend connection that can tell, while idle, whether it is still open.
trait Reusable {
    fn open(&self) -> bool;
}

impl<B> Reusable for SendRequest<B> {
    fn open(&self) -> bool {
        !self.is_closed()
    }
}

/// One worker's idle connections of one kind, per backend address, oldest first: the newest
/// is reused first (warmest, least likely to have been closed by the backend's own idle
/// timeout). At most `max_idle` per backend; one idle past `idle_timeout`, or closed, is
/// dropped (closing it) where it is met.
struct IdleList<C> {
    limits: UpstreamLimits,
    idle: Mutex<HashMap<SocketAddr, Vec<(C, Instant)>>>,
}

impl<C: Reusable> IdleList<C> {
    fn new(limits: UpstreamLimits) -> IdleList<C> {
        IdleList {
            limits,
            idle: Mutex::new(HashMap::new()),
        }
    }

    fn usable(&self, (conn, since): &(C, Instant)) -> bool {
        since.elapsed() < self.limits.idle_timeout && conn.open()
    }

    /// The newest usable connection to `addr`.
    fn take(&self, addr: SocketAddr) -> Option<C> {
        let mut idle = self.idle.lock().ok()?;
        let conns = idle.get_mut(&addr)?;
        std::iter::from_fn(|| conns.pop())
            .find(|c| self.usable(c))
            .map(|(conn, _)| conn)
    }

    fn put(&self, addr: SocketAddr, conn: C) {
        if !conn.open() {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let conns = idle.entry(addr).or_default();
        if conns.len() >= self.limits.max_idle {
            conns.remove(0);
        }
        conns.push((conn, Instant::now()));
    }

    /// Closes the idle connections past the idle timeout or closed by their backend.
    fn sweep(&self) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        idle.retain(|_, conns| {
            conns.retain(|c| self.usable(c));
            !conns.is_empty()
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.idle.lock().unwrap().values().map(Vec::len).sum()
    }
}

/// One worker's backend connections, for requests with bodies of type `B` (the proxy's:
/// hyper's [`Incoming`]).
pub struct Upstreams<B = Incoming> {
    limits: UpstreamLimits,
    idle: IdleList<SendRequest<B>>,
}

impl<B> Upstreams<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(limits: UpstreamLimits) -> Arc<Upstreams<B>> {
        Arc::new(Upstreams {
            limits,
            idle: IdleList::new(limits),
        })
    }

    /// Sends `req` (origin-form URI, Host set) to `addr` on an idle connection or a new one.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<B>,
    ) -> Result<Response<UpstreamBody<B>>, UpstreamError> {
        while let Some(mut conn) = self.checkout(addr) {
            if !conn.is_ready() {
                // Back from a response just now, its driver not yet polled (a moment), or
                // still sending an earlier request's body the backend answered early (as
                // long as that client takes): not worth waiting for beyond a moment.
                match tokio::time::timeout(READY_WAIT, conn.ready()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => continue,
                    Err(_) => {
                        let pool = self.clone();
                        tokio::spawn(async move {
                            if conn.ready().await.is_ok() {
                                pool.checkin(addr, conn);
                            }
                        });
                        continue;
                    }
                }
            }
            match conn.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(addr, conn, resp)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection closed under it. Another one will do.
                    Some(r) => req = r,
                    None => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
        let mut conn = self.connect(addr).await?;
        let resp = conn.send_request(req).await.map_err(UpstreamError::Http)?;
        Ok(self.wrap(addr, conn, resp))
    }

    /// Closes the idle connections older than the idle timeout.
    pub fn sweep(&self) {
        self.idle.sweep();
    }

    fn checkout(&self, addr: SocketAddr) -> Option<SendRequest<B>> {
        self.idle.take(addr)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<B>, UpstreamError> {
        let stream = connect(addr, self.limits.connect_timeout).await?;
        let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, %addr, "backend connection ended");
            }
        });
        Ok(conn)
    }

    fn wrap(
        self: &Arc<Self>,
        addr: SocketAddr,
        conn: SendRequest<B>,
        resp: Response<Incoming>,
    ) -> Response<UpstreamBody<B>> {
        let back = Some((self.clone(), addr, conn));
        resp.map(|inner| UpstreamBody { inner, back })
    }
}

impl<B> Upstreams<B> {
    fn checkin(&self, addr: SocketAddr, conn: SendRequest<B>) {
        self.idle.put(addr, conn);
    }
}

/// A backend's response body: hands its connection back to the idle list once read to the
/// end (or dropped after its end), and closes it when dropped before.
pub struct UpstreamBody<B = Incoming> {
    inner: Incoming,
    back: Option<(Arc<Upstreams<B>>, SocketAddr, SendRequest<B>)>,
}

impl<B> UpstreamBody<B> {
    fn release(&mut self) {
        if let Some((pool, addr, conn)) = self.back.take() {
            pool.checkin(addr, conn);
        }
    }
}

impl<B> Body for UpstreamBody<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.release(),
            Some(Err(_)) => self.back = None,
            Some(Ok(_)) if self.inner.is_end_stream() => self.release(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for UpstreamBody<B> {
    fn drop(&mut self) {
        // A body nobody read (a HEAD's, a 204's) may already be complete.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt as _, Empty};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// How the test backend answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `body_len` bytes, keeping the connection open.
        KeepAlive { body_len: usize },
        /// Two bytes, then it closes the connection without having said it would (as a
        /// backend whose idle timeout fires does).
        ThenClose,
    }

    /// A raw HTTP/1.1 backend on 127.0.0.1: its address and how many connections it took.
    async fn backend(answer: Answer) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let len = match answer {
                                Answer::KeepAlive { body_len } => body_len,
                                Answer::ThenClose => 2,
                            };
                            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                            if s.write_all(head.as_bytes()).await.is_err()
                                || s.write_all(&vec![b'x'; len]).await.is_err()
                            {
                                return;
                            }
                            if matches!(answer, Answer::ThenClose) {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// A pool for requests with bodies of type `B`.
    fn pool_with_idle<B>(idle_timeout: Duration) -> Arc<Upstreams<B>>
    where
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Upstreams::new(UpstreamLimits {
            connect_timeout: Duration::from_secs(2),
            idle_timeout,
            max_idle: 4,
        })
    }

    fn pool() -> Arc<Upstreams<Empty<Bytes>>> {
        pool_with_idle(Duration::from_secs(60))
    }

    /// One GET to `addr` through `p`, its body read to the end.
    async fn fetch(p: &Arc<Upstreams<Empty<Bytes>>>, addr: SocketAddr) -> Bytes {
        let resp = p.send(addr, get()).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::builder()
            .uri("/")
            .header("host", "backend")
            .body(Empty::new())
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_carries_the_next_request_once_its_response_is_read() {
        let (addr, accepted) = backend(Answer::KeepAlive { body_len: 2 }).await;
        let p = pool();
        for _ in 0..5 {
            assert_eq!(&fetch(&p, addr).await[..], b"xx");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_reused() {
        let (addr, accepted) = backend(Answer::ThenClose).await;
        let p = pool();
        for _ in 0..3 {
            fetch(&p, addr).await;
            // Let the connection's driver see the backend's close, as it would between
            // two requests some time apart.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_takes_its_connection_with_it() {
        let (addr, accepted) = backend(Answer::KeepAlive { body_len: 1 << 20 }).await;
        let p = pool();
        let mut body = p.send(addr, get()).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        // The rest of that body is still on its way: the next request needs another
        // connection, and gets all of its own body.
        assert_eq!(fetch(&p, addr).await.len(), 1 << 20);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_still_sending_a_body_does_not_hold_up_the_next_request() {
        use http_body_util::channel::Channel;
        // The backend answers on the headers alone; the first request's body never ends
        // (a slow upload), so its connection cannot carry another request yet.
        let (addr, accepted) = backend(Answer::KeepAlive { body_len: 2 }).await;
        let p = pool_with_idle::<Channel<Bytes>>(Duration::from_secs(60));
        let post = |len: usize, body| {
            Request::post("/")
                .header("host", "backend")
                .header("content-length", len)
                .body(body)
                .unwrap()
        };
        let (mut upload, body) = Channel::new(1);
        upload.send_data(Bytes::from_static(b"x")).await.unwrap();
        let first = p.send(addr, post(1000, body)).await.unwrap();
        first.into_body().collect().await.unwrap();
        let (_done, empty) = Channel::<Bytes>::new(1);
        drop(_done);
        let second = tokio::time::timeout(Duration::from_secs(2), p.send(addr, post(0, empty)))
            .await
            .expect("the second request is not held up by the first one's upload");
        assert_eq!(second.unwrap().status(), 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(upload);
    }

    #[tokio::test]
    async fn idle_connections_past_their_timeout_are_closed() {
        let (addr, accepted) = backend(Answer::KeepAlive { body_len: 2 }).await;
        let p = pool_with_idle(Duration::from_millis(50));
        fetch(&p, addr).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        p.sweep();
        assert_eq!(p.idle.len(), 0);
        fetch(&p, addr).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_backend_is_a_connect_error() {
        // A port just freed: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let Err(e) = pool().send(addr, get()).await else {
            panic!("a response from nowhere");
        };
        assert!(matches!(e, UpstreamError::Connect(_)), "{e}");
        assert!(!e.is_client_body());
    }
}
