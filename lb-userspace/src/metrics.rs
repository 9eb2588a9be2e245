//! Prometheus metrics. Two kinds:
//! - counters the daemon itself increments (control commands, health checks, table builds),
//!   kept in a prometheus-client registry;
//! - everything read from the data plane and the state (per-backend flows, packets and bytes,
//!   XDP verdicts, up, weights, table generations, conntrack fill), taken at scrape time: the
//!   per-CPU eBPF counters are summed when Prometheus asks, by a collector — no polling loop,
//!   no lost increments.
//!
//! Names follow INTERFACE.md; no client address is ever a label.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

/// A label set: (name, value) pairs in a fixed order.
pub type Labels = Vec<(&'static str, String)>;

/// Labels naming a backend.
pub fn backend_labels(service: &str, pool: &str, backend: &str) -> Labels {
    vec![
        ("service", service.to_string()),
        ("pool", pool.to_string()),
        ("backend", backend.to_string()),
    ]
}

/// Request-mode metrics, shared by the registry and the proxies' workers.
#[derive(Clone)]
pub struct RequestMetrics {
    /// `lb_backend_requests_total{service,pool,backend,code}`.
    pub requests: Family<Labels, Counter>,
    /// `lb_backend_request_duration_seconds{service,pool,backend}` (to response headers).
    pub duration: Family<Labels, Histogram>,
    /// Per backend (`service,pool,backend`): what rollouts judge request mode by. Not
    /// exported: the two families above carry the same.
    pub signals: Family<Labels, Arc<Signals>>,
}

impl Default for RequestMetrics {
    /// Empty families (not registered anywhere).
    fn default() -> Self {
        RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(duration_buckets())),
            signals: Family::default(),
        }
    }
}

/// One backend's requests, errors (5xx, lbd's own 502/503/504 included) and time to the
/// response headers in the XDP program's first-byte buckets: counters a rollout takes deltas
/// of, readable (a prometheus-client histogram's buckets are not).
#[derive(Debug)]
pub struct Signals {
    pub requests: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
    /// Per bucket of [`lb_common::stats::first_byte_bucket`].
    pub latency: Vec<std::sync::atomic::AtomicU64>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            requests: Default::default(),
            errors: Default::default(),
            latency: (0..lb_common::stats::FIRST_BYTE_BUCKETS)
                .map(|_| Default::default())
                .collect(),
        }
    }
}

impl Signals {
    /// Counts one answered request.
    pub fn observe(&self, status: u16, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Relaxed);
        }
        let i = lb_common::stats::first_byte_bucket(took.as_nanos() as u64);
        if let Some(b) = self.latency.get(i) {
            b.fetch_add(1, Relaxed);
        }
    }
}

/// One sample's value.
#[derive(Clone, Debug)]
pub enum Value {
    Counter(u64),
    Gauge(f64),
    /// Per-bucket counts (not cumulative) by upper bound, the last `+Inf`; sum of samples.
    Histogram {
        buckets: Vec<(f64, u64)>,
        sum: f64,
    },
}

/// A metric family read at scrape time.
#[derive(Clone, Debug)]
pub struct Sampled {
    /// Name without the `_total` suffix (the encoder adds it to counters).
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Vec<(Labels, Value)>,
}

/// What the collector encodes on the next scrape; the daemon fills it just before.
#[derive(Debug, Default)]
struct Snapshot(Mutex<Vec<Sampled>>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let families = self.0.lock().map_err(|_| std::fmt::Error)?;
        for f in families.iter() {
            let Some((_, first)) = f.samples.first() else {
                continue;
            };
            let ty = match first {
                Value::Counter(_) => MetricType::Counter,
                Value::Gauge(_) => MetricType::Gauge,
                Value::Histogram { .. } => MetricType::Histogram,
            };
            let mut m = encoder.encode_descriptor(f.name, f.help, None, ty)?;
            for (labels, v) in &f.samples {
                let e = m.encode_family(labels)?;
                match v {
                    Value::Counter(c) => ConstCounter::new(*c).encode(e)?,
                    Value::Gauge(g) => ConstGauge::new(*g).encode(e)?,
                    Value::Histogram { buckets, sum } => {
                        let count = buckets.iter().map(|(_, n)| n).sum();
                        let mut e = e;
                        e.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            *sum, count, buckets, None,
                        )?
                    }
                }
            }
        }
        Ok(())
    }
}

