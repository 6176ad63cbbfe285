//! The only door to Redis. Every command, script, pipeline, stream read and
//! subscription of the daemon goes through [`Backend`]; no other module holds a
//! Redis connection.
//!
//! - Shared traffic (cache ops, mail scripts) rides one multiplexed connection (the
//!   redis crate's `ConnectionManager`, which reconnects by itself). Each command
//!   takes an in-flight permit first: under overload requests wait here
//!   (backpressure) instead of queueing inside the redis crate, where the wait would
//!   count against the response timeout and look like a Redis outage.
//! - Blocking reads (`XREADGROUP BLOCK`) get a [`Dedicated`] connection of their own
//!   with no response timeout, so they never hold up the shared one.
//! - Pub/sub gets its own connection too ([`Backend::subscribe`]).
//!
//! Every path classifies its errors the same way: a dropped, refused or stuck
//! connection marks Redis down, so the next requests (cache or mail) fail at once
//! with `UNAVAILABLE`, and one background probe reconnects, at most four times a
//! second, until a PING answers.

mod acked;
pub mod conn;
pub mod durability;
pub mod reply;
mod sentinel;
pub mod tracking;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::{
    Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisResult, ScriptInvocation, Value,
};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{RedisConfig, RedisMode};
use crate::protocol::{ErrorCode, OpError};
pub use conn::Conn;

/// How long a client should wait before retrying while Redis is down; also the probe
/// interval while down.
pub const RETRY_AFTER: Duration = Duration::from_millis(250);
/// Probe interval while Redis is up (also keeps `stats.redis.connected` honest).
const PROBE_INTERVAL_UP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(redis::RedisError),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    /// A cluster slot moved while a connection of our own still pointed at its old
    /// primary (a failover, a resharding step): retryable.
    #[error("the redis cluster moved the slot: {0}")]
    Moved(String),
}

impl BackendError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BackendError::Unavailable(_) | BackendError::Moved(_) => ErrorCode::Unavailable,
            BackendError::Timeout(_) => ErrorCode::Timeout,
            BackendError::Redis(_) | BackendError::Reply(_) => ErrorCode::Internal,
        }
    }

    /// The Redis error code (`NOGROUP`, `BUSYGROUP`, …) of a command Redis refused.
    pub fn redis_code(&self) -> Option<&str> {
        match self {
            BackendError::Redis(e) => e.code(),
            _ => None,
        }
    }

    /// A reply that does not have the shape the caller expected.
    pub fn reply(what: &str, got: &redis::Value) -> BackendError {
        BackendError::Reply(format!("{what}: {got:?}"))
    }
}

impl From<BackendError> for OpError {
    fn from(e: BackendError) -> OpError {
        let retry = matches!(
            e,
            BackendError::Unavailable(_) | BackendError::Timeout(_) | BackendError::Moved(_)
        );
        let err = OpError::new(e.code(), e.to_string());
        if retry {
            err.with_retry_after(RETRY_AFTER.as_millis() as u64)
        } else {
            err
        }
    }
}

/// The server commands go to, and the clients for it. Replaced as a whole when
/// Sentinel names a new master, so a command never mixes old and new.
struct Node {
    /// `host:port` (or the URL in single-server mode), for logs.
    addr: String,
    /// Counts replacements; connections made for an older node are dropped.
    generation: u64,
    clients: Clients,
    /// The shared connection (cache ops, mail scripts).
    conn: Conn,
}

/// What connections of their own are made from.
enum Clients {
    One {
        client: redis::Client,
        /// The same server over RESP3, for the tracking connection (pushes).
        resp3: redis::Client,
    },
    Cluster {
        /// Without a response timeout, for blocking reads and `WAIT`.
        blocking: ClusterClient,
    },
}

/// One primary to send a command to (see [`Backend::primaries`]).
#[derive(Debug, Clone)]
pub enum Primary {
    /// The one server (single-server and Sentinel modes).
    Only,
    /// A cluster primary.
    At(String, u16),
}

