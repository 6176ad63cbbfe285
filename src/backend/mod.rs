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

pub mod durability;
pub mod reply;
pub mod tracking;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisResult, ScriptInvocation};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;
use crate::protocol::{ErrorCode, OpError};

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
}

impl BackendError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BackendError::Unavailable(_) => ErrorCode::Unavailable,
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
        let retry = matches!(e, BackendError::Unavailable(_) | BackendError::Timeout(_));
        let err = OpError::new(e.code(), e.to_string());
        if retry {
            err.with_retry_after(RETRY_AFTER.as_millis() as u64)
        } else {
            err
        }
    }
}

/// Shared by every connection task and service; cheap to clone through `Arc`.
pub struct Backend {
    client: redis::Client,
    /// The same server over RESP3, for the tracking connection (pushes).
    resp3: redis::Client,
    /// What `INFO` said at the last (re)connect ([`durability::Durability`]).
    durability: arc_swap::ArcSwapOption<durability::Durability>,
    /// Durability warnings already logged (each once per daemon).
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
    conn: ConnectionManager,
    up: AtomicBool,
    wake_probe: Notify,
    url: String,
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
            .field("url", &self.url)
            .field("up", &self.is_up())
            .finish()
    }
}

/// The URL, with `redis.tls`, `redis.username` and `redis.password` applied, and
/// TCP_NODELAY on.
fn connection_info(cfg: &RedisConfig) -> Result<redis::ConnectionInfo, BackendError> {
    let info = cfg
        .url
        .as_str()
        .into_connection_info()
        .map_err(BackendError::Redis)?;
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
        Some(files) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: files
                    .client
                    .as_ref()
                    .map(|(cert, key)| redis::ClientTlsConfig {
                        client_cert: cert.clone(),
                        client_key: key.clone(),
                    }),
                root_cert: files.ca.clone(),
            },
        ),
    }
    .map_err(BackendError::Redis)
}

impl Backend {
    /// Creates the handle without connecting; call [`Backend::probe`] or run
    /// [`Backend::run_health`] to connect.
    pub fn new(cfg: &RedisConfig) -> Result<Arc<Backend>, BackendError> {
        let info = connection_info(cfg)?;
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
        Ok(Arc::new(Backend {
            client,
            resp3,
            durability: arc_swap::ArcSwapOption::empty(),
            warned: std::sync::Mutex::default(),
            conn,
            up: AtomicBool::new(false),
            wake_probe: Notify::new(),
            url: cfg.url.clone(),
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

    pub fn url(&self) -> &str {
        &self.url
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
                self.url
            )))
        }
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, BackendError> {
        self.run(|mut c| async move { cmd.query_async(&mut c).await })
            .await
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
        let reply = self
            .run_on(conn, |mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(Some(reply))
    }

    /// Runs one Lua script (EVALSHA, loading it on `NOSCRIPT`).
    pub async fn invoke<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, BackendError> {
        self.run(|mut c| async move { script.invoke_async(&mut c).await })
            .await
    }

    /// Runs a pipeline of commands in one round trip.
    pub async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, BackendError> {
        self.run(|mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    /// The shared path: a permit, the up check, the spin for a lone command, and
    /// error classification.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, BackendError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run_on(self.conn.clone(), call).await
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
        let conn_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&conn_cfg)
            .await
            .map_err(|e| self.classify(e))?;
        Ok(Dedicated {
            conn,
            backend: self.clone(),
        })
    }

    /// Subscribes to one pub/sub channel on a connection of its own; the stream
    /// yields message payloads and ends when the connection is lost.
    pub async fn subscribe(
        &self,
        channel: &str,
    ) -> Result<BoxStream<'static, Vec<u8>>, BackendError> {
        let subscribed = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(self.connect_timeout * 2, subscribed)
            .await
            .map_err(|_| BackendError::Timeout(self.connect_timeout * 2))?
            .map_err(|e| self.classify(e))?;
        Ok(pubsub
            .into_on_message()
            .map(|msg| msg.get_payload_bytes().to_vec())
            .boxed())
    }

    /// Maps a redis error, and marks Redis down when the error says the connection is
    /// gone or stuck, so the next requests fail fast until the probe succeeds.
    fn classify(&self, e: redis::RedisError) -> BackendError {
        if e.is_timeout() {
            self.mark_down(&e);
            BackendError::Timeout(self.response_timeout)
        } else if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
        {
            self.mark_down(&e);
            BackendError::Unavailable(e.to_string())
        } else {
            BackendError::Redis(e)
        }
    }

    fn mark_down(&self, e: &redis::RedisError) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(url = %self.url, error = %e, "lost the connection to redis; requests get UNAVAILABLE until it is back");
            self.wake_probe.notify_one();
        }
    }

    /// What `INFO` said at the last (re)connect; None before the first.
    pub fn durability(&self) -> Option<Arc<durability::Durability>> {
        self.durability.load_full()
    }

    /// Reads `INFO`, keeps what it says, and logs each new warning once.
    async fn check_durability(&self) {
        let info: Result<String, _> = self
            .query(
                redis::cmd("INFO")
                    .arg("persistence")
                    .arg("memory")
                    .arg("replication"),
            )
            .await;
        let Ok(info) = info else { return };
        let d = durability::Durability::from_info(&info);
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        for w in &d.warnings {
            if warned.insert(w.clone()) {
                tracing::warn!(url = %self.url, "redis durability: {w}");
            }
        }
        self.durability.store(Some(Arc::new(d)));
    }

    /// One PING; updates the up/down state. Returns whether Redis answered.
    pub async fn probe(&self) -> bool {
        self.ping().await.is_ok()
    }

    /// As [`Backend::probe`], with the reason when Redis did not answer.
    async fn ping(&self) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let result: Result<String, _> = tokio::time::timeout(
            self.response_timeout,
            redis::cmd("PING").query_async(&mut conn),
        )
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "PING timed out",
            )))
        });
        match result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(url = %self.url, latency_us = started.elapsed().as_micros() as u64, "connected to redis");
                }
                Ok(())
            }
            Err(e) => {
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(url = %self.url, error = %e, "redis stopped answering");
                }
                Err(e)
            }
        }
    }

    /// Probes Redis until shutdown: every 250 ms while down, every second while up,
    /// and at once when a request saw the connection fail.
    pub async fn run_health(self: Arc<Self>, shutdown: CancellationToken) {
        let mut logged_down_hint = false;
        loop {
            let outcome = self.ping().await;
            let ok = outcome.is_ok();
            if let (Err(e), false) = (&outcome, logged_down_hint) {
                tracing::error!(
                    url = %self.url,
                    error = %e,
                    "cannot reach redis at {}; satchel keeps running and retries every {} ms. \
                     Start one with `redis-server --port 6379` (Debian/Ubuntu: `sudo apt-get install redis-server`) \
                     or point SATCHEL_REDIS_URL / [redis] url at yours",
                    self.url,
                    RETRY_AFTER.as_millis()
                );
                logged_down_hint = true;
            }
            if ok {
                if logged_down_hint || self.durability.load().is_none() {
                    // Connected or reconnected (possibly to another server): look again.
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
    conn: MultiplexedConnection,
    backend: Arc<Backend>,
}

impl Dedicated {
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, BackendError> {
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
