//! The owner of the desired state and the only writer of the data plane. Control commands,
//! health transitions and reloads all come through here, one at a time.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use lb_common::{backend::BackendInfo, service::ServiceKey};

use crate::{
    config::{Config, Mode},
    dataplane::{Kernel, ip_bytes},
    metrics::{Labels, Metrics, Sampled, Value, backend_labels},
    state::{Keep, Service, State, StateError},
};

/// The data plane's key for a connection-mode service.
pub fn service_key(s: &Service) -> ServiceKey {
    let (addr, family) = ip_bytes(s.config.vip);
    ServiceKey {
        addr,
        port: s.config.port.to_be(),
        proto: s.config.protocol.number(),
        family,
        _pad: 0,
    }
}

/// What a restarted daemon must keep from the pinned data plane: the ids its backends were
/// written under and the table slots of its services.
pub fn keep_from_dataplane(dp: &dyn Kernel) -> Result<Keep> {
    let mut keep = Keep::default();
    let mut seen = HashMap::new();
    for (id, addr) in dp.backends()? {
        // An address used by two services is ambiguous: let both get fresh ids.
        *seen.entry(addr).or_insert(0) += 1;
        keep.backend_ids_by_addr.insert(addr, id);
    }
    keep.backend_ids_by_addr.retain(|a, _| seen[a] == 1);
    for (k, v) in dp.services() {
        let ip = lb_common::flow::ip_addr(&k.addr, k.family);
        let proto = match k.proto {
            lb_common::PROTO_UDP => crate::config::Protocol::Udp,
            _ => crate::config::Protocol::Tcp,
        };
        keep.indexes_by_listener
            .insert((ip, u16::from_be(k.port), proto), v.id);
    }
    Ok(keep)
}

/// What a connection-mode service's live table was published from: its key, index, SNAT
/// address and the table's entries (backend ids and effective weights).
#[derive(Clone, Debug, PartialEq)]
struct Applied {
    key: ServiceKey,
    index: crate::state::ServiceIndex,
    snat: lb_common::flow::IpBytes,
    entries: Vec<crate::maglev::Entry>,
}

/// Why a change was refused; the state is as it was before it either way.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The state refused it: an unknown service, pool or backend, a weight out of range…
    #[error(transparent)]
    State(#[from] StateError),
    /// The data plane refused the new table; the change was rolled back.
    #[error("data plane: {0:#}")]
    DataPlane(anyhow::Error),
}

/// The daemon's single owner of state.
pub struct Daemon {
    pub state: State,
    /// The data plane: the kernel's, or an in-memory one in tests.
    pub kernel: Box<dyn Kernel>,
    /// Per service: the generation and buckets last published (what the kernel uses now).
    published: HashMap<String, (u32, std::sync::Arc<Vec<u32>>)>,
    /// Per connection-mode service: what its live table was published from. A sync that
    /// would publish the same again writes nothing.
    applied: HashMap<String, Applied>,
    /// Services whose new table waits for the grace of their previous one, and until when:
    /// [`Daemon::publish_due`] publishes them (the latest state then, so a burst of changes
    /// costs one publish).
    pending: HashMap<String, tokio::time::Instant>,
    /// Recently built tables, so that returning to a recent split skips the build.
    tables: crate::maglev::Cache,
    pub metrics: Metrics,
    /// Request-mode services: where their proxies get each change.
    views: HashMap<String, tokio::sync::watch::Sender<std::sync::Arc<crate::view::View>>>,
    /// lbd's own listeners (control, metrics, request VIPs), for `/metrics`.
    pub listeners: crate::listener::Listeners,
}

impl Daemon {
    pub fn new(state: State, kernel: Box<dyn Kernel>) -> Daemon {
        Daemon {
            state,
            kernel,
            published: HashMap::new(),
            pending: HashMap::new(),
            applied: HashMap::new(),
            tables: crate::maglev::Cache::default(),
            metrics: Metrics::new(),
            views: HashMap::new(),
            listeners: Default::default(),
        }
    }

    /// The table generation last published for a service (0 = none yet).
    pub fn generation(&self, service: &str) -> u32 {
        self.published.get(service).map_or(0, |(g, _)| *g)
    }

