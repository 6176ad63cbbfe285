//! The Rust client's in-process cache ([`super::ClientBuilder::local_cache_bytes`]):
//! values this process read, kept encoded (each hit decodes its own copy), bounded by
//! bytes, coherent through the daemon's push frames (`cache.track`, protocol.md "Push
//! frames"). A read marks its key pending; an invalidation or flush that arrives
//! before its answer voids it, and a voided answer is used but not kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use rmpv::Value;

/// What an entry costs besides its key and encoded value.
const ENTRY_OVERHEAD: u64 = 96;

struct Entry {
    bytes: Vec<u8>,
    expires: Instant,
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<String, Arc<Entry>> for Weight {
    fn weight(&self, key: &String, e: &Arc<Entry>) -> u64 {
        (key.len() + e.bytes.len()) as u64 + ENTRY_OVERHEAD
    }
}

/// `{hits, misses, entries, bytes, invalidations, flushes}` of the local cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
    pub bytes: u64,
    pub invalidations: u64,
    pub flushes: u64,
}

#[derive(Default)]
struct Pending {
    reads: u32,
    voided: bool,
}

pub struct LocalCache {
    entries: Cache<String, Arc<Entry>, Weight>,
    pending: Mutex<HashMap<String, Pending>>,
    epoch: AtomicU64,
    /// The connection tracks (`cache.track` answered true) and is open.
    pub(super) live: AtomicBool,
    max_entry: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl LocalCache {
    pub fn new(max_bytes: u64) -> LocalCache {
        let estimated = (max_bytes / 512).clamp(64, 1 << 20) as usize;
        LocalCache {
            entries: Cache::with_weighter(estimated, max_bytes, Weight),
            pending: Mutex::default(),
            epoch: AtomicU64::new(0),
            live: AtomicBool::new(false),
            max_entry: max_bytes / 16,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// The value and remaining TTL of a live entry.
    pub fn get(&self, key: &str) -> Option<(Value, u64)> {
        let hit = self.entries.get(key).and_then(|e| {
            let now = Instant::now();
            if now >= e.expires {
                self.entries.remove(key);
                return None;
            }
            let value = rmpv::decode::read_value(&mut &e.bytes[..]).ok()?;
            Some((value, (e.expires - now).as_millis().max(1) as u64))
        });
        let counter = if hit.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// A read of `key` is about to be sent; pass the result to [`LocalCache::finish`].
    pub fn begin(&self, key: &str) -> u64 {
        self.pending().entry(key.to_owned()).or_default().reads += 1;
        self.epoch.load(Ordering::Acquire)
    }

    /// The read begun in `epoch` was answered: keep a hit unless it was voided.
    pub fn finish(&self, key: &str, epoch: u64, hit: Option<(&Value, u64)>) {
        let mut pending = self.pending();
        let voided = match pending.get_mut(key) {
            Some(p) => {
                p.reads -= 1;
                let voided = p.voided;
                if p.reads == 0 {
                    pending.remove(key);
                }
                voided
            }
            None => true,
        };
        let Some((value, ttl_ms)) = hit else { return };
        if voided || epoch != self.epoch.load(Ordering::Acquire) || !self.is_live() || ttl_ms == 0 {
            return;
        }
        let mut bytes = Vec::new();
        if rmpv::encode::write_value(&mut bytes, value).is_err()
            || bytes.len() as u64 > self.max_entry
        {
            return;
        }
        let entry = Entry {
            bytes,
            expires: Instant::now() + Duration::from_millis(ttl_ms),
        };
        // Under the pending lock: an invalidation either voided this read already or
        // will remove what is stored now.
        self.entries.insert(key.to_owned(), Arc::new(entry));
    }

    /// This key may have changed (a push, or a write through this client).
    pub fn invalidate(&self, key: &str) {
        let mut pending = self.pending();
        if let Some(p) = pending.get_mut(key) {
            p.voided = true;
        }
        self.entries.remove(key);
    }

    /// Drop everything; reads in flight are not kept.
    pub fn flush(&self) {
        let _pending = self.pending();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// A push frame from the daemon.
    pub fn on_push(&self, msg: &Value) {
        match super::get(msg, "push").and_then(Value::as_str) {
            Some("invalidate") => {
                let keys = super::get(msg, "keys").and_then(Value::as_array);
                for k in keys.into_iter().flatten().filter_map(Value::as_str) {
                    self.invalidate(k);
                    self.invalidations.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some("flush") => self.flush(),
            _ => {}
        }
    }

    pub fn stats(&self) -> LocalStats {
        LocalStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.entries.len() as u64,
            bytes: self.entries.weight(),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalidation_or_flush_during_a_read_means_it_is_not_kept() {
        let c = LocalCache::new(1 << 20);
        c.live.store(true, Ordering::Release);
        let v = Value::from("old");
        let e = c.begin("k");
        c.on_push(&Value::Map(vec![
            (Value::from("push"), Value::from("invalidate")),
            (Value::from("keys"), Value::Array(vec![Value::from("k")])),
        ]));
        c.finish("k", e, Some((&v, 60_000)));
        assert!(c.get("k").is_none());
        let e = c.begin("k");
        c.on_push(&Value::Map(vec![(
            Value::from("push"),
            Value::from("flush"),
        )]));
        c.finish("k", e, Some((&v, 60_000)));
        assert!(c.get("k").is_none());
        let e = c.begin("k");
        c.finish("k", e, Some((&v, 60_000)));
        assert_eq!(c.get("k").map(|(v, _)| v), Some(Value::from("old")));
        assert!(c.pending().is_empty());
    }
}
