//! The cache-aside service: `cache.*` ops over Redis.
//!
//! Values are stored as the exact MessagePack bytes the client sent, so every type
//! comes back as it went in. Leases (`cache.fetch` / `cache.fill`) let exactly one
//! caller load a missing key while the others wait for its fill; `set`, `del` and
//! `invalidate` void outstanding leases so a fill computed from stale data is refused.
//! Invalidation is eager and batched (SPOP of tag sets, SCAN of prefixes), so Redis
//! never blocks for long and no bookkeeping outlives its keys. The key layout is in
//! [`keys`] and protocol.md.

mod bulk;
mod direct;
mod keys;
mod leases;
pub mod near;
mod scripts;
pub mod tracked;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::tracking::{InvalidationSink, Tracking};
use crate::backend::{Backend, BackendError};
use crate::config::CacheConfig;
pub use crate::config::{MAX_LEASE_MS, MAX_WAIT_MS};
use crate::peer::Peer;
use crate::protocol::msgpack::Writer;
use crate::protocol::{ErrorCode, OpError, Request};
use crate::service::{OpResult, RequestCtx, Service};
use crate::stats::{Counter, Sample};
pub use direct::{Fetched as DirectFetch, Value};
use keys::{KeySpace, decode_blob, encode_blob};
use leases::{Handoff, Watch, Watches};
use near::{Lookup, NearCache};
use scripts::Scripts;
use tracked::Tracked;

/// Most tags one entry may carry.
pub const MAX_TAGS: usize = 64;
/// Keys deleted per Redis call during tag invalidation (bounds each script's run time).
const TAG_BATCH: usize = 500;
/// SCAN COUNT per Redis call during prefix invalidation.
const SCAN_COUNT: usize = 1000;
/// While pub/sub is down, waiting callers' watches re-check this often.
const POLL_WITHOUT_EVENTS: Duration = Duration::from_millis(100);

pub const OPS: &[&str] = &[
    "cache.get",
    "cache.mget",
    "cache.set",
    "cache.del",
    "cache.fetch",
    "cache.fill",
    "cache.invalidate",
    "cache.track",
    "cache.untrack",
];

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    Request(#[from] OpError),
    #[error("`{field}` is {size} bytes, the limit is {limit}")]
    TooLarge {
        field: &'static str,
        size: usize,
        limit: u64,
    },
    #[error("{count} {what} in one request; {key} is {limit}")]
    TooMany {
        field: &'static str,
        what: &'static str,
        count: usize,
        limit: u64,
        key: &'static str,
    },
    #[error("the answer would be {size} bytes; server.max_response_bytes is {limit}")]
    AnswerTooLarge { size: u64, limit: u64 },
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("isolate_by_uid is on but the peer's uid is unknown")]
    NoPeerUid,
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
}

impl From<CacheError> for OpError {
    fn from(e: CacheError) -> OpError {
        let message = e.to_string();
        match e {
            CacheError::Request(op) => op,
            CacheError::TooLarge { field, .. } | CacheError::TooMany { field, .. } => {
                OpError::new(ErrorCode::TooLarge, message).with_field(field)
            }
            CacheError::AnswerTooLarge { .. } => {
                OpError::new(ErrorCode::TooLarge, message).with_field("keys")
            }
            CacheError::Invalid { field, .. } => {
                OpError::new(ErrorCode::BadRequest, message).with_field(field)
            }
            CacheError::NoPeerUid => OpError::new(ErrorCode::Forbidden, message),
            CacheError::Backend(b) => b.into(),
            CacheError::Reply(_) => OpError::new(ErrorCode::Internal, message),
        }
    }
}

type CacheResult = Result<Vec<u8>, CacheError>;

/// Counters for the `cache` section of `stats`.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: Counter,
    pub misses: Counter,
    pub sets: Counter,
    pub deletes: Counter,
    pub leases_granted: Counter,
    pub lease_waits: Counter,
    pub fills_stored: Counter,
    pub fills_rejected: Counter,
    pub invalidations: Counter,
    pub invalidated_keys: Counter,
}

impl CacheStats {
    pub fn samples(&self) -> Vec<Sample> {
        vec![
            Sample::counter("cache.hits", self.hits.get()),
            Sample::counter("cache.misses", self.misses.get()),
            Sample::counter("cache.sets", self.sets.get()),
            Sample::counter("cache.deletes", self.deletes.get()),
            Sample::counter("cache.leases_granted", self.leases_granted.get()),
            Sample::counter("cache.lease_waits", self.lease_waits.get()),
            Sample::counter("cache.fills_stored", self.fills_stored.get()),
            Sample::counter("cache.fills_rejected", self.fills_rejected.get()),
            Sample::counter("cache.invalidations", self.invalidations.get()),
            Sample::counter("cache.invalidated_keys", self.invalidated_keys.get()),
        ]
    }
}

/// Where the service spawns its watch tasks; set by [`Service::start`].
struct Runtime {
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// The service itself, for the tasks it spawns (weak: no cycle).
    this: Weak<CacheService>,
}

