//! Map writes: backends, the source guard, tables (published atomically) and services.

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::{PerCpuValues, lpm_trie::Key as LpmKey},
    util::nr_cpus,
};
use lb_common::{
    MAX_BACKENDS,
    backend::{BackendInfo, NextHop},
    conntrack::RnatValue,
    flow::FlowKey,
    guard::{SourceAddr, SourceRule},
    map_names,
    service::{MaglevTable, PortServices, ServiceKey, ServiceValue},
};

use super::{Dataplane, HALF_GRACE, ip_bytes};

impl Dataplane {
    /// Writes (or clears, with `None`) a backend slot, and forgets its cached next hop.
    pub fn set_backend(&mut self, id: u32, info: Option<BackendInfo>) -> Result<()> {
        if id == 0 || id >= MAX_BACKENDS {
            bail!("backend id {id} out of range");
        }
        self.backends.set(id, info.unwrap_or_default(), 0)?;
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        self.next_hops.set(
            id,
            PerCpuValues::try_from(vec![NextHop::default(); cpus])?,
            0,
        )?;
        Ok(())
    }

    /// Makes the source guard hold exactly `rules` (prefix, prefix length, rule): new ones are
    /// written before stale ones are removed, so no moment lets a refused source through.
    pub fn set_sources(&mut self, rules: &[(std::net::IpAddr, u8, SourceRule)]) -> Result<()> {
        if rules.len() > lb_common::guard::MAX_SOURCE_RULES as usize {
            bail!(
                "{} source-guard prefixes, at most {} fit",
                rules.len(),
                lb_common::guard::MAX_SOURCE_RULES
            );
        }
        let key = |ip: std::net::IpAddr, len: u8| {
            let (addr, family) = ip_bytes(ip);
            LpmKey::new(
                SourceAddr::HEADER_BITS + len as u32,
                SourceAddr {
                    family: family as u32,
                    _pad: 0,
                    addr,
                },
            )
        };
        let wanted: Vec<(LpmKey<SourceAddr>, SourceRule)> = rules
            .iter()
            .map(|(ip, len, r)| (key(*ip, *len), *r))
            .collect();
        for (k, r) in &wanted {
            self.sources
                .insert(k, r, 0)
                .context("writing the source guard")?;
        }
        let stale: Vec<LpmKey<SourceAddr>> = self
            .sources
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| {
                !wanted
                    .iter()
                    .any(|(w, _)| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            })
            .collect();
        for k in stale {
            self.sources
                .remove(&k)
                .context("pruning the source guard")?;
        }
        Ok(())
    }

    /// Publishes a new table for a service atomically: the table goes into the half that is
    /// not live, then the service entry is replaced (one atomic element swap) to point at it.
    /// Returns the new generation.
    pub fn publish_table(
        &mut self,
        key: &ServiceKey,
        id: u32,
        (snat_addr, flags): (lb_common::flow::IpBytes, u32),
        table: &MaglevTable,
    ) -> Result<u32> {
        let current = self.service(key).filter(|v| v.id == id);
        let (half, generation) = match current {
            Some(v) => ((v.half + 1) & 1, v.generation.wrapping_add(1)),
            None => (0, 1),
        };
        if let Some(until) = self.grace_until(id) {
            bail!(
                "service index {id}: its previous table half is in its grace period for {:?} more (publish after it)",
                until.saturating_duration_since(tokio::time::Instant::now())
            );
        }
        self.tables.set(id * 2 + half, table, 0)?;
        self.services.insert(
            key,
            ServiceValue {
                snat_addr,
                id,
                half,
                generation,
                flags,
            },
            0,
        )?;
        self.retired.insert(id, tokio::time::Instant::now());
        // After the service entry: a packet that sees the port's bit finds the service.
        self.sync_port(key.port)?;
        Ok(generation)
    }

    /// Until when the service at index `id` may not get a new table: the half it would be
    /// written into stopped being live less than `HALF_GRACE` ago (a packet may still read
    /// it). `None`: now.
    pub fn grace_until(&self, id: u32) -> Option<tokio::time::Instant> {
        let until = *self.retired.get(&id)? + HALF_GRACE;
        (until > tokio::time::Instant::now()).then_some(until)
    }

    /// Removes one entry of a flow, as the LRU evicts it when the table is full: `reverse`
    /// picks the reverse-NAT map (key: backend → SNAT address:port), else conntrack (key:
    /// client → VIP). lbd never does this; tests use it to show what the data path does
    /// with a flow that lost one of its entries.
    pub fn evict_flow_entry(&mut self, key: &FlowKey, reverse: bool) -> Result<()> {
        if reverse {
            let name = map_names::REVERSE_NAT;
            let map = self
                .ebpf
                .map_mut(name)
                .with_context(|| format!("map {name} missing"))?;
            let mut m: aya::maps::HashMap<_, FlowKey, RnatValue> =
                aya::maps::HashMap::try_from(map)?;
            m.remove(key).context("removing a reverse-NAT entry")
        } else {
            self.conntrack_map()?
                .remove(key)
                .context("removing a conntrack entry")
        }
    }

    /// Stops balancing a service (its flows' packets then go to the kernel).
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        match self.services.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.sync_port(key.port)
    }

    /// Rewrites a port's entry in the ports map from the services map (at most
    /// `MAX_SERVICES` entries), whatever changed: the ids of every service on the port, and
    /// their VIP when they share one IPv4 address.
    fn sync_port(&mut self, port_be: u16) -> Result<()> {
        let on_port: Vec<(ServiceKey, ServiceValue)> = self
            .services()
            .into_iter()
            .filter(|(k, _)| k.port == port_be)
            .collect();
        let ids = on_port
            .iter()
            .fold(0u32, |m, (_, v)| m | 1u32.checked_shl(v.id).unwrap_or(0));
        let v4 = |k: &ServiceKey| {
            (k.family == lb_common::FAMILY_V4).then(|| u32::from_ne_bytes(k.addr.v4_octets()))
        };
        let only_v4 = match on_port.first().and_then(|(k, _)| v4(k)) {
            Some(a) if on_port.iter().all(|(k, _)| v4(k) == Some(a)) => a,
            _ => 0,
        };
        self.ports.set(
            u16::from_be(port_be) as u32,
            PortServices { ids, only_v4 },
            0,
        )?;
        Ok(())
    }
}
