//! The durable mail queue: apps hand mail to satchel with `mail.send` and move on;
//! satchel delivers every accepted message or visibly dead-letters it.
//!
//! - [`message`]: request fields → a validated, rendered RFC 5322 message (text parts
//!   through `qp`, a one-pass quoted-printable encoder).
//! - [`queue`]: the Redis keys and the Lua scripts of every status transition.
//! - [`batch`]: group commit, so concurrent `mail.send`s share one script run.
//! - [`worker`]: the consumer-group delivery loop, retries, reclaim, schedule.
//! - [`transport`]: the choice of [`smtp`] (our own nodelay connection pool) or
//!   [`file`] (`.eml` files), and what a delivery's result means.
//! - [`status`]: the statuses, as Rust and the scripts name them.
//!
//! Statuses: `queued → sending → sent`, with `scheduled → queued` when `send_at_ms`
//! comes, `sending → retrying → queued` on transient failures, `sending → dead` on
//! permanent ones, `dead → queued` by `mail.retry`, and `queued | scheduled | retrying
//! → cancelled` by `mail.cancel`.

pub mod batch;
pub mod bounce;
pub mod dkim;
pub mod events;
pub mod file;
pub mod message;
mod qp;
pub mod queue;
pub mod smtp;
pub mod status;
pub mod template;
pub mod transport;
pub mod webhooks;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{Backend, BackendError};
use crate::config::{Config, OnRedisDown};
use crate::protocol::{ErrorCode, OpError, Request, encode_result as encode};
use crate::service::{OpResult, RequestCtx, Service};
use crate::stats::{Counter, Level, Sample};
use queue::Queue;
pub use status::MailStatus;
use transport::{SendError, Transport};

/// The ops of this module, as `hello` lists them.
pub const OPS: &[&str] = &[
    "mail.send",
    "mail.status",
    "mail.cancel",
    "mail.retry",
    "mail.dead",
    "mail.events",
    "mail.suppression.list",
    "mail.suppression.add",
    "mail.suppression.remove",
    "mail.template.put",
    "mail.template.get",
    "mail.template.delete",
    "mail.template.list",
];

/// Longest accepted idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Default and cap of `mail.events {limit}`, and the longest `wait_ms`.
const EVENTS_DEFAULT_LIMIT: u64 = 100;
const EVENTS_MAX_LIMIT: u64 = 1000;
const EVENTS_MAX_WAIT_MS: i64 = 30_000;
/// Default and cap of `mail.dead {limit}`.
const DEAD_DEFAULT_LIMIT: u64 = 100;
const DEAD_MAX_LIMIT: u64 = 1000;
/// A `mail.send` frame larger than this is parsed and rendered on the blocking pool
/// (base64 of a 10 MiB attachment takes tens of ms), never on the runtime thread
/// that serves every connection.
const RENDER_INLINE_BYTES: usize = 8 * 1024;
/// How long `stats` waits for the queue counts from Redis.
const STATS_REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("{message}")]
    Invalid { field: String, message: String },
    #[error("{message}")]
    TooLarge { field: String, message: String },
    #[error("no mail with id {0} (unknown, or its status record expired)")]
    NotFound(String),
    #[error("mail {mail_id} is {status}; only dead mail can be retried")]
    NotDead { mail_id: String, status: MailStatus },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("redis is down and direct delivery failed: {0}")]
    Direct(SendError),
    #[error("mail.isolate_by_uid is on but the peer's uid is unknown")]
    NoPeerUid,
    /// A loaded key failed to sign (not expected: the key was checked at load).
    #[error("cannot DKIM-sign for {domain}: {message}")]
    Signing { domain: String, message: String },
}

impl MailError {
    pub fn code(&self) -> ErrorCode {
        match self {
            MailError::Invalid { .. } => ErrorCode::InvalidMail,
            MailError::TooLarge { .. } => ErrorCode::TooLarge,
            MailError::NotFound(_) => ErrorCode::NotFound,
            MailError::NotDead { .. } => ErrorCode::BadRequest,
            MailError::Backend(e) => e.code(),
            MailError::Direct(e) if e.is_transient() => ErrorCode::Unavailable,
            MailError::Direct(_) => ErrorCode::InvalidMail,
            MailError::NoPeerUid => ErrorCode::Forbidden,
            MailError::Signing { .. } => ErrorCode::Internal,
        }
    }
}

