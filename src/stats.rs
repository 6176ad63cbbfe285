//! Counters behind the `stats` op and the systemd `STATUS=` line. Plain atomics:
//! they are bumped on every request and must cost nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Connections open right now.
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections refused (max_connections, allow_uids/allow_gids).
    pub connections_refused: AtomicU64,
    /// Requests received (including ones answered with an error).
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Requests being handled right now.
    pub inflight: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            connections: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
        }
    }
}

/// A point-in-time copy of the core counters, as the `stats` op reports them.
#[derive(Debug, Clone, Serialize)]
pub struct CoreSnapshot {
    pub uptime_ms: u64,
    pub connections: u64,
    pub connections_total: u64,
    pub connections_refused: u64,
    pub requests: u64,
    pub errors: u64,
    pub inflight: u64,
}

impl Stats {
    pub fn snapshot(&self) -> CoreSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CoreSnapshot {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            connections: get(&self.connections),
            connections_total: get(&self.connections_total),
            connections_refused: get(&self.connections_refused),
            requests: get(&self.requests),
            errors: get(&self.errors),
            inflight: get(&self.inflight),
        }
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn drop_one(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}
