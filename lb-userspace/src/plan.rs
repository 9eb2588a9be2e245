//! State → plan: what the data plane and the proxies should have, derived from the state by
//! pure functions. The daemon compares a plan with the one it last applied and writes only
//! the difference, so the same state always yields the same writes (and none twice).

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::{
    backend::BackendInfo,
    flow::IpBytes,
    service::{ServiceKey, ServiceValue},
};

use crate::{
    config::{Forwarding, Mode},
    dataplane::ip_bytes,
    maglev::Pool,
    state::{Service, ServiceIndex, State, StateError},
    view::{Upstream, View},
};

/// Everything the state asks of the data plane and the proxies.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Every configured backend by id (drained, down or weight 0 too: established flows
    /// still reach it through its slot).
    pub backends: BTreeMap<u32, SocketAddr>,
    /// Each service by name: a kernel table or a proxy view.
    pub services: BTreeMap<String, ServicePlan>,
}

/// What one service needs.
#[derive(Clone, Debug, PartialEq)]
pub enum ServicePlan {
    /// Connection mode: a Maglev table in the kernel.
    Table(TablePlan),
    /// Request mode: what its proxy balances over.
    Proxy(View),
}

/// What a connection-mode service's table is published from: its key, index, SNAT address,
/// forwarding flags and the pools the table is composed from (pool shares, backend ids and shares within their
/// pool). Equal plans build equal tables, so an unchanged plan needs no publish.
#[derive(Clone, Debug, PartialEq)]
pub struct TablePlan {
    pub key: ServiceKey,
    pub index: ServiceIndex,
    /// The SNAT address; with direct server return, the VIP (the source of the kernel's
    /// route lookups towards backends).
    pub snat: IpBytes,
    /// `ServiceValue` flags (`ServiceValue::DSR`).
    pub flags: u32,
    pub pools: Vec<Pool>,
}

/// The plan of the whole state.
pub fn plan(state: &State) -> Result<Plan, StateError> {
    let backends = state.backends().map(|(_, _, b)| (b.id, b.addr)).collect();
    let services = state
        .services
        .keys()
        .map(|n| Ok((n.clone(), service(state, n)?)))
        .collect::<Result<_, StateError>>()?;
    Ok(Plan { backends, services })
}

/// The plan of one service.
pub fn service(state: &State, name: &str) -> Result<ServicePlan, StateError> {
    let svc = state.service(name)?;
    Ok(match svc.config.mode {
        Mode::Request => ServicePlan::Proxy(request_view(state, name)?),
        Mode::Connection => ServicePlan::Table(TablePlan {
            key: service_key(svc),
            index: svc.index,
            snat: ip_bytes(match svc.config.forwarding {
                Forwarding::Dsr => svc.config.vip,
                Forwarding::Nat => svc
                    .config
                    .snat
                    .ok_or_else(|| StateError::NoSnat(name.to_string()))?,
            })
            .0,
            flags: match svc.config.forwarding {
                Forwarding::Dsr => ServiceValue::DSR,
                Forwarding::Nat => 0,
            },
            pools: state.table_pools(name)?,
        }),
    })
}

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

/// The kernel's record of a backend.
pub fn backend_info(addr: SocketAddr) -> BackendInfo {
    let (ip, family) = ip_bytes(addr.ip());
    BackendInfo {
        addr: ip,
        port: addr.port().to_be(),
        family,
        flags: BackendInfo::VALID,
        _pad: 0,
    }
}

/// What a request-mode service's proxy balances over: eligible backends with their share of
/// requests, and every backend eligible within its pool (for canary routes).
pub fn request_view(state: &State, name: &str) -> Result<View, StateError> {
    let svc = state.service(name)?;
    let shares = state.shares(name)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, state::AdminState};

    const CONFIG: &str = r#"
