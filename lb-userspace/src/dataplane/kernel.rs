//! What the control plane needs of the data plane, as a trait: the aya-backed
//! [`Dataplane`](super::Dataplane) implements it for the real kernel, [`FakeKernel`] in memory
//! for tests that run the whole control plane in process, without root.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{Result, bail};
use lb_common::{
    backend::BackendInfo,
    flow::IpBytes,
    guard::SourceRule,
    service::{MaglevTable, ServiceKey, ServiceValue},
    stats::{BackendStats, L4Stats, STAT_COUNT},
};

use crate::{config::XdpMode, state::ServiceIndex};

/// The data plane as the control plane uses it. Every write is whole (a backend slot, a
/// service's table and entry, the source guard); reads are summed over CPUs.
pub trait Kernel: Send {
    /// Attaches the program to `iface` (ingress).
    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<()>;
    /// Writes backend `id` (or clears its slot with `None`).
    fn set_backend(&mut self, id: u32, info: Option<BackendInfo>) -> Result<()>;
    /// Every backend slot in use: id and address.
    fn backends(&self) -> Result<Vec<(u32, SocketAddr)>>;
    /// Makes the source guard hold exactly `rules` (prefix, prefix length, rule).
    fn set_sources(&mut self, rules: &[(IpAddr, u8, SourceRule)]) -> Result<()>;
    /// Publishes `table` for the service `key` at index `id`, atomically, with `delivery`:
    /// the SNAT address (the VIP for DSR) and the `ServiceValue` flags; returns the new
    /// generation.
    fn publish_table(
        &mut self,
        key: &ServiceKey,
        index: ServiceIndex,
        delivery: (IpBytes, u32),
        table: &MaglevTable,
    ) -> Result<u32>;
    /// Until when the service at `index` may not get a new table (the half it would be
    /// written into was live a moment ago and a packet may still read it); `None`: now. The
    /// daemon schedules the publish for then instead of waiting.
    fn grace_until(&self, index: ServiceIndex) -> Option<tokio::time::Instant>;
    /// Stops balancing a service (its flows' packets then go to the kernel's stack).
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    /// Every service entry.
    fn services(&self) -> Vec<(ServiceKey, ServiceValue)>;
    /// Counters of one backend.
    fn backend_stats(&self, id: u32) -> Result<BackendStats>;
    /// Verdict and reason counters (index = `Stat`).
    fn xdp_stats(&self) -> Result<[u64; STAT_COUNT as usize]>;
    /// Flows in the conntrack map, and its capacity.
    fn conntrack_fill(&self) -> (u64, u32);
    /// L4 signals of one backend: connect failures, time to first byte.
    fn backend_l4(&self, id: u32) -> Result<L4Stats>;
    /// Active flows per backend id (from a recent walk of the conntrack map; never blocks).
    fn active_flows(&self) -> HashMap<u32, u64>;
    /// What the flow collector saw: reverse-NAT entries removed so far (finished,
    /// orphaned), and the SNAT ports in use after its last pass.
    fn flows_collected(&self) -> (u64, u64, u64) {
        (0, 0, 0)
    }
}

impl Kernel for super::Dataplane {
    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        super::Dataplane::attach(self, iface, mode)
    }
    fn set_backend(&mut self, id: u32, info: Option<BackendInfo>) -> Result<()> {
        super::Dataplane::set_backend(self, id, info)
    }
    fn backends(&self) -> Result<Vec<(u32, SocketAddr)>> {
        super::Dataplane::backends(self)
    }
    fn set_sources(&mut self, rules: &[(IpAddr, u8, SourceRule)]) -> Result<()> {
        super::Dataplane::set_sources(self, rules)
    }
    fn publish_table(
        &mut self,
        key: &ServiceKey,
        index: ServiceIndex,
        delivery: (IpBytes, u32),
        table: &MaglevTable,
    ) -> Result<u32> {
        super::Dataplane::publish_table(self, key, index.0, delivery, table)
    }
    fn grace_until(&self, index: ServiceIndex) -> Option<tokio::time::Instant> {
        super::Dataplane::grace_until(self, index.0)
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        super::Dataplane::remove_service(self, key)
    }
    fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        super::Dataplane::services(self)
    }
    fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        super::Dataplane::backend_stats(self, id)
    }
    fn xdp_stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
        super::Dataplane::xdp_stats(self)
    }
    fn flows_collected(&self) -> (u64, u64, u64) {
        super::Dataplane::flows_collected(self)
    }
    fn conntrack_fill(&self) -> (u64, u32) {
        super::Dataplane::conntrack_fill(self)
    }
    fn backend_l4(&self, id: u32) -> Result<L4Stats> {
        super::Dataplane::backend_l4(self, id)
    }
    fn active_flows(&self) -> HashMap<u32, u64> {
        super::Dataplane::active_flows(self)
    }
}

/// One write the control plane made, as [`FakeKernel`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Attach(String),
    Backend(u32, Option<SocketAddr>),
    Sources(usize),
    Publish { id: u32, generation: u32 },
    Remove(ServiceKey),
}