/// The cache service; one per daemon, shared by all connections.
pub struct CacheService {
    backend: Arc<Backend>,
    scripts: Scripts,
    watches: Arc<Watches>,
    pub stats: CacheStats,
    seq_key: String,
    channel: String,
    /// The shared namespace's keys (every request uses them unless isolate_by_uid).
    shared: KeySpace,
    runtime: OnceLock<Runtime>,
    /// The near-cache and its tracking connection (None with `cache.near = false`).
    near: Option<Near>,
    /// Which keys each `cache.track` connection read.
    tracked: Arc<Tracked>,
}

/// Where Redis' invalidations go: the near-cache, and the tracking connections.
struct Sink {
    near: Arc<NearCache>,
    tracked: Arc<Tracked>,
}

impl InvalidationSink for Sink {
    fn invalidate(&self, keys: &[&[u8]]) {
        self.near.invalidate(keys);
        for key in keys {
            if let Ok(k) = std::str::from_utf8(key) {
                self.tracked.changed(k);
            }
        }
    }

    fn flush(&self) {
        self.near.flush();
        self.tracked.flush_all();
    }

    fn clear(&self) {
        self.near.clear();
        self.tracked.flush_all();
    }

    /// Values read while tracking was down were read without Redis tracking them:
    /// tracking connections drop them now.
    fn tracking_on(&self) {
        self.tracked.flush_all();
    }
}

/// The near-cache and the Redis tracking that keeps it coherent.
struct Near {
    cache: Arc<NearCache>,
    tracking: Arc<Tracking>,
}

impl std::fmt::Debug for CacheService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheService").finish_non_exhaustive()
    }
}

/// What `cache.fetch` found in Redis.
enum Fetched {
    Hit(Bytes),
    Wait(u64),
    Granted(String),
}

/// A stored blob read for a key (header + MessagePack value, as Redis holds it).
#[derive(Debug, Clone)]
pub struct Read {
    pub blob: Bytes,
    /// A near entry standing in for an unavailable Redis (`max_stale_ms`).
    pub stale: bool,
}

impl Read {
    fn fresh(blob: Bytes) -> Read {
        Read { blob, stale: false }
    }

    /// The MessagePack value and the TTL left (ms), or None for a blob satchel did
    /// not write.
    pub fn value(&self) -> Option<(Bytes, u64)> {
        let (value, ttl) = decode_blob(&self.blob)?;
        let start = value.as_ptr() as usize - self.blob.as_ptr() as usize;
        Some((self.blob.slice(start..start + value.len()), ttl))
    }
}

/// What a `cache.fetch` found, before it is encoded.
#[derive(Debug, Clone)]
pub enum Fetch {
    Read(Read),
    /// The caller loads the value and fills it with this token.
    Lease(String),
    /// Load without filling (another caller holds the lease and did not finish in time).
    Miss,
}

impl CacheService {
    pub fn new(backend: Arc<Backend>, cfg: &CacheConfig) -> Arc<CacheService> {
        let prefix = backend.prefix().to_owned();
        let tracked = Arc::new(Tracked::default());
        let near = cfg.near.then(|| {
            let cache = NearCache::new(cfg);
            let sink = Sink {
                near: cache.clone(),
                tracked: tracked.clone(),
            };
            Near {
                tracking: Tracking::new(Arc::new(sink)),
                cache,
            }
        });
        Arc::new(CacheService {
            near,
            tracked,
            backend,
            scripts: Scripts::default(),
            watches: Arc::new(Watches::default()),
            stats: CacheStats::default(),
            seq_key: keys::seq_key(&prefix),
            channel: keys::events_channel(&prefix),
            shared: KeySpace::new(&prefix, "s"),
            runtime: OnceLock::new(),
        })
    }

    /// Runs one `cache.*` op.
    async fn run_op(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        let cfg = &ctx.config.cache;
        let ks = self.keyspace(cfg, ctx.peer)?;
        let sid = ctx.session.id;
        if self.backend.is_cluster() {
            hashable_on_a_cluster(req)?;
        }
        let result = match req.op() {
            "cache.get" => self.get(cfg, &ks, sid, req).await,
            "cache.mget" => {
                let max_response = ctx.config.server.max_response_bytes;
                Box::pin(self.mget(cfg, max_response, &ks, sid, req)).await
            }
            "cache.set" => self.set(cfg, &ks, req).await,
            "cache.del" => Box::pin(self.del(cfg, &ks, req)).await,
            // Boxed: their futures are large and would make every request's future
            // (moved into the connection's FuturesUnordered) as large.
            "cache.fetch" => Box::pin(self.fetch(cfg, &ks, sid, req)).await,
            "cache.fill" => Box::pin(self.fill(cfg, &ks, req)).await,
            "cache.invalidate" => Box::pin(self.invalidate(cfg, &ks, req)).await,
            "cache.track" => self.track(&ks, ctx.session),
            "cache.untrack" => {
                self.tracked.untrack(sid);
                Ok(tracking_answer(false))
            }
            other => Err(
                OpError::new(ErrorCode::UnknownOp, format!("unknown op `{other}`"))
                    .with_field("op")
                    .into(),
            ),
        };
        result.map_err(OpError::from)
    }

    pub(crate) fn keyspace(&self, cfg: &CacheConfig, peer: &Peer) -> Result<KeySpace, CacheError> {
        if cfg.isolate_by_uid {
            let uid = peer.uid.ok_or(CacheError::NoPeerUid)?;
            Ok(KeySpace::new(self.backend.prefix(), &format!("u{uid}")))
        } else {
            Ok(self.shared.clone())
        }
    }

