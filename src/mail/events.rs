//! The mail event stream: one entry per status transition, written by the
//! transition's own script (`emit` in queue.rs), so an event exists exactly when its
//! transition happened; read by `mail.events` with a cursor (the stream id of the
//! last event seen), which resumes without gaps or repeats, across daemon restarts.
//!
//! A long poll (`wait_ms`) does not hold a Redis connection of its own: one task per
//! daemon ([`Tail`]) blocks in `XREAD` on a dedicated connection and wakes every
//! waiting poll when the stream grows; the polls then read with a plain `XRANGE`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use redis::streams::{StreamRangeReply, StreamReadReply};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::queue::{Queue, Scope};
use crate::backend::reply::text;
use crate::backend::{Backend, BackendError, RETRY_AFTER};

/// Entries one `XRANGE` reads; a poll whose filters match none of them reads again,
/// at most [`MAX_SCANS`] times, then answers with what it has and the cursor moved on.
const SCAN_BATCH: usize = 1000;
const MAX_SCANS: usize = 10;

/// One event, as `mail.events` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub event_id: String,
    pub mail_id: String,
    pub status: String,
    pub attempts: u64,
    pub at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// The sender's uid; only in an admin's answer.
    #[serde(rename = "uid", skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
}

impl Event {
    fn from_entry(id: String, map: &HashMap<String, Value>) -> Event {
        let s = |k: &str| map.get(k).and_then(text);
        Event {
            event_id: id,
            mail_id: s("mail_id").unwrap_or_default(),
            status: s("status").unwrap_or_default(),
            attempts: s("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
            at_ms: s("at_ms").and_then(|a| a.parse().ok()).unwrap_or(0),
            error: s("error"),
            class: s("class"),
            to: s("to")
                .map(|t| super::queue::split_list(&t))
                .unwrap_or_default(),
            owner: s("owner").and_then(|o| o.parse().ok()),
        }
    }
}

/// A cursor is a stream id, `<ms>-<seq>`; `0` (or `0-0`) means "from the oldest kept".
pub fn parse_cursor(s: &str) -> Option<(u64, u64)> {
    if s == "0" {
        return Some((0, 0));
    }
    let (ms, seq) = s.split_once('-')?;
    let digits = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(ms) || !digits(seq) {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// What one poll asks for.
pub struct Poll<'a> {
    pub since: Option<&'a str>,
    pub limit: usize,
    pub wait: Duration,
    pub mail_id: Option<&'a str>,
    pub scope: Scope,
    /// Whether answers name each event's owner.
    pub admin: bool,
}

/// Why a cursor cannot be used.
pub enum CursorError {
    Malformed,
    /// Older than the oldest event kept (`mail.events_max` trimmed past it).
    Expired,
    Backend(BackendError),
}

impl From<BackendError> for CursorError {
    fn from(e: BackendError) -> Self {
        CursorError::Backend(e)
    }
}

impl Queue {
    /// Events after `after` (exclusive), oldest first, at most `count`.
    async fn events_after(
        &self,
        backend: &Backend,
        after: &str,
        count: usize,
    ) -> Result<Vec<Event>, BackendError> {
        let start = if after == "0-0" {
            "-".to_owned()
        } else {
            format!("({after}")
        };
        let reply: StreamRangeReply = backend
            .query(
                redis::cmd("XRANGE")
                    .arg(&self.events)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|e| Event::from_entry(e.id, &e.map))
            .collect())
    }

    /// The id of the newest event ("0-0" when there is none).
    async fn events_last_id(&self, backend: &Backend) -> Result<String, BackendError> {
        let reply: StreamRangeReply = backend
            .query(
                redis::cmd("XREVRANGE")
                    .arg(&self.events)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |e| e.id))
    }

    /// Whether events after `since` were trimmed away: `since` is older than the
    /// oldest event kept, and some were removed.
    async fn events_trimmed_past(
        &self,
        backend: &Backend,
        since: (u64, u64),
    ) -> Result<bool, BackendError> {
        let info: Result<HashMap<String, Value>, _> = backend
            .query(redis::cmd("XINFO").arg("STREAM").arg(&self.events))
            .await;
        let info = match info {
            Ok(i) => i,
            // No stream yet: nothing was ever trimmed.
            Err(e) if e.to_string().contains("no such key") => return Ok(false),
            Err(e) => return Err(e),
        };
        let num = |k: &str| -> u64 {
            match info.get(k) {
                Some(Value::Int(n)) => *n as u64,
                _ => 0,
            }
        };
        let first = match info.get("first-entry") {
            Some(Value::Array(e)) => e.first().and_then(text),
            _ => None,
        };
        let removed = num("entries-added") > num("length");
        Ok(match first.as_deref().and_then(parse_cursor) {
            Some(first) => removed && since < first,
            None => false,
        })
    }

