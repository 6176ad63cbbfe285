//! `loadgen fanout`: the cost of one request's fan-out, per item. `mail.send` to 10,
//! 100 and 1,000 recipients (per-recipient cost must stay flat: no quadratic step),
//! and `cache.mget` of 1, 100 and 10,000 keys (per-key cost flat: batched MGETs).
//! Sequential requests on one connection; the daemon queues mail but delivers none.

use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::Client;

use crate::cache::start_redis;
use crate::start_daemon_with;

pub fn run(duration: Duration, runs: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_redis, port) = start_redis(dir.path());
    let url = format!("redis://127.0.0.1:{port}");
    let (_daemon, socket) =
        start_daemon_with(dir.path(), &url, &[("SATCHEL_MAIL_ENABLED", "false")]);
    crate::rt().block_on(async {
        let c = Client::connect(&socket).await.expect("connect");
        println!(
            "fan-out cost per item: sequential requests on one connection, {runs} runs of {}s per case, medians;\n\
             2 cores shared by load generator, daemon and redis-server",
            duration.as_secs()
        );
        println!("{:<40} {:>12} {:>14}", "case", "µs/request", "µs per item");
        for n in [10usize, 100, 1000] {
            let mail = satchel::client::Mail {
                to: (0..n).map(|i| format!("Student {i} <s{i}@example.com>")).collect(),
                subject: "Your results".into(),
                text: Some("Results are published.".into()),
                ..Default::default()
            };
            let mut samples = Vec::new();
            for _ in 0..runs {
                samples.push(time_per_request(duration, || async {
                    c.mail_send(&mail).await.expect("mail.send");
                })
                .await);
            }
            let us = median(samples.into_iter());
            println!("{:<40} {:>12.1} {:>14.2}", format!("mail.send, {n} recipients"), us, us / n as f64);
        }
        let value = Value::Binary(vec![b'x'; 200]);
        let all: Vec<String> = (0..10_000).map(|i| format!("k{i}")).collect();
        for chunk in all.chunks(500) {
            let sets = chunk
                .iter()
                .map(|k| c.cache_set(k, value.clone(), None, &[]));
            for r in futures::future::join_all(sets).await {
                r.expect("set");
            }
        }
        for n in [1usize, 100, 10_000] {
            let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut samples = Vec::new();
            for _ in 0..runs {
                samples.push(time_per_request(duration, || async {
                    let got = c.cache_mget(&refs).await.expect("mget");
                    assert_eq!(got.len(), n);
                })
                .await);
            }
            let us = median(samples.into_iter());
            println!("{:<40} {:>12.1} {:>14.2}", format!("cache.mget, {n} keys (200 B values)"), us, us / n as f64);
        }
    });
}

/// Mean µs per request over `duration` of back-to-back requests.
async fn time_per_request<F, Fut>(duration: Duration, mut one: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        one().await;
        n += 1;
    }
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
