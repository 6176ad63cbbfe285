//! Multi-key ops (`cache.mget`, `cache.del`) in bounded pieces.
//!
//! One request may name up to `cache.max_keys_per_request` keys, but no single Redis
//! command carries more than [`BATCH_KEYS`] keys or about [`BATCH_BYTES`] of reply,
//! so Redis is never blocked for long by one request and its reply never trips the
//! response timeout for everyone else. An `mget` answer is sized before its values
//! are fetched (`STRLEN` of each distinct key), so an answer over
//! `server.max_response_bytes` is refused without ever being held: naming one 1 MiB
//! value a million times costs a million-entry size check, not a terabyte.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::keys::{KeySpace, decode_blob};
use super::near::NearEntry;
use super::{CacheError, CacheService};
use crate::config::CacheConfig;
use crate::protocol::msgpack::Writer;

/// Most keys in one Redis command (a `DEL` script gets two per key: value, lease).
pub const BATCH_KEYS: usize = 1000;
/// Reply bytes one `MGET` may bring (a single larger value still goes alone).
pub const BATCH_BYTES: u64 = 1 << 20;
/// What one `{hit: true, value: …}` entry costs on top of its value.
const ENTRY_OVERHEAD: u64 = 32;

/// One value of an answer: read from Redis now, or held in the near-cache (fresh,
/// or stale standing in for an unavailable Redis).
enum Blob {
    Read(Bytes),
    Near(Arc<NearEntry>),
    Stale(Arc<NearEntry>),
}

impl Blob {
    fn bytes(&self) -> &[u8] {
        match self {
            Blob::Read(b) => b,
            Blob::Near(e) | Blob::Stale(e) => &e.blob,
        }
    }
}

