//! `cache.track`: push frames to connections that asked, on the wire, against real
//! daemons and a real redis-server.

mod support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::protocol::msgpack::Writer;
use support::*;

/// A raw connection: requests by hand, every frame (answers and pushes) in order.
struct Raw {
    s: UnixStream,
    next: u64,
}

impl Raw {
    fn open(d: &Daemon) -> Raw {
        Raw {
            s: d.raw(),
            next: 1,
        }
    }

    fn send(&mut self, op: &str, fields: impl FnOnce(&mut Writer) -> u32) -> u64 {
        let id = self.next;
        self.next += 1;
        self.s.write_all(&frame(&request(id, op, fields))).unwrap();
        id
    }

    fn frame(&mut self) -> Value {
        let f = read_frame(&mut self.s).expect("a frame");
        rmpv::decode::read_value(&mut &f[..]).unwrap()
    }

    /// Sends and returns (pushes that came first, the answer's result or error).
    fn call(&mut self, op: &str, fields: impl FnOnce(&mut Writer) -> u32) -> (Vec<Value>, Value) {
        let id = self.send(op, fields);
        let mut pushes = Vec::new();
        loop {
            let v = self.frame();
            match satchel::client::get(&v, "id").and_then(Value::as_u64) {
                Some(got) if got == id => {
                    let ok = field(&v, "ok").as_bool() == Some(true);
                    return (
                        pushes,
                        field(&v, if ok { "result" } else { "error" }).clone(),
                    );
                }
                Some(other) => panic!("answer to {other} while waiting for {id}"),
                None => pushes.push(v),
            }
        }
    }

    fn get(&mut self, key: &str) -> (Vec<Value>, Value) {
        self.call("cache.get", |w| {
            w.str("key").str(key);
            1
        })
    }

    fn set(&mut self, key: &str, value: &str) -> Vec<Value> {
        self.set_tagged(key, value, None)
    }

    fn set_tagged(&mut self, key: &str, value: &str, tag: Option<&str>) -> Vec<Value> {
        let (pushes, r) = self.call("cache.set", |w| {
            w.str("key").str(key).str("value").str(value);
            if let Some(t) = tag {
                w.str("tags").array(1).str(t);
                2 + 1
            } else {
                2
            }
        });
        assert_eq!(field(&r, "stored").as_bool(), Some(true), "{r}");
        pushes
    }

    fn track(&mut self) {
        let (_, r) = self.call("cache.track", |_| 0);
        assert_eq!(field(&r, "tracking").as_bool(), Some(true), "{r}");
    }

    /// Pushes that arrive before the answer to a ping.
    fn pushes(&mut self) -> Vec<Value> {
        self.call("ping", |_| 0).0
    }
}