impl From<MailError> for OpError {
    fn from(e: MailError) -> OpError {
        match e {
            MailError::Backend(b) => b.into(),
            MailError::Invalid { ref field, .. } | MailError::TooLarge { ref field, .. } => {
                let field = field.clone();
                OpError::new(e.code(), e.to_string()).with_field(&field)
            }
            MailError::NotDead { .. } => {
                OpError::new(e.code(), e.to_string()).with_field("mail_id")
            }
            MailError::Direct(ref d) if d.is_transient() => {
                OpError::new(e.code(), e.to_string()).with_retry_after(1000)
            }
            MailError::Direct(_) => OpError::new(e.code(), e.to_string()).with_field("to"),
            MailError::NotFound(_) | MailError::NoPeerUid | MailError::Signing { .. } => {
                OpError::new(e.code(), e.to_string())
            }
        }
    }
}

/// Counters of this daemon's deliveries (the queue-wide counts live in Redis).
#[derive(Debug, Default)]
pub struct MailCounters {
    /// Deliveries in flight right now.
    pub sending: Level,
    pub sent: Counter,
    pub retried: Counter,
    pub dead: Counter,
    /// Entries taken over from a dead consumer.
    pub reclaimed: Counter,
    /// Stream entries not yet acknowledged (undelivered + in flight), sampled.
    pub queue_depth: AtomicU64,
    /// Mails sent per second by this daemon over the last seconds, ×1000.
    pub rate_milli: AtomicU64,
    /// `mail.send`s answered with fewer replicas than `mail.min_replicas_ack`.
    pub under_replicated: Counter,
    /// When an under-replicated send was last logged (unix ms; one line per 10 s).
    under_replicated_logged_ms: AtomicU64,
}

/// The mail service: its ops, and the delivery workers it starts.
pub struct MailService {
    backend: Arc<Backend>,
    config: Arc<ArcSwap<Config>>,
    queue: Queue,
    enqueuer: Arc<batch::Enqueuer>,
    transport: Arc<Transport>,
    /// Renders running on the blocking pool at once: half the CPUs (at least one),
    /// so that big renders leave a core to the runtime thread and to Redis on a
    /// small host; more would only queue, holding their messages in memory.
    render_slots: Arc<tokio::sync::Semaphore>,
    pub counters: MailCounters,
    /// Wakes `mail.events` long polls.
    tail: events::Tail,
    /// Signed webhooks (run when `mail.webhook_url` is set at start).
    webhooks: Arc<webhooks::Webhooks>,
    /// This daemon's consumer name in the group: unique per process.
    consumer: String,
}

impl std::fmt::Debug for MailService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailService")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl MailService {
    pub fn new(
        backend: Arc<Backend>,
        config: Arc<ArcSwap<Config>>,
    ) -> Result<Arc<MailService>, String> {
        let cfg = config.load();
        let queue = Queue::new(backend.prefix(), backend.is_cluster(), cfg.mail.events_max);
        Ok(Arc::new(MailService {
            queue: queue.clone(),
            enqueuer: Arc::default(),
            transport: Arc::new(Transport::from_config(&cfg.mail)?),
            counters: MailCounters::default(),
            tail: events::Tail::default(),
            webhooks: Arc::new(webhooks::Webhooks::new(&queue.events)?),
            render_slots: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2)),
            )),
            consumer: format!(
                "{}-{}-{:04x}",
                crate::host::hostname(),
                std::process::id(),
                fastrand::u16(..)
            ),
            backend,
            config: config.clone(),
        }))
    }

    /// Counts a send that fewer replicas than asked acknowledged, and logs it (at
    /// most once per 10 s: while a replica is gone, every send is one).
    fn under_replicated(&self, mail_id: &str, acked: u64, want: u64) {
        let c = &self.counters;
        c.under_replicated.inc();
        let now = crate::host::now_ms();
        let last = c.under_replicated_logged_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && c.under_replicated_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %mail_id,
                acked,
                want,
                total = c.under_replicated.get(),
                "mail queued but fewer replicas than mail.min_replicas_ack acknowledged it"
            );
        }
    }

    /// Routes one `mail.*` request.
    async fn run_op(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        match req.op() {
            "mail.send" => self.send(ctx, req).await,
            "mail.status" => self.status(ctx, req).await,
            "mail.cancel" => self.cancel(ctx, req).await,
            "mail.retry" => self.retry(ctx, req).await,
            "mail.dead" => self.dead(ctx, req).await,
            "mail.events" => self.events(ctx, req).await,
            "mail.suppression.list" => self.suppression_list(ctx, req).await,
            "mail.suppression.add" => self.suppression_add(ctx, req).await,
            "mail.suppression.remove" => self.suppression_remove(ctx, req).await,
            "mail.template.put" => self.template_put(ctx, req).await,
            "mail.template.get" => self.template_get(req).await,
            "mail.template.delete" => self.template_delete(ctx, req).await,
            "mail.template.list" => self.template_list().await,
            other => Err(OpError::new(
                ErrorCode::UnknownOp,
                format!("unknown op `{other}`; `hello` lists the ops this server knows"),
            )
            .with_field("op")),
        }
    }
}