    /// `cache.track`: this connection hears of changes to what it reads. Needs the
    /// near-cache's Redis tracking: without it the daemon would not learn of other
    /// writers' changes.
    fn track(&self, ks: &KeySpace, session: &crate::push::Session) -> CacheResult {
        if self.near.is_none() {
            return Err(invalid(
                "op",
                "cache.track needs cache.near = true: the daemon learns of other writers' changes through the near-cache's Redis tracking",
            ));
        }
        self.tracked.track(session, ks.value_prefix_len());
        Ok(tracking_answer(true))
    }

    async fn get(&self, cfg: &CacheConfig, ks: &KeySpace, sid: u64, req: &Request) -> CacheResult {
        let key = checked_key(cfg, "key", req.str("key")?)?;
        let allow = stale_allowance(cfg, req)?;
        let read = self.read_one(cfg, ks, sid, key, allow).await?;
        Ok(match read {
            Some(r) => get_answer(&self.stats, Some(&r.blob), r.stale),
            None => get_answer(&self.stats, None, false),
        })
    }

    /// `cache.get` before its answer is encoded: the key's stored blob, from the
    /// near-cache or Redis, or (`allow`, Redis unavailable) a stale near entry.
    pub(crate) async fn read_one(
        &self,
        cfg: &CacheConfig,
        ks: &KeySpace,
        sid: u64,
        key: &str,
        allow: Option<Duration>,
    ) -> Result<Option<Read>, CacheError> {
        let vkey = ks.value(key);
        self.tracked
            .reading(sid, [vkey.as_str()], cfg.track_max_keys);
        if let Some(entry) = self.near_hit(&vkey) {
            return Ok(Some(Read::fresh(entry.blob.clone())));
        }
        match self.read_value(cfg, &vkey).await {
            Ok(blob) => Ok(blob.map(Read::fresh)),
            Err(e) => match self.stale(&vkey, allow, &e) {
                Some(entry) => Ok(Some(Read {
                    blob: entry.blob.clone(),
                    stale: true,
                })),
                None => Err(e.into()),
            },
        }
    }

    /// A fresh near entry for `vkey`, counting the near hit or miss.
    fn near_hit(&self, vkey: &str) -> Option<Arc<near::NearEntry>> {
        let near = self.near.as_ref()?;
        match near.cache.lookup(vkey) {
            Lookup::Fresh(entry) => {
                near.cache.stats.hits.inc();
                Some(entry)
            }
            _ => {
                near.cache.stats.misses.inc();
                None
            }
        }
    }

    /// While Redis is unavailable, a stale near entry the request allows, counted
    /// as served.
    fn stale(
        &self,
        vkey: &str,
        allow: Option<Duration>,
        e: &BackendError,
    ) -> Option<Arc<near::NearEntry>> {
        let entry = self.stale_entry(vkey, allow, e)?;
        self.count_stale(1);
        Some(entry)
    }

    /// As [`CacheService::stale`], not yet counted.
    fn stale_entry(
        &self,
        vkey: &str,
        allow: Option<Duration>,
        e: &BackendError,
    ) -> Option<Arc<near::NearEntry>> {
        let allow = allow?;
        if !matches!(e, BackendError::Unavailable(_) | BackendError::Timeout(_)) {
            return None;
        }
        self.near.as_ref()?.cache.stale_for(vkey, allow)
    }

    fn count_stale(&self, n: usize) {
        if let Some(near) = &self.near {
            near.cache.stats.stale_served.add(n as u64);
        }
    }

    /// Reads one value key from Redis: through the tracking connection (and into
    /// the near-cache) when tracking is on, else through the shared connection.
    async fn read_value(
        &self,
        cfg: &CacheConfig,
        vkey: &str,
    ) -> Result<Option<Bytes>, BackendError> {
        let cmd = redis::cmd("GET").arg(vkey).to_owned();
        if let Some(near) = &self.near {
            let ticket = near.cache.begin(vkey);
            if let Some(blob) = self
                .backend
                .query_tracked::<Option<Vec<u8>>>(&near.tracking, &cmd)
                .await?
            {
                let blob = blob.map(Bytes::from);
                ticket.finish(blob.as_ref(), cfg);
                return Ok(blob);
            }
        }
        Ok(self
            .backend
            .query::<Option<Vec<u8>>>(&cmd)
            .await?
            .map(Bytes::from))
    }

    /// This daemon changed or removed `vkey` in Redis: drop the near entry and void
    /// reads in flight, before the write is answered (read-your-writes).
    fn forget(&self, vkey: &str) {
        if let Some(near) = &self.near {
            near.cache.forget(vkey);
        }
        self.tracked.changed(vkey);
    }

    async fn mget(
        &self,
        cfg: &CacheConfig,
        max_response: u64,
        ks: &KeySpace,
        sid: u64,
        req: &Request,
    ) -> CacheResult {
        let keys = checked_keys(cfg, req.str_list("keys")?)?;
        let allow = stale_allowance(cfg, req)?;
        self.read_many(cfg, ks, sid, &keys, max_response, allow)
            .await
    }