fn invalidated(pushes: &[Value]) -> Vec<String> {
    pushes
        .iter()
        .filter(|p| field(p, "push").as_str() == Some("invalidate"))
        .flat_map(|p| field(p, "keys").as_array().unwrap().clone())
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

fn flushes(pushes: &[Value]) -> usize {
    pushes
        .iter()
        .filter(|p| field(p, "push").as_str() == Some("flush"))
        .count()
}

fn wait_tracking_live(d: &Daemon) {
    let mut probe = Raw::open(d);
    let live = wait_until(Duration::from_secs(10), || {
        let (_, s) = probe.call("stats", |_| 0);
        field(field(field(&s, "cache"), "near"), "tracking").as_bool() == Some(true)
    });
    assert!(live, "near-cache tracking never came on");
}

#[test]
fn a_tracking_connection_hears_of_writes_through_this_daemon_before_they_are_answered() {
    let redis = RedisServer::start();
    let d = Daemon::start(&redis.url(), &[]);
    wait_tracking_live(&d);
    let mut t = Raw::open(&d);
    let mut w = Raw::open(&d);
    let mut quiet = Raw::open(&d);
    t.track();
    w.set("k", "v1");
    w.set("tagged", "v1");
    w.set_tagged("tagged", "v1", Some("tg"));
    w.set("p:1", "v1");
    w.set("kd", "v1");
    for k in ["k", "tagged", "p:1", "missing", "kd"] {
        t.get(k);
        quiet.get(k);
    }
    // Nothing changed yet: no pushes.
    assert!(t.pushes().is_empty());
    // The write is answered only after the push is queued for t; t's next frame
    // after that is the push, ahead of anything else. (Redis' own invalidation of the
    // same write may follow once t has read the key again: a second, harmless push.
    // That a key is forgotten once pushed is checked in cache::tracked's unit tests.)
    w.set("k", "v2");
    let (pushes, r) = t.get("k");
    assert!(invalidated(&pushes).contains(&"k".to_owned()), "{pushes:?}");
    assert_eq!(field(&r, "value").as_str(), Some("v2"));
    // del, tag and prefix invalidation, and a miss that is later set.
    let (_, r) = w.call("cache.del", |w| {
        w.str("keys").array(1).str("kd");
        1
    });
    assert_eq!(field(&r, "deleted").as_u64(), Some(1));
    w.call("cache.invalidate", |w| {
        w.str("tags").array(1).str("tg");
        1
    });
    w.call("cache.invalidate", |w| {
        w.str("prefix").str("p:");
        1
    });
    w.set("missing", "now here");
    let keys = invalidated(&t.pushes());
    for k in ["kd", "missing", "p:1", "tagged"] {
        assert!(keys.contains(&k.to_owned()), "{k} not in {keys:?}");
    }
    // A connection that never asked gets no push frames at all.
    assert!(quiet.pushes().is_empty());
    // untrack: no more pushes.
    t.get("k");
    let (_, r) = t.call("cache.untrack", |_| 0);
    assert_eq!(field(&r, "tracking").as_bool(), Some(false));
    w.set("k", "v5");
    assert!(t.pushes().is_empty());
}

#[test]
fn a_write_through_another_daemon_or_straight_to_redis_reaches_a_tracking_connection() {
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[]);
    let b = Daemon::start(&redis.url(), &[]);
    wait_tracking_live(&a);
    let mut t = Raw::open(&a);
    let mut wb = Raw::open(&b);
    t.track();
    wb.set("k", "v1");
    wb.set("direct", "v1");
    t.get("k");
    t.get("direct");
    let started = Instant::now();
    wb.set("k", "v2");
    let _: () = redis::cmd("DEL")
        .arg("satchel:c:s:v:{direct}")
        .query(&mut redis.conn())
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 && started.elapsed() < Duration::from_millis(500) {
        seen.extend(invalidated(&t.pushes()));
    }
    seen.sort();
    assert_eq!(seen, vec!["direct", "k"], "within 500 ms");
    eprintln!("both invalidations pushed within {:?}", started.elapsed());
}

#[test]
fn losing_redis_tracking_flushes_every_tracking_connection() {
    let redis = RedisServer::start();
    let d = Daemon::start(&redis.url(), &[]);
    wait_tracking_live(&d);
    let mut t = Raw::open(&d);
    t.track();
    t.get("k");
    redis.kill_clients();
    // One flush when tracking is lost, one more when it is back (reads in between
    // were not tracked by Redis).
    let mut n = 0;
    let flushed = wait_until(Duration::from_secs(5), || {
        n += flushes(&t.pushes());
        n >= 2
    });
    assert!(flushed, "got {n} flushes");
}

#[test]
fn a_connection_past_track_max_keys_gets_a_flush_and_starts_over() {
    let redis = RedisServer::start();
    let d = Daemon::start(&redis.url(), &[("SATCHEL_CACHE_TRACK_MAX_KEYS", "3")]);
    wait_tracking_live(&d);
    let mut t = Raw::open(&d);
    let mut w = Raw::open(&d);
    t.track();
    for k in ["a", "b", "c"] {
        t.get(k);
    }
    assert!(t.pushes().is_empty());
    let (pushes, _) = t.get("d");
    assert_eq!(flushes(&pushes), 1, "{pushes:?}");
    // What it read before the flush is forgotten; `d` (read with it) too.
    w.set("a", "x");
    w.set("d", "x");
    assert!(t.pushes().is_empty());
    t.get("a");
    w.set("a", "y");
    assert_eq!(invalidated(&t.pushes()), vec!["a"]);
}

#[test]
fn track_needs_the_near_cache() {
    let redis = RedisServer::start();
    let d = Daemon::start(&redis.url(), &[("SATCHEL_CACHE_NEAR", "false")]);
    let mut t = Raw::open(&d);
    let (_, err) = t.call("cache.track", |_| 0);
    assert_eq!(code(&err), "BAD_REQUEST", "{err}");
}

