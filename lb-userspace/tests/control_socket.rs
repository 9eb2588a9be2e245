//! The control socket of a whole lbd (`server::run` over a fake kernel, in process, no
//! root): every command works, every bad input is refused with `error:` and changes nothing
//! (invalid UTF-8 and overlong lines included), many clients are served at once, lbctl's exit
//! codes and `--json`, and plain socat.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    time::Duration,
};

use common::{Backend, Lbd, TempDir, daemon_toml, free_port, pools_toml};

/// Sends raw bytes (one line or not) and reads one reply.
fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut r = BufReader::new(s);
    let mut reply = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\n" {
            return reply;
        }
        reply.push_str(&l);
    }
}

/// Everything a command could change, as the operator sees it.
fn snapshot(t: &Lbd) -> String {
    format!(
        "{}{}",
        t.control("show backends").unwrap(),
        t.control("show table web").unwrap()
    )
}

/// The namespace topology's services (a connection-mode `web` and a request-mode `web-req`
/// over the same 4 backends, 90/10), with its backends on 127.0.0.1 and TCP checks.
fn config(dir: &Path, backends: &[Backend]) -> String {
    let body = format!(
        "[service.health]\ncheck = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"50ms\"\n\n{}",
        pools_toml(backends, 90, 10)
    );
    format!(
        r#"{daemon}
[[service]]
name = "web"
vip = "10.99.0.10"
port = 80
snat = "10.20.0.1"
{body}
[[service]]
name = "web-req"
vip = "127.0.0.1"
port = {req}
mode = "request"
{body}"#,
        daemon = daemon_toml(dir),
        req = free_port(),
    )
}

