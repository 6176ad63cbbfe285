//! `mail.events` (issue 15): every status transition is an event written by the
//! transition's own script; a cursor resumes without gaps or repeats, across daemon
//! restarts and kill -9. Real daemons, redis-server and SMTP sink.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rmpv::Value;
use satchel::client::{Client, Mail};
use satchel::protocol::ErrorCode;
use support::*;

fn mail(to: &str, subject: &str) -> Mail {
    Mail {
        to: vec![to.to_owned()],
        subject: subject.to_owned(),
        text: Some("t".into()),
        ..Mail::default()
    }
}

fn s<'a>(e: &'a Value, k: &str) -> &'a str {
    field(e, k).as_str().unwrap_or("")
}

fn smtp_env(sink: &SmtpSink) -> Vec<(&'static str, String)> {
    vec![
        (
            "SATCHEL_MAIL_SMTP_URL",
            format!("smtp://127.0.0.1:{}?tls=none", sink.port),
        ),
        ("SATCHEL_MAIL_FROM", "app@example.org".into()),
        ("SATCHEL_MAIL_RETRY_BASE_MS", "100".into()),
        ("SATCHEL_MAIL_RETRY_MAX_MS", "200".into()),
        ("SATCHEL_MAIL_CLAIM_IDLE_MS", "1000".into()),
    ]
}

fn start(redis: &RedisServer, env: &[(&'static str, String)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Daemon::start(&redis.url(), &env)
}

/// Polls from `cursor` until `done` holds for everything read so far (at most 20 s);
/// returns the events and the last cursor.
async fn follow_until(
    c: &Client,
    mut cursor: String,
    done: impl Fn(&[Value]) -> bool,
) -> (Vec<Value>, String) {
    let started = Instant::now();
    let mut all = Vec::new();
    while !done(&all) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "events never completed: {all:?}"
        );
        let (events, next) = c
            .mail_events(Some(&cursor), None, Some(1000), None)
            .await
            .unwrap();
        all.extend(events);
        cursor = next;
    }
    (all, cursor)
}

