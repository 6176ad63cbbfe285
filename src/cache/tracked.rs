//! Client tracking (`cache.track`): which keys each tracking connection has read, so
//! that the daemon can push `invalidate` when any writer changes one, and `flush`
//! when it loses track (protocol.md, "Push frames").
//!
//! Fed by the same events as the near-cache: this daemon's own writes (before they
//! are answered) and Redis' invalidations on the tracking connection. A key is
//! forgotten for a connection once its invalidation is queued: the client re-reads it
//! to track it again, so each tracked key costs at most one push, and a connection's
//! pushes are bounded by `cache.track_max_keys`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::push::{Push, PushSender, Session};
use crate::stats::Counter;

/// One tracking connection.
struct Conn {
    pushes: PushSender,
    /// Value keys it read since their last invalidation.
    keys: HashSet<String>,
    /// Bytes of the namespace prefix in front of a key the client named.
    strip: usize,
}

#[derive(Default)]
struct Table {
    /// value key → the tracking connections that read it.
    readers: HashMap<String, Vec<u64>>,
    conns: HashMap<u64, Conn>,
}

impl Table {
    /// Drops every key of `conn` from `readers`.
    fn forget_keys(&mut self, id: u64, keys: HashSet<String>) {
        for k in keys {
            if let Some(ids) = self.readers.get_mut(&k) {
                ids.retain(|&c| c != id);
                if ids.is_empty() {
                    self.readers.remove(&k);
                }
            }
        }
    }
}

#[derive(Default)]
pub struct Tracked {
    table: Mutex<Table>,
    /// Tracking connections right now: reads and writes skip the lock when it is 0.
    count: AtomicUsize,
    pub invalidations_pushed: Counter,
    pub flushes_pushed: Counter,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("connections", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Tracked {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many connections track right now.
    pub fn connections(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// `session` tracks from now on; `strip` is its namespace prefix length.
    pub fn track(&self, session: &Session, strip: usize) {
        let mut t = self.table();
        if let std::collections::hash_map::Entry::Vacant(slot) = t.conns.entry(session.id) {
            slot.insert(Conn {
                pushes: session.pushes.clone(),
                keys: HashSet::new(),
                strip,
            });
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `session` stops tracking (or closed).
    pub fn untrack(&self, session: u64) {
        if self.connections() == 0 {
            return;
        }
        let mut t = self.table();
        if let Some(conn) = t.conns.remove(&session) {
            self.count.fetch_sub(1, Ordering::Relaxed);
            t.forget_keys(session, conn.keys);
        }
    }

    /// `session` is about to read `vkeys`: remember them (before the read, so an
    /// invalidation during the read is not lost). Past `max_keys` the connection gets
    /// a flush and starts over.
    pub fn reading<'a>(
        &self,
        session: u64,
        vkeys: impl IntoIterator<Item = &'a str>,
        max_keys: u64,
    ) {
        if self.connections() == 0 {
            return;
        }
        let mut t = self.table();
        let Some(conn) = t.conns.get_mut(&session) else {
            return;
        };
        let mut added = Vec::new();
        for vk in vkeys {
            if conn.keys.insert(vk.to_owned()) {
                added.push(vk.to_owned());
            }
        }
        if conn.keys.len() as u64 > max_keys {
            let keys = std::mem::take(&mut conn.keys);
            let _ = conn.pushes.send(Push::Flush);
            self.flushes_pushed.inc();
            // Those just added are not in `readers` yet.
            let added: HashSet<String> = added.into_iter().collect();
            let old: HashSet<String> = keys.into_iter().filter(|k| !added.contains(k)).collect();
            t.forget_keys(session, old);
            return;
        }
        for vk in added {
            t.readers.entry(vk).or_default().push(session);
        }
    }

    /// The value of `vkey` may have changed: tell every connection that read it.
    pub fn changed(&self, vkey: &str) {
        if self.connections() == 0 {
            return;
        }
        let mut t = self.table();
        let Some(ids) = t.readers.remove(vkey) else {
            return;
        };
        for id in ids {
            if let Some(conn) = t.conns.get_mut(&id) {
                conn.keys.remove(vkey);
                // `<base>v:{<key>}` → `<key>`.
                let key = vkey
                    .get(conn.strip..)
                    .and_then(|k| k.strip_suffix('}'))
                    .unwrap_or(vkey)
                    .to_owned();
                let _ = conn.pushes.send(Push::Invalidate(key));
                self.invalidations_pushed.inc();
            }
        }
    }

    /// The daemon lost track (or found it again after losing it): every tracking
    /// connection drops everything.
    pub fn flush_all(&self) {
        if self.connections() == 0 {
            return;
        }
        let mut t = self.table();
        t.readers.clear();
        for conn in t.conns.values_mut() {
            conn.keys.clear();
            let _ = conn.pushes.send(Push::Flush);
            self.flushes_pushed.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &mut crate::push::PushReceiver) -> Vec<Push> {
        let mut out = Vec::new();
        while let Ok(p) = rx.try_recv() {
            out.push(p);
        }
        out
    }

    #[test]
    fn a_read_key_gets_one_invalidation_named_as_the_client_named_it() {
        let t = Tracked::default();
        let (a, mut rx_a) = Session::new();
        let (b, mut rx_b) = Session::new();
        t.track(&a, "ns:v:{".len());
        t.reading(a.id, ["ns:v:{k1}", "ns:v:{k2}"], 100);
        t.reading(b.id, ["ns:v:{k1}"], 100); // b does not track
        t.changed("ns:v:{k1}");
        t.changed("ns:v:{k1}");
        assert_eq!(drain(&mut rx_a), vec![Push::Invalidate("k1".into())]);
        assert!(drain(&mut rx_b).is_empty());
        t.untrack(a.id);
        t.changed("ns:v:{k2}");
        assert!(drain(&mut rx_a).is_empty());
        assert!(t.table().readers.is_empty());
    }

    #[test]
    fn overflowing_the_table_is_a_flush_and_a_fresh_start() {
        let t = Tracked::default();
        let (a, mut rx) = Session::new();
        t.track(&a, 0);
        t.reading(a.id, ["k1", "k2"], 2);
        t.reading(a.id, ["k3"], 2);
        assert_eq!(drain(&mut rx), vec![Push::Flush]);
        t.changed("k1");
        assert!(drain(&mut rx).is_empty(), "k1 was forgotten with the flush");
        t.reading(a.id, ["k1"], 2);
        t.changed("k1");
        assert_eq!(drain(&mut rx), vec![Push::Invalidate("k1".into())]);
        t.flush_all();
        assert_eq!(drain(&mut rx), vec![Push::Flush]);
        assert!(t.table().readers.is_empty());
    }
}
