//! The admin HTTP endpoint (`daemon.metrics`, 127.0.0.1:9091 by default): `/metrics`,
//! `/live` (the process serves), `/ready` (data plane attached and every checked
//! backend checked at least once).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::time::Duration;

use crate::listener::{Cap, Listeners, accept_loop};
use tokio::sync::{mpsc, oneshot};

/// A scrape for the owner task to answer with the metrics text.
pub struct Scrape {
    pub reply: oneshot::Sender<String>,
}

/// What `/ready` looks at besides the listeners.
#[derive(Clone)]
pub struct Readiness {
    /// Data plane attached and every checked backend checked once.
    pub checked: Arc<AtomicBool>,
    /// Every listener's state: not ready while one cannot accept.
    pub listeners: Listeners,
}

/// Serves the endpoint until the task is dropped: at most `cap` connections at once, each
/// closed when it sends no complete request head within `timeout` (idle keep-alive included).
pub async fn serve(
    addr: SocketAddr,
    to_owner: mpsc::Sender<Scrape>,
    ready: Readiness,
    cap: Cap,
    timeout: Duration,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    tracing::info!(%addr, "metrics endpoint listening");
    accept_loop(listener, cap, move |(stream, _), slot| {
        let (to_owner, ready) = (to_owner.clone(), ready.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| handle(req, to_owner.clone(), ready.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    })
    .await
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    to_owner: mpsc::Sender<Scrape>,
    ready: Readiness,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let (tx, rx) = oneshot::channel();
            let body = match to_owner.send(Scrape { reply: tx }).await {
                Ok(()) => rx.await.ok(),
                Err(_) => None,
            };
            match body {
                Some(b) => {
                    let mut r = text(StatusCode::OK, b);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                    );
                    r
                }
                None => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
            }
        }
        "/live" => text(StatusCode::OK, "ok\n"),
        "/ready" => {
            let failing = ready.listeners.failing();
            if !failing.is_empty() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: cannot accept on {}\n", failing.join(", ")),
                )
            } else if !ready.checked.load(Ordering::Relaxed) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: first round of health checks not done\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /live or /ready\n"),
    })
}