    async fn set(&self, cfg: &CacheConfig, ks: &KeySpace, req: &Request) -> CacheResult {
        let entry = Entry::from_request(cfg, req)?;
        self.set_one(ks, &entry).await?;
        Ok(stored(true))
    }

    /// `cache.set` before its answer is encoded.
    pub(crate) async fn set_one(&self, ks: &KeySpace, entry: &Entry<'_>) -> Result<(), CacheError> {
        self.store(None, ks, entry).await?;
        self.stats.sets.inc();
        Ok(())
    }

    /// Stores `{key, value, ttl_ms?, tags?}`: with SET, or with FILL when `lease` is
    /// given (then 1 stored, 0 lease not held, -1 a tag was invalidated after the
    /// lease was granted).
    ///
    /// Why this order keeps "no stale fill after an invalidation of a tag" without one
    /// script over the value and its tags (which a Redis Cluster cannot run: they sit
    /// in different slots): the key joins each tag's set first, then the tags'
    /// invalidation records are read, then the value is written under the lease. An
    /// invalidation ordered after the lease (a higher seq) either wrote its record
    /// before the read (the fill sees it and stores nothing) or pops the tag's set
    /// after the key joined it, deleting the lease (the fill is refused) or the value
    /// just filled.
    async fn store(
        &self,
        lease: Option<&str>,
        ks: &KeySpace,
        entry: &Entry<'_>,
    ) -> Result<i64, CacheError> {
        let Entry {
            key,
            value,
            ttl_ms: ttl,
            ref tags,
        } = *entry;
        let vkey = ks.value(key);
        let outcome = async {
            let joined = futures::future::try_join_all(tags.iter().map(|t| {
                let tkey = ks.tag_members(t);
                async move {
                    self.backend
                        .invoke::<i64>(self.scripts.tag_add.key(&tkey).arg(key).arg(ttl))
                        .await
                }
            }));
            joined.await?;
            let Some(lease) = lease else {
                let mut inv = self.scripts.set.key(&vkey);
                inv.key(ks.lease(key))
                    .arg(encode_blob(ttl, value))
                    .arg(ttl)
                    .arg(&self.channel);
                return self.backend.invoke::<i64>(&inv).await;
            };
            let invalidated = self.tag_invalidated_since(ks, tags, lease).await?;
            let mut inv = self.scripts.fill.key(&vkey);
            inv.key(ks.lease(key))
                .arg(lease)
                .arg(encode_blob(ttl, value))
                .arg(ttl)
                .arg(&self.channel)
                .arg(if invalidated { "1" } else { "0" });
            self.backend.invoke::<i64>(&inv).await
        }
        .await;
        // Even after an error: the write may have happened.
        self.forget(&vkey);
        Ok(outcome?)
    }

    /// Whether any of `tags` was invalidated after `lease` was granted (its seq is
    /// the number before the dot). A token that is not ours is "no": the FILL
    /// script refuses it anyway.
    async fn tag_invalidated_since(
        &self,
        ks: &KeySpace,
        tags: &[&str],
        lease: &str,
    ) -> Result<bool, BackendError> {
        let Some(granted) = lease
            .split_once('.')
            .and_then(|(seq, _)| seq.parse::<u64>().ok())
        else {
            return Ok(false);
        };
        let records = futures::future::try_join_all(tags.iter().map(|t| {
            let ti = ks.tag_invalidated(t);
            async move {
                self.backend
                    .query::<Option<u64>>(redis::cmd("GET").arg(&ti))
                    .await
            }
        }))
        .await?;
        Ok(records.into_iter().flatten().any(|seq| seq > granted))
    }

    async fn del(&self, cfg: &CacheConfig, ks: &KeySpace, req: &Request) -> CacheResult {
        let keys = checked_keys(cfg, req.str_list("keys")?)?;
        let deleted = self.del_many(ks, &keys).await?;
        let mut w = Writer::new();
        w.map(1).str("deleted").uint(deleted);
        Ok(w.into_vec())
    }

    /// `cache.del` before its answer is encoded: how many values existed.
    pub(crate) async fn del_many(&self, ks: &KeySpace, keys: &[&str]) -> Result<u64, CacheError> {
        let deleted = self.delete_many(ks, keys).await?;
        self.stats.deletes.add(deleted);
        Ok(deleted)
    }

    async fn fetch(
        &self,
        cfg: &CacheConfig,
        ks: &KeySpace,
        sid: u64,
        req: &Request,
    ) -> CacheResult {
        let key = checked_key(cfg, "key", req.str("key")?)?;
        let lease_ms = checked_lease_ms(cfg, req.opt_positive("lease_ms")?)?;
        let wait_ms = checked_wait_ms(cfg, req.opt_int("wait_ms")?)?;
        let allow = stale_allowance(cfg, req)?;
        let fetched = self
            .fetch_one(cfg, ks, sid, key, lease_ms, wait_ms, allow)
            .await?;
        Ok(self.fetch_answer(fetched))
    }

    /// The wire answer of a fetch, counting hits (a foreign blob counts as a miss).
    fn fetch_answer(&self, fetched: Fetch) -> Vec<u8> {
        match fetched {
            Fetch::Read(r) => get_answer(&self.stats, Some(&r.blob), r.stale),
            Fetch::Lease(token) => lease_granted(token),
            Fetch::Miss => miss(),
        }
    }

