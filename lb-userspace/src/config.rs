//! The config file (TOML, see INTERFACE.md). Parsing validates everything a later step would
//! trip on, and every error names the file and the line:column (or the key) at fault.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de::Error as _};
use toml::Spanned;

/// A config file that cannot be used, located as precisely as the problem allows.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A syntax or value error at a known place.
    #[error("{path}:{line}:{col}: {msg}")]
    At {
        path: PathBuf,
        line: usize,
        col: usize,
        msg: String,
    },
    /// A problem that belongs to no single place (e.g. a limit over the whole file).
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

/// Shortest health-check interval: a shorter one only flaps tables (1 ns rebuilt 345 tables
/// in 9 s).
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(50);
/// Bounds of the flow idle timeouts (`daemon.tcp_established_timeout` and the like).
const MIN_FLOW_TIMEOUT: Duration = Duration::from_secs(1);
// The XDP flow cache takes an entry refreshed within `REFRESH_NS` to be alive.
const _: () = assert!(MIN_FLOW_TIMEOUT.as_nanos() >= lb_common::conntrack::REFRESH_NS as u128);
/// Shortest `tcp_syn_reclaim`: below it, clients far away (a round trip of 100 ms and more)
/// would lose their handshakes to a flood's SYNs.
const MIN_SYN_RECLAIM: Duration = Duration::from_millis(100);
const MAX_FLOW_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a closed TCP flow keeps its SNAT port (`Tunables::tcp_closed_reuse_ns`).
const CLOSED_REUSE: Duration =
    Duration::from_nanos(lb_common::Tunables::DEFAULT.tcp_closed_reuse_ns);

/// Bounds of `daemon.conntrack_max`: below, a handful of clients fill it; above, the two
/// maps would take gigabytes of kernel memory.
pub const MIN_CONNTRACK: u32 = 1024;
pub const MAX_CONNTRACK: u32 = 1 << 24;

/// Largest accepted weight (pool or backend).
pub const MAX_WEIGHT: u32 = 1000;

/// A pool or backend weight, 0–1000.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Weight(pub u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        if !(0..=MAX_WEIGHT as i64).contains(&v) {
            return Err(D::Error::custom(format!(
                "weight {v} is out of range 0-{MAX_WEIGHT}"
            )));
        }
        Ok(Weight(v as u32))
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        D::Error::custom(format!(
            "invalid duration {s:?}: {e} (e.g. \"500ms\", \"2s\")"
        ))
    })
}

/// Validates `[service.rollout]` against the service's pools.
fn rollout(
    name: &str,
    r: RawRollout,
    pools: &[Pool],
    at: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<Rollout, ConfigError> {
    for pool in [&r.baseline, &r.canary] {
        if !pools.iter().any(|p| p.name == *pool.get_ref()) {
            return Err(at(
                pool.span(),
                format!(
                    "service {name:?}: rollout pool {:?} is not a pool of the service",
                    pool.get_ref()
                ),
            ));
        }
    }
    if r.baseline.get_ref() == r.canary.get_ref() {
        return Err(at(
            r.canary.span(),
            format!("service {name:?}: rollout baseline and canary must be different pools"),
        ));
    }
    let steps = r.steps.get_ref();
    if steps.is_empty()
        || steps.iter().any(|s| *s == 0 || *s > 100)
        || steps.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(at(
            r.steps.span(),
            format!(
                "service {name:?}: rollout steps must be canary shares in % (1-100), increasing, e.g. [5, 20, 50, 100]"
            ),
        ));
    }
    // Section-wide errors point at its first key (a table's own span is not its header).
    let section = r.baseline.span();
    if r.interval < Duration::from_millis(100) {
        return Err(at(
            section,
            format!("service {name:?}: rollout interval must be at least 100ms"),
        ));
    }
    if *r.threshold.get_ref() == 0 {
        return Err(at(
            r.threshold.span(),
            format!("service {name:?}: rollout threshold must be at least 1"),
        ));
    }
    for (key, v, max) in [
        ("max_error_ratio", &r.max_error_ratio, 1.0),
        ("max_error_ratio_increase", &r.max_error_ratio_increase, 1.0),
        ("max_p99_ratio", &r.max_p99_ratio, f64::MAX),
    ] {
        if let Some(v) = v {
            let x = *v.get_ref();
            if !(x.is_finite() && x >= 0.0 && x <= max) {
                return Err(at(
                    v.span(),
                    format!("service {name:?}: rollout {key} = {x} is out of range"),
                ));
            }
        }
    }
    let gates = r.max_error_ratio.is_some()
        || r.max_error_ratio_increase.is_some()
        || r.max_p99_ratio.is_some()
        || r.max_p99.is_some();
    if !gates {
        return Err(at(
            section,
            format!(
                "service {name:?}: a rollout needs at least one gate (max_error_ratio, max_error_ratio_increase, max_p99_ratio, max_p99)"
            ),
        ));
    }
    Ok(Rollout {
        baseline: r.baseline.into_inner(),
        canary: r.canary.into_inner(),
        steps: r.steps.into_inner(),
        interval: r.interval,
        threshold: r.threshold.into_inner(),
        min_samples: r.min_samples,
        max_error_ratio: r.max_error_ratio.map(|v| v.into_inner()),
        max_error_ratio_increase: r.max_error_ratio_increase.map(|v| v.into_inner()),
        max_p99_ratio: r.max_p99_ratio.map(|v| v.into_inner()),
        max_p99: r.max_p99,
        on_failure: r.on_failure,
    })
}

/// An optional duration.
fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// A path, or `""` for none.
fn optional_path<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

fn port_range<'de, D: Deserializer<'de>>(d: D) -> Result<(u16, u16), D::Error> {
    let s = String::deserialize(d)?;
    let parsed = s
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
    match parsed {
        Some((a, b)) if a >= 1024 && a <= b => Ok((a, b)),
        _ => Err(D::Error::custom(format!(
            "invalid port range {s:?}: want \"LOW-HIGH\" with 1024 <= LOW <= HIGH <= 65535"
        ))),
    }
}

/// Where and how the XDP program attaches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, else generic (skb) mode.
    #[default]
    Auto,
    /// Native mode only; fail if the driver lacks it.
    Native,
    /// Generic (skb) mode.
    Skb,
}

