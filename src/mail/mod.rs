//! The durable mail queue: apps hand mail to satchel with `mail.send` and move on;
//! satchel delivers every accepted message or visibly dead-letters it.
//!
//! - [`message`]: request fields → a validated, rendered RFC 5322 message (text parts
//!   through `qp`, a one-pass quoted-printable encoder).
//! - [`queue`]: the Redis keys and the Lua scripts of every status transition.
//! - [`batch`]: group commit, so concurrent `mail.send`s share one script run.
//! - [`worker`]: the consumer-group delivery loop, retries, reclaim, schedule.
//! - [`transport`]: SMTP through our own nodelay connection pool, or `.eml` files.
//!
//! Statuses: `queued → sending → sent`, with `scheduled → queued` when `send_at_ms`
//! comes, `sending → retrying → queued` on transient failures, `sending → dead` on
//! permanent ones, `dead → queued` by `mail.retry`, and `queued | scheduled | retrying
//! → cancelled` by `mail.cancel`.

pub mod batch;
pub mod config;
pub mod message;
mod qp;
pub mod queue;
pub mod transport;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use config::MailConfig;

use crate::backend::BackendError;
use crate::protocol::{ErrorCode, OpError, Request};
use crate::server::Shared;
use queue::Queue;
use transport::{SendError, Transport};

/// The ops of this module, as `hello` lists them.
pub const OPS: &[&str] = &[
    "mail.send",
    "mail.status",
    "mail.cancel",
    "mail.retry",
    "mail.dead",
];

/// Longest accepted idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Default and cap of `mail.dead {limit}`.
const DEAD_DEFAULT_LIMIT: u64 = 100;
const DEAD_MAX_LIMIT: u64 = 1000;
/// How long `stats` waits for the queue counts from Redis.
const STATS_REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("{message}")]
    Invalid { field: String, message: String },
    #[error("no mail with id {0} (unknown, or its status record expired)")]
    NotFound(String),
    #[error("mail {mail_id} is {status}; only dead mail can be retried")]
    NotDead { mail_id: String, status: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("redis is down and direct delivery failed: {0}")]
    Direct(SendError),
}

impl MailError {
    pub fn code(&self) -> ErrorCode {
        match self {
            MailError::Invalid { .. } => ErrorCode::InvalidMail,
            MailError::NotFound(_) => ErrorCode::NotFound,
            MailError::NotDead { .. } => ErrorCode::BadRequest,
            MailError::Backend(e) => e.code(),
            MailError::Direct(SendError::Permanent(_)) => ErrorCode::InvalidMail,
            MailError::Direct(SendError::Transient(_)) => ErrorCode::Unavailable,
        }
    }
}

impl From<MailError> for OpError {
    fn from(e: MailError) -> OpError {
        match e {
            MailError::Backend(b) => b.into(),
            MailError::Invalid { ref field, .. } => {
                let field = field.clone();
                OpError::new(e.code(), e.to_string()).with_field(&field)
            }
            MailError::NotDead { .. } => {
                OpError::new(e.code(), e.to_string()).with_field("mail_id")
            }
            MailError::Direct(SendError::Permanent(_)) => {
                OpError::new(e.code(), e.to_string()).with_field("to")
            }
            MailError::Direct(SendError::Transient(_)) => {
                OpError::new(e.code(), e.to_string()).with_retry_after(1000)
            }
            MailError::NotFound(_) => OpError::new(e.code(), e.to_string()),
        }
    }
}

/// Counters of this daemon's deliveries (the queue-wide counts live in Redis).
#[derive(Debug, Default)]
pub struct MailCounters {
    /// Deliveries in flight right now.
    pub sending: AtomicU64,
    pub sent: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    /// Entries taken over from a dead consumer.
    pub reclaimed: AtomicU64,
    /// Stream entries not yet acknowledged (undelivered + in flight), sampled.
    pub queue_depth: AtomicU64,
    /// Mails sent per second by this daemon over the last seconds, ×1000.
    pub rate_milli: AtomicU64,
}

/// The mail service every connection shares.
#[derive(Debug)]
pub struct MailService {
    pub queue: Queue,
    pub enqueuer: Arc<batch::Enqueuer>,
    pub transport: Arc<Transport>,
    pub counters: MailCounters,
    /// This daemon's consumer name in the group: unique per process.
    pub consumer: String,
}

