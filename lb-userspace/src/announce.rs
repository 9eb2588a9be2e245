//! Announcing the VIPs through a routing daemon (BIRD 2): lbd decides *whether* this host
//! should receive each VIP's traffic; BIRD speaks BGP to the router that spreads flows over
//! the balancer hosts (ECMP). No routing protocol of our own.
//!
//! The interface is the one BIRD offers for routes from elsewhere: a config fragment and a
//! `configure` over its control socket. lbd writes the file [`crate::config::Announce`]
//! names (BIRD's config includes it), holding two static protocols, [`PROTOCOL_V4`] and
//! [`PROTOCOL_V6`], with one blackhole route per announced VIP; the operator's BGP protocols
//! export them (`export where proto = "lbd_vips4";`). A reconfiguration that only changes a
//! static protocol's routes is applied in place: BGP sessions stay up, the change goes out
//! as one UPDATE.
//!
//! A VIP is announced while the host is not drained and at least one of the VIP's services
//! has a backend that takes new connections (ready, healthy, weight and pool weight above 0).
//! It is withdrawn on `set host drain`, when no service at it can serve, when lbd stops, and
//! by `lbd down`.

use std::{
    collections::BTreeSet,
    io::{BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use crate::state::State;

/// BIRD protocol (in the written file) holding the announced IPv4 VIPs.
pub const PROTOCOL_V4: &str = "lbd_vips4";
/// BIRD protocol holding the announced IPv6 VIPs.
pub const PROTOCOL_V6: &str = "lbd_vips6";

/// How long one exchange with BIRD may take (connect, command, reply).
const BIRD_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an announcement did not reach BIRD.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("BIRD control socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// BIRD answered the `configure` with an error (e.g. its config does not parse).
    #[error("BIRD refused to reconfigure: {0}")]
    Refused(String),
}

/// The VIPs this host should receive now (see the module's doc).
pub fn wanted(state: &State) -> BTreeSet<IpAddr> {
    if state.drained {
        return BTreeSet::new();
    }
    state
        .services
        .iter()
        .filter(|(name, _)| {
            state
                .shares(name)
                .is_ok_and(|shares| shares.iter().any(|s| s.share > 0.0))
        })
        .map(|(_, s)| s.config.vip)
        .collect()
}

/// The file BIRD includes for `vips`: both static protocols, always (an empty one announces
/// nothing), so that the operator's config may name them whatever is announced.
pub fn render(vips: &BTreeSet<IpAddr>) -> String {
    let mut out = String::from(
        "# Written by lbd: the VIPs this host should receive now. Do not edit; lbd rewrites it\n\
         # and reconfigures BIRD whenever the set changes.\n",
    );
    for (proto, channel, v6) in [(PROTOCOL_V4, "ipv4", false), (PROTOCOL_V6, "ipv6", true)] {
        out.push_str(&format!("protocol static {proto} {{\n  {channel};\n"));
        for vip in vips.iter().filter(|v| v.is_ipv6() == v6) {
            let len = if v6 { 128 } else { 32 };
            out.push_str(&format!("  route {vip}/{len} blackhole;\n"));
        }
        out.push_str("}\n");
    }
    out
}

/// Writes `vips` to `routes_file` (atomically: a reader never sees half a file) and asks
/// BIRD at `socket` to reconfigure. Returns BIRD's answer.
pub fn announce(
    routes_file: &Path,
    socket: &Path,
    vips: &BTreeSet<IpAddr>,
) -> Result<String, AnnounceError> {
    let write_err = |source| AnnounceError::Write {
        path: routes_file.to_path_buf(),
        source,
    };
    // Its directory may be under /run, which a reboot empties.
    if let Some(dir) = routes_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let tmp = routes_file.with_extension("tmp");
    std::fs::write(&tmp, render(vips)).map_err(write_err)?;
    std::fs::rename(&tmp, routes_file).map_err(write_err)?;
    bird_command(socket, "configure")
}

/// Sends one command over BIRD's control socket and returns its reply's text. BIRD's replies
/// are lines `NNNN-text` (more follow) or `NNNN text` (the last), with continuation lines
/// starting with a space; codes from 8000 up are errors.
pub fn bird_command(socket: &Path, command: &str) -> Result<String, AnnounceError> {
    let io = |source| AnnounceError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(io)?;
    stream.set_read_timeout(Some(BIRD_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(BIRD_TIMEOUT)).map_err(io)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
    // The greeting ("0001 BIRD 2.0.12 ready.") first.
    read_reply(&mut reader).map_err(io)?;
    (&stream)
        .write_all(format!("{command}\n").as_bytes())
        .map_err(io)?;
    let (code, text) = read_reply(&mut reader).map_err(io)?;
    if code >= 8000 {
        return Err(AnnounceError::Refused(text));
    }
    Ok(text)
}

/// Reads one reply: its last code and its lines' text.
fn read_reply(r: &mut impl std::io::BufRead) -> std::io::Result<(u32, String)> {
    let mut text = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "BIRD closed the control connection mid-reply",
            ));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(rest) = line.strip_prefix(' ') {
            text.push(rest.to_string());
            continue;
        }
        let (num, sep, rest) = match (line.get(..4), line.get(4..5), line.get(5..)) {
            (Some(n), Some(s), rest) if n.bytes().all(|b| b.is_ascii_digit()) => {
                (n, s, rest.unwrap_or(""))
            }
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not a BIRD reply line: {line:?}"),
                ));
            }
        };
        text.push(rest.to_string());
        if sep == " " {
            return Ok((num.parse().unwrap_or(0), text.join("\n")));
        }
    }
}

