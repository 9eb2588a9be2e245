//! The desired state: services, pools, backends, their weights, states and health. One task
//! owns it; commands, health transitions and reloads are applied to it and every change is
//! all-or-nothing — a rejected change leaves it exactly as it was.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
};

use crate::{
    config::{self, MAX_WEIGHT, Mode},
    maglev,
};

/// Administrative state of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminState {
    /// Takes new flows.
    Ready,
    /// No new flows; established flows continue.
    Drain,
    /// As drain, and health checks stop.
    Maint,
}

impl AdminState {
    /// Parses `ready|drain|maint`.
    pub fn parse(s: &str) -> Option<AdminState> {
        match s {
            "ready" => Some(AdminState::Ready),
            "drain" => Some(AdminState::Drain),
            "maint" => Some(AdminState::Maint),
            _ => None,
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        })
    }
}

/// A backend in the desired state.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    /// Result of health checks (true until checks say otherwise).
    pub healthy: bool,
    /// Id in the data plane's backend map (never 0).
    pub id: u32,
}

impl Backend {
    /// Whether it may receive new flows/requests.
    pub fn eligible(&self) -> bool {
        self.state == AdminState::Ready && self.healthy && self.weight > 0
    }
}

/// A pool of backends.
#[derive(Clone, Debug)]
pub struct Pool {
    pub name: String,
    pub weight: u32,
    pub backends: Vec<Backend>,
}

impl Pool {
    fn eligible_weight(&self) -> u64 {
        self.backends
            .iter()
            .filter(|b| b.eligible())
            .map(|b| b.weight as u64)
            .sum()
    }
}

/// A service in the desired state.
#[derive(Clone, Debug)]
pub struct Service {
    pub config: config::Service,
    pub pools: Vec<Pool>,
    /// Its index in the data plane (connection mode): its tables are `2 × index` and
    /// `2 × index + 1`, its bit in the ports map is `index`.
    pub index: ServiceIndex,
    /// Its rollout's progress (`Some` exactly when the config has `[service.rollout]`).
    pub rollout: Option<crate::rollout::Progress>,
}

impl Service {
    /// Sets the baseline and canary pools' weights to what the rollout holds them at (no
    /// change while it is idle).
    pub fn apply_rollout(&mut self) {
        let (Some(cfg), Some(progress)) = (&self.config.rollout, &self.rollout) else {
            return;
        };
        let Some((baseline, canary)) = progress.weights(cfg) else {
            return;
        };
        for p in &mut self.pools {
            if p.name == cfg.baseline {
                p.weight = baseline;
            } else if p.name == cfg.canary {
                p.weight = canary;
            }
        }
    }

    /// The (baseline, canary) pool weights now (0 for a pool that is not there).
    pub fn rollout_weights(&self) -> Option<crate::rollout::Weights> {
        let cfg = self.config.rollout.as_ref()?;
        let w = |name: &str| {
            self.pools
                .iter()
                .find(|p| p.name == name)
                .map_or(0, |p| p.weight)
        };
        Some((w(&cfg.baseline), w(&cfg.canary)))
    }

    /// The canary pool's share of the split now, in % (`None` without a rollout section).
    pub fn canary_share(&self) -> Option<f64> {
        let cfg = self.config.rollout.as_ref()?;
        let total: u64 = self.pools.iter().map(|p| p.weight as u64).sum();
        let canary = self.pools.iter().find(|p| p.name == cfg.canary)?.weight;
        Some(if total == 0 {
            0.0
        } else {
            canary as f64 * 100.0 / total as f64
        })
    }
}

/// A connection-mode service's index in the data plane (0 ≤ index < `MAX_SERVICES`). Not to be
/// confused with which of its two tables is live (`ServiceValue::half`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceIndex(pub u32);

/// Why a change was refused. Nothing was changed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StateError {
    #[error("no such service {0:?}")]
    NoService(String),
    #[error("service {0:?} has no pool {1:?}")]
    NoPool(String, String),
    #[error("pool {0}/{1} has no backend {2:?}")]
    NoBackend(String, String, String),
    #[error("weight {0:?} is not an integer 0-{MAX_WEIGHT}")]
    BadWeight(String),
    #[error("set split must name every pool of {service:?} exactly once ({pools})")]
    SplitIncomplete { service: String, pools: String },
    #[error("too many backends: ids exhausted")]
    NoIds,
    /// A rollout command in the wrong phase, or on a service without a rollout.
    #[error(transparent)]
    Rollout(#[from] crate::rollout::RolloutError),
    /// Config validation requires it; kept as an error so that losing that check can never
    /// send flows from the unspecified address.
    #[error("service {0:?} is in connection mode without a snat address")]
    NoSnat(String),
}