    /// The table the kernel uses for a service (the one last published), or the one the
    /// state gives before anything was published.
    pub fn live_table(&self, service: &str) -> Result<std::borrow::Cow<'_, [u32]>, StateError> {
        match self.published.get(service) {
            Some((_, t)) => Ok(std::borrow::Cow::Borrowed(t)),
            None => Ok(std::borrow::Cow::Owned(self.state.table(service)?)),
        }
    }

    /// Applies a change to one service: on a copy first, so a refused change leaves the state
    /// untouched; then rebuilds and publishes that service's table.
    pub fn change(
        &mut self,
        service: &str,
        f: impl FnOnce(&mut State) -> Result<(), StateError>,
    ) -> Result<(), ChangeError> {
        let mut next = self.state.clone();
        f(&mut next)?;
        let previous = std::mem::replace(&mut self.state, next);
        if let Err(e) = self.sync_service(service) {
            self.state = previous;
            let _ = self.sync_service(service);
            return Err(ChangeError::DataPlane(e));
        }
        Ok(())
    }

    /// When the next deferred publish is due (`None`: nothing waits).
    pub fn next_publish(&self) -> Option<tokio::time::Instant> {
        self.pending.values().min().copied()
    }

    /// Publishes the tables whose grace has ended, from the state as it is now.
    pub fn publish_due(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.pending.remove(&name);
            if !self.state.services.contains_key(&name) {
                continue;
            }
            if let Err(e) = self.sync_service(&name) {
                tracing::error!(
                    service = name,
                    error = format!("{e:#}"),
                    "deferred table publish failed"
                );
            }
        }
    }

    /// Applies a health check's transition to the state and the table (unless it comes
    /// from a check task that was since replaced); other events are ignored.
    pub fn apply_health(&mut self, checker: &crate::health::Checker, ev: crate::health::Event) {
        let crate::health::Event::Transition {
            key,
            task,
            healthy,
            reason,
        } = ev
        else {
            return;
        };
        if !checker.is_current(&key, task) {
            return;
        }
        let result = self.change(&key.service, |st| {
            st.backend_mut(&key.service, &key.pool, &key.backend)?
                .healthy = healthy;
            Ok(())
        });
        let health = if healthy { "up" } else { "down" };
        match result {
            Ok(()) => tracing::warn!(
                service = %key.service, pool = %key.pool, backend = %key.backend,
                health, reason, "backend health changed"
            ),
            Err(e) => tracing::error!(
                service = %key.service, pool = %key.pool, backend = %key.backend,
                health, reason, error = %e, "could not apply a health change"
            ),
        }
    }

    /// Replaces the whole configuration (SIGHUP): backend ids, slots, admin states and health
    /// of what is still configured are kept, so established flows and counters are untouched.
    /// On any error the previous state is restored and stays in force.
    pub fn reload(&mut self, cfg: &Config) -> Result<()> {
        let next = State::from_config_keeping(cfg, &self.state.keep())
            .context("building the new state")?;
        let previous = std::mem::replace(&mut self.state, next);
        if let Err(e) = self.sync_all() {
            self.state = previous;
            let _ = self.sync_all();
            return Err(e.context("applying the new config (the old one stays in force)"));
        }
        Ok(())
    }

    /// Writes every backend and every connection-mode table; removes services that are in the
    /// map but no longer configured, then clears backend slots nothing refers to any more.
    pub fn sync_all(&mut self) -> Result<()> {
        let names: Vec<String> = self.state.services.keys().cloned().collect();
        let wanted: Vec<ServiceKey> = self
            .state
            .services
            .values()
            .filter(|s| s.config.mode == Mode::Connection)
            .map(service_key)
            .collect();
        for (k, _) in self.kernel.services() {
            if !wanted.contains(&k) {
                self.kernel.remove_service(&k)?;
                self.applied.retain(|_, a| a.key != k);
            }
        }
        // Only what differs from the kernel's backend map is written.
        let in_kernel: HashMap<u32, std::net::SocketAddr> =
            self.kernel.backends()?.into_iter().collect();
        for s in self.state.services.values() {
            for p in &s.pools {
                for b in &p.backends {
                    if in_kernel.get(&b.id) == Some(&b.addr) {
                        continue;
                    }
                    let (addr, family) = ip_bytes(b.addr.ip());
                    self.kernel.set_backend(
                        b.id,
                        Some(BackendInfo {
                            addr,
                            port: b.addr.port().to_be(),
                            family,
                            flags: BackendInfo::VALID,
                            _pad: 0,
                        }),
                    )?;
                }
            }
        }
        let rules = crate::guard::rules(&self.state, crate::guard::host_route);
        self.kernel.set_sources(&rules)?;
        for n in names {
            self.sync_service(&n)?;
        }
        for (s, p, b) in self.state.backends() {
            self.metrics.declare_backend(
                &backend_labels(&s.config.name, &p.name, &b.name),
                s.config.mode == Mode::Request,
            );
        }
        let services = &self.state.services;
        self.published.retain(|n, _| services.contains_key(n));
        self.pending.retain(|n, _| services.contains_key(n));
        self.applied.retain(|n, _| services.contains_key(n));
        self.views.retain(|n, _| {
            services
                .get(n)
                .is_some_and(|s| s.config.mode == Mode::Request)
        });
        // Only now that no table names them: established flows carry their backend's address,
        // so clearing its slot breaks none of them.
        let live: std::collections::HashSet<u32> =
            self.state.backends().map(|(_, _, b)| b.id).collect();
        for (id, _) in self.kernel.backends()? {
            if !live.contains(&id) {
                self.kernel.set_backend(id, None)?;
            }
        }
        Ok(())
    }

    /// Rebuilds and publishes one service's table (connection mode).
    pub fn sync_service(&mut self, name: &str) -> Result<()> {
        let svc = self.state.service(name)?;
        if svc.config.mode == Mode::Request {
            let view = std::sync::Arc::new(self.request_view(name)?);
            match self.views.get(name) {
                Some(tx) => {
                    tx.send_replace(view);
                }
                None => {
                    self.views
                        .insert(name.to_string(), tokio::sync::watch::Sender::new(view));
                }
            }
            return Ok(());
        }
        let started = std::time::Instant::now();
        let key = service_key(svc);
        let index = svc.index;
        let (snat, _) = ip_bytes(svc.config.snat.context("connection service without snat")?);
        let entries = self.state.table_entries(name)?;
        let plan = Applied {
            key,
            index,
            snat,
            entries,
        };
        if self.applied.get(name) == Some(&plan) {
            // The kernel already has exactly this (a reload that left the service as it
            // was, a health flap undone before its publish): nothing to write.
            self.pending.remove(name);
            return Ok(());
        }
        if let Some(until) = self.kernel.grace_until(index) {
            // Its other half was live a moment ago: publish when it is safe, not now.
            self.pending.insert(name.to_string(), until);
            return Ok(());
        }
        self.pending.remove(name);
        let (built, fresh) = self
            .tables
            .get_or_build(&plan.entries, lb_common::TABLE_SIZE);
        let mut table = crate::dataplane::empty_table();
        table.buckets.copy_from_slice(&built);
        let generation = self.kernel.publish_table(&key, index, snat, &table)?;
        self.metrics
            .table_build
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            service = name,
            generation,
            took_us = started.elapsed().as_micros() as u64,
            cached = !fresh,
            "table published"
        );
        self.published.insert(name.to_string(), (generation, built));
        self.applied.insert(name.to_string(), plan);
        Ok(())
    }
}

