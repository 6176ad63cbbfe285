//! Signed webhooks: each event whose status is in `mail.webhook_events` is POSTed as
//! JSON to `mail.webhook_url`, at least once, by whichever daemon takes it.
//!
//! Why it is driven by the event stream through a consumer group (`webhooks`): the
//! stream already holds every event durably, a group hands each entry to one daemon
//! of many, and an entry a crashed daemon took stays pending until another claims
//! it. A POST that fails moves the event to a retry schedule (`<K>:wh:retry`, a
//! sorted set by due time, with the first failure's time and the attempts in
//! `<K>:wh:att`) before its entry is acknowledged; a daemon leases a due retry by
//! pushing its due time past the request's timeout, so a crash mid-retry only delays
//! it. After `mail.webhook_max_age_ms` of failures an event is dropped, logged and
//! counted.
//!
//! The client is reqwest (hyper underneath, rustls, no OpenSSL): a well-kept crate
//! with connection reuse and per-request timeouts, which is all this needs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use redis::streams::{StreamId, StreamReadReply};
use redis::{Script, Value};
use serde::Serialize;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use super::MailService;
use super::events::Event;
use crate::backend::{BackendError, RETRY_AFTER};
use crate::config::MailConfig;
use crate::stats::Counter;

/// The consumer group of webhook delivery on the event stream.
pub const GROUP: &str = "webhooks";
/// Longest backoff between two attempts of one event.
const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;
/// An entry pending this long on a consumer is taken over (its daemon died).
const CLAIM_IDLE_MS: u64 = 60_000;
/// Due retries one daemon leases at a time.
const RETRY_BATCH: usize = 16;

/// What the webhook side counts (`stats` → `mail.webhooks_*`).
#[derive(Debug, Default)]
pub struct WebhookCounters {
    pub delivered: Counter,
    pub failed_attempts: Counter,
    pub dropped: Counter,
}

/// Leases up to ARGV[2] due retries: their due time moves to now + ARGV[1] ms.
/// KEYS: the retry schedule. → the event ids leased.
const LEASE: &str = r#"
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id) end
return due
"#;

/// Records a failed attempt of event ARGV[1]: attempts + 1, the first failure's time
/// kept; due again after ARGV[2] ms unless ARGV[3] ms have passed since the first
/// failure (then it is dropped). KEYS: retry schedule, attempts hash.
/// → {attempts, 1 scheduled | 0 dropped}
const FAILED: &str = r#"
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local n = redis.call('HINCRBY', KEYS[2], id .. ':n', 1)
local first = tonumber(redis.call('HGET', KEYS[2], id .. ':first') or '0')
if first == 0 then first = now; redis.call('HSET', KEYS[2], id .. ':first', now) end
if now - first >= tonumber(ARGV[3]) then
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id .. ':n', id .. ':first')
  return {n, 0}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
return {n, 1}
"#;

/// The webhook side of one daemon.
pub struct Webhooks {
    http: reqwest::Client,
    retry_key: String,
    attempts_key: String,
    lease: Script,
    failed: Script,
    pub counters: WebhookCounters,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").finish_non_exhaustive()
    }
}

/// What is POSTed: the event's fields.
#[derive(Serialize)]
struct Body<'a> {
    event_id: &'a str,
    mail_id: &'a str,
    status: &'a str,
    attempts: u64,
    at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    class: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    to: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
}

/// `sha256=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &str, timestamp_ms: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        // HMAC takes keys of any length; this cannot happen.
        return String::new();
    };
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Exponential backoff with jitter from `base`, capped at 10 minutes.
fn backoff_ms(base: u64, attempts: u64) -> u64 {
    let exp = base
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(30))
        .min(MAX_BACKOFF_MS);
    (exp / 2 + fastrand::u64(0..=exp / 2)).max(1)
}

impl Webhooks {
    pub fn new(events_key: &str) -> Result<Webhooks, String> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("satchel/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("webhook HTTP client: {e}"))?;
        let base = events_key.trim_end_matches(":events");
        Ok(Webhooks {
            http,
            retry_key: format!("{base}:wh:retry"),
            attempts_key: format!("{base}:wh:att"),
            lease: Script::new(LEASE),
            failed: Script::new(FAILED),
            counters: WebhookCounters::default(),
        })
    }

