//! Attacks from the client side, reproduced in the test's own namespaces (client → lb →
//! bridge → backends): every packet goes only to the test's balancer. Each test counts what
//! got through before it asserts, so its figures can be read from `--nocapture`.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    http::{Client, get_in},
    packets::{self, ACK, RST_ACK, SYN},
    raw::{Capture, RawSender},
    require_root,
    topology::{BACKENDS, LB_BACKEND_SIDE, Topology, VIP},
};

fn xdp_event(t: &Topology, reason: &str) -> f64 {
    t.metric("lb_xdp_events_total", &format!("reason=\"{reason}\""))
}

fn ipv4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().unwrap().octets()
}

/// How many of the victims no longer answer, or answer from another backend.
fn hurt(t: &Topology, v: Vec<(Client, String)>) -> usize {
    t.in_client(move || {
        v.into_iter()
            .map(|(mut c, name)| c.get(false).map(|now| now == name).unwrap_or(false))
            .filter(|ok| !ok)
            .count()
    })
    .unwrap()
}

/// Counts, on the client namespace's `eth0`, the frames from the VIP that carry the spray's
/// marks (the payload `injected`, or a RST with sequence number 1), until `stop`.
fn count_injected(
    t: &Topology,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let ns = t.client.name.clone();
    let vip = ipv4(VIP);
    std::thread::spawn(move || {
        lb_tests::netns::Netns { name: ns }.enter_no_drop().unwrap();
        let cap = Capture::open("eth0", Duration::from_millis(100)).unwrap();
        let mut buf = vec![0u8; 2048];
        let mut n = 0;
        // Bounded: the spray takes about a second; stop is set right after it.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            let Some(len) = cap.next(&mut buf) else {
                continue;
            };
            let Ok(p) = etherparse::SlicedPacket::from_ethernet(&buf[..len]) else {
                continue;
            };
            let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(tcp))) =
                (&p.net, &p.transport)
            else {
                continue;
            };
            let from_vip = ip.header().source() == vip && tcp.source_port() == 80;
            let marked = tcp.payload().windows(8).any(|w| w == b"injected")
                || (tcp.rst() && tcp.sequence_number() == 1);
            n += (from_vip && marked) as usize;
        }
        n
    })
}

/// Finding 1: segments claiming to be the backends' (source = backend address:port,
/// destination = the SNAT address), sprayed from the client side over every SNAT port, first
/// as data and then as RSTs, while 20 victims hold idle connections. Before the fix every one
/// whose tuple matched a live flow was translated and delivered to its victim (40 of them
/// here: 20 data segments and 20 RSTs; the attacker reset all 20). Now none is: all
/// are dropped as coming from the wrong side, and every victim still works.
#[test]
fn spoofed_return_traffic_sprayed_over_every_snat_port_reaches_no_client() {
    if !require_root("spoofed_return_traffic_sprayed_over_every_snat_port_reaches_no_client") {
        return;
    }
    let mut t = Topology::new("sr", "skb").unwrap();
    t.start_lbd().unwrap();
    let v = t.keepalive(20);
    let (lb_mac, client_mac) = (t.lb.mac("eth0").unwrap(), t.client.mac("eth0").unwrap());
    let (lo, hi) = {
        let d = lb_common::Tunables::DEFAULT;
        (d.snat_port_min, d.snat_port_max)
    };
    let before = xdp_event(&t, "return_wrong_side");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counter = count_injected(&t, stop.clone());
    let started = Instant::now();
    let sent = t
        .in_client(move || {
            let tx = RawSender::open("eth0").unwrap();
            let mut sent = 0u64;
            for (flags, payload) in [
                (ACK, &b"HTTP/1.1 200 OK\r\n\r\ninjected"[..]),
                (RST_ACK, b""),
            ] {
                for (_, _, addr) in BACKENDS {
                    let b: SocketAddr = addr.parse().unwrap();
                    let src = (ipv4(&b.ip().to_string()), b.port());
                    for port in lo..=hi {
                        let mut f = packets::tcp_seq(
                            client_mac,
                            src,
                            (ipv4(LB_BACKEND_SIDE), port),
                            flags,
                            (1, 1),
                            payload,
                        );
                        f[..6].copy_from_slice(&lb_mac);
                        // A full send queue is back-pressure, not a failure: retry once.
                        if tx.send(&f).is_err() {
                            std::thread::sleep(Duration::from_millis(1));
                            let _ = tx.send(&f);
                        }
                        sent += 1;
                    }
                }
            }
            sent
        })
        .unwrap();
    let took = started.elapsed();
    // Let the last frames drain through XDP before counting.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let delivered = counter.join().unwrap();
    let dropped = xdp_event(&t, "return_wrong_side") - before;
    let hurt = hurt(&t, v);
    eprintln!(
        "spoofed return spray: {sent} packets in {took:?}; delivered to clients {delivered}; \
         victims hurt {hurt}/20; dropped as wrong side {dropped}"
    );
    assert_eq!(delivered, 0, "spoofed segments reached clients");
    assert_eq!(
        hurt,
        0,
        "victims reset or injected; lbd log:\n{}",
        t.lbd_log()
    );
    // Only the frames of the 20 live flows' tuples reach the side check (the others find no
    // flow): each of those is dropped there.
    assert!(
        dropped >= 40.0,
        "the victims' own tuples (data and RST) were refused as spoofed: {dropped}"
    );
}

