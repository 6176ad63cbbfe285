//! `loadgen invalidation`: how long after a write through daemon B is acknowledged
//! daemon A stops serving the old value from its near-cache (Redis' invalidation
//! reaching A), measured by reading through A in a tight loop.

use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::client::Client;

use crate::cache::start_redis;
use crate::start_daemon_with;
use crate::stats::Samples;

/// Whether A's tracking connection is on (its near hits can be served).
async fn tracking(c: &Client) -> bool {
    let Ok(s) = c.stats().await else { return false };
    let near = satchel::client::get(&s, "cache").and_then(|c| satchel::client::get(c, "near"));
    near.and_then(|n| satchel::client::get(n, "tracking"))
        .and_then(Value::as_bool)
        == Some(true)
}

async fn near_hits(c: &Client) -> u64 {
    crate::cache::hit_counts(c).await.0
}

pub fn run(rounds: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_redis, port) = start_redis(dir.path());
    let url = format!("redis://127.0.0.1:{port}");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).expect("dir");
    std::fs::create_dir_all(&b_dir).expect("dir");
    let (_a, a_socket) = start_daemon_with(&a_dir, &url, &[]);
    let (_b, b_socket) = start_daemon_with(&b_dir, &url, &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let a = Client::connect(&a_socket).await.expect("connect A");
        let b = Client::connect(&b_socket).await.expect("connect B");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tracking(&a).await {
            assert!(Instant::now() < deadline, "daemon A's tracking never came on");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut after_ack = Samples::default();
        let mut after_send = Samples::default();
        let mut polls = 0u64;
        let started = Instant::now();
        for round in 0..rounds {
            let key = format!("inv:{}", round % 64);
            let old = Value::from(round as u64 * 2);
            let new = Value::from(round as u64 * 2 + 1);
            b.cache_set(&key, old.clone(), None, &[]).await.expect("set");
            // Read through A until it holds the value near (the second read, usually).
            loop {
                let hits = near_hits(&a).await;
                assert_eq!(a.cache_get(&key).await.expect("get"), Some(old.clone()));
                if near_hits(&a).await > hits {
                    break;
                }
            }
            let sent = Instant::now();
            b.cache_set(&key, new.clone(), None, &[]).await.expect("set");
            let acked = Instant::now();
            loop {
                polls += 1;
                let seen = a.cache_get(&key).await.expect("get");
                if seen.as_ref() == Some(&new) {
                    after_ack.record(acked.elapsed());
                    after_send.record(sent.elapsed());
                    break;
                }
                assert_eq!(seen, Some(old.clone()), "A served something else");
                assert!(acked.elapsed() < Duration::from_secs(5), "A never saw the write");
            }
        }
        after_ack.finish(started.elapsed());
        after_send.finish(started.elapsed());
        println!(
            "invalidation latency, write through daemon B → daemon A stops serving the old value from its near-cache;\n\
             {rounds} writes, A read in a tight loop ({polls} reads, so the resolution is one cache.get round trip)"
        );
        println!(
            "reads through A after B's acknowledgement that still returned the old value: {} (in {rounds} writes)",
            polls - rounds as u64
        );
        println!(
            "from B's acknowledgement: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            after_ack.p(50.0),
            after_ack.p(99.0),
            after_ack.p(100.0)
        );
        println!(
            "from sending the write:   p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            after_send.p(50.0),
            after_send.p(99.0),
            after_send.p(100.0)
        );
        // The same into a client's in-process cache: A pushes the invalidation to
        // this client's connection; the client's counter of invalidations heard is
        // polled, so the resolution is a few µs.
        let local = Client::builder(&a_socket)
            .local_cache_bytes(1 << 20)
            .connect()
            .await
            .expect("connect A with a local cache");
        let mut pushed = Samples::default();
        let started = Instant::now();
        for round in 0..rounds {
            let key = format!("inv:local:{}", round % 64);
            let old = Value::from(round as u64 * 2);
            let new = Value::from(round as u64 * 2 + 1);
            b.cache_set(&key, old.clone(), None, &[]).await.expect("set");
            while local.cache_get(&key).await.expect("get") != Some(old.clone()) {}
            // Until it is held locally (the read right after a write may not be kept).
            loop {
                let hits = local.local_stats().hits;
                local.cache_get(&key).await.expect("get");
                if local.local_stats().hits > hits {
                    break;
                }
            }
            let heard = local.local_stats().invalidations;
            b.cache_set(&key, new.clone(), None, &[]).await.expect("set");
            let acked = Instant::now();
            // Until the push has reached this client and dropped the entry.
            while local.local_stats().invalidations == heard {
                assert!(acked.elapsed() < Duration::from_secs(5), "the push never came");
                tokio::task::yield_now().await;
            }
            pushed.record(acked.elapsed());
            assert_eq!(local.cache_get(&key).await.expect("get"), Some(new.clone()));
        }
        pushed.finish(started.elapsed());
        println!(
            "into a client's local cache on A, from B's acknowledgement: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            pushed.p(50.0),
            pushed.p(99.0),
            pushed.p(100.0)
        );
    });
}