/// The `[daemon]` section.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Daemon {
    /// Interfaces the XDP program attaches to (ingress).
    pub interfaces: Vec<String>,
    /// Attach mode.
    pub xdp_mode: XdpMode,
    /// The control socket's path (created 0600).
    pub control_socket: PathBuf,
    /// Address of the admin HTTP endpoint (/metrics, /live, /ready).
    pub metrics: SocketAddr,
    /// bpffs directory for this instance's pins.
    pub pin_dir: PathBuf,
    /// SNAT source ports, "LOW-HIGH"; must not overlap the host's ephemeral port range.
    #[serde(deserialize_with = "port_range")]
    pub snat_ports: (u16, u16),
    /// Flows the conntrack and reverse-NAT maps hold.
    pub conntrack_max: u32,
    /// Idle timeout of an established TCP flow.
    #[serde(deserialize_with = "duration")]
    pub tcp_established_timeout: Duration,
    /// Idle timeout of a closing TCP flow (FIN/RST seen): what strays still need.
    #[serde(deserialize_with = "duration")]
    pub tcp_closing_timeout: Duration,
    /// Idle timeout of a half-open TCP flow (only the client's SYN seen): short, so that SYNs
    /// no client follows up (a flood from spoofed sources) give their SNAT ports back soon.
    #[serde(deserialize_with = "duration")]
    pub tcp_syn_timeout: Duration,
    /// Age from which a half-open TCP flow's SNAT port may go to a new flow that wants it:
    /// under a SYN flood, what keeps the flood from holding every port.
    #[serde(deserialize_with = "duration")]
    pub tcp_syn_reclaim: Duration,
    /// Idle timeout of a UDP flow: after it, the flow's next datagram is balanced afresh by
    /// the current split.
    #[serde(deserialize_with = "duration")]
    pub udp_timeout: Duration,
    /// Install an nftables forward filter so that, from the XDP interfaces, the host forwards
    /// only the balancer's own (rewritten) traffic. lbd turns IPv4 forwarding on (the data
    /// plane needs it); without the filter the host routes whatever arrives there. Turn it
    /// off only where the host is a router on purpose and has its own forward policy.
    pub forward_filter: bool,
    /// Connection caps and timeouts of lbd's own listeners.
    pub limits: Limits,
    /// Where runtime changes (`set split`, `set weight`, `set state`) are kept across
    /// restarts; `""` keeps them nowhere (they last until lbd stops).
    #[serde(deserialize_with = "optional_path")]
    pub state_file: Option<PathBuf>,
    /// `[daemon.announce]`: announce the VIPs through BIRD (absent: lbd announces nothing).
    pub announce: Option<Announce>,
}

/// `[daemon.announce]`: which VIPs this host should receive, told to a BIRD routing daemon
/// (see `announce`): lbd writes `routes_file`, which BIRD's config includes, and asks BIRD
/// over `bird_socket` to reconfigure.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    /// BIRD's control socket.
    #[serde(default = "default_bird_socket")]
    pub bird_socket: PathBuf,
    /// The file lbd writes: static protocols `lbd_vips4` and `lbd_vips6`, one route per VIP
    /// to announce.
    pub routes_file: PathBuf,
}

fn default_bird_socket() -> PathBuf {
    "/run/bird/bird.ctl".into()
}

/// `[daemon.limits]`: what one client, or many, may hold of lbd. Past a cap a new connection
/// is closed at once (and counted); the caps are fitted into the process's descriptor limit
/// less `fd_reserve`, so health checks and the control socket always have descriptors.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Control-socket connections at once.
    pub control_connections: usize,
    /// A control connection that sends no complete line for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub control_idle_timeout: Duration,
    /// Connections to the metrics endpoint at once.
    pub metrics_connections: usize,
    /// A metrics connection that sends no complete request head for this long (idle
    /// keep-alive included) is closed.
    #[serde(deserialize_with = "duration")]
    pub metrics_timeout: Duration,
    /// Client connections at once, per request-mode service (all its workers together).
    pub request_connections: usize,
    /// A request-mode client must send a request's headers within this long, counted from
    /// when its connection became idle (so it is the keep-alive idle timeout too).
    #[serde(deserialize_with = "duration")]
    pub request_header_timeout: Duration,
    /// How long a stopping lbd lets in-flight requests finish (SIGTERM) before it closes
    /// what is left.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// Descriptors kept out of every cap: health checks, maps, logs, upstream connections'
    /// spare room.
    pub fd_reserve: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            control_connections: 32,
            control_idle_timeout: Duration::from_secs(60),
            metrics_connections: 64,
            metrics_timeout: Duration::from_secs(10),
            request_connections: 4096,
            request_header_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            fd_reserve: 256,
        }
    }
}

impl Default for Daemon {
    fn default() -> Self {
        let t = lb_common::Tunables::DEFAULT;
        Daemon {
            interfaces: Vec::new(),
            xdp_mode: XdpMode::Auto,
            control_socket: "/run/lb/lb.sock".into(),
            metrics: "127.0.0.1:9091".parse().expect("valid literal"),
            pin_dir: "/sys/fs/bpf/lb".into(),
            snat_ports: (t.snat_port_min, t.snat_port_max),
            conntrack_max: lb_common::DEFAULT_CONNTRACK_MAX,
            tcp_established_timeout: Duration::from_nanos(t.tcp_established_timeout_ns),
            tcp_closing_timeout: Duration::from_nanos(t.tcp_transient_timeout_ns),
            tcp_syn_timeout: Duration::from_nanos(t.tcp_syn_timeout_ns),
            tcp_syn_reclaim: Duration::from_nanos(t.tcp_syn_reclaim_ns),
            udp_timeout: Duration::from_nanos(t.udp_timeout_ns),
            forward_filter: true,
            limits: Limits::default(),
            state_file: Some("/var/lib/lb/state.json".into()),
            announce: None,
        }
    }
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

/// How a service balances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// XDP, one backend per flow.
    #[default]
    Connection,
    /// Userspace HTTP/1.1 proxy, one backend per request.
    Request,
}

