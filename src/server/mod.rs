//! The accept loop and the state every connection shares.
//!
//! [`Server::bind`] takes the listening socket (from systemd socket activation, or by
//! binding `server.socket`), [`Server::run`] accepts until the shutdown token fires and
//! then waits, up to `server.shutdown_timeout_ms`, for every connection to answer what
//! it has already read.

mod connection;
mod dispatch;
mod socket;

pub use dispatch::samples;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{Backend, BackendError};
use crate::cache::CacheService;
use crate::config::Config;
use crate::mail::MailService;
use crate::peer::Peer;
use crate::protocol::{ErrorCode, OpError};
use crate::service::Service;
use crate::stats::{ServerStats, Timings};

/// State shared by all connections.
pub struct Shared {
    /// The live configuration; SIGHUP swaps it.
    pub config: Arc<ArcSwap<Config>>,
    pub backend: Arc<Backend>,
    pub stats: ServerStats,
    /// Latency histograms for the metrics endpoint.
    pub timings: Timings,
    /// Where clients connect (for the metrics endpoint's `/healthz`).
    pub socket_path: Option<PathBuf>,
    services: Vec<Arc<dyn Service>>,
    /// op name → index into `services`.
    routes: HashMap<&'static str, usize>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("backend", &self.backend)
            .field("ops", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Tells every service that a connection closed.
    pub(crate) fn disconnected(&self, session: u64) {
        for service in &self.services {
            service.disconnected(session);
        }
    }

    /// The service that answers `op`, if any.
    pub fn service_for(&self, op: &str) -> Option<&Arc<dyn Service>> {
        self.routes.get(op).map(|&i| &self.services[i])
    }

    pub fn services(&self) -> &[Arc<dyn Service>] {
        &self.services
    }

    /// Every op this server answers, as `hello` reports them.
    pub fn ops(&self) -> Vec<&'static str> {
        let mut ops = dispatch::CORE_OPS.to_vec();
        for s in &self.services {
            ops.extend_from_slice(s.ops());
        }
        ops
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {path}: {message}")]
    Socket { path: PathBuf, message: String },
    #[error("socket activation: {0}")]
    Activation(std::io::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot start a service: {0}")]
    Service(String),
    #[error("metrics.listen {addr}: {message}")]
    Metrics { addr: String, message: String },
}

/// A bound server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    /// The path we bound and must remove on exit (None under socket activation).
    owned_path: Option<(PathBuf, u64)>,
    /// The metrics endpoint's listener, when `metrics.listen` is set.
    metrics: Option<tokio::net::TcpListener>,
    /// The services by type, for an embedding app's in-process calls ([`crate::embed`]);
    /// the server itself knows them only as [`Service`]s.
    cache: Arc<CacheService>,
    mail: Arc<MailService>,
    shared: Arc<Shared>,
}

impl Server {
    /// Takes the socket systemd passed (LISTEN_FDS) or binds `server.socket`, and
    /// makes one attempt to reach Redis (the daemon starts either way).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let backend = Backend::new(&config.redis)?;
        let (listener, owned_path) =
            match crate::systemd::activated_listener().map_err(ServerError::Activation)? {
                Some(std_listener) => {
                    tracing::info!("using the socket passed by systemd (socket activation)");
                    (
                        UnixListener::from_std(std_listener).map_err(ServerError::Activation)?,
                        None,
                    )
                }
                None => {
                    let listener = socket::bind(&config.server)?;
                    let path = config.server.socket.clone();
                    let ino = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
                    tracing::info!(socket = %path.display(), "listening");
                    (listener, Some((path, ino)))
                }
            };
        let connect = tokio::time::timeout(config.redis.connect_timeout(), backend.probe());
        let _ = connect.await;
        let cache = CacheService::new(backend.clone(), &config.cache);
        let config = Arc::new(ArcSwap::from_pointee(config));
        let mail =
            MailService::new(backend.clone(), config.clone()).map_err(ServerError::Service)?;
        let services: Vec<Arc<dyn Service>> = vec![cache.clone(), mail.clone()];
        let mut routes = HashMap::new();
        for (i, service) in services.iter().enumerate() {
            for op in service.ops() {
                if routes.insert(*op, i).is_some() || dispatch::CORE_OPS.contains(op) {
                    return Err(ServerError::Service(format!("op {op} is claimed twice")));
                }
            }
        }
        let mut ops = dispatch::CORE_OPS.to_vec();
        ops.extend(routes.keys().copied());
        let timings = Timings::new(&ops, backend.rtt.clone());
        let socket_path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(PathBuf::from));
        let metrics = match config.load().metrics.addr() {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        tokio::net::TcpListener::from_std(l)
                    })
                    .map_err(|e| ServerError::Metrics {
                        addr: addr.to_string(),
                        message: e.to_string(),
                    })?,
            ),
            None => None,
        };
        Ok(Server {
            listener,
            owned_path,
            metrics,
            cache,
            mail,
            shared: Arc::new(Shared {
                config,
                backend,
                stats: ServerStats::default(),
                timings,
                socket_path,
                services,
                routes,
            }),
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub fn cache_service(&self) -> Arc<CacheService> {
        self.cache.clone()
    }

    pub fn mail_service(&self) -> Arc<MailService> {
        self.mail.clone()
    }

    /// Accepts connections until `shutdown` is cancelled, then drains. Every task is
    /// spawned on `tasks`; the caller waits for them with its own deadline.
    pub async fn run(mut self, shutdown: CancellationToken, tasks: TaskTracker) {
        tasks.spawn(
            self.shared
                .backend
                .clone()
                .run_health(shutdown.child_token()),
        );
        for service in &self.shared.services {
            service.clone().start(&tasks, &shutdown);
        }
        if let Some(listener) = self.metrics.take() {
            tasks.spawn(crate::metrics::serve(
                listener,
                self.shared.clone(),
                shutdown.child_token(),
                tasks.clone(),
            ));
        }
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => self.admit(stream, &shutdown, &tasks),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(self.listener);
        if let Some((path, ino)) = &self.owned_path {
            socket::remove_if_ours(path, *ino);
        }
    }

    fn admit(&self, stream: UnixStream, shutdown: &CancellationToken, tasks: &TaskTracker) {
        let shared = self.shared.clone();
        let cfg = shared.config.load();
        let peer = Peer::of(&stream);
        if let Some(err) = peer.refusal(&cfg.server) {
            shared.stats.connections_refused.inc();
            tasks.spawn(connection::refuse(stream, err));
            return;
        }
        let open = shared.stats.connections.get();
        if open >= cfg.server.max_connections {
            shared.stats.connections_refused.inc();
            let err = OpError::new(
                ErrorCode::Unavailable,
                format!(
                    "too many connections ({open}, max_connections is {})",
                    cfg.server.max_connections
                ),
            )
            .with_retry_after(100);
            tasks.spawn(connection::refuse(stream, err));
            return;
        }
        // Counted here, not in the task: a burst of accepts must see each other.
        let open = shared.stats.connections.enter_owned();
        shared.stats.connections_total.inc();
        let token = shutdown.child_token();
        tasks.spawn(async move {
            connection::serve(stream, peer, shared, token).await;
            drop(open);
        });
    }
}
