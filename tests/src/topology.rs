//! The migration topology: client → balancer → bridge → 2 legacy + 2 k8s backends, each in
//! its own namespace, plus a private bpffs for the balancer's pins. Dropping it stops lbd,
//! removes the pins, unmounts, and deletes every namespace.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    http::{Backend, get_once},
    netns::{ChildGuard, Netns, run, tx_csum_off, unique_prefix, veth},
};

/// The VIP of the connection-mode service.
pub const VIP: &str = "10.99.0.10";
/// The VIP of the request-mode service (same pools, same split).
pub const REQ_VIP: &str = "10.99.0.11";
/// The balancer's address towards the backends (also the SNAT address).
pub const LB_BACKEND_SIDE: &str = "10.20.0.1";

/// The IPv6 VIP of [`Topology::dual_stack`]'s service `web6`.
pub const VIP6: &str = "fd00:99::10";
/// The balancer's IPv6 address towards the backends (`web6`'s SNAT address).
pub const LB_BACKEND_SIDE6: &str = "fd00:20::1";
/// The backends' IPv6 addresses, in [`BACKENDS`] order (same names, same pools).
pub const BACKENDS6: [&str; 4] = [
    "[fd00:20::11]:8080",
    "[fd00:20::12]:8080",
    "[fd00:20::21]:8080",
    "[fd00:20::22]:8080",
];

/// Health-check interval, rise and fall written into the topology's config.
pub const HEALTH_INTERVAL_MS: u64 = 200;
pub const HEALTH_RISE: u32 = 2;
pub const HEALTH_FALL: u32 = 2;

/// Name and address of each backend, in pool order.
pub const BACKENDS: [(&str, &str, &str); 4] = [
    ("legacy", "legacy-1", "10.20.0.11:8080"),
    ("legacy", "legacy-2", "10.20.0.12:8080"),
    ("k8s", "k8s-1", "10.20.0.21:8080"),
    ("k8s", "k8s-2", "10.20.0.22:8080"),
];

/// The namespaces and what runs in them. Field order is drop order: processes and backends
/// first, then pins and the bpffs, then the namespaces.
pub struct Topology {
    lbd: Option<ChildGuard>,
    /// The HTTP backends, in [`BACKENDS`] order (`None` while stopped).
    backends: Vec<Option<Backend>>,
    /// Their IPv6 listeners, after [`Topology::dual_stack`].
    backends6: Vec<Backend>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub lbd_bin: PathBuf,
    bpffs: PathBuf,
    pub client: Netns,
    pub lb: Netns,
    _bridge: Netns,
    _backend_ns: Vec<Netns>,
}

/// The `[[service.pool]]` table of the topology's pool `name` (its HTTP backends, by name)
/// with `weight`.
pub fn pool_toml(name: &str, weight: u32) -> String {
    let members: Vec<String> = BACKENDS
        .iter()
        .filter(|(p, _, _)| *p == name)
        .map(|(_, n, a)| format!("{{ addr = \"{a}\", name = \"{n}\" }}"))
        .collect();
    format!(
        "[[service.pool]]\nname = \"{name}\"\nweight = {weight}\nbackends = [{}]\n",
        members.join(", ")
    )
}

/// The `[service.health]` table every topology service has: HTTP checks of `/healthz` at
/// [`HEALTH_INTERVAL_MS`], [`HEALTH_RISE`], [`HEALTH_FALL`].
fn health_toml() -> String {
    format!(
        "\n[service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = \"{HEALTH_INTERVAL_MS}ms\"\ntimeout = \"150ms\"\nrise = {HEALTH_RISE}\nfall = {HEALTH_FALL}\n"
    )
}

/// Path of one of lb-userspace's binaries (`lbd`, `lbctl`): `LBD_BIN`/`LBCTL_BIN` when set,
/// else the workspace's target directory.
pub fn binary(name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(format!("{}_BIN", name.to_uppercase())) {
        return Ok(p.into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "{name} binary not found: run `cargo build -p lb-userspace` (cargo xtask test does) or set {}_BIN",
        name.to_uppercase()
    )
}

/// One command on the control socket at `socket` (the path lbctl uses); an `error: ` reply
/// is an `Err`.
pub fn control_at(socket: &Path, line: &str) -> Result<String> {
    let reply = lb_userspace::control::client::request(socket, line)?;
    if let Some(e) = reply.strip_prefix("error: ") {
        bail!("{line}: {}", e.trim());
    }
    Ok(reply)
}

/// `lbd down --config config` inside namespace `ns` (`down` also removes the forward filter
/// of the namespace it runs in, which must never be the host's); what it printed.
pub fn lbd_down_in(ns: &Netns, lbd: &Path, config: &Path) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(lbd)
        .args(["down", "--config"])
        .arg(config)
        .output()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("lbd down: {text}");
    }
    Ok(text)
}