impl Daemon {
    /// What a request-mode service's proxy balances over now.
    fn request_view(&self, name: &str) -> Result<crate::view::View, StateError> {
        use crate::view::{Upstream, View};
        let svc = self.state.service(name)?;
        let shares = self.state.shares(name)?;
        let mut upstreams = Vec::new();
        let mut routable = Vec::new();
        for p in &svc.pools {
            let pool_total: u64 = p
                .backends
                .iter()
                .filter(|b| b.eligible())
                .map(|b| b.weight as u64)
                .sum();
            for b in p.backends.iter().filter(|b| b.eligible()) {
                let up = |share| Upstream {
                    id: b.id,
                    name: b.name.clone(),
                    pool: p.name.clone(),
                    addr: b.addr,
                    share,
                };
                routable.push(up(b.weight as f64 / pool_total as f64));
                let share = shares
                    .iter()
                    .find(|s| s.id == b.id)
                    .map_or(0.0, |s| s.share);
                if share > 0.0 {
                    upstreams.push(up(share));
                }
            }
        }
        Ok(View {
            service: name.to_string(),
            upstreams,
            routable,
            routes: svc.config.routes.clone(),
        })
    }

    /// Every request-mode service: its name, its listening address, and a receiver of its
    /// views (what the proxies reconcile against).
    pub fn request_services(
        &self,
    ) -> Vec<(
        String,
        std::net::SocketAddr,
        tokio::sync::watch::Receiver<std::sync::Arc<crate::view::View>>,
    )> {
        self.state
            .services
            .iter()
            .filter(|(_, s)| s.config.mode == Mode::Request)
            .filter_map(|(n, s)| {
                let rx = self.views.get(n)?.subscribe();
                Some((
                    n.clone(),
                    std::net::SocketAddr::new(s.config.vip, s.config.port),
                    rx,
                ))
            })
            .collect()
    }

