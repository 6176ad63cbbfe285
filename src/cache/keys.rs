//! The Redis key layout of the cache (documented in protocol.md) and the stored value
//! format.
//!
//! ```text
//! <prefix>:c:seq                 counter: lease tokens and tag invalidations are ordered by it
//! <prefix>:c:events              pub/sub channel: "<value key>" when a waited-for key changes
//! <prefix>:c:<ns>:v:{<key>}      the value: 0x01, expiry (u64 ms since epoch, BE), MessagePack
//! <prefix>:c:<ns>:l:{<key>}      the lease token "<seq>.<random>" (PX lease_ms)
//! <prefix>:c:<ns>:t:{<tag>}      SET of the keys that carry <tag> (PX ≥ their longest TTL)
//! <prefix>:c:<ns>:ti:{<tag>}     seq of the tag's last invalidation (PX MAX_LEASE_MS)
//! <prefix>:c:<ns>:tp:{<tag>}     SET of members taken out of t:{<tag>} whose values an
//!                                invalidation is deleting (left for the next one if it dies)
//! ```
//!
//! `<ns>` is `s` (shared) or `u<uid>` when `cache.isolate_by_uid` is on. The braces are
//! a Redis Cluster hash tag: a key's value and lease hash to one slot (so every
//! script on one key is atomic on a cluster too), and different keys spread over
//! the slots. The value and lease keys differ only in their `v`/`l` letter, so one
//! `SCAN MATCH …:[vl]:{<prefix>*` finds both for prefix invalidation.

use std::sync::Arc;

use crate::host::now_ms;

/// Format version byte of a stored value.
const BLOB_V1: u8 = 1;
const BLOB_HEADER: usize = 9;

/// The keys of one namespace. Cloning is cheap (the base is shared), and keys are
/// built by concatenation: `format!` was 11% of a `cache.get`'s instructions
/// (callgrind, BENCHMARKS.md).
#[derive(Debug, Clone)]
pub struct KeySpace {
    /// `<prefix>:c:<ns>:`
    base: Arc<str>,
}

impl KeySpace {
    pub fn new(prefix: &str, ns: &str) -> KeySpace {
        KeySpace {
            base: concat(&[prefix, ":c:", ns, ":"]).into(),
        }
    }

    pub fn value(&self, key: &str) -> String {
        concat(&[&self.base, "v:{", key, "}"])
    }

    pub fn lease(&self, key: &str) -> String {
        concat(&[&self.base, "l:{", key, "}"])
    }

    pub fn tag_members(&self, tag: &str) -> String {
        concat(&[&self.base, "t:{", tag, "}"])
    }

    /// Members taken out of the tag's set whose values are being deleted.
    pub fn tag_popped(&self, tag: &str) -> String {
        concat(&[&self.base, "tp:{", tag, "}"])
    }

    pub fn tag_invalidated(&self, tag: &str) -> String {
        concat(&[&self.base, "ti:{", tag, "}"])
    }

    /// The cache key a value or lease key of this namespace names (what a prefix
    /// SCAN finds).
    pub fn key_of<'a>(&self, rkey: &'a str) -> Option<&'a str> {
        let rest = rkey.get(self.base.len()..)?;
        rest.strip_prefix("v:{")
            .or_else(|| rest.strip_prefix("l:{"))?
            .strip_suffix('}')
    }

    /// Length of what comes before the key in a value key.
    pub fn value_prefix_len(&self) -> usize {
        self.base.len() + "v:{".len()
    }

    /// SCAN pattern matching the value and lease keys of every key under `prefix`.
    pub fn prefix_pattern(&self, prefix: &str) -> String {
        format!("{}[vl]:{{{}*", glob_escape(&self.base), glob_escape(prefix))
    }
}

pub fn seq_key(prefix: &str) -> String {
    format!("{prefix}:c:seq")
}

pub fn events_channel(prefix: &str) -> String {
    format!("{prefix}:c:events")
}

fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.push_str(p);
    }
    out
}

/// Escapes Redis glob metacharacters so a user prefix matches only itself.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What Redis stores for one entry: the header lets `get` report `ttl_ms` (and `mget`
/// work) with a single GET instead of GET + PTTL.
pub fn encode_blob(ttl_ms: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOB_HEADER + value.len());
    out.push(BLOB_V1);
    out.extend_from_slice(&now_ms().saturating_add(ttl_ms).to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// The value and its remaining TTL; None for bytes this version did not write.
pub fn decode_blob(blob: &[u8]) -> Option<(&[u8], u64)> {
    if blob.len() <= BLOB_HEADER || blob[0] != BLOB_V1 {
        return None;
    }
    let expiry = u64::from_be_bytes(blob[1..BLOB_HEADER].try_into().ok()?);
    // Redis enforces the expiry; this only reports it (clamped: clocks may differ).
    let ttl = expiry.saturating_sub(now_ms()).max(1);
    Some((&blob[BLOB_HEADER..], ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_round_trips_and_rejects_foreign_bytes() {
        let blob = encode_blob(60_000, &[0x93, 1, 2, 3]);
        let (value, ttl) = decode_blob(&blob).unwrap();
        assert_eq!(value, &[0x93, 1, 2, 3]);
        assert!(ttl > 59_000 && ttl <= 60_000, "{ttl}");
        assert!(decode_blob(b"plain string").is_none());
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        let ks = KeySpace::new("app", "u1000");
        assert_eq!(ks.value("k:1"), "app:c:u1000:v:{k:1}");
        assert_eq!(ks.lease("k"), "app:c:u1000:l:{k}");
        assert_eq!(ks.tag_members("t"), "app:c:u1000:t:{t}");
        assert_eq!(ks.tag_invalidated("t"), "app:c:u1000:ti:{t}");
        assert_eq!(ks.key_of("app:c:u1000:v:{k:1}"), Some("k:1"));
        assert_eq!(ks.key_of("app:c:u1000:v:{a}b}"), Some("a}b"));
        assert_eq!(ks.key_of("app:c:u1000:l:{k}"), Some("k"));
        assert_eq!(ks.key_of("app:c:u1000:t:{k}"), None);
        assert_eq!(ks.value_prefix_len(), "app:c:u1000:v:{".len());
    }

    #[test]
    fn prefix_pattern_escapes_glob_characters() {
        let ks = KeySpace::new("app", "s");
        assert_eq!(
            ks.prefix_pattern("user:*[1]"),
            "app:c:s:[vl]:{user:\\*\\[1\\]*"
        );
    }
}