/// What [`FakeKernel`] holds: what was written (services with their live table, backends,
/// the source guard), a log of every write, and counters for the reads to return.
#[derive(Default)]
pub struct FakeState {
    /// Services by key: their entry and their live table's buckets.
    pub services: HashMap<ServiceKey, (ServiceValue, Vec<u32>)>,
    pub backends: BTreeMap<u32, SocketAddr>,
    pub sources: Vec<(IpAddr, u8, SourceRule)>,
    pub attached: Vec<String>,
    /// Every write, in order.
    pub writes: Vec<Write>,
    /// Counters the reads return.
    pub backend_stats: HashMap<u32, BackendStats>,
    pub backend_l4: HashMap<u32, L4Stats>,
    pub active_flows: HashMap<u32, u64>,
    pub xdp_stats: Vec<u64>,
    /// When set, the next write fails (and is not applied), as a kernel out of memory would.
    pub fail_next_write: bool,
    /// Emulates the real data plane's grace after a publish (`None`: no grace).
    pub grace: Option<std::time::Duration>,
    /// When each service index was last published (for `grace`).
    pub published_at: HashMap<u32, tokio::time::Instant>,
}

impl FakeState {
    fn write(&mut self, w: Write) -> Result<()> {
        if std::mem::take(&mut self.fail_next_write) {
            bail!("injected failure: {w:?}");
        }
        self.writes.push(w);
        Ok(())
    }

    /// The live table of the service at index `id`.
    pub fn table(&self, id: u32) -> Option<&[u32]> {
        self.services
            .values()
            .find(|(v, _)| v.id == id)
            .map(|(_, t)| t.as_slice())
    }
}

/// An in-memory data plane. Clones share one [`FakeState`], so a test keeps a clone to look
/// at (or tamper with) what the daemon's copy was given.
#[derive(Clone, Default)]
pub struct FakeKernel(Arc<Mutex<FakeState>>);

impl FakeKernel {
    /// What was written so far.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Kernel for FakeKernel {
    fn attach(&mut self, iface: &str, _mode: XdpMode) -> Result<()> {
        let mut st = self.state();
        st.write(Write::Attach(iface.to_string()))?;
        st.attached.push(iface.to_string());
        Ok(())
    }
    fn set_backend(&mut self, id: u32, info: Option<BackendInfo>) -> Result<()> {
        let addr = info.map(|b| {
            SocketAddr::new(
                lb_common::flow::ip_addr(&b.addr, b.family),
                u16::from_be(b.port),
            )
        });
        let mut st = self.state();
        st.write(Write::Backend(id, addr))?;
        match addr {
            Some(a) => st.backends.insert(id, a),
            None => st.backends.remove(&id),
        };
        Ok(())
    }
    fn backends(&self) -> Result<Vec<(u32, SocketAddr)>> {
        Ok(self
            .state()
            .backends
            .iter()
            .map(|(i, a)| (*i, *a))
            .collect())
    }
    fn set_sources(&mut self, rules: &[(IpAddr, u8, SourceRule)]) -> Result<()> {
        let mut st = self.state();
        st.write(Write::Sources(rules.len()))?;
        st.sources = rules.to_vec();
        Ok(())
    }
    fn publish_table(
        &mut self,
        key: &ServiceKey,
        index: ServiceIndex,
        (snat_addr, flags): (IpBytes, u32),
        table: &MaglevTable,
    ) -> Result<u32> {
        let id = index.0;
        let mut st = self.state();
        let (half, generation) = match st.services.get(key).filter(|(v, _)| v.id == id) {
            Some((v, _)) => ((v.half + 1) & 1, v.generation.wrapping_add(1)),
            None => (0, 1),
        };
        if let Some(until) = st
            .grace
            .and_then(|g| Some(*st.published_at.get(&id)? + g))
            .filter(|u| *u > tokio::time::Instant::now())
        {
            bail!("publish during the grace period (until {until:?})");
        }
        st.write(Write::Publish { id, generation })?;
        st.published_at.insert(id, tokio::time::Instant::now());
        let value = ServiceValue {
            snat_addr,
            id,
            half,
            generation,
            flags,
        };
        st.services.insert(*key, (value, table.buckets.to_vec()));
        Ok(generation)
    }
    fn grace_until(&self, index: ServiceIndex) -> Option<tokio::time::Instant> {
        let st = self.state();
        let until = *st.published_at.get(&index.0)? + st.grace?;
        (until > tokio::time::Instant::now()).then_some(until)
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        let mut st = self.state();
        st.write(Write::Remove(*key))?;
        st.services.remove(key);
        Ok(())
    }
    fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.state()
            .services
            .iter()
            .map(|(k, (v, _))| (*k, *v))
            .collect()
    }
    fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        Ok(self
            .state()
            .backend_stats
            .get(&id)
            .copied()
            .unwrap_or_default())
    }
    fn xdp_stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
        let mut out = [0u64; STAT_COUNT as usize];
        for (o, v) in out.iter_mut().zip(&self.state().xdp_stats) {
            *o = *v;
        }
        Ok(out)
    }
    fn conntrack_fill(&self) -> (u64, u32) {
        (0, lb_common::DEFAULT_CONNTRACK_MAX)
    }
    fn backend_l4(&self, id: u32) -> Result<L4Stats> {
        Ok(self
            .state()
            .backend_l4
            .get(&id)
            .copied()
            .unwrap_or_default())
    }
    fn active_flows(&self) -> HashMap<u32, u64> {
        self.state().active_flows.clone()
    }
}
