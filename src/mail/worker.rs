//! The delivery side: this daemon is one consumer of the group. A reader takes new
//! entries (XREADGROUP on its own connection), a janitor moves due scheduled mail
//! and retries into the stream and reclaims entries a dead consumer left pending
//! (XAUTOCLAIM), and each entry is delivered by its own task, at most
//! `mail.concurrency` at a time. Every Redis call is a [`Queue`] method.
//!
//! On shutdown the reader and the janitor stop at once; deliveries already started run
//! to the end (bounded by the SMTP timeouts) and are acknowledged. Entries read but not
//! started stay pending and are reclaimed after `claim_idle_ms`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::MailService;
use super::bounce::{self, Class};
use super::queue::{Begin, Entry, Outcome, Suppress};
use super::transport::{Delivered, SendError};
use crate::backend::Dedicated;
use crate::config::MailConfig;

/// Most entries taken per XREADGROUP.
const READ_BATCH: usize = 64;
/// How long one XREADGROUP blocks; bounds nothing important (shutdown drops the read).
const BLOCK_MS: u64 = 2000;
/// How often due scheduled mail and retries are moved into the stream.
const SCHEDULE_TICK: Duration = Duration::from_millis(50);
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Runs the workers of this daemon until `shutdown`; deliveries are spawned on `tasks`.
pub async fn run(mail: Arc<MailService>, shutdown: CancellationToken, tasks: TaskTracker) {
    let cfg = mail.config.load().mail.clone();
    if !cfg.enabled {
        tracing::info!("mail.enabled = false: this daemon queues mail but delivers none");
        return;
    }
    let slots = Arc::new(Semaphore::new(cfg.concurrency as usize));
    tasks.spawn(janitor(
        mail.clone(),
        cfg.clone(),
        slots.clone(),
        shutdown.child_token(),
        tasks.clone(),
    ));
    reader(mail, cfg, slots, shutdown, tasks).await;
}

async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