/// How packets reach backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Full-NAT: backends see the balancer's SNAT address and need no changes.
    #[default]
    Nat,
    /// Direct server return (layer 2): the packet reaches the backend unchanged but for its
    /// Ethernet addresses; backends are on a directly connected network, hold the VIP on a
    /// loopback (without answering ARP/NDP for it), listen on the service port and answer
    /// clients directly. Any balancer host with the same table can carry any packet.
    Dsr,
}

/// Kind of health check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    #[default]
    Tcp,
    Http,
    /// A datagram to the backend's port (`send`): healthy unless the port is unreachable
    /// (an ICMP error comes back), or, with `expect_reply`, unless no datagram answers.
    Udp,
}

/// `[service.health]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub check: CheckKind,
    /// HTTP path (http checks); a 2xx answer is healthy.
    pub path: String,
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Consecutive successes that make a backend healthy.
    pub rise: u32,
    /// Consecutive failures that make it unhealthy.
    pub fall: u32,
    /// UDP checks: the datagram's payload (e.g. a DNS query a server answers).
    pub send: String,
    /// UDP checks: a backend must answer the datagram (a service that never answers, like
    /// syslog, can only be checked for an unreachable port: leave this false).
    pub expect_reply: bool,
    /// Connection mode: new flows in a row that the backend resets or leaves unanswered
    /// (the XDP program's connect failures, with no answered flow between them) before it is
    /// taken out of the table at once, without waiting for the active checks; it comes back
    /// through them (`rise` passes). 0 turns this off. Never the last healthy backend of a
    /// pool.
    pub passive_failures: u32,
    /// Check this port of each backend instead of its service port: the common case for
    /// DNS and QUIC servers (a UDP service with an HTTP or TCP check on a management port),
    /// and for any backend with a separate health endpoint. `None`: the service port.
    pub port: Option<u16>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            check: CheckKind::Tcp,
            path: "/".into(),
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(300),
            rise: 2,
            fall: 2,
            send: String::new(),
            expect_reply: false,
            passive_failures: 5,
            port: None,
        }
    }
}

/// A backend: `"addr:port"` or `{ addr = "…", weight = N, name = "…" }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum BackendSpec {
    Addr(SocketAddr),
    Full {
        addr: SocketAddr,
        #[serde(default = "one")]
        weight: Weight,
        name: Option<String>,
    },
}

fn one() -> Weight {
    Weight(1)
}

/// A backend after parsing.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    /// Its name: `addr` unless given.
    pub name: String,
    pub addr: SocketAddr,
    pub weight: Weight,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    #[serde(default)]
    weight: Weight,
    #[serde(default)]
    backends: Vec<Spanned<BackendSpec>>,
}

/// `[[service.pool]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub name: String,
    pub weight: Weight,
    pub backends: Vec<Backend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    vip: Spanned<IpAddr>,
    port: Spanned<u16>,
    #[serde(default)]
    protocol: Protocol,
    mode: Option<Mode>,
    forwarding: Option<Spanned<Forwarding>>,
    snat: Option<Spanned<IpAddr>>,
    health: Option<Spanned<Health>>,
    #[serde(default, rename = "pool")]
    pools: Vec<RawPool>,
    #[serde(default, rename = "route")]
    routes: Vec<Spanned<RawRoute>>,
    rollout: Option<RawRollout>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    baseline: Spanned<String>,
    canary: Spanned<String>,
    steps: Spanned<Vec<u32>>,
    #[serde(deserialize_with = "duration")]
    interval: Duration,
    #[serde(default = "default_threshold")]
    threshold: Spanned<u32>,
    #[serde(default = "default_min_samples")]
    min_samples: u64,
    max_error_ratio: Option<Spanned<f64>>,
    max_error_ratio_increase: Option<Spanned<f64>>,
    max_p99_ratio: Option<Spanned<f64>>,
    #[serde(default, deserialize_with = "optional_duration")]
    max_p99: Option<Duration>,
    #[serde(default)]
    on_failure: OnFailure,
}

fn default_threshold() -> Spanned<u32> {
    Spanned::new(0..0, 2)
}

fn default_min_samples() -> u64 {
    100
}

/// What a rollout does when `threshold` judgements in a row fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Back one stage and hold there (state `rolled_back`).
    #[default]
    Previous,
    /// Canary share to 0 % (state `aborted`).
    Abort,
}

/// `[service.rollout]`: a staged migration from `baseline` to `canary` that lbd drives and
/// judges itself (docs/reference.md, "Rollouts").
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// The pool being replaced.
    pub baseline: String,
    /// The pool taking over.
    pub canary: String,
    /// Canary share (%) of each stage, increasing; the last one reached is promotion.
    pub steps: Vec<u32>,
    /// How long each stage is watched before it is judged.
    pub interval: Duration,
    /// Failed judgements in a row before `on_failure`.
    pub threshold: u32,
    /// Canary samples an interval needs to be judged (fewer: inconclusive).
    pub min_samples: u64,
    /// Gate: canary errors / samples at most this.
    pub max_error_ratio: Option<f64>,
    /// Gate: canary error ratio minus the baseline's at most this.
    pub max_error_ratio_increase: Option<f64>,
    /// Gate: canary p99 / baseline p99 at most this.
    pub max_p99_ratio: Option<f64>,
    /// Gate: canary p99 at most this.
    pub max_p99: Option<Duration>,
    pub on_failure: OnFailure,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    header: Option<String>,
    cookie: Option<String>,
    value: String,
    pool: String,
}

/// What a canary route matches on.
#[derive(Clone, Debug, PartialEq)]
pub enum Match {
    /// A request header (name compared case-insensitively) with exactly this value.
    Header(String),
    /// A cookie with exactly this value.
    Cookie(String),
}

/// `[[service.route]]` (request mode): requests that match go to `pool`, before the weighted
/// pick — the Ingress-canary pattern (`x-canary: always` → k8s).
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub matches: Match,
    pub value: String,
    pub pool: String,
}

/// `[[service]]`.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    pub forwarding: Forwarding,
    /// Source address towards backends (connection mode, nat).
    pub snat: Option<IpAddr>,
    pub health: Health,
    pub pools: Vec<Pool>,
    /// Canary routes (request mode), tried in order.
    pub routes: Vec<Route>,
    /// A staged rollout lbd drives (`rollout start`).
    pub rollout: Option<Rollout>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: Daemon,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
}

