//! The near-cache: recently read values in the daemon's own memory, shared by every
//! app on the host, kept coherent by Redis tracking ([`crate::backend::tracking`]).
//!
//! An entry is *fresh* while its tracking epoch is the current one (no tracking loss
//! since it was read) and it is younger than its Redis TTL and
//! `cache.near_max_ttl_ms`. Only fresh entries are served as hits. Any other entry is
//! *stale*: kept (up to `cache.max_stale_ms` after it went stale) only so that a
//! request that asks with `max_stale_ms` can be answered while Redis is unavailable.
//! An invalidated entry is removed at once: it is known to be wrong.
//!
//! A value read from Redis is stored only if nothing said the key changed while the
//! read was in flight: the read takes a [`Ticket`] (a "pending" mark on the key)
//! before it is sent; an invalidation or own write of the key voids the mark, and a
//! flush moves the epoch on. Values read any other way (the lease script, while
//! tracking is down) are never stored: Redis would not tell us when they change.
//!
//! Bounded by bytes (`cache.near_max_bytes`: keys, values and per-entry overhead),
//! with quick_cache doing the eviction (S3-FIFO: scan resistant, so one big `mget`
//! does not wash out the hot keys). quick_cache rather than moka: moka's `get` was
//! 30% of the daemon's CPU per near hit (its read buffers, epoch GC and
//! maintenance), quick_cache's is a sharded hash lookup; the one thing moka adds,
//! per-entry expiry, is a deadline checked on lookup here.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::Cache;

use super::keys::decode_blob;
use crate::backend::tracking::InvalidationSink;
use crate::config::CacheConfig;
use crate::stats::{Counter, Sample};

/// What an entry costs besides its key and value (the cache's slot, our struct, the Arc).
const ENTRY_OVERHEAD: u64 = 160;
/// The cache's shards; a value over `near_max_bytes / SHARDS` is not kept.
pub const SHARDS: usize = 4;
/// Tracking epochs whose end time is remembered (to date stale entries).
const EPOCH_ENDS: usize = 64;

/// One value held near.
#[derive(Debug)]
pub struct NearEntry {
    /// The stored blob (header + MessagePack value), as Redis holds it. Shared with
    /// the read that brought it (no copy): a 60 MiB `mget` answer must not cost
    /// another 60 MiB to keep its values near.
    pub blob: Bytes,
    /// Until when it may be served as a hit.
    fresh_until: Instant,
    /// The tracking epoch it was read in.
    epoch: u64,
    /// Until when it is kept at all: freshness plus the stale allowance.
    kept_until: Instant,
}

/// What [`NearCache::lookup`] found.
pub enum Lookup {
    Fresh(Arc<NearEntry>),
    /// Not verified any more since `since`.
    Stale(Arc<NearEntry>, Instant),
    Absent,
}

/// Counters for `stats.cache.near`.
#[derive(Debug, Default)]
pub struct NearStats {
    pub hits: Counter,
    pub misses: Counter,
    pub invalidations: Counter,
    pub flushes: Counter,
    pub stale_served: Counter,
}

#[derive(Debug, Default)]
struct Pending {
    /// Reads of the key in flight.
    reads: u32,
    /// Something said the key changed since the oldest of them began.
    voided: bool,
}

/// An entry's weight: its key, its blob and [`ENTRY_OVERHEAD`], in bytes.
#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<String, Arc<NearEntry>> for Weight {
    fn weight(&self, key: &String, value: &Arc<NearEntry>) -> u64 {
        (key.len() + value.blob.len()) as u64 + ENTRY_OVERHEAD
    }
}

pub struct NearCache {
    entries: Cache<String, Arc<NearEntry>, Weight>,
    pending: Mutex<HashMap<String, Pending>>,
    /// The current tracking epoch, as far as stored entries are concerned: moved on
    /// by every flush.
    epoch: AtomicU64,
    /// When recent epochs ended, to date the entries they left stale.
    ended: Mutex<VecDeque<(u64, Instant)>>,
    pub stats: NearStats,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache")
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// A read of one key that may be stored when it completes; see the module doc.
/// Dropping it unfinished (an error, a client that hung up) just gives up the mark.
pub struct Ticket<'a> {
    near: &'a NearCache,
    key: String,
    epoch: u64,
    open: bool,
}

