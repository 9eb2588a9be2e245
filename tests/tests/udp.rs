//! A UDP service end to end through the XDP program: UDP backends in their namespaces are
//! checked over UDP and healthy, datagrams from many client ports are spread by the split and
//! answered from the VIP (the return path), a flow keeps its backend across a split change,
//! and a backend whose port goes unreachable is taken out by its UDP checks. A UDP service
//! can also be checked on another port (HTTP on a management port), and an idle UDP flow is
//! balanced afresh after `udp_timeout`.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use lb_tests::{
    require_root,
    topology::{BACKENDS, LB_BACKEND_SIDE, Topology, VIP},
    udp::UdpBackend,
};

const PORT: u16 = 5353;

/// The UDP service's config: the topology's pools, on port 5353 of each backend, checked
/// over UDP.
fn service() -> String {
    service_checked("check = \"udp\"\nsend = \"health\"\nexpect_reply = true")
}

/// As [`service`], checked by `check` (the `[service.health]` keys besides the timings).
fn service_checked(check: &str) -> String {
    let pool = |name: &str, weight: u32, range: std::ops::Range<usize>| {
        let list: Vec<String> = BACKENDS[range]
            .iter()
            .map(|(_, n, a)| {
                let ip = a.split(':').next().unwrap();
                format!("{{ addr = \"{ip}:{PORT}\", name = \"{n}\" }}")
            })
            .collect();
        format!(
            "[[service.pool]]\nname = \"{name}\"\nweight = {weight}\nbackends = [{}]\n",
            list.join(", ")
        )
    };
    format!(
        "\n[[service]]\nname = \"dns\"\nvip = \"{VIP}\"\nport = 53\nprotocol = \"udp\"\nsnat = \"{LB_BACKEND_SIDE}\"\n\n[service.health]\n{check}\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n\n{}\n{}",
        pool("legacy", 50, 0..2),
        pool("k8s", 50, 2..4)
    )
}

