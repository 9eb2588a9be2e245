//! Path-MTU discovery through the balancer: a hop past it with a smaller MTU answers a large
//! packet with "fragmentation needed", sent to the balancer (the VIP or the SNAT address);
//! the XDP program translates it to the flow's true end, which lowers its segment size. Without
//! that the transfer hangs (the classic PMTU black hole). Both directions:
//!
//! - a download to a client behind a router whose link towards it is smaller (the error
//!   quotes VIP → client and goes to the backend);
//! - an upload to a backend behind a router whose link towards it is smaller (the error
//!   quotes SNAT address → backend and goes to the client).
//!
//! The small links are set on the router's end only: the endpoint behind it still advertises
//! a full-size MSS, as behind a real tunnel or PPPoE hop, so only path-MTU discovery can save
//! the transfer.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    netns::{Netns, tx_csum_off, unique_prefix, veth},
    require_root,
    topology::{LB_BACKEND_SIDE, LB_BACKEND_SIDE6, Topology, VIP, VIP6},
};

const BULK_PORT: u16 = 9000;
const FAR_VIP_PORT: u16 = 9001;
const FAR_BACKEND: &str = "10.30.0.2";
const FAR_CLIENT: &str = "10.98.0.2";
const SMALL_MTU: &str = "1400";
const BYTES: usize = 4 << 20;

/// A bulk TCP server in a namespace: `down N\n` → N bytes then close; `up N\n` → reads N
/// bytes, answers `ok N\n`. Stops when dropped.
struct Bulk {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Bulk {
    fn start(ns: &str, addr: SocketAddr) -> Bulk {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ns = ns.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            Netns { name: ns }.enter_no_drop().unwrap();
            let l = TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        std::thread::spawn(move || serve(c));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().unwrap();
        Bulk {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(c: TcpStream) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
    let mut w = c.try_clone().unwrap();
    let mut r = BufReader::new(c);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return; // a health check: connect and close
    }
    let mut words = line.split_whitespace();
    let (Some(op), Some(n)) = (
        words.next(),
        words.next().and_then(|n| n.parse::<usize>().ok()),
    ) else {
        return;
    };
    match op {
        "down" => {
            let chunk = vec![b'x'; 64 << 10];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                if w.write_all(&chunk[..k]).is_err() {
                    return;
                }
                left -= k;
            }
        }
        "up" => {
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0;
            while got < n {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k,
                }
            }
            let _ = writeln!(w, "ok {got}");
        }
        _ => {}
    }
}

