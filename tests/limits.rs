//! One request never stalls or sinks the daemon. For each kind of large request,
//! one client sends the largest one allowed in a loop while another client's
//! `cache.get`s must stay fast, Redis must log no slow command, nobody may get
//! `UNAVAILABLE`, and the daemon's memory must stay bounded. Requests over a limit
//! get `TOO_LARGE` at once.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::{Client, ClientError};
use support::*;

/// How long each hostile loop runs.
const HOSTILE_FOR: Duration = Duration::from_secs(3);
/// The other client's gets must each be answered within this.
const MAX_GET: Duration = Duration::from_millis(200);
/// Redis must log no command slower than this (SLOWLOG, µs).
const SLOW_US: u64 = 20_000;
/// The daemon's RSS bound while a hostile loop runs (documented in RELIABILITY.md).
const MAX_RSS_KIB: u64 = 256 * 1024;

/// These tests measure latency on a 2-core machine: one at a time, or they measure
/// each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sends one request on a fresh connection and reads the answer's bytes without
/// decoding them: a hostile client that costs the test process no CPU to speak of.
async fn raw_call(socket: std::path::PathBuf, body: Vec<u8>) -> Result<Value, ClientError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|_| ClientError::Closed)?;
    s.write_all(&frame(&body))
        .await
        .map_err(|_| ClientError::Closed)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .await
        .map_err(|_| ClientError::Closed)?;
    let mut rest = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut rest)
        .await
        .map_err(|_| ClientError::Closed)?;
    Ok(Value::from(rest.len()))
}

fn mget_body(keys: &[String]) -> Vec<u8> {
    let mut w = satchel::protocol::msgpack::Writer::new();
    w.map(3)
        .str("id")
        .uint(1)
        .str("op")
        .str("cache.mget")
        .str("keys");
    w.array(keys.len() as u32);
    for k in keys {
        w.str(k);
    }
    w.into_vec()
}

fn values(keys: &[String]) -> Value {
    Value::Array(keys.iter().map(|k| Value::from(k.as_str())).collect())
}

fn too_large(r: Result<Value, ClientError>, field: &str) {
    match r {
        Err(e) => {
            assert_eq!(
                e.code(),
                Some(satchel::protocol::ErrorCode::TooLarge),
                "{e}"
            );
            assert_eq!(e.field(), Some(field), "{e}");
        }
        Ok(v) => panic!("expected TOO_LARGE, got {v}"),
    }
}

struct Report {
    gets: usize,
    p99: Duration,
    max: Duration,
    hostile_requests: u64,
    peak_rss_kib: u64,
}

