//! The cache service over the real socket, against a real redis-server.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::client::Fetch;
use satchel::protocol::ErrorCode;
use satchel::protocol::msgpack::{Head, Reader};
use support::*;

/// The raw bytes of `result.<name>` in a response frame.
fn result_raw(frame: &[u8], name: &str) -> Option<Vec<u8>> {
    fn find<'a>(map: &'a [u8], name: &str) -> Option<&'a [u8]> {
        let mut r = Reader::new(map);
        let Ok(Head::Map(n)) = r.head() else {
            return None;
        };
        for _ in 0..n {
            let key = r.head().ok()?;
            let value = r.skip().ok()?;
            if key == Head::Str(name.as_bytes()) {
                return Some(value);
            }
        }
        None
    }
    let result = find(frame, "result")?;
    find(result, name).map(<[u8]>::to_vec)
}

fn call_raw(s: &mut std::os::unix::net::UnixStream, body: Vec<u8>) -> bytes::Bytes {
    s.write_all(&frame(&body)).unwrap();
    read_frame(s).expect("a response")
}

#[test]
fn every_messagepack_type_round_trips_byte_for_byte() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let mut s = daemon.raw();
    let values: Vec<(&str, Vec<u8>)> = vec![
        ("nil", vec![0xc0]),
        ("true", vec![0xc3]),
        ("false", vec![0xc2]),
        ("fixint", vec![0x05]),
        ("negative fixint", vec![0xe0]),
        ("int8", vec![0xd0, 0x05]),
        ("int16", vec![0xd1, 0x00, 0x05]),
        ("int32", vec![0xd2, 0xff, 0xff, 0xff, 0xfe]),
        ("int64", vec![0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ("uint8", vec![0xcc, 0x05]),
        ("uint16", vec![0xcd, 0x00, 0x05]),
        ("uint32", vec![0xce, 0, 0, 0, 5]),
        (
            "uint64",
            vec![0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        ("float32", vec![0xca, 0x3f, 0xc0, 0, 0]),
        (
            "float64",
            vec![0xcb, 0x40, 0x09, 0x21, 0xfb, 0x54, 0x44, 0x2d, 0x18],
        ),
        ("fixstr", vec![0xa3, b'a', b'b', b'c']),
        (
            "str8 holding a short string",
            vec![0xd9, 0x03, b'a', b'b', b'c'],
        ),
        ("empty str", vec![0xa0]),
        ("bin8", vec![0xc4, 0x03, 0x00, 0xff, 0x10]),
        ("empty bin", vec![0xc4, 0x00]),
        ("fixext4", vec![0xd6, 0x01, 1, 2, 3, 4]),
        ("timestamp ext", vec![0xd6, 0xff, 0x5f, 0x5e, 0x10, 0x00]),
        ("ext8", vec![0xc7, 0x02, 0x05, 0xaa, 0xbb]),
        ("array", vec![0x93, 0x01, 0xa1, b'x', 0xc0]),
        ("array16 of 1", vec![0xdc, 0x00, 0x01, 0xc3]),
        (
            "nested map",
            vec![0x82, 0xa1, b'a', 0x91, 0x80, 0x01, 0xc4, 0x01, 0x07],
        ),
        ("map16 of 0", vec![0xde, 0x00, 0x00]),
    ];
    for (i, (name, value)) in values.iter().enumerate() {
        let key = format!("type:{i}");
        let set = request(1, "cache.set", |w| {
            w.str("key").str(&key).str("value").raw(value);
            2
        });
        let (_, ok, body) = decode(&call_raw(&mut s, set));
        assert!(ok, "{name}: {body}");
        let got = call_raw(
            &mut s,
            request(2, "cache.get", |w| {
                w.str("key").str(&key);
                1
            }),
        );
        assert_eq!(
            result_raw(&got, "value").as_ref(),
            Some(value),
            "{name} via get"
        );
        let fetched = call_raw(
            &mut s,
            request(3, "cache.fetch", |w| {
                w.str("key").str(&key);
                1
            }),
        );
        assert_eq!(
            result_raw(&fetched, "value").as_ref(),
            Some(value),
            "{name} via fetch"
        );
    }
    let mget = call_raw(
        &mut s,
        request(4, "cache.mget", |w| {
            w.str("keys").array(values.len() as u32);
            for i in 0..values.len() {
                w.str(&format!("type:{i}"));
            }
            1
        }),
    );
    let (_, ok, list) = decode(&mget);
    assert!(ok);
    assert_eq!(list.as_array().unwrap().len(), values.len());
}

#[tokio::test]
async fn entries_expire_after_their_ttl_and_report_it() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    c.cache_set("short", Value::from("v"), Some(300), &[])
        .await
        .unwrap();
    let r = c
        .call("cache.get", vec![("key", Value::from("short"))])
        .await
        .unwrap();
    let ttl = field(&r, "ttl_ms").as_u64().unwrap();
    assert!(ttl > 0 && ttl <= 300, "ttl_ms {ttl}");
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = c.clone();
            async move { c.cache_get("short").await.unwrap().is_none() }
        })
        .await
    );
    // No ttl_ms: cache.default_ttl_ms (1 hour).
    c.cache_set("long", Value::from("v"), None, &[])
        .await
        .unwrap();
    let r = c
        .call("cache.get", vec![("key", Value::from("long"))])
        .await
        .unwrap();
    assert!(field(&r, "ttl_ms").as_u64().unwrap() > 3_500_000);
    let pttl: i64 = redis::cmd("PTTL")
        .arg("satchel:c:s:v:{long}")
        .query(&mut redis.conn())
        .unwrap();
    assert!(pttl > 3_500_000, "redis enforces the ttl: {pttl}");
}

