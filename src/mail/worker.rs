//! The delivery side: this daemon is one consumer of the group. A reader takes new
//! entries (XREADGROUP on its own connection), a janitor moves due scheduled mail
//! and retries into the stream and reclaims entries a dead consumer left pending
//! (XAUTOCLAIM), and each entry is delivered by its own task, at most
//! `mail.concurrency` at a time.
//!
//! On shutdown the reader and the janitor stop at once; deliveries already started run
//! to the end (bounded by the SMTP timeouts) and are acknowledged. Entries read but not
//! started stay pending and are reclaimed after `claim_idle_ms`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::MailService;
use super::config::MailConfig;
use super::queue::{Begin, GROUP, Outcome};
use super::transport::{Delivered, SendError};
use crate::server::Shared;

/// Most entries taken per XREADGROUP.
const READ_BATCH: usize = 64;
/// How long one XREADGROUP blocks; bounds nothing important (shutdown drops the read).
const BLOCK_MS: u64 = 2000;
/// How often due scheduled mail and retries are moved into the stream.
const SCHEDULE_TICK: Duration = Duration::from_millis(50);
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Runs the workers of this daemon until `shutdown`; deliveries are spawned on `tasks`.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken, tasks: TaskTracker) {
    let cfg = shared.config.load().mail.clone();
    if !cfg.enabled {
        tracing::info!("mail.enabled = false: this daemon queues mail but delivers none");
        return;
    }
    let slots = Arc::new(Semaphore::new(cfg.concurrency as usize));
    tasks.spawn(janitor(
        shared.clone(),
        cfg.clone(),
        slots.clone(),
        shutdown.child_token(),
        tasks.clone(),
    ));
    reader(shared, cfg, slots, shutdown, tasks).await;
}

/// A connection for blocking reads only: the shared one has a response timeout that
/// would cut every `XREADGROUP BLOCK` short.
async fn blocking_connection(shared: &Shared) -> redis::RedisResult<MultiplexedConnection> {
    let cfg = shared.config.load();
    let client = redis::Client::open(cfg.redis.url.as_str())?;
    let conn_cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(cfg.redis.connect_timeout()))
        .set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&conn_cfg)
        .await
}

async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

async fn reader(
    shared: Arc<Shared>,
    cfg: MailConfig,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let mail = &shared.mail;
    let mut conn: Option<MultiplexedConnection> = None;
    let mut logged = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match blocking_connection(&shared).await {
                Ok(mut c) => match mail.queue.ensure_group(&mut c).await {
                    Ok(()) => {
                        logged = false;
                        conn.insert(c)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create the mail consumer group");
                        if !pause(&shutdown, RETRY_PAUSE).await {
                            return;
                        }
                        continue;
                    }
                },
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %e, "mail workers wait for redis");
                        logged = true;
                    }
                    if !pause(&shutdown, RETRY_PAUSE).await {
                        return;
                    }
                    continue;
                }
            },
        };
        // Wait for a free slot but do not hold it while blocked in the read: the
        // janitor needs free slots to reclaim entries of dead consumers.
        match tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.acquire() => p,
        } {
            Ok(p) => drop(p),
            Err(_) => return,
        }
        let count = slots.available_permits().clamp(1, READ_BATCH);
        let mut read_cmd = redis::cmd("XREADGROUP");
        read_cmd
            .arg("GROUP")
            .arg(GROUP)
            .arg(&mail.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(&mail.queue.stream)
            .arg(">");
        let read = read_cmd.query_async::<Value>(c);
        let reply = tokio::select! {
            // Entries Redis handed us in a read we drop stay pending for reclaim.
            _ = shutdown.cancelled() => return,
            r = read => r,
        };
        match reply {
            Ok(v) => {
                for entry in stream_entries(&v) {
                    // Usually free at once; if the janitor took the slots meanwhile,
                    // wait for a delivery to end (on shutdown the rest stay pending).
                    let permit = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    };
                    spawn_delivery(&shared, &cfg, &tasks, entry, permit, false);
                }
            }
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream was deleted (FLUSHALL, a test); make it again.
                let _ = mail.queue.ensure_group(c).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "XREADGROUP failed; reconnecting");
                conn = None;
                if !pause(&shutdown, RETRY_PAUSE).await {
                    return;
                }
            }
        }
    }
}

/// One stream entry: a mail to deliver.
#[derive(Debug)]
struct Entry {
    id: String,
    mail_id: String,
    /// The message, when the entry carries it (entries of satchel 0.1 do not).
    raw: Option<Vec<u8>>,
}

