//! Helpers for near-cache tests: the value layout for writers that go straight to
//! Redis, the near counters in `stats`, and reads that wait for a change.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rmpv::Value;
use satchel::Client;

use super::{eventually, field};

/// The value key of `key` in the shared namespace (protocol.md's layout).
pub fn vkey(key: &str) -> String {
    format!("satchel:c:s:v:{{{key}}}")
}

/// A value as satchel stores it: version byte, expiry (ms since the epoch), the
/// MessagePack value. For writers that go straight to Redis.
pub fn blob(value: &Value, ttl_ms: u64) -> Vec<u8> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut out = vec![1u8];
    out.extend_from_slice(&(now.as_millis() as u64 + ttl_ms).to_be_bytes());
    rmpv::encode::write_value(&mut out, value).unwrap();
    out
}

pub fn near_stats(stats: &Value) -> &Value {
    field(field(stats, "cache"), "near")
}

pub async fn near_counter(c: &Client, name: &str) -> u64 {
    let s = c.stats().await.unwrap();
    field(near_stats(&s), name).as_u64().unwrap()
}

/// Waits until the daemon's tracking connection is on.
pub async fn wait_tracking(c: &Client) {
    assert!(
        tracking_becomes(c, true).await,
        "near-cache tracking never came on"
    );
}

pub async fn tracking_becomes(c: &Client, on: bool) -> bool {
    eventually(Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let s = c.stats().await.unwrap();
            field(near_stats(&s), "tracking").as_bool() == Some(on)
        }
    })
    .await
}

/// Reads `key` through `c` until it no longer returns `old`; returns how long that
/// took, or None after `limit`.
pub async fn time_until_changed(
    c: &Client,
    key: &str,
    old: &Value,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let r = c.cache_get(key).await.unwrap();
        if r.as_ref() != Some(old) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    None
}

/// Reads `key` through `c` until a read is a near hit (at most 3 reads: a read that
/// overlaps an invalidation, such as the one Redis sends for this daemon's own last
/// write, is rightly not kept, so the next one is the first that can hit).
pub async fn read_into_near(c: &Client, key: &str, expect: &Value) {
    for _ in 0..3 {
        let hits = near_counter(c, "hits").await;
        assert_eq!(c.cache_get(key).await.unwrap().as_ref(), Some(expect));
        if near_counter(c, "hits").await == hits + 1 {
            return;
        }
    }
    panic!("three reads of {key} and none was a near hit");
}
