//! Every file in `deploy/` is checked by the tool its users would run on it.

use std::{path::PathBuf, process::Command};

use lb_tests::topology::binary;

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// Runs a command; fails the test with its output unless it succeeds.
fn ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (cargo xtask setup installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    ok(Command::new("promtool")
        .args(["check", "config"])
        .arg(deploy("prometheus.yml")));
    ok(Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("alerts.yml")));
    // Runs in deploy/ because the test file names its rule file relatively.
    let out = ok(Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(deploy("")));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    // The unit names the installed path; verify it against the binary this build made.
    let lbd = binary("lbd").unwrap();
    let unit = std::fs::read_to_string(deploy("lbd.service"))
        .unwrap()
        .replace("/usr/local/sbin/lbd", lbd.to_str().unwrap());
    let dir = std::env::temp_dir().join(format!("lb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lbd.service");
    std::fs::write(&path, unit).unwrap();
    let socket = dir.join("lbd.socket");
    std::fs::copy(deploy("lbd.socket"), &socket).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .arg(&socket)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("lbd.service:") && !stderr.contains("lbd.socket:"),
        "{stderr}"
    );
}

/// `lbd check` on the example, on a host that has what it names: in a namespace with its
/// interfaces and its request-mode VIP. Without that VIP the check names it.
#[test]
fn example_config_passes_lbd_check() {
    if !lb_tests::require_root("example_config_passes_lbd_check") {
        return;
    }
    let ns = lb_tests::netns::Netns::new(&lb_tests::netns::unique_prefix("dc")).unwrap();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])
    .unwrap();
    let check = |ns: &lb_tests::netns::Netns| {
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(binary("lbd").unwrap())
            .args(["check", "--config"])
            .arg(deploy("lb.toml"))
            .output()
            .unwrap()
    };
    let out = check(&ns);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("10.99.0.11 is not an address of this host"),
        "{stderr}"
    );
    ns.ip(&["addr", "add", "10.99.0.11/32", "dev", "lo"])
        .unwrap();
    let out = check(&ns);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(": ok"),
        "{:?} {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dashboard_is_grafana_json_with_a_query_in_every_panel() {
    let d: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/lb-migration.json")).unwrap(),
    )
    .unwrap();
    let panels = d["panels"].as_array().unwrap();
    let mut queries = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        queries += targets.len();
    }
    assert!(queries >= 10, "{queries}");
}

/// `bird -p` (parse only) on both BIRD examples; the balancer's with the file lbd writes
/// (rendered by lbd's own code) where its include points.
#[test]
fn bird_examples_parse() {
    let dir = std::env::temp_dir().join(format!("lb-deploy-bird-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vips = dir.join("bird-vips.conf");
    let announced = ["10.99.0.10", "fd00:99::10"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    std::fs::write(&vips, lb_userspace::announce::render(&announced)).unwrap();
    let lb = std::fs::read_to_string(deploy("bird-lb.conf"))
        .unwrap()
        .replace("/run/lbd/bird-vips.conf", vips.to_str().unwrap());
    assert!(lb.contains(vips.to_str().unwrap()), "the include moved");
    let lb_conf = dir.join("bird-lb.conf");
    std::fs::write(&lb_conf, lb).unwrap();
    for conf in [lb_conf, deploy("bird-router.conf")] {
        ok(Command::new("bird").arg("-p").arg("-c").arg(&conf));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
