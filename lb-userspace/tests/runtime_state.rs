//! The state file, through the whole daemon in process: what an operator decided with
//! `lbctl` survives a restart, a bad file never stops lbd, `--fresh` starts from the config,
//! and a change that cannot be recorded is refused whole.

mod common;

use std::{collections::HashMap, path::Path};

use common::{Backend, Lbd, TempDir, daemon_toml, pools_toml};
use lb_userspace::dataplane::FakeKernel;

fn config(dir: &Path, backends: &[Backend]) -> String {
    format!(
        "{}\n[[service]]\nname = \"web\"\nvip = \"10.99.0.10\"\nport = 80\nsnat = \"10.20.0.1\"\n\n[service.health]\ncheck = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"50ms\"\n\n{}",
        daemon_toml(dir),
        pools_toml(backends, 90, 10)
    )
}

struct Setup {
    dir: TempDir,
    _backends: Vec<Backend>,
    path: std::path::PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let backends: Vec<Backend> = (0..4).map(|_| Backend::start()).collect();
    let path = dir.0.join("lb.toml");
    std::fs::write(&path, config(&dir.0, &backends)).unwrap();
    Setup {
        dir,
        _backends: backends,
        path,
    }
}

/// `show backends web` as backend → (weight, state).
fn backends(t: &Lbd) -> HashMap<String, (String, String)> {
    t.control("show backends web")
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2].to_string(), (f[3].to_string(), f[5].to_string()))
        })
        .collect()
}

/// Buckets per pool in the live table the (fake) kernel holds for `web` (backends 0 and 1
/// are legacy, 2 and 3 k8s).
fn kernel_pools(t: &Lbd, s: &Setup) -> HashMap<&'static str, usize> {
    let st = t.kernel.state();
    let mut out = HashMap::from([("legacy", 0), ("k8s", 0)]);
    for id in st.table(0).expect("web's table is published") {
        let addr = st
            .backends
            .get(id)
            .expect("a table names only written backends");
        let i = s._backends.iter().position(|b| b.addr == *addr).unwrap();
        *out.get_mut(if i < 2 { "legacy" } else { "k8s" }).unwrap() += 1;
    }
    out
}

fn decide(t: &Lbd) {
    t.control("set split web legacy=0 k8s=100").unwrap();
    t.control("set weight web/k8s/k8s-2 7").unwrap();
    t.control("set state web/legacy/legacy-2 drain").unwrap();
    t.control("set state web/k8s/k8s-1 maint").unwrap();
}

fn assert_decided(b: &HashMap<String, (String, String)>) {
    assert_eq!(b["legacy-2"], ("1".into(), "drain".into()), "{b:?}");
    assert_eq!(b["k8s-1"], ("1".into(), "maint".into()), "{b:?}");
    assert_eq!(b["k8s-2"], ("7".into(), "ready".into()), "{b:?}");
}

#[test]
fn split_weights_and_states_survive_a_restart_and_the_table_follows_them() {
    let s = setup("rs-restart");
    let t = Lbd::start(&s.path);
    decide(&t);
    drop(t);
    // A restart on an empty kernel (`lbd down` before it): only the file remembers.
    let t = Lbd::start_on(&s.path, FakeKernel::default(), false);
    let b = backends(&t);
    assert_decided(&b);
    let split = t.control("show backends web").unwrap();
    assert!(
        split.contains("web k8s k8s-2 7 100.00% ready up"),
        "{split}"
    );
    let pools = kernel_pools(&t, &s);
    assert_eq!(pools["legacy"], 0, "{pools:?}");
    assert!(pools["k8s"] > 0, "{pools:?}");
}

