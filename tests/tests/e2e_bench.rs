//! End to end through one namespace topology (client → balancer namespace → bridge → 4
//! backend namespaces running nginx), with wrk: direct (kernel forwarding, no balancer), an
//! ideal XDP forwarder (fib lookup + redirect, native and skb: the ceiling), lb in
//! connection mode (XDP, skb mode: faster than native on veth) and request mode, nginx stream
//! and HAProxy tcp (L4), nginx http and HAProxy http (L7). Every path sees the same interface
//! settings, backends and 90/10 weights. Rounds are interleaved; medians and min–max are
//! reported. Run by `cargo xtask bench` (ignored otherwise).

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use lb_userspace::dataplane::{Dataplane, IDEAL_FORWARDER, LoadOptions};

use aya::programs::XdpMode;
use lb_tests::{
    netns::ChildGuard,
    require_root,
    topology::{BACKENDS, Topology},
};

/// Local addresses of the peers in the balancer namespace.
const NGINX_STREAM: &str = "10.99.0.12";
const HAPROXY_TCP: &str = "10.99.0.13";
const NGINX_HTTP: &str = "10.99.0.14";
const HAPROXY_HTTP: &str = "10.99.0.15";

const SECONDS: u32 = 3;
const ROUNDS: usize = 7;

fn weight(i: usize) -> u32 {
    if BACKENDS[i].0 == "legacy" { 45 } else { 5 }
}

fn backend_nginx(dir: &Path, i: usize) -> String {
    let (_, name, addr) = BACKENDS[i];
    format!(
        "worker_processes 2;\ndaemon off;\npid {d}/nginx-b{i}.pid;\nerror_log stderr error;\n\
         events {{ worker_connections 8192; }}\n\
         http {{ access_log off; keepalive_requests 10000000;\n\
           client_body_temp_path {d}/b{i}-body; proxy_temp_path {d}/b{i}-proxy;\n\
           fastcgi_temp_path {d}/b{i}-fcgi; uwsgi_temp_path {d}/b{i}-uwsgi; scgi_temp_path {d}/b{i}-scgi;\n\
           server {{ listen {addr} backlog=4096; location / {{ return 200 \"{name}\"; }} }} }}\n",
        d = dir.display()
    )
}