    /// One `mail.events` poll: events after the cursor the caller may see, and the
    /// cursor to pass next.
    pub async fn poll_events(
        &self,
        backend: &Backend,
        tail: &Tail,
        poll: Poll<'_>,
    ) -> Result<(Vec<Event>, String), CursorError> {
        let mut cursor = match poll.since {
            None => self.events_last_id(backend).await?,
            Some(s) => {
                let parsed = parse_cursor(s).ok_or(CursorError::Malformed)?;
                if parsed != (0, 0) && self.events_trimmed_past(backend, parsed).await? {
                    return Err(CursorError::Expired);
                }
                if parsed == (0, 0) {
                    "0-0".to_owned()
                } else {
                    s.to_owned()
                }
            }
        };
        let deadline = tokio::time::Instant::now() + poll.wait;
        let mut woken = tail.subscribe();
        let mut scans = 0;
        loop {
            woken.borrow_and_update();
            let batch = self.events_after(backend, &cursor, SCAN_BATCH).await?;
            let full = batch.len() == SCAN_BATCH;
            let mut out = Vec::new();
            for e in batch {
                cursor = e.event_id.clone();
                let mine = match poll.scope {
                    Scope::All => true,
                    Scope::Owner(uid) => e.owner == Some(uid),
                };
                if mine && poll.mail_id.is_none_or(|m| m == e.mail_id) {
                    let mut e = e;
                    if !poll.admin {
                        e.owner = None;
                    }
                    out.push(e);
                    if out.len() == poll.limit {
                        break;
                    }
                }
            }
            scans += 1;
            if !out.is_empty() || scans >= MAX_SCANS {
                return Ok((out, cursor));
            }
            if full {
                continue;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || tokio::time::timeout(left, woken.changed()).await.is_err() {
                return Ok((out, cursor));
            }
        }
    }
}

/// Wakes long polls when the event stream grows.
#[derive(Debug)]
pub struct Tail {
    grew: watch::Sender<u64>,
}

impl Default for Tail {
    fn default() -> Self {
        Tail {
            grew: watch::Sender::new(0),
        }
    }
}

impl Tail {
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.grew.subscribe()
    }

    /// Blocks in `XREAD` after the newest event it has seen, on a connection of its
    /// own, until shutdown; every new event wakes the waiting polls.
    pub async fn run(&self, backend: Arc<Backend>, queue: Queue, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.follow(&backend, &queue) => {}
            }
            // Polls waiting now would miss what arrives while the tail reconnects.
            self.grew.send_modify(|n| *n += 1);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY_AFTER) => {}
            }
        }
    }

    /// Follows the stream until an error.
    async fn follow(
        &self,
        backend: &Arc<Backend>,
        queue: &Queue,
    ) -> Result<Infallible, BackendError> {
        let mut conn = backend.dedicated().await?;
        let mut last = queue.events_last_id(backend).await?;
        loop {
            let reply: Option<StreamReadReply> = conn
                .query(
                    redis::cmd("XREAD")
                        .arg("BLOCK")
                        .arg(5000)
                        .arg("STREAMS")
                        .arg(&queue.events)
                        .arg(&last),
                )
                .await?;
            let newest = reply
                .and_then(|r| r.keys.into_iter().next())
                .and_then(|k| k.ids.into_iter().last());
            if let Some(e) = newest {
                last = e.id;
                self.grew.send_modify(|n| *n += 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_stream_ids() {
        assert_eq!(
            parse_cursor("1700000000000-3"),
            Some((1_700_000_000_000, 3))
        );
        assert_eq!(parse_cursor("0"), Some((0, 0)));
        assert_eq!(parse_cursor("0-0"), Some((0, 0)));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "abc",
            "1-2-3",
            "1 -2",
            "$",
            "+",
            "99999999999999999999999-1",
        ] {
            assert_eq!(parse_cursor(bad), None, "{bad:?}");
        }
    }
}