#[test]
fn fresh_starts_from_the_config_and_overwrites_the_file() {
    let s = setup("rs-fresh");
    let t = Lbd::start(&s.path);
    decide(&t);
    drop(t);
    let t = Lbd::start_on(&s.path, FakeKernel::default(), true);
    let b = backends(&t);
    for (name, (w, st)) in &b {
        assert_eq!((w.as_str(), st.as_str()), ("1", "ready"), "{name}: {b:?}");
    }
    assert_eq!(
        kernel_pools(&t, &s)["legacy"] + kernel_pools(&t, &s)["k8s"],
        65537
    );
    drop(t);
    // The file now says what --fresh started from: a plain restart keeps it.
    let t = Lbd::start_on(&s.path, FakeKernel::default(), false);
    assert_eq!(backends(&t), b);
}

#[test]
fn a_corrupt_file_is_set_aside_and_lbd_starts_from_the_config() {
    let s = setup("rs-corrupt");
    let file = s.dir.0.join("state.json");
    std::fs::write(&file, "{\"version\": 1, \"services\": {\"web\": ").unwrap();
    let t = Lbd::start(&s.path);
    let b = backends(&t);
    assert!(b.values().all(|(w, st)| w == "1" && st == "ready"), "{b:?}");
    let aside = s.dir.0.join("state.json.corrupt");
    assert!(
        std::fs::read_to_string(&aside)
            .unwrap()
            .contains("\"services\""),
        "the corrupt file is kept for a look"
    );
    // And the daemon records decisions again.
    decide(&t);
    drop(t);
    let t = Lbd::start(&s.path);
    assert_decided(&backends(&t));
}

#[test]
fn a_reload_takes_weights_from_the_config_and_keeps_admin_states() {
    let s = setup("rs-reload");
    let t = Lbd::start(&s.path);
    decide(&t);
    t.reload();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let b = loop {
        let b = backends(&t);
        if b["k8s-2"].0 == "1" || std::time::Instant::now() > deadline {
            break b;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert_eq!(b["k8s-2"], ("1".into(), "ready".into()), "{b:?}");
    assert_eq!(b["legacy-2"], ("1".into(), "drain".into()), "{b:?}");
    // The share needs both pools' health too: a check that timed out (50 ms) on a busy
    // machine takes a moment to come back, so wait for it rather than read once.
    let want = "web legacy legacy-1 1 90.00% ready up";
    let shown = loop {
        let shown = t.control("show backends web").unwrap();
        if shown.contains(want) || std::time::Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(shown.contains(want), "{shown}");
    drop(t);
    // A restart after the reload starts where the reload left off.
    let t = Lbd::start(&s.path);
    let after = backends(&t);
    assert_eq!(after, b);
}

#[test]
fn a_change_the_file_cannot_record_is_refused_and_changes_nothing() {
    let s = setup("rs-unwritable");
    let kernel = FakeKernel::default();
    let t = Lbd::start_on(&s.path, kernel.clone(), false);
    let before = (backends(&t), kernel_pools(&t, &s));
    // Something else now sits where the file goes: the rename over it fails.
    let file = s.dir.0.join("state.json");
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir_all(file.join("in-the-way")).unwrap();
    let e = t.control("set split web legacy=0 k8s=100").unwrap_err();
    assert!(e.contains("state file"), "{e}");
    assert_eq!((backends(&t), kernel_pools(&t, &s)), before);
    std::fs::remove_dir_all(&file).unwrap();
    t.control("set split web legacy=0 k8s=100").unwrap();
    assert_eq!(kernel_pools(&t, &s)["legacy"], 0);
}

#[test]
fn a_change_the_kernel_refuses_is_not_left_in_the_file() {
    let s = setup("rs-refused");
    let t = Lbd::start(&s.path);
    let before = backends(&t);
    t.kernel.state().fail_next_write = true;
    let e = t.control("set split web legacy=0 k8s=100").unwrap_err();
    assert!(e.contains("data plane"), "{e}");
    drop(t);
    let t = Lbd::start_on(&s.path, FakeKernel::default(), false);
    assert_eq!(backends(&t), before);
    assert!(
        t.control("show backends web")
            .unwrap()
            .contains("web legacy legacy-1 1 45.00% ready up")
    );
}
