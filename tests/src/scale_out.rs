//! The scale-out topology: a client → a router running BIRD (BGP with BFD, ECMP over an L4
//! hash) → two balancer hosts, each running lbd and BIRD, between the router's uplink segment
//! and the servers' LAN, where the backends are (and the router again, their gateway).
//!
//! ```text
//!                        uplink 10.40.0.0/24            LAN 10.30.0.0/24
//!   client ── router ──┬── lb-1 (lbd + BIRD) ──┬── legacy-1 10.30.0.11
//!   10.99.1.2  (BIRD)  └── lb-2 (lbd + BIRD) ──┼── k8s-1    10.30.0.21
//!              └──────────────────────────────-┘  (the backends' gateway: answers in DSR)
//! ```
//!
//! Each balancer announces the VIP to the router, which spreads flows over both. In DSR the
//! backends hold the VIP on lo and answer through the router. (Two arms rather than one: a
//! frame a native XDP program sends back out of a veth with XDP_TX never reached the peer's
//! bridge on this kernel, while XDP_REDIRECT between two veths does.)
//!
//! Dropping it stops every process, runs `lbd down` for each balancer, unmounts their bpffs
//! and deletes every namespace.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    http::Backend,
    netns::{ChildGuard, Netns, run, tx_csum_off, unique_prefix, veth},
    topology::binary,
};

/// The VIP and its port.
pub const VIP: &str = "10.99.0.10";
pub const PORT: u16 = 8080;
/// The router's address on the uplink segment (the balancers' BGP neighbour).
const ROUTER_UP: &str = "10.40.0.1";
/// The router's address on the LAN (the backends' gateway).
const ROUTER_LAN: &str = "10.30.0.1";
/// The balancer hosts' addresses on the uplink segment (BGP, the router's next hops).
pub const LB_ADDRS: [&str; 2] = ["10.40.0.2", "10.40.0.3"];
/// The balancer hosts' addresses on the LAN (full-NAT: their SNAT addresses).
pub const LB_LAN: [&str; 2] = ["10.30.0.2", "10.30.0.3"];
/// Pool, name and address of each backend.
pub const BACKENDS: [(&str, &str, &str); 2] = [
    ("legacy", "legacy-1", "10.30.0.11"),
    ("k8s", "k8s-1", "10.30.0.21"),
];
/// BFD on every BGP session: a peer that stops answering is down after 5 × 100 ms (five, not
/// the usual three: a test machine's two cores busy with other tests must not drop a session).
const BFD: &str = "protocol bfd { interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 5; }; }";
/// BGP timers (and BFD) of every session.
const BGP_TIMERS: &str = "hold time 3; keepalive time 1; connect delay time 1; connect retry time 1; error wait time 1, 5; bfd on;";

/// One balancer host: its namespace, lbd, BIRD and files.
pub struct LbHost {
    lbd: Option<ChildGuard>,
    bird: Option<ChildGuard>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    bpffs: PathBuf,
    lbd_bin: PathBuf,
    pub ns: Netns,
}

impl LbHost {
    /// One control command's reply.
    pub fn control(&self, line: &str) -> Result<String> {
        crate::topology::control_at(&self.socket, line)
    }

    /// The sum of a metric's samples whose labels contain `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        crate::topology::metric_in(&self.ns.name, name, labels)
    }

    /// The host dies: lbd and BIRD are killed (SIGKILL) and its link goes down, so neither
    /// the XDP program nor a BGP goodbye gets anything out.
    pub fn die(&mut self) -> Result<()> {
        drop(self.lbd.take());
        self.ns.ip(&["link", "set", "eth0", "down"])?;
        self.ns.ip(&["link", "set", "eth1", "down"])?;
        drop(self.bird.take());
        Ok(())
    }

    /// `lbd down` for this host (inside its namespace: it also removes that namespace's
    /// forward filter): withdraws the VIPs, detaches, removes the pins.
    pub fn lbd_down(&self) -> Result<String> {
        crate::topology::lbd_down_in(&self.ns, &self.lbd_bin, &self.config)
    }

    /// lbd's log so far.
    pub fn lbd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lbd.log")).unwrap_or_default()
    }
}

