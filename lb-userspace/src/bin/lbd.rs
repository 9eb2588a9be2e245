//! lbd — the balancer daemon: `run`, `check`, `down` (see INTERFACE.md).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    admin,
    config::Config,
    control::{self, server},
    daemon::{self, Daemon},
    dataplane::{self, Dataplane, LoadOptions},
    health, host, listener, metrics, proxy,
    state::State,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

#[derive(Parser)]
#[command(
    name = "lbd",
    version,
    about = "Edge layer-4 load balancer daemon (XDP data plane)"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log level (overridden by RUST_LOG).
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground. On SIGTERM/SIGINT it exits leaving the data plane
    /// attached and its maps pinned, for a restarted lbd to adopt.
    Run {
        #[arg(long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
    /// Parse and validate the config, print a summary (exit 2 when invalid).
    Check {
        #[arg(long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
    /// Detach the XDP program(s) and remove this instance's pins.
    Down {
        #[arg(long, default_value = "/etc/lb/lb.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => sub.init(),
        LogFormat::Json => sub.json().init(),
    }
    let load = |path: &PathBuf| match Config::load(path) {
        Ok(c) => Ok(c),
        Err(e) => {
            eprintln!("{e}");
            Err(ExitCode::from(2))
        }
    };
    // Check and run also check the host (interfaces, local VIPs): before run touches the
    // kernel. Down must work whatever the host looks like now.
    let load_here = |path: &PathBuf| {
        let c = load(path)?;
        match c.check_host(path) {
            Ok(()) => Ok(c),
            Err(e) => {
                eprintln!("{e}");
                Err(ExitCode::from(2))
            }
        }
    };
    match cli.cmd {
        Cmd::Check { config } => match load_here(&config) {
            Ok(c) => {
                print!("{config}: ok\n{c}", config = config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Down { config } => {
            let c = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if c.daemon.forward_filter {
                if let Err(e) = host::remove_forward_filter() {
                    eprintln!("lbd down: removing the forward filter: {e:#}");
                }
            }
            match dataplane::remove_pins(&c.daemon.pin_dir) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&c.daemon.control_socket);
                    eprintln!(
                        "detached and removed pins under {}",
                        c.daemon.pin_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lbd down: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run { config } => {
            let c = match load_here(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // Before any thread exists: it reads and clears the environment.
            let inherited = lb_userspace::listener::inherited_listeners();
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("lbd: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(c, config, inherited)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(
    cfg: Config,
    path: PathBuf,
    inherited: std::collections::HashMap<std::net::SocketAddr, std::net::TcpListener>,
) -> Result<()> {
    let d = &cfg.daemon;
    let nofile = listener::raise_nofile();
    let l = &d.limits;
    let request_services = cfg
        .services
        .iter()
        .filter(|s| s.mode == lb_userspace::config::Mode::Request)
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
    host::reserve_snat_ports(d.snat_ports)?;
    let mut opts = LoadOptions {
        pin_dir: Some(d.pin_dir.clone()),
        conntrack_max: d.conntrack_max,
        ..LoadOptions::default()
    };
    opts.tunables.snat_port_min = d.snat_ports.0;
    opts.tunables.snat_port_max = d.snat_ports.1;
    let dp = Dataplane::load(&opts)?;
    // A restart: keep the backend ids and table slots the pinned maps already use.
    let keep = daemon::keep_from_dataplane(&dp)?;
    let state = State::from_config_keeping(&cfg, &keep)?;
    // Tables first, then attach: the first packet already finds a complete configuration.
    let mut daemon = Daemon::new(state, Box::new(dp));
    daemon.sync_all().context("writing the data plane")?;
    // Request-mode listeners before XDP attaches: a VIP that cannot be served stops lbd
    // before it changes anything on the interfaces.
    let mut proxies = proxy::Proxies::new(l.clone(), budget.request, listeners.clone(), inherited);
    if let Some(e) = proxies.reconcile(&daemon).into_iter().next() {
        return Err(e);
    }
    // The filter before forwarding is turned on: no moment routes what is not ours.
    if d.forward_filter {
        host::forward_filter(&d.interfaces, &balancer_sources(&cfg))?;
    } else {
        tracing::warn!(
            "forward_filter = false: the host forwards whatever arrives on the balancer's interfaces, by its own rules"
        );
    }
    for iface in &d.interfaces {
        host::prepare_interface(iface)?;
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
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tracing::info!("lbd running");
    let mut running = cfg.clone();
    let result = loop {
        tokio::select! {
            Some(req) = rx.recv() => {
                let (reply, command, ok) = control::handle_line(&mut daemon, &req.line);
                // Escaped: a CR or a newline in a command must not forge log lines.
                tracing::info!(command, ok, line = %req.line.escape_debug(), "control command");
                let _ = req.reply.send(reply);
                // `set state … maint` stops a backend's checks; `ready` restarts them.
                checker.reconcile(&daemon.state);
            }
            Some(ev) = health_rx.recv() => {
                if let health::Event::Checked { key, took, ok } = &ev {
                    daemon.metrics.health_check(
                        metrics::backend_labels(&key.service, &key.pool, &key.backend),
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
            _ = hup.recv() => {
                reload(&mut daemon, &mut running, &path);
                checker.reconcile(&daemon.state);
                for e in proxies.reconcile(&daemon) {
                    tracing::error!(error = format!("{e:#}"), "reload: a request-mode service cannot be served");
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: draining request-mode connections, then exiting; the data plane stays attached"); break Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: draining request-mode connections, then exiting; the data plane stays attached"); break Ok(()) }
            r = &mut server => break r.context("control server").and_then(|r| r),
            r = &mut admin_server => break r.context("metrics endpoint").and_then(|r| r),
        }
    };
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

/// Sources of what the data plane hands the kernel to forward: the SNAT addresses (towards
/// backends) and the VIPs (towards clients) of the connection-mode services.
fn balancer_sources(cfg: &Config) -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = cfg
        .services
        .iter()
        .filter(|s| s.mode == lb_userspace::config::Mode::Connection)
        .flat_map(|s| s.snat.into_iter().chain([s.vip]))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// SIGHUP: re-read the config file; apply it whole or keep the running one.
fn reload(daemon: &mut Daemon, running: &mut Config, path: &Path) {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: invalid config; the running config stays in force");
            daemon
                .metrics
                .reloads
                .get_or_create(&vec![("result", "error".to_string())])
                .inc();
            return;
        }
    };
    if running.daemon != cfg.daemon {
        tracing::warn!("reload: [daemon] settings changed; they take effect on the next restart");
    }
    match daemon.reload(&cfg) {
        Ok(()) => {
            if cfg.daemon.forward_filter {
                if let Err(e) =
                    host::forward_filter(&cfg.daemon.interfaces, &balancer_sources(&cfg))
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
