//! Fault suite, mail part (issue 6): daemons killed, Redis and SMTP killed or hung,
//! with thousands of mails in flight. Nothing accepted may be lost; duplicates are
//! counted (at most the delivery concurrency) and printed for RELIABILITY.md.

mod support;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use satchel::client::{Client, Mail};
use support::load::{cache_traffic, delivered, settle};
use support::*;

const CONCURRENCY: usize = 16;

fn env_for(smtp_port: u16) -> Vec<(&'static str, String)> {
    vec![
        (
            "SATCHEL_MAIL_SMTP_URL",
            format!("smtp://127.0.0.1:{smtp_port}"),
        ),
        ("SATCHEL_MAIL_FROM", "app@example.org".into()),
        ("SATCHEL_MAIL_RETRY_BASE_MS", "100".into()),
        ("SATCHEL_MAIL_RETRY_MAX_MS", "500".into()),
        ("SATCHEL_MAIL_CLAIM_IDLE_MS", "1000".into()),
        ("SATCHEL_MAIL_MAX_ATTEMPTS", "1000".into()),
        ("SATCHEL_MAIL_CONCURRENCY", CONCURRENCY.to_string()),
        ("SATCHEL_MAIL_SMTP_CONNECT_TIMEOUT_MS", "500".into()),
        ("SATCHEL_MAIL_SMTP_COMMAND_TIMEOUT_MS", "1000".into()),
    ]
}