#[test]
fn every_command_works_and_every_bad_input_changes_nothing() {
    let dir = TempDir::new("ctl");
    let backends: Vec<Backend> = (0..4).map(|_| Backend::start()).collect();
    let path = dir.0.join("lb.toml");
    std::fs::write(&path, config(&dir.0, &backends)).unwrap();
    let t = Lbd::start(&path);
    let lbctl = env!("CARGO_BIN_EXE_lbctl");

    let help = t.control("help").unwrap();
    for c in ["show stat", "explain SERVICE", "set split", "set state"] {
        assert!(help.contains(c), "help lacks {c}: {help}");
    }
    let services = t.control("show services").unwrap();
    assert!(services.contains("web") && services.contains("10.99.0.10"));

    t.control("set weight web/legacy 50").unwrap();
    t.control("set weight web/k8s/k8s-2 3").unwrap();
    let b = t.control("show backends web").unwrap();
    // legacy 50 of 60, split evenly; k8s 10 of 60, k8s-2 holds 3 of 4.
    assert!(b.contains("web legacy legacy-1 1 41.67% ready up"), "{b}");
    assert!(b.contains("web k8s k8s-2 3 12.50% ready up"), "{b}");
    t.control("set split web legacy=1 k8s=3").unwrap();
    t.control("set state web/legacy/legacy-2 drain").unwrap();
    t.control("set state web/k8s/k8s-1 maint").unwrap();
    let b = t.control("show backends").unwrap();
    assert!(b.contains("web legacy legacy-1 1 25.00% ready up"), "{b}");
    assert!(b.contains("web legacy legacy-2 1 0.00% drain up"), "{b}");
    assert!(b.contains("web k8s k8s-1 1 0.00% maint up"), "{b}");
    assert!(b.contains("web k8s k8s-2 3 75.00% ready up"), "{b}");
    let table = t.control("show table web").unwrap();
    assert!(table.contains("k8s k8s-2 49153"), "{table}");
    assert!(table.contains("legacy legacy-2 0"), "{table}");

    let stat = t.control("show stat").unwrap();
    let mut lines = stat.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("# service,pool,backend,addr,")
    );
    // Both services (connection and request mode) share the four backends.
    assert_eq!(lines.count(), 8, "{stat}");
    let json: serde_json::Value = serde_json::from_str(&t.control("show stat json").unwrap())
        .expect("show stat json is JSON");
    assert_eq!(json.as_array().map(|a| a.len()), Some(8), "{json}");
    assert_eq!(json[3]["backend"], "k8s-2");
    assert_eq!(json[3]["weight"], 3);
    let e = t.control("explain web 10.99.1.2:40000").unwrap();
    assert!(e.starts_with("backend ") && e.contains("bucket"), "{e}");
    t.control("set state web/k8s/k8s-1 ready").unwrap();

    // Bad inputs: an error reply, and nothing changes.
    let before = snapshot(&t);
    let bad: &[&[u8]] = &[
        b"\n",
        b"bogus\n",
        b"show\n",
        b"show backends web extra\n",
        b"show backends nope\n",
        b"show table\n",
        b"show table nope\n",
        b"show stat csv\n",
        b"set weight\n",
        b"set weight web/legacy\n",
        b"set weight web/legacy 5 6\n",
        b"set weight web 5\n",
        b"set weight nope/legacy 5\n",
        b"set weight web/nope 5\n",
        b"set weight web/legacy/nope 5\n",
        b"set weight web/legacy/legacy-1/x 5\n",
        b"set weight web/legacy -1\n",
        b"set weight web/legacy 1001\n",
        b"set weight web/legacy/legacy-1 -1\n",
        b"set weight web/legacy/legacy-1 1001\n",
        b"set weight web/legacy abc\n",
        b"set weight web/legacy 1e3\n",
        b"set weight web/legacy 0x10\n",
        b"set split web legacy=50\n",
        b"set split web legacy=50 k8s=x\n",
        b"set split web legacy=50 k8s=1001\n",
        b"set split web legacy=50 k8s=50 nope=1\n",
        b"set split web legacy=50 legacy=50\n",
        b"set split web legacy50 k8s=50\n",
        b"set split nope legacy=50 k8s=50\n",
        b"set state web/legacy/legacy-1 sleeping\n",
        b"set state web/legacy/legacy-1\n",
        b"set state web/legacy ready\n",
        b"set state web/legacy/nope ready\n",
        b"explain web\n",
        b"explain web nonsense\n",
        b"explain web 10.99.1.2\n",
        b"explain nope 10.99.1.2:40000\n",
        b"set weight web/legacy \xff\xfe 5\n",
        b"\xc3\x28\n",
    ];
    for input in bad {
        let reply = raw(&t.socket, input);
        assert!(
            reply.starts_with("error: "),
            "{:?} got {reply:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(
            before,
            snapshot(&t),
            "{:?} changed state",
            String::from_utf8_lossy(input)
        );
    }
    let long = vec![b'a'; 10_000];
    let reply = raw(&t.socket, &long);
    assert!(reply.starts_with("error: line longer than"), "{reply}");
    assert_eq!(before, snapshot(&t));

    // Many clients at once, each with several commands on one connection.
    let socket = t.socket.clone();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&socket).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                for _ in 0..20 {
                    s.write_all(b"show backends web\n").unwrap();
                    let mut rows = 0;
                    loop {
                        let mut l = String::new();
                        r.read_line(&mut l).unwrap();
                        if l == "\n" {
                            break;
                        }
                        rows += 1;
                    }
                    assert_eq!(rows, 5);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a concurrent client failed");
    }

    // lbctl: 0 on success, 1 on an error reply, 2 when the socket cannot be reached.
    let code = |args: &[&str]| {
        Command::new(lbctl)
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
    };
    let sock = t.socket.to_str().unwrap();
    assert_eq!(code(&["--socket", sock, "show", "backends"]), Some(0));
    assert_eq!(
        code(&["--socket", sock, "set", "weight", "web/x", "1"]),
        Some(1)
    );
    assert_eq!(code(&["--socket", "/nonexistent/lb.sock", "help"]), Some(2));
    let out = Command::new(lbctl)
        .args(["--socket", sock, "--json", "show", "stat"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("lbctl --json");
    assert!(v.is_array());
    // Plain socat works too.
    let out = Command::new("socat")
        .args(["-", &format!("UNIX-CONNECT:{sock}")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"show services\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("web"));
}