impl Ticket<'_> {
    /// Stores the value read (a blob, or None for a missing key, which is not
    /// stored), unless the key was voided or the epoch moved on meanwhile.
    pub fn finish(mut self, blob: Option<&Bytes>, cfg: &CacheConfig) {
        self.open = false;
        let near = self.near;
        let mut pending = near.pending.lock().unwrap_or_else(|p| p.into_inner());
        let voided = match pending.get_mut(&self.key) {
            Some(p) => {
                let voided = p.voided;
                p.reads -= 1;
                if p.reads == 0 {
                    pending.remove(&self.key);
                }
                voided
            }
            None => true,
        };
        // Checked and stored under the pending lock: an invalidation either came
        // before (voided) or will remove what is stored now.
        if voided || self.epoch != near.epoch.load(Ordering::Acquire) {
            return;
        }
        let Some(blob) = blob else { return };
        let Some((_, ttl_ms)) = decode_blob(blob) else {
            return;
        };
        let fresh_until = Instant::now() + Duration::from_millis(ttl_ms.min(cfg.near_max_ttl_ms));
        let entry = NearEntry {
            blob: blob.clone(),
            fresh_until,
            epoch: self.epoch,
            kept_until: fresh_until + Duration::from_millis(cfg.max_stale_ms),
        };
        near.entries
            .insert(std::mem::take(&mut self.key), Arc::new(entry));
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.open {
            self.near.release(&self.key);
        }
    }
}

impl NearCache {
    pub fn new(cfg: &CacheConfig) -> Arc<NearCache> {
        // The item estimate only sizes the table up front; it grows as needed. Few
        // shards: the daemon has a thread or two, and a value heavier than one
        // shard's share of the bytes is never kept.
        let estimated = (cfg.near_max_bytes / 1024).clamp(1024, 1 << 20) as usize;
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(estimated)
            .weight_capacity(cfg.near_max_bytes)
            .shards(SHARDS)
            .build();
        let entries = match options {
            Ok(options) => {
                Cache::with_options(options, Weight, Default::default(), Default::default())
            }
            Err(_) => Cache::with_weighter(estimated, cfg.near_max_bytes, Weight),
        };
        Arc::new(NearCache {
            entries,
            pending: Mutex::default(),
            epoch: AtomicU64::new(0),
            ended: Mutex::default(),
            stats: NearStats::default(),
        })
    }

    /// The entry for a value key, fresh or stale.
    pub fn lookup(&self, vkey: &str) -> Lookup {
        let Some(entry) = self.entries.get(vkey) else {
            return Lookup::Absent;
        };
        let now = Instant::now();
        if now >= entry.kept_until {
            self.entries.remove(vkey);
            return Lookup::Absent;
        }
        if entry.epoch == self.epoch.load(Ordering::Acquire) {
            if now < entry.fresh_until {
                return Lookup::Fresh(entry);
            }
            let since = entry.fresh_until;
            return Lookup::Stale(entry, since);
        }
        match self.ended_at(entry.epoch) {
            Some(end) => {
                let since = end.min(entry.fresh_until);
                Lookup::Stale(entry, since)
            }
            // Older than anything remembered: too old to serve.
            None => Lookup::Absent,
        }
    }

    /// A stale entry that may stand in for Redis for a caller allowing `allow`.
    pub fn stale_for(&self, vkey: &str, allow: Duration) -> Option<Arc<NearEntry>> {
        match self.lookup(vkey) {
            Lookup::Stale(entry, since) if since.elapsed() <= allow => Some(entry),
            _ => None,
        }
    }

    /// Marks a read of `vkey` as in flight; call before sending it.
    pub fn begin(&self, vkey: &str) -> Ticket<'_> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.entry(vkey.to_owned()).or_default().reads += 1;
        Ticket {
            near: self,
            key: vkey.to_owned(),
            epoch: self.epoch.load(Ordering::Acquire),
            open: true,
        }
    }

    fn release(&self, vkey: &str) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pending.get_mut(vkey) {
            p.reads -= 1;
            if p.reads == 0 {
                pending.remove(vkey);
            }
        }
    }

    /// Drops a key and voids reads of it in flight: for this daemon's own writes
    /// (before they are answered) and for Redis' invalidations.
    pub fn forget(&self, vkey: &str) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pending.get_mut(vkey) {
            p.voided = true;
        }
        self.entries.remove(vkey);
    }

    fn ended_at(&self, epoch: u64) -> Option<Instant> {
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        ended.iter().find(|(e, _)| *e == epoch).map(|(_, t)| *t)
    }

    /// `stats.cache.near`; `tracking`: whether Redis tracking is on right now.
    pub fn samples(&self, tracking: bool) -> Vec<Sample> {
        let s = &self.stats;
        near_samples(
            Some(tracking),
            [
                s.hits.get(),
                s.misses.get(),
                self.entries.len() as u64,
                self.entries.weight(),
                s.invalidations.get(),
                s.flushes.get(),
                s.stale_served.get(),
            ],
        )
    }

    /// `stats.cache.near` with `cache.near = false`: the same names, all zero.
    pub fn disabled_samples() -> Vec<Sample> {
        near_samples(None, [0; 7])
    }
}

