//! The data plane seen from userspace: load the XDP object, attach it, pin it, and write its
//! maps. Nothing else in the daemon touches kernel maps.
//!
//! Pin layout (versioned so that an incompatible map layout is never misread):
//! `pin_dir/v1/maps/<MAP>` and `pin_dir/v1/links/<interface>`.

mod counter;
mod kernel;
pub use kernel::{FakeKernel, FakeState, Kernel, Write};

use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapInfo, MapType, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
    util::nr_cpus,
};
use lb_common::{
    MAX_BACKENDS, Tunables,
    backend::{BackendInfo, NextHop},
    guard::{SourceAddr, SourceRule},
    map_names,
    service::{MaglevTable, PortServices, ServiceKey, ServiceValue},
    stats::{BackendStats, STAT_COUNT},
};

/// The compiled XDP object (built by build.rs from `lb-ebpf`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The balancer program's name in the object.
pub const PROGRAM: &str = "lb_xdp";
/// The always-pass program (benchmark baseline).
pub const PASS_PROGRAM: &str = "lb_pass";
/// The benchmarks' ideal forwarder (fib lookup + redirect; no balancing).
pub const IDEAL_FORWARDER: &str = "lb_ideal_fwd";
/// Version of the pin layout; bump when a map's key or value changes.
pub const PIN_LAYOUT: &str = "v1";

/// A packet reads a table half for well under a microsecond; waiting this long before
/// rewriting a half that was live guarantees no packet still reads it.
const HALF_GRACE: Duration = Duration::from_millis(5);

/// How to load the program.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Pin maps and links under `pin_dir/v1/` (and adopt what is pinned there).
    pub pin_dir: Option<PathBuf>,
    pub tunables: Tunables,
    pub conntrack_max: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            pin_dir: None,
            tunables: Tunables {
                cpus: nr_cpus().map(|n| n as u32).unwrap_or(1),
                ..Tunables::DEFAULT
            },
            conntrack_max: lb_common::DEFAULT_CONNTRACK_MAX,
        }
    }
}

/// Directory of this layout's pinned maps.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(PIN_LAYOUT).join("maps")
}

/// Directory of this layout's pinned links.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(PIN_LAYOUT).join("links")
}

/// Makes sure `dir` is on a bpf filesystem, mounting one at `/sys/fs/bpf` if that is where
/// it should be and nothing is mounted there (as Cilium and bpfman do).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let is_bpffs = |p: &Path| -> bool {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: valid C string and an out-parameter of the right type.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
    };
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount -t bpf")?;
        if status.success() {
            tracing::info!("mounted a bpf filesystem at /sys/fs/bpf");
            return Ok(());
        }
    }
    bail!(
        "pin_dir {} is not on a bpf filesystem: mount one first (`mount -t bpf bpf /sys/fs/bpf`) or point pin_dir at one",
        dir.display()
    )
}

/// What each pinned map must look like for this build to use it: type, key size, value size,
/// and the entry count (`None` where the config sets it: conntrack and reverse NAT), from
/// the one description the kernel crate is sized by.
fn expected_maps() -> impl Iterator<Item = (&'static str, MapType, usize, usize, Option<u32>)> {
    use lb_common::layout::MapKind;
    lb_common::layout::PINNED.into_iter().map(|m| {
        let ty = match m.kind {
            MapKind::Hash => MapType::Hash,
            MapKind::LruHash => MapType::LruHash,
            MapKind::Array => MapType::Array,
            MapKind::PerCpuArray => MapType::PerCpuArray,
            MapKind::LpmTrie => MapType::LpmTrie,
        };
        (
            m.name,
            ty,
            m.key_size,
            m.value_size,
            (!m.sized_by_config).then_some(m.max_entries),
        )
    })
}

/// Refuses pinned maps this build would misread: a layout change without a version bump, or
/// pins left by something else. Maps that are not pinned yet are fine (they get created).
pub fn check_pinned_layout(pin_dir: &Path) -> Result<()> {
    let dir = maps_dir(pin_dir);
    for (name, ty, key, value, entries) in expected_maps() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let found_ty = info.map_type().ok();
        let mismatch = found_ty != Some(ty)
            || info.key_size() as usize != key
            || info.value_size() as usize != value
            || entries.is_some_and(|n| n != info.max_entries());
        if mismatch {
            bail!(
                "pinned map {} does not match this build (found {:?} key {} value {} entries {}, want {:?} key {key} value {value} entries {}): \
                 refusing to misread it. Run `lbd down` to remove the old data plane (established flows through it are lost), then start again",
                path.display(),
                found_ty,
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                ty,
                entries.map_or("any".to_string(), |n| n.to_string()),
            );
        }
    }
    Ok(())
}