fn lb_nginx(dir: &Path) -> String {
    let servers: String = (0..BACKENDS.len())
        .map(|i| format!("server {} weight={};\n", BACKENDS[i].2, weight(i)))
        .collect();
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes 2;\ndaemon off;\npid {d}/nginx-lb.pid;\nerror_log stderr error;\n\
         events {{ worker_connections 16384; }}\n\
         stream {{ upstream st {{ {servers} }}\n server {{ listen {NGINX_STREAM}:80 backlog=4096; proxy_pass st; }} }}\n\
         http {{ access_log off; keepalive_requests 10000000;\n\
           client_body_temp_path {d}/lb-body; proxy_temp_path {d}/lb-proxy;\n\
           fastcgi_temp_path {d}/lb-fcgi; uwsgi_temp_path {d}/lb-uwsgi; scgi_temp_path {d}/lb-scgi;\n\
           upstream ht {{ {servers} keepalive 64; }}\n\
           server {{ listen {NGINX_HTTP}:80 backlog=4096; location / {{ proxy_pass http://ht; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
        d = dir.display()
    )
}

fn lb_haproxy() -> String {
    let servers: String = (0..BACKENDS.len())
        .map(|i| format!("  server b{i} {} weight {}\n", BACKENDS[i].2, weight(i)))
        .collect();
    format!(
        "global\n  nbthread 2\n  maxconn 8000\ndefaults\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
         frontend ft_tcp\n  mode tcp\n  bind {HAPROXY_TCP}:80\n  default_backend bk_tcp\n\
         backend bk_tcp\n  mode tcp\n  balance roundrobin\n{servers}\
         frontend ft_http\n  mode http\n  bind {HAPROXY_HTTP}:80\n  default_backend bk_http\n\
         backend bk_http\n  mode http\n  balance roundrobin\n  http-reuse always\n{servers}"
    )
}

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Requests wrk completed.
    requests: f64,
    /// TCP segments the client namespace retransmitted during the run (`RetransSegs`): each
    /// a SYN or data retransmission, a stall of at least 200 ms for that client.
    retrans: f64,
}

/// The client namespace's TCP `RetransSegs` counter (/proc/net/snmp).
fn retrans_segs(t: &Topology) -> f64 {
    let snmp = t
        .client
        .exec(&["cat", "/proc/net/snmp"])
        .unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return f64::NAN;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn parse_latency(v: &str) -> f64 {
    let v = v.trim();
    let (num, mul) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1.0)
    };
    num.trim().parse::<f64>().unwrap_or(f64::NAN) * mul
}

fn wrk(t: &Topology, url: &str, conns: u32, close: bool) -> Run {
    let threads = if conns >= 2 { "2" } else { "1" };
    let c = conns.to_string();
    let d = format!("{SECONDS}s");
    let mut args = vec!["wrk", "-t", threads, "-c", &c, "-d", &d, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let before = retrans_segs(t);
    let out = t
        .client
        .exec(&args)
        .unwrap_or_else(|e| panic!("wrk {url}: {e}"));
    let mut r = Run {
        retrans: retrans_segs(t) - before,
        ..Run::default()
    };
    for l in out.lines() {
        let l = l.trim();
        if l.contains(" requests in ") {
            r.requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
        }
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("50%") {
            r.p50_us = parse_latency(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            r.p99_us = parse_latency(v);
        }
    }
    // A path that answers with errors would be measured at the speed of its errors.
    if let Some(l) = out.lines().find(|l| l.contains("Non-2xx or 3xx responses")) {
        panic!("wrk {url} ({conns} conns, close={close}): {}", l.trim());
    }
    if out.contains("Socket errors") {
        eprintln!(
            "wrk {url} ({conns} conns, close={close}): {}",
            out.lines()
                .find(|l| l.contains("Socket errors"))
                .unwrap_or("")
        );
    }
    r
}

/// CPU time (user, system) in clock ticks of process `pid` (all its threads) and of its
/// children (a master's workers).
fn cpu_ticks(pid: u32) -> (f64, f64) {
    // Fields after the command name's closing parenthesis: state is the first, ppid the
    // second, utime the 12th, stime the 13th.
    let fields = |stat: &str| -> Option<(u32, f64, f64)> {
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some((
            rest.get(1)?.parse().ok()?,
            rest.get(11)?.parse().ok()?,
            rest.get(12)?.parse().ok()?,
        ))
    };
    let (mut user, mut sys) = (0.0, 0.0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(n) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some((ppid, u, s)) = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(fields)
        else {
            continue;
        };
        if n == pid || ppid == pid {
            user += u;
            sys += s;
        }
    }
    (user, sys)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Replaces a topology's threaded test backends with nginx ones (the backends must not be
/// the limit).
fn nginx_backends(t: &mut Topology) -> Vec<ChildGuard> {
    let mut guards = Vec::new();
    for i in 0..BACKENDS.len() {
        t.stop_backend(i);
        let conf = t.dir.join(format!("backend{i}.conf"));
        std::fs::write(&conf, backend_nginx(&t.dir, i)).unwrap();
        guards.push(
            t.backend_ns(i)
                .spawn(
                    &["nginx", "-c", conf.to_str().unwrap()],
                    &t.dir.join(format!("b{i}.log")),
                )
                .unwrap(),
        );
    }
    guards
}

#[test]
#[ignore = "benchmark: run by `cargo xtask bench`"]
fn end_to_end() {
    if !require_root("end_to_end") {
        return;
    }
    let mut t = Topology::new("eb", "skb").unwrap();
    for a in [NGINX_STREAM, HAPROXY_TCP, NGINX_HTTP, HAPROXY_HTTP] {
        t.lb.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])
            .unwrap();
    }
    let mut guards = nginx_backends(&mut t);
    // A second topology for the ideal forwarder: it takes the balancer's place on the same
    // interfaces, so it needs namespaces of its own (no lbd there).
    let mut ideal = Topology::new("ei", "skb").unwrap();
    guards.extend(nginx_backends(&mut ideal));
    // What lbd would set: the kernel forwards (fib lookups need it) and takes its own
    // addresses as sources.
    ideal.lb.sysctl("net.ipv4.ip_forward", "1").unwrap();
    // This thread now lives in the ideal topology's balancer namespace: the program is loaded
    // and attached there (other commands name their namespace explicitly).
    ideal.lb.enter().unwrap();
    let mut fwd = Dataplane::load(&LoadOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The "direct" baseline is the host routing the client straight to a backend, which
    // lbd's forward filter refuses: this bench host is a router on purpose.
    t.daemon_keys("forward_filter = false");
    t.start_lbd().unwrap();
    t.control("set split web legacy=90 k8s=10").unwrap();
    t.control("set split web-req legacy=90 k8s=10").unwrap();
    let conf = t.dir.join("lb-nginx.conf");
    std::fs::write(&conf, lb_nginx(&t.dir)).unwrap();
    let lb_nginx =
        t.lb.spawn(
            &["nginx", "-c", conf.to_str().unwrap()],
            &t.dir.join("lb-nginx.log"),
        )
        .unwrap();
    let hconf = t.dir.join("haproxy.cfg");
    std::fs::write(&hconf, lb_haproxy()).unwrap();
    let lb_haproxy =
        t.lb.spawn(
            &["haproxy", "-db", "-f", hconf.to_str().unwrap()],
            &t.dir.join("haproxy.log"),
        )
        .unwrap();
    // The balancers that are processes (`ip netns exec` execs them: these are their ids),
    // whose CPU time per request is measured.
    let pid = |g: &ChildGuard| g.0.as_ref().map(|c| c.id());
    let (nginx_pid, haproxy_pid, lbd_pid) = (pid(&lb_nginx), pid(&lb_haproxy), t.lbd_pid());
    guards.push(lb_nginx);
    guards.push(lb_haproxy);
    std::thread::sleep(Duration::from_secs(1));

    let direct = format!("http://{}/", BACKENDS[0].2);
    let paths: Vec<(&str, String)> = vec![
        ("direct (kernel forwarding, no balancer)", direct.clone()),
        (
            "ideal XDP forwarder (fib lookup + redirect), native",
            direct.clone(),
        ),
        ("ideal XDP forwarder, skb", direct.clone()),
        ("lb connection mode (XDP, skb)", "http://10.99.0.10/".into()),
        ("nginx stream (L4)", format!("http://{NGINX_STREAM}/")),
        ("HAProxy mode tcp (L4)", format!("http://{HAPROXY_TCP}/")),
        ("lb request mode (L7)", "http://10.99.0.11/".into()),
        (
            "nginx http (L7, upstream keep-alive)",
            format!("http://{NGINX_HTTP}/"),
        ),
        ("HAProxy mode http (L7)", format!("http://{HAPROXY_HTTP}/")),
    ];
    // `LB_BENCH_PATHS` (comma-separated name prefixes) runs some paths only: to compare two
    // lbd builds (`LBD_BIN`) on one path without the rest. The full run takes every path.
    let only: Option<Vec<String>> = std::env::var("LB_BENCH_PATHS")
        .ok()
        .map(|v| v.split(',').map(|p| p.trim().to_string()).collect());
    let wanted = |name: &str| {
        only.as_ref()
            .is_none_or(|o| o.iter().any(|p| name.starts_with(p.as_str())))
    };
    let process = |name: &str| match name {
        n if n.starts_with("lb request") => lbd_pid,
        n if n.starts_with("nginx") => nginx_pid,
        n if n.starts_with("HAProxy") => haproxy_pid,
        _ => None,
    };
    // Per path: keep-alive rps (32 conns), close rps (32 conns), 1-conn p50/p99, 32-conn p99,
    // close connections, close retransmissions, the balancer process's user and system CPU
    // ticks over the keep-alive run, that run's requests, the same ticks over the close run.
    let mut res: BTreeMap<usize, Vec<[f64; 12]>> = BTreeMap::new();
    for round in 0..ROUNDS {
        // Every other round runs the paths in reverse: no path always follows the same one
        // (and the state its run leaves: TIME_WAIT sockets, warm caches).
        let order: Vec<usize> = if round % 2 == 0 {
            (0..paths.len()).collect()
        } else {
            (0..paths.len()).rev().collect()
        };
        for i in order {
            let (name, url) = &paths[i];
            if !wanted(name) {
                continue;
            }
            eprintln!("round {}/{ROUNDS}: {name}", round + 1);
            // Paths 1 and 2 run through the ideal forwarder's topology, attached for the run.
            let (topo, mode) = match i {
                1 => (&ideal, Some(XdpMode::Driver)),
                2 => (&ideal, Some(XdpMode::Skb)),
                _ => (&t, None),
            };
            let mut links = Vec::new();
            if let Some(mode) = mode {
                let prog = fwd.program(IDEAL_FORWARDER).unwrap();
                for iface in ["eth0", "eth1"] {
                    links.push(prog.attach(iface, mode).unwrap());
                }
                // Let the neighbours resolve through the kernel first.
                wrk(topo, url, 1, false);
            }
            // The balancer process's CPU ticks (user, system) over one wrk run.
            let measured = |close: bool| {
                let before = process(name).map(cpu_ticks);
                let run = wrk(topo, url, 32, close);
                let ticks = match (process(name), before) {
                    (Some(p), Some((u0, s0))) => {
                        let (u1, s1) = cpu_ticks(p);
                        (u1 - u0, s1 - s0)
                    }
                    _ => (f64::NAN, f64::NAN),
                };
                (run, ticks)
            };
            let (ka, (user, sys)) = measured(false);
            let (cl, (cl_user, cl_sys)) = measured(true);
            let one = wrk(topo, url, 1, false);
            if mode.is_some() {
                let prog = fwd.program(IDEAL_FORWARDER).unwrap();
                for l in links {
                    prog.detach(l).unwrap();
                }
            }
            res.entry(i).or_default().push([
                ka.rps,
                cl.rps,
                one.p50_us,
                one.p99_us,
                ka.p99_us,
                cl.requests,
                cl.retrans,
                user,
                sys,
                ka.requests,
                cl_user,
                cl_sys,
            ]);
        }
    }
    let med = |i: usize, k: usize| median(res[&i].iter().map(|r| r[k]).collect());
    let range = |i: usize, k: usize| {
        let v: Vec<f64> = res[&i].iter().map(|r| r[k]).collect();
        (
            v.iter().cloned().fold(f64::MAX, f64::min),
            v.iter().cloned().fold(f64::MIN, f64::max),
        )
    };
    let mut md = String::new();
    writeln!(md, "## End to end (wrk)\n").unwrap();
    writeln!(md, "Client namespace → balancer namespace → bridge → 4 backend namespaces (nginx answering with its name), weights 90/10, all on this machine's 2 cores. wrk `-t2 -c32 -d{SECONDS}s` (keep-alive, and with `Connection: close` = one connection per request) and `-t1 -c1` for single-connection latency. {ROUNDS} interleaved rounds, every other one in reverse order: median (min–max); ratio to direct. The balancer runs in skb XDP mode (on veth it is faster than native).\n").unwrap();
    writeln!(md, "| path | keep-alive req/s | `Connection: close` conn/s | 1-conn p50 / p99 µs | 32-conn p99 µs | client retransmissions under `Connection: close` (all rounds; target 0) |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|").unwrap();
    let total = |i: usize, k: usize| res[&i].iter().map(|r| r[k]).sum::<f64>();
    let (d_ka, d_cl) = match res.get(&0) {
        Some(_) => (med(0, 0), med(0, 1)),
        None => (f64::NAN, f64::NAN),
    };
    for (i, (name, _)) in paths.iter().enumerate() {
        if !res.contains_key(&i) {
            continue;
        }
        let (ka_lo, ka_hi) = range(i, 0);
        let (cl_lo, cl_hi) = range(i, 1);
        writeln!(
            md,
            "| {name} | {:.0} ({ka_lo:.0}–{ka_hi:.0}) = {:.2}× | {:.0} ({cl_lo:.0}–{cl_hi:.0}) = {:.2}× | {:.0} / {:.0} | {:.0} | {:.0} in {:.0} connections |",
            med(i, 0),
            med(i, 0) / d_ka,
            med(i, 1),
            med(i, 1) / d_cl,
            med(i, 2),
            med(i, 3),
            med(i, 4),
            total(i, 6),
            total(i, 5),
        )
        .unwrap();
    }
    writeln!(md, "\nCPU time of the balancer's own processes (all threads and workers) per request, all rounds together: keep-alive, and `Connection: close` (a connection per request). The XDP paths have none: their work runs in the kernel's receive path, charged to whoever is on the CPU.\n").unwrap();
    writeln!(md, "| path | keep-alive: user / system µs per request | `Connection: close`: user / system µs per connection |").unwrap();
    writeln!(md, "|---|---|---|").unwrap();
    let hz = ticks_per_second();
    for (i, (name, _)) in paths.iter().enumerate() {
        if !res.contains_key(&i) || process(name).is_none() {
            continue;
        }
        let per = |k: usize, n: usize| total(i, k) / hz * 1e6 / total(i, n);
        writeln!(
            md,
            "| {name} | {:.1} / {:.1} | {:.1} / {:.1} |",
            per(7, 9),
            per(8, 9),
            per(10, 5),
            per(11, 5)
        )
        .unwrap();
    }
    let find = |prefix: &str| paths.iter().position(|(n, _)| n.starts_with(prefix));
    if let (Some(rq), Some(nh)) = (find("lb request"), find("nginx http")) {
        if res.contains_key(&rq) && res.contains_key(&nh) {
            // Each round runs the two paths back to back: their ratio within a round is the
            // least disturbed by whatever else the machine is doing then.
            let per_round = |k: usize| {
                res[&rq]
                    .iter()
                    .zip(&res[&nh])
                    .map(|(a, b)| format!("{:.2}", a[k] / b[k]))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(
                md,
                "\nRequest mode: {:.2}× nginx http in keep-alive req/s, {:.2}× in new connections/s; 32-connection p99 {:.0} µs against {:.0} µs (targets, issue #14: ≥ 1.00×, ≥ 0.95×, p99 no worse). Round by round: keep-alive {}; new connections {}.",
                med(rq, 0) / med(nh, 0),
                med(rq, 1) / med(nh, 1),
                med(rq, 4),
                med(nh, 4),
                per_round(0),
                per_round(1)
            )
            .unwrap();
        }
    }
    if only.is_some() {
        // A partial run: its table only, not a BENCHMARKS.md section.
        print!("{md}");
        return;
    }
    let idx = |prefix: &str| {
        paths
            .iter()
            .position(|(n, _)| n.starts_with(prefix))
            .unwrap()
    };
    let (lb, ng, ha) = (
        idx("lb connection"),
        idx("nginx stream"),
        idx("HAProxy mode tcp"),
    );
    for (k, what) in [(0, "keep-alive req/s"), (1, "new connections/s")] {
        let best = med(1, k).max(med(2, k));
        writeln!(
            md,
            "\nConnection mode, {what}: {:.2}× the best ideal-forwarder variant, {:.2}× nginx stream, {:.2}× HAProxy tcp.",
            med(lb, k) / best,
            med(lb, k) / med(ng, k),
            med(lb, k) / med(ha, k)
        )
        .unwrap();
    }
    print!("{md}");
    lb_tests::bench::write_section("2-end-to-end", &md);
    drop(fwd);
    drop(guards);
}