async fn reader(
    mail: Arc<MailService>,
    cfg: MailConfig,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let mut conn: Option<Dedicated> = None;
    let mut logged = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => {
                let ready = async {
                    let c = mail.backend.dedicated().await?;
                    mail.queue.ensure_group(&mail.backend).await?;
                    Ok::<_, crate::backend::BackendError>(c)
                };
                match ready.await {
                    Ok(c) => {
                        logged = false;
                        conn.insert(c)
                    }
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
                }
            }
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
        let read = mail.queue.read_new(c, &mail.consumer, count, BLOCK_MS);
        let reply = tokio::select! {
            // Entries Redis handed us in a read we drop stay pending for reclaim.
            _ = shutdown.cancelled() => return,
            r = read => r,
        };
        match reply {
            Ok(entries) => {
                for entry in entries {
                    // Usually free at once; if the janitor took the slots meanwhile,
                    // wait for a delivery to end (on shutdown the rest stay pending).
                    let permit = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    };
                    spawn_delivery(&mail, &cfg, &tasks, entry, permit, false);
                }
            }
            Err(e) if e.redis_code() == Some("NOGROUP") => {
                // The stream was deleted (FLUSHALL, a test); make it again.
                let _ = mail.queue.ensure_group(&mail.backend).await;
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

fn spawn_delivery(
    mail: &Arc<MailService>,
    cfg: &MailConfig,
    tasks: &TaskTracker,
    entry: Entry,
    permit: OwnedSemaphorePermit,
    reclaimed: bool,
) {
    let mail = mail.clone();
    let cfg = cfg.clone();
    tasks.spawn(async move {
        if reclaimed {
            mail.counters.reclaimed.inc();
        }
        deliver(&mail, &cfg, entry).await;
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

/// The refused recipients whose refusal says they do not exist.
fn to_suppress(refused: &[(String, String)]) -> Vec<Suppress> {
    refused
        .iter()
        .filter_map(|(address, reason)| {
            let class = bounce::classify(reason);
            class.suppresses().then(|| Suppress {
                address: bounce::normalize(address),
                reason: reason.clone(),
                class,
            })
        })
        .collect()
}

/// The class of a failure that ends a mail: from the server's reply; without a code
/// (a sender the server never saw, a file that could not be written) `other`.
fn dead_class(e: &SendError) -> Class {
    match e {
        SendError::Refused(d) => d
            .refused
            .first()
            .map_or(Class::Other, |(_, reason)| bounce::classify(reason)),
        SendError::Permanent(text) => match bounce::classify(text) {
            Class::Transient => Class::Other,
            c => c,
        },
        SendError::Transient(_) => Class::Transient,
    }
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
            suppress: to_suppress(&d.refused),
        },
        Ok(d) if exhausted => {
            // Delivered to some; the deferred ones are given up on and recorded.
            let suppress = to_suppress(&d.refused);
            let mut all = d.refused;
            all.extend(d.deferred);
            Outcome::Sent {
                refused: refusals(&all),
                suppress,
            }
        }
        Ok(d) => Outcome::Retry {
            error: format!("some recipients deferred: {}", refusals(&d.deferred)),
            delay_ms: backoff_ms(cfg, attempts),
            suppress: to_suppress(&d.refused),
            rcpts: Some(d.deferred.into_iter().map(|(r, _)| r).collect()),
            refused: refusals(&d.refused),
        },
        Err(e) if !e.is_transient() => Outcome::Dead {
            class: dead_class(&e),
            suppress: match &e {
                SendError::Refused(d) => to_suppress(&d.refused),
                _ => Vec::new(),
            },
            error: e.to_string(),
            refused: String::new(),
        },
        Err(e) if exhausted => Outcome::Dead {
            error: format!("gave up after {attempts} attempts: {e}"),
            refused: String::new(),
            class: Class::Transient,
            suppress: match &e {
                SendError::Refused(d) => to_suppress(&d.refused),
                _ => Vec::new(),
            },
        },
        Err(e) => {
            // Only some were refused for now: retry those, suppress the others.
            let (rcpts, suppress, refused) = match &e {
                SendError::Refused(d) => (
                    Some(d.deferred.iter().map(|(r, _)| r.clone()).collect()),
                    to_suppress(&d.refused),
                    refusals(&d.refused),
                ),
                _ => (None, Vec::new(), String::new()),
            };
            Outcome::Retry {
                error: e.to_string(),
                delay_ms: backoff_ms(cfg, attempts),
                rcpts,
                refused,
                suppress,
            }
        }
    }
}

/// Keeps our claim on an entry fresh while its delivery runs, so a slow send is never
/// taken over by another daemon as if we had died.
async fn heartbeat(mail: &MailService, cfg: &MailConfig, entry_id: &str) {
    let every = cfg.claim_idle() / 3;
    loop {
        tokio::time::sleep(every).await;
        mail.queue
            .keep_claim(&mail.backend, &mail.consumer, entry_id)
            .await;
    }
}

async fn deliver(mail: &MailService, cfg: &MailConfig, entry: Entry) {
    tokio::select! {
        _ = heartbeat(mail, cfg, &entry.id) => {}
        _ = deliver_inner(mail, cfg, &entry) => {}
    }
}

async fn deliver_inner(mail: &MailService, cfg: &MailConfig, entry: &Entry) {
    let mail_id = entry.mail_id.as_str();
    let backend = &mail.backend;
    if backend.ensure_up().is_err() {
        return; // stays pending; reclaimed once Redis is back
    }
    if mail_id.is_empty() {
        mail.queue.drop_foreign(backend, &entry.id).await;
        return;
    }
    // Under a rate limit, connect first, so that the permit is followed by the
    // transaction itself: the SMTP server sees at most `rate_per_sec` messages in any
    // second, whatever a connection setup costs.
    let mut ready = None;
    if cfg.rate_per_sec > 0 {
        ready = Some(mail.transport.ready().await);
        loop {
            match mail.queue.rate_wait(backend, cfg.rate_per_sec).await {
                Ok(0) => break,
                Ok(ms) => tokio::time::sleep(Duration::from_millis(ms.max(1))).await,
                Err(_) => return,
            }
        }
    }
    let begun = match mail
        .queue
        .begin(backend, entry, cfg.max_attempts, cfg.status_retention_ms)
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
            tracing::debug!(%mail_id, ?status, "entry needs no delivery; acknowledged");
            return;
        }
        Begin::Dead(reason) => {
            if let Some(ready) = ready {
                mail.transport.release(ready);
            }
            mail.counters.dead.inc();
            tracing::warn!(%mail_id, %reason, "mail is dead");
            return;
        }
    };
    let _sending = mail.counters.sending.enter();
    let body = if entry.body {
        match mail.queue.read_body(backend, mail_id).await {
            Ok(body) => Some(body),
            Err(e) => {
                // Not begun for SMTP: the entry stays pending and is reclaimed.
                tracing::warn!(%mail_id, error = %e, "cannot read the message; it stays pending");
                return;
            }
        }
    } else {
        None
    };
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
            body.as_deref().or(entry.raw.as_deref()).unwrap_or(&raw),
            mail_id,
        )
        .await;
    let outcome = outcome_of(cfg, attempts, result);
    match &outcome {
        Outcome::Sent { .. } => {
            mail.counters.sent.inc();
            tracing::debug!(%mail_id, attempts, "sent");
        }
        Outcome::Retry {
            error, delay_ms, ..
        } => {
            mail.counters.retried.inc();
            tracing::info!(%mail_id, attempts, delay_ms, %error, "delivery failed; will retry");
        }
        Outcome::Dead { error, .. } => {
            mail.counters.dead.inc();
            tracing::warn!(%mail_id, attempts, %error, "delivery failed for good; mail is dead");
        }
    }
    // The outcome must reach Redis, or the entry is reclaimed and sent again: keep
    // trying for a while if Redis blinks.
    let deadline = Instant::now() + cfg.claim_idle() / 2;
    loop {
        match mail
            .queue
            .finish(
                backend,
                entry,
                cfg.status_retention_ms,
                &outcome,
                cfg.suppression_ttl(),
            )
            .await
        {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                tracing::error!(%mail_id, error = %e, "cannot record the delivery outcome; the entry stays pending");
                break;
            }
            Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
}

/// Moves due mail into the stream, reclaims abandoned entries, samples counters.
async fn janitor(
    mail: Arc<MailService>,
    cfg: MailConfig,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let backend = &mail.backend;
    let claim_every = (cfg.claim_idle() / 2).max(Duration::from_millis(50));
    let mut last_claim = Instant::now() - claim_every;
    let mut last_sample = Instant::now();
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut group_ready = false;
    loop {
        if !pause(&shutdown, SCHEDULE_TICK).await {
            return;
        }
        if backend.ensure_up().is_err() {
            continue;
        }
        if !group_ready {
            group_ready = mail.queue.ensure_group(backend).await.is_ok();
        }
        loop {
            match mail.queue.move_due(backend, 500).await {
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
            reclaim(&mail, &cfg, &slots, &tasks).await;
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            last_sample = Instant::now();
            if let Ok(len) = mail.queue.depth(backend).await {
                mail.counters.queue_depth.store(len, Ordering::Relaxed);
            }
            let sent = mail.counters.sent.get();
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
    mail: &Arc<MailService>,
    cfg: &MailConfig,
    slots: &Arc<Semaphore>,
    tasks: &TaskTracker,
) {
    let mut cursor = "0-0".to_owned();
    loop {
        let free = slots.available_permits().min(100);
        if free == 0 {
            return;
        }
        let Ok(claimed) = mail
            .queue
            .claim_abandoned(
                &mail.backend,
                &mail.consumer,
                cfg.claim_idle_ms,
                &cursor,
                free,
            )
            .await
        else {
            return;
        };
        for entry in claimed.entries {
            tracing::info!(mail_id = %entry.mail_id, entry_id = %entry.id, "reclaimed an entry left pending by a dead consumer");
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // No slot after all: it stays claimed by us, idle, and is taken again
                // on a later round.
                continue;
            };
            spawn_delivery(mail, cfg, tasks, entry, permit, true);
        }
        if claimed.cursor == "0-0" {
            return;
        }
        cursor = claimed.cursor;
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
