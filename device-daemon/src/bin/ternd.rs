//! `ternd`: the Tern device daemon.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tern_daemon::config::Config;

#[derive(Parser)]
#[command(
    name = "ternd",
    version,
    about = "Tern device daemon: serves a model repository over the KServe v2 API"
)]
struct Cli {
    /// TOML configuration file (defaults: `ternd print-config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model repository directory.
    #[arg(long)]
    repository: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Require `Authorization: Bearer TOKEN` on every request but health checks.
    #[arg(long, env = "TERND_BEARER_TOKEN")]
    bearer_token: Option<String>,
    /// Largest request body accepted, in bytes (larger requests get 413).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Longest wait (ms) for a request body to arrive in full (longer requests get 408).
    #[arg(long)]
    body_timeout_ms: Option<u64>,
    /// Estimated bytes all loaded models may hold; past it the least recently used idle model
    /// is evicted and reloads on demand.
    #[arg(long)]
    memory_budget: Option<u64>,
    /// Rescan the repository this often (ms) and hot-swap new versions in.
    #[arg(long)]
    poll_interval_ms: Option<u64>,
    /// Join a fleet through this MQTT broker (mqtt://HOST:PORT): signed model updates,
    /// reports, telemetry and inference over MQTT.
    #[arg(long)]
    mqtt: Option<String>,
    /// Fleet name (a topic level under tern/v1/).
    #[arg(long)]
    fleet: Option<String>,
    /// This device's id within the fleet.
    #[arg(long, env = "TERND_DEVICE_ID")]
    device_id: Option<String>,
    /// Public key (from `tern keygen`) whose signatures this device accepts; repeatable.
    #[arg(long = "trust-key")]
    trust_keys: Vec<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the effective configuration as TOML.
    PrintConfig,
}

fn main() -> Result<()> {
    // Before the runtime's threads start.
    tern_daemon::quiet_library_backtraces();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(r) = cli.repository {
        config.repository = r;
    }
    if let Some(l) = cli.listen {
        config.listen = l;
    }
    if cli.memory_budget.is_some() {
        config.memory_budget_bytes = cli.memory_budget;
    }
    if cli.poll_interval_ms.is_some() {
        config.poll_interval_ms = cli.poll_interval_ms;
    }
    if let Some(n) = cli.max_body_bytes {
        config.max_body_bytes = n;
    }
    if let Some(ms) = cli.body_timeout_ms {
        config.body_timeout_ms = ms;
    }
    if cli.bearer_token.is_some() {
        config.bearer_token = cli.bearer_token;
    }
    if cli.mqtt.is_some() || cli.fleet.is_some() || cli.device_id.is_some() {
        let fleet = config.fleet.get_or_insert_with(Default::default);
        if let Some(m) = cli.mqtt {
            fleet.mqtt = m;
        }
        if let Some(f) = cli.fleet {
            fleet.fleet = f;
        }
        if let Some(d) = cli.device_id {
            fleet.device_id = d;
        }
    }
    if !cli.trust_keys.is_empty() {
        config.fleet.get_or_insert_with(Default::default).trust_keys = cli.trust_keys;
    }
    if let Some(Command::PrintConfig) = cli.command {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    // Scripts and tests read this line to find a port chosen with port 0.
    println!("ternd listening on http://{addr}");
    std::io::stdout().flush()?;
    tern_daemon::run(config, listener, shutdown_signal()).await?;
    log::info!("ternd stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    log::info!("shutting down: draining in-flight requests");
}
