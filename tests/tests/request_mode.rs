//! Request mode in namespaces: per-request smooth weighted round robin even on one keep-alive
//! connection, the canary header, X-Forwarded-For, live split changes, 503 when nothing can
//! answer, the request metrics, and an IPv6 VIP.

use std::time::Duration;

use lb_tests::{
    http::{Client, get_in},
    require_root,
    topology::Topology,
};

#[test]
fn one_keepalive_connection_is_balanced_per_request() {
    if !require_root("one_keepalive_connection_is_balanced_per_request") {
        return;
    }
    let mut t = Topology::new("q", "skb").unwrap();
    t.start_lbd().unwrap();
    let vip = t.req_vip();

    // 90/10 on a single keep-alive connection: exactly 10 % of requests to k8s (20 of 200,
    // Σw = 20 per period), never two in a row.
    let names: Vec<String> = t
        .in_client(move || {
            let mut c = Client::connect(vip).unwrap();
            (0..200).map(|_| c.get(false).unwrap()).collect()
        })
        .unwrap();
    let k8s = names.iter().filter(|n| n.starts_with("k8s")).count();
    assert_eq!(k8s, 20, "{names:?}");
    for w in names.windows(2) {
        assert!(
            !(w[0].starts_with("k8s") && w[1].starts_with("k8s")),
            "two k8s requests in a row"
        );
    }

    // The canary header always goes to k8s; other requests keep the split.
    let canary: Vec<String> = t
        .in_client(move || {
            let mut c = Client::connect(vip).unwrap();
            (0..20)
                .map(|_| c.request("/", &["x-canary: always"], false).unwrap())
                .collect()
        })
        .unwrap();
    assert!(canary.iter().all(|n| n.starts_with("k8s")), "{canary:?}");

    // The backend learns the client's address.
    let xff = t
        .in_client(move || Client::connect(vip).unwrap().request("/xff", &[], true))
        .unwrap()
        .unwrap();
    assert_eq!(xff, "10.99.1.2");

    // A split change applies from the next request on an existing connection.
    let mut c = t.in_client(move || Client::connect(vip).unwrap()).unwrap();
    t.control("set split web-req legacy=0 k8s=100").unwrap();
    let (c, after) = t
        .in_client(move || {
            let names: Vec<String> = (0..20).map(|_| c.get(false).unwrap()).collect();
            (c, names)
        })
        .unwrap();
    assert!(after.iter().all(|n| n.starts_with("k8s")), "{after:?}");
    drop(c);

    // The request metrics count per backend and code.
    let (_, metrics) = get_in(&t.lb.name, 9091, "/metrics");
    assert!(
        metrics.contains(
            "lb_backend_requests_total{service=\"web-req\",pool=\"k8s\",backend=\"k8s-1\",code=\"200\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_backend_request_duration_seconds_count{service=\"web-req\""),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("duration"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Nothing healthy: a 503 with a body that says why.
    for i in 0..4 {
        t.stop_backend(i);
    }
    t.wait_backends(Duration::from_secs(10), |s| !s.contains(" up\n"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let e = t
        .in_client(move || Client::connect(vip).unwrap().get(true))
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.contains("503"), "{e}");
}

/// Request mode on an IPv6 VIP, in front of the same IPv4 pools: clients reach it over IPv6,
/// requests follow the split per request, and X-Forwarded-For carries the client's IPv6
/// address.
#[test]
fn request_mode_serves_an_ipv6_vip() {
    if !require_root("request_mode_serves_an_ipv6_vip") {
        return;
    }
    let mut t = Topology::new("q6", "skb").unwrap();
    // IPv6 between the client and the balancer; the VIP on the balancer's loopback.
    t.client
        .ip(&[
            "-6",
            "addr",
            "add",
            "fd00:99:1::2/64",
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    t.lb.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:99:1::1/64",
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    t.lb.ip(&["-6", "addr", "add", "fd00:99::11/128", "dev", "lo"])
        .unwrap();
    t.client
        .ip(&["-6", "route", "add", "fd00:99::/64", "via", "fd00:99:1::1"])
        .unwrap();
    use lb_tests::topology::pool_toml as pool;
    let service = format!(
        "\n[[service]]\nname = \"web6\"\nvip = \"fd00:99::11\"\nport = 80\nmode = \"request\"\n\n[service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\n{}\n{}",
        pool("legacy", 90),
        pool("k8s", 10)
    );
    let cfg = t.config_text() + &service;
    std::fs::write(&t.config, cfg).unwrap();
    t.start_lbd().unwrap();
    let vip: std::net::SocketAddr = "[fd00:99::11]:80".parse().unwrap();
    let (names, xff) = t
        .in_client(move || {
            let mut c = Client::connect(vip).unwrap();
            let names: Vec<String> = (0..100).map(|_| c.get(false).unwrap()).collect();
            let xff = c.request("/xff", &[], false).unwrap();
            (names, xff)
        })
        .unwrap();
    let k8s = names.iter().filter(|n| n.starts_with("k8s")).count();
    eprintln!(
        "IPv6 VIP, request mode: {k8s} of 100 requests to k8s at 90/10; X-Forwarded-For {xff:?}"
    );
    assert_eq!(k8s, 10, "{names:?}");
    assert_eq!(xff, "fd00:99:1::2");
}