/// Parses a weight argument.
pub fn parse_weight(s: &str) -> Result<u32, StateError> {
    match s.parse::<u32>() {
        Ok(w) if w <= MAX_WEIGHT && !s.starts_with('+') => Ok(w),
        _ => Err(StateError::BadWeight(s.into())),
    }
}

/// One backend's effective share of new flows, for display and the table builder.
#[derive(Clone, Debug)]
pub struct Share {
    pub pool: String,
    pub backend: String,
    pub id: u32,
    /// Fraction of new flows (0–1).
    pub share: f64,
}

/// What a new state must keep from a previous one (a reload) or from the pinned data plane (a
/// restart). Items not found here get fresh ids and slots and start `ready` and healthy.
#[derive(Clone, Debug, Default)]
pub struct Keep {
    /// Backend id by (service, backend name).
    pub backend_ids: HashMap<(String, String), u32>,
    /// Backend id by address: ids found in the pinned backend map after a restart.
    pub backend_ids_by_addr: HashMap<SocketAddr, u32>,
    /// Service index by service name.
    pub indexes: HashMap<String, u32>,
    /// Service index by listener: indexes found in the pinned service map after a restart.
    pub indexes_by_listener: HashMap<(IpAddr, u16, config::Protocol), u32>,
    /// Admin state and health by (service, backend name).
    pub runtime: HashMap<(String, String), (AdminState, bool)>,
    /// Rollout progress by service name (a reload keeps rollouts).
    pub rollouts: HashMap<String, crate::rollout::Progress>,
}

/// All services.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub services: BTreeMap<String, Service>,
    /// `set host drain`: the host withdraws its VIPs from the routers (see `announce`) and
    /// goes on serving whatever still arrives. Kept across restarts.
    pub drained: bool,
}

impl State {
    /// Every service's VIP, each once, in order (`show host`, `lb_vip_announced`).
    pub fn vips(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        self.services.values().map(|s| s.config.vip).collect()
    }

    /// Builds the state from a config, giving backends ids 1, 2, … in config order.
    pub fn from_config(cfg: &config::Config) -> Result<State, StateError> {
        State::from_config_keeping(cfg, &Keep::default())
    }

