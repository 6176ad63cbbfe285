//! The mail event stream: one entry per status transition, written by the
//! transition's own script (`emit` in queue.rs), so an event exists exactly when its
//! transition happened; read by `mail.events` with a cursor (the stream id of the
//! last event seen), which resumes without gaps or repeats, across daemon restarts.
//!
//! A long poll (`wait_ms`) does not hold a Redis connection of its own: one task per
//! daemon ([`Tail`]) blocks in `XREAD` on a dedicated connection and wakes every
//! waiting poll when the stream grows; the polls then read with a plain `XRANGE`.

use std::collections::HashMap;
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
    /// The events of one stream entry: one transition (`mail_id`, `status`, …), or
    /// the mails one enqueue script run queued (`n`, `at_ms`, then `m<i>`, `s<i>`,
    /// `t<i>`, `o<i>` for i in 1..=n), whose events are `<entry id>.<i>`.
    pub(crate) fn of_entry(id: &str, map: &HashMap<String, Value>) -> Vec<Event> {
        let s = |k: &str| map.get(k).and_then(text);
        let num = |k: &str| s(k).and_then(|a| a.parse::<u64>().ok());
        let to = |k: &str| {
            s(k).map(|t| super::queue::split_list(&t))
                .unwrap_or_default()
        };
        let Some(n) = num("n") else {
            return vec![Event {
                event_id: id.to_owned(),
                mail_id: s("mail_id").unwrap_or_default(),
                status: s("status").unwrap_or_default(),
                attempts: num("attempts").unwrap_or(0),
                at_ms: num("at_ms").unwrap_or(0),
                error: s("error"),
                class: s("class"),
                to: to("to"),
                owner: s("owner").and_then(|o| o.parse().ok()),
            }];
        };
        let at_ms = num("at_ms").unwrap_or(0);
        (1..=n)
            .map(|i| Event {
                event_id: format!("{id}.{i}"),
                mail_id: s(&format!("m{i}")).unwrap_or_default(),
                status: s(&format!("s{i}")).unwrap_or_default(),
                attempts: 0,
                at_ms,
                error: None,
                class: None,
                to: to(&format!("t{i}")),
                owner: s(&format!("o{i}")).and_then(|o| o.parse().ok()),
            })
            .collect()
    }
}

/// Where a cursor points: a stream entry, and within an enqueue batch's entry the
/// last event already read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub ms: u64,
    pub seq: u64,
    pub sub: Option<u64>,
}

impl Cursor {
    fn entry(&self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }
}

