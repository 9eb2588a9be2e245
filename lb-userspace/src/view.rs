//! What a request-mode proxy balances over: the daemon derives a [`View`] from its state on
//! every change and publishes it; the proxy's workers pick from the latest one. A leaf
//! module, so that neither side depends on the other.

use std::net::SocketAddr;

use crate::config::Route;

/// A backend that can take requests, with its share of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    pub id: u32,
    pub name: String,
    pub pool: String,
    pub addr: SocketAddr,
    /// Fraction of requests (0–1) the weighted pick gives it.
    pub share: f64,
}

/// What the proxy of one service balances over, as of the last change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub service: String,
    /// Eligible backends only (healthy, ready, weight > 0, in a pool with weight).
    pub upstreams: Vec<Upstream>,
    /// Backends eligible within their pool, whatever the pool's weight: canary routes
    /// send to a pool even when its weight is 0.
    pub routable: Vec<Upstream>,
    pub routes: Vec<Route>,
}