    /// A receiver of a request-mode service's views (`None` for other services).
    pub fn subscribe(
        &self,
        name: &str,
    ) -> Option<tokio::sync::watch::Receiver<std::sync::Arc<crate::view::View>>> {
        self.views.get(name).map(|tx| tx.subscribe())
    }

    /// The metrics text for one scrape: the data plane's per-CPU counters summed now, plus the
    /// state's weights, health and table generations.
    pub fn scrape(&self) -> String {
        use lb_common::stats::Stat;
        let fam = |name, help| Sampled {
            name,
            help,
            samples: Vec::new(),
        };
        let mut conns = fam(
            "lb_backend_connections",
            "New flows to the backend (connection mode).",
        );
        let mut packets = fam("lb_backend_packets", "Packets forwarded, by direction.");
        let mut bytes = fam(
            "lb_backend_bytes",
            "Bytes forwarded (IP packets), by direction.",
        );
        let mut up = fam("lb_backend_up", "1 when health checks pass, 0 when not.");
        let mut weight = fam(
            "lb_backend_weight",
            "Backend weight within its pool (0-1000).",
        );
        let mut share = fam(
            "lb_backend_share",
            "Configured share of new flows (0-1): pool share times backend share among eligible backends.",
        );
        let mut ready = fam(
            "lb_backend_ready",
            "1 when the admin state is ready (not drain or maint).",
        );
        let mut pool_weight = fam(
            "lb_pool_weight",
            "Pool weight in the service's split (0-1000).",
        );
        let mut generation = fam(
            "lb_table_generation",
            "Generation of the service's live table.",
        );
        for (name, s) in &self.state.services {
            let shares = self.state.shares(name).unwrap_or_default();
            for p in &s.pools {
                pool_weight.samples.push((
                    vec![("service", name.clone()), ("pool", p.name.clone())],
                    Value::Gauge(p.weight as f64),
                ));
                for b in &p.backends {
                    let l = backend_labels(name, &p.name, &b.name);
                    up.samples
                        .push((l.clone(), Value::Gauge(if b.healthy { 1.0 } else { 0.0 })));
                    ready.samples.push((
                        l.clone(),
                        Value::Gauge(if b.state == crate::state::AdminState::Ready {
                            1.0
                        } else {
                            0.0
                        }),
                    ));
                    weight
                        .samples
                        .push((l.clone(), Value::Gauge(b.weight as f64)));
                    let sh = shares
                        .iter()
                        .find(|x| x.id == b.id)
                        .map_or(0.0, |x| x.share);
                    share.samples.push((l.clone(), Value::Gauge(sh)));
                    if s.config.mode != Mode::Connection {
                        continue;
                    }
                    let st = self.kernel.backend_stats(b.id).unwrap_or_default();
                    conns
                        .samples
                        .push((l.clone(), Value::Counter(st.new_flows)));
                    let dir = |d: &str| {
                        let mut l: Labels = l.clone();
                        l.push(("direction", d.to_string()));
                        l
                    };
                    packets
                        .samples
                        .push((dir("to_backend"), Value::Counter(st.packets_to_backend)));
                    packets
                        .samples
                        .push((dir("to_client"), Value::Counter(st.packets_to_client)));
                    bytes
                        .samples
                        .push((dir("to_backend"), Value::Counter(st.bytes_to_backend)));
                    bytes
                        .samples
                        .push((dir("to_client"), Value::Counter(st.bytes_to_client)));
                }
            }
            if s.config.mode == Mode::Connection {
                generation.samples.push((
                    vec![("service", name.clone())],
                    Value::Gauge(self.generation(name) as f64),
                ));
            }
        }
        let mut out = vec![
            conns,
            packets,
            bytes,
            up,
            ready,
            weight,
            share,
            pool_weight,
            generation,
        ];
        {
            let dp = &self.kernel;
            if let Ok(stats) = dp.xdp_stats() {
                // One labelled counter per `Stat` index.
                let counters = |name, help, label: &'static str, which: &[(&str, Stat)]| Sampled {
                    name,
                    help,
                    samples: which
                        .iter()
                        .map(|(v, st)| {
                            (
                                vec![(label, v.to_string())],
                                Value::Counter(stats[*st as usize]),
                            )
                        })
                        .collect(),
                };
                out.push(counters(
                    "lb_xdp_packets",
                    "Packets seen by the XDP program, by verdict.",
                    "action",
                    &[
                        ("aborted", Stat::Aborted),
                        ("drop", Stat::Drop),
                        ("pass", Stat::Pass),
                        ("tx", Stat::Tx),
                        ("redirect", Stat::Redirect),
                    ],
                ));
                out.push(counters(
                    "lb_xdp_events",
                    "Why the XDP program did what it did (a packet can count once here besides its verdict).",
                    "reason",
                    &[
                        ("not_ours", Stat::NotOurs),
                        ("malformed", Stat::Malformed),
                        ("fragment", Stat::Fragment),
                        ("non_syn_without_flow", Stat::NonSynMiss),
                        ("no_backend", Stat::NoBackend),
                        ("next_hop_unresolved", Stat::FibPass),
                        ("flow_not_created", Stat::FlowNotCreated),
                        ("ttl_exceeded", Stat::TtlExceeded),
                        ("new_flow", Stat::NewFlow),
                        ("return_wrong_side", Stat::ReturnWrongSide),
                        ("return_out_of_window", Stat::ReturnOutOfWindow),
                        ("spoofed_source", Stat::SpoofedSource),
                        ("bad_tcp_flags", Stat::BadTcpFlags),
                        ("bad_tcp_header", Stat::BadTcpHeader),
                    ],
                ));
            }
            let (entries, capacity) = dp.conntrack_fill();
            out.push(Sampled {
                name: "lb_conntrack_entries",
                help: "Flows in the connection-tracking table (live or not yet evicted).",
                samples: vec![(Vec::new(), Value::Gauge(entries as f64))],
            });
            out.push(Sampled {
                name: "lb_conntrack_capacity",
                help: "Flows the connection-tracking table holds before evicting the least recent.",
                samples: vec![(Vec::new(), Value::Gauge(capacity as f64))],
            });
        }
        let listeners = self.listeners.snapshot();
        if !listeners.is_empty() {
            let per = |name, help, f: &dyn Fn(&crate::listener::ListenerStats) -> Value| Sampled {
                name,
                help,
                samples: listeners
                    .iter()
                    .map(|(n, s)| (vec![("listener", n.clone())], f(s)))
                    .collect(),
            };
            out.push(per(
                "lb_listener_connections",
                "Connections open now on each of lbd's listeners (control, metrics, request:SERVICE).",
                &|s| Value::Gauge(s.open as f64),
            ));
            out.push(per(
                "lb_listener_refused",
                "Connections closed at once because the listener was at its cap ([daemon.limits]).",
                &|s| Value::Counter(s.refused),
            ));
            out.push(per(
                "lb_listener_accept_errors",
                "Accepts that failed for want of descriptors or memory (the listener backs off and retries).",
                &|s| Value::Counter(s.accept_errors),
            ));
        }
        out.push(Sampled {
            name: "lb_build_info",
            help: "Always 1; the version of lbd.",
            samples: vec![(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                Value::Gauge(1.0),
            )],
        });
        self.metrics.encode(out)
    }
}