/// Buckets for durations from 100 µs to ~3 s.
fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16)
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    snapshot: Arc<Snapshot>,
    /// `lb_health_check_duration_seconds{service,pool,backend}`.
    pub health_check_duration: Family<Labels, Histogram>,
    /// `lb_health_checks_total{service,pool,backend,result}`.
    pub health_checks: Family<Labels, Counter>,
    /// `lb_table_build_duration_seconds`: weights to a published table.
    pub table_build: Histogram,
    /// `lb_control_commands_total{command,result}`.
    pub control_commands: Family<Labels, Counter>,
    /// `lb_config_reloads_total{result}`.
    pub reloads: Family<Labels, Counter>,
    /// `lb_backend_ejections_total{service,pool,backend}`: passive health took it out.
    pub ejections: Family<Labels, Counter>,
    /// `lb_rollout_judgements_total{service,result}`.
    pub judgements: Family<Labels, Counter>,
    /// Request mode: `lb_backend_requests_total` and `lb_backend_request_duration_seconds`.
    pub requests: RequestMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let health_check_duration =
            Family::<Labels, Histogram>::new_with_constructor(
                || Histogram::new(duration_buckets()),
            );
        registry.register(
            "lb_health_check_duration_seconds",
            "Time a health check took (to success, failure or timeout).",
            health_check_duration.clone(),
        );
        let health_checks = Family::<Labels, Counter>::default();
        registry.register(
            "lb_health_checks",
            "Health checks run, by result (ok or fail).",
            health_checks.clone(),
        );
        let table_build = Histogram::new(duration_buckets());
        registry.register(
            "lb_table_build_duration_seconds",
            "Time from a change to its table being published (build and swap).",
            table_build.clone(),
        );
        let control_commands = Family::<Labels, Counter>::default();
        registry.register(
            "lb_control_commands",
            "Control socket commands, by command and result (ok or error).",
            control_commands.clone(),
        );
        let reloads = Family::<Labels, Counter>::default();
        registry.register(
            "lb_config_reloads",
            "SIGHUP reloads, by result (ok or error).",
            reloads.clone(),
        );
        let ejections = Family::<Labels, Counter>::default();
        registry.register(
            "lb_backend_ejections",
            "Times passive health took the backend out of the table (its new flows failed passive_failures times in a row; connection mode).",
            ejections.clone(),
        );
        let judgements = Family::<Labels, Counter>::default();
        registry.register(
            "lb_rollout_judgements",
            "Rollout judgements, by result (pass, fail or inconclusive).",
            judgements.clone(),
        );
        let requests = RequestMetrics::default();
        registry.register(
            "lb_backend_requests",
            "Requests proxied (request mode), by backend and response code.",
            requests.requests.clone(),
        );
        registry.register(
            "lb_backend_request_duration_seconds",
            "Time to the backend's response headers (request mode).",
            requests.duration.clone(),
        );
        let snapshot = Arc::new(Snapshot::default());
        registry.register_collector(Box::new(snapshot.clone()));
        Metrics {
            registry,
            snapshot,
            health_check_duration,
            health_checks,
            table_build,
            control_commands,
            reloads,
            ejections,
            judgements,
            requests,
        }
    }

    /// Counts one control command.
    pub fn command(&self, command: &str, ok: bool) {
        self.control_commands
            .get_or_create(&vec![
                ("command", command.to_string()),
                ("result", if ok { "ok" } else { "error" }.to_string()),
            ])
            .inc();
    }

    /// Records one health check.
    pub fn health_check(&self, labels: Labels, took: Duration, ok: bool) {
        self.health_check_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        let mut l = labels;
        l.push(("result", if ok { "ok" } else { "fail" }.to_string()));
        self.health_checks.get_or_create(&l).inc();
    }

    /// Creates, at 0, every series of a backend that lbd records as things happen, so that
    /// `rate()` and alerts see them from the first scrape: its health-check families, and in
    /// request mode its request histogram and the codes lbd itself answers for it (200 from
    /// the backend, 502 and 504 for its failures). Codes only the backend chooses appear
    /// when first seen.
    pub fn declare_backend(&self, labels: &Labels, request_mode: bool) {
        let _ = self.health_check_duration.get_or_create(labels);
        for result in ["ok", "fail"] {
            let mut l = labels.clone();
            l.push(("result", result.to_string()));
            let _ = self.health_checks.get_or_create(&l);
        }
        if request_mode {
            let _ = self.requests.duration.get_or_create(labels);
            for code in ["200", "502", "504"] {
                let mut l = labels.clone();
                l.push(("code", code.to_string()));
                let _ = self.requests.requests.get_or_create(&l);
            }
        }
    }

    /// Encodes everything in the Prometheus/OpenMetrics text format, with `sampled` as the
    /// scrape-time families.
    pub fn encode(&self, sampled: Vec<Sampled>) -> String {
        if let Ok(mut s) = self.snapshot.0.lock() {
            *s = sampled;
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# encoding failed");
        }
        out
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_counters_get_total_and_labels_in_order() {
        let m = Metrics::new();
        m.command("set split", true);
        let text = m.encode(vec![Sampled {
            name: "lb_backend_connections",
            help: "New flows.",
            samples: vec![(
                backend_labels("web", "k8s", "10.20.0.21:8080"),
                Value::Counter(42),
            )],
        }]);
        assert!(
            text.contains(
                "lb_backend_connections_total{service=\"web\",pool=\"k8s\",backend=\"10.20.0.21:8080\"} 42"
            ),
            "{text}"
        );
        assert!(
            text.contains("lb_control_commands_total{command=\"set split\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE lb_backend_connections counter"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