    /// `cache.fetch` before its answer is encoded: a read, a lease for the caller to
    /// load and fill, or a miss to load without filling.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fetch_one(
        &self,
        cfg: &CacheConfig,
        ks: &KeySpace,
        sid: u64,
        key: &str,
        lease_ms: u64,
        wait_ms: u64,
        allow: Option<Duration>,
    ) -> Result<Fetch, CacheError> {
        let vkey = ks.value(key);
        self.tracked
            .reading(sid, [vkey.as_str()], cfg.track_max_keys);
        if let Some(entry) = self.near_hit(&vkey) {
            return Ok(Fetch::Read(Read::fresh(entry.blob.clone())));
        }
        // Someone in this daemon already waits for this key: share their wait.
        if wait_ms > 0 && self.watches.contains(&vkey) {
            return Ok(self.wait_for(vkey, ks.lease(key), lease_ms, wait_ms).await);
        }
        // A hit, the common case, is one plain GET: the lease script would do the same
        // GET first, but a script call costs Redis and the daemon more (Node getOrSet
        // hits, 64 in flight: 1.5-1.8x the throughput this way, BENCHMARKS.md). Only a
        // miss runs the script, which looks again atomically before leasing.
        match self.read_value(cfg, &vkey).await {
            Ok(Some(blob)) => return Ok(Fetch::Read(Read::fresh(blob))),
            Ok(None) => {}
            Err(e) => {
                return match self.stale(&vkey, allow, &e) {
                    Some(entry) => Ok(Fetch::Read(Read {
                        blob: entry.blob.clone(),
                        stale: true,
                    })),
                    None => Err(e.into()),
                };
            }
        }
        Ok(
            match self.fetch_once(&vkey, &ks.lease(key), lease_ms).await? {
                Fetched::Hit(blob) => Fetch::Read(Read::fresh(blob)),
                Fetched::Granted(token) => Fetch::Lease(token),
                Fetched::Wait(_) if wait_ms == 0 => Fetch::Miss,
                Fetched::Wait(_) => self.wait_for(vkey, ks.lease(key), lease_ms, wait_ms).await,
            },
        )
    }

    async fn fetch_once(
        &self,
        vkey: &str,
        lkey: &str,
        lease_ms: u64,
    ) -> Result<Fetched, CacheError> {
        // The seq orders the lease against tag invalidations. It is taken before the
        // script (a cluster keeps it in another slot than the key): a lease the
        // script then does not grant only wastes a number.
        let seq: u64 = self
            .backend
            .query(redis::cmd("INCR").arg(&self.seq_key))
            .await?;
        let token = format!("{seq}.{:016x}", rand_u64());
        let reply: redis::Value = self
            .backend
            .invoke(
                self.scripts
                    .fetch
                    .key(vkey)
                    .key(lkey)
                    .arg(lease_ms)
                    .arg(&token),
            )
            .await?;
        let (kind, payload): (i64, redis::Value) =
            redis::from_redis_value(reply).map_err(|e| CacheError::Reply(e.to_string()))?;
        let fetched = match kind {
            1 => Fetched::Hit(Bytes::from(
                redis::from_redis_value::<Vec<u8>>(payload)
                    .map_err(|e| CacheError::Reply(e.to_string()))?,
            )),
            2 => Fetched::Wait(redis::from_redis_value::<i64>(payload).unwrap_or(0).max(1) as u64),
            3 => {
                self.stats.leases_granted.inc();
                Fetched::Granted(
                    redis::from_redis_value::<String>(payload)
                        .map_err(|e| CacheError::Reply(e.to_string()))?,
                )
            }
            other => return Err(CacheError::Reply(format!("fetch script returned {other}"))),
        };
        Ok(fetched)
    }

    /// Waits, with the other callers of this daemon, for the key's fill or for a lease.
    async fn wait_for(&self, vkey: String, lkey: String, lease_ms: u64, wait_ms: u64) -> Fetch {
        self.stats.lease_waits.inc();
        let (rx, created) = self.watches.join(&vkey, lease_ms);
        if let Some(watch) = created {
            match self
                .runtime
                .get()
                .and_then(|rt| Some((rt, rt.this.upgrade()?)))
            {
                Some((rt, this)) => {
                    let shutdown = rt.shutdown.child_token();
                    rt.tasks
                        .spawn(async move { this.run_watch(vkey, lkey, watch, shutdown).await });
                }
                None => {
                    tracing::error!("cache service used before it was started; not waiting");
                    self.watches.retire(&vkey);
                }
            }
        }
        match tokio::time::timeout(Duration::from_millis(wait_ms), rx).await {
            Ok(Ok(Handoff::Value(blob))) => Fetch::Read(Read::fresh(blob)),
            Ok(Ok(Handoff::Lease(token))) => Fetch::Lease(token),
            // Timed out, or the daemon is stopping: load without filling.
            _ => {
                self.stats.misses.inc();
                Fetch::Miss
            }
        }
    }

    /// The shared wait of one key: re-checks Redis when an event arrives for the key
    /// or the lease runs out, hands a fresh lease to one waiter, the value to all.
    async fn run_watch(
        &self,
        vkey: String,
        lkey: String,
        watch: Arc<Watch>,
        shutdown: CancellationToken,
    ) {
        // Check at once: an event that came before this watch existed is not lost.
        let mut pause = Duration::ZERO;
        loop {
            if !pause.is_zero() {
                if !self.watches.events_live.load(Ordering::Relaxed) {
                    pause = pause.min(POLL_WITHOUT_EVENTS);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        self.watches.retire(&vkey);
                        return;
                    }
                    _ = watch.changed.notified() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            let Some(lease_ms) = watch.next_lease_ms() else {
                if self.watches.retire_if_idle(&vkey, &watch) {
                    return;
                }
                continue;
            };
            match self.fetch_once(&vkey, &lkey, lease_ms).await {
                Ok(Fetched::Hit(blob)) => {
                    self.watches.retire(&vkey);
                    watch.hand_value(blob);
                    return;
                }
                Ok(Fetched::Granted(token)) => {
                    if let Some(unused) = watch.hand_lease(token) {
                        self.release(&lkey, &vkey, &unused).await;
                    }
                    pause = Duration::from_millis(lease_ms);
                }
                Ok(Fetched::Wait(remaining)) => pause = Duration::from_millis(remaining + 1),
                Err(_) => pause = POLL_WITHOUT_EVENTS,
            }
        }
    }

    async fn release(&self, lkey: &str, vkey: &str, token: &str) {
        // Best effort: if it fails, the lease simply runs out.
        let _: Result<i64, _> = self
            .backend
            .invoke(
                self.scripts
                    .release
                    .key(lkey)
                    .key(vkey)
                    .arg(token)
                    .arg(&self.channel),
            )
            .await;
    }

    async fn fill(&self, cfg: &CacheConfig, ks: &KeySpace, req: &Request) -> CacheResult {
        checked_key(cfg, "key", req.str("key")?)?;
        let lease = req.str("lease")?;
        let entry = Entry::from_request(cfg, req)?;
        Ok(stored(self.fill_one(ks, lease, &entry).await?))
    }

    /// `cache.fill` before its answer is encoded: whether the value was stored.
    pub(crate) async fn fill_one(
        &self,
        ks: &KeySpace,
        lease: &str,
        entry: &Entry<'_>,
    ) -> Result<bool, CacheError> {
        let ok = self.store(Some(lease), ks, entry).await? == 1;
        if ok {
            self.stats.fills_stored.inc();
        } else {
            self.stats.fills_rejected.inc();
        }
        Ok(ok)
    }

    async fn invalidate(&self, cfg: &CacheConfig, ks: &KeySpace, req: &Request) -> CacheResult {
        let tags = req.opt_str_list("tags")?.unwrap_or_default();
        let prefix = req.opt_str("prefix")?;
        let named = tags.len() + prefix.is_some() as usize;
        if named as u64 > cfg.max_invalidations_per_request {
            return Err(CacheError::TooMany {
                field: "tags",
                what: "tags and prefixes",
                count: named,
                limit: cfg.max_invalidations_per_request,
                key: "cache.max_invalidations_per_request",
            });
        }
        for t in &tags {
            checked_key(cfg, "tags", t)?;
        }
        if let Some(p) = prefix {
            checked_key(cfg, "prefix", p)?;
        }
        if tags.is_empty() && prefix.is_none() {
            return Err(invalid("tags", "give `tags`, `prefix`, or both"));
        }
        let mut deleted = 0u64;
        for tag in &tags {
            // First the record (fills of leases granted before it are refused), then
            // the keys that carry the tag.
            let seq: u64 = self
                .backend
                .query(redis::cmd("INCR").arg(&self.seq_key))
                .await?;
            let _: () = self
                .backend
                .query(
                    redis::cmd("SET")
                        .arg(ks.tag_invalidated(tag))
                        .arg(seq)
                        .arg("PX")
                        .arg(MAX_LEASE_MS + 10_000),
                )
                .await?;
            let (tkey, pkey) = (ks.tag_members(tag), ks.tag_popped(tag));
            // What an invalidation that died half-way left, then the set itself.
            let mut members: Vec<String> = self
                .backend
                .query(redis::cmd("SMEMBERS").arg(&pkey))
                .await?;
            loop {
                if !members.is_empty() {
                    let keys: Vec<&str> = members.iter().map(String::as_str).collect();
                    deleted += self.delete_many(ks, &keys).await?;
                    let _: i64 = self
                        .backend
                        .query(redis::cmd("SREM").arg(&pkey).arg(&members))
                        .await?;
                }
                members = self
                    .backend
                    .invoke(self.scripts.pop_tagged.key(&tkey).key(&pkey).arg(TAG_BATCH))
                    .await?;
                if members.is_empty() {
                    break;
                }
            }
        }
        if let Some(prefix) = prefix {
            let pattern = ks.prefix_pattern(prefix);
            for node in self.backend.primaries().await? {
                let mut cursor = "0".to_owned();
                loop {
                    let (next, found): (String, Vec<String>) = self
                        .backend
                        .query_at(
                            &node,
                            redis::cmd("SCAN")
                                .arg(&cursor)
                                .arg("MATCH")
                                .arg(&pattern)
                                .arg("COUNT")
                                .arg(SCAN_COUNT),
                        )
                        .await?;
                    let mut keys: Vec<&str> = found.iter().filter_map(|k| ks.key_of(k)).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    deleted += self.delete_many(ks, &keys).await?;
                    if next == "0" {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        self.stats.invalidations.inc();
        self.stats.invalidated_keys.add(deleted);
        let mut w = Writer::new();
        w.map(1).str("deleted").uint(deleted);
        Ok(w.into_vec())
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> CacheError {
    CacheError::Invalid {
        field,
        message: message.into(),
    }
}

/// On a Redis Cluster a key or tag that begins with `}` would give its Redis keys an
/// empty hash tag: Redis would hash each whole, putting a key's value and lease (or
/// a tag's two sets) in different slots, where no script can touch both.
/// On a Redis Cluster a key or tag may not begin with `}`: its Redis keys would get
/// an empty hash tag, hashing the value and its lease to different slots.
fn hashable(field: &'static str, k: &str) -> Result<(), CacheError> {
    if k.starts_with('}') {
        Err(invalid(
            field,
            "on a Redis Cluster a key or tag may not begin with `}` (Redis would hash its value and lease to different slots)",
        ))
    } else {
        Ok(())
    }
}

fn hashable_on_a_cluster(req: &Request) -> Result<(), CacheError> {
    let one = hashable;
    if let Ok(Some(k)) = req.opt_str("key") {
        one("key", k)?;
    }
    for (field, list) in [
        ("keys", req.opt_str_list("keys")),
        ("tags", req.opt_str_list("tags")),
    ] {
        for k in list.ok().flatten().unwrap_or_default() {
            one(field, k)?;
        }
    }
    Ok(())
}

pub(crate) fn checked_key<'a>(
    cfg: &CacheConfig,
    field: &'static str,
    key: &'a str,
) -> Result<&'a str, CacheError> {
    if key.is_empty() {
        return Err(invalid(field, format!("`{field}` must not be empty")));
    }
    if key.len() as u64 > cfg.max_key_bytes {
        return Err(CacheError::TooLarge {
            field,
            size: key.len(),
            limit: cfg.max_key_bytes,
        });
    }
    Ok(key)
}

/// What `cache.set` and `cache.fill` store, checked against the limits.
#[derive(Debug)]
pub struct Entry<'a> {
    pub key: &'a str,
    /// One MessagePack value, stored as given.
    pub value: &'a [u8],
    pub ttl_ms: u64,
    pub tags: Vec<&'a str>,
}

impl<'a> Entry<'a> {
    fn from_request(cfg: &CacheConfig, req: &'a Request) -> Result<Entry<'a>, CacheError> {
        Ok(Entry {
            key: checked_key(cfg, "key", req.str("key")?)?,
            value: checked_value(cfg, req.raw("value"))?,
            ttl_ms: req.opt_positive("ttl_ms")?.unwrap_or(cfg.default_ttl_ms),
            tags: checked_tags(cfg, req.opt_str_list("tags")?.unwrap_or_default())?,
        })
    }

    /// The same checks for a caller in this process. `value` must be exactly one
    /// MessagePack value (a socket client's is checked as part of its frame).
    pub fn new(
        cfg: &CacheConfig,
        key: &'a str,
        value: &'a [u8],
        ttl_ms: Option<u64>,
        tags: Vec<&'a str>,
    ) -> Result<Entry<'a>, CacheError> {
        crate::protocol::msgpack::validate_one(value)
            .map_err(|e| invalid("value", format!("not one MessagePack value: {e}")))?;
        Ok(Entry {
            key: checked_key(cfg, "key", key)?,
            value: checked_value(cfg, Some(value))?,
            ttl_ms: match ttl_ms {
                Some(0) => return Err(invalid("ttl_ms", "ttl_ms must be positive")),
                Some(ms) => ms,
                None => cfg.default_ttl_ms,
            },
            tags: checked_tags(cfg, tags)?,
        })
    }
}

/// A fetch's `lease_ms` (default `cache.lease_ms`, at most [`MAX_LEASE_MS`]).
pub(crate) fn checked_lease_ms(cfg: &CacheConfig, asked: Option<u64>) -> Result<u64, CacheError> {
    match asked {
        Some(ms) if ms > MAX_LEASE_MS => Err(invalid(
            "lease_ms",
            format!("lease_ms is at most {MAX_LEASE_MS}"),
        )),
        Some(ms) => Ok(ms),
        None => Ok(cfg.lease_ms),
    }
}

/// A fetch's `wait_ms` (default `cache.wait_ms`, 0 ..= [`MAX_WAIT_MS`]).
pub(crate) fn checked_wait_ms(cfg: &CacheConfig, asked: Option<i64>) -> Result<u64, CacheError> {
    match asked {
        Some(ms) if !(0..=MAX_WAIT_MS as i64).contains(&ms) => Err(invalid(
            "wait_ms",
            format!("wait_ms must be 0..={MAX_WAIT_MS}"),
        )),
        Some(ms) => Ok(ms as u64),
        None => Ok(cfg.wait_ms),
    }
}

/// The `keys` of `mget` / `del`: at most `max_keys_per_request`, each a valid key.
pub(crate) fn checked_keys<'a>(
    cfg: &CacheConfig,
    keys: Vec<&'a str>,
) -> Result<Vec<&'a str>, CacheError> {
    if keys.len() as u64 > cfg.max_keys_per_request {
        return Err(CacheError::TooMany {
            field: "keys",
            what: "keys",
            count: keys.len(),
            limit: cfg.max_keys_per_request,
            key: "cache.max_keys_per_request",
        });
    }
    for k in &keys {
        checked_key(cfg, "keys", k)?;
    }
    Ok(keys)
}

fn checked_value<'a>(cfg: &CacheConfig, value: Option<&'a [u8]>) -> Result<&'a [u8], CacheError> {
    let value = value.ok_or_else(|| invalid("value", "field `value` is required"))?;
    if value.len() as u64 > cfg.max_value_bytes {
        return Err(CacheError::TooLarge {
            field: "value",
            size: value.len(),
            limit: cfg.max_value_bytes,
        });
    }
    Ok(value)
}

