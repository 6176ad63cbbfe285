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
/// Below this many bytes of possible reply (distinct keys × `max_value_bytes`),
/// `mget` fetches at once without sizing first: one round trip for the common case.
const UNSIZED_BUDGET: u64 = 8 << 20;
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
        let blobs = if (vkeys.len() as u64).saturating_mul(max_value) <= UNSIZED_BUDGET {
            self.mget_batch(&vkeys).await?
        } else {
            let sizes = self.sizes(&vkeys).await?;
            let answer: u64 = positions.iter().map(|&i| ENTRY_OVERHEAD + sizes[i]).sum();
            if answer > max_response {
                return Err(CacheError::AnswerTooLarge {
                    size: answer,
                    limit: max_response,
                });
            }
            self.fetch_sized(&vkeys, &sizes).await?
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

    async fn mget_batch(&self, vkeys: &[String]) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        let mut out = Vec::with_capacity(vkeys.len());
        for chunk in vkeys.chunks(BATCH_KEYS) {
            let mut cmd = redis::cmd("MGET");
            for k in chunk {
                cmd.arg(k);
            }
            let blobs: Vec<Option<Vec<u8>>> = self.backend.query(&cmd).await?;
            out.extend(blobs);
        }
        Ok(out)
    }

    /// The stored size of each key (0 when missing), pipelined in batches.
    async fn sizes(&self, vkeys: &[String]) -> Result<Vec<u64>, CacheError> {
        let mut out = Vec::with_capacity(vkeys.len());
        for chunk in vkeys.chunks(BATCH_KEYS) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("STRLEN").arg(k);
            }
            let sizes: Vec<u64> = self.backend.pipeline(&pipe).await?;
            out.extend(sizes);
        }
        Ok(out)
    }

    /// MGETs of at most [`BATCH_KEYS`] keys and about [`BATCH_BYTES`] of reply each.
    async fn fetch_sized(
        &self,
        vkeys: &[String],
        sizes: &[u64],
    ) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        let mut out = Vec::with_capacity(vkeys.len());
        let mut start = 0;
        while start < vkeys.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < vkeys.len()
                && end - start < BATCH_KEYS
                && (end == start || bytes + sizes[end] <= BATCH_BYTES)
            {
                bytes += sizes[end];
                end += 1;
            }
            out.extend(self.mget_batch(&vkeys[start..end]).await?);
            start = end;
        }
        Ok(out)
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