    /// Builds the state from a config, keeping what `keep` says must not change: backend ids
    /// and service slots (a flow's counters and its service's table stay where they are), and
    /// the runtime admin state and health of backends that are still configured.
    pub fn from_config_keeping(cfg: &config::Config, keep: &Keep) -> Result<State, StateError> {
        // Which kept ids/slots each configured item claims, first come first served.
        let mut used_ids = std::collections::HashSet::new();
        let mut used_slots = std::collections::HashSet::new();
        let mut wanted_id = |svc: &config::Service, b: &config::Backend| -> Option<u32> {
            let id = keep
                .backend_ids
                .get(&(svc.name.clone(), b.name.clone()))
                .or_else(|| keep.backend_ids_by_addr.get(&b.addr))
                .copied()?;
            (id != 0 && id < lb_common::MAX_BACKENDS && used_ids.insert(id)).then_some(id)
        };
        let mut ids: Vec<Vec<Vec<Option<u32>>>> = Vec::new();
        for s in &cfg.services {
            ids.push(
                s.pools
                    .iter()
                    .map(|p| p.backends.iter().map(|b| wanted_id(s, b)).collect())
                    .collect(),
            );
        }
        let slots: Vec<Option<u32>> = cfg
            .services
            .iter()
            .map(|s| {
                let slot = keep
                    .indexes
                    .get(&s.name)
                    .or_else(|| keep.indexes_by_listener.get(&(s.vip, s.port, s.protocol)))
                    .copied()?;
                (s.mode == Mode::Connection
                    && slot < lb_common::MAX_SERVICES
                    && used_slots.insert(slot))
                .then_some(slot)
            })
            .collect();
        // Fresh ids start above every id in use before, so a removed backend's id is not
        // handed to a new one while flows to the old one may still count against it; only
        // when the id space runs out are freed ids reused.
        let highest = keep
            .backend_ids
            .values()
            .chain(keep.backend_ids_by_addr.values())
            .copied()
            .max()
            .unwrap_or(0);
        let mut candidates = (highest + 1..lb_common::MAX_BACKENDS).chain(1..=highest);
        let mut fresh_id = || -> Result<u32, StateError> {
            let id = candidates
                .find(|id| !used_ids.contains(id))
                .ok_or(StateError::NoIds)?;
            used_ids.insert(id);
            Ok(id)
        };
        let mut next_slot = 0u32;
        let mut services = BTreeMap::new();
        for (si, s) in cfg.services.iter().enumerate() {
            let mut pools = Vec::new();
            for (pi, p) in s.pools.iter().enumerate() {
                let mut backends = Vec::new();
                for (bi, b) in p.backends.iter().enumerate() {
                    let id = match ids[si][pi][bi] {
                        Some(id) => id,
                        None => fresh_id()?,
                    };
                    let (state, healthy) = keep
                        .runtime
                        .get(&(s.name.clone(), b.name.clone()))
                        .copied()
                        .unwrap_or((AdminState::Ready, true));
                    backends.push(Backend {
                        name: b.name.clone(),
                        addr: b.addr,
                        weight: b.weight.0,
                        state,
                        healthy,
                        id,
                    });
                }
                pools.push(Pool {
                    name: p.name.clone(),
                    weight: p.weight.0,
                    backends,
                });
            }
            let slot = match (s.mode, slots[si]) {
                (Mode::Request, _) => u32::MAX,
                (Mode::Connection, Some(slot)) => slot,
                (Mode::Connection, None) => {
                    while used_slots.contains(&next_slot) {
                        next_slot += 1;
                    }
                    used_slots.insert(next_slot);
                    next_slot
                }
            };
            let rollout = s.rollout.as_ref().map(|cfg| {
                let mut p = keep.rollouts.get(&s.name).cloned().unwrap_or_default();
                p.fit(cfg);
                p
            });
            let mut svc = Service {
                config: s.clone(),
                pools,
                index: ServiceIndex(slot),
                rollout,
            };
            // A rollout under way owns its two pools' weights, whatever the file says.
            svc.apply_rollout();
            services.insert(s.name.clone(), svc);
        }
        Ok(State {
            services,
            drained: false,
        })
    }

    /// What a reload must keep from this state: ids, slots, admin states and health.
    pub fn keep(&self) -> Keep {
        let mut k = Keep::default();
        for (name, s) in &self.services {
            if s.config.mode == Mode::Connection {
                k.indexes.insert(name.clone(), s.index.0);
            }
            if let Some(r) = &s.rollout {
                k.rollouts.insert(name.clone(), r.clone());
            }
            for p in &s.pools {
                for b in &p.backends {
                    k.backend_ids.insert((name.clone(), b.name.clone()), b.id);
                    k.runtime
                        .insert((name.clone(), b.name.clone()), (b.state, b.healthy));
                }
            }
        }
        k
    }

    /// Every backend, with its service and pool names.
    pub fn backends(&self) -> impl Iterator<Item = (&Service, &Pool, &Backend)> {
        self.services.values().flat_map(|s| {
            s.pools
                .iter()
                .flat_map(move |p| p.backends.iter().map(move |b| (s, p, b)))
        })
    }