/// One datagram from `sock` to the VIP; the answer's text and where it came from.
fn ask(sock: &UdpSocket) -> Option<(String, SocketAddr)> {
    let vip: SocketAddr = format!("{VIP}:53").parse().unwrap();
    sock.send_to(b"q", vip).ok()?;
    let mut buf = [0u8; 64];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// Writes the UDP service into the topology's config (before the request-mode service, whose
/// routes would otherwise take its tables) and starts a UDP backend in each namespace.
fn with_udp_service(t: &Topology, service: &str) -> Vec<Option<UdpBackend>> {
    let cfg = t.config_text();
    let marker = "# The same pools and split, balanced per request";
    std::fs::write(
        &t.config,
        cfg.replacen(marker, &format!("{service}\n{marker}"), 1),
    )
    .unwrap();
    BACKENDS
        .iter()
        .enumerate()
        .map(|(i, (_, name, addr))| {
            let ip = addr.split(':').next().unwrap();
            let a: SocketAddr = format!("{ip}:{PORT}").parse().unwrap();
            Some(UdpBackend::start(t.backend_ns(i), a, name).unwrap())
        })
        .collect()
}

#[test]
fn a_udp_service_balances_answers_from_the_vip_and_drops_an_unreachable_backend() {
    if !require_root("a_udp_service_balances") {
        return;
    }
    let mut t = Topology::new("udp", "skb").unwrap();
    let mut udp = with_udp_service(&t, &service());
    t.start_lbd().unwrap();
    let all_up = |s: &str| {
        s.lines().filter(|l| l.starts_with("dns ")).count() == 4
            && !s
                .lines()
                .any(|l| l.starts_with("dns ") && l.ends_with(" down"))
    };
    let b = t.control("show backends dns").unwrap();
    let up = t
        .wait_backends(Duration::from_secs(5), |_| {
            all_up(&t.control("show backends dns").unwrap_or_default())
        })
        .unwrap_or_else(|e| panic!("UDP backends never all up: {e}\n{b}"));
    // Backends start healthy; what matters is that the checks keep them so: after more than
    // fall (2) × interval (200 ms), with checks passing (a TCP check here would have failed).
    std::thread::sleep(Duration::from_millis(700));
    let b = t.control("show backends dns").unwrap();
    assert!(all_up(&b), "{b}");
    let metrics = lb_tests::http::get_in(&t.lb.name, 9091, "/metrics").1;
    let ok_checks: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("lb_health_checks_total{")
                && l.contains("service=\"dns\"")
                && l.contains("result=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    eprintln!(
        "4 UDP backends up after {up:?} and still 700 ms later: {ok_checks} UDP checks passed"
    );
    assert!(ok_checks >= 8, "{ok_checks} passing UDP checks");

    // 200 flows (client ports): answers come from the VIP, shares follow 50/50.
    let (by, from_vip, sticky) = t
        .in_client(|| {
            let socks: Vec<UdpSocket> = (0..200)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    s
                })
                .collect();
            let mut by: HashMap<String, usize> = HashMap::new();
            let mut from_vip = true;
            let mut first = Vec::new();
            for s in &socks {
                let (name, from) = ask(s).expect("an answer");
                from_vip &= from == format!("{VIP}:53").parse::<SocketAddr>().unwrap();
                *by.entry(name.clone()).or_default() += 1;
                first.push(name);
            }
            (by, from_vip, (socks, first))
        })
        .unwrap();
    eprintln!("200 UDP flows at 50/50: {by:?}");
    assert!(from_vip, "every answer comes back from the VIP");
    let k8s: usize = by
        .iter()
        .filter(|(n, _)| n.starts_with("k8s"))
        .map(|(_, c)| c)
        .sum();
    assert!((60..=140).contains(&k8s), "k8s took {k8s} of 200");

    // A split change: the existing flows keep their backends.
    t.control("set split dns legacy=0 k8s=100").unwrap();
    let (socks, first) = sticky;
    let (moved, socks) = t
        .in_client(move || {
            let moved = socks
                .iter()
                .zip(first.iter())
                .filter(|(s, name)| ask(s).map(|a| a.0) != Some(name.to_string()))
                .count();
            (moved, socks)
        })
        .unwrap();
    assert_eq!(moved, 0, "established UDP flows keep their backend");

    // Nothing listens on k8s-1's port any more: its UDP checks see the ICMP error.
    udp[2] = None;
    let took = t
        .wait_backends(Duration::from_secs(5), |_| {
            t.control("show backends dns")
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("dns k8s k8s-1 ") && l.ends_with(" down"))
        })
        .unwrap();
    eprintln!("k8s-1's UDP port closed: down after {took:?}");
    let names = t
        .in_client(|| {
            (0..50)
                .filter_map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    ask(&s).map(|a| a.0)
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(names.len(), 50, "every new flow answered");
    assert!(names.iter().all(|n| n == "k8s-2"), "{names:?}");
    // The first 200 stayed open meanwhile: the new flows' ports are new, not theirs again.
    drop(socks);
}

/// A DNS-style service checked over HTTP on each backend's management port (`port = 8080`,
/// where the topology's HTTP backends answer `/healthz`): the check follows that port, not the
/// UDP one. And a UDP flow keeps its backend only while it is active: idle past
/// `udp_timeout`, its next datagram is balanced by the current split.
#[test]
fn a_udp_service_checked_on_another_port_and_idle_flows_rebalanced() {
    if !require_root("a_udp_service_checked_on_another_port") {
        return;
    }
    let mut t = Topology::new("udpp", "skb").unwrap();
    t.daemon_keys("udp_timeout = \"1s\"");
    let _udp = with_udp_service(
        &t,
        &service_checked("check = \"http\"\npath = \"/healthz\"\nport = 8080"),
    );
    t.start_lbd().unwrap();
    let state = |t: &Topology, who: &str| {
        t.control("show backends dns")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(&format!("dns {who} ")))
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
    };
    let all_up = |t: &Topology| {
        [
            "legacy legacy-1",
            "legacy legacy-2",
            "k8s k8s-1",
            "k8s k8s-2",
        ]
        .iter()
        .all(|b| state(t, b).as_deref() == Some("up"))
    };
    t.wait_backends(Duration::from_secs(5), |_| all_up(&t))
        .unwrap_or_else(|e| panic!("UDP backends checked over HTTP never all up: {e}"));

    // legacy-1's management port stops answering while its UDP port still does: the HTTP
    // check on 8080 takes it out; back when the port answers again.
    t.stop_backend(0);
    let down = t
        .wait_backends(Duration::from_secs(5), |_| {
            state(&t, "legacy legacy-1").as_deref() == Some("down")
        })
        .unwrap();
    t.start_backend(0).unwrap();
    let up = t
        .wait_backends(Duration::from_secs(5), |_| all_up(&t))
        .unwrap();
    eprintln!(
        "HTTP check on port 8080 of a UDP backend: down {down:?} after its port closed, up {up:?} after it reopened"
    );

    // 40 flows at 50/50, then everything to k8s: active flows stay, idle ones move.
    let socks = t
        .in_client(|| {
            (0..40)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    let name = ask(&s).expect("an answer").0;
                    (s, name)
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let legacy_before = socks
        .iter()
        .filter(|(_, n)| n.starts_with("legacy"))
        .count();
    assert!(legacy_before > 0, "some flows on legacy to begin with");
    t.control("set split dns legacy=0 k8s=100").unwrap();
    let (kept, socks) = t
        .in_client(move || {
            let kept = socks
                .iter()
                .filter(|(s, name)| ask(s).map(|a| a.0).as_deref() == Some(name.as_str()))
                .count();
            (kept, socks)
        })
        .unwrap();
    assert_eq!(
        kept, 40,
        "active UDP flows keep their backend across the split change"
    );
    // Idle past udp_timeout (1 s; an entry's clock is refreshed once a second).
    std::thread::sleep(Duration::from_millis(2500));
    let names = t
        .in_client(move || {
            socks
                .iter()
                .map(|(s, _)| ask(s).map(|a| a.0).unwrap_or_default())
                .collect::<Vec<_>>()
        })
        .unwrap();
    let on_k8s = names.iter().filter(|n| n.starts_with("k8s")).count();
    eprintln!(
        "{legacy_before} of 40 UDP flows on legacy before the split change (all 40 kept while active); after 2.5 s idle at 0/100: {on_k8s} of 40 on k8s"
    );
    assert!(
        names.iter().all(|n| n.starts_with("k8s")),
        "idle flows are balanced afresh: {names:?}"
    );
}