impl CacheService {
    /// The `cache.mget` answer for `keys` (in order), or `TOO_LARGE` when it would
    /// exceed `max_response`. Fresh near entries answer without Redis; the rest are
    /// read in bounded MGETs. With `allow` (the request's `max_stale_ms`) and Redis
    /// unavailable, stale near entries stand in, but only if every key not held
    /// fresh has one: a partial answer would pass a key we know nothing about as a
    /// miss.
    pub(super) async fn read_many(
        &self,
        cfg: &CacheConfig,
        ks: &KeySpace,
        sid: u64,
        keys: &[&str],
        max_response: u64,
        allow: Option<Duration>,
    ) -> Result<Vec<u8>, CacheError> {
        // Each distinct key is read once, however often the request names it.
        let mut slot_of: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
        let mut distinct: Vec<&str> = Vec::new();
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| {
                *slot_of.entry(k).or_insert_with(|| {
                    distinct.push(k);
                    distinct.len() - 1
                })
            })
            .collect();
        let vkeys: Vec<String> = distinct.iter().map(|k| ks.value(k)).collect();
        self.tracked
            .reading(sid, vkeys.iter().map(String::as_str), cfg.track_max_keys);
        let mut blobs: Vec<Option<Blob>> = vkeys
            .iter()
            .map(|vk| self.near_hit(vk).map(Blob::Near))
            .collect();
        let todo: Vec<usize> = (0..vkeys.len()).filter(|&i| blobs[i].is_none()).collect();
        match self
            .read_todo(cfg, &vkeys, &todo, &positions, &blobs, max_response)
            .await
        {
            Ok(read) => {
                for (&i, blob) in todo.iter().zip(read) {
                    blobs[i] = blob.map(Blob::Read);
                }
            }
            Err(CacheError::Backend(e)) => {
                let stale: Option<Vec<Arc<NearEntry>>> = todo
                    .iter()
                    .map(|&i| self.stale_entry(&vkeys[i], allow, &e))
                    .collect();
                let Some(stale) = stale else {
                    return Err(CacheError::Backend(e));
                };
                self.count_stale(stale.len());
                for (&i, entry) in todo.iter().zip(stale) {
                    blobs[i] = Some(Blob::Stale(entry));
                }
            }
            Err(e) => return Err(e),
        }
        // Values may have grown since they were sized: check what was fetched.
        let answer: u64 = positions
            .iter()
            .map(|&i| ENTRY_OVERHEAD + blobs[i].as_ref().map_or(0, |b| b.bytes().len() as u64))
            .sum();
        if answer > max_response {
            return Err(CacheError::AnswerTooLarge {
                size: answer,
                limit: max_response,
            });
        }
        // Each fetched value is freed after its last use, so the answer and the
        // fetched values together stay near one answer's size.
        let mut last_use = vec![0; distinct.len()];
        for (p, &i) in positions.iter().enumerate() {
            last_use[i] = p;
        }
        let mut w = Writer::with_capacity(answer as usize + 8);
        w.array(keys.len() as u32);
        for (p, &i) in positions.iter().enumerate() {
            let blob = blobs[i].as_ref();
            match blob.and_then(|b| decode_blob(b.bytes())) {
                Some((value, ttl)) => {
                    self.stats.hits.inc();
                    if let Some(Blob::Stale(_)) = blob {
                        w.map(3).str("hit").bool(true).str("value").raw(value);
                        w.str("stale").bool(true);
                    } else {
                        w.map(3).str("hit").bool(true).str("value").raw(value);
                        w.str("ttl_ms").uint(ttl);
                    }
                }
                None => {
                    self.stats.misses.inc();
                    w.map(1).str("hit").bool(false);
                }
            }
            if last_use[i] == p {
                blobs[i] = None;
            }
        }
        Ok(w.into_vec())
    }

    /// Reads the distinct keys `todo` (indexes into `vkeys`) from Redis, after
    /// checking that the answer fits: at once when even the worst case (every value
    /// at `max_value_bytes`) fits, else after sizing them with `STRLEN`.
    async fn read_todo(
        &self,
        cfg: &CacheConfig,
        vkeys: &[String],
        todo: &[usize],
        positions: &[usize],
        held: &[Option<Blob>],
        max_response: u64,
    ) -> Result<Vec<Option<Bytes>>, CacheError> {
        let todo_keys: Vec<&str> = todo.iter().map(|&i| vkeys[i].as_str()).collect();
        let held_bytes: u64 = positions
            .iter()
            .filter_map(|&i| held[i].as_ref())
            .map(|b| ENTRY_OVERHEAD + b.bytes().len() as u64)
            .sum();
        let max_value = cfg.max_value_bytes;
        let worst = (todo.len() as u64).saturating_mul(max_value);
        if worst.saturating_add(held_bytes) <= max_response {
            // Unsized, so each MGET is bounded by its worst case instead.
            let per_mget = (BATCH_BYTES / max_value.max(1)).clamp(1, BATCH_KEYS as u64);
            return self
                .fetch_in(cfg, &todo_keys, |_, keys| keys < per_mget as usize)
                .await;
        }
        let sizes = self.sizes(&todo_keys).await?;
        let mut size_of = vec![0u64; vkeys.len()];
        for (&i, &size) in todo.iter().zip(&sizes) {
            size_of[i] = size;
        }
        let answer: u64 = positions
            .iter()
            .map(|&i| {
                ENTRY_OVERHEAD
                    + held[i]
                        .as_ref()
                        .map_or(size_of[i], |b| b.bytes().len() as u64)
            })
            .sum();
        if answer > max_response {
            return Err(CacheError::AnswerTooLarge {
                size: answer,
                limit: max_response,
            });
        }
        let mut bytes = 0;
        self.fetch_in(cfg, &todo_keys, |i, keys| {
            // A new MGET starts when this one would pass BATCH_BYTES.
            if keys == 0 {
                bytes = 0;
            }
            bytes += sizes[i];
            keys == 0 || bytes <= BATCH_BYTES
        })
        .await
    }

    /// The stored size of each key (0 when missing): one pipeline of `STRLEN`s,
    /// one round trip however many keys (a script calling STRLEN per key cost Redis
    /// more: 23 vs 20 ms for 10,000 keys, BENCHMARKS.md).
    async fn sizes(&self, vkeys: &[&str]) -> Result<Vec<u64>, CacheError> {
        if vkeys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in vkeys {
            pipe.cmd("STRLEN").arg(*k);
        }
        Ok(self.backend.pipeline(&pipe).await?)
    }

    /// MGETs of at most [`BATCH_KEYS`] keys each, in one pipeline; `fits(i, n)` says
    /// whether key `i` may join an MGET that already holds `n` keys. The callers
    /// bound each MGET's reply to about [`BATCH_BYTES`] and the whole pipeline's to
    /// one answer, so each command stays short for Redis and memory stays bounded.
    /// Read through tracking (and kept near) when the near-cache is on.
    async fn fetch_in(
        &self,
        cfg: &CacheConfig,
        vkeys: &[&str],
        mut fits: impl FnMut(usize, usize) -> bool,
    ) -> Result<Vec<Option<Bytes>>, CacheError> {
        if vkeys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let mut in_this = 0;
        for (i, k) in vkeys.iter().enumerate() {
            if in_this == BATCH_KEYS || !fits(i, in_this) {
                in_this = 0;
                fits(i, 0);
            }
            if in_this == 0 {
                pipe.cmd("MGET");
            }
            pipe.arg(*k);
            in_this += 1;
        }
        type Batches = Vec<Vec<Option<Vec<u8>>>>;
        if let Some(near) = &self.near {
            let tickets: Vec<_> = vkeys.iter().map(|k| near.cache.begin(k)).collect();
            if let Some(batches) = self
                .backend
                .pipeline_tracked::<Batches>(&near.tracking, &pipe)
                .await?
            {
                let blobs: Vec<Option<Bytes>> = batches
                    .into_iter()
                    .flatten()
                    .map(|b| b.map(Bytes::from))
                    .collect();
                for (ticket, blob) in tickets.into_iter().zip(&blobs) {
                    ticket.finish(blob.as_ref(), cfg);
                }
                return Ok(blobs);
            }
        }
        let batches: Batches = self.backend.pipeline(&pipe).await?;
        Ok(batches
            .into_iter()
            .flatten()
            .map(|b| b.map(Bytes::from))
            .collect())
    }

    /// Deletes `keys` (and voids their leases) in script runs of at most
    /// [`BATCH_KEYS`] / 2 keys; returns how many values existed.
    pub(super) async fn delete_many(
        &self,
        ks: &KeySpace,
        keys: &[&str],
    ) -> Result<u64, CacheError> {
        let mut deleted = 0;
        for chunk in self
            .backend
            .by_slot(keys)
            .iter()
            .flat_map(|group| group.chunks(BATCH_KEYS / 2))
        {
            let mut inv = self.scripts.del.prepare_invoke();
            for k in chunk {
                inv.key(ks.value(k)).key(ks.lease(k));
            }
            inv.arg(&self.channel);
            let outcome = self.backend.invoke::<u64>(&inv).await;
            for k in chunk {
                self.forget(&ks.value(k));
            }
            deleted += outcome?;
        }
        Ok(deleted)
    }
}