pub(crate) fn checked_tags<'a>(
    cfg: &CacheConfig,
    tags: Vec<&'a str>,
) -> Result<Vec<&'a str>, CacheError> {
    if tags.len() > MAX_TAGS {
        return Err(invalid(
            "tags",
            format!("at most {MAX_TAGS} tags per entry"),
        ));
    }
    for t in &tags {
        checked_key(cfg, "tags", t)?;
    }
    Ok(tags)
}

/// The answer to a read for a blob (None: a miss), counting it: `{hit: true, value,
/// ttl_ms}`, or `{hit: true, value, stale: true}` for a near entry standing in for an
/// unavailable Redis (its TTL may be past), or `{hit: false}`.
fn get_answer(stats: &CacheStats, blob: Option<&[u8]>, stale: bool) -> Vec<u8> {
    let mut w = Writer::with_capacity(blob.map_or(8, |b| b.len() + 32));
    match blob.and_then(decode_blob) {
        Some((value, ttl)) => {
            stats.hits.inc();
            w.map(3).str("hit").bool(true).str("value").raw(value);
            if stale {
                w.str("stale").bool(true);
            } else {
                w.str("ttl_ms").uint(ttl);
            }
        }
        None => {
            stats.misses.inc();
            w.map(1).str("hit").bool(false);
        }
    }
    w.into_vec()
}