/// A cursor is an event id: a stream id `<ms>-<seq>`, or `<ms>-<seq>.<i>` for an event
/// of an enqueue batch; `0` (or `0-0`) means "from the oldest kept".
pub fn parse_cursor(s: &str) -> Option<Cursor> {
    if s == "0" {
        return Some(Cursor {
            ms: 0,
            seq: 0,
            sub: None,
        });
    }
    let digits = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
    let (id, sub) = match s.split_once('.') {
        Some((id, sub)) if digits(sub) => (id, Some(sub.parse().ok()?)),
        Some(_) => return None,
        None => (s, None),
    };
    let (ms, seq) = id.split_once('-')?;
    if !digits(ms) || !digits(seq) {
        return None;
    }
    Some(Cursor {
        ms: ms.parse().ok()?,
        seq: seq.parse().ok()?,
        sub,
    })
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
    /// Events after `after`, oldest first, from at most [`SCAN_BATCH`] stream
    /// entries; and whether there may be more.
    async fn events_page(
        &self,
        backend: &Backend,
        after: Cursor,
    ) -> Result<(Vec<Event>, bool), BackendError> {
        let count = SCAN_BATCH;
        let start = match after {
            Cursor { ms: 0, seq: 0, .. } => "-".to_owned(),
            // Part of that entry's batch is still to come.
            Cursor { sub: Some(_), .. } => after.entry(),
            _ => format!("({}", after.entry()),
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
        let past = |e: &Event| match (after.sub, e.event_id.rsplit_once('.')) {
            (Some(read), Some((entry, i))) if entry == after.entry() => {
                i.parse::<u64>().is_ok_and(|i| i <= read)
            }
            (Some(_), None) => e.event_id == after.entry(),
            _ => false,
        };
        let full = reply.ids.len() == count;
        let events = reply
            .ids
            .iter()
            .flat_map(|e| Event::of_entry(&e.id, &e.map))
            .filter(|e| !past(e))
            .collect();
        Ok((events, full))
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
        since: Cursor,
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
            Some(first) => removed && (since.ms, since.seq) < (first.ms, first.seq),
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
            None => {
                let last = self.events_last_id(backend).await?;
                parse_cursor(&last)
                    .ok_or_else(|| BackendError::Reply(format!("stream id {last}")))?
            }
            Some(s) => {
                let parsed = parse_cursor(s).ok_or(CursorError::Malformed)?;
                if (parsed.ms, parsed.seq) != (0, 0)
                    && self.events_trimmed_past(backend, parsed).await?
                {
                    return Err(CursorError::Expired);
                }
                parsed
            }
        };
        let deadline = tokio::time::Instant::now() + poll.wait;
        // Only a poll that may wait wants the tail to read.
        let mut woken = (!poll.wait.is_zero()).then(|| tail.subscribe());
        let mut scans = 0;
        loop {
            if let Some(w) = woken.as_mut() {
                w.borrow_and_update();
            }
            let (batch, full) = self.events_page(backend, cursor).await?;
            let mut out = Vec::new();
            for e in batch {
                cursor = parse_cursor(&e.event_id).unwrap_or(cursor);
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
                return Ok((out, cursor_text(cursor)));
            }
            if full {
                continue;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(w) = woken.as_mut().filter(|_| !left.is_zero()) else {
                return Ok((out, cursor_text(cursor)));
            };
            if tokio::time::timeout(left, w.changed()).await.is_err() {
                return Ok((out, cursor_text(cursor)));
            }
        }
    }
}

fn cursor_text(c: Cursor) -> String {
    match c.sub {
        Some(i) => format!("{}.{i}", c.entry()),
        None => c.entry(),
    }
}

/// Wakes long polls when the event stream grows. It reads the stream only while a
/// poll waits: with nobody following, events cost the daemon and Redis nothing
/// beyond their `XADD`s.
#[derive(Debug)]
pub struct Tail {
    grew: watch::Sender<u64>,
    wanted: tokio::sync::Notify,
}

impl Default for Tail {
    fn default() -> Self {
        Tail {
            grew: watch::Sender::new(0),
            wanted: tokio::sync::Notify::new(),
        }
    }
}

impl Tail {
    fn subscribe(&self) -> watch::Receiver<u64> {
        let rx = self.grew.subscribe();
        self.wanted.notify_one();
        rx
    }

    fn wake(&self) {
        self.grew.send_modify(|n| *n += 1);
    }

    /// Until shutdown: waits for a poll to wait, then blocks in `XREAD` after the
    /// newest event it has seen, on a connection of its own, waking the polls on
    /// every new event, until none waits.
    pub async fn run(&self, backend: Arc<Backend>, queue: Queue, shutdown: CancellationToken) {
        loop {
            while self.grew.receiver_count() == 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.wanted.notified() => {}
                }
            }
            let failed = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.follow(&backend, &queue) => r.is_err(),
            };
            // A poll that subscribed while the tail was not reading re-checks now.
            self.wake();
            if failed {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                }
            }
        }
    }

    /// Follows the stream while anyone waits; an error ends it.
    async fn follow(&self, backend: &Arc<Backend>, queue: &Queue) -> Result<(), BackendError> {
        let mut conn = backend.dedicated().await?;
        let mut last = queue.events_last_id(backend).await?;
        // Events that came before `last` was read are in the polls' own XRANGE.
        self.wake();
        while self.grew.receiver_count() > 0 {
            let reply: Option<StreamReadReply> = conn
                .query(
                    redis::cmd("XREAD")
                        .arg("COUNT")
                        .arg(1)
                        .arg("BLOCK")
                        .arg(1000)
                        .arg("STREAMS")
                        .arg(&queue.events)
                        .arg(&last),
                )
                .await?;
            let newest = reply
                .and_then(|r| r.keys.into_iter().next())
                .and_then(|k| k.ids.into_iter().last());
            if let Some(e) = newest {
                // The polls read the rest themselves: start after the newest now.
                last = queue.events_last_id(backend).await.unwrap_or(e.id);
                self.wake();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_event_ids() {
        let c = |ms, seq, sub| Some(Cursor { ms, seq, sub });
        assert_eq!(
            parse_cursor("1700000000000-3"),
            c(1_700_000_000_000, 3, None)
        );
        assert_eq!(
            parse_cursor("1700000000000-3.12"),
            c(1_700_000_000_000, 3, Some(12))
        );
        assert_eq!(parse_cursor("0"), c(0, 0, None));
        assert_eq!(parse_cursor("0-0"), c(0, 0, None));
        assert_eq!(cursor_text(c(5, 1, Some(2)).unwrap()), "5-1.2");
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
            "1-2.",
            "1-2.x",
            "1-2.3.4",
        ] {
            assert_eq!(parse_cursor(bad), None, "{bad:?}");
        }
    }
}
