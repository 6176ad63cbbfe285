//! The metrics endpoint (issue 17): `[metrics] listen` serves `GET /metrics` (the
//! `stats` samples plus per-op latency and Redis round-trip histograms, Prometheus
//! text) and `GET /healthz` (200, or 503 with the reason). Asked with a real HTTP
//! client (reqwest); idle scrapers cannot slow the socket path.

mod support;

use std::time::{Duration, Instant};

use rmpv::Value;
use support::*;

fn daemon(redis: &RedisServer, port: u16) -> Daemon {
    let listen = format!("127.0.0.1:{port}");
    Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_METRICS_LISTEN", listen.as_str()),
            ("SATCHEL_MAIL_ENABLED", "false"),
        ],
    )
}

async fn get(port: u16, path: &str) -> (u16, String, String) {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, ct, r.text().await.unwrap())
}

/// The value of the sample line `name` (with its labels, if any).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_has_the_stats_samples_and_latency_histograms_and_healthz_follows_redis() {
    let mut redis = RedisServer::start();
    let port = free_port();
    let d = daemon(&redis, port);
    let c = d.client().await;
    c.cache_set("k", Value::from(1), None, &[]).await.unwrap();
    for _ in 0..5 {
        c.cache_get("k").await.unwrap();
    }
    // Made-up ops land under op="other": a client cannot add series.
    for i in 0..3 {
        assert!(c.call(&format!("made.up.{i}"), vec![]).await.is_err());
    }
    // The probe PINGs Redis every second.
    assert!(
        eventually(Duration::from_secs(5), || async {
            sample(
                &get(port, "/metrics").await.2,
                "satchel_redis_rtt_seconds_count",
            )
            .is_some_and(|n| n >= 1.0)
        })
        .await
    );
    let (status, ct, text) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    assert_eq!(
        sample(&text, "satchel_cache_sets_total"),
        Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "satchel_requests_total").unwrap() >= 9.0);
    assert_eq!(
        sample(
            &text,
            "satchel_request_duration_seconds_count{op=\"cache.get\"}"
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "satchel_request_duration_seconds_count{op=\"other\"}"
        ),
        Some(3.0)
    );
    assert!(!text.contains("made.up"), "{text}");
    assert_eq!(
        sample(
            &text,
            "satchel_request_duration_seconds_bucket{op=\"cache.get\",le=\"+Inf\"}"
        ),
        Some(5.0),
        "{text}"
    );
    // The same samples as `stats --prometheus`: every one of its names is here.
    let stats = c
        .call("stats", vec![("format", Value::from("prometheus"))])
        .await
        .unwrap();
    for line in stats
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
    {
        assert!(text.contains(line), "{line} missing from /metrics");
    }

    assert_eq!(
        get(port, "/healthz").await,
        (200, "text/plain; charset=utf-8".into(), "ok\n".into())
    );
    assert_eq!(get(port, "/nope").await.0, 404);
    let post = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 405);

    // Redis gone: 503 with the reason, and back to 200 when it is back.
    redis.stop();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (status, _, body) = get(port, "/healthz").await;
            status == 503 && body.contains("redis")
        })
        .await
    );
    redis.restart();
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(port, "/healthz").await.0 == 200
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapers_that_never_send_a_request_hold_little_and_slow_nobody() {
    let redis = RedisServer::start();
    let port = free_port();
    let d = daemon(&redis, port);
    let c = d.client().await;
    let rss_before = d.rss_kib();
    // 200 connections that say nothing: 8 are served (until the header timeout), the
    // rest are told 503 at once.
    let t0 = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    eprintln!("connected in {:?}", t0.elapsed());
    // A real scraper meanwhile is told 503 (once the 503s to the idle ones, which
    // linger 200 ms each, 64 at a time, are done).
    assert!(
        eventually(Duration::from_secs(3), || async {
            reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .is_ok_and(|r| r.status().as_u16() == 503)
        })
        .await
    );
    let mut slowest = Duration::ZERO;
    for _ in 0..200 {
        let t = Instant::now();
        c.ping().await.unwrap();
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(200),
        "a ping took {slowest:?}"
    );
    let grown = d.rss_kib().saturating_sub(rss_before);
    eprintln!("200 idle scrapers: slowest ping {slowest:?}, RSS +{grown} KiB");
    assert!(grown < 16 * 1024, "RSS grew {grown} KiB");
    drop(idle);
    let t1 = Instant::now();
    // Their slots come back (header timeout 5 s at most): the endpoint answers again.
    assert!(
        eventually(Duration::from_secs(15), || async {
            reqwest::Client::new()
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await
    );
    eprintln!("answering again {:?} after they left", t1.elapsed());
}

#[test]
fn a_bad_or_taken_listen_address_is_an_error_naming_metrics_listen() {
    let o = std::process::Command::new(satchel_bin())
        .arg("check-config")
        .env("SATCHEL_METRICS_LISTEN", "localhost:9464")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("metrics.listen"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let redis = RedisServer::start();
    let mut d = Daemon::spawn(
        &redis.url(),
        &[("SATCHEL_METRICS_LISTEN", addr.as_str())],
        None,
    );
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits");
    assert!(!status.success());
    assert!(d.log_text().contains("metrics.listen"), "{}", d.log_text());
}