/// Shared by every connection task and service; cheap to clone through `Arc`.
pub struct Backend {
    cfg: RedisConfig,
    /// None in sentinel mode until the sentinels first named a master.
    node: arc_swap::ArcSwapOption<Node>,
    /// Sentinel mode: where to ask for the master.
    sentinels: Option<sentinel::Sentinels>,
    /// Cluster mode: the seed nodes.
    cluster: Option<Vec<(String, u16)>>,
    /// A reason to ask the sentinels again before the next probe.
    resolve: AtomicBool,
    /// Bumped on every node replacement, for connections of their own to notice.
    generation: tokio::sync::watch::Sender<u64>,
    /// The connection `mail.send` writes on when it waits for replicas (`WAIT`).
    acked: acked::AckLane,
    /// What `INFO` said at the last (re)connect ([`durability::Durability`]).
    durability: arc_swap::ArcSwapOption<durability::Durability>,
    /// The health probe's PING round trips (the metrics endpoint's
    /// `satchel_redis_rtt_seconds`).
    pub rtt: prometheus_client::metrics::histogram::Histogram,
    /// Durability warnings already logged (each once per daemon).
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
    up: AtomicBool,
    wake_probe: Notify,
    prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    /// How long a lone command busy-polls for its reply (`redis.spin_us`).
    spin: Duration,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("url", &self.url())
            .field("up", &self.is_up())
            .finish()
    }
}

/// The URL (or, from Sentinel, `addr`), with `redis.tls`, `redis.username` and
/// `redis.password` applied, and TCP_NODELAY on.
fn connection_info(
    cfg: &RedisConfig,
    addr: Option<(String, u16)>,
) -> Result<redis::ConnectionInfo, BackendError> {
    let info = cfg
        .url
        .as_str()
        .into_connection_info()
        .map_err(BackendError::Redis)?;
    let info = match addr {
        Some((host, port)) => info.set_addr(redis::ConnectionAddr::Tcp(host, port)),
        None => info,
    };
    let info = match (cfg.tls, info.addr().clone()) {
        (true, redis::ConnectionAddr::Tcp(host, port)) => {
            info.set_addr(redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            })
        }
        _ => info,
    };
    let mut settings = info.redis_settings().clone();
    if !cfg.username.is_empty() {
        settings = settings.set_username(cfg.username.clone());
    }
    if !cfg.password.is_empty() {
        settings = settings.set_password(cfg.password.clone());
    }
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    Ok(info.set_redis_settings(settings).set_tcp_settings(tcp))
}

/// A client for `info`, trusting `redis.tls_ca_file` and presenting
/// `redis.tls_cert_file` when they are set.
fn open_client(
    cfg: &RedisConfig,
    info: redis::ConnectionInfo,
) -> Result<redis::Client, BackendError> {
    match &cfg.tls_files {
        None => redis::Client::open(info),
        Some(files) => redis::Client::build_with_tls(info, tls_certificates(files)),
    }
    .map_err(BackendError::Redis)
}

impl Node {
    /// Clients for the server at `addr` (or the URL's), and a lazy shared connection.
    fn open(
        cfg: &RedisConfig,
        addr: Option<(String, u16)>,
        generation: u64,
    ) -> Result<Node, BackendError> {
        let shown = match &addr {
            Some((host, port)) => format!("{host}:{port}"),
            None => cfg.url.clone(),
        };
        let info = connection_info(cfg, addr)?;
        let resp3_settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let resp3 = open_client(cfg, info.clone().set_redis_settings(resp3_settings))?;
        let client = open_client(cfg, info)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout()))
            .set_response_timeout(Some(cfg.response_timeout()))
            // One attempt per reconnect: the probe loop owns the retry cadence.
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(BackendError::Redis)?;
        Ok(Node {
            addr: shown,
            generation,
            clients: Clients::One { client, resp3 },
            conn: Conn::Manager(conn),
        })
    }

    /// A cluster connection from the seed nodes (it discovers the rest, and follows
    /// slot moves and failovers by itself).
    async fn open_cluster(
        cfg: &RedisConfig,
        seeds: &[(String, u16)],
        generation: u64,
    ) -> Result<Node, redis::RedisError> {
        let build = |response_timeout: Duration| -> Result<ClusterClient, redis::RedisError> {
            let nodes = seeds
                .iter()
                .map(|(h, p)| connection_info(cfg, Some((h.clone(), *p))))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "cluster",
                        e.to_string(),
                    ))
                })?;
            let mut b = ClusterClientBuilder::new(nodes)
                .connection_timeout(cfg.connect_timeout())
                .response_timeout(response_timeout)
                // Few retries: a slot whose primary is gone answers UNAVAILABLE
                // soon, as on one server, and the client retries.
                .retries(2);
            if cfg.tls || cfg.url.starts_with("rediss://") {
                b = b.tls(redis::TlsMode::Secure);
            }
            if let Some(files) = &cfg.tls_files {
                b = b.certs(tls_certificates(files));
            }
            if !cfg.username.is_empty() {
                b = b.username(&cfg.username);
            }
            if !cfg.password.is_empty() {
                b = b.password(&cfg.password);
            }
            b.build()
        };
        let shared = build(cfg.response_timeout())?;
        let blocking = build(Duration::from_secs(3600))?;
        let conn = shared.get_async_connection().await?;
        Ok(Node {
            addr: seeds
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            generation,
            clients: Clients::Cluster { blocking },
            conn: Conn::Cluster(conn),
        })
    }

    /// A connection of its own to this node (or cluster), without a response timeout.
    async fn own_connection(&self, connect_timeout: Duration) -> Result<Conn, redis::RedisError> {
        match &self.clients {
            Clients::One { client, .. } => {
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(None);
                Ok(Conn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await?,
                ))
            }
            Clients::Cluster { blocking } => {
                Ok(Conn::Cluster(blocking.get_async_connection().await?))
            }
        }
    }
}

