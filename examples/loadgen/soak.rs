//! `loadgen soak`: mixed traffic at a fixed rate for a long time, sampling the
//! daemon's RSS and open file descriptors and Redis' memory, to show they stay flat.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::client::{Client, Fetch};

use crate::cache::start_redis;
use crate::mail::{Sink, start_satchel};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One mixed operation; returns whether it failed. One in 20 is a `mail.send`.
async fn one_op(c: &Client, n: u64, mails: &AtomicU64) -> bool {
    if n % 20 == 7 {
        let mail = satchel::client::Mail {
            to: vec![format!("user{}@example.com", n % 1000)],
            subject: format!("soak {n}"),
            html: Some(format!("<p>mail number {n}</p>")),
            ..Default::default()
        };
        let ok = c.mail_send(&mail).await.is_ok();
        if ok {
            mails.fetch_add(1, Ordering::Relaxed);
        }
        return !ok;
    }
    let key = format!("soak:{}", n.wrapping_mul(2654435761) % 50_000);
    let tag = format!("t{}", n % 100);
    let r = match n % 20 {
        0..=9 => c.cache_get(&key).await.map(|_| ()),
        10..=14 => {
            c.cache_set(&key, Value::Binary(vec![7; 300]), Some(60_000), &[&tag])
                .await
        }
        15 | 16 => match c.cache_fetch(&key, Some(1000), Some(200)).await {
            Ok(Fetch::Lease(lease)) => c
                .cache_fill(&key, &lease, Value::from(n), Some(60_000), &[&tag])
                .await
                .map(|_| ()),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        },
        17 | 18 => c.cache_del(&[&key]).await.map(|_| ()),
        _ if n % 1000 == 19 => c.cache_invalidate(&[&tag], None).await.map(|_| ()),
        _ => c.cache_mget(&[&key, "soak:1", "soak:2"]).await.map(|_| ()),
    };
    r.is_err()
}

pub fn run(secs: u64, rate: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_redis, port) = start_redis(dir.path());
    let url = format!("redis://127.0.0.1:{port}");
    let sink = Sink::start(dir.path(), "soak-sink");
    // Status records of sent mail are kept for status_retention_ms; 60 s here (7 days
    // by default) so the soak shows the bound rather than a week of growth.
    let (daemon, socket) = start_satchel(
        dir.path(),
        "soak",
        &url,
        &[
            (
                "SATCHEL_MAIL_SMTP_URL",
                format!("smtp://127.0.0.1:{}", sink.port),
            ),
            ("SATCHEL_MAIL_STATUS_RETENTION_MS", "60000".into()),
            ("SATCHEL_MAIL_IDEMPOTENCY_TTL_MS", "60000".into()),
        ],
    );
    let pid = daemon.0.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(Client::connect(&socket).await.expect("connect"));
        }
        let mut redis = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mails = Arc::new(AtomicU64::new(0));
        let every = Duration::from_secs((secs / 20).max(1));
        println!(
            "soak: {secs} s of mixed traffic at {rate} ops/s over 8 connections: cache (50,000 keys, 60 s TTL, 100 tags) \
             and one mail.send in 20 to an SMTP sink (status retention 60 s)"
        );
        println!(
            "{:>6} {:>10} {:>8} {:>9} {:>6} {:>12} {:>8} {:>8} {:>9}",
            "t_s", "ops", "failed", "rss_kib", "fds", "redis_bytes", "keys", "mails", "delivered"
        );
        let started = Instant::now();
        let mut next_sample = Duration::ZERO;
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut set = tokio::task::JoinSet::new();
        while started.elapsed() < Duration::from_secs(secs) {
            tick.tick().await;
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let c = clients[(sent % 8) as usize].clone();
                let (done, failed, mails) = (done.clone(), failed.clone(), mails.clone());
                let n = sent;
                set.spawn(async move {
                    if one_op(&c, n, &mails).await {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                });
                sent += 1;
            }
            while set.try_join_next().is_some() {}
            if started.elapsed() >= next_sample {
                let info: String = redis::cmd("INFO").arg("memory").query_async(&mut redis).await.unwrap_or_default();
                let used = info
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                let keys: u64 = redis::cmd("DBSIZE").query_async(&mut redis).await.unwrap_or(0);
                println!(
                    "{:>6} {:>10} {:>8} {:>9} {:>6} {:>12} {:>8} {:>8} {:>9}",
                    started.elapsed().as_secs(),
                    done.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed),
                    rss_kib(pid),
                    open_fds(pid),
                    used,
                    keys,
                    mails.load(Ordering::Relaxed),
                    sink.count()
                );
                next_sample += every;
            }
        }
        while set.join_next().await.is_some() {}
        let accepted = mails.load(Ordering::Relaxed) as usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        while sink.count() < accepted && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("mail: {accepted} accepted, {} delivered to the sink (duplicates included)", sink.count());
    });
}