/// What the announcer last did, for `show host` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    /// What BIRD has (the last set it accepted).
    pub announced: BTreeSet<IpAddr>,
    /// The last failure, while the wanted set has not reached BIRD.
    pub error: Option<String>,
    /// Announcements that failed so far.
    pub failures: u64,
}

/// Keeps BIRD's set equal to the wanted one: each new set is written and BIRD reconfigured;
/// a failure is retried every `retry` until it succeeds or the set changes again. Runs until
/// `wanted` closes. The blocking exchange runs off the runtime's threads.
pub async fn run(
    cfg: crate::config::Announce,
    mut wanted: tokio::sync::watch::Receiver<BTreeSet<IpAddr>>,
    status: tokio::sync::watch::Sender<Status>,
    retry: Duration,
) {
    loop {
        let set = wanted.borrow_and_update().clone();
        let (file, socket) = (cfg.routes_file.clone(), cfg.bird_socket.clone());
        let task_set = set.clone();
        let r = tokio::task::spawn_blocking(move || announce(&file, &socket, &task_set)).await;
        let r = r.unwrap_or_else(|e| Err(AnnounceError::Refused(format!("task: {e}"))));
        match r {
            Ok(_) => {
                tracing::info!(vips = ?set, "announced to BIRD");
                status.send_modify(|s| {
                    s.announced = set;
                    s.error = None;
                });
                if wanted.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let text = e.to_string();
                // Once per distinct failure: BIRD down for an hour is one line, not 3600.
                if status.borrow().error.as_deref() != Some(&text) {
                    tracing::error!(error = %e, vips = ?set, "announcing to BIRD failed; retrying every {retry:?}");
                }
                status.send_modify(|s| {
                    s.error = Some(text);
                    s.failures += 1;
                });
                tokio::select! {
                    r = wanted.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead as _;

    fn set(v: &[&str]) -> BTreeSet<IpAddr> {
        v.iter().map(|a| a.parse().unwrap()).collect()
    }

    const CONFIG: &str = r#"
[daemon]
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "10.0.0.1"
port = 80
snat = "10.0.1.1"
[[service.pool]]
name = "legacy"
weight = 90
backends = ["10.1.0.1:80"]
[[service.pool]]
name = "k8s"
weight = 10
backends = ["10.2.0.1:80"]
[[service]]
name = "web-tls"
vip = "10.0.0.1"
port = 443
snat = "10.0.1.1"
[[service.pool]]
name = "legacy"
weight = 100
backends = ["10.1.0.1:443"]
[[service]]
name = "web6"
vip = "fd00::1"
port = 80
snat = "fd00:1::1"
[[service.pool]]
name = "k8s"
weight = 100
backends = ["[fd00:2::1]:80"]
"#;

    #[test]
    fn a_vip_is_wanted_while_one_of_its_services_can_take_new_connections() {
        let cfg = crate::config::Config::parse(CONFIG, Path::new("t.toml")).unwrap();
        let mut st = State::from_config(&cfg).unwrap();
        assert_eq!(wanted(&st), set(&["10.0.0.1", "fd00::1"]));
        // web6's only backend fails its checks: its VIP goes; 10.0.0.1 stays while either of
        // its two services serves.
        st.backend_mut("web6", "k8s", "[fd00:2::1]:80")
            .unwrap()
            .healthy = false;
        st.backend_mut("web", "legacy", "10.1.0.1:80")
            .unwrap()
            .state = crate::state::AdminState::Maint;
        st.backend_mut("web", "k8s", "10.2.0.1:80").unwrap().weight = 0;
        assert_eq!(wanted(&st), set(&["10.0.0.1"]));
        st.set_split("web-tls", &[("legacy".into(), 0)]).unwrap();
        assert_eq!(
            wanted(&st),
            BTreeSet::new(),
            "no service at the VIP can serve"
        );
        st.set_split("web-tls", &[("legacy".into(), 100)]).unwrap();
        st.drained = true;
        assert_eq!(wanted(&st), BTreeSet::new(), "a drained host wants nothing");
    }

    #[test]
    fn the_file_holds_both_protocols_with_one_route_per_vip() {
        let f = render(&set(&["10.99.0.10", "fd00:99::10", "10.99.0.11"]));
        assert!(f.contains(
            "protocol static lbd_vips4 {\n  ipv4;\n  route 10.99.0.10/32 blackhole;\n  route 10.99.0.11/32 blackhole;\n}\n"
        ), "{f}");
        assert!(
            f.contains(
                "protocol static lbd_vips6 {\n  ipv6;\n  route fd00:99::10/128 blackhole;\n}\n"
            ),
            "{f}"
        );
        let empty = render(&BTreeSet::new());
        assert!(
            empty.contains("protocol static lbd_vips4 {\n  ipv4;\n}\n") && !empty.contains("route"),
            "{empty}"
        );
    }

    /// A stand-in for BIRD's control socket: greets, answers each command line with
    /// `reply(command)`, and records the commands with the routes file's contents then.
    fn fake_bird(
        dir: &Path,
        routes: std::path::PathBuf,
        reply: fn(&str) -> String,
    ) -> (
        std::path::PathBuf,
        std::sync::mpsc::Receiver<(String, String)>,
    ) {
        let sock = dir.join("bird.ctl");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let _ = c.write_all(b"0001 BIRD 2.0.12 ready.\n");
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    let cmd = line.trim().to_string();
                    let file = std::fs::read_to_string(&routes).unwrap_or_default();
                    let _ = c.write_all(reply(&cmd).as_bytes());
                    if tx.send((cmd, file)).is_err() {
                        return;
                    }
                    line.clear();
                }
            }
        });
        (sock, rx)
    }

    #[test]
    fn announce_writes_the_file_before_bird_reconfigures_and_reports_refusals() {
        let dir = tempfile::tempdir().unwrap();
        // In a directory that does not exist yet (/run/lbd after a reboot).
        let routes = dir.path().join("lbd/vips.conf");
        let (sock, seen) = fake_bird(dir.path(), routes.clone(), |_| {
            "0002-Reading configuration from /etc/bird/bird.conf\n0003 Reconfigured\n".into()
        });
        let reply = announce(&routes, &sock, &set(&["10.99.0.10"])).unwrap();
        assert!(reply.contains("Reconfigured"), "{reply}");
        let (cmd, file) = seen.recv().unwrap();
        assert_eq!(cmd, "configure");
        assert!(file.contains("route 10.99.0.10/32 blackhole;"), "{file}");

        let dir2 = tempfile::tempdir().unwrap();
        let routes2 = dir2.path().join("vips.conf");
        let (sock2, _seen2) = fake_bird(dir2.path(), routes2.clone(), |_| {
            "8002 /etc/bird/bird.conf:12:3 syntax error\n".into()
        });
        let e = announce(&routes2, &sock2, &set(&["10.99.0.10"])).unwrap_err();
        assert!(
            matches!(&e, AnnounceError::Refused(t) if t.contains("syntax error")),
            "{e}"
        );
        // No BIRD at all: a socket error naming the path.
        let e = announce(&routes2, &dir2.path().join("none.ctl"), &BTreeSet::new()).unwrap_err();
        assert!(e.to_string().contains("none.ctl"), "{e}");
    }

    #[tokio::test]
    async fn the_announcer_retries_until_bird_takes_the_set_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let routes = dir.path().join("vips.conf");
        let cfg = crate::config::Announce {
            bird_socket: dir.path().join("bird.ctl"),
            routes_file: routes.clone(),
        };
        let (want_tx, want_rx) = tokio::sync::watch::channel(set(&["10.99.0.10"]));
        let (status_tx, mut status_rx) = tokio::sync::watch::channel(Status::default());
        let task = tokio::spawn(run(cfg, want_rx, status_tx, Duration::from_millis(20)));
        // BIRD is not up yet: failures are counted and kept.
        status_rx.wait_for(|s| s.failures >= 2).await.unwrap();
        assert!(status_rx.borrow().announced.is_empty());
        let (_sock, seen) = fake_bird(dir.path(), routes.clone(), |_| "0003 Reconfigured\n".into());
        let s = status_rx
            .wait_for(|s| !s.announced.is_empty())
            .await
            .unwrap()
            .clone();
        assert_eq!((s.announced, s.error), (set(&["10.99.0.10"]), None));
        want_tx.send(BTreeSet::new()).unwrap();
        status_rx
            .wait_for(|s| s.announced.is_empty())
            .await
            .unwrap();
        let last = seen.try_iter().last().unwrap();
        assert!(!last.1.contains("route"), "withdrawn: {}", last.1);
        drop(want_tx);
        task.await.unwrap();
    }
}