impl Service for MailService {
    fn ops(&self) -> &'static [&'static str] {
        OPS
    }

    fn handle<'a>(&'a self, ctx: RequestCtx<'a>, req: &'a Request) -> BoxFuture<'a, OpResult> {
        self.run_op(ctx, req).boxed()
    }

    fn start(self: Arc<Self>, tasks: &TaskTracker, shutdown: &CancellationToken) {
        self.enqueuer.start(tasks);
        let (me, token) = (self.clone(), shutdown.child_token());
        tasks.spawn(async move {
            me.tail
                .run(me.backend.clone(), me.queue.clone(), token)
                .await
        });
        if !self.config.load().mail.webhook_url.is_empty() {
            tasks.spawn(
                self.webhooks
                    .clone()
                    .run(self.clone(), shutdown.child_token()),
            );
        }
        tasks.spawn(worker::run(
            self.clone(),
            shutdown.child_token(),
            tasks.clone(),
        ));
    }

    fn stats(&self) -> BoxFuture<'_, Vec<Sample>> {
        self.samples().boxed()
    }

    fn status_line(&self) -> Option<String> {
        Some(format!(
            "mail queue {}, sending {}",
            self.counters.queue_depth.load(Ordering::Relaxed),
            self.counters.sending.get()
        ))
    }
}

/// A new mail id: time-ordered hex (ms) + 64 random bits.
pub fn new_mail_id() -> String {
    format!("{:011x}{:016x}", crate::host::now_ms(), fastrand::u64(..))
}

/// What `mail.send` answers.
#[derive(Debug, Clone, Serialize)]
pub struct SendResult {
    pub mail_id: String,
    pub status: MailStatus,
    pub duplicate: bool,
    /// Replicas holding the mail, when `mail.min_replicas_ack` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u64>,
    /// Recipients not sent to: they are on the suppression list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub suppressed: Vec<String>,
}

#[derive(Serialize)]
struct Stored {
    stored: bool,
}

#[derive(Serialize)]
struct Deleted {
    deleted: bool,
}

#[derive(Serialize)]
struct TemplateOut<'a> {
    name: &'a str,
    subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    html: Option<&'a str>,
}

#[derive(Serialize)]
struct TemplateList {
    templates: Vec<String>,
}

#[derive(Serialize)]
struct Added {
    added: bool,
}

#[derive(Serialize)]
struct Removed {
    removed: bool,
}

#[derive(Serialize)]
struct SuppressionPage {
    entries: Vec<queue::Suppressed>,
    /// The next page's cursor; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
}

#[derive(Serialize)]
struct EventsResult {
    events: Vec<events::Event>,
    cursor: String,
}