/// A validated config.
#[derive(Clone, Debug)]
pub struct Config {
    pub daemon: Daemon,
    pub services: Vec<Service>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                // Valid up to there, so the prefix is text.
                let (line, col) = line_col(std::str::from_utf8(good).unwrap_or(""), good.len());
                return Err(ConfigError::At {
                    path: path.into(),
                    line,
                    col,
                    msg: "invalid UTF-8".into(),
                });
            }
        };
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let at = |span: std::ops::Range<usize>, msg: String| {
            let (line, col) = line_col(text, span.start);
            ConfigError::At {
                path: path.into(),
                line,
                col,
                msg,
            }
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => at(span, e.message().to_string()),
            None => ConfigError::File {
                path: path.into(),
                msg: e.message().to_string(),
            },
        })?;
        let mut services = Vec::new();
        let mut names = HashSet::new();
        let mut listeners = HashSet::new();
        let mut connection_services = 0;
        let mut backend_count = 0usize;
        for s in raw.services {
            let name = s.name.get_ref().clone();
            if name.is_empty() || name.contains(['/', ' ']) {
                return Err(at(
                    s.name.span(),
                    format!("service name {name:?} must be non-empty, without '/' or spaces"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(at(
                    s.name.span(),
                    format!("duplicate service name {name:?}"),
                ));
            }
            let vip = *s.vip.get_ref();
            let port_span = s.port.span();
            let port = s.port.into_inner();
            if port == 0 {
                return Err(at(
                    port_span,
                    format!("service {name:?}: port must be 1-65535"),
                ));
            }
            if vip.is_unspecified()
                || vip.is_multicast()
                || vip == IpAddr::from([255, 255, 255, 255])
            {
                return Err(at(
                    s.vip.span(),
                    format!(
                        "service {name:?}: vip {vip} cannot be a service address (unspecified, multicast or broadcast)"
                    ),
                ));
            }
            let (health_span, health) = match s.health {
                Some(h) => (h.span(), h.into_inner()),
                // A UDP service is checked over UDP unless it says otherwise.
                None if s.protocol == Protocol::Udp => (
                    s.name.span(),
                    Health {
                        check: CheckKind::Udp,
                        ..Health::default()
                    },
                ),
                None => (s.name.span(), Health::default()),
            };
            // A TCP or HTTP check of a UDP-only backend fails for ever (nothing listens on TCP):
            // the service would end up with no backend. A UDP check of a TCP service checks
            // nothing it serves.
            // On another port (`port`), any check fits: that port is what it checks.
            if health.port.is_none()
                && (s.protocol == Protocol::Udp) != (health.check == CheckKind::Udp)
            {
                return Err(at(
                    health_span,
                    format!(
                        "service {name:?}: protocol = {:?} needs check = {}",
                        s.protocol,
                        if s.protocol == Protocol::Udp {
                            "\"udp\" (a datagram to the backend's port; `send` and `expect_reply` to ask for an answer), or a check on another port (`port = N`)"
                        } else {
                            "\"tcp\" or \"http\", or a check on another port (`port = N`)"
                        }
                    ),
                ));
            }
            if health.port == Some(0) {
                return Err(at(
                    health_span,
                    format!("service {name:?}: health port must be 1-65535"),
                ));
            }
            if health.send.len() > 512 {
                return Err(at(
                    health_span,
                    format!("service {name:?}: health send is longer than 512 bytes"),
                ));
            }
            if health.interval < MIN_HEALTH_INTERVAL {
                return Err(at(
                    health_span,
                    format!(
                        "service {name:?}: health interval {:?} is below the minimum {MIN_HEALTH_INTERVAL:?}",
                        health.interval
                    ),
                ));
            }
            if health.timeout >= health.interval {
                return Err(at(
                    health_span,
                    format!(
                        "service {name:?}: health timeout {:?} must be shorter than the interval {:?}",
                        health.timeout, health.interval
                    ),
                ));
            }
            if !health.path.starts_with('/')
                || health.path.bytes().any(|b| !(0x21..=0x7e).contains(&b))
            {
                return Err(at(
                    health_span,
                    format!(
                        "service {name:?}: health path {:?} must start with '/' and hold only visible ASCII (no spaces or control characters)",
                        health.path
                    ),
                ));
            }
            if !listeners.insert((vip, port, s.protocol)) {
                return Err(at(
                    s.vip.span(),
                    format!(
                        "service {name:?}: another service already uses {vip} port {} {:?}",
                        port, s.protocol
                    ),
                ));
            }
            let mode = s.mode.unwrap_or_default();
            let forwarding = match &s.forwarding {
                Some(f) if *f.get_ref() == Forwarding::Dsr && mode == Mode::Request => {
                    return Err(at(
                        f.span(),
                        format!(
                            "service {name:?}: forwarding = \"dsr\" needs mode = \"connection\" (the request-mode proxy terminates connections)"
                        ),
                    ));
                }
                Some(f) => *f.get_ref(),
                None => Forwarding::Nat,
            };
            if mode == Mode::Connection && forwarding == Forwarding::Dsr {
                connection_services += 1;
                if let Some(a) = &s.snat {
                    return Err(at(
                        a.span(),
                        format!(
                            "service {name:?}: snat has no use with forwarding = \"dsr\" (backends see the client's own address); remove it"
                        ),
                    ));
                }
            } else if mode == Mode::Connection {
                connection_services += 1;
                match &s.snat {
                    None => {
                        return Err(at(
                            s.name.span(),
                            format!(
                                "service {name:?}: connection mode with forwarding = \"nat\" needs `snat` (the source address towards backends)"
                            ),
                        ));
                    }
                    Some(a) if a.get_ref().is_ipv4() != vip.is_ipv4() => {
                        return Err(at(
                            a.span(),
                            format!(
                                "service {name:?}: snat and vip must be the same address family"
                            ),
                        ));
                    }
                    _ => {}
                }
            } else if s.protocol != Protocol::Tcp {
                return Err(at(
                    s.name.span(),
                    format!("service {name:?}: request mode needs protocol = \"tcp\""),
                ));
            }
            if health.interval.is_zero()
                || health.timeout.is_zero()
                || health.rise == 0
                || health.fall == 0
            {
                return Err(at(
                    s.name.span(),
                    format!(
                        "service {name:?}: health interval, timeout, rise and fall must be above zero"
                    ),
                ));
            }
            if s.pools.is_empty() {
                return Err(at(
                    s.name.span(),
                    format!("service {name:?} has no [[service.pool]]"),
                ));
            }
            let mut pools = Vec::new();
            let mut pool_names = HashSet::new();
            let mut backend_names = HashSet::new();
            for p in s.pools {
                let pname = p.name.get_ref().clone();
                if pname.is_empty() || pname.contains(['/', '=', ' ']) {
                    return Err(at(
                        p.name.span(),
                        format!(
                            "pool name {pname:?} must be non-empty, without '/', '=' or spaces"
                        ),
                    ));
                }
                if !pool_names.insert(pname.clone()) {
                    return Err(at(
                        p.name.span(),
                        format!("service {name:?}: duplicate pool name {pname:?}"),
                    ));
                }
                let mut backends = Vec::new();
                for b in p.backends {
                    let span = b.span();
                    let (addr, weight, bname) = match b.into_inner() {
                        BackendSpec::Addr(a) => (a, Weight(1), None),
                        BackendSpec::Full { addr, weight, name } => (addr, weight, name),
                    };
                    let bname = bname.unwrap_or_else(|| addr.to_string());
                    if bname.is_empty() || bname.contains(['/', ' ']) {
                        return Err(at(
                            span,
                            format!(
                                "backend name {bname:?} must be non-empty, without '/' or spaces"
                            ),
                        ));
                    }
                    if addr.port() == 0 {
                        return Err(at(span, format!("backend {bname}: port must be 1-65535")));
                    }
                    // Connection mode: a backend on the VIP's address would get the balanced
                    // packets back; request mode: on the VIP's own port, the proxy itself.
                    let loops = match mode {
                        Mode::Connection => addr.ip() == vip,
                        Mode::Request => addr == SocketAddr::new(vip, port),
                    };
                    if loops || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                        return Err(at(
                            span,
                            format!(
                                "backend {bname}: {addr} cannot be a backend address (the service's own VIP, unspecified or multicast)"
                            ),
                        ));
                    }
                    if forwarding == Forwarding::Dsr && addr.port() != port {
                        return Err(at(
                            span,
                            format!(
                                "backend {bname}: port {} differs from the service port {port}; with forwarding = \"dsr\" the packet reaches the backend unchanged, so it must listen on the service port",
                                addr.port()
                            ),
                        ));
                    }
                    if addr.is_ipv4() != vip.is_ipv4() && mode == Mode::Connection {
                        return Err(at(
                            span,
                            format!("backend {bname}: address family differs from the VIP's"),
                        ));
                    }
                    if !backend_names.insert(bname.clone()) {
                        return Err(at(
                            span,
                            format!(
                                "service {name:?}: duplicate backend {bname:?} (names are unique within a service)"
                            ),
                        ));
                    }
                    backends.push(Backend {
                        name: bname,
                        addr,
                        weight,
                    });
                }
                backend_count += backends.len();
                pools.push(Pool {
                    name: pname,
                    weight: p.weight,
                    backends,
                });
            }
            let mut routes = Vec::new();
            for r in s.routes {
                let span = r.span();
                let r = r.into_inner();
                if mode != Mode::Request {
                    return Err(at(
                        span,
                        format!(
                            "service {name:?}: routes need mode = \"request\" (a connection-mode service never sees headers)"
                        ),
                    ));
                }
                let matches = match (r.header, r.cookie) {
                    (Some(h), None) if !h.is_empty() => Match::Header(h.to_ascii_lowercase()),
                    (None, Some(c)) if !c.is_empty() => Match::Cookie(c),
                    _ => {
                        return Err(at(
                            span,
                            format!(
                                "service {name:?}: a route needs exactly one of `header` or `cookie`"
                            ),
                        ));
                    }
                };
                if !pools.iter().any(|p: &Pool| p.name == r.pool) {
                    return Err(at(
                        span,
                        format!("service {name:?}: route to unknown pool {:?}", r.pool),
                    ));
                }
                routes.push(Route {
                    matches,
                    value: r.value,
                    pool: r.pool,
                });
            }
            let rollout = match s.rollout {
                None => None,
                Some(r) => Some(rollout(&name, r, &pools, &at)?),
            };
            services.push(Service {
                name,
                vip,
                port,
                protocol: s.protocol,
                mode,
                forwarding,
                snat: s.snat.map(|a| *a.get_ref()),
                health,
                pools,
                routes,
                rollout,
            });
        }
        if connection_services > lb_common::MAX_SERVICES as usize {
            return Err(ConfigError::File {
                path: path.into(),
                msg: format!(
                    "{connection_services} connection-mode services; at most {} are supported",
                    lb_common::MAX_SERVICES
                ),
            });
        }
        if backend_count >= lb_common::MAX_BACKENDS as usize {
            return Err(ConfigError::File {
                path: path.into(),
                msg: format!(
                    "{backend_count} backends; at most {} are supported",
                    lb_common::MAX_BACKENDS - 1
                ),
            });
        }
        let d = &raw.daemon;
        // `[daemon]` values are plain (not spanned): their key's line is found in the text.
        let key_err = |key: &str, msg: String| located(path, key_position(text, key), msg);
        if !(MIN_CONNTRACK..=MAX_CONNTRACK).contains(&d.conntrack_max) {
            return Err(key_err(
                "conntrack_max",
                format!(
                    "daemon.conntrack_max = {} is out of range {MIN_CONNTRACK}-{MAX_CONNTRACK}",
                    d.conntrack_max
                ),
            ));
        }
        for (key, v) in [
            ("tcp_established_timeout", d.tcp_established_timeout),
            ("tcp_closing_timeout", d.tcp_closing_timeout),
            ("tcp_syn_timeout", d.tcp_syn_timeout),
            ("udp_timeout", d.udp_timeout),
        ] {
            if !(MIN_FLOW_TIMEOUT..=MAX_FLOW_TIMEOUT).contains(&v) {
                return Err(key_err(
                    key,
                    format!(
                        "daemon.{key} = {v:?} is out of range {MIN_FLOW_TIMEOUT:?}-{MAX_FLOW_TIMEOUT:?}"
                    ),
                ));
            }
        }
        if d.tcp_syn_reclaim < MIN_SYN_RECLAIM || d.tcp_syn_reclaim >= d.tcp_syn_timeout {
            return Err(key_err(
                "tcp_syn_reclaim",
                format!(
                    "daemon.tcp_syn_reclaim = {:?} must be at least {MIN_SYN_RECLAIM:?} (a real client's round trip) and below tcp_syn_timeout ({:?})",
                    d.tcp_syn_reclaim, d.tcp_syn_timeout
                ),
            ));
        }
        if d.tcp_closing_timeout <= CLOSED_REUSE {
            return Err(key_err(
                "tcp_closing_timeout",
                format!(
                    "daemon.tcp_closing_timeout = {:?} must be above {CLOSED_REUSE:?} (a closed flow's port is freed after that long; its strays need the entry until then)",
                    d.tcp_closing_timeout
                ),
            ));
        }
        if connection_services > 0 && d.interfaces.is_empty() {
            return Err(key_err(
                "interfaces",
                "daemon.interfaces is empty: connection-mode services need the interfaces the XDP program attaches to".into(),
            ));
        }
        if let Some(i) = d.interfaces.iter().find(|i| {
            i.is_empty() || i.len() > 15 || i.contains(['/', ' ']) || *i == "." || *i == ".."
        }) {
            return Err(key_err(
                "interfaces",
                format!("daemon.interfaces: {i:?} is not an interface name"),
            ));
        }
        let l = &d.limits;
        let zero = [
            ("control_connections", l.control_connections == 0),
            ("metrics_connections", l.metrics_connections == 0),
            ("request_connections", l.request_connections == 0),
            ("control_idle_timeout", l.control_idle_timeout.is_zero()),
            ("metrics_timeout", l.metrics_timeout.is_zero()),
            ("request_header_timeout", l.request_header_timeout.is_zero()),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, z)| *z) {
            return Err(key_err(
                key,
                format!("daemon.limits.{key} must be above zero"),
            ));
        }
        Ok(Config {
            daemon: raw.daemon,
            services,
        })
    }
}

