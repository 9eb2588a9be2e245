//! The data plane seen from userspace: load the XDP object and attach it (here), its pins
//! (`pins`), map writes (`writes`) and reads (`reads`); the control plane sees it through the
//! `Kernel` trait (`kernel`). Nothing else in the daemon touches kernel maps.
//!
//! Pin layout (versioned so that an incompatible map layout is never misread):
//! `pin_dir/v3/maps/<MAP>` and `pin_dir/v3/links/<interface>`.

mod batch;
mod counter;
pub mod gc;
mod kernel;
mod pins;
mod reads;
mod writes;
pub use kernel::{FakeKernel, FakeState, Kernel, Write};
use pins::warn_other_layouts;
pub use pins::{check_pinned_layout, ensure_bpffs, links_dir, maps_dir, remove_pins};

use std::{collections::HashMap as StdHashMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray, lpm_trie::LpmTrie},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
    util::nr_cpus,
};
use lb_common::{
    Tunables,
    backend::{BackendInfo, NextHop},
    guard::{SourceAddr, SourceRule},
    map_names,
    service::{MaglevTable, PortServices, ServiceKey, ServiceValue},
    stats::BackendStats,
};

/// The compiled XDP object (built by build.rs from `lb-ebpf`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The balancer program's name in the object.
pub const PROGRAM: &str = "lb_xdp";
/// The new-flow program, which the balancer tail-calls for packets without a live flow.
pub const NEW_FLOW_PROGRAM: &str = "lb_new_flow";
/// The always-pass program (benchmark baseline).
pub const PASS_PROGRAM: &str = "lb_pass";
/// The benchmarks' ideal forwarder (fib lookup + redirect; no balancing).
pub const IDEAL_FORWARDER: &str = "lb_ideal_fwd";
/// Version of the pin layout; bump when a map's key or value changes.
pub const PIN_LAYOUT: &str = "v3";

/// A packet reads a table half for well under a microsecond; waiting this long before
/// rewriting a half that was live guarantees no packet still reads it.
const HALF_GRACE: Duration = Duration::from_millis(5);

/// How to load the program.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Pin maps and links under `pin_dir/v3/` (and adopt what is pinned there).
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
    backend_l4: PerCpuArray<MapData, lb_common::stats::L4Stats>,
    xdp_stats: PerCpuArray<MapData, u64>,
    /// The source guard, replaced whole by `set_sources`.
    sources: LpmTrie<MapData, SourceAddr, SourceRule>,
    /// Counts the conntrack map's entries off the caller's thread, for metrics.
    conntrack: counter::Counter,
    /// Kernel id of the reverse-NAT map (the flow collector opens it by id).
    reverse_nat_id: u32,
    /// Frees the SNAT ports of finished flows, once started (`start_flow_collector`).
    collector: Option<gc::Collector>,
    tunables: Tunables,
    conntrack_capacity: u32,
    /// When each service's previous table half last stopped being live.
    retired: StdHashMap<u32, tokio::time::Instant>,
    /// Pinned links (kept so that dropping the Dataplane never detaches them).
    links: Vec<PinnedLink>,
}

/// How often a program load interrupted by a signal is tried.
const LOAD_ATTEMPTS: u32 = 5;

/// Loads `prog` (called `name`), through [`retry_interrupted`].
fn load_program(prog: &mut Xdp, name: &str) -> Result<()> {
    retry_interrupted(name, || prog.load()).with_context(|| format!("verifier rejected {name}"))
}

/// Runs `load` until it does not fail with EAGAIN, at most [`LOAD_ATTEMPTS`] times. The
/// verifier gives up with EAGAIN when a signal arrives for the loading thread while it works
/// (a child process exiting, a SIGHUP); libbpf tries such a load again, and so does this. Any
/// other error is the verifier's answer, returned at once.
fn retry_interrupted(
    name: &str,
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                tracing::debug!(
                    program = name,
                    attempt,
                    "program load interrupted; trying again"
                );
                attempt += 1;
            }
            r => return r,
        }
    }
}