fn statuses_of(events: &[Value], mail_id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| s(e, "mail_id") == mail_id)
        .map(|e| s(e, "status").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_is_one_event_and_a_cursor_resumes_without_gaps_or_repeats() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = smtp_env(&sink);
    let mut d = start(&redis, &env);
    let c = d.client().await;
    // No since: only what happens from now on.
    let (none, start_cursor) = c.mail_events(None, None, None, None).await.unwrap();
    assert!(none.is_empty());

    let ok = c.mail_send(&mail("ann@example.com", "ok")).await.unwrap();
    let bounced = c
        .mail_send(&mail("reject550@example.com", "bounce"))
        .await
        .unwrap();
    let later = c
        .mail_send(&Mail {
            send_at_ms: Some(satchel::host::now_ms() + 600_000),
            ..mail("cat@example.com", "later")
        })
        .await
        .unwrap();
    assert!(c.mail_cancel(&later.mail_id).await.unwrap());
    let ids = [ok.mail_id.clone(), bounced.mail_id.clone()];
    let (events, cursor) = follow_until(&c, start_cursor.clone(), |evs| {
        statuses_of(evs, &ids[0]).contains(&"sent".to_owned())
            && statuses_of(evs, &ids[1]).contains(&"dead".to_owned())
    })
    .await;
    assert_eq!(
        statuses_of(&events, &ok.mail_id),
        ["queued", "sending", "sent"]
    );
    assert_eq!(
        statuses_of(&events, &bounced.mail_id),
        ["queued", "sending", "dead"]
    );
    assert_eq!(
        statuses_of(&events, &later.mail_id),
        ["scheduled", "cancelled"]
    );
    let dead = events
        .iter()
        .find(|e| s(e, "mail_id") == bounced.mail_id && s(e, "status") == "dead")
        .unwrap();
    assert!(s(dead, "error").contains("550"), "{dead}");
    assert_eq!(field(dead, "attempts").as_u64(), Some(1));
    let sent = events.iter().find(|e| s(e, "status") == "sent").unwrap();
    assert!(field(sent, "at_ms").as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(
        field(sent, "to").as_array().map(|t| t.len()),
        Some(1),
        "{sent}"
    );
    // Ordered by event_id, each once.
    let event_ids: Vec<&str> = events.iter().map(|e| s(e, "event_id")).collect();
    let mut sorted = event_ids.clone();
    // `<ms>-<seq>`, or `<ms>-<seq>.<i>` for the mails of one enqueue batch.
    sorted.sort_by_key(|id| {
        let (entry, sub) = id.split_once('.').unwrap_or((id, "0"));
        let (ms, seq) = entry.split_once('-').unwrap();
        (
            ms.parse::<u64>().unwrap(),
            seq.parse::<u64>().unwrap(),
            sub.parse::<u64>().unwrap(),
        )
    });
    sorted.dedup();
    assert_eq!(event_ids, sorted);

    // Resuming from the middle gives exactly the rest; mail_id filters.
    let mid = s(&events[3], "event_id").to_owned();
    let (rest, _) = c
        .mail_events(Some(&mid), Some(1000), None, None)
        .await
        .unwrap();
    assert_eq!(rest, events[4..].to_vec());
    let (only, _) = c
        .mail_events(Some(&start_cursor), Some(1000), None, Some(&ok.mail_id))
        .await
        .unwrap();
    assert_eq!(only.len(), 3);
    let (two, c2) = c
        .mail_events(Some(&start_cursor), Some(2), None, None)
        .await
        .unwrap();
    assert_eq!(two, events[..2].to_vec());
    assert_eq!(c2, s(&events[1], "event_id"));

    // Across a restart of the daemon: the cursor still resumes.
    d.signal(Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    let d2 = start(&redis, &env);
    let c = d2.client().await;
    let (nothing, same) = c
        .mail_events(Some(&cursor), None, None, None)
        .await
        .unwrap();
    assert!(nothing.is_empty(), "{nothing:?}");
    assert_eq!(same, cursor);
    let after = c
        .mail_send(&mail("dan@example.com", "after"))
        .await
        .unwrap();
    let (next, _) = c
        .mail_events(Some(&cursor), None, Some(1000), None)
        .await
        .unwrap();
    assert_eq!(s(&next[0], "mail_id"), after.mail_id);
    assert_eq!(s(&next[0], "status"), "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_returns_when_an_event_arrives_and_blocks_nobody() {
    let redis = RedisServer::start();
    let d = Daemon::start(&redis.url(), &[("SATCHEL_MAIL_ENABLED", "false")]);
    let c = d.client().await;
    let (_, cursor) = c.mail_events(None, None, None, None).await.unwrap();
    // Many long polls at once, on one connection: none holds up other requests.
    let polls: Vec<_> = (0..20)
        .map(|_| {
            let (c, cursor) = (c.clone(), cursor.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let r = c.mail_events(Some(&cursor), None, Some(10_000), None).await;
                (r, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    c.cache_set("k", Value::from(1), None, &[]).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "a cache request waited behind long polls: {:?}",
        t.elapsed()
    );
    let q = c.mail_send(&mail("ann@example.com", "wake")).await.unwrap();
    for p in polls {
        let (r, took) = p.await.unwrap();
        let (events, _) = r.unwrap();
        assert_eq!(s(&events[0], "mail_id"), q.mail_id);
        assert!(
            took < Duration::from_secs(5),
            "the poll was not woken: {took:?}"
        );
    }
    // With nothing new, wait_ms bounds the wait and the answer is empty.
    let (_, cursor) = c.mail_events(None, None, None, None).await.unwrap();
    let started = Instant::now();
    let (none, same) = c
        .mail_events(Some(&cursor), None, Some(400), None)
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(none.is_empty());
    assert_eq!(same, cursor);
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_expired_cursors_and_limits_are_bad_requests() {
    let redis = RedisServer::start();
    let d = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_MAIL_ENABLED", "false"),
            ("SATCHEL_MAIL_EVENTS_MAX", "10"),
        ],
    );
    let c = d.client().await;
    for (fields, bad) in [
        (vec![("since", Value::from("garbage"))], "since"),
        (vec![("since", Value::from("1-2-3"))], "since"),
        (vec![("since", Value::from(12))], "since"),
        (vec![("limit", Value::from(1001))], "limit"),
        (vec![("wait_ms", Value::from(30_001))], "wait_ms"),
        (vec![("wait_ms", Value::from(-1))], "wait_ms"),
    ] {
        let e = c.call("mail.events", fields.clone()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{fields:?}: {e}");
        assert_eq!(e.field(), Some(bad), "{fields:?}: {e}");
    }
    let first = c.mail_send(&mail("a@example.com", "0")).await.unwrap();
    let (evs, _) = c.mail_events(Some("0"), None, None, None).await.unwrap();
    let first_id = s(&evs[0], "event_id").to_owned();
    assert_eq!(s(&evs[0], "mail_id"), first.mail_id);
    // Far past events_max (trimming works on whole stream nodes of 100 entries; one
    // send at a time makes one entry each).
    for i in 0..400 {
        c.mail_send(&mail("a@example.com", &i.to_string()))
            .await
            .unwrap();
    }
    let e = c
        .mail_events(Some(&first_id), None, None, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    assert!(e.to_string().contains("older than the oldest"), "{e}");
    // "0" is never expired: it starts at the oldest kept.
    let (kept, _) = c
        .mail_events(Some("0"), Some(1000), None, None)
        .await
        .unwrap();
    assert!(!kept.is_empty() && kept.len() < 400, "{}", kept.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_delivery_still_gives_exactly_one_final_event_per_mail() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = smtp_env(&sink);
    let mut a = start(&redis, &env);
    let c = a.client().await;
    let (_, cursor) = c.mail_events(None, None, None, None).await.unwrap();
    // Slow deliveries, so some are in flight when the daemon dies.
    let mut ids = Vec::new();
    for i in 0..40 {
        let to = format!("slow300+{i}@example.com");
        ids.push(c.mail_send(&mail(&to, "slow")).await.unwrap().mail_id);
    }
    assert!(
        wait_until(Duration::from_secs(10), || sink.count() >= 3),
        "no delivery started"
    );
    a.kill();
    let b = start(&redis, &env);
    let c = b.client().await;
    let (events, _) = follow_until(&c, cursor, |evs| {
        ids.iter().all(|id| {
            evs.iter()
                .any(|e| s(e, "mail_id") == id && s(e, "status") == "sent")
        })
    })
    .await;
    let mut finals: HashMap<&str, usize> = HashMap::new();
    for e in &events {
        if matches!(s(e, "status"), "sent" | "dead" | "cancelled" | "suppressed") {
            *finals.entry(s(e, "mail_id")).or_default() += 1;
        }
    }
    let sending = events
        .iter()
        .filter(|e| s(e, "status") == "sending")
        .count();
    eprintln!(
        "kill -9 mid-delivery: {} events for {} mails, {sending} 'sending' events (repeats are the interrupted attempts)",
        events.len(),
        ids.len()
    );
    for id in &ids {
        assert_eq!(finals.get(id.as_str()), Some(&1), "{id}: {finals:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_cut_through_an_enqueue_batch_lose_and_repeat_nothing() {
    let redis = RedisServer::start();
    let d = Daemon::start(&redis.url(), &[("SATCHEL_MAIL_ENABLED", "false")]);
    let c = d.client().await;
    let (_, start) = c.mail_events(None, None, None, None).await.unwrap();
    // Concurrent sends share enqueue script runs: one event entry per batch.
    let sends: Vec<_> = (0..200)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.mail_send(&mail("a@example.com", &i.to_string())).await })
        })
        .collect();
    let mut ids = Vec::new();
    for s in sends {
        ids.push(s.await.unwrap().unwrap().mail_id);
    }
    let mut cursor = start;
    let mut seen = Vec::new();
    loop {
        let (page, next) = c
            .mail_events(Some(&cursor), Some(7), None, None)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        seen.extend(page);
        cursor = next;
    }
    let batched = seen
        .iter()
        .filter(|e| s(e, "event_id").contains('.'))
        .count();
    let mut mails: Vec<&str> = seen.iter().map(|e| s(e, "mail_id")).collect();
    mails.sort_unstable();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(mails, want, "every mail's queued event once");
    assert!(batched > 0, "no batch was formed: nothing tested");
    eprintln!("{} events, {batched} from batch entries", seen.len());
}
