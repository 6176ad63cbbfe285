//! The cache ops for a caller in this process ([`crate::embed`]): the checks and
//! cores of the wire ops, without a request to decode or an answer to encode. A value
//! is the MessagePack bytes a socket client would send or get, so what one side
//! stores the other reads back byte for byte.

use std::time::Duration;

use bytes::Bytes;

use super::{
    CacheError, CacheService, Entry, Fetch, Read, checked_key, checked_keys, checked_lease_ms,
    checked_wait_ms, hashable,
};
use crate::config::Config;
use crate::peer::Peer;

/// The session id of in-process calls: never a connection's (those start at 1), so
/// client tracking never records them.
const NO_SESSION: u64 = 0;

/// A cached value, as `cache.get` answers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// One MessagePack value.
    pub bytes: Bytes,
    /// The TTL left; None for a stale value.
    pub ttl_ms: Option<u64>,
    /// Served from the daemon's memory while Redis is unavailable (`max_stale_ms`).
    pub stale: bool,
}

/// What `cache.fetch` found.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    Hit(Value),
    /// Load the value and `fill` it with this lease.
    Lease(String),
    /// Load without filling.
    Miss,
}

impl CacheService {
    /// The key space of this caller, after the cluster's key check.
    fn direct_keyspace<'a>(
        &self,
        config: &Config,
        peer: &Peer,
        keys: impl IntoIterator<Item = (&'static str, &'a str)>,
    ) -> Result<super::keys::KeySpace, CacheError> {
        if self.backend.is_cluster() {
            for (field, k) in keys {
                hashable(field, k)?;
            }
        }
        self.keyspace(&config.cache, peer)
    }

    /// A read as the wire answers it, counting the hit or miss (a blob satchel did
    /// not write counts as a miss).
    fn direct_value(&self, read: Option<Read>) -> Option<Value> {
        let found = read.and_then(|r| r.value().map(|(bytes, ttl)| (bytes, ttl, r.stale)));
        match found {
            Some((bytes, ttl, stale)) => {
                self.stats.hits.inc();
                Some(Value {
                    bytes,
                    ttl_ms: (!stale).then_some(ttl),
                    stale,
                })
            }
            None => {
                self.stats.misses.inc();
                None
            }
        }
    }

    /// `cache.get {key, max_stale_ms?}`.
    pub async fn direct_get(
        &self,
        config: &Config,
        peer: &Peer,
        key: &str,
        max_stale_ms: Option<u64>,
    ) -> Result<Option<Value>, CacheError> {
        let cfg = &config.cache;
        let ks = self.direct_keyspace(config, peer, [("key", key)])?;
        let key = checked_key(cfg, "key", key)?;
        let allow = max_stale_ms.map(|ms| Duration::from_millis(ms.min(cfg.max_stale_ms)));
        let read = self.read_one(cfg, &ks, NO_SESSION, key, allow).await?;
        Ok(self.direct_value(read))
    }

    /// `cache.set {key, value, ttl_ms?, tags?}`.
    pub async fn direct_set(
        &self,
        config: &Config,
        peer: &Peer,
        key: &str,
        value: &[u8],
        ttl_ms: Option<u64>,
        tags: &[&str],
    ) -> Result<(), CacheError> {
        let named = std::iter::once(("key", key)).chain(tags.iter().map(|t| ("tags", *t)));
        let ks = self.direct_keyspace(config, peer, named)?;
        let entry = Entry::new(&config.cache, key, value, ttl_ms, tags.to_vec())?;
        self.set_one(&ks, &entry).await
    }

    /// `cache.del {keys}`: how many existed.
    pub async fn direct_del(
        &self,
        config: &Config,
        peer: &Peer,
        keys: &[&str],
    ) -> Result<u64, CacheError> {
        let ks = self.direct_keyspace(config, peer, keys.iter().map(|k| ("keys", *k)))?;
        let keys = checked_keys(&config.cache, keys.to_vec())?;
        self.del_many(&ks, &keys).await
    }

    /// `cache.fetch {key, lease_ms?, wait_ms?}`.
    pub async fn direct_fetch(
        &self,
        config: &Config,
        peer: &Peer,
        key: &str,
        lease_ms: Option<u64>,
        wait_ms: Option<u64>,
    ) -> Result<Fetched, CacheError> {
        let cfg = &config.cache;
        let ks = self.direct_keyspace(config, peer, [("key", key)])?;
        let key = checked_key(cfg, "key", key)?;
        let lease_ms = checked_lease_ms(cfg, lease_ms)?;
        let wait_ms = checked_wait_ms(cfg, wait_ms.map(|ms| ms.min(i64::MAX as u64) as i64))?;
        let fetched = self
            .fetch_one(cfg, &ks, NO_SESSION, key, lease_ms, wait_ms, None)
            .await?;
        Ok(match fetched {
            Fetch::Read(r) => match self.direct_value(Some(r)) {
                Some(v) => Fetched::Hit(v),
                None => Fetched::Miss,
            },
            Fetch::Lease(token) => Fetched::Lease(token),
            Fetch::Miss => Fetched::Miss,
        })
    }

    /// `cache.fill {key, lease, value, ttl_ms?, tags?}`: whether it was stored.
    #[allow(clippy::too_many_arguments)]
    pub async fn direct_fill(
        &self,
        config: &Config,
        peer: &Peer,
        key: &str,
        lease: &str,
        value: &[u8],
        ttl_ms: Option<u64>,
        tags: &[&str],
    ) -> Result<bool, CacheError> {
        let named = std::iter::once(("key", key)).chain(tags.iter().map(|t| ("tags", *t)));
        let ks = self.direct_keyspace(config, peer, named)?;
        let entry = Entry::new(&config.cache, key, value, ttl_ms, tags.to_vec())?;
        self.fill_one(&ks, lease, &entry).await
    }
}