fn daemon(redis: &RedisServer, env: &[(&'static str, String)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Daemon::start(&redis.url(), &env)
}

fn mail(to: &str, n: usize) -> Mail {
    Mail {
        to: vec![to.to_owned()],
        subject: format!("fault test {n}"),
        text: Some(format!("message {n}")),
        ..Mail::default()
    }
}

async fn send_many(c: &Client, to: &str, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let c = c.clone();
            let m = mail(to, i);
            tokio::spawn(async move { c.mail_send(&m).await.expect("mail.send").mail_id })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_1000_mails_are_delivered_loses_none() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = env_for(sink.port);
    let mut first = daemon(&redis, &env);
    let c = first.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = cache_traffic(first.client().await, stop.clone());
    let accepted = send_many(&c, "slow5@example.com", 1000).await;
    assert!(
        wait_until(Duration::from_secs(60), || sink.count() >= 200),
        "deliveries did not start"
    );
    first.kill();
    let at_kill = sink.count();
    stop.store(true, Ordering::Relaxed);
    let (cache_ok, cache_err) = traffic.await.unwrap();
    let started = Instant::now();
    let _second = daemon(&redis, &env);
    let (missing, dups) = settle(&sink, &accepted, Duration::from_secs(120));
    eprintln!(
        "kill -9 with 1000 mails: {at_kill} delivered before the kill, all delivered {:?} after restart, missing {missing}, duplicates {dups}; cache traffic {cache_ok} ok / {cache_err} failed (connection lost at the kill)",
        started.elapsed()
    );
    assert_eq!(missing, 0, "accepted mail lost");
    assert!(
        dups <= CONCURRENCY,
        "{dups} duplicates > concurrency {CONCURRENCY}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_daemons_killed_mid_queue_the_other_finishes_it() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = env_for(sink.port);
    let mut a = daemon(&redis, &env);
    let _b = daemon(&redis, &env);
    let accepted = send_many(&a.client().await, "slow5@example.com", 400).await;
    assert!(wait_until(Duration::from_secs(60), || sink.count() >= 100));
    a.kill();
    let started = Instant::now();
    let (missing, dups) = settle(&sink, &accepted, Duration::from_secs(120));
    eprintln!(
        "two daemons, one killed after 100 of 400: the other finished in {:?}, missing {missing}, duplicates {dups}",
        started.elapsed()
    );
    assert_eq!(missing, 0);
    assert!(dups <= CONCURRENCY, "{dups} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_during_mixed_load_loses_no_accepted_mail() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let sink = SmtpSink::start();
    let d = daemon(&redis, &env_for(sink.port));
    let c = d.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = cache_traffic(d.client().await, stop.clone());
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let errors: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let sender = {
        let (c, stop, accepted, errors) =
            (c.clone(), stop.clone(), accepted.clone(), errors.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    c.mail_send(&mail("a@example.com", n)),
                )
                .await
                {
                    Ok(Ok(q)) => accepted.lock().unwrap().push(q.mail_id),
                    Ok(Err(e)) => {
                        let code = e
                            .code()
                            .map(|c| c.as_str().to_owned())
                            .unwrap_or_else(|| e.to_string());
                        *errors.lock().unwrap().entry(code).or_default() += 1;
                    }
                    Err(_) => panic!("mail.send hung while Redis restarted"),
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    let (cache_ok, cache_err) = traffic.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();
    let (missing, dups) = settle(&sink, &accepted, Duration::from_secs(60));
    let errors = errors.lock().unwrap().clone();
    eprintln!(
        "redis restart under mail+cache load: {} mails accepted, errors {errors:?}, missing {missing}, duplicates {dups}; cache {cache_ok} ok / {cache_err} failed",
        accepted.len()
    );
    assert_eq!(missing, 0, "accepted mail lost");
    for code in errors.keys() {
        assert!(
            code == "UNAVAILABLE" || code == "TIMEOUT",
            "unexpected {code}"
        );
    }
    assert!(!errors.is_empty(), "the outage was not observed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_killed_for_30_seconds_then_back_delivers_everything() {
    let redis = RedisServer::start();
    let mut sink = SmtpSink::start();
    let port = sink.port;
    let d = daemon(&redis, &env_for(port));
    let c = d.client().await;
    let accepted = send_many(&c, "slow5@example.com", 300).await;
    assert!(wait_until(Duration::from_secs(60), || sink.count() >= 50));
    sink.stop();
    // Read the old sink's record only now that it is dead: whatever it accepted up to
    // the kill counts as delivered before.
    let before = delivered(&sink);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let stats = c.stats().await.unwrap();
    let sending_while_down = field(field(&stats, "mail"), "local_sending")
        .as_u64()
        .unwrap_or(0);
    let mut sink = SmtpSink::start_on(port);
    let started = Instant::now();
    // The new sink only sees what was not delivered before; merge both records.
    let want: Vec<String> = accepted
        .iter()
        .filter(|id| !before.contains_key(*id))
        .cloned()
        .collect();
    let (missing, dups) = settle(&sink, &want, Duration::from_secs(120));
    let stats = c.stats().await.unwrap();
    let sending_after = field(field(&stats, "mail"), "local_sending")
        .as_u64()
        .unwrap_or(99);
    eprintln!(
        "SMTP down 30 s: {} delivered before, {} after it came back (in {:?}), missing {missing}, duplicates {dups}; deliveries in flight while down {sending_while_down}, after {sending_after}",
        before.len(),
        want.len(),
        started.elapsed()
    );
    assert_eq!(missing, 0);
    assert!(dups <= CONCURRENCY);
    for id in &accepted {
        let st = c.mail_status(id).await.unwrap();
        assert_eq!(field(&st, "status").as_str(), Some("sent"), "{id}: {st}");
    }
    assert!(wait_until(Duration::from_secs(5), || sending_after == 0
        || sink.count() >= want.len()));
    sink.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_server_that_never_answers_holds_no_slot_forever() {
    let redis = RedisServer::start();
    // Accepts connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = Arc::new(AtomicBool::new(true));
    let accepted_conns = Arc::new(AtomicU64::new(0));
    let mute = {
        let (hold, n) = (hold.clone(), accepted_conns.clone());
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while hold.load(Ordering::Relaxed) {
                if let Ok((s, _)) = listener.accept() {
                    n.fetch_add(1, Ordering::Relaxed);
                    held.push(s);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let d = daemon(&redis, &env_for(port));
    let c = d.client().await;
    let accepted = send_many(&c, "a@example.com", 40).await;
    // Attempts time out and are retried; none is sent, none is stuck in `sending`.
    assert!(
        eventually(Duration::from_secs(10), || {
            let c = c.clone();
            let id = accepted[0].clone();
            async move {
                let s = c.mail_status(&id).await.unwrap();
                field(&s, "attempts").as_u64().unwrap_or(0) >= 2
            }
        })
        .await,
        "no retry after a hung SMTP conversation"
    );
    hold.store(false, Ordering::Relaxed);
    mute.join().unwrap();
    let hung = accepted_conns.load(Ordering::Relaxed);
    let sink = SmtpSink::start_on(port);
    let (missing, dups) = settle(&sink, &accepted, Duration::from_secs(60));
    let stats = c.stats().await.unwrap();
    let sending = field(field(&stats, "mail"), "local_sending").as_u64();
    eprintln!(
        "mute SMTP server: {hung} connections hung and were given up, then all 40 delivered; missing {missing}, duplicates {dups}, sending now {sending:?}"
    );
    assert_eq!(missing, 0);
    assert_eq!(dups, 0);
    assert_eq!(sending, Some(0), "a delivery slot is stuck");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_mail_in_flight_finishes_or_leaves_it_for_reclaim() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = env_for(sink.port);
    let mut first = daemon(&redis, &env);
    let c = first.client().await;
    let accepted = send_many(&c, "slow200@example.com", 100).await;
    assert!(wait_until(Duration::from_secs(30), || sink.count() >= 10));
    first.signal(Signal::SIGTERM);
    let status = first
        .wait_exit(Duration::from_secs(15))
        .expect("exit within the shutdown timeout");
    assert!(status.success(), "{status:?}");
    let at_stop = sink.count();
    let _second = daemon(&redis, &env);
    let (missing, dups) = settle(&sink, &accepted, Duration::from_secs(60));
    eprintln!(
        "SIGTERM with 100 slow mails: exit 0 with {at_stop} delivered; after restart missing {missing}, duplicates {dups}"
    );
    assert_eq!(missing, 0);
    assert_eq!(
        dups, 0,
        "a graceful stop finishes what it started: no duplicates"
    );
}