impl MailService {
    pub fn new(cfg: &crate::config::Config) -> Result<MailService, String> {
        Ok(MailService {
            queue: Queue::new(&cfg.redis.prefix),
            enqueuer: Arc::default(),
            transport: Arc::new(Transport::from_config(&cfg.mail)?),
            counters: MailCounters::default(),
            consumer: format!(
                "{}-{}-{:04x}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "host".into()),
                std::process::id(),
                fastrand::u16(..)
            ),
        })
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new mail id: time-ordered hex (ms) + 64 random bits.
pub fn new_mail_id() -> String {
    format!("{:011x}{:016x}", now_ms(), fastrand::u64(..))
}

type OpResult = Result<Vec<u8>, OpError>;

fn encode<T: Serialize>(value: &T) -> OpResult {
    rmp_serde::to_vec_named(value)
        .map_err(|e| OpError::new(ErrorCode::Internal, format!("cannot encode result: {e}")))
}

/// Routes one `mail.*` request.
pub async fn handle(shared: &Shared, req: &Request) -> OpResult {
    match req.op() {
        "mail.send" => send(shared, req).await,
        "mail.status" => status(shared, req).await,
        "mail.cancel" => cancel(shared, req).await,
        "mail.retry" => retry(shared, req).await,
        "mail.dead" => dead(shared, req).await,
        other => Err(OpError::new(
            ErrorCode::UnknownOp,
            format!("unknown op `{other}`; `hello` lists the ops this server knows"),
        )
        .with_field("op")),
    }
}

#[derive(Serialize)]
struct SendResult {
    mail_id: String,
    status: String,
    duplicate: bool,
}

async fn send(shared: &Shared, req: &Request) -> OpResult {
    let draft = message::Draft::from_request(req)?;
    let cfg = shared.config.load();
    let mc = &cfg.mail;
    if let Some(key) = &draft.idempotency_key
        && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(MailError::Invalid {
            field: "idempotency_key".into(),
            message: format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
        }
        .into());
    }
    let send_at = match draft.send_at_ms {
        Some(ms) if ms < 0 => {
            return Err(MailError::Invalid {
                field: "send_at_ms".into(),
                message: "send_at_ms must be a Unix time in ms".into(),
            }
            .into());
        }
        Some(ms) => ms as u64,
        None => 0,
    };
    let built = message::build(&draft, &mc.from, mc.max_message_bytes, new_mail_id())?;
    let mail = &shared.mail;
    let settings = batch::EnqueueSettings {
        idem_ttl_ms: mc.idempotency_ttl_ms,
        retention_ms: mc.status_retention_ms,
    };
    let enqueued = match shared.backend.connection() {
        // Known down: fail (or send directly) at once, without waiting for a batch.
        Err(e) => Err((e, Some(built))),
        Ok(_) => {
            let new = queue::NewMail {
                built,
                send_at_ms: send_at,
                idempotency_key: draft.idempotency_key.clone(),
            };
            mail.enqueuer
                .enqueue_or_return(&shared.backend, &mail.queue, settings, new)
                .await
                .map_err(|(e, new)| (shared.backend.classify(e), new.map(|n| n.built)))
        }
    };
    match enqueued {
        Ok(e) => encode(&SendResult {
            mail_id: e.mail_id,
            status: e.status,
            duplicate: e.duplicate,
        }),
        // Only when Redis is certainly unreachable: after a timeout the mail may be
        // queued already, and a direct send could deliver it twice.
        Err((BackendError::Unavailable(why), Some(built))) if mc.on_redis_down == "direct" => {
            tracing::warn!(mail_id = %built.mail_id, reason = %why, "redis is down: sending directly");
            mail.transport
                .send(&built.from, &built.rcpts, &built.raw, &built.mail_id)
                .await
                .map_err(MailError::Direct)?;
            encode(&SendResult {
                mail_id: built.mail_id,
                status: "sent".into(),
                duplicate: false,
            })
        }
        Err((e, _)) => Err(e.into()),
    }
}

#[derive(Serialize)]
struct StatusResult {
    mail_id: String,
    status: String,
    attempts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_ms: Option<u64>,
    updated_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<Vec<String>>,
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

async fn status(shared: &Shared, req: &Request) -> OpResult {
    let id = mail_id(req)?;
    let mut conn = shared.backend.connection()?;
    let rec = shared
        .mail
        .queue
        .status(&mut conn, id)
        .await
        .map_err(|e| shared.backend.classify(e))?
        .ok_or_else(|| MailError::NotFound(id.to_owned()))?;
    encode(&StatusResult {
        mail_id: id.to_owned(),
        status: rec.status,
        attempts: rec.attempts,
        last_error: rec.last_error.filter(|e| !e.is_empty()),
        next_attempt_ms: rec.next_attempt_ms,
        updated_ms: rec.updated_ms,
        refused: rec.refused.map(|r| queue::split_list(&r)),
    })
}

#[derive(Serialize)]
struct CancelResult {
    cancelled: bool,
}

async fn cancel(shared: &Shared, req: &Request) -> OpResult {
    let id = mail_id(req)?;
    let retention = shared.config.load().mail.status_retention_ms;
    let mut conn = shared.backend.connection()?;
    let r = shared
        .mail
        .queue
        .cancel(&mut conn, id, retention)
        .await
        .map_err(|e| shared.backend.classify(e))?
        .ok_or_else(|| MailError::NotFound(id.to_owned()))?;
    encode(&CancelResult { cancelled: r })
}

#[derive(Serialize)]
struct RetryResult {
    status: &'static str,
}

async fn retry(shared: &Shared, req: &Request) -> OpResult {
    let id = mail_id(req)?;
    let mut conn = shared.backend.connection()?;
    match shared
        .mail
        .queue
        .retry(&mut conn, id)
        .await
        .map_err(|e| shared.backend.classify(e))?
    {
        Ok(()) => encode(&RetryResult { status: "queued" }),
        Err(None) => Err(MailError::NotFound(id.to_owned()).into()),
        Err(Some(status)) => Err(MailError::NotDead {
            mail_id: id.to_owned(),
            status,
        }
        .into()),
    }
}

#[derive(Serialize)]
struct DeadEntry {
    mail_id: String,
    to: Vec<String>,
    subject: String,
    attempts: u64,
    last_error: String,
    dead_ms: u64,
}

async fn dead(shared: &Shared, req: &Request) -> OpResult {
    let limit = req
        .opt_positive("limit")?
        .unwrap_or(DEAD_DEFAULT_LIMIT)
        .min(DEAD_MAX_LIMIT);
    let mut conn = shared.backend.connection()?;
    let rows = shared
        .mail
        .queue
        .dead(&mut conn, limit)
        .await
        .map_err(|e| shared.backend.classify(e))?;
    let out: Vec<DeadEntry> = rows
        .into_iter()
        .map(|r| DeadEntry {
            mail_id: r.mail_id,
            to: r.to,
            subject: r.subject,
            attempts: r.attempts,
            last_error: r.last_error,
            dead_ms: r.dead_ms,
        })
        .collect();
    encode(&out)
}

/// The `mail` section of `stats`.
#[derive(Debug, Serialize)]
pub struct MailStats {
    /// Mails per status across every daemon sharing the Redis (None while Redis is
    /// down). `sent`, `dead` and `cancelled` count since the queue was created.
    pub queued: Option<i64>,
    pub scheduled: Option<i64>,
    pub sending: Option<i64>,
    pub retrying: Option<i64>,
    pub sent: Option<i64>,
    pub dead: Option<i64>,
    pub cancelled: Option<i64>,
    /// Stream entries not yet acknowledged (waiting + in flight).
    pub queue_depth: Option<u64>,
    /// This daemon: deliveries in flight, and totals since start.
    pub local_sending: u64,
    pub local_sent: u64,
    pub local_retried: u64,
    pub local_dead: u64,
    pub local_reclaimed: u64,
    /// This daemon's delivery rate over the last 10 s, mails per second.
    pub delivery_rate: f64,
    pub workers: bool,
}

pub async fn stats(shared: &Shared) -> MailStats {
    let c = &shared.mail.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    // `stats` must keep answering while Redis is slow or stuck: the queue counts are
    // left out rather than waited for.
    let counts = match shared.backend.connection() {
        Ok(mut conn) => {
            tokio::time::timeout(STATS_REDIS_TIMEOUT, shared.mail.queue.counts(&mut conn))
                .await
                .ok()
                .and_then(Result::ok)
        }
        Err(_) => None,
    };
    let count = |name: &str| {
        counts
            .as_ref()
            .and_then(|(v, _)| v.iter().find(|(s, _)| s == name).map(|(_, n)| *n))
    };
    MailStats {
        queued: count("queued"),
        scheduled: count("scheduled"),
        sending: count("sending"),
        retrying: count("retrying"),
        sent: count("sent"),
        dead: count("dead"),
        cancelled: count("cancelled"),
        queue_depth: counts.as_ref().map(|(_, len)| *len),
        local_sending: get(&c.sending),
        local_sent: get(&c.sent),
        local_retried: get(&c.retried),
        local_dead: get(&c.dead),
        local_reclaimed: get(&c.reclaimed),
        delivery_rate: get(&c.rate_milli) as f64 / 1000.0,
        workers: shared.config.load().mail.enabled,
    }
}