#[tokio::test]
async fn zero_negative_or_mistyped_ttl_is_bad_request() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    for ttl in [Value::from(0), Value::from(-5), Value::from("60s")] {
        let err = c
            .call(
                "cache.set",
                vec![
                    ("key", Value::from("k")),
                    ("value", Value::from(1)),
                    ("ttl_ms", ttl.clone()),
                ],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{ttl}: {err}");
        assert!(err.to_string().contains("ttl_ms"), "{err}");
    }
    assert_eq!(c.cache_get("k").await.unwrap(), None, "nothing stored");
}

#[tokio::test]
async fn keys_values_and_field_types_are_checked() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[("SATCHEL_CACHE_MAX_VALUE_BYTES", "1000")]);
    let c = daemon.client().await;
    let code_of = |r: Result<Value, satchel::ClientError>| r.unwrap_err().code();
    assert_eq!(
        code_of(c.call("cache.get", vec![("key", Value::from(""))]).await),
        Some(ErrorCode::BadRequest)
    );
    assert_eq!(
        code_of(
            c.call("cache.get", vec![("key", Value::from("k".repeat(1025)))])
                .await
        ),
        Some(ErrorCode::TooLarge)
    );
    assert!(c.cache_get(&"k".repeat(1024)).await.is_ok());
    assert_eq!(
        code_of(
            c.call(
                "cache.set",
                vec![
                    ("key", Value::from("big")),
                    ("value", Value::Binary(vec![0; 1001]))
                ]
            )
            .await
        ),
        Some(ErrorCode::TooLarge)
    );
    let err = c
        .call("cache.get", vec![("key", Value::from(42))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    assert!(err.to_string().contains("`key`"), "{err}");
    let err = c
        .call("cache.set", vec![("key", Value::from("k"))])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("value"), "{err}");
    let err = c
        .call("cache.del", vec![("keys", Value::from("k"))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    let err = c
        .call(
            "cache.set",
            vec![
                ("key", Value::from("k")),
                ("value", Value::from(1)),
                ("tags", Value::Array(vec![Value::from(1)])),
            ],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tags"), "{err}");
    let err = c.call("cache.invalidate", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
}

#[tokio::test]
async fn mget_answers_in_request_order_with_misses() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    c.cache_set("a", Value::from(1), None, &[]).await.unwrap();
    c.cache_set("c", Value::from("three"), None, &[])
        .await
        .unwrap();
    let got = c.cache_mget(&["c", "b", "a", "c"]).await.unwrap();
    assert_eq!(
        got,
        vec![
            Some(Value::from("three")),
            None,
            Some(Value::from(1)),
            Some(Value::from("three"))
        ]
    );
    assert_eq!(c.cache_mget(&[]).await.unwrap(), vec![]);
}

#[tokio::test]
async fn del_counts_what_existed() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    c.cache_set("a", Value::from(1), None, &[]).await.unwrap();
    c.cache_set("b", Value::from(2), None, &[]).await.unwrap();
    assert_eq!(c.cache_del(&["a", "b", "nope"]).await.unwrap(), 2);
    assert_eq!(c.cache_get("a").await.unwrap(), None);
    assert_eq!(c.cache_del(&["a"]).await.unwrap(), 0);
}

#[tokio::test]
async fn tag_invalidation_removes_exactly_the_tagged_keys() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    c.cache_set("exam:1", Value::from(1), None, &["exams"])
        .await
        .unwrap();
    c.cache_set("exam:2", Value::from(2), None, &["exams", "user:7"])
        .await
        .unwrap();
    c.cache_set("result:1", Value::from(3), None, &["results"])
        .await
        .unwrap();
    c.cache_set("plain", Value::from(4), None, &[])
        .await
        .unwrap();
    assert_eq!(c.cache_invalidate(&["exams"], None).await.unwrap(), 2);
    assert_eq!(
        c.cache_mget(&["exam:1", "exam:2"]).await.unwrap(),
        vec![None, None]
    );
    assert_eq!(c.cache_get("result:1").await.unwrap(), Some(Value::from(3)));
    assert_eq!(c.cache_get("plain").await.unwrap(), Some(Value::from(4)));
    // The tag set is gone with its keys; a fresh entry with the tag is unaffected.
    let exists: i64 = redis::cmd("EXISTS")
        .arg("satchel:c:s:t:{exams}")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(exists, 0);
    c.cache_set("exam:3", Value::from(5), None, &["exams"])
        .await
        .unwrap();
    assert_eq!(c.cache_get("exam:3").await.unwrap(), Some(Value::from(5)));
    // Tag bookkeeping expires with its keys.
    let pttl: i64 = redis::cmd("PTTL")
        .arg("satchel:c:s:t:{exams}")
        .query(&mut redis.conn())
        .unwrap();
    assert!(pttl > 0, "tag set has a ttl: {pttl}");
    assert_eq!(
        c.cache_invalidate(&["nobody-uses-this"], None)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_invalidation_of_100k_keys_never_blocks_redis() {
    let redis = RedisServer::start_with(&["--slowlog-log-slower-than", "20000"]);
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    const N: usize = 100_000;
    let mut batch = Vec::new();
    for i in 0..N {
        let c = c.clone();
        batch.push(tokio::spawn(async move {
            c.cache_set(&format!("user:{i}"), Value::from(i as u64), None, &[])
                .await
        }));
        if batch.len() == 2000 {
            for t in batch.drain(..) {
                t.await.unwrap().unwrap();
            }
        }
    }
    for t in batch.drain(..) {
        t.await.unwrap().unwrap();
    }
    for other in ["users", "use", "session:1", "user*literal"] {
        c.cache_set(other, Value::from(other), None, &[])
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query(&mut redis.conn())
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        c.cache_invalidate(&[], Some("user:")).await.unwrap(),
        N as u64
    );
    let took = started.elapsed();
    let slow: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(10)
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        slow.is_empty(),
        "a Redis command ran longer than 20 ms: {slow:?}"
    );
    assert_eq!(c.cache_get("user:0").await.unwrap(), None);
    assert_eq!(c.cache_get("user:99999").await.unwrap(), None);
    for other in ["users", "use", "session:1", "user*literal"] {
        assert!(
            c.cache_get(other).await.unwrap().is_some(),
            "{other} survives"
        );
    }
    // Glob characters in a prefix are literal.
    assert_eq!(c.cache_invalidate(&[], Some("user*")).await.unwrap(), 1);
    assert!(c.cache_get("users").await.unwrap().is_some());
    eprintln!("invalidated {N} keys by prefix in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_fetches_of_a_missing_key_grant_one_lease_and_all_get_the_fill() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(daemon.client().await);
    }
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let c = clients[i % clients.len()].clone();
            tokio::spawn(async move {
                c.cache_fetch("hot", Some(5000), Some(10_000))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let probe = daemon.client().await;
    // Wait until one caller holds the lease and the other 49 are waiting.
    assert!(
        eventually(Duration::from_secs(10), || {
            let p = probe.clone();
            async move {
                let s = p.stats().await.unwrap();
                let cache = field(&s, "cache");
                field(cache, "leases_granted").as_u64() == Some(1)
                    && field(cache, "lease_waits").as_u64() == Some(49)
            }
        })
        .await
    );
    let lease: String = redis::cmd("GET")
        .arg("satchel:c:s:l:{hot}")
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        probe
            .cache_fill("hot", &lease, Value::from("loaded"), None, &[])
            .await
            .unwrap()
    );
    let mut leases = 0;
    let mut values = 0;
    for t in tasks {
        match t.await.unwrap() {
            Fetch::Lease(l) => {
                assert_eq!(l, lease);
                leases += 1;
            }
            Fetch::Hit(v) => {
                assert_eq!(v, Value::from("loaded"));
                values += 1;
            }
            Fetch::Miss => panic!("a caller gave up; log:\n{}", daemon.log_text()),
        }
    }
    assert_eq!((leases, values), (1, 49));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_passes_to_exactly_one_waiter_and_the_old_fill_is_rejected() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    let Fetch::Lease(first) = c.cache_fetch("k", Some(300), None).await.unwrap() else {
        panic!("first fetch gets the lease")
    };
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.cache_fetch("k", Some(5000), Some(5000)).await.unwrap() })
        })
        .collect();
    // The holder never fills; after 300 ms exactly one waiter gets a new lease.
    let mut waiters = waiters;
    let started = Instant::now();
    let idx = loop {
        if let Some(i) = waiters.iter().position(|t| t.is_finished()) {
            break i;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no waiter got the expired lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let Fetch::Lease(second) = waiters.remove(idx).await.unwrap() else {
        panic!("the first finished waiter must hold the new lease")
    };
    assert_ne!(second, first);
    assert!(
        !c.cache_fill("k", &first, Value::from("stale"), None, &[])
            .await
            .unwrap(),
        "old holder's fill rejected"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        waiters.iter().all(|t| !t.is_finished()),
        "the others still wait for the new holder"
    );
    assert!(
        c.cache_fill("k", &second, Value::from("fresh"), None, &[])
            .await
            .unwrap()
    );
    for t in waiters {
        assert_eq!(t.await.unwrap(), Fetch::Hit(Value::from("fresh")));
    }
}

#[tokio::test]
async fn del_set_and_invalidate_during_a_lease_make_the_fill_fail() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    let lease = |key: &'static str| {
        let c = c.clone();
        async move {
            match c.cache_fetch(key, None, Some(0)).await.unwrap() {
                Fetch::Lease(l) => l,
                other => panic!("expected a lease, got {other:?}"),
            }
        }
    };
    let l = lease("a").await;
    c.cache_del(&["a"]).await.unwrap();
    assert!(
        !c.cache_fill("a", &l, Value::from(1), None, &[])
            .await
            .unwrap(),
        "after del"
    );

    let l = lease("b").await;
    c.cache_set("b", Value::from("new"), None, &[])
        .await
        .unwrap();
    assert!(
        !c.cache_fill("b", &l, Value::from("old"), None, &[])
            .await
            .unwrap(),
        "after set"
    );
    assert_eq!(c.cache_get("b").await.unwrap(), Some(Value::from("new")));

    let l = lease("user:c").await;
    c.cache_invalidate(&[], Some("user:")).await.unwrap();
    assert!(
        !c.cache_fill("user:c", &l, Value::from(1), None, &[])
            .await
            .unwrap(),
        "after prefix invalidation"
    );

    let l = lease("d").await;
    c.cache_invalidate(&["exams"], None).await.unwrap();
    assert!(
        !c.cache_fill("d", &l, Value::from(1), None, &["exams"])
            .await
            .unwrap(),
        "a fill carrying a tag invalidated after the lease was granted"
    );
    let l = lease("e").await;
    c.cache_invalidate(&["exams"], None).await.unwrap();
    assert!(
        c.cache_fill("e", &l, Value::from(1), None, &["other"])
            .await
            .unwrap(),
        "other tags are fine"
    );

    // A lease granted after the invalidation fills normally.
    let l = lease("d").await;
    assert!(
        c.cache_fill("d", &l, Value::from(2), None, &["exams"])
            .await
            .unwrap()
    );
    assert_eq!(c.cache_get("d").await.unwrap(), Some(Value::from(2)));
    let stats = c.stats().await.unwrap();
    assert_eq!(
        field(field(&stats, "cache"), "fills_rejected").as_u64(),
        Some(4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_redis_grant_one_lease_and_wake_each_others_waiters() {
    let redis = RedisServer::start();
    let a = Daemon::start(&redis.url(), &[]);
    let b = Daemon::start(&redis.url(), &[]);
    let ca = a.client().await;
    let cb = b.client().await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
            tokio::spawn(async move {
                c.cache_fetch("shared", Some(5000), Some(10_000))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let waiting = |c: satchel::Client| async move {
        let s = c.stats().await.unwrap();
        let cache = field(&s, "cache");
        field(cache, "leases_granted").as_u64().unwrap()
            + field(cache, "lease_waits").as_u64().unwrap()
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            let (ca, cb) = (ca.clone(), cb.clone());
            async move { waiting(ca).await + waiting(cb).await == 20 }
        })
        .await
    );
    let lease: String = redis::cmd("GET")
        .arg("satchel:c:s:l:{shared}")
        .query(&mut redis.conn())
        .unwrap();
    // Fill through daemon A; daemon B's waiters learn of it over pub/sub.
    assert!(
        ca.cache_fill("shared", &lease, Value::from("v"), None, &[])
            .await
            .unwrap()
    );
    let mut leases = 0;
    for t in tasks {
        match t.await.unwrap() {
            Fetch::Lease(_) => leases += 1,
            Fetch::Hit(v) => assert_eq!(v, Value::from("v")),
            Fetch::Miss => panic!("a waiter timed out"),
        }
    }
    assert_eq!(leases, 1);
}

#[test]
fn isolate_by_uid_gives_each_uid_its_own_key_space() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::getuid().is_root() {
        eprintln!(
            "!!!!!!!! SKIPPED isolate_by_uid test: needs root to run a client as nobody !!!!!!!!"
        );
        return;
    }
    let redis = RedisServer::start();
    let daemon = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_CACHE_ISOLATE_BY_UID", "true"),
            ("SATCHEL_SERVER_SOCKET_MODE", "0666"),
        ],
    );
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cli = |uid: Option<u32>, args: &[&str]| {
        let mut cmd = std::process::Command::new(satchel_bin());
        cmd.args(args).arg("--socket").arg(&daemon.socket);
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    };
    let nobody = Some(65534);
    assert_eq!(cli(None, &["cache", "set", "k", "root's"]).0, Some(0));
    assert_eq!(
        cli(nobody, &["cache", "get", "k"]).0,
        Some(3),
        "nobody cannot see root's entry"
    );
    assert_eq!(cli(nobody, &["cache", "set", "k", "nobody's"]).0, Some(0));
    assert_eq!(
        cli(None, &["cache", "get", "k"]),
        (Some(0), "root's".to_owned())
    );
    assert_eq!(
        cli(nobody, &["cache", "get", "k"]),
        (Some(0), "nobody's".to_owned())
    );
    assert_eq!(
        cli(nobody, &["cache", "invalidate", "--prefix", "k"]),
        (Some(0), "1".to_owned())
    );
    assert_eq!(
        cli(None, &["cache", "get", "k"]),
        (Some(0), "root's".to_owned()),
        "nobody cannot invalidate root's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_test_gives_unavailable_then_recovers() {
    let mut redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    c.cache_set("k", Value::from(1), None, &[]).await.unwrap();
    redis.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let err = c.cache_get("k").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        let err = c.cache_fetch("k", None, None).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    }
    redis.restart();
    assert!(
        eventually(Duration::from_secs(10), || {
            let c = c.clone();
            async move { c.cache_set("k", Value::from(2), None, &[]).await.is_ok() }
        })
        .await
    );
    assert_eq!(c.cache_get("k").await.unwrap(), Some(Value::from(2)));
}

#[tokio::test]
async fn stats_count_cache_traffic() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    c.cache_set("a", Value::from(1), None, &["t"])
        .await
        .unwrap();
    c.cache_get("a").await.unwrap();
    c.cache_get("b").await.unwrap();
    c.cache_del(&["a"]).await.unwrap();
    c.cache_invalidate(&["t"], None).await.unwrap();
    let s = c.stats().await.unwrap();
    let cache = field(&s, "cache");
    for (k, v) in [
        ("hits", 1),
        ("misses", 1),
        ("sets", 1),
        ("deletes", 1),
        ("invalidations", 1),
    ] {
        assert_eq!(field(cache, k).as_u64(), Some(v), "{k} in {cache}");
    }
}
