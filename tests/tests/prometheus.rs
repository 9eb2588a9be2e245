//! A real Prometheus (Debian's) scrapes lbd inside the balancer's namespace: the measured
//! connection rates follow the split, `lb_backend_up` follows a killed backend, every
//! dashboard query runs, and the alert rules load.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_tests::{http::get_in, require_root, topology::Topology, traffic::Traffic};

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query; panics unless Prometheus says `success`.
fn query(ns: &str, q: &str) -> Vec<serde_json::Value> {
    let (status, body) = get_in(ns, 9090, &format!("/api/v1/query?query={}", encode(q)));
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{q}: {status}: {e}: {body}"));
    assert_eq!(v["status"], "success", "{q}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

#[test]
fn prometheus_sees_the_split_and_a_dead_backend() {
    if !require_root("prometheus_sees_the_split") {
        return;
    }
    let mut t = Topology::new("m", "skb").unwrap();
    t.start_lbd().unwrap();
    let ns = t.lb.name.clone();
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let prom_cfg = t.dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: [\"127.0.0.1:9091\"]\n",
            deploy.join("alerts.yml").display()
        ),
    )
    .unwrap();
    let tsdb = t.dir.join("tsdb");
    let _prom =
        t.lb.spawn(
            &[
                "prometheus",
                &format!("--config.file={}", prom_cfg.display()),
                &format!("--storage.tsdb.path={}", tsdb.display()),
                "--web.listen-address=127.0.0.1:9090",
            ],
            &t.dir.join("prometheus.log"),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get_in(&ns, 9090, "/-/ready").0.contains("200") {
        assert!(
            Instant::now() < deadline,
            "prometheus did not start:\n{}",
            std::fs::read_to_string(t.dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(get_in(&ns, 9091, "/live").0.contains("200"));
    assert!(get_in(&ns, 9091, "/ready").0.contains("200"));

    t.control("set split web legacy=80 k8s=20").unwrap();
    let traffic = Traffic::start(&t, 0).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let rates = query(
        &ns,
        "sum by (pool) (rate(lb_backend_connections_total{service=\"web\"}[20s]))",
    );
    let rate = |pool: &str| {
        rates
            .iter()
            .find(|s| s["metric"]["pool"] == pool)
            .map(value)
            .unwrap_or(0.0)
    };
    let (legacy, k8s) = (rate("legacy"), rate("k8s"));
    let report = traffic.stop().unwrap();
    assert!(report.new_failed.is_empty());
    let k8s_share = 100.0 * k8s / (legacy + k8s);
    eprintln!(
        "prometheus: legacy {legacy:.1}/s, k8s {k8s:.1}/s, k8s share {k8s_share:.1} % (split 80/20)"
    );
    assert!(legacy > 0.0 && k8s > 0.0, "{rates:?}");
    assert!(
        (15.0..=25.0).contains(&k8s_share),
        "k8s share {k8s_share:.1} %"
    );

    let (_, scrape) = get_in(&ns, 9091, "/metrics");
    let excerpt: Vec<&str> = scrape
        .lines()
        .filter(|l| {
            l.starts_with("lb_backend_connections_total")
                || l.starts_with("lb_backend_up")
                || l.starts_with("lb_xdp_packets_total")
                || l.starts_with("lb_pool_weight")
        })
        .collect();
    eprintln!("scrape excerpt:\n{}", excerpt.join("\n"));

    // k8s-1 dies: Prometheus sees lb_backend_up go to 0.
    t.stop_backend(2);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = query(&ns, "lb_backend_up{service=\"web\",backend=\"k8s-1\"}");
        if up.first().map(value) == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "lb_backend_up stayed {up:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let others = query(&ns, "lb_backend_up{service=\"web\",backend!=\"k8s-1\"}");
    assert_eq!(others.len(), 3);
    assert!(others.iter().all(|s| value(s) == 1.0), "{others:?}");

    // Every dashboard query runs.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/lb-migration.json")).unwrap(),
    )
    .unwrap();
    let mut ran = 0;
    for p in dash["panels"].as_array().unwrap() {
        for target in p["targets"].as_array().into_iter().flatten() {
            let q = target["expr"]
                .as_str()
                .unwrap()
                .replace("$service", "web")
                .replace("$__rate_interval", "10s");
            query(&ns, &q);
            ran += 1;
        }
    }
    assert!(ran >= 10);
    // The alert rules loaded into the real Prometheus.
    let (_, rules) = get_in(&ns, 9090, "/api/v1/rules");
    assert!(rules.contains("LbPoolNoHealthyBackend"), "{rules}");
}