fn tls_certificates(files: &crate::config::RedisTlsFiles) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: files
            .client
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
        root_cert: files.ca.clone(),
    }
}

/// `host:port` → its parts (validated by the config).
fn host_port(node: &str) -> Option<(String, u16)> {
    let (h, p) = node.rsplit_once(':')?;
    Some((h.to_owned(), p.parse().ok()?))
}

impl Backend {
    /// Creates the handle without connecting; call [`Backend::probe`] or run
    /// [`Backend::run_health`] to connect.
    pub fn new(cfg: &RedisConfig) -> Result<Arc<Backend>, BackendError> {
        let (node, sentinels, cluster) = match cfg.mode() {
            RedisMode::Single => (Some(Arc::new(Node::open(cfg, None, 0)?)), None, None),
            RedisMode::Sentinel { nodes, master } => {
                let s =
                    sentinel::Sentinels::new(cfg, &nodes, &master).map_err(BackendError::Redis)?;
                (None, Some(s), None)
            }
            RedisMode::Cluster { nodes } => {
                let seeds = nodes.iter().filter_map(|n| host_port(n)).collect();
                (None, None, Some(seeds))
            }
        };
        let resolve = node.is_none();
        Ok(Arc::new(Backend {
            cfg: cfg.clone(),
            node: arc_swap::ArcSwapOption::new(node),
            resolve: AtomicBool::new(resolve),
            sentinels,
            cluster,
            generation: tokio::sync::watch::Sender::new(0),
            acked: acked::AckLane::default(),
            durability: arc_swap::ArcSwapOption::empty(),
            rtt: crate::stats::latency_histogram(),
            warned: std::sync::Mutex::default(),
            up: AtomicBool::new(false),
            wake_probe: Notify::new(),
            prefix: cfg.prefix.clone(),
            connect_timeout: cfg.connect_timeout(),
            response_timeout: cfg.response_timeout(),
            inflight: Arc::new(Semaphore::new(cfg.max_inflight as usize)),
            max_inflight: cfg.max_inflight as usize,
            spin: Duration::from_micros(cfg.spin_us),
        }))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// What the daemon talks to: the URL, or the sentinel master and where it is now.
    pub fn url(&self) -> String {
        if let Some(seeds) = &self.cluster {
            let seeds: Vec<String> = seeds.iter().map(|(h, p)| format!("{h}:{p}")).collect();
            return format!("cluster:{}", seeds.join(","));
        }
        match (&self.sentinels, self.node.load().as_deref()) {
            (None, _) => self.cfg.url.clone(),
            (Some(s), Some(n)) => format!("sentinel:{} at {}", s.master_name(), n.addr),
            (Some(s), None) => format!("sentinel:{} (not found yet)", s.master_name()),
        }
    }

    /// Whether the daemon runs against sentinels or a cluster (where a server with no
    /// replica is a durability warning).
    pub fn replicated_mode(&self) -> bool {
        self.sentinels.is_some() || self.cluster.is_some()
    }

    /// Whether the daemon runs against a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The configured key prefix (without the trailing `:`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `UNAVAILABLE` at once while Redis is known to be down.
    pub fn ensure_up(&self) -> Result<(), BackendError> {
        if self.is_up() {
            Ok(())
        } else {
            Err(BackendError::Unavailable(format!(
                "no connection to {}; reconnecting",
                self.url()
            )))
        }
    }

    /// The current node, or UNAVAILABLE while none is known.
    fn node(&self) -> Result<Arc<Node>, BackendError> {
        self.node.load_full().ok_or_else(|| self.no_node())
    }

    fn no_node(&self) -> BackendError {
        BackendError::Unavailable(format!("{}: no master known yet", self.url()))
    }

    /// The generation of the current node (see [`Backend::node_changed`]).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Resolves when the node has been replaced after `generation`.
    pub async fn node_changed(&self, generation: u64) {
        let mut rx = self.generation.subscribe();
        let _ = rx.wait_for(|g| *g != generation).await;
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, BackendError> {
        self.run(|mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    /// Creates consumer group `group` on `stream` (and the stream), starting at
    /// `start` (`0`: everything, `$`: from now); an existing group is fine.
    pub async fn ensure_group(
        &self,
        stream: &str,
        group: &str,
        start: &str,
    ) -> Result<(), BackendError> {
        let r: Result<(), _> = self
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(stream)
                    .arg(group)
                    .arg(start)
                    .arg("MKSTREAM"),
            )
            .await;
        match r {
            Err(e) if e.redis_code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// A client for one server of a cluster (RESP3 for pushes when `resp3`).
    pub(crate) fn client_for(
        &self,
        host: &str,
        port: u16,
        resp3: bool,
    ) -> Result<redis::Client, BackendError> {
        let info = connection_info(&self.cfg, Some((host.to_owned(), port)))?;
        let info = if resp3 {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info.set_redis_settings(settings)
        } else {
            info
        };
        open_client(&self.cfg, info)
    }

    /// The primaries a command that must see every key (`SCAN`) has to reach: one
    /// server, or each primary of a cluster.
    pub async fn primaries(&self) -> Result<Vec<Primary>, BackendError> {
        if !self.is_cluster() {
            return Ok(vec![Primary::Only]);
        }
        let mut conn = self.node()?.conn.clone();
        let found = conn
            .cluster_primaries()
            .await
            .map_err(|e| self.classify(e))?;
        Ok(found.into_iter().map(|(h, p)| Primary::At(h, p)).collect())
    }

    /// Runs one command on one primary (see [`Backend::primaries`]).
    pub async fn query_at<T: FromRedisValue>(
        &self,
        primary: &Primary,
        cmd: &Cmd,
    ) -> Result<T, BackendError> {
        match primary {
            Primary::Only => self.query(cmd).await,
            Primary::At(host, port) => {
                let cmd = cmd.clone();
                let value = self
                    .run(|mut c| async move { c.query_at(host, *port, cmd).await })
                    .await?;
                redis::from_redis_value(value).map_err(|e| BackendError::Reply(e.to_string()))
            }
        }
    }

    /// Groups `keys` by the hash slot they live in (one group outside a cluster), so
    /// each group can go to Redis as one multi-key command or script.
    pub fn by_slot<'k, K: AsRef<str> + ?Sized>(&self, keys: &[&'k K]) -> Vec<Vec<&'k K>> {
        if self.is_cluster() {
            conn::group_by_slot(keys)
        } else {
            vec![keys.to_vec()]
        }
    }

    /// Runs one read on the tracking connection, so Redis remembers the keys it
    /// reads for this daemon. None while tracking is down (read through
    /// [`Backend::query`] then).
    pub async fn query_tracked<T: FromRedisValue>(
        &self,
        tracking: &tracking::Tracking,
        cmd: &Cmd,
    ) -> Result<Option<T>, BackendError> {
        let Some(conn) = tracking.connection() else {
            return Ok(None);
        };
        let reply = self
            .run_on(conn, |mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(Some(reply))
    }

    /// As [`Backend::query_tracked`], for a pipeline.
    pub async fn pipeline_tracked<T: FromRedisValue>(
        &self,
        tracking: &tracking::Tracking,
        pipe: &Pipeline,
    ) -> Result<Option<T>, BackendError> {
        let Some(conn) = tracking.connection() else {
            return Ok(None);
        };
        Ok(Some(self.pipeline_on(conn, pipe).await?))
    }

    /// Runs one Lua script (EVALSHA, loading it on `NOSCRIPT`).
    pub async fn invoke<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, BackendError> {
        self.run(|mut c| async move { script.invoke_async(&mut c).await })
            .await
    }

    /// Runs one Lua script that writes, then waits (Redis `WAIT`, at most `timeout`)
    /// until `replicas` replicas have the write; answers the reply and how many
    /// replicas acknowledged it. A failed or unanswered `WAIT` is 0 acknowledgements
    /// (the write itself happened).
    pub async fn invoke_acked<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
        key: &str,
        replicas: u64,
        timeout: Duration,
    ) -> Result<(T, u64), BackendError> {
        // The slot moved (a cluster failover): the lane went to the old primary, and
        // the cluster's slot map may lag a moment behind the move.
        let mut tries = 0;
        loop {
            match self.invoke_acked_once(script, key, replicas, timeout).await {
                Err(BackendError::Moved(_)) if tries < 3 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20 * tries)).await;
                }
                other => return other,
            }
        }
    }

    async fn invoke_acked_once<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
        key: &str,
        replicas: u64,
        timeout: Duration,
    ) -> Result<(T, u64), BackendError> {
        self.ensure_up()?;
        let node = self.node()?;
        // A plain connection to the server that takes `key`'s writes (on a cluster,
        // the primary of its slot: `WAIT` must follow the write on its connection,
        // and a cluster connection does not promise that). Each command below has
        // its own deadline.
        let lane = self
            .acked
            .get(node.generation, || async {
                match &node.clients {
                    Clients::One { .. } => node.own_connection(self.connect_timeout).await,
                    Clients::Cluster { .. } => {
                        let (host, port) = node
                            .conn
                            .clone()
                            .cluster_owner_of(key)
                            .await?
                            .ok_or_else(|| {
                                redis::RedisError::from((
                                    redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                                    "no primary serves the mail slot",
                                ))
                            })?;
                        let client = self.client_for(&host, port, false).map_err(|e| {
                            redis::RedisError::from((
                                redis::ErrorKind::Io,
                                "cluster",
                                e.to_string(),
                            ))
                        })?;
                        let cfg = redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(self.connect_timeout))
                            .set_response_timeout(None);
                        Ok(Conn::Plain(
                            client
                                .get_multiplexed_async_connection_with_config(&cfg)
                                .await?,
                        ))
                    }
                }
            })
            .await
            .map_err(|e| self.classify(e))?;
        let response_timeout = self.response_timeout;
        let reply = self
            .run_on(lane.conn.clone(), |mut c| async move {
                tokio::time::timeout(response_timeout, script.invoke_async(&mut c))
                    .await
                    .unwrap_or_else(|_| {
                        Err(redis::RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the script went unanswered",
                        )))
                    })
            })
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                self.acked.drop_lane(&lane).await;
                return Err(e);
            }
        };
        let ticket = lane.wrote();
        let acked = match lane
            .replicas(ticket, replicas, timeout, timeout + response_timeout, key)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "WAIT for replicas failed; counted as none");
                self.acked.drop_lane(&lane).await;
                0
            }
        };
        Ok((reply, acked))
    }

    /// Runs a pipeline of commands in one round trip. On a cluster a pipeline that
    /// is not a transaction may name keys of many slots: its commands are sent one by
    /// one (concurrently; the cluster connection batches them per node) and the
    /// replies gathered in order.
    pub async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, BackendError> {
        let conn = self.node()?.conn.clone();
        self.pipeline_on(conn, pipe).await
    }

    async fn pipeline_on<T: FromRedisValue>(
        &self,
        conn: Conn,
        pipe: &Pipeline,
    ) -> Result<T, BackendError> {
        if matches!(conn, Conn::Cluster(_)) && !pipe.is_transaction() {
            let replies = futures::future::try_join_all(pipe.cmd_iter().map(|cmd| {
                let conn = conn.clone();
                self.run_on(conn, move |mut c| async move {
                    cmd.query_async::<Value>(&mut c).await
                })
            }))
            .await?;
            return redis::from_redis_value(Value::Array(replies))
                .map_err(|e| BackendError::Reply(e.to_string()));
        }
        self.run_on(conn, |mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    /// The shared path: a permit, the up check, the spin for a lone command, and
    /// error classification.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, BackendError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        // A load guard, not an Arc clone: this is every command's path.
        let conn = match self.node.load().as_deref() {
            Some(node) => node.conn.clone(),
            None => return Err(self.no_node()),
        };
        self.run_on(conn, call).await
    }

    async fn run_on<C, T, F, Fut>(&self, conn: C, call: F) -> Result<T, BackendError>
    where
        C: ConnectionLike,
        F: FnOnce(C) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let _permit = self.inflight.acquire().await;
        self.ensure_up()?;
        let reply = call(conn);
        // Alone on the connection (a sequential client): poll for the reply for a few
        // µs instead of sleeping at once. Each yield lets the runtime poll its sockets
        // without blocking, so the reply is picked up without the thread's wake-up
        // (~20% of a sequential cache.get here, BENCHMARKS.md). Never under load: then
        // other commands are in flight and the thread has work anyway; a spin stops as
        // soon as another command joins.
        let lone = || self.inflight.available_permits() + 1 == self.max_inflight;
        let result = if !self.spin.is_zero() && lone() {
            spin_then_wait(reply, self.spin, lone).await
        } else {
            reply.await
        };
        result.map_err(|e| self.classify(e))
    }

    /// A connection of its own, without a response timeout, for blocking reads
    /// (`XREADGROUP BLOCK`); not counted against `redis.max_inflight`, since nothing
    /// queues behind it.
    pub async fn dedicated(self: &Arc<Self>) -> Result<Dedicated, BackendError> {
        let node = self.node()?;
        let conn = node
            .own_connection(self.connect_timeout)
            .await
            .map_err(|e| self.classify(e))?;
        Ok(Dedicated {
            conn,
            generation: node.generation,
            backend: self.clone(),
        })
    }

    /// Subscribes to one pub/sub channel on a connection of its own; the stream
    /// yields message payloads and ends when the connection is lost.
    pub async fn subscribe(
        &self,
        channel: &str,
    ) -> Result<BoxStream<'static, Vec<u8>>, BackendError> {
        let node = self.node()?;
        // On a cluster PUBLISH reaches every node: any primary will do.
        let client = match &node.clients {
            Clients::One { client, .. } => client.clone(),
            Clients::Cluster { .. } => match self.primaries().await?.first() {
                Some(Primary::At(host, port)) => self.client_for(host, *port, false)?,
                _ => {
                    return Err(BackendError::Unavailable(
                        "the cluster has no primary".into(),
                    ));
                }
            },
        };
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(self.connect_timeout * 2, subscribed)
            .await
            .map_err(|_| BackendError::Timeout(self.connect_timeout * 2))?
            .map_err(|e| self.classify(e))?;
        // A subscription to a former master ends, so the caller subscribes again.
        let mut rx = self.generation.subscribe();
        let moved = async move {
            let _ = rx.wait_for(|g| *g != node.generation).await;
        };
        Ok(pubsub
            .into_on_message()
            .map(|msg| msg.get_payload_bytes().to_vec())
            .take_until(moved)
            .boxed())
    }

    /// Maps a redis error, and marks Redis down when the error says the connection is
    /// gone or stuck, so the next requests fail fast until the probe succeeds.
    fn classify(&self, e: redis::RedisError) -> BackendError {
        // On a cluster one node's trouble is not everyone's: the request fails, and
        // only the probe (any primary) decides whether Redis is down.
        let whole = !self.is_cluster();
        if e.is_timeout() {
            if whole {
                self.mark_down(&e);
            }
            BackendError::Timeout(self.response_timeout)
        } else if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
        {
            if whole {
                self.mark_down(&e);
            }
            self.resolve_again();
            BackendError::Unavailable(e.to_string())
        } else if matches!(e.code(), Some("MOVED" | "ASK")) {
            BackendError::Moved(e.to_string())
        } else if matches!(
            e.code(),
            Some("CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "LOADING")
        ) {
            // A slot without a primary during a failover, a resharding step.
            BackendError::Unavailable(e.to_string())
        } else if e.code() == Some("READONLY") {
            // A former master, demoted to replica by a failover.
            self.mark_down(&e);
            self.resolve_again();
            BackendError::Unavailable(format!(
                "{} is a replica now (READONLY); following the new master",
                self.url()
            ))
        } else {
            BackendError::Redis(e)
        }
    }

    fn mark_down(&self, e: &redis::RedisError) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(url = %self.url(), error = %e, "lost the connection to redis; requests get UNAVAILABLE until it is back");
            self.wake_probe.notify_one();
        }
    }

    /// In sentinel mode, asks the sentinels again before the next probe.
    fn resolve_again(&self) {
        if self.sentinels.is_some() && !self.resolve.swap(true, Ordering::Relaxed) {
            self.wake_probe.notify_one();
        }
    }

    /// Asks the sentinels for the master and, if it moved, swaps in a node for it.
    async fn follow_master(&self, sentinels: &sentinel::Sentinels) -> Result<(), String> {
        let (host, port) = sentinels.master().await?;
        let addr = format!("{host}:{port}");
        let current = self.node.load_full();
        if current.as_ref().is_some_and(|n| n.addr == addr) {
            return Ok(());
        }
        let generation = self.generation() + 1;
        let node =
            Node::open(&self.cfg, Some((host, port)), generation).map_err(|e| e.to_string())?;
        match &current {
            Some(old) => {
                tracing::warn!(master = sentinels.master_name(), from = %old.addr, to = %addr, "redis master moved; following it")
            }
            None => {
                tracing::info!(master = sentinels.master_name(), at = %addr, "sentinels named the redis master")
            }
        }
        self.node.store(Some(Arc::new(node)));
        self.generation.send_replace(generation);
        Ok(())
    }

    /// What `INFO` said at the last (re)connect; None before the first.
    pub fn durability(&self) -> Option<Arc<durability::Durability>> {
        self.durability.load_full()
    }

    /// Reads `INFO`, keeps what it says, and logs each new warning once.
    async fn check_durability(&self) {
        let Ok(primaries) = self.primaries().await else {
            return;
        };
        // Each primary's own answer; on a cluster the worst of them.
        let mut d: Option<durability::Durability> = None;
        for p in &primaries {
            let info: Result<String, _> = self
                .query_at(
                    p,
                    redis::cmd("INFO")
                        .arg("persistence")
                        .arg("memory")
                        .arg("replication"),
                )
                .await;
            let Ok(info) = info else { return };
            let mut one = durability::Durability::from_info(&info, self.replicated_mode());
            if let Primary::At(host, port) = p {
                for w in &mut one.warnings {
                    *w = format!("{host}:{port}: {w}");
                }
            }
            d = Some(match d {
                None => one,
                Some(acc) => acc.worst(one),
            });
        }
        let Some(d) = d else { return };
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        for w in &d.warnings {
            if warned.insert(w.clone()) {
                tracing::warn!(url = %self.url(), "redis durability: {w}");
            }
        }
        self.durability.store(Some(Arc::new(d)));
    }

    /// One PING; updates the up/down state. Returns whether Redis answered.
    pub async fn probe(&self) -> bool {
        self.ping().await.is_ok()
    }

    /// As [`Backend::probe`], with the reason when Redis did not answer. In sentinel
    /// mode it first asks the sentinels where the master is, when there is a reason
    /// to, and probes with `ROLE` instead of `PING`, so that a master demoted by a
    /// failover nobody told us about is noticed within a probe interval.
    async fn ping(&self) -> Result<(), String> {
        let started = Instant::now();
        let result = self.ping_node().await;
        match &result {
            Ok(()) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(url = %self.url(), latency_us = started.elapsed().as_micros() as u64, "connected to redis");
                }
            }
            Err(e) => {
                self.resolve_again();
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(url = %self.url(), error = %e, "redis stopped answering");
                }
            }
        }
        result
    }

    async fn ping_node(&self) -> Result<(), String> {
        if let Some(sentinels) = &self.sentinels
            && self.resolve.swap(false, Ordering::Relaxed)
        {
            self.follow_master(sentinels).await?;
        }
        if let Some(seeds) = &self.cluster
            && self.node.load().is_none()
        {
            let node = Node::open_cluster(&self.cfg, seeds, 0)
                .await
                .map_err(|e| e.to_string())?;
            self.node.store(Some(Arc::new(node)));
        }
        let node = self.node().map_err(|e| e.to_string())?;
        let mut conn = node.conn.clone();
        let check = async {
            if self.is_cluster() {
                // Any primary: the cluster answers while one shard fails over.
                let _: Value = conn
                    .query_random_primary(redis::cmd("PING").to_owned())
                    .await?;
                return Ok(None);
            }
            if self.sentinels.is_none() {
                let _: String = redis::cmd("PING").query_async(&mut conn).await?;
                return Ok(None);
            }
            let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(match role.first() {
                Some(Value::BulkString(r)) if r == b"master" => None,
                Some(Value::BulkString(r)) => Some(String::from_utf8_lossy(r).into_owned()),
                other => Some(format!("{other:?}")),
            })
        };
        match tokio::time::timeout(self.response_timeout, check).await {
            Err(_) => Err(format!("no answer within {:?}", self.response_timeout)),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(Some(role))) => Err(format!(
                "{} is no longer the master (role: {role})",
                node.addr
            )),
            Ok(Ok(None)) => Ok(()),
        }
    }

    /// Sentinel mode: listens for `+switch-master` until shutdown, so a failover is
    /// followed as soon as a sentinel announces it (not only when a command fails).
    async fn follow_announcements(&self, shutdown: &CancellationToken) {
        let Some(sentinels) = &self.sentinels else {
            return;
        };
        loop {
            let events = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = sentinels.events() => e,
            };
            if let Ok(mut events) = events {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        e = events.next() => match e {
                            Some(()) => {
                                tracing::info!(master = sentinels.master_name(), "a sentinel announced +switch-master");
                                self.resolve.store(true, Ordering::Relaxed);
                                self.wake_probe.notify_one();
                            }
                            None => break,
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY_AFTER) => {}
            }
        }
    }

    /// Probes Redis until shutdown: every 250 ms while down, every second while up,
    /// and at once when a request saw the connection fail.
    pub async fn run_health(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::join!(
            self.probe_loop(&shutdown),
            self.follow_announcements(&shutdown)
        );
    }

    async fn probe_loop(&self, shutdown: &CancellationToken) {
        let mut logged_down_hint = false;
        // The node generation `INFO` was last read for.
        let mut checked: Option<u64> = None;
        loop {
            let was_up = self.is_up();
            let started = Instant::now();
            let outcome = self.ping().await;
            let ok = outcome.is_ok();
            if ok {
                self.rtt.observe(started.elapsed().as_secs_f64());
            }
            if let (Err(e), false) = (&outcome, logged_down_hint) {
                let hint = if self.sentinels.is_some() {
                    "check redis.sentinel_nodes and redis.sentinel_master"
                } else {
                    "Start one with `redis-server --port 6379` (Debian/Ubuntu: `sudo apt-get install redis-server`) \
                     or point SATCHEL_REDIS_URL / [redis] url at yours"
                };
                tracing::error!(
                    url = %self.url(),
                    error = %e,
                    "cannot reach redis at {}; satchel keeps running and retries every {} ms. {hint}",
                    self.url(),
                    RETRY_AFTER.as_millis()
                );
                logged_down_hint = true;
            }
            if ok {
                // Connected, reconnected (a request may have seen the loss first) or
                // moved to another master: look again.
                if !was_up || logged_down_hint || checked != Some(self.generation()) {
                    checked = Some(self.generation());
                    self.check_durability().await;
                }
                logged_down_hint = false;
            }
            let pause = if ok { PROBE_INTERVAL_UP } else { RETRY_AFTER };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.wake_probe.notified() => {}
            }
        }
    }
}

/// A connection of one task's own (see [`Backend::dedicated`]). Its errors are
/// classified like every other, so a worker that sees Redis die marks it down.
pub struct Dedicated {
    conn: Conn,
    /// The node it was made for: after a failover it refuses, so its owner makes a
    /// new one to the new master.
    generation: u64,
    backend: Arc<Backend>,
}

impl Dedicated {
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, BackendError> {
        if self.generation != self.backend.generation() {
            return Err(BackendError::Unavailable(
                "the redis master moved; reconnecting".into(),
            ));
        }
        cmd.query_async(&mut self.conn)
            .await
            .map_err(|e| self.backend.classify(e))
    }
}

/// Polls `fut`, yielding to the runtime between polls, for up to `spin` and while
/// `keep` holds; then waits for it normally.
async fn spin_then_wait<F: Future>(fut: F, spin: Duration, keep: impl Fn() -> bool) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let started = Instant::now();
    loop {
        if let std::task::Poll::Ready(v) = futures::poll!(fut.as_mut()) {
            return v;
        }
        if started.elapsed() >= spin || !keep() {
            return fut.await;
        }
        tokio::task::yield_now().await;
    }
}
