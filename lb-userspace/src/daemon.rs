//! The owner of the desired state and the only writer of the data plane. Control commands,
//! (later) health transitions and reloads all come through here, one at a time.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use lb_common::{FAMILY_V4, FAMILY_V6, backend::BackendInfo, flow::IpBytes, service::ServiceKey};

use crate::{
    config::Mode,
    dataplane::Dataplane,
    state::{Service, State, StateError},
};

/// Wire bytes of an address in the data plane's layout.
pub fn ip_bytes(ip: std::net::IpAddr) -> (IpBytes, u8) {
    match ip {
        std::net::IpAddr::V4(a) => (lb_common::flow::v4(a.octets()), FAMILY_V4),
        std::net::IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The data plane's key for a connection-mode service.
pub fn service_key(s: &Service) -> ServiceKey {
    let (addr, family) = ip_bytes(s.config.vip);
    ServiceKey {
        addr,
        port: s.config.port.to_be(),
        proto: s.config.protocol.number(),
        family,
    }
}

/// The daemon's single owner of state.
pub struct Daemon {
    pub state: State,
    /// `None` in tests of the control grammar that run without a kernel.
    pub dataplane: Option<Dataplane>,
    generations: HashMap<String, u32>,
}

impl Daemon {
    pub fn new(state: State, dataplane: Option<Dataplane>) -> Daemon {
        Daemon {
            state,
            dataplane,
            generations: HashMap::new(),
        }
    }

    /// The table generation last published for a service (0 = none yet).
    pub fn generation(&self, service: &str) -> u32 {
        self.generations.get(service).copied().unwrap_or(0)
    }

    /// Applies a change to one service: on a copy first, so a refused change leaves the state
    /// untouched; then rebuilds and publishes that service's table.
    pub fn change(
        &mut self,
        service: &str,
        f: impl FnOnce(&mut State) -> Result<(), StateError>,
    ) -> Result<(), String> {
        let mut next = self.state.clone();
        f(&mut next).map_err(|e| e.to_string())?;
        let previous = std::mem::replace(&mut self.state, next);
        if let Err(e) = self.sync_service(service) {
            self.state = previous;
            let _ = self.sync_service(service);
            return Err(format!("data plane: {e:#}"));
        }
        Ok(())
    }

    /// Writes every backend and every connection-mode table; removes services that are in the
    /// map but no longer configured.
    pub fn sync_all(&mut self) -> Result<()> {
        let names: Vec<String> = self.state.services.keys().cloned().collect();
        if let Some(dp) = self.dataplane.as_mut() {
            let wanted: Vec<ServiceKey> = self
                .state
                .services
                .values()
                .filter(|s| s.config.mode == Mode::Connection)
                .map(service_key)
                .collect();
            for k in dp.service_keys() {
                if !wanted.contains(&k) {
                    dp.remove_service(&k)?;
                }
            }
            for s in self.state.services.values() {
                for p in &s.pools {
                    for b in &p.backends {
                        let (addr, family) = ip_bytes(b.addr.ip());
                        dp.set_backend(
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
        }
        for n in names {
            self.sync_service(&n)?;
        }
        Ok(())
    }

    /// Rebuilds and publishes one service's table (connection mode).
    pub fn sync_service(&mut self, name: &str) -> Result<()> {
        let svc = self.state.service(name)?;
        if svc.config.mode != Mode::Connection {
            return Ok(());
        }
        let key = service_key(svc);
        let slot = svc.slot;
        let (snat, _) = ip_bytes(svc.config.snat.context("connection service without snat")?);
        let built = self.state.table(name)?;
        let Some(dp) = self.dataplane.as_mut() else {
            return Ok(());
        };
        let mut table = crate::dataplane::empty_table();
        table.buckets.copy_from_slice(&built);
        let started = std::time::Instant::now();
        let generation = dp.publish_table(&key, slot, snat, &table)?;
        tracing::info!(
            service = name,
            generation,
            took_us = started.elapsed().as_micros() as u64,
            "table published"
        );
        self.generations.insert(name.to_string(), generation);
        Ok(())
    }
}
