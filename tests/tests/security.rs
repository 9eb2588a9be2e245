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
    raw::{RawSender, parse_mac},
    require_root,
    topology::{BACKENDS, LB_BACKEND_SIDE, Topology, VIP},
};

/// A counter or gauge of lbd's /metrics (the sum over series whose labels contain `labels`).
fn metric(t: &Topology, name: &str, labels: &str) -> f64 {
    let (status, body) = get_in(&t.lb.name, 9091, "/metrics");
    assert!(status.contains("200"), "/metrics: {status}");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn xdp_event(t: &Topology, reason: &str) -> f64 {
    metric(t, "lb_xdp_events_total", &format!("reason=\"{reason}\""))
}

/// The MAC address of `iface` in namespace `ns`.
fn mac(ns: &lb_tests::netns::Netns, iface: &str) -> [u8; 6] {
    parse_mac(
        &ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")])
            .unwrap(),
    )
    .unwrap()
}

fn ipv4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().unwrap().octets()
}

/// 20 idle keep-alive connections through the VIP, each with the backend it answered from.
fn victims(t: &Topology) -> Vec<(Client, String)> {
    let vip = t.vip();
    t.in_client(move || {
        (0..20)
            .map(|_| {
                let mut c = Client::connect(vip).unwrap();
                let name = c.get(false).unwrap();
                (c, name)
            })
            .collect()
    })
    .unwrap()
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

/// Finding 1: segments claiming to be the backends' (source = backend address:port,
/// destination = the SNAT address), sprayed from the client side over every SNAT port,
/// first as data and then as RSTs. Before the fix: 127 k packets, every one of 20 idle
/// victims hit (data injected, or reset). Now none gets through: all are dropped as coming
/// from the wrong side, and every victim still works.
#[test]
fn spoofed_return_traffic_sprayed_over_every_snat_port_reaches_no_client() {
    if !require_root("spoofed_return_traffic_sprayed_over_every_snat_port_reaches_no_client") {
        return;
    }
    let mut t = Topology::new("sr", "skb").unwrap();
    t.start_lbd().unwrap();
    let v = victims(&t);
    let (lb_mac, client_mac) = (mac(&t.lb, "eth0"), mac(&t.client, "eth0"));
    let (lo, hi) = {
        let d = lb_common::Tunables::DEFAULT;
        (d.snat_port_min, d.snat_port_max)
    };
    let before = xdp_event(&t, "return_wrong_side");
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
    let dropped = xdp_event(&t, "return_wrong_side") - before;
    let hurt = hurt(&t, v);
    eprintln!(
        "spoofed return spray: {sent} packets in {took:?}; victims hurt {hurt}/20; dropped as wrong side {dropped}"
    );
    assert_eq!(
        hurt,
        0,
        "victims reset or injected; lbd log:\n{}",
        t.lbd_log()
    );
    // Only the frames of the 20 live flows' tuples reach the side check (the others find no
    // flow): each of those is dropped there.
    assert!(
        dropped >= 20.0,
        "the victims' own tuples were refused as spoofed: {dropped}"
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
    let (lb_mac, client_mac) = (mac(&t.lb, "eth0"), mac(&t.client, "eth0"));
    let vip = (ipv4(VIP), 80u16);
    let client = ipv4("10.99.1.2");
    let flows_before = metric(&t, "lb_backend_connections_total", "");
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
        assert_eq!(
            counted, EACH as f64,
            "{name}: dropped and counted as {reason}"
        );
        total += counted;
    }
    let flows = metric(&t, "lb_backend_connections_total", "") - flows_before;
    eprintln!("crafted SYNs: {total} dropped, {flows} flows created");
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
