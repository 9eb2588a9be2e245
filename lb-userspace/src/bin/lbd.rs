//! lbd — the balancer daemon: `run`, `check`, `down` (see INTERFACE.md).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    config::Config,
    dataplane::{self, Dataplane, LoadOptions},
    host,
    server::{self, Signal},
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
        /// Ignore the state file: weights and states from the config only (the file is
        /// overwritten with them).
        #[arg(long)]
        fresh: bool,
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
            if let Some(a) = &c.daemon.announce {
                let none = std::collections::BTreeSet::new();
                match lb_userspace::announce::announce(&a.routes_file, &a.bird_socket, &none) {
                    Ok(_) => eprintln!("withdrew the VIPs (BIRD reconfigured)"),
                    Err(e) => eprintln!("lbd down: withdrawing the VIPs: {e}"),
                }
            }
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
        Cmd::Run { config, fresh } => {
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
            match rt.block_on(run(c, config, inherited, fresh)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Loads the data plane (adopting pinned maps) and runs the daemon's loop, with SIGHUP as
/// reload and SIGTERM/SIGINT as stop.
async fn run(
    cfg: Config,
    path: PathBuf,
    inherited: std::collections::HashMap<std::net::SocketAddr, std::net::TcpListener>,
    fresh: bool,
) -> Result<()> {
    let d = &cfg.daemon;
    let mut opts = LoadOptions {
        pin_dir: Some(d.pin_dir.clone()),
        conntrack_max: d.conntrack_max,
        ..LoadOptions::default()
    };
    opts.tunables.snat_port_min = d.snat_ports.0;
    opts.tunables.snat_port_max = d.snat_ports.1;
    opts.tunables.tcp_established_timeout_ns = d.tcp_established_timeout.as_nanos() as u64;
    opts.tunables.tcp_transient_timeout_ns = d.tcp_closing_timeout.as_nanos() as u64;
    opts.tunables.tcp_syn_timeout_ns = d.tcp_syn_timeout.as_nanos() as u64;
    opts.tunables.tcp_syn_reclaim_ns = d.tcp_syn_reclaim.as_nanos() as u64;
    opts.tunables.udp_timeout_ns = d.udp_timeout.as_nanos() as u64;
    let mut dp = Dataplane::load(&opts)?;
    dp.start_flow_collector()?;
    let (tx, rx) = mpsc::channel(4);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                _ = hup.recv() => Signal::Reload,
                _ = term.recv() => { tracing::info!("SIGTERM"); Signal::Stop }
                _ = int.recv() => { tracing::info!("SIGINT"); Signal::Stop }
            };
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    server::run(
        cfg,
        path,
        Box::new(dp),
        &mut host::RealHost,
        inherited,
        rx,
        fresh,
    )
    .await
}