/// The entries of an XREADGROUP / XAUTOCLAIM entry list.
fn entries_of(list: &Value) -> Vec<Entry> {
    let mut out = Vec::new();
    let Value::Array(entries) = list else {
        return out;
    };
    for e in entries {
        let Value::Array(parts) = e else { continue };
        let (Some(id), Some(Value::Array(fields))) = (parts.first(), parts.get(1)) else {
            continue;
        };
        let Some(id) = as_string(id) else { continue };
        let field = |name: &str| {
            fields
                .chunks(2)
                .find(|kv| kv.first().and_then(as_string).as_deref() == Some(name))
                .and_then(|kv| kv.get(1))
        };
        let mail_id = field("id").and_then(as_string).unwrap_or_default();
        let raw = match field("raw") {
            Some(Value::BulkString(b)) => Some(b.clone()),
            _ => None,
        };
        out.push(Entry { id, mail_id, raw });
    }
    out
}

fn stream_entries(v: &Value) -> Vec<Entry> {
    // RESP2: [[stream, [entries]]]; RESP3 may give a map.
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => entries_of(&kv[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(kv) => kv.iter().flat_map(|(_, e)| entries_of(e)).collect(),
        _ => Vec::new(),
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn spawn_delivery(
    shared: &Arc<Shared>,
    cfg: &MailConfig,
    tasks: &TaskTracker,
    entry: Entry,
    permit: OwnedSemaphorePermit,
    reclaimed: bool,
) {
    let shared = shared.clone();
    let cfg = cfg.clone();
    tasks.spawn(async move {
        if reclaimed {
            shared
                .mail
                .counters
                .reclaimed
                .fetch_add(1, Ordering::Relaxed);
        }
        deliver(&shared, &cfg, entry).await;
        drop(permit);
    });
}

/// Exponential backoff with jitter: attempt n waits about base·2^(n-1), between half
/// and all of it, never below `retry_base_ms` nor above `retry_max_ms`.
pub fn backoff_ms(cfg: &MailConfig, attempts: u64) -> u64 {
    let exp = cfg
        .retry_base_ms
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(40))
        .min(cfg.retry_max_ms);
    let jittered = exp / 2 + fastrand::u64(0..=exp / 2);
    jittered.clamp(cfg.retry_base_ms, cfg.retry_max_ms)
}

fn refusals(list: &[(String, String)]) -> String {
    list.iter()
        .map(|(r, e)| format!("{r}: {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Decides what a delivery attempt's result means for the mail.
pub fn outcome_of(
    cfg: &MailConfig,
    attempts: u64,
    result: Result<Delivered, SendError>,
) -> Outcome {
    let exhausted = attempts >= cfg.max_attempts;
    match result {
        Ok(d) if d.deferred.is_empty() => Outcome::Sent {
            refused: refusals(&d.refused),
        },
        Ok(d) if exhausted => {
            // Delivered to some; the deferred ones are given up on and recorded.
            let mut all = d.refused;
            all.extend(d.deferred);
            Outcome::Sent {
                refused: refusals(&all),
            }
        }
        Ok(d) => Outcome::Retry {
            error: format!("some recipients deferred: {}", refusals(&d.deferred)),
            delay_ms: backoff_ms(cfg, attempts),
            rcpts: Some(d.deferred.into_iter().map(|(r, _)| r).collect()),
            refused: refusals(&d.refused),
        },
        Err(SendError::Permanent(e)) => Outcome::Dead {
            error: e,
            refused: String::new(),
        },
        Err(SendError::Transient(e)) if exhausted => Outcome::Dead {
            error: format!("gave up after {attempts} attempts: {e}"),
            refused: String::new(),
        },
        Err(SendError::Transient(e)) => Outcome::Retry {
            error: e,
            delay_ms: backoff_ms(cfg, attempts),
            rcpts: None,
            refused: String::new(),
        },
    }
}

/// Keeps our claim on an entry fresh while its delivery runs, so a slow send is never
/// taken over by another daemon as if we had died.
async fn heartbeat(shared: &Shared, cfg: &MailConfig, entry_id: &str) {
    let every = cfg.claim_idle() / 3;
    loop {
        tokio::time::sleep(every).await;
        if let Ok(mut conn) = shared.backend.connection() {
            let _: redis::RedisResult<Value> = redis::cmd("XCLAIM")
                .arg(&shared.mail.queue.stream)
                .arg(GROUP)
                .arg(&shared.mail.consumer)
                .arg(0)
                .arg(entry_id)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await;
        }
    }
}

async fn deliver(shared: &Shared, cfg: &MailConfig, entry: Entry) {
    tokio::select! {
        _ = heartbeat(shared, cfg, &entry.id) => {}
        _ = deliver_inner(shared, cfg, &entry) => {}
    }
}

async fn deliver_inner(shared: &Shared, cfg: &MailConfig, entry: &Entry) {
    let (entry_id, mail_id) = (entry.id.as_str(), entry.mail_id.as_str());
    let mail: &MailService = &shared.mail;
    let Ok(mut conn) = shared.backend.connection() else {
        return; // stays pending; reclaimed once Redis is back
    };
    if mail_id.is_empty() {
        // Not one of ours: acknowledge so it is not reclaimed for ever.
        let _: redis::RedisResult<Value> = redis::pipe()
            .cmd("XACK")
            .arg(&mail.queue.stream)
            .arg(GROUP)
            .arg(entry_id)
            .cmd("XDEL")
            .arg(&mail.queue.stream)
            .arg(entry_id)
            .query_async(&mut conn)
            .await;
        return;
    }
    // Under a rate limit, connect first, so that the permit is followed by the
    // transaction itself: the SMTP server sees at most `rate_per_sec` messages in any
    // second, whatever a connection setup costs.
    let mut ready = None;
    if cfg.rate_per_sec > 0 {
        ready = Some(mail.transport.ready().await);
        loop {
            match mail.queue.rate_wait(&mut conn, cfg.rate_per_sec).await {
                Ok(0) => break,
                Ok(ms) => tokio::time::sleep(Duration::from_millis(ms.max(1))).await,
                Err(_) => return,
            }
        }
    }
    let begun = match mail
        .queue
        .begin(
            &mut conn,
            mail_id,
            entry_id,
            cfg.max_attempts,
            cfg.status_retention_ms,
            entry.raw.is_some(),
        )
        .await
    {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(%mail_id, error = %e, "cannot start a delivery; it stays pending");
            return;
        }
    };
    let (attempts, from, rcpts, raw) = match begun {
        Begin::Go {
            attempts,
            from,
            rcpts,
            raw,
        } => (attempts, from, rcpts, raw),
        Begin::Skip(status) => {
            if let Some(ready) = ready {
                mail.transport.release(ready);
            }
            tracing::debug!(%mail_id, %status, "entry needs no delivery; acknowledged");
            return;
        }
        Begin::Dead(reason) => {
            if let Some(ready) = ready {
                mail.transport.release(ready);
            }
            mail.counters.dead.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%mail_id, %reason, "mail is dead");
            return;
        }
    };
    mail.counters.sending.fetch_add(1, Ordering::Relaxed);
    let ready = match ready {
        Some(ready) => ready,
        None => mail.transport.ready().await,
    };
    let result = mail
        .transport
        .send_ready(
            ready,
            &from,
            &rcpts,
            entry.raw.as_deref().unwrap_or(&raw),
            mail_id,
        )
        .await;
    let outcome = outcome_of(cfg, attempts, result);
    match &outcome {
        Outcome::Sent { .. } => {
            mail.counters.sent.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%mail_id, attempts, "sent");
        }
        Outcome::Retry {
            error, delay_ms, ..
        } => {
            mail.counters.retried.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%mail_id, attempts, delay_ms, %error, "delivery failed; will retry");
        }
        Outcome::Dead { error, .. } => {
            mail.counters.dead.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%mail_id, attempts, %error, "delivery failed for good; mail is dead");
        }
    }
    // The outcome must reach Redis, or the entry is reclaimed and sent again: keep
    // trying for a while if Redis blinks.
    let deadline = Instant::now() + cfg.claim_idle() / 2;
    loop {
        let r = match shared.backend.connection() {
            Ok(mut c) => mail
                .queue
                .finish(&mut c, mail_id, entry_id, cfg.status_retention_ms, &outcome)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                tracing::error!(%mail_id, error = %e, "cannot record the delivery outcome; the entry stays pending");
                break;
            }
            Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
    mail.counters.sending.fetch_sub(1, Ordering::Relaxed);
}

/// Moves due mail into the stream, reclaims abandoned entries, samples counters.
async fn janitor(
    shared: Arc<Shared>,
    cfg: MailConfig,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let mail = &shared.mail;
    let claim_every = (cfg.claim_idle() / 2).max(Duration::from_millis(50));
    let mut last_claim = Instant::now() - claim_every;
    let mut last_sample = Instant::now();
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut group_ready = false;
    loop {
        if !pause(&shutdown, SCHEDULE_TICK).await {
            return;
        }
        let Ok(mut conn) = shared.backend.connection() else {
            continue;
        };
        if !group_ready {
            group_ready = mail.queue.ensure_group(&mut conn).await.is_ok();
        }
        loop {
            match mail.queue.move_due(&mut conn, 500).await {
                Ok(500) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot move due mail");
                    break;
                }
            }
        }
        if last_claim.elapsed() >= claim_every {
            last_claim = Instant::now();
            reclaim(&shared, &cfg, &slots, &tasks, &mut conn).await;
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            last_sample = Instant::now();
            if let Ok(len) = redis::cmd("XLEN")
                .arg(&mail.queue.stream)
                .query_async::<u64>(&mut conn)
                .await
            {
                mail.counters.queue_depth.store(len, Ordering::Relaxed);
            }
            let sent = mail.counters.sent.load(Ordering::Relaxed);
            samples.push_back((Instant::now(), sent));
            while samples.len() > 11 {
                samples.pop_front();
            }
            if let (Some((t0, n0)), Some((t1, n1))) = (samples.front(), samples.back()) {
                let secs = t1.duration_since(*t0).as_secs_f64();
                let rate = if secs > 0.0 {
                    (n1 - n0) as f64 / secs
                } else {
                    0.0
                };
                mail.counters
                    .rate_milli
                    .store((rate * 1000.0) as u64, Ordering::Relaxed);
            }
        }
    }
}