/// What `mail.status` answers.
#[derive(Debug, Clone, Serialize)]
pub struct StatusResult {
    /// The sender's uid: only in an admin's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    pub mail_id: String,
    pub status: MailStatus,
    pub attempts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<u64>,
    pub updated_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

#[derive(Serialize)]
struct CancelResult {
    cancelled: bool,
}

#[derive(Serialize)]
struct RetryResult {
    status: MailStatus,
}

#[derive(Serialize)]
struct DeadEntry {
    /// The sender's uid: only in an admin's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    mail_id: String,
    to: Vec<String>,
    subject: String,
    attempts: u64,
    last_error: String,
    dead_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    class: Option<String>,
}

/// The checks of `mail.send` fields that `message::build` does not make.
fn check_draft(draft: &message::Draft) -> Result<(), MailError> {
    if let Some(key) = &draft.idempotency_key
        && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(MailError::Invalid {
            field: "idempotency_key".into(),
            message: format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
        });
    }
    if draft.send_at_ms.is_some_and(|ms| ms < 0) {
        return Err(MailError::Invalid {
            field: "send_at_ms".into(),
            message: "send_at_ms must be a Unix time in ms".into(),
        });
    }
    Ok(())
}

/// The suppression list and the templates are shared by every app on the Redis:
/// with `mail.isolate_by_uid` only admins change them (the list names other apps'
/// recipients, and one app's entry or template would change another's mail).
fn admins_only(ctx: RequestCtx<'_>, what: &str) -> Result<(), OpError> {
    let mc = &ctx.config.mail;
    let admin = ctx.peer.uid.is_some_and(|u| mc.admin_uids.contains(&u));
    if mc.isolate_by_uid && !admin {
        return Err(OpError::new(
            ErrorCode::Forbidden,
            format!("with mail.isolate_by_uid, {what} is for mail.admin_uids only"),
        ));
    }
    Ok(())
}

/// `name`: 1-128 bytes of letters, digits, `.`, `_`, `-`.
fn template_name(req: &Request) -> Result<&str, OpError> {
    let n = req.str("name")?;
    let ok = !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(OpError::bad_request(
            "name",
            "a template name is 1 to 128 letters, digits, '.', '_' or '-'",
        ));
    }
    Ok(n)
}

/// `address`: one mail address (no display name, no CR/LF), normalized.
fn suppression_address(req: &Request) -> Result<String, OpError> {
    let a = req.str("address")?;
    if a.len() > 320 || a.contains(['\r', '\n']) || a.parse::<lettre::Address>().is_err() {
        return Err(OpError::bad_request(
            "address",
            format!("not a mail address: {a:?}"),
        ));
    }
    Ok(bounce::normalize(a))
}

/// Whose mail this caller may see, and whether it is an admin (`mail.admin_uids`,
/// whose answers name each mail's owner).
fn scope_of(ctx: RequestCtx<'_>) -> Result<(queue::Scope, bool), MailError> {
    let mc = &ctx.config.mail;
    let admin = ctx.peer.uid.is_some_and(|u| mc.admin_uids.contains(&u));
    if !mc.isolate_by_uid || admin {
        return Ok((queue::Scope::All, admin));
    }
    let uid = ctx.peer.uid.ok_or(MailError::NoPeerUid)?;
    Ok((queue::Scope::Owner(uid), false))
}

fn mail_id(req: &Request) -> Result<&str, OpError> {
    let id = req.str("mail_id")?;
    if id.is_empty() || id.len() > 128 {
        return Err(OpError::bad_request(
            "mail_id",
            "mail_id must be 1 to 128 bytes",
        ));
    }
    Ok(id)
}