/// Finding 2: SYNs no real client sends, from the client side: martian sources, our own
/// addresses (land), a backend-subnet source, impossible flags, bad data offsets and
/// options. Before the fix each created a flow and reached a backend (≈ 18 k such packets).
/// Now none does: each is dropped and counted by its reason, and no backend sees a flow.
#[test]
fn crafted_syns_from_the_client_side_open_no_flow() {
    if !require_root("crafted_syns_from_the_client_side_open_no_flow") {
        return;
    }
    let mut t = Topology::new("cs", "skb").unwrap();
    t.start_lbd().unwrap();
    let (lb_mac, client_mac) = (t.lb.mac("eth0").unwrap(), t.client.mac("eth0").unwrap());
    let vip = (ipv4(VIP), 80u16);
    let client = ipv4("10.99.1.2");
    let flows_before = t.metric("lb_backend_connections_total", "");
    type Craft = Box<dyn Fn(u16) -> Vec<u8> + Send>;
    let syn_from =
        |src: [u8; 4]| -> Craft { Box::new(move |port| packets::tcp((src, port), vip, SYN)) };
    let tweak = |f: fn(&mut Vec<u8>)| -> Craft {
        Box::new(move |port| packets::with_tcp_bytes(&packets::tcp((client, port), vip, SYN), f))
    };
    let cases: Vec<(&str, &str, Craft)> = vec![
        (
            "source 127.0.0.1",
            "spoofed_source",
            syn_from([127, 0, 0, 1]),
        ),
        ("source 0.0.0.0", "spoofed_source", syn_from([0, 0, 0, 0])),
        (
            "source 255.255.255.255",
            "spoofed_source",
            syn_from([255; 4]),
        ),
        (
            "source 224.0.0.1",
            "spoofed_source",
            syn_from([224, 0, 0, 1]),
        ),
        ("source = VIP (land)", "spoofed_source", syn_from(ipv4(VIP))),
        (
            "source = SNAT address",
            "spoofed_source",
            syn_from(ipv4(LB_BACKEND_SIDE)),
        ),
        (
            "source in the backends' subnet",
            "spoofed_source",
            syn_from([10, 20, 0, 77]),
        ),
        ("SYN+FIN", "bad_tcp_flags", tweak(|h| h[13] |= 0x01)),
        ("SYN+RST", "bad_tcp_flags", tweak(|h| h[13] |= 0x04)),
        ("SYN+FIN+PSH+URG", "bad_tcp_flags", tweak(|h| h[13] |= 0x29)),
        ("data offset 4", "bad_tcp_header", tweak(|h| h[12] = 4 << 4)),
        (
            "data offset 15",
            "bad_tcp_header",
            tweak(|h| h[12] = 15 << 4),
        ),
        (
            "an option of length 0",
            "bad_tcp_header",
            tweak(|h| {
                h.truncate(20);
                h.extend_from_slice(&[2, 0, 0, 0]);
                h[12] = 6 << 4;
            }),
        ),
    ];
    const EACH: u16 = 200;
    let mut total = 0.0;
    let mut missed = Vec::new();
    let kinds = cases.len();
    for (name, reason, craft) in cases {
        let before = xdp_event(&t, reason);
        t.in_client(move || {
            let tx = RawSender::open("eth0").unwrap();
            for i in 0..EACH {
                let mut f = packets::fix_ipv4_len(craft(20000 + i));
                f[..6].copy_from_slice(&lb_mac);
                f[6..12].copy_from_slice(&client_mac);
                tx.send(&f).unwrap();
            }
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let counted = xdp_event(&t, reason) - before;
        eprintln!("crafted SYNs, {name}: {EACH} sent, {counted} dropped as {reason}");
        total += counted;
        if counted != EACH as f64 {
            missed.push(name);
        }
    }
    let flows = t.metric("lb_backend_connections_total", "") - flows_before;
    eprintln!(
        "crafted SYNs: {} sent, {total} dropped, {flows} flows created",
        EACH as usize * kinds
    );
    assert!(missed.is_empty(), "not all dropped and counted: {missed:?}");
    assert_eq!(flows, 0.0, "a crafted SYN opened a flow");
    // Real clients still get through.
    let (by, failed) = t.new_connections(20);
    assert_eq!(failed, 0, "{by:?}");
}

/// Finding 2, the host: packets from the client side addressed straight to a backend were
/// routed through the balancer host (lbd turns forwarding on). The forward filter lets the
/// host forward only the balancer's own traffic: a direct connection to a backend fails,
/// the VIP still works.
#[test]
fn the_host_does_not_route_client_traffic_straight_to_backends() {
    if !require_root("the_host_does_not_route_client_traffic_straight_to_backends") {
        return;
    }
    let mut t = Topology::new("ff", "skb").unwrap();
    t.start_lbd().unwrap();
    let backend: SocketAddr = BACKENDS[0].2.parse().unwrap();
    let direct = t
        .in_client(move || TcpStream::connect_timeout(&backend, Duration::from_millis(800)).is_ok())
        .unwrap();
    eprintln!(
        "direct connection to a backend through the host: {}",
        if direct { "routed" } else { "refused" }
    );
    assert!(
        !direct,
        "the host routed a client's packets straight to a backend"
    );
    let (_, failed) = t.new_connections(10);
    assert_eq!(failed, 0, "the VIP must still work");
}

/// Adds a `[daemon.limits]` table to the topology's config.
fn with_limits(t: &Topology, limits: &str) {
    let cfg = t.config_text();
    let at = cfg.find("[[service]]").expect("a service");
    let text = format!("{}[daemon.limits]\n{limits}\n\n{}", &cfg[..at], &cfg[at..]);
    std::fs::write(&t.config, text).unwrap();
}

/// Opens up to `n` connections with `connect` (bounded: stops at the first failure to
/// connect) and holds them; returns them.
fn hold<T>(n: usize, mut connect: impl FnMut() -> std::io::Result<T>) -> Vec<T> {
    (0..n).map_while(|_| connect().ok()).collect()
}

/// Finding 3: idle connections by the thousand to the control socket, the metrics port and
/// the request VIP, against an lbd limited to 1 024 descriptors. Before: lbd exited at
/// 1 124 control connections ("Too many open files"), and ~12 000 on the request VIP
/// stopped its proxy workers for good. Now each listener keeps at most its cap (the rest are
/// closed at once and counted), idle ones are closed after their timeout, lbd never runs out
/// of descriptors, its health checks and control go on, and every listener serves again.
#[test]
fn connection_floods_never_take_lbd_or_its_listeners_down() {
    if !require_root("connection_floods_never_take_lbd_or_its_listeners_down") {
        return;
    }
    // The attacker (this process) needs more than the default 1 024 descriptors itself.
    lb_userspace::listener::raise_nofile();
    let mut t = Topology::new("fl", "skb").unwrap();
    with_limits(
        &t,
        "control_connections = 16\ncontrol_idle_timeout = \"1s\"\nmetrics_connections = 16\nmetrics_timeout = \"1s\"\nrequest_connections = 300\nrequest_header_timeout = \"1s\"",
    );
    t.start_lbd_with(&["prlimit", "--nofile=1024"], None)
        .unwrap();
    let socket = t.socket.clone();
    let control = hold(1200, || std::os::unix::net::UnixStream::connect(&socket));
    let lb_ns = t.lb.name.clone();
    let metrics_conns = std::thread::spawn(move || {
        lb_tests::netns::Netns { name: lb_ns }
            .enter_no_drop()
            .unwrap();
        hold(1200, || {
            TcpStream::connect_timeout(&"127.0.0.1:9091".parse().unwrap(), Duration::from_secs(1))
        })
    })
    .join()
    .unwrap();
    let req = t.req_vip();
    let request_conns = t
        .in_client(move || {
            hold(1500, || {
                TcpStream::connect_timeout(&req, Duration::from_secs(1))
            })
        })
        .unwrap();
    eprintln!(
        "flood held open: control {}, metrics {}, request VIP {} (accepted by the kernel; lbd keeps at most its caps)",
        control.len(),
        metrics_conns.len(),
        request_conns.len()
    );
    // While the attacker still holds every socket: once the idle timeouts have freed the
    // slots, control, metrics and the VIP all answer again.
    std::thread::sleep(Duration::from_millis(2500));
    let pid = t.lbd_pid().expect("lbd runs");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "lbd exited; log:\n{}",
        t.lbd_log()
    );
    let backends = t.control("show backends web").expect("control answers");
    assert_eq!(
        backends.matches(" up").count(),
        4,
        "health checks go on:\n{backends}"
    );
    let refused = |l: &str| t.metric("lb_listener_refused_total", &format!("listener=\"{l}\""));
    let (rc, rm, rr) = (
        refused("control"),
        refused("metrics"),
        refused("request:web-req"),
    );
    eprintln!("refused at the cap: control {rc}, metrics {rm}, request VIP {rr}");
    assert!(
        rc > 0.0 && rm > 0.0 && rr > 0.0,
        "each cap was reached and counted"
    );
    let errors = t.metric("lb_listener_accept_errors_total", "");
    assert_eq!(errors, 0.0, "lbd never ran out of descriptors");
    let vip = t.req_vip();
    let served = t
        .in_client(move || {
            (0..20)
                .filter(|_| lb_tests::http::get_once(vip).is_ok())
                .count()
        })
        .unwrap();
    eprintln!("request VIP while the flood's sockets are still open: {served}/20 served");
    assert_eq!(served, 20, "the VIP serves again; log:\n{}", t.lbd_log());
    let (status, _) = get_in(&t.lb.name, 9091, "/ready");
    assert!(status.contains("200"), "/ready: {status}");
    drop((control, metrics_conns, request_conns));
}

/// What a keep-alive HTTP client that behaves as browsers and proxies do saw: it reconnects
/// after a response that says `Connection: close`, and retries a GET once on a new
/// connection when a reused one was closed before any byte of the answer (RFC 9112 §9.3.1).
#[derive(Debug, Default)]
struct Seen {
    ok: usize,
    /// Reused connections closed by the server while idle (the request was retried).
    retried: usize,
    /// Answers that said `Connection: close`.
    closed_by_server: usize,
    /// Requests that failed for good (refused, reset, a truncated or non-200 answer).
    failed: Vec<String>,
}

/// One GET on `conn` (a new connection when `None`); the connection to reuse, if any.
fn get(
    addr: SocketAddr,
    conn: Option<std::io::BufReader<TcpStream>>,
    seen: &mut Seen,
) -> Option<std::io::BufReader<TcpStream>> {
    use std::io::{BufRead as _, Read as _, Write as _};
    let reused = conn.is_some();
    let mut r = match conn {
        Some(c) => c,
        None => match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                std::io::BufReader::new(s)
            }
            Err(e) => {
                seen.failed.push(format!("connect: {e}"));
                return None;
            }
        },
    };
    let sent = r.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n");
    let mut status = String::new();
    let first = sent.and_then(|_| r.read_line(&mut status));
    if matches!(first, Ok(0)) || (first.is_err() && status.is_empty()) {
        if reused {
            seen.retried += 1;
            return get(addr, None, seen);
        }
        seen.failed
            .push(format!("no answer on a new connection: {first:?}"));
        return None;
    }
    if !status.starts_with("HTTP/1.1 200") {
        seen.failed.push(format!("status {status:?}"));
        return None;
    }
    let (mut len, mut close) = (0usize, false);
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 {
            seen.failed.push("closed in the headers".into());
            return None;
        }
        if l == "\r\n" {
            break;
        }
        let l = l.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        close |= l.starts_with("connection:") && l.contains("close");
    }
    let mut body = vec![0; len];
    if let Err(e) = r.read_exact(&mut body) {
        seen.failed.push(format!("truncated body: {e}"));
        return None;
    }
    seen.ok += 1;
    if close {
        seen.closed_by_server += 1;
        return None;
    }
    Some(r)
}

