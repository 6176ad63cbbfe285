//! satchel inside your own tokio runtime: the server on your shutdown token and task
//! tracker, and a [`Handle`] whose calls go straight to the services.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tokio_util::sync::CancellationToken;
//! use tokio_util::task::TaskTracker;
//!
//! let shutdown = CancellationToken::new();
//! let tasks = TaskTracker::new();
//! let config = satchel::Config::load(None)?; // or build one: every field has a default
//! let satchel = satchel::embed::start(config, shutdown.clone(), tasks.clone()).await?;
//! // Values are MessagePack bytes (rmp-serde, rmpv, …), as on the socket.
//! satchel.cache().set("greeting", &rmp_serde::to_vec("hello")?, Some(60_000), &[]).await?;
//! let hit = satchel.cache().get("greeting").await?;
//! // … and on the way out:
//! shutdown.cancel();
//! tasks.close();
//! tasks.wait().await;
//! # Ok(()) }
//! ```
//!
//! The socket is served as `satchel serve` serves it, so other processes on the host
//! (a Node worker, the CLI) share the same cache and queue. A [`Handle`] call skips the
//! socket, the frame and the MessagePack envelope: it runs the op's own checks and
//! core and returns typed results, with the wire's error codes ([`OpError`]). It acts
//! as this process's uid (what `isolate_by_uid` and the mail owner see). In-process
//! calls are not counted in `stats.requests` or the latency histograms; the cache's
//! hit and miss counters and the mail counters count them as any other.
//!
//! What `satchel serve` adds around the server and an embedding app does itself:
//! logging (tracing), signals, and systemd notification.

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{CacheService, DirectFetch, Value};
use crate::config::Config;
use crate::mail::message::Draft;
use crate::mail::{MailService, SendResult, StatusResult};
use crate::peer::Peer;
use crate::protocol::OpError;
use crate::push::Session;
use crate::server::{Server, ServerError};
use crate::service::RequestCtx;

pub use crate::cache::DirectFetch as Fetched;
pub use crate::cache::Value as CacheValue;
pub use crate::mail::message::{AttachmentIn as Attachment, Draft as Mail};

/// Binds the socket (or takes systemd's), reaches for Redis once, starts every
/// service and the accept loop on `tasks`, and returns the in-process handle. Cancel
/// `shutdown`, then close and wait for `tasks`, to stop.
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) -> Result<Handle, ServerError> {
    let server = Server::bind(config).await?;
    let handle = Handle {
        inner: Arc::new(Inner {
            cache: server.cache_service(),
            mail: server.mail_service(),
            config: server.shared().config.clone(),
            peer: Peer::this_process(),
            session: Session::new().0,
        }),
    };
    tasks.spawn(server.run(shutdown, tasks.clone()));
    Ok(handle)
}

/// The in-process door to a running satchel; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Arc<CacheService>,
    mail: Arc<MailService>,
    /// The live configuration (a reload through [`crate::daemon`] is not wired here:
    /// an embedding app that wants one swaps it itself).
    config: Arc<ArcSwap<Config>>,
    peer: Peer,
    /// For the request context mail ops take; nothing is ever pushed to it.
    session: Session,
}

impl Handle {
    pub fn cache(&self) -> CacheHandle<'_> {
        CacheHandle(&self.inner)
    }

    pub fn mail(&self) -> MailHandle<'_> {
        MailHandle(&self.inner)
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }
}

/// The `cache.*` ops, in process. Values are MessagePack bytes.
pub struct CacheHandle<'a>(&'a Inner);

impl CacheHandle<'_> {
    /// `cache.get`: the value and its TTL, or None on a miss.
    pub async fn get(&self, key: &str) -> Result<Option<Value>, OpError> {
        self.get_with(key, None).await
    }

    /// `cache.get` with `max_stale_ms`: while Redis is unavailable, a value this
    /// daemon held at most that long ago is answered (`stale: true`).
    pub async fn get_with(
        &self,
        key: &str,
        max_stale_ms: Option<u64>,
    ) -> Result<Option<Value>, OpError> {
        let config = self.0.config.load();
        Ok(self
            .0
            .cache
            .direct_get(&config, &self.0.peer, key, max_stale_ms)
            .await?)
    }

    /// `cache.set`.
    pub async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl_ms: Option<u64>,
        tags: &[&str],
    ) -> Result<(), OpError> {
        let config = self.0.config.load();
        Ok(self
            .0
            .cache
            .direct_set(&config, &self.0.peer, key, value, ttl_ms, tags)
            .await?)
    }

    /// `cache.del`: how many of the keys existed.
    pub async fn del(&self, keys: &[&str]) -> Result<u64, OpError> {
        let config = self.0.config.load();
        Ok(self.0.cache.direct_del(&config, &self.0.peer, keys).await?)
    }

    /// `cache.fetch` with the configured lease and wait.
    pub async fn fetch(&self, key: &str) -> Result<DirectFetch, OpError> {
        let config = self.0.config.load();
        Ok(self
            .0
            .cache
            .direct_fetch(&config, &self.0.peer, key, None, None)
            .await?)
    }

    /// `cache.fill`: whether the value was stored (false: the lease was lost or a tag
    /// was invalidated meanwhile).
    pub async fn fill(
        &self,
        key: &str,
        lease: &str,
        value: &[u8],
        ttl_ms: Option<u64>,
        tags: &[&str],
    ) -> Result<bool, OpError> {
        let config = self.0.config.load();
        Ok(self
            .0
            .cache
            .direct_fill(&config, &self.0.peer, key, lease, value, ttl_ms, tags)
            .await?)
    }

    /// Cache-aside with the herd protection of leases, as the clients' getOrSet: a
    /// hit returns the cached bytes; on a miss one caller (across every process and
    /// daemon on the Redis) runs `load` and fills, the others wait for its value.
    /// `load` returns the value's MessagePack bytes.
    pub async fn get_or_set<F, Fut, E>(
        &self,
        key: &str,
        ttl_ms: Option<u64>,
        load: F,
    ) -> Result<Result<Bytes, E>, OpError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        match self.fetch(key).await? {
            DirectFetch::Hit(v) => Ok(Ok(v.bytes)),
            DirectFetch::Lease(lease) => match load().await {
                Ok(value) => {
                    self.fill(key, &lease, &value, ttl_ms, &[]).await?;
                    Ok(Ok(Bytes::from(value)))
                }
                Err(e) => Ok(Err(e)),
            },
            DirectFetch::Miss => Ok(load().await.map(Bytes::from)),
        }
    }
}

/// The `mail.*` ops, in process.
pub struct MailHandle<'a>(&'a Inner);

impl MailHandle<'_> {
    /// `mail.send` of a mail made here (the fields of the wire op; no templates).
    pub async fn send(&self, mail: Draft) -> Result<SendResult, OpError> {
        let config = self.0.config.load_full();
        let ctx = RequestCtx {
            peer: &self.0.peer,
            config: &config,
            session: &self.0.session,
        };
        self.0.mail.send_draft(ctx, mail).await
    }

    /// `mail.status`.
    pub async fn status(&self, mail_id: &str) -> Result<StatusResult, OpError> {
        let config = self.0.config.load_full();
        let ctx = RequestCtx {
            peer: &self.0.peer,
            config: &config,
            session: &self.0.session,
        };
        self.0.mail.status_of(ctx, mail_id).await
    }
}