/// The Rust client's local cache (`Client::builder(..).local_cache_bytes(..)`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_clients_local_cache_is_hit_without_io_and_kept_coherent() {
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[]);
    let b = Daemon::start(&redis.url(), &[]);
    wait_tracking_live(&a);
    let plain = a.client().await;
    let remote = b.client().await;
    let local = satchel::Client::builder(&a.socket)
        .local_cache_bytes(1 << 20)
        .connect()
        .await
        .unwrap();
    let requests = |c: satchel::Client| async move {
        field(&c.stats().await.unwrap(), "requests")
            .as_u64()
            .unwrap()
    };
    plain
        .cache_set("rs:a", Value::from("v1"), Some(60_000), &[])
        .await
        .unwrap();
    assert_eq!(
        local.cache_get("rs:a").await.unwrap(),
        Some(Value::from("v1"))
    );
    let before = requests(plain.clone()).await;
    assert_eq!(
        local.cache_get("rs:a").await.unwrap(),
        Some(Value::from("v1"))
    );
    let got = local
        .get_or_set("rs:a", None, || async { Err::<Value, ()>(()) })
        .await
        .unwrap();
    assert_eq!(got, Value::from("v1"));
    assert_eq!(
        requests(plain.clone()).await - before,
        1,
        "only the stats request reached the daemon"
    );
    // Another daemon's write reaches the local cache within 500 ms.
    remote
        .cache_set("rs:a", Value::from("v2"), None, &[])
        .await
        .unwrap();
    let started = Instant::now();
    while local.cache_get("rs:a").await.unwrap() != Some(Value::from("v2")) {
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "no invalidation within 500 ms"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Own writes, and mget mixing local and remote answers.
    local
        .cache_set("rs:b", Value::from(1), None, &[])
        .await
        .unwrap();
    local.cache_get("rs:b").await.unwrap();
    local
        .cache_set("rs:b", Value::from(2), None, &[])
        .await
        .unwrap();
    assert_eq!(local.cache_get("rs:b").await.unwrap(), Some(Value::from(2)));
    let r = local
        .cache_mget(&["rs:b", "rs:none", "rs:a"])
        .await
        .unwrap();
    assert_eq!(r, vec![Some(Value::from(2)), None, Some(Value::from("v2"))]);
    local.cache_del(&["rs:b"]).await.unwrap();
    assert_eq!(local.cache_get("rs:b").await.unwrap(), None);
    let s = local.local_stats();
    assert!(
        s.hits >= 3 && s.invalidations >= 1 && s.entries > 0,
        "{s:?}"
    );
}

/// A read in flight when its invalidation arrives is answered but not kept: the local
/// client's fetch waits for a lease holder while another daemon writes the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_clients_local_cache_keeps_no_value_an_invalidation_overtook() {
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[]);
    let b = Daemon::start(&redis.url(), &[]);
    wait_tracking_live(&a);
    let plain = a.client().await;
    let remote = b.client().await;
    let local = satchel::Client::builder(&a.socket)
        .local_cache_bytes(1 << 20)
        .connect()
        .await
        .unwrap();
    let satchel::client::Fetch::Lease(_) = plain
        .cache_fetch("rs:race", Some(10_000), Some(0))
        .await
        .unwrap()
    else {
        panic!("expected the lease");
    };
    let lease_waits = |c: satchel::Client| async move {
        let s = c.stats().await.unwrap();
        field(field(&s, "cache"), "lease_waits").as_u64().unwrap()
    };
    let waits = lease_waits(plain.clone()).await;
    let waiter = {
        let local = local.clone();
        tokio::spawn(async move { local.cache_fetch("rs:race", None, Some(10_000)).await })
    };
    assert!(
        eventually(Duration::from_secs(5), || {
            let p = plain.clone();
            async move { lease_waits(p).await > waits }
        })
        .await
    );
    let heard = local.local_stats().invalidations;
    remote
        .cache_set("rs:race", Value::from("written elsewhere"), None, &[])
        .await
        .unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(
        got,
        satchel::client::Fetch::Hit(Value::from("written elsewhere"))
    );
    assert!(wait_until(Duration::from_secs(5), || local
        .local_stats()
        .invalidations
        > heard));
    let misses = local.local_stats().misses;
    assert_eq!(
        local.cache_get("rs:race").await.unwrap(),
        Some(Value::from("written elsewhere"))
    );
    assert_eq!(
        local.local_stats().misses,
        misses + 1,
        "kept although its invalidation came first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_clients_local_cache_is_emptied_when_its_connection_drops() {
    let redis = RedisServer::start();
    let mut a = Daemon::start(&redis.url(), &[]);
    wait_tracking_live(&a);
    let local = satchel::Client::builder(&a.socket)
        .local_cache_bytes(1 << 20)
        .connect()
        .await
        .unwrap();
    local
        .cache_set("rs:d", Value::from(1), None, &[])
        .await
        .unwrap();
    for _ in 0..3 {
        local.cache_get("rs:d").await.unwrap();
    }
    assert!(local.local_stats().entries > 0);
    a.kill();
    assert!(wait_until(Duration::from_secs(5), || local
        .local_stats()
        .entries
        == 0));
    assert!(
        local.cache_get("rs:d").await.is_err(),
        "no answer from the local cache once the connection is gone"
    );
}
