//! The process around the server: logging, signals, config reload, systemd
//! notifications and the graceful-stop deadline. `satchel serve` is this module.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::config::{Config, ConfigError, ConfigSource};
use crate::server::{Server, ServerError, Shared};
use crate::systemd;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// `satchel serve`: loads the config, builds the runtime it asks for
/// (`server.worker_threads`) and runs [`serve`] on it.
pub fn run(source: ConfigSource) -> Result<(), DaemonError> {
    let config = source.load()?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        builder.worker_threads(config.server.worker_threads as usize);
    }
    let runtime = builder
        .thread_name("satchel")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(serve(config, source))
}

/// Changes the log filter of the running process (SIGHUP).
type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the global tracing subscriber; returns a handle to change its level.
fn init_logging(level: &str) -> SetLogLevel {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // systemd's journal stamps every line itself.
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    if under_systemd {
        let _ = registry.with(fmt.without_time()).try_init();
    } else {
        let _ = registry.with(fmt).try_init();
    }
    Box::new(move |level| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// Runs the daemon until SIGTERM/SIGINT and a graceful drain. Returns when it is
/// time to exit 0; a second stop signal exits the process at once with status 1.
pub async fn serve(config: Config, source: ConfigSource) -> Result<(), DaemonError> {
    let set_log_level = init_logging(&config.log.level);
    raise_fd_limit(config.server.max_connections);
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(DaemonError::Signals)?;

    let server = Server::bind(config).await?;
    let shared = server.shared();
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(server.run(shutdown.clone(), tasks.clone()));
    tasks.spawn(status_updates(shared.clone(), shutdown.child_token()));
    if let Some(interval) = systemd::watchdog_interval() {
        tracing::info!(?interval, "systemd watchdog enabled");
        tasks.spawn(systemd::run_watchdog(interval, shutdown.child_token()));
    }
    systemd::ready();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "satchel is ready");

    while let Some(signal) = signals.next().await {
        match signal {
            SIGHUP => reload(&source, &shared, &set_log_level),
            _ => break,
        }
    }
    let timeout = shared.config.load().server.shutdown_timeout();
    tracing::info!(
        ?timeout,
        "stopping: no new connections; answering what was already read"
    );
    systemd::stopping();
    shutdown.cancel();
    tasks.close();
    tokio::select! {
        _ = tasks.wait() => tracing::info!("stopped cleanly"),
        _ = tokio::time::sleep(timeout) => {
            tracing::warn!(?timeout, "shutdown timeout reached; exiting with work unfinished");
        }
        _ = signals.next() => {
            tracing::warn!("second stop signal: exiting at once");
            std::process::exit(1);
        }
    }
    Ok(())
}

/// systemd starts services with a soft limit of 1024 open files, below what
/// `max_connections` (plus Redis and SMTP connections) needs: raise the soft limit to
/// the hard one.
fn raise_fd_limit(max_connections: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        tracing::warn!(soft, hard, "cannot raise the open-file limit");
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(soft);
    if limit < max_connections + 64 {
        tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below max_connections + 64; raise LimitNOFILE="
        );
    }
}

/// SIGHUP: re-read the config; apply what can change live (log level, limits,
/// allow lists, timeouts); warn about what needs a restart.
fn reload(source: &ConfigSource, shared: &Arc<Shared>, set_log_level: &SetLogLevel) {
    systemd::reloading();
    match source.load() {
        Ok(new) => {
            let old = shared.config.load();
            if new.server.socket != old.server.socket
                || new.server.worker_threads != old.server.worker_threads
                || new.redis != old.redis
            {
                tracing::warn!(
                    "server.socket, server.worker_threads and [redis] changes take effect after a restart"
                );
            }
            if new.mail != old.mail {
                tracing::warn!(
                    "[mail] transport, concurrency and retry settings take effect after a restart; \
                     from, max_message_bytes, the retention times and the dkim keys apply now"
                );
            }
            if let Err(e) = set_log_level(&new.log.level) {
                tracing::warn!(error = %e, "cannot change the log level");
            }
            shared.config.store(Arc::new(new));
            tracing::info!("configuration reloaded");
        }
        Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
    }
    systemd::ready();
}

/// Keeps `systemctl status` showing a one-line summary.
async fn status_updates(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut last = String::new();
    loop {
        let mut line = format!(
            "{} connections, {} requests, redis {}",
            shared.stats.connections.get(),
            shared.stats.requests.get(),
            if shared.backend.is_up() { "up" } else { "DOWN" },
        );
        for part in shared.services().iter().filter_map(|s| s.status_line()) {
            line.push_str(", ");
            line.push_str(&part);
        }
        if line != last {
            systemd::status(&line);
            last = line;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