/// `tracking` is None when the near-cache is off; `v`: hits, misses, entries,
/// bytes, invalidations, flushes, stale_served.
fn near_samples(tracking: Option<bool>, v: [u64; 7]) -> Vec<Sample> {
    vec![
        Sample::gauge("cache.near.enabled", tracking.is_some()),
        Sample::gauge("cache.near.tracking", tracking.unwrap_or(false)),
        Sample::counter("cache.near.hits", v[0]),
        Sample::counter("cache.near.misses", v[1]),
        Sample::gauge("cache.near.entries", v[2]),
        Sample::gauge("cache.near.bytes", v[3]),
        Sample::counter("cache.near.invalidations", v[4]),
        Sample::counter("cache.near.flushes", v[5]),
        Sample::counter("cache.near.stale_served", v[6]),
    ]
}

impl InvalidationSink for NearCache {
    fn invalidate(&self, keys: &[&[u8]]) {
        for key in keys {
            if let Ok(k) = std::str::from_utf8(key) {
                self.forget(k);
            }
        }
        self.stats.invalidations.add(keys.len() as u64);
    }

    fn flush(&self) {
        // Under the pending lock, so no read checks the epoch half-way through.
        let _pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        ended.push_back((old, Instant::now()));
        while ended.len() > EPOCH_ENDS {
            ended.pop_front();
        }
        self.stats.flushes.inc();
    }

    fn clear(&self) {
        self.flush();
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::keys::encode_blob;

    fn near() -> (Arc<NearCache>, CacheConfig) {
        let cfg = CacheConfig::default();
        (NearCache::new(&cfg), cfg)
    }

    fn blob(ttl_ms: u64, value: &[u8]) -> Bytes {
        Bytes::from(encode_blob(ttl_ms, value))
    }

    fn fresh(near: &NearCache, key: &str) -> bool {
        matches!(near.lookup(key), Lookup::Fresh(_))
    }

    #[test]
    fn a_read_finished_undisturbed_is_kept_and_fresh() {
        let (near, cfg) = near();
        near.begin("k").finish(Some(&blob(60_000, b"\x01")), &cfg);
        assert!(fresh(&near, "k"));
        assert!(near.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn an_invalidation_during_the_read_voids_it() {
        let (near, cfg) = near();
        let early = near.begin("k");
        let late = near.begin("k");
        near.invalidate(&[b"k"]);
        early.finish(Some(&blob(60_000, b"\x01")), &cfg);
        late.finish(Some(&blob(60_000, b"\x02")), &cfg);
        assert!(matches!(near.lookup("k"), Lookup::Absent));
        // The mark is gone with its reads: the next read is kept again.
        near.begin("k").finish(Some(&blob(60_000, b"\x03")), &cfg);
        assert!(fresh(&near, "k"));
    }

    #[test]
    fn a_flush_during_the_read_voids_it_and_demotes_what_was_kept() {
        let (near, cfg) = near();
        near.begin("old").finish(Some(&blob(60_000, b"\x01")), &cfg);
        let reading = near.begin("k");
        near.flush();
        reading.finish(Some(&blob(60_000, b"\x01")), &cfg);
        assert!(matches!(near.lookup("k"), Lookup::Absent));
        assert!(matches!(near.lookup("old"), Lookup::Stale(..)));
        assert!(near.stale_for("old", Duration::from_secs(60)).is_some());
        std::thread::sleep(Duration::from_millis(5));
        assert!(near.stale_for("old", Duration::from_millis(1)).is_none());
        near.clear();
        assert!(matches!(near.lookup("old"), Lookup::Absent));
    }

    #[test]
    fn a_dropped_read_leaves_no_mark_and_misses_are_not_kept() {
        let (near, cfg) = near();
        drop(near.begin("k"));
        assert!(near.pending.lock().unwrap().is_empty());
        near.begin("k").finish(None, &cfg);
        near.begin("k")
            .finish(Some(&Bytes::from_static(b"not a satchel blob")), &cfg);
        assert!(matches!(near.lookup("k"), Lookup::Absent));
    }

    #[test]
    fn freshness_is_capped_by_near_max_ttl() {
        let cfg = CacheConfig {
            near_max_ttl_ms: 1,
            ..CacheConfig::default()
        };
        let near = NearCache::new(&cfg);
        near.begin("k").finish(Some(&blob(60_000, b"\x01")), &cfg);
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(near.lookup("k"), Lookup::Stale(..)));
    }
}