/// `max_stale_ms` of a read: how old a stale near entry may be to stand in for
/// Redis while it is unavailable (capped by `cache.max_stale_ms`; absent: never).
fn stale_allowance(cfg: &CacheConfig, req: &Request) -> Result<Option<Duration>, CacheError> {
    match req.opt_int("max_stale_ms")? {
        None => Ok(None),
        Some(ms) if ms < 0 => Err(invalid("max_stale_ms", "max_stale_ms must be >= 0")),
        Some(ms) => Ok(Some(Duration::from_millis(
            (ms as u64).min(cfg.max_stale_ms),
        ))),
    }
}

fn tracking_answer(on: bool) -> Vec<u8> {
    let mut w = Writer::with_capacity(12);
    w.map(1).str("tracking").bool(on);
    w.into_vec()
}

fn stored(ok: bool) -> Vec<u8> {
    let mut w = Writer::with_capacity(10);
    w.map(1).str("stored").bool(ok);
    w.into_vec()
}

fn miss() -> Vec<u8> {
    let mut w = Writer::with_capacity(6);
    w.map(1).str("hit").bool(false);
    w.into_vec()
}

fn lease_granted(token: String) -> Vec<u8> {
    let mut w = Writer::with_capacity(token.len() + 16);
    w.map(2).str("hit").bool(false).str("lease").str(&token);
    w.into_vec()
}

