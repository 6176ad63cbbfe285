//! The daemon's handle on Redis: one multiplexed connection (the redis crate's
//! `ConnectionManager`, which reconnects by itself) plus a health gate.
//!
//! Why the gate: while Redis is down the manager would make every request wait for a
//! fresh connection attempt. Instead, the first failure marks Redis down, requests then
//! fail at once with `UNAVAILABLE`, and one background probe reconnects, at most four
//! times a second, until a PING answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, IntoConnectionInfo};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;
use crate::protocol::{ErrorCode, OpError};

/// How long a client should wait before retrying while Redis is down; also the probe
/// interval while down.
pub const RETRY_AFTER: Duration = Duration::from_millis(250);
/// Probe interval while Redis is up (also keeps `stats.redis.connected` honest).
const PROBE_INTERVAL_UP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(redis::RedisError),
}

impl BackendError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BackendError::Unavailable(_) => ErrorCode::Unavailable,
            BackendError::Timeout(_) => ErrorCode::Timeout,
            BackendError::Redis(_) => ErrorCode::Internal,
        }
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

/// Shared by every connection task; cheap to clone through `Arc`.
pub struct Backend {
    client: redis::Client,
    conn: ConnectionManager,
    up: AtomicBool,
    wake_probe: Notify,
    url: String,
    prefix: String,
    response_timeout: Duration,
    /// Bounds commands queued on the shared connection: under overload, requests wait
    /// here (backpressure) instead of queueing inside the redis crate, where the wait
    /// would count against the response timeout and look like a Redis outage.
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

impl Backend {
    /// Creates the handle without connecting; call [`Backend::probe`] or run
    /// [`Backend::run_health`] to connect.
    pub fn new(cfg: &RedisConfig) -> Result<Arc<Backend>, BackendError> {
        let info = cfg
            .url
            .as_str()
            .into_connection_info()
            .map_err(BackendError::Redis)?;
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let client =
            redis::Client::open(info.set_tcp_settings(tcp)).map_err(BackendError::Redis)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout()))
            .set_response_timeout(Some(cfg.response_timeout()))
            // One attempt per reconnect: the probe loop owns the retry cadence.
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(BackendError::Redis)?;
        Ok(Arc::new(Backend {
            client,
            conn,
            up: AtomicBool::new(false),
            wake_probe: Notify::new(),
            url: cfg.url.clone(),
            prefix: cfg.prefix.clone(),
            response_timeout: cfg.response_timeout(),
            inflight: Arc::new(Semaphore::new(cfg.max_inflight as usize)),
            max_inflight: cfg.max_inflight as usize,
            spin: Duration::from_micros(cfg.spin_us),
        }))
    }

    /// The client, for connections that must not share the multiplexed one
    /// (pub/sub, blocking reads).
    pub fn client(&self) -> &redis::Client {
        &self.client
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

    /// A connection for a request, or `UNAVAILABLE` at once while Redis is down.
    pub fn connection(&self) -> Result<ConnectionManager, BackendError> {
        if self.is_up() {
            Ok(self.conn.clone())
        } else {
            Err(BackendError::Unavailable(format!(
                "no connection to {}; reconnecting",
                self.url
            )))
        }
    }

    /// Maps a redis error, and marks Redis down when the error says the connection is
    /// gone or stuck, so the next requests fail fast until the probe succeeds.
    pub fn classify(&self, e: redis::RedisError) -> BackendError {
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

    /// A slot for one command on the shared connection; hold it until the reply.
    pub async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.inflight.clone().acquire_owned().await.ok()
    }

    /// Runs one command through the gate.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BackendError> {
        let _permit = self.permit().await;
        let mut conn = self.connection()?;
        let reply = cmd.query_async(&mut conn);
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

    fn mark_down(&self, e: &redis::RedisError) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(url = %self.url, error = %e, "lost the connection to redis; requests get UNAVAILABLE until it is back");
            self.wake_probe.notify_one();
        }
    }

    /// One PING; updates the up/down state. Returns whether Redis answered.
    pub async fn probe(&self) -> bool {
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
                true
            }
            Err(e) => {
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(url = %self.url, error = %e, "redis stopped answering");
                }
                false
            }
        }
    }

    /// Probes Redis until shutdown: every 250 ms while down, every second while up,
    /// and at once when a request saw the connection fail.
    pub async fn run_health(self: Arc<Self>, shutdown: CancellationToken) {
        let mut logged_down_hint = false;
        loop {
            let ok = self.probe().await;
            if !ok && !logged_down_hint {
                tracing::error!(
                    url = %self.url,
                    "cannot reach redis at {}; satchel keeps running and retries every {} ms. \
                     Start one with `redis-server --port 6379` (Debian/Ubuntu: `sudo apt-get install redis-server`) \
                     or point SATCHEL_REDIS_URL / [redis] url at yours",
                    self.url,
                    RETRY_AFTER.as_millis()
                );
                logged_down_hint = true;
            }
            if ok {
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

/// Polls `fut`, yielding to the runtime between polls, for up to `spin` and while
/// `keep` holds; then waits for it normally.
async fn spin_then_wait<F: std::future::Future>(
    fut: F,
    spin: Duration,
    keep: impl Fn() -> bool,
) -> F::Output {
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