/// XAUTOCLAIM entries idle longer than `claim_idle_ms` (their consumer died), as many
/// as there are free delivery slots.
async fn reclaim(
    shared: &Arc<Shared>,
    cfg: &MailConfig,
    slots: &Arc<Semaphore>,
    tasks: &TaskTracker,
    conn: &mut redis::aio::ConnectionManager,
) {
    let mail = &shared.mail;
    let mut cursor = "0-0".to_owned();
    loop {
        let free = slots.available_permits().min(100);
        if free == 0 {
            return;
        }
        let v: Value = match redis::cmd("XAUTOCLAIM")
            .arg(&mail.queue.stream)
            .arg(GROUP)
            .arg(&mail.consumer)
            .arg(cfg.claim_idle_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(free)
            .query_async(conn)
            .await
        {
            Ok(v) => v,
            Err(_) => return,
        };
        let Value::Array(parts) = &v else { return };
        let next = parts
            .first()
            .and_then(as_string)
            .unwrap_or_else(|| "0-0".into());
        let claimed = parts.get(1).map(entries_of).unwrap_or_default();
        // Entries deleted from the stream while pending: nothing to deliver, but they
        // must leave the pending list.
        if let Some(Value::Array(deleted)) = parts.get(2)
            && !deleted.is_empty()
        {
            let mut ack = redis::cmd("XACK");
            ack.arg(&mail.queue.stream).arg(GROUP);
            for d in deleted.iter().filter_map(as_string) {
                ack.arg(d);
            }
            let _: redis::RedisResult<Value> = ack.query_async(conn).await;
        }
        for entry in claimed {
            tracing::info!(mail_id = %entry.mail_id, entry_id = %entry.id, "reclaimed an entry left pending by a dead consumer");
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // No slot after all: it stays claimed by us, idle, and is taken again
                // on a later round.
                continue;
            };
            spawn_delivery(shared, cfg, tasks, entry, permit, true);
        }
        if next == "0-0" {
            return;
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MailConfig {
        MailConfig {
            retry_base_ms: 100,
            retry_max_ms: 1000,
            max_attempts: 3,
            ..MailConfig::default()
        }
    }

    #[test]
    fn backoff_grows_with_jitter_inside_the_bounds() {
        let c = cfg();
        for attempts in 1..20 {
            let d = backoff_ms(&c, attempts);
            assert!((100..=1000).contains(&d), "{attempts}: {d}");
        }
        assert!(
            (0..50)
                .map(|_| backoff_ms(&c, 3))
                .all(|d| (200..=400).contains(&d))
        );
        assert!((0..50).map(|_| backoff_ms(&c, 10)).all(|d| d >= 500));
    }

    #[test]
    fn transient_failures_retry_until_max_attempts_then_die() {
        let c = cfg();
        let t = || Err(SendError::Transient("451 later".into()));
        assert!(matches!(outcome_of(&c, 1, t()), Outcome::Retry { .. }));
        assert!(
            matches!(outcome_of(&c, 3, t()), Outcome::Dead { error, .. } if error.contains("451"))
        );
        let p = Err(SendError::Permanent("550 no".into()));
        assert!(matches!(outcome_of(&c, 1, p), Outcome::Dead { error, .. } if error == "550 no"));
    }

    #[test]
    fn deferred_recipients_are_retried_alone() {
        let d = Delivered {
            refused: vec![("a@x.y".into(), "550".into())],
            deferred: vec![("b@x.y".into(), "451".into())],
        };
        match outcome_of(&cfg(), 1, Ok(d)) {
            Outcome::Retry { rcpts, refused, .. } => {
                assert_eq!(rcpts, Some(vec!["b@x.y".to_owned()]));
                assert!(refused.contains("a@x.y"));
            }
            other => panic!("{other:?}"),
        }
    }
}