impl Config {
    /// What can only be checked on the host that runs lbd (`lbd check` and `lbd run`, before
    /// `run` touches the kernel): every interface exists, and every request-mode VIP is a
    /// local address (it is bound with an ordinary socket). `path` labels the errors.
    pub fn check_host(&self, path: &Path) -> Result<(), ConfigError> {
        // The file again, only to point at the value at fault.
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let at = |needle: String, msg: String| {
            located(path, text.find(&needle).map(|p| line_col(&text, p)), msg)
        };
        for i in &self.daemon.interfaces {
            let missing = match std::ffi::CString::new(i.as_str()) {
                // SAFETY: a valid NUL-terminated string.
                Ok(c) => (unsafe { libc::if_nametoindex(c.as_ptr()) }) == 0,
                Err(_) => true,
            };
            if missing {
                return Err(at(
                    format!("{i:?}"),
                    format!("daemon.interfaces: no interface {i:?} on this host"),
                ));
            }
        }
        for s in self.services.iter().filter(|s| s.mode == Mode::Request) {
            // Port 0: only whether the address is ours, without taking the service's port
            // (a running lbd holds it).
            let probe = std::net::TcpListener::bind(SocketAddr::new(s.vip, 0));
            if let Err(e) = probe {
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                    return Err(at(
                        format!("\"{}\"", s.vip),
                        format!(
                            "service {:?}: request-mode vip {} is not an address of this host (request mode listens on it)",
                            s.name, s.vip
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An error at `pos` (line, column) when known, else one naming only the file.
fn located(path: &Path, pos: Option<(usize, usize)>, msg: String) -> ConfigError {
    match pos {
        Some((line, col)) => ConfigError::At {
            path: path.into(),
            line,
            col,
            msg,
        },
        None => ConfigError::File {
            path: path.into(),
            msg,
        },
    }
}

/// Where `key = …` is set in `text` (its first setting), as line and column.
fn key_position(text: &str, key: &str) -> Option<(usize, usize)> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let indent = line.len() - line.trim_start().len();
        let rest = &line[indent..];
        if let Some(after) = rest.strip_prefix(key) {
            if after.trim_start().starts_with('=') {
                return Some(line_col(text, offset + indent));
            }
        }
        offset += line.len();
    }
    None
}

/// 1-based line and column of byte offset `pos`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let before = &text[..pos.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl fmt::Display for Config {
    /// The one-screen summary `lbd check` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.daemon;
        writeln!(
            f,
            "interfaces {:?} (xdp {:?}), control {}, metrics {}, pins {}, state file {}",
            d.interfaces,
            d.xdp_mode,
            d.control_socket.display(),
            d.metrics,
            d.pin_dir.display(),
            d.state_file
                .as_ref()
                .map_or("none".to_string(), |p| p.display().to_string())
        )?;
        for s in &self.services {
            writeln!(
                f,
                "service {} {}:{} {:?} {:?}",
                s.name, s.vip, s.port, s.protocol, s.mode
            )?;
            if let Some(r) = &s.rollout {
                writeln!(
                    f,
                    "  rollout {} → {}: steps {:?} %, every {:?}, {} fails roll back ({:?})",
                    r.baseline, r.canary, r.steps, r.interval, r.threshold, r.on_failure
                )?;
            }
            for p in &s.pools {
                let bs: Vec<String> = p
                    .backends
                    .iter()
                    .map(|b| {
                        if b.name == b.addr.to_string() {
                            format!("{} w{}", b.name, b.weight.0)
                        } else {
                            format!("{}={} w{}", b.name, b.addr, b.weight.0)
                        }
                    })
                    .collect();
                writeln!(
                    f,
                    "  pool {} weight {}: {}",
                    p.name,
                    p.weight.0,
                    bs.join(", ")
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
interfaces = ["eth0"]

[[service]]
name = "web"
vip = "10.99.0.10"
port = 80
snat = "10.20.0.1"

[service.health]
check = "http"
path = "/healthz"
interval = "500ms"

[[service.pool]]
name = "legacy"
weight = 90
backends = ["10.20.0.11:8080", { addr = "10.20.0.12:8080", weight = 2 }]

[[service.pool]]
name = "k8s"
weight = 10
backends = [{ addr = "10.20.0.21:8080", name = "k8s-a" }]
"#;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("lb.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_the_interface_example() {
        let c = Config::parse(GOOD, Path::new("lb.toml")).unwrap();
        let s = &c.services[0];
        assert_eq!(s.pools[0].backends[1].weight, Weight(2));
        assert_eq!(s.pools[0].backends[0].name, "10.20.0.11:8080");
        assert_eq!(s.pools[1].backends[0].name, "k8s-a");
        assert_eq!(s.health.interval, Duration::from_millis(500));
        assert_eq!(c.daemon.pin_dir, Path::new("/sys/fs/bpf/lb"));
    }

    /// The DSR form of [`GOOD`]: backends on the service port, no SNAT address.
    fn dsr_config() -> String {
        GOOD.replace("snat = \"10.20.0.1\"", "forwarding = \"dsr\"")
            .replace(":8080", ":80")
    }

    #[test]
    fn dsr_is_accepted_with_backends_on_the_service_port_and_without_snat() {
        let c = Config::parse(&dsr_config(), Path::new("lb.toml")).unwrap();
        assert_eq!(c.services[0].forwarding, Forwarding::Dsr);
        assert_eq!(c.services[0].snat, None);
    }

    #[test]
    fn dsr_refuses_what_it_cannot_do_and_says_where() {
        // Another port: the packet arrives unchanged, so the backend must listen on 80.
        let e = err(&dsr_config().replacen("10.20.0.11:80", "10.20.0.11:8080", 1));
        assert!(
            e.starts_with("lb.toml:19:") && e.contains("must listen on the service port"),
            "{e}"
        );
        let e = err(&dsr_config().replace("port = 80", "port = 80\nsnat = \"10.20.0.1\""));
        assert!(
            e.contains("lb.toml:9:") && e.contains("snat has no use"),
            "{e}"
        );
        let e = err(&dsr_config().replace("port = 80", "port = 80\nmode = \"request\""));
        assert!(e.contains("needs mode = \"connection\""), "{e}");
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let bad = GOOD.replace("weight = 90", "weight = 1001");
        let e = err(&bad);
        assert!(e.starts_with("lb.toml:18:10: "), "{e}");
        assert!(e.contains("out of range"), "{e}");
        let e = err(&GOOD.replace("\"10.99.0.10\"", "\"10.99.0.300\""));
        assert!(e.starts_with("lb.toml:7:7: "), "{e}");
        let e = err(&GOOD.replace("interval = \"500ms\"", "interval = \"soon\""));
        assert!(
            e.contains("lb.toml:14:") && e.contains("invalid duration"),
            "{e}"
        );
        let e = err(&GOOD.replace("port = 80", "port = 80\nprot = 1"));
        assert!(e.contains("lb.toml:9:") && e.contains("prot"), "{e}");
    }

    #[test]
    fn routes_need_request_mode_one_match_and_a_known_pool() {
        let req = GOOD.replace("snat = \"10.20.0.1\"", "mode = \"request\"");
        let route = |r: &str| format!("{req}\n[[service.route]]\n{r}\n");
        let c = Config::parse(
            &route("header = \"X-Canary\"\nvalue = \"always\"\npool = \"k8s\""),
            Path::new("lb.toml"),
        )
        .unwrap();
        assert_eq!(
            c.services[0].routes,
            vec![Route {
                matches: Match::Header("x-canary".into()),
                value: "always".into(),
                pool: "k8s".into()
            }]
        );
        let e = err(&route("cookie = \"c\"\nvalue = \"1\"\npool = \"nope\""));
        assert!(
            e.contains("unknown pool") && e.starts_with("lb.toml:"),
            "{e}"
        );
        let e = err(&route(
            "header = \"h\"\ncookie = \"c\"\nvalue = \"1\"\npool = \"k8s\"",
        ));
        assert!(e.contains("exactly one of"), "{e}");
        let conn =
            format!("{GOOD}\n[[service.route]]\nheader = \"h\"\nvalue = \"1\"\npool = \"k8s\"\n");
        assert!(err(&conn).contains("routes need mode = \"request\""));
    }

    #[test]
    fn values_check_would_pass_but_run_cannot_use_are_refused_where_they_stand() {
        // (change to GOOD, line of the error, what it says)
        let cases: &[(&str, &str, usize, &str)] = &[
            ("port = 80", "port = 0", 8, "port must be 1-65535"),
            (
                "10.20.0.11:8080",
                "10.20.0.11:0",
                19,
                "port must be 1-65535",
            ),
            (
                "\"10.20.0.11:8080\"",
                "\"10.99.0.10:8080\"",
                19,
                "cannot be a backend",
            ),
            (
                "vip = \"10.99.0.10\"",
                "vip = \"0.0.0.0\"",
                7,
                "cannot be a service address",
            ),
            (
                "interval = \"500ms\"",
                "interval = \"1ns\"",
                11,
                "below the minimum",
            ),
            (
                "interval = \"500ms\"",
                "interval = \"500ms\"\ntimeout = \"600ms\"",
                11,
                "shorter than the interval",
            ),
            (
                "path = \"/healthz\"",
                "path = \"/healthz\\r\\nX: y\"",
                11,
                "visible ASCII",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = []",
                3,
                "daemon.interfaces is empty",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"\"]",
                3,
                "not an interface name",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\"]\nconntrack_max = 0",
                4,
                "conntrack_max",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\"]\nconntrack_max = 4294967295",
                4,
                "conntrack_max",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\"]\nudp_timeout = \"500ms\"",
                4,
                "daemon.udp_timeout = 500ms is out of range 1s-604800s",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\"]\ntcp_closing_timeout = \"2s\"",
                4,
                "must be above 2s",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\"]\ntcp_syn_reclaim = \"50ms\"",
                4,
                "daemon.tcp_syn_reclaim = 50ms must be at least 100ms",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\"]\ntcp_syn_reclaim = \"3s\"",
                4,
                "below tcp_syn_timeout (3s)",
            ),
            (
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\"]\n[daemon.limits]\nmetrics_timeout = \"0s\"",
                5,
                "metrics_timeout must be above zero",
            ),
        ];
        for (from, to, line, what) in cases {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{from}");
            let e = err(&text);
            assert!(e.contains(what), "{to}: {e}");
            assert!(e.starts_with(&format!("lb.toml:{line}:")), "{to}: {e}");
        }
    }

    #[test]
    fn invalid_utf8_names_its_line() {
        let dir = std::env::temp_dir().join(format!("lb-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("lb.toml");
        let mut bytes = GOOD.as_bytes().to_vec();
        let at = GOOD.find("name = \"legacy\"").unwrap() + 8;
        bytes[at] = 0xff;
        std::fs::write(&p, bytes).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.ends_with("lb.toml:17:9: invalid UTF-8"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_key() {
        let e = err(&GOOD.replace("name = \"k8s\"", "name = \"legacy\""));
        assert!(
            e.starts_with("lb.toml:22:8:") && e.contains("duplicate pool"),
            "{e}"
        );
        let e = err(&GOOD.replace("snat = \"10.20.0.1\"\n", ""));
        assert!(e.contains("needs `snat`"), "{e}");
        let e = err(&GOOD.replace("k8s-a", "10.20.0.11:8080"));
        assert!(e.contains("duplicate backend"), "{e}");
    }

    #[test]
    fn a_udp_service_is_checked_over_udp() {
        let udp = GOOD
            .replace("port = 80\n", "port = 53\nprotocol = \"udp\"\n")
            .replace(
                "[service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = \"500ms\"\n",
                "",
            );
        let c = Config::parse(&udp, Path::new("lb.toml")).unwrap();
        assert_eq!(
            c.services[0].health.check,
            CheckKind::Udp,
            "the default for udp"
        );
        let e = err(&GOOD.replace("port = 80\n", "port = 53\nprotocol = \"udp\"\n"));
        assert!(e.contains("protocol = Udp needs check = \"udp\""), "{e}");
        let e = err(&GOOD.replace("check = \"http\"", "check = \"udp\""));
        assert!(e.contains("needs check = \"tcp\" or \"http\""), "{e}");
        let dns = udp.replacen(
            "[[service.pool]]",
            "[service.health]\ncheck = \"udp\"\nsend = \"q\"\nexpect_reply = true\n\n[[service.pool]]",
            1,
        );
        let h = &Config::parse(&dns, Path::new("lb.toml")).unwrap().services[0].health;
        assert_eq!((h.send.as_str(), h.expect_reply), ("q", true));
    }

    #[test]
    fn a_check_on_another_port_fits_any_protocol() {
        // A DNS service checked over HTTP on its management port.
        let dns = GOOD
            .replace(
                "port = 80
",
                "port = 53
protocol = \"udp\"
",
            )
            .replace(
                "check = \"http\"
",
                "check = \"http\"
port = 8081
",
            );
        let c = Config::parse(&dns, Path::new("lb.toml")).unwrap();
        let h = &c.services[0].health;
        assert_eq!((h.check, h.port), (CheckKind::Http, Some(8081)));
        // And a TCP service checked with a datagram on another port.
        let tcp = GOOD.replace(
            "check = \"http\"
",
            "check = \"udp\"
port = 5353
",
        );
        assert_eq!(
            Config::parse(&tcp, Path::new("lb.toml")).unwrap().services[0]
                .health
                .port,
            Some(5353)
        );
        let e = err(&GOOD.replace(
            "check = \"http\"
",
            "check = \"http\"
port = 0
",
        ));
        assert!(e.contains("health port must be 1-65535"), "{e}");
        let e = err(&GOOD.replace(
            "check = \"http\"
",
            "check = \"http\"
port = 70000
",
        ));
        assert!(e.starts_with("lb.toml:"), "{e}");
    }

    #[test]
    fn a_rollout_section_is_checked_against_the_pools_and_its_own_rules() {
        let rollout = |body: &str| {
            format!(
                "{GOOD}\n[service.rollout]\nbaseline = \"legacy\"\ncanary = \"k8s\"\ninterval = \"1m\"\n{body}"
            )
        };
        let good =
            rollout("steps = [5, 20, 50, 100]\nmax_error_ratio = 0.01\nmax_p99 = \"500ms\"\n");
        let c = Config::parse(&good, Path::new("lb.toml")).unwrap();
        let r = c.services[0].rollout.as_ref().unwrap();
        assert_eq!(
            (r.threshold, r.min_samples, r.on_failure),
            (2, 100, OnFailure::Previous)
        );
        assert_eq!(r.max_p99, Some(Duration::from_millis(500)));
        // (body, what the error says, its line)
        let cases = [
            ("steps = [5, 20]\n", "at least one gate", 27),
            ("steps = [20, 5]\nmax_p99 = \"1s\"\n", "increasing", 30),
            ("steps = [0, 50]\nmax_p99 = \"1s\"\n", "increasing", 30),
            ("steps = [50, 101]\nmax_p99 = \"1s\"\n", "increasing", 30),
            (
                "steps = [50]\nmax_error_ratio = 1.5\n",
                "max_error_ratio = 1.5 is out of range",
                31,
            ),
            (
                "steps = [50]\nmax_p99 = \"1s\"\nthreshold = 0\n",
                "threshold must be at least 1",
                32,
            ),
            (
                "steps = [50]\nmax_p99 = \"1s\"\non_failure = \"retry\"\n",
                "unknown variant",
                32,
            ),
            (
                "steps = [50]\nmax_p99 = \"1s\"\ngates = 1\n",
                "unknown field",
                32,
            ),
        ];
        for (body, want, line) in cases {
            let e = err(&rollout(body));
            assert!(e.contains(want), "{body}: {e}");
            assert!(e.starts_with(&format!("lb.toml:{line}:")), "{body}: {e}");
        }
        let e = err(&rollout("steps = [50]\nmax_p99 = \"1s\"\n")
            .replace("canary = \"k8s\"", "canary = \"new\""));
        assert!(
            e.contains("rollout pool \"new\" is not a pool") && e.starts_with("lb.toml:28:"),
            "{e}"
        );
        let e = err(&rollout("steps = [50]\nmax_p99 = \"1s\"\n")
            .replace("canary = \"k8s\"", "canary = \"legacy\""));
        assert!(e.contains("must be different pools"), "{e}");
    }
}