/// A random lease suffix: unguessable enough that one caller cannot fill with
/// another's lease by accident (not a security boundary: use isolate_by_uid for that).
fn rand_u64() -> u64 {
    fastrand::u64(..)
}

impl Service for CacheService {
    fn ops(&self) -> &'static [&'static str] {
        OPS
    }

    fn handle<'a>(&'a self, ctx: RequestCtx<'a>, req: &'a Request) -> BoxFuture<'a, OpResult> {
        self.run_op(ctx, req).boxed()
    }

    fn start(self: Arc<Self>, tasks: &TaskTracker, shutdown: &CancellationToken) {
        let _ = self.runtime.set(Runtime {
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            this: Arc::downgrade(&self),
        });
        tasks.spawn(self.watches.clone().run_events(
            self.backend.clone(),
            self.channel.clone(),
            shutdown.child_token(),
        ));
        if let Some(near) = &self.near {
            tasks.spawn(
                near.tracking
                    .clone()
                    .run(self.backend.clone(), shutdown.child_token()),
            );
        }
    }

    fn disconnected(&self, session: u64) {
        self.tracked.untrack(session);
    }

    fn stats(&self) -> BoxFuture<'_, Vec<Sample>> {
        let mut samples = self.stats.samples();
        samples.extend([
            Sample::gauge(
                "cache.tracking.connections",
                self.tracked.connections() as u64,
            ),
            Sample::counter(
                "cache.tracking.invalidations_pushed",
                self.tracked.invalidations_pushed.get(),
            ),
            Sample::counter(
                "cache.tracking.flushes_pushed",
                self.tracked.flushes_pushed.get(),
            ),
        ]);
        match &self.near {
            Some(near) => samples.extend(near.cache.samples(near.tracking.connection().is_some())),
            None => samples.extend(NearCache::disabled_samples()),
        }
        futures::future::ready(samples).boxed()
    }
}
