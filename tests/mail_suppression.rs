//! Bounce classes and the suppression list (issue 15): a `550 5.1.1` makes the mail
//! dead with class `bad-mailbox` and puts the address on the list; later mail skips
//! it (no RCPT for it ever reaches the SMTP server) until it is removed. Real daemon,
//! redis-server and SMTP sink.

mod support;

use std::time::Duration;

use rmpv::Value;
use satchel::client::{Client, Mail};
use satchel::protocol::ErrorCode;
use support::*;

fn mail(to: &[&str], subject: &str) -> Mail {
    Mail {
        to: to.iter().map(|s| s.to_string()).collect(),
        subject: subject.to_owned(),
        text: Some("t".into()),
        ..Mail::default()
    }
}

fn daemon(redis: &RedisServer, sink: &SmtpSink, extra: &[(&str, &str)]) -> Daemon {
    let smtp = format!("smtp://127.0.0.1:{}?tls=none", sink.port);
    let mut env = vec![
        ("SATCHEL_MAIL_SMTP_URL", smtp.as_str()),
        ("SATCHEL_MAIL_FROM", "app@example.org"),
    ];
    env.extend_from_slice(extra);
    Daemon::start(&redis.url(), &env)
}

async fn status(c: &Client, id: &str) -> Value {
    c.mail_status(id).await.unwrap()
}