/// Finding 4: a planned restart of lbd (SIGTERM, then a new lbd) under keep-alive request
/// traffic. Before: all 20 keep-alive connections broke and new ones were refused for the
/// restart (3–4 k wrk errors). Now the listening socket belongs to the supervisor (here the
/// test, as systemd's lbd.socket would), the old lbd drains (in-flight requests finish with
/// `Connection: close`, idle keep-alives are closed) and connections made while no lbd runs
/// wait in the socket's queue: no request fails and none is refused.
#[test]
fn a_planned_restart_in_request_mode_refuses_nothing() {
    if !require_root("a_planned_restart_in_request_mode_refuses_nothing") {
        return;
    }
    use std::os::fd::AsRawFd as _;
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let mut t = Topology::new("rs", "skb").unwrap();
    let addr = t.req_vip();
    let lb_ns = t.lb.name.clone();
    // The supervisor's socket, made in the balancer's namespace.
    let listener = std::thread::spawn(move || {
        lb_tests::netns::Netns { name: lb_ns }
            .enter_no_drop()
            .unwrap();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(1024).unwrap();
        std::net::TcpListener::from(s)
    })
    .join()
    .unwrap();
    let fd = listener.as_raw_fd();
    t.start_lbd_with(&[], Some(fd)).unwrap();
    assert!(
        t.lbd_log().contains("socket activation"),
        "lbd took the passed socket:\n{}",
        t.lbd_log()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let (stop, ns) = (stop.clone(), t.client.name.clone());
            std::thread::spawn(move || {
                lb_tests::netns::Netns { name: ns }.enter_no_drop().unwrap();
                let mut seen = Seen::default();
                let mut conn = None;
                // Bounded: at most 20 000 requests per client.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    conn = get(addr, conn, &mut seen);
                    std::thread::sleep(Duration::from_millis(2));
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let started = Instant::now();
    t.stop_lbd();
    let stopped = started.elapsed();
    t.start_lbd_with(&[], Some(fd)).unwrap();
    let restarted = started.elapsed();
    let old_log = std::fs::read_to_string(t.dir.join("lbd.old.log")).unwrap_or_default();
    eprintln!(
        "old lbd: {}",
        old_log
            .lines()
            .filter(|l| l.contains("SIGTERM") || l.contains("drain"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let mut all = Seen::default();
    for c in clients {
        let s = c.join().unwrap();
        all.ok += s.ok;
        all.retried += s.retried;
        all.closed_by_server += s.closed_by_server;
        all.failed.extend(s.failed);
    }
    eprintln!(
        "planned restart: old lbd drained and exited in {stopped:?}, new one serving after {restarted:?}; \
         {} requests ok, {} answers with Connection: close, {} idle keep-alives closed and retried, {} failed",
        all.ok,
        all.closed_by_server,
        all.retried,
        all.failed.len()
    );
    assert!(
        all.failed.is_empty(),
        "{:?}",
        &all.failed[..all.failed.len().min(5)]
    );
    assert!(all.ok > 1000, "traffic ran throughout: {all:?}");
    assert!(
        all.closed_by_server > 0,
        "the old lbd closed its keep-alive connections with Connection: close: {all:?}"
    );
    drop(listener);
}

/// Sends `raw` on a new connection to `addr` and returns everything the server answers
/// until it closes (or 3 s pass; every case here ends with the server closing).
fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // No half-close: a server may take a read EOF as the client leaving.
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Finding 5: request framing towards backends. Before: a GET with a Content-Length body
/// was forwarded with it, and a backend that ignores GET bodies answered the body as a
/// second request the proxy never saw; bad chunk sizes got 502; HTTP/1.1 without a Host was
/// forwarded. Now each is refused with one 400 that closes the connection, and well-framed
/// requests (a chunked POST) still pass.
#[test]
fn request_mode_refuses_requests_a_backend_could_read_differently() {
    if !require_root("request_mode_refuses_requests_a_backend_could_read_differently") {
        return;
    }
    let mut t = Topology::new("hf", "skb").unwrap();
    t.start_lbd().unwrap();
    let addr = t.req_vip();
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: lb\r\n\r\n";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "GET with a Content-Length body (a request inside)",
            format!(
                "GET / HTTP/1.1\r\nHost: lb\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            "HTTP/1.1 400",
        ),
        (
            "GET with a chunked body",
            "GET / HTTP/1.1\r\nHost: lb\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "a bad chunk size",
            "POST / HTTP/1.1\r\nHost: lb\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "HTTP/1.1 without Host",
            "GET / HTTP/1.1\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "HTTP/1.1 with two Hosts",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "a well-framed chunked POST",
            "POST / HTTP/1.1\r\nHost: lb\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into(),
            "HTTP/1.1 200",
        ),
        (
            "HTTP/1.0 without Host",
            "GET / HTTP/1.0\r\n\r\n".into(),
            "HTTP/1.0 200",
        ),
    ];
    let results = t
        .in_client(move || {
            cases
                .into_iter()
                .map(|(name, raw, want)| (name, exchange(addr, raw.as_bytes()), want))
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut wrong = Vec::new();
    for (name, answer, want) in results {
        let responses = answer.lines().filter(|l| l.starts_with("HTTP/1.")).count();
        eprintln!(
            "{name}: {} ({responses} response(s))",
            answer.lines().next().unwrap_or("<nothing>")
        );
        if !answer.starts_with(want) || responses != 1 {
            wrong.push(format!("{name}: want one {want}, got {answer:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Finding 7: "RSS grew by 0.1–0.6 MB after each backend flap over a 10-minute soak (10.5 →
/// 11.8 MB)". Each change that builds a new pool table (a flap, a backend's weight) adds one
/// 256 KiB table to the cache of the 16 most recent; beyond that nothing may grow. Backend
/// flaps by health (a backend stopped and started, 2 rounds) and 120 distinct backend weights:
/// after the cache has filled, RSS stays flat.
#[test]
fn memory_stays_flat_across_flaps_once_the_table_cache_is_full() {
    if !require_root("memory_stays_flat_across_flaps_once_the_table_cache_is_full") {
        return;
    }
    let mut t = Topology::new("rss", "skb").unwrap();
    t.start_lbd().unwrap();
    let start = t.lbd_rss_kib();
    // Real flaps: the health checks take a backend out and bring it back.
    let legacy_1 = |want: &'static str| {
        move |s: &str| {
            s.lines()
                .any(|l| l.contains("legacy-1") && l.ends_with(want))
        }
    };
    for _ in 0..2 {
        t.stop_backend(0);
        t.wait_backends(Duration::from_secs(10), legacy_1(" down"))
            .unwrap();
        t.start_backend(0).unwrap();
        t.wait_backends(Duration::from_secs(10), legacy_1(" up"))
            .unwrap();
    }
    let mut samples = Vec::new();
    for i in 0..120u32 {
        // Distinct backend weights: each a pool table the cache has not seen (a pool's weight
        // would only change the split, which builds none).
        t.control(&format!("set weight web/legacy/legacy-1 {}", 100 + i))
            .unwrap();
        t.control(&format!(
            "set state web/legacy/legacy-2 {}",
            if i % 2 == 0 { "drain" } else { "ready" }
        ))
        .unwrap();
        if i % 20 == 19 {
            samples.push(t.lbd_rss_kib());
        }
    }
    eprintln!(
        "lbd RSS: start {start} KiB, every 40 table changes after the flaps: {samples:?} KiB"
    );
    let settled = samples[1];
    let last = *samples.last().unwrap();
    assert!(
        last <= settled + 512,
        "RSS kept growing once the cache was full: {samples:?} KiB"
    );
}