/// Runs `hostile` in a loop for [`HOSTILE_FOR`] on its own connection while another
/// connection reads one key sequentially; checks the promises and reports.
async fn under_load<F, Fut>(name: &str, redis: &RedisServer, daemon: &Daemon, hostile: F) -> Report
where
    F: Fn(Client) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, ClientError>> + Send,
{
    let mut conn = redis.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(SLOW_US)
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query(&mut conn).unwrap();
    let reader = daemon.client().await;
    reader
        .cache_set("probe", Value::from("x"), None, &[])
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let hostile_client = daemon.client().await;
    let loop_task = {
        let (stop, done) = (stop.clone(), done.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match hostile(hostile_client.clone()).await {
                    Err(e) if e.code() == Some(satchel::protocol::ErrorCode::Unavailable) => {
                        panic!("the hostile client itself got UNAVAILABLE: {e}")
                    }
                    _ => {}
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut peak_rss = 0;
    while started.elapsed() < HOSTILE_FOR {
        let t = Instant::now();
        let got = reader.cache_get("probe").await;
        latencies.push(t.elapsed());
        match got {
            Ok(Some(_)) => {}
            other => panic!("{name}: the other client's get failed: {other:?}"),
        }
        peak_rss = peak_rss.max(daemon.rss_kib());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(30), loop_task)
        .await
        .expect("the hostile loop ends")
        .expect("the hostile loop did not panic");
    latencies.sort();
    let slow: Vec<Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(10)
        .query::<redis::Value>(&mut conn)
        .map(|v| match v {
            redis::Value::Array(items) => items
                .into_iter()
                .map(|i| Value::from(format!("{i:?}")))
                .collect(),
            _ => Vec::new(),
        })
        .unwrap();
    let report = Report {
        gets: latencies.len(),
        p99: latencies[latencies.len() * 99 / 100],
        max: *latencies.last().unwrap(),
        hostile_requests: done.load(Ordering::Relaxed),
        peak_rss_kib: peak_rss,
    };
    eprintln!(
        "{name}: {} hostile requests; other client's gets: {} done, p99 {:?}, max {:?}; daemon peak RSS {} MiB; slowlog {}",
        report.hostile_requests,
        report.gets,
        report.p99,
        report.max,
        report.peak_rss_kib / 1024,
        slow.len()
    );
    assert!(
        slow.is_empty(),
        "{name}: Redis logged slow commands: {slow:?}"
    );
    assert!(report.max < MAX_GET, "{name}: a get took {:?}", report.max);
    assert!(
        report.hostile_requests > 0,
        "{name}: the hostile loop never finished a request"
    );
    assert!(
        report.peak_rss_kib < MAX_RSS_KIB,
        "{name}: daemon RSS reached {} KiB",
        report.peak_rss_kib
    );
    report
}

async fn fill_keys(client: &Client, keys: &[String], bytes: usize) {
    let value = Value::Binary(vec![b'v'; bytes]);
    for chunk in keys.chunks(1000) {
        let sets = chunk
            .iter()
            .map(|k| client.cache_set(k, value.clone(), Some(600_000), &[]));
        for r in futures::future::join_all(sets).await {
            r.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_cache_requests_do_not_stall_anyone_else() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let client = daemon.client().await;
    let keys: Arc<Vec<String>> = Arc::new((0..10_000).map(|i| format!("k{i}")).collect());
    fill_keys(&client, &keys, 100).await;

    // mget of 10,000 keys: answered in full, in batches.
    let all = keys.clone();
    let r = client
        .call("cache.mget", vec![("keys", values(&all))])
        .await
        .unwrap();
    assert_eq!(r.as_array().unwrap().len(), 10_000);
    let k = keys.clone();
    under_load("mget 10000 keys", &redis, &daemon, move |c| {
        let k = k.clone();
        async move { c.call("cache.mget", vec![("keys", values(&k))]).await }
    })
    .await;

    // mget naming one 1 MiB value 10,000 times asks for ~10 GiB: refused, cheaply.
    client
        .cache_set("big", Value::Binary(vec![0; 1_000_000]), None, &[])
        .await
        .unwrap();
    let same: Arc<Vec<String>> = Arc::new(vec!["big".to_owned(); 10_000]);
    let t = Instant::now();
    too_large(
        client
            .call("cache.mget", vec![("keys", values(&same))])
            .await,
        "keys",
    );
    eprintln!(
        "mget of one 1 MiB value x 10000 refused in {:?}",
        t.elapsed()
    );
    under_load("mget one 1 MiB value x 10000", &redis, &daemon, move |c| {
        let s = same.clone();
        async move { c.call("cache.mget", vec![("keys", values(&s))]).await }
    })
    .await;

    // 60 distinct 1 MiB values (60 MiB answer, under the 64 MiB bound): fetched in
    // ~1 MiB MGETs, answered whole.
    let big: Vec<String> = (0..60).map(|i| format!("big{i}")).collect();
    fill_keys(&client, &big, 1_000_000).await;
    let r = client
        .call("cache.mget", vec![("keys", values(&big))])
        .await
        .unwrap();
    assert_eq!(r.as_array().unwrap().len(), 60);
    let body = mget_body(&big);
    let socket = daemon.socket.clone();
    under_load("mget 60 x 1 MiB values", &redis, &daemon, move |_| {
        raw_call(socket.clone(), body.clone())
    })
    .await;

    // del of 10,000 keys (all present the first time round).
    let k = keys.clone();
    under_load("del 10000 keys", &redis, &daemon, move |c| {
        let k = k.clone();
        async move { c.call("cache.del", vec![("keys", values(&k))]).await }
    })
    .await;

    // invalidate 1,000 tags at once.
    let tags: Arc<Vec<String>> = Arc::new((0..1000).map(|i| format!("t{i}")).collect());
    under_load("invalidate 1000 tags", &redis, &daemon, move |c| {
        let t = tags.clone();
        async move { c.call("cache.invalidate", vec![("tags", values(&t))]).await }
    })
    .await;
}

#[tokio::test]
async fn cache_requests_over_a_limit_are_too_large_at_once_and_do_nothing() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let client = daemon.client().await;
    client
        .cache_set("k1", Value::from(1), None, &[])
        .await
        .unwrap();
    let many: Vec<String> = (0..10_001).map(|i| format!("k{i}")).collect();
    let t = Instant::now();
    too_large(
        client
            .call("cache.mget", vec![("keys", values(&many))])
            .await,
        "keys",
    );
    too_large(
        client
            .call("cache.del", vec![("keys", values(&many))])
            .await,
        "keys",
    );
    let tags: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
    too_large(
        client
            .call("cache.invalidate", vec![("tags", values(&tags))])
            .await,
        "tags",
    );
    let tags: Vec<String> = (0..1000).map(|i| format!("t{i}")).collect();
    too_large(
        client
            .call(
                "cache.invalidate",
                vec![("tags", values(&tags)), ("prefix", Value::from("k"))],
            )
            .await,
        "tags",
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(
        client.cache_get("k1").await.unwrap(),
        Some(Value::from(1)),
        "the refused del deleted nothing"
    );
}

fn recipients(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("Student {i} <s{i}@example.com>"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_mails_do_not_stall_anyone_else() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    // No delivery: this is about accepting mail.
    let daemon = Daemon::start(&redis.url(), &[("SATCHEL_MAIL_ENABLED", "false")]);
    let client = daemon.client().await;

    // 1,000 recipients: queued, linear.
    let mail = satchel::client::Mail {
        to: recipients(600),
        cc: recipients(1000)[600..900].to_vec(),
        bcc: recipients(1000)[900..].to_vec(),
        subject: "Results".into(),
        text: Some("Your results are out.".into()),
        ..Default::default()
    };
    let t = Instant::now();
    client.mail_send(&mail).await.unwrap();
    eprintln!("mail.send to 1000 recipients: {:?}", t.elapsed());
    let m = mail.clone();
    under_load("mail.send to 1000 recipients", &redis, &daemon, move |c| {
        let m = m.clone();
        async move { c.mail_send(&m).await.map(|q| Value::from(q.mail_id)) }
    })
    .await;

    // A ~9.5 MiB message (a 7 MiB attachment, base64) is rendered off the runtime
    // thread.
    let heavy = satchel::client::Mail {
        to: vec!["ann@example.com".into()],
        subject: "Scans".into(),
        text: Some("attached".into()),
        attachments: vec![satchel::client::Attachment {
            filename: "scans.bin".into(),
            content_type: "application/octet-stream".into(),
            data: (0..7_000_000u64).map(|i| (i * 7919 % 251) as u8).collect(),
        }],
        ..Default::default()
    };
    let t = Instant::now();
    client.mail_send(&heavy).await.unwrap();
    eprintln!("mail.send of a 7 MB attachment: {:?}", t.elapsed());
    under_load(
        "mail.send with a 7 MB attachment",
        &redis,
        &daemon,
        move |c| {
            let m = heavy.clone();
            async move { c.mail_send(&m).await.map(|q| Value::from(q.mail_id)) }
        },
    )
    .await;

    // Over the limit: TOO_LARGE at once, nothing queued.
    let before = satchel::client::get(&client.stats().await.unwrap(), "mail")
        .and_then(|m| satchel::client::get(m, "queued").cloned());
    let over = satchel::client::Mail {
        to: recipients(1001),
        ..mail.clone()
    };
    let t = Instant::now();
    match client.mail_send(&over).await {
        Err(e) => {
            assert_eq!(
                e.code(),
                Some(satchel::protocol::ErrorCode::TooLarge),
                "{e}"
            );
            assert_eq!(e.field(), Some("to"));
        }
        Ok(q) => panic!("1001 recipients were queued: {q:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    let after = satchel::client::get(&client.stats().await.unwrap(), "mail")
        .and_then(|m| satchel::client::get(m, "queued").cloned());
    assert_eq!(before, after, "nothing was queued");
}