async fn wait_status(c: &Client, id: &str, want: &str) -> Value {
    let limit = Duration::from_secs(10);
    let started = std::time::Instant::now();
    loop {
        let s = status(c, id).await;
        if field(&s, "status").as_str() == Some(want) {
            return s;
        }
        assert!(started.elapsed() < limit, "{id} never became {want}: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rcpt_count(sink: &SmtpSink, address: &str) -> usize {
    sink.rcpts()
        .iter()
        .filter(|a| a.as_str() == address)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_bounce_is_classed_suppressed_and_skipped_until_removed() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let d = daemon(&redis, &sink, &[]);
    let c = d.client().await;
    let bad = "reject550+ann@example.com";

    // 550 5.1.1: dead, class bad-mailbox, in the status, the dead list and the events.
    let first = c.mail_send(&mail(&[bad], "one")).await.unwrap();
    let s = wait_status(&c, &first.mail_id, "dead").await;
    assert_eq!(field(&s, "class").as_str(), Some("bad-mailbox"), "{s}");
    let dead = c.mail_dead(Some(10)).await.unwrap();
    assert_eq!(field(&dead[0], "class").as_str(), Some("bad-mailbox"));
    let (events, _) = c.mail_events(Some("0"), None, None, None).await.unwrap();
    let dead_event = events
        .iter()
        .find(|e| field(e, "status").as_str() == Some("dead"))
        .unwrap();
    assert_eq!(field(dead_event, "class").as_str(), Some("bad-mailbox"));
    assert_eq!(rcpt_count(&sink, bad), 1);

    // On the list, with the reason and class.
    let (entries, cursor) = c.mail_suppression_list(None, None).await.unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(cursor.is_none());
    assert_eq!(field(&entries[0], "address").as_str(), Some(bad));
    assert_eq!(field(&entries[0], "class").as_str(), Some("bad-mailbox"));
    assert!(
        field(&entries[0], "reason")
            .as_str()
            .unwrap()
            .contains("5.1.1")
    );

    // The next mail to it (the domain in another case) is suppressed: never sent.
    let again = c
        .mail_send(&mail(&["reject550+ann@EXAMPLE.com"], "two"))
        .await
        .unwrap();
    assert_eq!(again.status, "suppressed");
    assert_eq!(again.suppressed, vec!["reject550+ann@EXAMPLE.com"]);
    let s = status(&c, &again.mail_id).await;
    assert_eq!(field(&s, "status").as_str(), Some("suppressed"));
    assert_eq!(field(&s, "attempts").as_u64(), Some(0));

    // With a good address too: sent to the good one only.
    let good = "bob@example.com";
    let both = c.mail_send(&mail(&[bad, good], "three")).await.unwrap();
    assert_eq!(both.status, "queued");
    assert_eq!(both.suppressed, vec![bad]);
    wait_status(&c, &both.mail_id, "sent").await;
    let last = sink.received().pop().unwrap();
    assert_eq!(last["rcpt_tos"], serde_json::json!([good]));
    assert_eq!(
        rcpt_count(&sink, bad),
        1,
        "no RCPT for a suppressed address"
    );

    // Removed: mailed again (and suppressed again by its new bounce).
    assert!(c.mail_suppression_remove(bad).await.unwrap());
    assert!(!c.mail_suppression_remove(bad).await.unwrap());
    let retried = c.mail_send(&mail(&[bad], "four")).await.unwrap();
    assert_eq!(retried.status, "queued");
    wait_status(&c, &retried.mail_id, "dead").await;
    assert_eq!(rcpt_count(&sink, bad), 2);
    let (entries, _) = c.mail_suppression_list(None, None).await.unwrap();
    assert_eq!(entries.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_recipient_of_a_sent_mail_is_suppressed_and_manual_entries_work() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let d = daemon(&redis, &sink, &[]);
    let c = d.client().await;
    // One of two recipients refused at RCPT: the mail is sent, that one suppressed.
    let q = c
        .mail_send(&mail(
            &["carl@example.com", "reject550+dan@example.com"],
            "partial",
        ))
        .await
        .unwrap();
    let s = wait_status(&c, &q.mail_id, "sent").await;
    assert!(s.to_string().contains("reject550+dan@example.com"), "{s}");
    let (entries, _) = c.mail_suppression_list(None, None).await.unwrap();
    assert_eq!(
        field(&entries[0], "address").as_str(),
        Some("reject550+dan@example.com")
    );

    // By hand, then pages.
    c.mail_suppression_add("Eve@Example.ORG", Some("asked to stop"))
        .await
        .unwrap();
    let q = c.mail_send(&mail(&["Eve@example.org"], "x")).await.unwrap();
    assert_eq!(q.status, "suppressed");
    for i in 0..30 {
        c.mail_suppression_add(&format!("u{i}@example.net"), None)
            .await
            .unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = c
            .mail_suppression_list(Some(5), cursor.as_deref())
            .await
            .unwrap();
        for e in page {
            seen.insert(field(&e, "address").as_str().unwrap().to_owned());
        }
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(seen.len(), 32, "{seen:?}");
    assert!(seen.contains("Eve@example.org"));
    let manual = c.mail_suppression_list(Some(1000), None).await.unwrap().0;
    let eve = manual
        .iter()
        .find(|e| field(e, "address").as_str() == Some("Eve@example.org"))
        .unwrap();
    assert_eq!(field(eve, "class").as_str(), Some("manual"));
    assert_eq!(field(eve, "reason").as_str(), Some("asked to stop"));

    // Hostile input.
    for (fields, bad) in [
        (
            vec![("address", Value::from("a@b.c\r\nRCPT TO:<x@y.z>"))],
            "address",
        ),
        (vec![("address", Value::from("not an address"))], "address"),
        (vec![("address", Value::from(""))], "address"),
        (
            vec![
                ("address", Value::from("ok@example.com")),
                ("reason", Value::from("two\nlines")),
            ],
            "reason",
        ),
    ] {
        let e = c
            .call("mail.suppression.add", fields.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{fields:?}: {e}");
        assert_eq!(e.field(), Some(bad), "{fields:?}: {e}");
    }
    let e = c
        .call("mail.suppression.list", vec![("cursor", Value::from("x"))])
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("cursor"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_suppression_off_a_bounced_address_is_tried_again() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let d = daemon(&redis, &sink, &[("SATCHEL_MAIL_SUPPRESSION", "false")]);
    let c = d.client().await;
    let bad = "reject550+fay@example.com";
    for subject in ["one", "two"] {
        let q = c.mail_send(&mail(&[bad], subject)).await.unwrap();
        assert_eq!(q.status, "queued");
        let s = wait_status(&c, &q.mail_id, "dead").await;
        assert_eq!(field(&s, "class").as_str(), Some("bad-mailbox"));
    }
    assert_eq!(rcpt_count(&sink, bad), 2);
    assert!(
        c.mail_suppression_list(None, None)
            .await
            .unwrap()
            .0
            .is_empty()
    );
}
