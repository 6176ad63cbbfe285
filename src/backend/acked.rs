//! Writes that wait for replicas (`mail.min_replicas_ack`): a script, then Redis
//! `WAIT` on the connection that ran it.
//!
//! Why a connection of its own: `WAIT` blocks the connection it is sent on until
//! the replicas answer or the timeout passes, and on the shared multiplexed
//! connection every cache command would queue behind it.
//!
//! Why one `WAIT` can answer many writes (group commit): Redis' replication offset
//! only grows, and `WAIT` returns once replicas have reached the offset of this
//! connection's last write. So a `WAIT` sent after a write completed covers it, and
//! writes that finish while a `WAIT` is in flight share the next one. A replica that
//! stops answering then costs one timeout per batch, not one per mail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;

use super::conn::Conn;

/// The last `WAIT`'s answer: it covered every write counted up to `upto`.
#[derive(Default)]
struct Covered {
    upto: u64,
    acked: u64,
}

/// One connection for acknowledged writes.
pub(super) struct Lane {
    pub(super) conn: Conn,
    /// The node it was made for.
    pub(super) generation: u64,
    /// Writes completed on it.
    written: AtomicU64,
    gate: Mutex<Covered>,
}

impl Lane {
    pub(super) fn new(conn: Conn, generation: u64) -> Lane {
        Lane {
            conn,
            generation,
            written: AtomicU64::new(0),
            gate: Mutex::new(Covered::default()),
        }
    }

    /// Counts a completed write; the ticket to pass to [`Lane::replicas`].
    pub(super) fn wrote(&self) -> u64 {
        self.written.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// How many replicas have the write `ticket` (and everything before it), waiting
    /// at most `timeout` for `want` of them. `key` is one the writes touched (on a
    /// cluster `WAIT` must reach the primary that took them).
    pub(super) async fn replicas(
        &self,
        ticket: u64,
        want: u64,
        timeout: Duration,
        deadline: Duration,
        key: &str,
    ) -> Result<u64, redis::RedisError> {
        let mut covered = self.gate.lock().await;
        if covered.upto >= ticket {
            return Ok(covered.acked);
        }
        // Every write counted so far completed before this WAIT is sent.
        let upto = self.written.load(Ordering::Acquire);
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(want).arg(timeout.as_millis() as u64);
        let wait = conn.query_for_key(key, cmd);
        let acked = tokio::time::timeout(deadline, wait).await.map_err(|_| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "WAIT went unanswered",
            ))
        })??;
        let acked: u64 = redis::from_redis_value(acked)?;
        *covered = Covered { upto, acked };
        Ok(acked)
    }
}

/// The lane, made on first use and again after it failed or the master moved.
#[derive(Default)]
pub(super) struct AckLane {
    current: Mutex<Option<Arc<Lane>>>,
}

impl AckLane {
    /// The lane for `generation`, connecting with `connect` when there is none.
    pub(super) async fn get<F, Fut>(
        &self,
        generation: u64,
        connect: F,
    ) -> Result<Arc<Lane>, redis::RedisError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Conn, redis::RedisError>>,
    {
        let mut current = self.current.lock().await;
        if let Some(lane) = current.as_ref().filter(|l| l.generation == generation) {
            return Ok(lane.clone());
        }
        let lane = Arc::new(Lane::new(connect().await?, generation));
        *current = Some(lane.clone());
        Ok(lane)
    }

    /// Forgets `lane` after an error, so the next write connects again.
    pub(super) async fn drop_lane(&self, lane: &Arc<Lane>) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, lane)) {
            *current = None;
        }
    }
}