/// A counter or gauge of the lbd in namespace `ns` (metrics on 127.0.0.1:9091): the sum over
/// the series of `name` whose labels contain `labels` ("" for all).
pub fn metric_in(ns: &str, name: &str, labels: &str) -> f64 {
    let (status, body) = crate::http::get_in(ns, 9091, "/metrics");
    assert!(status.contains("200"), "/metrics in {ns}: {status}");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Topology {
    /// Builds the namespaces, starts the four HTTP backends (answering with their names).
    pub fn new(tag: &str, xdp_mode: &str) -> Result<Topology> {
        let p = unique_prefix(tag);
        let client = Netns::new(&format!("{p}c"))?;
        let lb = Netns::new(&format!("{p}l"))?;
        let bridge = Netns::new(&format!("{p}s"))?;
        let mut backend_ns = Vec::new();
        for i in 0..BACKENDS.len() {
            backend_ns.push(Netns::new(&format!("{p}b{i}"))?);
        }
        let dir = PathBuf::from(format!("/run/{p}"));
        std::fs::create_dir_all(&dir)?;
        let bpffs = dir.join("bpf");
        std::fs::create_dir_all(&bpffs)?;
        run(&["mount", "-t", "bpf", "bpf", bpffs.to_str().context("path")?])?;
        let mut t = Topology {
            lbd: None,
            backends: Vec::new(),
            backends6: Vec::new(),
            config: dir.join("lb.toml"),
            socket: dir.join("lb.sock"),
            lbd_bin: binary("lbd")?,
            dir,
            bpffs,
            client,
            lb,
            _bridge: bridge,
            _backend_ns: backend_ns,
        };
        t.wire(xdp_mode)?;
        Ok(t)
    }

    fn wire(&mut self, xdp_mode: &str) -> Result<()> {
        let (client, lb, bridge) = (&self.client, &self.lb, &self._bridge);
        veth(client, "eth0", lb, "eth0")?;
        client.ip(&["addr", "add", "10.99.1.2/24", "dev", "eth0"])?;
        client.ip(&["route", "add", "default", "via", "10.99.1.1"])?;
        lb.ip(&["addr", "add", "10.99.1.1/24", "dev", "eth0"])?;
        lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        lb.ip(&["addr", "add", &format!("{REQ_VIP}/32"), "dev", "lo"])?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        // The bridge stands for a switch: where br_netfilter is loaded (Docker hosts), every
        // bridged frame would also go through this namespace's iptables, a cost no switch adds
        // (about 5 % of the machine in the SYN flood test).
        if std::path::Path::new("/proc/sys/net/bridge").exists() {
            for t in ["iptables", "ip6tables", "arptables"] {
                bridge.sysctl(&format!("net.bridge.bridge-nf-call-{t}"), "0")?;
            }
        }
        veth(lb, "eth1", bridge, "p0")?;
        lb.ip(&[
            "addr",
            "add",
            &format!("{LB_BACKEND_SIDE}/24"),
            "dev",
            "eth1",
        ])?;
        bridge.ip(&["link", "set", "p0", "master", "br0"])?;
        for (i, ns) in self._backend_ns.iter().enumerate() {
            let port = format!("p{}", i + 1);
            veth(ns, "eth0", bridge, &port)?;
            bridge.ip(&["link", "set", &port, "master", "br0"])?;
            let ip = BACKENDS[i].2.split(':').next().context("addr")?;
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["route", "add", "default", "via", LB_BACKEND_SIDE])?;
            tx_csum_off(ns, "eth0")?;
        }
        tx_csum_off(client, "eth0")?;
        // Native XDP_REDIRECT into a veth needs NAPI on its peer: GRO on enables it.
        client.exec(&["ethtool", "-K", "eth0", "gro", "on"])?;
        bridge.exec(&["ethtool", "-K", "p0", "gro", "on"])?;
        for i in 0..BACKENDS.len() {
            self.backends.push(None);
            self.start_backend(i)?;
        }
        // Health and pools, the same for both services (written once, from BACKENDS).
        let body = format!(
            "{}\n{}\n{}",
            health_toml(),
            pool_toml("legacy", 90),
            pool_toml("k8s", 10)
        );
        let cfg = format!(
            r#"[daemon]
interfaces = ["eth0", "eth1"]
xdp_mode = "{xdp_mode}"
control_socket = "{sock}"
metrics = "127.0.0.1:9091"
pin_dir = "{pins}"
state_file = "{state}"

[[service]]
name = "web"
vip = "{VIP}"
port = 80
protocol = "tcp"
mode = "connection"
snat = "{LB_BACKEND_SIDE}"
{body}
# The same pools and split, balanced per request by the userspace proxy.
[[service]]
name = "web-req"
vip = "{REQ_VIP}"
port = 80
mode = "request"
{body}
# Ingress-style canary: this header always goes to k8s.
[[service.route]]
header = "x-canary"
value = "always"
pool = "k8s"
"#,
            sock = self.socket.display(),
            pins = self.bpffs.join("lb").display(),
            state = self.dir.join("state.json").display(),
        );
        std::fs::write(&self.config, cfg)?;
        Ok(())
    }

    /// Makes the topology dual-stack (before lbd starts): IPv6 addresses and routes beside the
    /// IPv4 ones, each backend answering on its IPv6 address too (same name), and a service
    /// `web6` on [`VIP6`] with the same pools, split and health checks as `web`.
    pub fn dual_stack(&mut self) -> Result<()> {
        let (client, lb) = (&self.client, &self.lb);
        let add = |ns: &Netns, cidr: &str, dev: &str| {
            ns.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"])
        };
        add(client, "fd00:99:1::2/64", "eth0")?;
        client.ip(&["-6", "route", "add", "default", "via", "fd00:99:1::1"])?;
        add(lb, "fd00:99:1::1/64", "eth0")?;
        add(lb, &format!("{VIP6}/128"), "lo")?;
        add(lb, &format!("{LB_BACKEND_SIDE6}/64"), "eth1")?;
        for (i, ns) in self._backend_ns.iter().enumerate() {
            let addr: SocketAddr = BACKENDS6[i].parse()?;
            add(ns, &format!("{}/64", addr.ip()), "eth0")?;
            ns.ip(&["-6", "route", "add", "default", "via", LB_BACKEND_SIDE6])?;
            self.backends6
                .push(Backend::start(ns, addr, BACKENDS[i].1)?);
        }
        let pool = |name: &str, weight: u32| {
            let members: Vec<String> = BACKENDS
                .iter()
                .zip(BACKENDS6)
                .filter(|((p, _, _), _)| *p == name)
                .map(|((_, n, _), a)| format!("{{ addr = \"{a}\", name = \"{n}\" }}"))
                .collect();
            format!(
                "[[service.pool]]\nname = \"{name}\"\nweight = {weight}\nbackends = [{}]\n",
                members.join(", ")
            )
        };
        let service = format!(
            r#"
[[service]]
name = "web6"
vip = "{VIP6}"
port = 80
protocol = "tcp"
mode = "connection"
snat = "{LB_BACKEND_SIDE6}"
{}
{}
{}"#,
            health_toml(),
            pool("legacy", 90),
            pool("k8s", 10)
        );
        let mut cfg = self.config_text();
        cfg.push_str(&service);
        std::fs::write(&self.config, cfg)?;
        for ns in [&self.client, &self.lb, &self._bridge]
            .into_iter()
            .chain(&self._backend_ns)
        {
            ns.wait_ipv6_ready(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// The IPv6 VIP clients connect to (after [`Topology::dual_stack`]).
    pub fn vip6(&self) -> SocketAddr {
        format!("[{VIP6}]:80").parse().expect("literal")
    }

    /// Makes `n` new connections from the client to `vip` (one request each); returns the
    /// answers per backend name and the number of failures.
    pub fn new_connections_to(&self, vip: SocketAddr, n: usize) -> (HashMap<String, usize>, usize) {
        self.in_client(move || {
            let mut by = HashMap::new();
            let mut failed = 0;
            for _ in 0..n {
                match get_once(vip) {
                    Ok(name) => *by.entry(name).or_insert(0) += 1,
                    Err(_) => failed += 1,
                }
            }
            (by, failed)
        })
        .expect("client thread")
    }

    /// Opens `n` keep-alive connections to `vip` from the client namespace, one request each:
    /// the connections with the backend that answered.
    pub fn keepalive_to(&self, vip: SocketAddr, n: usize) -> Vec<(crate::http::Client, String)> {
        self.in_client(move || {
            (0..n)
                .map(|_| {
                    let mut c = crate::http::Client::connect(vip).unwrap();
                    let name = c.get(false).unwrap();
                    (c, name)
                })
                .collect()
        })
        .expect("client thread")
    }

    /// Starts lbd in the balancer namespace and waits for its control socket.
    pub fn start_lbd(&mut self) -> Result<()> {
        self.start_lbd_with(&[], None)
    }

    /// Starts lbd under `wrapper` (e.g. `prlimit --nofile=1024`), with `passed` as a
    /// socket-activated listener (descriptor 3, `LISTEN_FDS=1`), and waits for its control
    /// socket.
    pub fn start_lbd_with(
        &mut self,
        wrapper: &[&str],
        passed: Option<std::os::fd::RawFd>,
    ) -> Result<()> {
        let log = self.dir.join("lbd.log");
        // Keep earlier runs' logs (a restart test reads both).
        if log.exists() {
            let old = std::fs::read_to_string(&log).unwrap_or_default();
            let mut all = std::fs::read_to_string(self.dir.join("lbd.old.log")).unwrap_or_default();
            all.push_str(&old);
            std::fs::write(self.dir.join("lbd.old.log"), all)?;
        }
        let cfg = self.config.to_str().context("path")?.to_string();
        let bin = self.lbd_bin.to_str().context("path")?.to_string();
        let mut args: Vec<&str> = wrapper.to_vec();
        // `sh` sets LISTEN_PID to its own pid, which `exec` hands on to lbd.
        let activated = format!("LISTEN_PID=$$ LISTEN_FDS=1 exec {bin} run --config {cfg}");
        if passed.is_some() {
            args.extend(["sh", "-c", &activated]);
        } else {
            args.extend([bin.as_str(), "run", "--config", &cfg]);
        }
        self.lbd = Some(self.lb.spawn_passing(&args, &log, passed)?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.control("show services").is_ok() {
                return Ok(());
            }
            if !self.lbd.as_mut().is_some_and(|c| c.running()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "lbd did not come up; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    }

    /// Stops backend `i` (its port then refuses connections; its open connections close).
    pub fn stop_backend(&mut self, i: usize) {
        self.backends[i] = None;
    }

    /// Starts (again) backend `i`.
    pub fn start_backend(&mut self, i: usize) -> Result<()> {
        let (_, name, addr) = BACKENDS[i];
        self.backends[i] = Some(Backend::start(&self._backend_ns[i], addr.parse()?, name)?);
        Ok(())
    }

    /// The faults backend `i` injects (while it runs).
    pub fn faults(&self, i: usize) -> std::sync::Arc<crate::http::Faults> {
        self.backends[i]
            .as_ref()
            .expect("backend running")
            .faults
            .clone()
    }

    /// The namespace of backend `i`.
    pub fn backend_ns(&self, i: usize) -> &Netns {
        &self._backend_ns[i]
    }

    /// Kills lbd with SIGKILL (no clean-up of any kind runs) and reaps it.
    pub fn kill_lbd(&mut self) {
        drop(self.lbd.take());
    }

    /// Stops lbd with SIGTERM and waits for it.
    pub fn stop_lbd(&mut self) {
        if let Some(mut c) = self.lbd.take() {
            c.terminate();
        }
    }

    /// `lbd down`: detaches the data plane and removes its pins (the next start is fresh).
    pub fn lbd_down(&self) -> Result<()> {
        lbd_down_in(&self.lb, &self.lbd_bin, &self.config).map(drop)
    }

    /// lbd's process id, while it runs.
    pub fn lbd_pid(&self) -> Option<u32> {
        self.lbd.as_ref().and_then(|c| c.0.as_ref()).map(|c| c.id())
    }

    /// Where lbd pins its maps.
    pub fn maps_dir(&self) -> PathBuf {
        lb_userspace::dataplane::maps_dir(&self.bpffs.join("lb"))
    }

    /// Sends SIGHUP to lbd (reload its config file).
    pub fn reload_lbd(&self) -> Result<()> {
        let pid = self.lbd_pid().context("lbd is not running")?;
        // SAFETY: signalling our own child.
        if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
            bail!("SIGHUP: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Adds `lines` to the config's `[daemon]` table (before lbd starts).
    pub fn daemon_keys(&self, lines: &str) {
        let cfg = self.config_text();
        let at = cfg.find("\npin_dir = ").expect("the [daemon] table");
        let end = at + 1 + cfg[at + 1..].find('\n').expect("a line");
        let text = format!("{}\n{lines}{}", &cfg[..end], &cfg[end..]);
        std::fs::write(&self.config, text).expect("writing the config");
    }

    /// Gives both services (`web`, connection mode; `web-req`, request mode) the
    /// `[service.rollout]` table `body` (its keys), before lbd starts.
    pub fn rollout(&self, body: &str) {
        let cfg = self.config_text();
        let section = format!("[service.rollout]\n{body}\n");
        let marker = "# The same pools and split, balanced per request";
        assert!(cfg.contains(marker), "the web-req service");
        let text = cfg.replacen(marker, &format!("{section}{marker}"), 1) + "\n" + &section;
        std::fs::write(&self.config, text).expect("writing the config");
    }

    /// Adds `lines` to every `[service.health]` table of the config (before lbd starts).
    pub fn health_keys(&self, lines: &str) {
        let cfg = self.config_text();
        let text = cfg.replace(
            &format!("fall = {HEALTH_FALL}\n"),
            &format!("fall = {HEALTH_FALL}\n{lines}"),
        );
        assert_ne!(text, cfg, "no [service.health] table");
        std::fs::write(&self.config, text).expect("writing the config");
    }

    /// The config file's text.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap_or_default()
    }

    /// Polls `show backends web` until `pred` holds on it (or `timeout` passes); returns how
    /// long that took.
    pub fn wait_backends(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let now = self.control("show backends web")?;
            if pred(&now) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "condition not met within {timeout:?}; last:\n{now}\nlbd log:\n{}",
                    self.lbd_log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// lbd's log so far.
    pub fn lbd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lbd.log")).unwrap_or_default()
    }

    /// Sends one control command (the path lbctl uses) and returns the reply.
    pub fn control(&self, line: &str) -> Result<String> {
        control_at(&self.socket, line)
    }

    /// The VIP address clients connect to.
    pub fn vip(&self) -> SocketAddr {
        format!("{VIP}:80").parse().expect("literal")
    }

    /// The request-mode service's address.
    pub fn req_vip(&self) -> SocketAddr {
        format!("{REQ_VIP}:80").parse().expect("literal")
    }

    /// Makes `n` new connections from the client (one request each); returns the answers
    /// per backend name and the number of failures.
    pub fn new_connections(&self, n: usize) -> (HashMap<String, usize>, usize) {
        self.new_connections_to(self.vip(), n)
    }

    /// Opens `n` keep-alive connections through the VIP from the client namespace, one
    /// request each: the connections with the backend that answered.
    pub fn keepalive(&self, n: usize) -> Vec<(crate::http::Client, String)> {
        self.keepalive_to(self.vip(), n)
    }

    /// What `explain SERVICE FROM` names, and the backend a real connection from `from` to
    /// `vip` (one request, from the client namespace) reaches.
    pub fn explain_and_connect(
        &self,
        service: &str,
        from: SocketAddr,
        vip: SocketAddr,
    ) -> Result<(String, String)> {
        let said = self.control(&format!("explain {service} {from}"))?;
        let said = said
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("backend "))
            .context("explain names no backend")?
            .to_string();
        let got =
            self.in_client(move || crate::http::Client::connect_from(from, vip)?.get(true))??;
        Ok((said, got))
    }

    /// Sends three more requests on each of the `kept` keep-alive connections (from the
    /// client namespace): the (before, now) backends of those answered by another backend
    /// than their first. A connection that breaks fails the test.
    pub fn moved(&self, kept: Vec<(crate::http::Client, String)>) -> Vec<(String, String)> {
        self.in_client(move || {
            let mut moved = Vec::new();
            for (mut c, before) in kept {
                for _ in 0..3 {
                    let now = c
                        .get(false)
                        .expect("a keep-alive connection broke after the split change");
                    if now != before {
                        moved.push((before.clone(), now));
                    }
                }
            }
            moved
        })
        .expect("client thread")
    }

    /// A counter or gauge of lbd's `/metrics`: the sum over the series of `name` whose labels
    /// contain `labels` ("" for all).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        metric_in(&self.lb.name, name, labels)
    }

    /// lbd's resident memory (VmRSS, KiB), while it runs.
    pub fn lbd_rss_kib(&self) -> u64 {
        self.lbd_pid().map_or(0, crate::rss_kib)
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let name = self.client.name.clone();
        std::thread::spawn(move || {
            Netns { name }.enter_no_drop()?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut c) = self.lbd.take() {
            c.terminate();
        }
        self.backends.clear();
        self.backends6.clear();
        if self.config.exists() {
            let _ = lbd_down_in(&self.lb, &self.lbd_bin, &self.config);
        }
        let _ = std::process::Command::new("umount")
            .arg(&self.bpffs)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
