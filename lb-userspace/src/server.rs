//! lbd's run loop: one owner task that applies control commands,
//! health transitions, scrapes and reloads in turn. `bin/lbd.rs` only parses arguments,
//! sets up logging, loads the data plane and turns signals into [`Signal`]s; tests drive
//! the same loop in process with a fake kernel and host.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;

use crate::{
    admin,
    config::Config,
    control::server,
    daemon::{Daemon, keep_from_dataplane},
    dataplane::Kernel,
    health,
    host::Host,
    listener, proxy,
    state::State,
};

/// What the owner loop is told from outside (lbd maps SIGHUP and SIGTERM/SIGINT to these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Re-read the config file and apply it whole, or keep the running one.
    Reload,
    /// Drain request mode and return; the data plane stays attached.
    Stop,
}

/// Runs lbd until `signals` says stop (or closes): the data plane (`kernel`, already
/// loaded) gets its tables and is attached, then health checks, the metrics endpoint, the
/// control socket and the request-mode proxies run, every change going through one owner
/// loop. `inherited` are listening sockets passed in by a supervisor. On stop, request mode
/// drains; the data plane stays attached. Runtime values come from the state file unless
/// `fresh`.
pub async fn run(
    cfg: Config,
    path: PathBuf,
    kernel: Box<dyn Kernel>,
    host: &mut dyn Host,
    inherited: HashMap<SocketAddr, std::net::TcpListener>,
    mut signals: mpsc::Receiver<Signal>,
    fresh: bool,
) -> Result<()> {
    let d = &cfg.daemon;
    let nofile = listener::raise_nofile();
    let l = &d.limits;
    let request_services = cfg
        .services
        .iter()
        .filter(|s| s.mode == crate::config::Mode::Request)
        .count();
    let budget = listener::budget(
        nofile,
        l.fd_reserve,
        (
            l.control_connections,
            l.metrics_connections,
            l.request_connections,
        ),
        request_services,
    );
    if budget.request < l.request_connections && request_services > 0 {
        tracing::warn!(
            nofile,
            configured = l.request_connections,
            using = budget.request,
            "request-mode connection cap lowered to fit the descriptor limit (raise LimitNOFILE)"
        );
    }
    let listeners = listener::Listeners::default();
    host.reserve_snat_ports(d.snat_ports)?;
    // A restart: keep the backend ids and table slots the pinned maps already use.
    let keep = keep_from_dataplane(kernel.as_ref())?;
    let mut state = State::from_config_keeping(&cfg, &keep)?;
    let store = d.state_file.as_ref().map(|p| restore(p, &mut state, fresh));
    // Tables first, then attach: the first packet already finds a complete configuration.
    let mut daemon = Daemon::new(state, kernel);
    daemon.store = store;
    // What the file holds from now on is this state (restored values, dropped leftovers).
    if let Err(e) = daemon.persist() {
        tracing::error!(error = %e, "runtime changes will be refused until the state file can be written");
    }
    daemon.sync_all().context("writing the data plane")?;
    // Request-mode listeners before XDP attaches: a VIP that cannot be served stops lbd
    // before it changes anything on the interfaces.
    let mut proxies = proxy::Proxies::new(l.clone(), budget.request, listeners.clone(), inherited);
    if let Some(e) = proxies
        .reconcile(daemon.request_services(), &daemon.metrics.requests)
        .into_iter()
        .next()
    {
        return Err(e);
    }
    // The filter before forwarding is turned on: no moment routes what is not ours.
    if d.forward_filter {
        host.forward_filter(&d.interfaces, &balancer_sources(&cfg))?;
    } else {
        tracing::warn!(
            "forward_filter = false: the host forwards whatever arrives on the balancer's interfaces, by its own rules"
        );
    }
    if balances_ipv6(&cfg) {
        host.prepare_ipv6()?;
    }
    for iface in &d.interfaces {
        host.prepare_interface(iface)?;
        daemon.kernel.attach(iface, d.xdp_mode)?;
    }

    let (health_tx, mut health_rx) = mpsc::channel::<health::Event>(1024);
    let mut checker = health::Checker::new(health_tx);
    checker.reconcile(&daemon.state);
    tracing::info!(backends = checker.len(), "health checks started");
    // Ready once every checked backend has been checked once (the data plane is attached).
    let mut unchecked: std::collections::HashSet<health::BackendKey> =
        checker.checked().cloned().collect();
    let ready = Arc::new(AtomicBool::new(unchecked.is_empty()));
    let (scrape_tx, mut scrape_rx) = mpsc::channel::<admin::Scrape>(16);
    let mut admin_server = tokio::spawn(admin::serve(
        d.metrics,
        scrape_tx,
        admin::Readiness {
            checked: ready.clone(),
            listeners: listeners.clone(),
        },
        listener::Cap::new("metrics", budget.metrics, &listeners),
        l.metrics_timeout,
    ));

    let (tx, mut rx) = mpsc::channel::<server::Request>(64);
    let socket = d.control_socket.clone();
    let control_cap = listener::Cap::new("control", budget.control, &listeners);
    let control_idle = l.control_idle_timeout;
    let mut server =
        tokio::spawn(async move { server::serve(&socket, tx, control_cap, control_idle).await });
    daemon.listeners = listeners.clone();
    // Routes towards this host: announced once it can serve (every backend checked once),
    // from then on as the state changes.
    let mut announcer = None;
    if let Some(a) = &d.announce {
        let (wanted_tx, wanted_rx) = tokio::sync::watch::channel(Default::default());
        let (status_tx, status_rx) = tokio::sync::watch::channel(Default::default());
        announcer = Some(tokio::spawn(crate::announce::run(
            a.clone(),
            wanted_rx,
            status_tx,
            ANNOUNCE_RETRY,
        )));
        daemon.announcer = Some(crate::daemon::Announcer {
            wanted: wanted_tx,
            status: status_rx,
        });
    }
    tracing::info!("lbd running");
    let mut running = cfg.clone();
    // Replies to commands whose table is not live yet (see the timer branch below).
    let mut held: Vec<(tokio::sync::oneshot::Sender<String>, String)> = Vec::new();
    let mut passive = crate::passive::Passive::default();
    let mut passive_tick = tokio::time::interval(crate::passive::INTERVAL);
    passive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        let next_publish = daemon.next_publish();
        let next_judgement = daemon.next_judgement();
        tokio::select! {
            Some(req) = rx.recv() => {
                let (reply, command, ok) = crate::control::handle_line(&mut daemon, &req.line);
                // Escaped: a CR or a newline in a command must not forge log lines.
                tracing::info!(command, ok, line = %req.line.escape_debug(), "control command");
                // A reply means the kernel has the change: while a table waits for its
                // grace, replies wait with it (that client's next line too; nothing else).
                if daemon.next_publish().is_some() {
                    held.push((req.reply, reply));
                } else {
                    let _ = req.reply.send(reply);
                }
                // `set state … maint` stops a backend's checks; `ready` restarts them.
                checker.reconcile(&daemon.state);
            }
            Some(ev) = health_rx.recv() => {
                if let health::Event::Checked { key, took, ok } = &ev {
                    daemon.metrics.health_check(
                        crate::metrics::backend_labels(&key.service, &key.pool, &key.backend),
                        *took,
                        *ok,
                    );
                    if unchecked.remove(key) && unchecked.is_empty() {
                        ready.store(true, Ordering::Relaxed);
                        tracing::info!("ready: every backend checked once");
                    }
                }
                daemon.apply_health(&checker, ev);
            }
            Some(s) = scrape_rx.recv() => { let _ = s.reply.send(daemon.scrape()); }
            // A rollout's observation window has ended: judge it.
            _ = async {
                match next_judgement {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                daemon.judge_due();
                if daemon.next_publish().is_none() {
                    for (tx, reply) in held.drain(..) {
                        let _ = tx.send(reply);
                    }
                }
            }
            _ = passive_tick.tick() => {
                for key in daemon.observe_passive(&mut passive) {
                    checker.restart(&key, &daemon.state);
                }
            }
            // A table that had to wait for its other half's grace (back-to-back changes).
            _ = async {
                match next_publish {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                daemon.publish_due();
                if daemon.next_publish().is_none() {
                    for (tx, reply) in held.drain(..) {
                        let _ = tx.send(reply);
                    }
                }
            }
            signal = signals.recv() => match signal {
                Some(Signal::Reload) => {
                    reload(&mut daemon, &mut running, &path, host);
                    checker.reconcile(&daemon.state);
                    for e in proxies.reconcile(daemon.request_services(), &daemon.metrics.requests) {
                        tracing::error!(error = format!("{e:#}"), "reload: a request-mode service cannot be served");
                    }
                }
                Some(Signal::Stop) | None => {
                    tracing::info!("stopping: draining request-mode connections, then exiting; the data plane stays attached");
                    break Ok(());
                }
            },
            r = &mut server => break r.context("control server").and_then(|r| r),
            r = &mut admin_server => break r.context("metrics endpoint").and_then(|r| r),
        }
        // A backend no longer checked (put in maint, removed by a reload) before its first
        // check is not waited for.
        if !unchecked.is_empty() {
            let checked: std::collections::HashSet<&health::BackendKey> =
                checker.checked().collect();
            unchecked.retain(|k| checked.contains(k));
            if unchecked.is_empty() {
                ready.store(true, Ordering::Relaxed);
                tracing::info!("ready: every backend checked once");
            }
        }
        if ready.load(Ordering::Relaxed) {
            daemon.update_announce();
        }
    };
    if let (Some(task), Some(a)) = (announcer, daemon.announcer.take()) {
        withdraw(task, a).await;
    }
    let _ = std::fs::remove_file(&d.control_socket);
    // Off the runtime's threads: the proxies drain on their own.
    let started = std::time::Instant::now();
    tokio::task::block_in_place(|| proxies.drain());
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        "request-mode proxies drained"
    );
    result
}

