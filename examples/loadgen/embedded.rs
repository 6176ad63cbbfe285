//! `loadgen embedded`: a `cache.get` hit through the in-process handle of an embedded
//! satchel (`satchel::embed`) against the same hit over its socket (the Rust client),
//! same process, same daemon, alternating runs; sequential (one call at a time).

use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::start_redis;
use crate::stats::{Samples, Summary, print_header};

pub fn run(secs: Duration, runs: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_redis, port) = start_redis(dir.path());
    let socket = dir.path().join("embedded.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut config = satchel::Config::default();
        config.redis.url = format!("redis://127.0.0.1:{port}");
        config.server.socket = socket.clone();
        config.mail.enabled = false;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let handle = satchel::embed::start(config, shutdown.clone(), tasks.clone())
            .await
            .expect("embedded satchel");
        let client = Client::connect(&socket).await.expect("connect");
        let value = Value::Map(vec![
            ("title".into(), "Exam 7: Algebra I final".into()),
            ("notes".into(), "x".repeat(160).into()),
        ]);
        client.cache_set("k", value, Some(3_600_000), &[]).await.expect("set");
        // Both sides read it until it is a near-cache hit.
        for _ in 0..100 {
            handle.cache().get("k").await.expect("get");
            client.cache_get("k").await.expect("get");
        }
        let (mut inproc, mut socket_runs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let mut s = Samples::default();
            let started = Instant::now();
            while started.elapsed() < secs {
                let t = Instant::now();
                let hit = handle.cache().get("k").await.expect("get");
                s.record(t.elapsed());
                assert!(hit.is_some());
            }
            s.finish(started.elapsed());
            inproc.push(s);
            let mut s = Samples::default();
            let started = Instant::now();
            while started.elapsed() < secs {
                let t = Instant::now();
                let hit = client.cache_get("k").await.expect("get");
                s.record(t.elapsed());
                assert!(hit.is_some());
            }
            s.finish(started.elapsed());
            socket_runs.push(s);
        }
        println!(
            "cache.get hits of one ~200-byte value, sequential, {runs} alternating runs of {secs:?}, medians;\n\
             the embedded daemon and this load share one runtime thread; 2 cores"
        );
        print_header();
        let a = Summary::median_of(&inproc);
        let b = Summary::median_of(&socket_runs);
        a.print("in process (embed::Handle)");
        b.print("over the socket (Client)");
        a.print_ratio("in process/socket", &b);
        shutdown.cancel();
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    });
}