impl MailService {
    /// Reads, checks and renders a `mail.send`: inline when small, else on the
    /// blocking pool (at most `render_slots` at once).
    async fn render(
        &self,
        req: &Request,
        limits: message::Limits,
    ) -> Result<(message::Draft, message::Built), OpError> {
        let signs = limits.signs();
        let stored = match req.opt_str("template")? {
            None => None,
            Some(name) => {
                if ["subject", "text", "html"]
                    .iter()
                    .any(|f| req.raw(f).is_some())
                {
                    return Err(MailError::Invalid {
                        field: "template".into(),
                        message: "give either template (with vars) or subject/text/html".into(),
                    }
                    .into());
                }
                let t = self
                    .queue
                    .template_get(&self.backend, name)
                    .await?
                    .ok_or_else(|| MailError::Invalid {
                        field: "template".into(),
                        message: format!(
                            "no template named {name:?} (mail.template.put makes one)"
                        ),
                    })?;
                Some(t)
            }
        };
        let work = {
            let req = req.clone();
            move || -> Result<_, OpError> {
                let mut draft = message::Draft::from_request(&req)?;
                if let Some(t) = stored {
                    let vars = match req.raw("vars") {
                        None => serde_json::Value::Null,
                        Some(raw) => {
                            let v = rmpv::decode::read_value(&mut &raw[..]).map_err(|e| {
                                OpError::bad_request("vars", format!("`vars`: {e}"))
                            })?;
                            template::to_json(&v)
                        }
                    };
                    let r = t.render(&vars).map_err(|p| MailError::Invalid {
                        field: p.field.into(),
                        message: p.message,
                    })?;
                    draft.subject = r.subject;
                    draft.text = r.text;
                    draft.html = r.html;
                }
                check_draft(&draft)?;
                let built = message::build(&draft, &limits, new_mail_id())?;
                Ok((draft, built))
            }
        };
        if req.frame_len() <= RENDER_INLINE_BYTES && !signs {
            return work();
        }
        let _slot = self.render_slots.acquire().await;
        tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
            Err(OpError::new(
                ErrorCode::Internal,
                format!("rendering the mail failed: {e}"),
            ))
        })
    }

    async fn send(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        self.may_send(ctx)?;
        let (draft, built) = self
            .render(req, message::Limits::of(&ctx.config.mail))
            .await?;
        let template = req.opt_str("template")?.map(str::to_owned);
        encode(&self.enqueue_built(ctx, draft, built, template).await?)
    }

    /// `mail.send` of a draft made in this process (no template): checked, rendered
    /// (off the runtime thread when large or signed) and queued as the wire op does.
    pub async fn send_draft(
        &self,
        ctx: RequestCtx<'_>,
        draft: message::Draft,
    ) -> Result<SendResult, OpError> {
        self.may_send(ctx)?;
        let limits = message::Limits::of(&ctx.config.mail);
        let size = draft.text.as_ref().map_or(0, String::len)
            + draft.html.as_ref().map_or(0, String::len)
            + draft
                .attachments
                .iter()
                .map(|a| a.data.len())
                .sum::<usize>();
        let inline = size <= RENDER_INLINE_BYTES && !limits.signs();
        let work = move || -> Result<_, OpError> {
            check_draft(&draft)?;
            let built = message::build(&draft, &limits, new_mail_id())?;
            Ok((draft, built))
        };
        let (draft, built) = if inline {
            work()?
        } else {
            let _slot = self.render_slots.acquire().await;
            tokio::task::spawn_blocking(work)
                .await
                .unwrap_or_else(|e| {
                    Err(OpError::new(
                        ErrorCode::Internal,
                        format!("rendering the mail failed: {e}"),
                    ))
                })?
        };
        self.enqueue_built(ctx, draft, built, None).await
    }

    /// Whether this caller may send now: its uid is known when mail is isolated by
    /// uid, and Redis is durable when `redis.require_durable` asks.
    fn may_send(&self, ctx: RequestCtx<'_>) -> Result<(), OpError> {
        if ctx.config.mail.isolate_by_uid && ctx.peer.uid.is_none() {
            return Err(MailError::NoPeerUid.into());
        }
        if ctx.config.redis.require_durable
            && let Some(d) = self.backend.durability()
            && let Some(why) = d.warnings.first()
        {
            return Err(OpError::new(
                ErrorCode::Unavailable,
                format!("redis.require_durable is on and Redis is not durable: {why}"),
            )
            .with_retry_after(1000));
        }
        Ok(())
    }

    /// Queues a rendered mail (or, Redis down and `on_redis_down = "direct"`, sends
    /// it at once).
    async fn enqueue_built(
        &self,
        ctx: RequestCtx<'_>,
        draft: message::Draft,
        built: message::Built,
        template: Option<String>,
    ) -> Result<SendResult, OpError> {
        let mc = &ctx.config.mail;
        let send_at = draft.send_at_ms.map_or(0, |ms| ms.max(0) as u64);
        let settings = batch::EnqueueSettings {
            idem_ttl_ms: mc.idempotency_ttl_ms,
            retention_ms: mc.status_retention_ms,
            suppression: mc.suppression,
            ack: mc.replica_ack(),
        };
        let enqueued = match self.backend.ensure_up() {
            // Known down: fail (or send directly) at once, without waiting for a batch.
            Err(e) => Err((e, Some(built))),
            Ok(()) => {
                let new = queue::NewMail {
                    built,
                    send_at_ms: send_at,
                    // Per uid when isolated: two apps' keys never collide.
                    idempotency_key: draft.idempotency_key.clone().map(|k| {
                        match (mc.isolate_by_uid, ctx.peer.uid) {
                            (true, Some(uid)) => format!("u{uid}:{k}"),
                            _ => k,
                        }
                    }),
                    owner: ctx.peer.uid,
                    template,
                };
                // A large message goes to Redis in pieces before the (batched)
                // enqueue script adopts it.
                let stored = if new.in_body_key() {
                    self.queue
                        .store_body(&self.backend, &new.built.mail_id, &new.built.raw)
                        .await
                } else {
                    Ok(())
                };
                match stored {
                    Err(e) => Err((e, Some(new.built))),
                    Ok(()) => self
                        .enqueuer
                        .enqueue_or_return(&self.backend, &self.queue, settings, new)
                        .await
                        .map_err(|(e, new)| (e, new.map(|n| n.built))),
                }
            }
        };
        match enqueued {
            Ok(e) => {
                if let (Some(n), Some((want, _))) = (e.replicas, mc.replica_ack())
                    && n < want
                {
                    self.under_replicated(&e.mail_id, n, want);
                }
                Ok(SendResult {
                    mail_id: e.mail_id,
                    status: e.status,
                    duplicate: e.duplicate,
                    replicas: e.replicas,
                    suppressed: e.suppressed,
                })
            }
            // Only when Redis is certainly unreachable: after a timeout the mail may be
            // queued already, and a direct send could deliver it twice.
            Err((BackendError::Unavailable(why), Some(built)))
                if mc.on_redis_down == OnRedisDown::Direct =>
            {
                tracing::warn!(mail_id = %built.mail_id, reason = %why, "redis is down: sending directly");
                self.transport
                    .send(&built.from, &built.rcpts, &built.raw, &built.mail_id)
                    .await
                    .map_err(MailError::Direct)?;
                Ok(SendResult {
                    mail_id: built.mail_id,
                    status: MailStatus::Sent,
                    duplicate: false,
                    replicas: None,
                    suppressed: Vec::new(),
                })
            }
            Err((e, _)) => Err(e.into()),
        }
    }

    async fn status(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        encode(&self.status_of(ctx, mail_id(req)?).await?)
    }

    /// `mail.status` before its answer is encoded.
    pub async fn status_of(&self, ctx: RequestCtx<'_>, id: &str) -> Result<StatusResult, OpError> {
        let (scope, admin) = scope_of(ctx)?;
        let rec = self
            .queue
            .status(&self.backend, id, scope)
            .await?
            .ok_or_else(|| MailError::NotFound(id.to_owned()))?;
        Ok(StatusResult {
            uid: rec.owner.filter(|_| admin),
            mail_id: id.to_owned(),
            status: rec.status,
            attempts: rec.attempts,
            last_error: rec.last_error.filter(|e| !e.is_empty()),
            next_attempt_ms: rec.next_attempt_ms,
            updated_ms: rec.updated_ms,
            refused: rec.refused.map(|r| queue::split_list(&r)),
            class: rec.class,
            suppressed: rec.suppressed.map(|r| queue::split_list(&r)),
            template: rec.template,
        })
    }

    async fn cancel(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        let id = mail_id(req)?;
        let retention = ctx.config.mail.status_retention_ms;
        let (scope, _) = scope_of(ctx)?;
        let r = self
            .queue
            .cancel(&self.backend, id, retention, scope)
            .await?
            .ok_or_else(|| MailError::NotFound(id.to_owned()))?;
        encode(&CancelResult { cancelled: r })
    }

    async fn retry(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        let id = mail_id(req)?;
        let (scope, _) = scope_of(ctx)?;
        match self.queue.retry(&self.backend, id, scope).await? {
            Ok(()) => encode(&RetryResult {
                status: MailStatus::Queued,
            }),
            Err(None) => Err(MailError::NotFound(id.to_owned()).into()),
            Err(Some(status)) => Err(MailError::NotDead {
                mail_id: id.to_owned(),
                status,
            }
            .into()),
        }
    }

    async fn events(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        let limit = match req.opt_positive("limit")? {
            Some(n) if n > EVENTS_MAX_LIMIT => {
                return Err(OpError::bad_request(
                    "limit",
                    format!("limit is at most {EVENTS_MAX_LIMIT}"),
                ));
            }
            Some(n) => n,
            None => EVENTS_DEFAULT_LIMIT,
        };
        let wait_ms = match req.opt_int("wait_ms")? {
            Some(ms) if !(0..=EVENTS_MAX_WAIT_MS).contains(&ms) => {
                return Err(OpError::bad_request(
                    "wait_ms",
                    format!("wait_ms must be 0..={EVENTS_MAX_WAIT_MS}"),
                ));
            }
            Some(ms) => ms as u64,
            None => 0,
        };
        let mail_id = req.opt_str("mail_id")?;
        let since = req.opt_str("since")?;
        let (scope, admin) = scope_of(ctx)?;
        let poll = events::Poll {
            since,
            limit: limit as usize,
            wait: std::time::Duration::from_millis(wait_ms),
            mail_id,
            scope,
            admin,
        };
        match self
            .queue
            .poll_events(&self.backend, &self.tail, poll)
            .await
        {
            Ok((events, cursor)) => encode(&EventsResult { events, cursor }),
            Err(events::CursorError::Malformed) => Err(OpError::bad_request(
                "since",
                "since must be a cursor from an earlier mail.events answer (<ms>-<seq>), or 0 for the oldest kept",
            )),
            Err(events::CursorError::Expired) => Err(OpError::bad_request(
                "since",
                "the cursor is older than the oldest event kept (mail.events_max); start again without since, or with 0",
            )),
            Err(events::CursorError::Backend(e)) => Err(e.into()),
        }
    }

    async fn suppression_list(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        admins_only(ctx, "the suppression list")?;
        let limit = match req.opt_positive("limit")? {
            Some(n) if n > DEAD_MAX_LIMIT => {
                return Err(OpError::bad_request(
                    "limit",
                    format!("limit is at most {DEAD_MAX_LIMIT}"),
                ));
            }
            Some(n) => n,
            None => DEAD_DEFAULT_LIMIT,
        };
        let cursor = match req.opt_str("cursor")? {
            None => 0,
            Some(c) => c.parse::<u64>().map_err(|_| {
                OpError::bad_request(
                    "cursor",
                    "cursor must be one from an earlier mail.suppression.list answer",
                )
            })?,
        };
        let (entries, next) = self
            .queue
            .suppression_list(&self.backend, cursor, limit)
            .await?;
        encode(&SuppressionPage {
            entries,
            cursor: next.map(|n| n.to_string()),
        })
    }

    async fn suppression_add(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        admins_only(ctx, "the suppression list")?;
        let address = suppression_address(req)?;
        let reason = req
            .opt_str("reason")?
            .unwrap_or("added by mail.suppression.add");
        if reason.len() > 1000 || reason.contains(['\r', '\n']) {
            return Err(OpError::bad_request(
                "reason",
                "reason must be one line of at most 1000 bytes",
            ));
        }
        let ttl = ctx.config.mail.suppress_ttl_ms;
        self.queue
            .suppression_add(&self.backend, &address, reason, "manual", ttl)
            .await?;
        encode(&Added { added: true })
    }

    async fn suppression_remove(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        admins_only(ctx, "the suppression list")?;
        let address = suppression_address(req)?;
        let removed = self
            .queue
            .suppression_remove(&self.backend, &address)
            .await?;
        encode(&Removed { removed })
    }

    async fn template_put(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        admins_only(ctx, "changing templates")?;
        let name = template_name(req)?;
        let max = ctx.config.mail.max_message_bytes as usize;
        let t = template::Stored {
            subject: req.str("subject")?.to_owned(),
            text: req.opt_str("text")?.map(str::to_owned),
            html: req.opt_str("html")?.map(str::to_owned),
        };
        for (field, len) in [
            ("subject", t.subject.len()),
            ("text", t.text.as_ref().map_or(0, String::len)),
            ("html", t.html.as_ref().map_or(0, String::len)),
        ] {
            if len > max {
                return Err(OpError::new(
                    ErrorCode::TooLarge,
                    format!("{field} is over mail.max_message_bytes ({max})"),
                )
                .with_field(field));
            }
        }
        t.check()
            .map_err(|p| OpError::bad_request(p.field, p.message))?;
        self.queue.template_put(&self.backend, name, &t).await?;
        encode(&Stored { stored: true })
    }

    async fn template_get(&self, req: &Request) -> OpResult {
        let name = template_name(req)?;
        let t = self
            .queue
            .template_get(&self.backend, name)
            .await?
            .ok_or_else(|| {
                OpError::new(ErrorCode::NotFound, format!("no template named {name:?}"))
            })?;
        encode(&TemplateOut {
            name,
            subject: &t.subject,
            text: t.text.as_deref(),
            html: t.html.as_deref(),
        })
    }

    async fn template_delete(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        admins_only(ctx, "changing templates")?;
        let name = template_name(req)?;
        let deleted = self.queue.template_delete(&self.backend, name).await?;
        encode(&Deleted { deleted })
    }

    async fn template_list(&self) -> OpResult {
        let names = self.queue.template_names(&self.backend).await?;
        encode(&TemplateList { templates: names })
    }

    async fn dead(&self, ctx: RequestCtx<'_>, req: &Request) -> OpResult {
        let limit = req
            .opt_positive("limit")?
            .unwrap_or(DEAD_DEFAULT_LIMIT)
            .min(DEAD_MAX_LIMIT);
        let (scope, admin) = scope_of(ctx)?;
        let rows = self.queue.dead(&self.backend, limit, scope).await?;
        let out: Vec<DeadEntry> = rows
            .into_iter()
            .map(|r| DeadEntry {
                uid: r.owner.filter(|_| admin),
                mail_id: r.mail_id,
                to: r.to,
                subject: r.subject,
                attempts: r.attempts,
                last_error: r.last_error,
                dead_ms: r.dead_ms,
                class: r.class,
            })
            .collect();
        encode(&out)
    }

    /// The `mail` section of `stats`. Queue-wide counts come from Redis and are
    /// `nil` while it is down or slow (`stats` must keep answering); `sent`, `dead`
    /// and `cancelled` count since the queue was created.
    async fn samples(&self) -> Vec<Sample> {
        let counts = match self.backend.ensure_up() {
            Ok(()) => tokio::time::timeout(STATS_REDIS_TIMEOUT, self.queue.counts(&self.backend))
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        let count = |st: MailStatus| counts.as_ref().map(|c| c.of(st));
        let c = &self.counters;
        vec![
            Sample::gauge("mail.queued", count(MailStatus::Queued)),
            Sample::gauge("mail.scheduled", count(MailStatus::Scheduled)),
            Sample::gauge("mail.sending", count(MailStatus::Sending)),
            Sample::gauge("mail.retrying", count(MailStatus::Retrying)),
            Sample::counter("mail.sent", count(MailStatus::Sent)),
            Sample::counter("mail.dead", count(MailStatus::Dead)),
            Sample::counter("mail.cancelled", count(MailStatus::Cancelled)),
            Sample::gauge("mail.queue_depth", counts.as_ref().map(|c| c.stream_len)),
            Sample::gauge("mail.local_sending", c.sending.get()),
            Sample::counter("mail.local_sent", c.sent.get()),
            Sample::counter("mail.local_retried", c.retried.get()),
            Sample::counter("mail.local_dead", c.dead.get()),
            Sample::counter("mail.local_reclaimed", c.reclaimed.get()),
            Sample::counter("mail.under_replicated", c.under_replicated.get()),
            Sample::counter(
                "mail.webhooks_delivered",
                self.webhooks.counters.delivered.get(),
            ),
            Sample::counter(
                "mail.webhooks_failed_attempts",
                self.webhooks.counters.failed_attempts.get(),
            ),
            Sample::counter(
                "mail.webhooks_dropped",
                self.webhooks.counters.dropped.get(),
            ),
            Sample::gauge(
                "mail.delivery_rate",
                c.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            ),
            Sample::gauge("mail.workers", self.config.load().mail.enabled),
        ]
    }
}