impl Drop for LbHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.lbd.take() {
            c.terminate();
        }
        drop(self.bird.take());
        let _ = self.lbd_down();
        let _ = std::process::Command::new("umount")
            .arg(&self.bpffs)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The whole topology. Field order is drop order: processes, then namespaces.
pub struct ScaleOut {
    router_bird: Option<ChildGuard>,
    pub lbs: Vec<LbHost>,
    _backends: Vec<Backend>,
    dir: PathBuf,
    pub client: Netns,
    pub router: Netns,
    _lan: Netns,
    _uplink: Netns,
    _backend_ns: Vec<Netns>,
}

impl ScaleOut {
    /// Builds it with both balancers' services in `forwarding` mode (`"dsr"` or `"nat"`),
    /// starts everything, and waits until the router has a route to the VIP through both
    /// balancers.
    pub fn new(tag: &str, forwarding: &str) -> Result<ScaleOut> {
        let p = unique_prefix(tag);
        let dir = PathBuf::from(format!("/run/{p}"));
        std::fs::create_dir_all(&dir)?;
        let client = Netns::new(&format!("{p}c"))?;
        let router = Netns::new(&format!("{p}r"))?;
        let lan = Netns::new(&format!("{p}s"))?;
        let uplink = Netns::new(&format!("{p}u"))?;
        for seg in [&lan, &uplink] {
            seg.ip(&["link", "add", "br0", "type", "bridge"])?;
            seg.ip(&["link", "set", "br0", "up"])?;
        }
        // `ns`'s interface `dev` as port `port` of segment `seg`'s bridge.
        let attach = |ns: &Netns, dev: &str, seg: &Netns, port: &str| -> Result<()> {
            veth(ns, dev, seg, port)?;
            seg.ip(&["link", "set", port, "master", "br0"])?;
            Ok(())
        };

        veth(&client, "eth0", &router, "eth0")?;
        client.ip(&["addr", "add", "10.99.1.2/24", "dev", "eth0"])?;
        client.ip(&["route", "add", "default", "via", "10.99.1.1"])?;
        tx_csum_off(&client, "eth0")?;
        router.ip(&["addr", "add", "10.99.1.1/24", "dev", "eth0"])?;
        attach(&router, "up0", &uplink, "r0")?;
        router.ip(&["addr", "add", &format!("{ROUTER_UP}/24"), "dev", "up0"])?;
        attach(&router, "lan0", &lan, "r0")?;
        router.ip(&["addr", "add", &format!("{ROUTER_LAN}/24"), "dev", "lan0"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        // DSR answers come from the VIP on the LAN, whose route points at the uplink: the
        // router must not drop them by strict reverse-path filtering.
        router.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        router.sysctl("net.ipv4.conf.lan0.rp_filter", "0")?;
        // ECMP by the L4 hash (addresses and ports), as routers in front of balancers do.
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;

        let mut backend_ns = Vec::new();
        let mut backends = Vec::new();
        for (i, (_, name, addr)) in BACKENDS.iter().enumerate() {
            let ns = Netns::new(&format!("{p}b{i}"))?;
            attach(&ns, "eth0", &lan, &format!("b{i}"))?;
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ns.ip(&["route", "add", "default", "via", ROUTER_LAN])?;
            tx_csum_off(&ns, "eth0")?;
            // DSR: the VIP on lo, never answered for on the LAN.
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            // On the wildcard: health checks come to its address, DSR traffic to the VIP.
            backends.push(Backend::start(
                &ns,
                format!("0.0.0.0:{PORT}").parse()?,
                name,
            )?);
            backend_ns.push(ns);
        }

        let lbd_bin = binary("lbd")?;
        let mut lbs = Vec::new();
        for (i, addr) in LB_ADDRS.iter().enumerate() {
            let ns = Netns::new(&format!("{p}l{i}"))?;
            attach(&ns, "eth0", &uplink, &format!("p{i}"))?;
            attach(&ns, "eth1", &lan, &format!("p{i}"))?;
            // XDP_REDIRECT into a veth needs NAPI on its peer: GRO on enables it.
            uplink.exec(&["ethtool", "-K", &format!("p{i}"), "gro", "on"])?;
            lan.exec(&["ethtool", "-K", &format!("p{i}"), "gro", "on"])?;
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ns.ip(&["addr", "add", &format!("{}/24", LB_LAN[i]), "dev", "eth1"])?;
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            ns.ip(&["route", "add", "default", "via", ROUTER_UP])?;
            ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            let host_dir = dir.join(format!("lb{i}"));
            std::fs::create_dir_all(&host_dir)?;
            let bpffs = host_dir.join("bpf");
            std::fs::create_dir_all(&bpffs)?;
            run(&["mount", "-t", "bpf", "bpf", bpffs.to_str().context("path")?])?;
            let host = LbHost {
                lbd: None,
                bird: None,
                config: host_dir.join("lb.toml"),
                socket: host_dir.join("lb.sock"),
                bpffs,
                lbd_bin: lbd_bin.clone(),
                dir: host_dir,
                ns,
            };
            std::fs::write(&host.config, lb_config(&host, LB_LAN[i], forwarding))?;
            lbs.push(host);
        }
        let mut t = ScaleOut {
            router_bird: None,
            lbs,
            _backends: backends,
            dir,
            client,
            router,
            _lan: lan,
            _uplink: uplink,
            _backend_ns: backend_ns,
        };
        t.start()?;
        Ok(t)
    }

    fn start(&mut self) -> Result<()> {
        let router_conf = self.dir.join("router-bird.conf");
        let peers: String = LB_ADDRS
            .iter()
            .enumerate()
            .map(|(i, a)| format!("protocol bgp lb{i} from lb {{ neighbor {a} as 65001; }}\n"))
            .collect();
        std::fs::write(
            &router_conf,
            format!(
                "router id {ROUTER_UP};\nprotocol device {{}}\n\
                 protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n{BFD}\n\
                 template bgp lb {{ local {ROUTER_UP} as 65000; {BGP_TIMERS} ipv4 {{ import all; export none; }}; }}\n{peers}"
            ),
        )?;
        self.router_bird = Some(spawn_bird(
            &self.router,
            &router_conf,
            &self.dir.join("router"),
        )?);
        for (i, lb) in self.lbs.iter_mut().enumerate() {
            let addr = LB_ADDRS[i];
            let vips = lb.dir.join("vips.conf");
            // BIRD's include needs the file before lbd has written it.
            std::fs::write(&vips, lb_userspace::announce::render(&Default::default()))?;
            let conf = lb.dir.join("bird.conf");
            std::fs::write(
                &conf,
                format!(
                    "router id {addr};\ninclude \"{}\";\nprotocol device {{}}\n{BFD}\n\
                     protocol bgp uplink {{ local {addr} as 65001; neighbor {ROUTER_UP} as 65000; {BGP_TIMERS}\n  \
                     ipv4 {{ import none; export where proto = \"lbd_vips4\"; next hop self; }}; }}\n",
                    vips.display()
                ),
            )?;
            lb.bird = Some(spawn_bird(&lb.ns, &conf, &lb.dir.join("bird"))?);
            let log = lb.dir.join("lbd.log");
            let bin = lb.lbd_bin.to_str().context("path")?.to_string();
            let cfg = lb.config.to_str().context("path")?.to_string();
            lb.lbd = Some(lb.ns.spawn(&[&bin, "run", "--config", &cfg], &log)?);
        }
        for lb in &self.lbs {
            let deadline = Instant::now() + Duration::from_secs(20);
            while lb.control("show services").is_err() {
                if Instant::now() > deadline {
                    bail!("lbd did not come up:\n{}", lb.lbd_log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.wait_next_hops(&[true, true], Duration::from_secs(15))?;
        Ok(())
    }

    /// The balancers the router's route to the VIP goes through now (by index).
    pub fn next_hops(&self) -> Vec<bool> {
        let r = self
            .router
            .ip(&["route", "show", &format!("{VIP}/32")])
            .unwrap_or_default();
        LB_ADDRS
            .iter()
            .map(|a| r.contains(&format!("via {a} ")))
            .collect()
    }

    /// Waits until the router's route goes through exactly the balancers `want` says;
    /// returns how long that took.
    pub fn wait_next_hops(&self, want: &[bool], timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if self.next_hops() == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the router's route to {VIP} stayed {:?} (wanted {want:?}):\n{}\n{}",
                    self.next_hops(),
                    self.router.ip(&["route"]).unwrap_or_default(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What BIRD and lbd say on every host, for a failure's message.
    pub fn diagnostics(&self) -> String {
        let bird = |ns: &Netns, sock: PathBuf| {
            ns.exec(&[
                "birdc",
                "-s",
                sock.to_str().unwrap_or(""),
                "show",
                "protocols",
            ])
            .unwrap_or_else(|e| format!("{e:#}"))
        };
        let mut out = format!(
            "router BIRD:\n{}{}",
            bird(&self.router, self.dir.join("router.ctl")),
            std::fs::read_to_string(self.dir.join("router.log")).unwrap_or_default()
        );
        for (i, lb) in self.lbs.iter().enumerate() {
            out += &format!(
                "lb{i} BIRD:\n{}{}\nlb{i} show host:\n{}\nlb{i} lbd log (tail):\n{}\n",
                bird(&lb.ns, lb.dir.join("bird.ctl")),
                std::fs::read_to_string(lb.dir.join("bird.log")).unwrap_or_default(),
                lb.control("show host").unwrap_or_else(|e| format!("{e:#}")),
                lb.lbd_log()
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        out
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.client.name.clone();
        std::thread::spawn(move || {
            Netns { name }.enter_no_drop().expect("enter the client");
            f()
        })
        .join()
        .expect("client thread")
    }

    /// The VIP's socket address.
    pub fn vip() -> std::net::SocketAddr {
        format!("{VIP}:{PORT}").parse().expect("literal")
    }
}

/// Starts BIRD on `conf` in `ns` (foreground, its control socket and log beside `base`).
fn spawn_bird(ns: &Netns, conf: &std::path::Path, base: &std::path::Path) -> Result<ChildGuard> {
    let sock = base.with_extension("ctl");
    let out = ns.spawn(
        &[
            "bird",
            "-f",
            "-c",
            conf.to_str().context("path")?,
            "-s",
            sock.to_str().context("path")?,
            "-P",
            base.with_extension("pid").to_str().context("path")?,
        ],
        &base.with_extension("log"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let sock_path = sock.to_str().context("path")?;
    while ns
        .exec(&["birdc", "-s", sock_path, "show", "status"])
        .is_err()
    {
        if Instant::now() > deadline {
            bail!(
                "BIRD did not start: {}",
                std::fs::read_to_string(base.with_extension("log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(out)
}

/// A balancer host's lbd config: one service on the VIP over both backends at 50/50
/// (full-NAT from `snat`, its LAN address).
fn lb_config(host: &LbHost, snat: &str, forwarding: &str) -> String {
    let how = if forwarding == "dsr" {
        "forwarding = \"dsr\"".to_string()
    } else {
        format!("snat = \"{snat}\"")
    };
    let pools: String = BACKENDS
        .iter()
        .map(|(pool, name, a)| {
            format!(
                "[[service.pool]]\nname = \"{pool}\"\nweight = 50\nbackends = [{{ addr = \"{a}:{PORT}\", name = \"{name}\" }}]\n"
            )
        })
        .collect();
    format!(
        r#"[daemon]
interfaces = ["eth0", "eth1"]
xdp_mode = "native"
control_socket = "{sock}"
metrics = "127.0.0.1:9091"
pin_dir = "{pins}"
state_file = "{state}"

[daemon.announce]
bird_socket = "{bird}"
routes_file = "{vips}"

[[service]]
name = "web"
vip = "{VIP}"
port = {PORT}
{how}

[service.health]
check = "http"
path = "/healthz"
interval = "200ms"
timeout = "150ms"

{pools}"#,
        sock = host.socket.display(),
        pins = host.bpffs.join("lb").display(),
        state = host.dir.join("state.json").display(),
        bird = host.dir.join("bird.ctl").display(),
        vips = host.dir.join("vips.conf").display(),
    )
}
