//! Waiting for another caller's fill, without a herd of pollers.
//!
//! All callers in this daemon that wait for the same key share one [`Watch`]: one task
//! that re-checks Redis only when something happened to the key (a pub/sub event from
//! any daemon: fill, set, delete, lease voided) or when the current lease runs out.
//! When the lease expires unfilled, the watch takes the new lease and hands it to
//! exactly one of its waiters; the others keep waiting for that waiter's fill.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;

/// What a waiter receives from its watch.
#[derive(Debug)]
pub enum Handoff {
    /// The key was filled: the stored blob.
    Value(Bytes),
    /// The previous lease ran out: this waiter now holds the lease.
    Lease(String),
}

/// One key's shared wait inside this daemon.
#[derive(Debug, Default)]
pub struct Watch {
    /// Woken by pub/sub events for the key.
    pub changed: Notify,
    waiters: Mutex<VecDeque<(u64, oneshot::Sender<Handoff>)>>,
}

impl Watch {
    /// Hands `lease` to the first waiter that is still waiting; gives it back if none.
    pub fn hand_lease(&self, lease: String) -> Option<String> {
        let mut lease = lease;
        while let Some((_, tx)) = self.pop() {
            match tx.send(Handoff::Lease(lease)) {
                Ok(()) => return None,
                Err(Handoff::Lease(back)) => lease = back,
                Err(Handoff::Value(_)) => return None,
            }
        }
        Some(lease)
    }

    /// Sends the filled value to every waiter.
    pub fn hand_value(&self, blob: Bytes) {
        while let Some((_, tx)) = self.pop() {
            let _ = tx.send(Handoff::Value(blob.clone()));
        }
    }

    /// The lease_ms of the oldest live waiter (the one a new lease would go to).
    pub fn next_lease_ms(&self) -> Option<u64> {
        let mut waiters = self.waiters.lock().ok()?;
        waiters.retain(|(_, tx)| !tx.is_closed());
        waiters.front().map(|(ms, _)| *ms)
    }

    fn pop(&self) -> Option<(u64, oneshot::Sender<Handoff>)> {
        self.waiters.lock().ok()?.pop_front()
    }
}

/// The watches of this daemon, keyed by the Redis value key.
#[derive(Debug, Default)]
pub struct Watches {
    map: Mutex<HashMap<String, Arc<Watch>>>,
    /// Whether the pub/sub listener is subscribed; while it is not, watches poll.
    pub events_live: AtomicBool,
}

impl Watches {
    /// Joins the watch for `vkey` (creating it if needed). Returns the receiver and,
    /// when this call created the watch, the watch to run.
    pub fn join(
        &self,
        vkey: &str,
        lease_ms: u64,
    ) -> (oneshot::Receiver<Handoff>, Option<Arc<Watch>>) {
        let (tx, rx) = oneshot::channel();
        let Ok(mut map) = self.map.lock() else {
            return (rx, None);
        };
        let mut created = None;
        let watch = map
            .entry(vkey.to_owned())
            .or_insert_with(|| {
                let w = Arc::new(Watch::default());
                created = Some(w.clone());
                w
            })
            .clone();
        if let Ok(mut waiters) = watch.waiters.lock() {
            waiters.push_back((lease_ms, tx));
        }
        (rx, created)
    }

    /// Whether a watch for `vkey` exists (callers then join without asking Redis).
    pub fn contains(&self, vkey: &str) -> bool {
        self.map
            .lock()
            .map(|m| m.contains_key(vkey))
            .unwrap_or(false)
    }

    /// Removes the watch if nobody waits on it any more; returns whether it did.
    pub fn retire_if_idle(&self, vkey: &str, watch: &Arc<Watch>) -> bool {
        let Ok(mut map) = self.map.lock() else {
            return true;
        };
        let idle = watch
            .waiters
            .lock()
            .map(|mut w| {
                w.retain(|(_, tx)| !tx.is_closed());
                w.is_empty()
            })
            .unwrap_or(true);
        if idle {
            map.remove(vkey);
        }
        idle
    }

    /// Removes the watch unconditionally (after its value was handed out).
    pub fn retire(&self, vkey: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(vkey);
        }
    }

    fn notify(&self, vkey: &str) {
        if let Some(w) = self.map.lock().ok().and_then(|m| m.get(vkey).cloned()) {
            w.changed.notify_one();
        }
    }

    /// Keeps one pub/sub subscription to the events channel, reconnecting as needed.
    pub async fn run_events(
        self: Arc<Self>,
        backend: Arc<Backend>,
        channel: String,
        shutdown: CancellationToken,
    ) {
        loop {
            let subscribed = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = backend.subscribe(&channel) => r,
            };
            if let Ok(mut messages) = subscribed {
                self.events_live.store(true, Ordering::Relaxed);
                tracing::debug!(%channel, "subscribed to cache events");
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        msg = messages.next() => match msg {
                            Some(payload) => {
                                if let Ok(vkey) = std::str::from_utf8(&payload) {
                                    self.notify(vkey);
                                }
                            }
                            None => break,
                        }
                    }
                }
                self.events_live.store(false, Ordering::Relaxed);
                tracing::debug!("cache events subscription lost; waiters poll until it is back");
                self.notify_all();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(crate::backend::RETRY_AFTER) => {}
            }
        }
    }

    fn notify_all(&self) {
        if let Ok(map) = self.map.lock() {
            for w in map.values() {
                w.changed.notify_one();
            }
        }
    }
}
