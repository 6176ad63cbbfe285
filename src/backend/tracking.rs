//! The tracking connection: Redis server-assisted client-side caching
//! (`CLIENT TRACKING ON`, RESP3 pushes) for the near-cache.
//!
//! Cache value reads that may be kept in the daemon's memory go through this one
//! connection, so Redis remembers exactly the keys this daemon may hold and tells it,
//! on the same connection, when any writer changes one (another daemon, an app
//! writing Redis directly, expiry, eviction, `FLUSHALL`).
//!
//! Why the race between a read in flight and an invalidation is closed: the redis
//! crate hands each push to [`InvalidationSink`] synchronously, from the task that
//! parses the connection's frames, in their order. A reply is delivered to its
//! waiting task only after that, and the near-cache registers a "pending" mark for a
//! key before it sends the read; an invalidation that finds the mark voids it, and
//! the reply is then not stored (rueidis, node-redis 5 and Lettuce do the same).
//!
//! On a Redis Cluster the daemon cannot read every key through one connection: it
//! opens one tracking connection per primary in broadcast mode (`CLIENT TRACKING ON
//! BCAST PREFIX <prefix>:c:`: every change of a cache key on that primary is
//! announced, whoever read it) and reads through the shared cluster connection. The
//! pending marks keep the race closed there too: a write the server ran after a
//! read may announce itself before or after the read's reply arrives on the other
//! connection; before, the mark is void and the reply not kept; after, the kept
//! entry is dropped. A change of the cluster's primaries (failover, resharding), or a
//! tracking connection to a node that is no longer a primary, is a loss.
//!
//! Tracking loss is a flush: when the connection drops, or the heartbeat (a PING
//! every 250 ms) gets no answer within 750 ms, the sink is flushed (the near-cache's
//! epoch moves on: reads begun before are not stored, entries read before are not
//! served as hits), and nothing new is read through tracking until a new connection
//! has it on again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio_util::sync::CancellationToken;

use super::{Backend, BackendError, Clients, Conn, Primary};

/// How often the heartbeat pings the tracking connection.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// A ping unanswered this long means tracking is lost (detected within 1 s).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(750);

/// What the near-cache does with what Redis says.
pub trait InvalidationSink: Send + Sync + 'static {
    /// These keys may have changed: drop them, and void pending reads of them.
    fn invalidate(&self, keys: &[&[u8]]);
    /// Tracking was lost: nothing read so far is verified any more (entries may
    /// still stand in, marked stale, while Redis is unavailable).
    fn flush(&self);
    /// Every key is gone (`FLUSHALL`, `FLUSHDB`): drop everything.
    fn clear(&self);
    /// A new tracking connection is live (after the first, this follows a loss).
    fn tracking_on(&self) {}
}

/// One tracking connection and whether it is still usable: false from its
/// disconnect push or a missed heartbeat on. Per connection, so the late disconnect
/// of an old connection never marks its successor down.
struct Live {
    /// Where tracked reads go: the tracking connection itself (one server), or the
    /// shared cluster connection (broadcast tracking does not need reads to share it).
    read: Conn,
    /// The connections the pushes come on: one, or one per cluster primary.
    watched: Vec<MultiplexedConnection>,
    alive: Arc<AtomicBool>,
    /// The backend node it tracks; a failover to another master ends it.
    generation: u64,
    /// Cluster: the primaries tracking was turned on at.
    primaries: Vec<(String, u16)>,
}

/// The tracking side of the backend. One per daemon, when the near-cache is on.
pub struct Tracking {
    live: ArcSwapOption<Live>,
    sink: Arc<dyn InvalidationSink>,
}

impl Tracking {
    pub fn new(sink: Arc<dyn InvalidationSink>) -> Arc<Tracking> {
        Arc::new(Tracking {
            live: ArcSwapOption::empty(),
            sink,
        })
    }

    /// The connection to read through; None while tracking is down.
    pub fn connection(&self) -> Option<Conn> {
        let live = self.live.load();
        let live = live.as_deref()?;
        live.alive
            .load(Ordering::Acquire)
            .then(|| live.read.clone())
    }

    /// Ends the sink's current epoch: nothing read in it is stored or served as fresh.
    /// (Its disconnect push may have done so already, the moment the socket closed.)
    fn lose(&self, live: &Live, why: &str) {
        self.live.store(None);
        if live.alive.swap(false, Ordering::AcqRel) {
            self.sink.flush();
        }
        tracing::warn!(
            reason = why,
            "near-cache tracking lost; no near hits until it is back"
        );
    }

