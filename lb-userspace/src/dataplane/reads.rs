//! Map reads: what is in the maps now, and the counters summed over CPUs.

use anyhow::Result;
use lb_common::{
    MAX_BACKENDS,
    backend::BackendInfo,
    guard::{SourceAddr, SourceRule},
    service::{PortServices, ServiceKey, ServiceValue},
    stats::{BackendStats, L4Stats, STAT_COUNT},
};

use super::Dataplane;

impl Dataplane {
    /// The source guard's entries (prefix length counts the address bits only).
    pub fn sources(&self) -> Vec<(std::net::IpAddr, u8, SourceRule)> {
        self.sources
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| {
                let d = k.data();
                (
                    lb_common::flow::ip_addr(&d.addr, d.family as u8),
                    (k.prefix_len() - SourceAddr::HEADER_BITS) as u8,
                    v,
                )
            })
            .collect()
    }

    /// The service's current value, if it is in the map.
    pub fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key, 0).ok()
    }

    /// The ports map's entry for a port (host order).
    pub fn port_services(&self, port: u16) -> Result<PortServices> {
        Ok(self.ports.get(&(port as u32), 0)?)
    }

    /// Every service key in the map (to drop the ones no longer configured).
    pub fn service_keys(&self) -> Vec<ServiceKey> {
        self.services.keys().filter_map(|k| k.ok()).collect()
    }

    /// Every service entry in the map.
    pub fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services.iter().filter_map(|e| e.ok()).collect()
    }

    /// Every backend slot in use: id and address.
    pub fn backends(&self) -> Result<Vec<(u32, std::net::SocketAddr)>> {
        let mut out = Vec::new();
        for id in 1..MAX_BACKENDS {
            let b = self.backends.get(&id, 0)?;
            if b.flags & BackendInfo::VALID == 0 {
                continue;
            }
            let ip = lb_common::flow::ip_addr(&b.addr, b.family);
            out.push((id, std::net::SocketAddr::new(ip, u16::from_be(b.port))));
        }
        Ok(out)
    }

    /// Counters of one backend, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        let per_cpu = self.backend_stats.get(&id, 0)?;
        Ok(per_cpu.iter().fold(BackendStats::default(), |mut a, s| {
            a.packets_to_backend += s.packets_to_backend;
            a.bytes_to_backend += s.bytes_to_backend;
            a.packets_to_client += s.packets_to_client;
            a.bytes_to_client += s.bytes_to_client;
            a.new_flows += s.new_flows;
            a
        }))
    }

    /// L4 signals of one backend (connect failures, time to first byte), summed over CPUs.
    pub fn backend_l4(&self, id: u32) -> Result<L4Stats> {
        let per_cpu = self.backend_l4.get(&id, 0)?;
        Ok(per_cpu.iter().fold(L4Stats::default(), |mut a, s| {
            a.add(s);
            a
        }))
    }

    /// Active flows per backend id (as of the last conntrack walk, at most
    /// `counter::STALE` old; never blocks).
    pub fn active_flows(&self) -> std::collections::HashMap<u32, u64> {
        self.conntrack.active()
    }

    /// Verdict and reason counters, summed over CPUs (index = `Stat`).
    pub fn xdp_stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.xdp_stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Flows in the conntrack map (as of the last count, at most `counter::STALE` old: the
    /// count walks every key, one syscall each, so it runs on a thread of its own and never
    /// delays the caller), and the map's capacity.
    pub fn conntrack_fill(&self) -> (u64, u32) {
        (self.conntrack.get(), self.conntrack_capacity)
    }

    /// The conntrack entry of flow `key` (client → VIP), if it has one. lbd reads entries in
    /// whole-map walks; this one-key read is for tests and tools.
    pub fn conntrack_entry(
        &self,
        key: &lb_common::flow::FlowKey,
    ) -> Result<Option<lb_common::conntrack::CtValue>> {
        match self.conntrack_map()?.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