/// How soon a failed announcement is tried again.
const ANNOUNCE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A stopping lbd withdraws its VIPs (through the announcer, after anything it is doing) and
/// waits a few seconds for BIRD to take it; the data plane stays attached, so flows that
/// still arrive before the routers converge are served.
async fn withdraw(task: tokio::task::JoinHandle<()>, a: crate::daemon::Announcer) {
    let _ = a.wanted.send(Default::default());
    let mut status = a.status;
    let done = tokio::time::timeout(
        std::time::Duration::from_secs(6),
        status.wait_for(|s| s.announced.is_empty() && s.error.is_none()),
    )
    .await;
    match done {
        Ok(Ok(_)) => tracing::info!("VIPs withdrawn"),
        _ => tracing::error!("stopping without having withdrawn the VIPs from BIRD"),
    }
    drop(a.wanted);
    task.abort();
}

/// Opens the state file and applies what it holds to `state` (unless `fresh`). A missing,
/// unreadable or corrupt file is logged and lbd starts from the config; a corrupt one is set
/// aside so that the next write does not destroy it.
fn restore(path: &Path, state: &mut State, fresh: bool) -> crate::persist::Store {
    let mut store = crate::persist::Store::new(path);
    if fresh {
        tracing::warn!(state_file = %path.display(), "--fresh: starting from the config; the state file will be overwritten");
        return store;
    }
    match store.load() {
        Ok(None) => {
            tracing::info!(state_file = %path.display(), "no state file yet: starting from the config")
        }
        Ok(Some(saved)) => {
            let r = saved.restore_into(state);
            for what in &r.dropped {
                tracing::warn!(state_file = %path.display(), dropped = %what, "state file entry not restored");
            }
            tracing::info!(state_file = %path.display(), restored = r.applied, dropped = r.dropped.len(), "runtime state restored");
        }
        Err(e @ crate::persist::LoadError::Read { .. }) => {
            tracing::error!(error = %e, "state file unreadable: starting from the config")
        }
        Err(e) => {
            let aside = store.set_aside();
            tracing::error!(error = %e, set_aside = ?aside, "state file unusable: starting from the config");
        }
    }
    store
}