/// One transfer through `vip` from the calling thread's namespace: the bytes that made it
/// and how long it took (a stalled transfer ends at the read timeout).
fn transfer(vip: SocketAddr, op: &str) -> (usize, Duration) {
    let start = Instant::now();
    let mut c = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(8))).unwrap();
    writeln!(c, "{op} {BYTES}").unwrap();
    let moved = if op == "down" {
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
        got
    } else {
        let chunk = vec![b'y'; 64 << 10];
        let mut sent = 0;
        while sent < BYTES {
            if c.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        let mut answer = String::new();
        let _ = BufReader::new(&c).read_line(&mut answer);
        answer
            .strip_prefix("ok ")
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    (moved, start.elapsed())
}

fn events(t: &Topology, reason: &str) -> u64 {
    t.metric("lb_xdp_events_total", &format!("reason=\"{reason}\"")) as u64
}

/// One family's addresses for the test.
struct Plan {
    /// The VIP and SNAT address of the services.
    vip: &'static str,
    snat: &'static str,
    /// `ip` arguments selecting the family.
    ip: &'static str,
    forwarding: &'static str,
    /// The far client's link (client end, far end, prefix length) and the client's address
    /// the balancer routes it through.
    far_client_link: (&'static str, &'static str, u8),
    client: &'static str,
    /// The far backend's link (router end, far end, prefix length); the router is backend 0.
    far_backend_link: (&'static str, &'static str, u8),
    /// The near backends' addresses (the router first).
    backends: [&'static str; 4],
    /// The metric that counts the translations towards the backend and the client.
    prefix: (&'static str, &'static str),
}

const V4: Plan = Plan {
    vip: VIP,
    snat: LB_BACKEND_SIDE,
    ip: "-4",
    forwarding: "net.ipv4.ip_forward",
    far_client_link: ("10.98.0.1", FAR_CLIENT, 24),
    client: "10.99.1.2",
    far_backend_link: ("10.30.0.1", FAR_BACKEND, 24),
    backends: ["10.20.0.11", "10.20.0.12", "10.20.0.21", "10.20.0.22"],
    prefix: ("10.98.0.0/24", "10.30.0.0/24"),
};

const V6: Plan = Plan {
    vip: VIP6,
    snat: LB_BACKEND_SIDE6,
    ip: "-6",
    forwarding: "net.ipv6.conf.all.forwarding",
    far_client_link: ("fd00:98::1", "fd00:98::2", 64),
    client: "fd00:99:1::2",
    far_backend_link: ("fd00:30::1", "fd00:30::2", 64),
    backends: ["fd00:20::11", "fd00:20::12", "fd00:20::21", "fd00:20::22"],
    prefix: ("fd00:98::/64", "fd00:30::/64"),
};

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[test]
fn path_mtu_discovery_completes_through_the_balancer_both_ways() {
    if !require_root("path_mtu_discovery_completes") {
        return;
    }
    path_mtu_discovery("pmtu", &V4);
}

/// The same over IPv6, where the errors are ICMPv6 "packet too big" (IPv6 routers never
/// fragment, so nothing else gets a large transfer through).
#[test]
fn ipv6_path_mtu_discovery_completes_through_the_balancer_both_ways() {
    if !require_root("ipv6_path_mtu_discovery_completes") {
        return;
    }
    path_mtu_discovery("pmt6", &V6);
}

fn path_mtu_discovery(tag: &str, f: &Plan) {
    let mut t = Topology::new(tag, "native").unwrap();
    if f.ip == "-6" {
        t.dual_stack().unwrap();
    }
    let p = unique_prefix(&format!("{tag}x"));
    let with_len = |a: &str, len: u8| format!("{a}/{len}");
    // A client behind the client namespace, which routes for it over a smaller link.
    let far_client = Netns::new(&format!("{p}fc")).unwrap();
    veth(&t.client, "eth1", &far_client, "eth0").unwrap();
    let (near_end, far_end, len) = f.far_client_link;
    t.client
        .ip(&[
            f.ip,
            "addr",
            "add",
            &with_len(near_end, len),
            "dev",
            "eth1",
            "nodad",
        ])
        .unwrap();
    t.client
        .ip(&["link", "set", "eth1", "mtu", SMALL_MTU])
        .unwrap();
    t.client.sysctl(f.forwarding, "1").unwrap();
    far_client
        .ip(&[
            f.ip,
            "addr",
            "add",
            &with_len(far_end, len),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    far_client
        .ip(&[f.ip, "route", "add", "default", "via", near_end])
        .unwrap();
    tx_csum_off(&far_client, "eth0").unwrap();
    t.lb.ip(&[f.ip, "route", "add", f.prefix.0, "via", f.client])
        .unwrap();
    let far_client_addr = far_end;
    // A backend behind the first backend's namespace, which routes for it the same way.
    let router = t.backend_ns(0);
    let far_backend = Netns::new(&format!("{p}fb")).unwrap();
    veth(router, "eth1", &far_backend, "eth0").unwrap();
    let (near_end, far_end, len) = f.far_backend_link;
    router
        .ip(&[
            f.ip,
            "addr",
            "add",
            &with_len(near_end, len),
            "dev",
            "eth1",
            "nodad",
        ])
        .unwrap();
    router
        .ip(&["link", "set", "eth1", "mtu", SMALL_MTU])
        .unwrap();
    router.sysctl(f.forwarding, "1").unwrap();
    far_backend
        .ip(&[
            f.ip,
            "addr",
            "add",
            &with_len(far_end, len),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    far_backend
        .ip(&[f.ip, "route", "add", "default", "via", near_end])
        .unwrap();
    tx_csum_off(&far_backend, "eth0").unwrap();
    t.lb.ip(&[f.ip, "route", "add", f.prefix.1, "via", f.backends[0]])
        .unwrap();
    let far_backend_addr = far_end;
    for ns in [&t.client, &far_client, router, &far_backend] {
        ns.wait_ipv6_ready(Duration::from_secs(5)).unwrap();
    }

    let mut servers: Vec<Bulk> = f
        .backends
        .iter()
        .enumerate()
        .map(|(i, a)| Bulk::start(&t.backend_ns(i).name, sock(a, BULK_PORT)))
        .collect();
    servers.push(Bulk::start(
        &far_backend.name,
        sock(far_backend_addr, BULK_PORT),
    ));
    let pool = |name: &str, addrs: &[SocketAddr]| {
        let list: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{{ addr = \"{a}\", name = \"{name}-{i}\" }}"))
            .collect();
        format!(
            "[[service.pool]]\nname = \"{name}\"\nweight = 100\nbackends = [{}]\n",
            list.join(", ")
        )
    };
    let near: Vec<SocketAddr> = f.backends.iter().map(|a| sock(a, BULK_PORT)).collect();
    let svc = |name: &str, port: u16, pool_text: String| {
        format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{}\"\nport = {port}\nprotocol = \"tcp\"\nsnat = \"{}\"\n\n[service.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 2\n\n{pool_text}",
            f.vip, f.snat
        )
    };
    let extra = svc("bulk", BULK_PORT, pool("near", &near))
        + &svc(
            "far",
            FAR_VIP_PORT,
            pool("far", &[sock(far_backend_addr, BULK_PORT)]),
        );
    let marker = "# The same pools and split, balanced per request";
    let cfg = t.config_text();
    std::fs::write(
        &t.config,
        cfg.replacen(marker, &format!("{extra}\n{marker}"), 1),
    )
    .unwrap();
    t.start_lbd().unwrap();
    let up = |svc: &str, n: usize| {
        let s = t
            .control(&format!("show backends {svc}"))
            .unwrap_or_default();
        s.lines()
            .filter(|l| l.starts_with(&format!("{svc} ")) && l.ends_with(" up"))
            .count()
            == n
    };
    t.wait_backends(Duration::from_secs(5), |_| up("bulk", 4) && up("far", 1))
        .unwrap_or_else(|e| panic!("bulk backends not up: {e}\n{}", t.lbd_log()));

    // Download to the client behind the small link: the router's error goes to the VIP and
    // must reach the backend.
    let to_backend = events(&t, "icmp_to_backend");
    let vip = sock(f.vip, BULK_PORT);
    let fc = far_client.name.clone();
    let (down, took) = std::thread::spawn(move || {
        Netns { name: fc }.enter_no_drop().unwrap();
        transfer(vip, "down")
    })
    .join()
    .unwrap();
    let translated = events(&t, "icmp_to_backend") - to_backend;
    eprintln!(
        "[{tag}] download to {far_client_addr} over a {SMALL_MTU}-byte hop: {down} of {BYTES} bytes in {took:?}; {translated} errors sent on to the backend"
    );
    assert_eq!(down, BYTES, "the download completes");
    assert!(translated >= 1, "the router's error was translated");

    // Upload from the client to the backend behind the small link: the router's error goes
    // to the SNAT address and must reach the client.
    let to_client = events(&t, "icmp_to_client");
    let far_vip = sock(f.vip, FAR_VIP_PORT);
    let (up_bytes, took) = t.in_client(move || transfer(far_vip, "up")).unwrap();
    let translated = events(&t, "icmp_to_client") - to_client;
    eprintln!(
        "[{tag}] upload over a {SMALL_MTU}-byte hop: {up_bytes} of {BYTES} bytes in {took:?}; {translated} errors sent on to the client"
    );
    assert_eq!(up_bytes, BYTES, "the upload completes");
    assert!(translated >= 1, "the router's error was translated");

    // Both transfers closed their connections: lbd's flow collector frees their SNAT ports
    // once they have been closed for 2 s (it passes once a second).
    let collected = |t: &Topology| t.metric("lb_flows_collected_total", "reason=\"finished\"");
    let deadline = Instant::now() + Duration::from_secs(6);
    while collected(&t) < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(collected(&t) >= 2.0, "the closed flows' ports are freed");
    drop(servers);
}