[daemon]
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "10.0.0.1"
port = 80
snat = "10.0.1.1"
[[service.pool]]
name = "legacy"
weight = 90
backends = ["10.1.0.1:80", "10.1.0.2:80"]
[[service.pool]]
name = "k8s"
weight = 10
backends = ["10.2.0.1:80"]
[[service]]
name = "api"
vip = "10.0.0.2"
port = 8080
mode = "request"
[[service.pool]]
name = "legacy"
weight = 50
backends = ["10.1.0.1:8080"]
[[service.pool]]
name = "k8s"
weight = 50
backends = ["10.2.0.1:8080", "10.2.0.2:8080"]
"#;

    fn state() -> State {
        State::from_config(&Config::parse(CONFIG, std::path::Path::new("t.toml")).unwrap()).unwrap()
    }

    fn table(p: &Plan, name: &str) -> TablePlan {
        match &p.services[name] {
            ServicePlan::Table(t) => t.clone(),
            other => panic!("{name} is not a table: {other:?}"),
        }
    }

    fn view(p: &Plan, name: &str) -> View {
        match &p.services[name] {
            ServicePlan::Proxy(v) => v.clone(),
            other => panic!("{name} is not a proxy: {other:?}"),
        }
    }

    #[test]
    fn each_service_gets_the_plan_of_its_mode() {
        let p = plan(&state()).unwrap();
        let t = table(&p, "web");
        assert_eq!(u16::from_be(t.key.port), 80);
        assert_eq!(t.snat, ip_bytes("10.0.1.1".parse().unwrap()).0);
        let shares: f64 = t.pools.iter().map(|p| p.weight).sum();
        assert!((shares - 1.0).abs() < 1e-9, "pool shares sum to {shares}");
        for p in &t.pools {
            let within: f64 = p.backends.iter().map(|e| e.weight).sum();
            assert!(
                (within - 1.0).abs() < 1e-9,
                "{}'s shares sum to {within}",
                p.name
            );
        }
        let v = view(&p, "api");
        assert_eq!(v.upstreams.len(), 3);
        assert!((v.upstreams[0].share - 0.5).abs() < 1e-9);
        assert_eq!(p.backends.len(), 6);
    }

    #[test]
    fn the_same_state_gives_the_same_plan() {
        assert_eq!(plan(&state()).unwrap(), plan(&state()).unwrap());
    }

    #[test]
    fn a_drained_backend_leaves_the_table_but_keeps_its_slot() {
        let mut st = state();
        st.backend_mut("web", "legacy", "10.1.0.1:80")
            .unwrap()
            .state = AdminState::Drain;
        let p = plan(&st).unwrap();
        let id = st.backend_mut("web", "legacy", "10.1.0.1:80").unwrap().id;
        let t = table(&p, "web");
        let e = t
            .pools
            .iter()
            .flat_map(|p| &p.backends)
            .find(|e| e.id == id)
            .unwrap();
        assert_eq!(e.weight, 0.0, "a drained backend takes no new flows");
        assert!(p.backends.contains_key(&id), "its flows still reach it");
    }

    #[test]
    fn a_change_to_one_service_leaves_the_others_plan_equal() {
        let before = plan(&state()).unwrap();
        let mut st = state();
        st.set_split("api", &[("legacy".into(), 0), ("k8s".into(), 100)])
            .unwrap();
        let after = plan(&st).unwrap();
        assert_eq!(before.services["web"], after.services["web"]);
        assert_ne!(before.services["api"], after.services["api"]);
        let v = view(&after, "api");
        assert!(v.upstreams.iter().all(|u| u.pool == "k8s"));
        assert_eq!(v.routable.len(), 3, "canary routes still reach legacy");
    }

    #[test]
    fn a_pool_weight_of_zero_keeps_its_backends_routable_but_unpicked() {
        let mut st = state();
        st.set_pool_weight("web", "k8s", 0).unwrap();
        let t = table(&plan(&st).unwrap(), "web");
        let k8s = st.backend_mut("web", "k8s", "10.2.0.1:80").unwrap().id;
        let pool = t.pools.iter().find(|p| p.name == "k8s").unwrap();
        assert_eq!(pool.weight, 0.0, "the pool takes no new flows");
        assert!(
            pool.backends.iter().any(|e| e.id == k8s),
            "its backends keep their ids"
        );
    }
}