    /// Keeps a tracking connection up until shutdown: connects, turns tracking on,
    /// pings it, and starts over (with a flush) whenever it fails.
    pub async fn run(self: Arc<Self>, backend: Arc<Backend>, shutdown: CancellationToken) {
        loop {
            // On an error Redis is still down: nothing to flush, and the backend's
            // probe logs the outage.
            if let Ok(live) = self.connect(&backend).await {
                let live = Arc::new(live);
                self.live.store(Some(live.clone()));
                self.sink.tracking_on();
                tracing::info!("near-cache tracking is on");
                let why = self.heartbeat(&backend, &live, &shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
                self.lose(&live, why);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(super::RETRY_AFTER) => {}
            }
        }
    }

    /// What each tracking connection does with a push: invalidations to the sink,
    /// and its end as a flush (synchronous with the connection's end: no reply read
    /// after it can be stored).
    fn on_push(
        &self,
        alive: &Arc<AtomicBool>,
    ) -> impl Fn(PushInfo) -> Result<(), redis::aio::SendError> + Send + Sync + 'static {
        let sink = self.sink.clone();
        let up = alive.clone();
        move |push: PushInfo| {
            match push.kind {
                PushKind::Invalidate => match push.data.first() {
                    Some(Value::Array(keys)) => {
                        let keys: Vec<&[u8]> = keys
                            .iter()
                            .filter_map(|k| match k {
                                Value::BulkString(b) => Some(&b[..]),
                                _ => None,
                            })
                            .collect();
                        sink.invalidate(&keys);
                    }
                    // A nil key list: FLUSHALL / FLUSHDB.
                    _ => sink.clear(),
                },
                PushKind::Disconnection if up.swap(false, Ordering::AcqRel) => sink.flush(),
                _ => {}
            }
            Ok(())
        }
    }

    /// A RESP3 connection from `client` whose pushes go to the sink, with
    /// `CLIENT TRACKING ON` and `extra` arguments.
    async fn open(
        &self,
        backend: &Backend,
        client: &redis::Client,
        alive: &Arc<AtomicBool>,
        extra: &[&str],
    ) -> Result<MultiplexedConnection, BackendError> {
        let conn_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(backend.connect_timeout))
            .set_response_timeout(Some(backend.response_timeout))
            .set_push_sender(self.on_push(alive));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&conn_cfg)
            .await
            .map_err(|e| backend.classify(e))?;
        let _: Value = redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg(extra)
            .query_async(&mut conn)
            .await
            .map_err(|e| backend.classify(e))?;
        Ok(conn)
    }

    async fn connect(&self, backend: &Backend) -> Result<Live, BackendError> {
        let alive = Arc::new(AtomicBool::new(true));
        let node = backend.node()?;
        match &node.clients {
            Clients::One { resp3, .. } => {
                let conn = self.open(backend, resp3, &alive, &[]).await?;
                Ok(Live {
                    read: Conn::Plain(conn.clone()),
                    watched: vec![conn],
                    alive,
                    generation: node.generation,
                    primaries: Vec::new(),
                })
            }
            Clients::Cluster { .. } => {
                let prefix = format!("{}:c:", backend.prefix());
                let primaries = cluster_primaries(backend).await?;
                let mut watched = Vec::new();
                for (host, port) in &primaries {
                    let client = backend.client_for(host, *port, true)?;
                    let conn = self
                        .open(backend, &client, &alive, &["BCAST", "PREFIX", &prefix])
                        .await?;
                    watched.push(conn);
                }
                Ok(Live {
                    read: node.conn.clone(),
                    watched,
                    alive,
                    generation: node.generation,
                    primaries,
                })
            }
        }
    }

    /// Pings until a ping fails or times out; returns why. On a cluster it asks
    /// `ROLE` instead (a tracking connection to a demoted primary hears nothing of
    /// the writes that now go elsewhere) and, every second, whether the primaries
    /// are still the ones tracking was turned on at.
    async fn heartbeat(
        &self,
        backend: &Backend,
        live: &Live,
        shutdown: &CancellationToken,
    ) -> &'static str {
        let cluster = !live.primaries.is_empty();
        let mut beats = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return "shutdown",
                _ = backend.node_changed(live.generation) => return "the redis master moved",
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
            if !live.alive.load(Ordering::Acquire) {
                return "the connection closed";
            }
            for conn in &live.watched {
                let mut conn = conn.clone();
                let cmd = redis::cmd(if cluster { "ROLE" } else { "PING" });
                match tokio::time::timeout(HEARTBEAT_TIMEOUT, cmd.query_async::<Value>(&mut conn))
                    .await
                {
                    Ok(Ok(Value::Array(role)))
                        if cluster
                            && !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") =>
                    {
                        return "a tracked node is no longer a primary";
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return "the connection failed",
                    Err(_) => return "the heartbeat went unanswered",
                }
            }
            beats += 1;
            if cluster && beats.is_multiple_of(4) {
                match tokio::time::timeout(HEARTBEAT_TIMEOUT, cluster_primaries(backend)).await {
                    Ok(Ok(now)) if now == live.primaries => {}
                    Ok(Ok(_)) => return "the cluster's primaries changed",
                    _ => return "the cluster's primaries could not be read",
                }
            }
        }
    }
}

/// The cluster's primaries, sorted (so two answers compare equal).
async fn cluster_primaries(backend: &Backend) -> Result<Vec<(String, u16)>, BackendError> {
    let mut out: Vec<(String, u16)> = backend
        .primaries()
        .await?
        .into_iter()
        .filter_map(|p| match p {
            Primary::At(h, port) => Some((h, port)),
            Primary::Only => None,
        })
        .collect();
    out.sort();
    Ok(out)
}