/// A loaded balancer: the program plus typed handles to its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Port (host order) → the services on it, kept by `sync_port`.
    ports: Array<MapData, PortServices>,
    tables: Array<MapData, MaglevTable>,
    backends: Array<MapData, BackendInfo>,
    next_hops: PerCpuArray<MapData, NextHop>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    xdp_stats: PerCpuArray<MapData, u64>,
    /// The source guard, replaced whole by `set_sources`.
    sources: LpmTrie<MapData, SourceAddr, SourceRule>,
    /// Counts the conntrack map's entries off the caller's thread, for metrics.
    conntrack: counter::Counter,
    conntrack_capacity: u32,
    /// When each service's previous table half last stopped being live.
    retired: StdHashMap<u32, tokio::time::Instant>,
    /// Pinned links (kept so that dropping the Dataplane never detaches them).
    links: Vec<PinnedLink>,
}

impl Dataplane {
    /// Loads the object (adopting pinned maps under `pin_dir/v1/maps` when they exist).
    pub fn load(opts: &LoadOptions) -> Result<Dataplane> {
        let mut loader = EbpfLoader::new();
        loader
            .override_global(lb_common::TUNABLES_GLOBAL, &opts.tunables, true)
            .map_max_entries(map_names::CONNTRACK, opts.conntrack_max)
            .map_max_entries(map_names::REVERSE_NAT, opts.conntrack_max);
        let pin_paths: Vec<(&str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                ensure_bpffs(dir)?;
                check_pinned_layout(dir)?;
                warn_other_layouts(dir);
                let maps = maps_dir(dir);
                std::fs::create_dir_all(&maps)
                    .with_context(|| format!("creating {}", maps.display()))?;
                std::fs::create_dir_all(links_dir(dir))?;
                lb_common::layout::PINNED
                    .iter()
                    .map(|m| (m.name, maps.join(m.name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the XDP object (are you root, with BPF enabled?)")?;
        // Only the balancer: the benchmark programs are loaded when first asked for.
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("program {PROGRAM} missing from the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("verifier rejected {PROGRAM}"))?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        };
        let services = HashMap::try_from(take(map_names::SERVICES)?)?;
        let ports = Array::try_from(take(map_names::PORTS)?)?;
        let tables = Array::try_from(take(map_names::TABLES)?)?;
        let backends = Array::try_from(take(map_names::BACKENDS)?)?;
        let next_hops = PerCpuArray::try_from(take(map_names::NEXT_HOPS)?)?;
        let backend_stats = PerCpuArray::try_from(take(map_names::BACKEND_STATS)?)?;
        let xdp_stats = PerCpuArray::try_from(take(map_names::XDP_STATS)?)?;
        let sources = LpmTrie::try_from(take(map_names::SOURCES)?)?;
        let ct = take(map_names::CONNTRACK)?;
        // An adopted map keeps the size it was created with, whatever the config says now.
        let (conntrack_capacity, conntrack_id) = match &ct {
            aya::maps::Map::LruHashMap(d) | aya::maps::Map::HashMap(d) => {
                let info = d.info()?;
                (info.max_entries(), info.id())
            }
            _ => bail!("map {} is not a hash map", map_names::CONNTRACK),
        };
        drop(ct);
        let conntrack = counter::Counter::new(conntrack_id);
        Ok(Dataplane {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            services,
            ports,
            tables,
            backends,
            next_hops,
            backend_stats,
            xdp_stats,
            sources,
            conntrack,
            conntrack_capacity,
            retired: StdHashMap::new(),
            links: Vec::new(),
        })
    }

    /// The program by name (for tests and benchmarks: `TestRun`).
    /// Loads it on first use (only the balancer is loaded up front).
    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        Ok(prog)
    }

    /// Attaches the balancer to `iface`. With a pin dir the link is pinned, so it outlives this
    /// process; an existing pinned link is atomically switched to this program instead.
    pub fn attach(&mut self, iface: &str, mode: crate::config::XdpMode) -> Result<()> {
        let link_pin = self.pin_dir.as_ref().map(|d| links_dir(d).join(iface));
        if let Some(path) = &link_pin {
            if path.exists() {
                let pinned = PinnedLink::from_pin(path)
                    .with_context(|| format!("opening pinned link {}", path.display()))?;
                let link = aya::programs::xdp::XdpLink::try_from(FdLink::from(pinned))?;
                let prog = self.program(PROGRAM)?;
                let id = prog
                    .attach_to_link(link)
                    .with_context(|| format!("replacing the program on {iface}"))?;
                // The pin keeps the (updated) link; our fd to it can go.
                drop(FdLink::try_from(prog.take_link(id)?)?);
                self.links.push(PinnedLink::from_pin(path)?);
                tracing::info!(
                    iface,
                    "adopted the pinned XDP link and swapped in this program"
                );
                return Ok(());
            }
        }
        let modes: &[XdpMode] = match mode {
            crate::config::XdpMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            crate::config::XdpMode::Native => &[XdpMode::Driver],
            crate::config::XdpMode::Skb => &[XdpMode::Skb],
        };
        let prog = self.program(PROGRAM)?;
        let mut last_err = None;
        for &m in modes {
            match prog.attach(iface, m) {
                Ok(id) => {
                    tracing::info!(iface, mode = ?m, "XDP program attached");
                    if let Some(path) = &link_pin {
                        let link = prog.take_link(id)?;
                        let pinned = FdLink::try_from(link)?
                            .pin(path)
                            .with_context(|| format!("pinning link at {}", path.display()))?;
                        self.links.push(pinned);
                    }
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(anyhow!(
            "attaching XDP to {iface} ({mode:?}): {}",
            last_err.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

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

    /// Publishes a new table for a service atomically: the table goes into the half that is
    /// not live, then the service entry is replaced (one atomic element swap) to point at it.
    /// Returns the new generation.
    pub fn publish_table(
        &mut self,
        key: &ServiceKey,
        id: u32,
        snat_addr: lb_common::flow::IpBytes,
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
                _pad: 0,
            },
            0,
        )?;
        self.retired.insert(id, tokio::time::Instant::now());
        // After the service entry: a packet that sees the port's bit finds the service.
        self.sync_port(key.port)?;
        Ok(generation)
    }

    /// Until when the service at index `id` may not get a new table: the half it would be
    /// written into stopped being live less than [`HALF_GRACE`] ago (a packet may still read
    /// it). `None`: now.
    pub fn grace_until(&self, id: u32) -> Option<tokio::time::Instant> {
        let until = *self.retired.get(&id)? + HALF_GRACE;
        (until > tokio::time::Instant::now()).then_some(until)
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

    /// Verdict and reason counters, summed over CPUs (index = `Stat`).
    pub fn xdp_stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.xdp_stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

impl Dataplane {
    /// Flows in the conntrack map (as of the last count, at most [`counter::STALE`] old: the
    /// count walks every key, one syscall each, so it runs on a thread of its own and never
    /// delays the caller), and the map's capacity.
    pub fn conntrack_fill(&self) -> (u64, u32) {
        (self.conntrack.get(), self.conntrack_capacity)
    }
}

/// Wire bytes of an address in the data plane's layout.
pub fn ip_bytes(ip: std::net::IpAddr) -> (lb_common::flow::IpBytes, u8) {
    match ip {
        std::net::IpAddr::V4(a) => (lb_common::flow::v4(a.octets()), lb_common::FAMILY_V4),
        std::net::IpAddr::V6(a) => (
            lb_common::flow::IpBytes::from_octets(a.octets()),
            lb_common::FAMILY_V6,
        ),
    }
}

/// A table with every bucket empty, on the heap (it is 256 KiB: too big for a task's stack).
pub fn empty_table() -> Box<MaglevTable> {
    let layout = std::alloc::Layout::new::<MaglevTable>();
    // SAFETY: MaglevTable is plain u32s, for which all-zero is valid; layout is non-zero-sized.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut MaglevTable;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(p)
    }
}

/// Pins of another layout version are not ours to read or remove; say they are there.
fn warn_other_layouts(pin_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != PIN_LAYOUT && name.starts_with('v') {
            tracing::warn!(
                found = %e.path().display(),
                ours = PIN_LAYOUT,
                "pins of another layout version exist; this build ignores them (remove them with the lbd that made them)"
            );
        }
    }
}

/// Detaches and removes everything pinned under `pin_dir/v1` (what `lbd down` does).
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    let links = links_dir(pin_dir);
    if links.exists() {
        for e in std::fs::read_dir(&links)? {
            let path = e?.path();
            // Unpinning drops the last reference: the kernel detaches the program.
            PinnedLink::from_pin(&path)
                .with_context(|| format!("opening {}", path.display()))?
                .unpin()?;
        }
    }
    let layout = pin_dir.join(PIN_LAYOUT);
    if layout.exists() {
        std::fs::remove_dir_all(&layout)
            .with_context(|| format!("removing {}", layout.display()))?;
    }
    // The pin dir itself goes too if nothing else lives there.
    let _ = std::fs::remove_dir(pin_dir);
    Ok(())
}
