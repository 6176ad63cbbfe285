//! The accept loop and the state every connection shares.
//!
//! [`Server::bind`] takes the listening socket (from systemd socket activation, or by
//! binding `server.socket`), [`Server::run`] accepts until the shutdown token fires and
//! then waits, up to `server.shutdown_timeout_ms`, for every connection to answer what
//! it has already read.

mod connection;
mod dispatch;
mod socket;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use dispatch::all_ops;

use crate::backend::{Backend, BackendError};
use crate::cache::CacheService;
use crate::config::Config;
use crate::protocol::{ErrorCode, OpError};
use crate::stats::Stats;

/// Who is on the other end of a connection (SO_PEERCRED), for access decisions and
/// per-uid key spaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => Peer {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
            },
            Err(_) => Peer::default(),
        }
    }
}

/// State shared by all connections.
#[derive(Debug)]
pub struct Shared {
    /// The live configuration; SIGHUP swaps it.
    pub config: ArcSwap<Config>,
    pub backend: Arc<Backend>,
    pub stats: Stats,
    pub cache: Arc<CacheService>,
    pub mail: crate::mail::MailService,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {path}: {message}")]
    Socket { path: PathBuf, message: String },
    #[error("socket activation: {0}")]
    Activation(std::io::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("mail transport: {0}")]
    Mail(String),
}

/// A bound server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    /// The path we bound and must remove on exit (None under socket activation).
    owned_path: Option<(PathBuf, u64)>,
    shared: Arc<Shared>,
}

impl Server {
    /// Takes the socket systemd passed (LISTEN_FDS) or binds `server.socket`, and
    /// makes one attempt to reach Redis (the daemon starts either way).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let backend = Backend::new(&config.redis)?;
        let mail = crate::mail::MailService::new(&config).map_err(ServerError::Mail)?;
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
        Ok(Server {
            listener,
            owned_path,
            shared: Arc::new(Shared {
                config: ArcSwap::from_pointee(config),
                cache: CacheService::new(backend.clone()),
                backend,
                stats: Stats::default(),
                mail,
            }),
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Accepts connections until `shutdown` is cancelled, then drains. Every task is
    /// spawned on `tasks`; the caller waits for them with its own deadline.
    pub async fn run(self, shutdown: CancellationToken, tasks: TaskTracker) {
        tasks.spawn(
            self.shared
                .backend
                .clone()
                .run_health(shutdown.child_token()),
        );
        self.shared.cache.start(&tasks, &shutdown);
        self.shared.mail.enqueuer.start(&tasks);
        tasks.spawn(crate::mail::worker::run(
            self.shared.clone(),
            shutdown.child_token(),
            tasks.clone(),
        ));
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
        if let Some(err) = check_peer(&peer, &cfg.server) {
            Stats::bump(&shared.stats.connections_refused);
            tasks.spawn(connection::refuse(stream, err));
            return;
        }
        let open = shared.stats.connections.load(Ordering::Relaxed);
        if open >= cfg.server.max_connections {
            Stats::bump(&shared.stats.connections_refused);
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
        Stats::bump(&shared.stats.connections);
        Stats::bump(&shared.stats.connections_total);
        let token = shutdown.child_token();
        tasks.spawn(async move {
            connection::serve(stream, peer, shared.clone(), token).await;
            Stats::drop_one(&shared.stats.connections);
        });
    }
}

/// SO_PEERCRED check against `allow_uids` / `allow_gids`.
fn check_peer(peer: &Peer, cfg: &crate::config::ServerConfig) -> Option<OpError> {
    if cfg.allow_uids.is_empty() && cfg.allow_gids.is_empty() {
        return None;
    }
    let (Some(uid), Some(gid)) = (peer.uid, peer.gid) else {
        return Some(OpError::new(
            ErrorCode::Forbidden,
            "cannot read the peer's credentials",
        ));
    };
    if cfg.allow_uids.contains(&uid) || cfg.allow_gids.contains(&gid) {
        None
    } else {
        Some(OpError::new(
            ErrorCode::Forbidden,
            format!("uid {uid} / gid {gid} is not in allow_uids or allow_gids"),
        ))
    }
}