    /// POSTs one event; Ok on a 2xx.
    async fn post(&self, cfg: &MailConfig, e: &Event) -> Result<(), String> {
        let body = serde_json::to_vec(&Body {
            event_id: &e.event_id,
            mail_id: &e.mail_id,
            status: &e.status,
            attempts: e.attempts,
            at_ms: e.at_ms,
            error: e.error.as_deref(),
            class: e.class.as_deref(),
            to: &e.to,
            uid: e.owner,
        })
        .map_err(|err| err.to_string())?;
        let ts = crate::host::now_ms();
        let sig = signature(&cfg.webhook_secret, ts, &body);
        let sent = self
            .http
            .post(&cfg.webhook_url)
            .timeout(Duration::from_millis(cfg.webhook_timeout_ms))
            .header("content-type", "application/json")
            .header("x-satchel-event-id", &e.event_id)
            .header("x-satchel-timestamp", ts.to_string())
            .header("x-satchel-signature", sig)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status())),
            Err(err) if err.is_timeout() => Err(format!(
                "no answer within {} ms (mail.webhook_timeout_ms)",
                cfg.webhook_timeout_ms
            )),
            Err(err) => Err(err.to_string()),
        }
    }

    /// Delivers one event now, or schedules it for a retry (or drops it when it has
    /// failed for `webhook_max_age_ms`).
    async fn deliver(&self, mail: &MailService, cfg: &MailConfig, e: &Event) {
        match self.post(cfg, e).await {
            Ok(()) => {
                self.counters.delivered.inc();
                let _: Result<Value, _> = mail
                    .backend
                    .pipeline(
                        redis::pipe()
                            .cmd("ZREM")
                            .arg(&self.retry_key)
                            .arg(&e.event_id)
                            .ignore()
                            .cmd("HDEL")
                            .arg(&self.attempts_key)
                            .arg(format!("{}:n", e.event_id))
                            .arg(format!("{}:first", e.event_id))
                            .ignore(),
                    )
                    .await;
            }
            Err(why) => {
                self.counters.failed_attempts.inc();
                let attempts: u64 = mail
                    .backend
                    .query(
                        redis::cmd("HGET")
                            .arg(&self.attempts_key)
                            .arg(format!("{}:n", e.event_id)),
                    )
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                let delay = backoff_ms(cfg.webhook_retry_base_ms, attempts + 1);
                let r: Result<(u64, u64), _> = mail
                    .backend
                    .invoke(
                        self.failed
                            .key(&self.retry_key)
                            .key(&self.attempts_key)
                            .arg(&e.event_id)
                            .arg(delay)
                            .arg(cfg.webhook_max_age_ms),
                    )
                    .await;
                match r {
                    Ok((n, 0)) => {
                        self.counters.dropped.inc();
                        tracing::error!(event_id = %e.event_id, mail_id = %e.mail_id, attempts = n, error = %why,
                            "webhook dropped after mail.webhook_max_age_ms of failures");
                    }
                    Ok((n, _)) => {
                        tracing::warn!(event_id = %e.event_id, attempts = n, error = %why, retry_in_ms = delay, "webhook failed; will retry");
                    }
                    Err(err) => {
                        tracing::warn!(event_id = %e.event_id, error = %err, "webhook failed and its retry could not be recorded; the entry stays pending");
                    }
                }
            }
        }
    }

    /// The events of `entry` this config sends.
    fn wanted(cfg: &MailConfig, entry: &StreamId) -> Vec<Event> {
        Event::of_entry(&entry.id, &entry.map)
            .into_iter()
            .filter(|e| cfg.webhook_events.contains(&e.status))
            .collect()
    }

    /// Handles stream entries: each wanted event delivered or scheduled, then the
    /// entries acknowledged.
    async fn handle(&self, mail: &MailService, cfg: &MailConfig, entries: &[StreamId]) {
        for entry in entries {
            for e in Self::wanted(cfg, entry) {
                self.deliver(mail, cfg, &e).await;
            }
            let _: Result<i64, _> = mail
                .backend
                .query(
                    redis::cmd("XACK")
                        .arg(&mail.queue.events)
                        .arg(GROUP)
                        .arg(&entry.id),
                )
                .await;
        }
    }

    /// Retries that are due: leased, then delivered or rescheduled.
    async fn retry_due(&self, mail: &MailService, cfg: &MailConfig) -> Result<usize, BackendError> {
        let lease_ms = cfg.webhook_timeout_ms + 5_000;
        let ids: Vec<String> = mail
            .backend
            .invoke(
                self.lease
                    .key(&self.retry_key)
                    .arg(lease_ms)
                    .arg(RETRY_BATCH),
            )
            .await?;
        for id in &ids {
            let entry_id = id.split('.').next().unwrap_or(id);
            let reply: redis::streams::StreamRangeReply = mail
                .backend
                .query(
                    redis::cmd("XRANGE")
                        .arg(&mail.queue.events)
                        .arg(entry_id)
                        .arg(entry_id),
                )
                .await?;
            let event = reply
                .ids
                .iter()
                .flat_map(|e| Event::of_entry(&e.id, &e.map))
                .find(|e| &e.event_id == id);
            match event {
                Some(e) => self.deliver(mail, cfg, &e).await,
                None => {
                    // Trimmed away (mail.events_max) before it could be delivered.
                    self.counters.dropped.inc();
                    tracing::error!(event_id = %id, "webhook dropped: its event is no longer in the stream (mail.events_max)");
                    let _: Result<Value, _> = mail
                        .backend
                        .query(redis::cmd("ZREM").arg(&self.retry_key).arg(id))
                        .await;
                }
            }
        }
        Ok(ids.len())
    }

    /// Creates the group at the stream's end (a new deployment does not send
    /// webhooks for history).
    async fn ensure_group(&self, mail: &MailService) -> Result<(), BackendError> {
        mail.backend
            .ensure_group(&mail.queue.events, GROUP, "$")
            .await
    }

    /// Runs until shutdown while `mail.webhook_url` is set: reads new entries,
    /// retries due events, and takes over entries a dead daemon left pending.
    pub async fn run(self: Arc<Self>, mail: Arc<MailService>, shutdown: CancellationToken) {
        let reader = self.clone().read_loop(mail.clone(), shutdown.clone());
        let retrier = self.retry_loop(mail, shutdown);
        tokio::join!(reader, retrier);
    }

    async fn read_loop(self: Arc<Self>, mail: Arc<MailService>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.read(&mail) => {
                    let Err(e) = r;
                    tracing::debug!(error = %e, "webhook reader waits for redis");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY_AFTER) => {}
            }
        }
    }

    /// Reads new entries for this daemon's consumer until an error.
    async fn read(&self, mail: &MailService) -> Result<Infallible, BackendError> {
        self.ensure_group(mail).await?;
        let mut conn = mail.backend.dedicated().await?;
        loop {
            let cfg = mail.config.load().mail.clone();
            let reply: Option<StreamReadReply> = conn
                .query(
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(GROUP)
                        .arg(&mail.consumer)
                        .arg("COUNT")
                        .arg(64)
                        .arg("BLOCK")
                        .arg(2000)
                        .arg("STREAMS")
                        .arg(&mail.queue.events)
                        .arg(">"),
                )
                .await?;
            if let Some(k) = reply.and_then(|r| r.keys.into_iter().next()) {
                self.handle(mail, &cfg, &k.ids).await;
            }
        }
    }

    async fn retry_loop(&self, mail: Arc<MailService>, shutdown: CancellationToken) {
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let cfg = mail.config.load().mail.clone();
            if mail.backend.ensure_up().is_err() {
                continue;
            }
            let _ = self.retry_due(&mail, &cfg).await;
            ticks += 1;
            if ticks.is_multiple_of(25) {
                self.claim_abandoned(&mail, &cfg).await;
            }
        }
    }

    /// Entries pending on a consumer that stopped (idle past [`CLAIM_IDLE_MS`]).
    async fn claim_abandoned(&self, mail: &MailService, cfg: &MailConfig) {
        let r: Result<Value, _> = mail
            .backend
            .query(
                redis::cmd("XAUTOCLAIM")
                    .arg(&mail.queue.events)
                    .arg(GROUP)
                    .arg(&mail.consumer)
                    .arg(CLAIM_IDLE_MS)
                    .arg("0")
                    .arg("COUNT")
                    .arg(64),
            )
            .await;
        let Ok(Value::Array(parts)) = r else { return };
        let Some(claimed) = parts.get(1) else { return };
        let Ok(entries) =
            redis::from_redis_value::<redis::streams::StreamRangeReply>(Value::Array(vec![
                claimed.clone(),
            ]))
            .map(|r| r.ids)
        else {
            return;
        };
        if !entries.is_empty() {
            tracing::info!(
                entries = entries.len(),
                "webhook entries of a stopped daemon taken over"
            );
            self.handle(mail, cfg, &entries).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Against a value computed independently (Python's hmac):
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"s3cret",b"1700000000000.{}",hashlib.sha256).hexdigest())'
        assert_eq!(
            signature("s3cret", 1_700_000_000_000, b"{}"),
            "sha256=e8eb128e84214464aec85474d15f930c60fb75e2076edab5c557f8f406ab4899"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for attempts in 1..40 {
            let d = backoff_ms(1000, attempts);
            let exp = (1000u64 << (attempts - 1).min(30)).min(MAX_BACKOFF_MS);
            assert!(d >= exp / 2 && d <= exp, "{attempts}: {d}");
        }
    }
}
