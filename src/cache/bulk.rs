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

use super::keys::{KeySpace, decode_blob};
use super::{CacheError, CacheService};
use crate::protocol::msgpack::Writer;

/// Most keys in one Redis command (a `DEL` script gets two per key: value, lease).
pub const BATCH_KEYS: usize = 1000;
/// Reply bytes one `MGET` may bring (a single larger value still goes alone).
pub const BATCH_BYTES: u64 = 1 << 20;
/// What one `{hit: true, value: …}` entry costs on top of its value.
const ENTRY_OVERHEAD: u64 = 16;

impl CacheService {
    /// The blobs of `keys` (in order), and the answer size, or `TOO_LARGE` when the
    /// answer would exceed `max_response`.
    pub(super) async fn read_many(
        &self,
        ks: &KeySpace,
        keys: &[&str],
        max_value: u64,
        max_response: u64,
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
        // When even the worst case (every value at `max_value_bytes`) fits one answer,
        // fetch at once: one round trip, and no more memory than an answer may take.
        let blobs = if (vkeys.len() as u64).saturating_mul(max_value) <= max_response {
            // Unsized, so each MGET is bounded by its worst case instead.
            let per_mget = (BATCH_BYTES / max_value.max(1)).clamp(1, BATCH_KEYS as u64);
            self.fetch_in(&vkeys, |_, keys| keys < per_mget as usize)
                .await?
        } else {
            let sizes = self.sizes(&vkeys).await?;
            let answer: u64 = positions.iter().map(|&i| ENTRY_OVERHEAD + sizes[i]).sum();
            if answer > max_response {
                return Err(CacheError::AnswerTooLarge {
                    size: answer,
                    limit: max_response,
                });
            }
            let mut bytes = 0;
            self.fetch_in(&vkeys, |i, keys| {
                // A new MGET starts when this one would pass BATCH_BYTES.
                if keys == 0 {
                    bytes = 0;
                }
                bytes += sizes[i];
                keys == 0 || bytes <= BATCH_BYTES
            })
            .await?
        };
        // Values may have grown since they were sized: check what was fetched.
        let answer: u64 = positions
            .iter()
            .map(|&i| ENTRY_OVERHEAD + blobs[i].as_ref().map_or(0, |b| b.len() as u64))
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
        let mut blobs = blobs;
        let mut w = Writer::with_capacity(answer as usize + 8);
        w.array(keys.len() as u32);
        for (p, &i) in positions.iter().enumerate() {
            match blobs[i].as_deref().and_then(decode_blob) {
                Some((value, _)) => {
                    self.stats.hits.inc();
                    w.map(2).str("hit").bool(true).str("value").raw(value);
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

    /// The stored size of each key (0 when missing): one pipeline of `STRLEN`s,
    /// one round trip however many keys (a script calling STRLEN per key cost Redis
    /// more: 23 vs 20 ms for 10,000 keys, BENCHMARKS.md).
    async fn sizes(&self, vkeys: &[String]) -> Result<Vec<u64>, CacheError> {
        if vkeys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in vkeys {
            pipe.cmd("STRLEN").arg(k);
        }
        Ok(self.backend.pipeline(&pipe).await?)
    }

    /// MGETs of at most [`BATCH_KEYS`] keys each, in one pipeline; `fits(i, n)` says
    /// whether key `i` may join an MGET that already holds `n` keys. The callers
    /// bound each MGET's reply to about [`BATCH_BYTES`] and the whole pipeline's to
    /// one answer, so each command stays short for Redis and memory stays bounded.
    async fn fetch_in(
        &self,
        vkeys: &[String],
        mut fits: impl FnMut(usize, usize) -> bool,
    ) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
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
            pipe.arg(k);
            in_this += 1;
        }
        let batches: Vec<Vec<Option<Vec<u8>>>> = self.backend.pipeline(&pipe).await?;
        Ok(batches.into_iter().flatten().collect())
    }

    /// Deletes `keys` (and voids their leases) in script runs of at most
    /// [`BATCH_KEYS`] / 2 keys; returns how many values existed.
    pub(super) async fn delete_many(
        &self,
        ks: &KeySpace,
        keys: &[&str],
    ) -> Result<u64, CacheError> {
        let mut deleted = 0;
        for chunk in keys.chunks(BATCH_KEYS / 2) {
            let mut inv = self.scripts.del.prepare_invoke();
            for k in chunk {
                inv.key(ks.value(k)).key(ks.lease(k));
            }
            inv.arg(&self.channel);
            deleted += self.backend.invoke::<u64>(&inv).await?;
        }
        Ok(deleted)
    }
}
