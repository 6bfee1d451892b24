//! Library side of `ternd` and `tern`: the daemon's `run(config, shutdown)`, its repository,
//! HTTP API and metrics, and the pieces the CLI shares.

pub mod config;
pub mod fleet;
pub mod http;
pub mod loadgen;
pub mod metrics;
pub mod repository;
pub mod stats;
pub mod stream;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Turns off backtraces of library errors unless `RUST_LIB_BACKTRACE` says otherwise. tract
/// uses `anyhow` errors as control flow while it prepares a model; with `RUST_BACKTRACE=1` in
/// the environment each one captured a backtrace, 7 ms of MobileNetV3's 55 ms cold start
/// (BENCHMARKS.md). Panics keep their backtraces: those follow `RUST_BACKTRACE` alone.
///
/// Call it first in `main`, before any thread starts: it sets an environment variable.
pub fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("repository `{0}` is not a directory")]
    NoRepository(String),
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("fleet: {0}")]
    Fleet(#[from] fleet::FleetError),
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
}

/// Serves the repository on `listener` until `shutdown` resolves, then stops accepting,
/// finishes in-flight requests and returns.
///
/// The API answers at once (live); models load in the background and the server reports
/// ready when they have.
pub async fn run(
    config: config::Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    if !config.repository.is_dir() {
        return Err(DaemonError::NoRepository(
            config.repository.display().to_string(),
        ));
    }
    let repo = Arc::new(repository::Repository::new(
        config.repository.clone(),
        config.model_defaults.clone(),
        config.memory_budget_bytes,
    ));
    let state = Arc::new(http::AppState {
        metrics: Arc::new(metrics::Metrics::new(repo.clone())),
        repo: repo.clone(),
        config: Arc::new(config),
        ready: AtomicBool::new(false),
        requests: Default::default(),
    });
    if let Some(ms) = state.config.poll_interval_ms {
        let poller = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(ms.max(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !poller.ready.load(Ordering::Acquire) {
                    continue;
                }
                let repo = poller.repo.clone();
                let _ = tokio::task::spawn_blocking(move || repo.poll()).await;
            }
        });
    }
    if let Some(fleet) = state.config.fleet.clone() {
        // Configuration errors surface here, before the server starts.
        fleet::start(fleet, state.clone())?;
    }
    stream::start(&state.config.streams.clone(), state.clone())?;
    let loader = state.clone();
    tokio::task::spawn_blocking(move || {
        let results = loader.repo.load_all();
        let ok = results.iter().filter(|(_, r)| r.is_ok()).count();
        log::info!("repository loaded: {ok} of {} models ready", results.len());
        loader.ready.store(true, Ordering::Release);
    });
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(DaemonError::Serve)
}