/// Sources of what the data plane hands the kernel to forward: the SNAT addresses (towards
/// backends) and the VIPs (towards clients) of the connection-mode services.
/// Whether a connection-mode service has an IPv6 VIP (the host must forward IPv6).
fn balances_ipv6(cfg: &Config) -> bool {
    cfg.services
        .iter()
        .any(|s| s.mode == crate::config::Mode::Connection && s.vip.is_ipv6())
}

fn balancer_sources(cfg: &Config) -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = cfg
        .services
        .iter()
        .filter(|s| s.mode == crate::config::Mode::Connection)
        .flat_map(|s| s.snat.into_iter().chain([s.vip]))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// SIGHUP: re-read the config file; apply it whole or keep the running one.
fn reload(daemon: &mut Daemon, running: &mut Config, path: &Path, host: &mut dyn Host) {
    let refused = |daemon: &mut Daemon| {
        daemon
            .metrics
            .reloads
            .get_or_create(&vec![("result", "error".to_string())])
            .inc();
    };
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: invalid config; the running config stays in force");
            refused(daemon);
            return;
        }
    };
    if running.daemon != cfg.daemon {
        tracing::warn!("reload: [daemon] settings changed; they take effect on the next restart");
    }
    // Before the new services' tables are live: their first packets need IPv6 forwarding.
    if balances_ipv6(&cfg) {
        if let Err(e) = host.prepare_ipv6() {
            tracing::error!(
                error = format!("{e:#}"),
                "reload refused: IPv6 forwarding is needed and could not be turned on"
            );
            refused(daemon);
            return;
        }
    }
    match daemon.reload(&cfg) {
        Ok(()) => {
            if cfg.daemon.forward_filter {
                if let Err(e) = host.forward_filter(&cfg.daemon.interfaces, &balancer_sources(&cfg))
                {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "reload: could not update the forward filter"
                    );
                }
            }
            tracing::info!(config = %path.display(), services = daemon.state.services.len(), "reloaded");
            *running = cfg;
            daemon
                .metrics
                .reloads
                .get_or_create(&vec![("result", "ok".to_string())])
                .inc();
        }
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "reload failed; the running config stays in force"
        ),
    }
}