    /// The service named `name`.
    pub fn service(&self, name: &str) -> Result<&Service, StateError> {
        self.services
            .get(name)
            .ok_or_else(|| StateError::NoService(name.into()))
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut Service, StateError> {
        self.services
            .get_mut(name)
            .ok_or_else(|| StateError::NoService(name.into()))
    }

    fn pool_mut(&mut self, svc: &str, pool: &str) -> Result<&mut Pool, StateError> {
        self.service_mut(svc)?
            .pools
            .iter_mut()
            .find(|p| p.name == pool)
            .ok_or_else(|| StateError::NoPool(svc.into(), pool.into()))
    }

    /// The backend `svc/pool/backend`, to change its weight, state or health in place.
    pub fn backend_mut(
        &mut self,
        svc: &str,
        pool: &str,
        backend: &str,
    ) -> Result<&mut Backend, StateError> {
        let p = self.pool_mut(svc, pool)?;
        p.backends
            .iter_mut()
            .find(|b| b.name == backend)
            .ok_or_else(|| StateError::NoBackend(svc.into(), pool.into(), backend.into()))
    }

    /// `set weight SERVICE/POOL N`.
    pub fn set_pool_weight(&mut self, svc: &str, pool: &str, w: u32) -> Result<(), StateError> {
        let p = self.pool_mut(svc, pool)?;
        p.weight = w;
        Ok(())
    }

    /// `set split SERVICE POOL=N …`: every pool named exactly once, or nothing changes.
    pub fn set_split(&mut self, svc: &str, split: &[(String, u32)]) -> Result<(), StateError> {
        let s = self.service_mut(svc)?;
        for (name, _) in split {
            if !s.pools.iter().any(|p| &p.name == name) {
                return Err(StateError::NoPool(svc.into(), name.clone()));
            }
        }
        let mut named: Vec<&str> = split.iter().map(|(n, _)| n.as_str()).collect();
        named.sort();
        named.dedup();
        if named.len() != split.len() || named.len() != s.pools.len() {
            return Err(StateError::SplitIncomplete {
                service: svc.into(),
                pools: s
                    .pools
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        for (name, w) in split {
            if let Some(p) = s.pools.iter_mut().find(|p| &p.name == name) {
                p.weight = *w;
            }
        }
        Ok(())
    }

    /// Each backend's share of new flows: pool weight over the pools that can take flows,
    /// times backend weight within its pool (INTERFACE.md, "Weights and states").
    pub fn shares(&self, svc: &str) -> Result<Vec<Share>, StateError> {
        let s = self.service(svc)?;
        // One place computes the two layers; a share is their product.
        let layers = self.table_pools(svc)?;
        Ok(s.pools
            .iter()
            .zip(&layers)
            .flat_map(|(p, layer)| {
                p.backends
                    .iter()
                    .zip(&layer.backends)
                    .map(move |(b, e)| Share {
                        pool: p.name.clone(),
                        backend: b.name.clone(),
                        id: b.id,
                        share: layer.weight * e.weight,
                    })
            })
            .collect())
    }

    /// The Maglev table of a service.
    pub fn table(&self, svc: &str) -> Result<Vec<u32>, StateError> {
        Ok(maglev::build_pools(
            &self.table_pools(svc)?,
            lb_common::TABLE_SIZE,
        ))
    }

    /// What a service's Maglev table is composed from: each pool's share of new flows, and
    /// its backends' shares within it (the same figures as [`State::shares`], one layer each).
    pub fn table_pools(&self, svc: &str) -> Result<Vec<maglev::Pool>, StateError> {
        let s = self.service(svc)?;
        let pool_total: u64 = s
            .pools
            .iter()
            .filter(|p| p.eligible_weight() > 0)
            .map(|p| p.weight as u64)
            .sum();
        Ok(s.pools
            .iter()
            .map(|p| {
                let pw = p.eligible_weight();
                maglev::Pool {
                    name: p.name.clone(),
                    weight: if pool_total > 0 && pw > 0 {
                        p.weight as f64 / pool_total as f64
                    } else {
                        0.0
                    },
                    backends: p
                        .backends
                        .iter()
                        .map(|b| maglev::Entry {
                            // The backend's identity for hashing is its name (its address
                            // unless named), so moving it between pools or renaming a pool
                            // does not reshuffle its pool's table.
                            key: format!("{svc}/{}", b.name),
                            id: b.id,
                            weight: if pw > 0 && b.eligible() {
                                b.weight as f64 / pw as f64
                            } else {
                                0.0
                            },
                        })
                        .collect(),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn state() -> State {
        let cfg = config::Config::parse(
            r#"
[daemon]
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "10.99.0.10"
port = 80
snat = "10.20.0.1"
[[service.pool]]
name = "legacy"
weight = 90
backends = ["10.20.0.11:8080", "10.20.0.12:8080"]
[[service.pool]]
name = "k8s"
weight = 10
backends = ["10.20.0.21:8080", { addr = "10.20.0.22:8080", weight = 3 }]
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        State::from_config(&cfg).unwrap()
    }

    fn share(st: &State, b: &str) -> f64 {
        st.shares("web")
            .unwrap()
            .iter()
            .find(|s| s.backend == b)
            .unwrap()
            .share
    }

    #[test]
    fn shares_are_pool_times_backend_weight() {
        let st = state();
        assert!((share(&st, "10.20.0.11:8080") - 0.45).abs() < 1e-9);
        assert!((share(&st, "10.20.0.21:8080") - 0.025).abs() < 1e-9);
        assert!((share(&st, "10.20.0.22:8080") - 0.075).abs() < 1e-9);
    }

    #[test]
    fn a_pool_without_eligible_backends_drops_out_of_the_split() {
        let mut st = state();
        for b in ["10.20.0.21:8080", "10.20.0.22:8080"] {
            st.backend_mut("web", "k8s", b).unwrap().state = AdminState::Drain;
        }
        assert!((share(&st, "10.20.0.11:8080") - 0.5).abs() < 1e-9);
        assert_eq!(share(&st, "10.20.0.21:8080"), 0.0);
    }

    #[test]
    fn rejected_split_changes_nothing() {
        let mut st = state();
        let before = format!("{:?}", st.shares("web").unwrap());
        let half = [("legacy".to_string(), 50)];
        assert!(matches!(
            st.set_split("web", &half),
            Err(StateError::SplitIncomplete { .. })
        ));
        let unknown = [("legacy".to_string(), 50), ("nope".to_string(), 50)];
        assert!(matches!(
            st.set_split("web", &unknown),
            Err(StateError::NoPool(..))
        ));
        let twice = [("legacy".to_string(), 50), ("legacy".to_string(), 50)];
        assert!(st.set_split("web", &twice).is_err());
        assert_eq!(before, format!("{:?}", st.shares("web").unwrap()));
        st.set_split("web", &[("legacy".into(), 50), ("k8s".into(), 50)])
            .unwrap();
        assert!((share(&st, "10.20.0.11:8080") - 0.25).abs() < 1e-9);
    }

    #[test]
    fn a_reload_keeps_ids_slots_and_runtime_state_of_what_stays() {
        let mut st = state();
        st.backend_mut("web", "k8s", "10.20.0.21:8080")
            .unwrap()
            .state = AdminState::Drain;
        st.backend_mut("web", "legacy", "10.20.0.11:8080")
            .unwrap()
            .healthy = false;
        let id = |st: &State, b: &str| {
            st.backends()
                .find(|(_, _, x)| x.name == b)
                .map(|(_, _, x)| (x.id, x.state, x.healthy))
        };
        let cfg = config::Config::parse(
            r#"
[daemon]
interfaces = ["eth0"]
[[service]]
name = "api"
vip = "10.99.0.11"
port = 80
snat = "10.20.0.1"
[[service.pool]]
name = "p"
backends = ["10.20.0.31:8080"]
[[service]]
name = "web"
vip = "10.99.0.10"
port = 80
snat = "10.20.0.1"
[[service.pool]]
name = "k8s"
weight = 50
backends = ["10.20.0.21:8080", "10.20.0.23:8080"]
[[service.pool]]
name = "legacy"
weight = 50
backends = ["10.20.0.11:8080"]
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        let next = State::from_config_keeping(&cfg, &st.keep()).unwrap();
        // Kept: id, drain, health — even though pools were reordered and a service added.
        assert_eq!(id(&next, "10.20.0.21:8080"), id(&st, "10.20.0.21:8080"));
        assert_eq!(id(&next, "10.20.0.11:8080"), id(&st, "10.20.0.11:8080"));
        assert_eq!(next.services["web"].index, st.services["web"].index);
        assert_ne!(next.services["api"].index, st.services["web"].index);
        // New backends get ids never used before (the removed ones' ids are not reused).
        let old_ids: Vec<u32> = st.backends().map(|(_, _, b)| b.id).collect();
        for b in ["10.20.0.23:8080", "10.20.0.31:8080"] {
            let (new_id, state, healthy) = id(&next, b).unwrap();
            assert!(!old_ids.contains(&new_id), "{b} got a used id {new_id}");
            assert_eq!((state, healthy), (AdminState::Ready, true));
        }
        // Weights come from the new file.
        assert_eq!(next.services["web"].pools[0].weight, 50);
    }

    #[test]
    fn weights_outside_0_to_1000_are_refused() {
        for bad in ["-1", "1001", "x", "", "1.5", "+5"] {
            assert!(parse_weight(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_weight("1000"), Ok(1000));
    }
}
