//! The near-cache: hits from the daemon's memory, kept coherent by Redis tracking,
//! against real daemons and a real redis-server.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::protocol::ErrorCode;
use satchel::{Client, ClientError};
use support::near::*;
use support::*;

/// `cache.get` with an optional `max_stale_ms`; the raw result map.
async fn get(c: &Client, key: &str, max_stale_ms: Option<u64>) -> Result<Value, ClientError> {
    let mut fields = vec![("key", Value::from(key))];
    if let Some(ms) = max_stale_ms {
        fields.push(("max_stale_ms", Value::from(ms)));
    }
    c.call("cache.get", fields).await
}

fn value_of(result: &Value) -> Option<&Value> {
    (field(result, "hit").as_bool() == Some(true)).then(|| field(result, "value"))
}

fn is_stale(result: &Value) -> bool {
    satchel::client::get(result, "stale").and_then(Value::as_bool) == Some(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_delete_or_invalidation_through_one_daemon_reaches_the_others_near_cache() {
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[]);
    let b = Daemon::start(&redis.url(), &[]);
    let (ca, cb) = (a.client().await, b.client().await);
    wait_tracking(&ca).await;
    let limit = Duration::from_millis(500);
    let mut report = Vec::new();

    let v1 = Value::from("v1");
    cb.cache_set("k:set", v1.clone(), None, &[]).await.unwrap();
    read_into_near(&ca, "k:set", &v1).await;
    cb.cache_set("k:set", Value::from("v2"), None, &[])
        .await
        .unwrap();
    let t = time_until_changed(&ca, "k:set", &v1, limit).await;
    assert!(t.is_some(), "set through B not seen by A within {limit:?}");
    assert_eq!(
        ca.cache_get("k:set").await.unwrap(),
        Some(Value::from("v2"))
    );
    report.push(("set", t));

    cb.cache_set("k:del", v1.clone(), None, &[]).await.unwrap();
    read_into_near(&ca, "k:del", &v1).await;
    cb.cache_del(&["k:del"]).await.unwrap();
    let t = time_until_changed(&ca, "k:del", &v1, limit).await;
    assert!(t.is_some(), "del through B not seen by A within {limit:?}");
    assert_eq!(ca.cache_get("k:del").await.unwrap(), None);
    report.push(("del", t));

    cb.cache_set("k:tag", v1.clone(), None, &["t1"])
        .await
        .unwrap();
    read_into_near(&ca, "k:tag", &v1).await;
    cb.cache_invalidate(&["t1"], None).await.unwrap();
    let t = time_until_changed(&ca, "k:tag", &v1, limit).await;
    assert!(
        t.is_some(),
        "tag invalidation through B not seen by A within {limit:?}"
    );
    report.push(("tag", t));

    cb.cache_set("p:one", v1.clone(), None, &[]).await.unwrap();
    read_into_near(&ca, "p:one", &v1).await;
    cb.cache_invalidate(&[], Some("p:")).await.unwrap();
    let t = time_until_changed(&ca, "p:one", &v1, limit).await;
    assert!(
        t.is_some(),
        "prefix invalidation through B not seen by A within {limit:?}"
    );
    report.push(("prefix", t));

    // Writers that are not satchel at all: a direct SET, DEL, and FLUSHALL.
    let mut r = redis.conn();
    cb.cache_set("k:direct", v1.clone(), None, &[])
        .await
        .unwrap();
    read_into_near(&ca, "k:direct", &v1).await;
    let _: () = redis::cmd("SET")
        .arg(vkey("k:direct"))
        .arg(blob(&Value::from("direct"), 60_000))
        .query(&mut r)
        .unwrap();
    let t = time_until_changed(&ca, "k:direct", &v1, limit).await;
    assert!(t.is_some(), "a direct SET not seen within {limit:?}");
    assert_eq!(
        ca.cache_get("k:direct").await.unwrap(),
        Some(Value::from("direct"))
    );
    report.push(("direct SET", t));

    let direct = Value::from("direct");
    read_into_near(&ca, "k:direct", &direct).await;
    let _: () = redis::cmd("FLUSHALL").query(&mut r).unwrap();
    let t = time_until_changed(&ca, "k:direct", &direct, limit).await;
    assert!(t.is_some(), "FLUSHALL not seen within {limit:?}");
    assert_eq!(ca.cache_get("k:direct").await.unwrap(), None);
    report.push(("FLUSHALL", t));

    // An entry expiring in Redis: the near entry lives no longer than its TTL.
    cb.cache_set("k:ttl", v1.clone(), Some(300), &[])
        .await
        .unwrap();
    read_into_near(&ca, "k:ttl", &v1).await;
    let t = time_until_changed(&ca, "k:ttl", &v1, Duration::from_secs(2)).await;
    assert!(t.is_some(), "an expired entry was still served after 2 s");

    assert!(near_counter(&ca, "invalidations").await >= 4);
    eprintln!("invalidation seen by the other daemon after: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_writes_are_read_back_at_once_on_the_same_daemon() {
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[]);
    let c = a.client().await;
    wait_tracking(&c).await;
    for round in 0..20 {
        let old = Value::from(format!("old{round}"));
        let new = Value::from(format!("new{round}"));
        c.cache_set("k", old.clone(), None, &["t"]).await.unwrap();
        read_into_near(&c, "k", &old).await;
        c.cache_set("k", new.clone(), None, &["t"]).await.unwrap();
        assert_eq!(c.cache_get("k").await.unwrap(), Some(new.clone()), "set");
        c.cache_del(&["k"]).await.unwrap();
        assert_eq!(c.cache_get("k").await.unwrap(), None, "del");

        c.cache_set("k", old.clone(), None, &["t"]).await.unwrap();
        read_into_near(&c, "k", &old).await;
        c.cache_invalidate(&["t"], None).await.unwrap();
        assert_eq!(c.cache_get("k").await.unwrap(), None, "tag");

        c.cache_set("k", old.clone(), None, &[]).await.unwrap();
        read_into_near(&c, "k", &old).await;
        c.cache_invalidate(&[], Some("k")).await.unwrap();
        assert_eq!(c.cache_get("k").await.unwrap(), None, "prefix");

        // fill after a lease: the filled value, not the miss, is read back.
        let satchel::client::Fetch::Lease(lease) =
            c.cache_fetch("k", Some(5000), Some(0)).await.unwrap()
        else {
            panic!("expected a lease");
        };
        assert!(
            c.cache_fill("k", &lease, new.clone(), None, &[])
                .await
                .unwrap()
        );
        assert_eq!(c.cache_get("k").await.unwrap(), Some(new.clone()), "fill");
        let mget = c.cache_mget(&["k", "k", "none"]).await.unwrap();
        assert_eq!(mget, vec![Some(new.clone()), Some(new.clone()), None]);
        c.cache_del(&["k"]).await.unwrap();
        assert_eq!(
            c.cache_mget(&["k"]).await.unwrap(),
            vec![None],
            "mget after del"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_tracking_connections_flush_the_near_cache() {
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[]);
    let b = Daemon::start(&redis.url(), &[]);
    let (ca, cb) = (a.client().await, b.client().await);
    wait_tracking(&ca).await;
    let old = Value::from("old");
    cb.cache_set("k", old.clone(), None, &[]).await.unwrap();
    read_into_near(&ca, "k", &old).await;
    let flushes = near_counter(&ca, "flushes").await;
    // Every daemon connection goes; Redis forgets what it tracked for A.
    redis.kill_clients();
    let new = Value::from("new");
    let written = eventually(Duration::from_secs(5), || {
        let (cb, new) = (cb.clone(), new.clone());
        async move { cb.cache_set("k", new, None, &[]).await.is_ok() }
    })
    .await;
    assert!(written);
    let acked = Instant::now();
    // From 300 ms after the write on, A never serves the old value.
    tokio::time::sleep(Duration::from_millis(300).saturating_sub(acked.elapsed())).await;
    for _ in 0..50 {
        match ca.cache_get("k").await {
            Ok(v) => assert_eq!(
                v,
                Some(new.clone()),
                "A served the old value after the kill"
            ),
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}"),
        }
    }
    assert!(near_counter(&ca, "flushes").await > flushes);
    wait_tracking(&ca).await;
    read_into_near(&ca, "k", &new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_stops_near_hits_within_a_second() {
    let redis = RedisServer::start();
    let a = Daemon::start(
        &redis.url(),
        &[("SATCHEL_REDIS_RESPONSE_TIMEOUT_MS", "300")],
    );
    let c = a.client().await;
    wait_tracking(&c).await;
    let v = Value::from("v");
    c.cache_set("k", v.clone(), None, &[]).await.unwrap();
    read_into_near(&c, "k", &v).await;
    // Stopped, not closed: no disconnect, only the heartbeat can tell.
    redis.pause();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let plain = get(&c, "k", None).await;
    let stale = get(&c, "k", Some(60_000)).await;
    redis.resume();
    let err = plain.expect_err("a near hit was served with Redis silent for 1.1 s");
    assert!(
        matches!(
            err.code(),
            Some(ErrorCode::Unavailable | ErrorCode::Timeout)
        ),
        "{err}"
    );
    let stale = stale.unwrap();
    assert_eq!(value_of(&stale), Some(&v));
    assert!(is_stale(&stale), "{stale}");
    wait_tracking(&c).await;
    read_into_near(&c, "k", &v).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_values_only_when_asked_and_only_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[("SATCHEL_CACHE_MAX_STALE_MS", "3000")]);
    let c = a.client().await;
    wait_tracking(&c).await;
    let v = Value::from("kept");
    c.cache_set("k", v.clone(), None, &[]).await.unwrap();
    c.cache_set("k2", Value::from(2), None, &[]).await.unwrap();
    read_into_near(&c, "k", &v).await;
    read_into_near(&c, "k2", &Value::from(2)).await;
    // With Redis up, asking for stale changes nothing: fresh hits carry no `stale`.
    let r = get(&c, "k", Some(60_000)).await.unwrap();
    assert_eq!(value_of(&r), Some(&v));
    assert!(!is_stale(&r));

    redis.stop();
    let started = Instant::now();
    // Near hits are served until the daemon notices (the closed connection, at once).
    assert!(
        tracking_becomes(&c, false).await,
        "the daemon never noticed"
    );
    let err = get(&c, "k", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    let err = get(&c, "k", Some(0)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Unavailable),
        "max_stale_ms 0: {err}"
    );
    let r = get(&c, "k", Some(60_000)).await.unwrap();
    assert_eq!(value_of(&r), Some(&v));
    assert!(is_stale(&r), "{r}");
    // fetch and mget too; an mget with a key held nowhere is UNAVAILABLE.
    let r = c
        .call(
            "cache.fetch",
            vec![
                ("key", Value::from("k")),
                ("max_stale_ms", Value::from(60_000)),
            ],
        )
        .await
        .unwrap();
    assert_eq!(value_of(&r), Some(&v));
    assert!(is_stale(&r));
    let keys = |ks: &[&str]| Value::Array(ks.iter().map(|k| Value::from(*k)).collect());
    let r = c
        .call(
            "cache.mget",
            vec![
                ("keys", keys(&["k", "k2", "k"])),
                ("max_stale_ms", Value::from(60_000)),
            ],
        )
        .await
        .unwrap();
    let entries = r.as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert!(entries.iter().all(is_stale), "{r}");
    assert_eq!(value_of(&entries[1]), Some(&Value::from(2)));
    let err = c
        .call(
            "cache.mget",
            vec![
                ("keys", keys(&["k", "unknown"])),
                ("max_stale_ms", Value::from(60_000)),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    let err = c
        .call("cache.mget", vec![("keys", keys(&["k"]))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    // get, fetch, and the mget's two distinct keys.
    assert_eq!(near_counter(&c, "stale_served").await, 4);
    // cache.max_stale_ms (3 s here) caps what a request may ask.
    tokio::time::sleep(Duration::from_millis(3200).saturating_sub(started.elapsed())).await;
    let err = get(&c, "k", Some(60_000)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Unavailable),
        "past the cap: {err}"
    );

    // Restarted empty: a miss, never the stale value.
    redis.restart();
    let up = eventually(Duration::from_secs(10), || {
        let c = c.clone();
        async move { get(&c, "k", Some(60_000)).await.is_ok() }
    })
    .await;
    assert!(up);
    for _ in 0..10 {
        let r = get(&c, "k", Some(60_000)).await.unwrap();
        assert_eq!(field(&r, "hit").as_bool(), Some(false), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_max_stale_ms_is_a_bad_request() {
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[]);
    let c = a.client().await;
    for bad in [Value::from(-1), Value::from("soon")] {
        let err = c
            .call(
                "cache.get",
                vec![("key", Value::from("k")), ("max_stale_ms", bad)],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
        assert_eq!(err.field(), Some("max_stale_ms"));
    }
}

/// Writers bump per-key versions through daemon B and straight in Redis; readers
/// on daemon A record what they see. A read that starts later than a version's
/// acknowledgement plus the bound never returns an older version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_checker_under_load_never_reads_an_old_version_after_the_bound() {
    const KEYS: usize = 8;
    const BOUND: Duration = Duration::from_millis(500);
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[]);
    let b = Daemon::start(&redis.url(), &[]);
    let (ca, cb) = (a.client().await, b.client().await);
    wait_tracking(&ca).await;
    let key = |i: usize| format!("ver:{i}");
    for i in 0..KEYS {
        cb.cache_set(&key(i), Value::from(0), None, &[])
            .await
            .unwrap();
    }
    // acked[key] = (version, when its write was acknowledged), in order.
    type Acked = HashMap<usize, Vec<(u64, Instant)>>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writer = {
        let (acked, stop, cb) = (acked.clone(), stop.clone(), cb.clone());
        let url = redis.url();
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut direct = client.get_multiplexed_async_connection().await.unwrap();
            let mut version = 0u64;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                let i = (version as usize) % KEYS;
                if version.is_multiple_of(2) {
                    cb.cache_set(&key(i), Value::from(version), None, &[])
                        .await
                        .unwrap();
                } else {
                    let _: () = redis::cmd("SET")
                        .arg(vkey(&key(i)))
                        .arg(blob(&Value::from(version), 60_000))
                        .query_async(&mut direct)
                        .await
                        .unwrap();
                }
                acked
                    .lock()
                    .unwrap()
                    .entry(i)
                    .or_default()
                    .push((version, Instant::now()));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            version
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (acked, stop, ca) = (acked.clone(), stop.clone(), ca.clone());
            tokio::spawn(async move {
                let (mut reads, mut worst_lag) = (0u64, Duration::ZERO);
                let mut n = r;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let i = n % KEYS;
                    let begun = Instant::now();
                    let seen = ca.cache_get(&key(i)).await.unwrap().and_then(|v| v.as_u64()).unwrap();
                    reads += 1;
                    let history = acked.lock().unwrap().get(&i).cloned().unwrap_or_default();
                    // The newest version acknowledged before the read began…
                    if let Some(&(newest, at)) = history.iter().rev().find(|(_, at)| *at < begun)
                        && seen < newest
                    {
                        let lag = begun - at;
                        worst_lag = worst_lag.max(lag);
                        assert!(
                            lag <= BOUND,
                            "read of {} began {lag:?} after v{newest} was acknowledged and saw v{seen}",
                            key(i)
                        );
                    }
                }
                (reads, worst_lag)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let versions = writer.await.unwrap();
    let mut reads = 0;
    let mut worst = Duration::ZERO;
    for r in readers {
        let (n, lag) = r.await.unwrap();
        reads += n;
        worst = worst.max(lag);
    }
    let hits = near_counter(&ca, "hits").await;
    eprintln!(
        "{versions} versions written, {reads} reads ({hits} near hits) in {:?}; worst lag behind an acknowledged write: {worst:?}",
        started.elapsed()
    );
    assert!(
        versions > 100 && reads > 1000,
        "too little load to mean anything"
    );
    assert!(
        hits > reads / 4,
        "the readers were not served from the near-cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_memory_stays_within_near_max_bytes() {
    let redis = RedisServer::start();
    let max = 4u64 << 20;
    let a = Daemon::start(
        &redis.url(),
        &[("SATCHEL_CACHE_NEAR_MAX_BYTES", &max.to_string())],
    );
    let c = a.client().await;
    wait_tracking(&c).await;
    let rss_before = a.rss_kib();
    // 10x the bound: 400 values of 100 KiB, each read twice.
    let value = Value::Binary(vec![7u8; 100 * 1024]);
    for i in 0..400 {
        c.cache_set(&format!("big:{i}"), value.clone(), None, &[])
            .await
            .unwrap();
    }
    for _ in 0..2 {
        for i in 0..400 {
            assert!(c.cache_get(&format!("big:{i}")).await.unwrap().is_some());
        }
    }
    let s = c.stats().await.unwrap();
    let near = near_stats(&s);
    let bytes = field(near, "bytes").as_u64().unwrap();
    let entries = field(near, "entries").as_u64().unwrap();
    let rss = a.rss_kib();
    eprintln!(
        "near: {entries} entries, {bytes} bytes (bound {max}); RSS {rss_before} KiB before, {rss} KiB after"
    );
    assert!(bytes <= max, "near.bytes {bytes} > {max}");
    assert!(entries > 0 && entries < 400);
    assert!(
        rss < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss} KiB"
    );
}

#[tokio::test]
async fn near_false_turns_it_off() {
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[("SATCHEL_CACHE_NEAR", "false")]);
    let c = a.client().await;
    c.cache_set("k", Value::from(1), None, &[]).await.unwrap();
    for _ in 0..3 {
        assert_eq!(c.cache_get("k").await.unwrap(), Some(Value::from(1)));
    }
    let s = c.stats().await.unwrap();
    let near = near_stats(&s);
    assert_eq!(field(near, "enabled").as_bool(), Some(false));
    assert_eq!(field(near, "hits").as_u64(), Some(0));
    assert_eq!(field(field(&s, "cache"), "hits").as_u64(), Some(3));
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        !clients.contains("flags=t"),
        "a tracking client exists: {clients}"
    );
}