impl Dataplane {
    /// Loads the object (adopting pinned maps under `pin_dir/v3/maps` when they exist).
    /// With `LB_VERIFIER_LOG` set, a rejected program comes with the verifier's whole log.
    pub fn load(opts: &LoadOptions) -> Result<Dataplane> {
        let mut loader = EbpfLoader::new();
        if std::env::var_os("LB_VERIFIER_LOG").is_some() {
            loader
                .verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS);
        }
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
        load_program(prog, PROGRAM)?;
        // The new-flow half, which the balancer tail-calls: loaded and put in its slot now,
        // before any interface runs this object's balancer.
        let new_flow: &mut Xdp = ebpf
            .program_mut(NEW_FLOW_PROGRAM)
            .ok_or_else(|| anyhow!("program {NEW_FLOW_PROGRAM} missing from the object"))?
            .try_into()?;
        load_program(new_flow, NEW_FLOW_PROGRAM)?;
        let new_flow_fd = new_flow.fd()?.try_clone()?;
        let mut programs = ProgramArray::try_from(
            ebpf.map_mut(map_names::PROGRAMS)
                .ok_or_else(|| anyhow!("map {} missing from the object", map_names::PROGRAMS))?,
        )?;
        programs
            .set(lb_common::layout::NEW_FLOW_PROGRAM, &new_flow_fd, 0)
            .context("putting the new-flow program in its tail-call slot")?;
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
        let backend_l4 = PerCpuArray::try_from(take(map_names::BACKEND_L4)?)?;
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
        let conntrack = counter::Counter::new(conntrack_id, opts.tunables);
        let reverse_nat_id = match ebpf.map(map_names::REVERSE_NAT) {
            Some(aya::maps::Map::HashMap(d)) => d.info()?.id(),
            _ => bail!("map {} is not a hash map", map_names::REVERSE_NAT),
        };
        Ok(Dataplane {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            services,
            ports,
            tables,
            backends,
            next_hops,
            backend_stats,
            backend_l4,
            xdp_stats,
            sources,
            conntrack,
            reverse_nat_id,
            collector: None,
            tunables: opts.tunables,
            conntrack_capacity,
            retired: StdHashMap::new(),
            links: Vec::new(),
        })
    }

    /// The conntrack map, opened by id: userspace keeps no handle on it (only its walker
    /// reads it), and one-key reads and removals are rare.
    fn conntrack_map(
        &self,
    ) -> Result<
        aya::maps::HashMap<
            aya::maps::MapData,
            lb_common::flow::FlowKey,
            lb_common::conntrack::CtValue,
        >,
    > {
        let data = aya::maps::MapData::from_id(self.conntrack.map_id())?;
        Ok(aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            data,
        ))?)
    }

    /// Starts the flow collector ([`gc`]), which frees the SNAT ports of finished flows once a
    /// second. lbd starts it once; without it no port is ever reused.
    pub fn start_flow_collector(&mut self) -> Result<()> {
        if self.collector.is_none() {
            self.collector = Some(gc::Collector::start(
                self.reverse_nat_id,
                self.conntrack.map_id(),
                self.tunables,
            )?);
        }
        Ok(())
    }

    /// One pass of the flow collector now (tests run passes when they choose instead of
    /// starting it): `suspects` carries what a pass must remember for the next.
    pub fn collect_flows(&self, suspects: &mut gc::Suspects) -> Result<gc::Collected> {
        gc::pass(
            self.reverse_nat_id,
            self.conntrack.map_id(),
            &self.tunables,
            gc::monotonic_ns(),
            suspects,
        )
    }

    /// What the running collector saw: reverse-NAT entries removed so far (finished,
    /// orphaned), and the SNAT ports in use after its last pass.
    pub fn flows_collected(&self) -> (u64, u64, u64) {
        self.collector.as_ref().map_or((0, 0, 0), |c| {
            let get =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            (
                get(&c.totals.finished),
                get(&c.totals.orphaned),
                get(&c.totals.in_use),
            )
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
            load_program(prog, name)?;
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

#[cfg(test)]
mod tests {
    use aya::programs::ProgramError;

    use super::{LOAD_ATTEMPTS, retry_interrupted};

    fn failed(errno: i32) -> ProgramError {
        ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(String::new()),
        }
    }

    /// A load interrupted by signals is tried again until it goes through, up to
    /// `LOAD_ATTEMPTS` times; the verifier's own refusal is not tried again.
    #[test]
    fn only_an_interrupted_load_is_tried_again_and_only_so_often() {
        // Interrupted 1, 4 and 5 times, then it would go through; refused once.
        for (interrupted, errno, ok, calls) in [
            (1, libc::EAGAIN, true, 2),
            (LOAD_ATTEMPTS - 1, libc::EAGAIN, true, LOAD_ATTEMPTS),
            (LOAD_ATTEMPTS, libc::EAGAIN, false, LOAD_ATTEMPTS),
            (1, libc::EACCES, false, 1),
        ] {
            let mut n = 0;
            let r = retry_interrupted("p", || {
                n += 1;
                if n <= interrupted {
                    Err(failed(errno))
                } else {
                    Ok(())
                }
            });
            assert_eq!(
                (r.is_ok(), n),
                (ok, calls),
                "{interrupted} failures with errno {errno}"
            );
        }
    }
}
