//! The owner of the desired state and the only writer of the data plane. Control commands,
//! health transitions and reloads all come through here, one at a time.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use lb_common::service::ServiceKey;

use crate::{
    config::{Config, Mode},
    dataplane::Kernel,
    metrics::{Metrics, backend_labels},
    plan::{ServicePlan, TablePlan},
    state::{Keep, State, StateError},
};

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

/// Records the runtime values of `state` in the state file, if there is one.
fn record(
    store: &mut Option<crate::persist::Store>,
    state: &State,
) -> Result<(), crate::persist::SaveError> {
    match store {
        Some(store) => store.save(&crate::persist::Saved::of(state)).map(|_| ()),
        None => Ok(()),
    }
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
    /// The change could not be recorded in the state file, so it was not made: a decision
    /// a restart would undo is not accepted.
    #[error(transparent)]
    Persist(#[from] crate::persist::SaveError),
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
    applied: HashMap<String, TablePlan>,
    /// Services whose new table waits for the grace of their previous one, and until when:
    /// [`Daemon::publish_due`] publishes them (the latest state then, so a burst of changes
    /// costs one publish).
    pending: HashMap<String, tokio::time::Instant>,
    /// The pools' recently built tables: a split change or a return to a recent set of
    /// backends composes the service's table without building one.
    tables: crate::maglev::Cache,
    pub metrics: Metrics,
    /// Request-mode services: where their proxies get each change.
    views: HashMap<String, tokio::sync::watch::Sender<std::sync::Arc<crate::view::View>>>,
    /// lbd's own listeners (control, metrics, request VIPs), for `/metrics`.
    pub listeners: crate::listener::Listeners,
    /// The state file, when there is one: every change to runtime values is recorded there
    /// before it takes effect.
    pub store: Option<crate::persist::Store>,
    /// Rollouts: each progressing one's current observation window, and since when each
    /// rollout has been in its stage (see `rollout_driver`).
    pub(crate) windows: HashMap<String, crate::rollout::Window>,
    pub(crate) in_stage: HashMap<String, (crate::rollout::Phase, usize, tokio::time::Instant)>,
    /// With `[daemon.announce]`: where the VIPs this host should receive go (the announcer
    /// task), and what it last did.
    pub announcer: Option<Announcer>,
}

/// The daemon's ends of the announcer task's channels (see `announce::run`).
pub struct Announcer {
    pub wanted: tokio::sync::watch::Sender<std::collections::BTreeSet<std::net::IpAddr>>,
    pub status: tokio::sync::watch::Receiver<crate::announce::Status>,
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
            store: None,
            windows: HashMap::new(),
            in_stage: HashMap::new(),
            announcer: None,
        }
    }

    /// Hands the announcer the VIPs this host should receive now, if that changed.
    pub fn update_announce(&mut self) {
        if let Some(a) = &self.announcer {
            let now = crate::announce::wanted(&self.state);
            a.wanted.send_if_modified(|w| {
                let changed = *w != now;
                *w = now;
                changed
            });
        }
    }

    /// What the announcer last did (`None` without `[daemon.announce]`).
    pub fn announce_status(&self) -> Option<crate::announce::Status> {
        self.announcer.as_ref().map(|a| a.status.borrow().clone())
    }

    /// Records the runtime values of `state` in the state file (when there is one and they
    /// differ from what it holds).
    pub fn persist(&mut self) -> Result<(), crate::persist::SaveError> {
        record(&mut self.store, &self.state)
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
        // Recorded before the caller replies: an acknowledged change survives a restart. After
        // the publish, not before: the file's two fsyncs (about a millisecond on a disk) do not
        // delay the new table. If it cannot be recorded, the change is undone and refused.
        if let Err(e) = self.persist() {
            self.state = previous;
            let _ = self.sync_service(service);
            return Err(ChangeError::Persist(e));
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

    /// Passive health: reads each connection-mode backend's connect failures and takes out
    /// of the table the healthy ones whose new flows failed `passive_failures` times in a row
    /// — unless it is the last healthy backend of its pool. Returns the backends taken out
    /// (their active checks must start over from down, so that `rise` brings them back).
    pub fn observe_passive(
        &mut self,
        passive: &mut crate::passive::Passive,
    ) -> Vec<crate::health::BackendKey> {
        let mut out = Vec::new();
        let mut due = Vec::new();
        for (s, p, b) in self.state.backends() {
            let limit = s.config.health.passive_failures;
            if s.config.mode != Mode::Connection || limit == 0 {
                continue;
            }
            let Ok(l4) = self.kernel.backend_l4(b.id) else {
                continue;
            };
            let run = passive.observe(b.id, &l4);
            if b.healthy && run >= limit as u64 {
                due.push((
                    crate::health::BackendKey {
                        service: s.config.name.clone(),
                        pool: p.name.clone(),
                        backend: b.name.clone(),
                    },
                    b.id,
                    run,
                ));
            }
        }
        let live: std::collections::HashSet<u32> =
            self.state.backends().map(|(_, _, b)| b.id).collect();
        passive.retain(|id| live.contains(&id));
        for (key, id, run) in due {
            passive.reset(id);
            // Judged now, not when the look began: two backends of a pool failing in the same
            // look must not take each other's "someone else is up" for granted.
            let others_up = self
                .state
                .services
                .get(&key.service)
                .and_then(|s| s.pools.iter().find(|p| p.name == key.pool))
                .is_some_and(|p| p.backends.iter().any(|o| o.id != id && o.healthy));
            if !others_up {
                tracing::warn!(
                    service = %key.service, pool = %key.pool, backend = %key.backend,
                    failures_in_a_row = run,
                    "passive health: new flows keep failing, but it is the last healthy backend of its pool: kept"
                );
                continue;
            }
            let result = self.change(&key.service, |st| {
                st.backend_mut(&key.service, &key.pool, &key.backend)?
                    .healthy = false;
                Ok(())
            });
            match result {
                Ok(()) => {
                    tracing::warn!(
                        service = %key.service, pool = %key.pool, backend = %key.backend,
                        health = "down", failures_in_a_row = run,
                        "backend health changed: passive, new flows failed in a row (back after the active checks pass rise times)"
                    );
                    self.metrics
                        .ejections
                        .get_or_create(&backend_labels(&key.service, &key.pool, &key.backend))
                        .inc();
                    out.push(key);
                }
                Err(e) => tracing::error!(
                    service = %key.service, pool = %key.pool, backend = %key.backend,
                    error = %e, "passive health: could not take the backend out"
                ),
            }
        }
        out
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
        // The file now records the reloaded config's weights (and the kept admin states), so
        // a restart after a reload starts where the reload left off.
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "reload applied, but the state file could not record it");
        }
        Ok(())
    }

    /// Writes every backend and every connection-mode table; removes services that are in the
    /// map but no longer configured, then clears backend slots nothing refers to any more.
    pub fn sync_all(&mut self) -> Result<()> {
        let plan = crate::plan::plan(&self.state)?;
        let wanted: Vec<ServiceKey> = plan
            .services
            .values()
            .filter_map(|p| match p {
                ServicePlan::Table(t) => Some(t.key),
                ServicePlan::Proxy(_) => None,
            })
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
        for (&id, &addr) in &plan.backends {
            if in_kernel.get(&id) != Some(&addr) {
                self.kernel
                    .set_backend(id, Some(crate::plan::backend_info(addr)))?;
            }
        }
        let rules = crate::guard::rules(&self.state, crate::guard::host_route);
        self.kernel.set_sources(&rules)?;
        for (name, p) in plan.services {
            self.apply(&name, p)?;
        }
        for (s, p, b) in self.state.backends() {
            let l = backend_labels(&s.config.name, &p.name, &b.name);
            self.metrics
                .declare_backend(&l, s.config.mode == Mode::Request);
            if s.config.mode == Mode::Connection {
                // Declared at 0: the series exists before the first ejection.
                let _ = self.metrics.ejections.get_or_create(&l);
            }
        }
        for (name, s) in &self.state.services {
            if s.rollout.is_some() {
                for v in crate::rollout::Verdict::ALL {
                    // Declared at 0: `rate()` and alerts work before the first judgement.
                    let _ = self.metrics.judgements.get_or_create(&vec![
                        ("service", name.clone()),
                        ("result", v.name().to_string()),
                    ]);
                }
            }
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
        for (id, _) in self.kernel.backends()? {
            if !plan.backends.contains_key(&id) {
                self.kernel.set_backend(id, None)?;
            }
        }
        Ok(())
    }

    /// Brings one service's table or proxy view up to date with the state.
    pub fn sync_service(&mut self, name: &str) -> Result<()> {
        let p = crate::plan::service(&self.state, name)?;
        self.apply(name, p)
    }

    /// Applies one service's plan: a proxy gets a new view only when it differs; a table is
    /// published only when its plan differs from the live one's, and not within the grace of
    /// its other half (then later, from the state as it is then).
    fn apply(&mut self, name: &str, plan: ServicePlan) -> Result<()> {
        let plan = match plan {
            ServicePlan::Proxy(view) => {
                match self.views.get(name) {
                    Some(tx) => {
                        tx.send_if_modified(|v| {
                            let changed = **v != view;
                            if changed {
                                *v = std::sync::Arc::new(view);
                            }
                            changed
                        });
                    }
                    None => {
                        self.views.insert(
                            name.to_string(),
                            tokio::sync::watch::Sender::new(std::sync::Arc::new(view)),
                        );
                    }
                }
                return Ok(());
            }
            ServicePlan::Table(t) => t,
        };
        let started = std::time::Instant::now();
        if self.applied.get(name) == Some(&plan) {
            // The kernel already has exactly this (a reload that left the service as it
            // was, a health flap undone before its publish): nothing to write.
            self.pending.remove(name);
            return Ok(());
        }
        if let Some(until) = self.kernel.grace_until(plan.index) {
            // Its other half was live a moment ago: publish when it is safe, not now.
            self.pending.insert(name.to_string(), until);
            return Ok(());
        }
        self.pending.remove(name);
        let (built, fresh) = self.tables.compose(&plan.pools, lb_common::TABLE_SIZE);
        let mut table = crate::dataplane::empty_table();
        table.buckets.copy_from_slice(&built);
        let built = std::sync::Arc::new(built);
        let generation =
            self.kernel
                .publish_table(&plan.key, plan.index, (plan.snat, plan.flags), &table)?;
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
}
