//! The mail queue end to end: real redis-server, real SMTP server (aiosmtpd,
//! tests/smtp_sink.py), real daemon processes.

mod support;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use rmpv::Value;
use satchel::{Client, ClientError};
use support::*;

type Fields = Vec<(&'static str, Value)>;

const WAIT: Duration = Duration::from_secs(20);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Settings that make retries and reclaim fast enough for tests.
fn fast(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("SATCHEL_MAIL_SMTP_URL", format!("smtp://127.0.0.1:{port}")),
        ("SATCHEL_MAIL_FROM", "App <app@example.org>".into()),
        ("SATCHEL_MAIL_RETRY_BASE_MS", "100".into()),
        ("SATCHEL_MAIL_RETRY_MAX_MS", "300".into()),
        ("SATCHEL_MAIL_CLAIM_IDLE_MS", "1000".into()),
    ]
}

fn start(redis: &RedisServer, env: &[(&'static str, String)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Daemon::start(&redis.url(), &env)
}

fn with(
    mut env: Vec<(&'static str, String)>,
    k: &'static str,
    v: &str,
) -> Vec<(&'static str, String)> {
    env.retain(|(key, _)| *key != k);
    env.push((k, v.to_owned()));
    env
}

fn strs(list: &[&str]) -> Value {
    Value::Array(list.iter().map(|s| Value::from(*s)).collect())
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    field(v, key)
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` not a str in {v}"))
}

fn basic(to: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("to", strs(&[to])),
        ("subject", Value::from("Hello")),
        ("text", Value::from("Hi there")),
    ]
}

async fn send(c: &Client, fields: Vec<(&str, Value)>) -> Value {
    c.call("mail.send", fields).await.expect("mail.send")
}

async fn status(c: &Client, id: &str) -> Value {
    c.call("mail.status", vec![("mail_id", Value::from(id))])
        .await
        .expect("mail.status")
}

/// Polls `mail.status` until it is `want`; panics with the last status otherwise.
async fn wait_status(c: &Client, id: &str, want: &str) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let last = status(c, id).await;
        if s(&last, "status") == want {
            return last;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mail {id} never became {want}; last status {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn server_err(r: Result<Value, ClientError>) -> (String, String) {
    match r {
        Err(ClientError::Server { code, message, .. }) => (code, message),
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// One request over a raw socket, to see the whole error body (with `field`).
fn raw_call(daemon: &Daemon, op: &str, fields: Vec<(&str, Value)>) -> (bool, Value) {
    use std::io::Write;
    let mut map = vec![
        (Value::from("id"), Value::from(1)),
        (Value::from("op"), Value::from(op)),
    ];
    map.extend(fields.into_iter().map(|(k, v)| (Value::from(k), v)));
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &Value::Map(map)).unwrap();
    let mut sock = daemon.raw();
    sock.write_all(&frame(&body)).unwrap();
    let (_, ok, v) = decode(&read_frame(&mut sock).expect("a response"));
    (ok, v)
}

/// Messages the sink got whose data carries this Message-ID.
fn with_message_id<'a>(got: &'a [serde_json::Value], mail_id: &str) -> Vec<&'a serde_json::Value> {
    got.iter()
        .filter(|m| {
            m["data"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("<{mail_id}@"))
        })
        .collect()
}

#[tokio::test]
async fn sent_mail_arrives_with_from_to_subject_and_message_id() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let r = send(
        &c,
        vec![
            ("to", strs(&["Ann Example <ann@example.com>"])),
            ("cc", strs(&["cc@example.com"])),
            ("bcc", strs(&["hidden@example.com"])),
            ("reply_to", Value::from("replies@example.org")),
            ("subject", Value::from("Your receipt")),
            ("text", Value::from("Thanks for your order.")),
            (
                "headers",
                Value::Map(vec![(Value::from("X-Order"), Value::from("42"))]),
            ),
        ],
    )
    .await;
    assert_eq!(s(&r, "status"), "queued");
    assert_eq!(field(&r, "duplicate").as_bool(), Some(false));
    let id = s(&r, "mail_id").to_owned();
    let st = wait_status(&c, &id, "sent").await;
    assert_eq!(field(&st, "attempts").as_u64(), Some(1));
    let got = sink.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    assert_eq!(m["mail_from"], "app@example.org");
    let mut rcpts: Vec<&str> = m["rcpt_tos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["ann@example.com", "cc@example.com", "hidden@example.com"]
    );
    let data = m["data"].as_str().unwrap();
    assert!(data.contains("From: App <app@example.org>\r\n"), "{data}");
    assert!(
        data.contains("To: \"Ann Example\" <ann@example.com>\r\n")
            || data.contains("To: Ann Example <ann@example.com>\r\n"),
        "{data}"
    );
    assert!(data.contains("Cc: cc@example.com\r\n"), "{data}");
    assert!(data.contains("Subject: Your receipt\r\n"), "{data}");
    assert!(data.contains("Reply-To: replies@example.org\r\n"), "{data}");
    assert!(
        data.contains(&format!("Message-ID: <{id}@example.org>\r\n")),
        "{data}"
    );
    assert!(data.contains("X-Order: 42\r\n"), "{data}");
    assert!(
        !data.to_ascii_lowercase().contains("hidden@"),
        "Bcc leaked: {data}"
    );

    let stats = c.stats().await.unwrap();
    let mail = field(&stats, "mail");
    assert_eq!(field(mail, "sent").as_u64(), Some(1), "{mail}");
    assert_eq!(field(mail, "local_sent").as_u64(), Some(1), "{mail}");
    assert_eq!(field(mail, "queued").as_u64(), Some(0), "{mail}");
    let hello = c.hello().await.unwrap();
    let ops: Vec<&str> = field(&hello, "ops")
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for op in [
        "mail.send",
        "mail.status",
        "mail.cancel",
        "mail.retry",
        "mail.dead",
    ] {
        assert!(ops.contains(&op), "{ops:?}");
    }
}

#[tokio::test]
async fn text_and_html_become_an_alternative_and_attachments_are_attached() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let mut fields = basic("ann@example.com");
    fields.push(("html", Value::from("<p>Hi <b>there</b></p>")));
    fields.push((
        "attachments",
        Value::Array(vec![
            Value::Map(vec![
                (Value::from("filename"), Value::from("report.csv")),
                (Value::from("content_type"), Value::from("text/csv")),
                (Value::from("data"), Value::Binary(b"a,b\n1,2\n".to_vec())),
            ]),
            Value::Map(vec![
                (Value::from("filename"), Value::from("blob.bin")),
                (
                    Value::from("content_type"),
                    Value::from("application/octet-stream"),
                ),
                (Value::from("data"), Value::Binary(vec![0, 1, 2, 255, 254])),
            ]),
        ]),
    ));
    let id = s(&send(&c, fields).await, "mail_id").to_owned();
    wait_status(&c, &id, "sent").await;
    let got = sink.received();
    let data = got[0]["data"].as_str().unwrap();
    assert!(data.contains("multipart/mixed"), "{data}");
    assert!(data.contains("multipart/alternative"), "{data}");
    assert!(data.contains("Content-Type: text/plain"), "{data}");
    assert!(data.contains("Content-Type: text/html"), "{data}");
    assert!(data.contains("Hi there"), "{data}");
    assert!(data.contains("<b>there</b>"), "{data}");
    assert!(data.contains("filename=\"report.csv\""), "{data}");
    assert!(data.contains("Content-Type: text/csv"), "{data}");
    // Attachments are always base64: "a,b\n1,2\n"
    assert!(data.contains("YSxiCjEsMgo="), "{data}");
    assert!(data.contains("filename=\"blob.bin\""), "{data}");
    // [0, 1, 2, 255, 254] in base64
    assert!(data.contains("AAEC//4="), "{data}");
    // The text part comes first in the alternative: clients show the last they can.
    assert!(data.find("text/plain").unwrap() < data.find("text/html").unwrap());
}

#[tokio::test]
async fn every_validation_failure_is_invalid_mail_naming_the_field_and_queues_nothing() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(
        &redis,
        &with(fast(sink.port), "SATCHEL_MAIL_MAX_MESSAGE_BYTES", "4096"),
    );
    let without = |key: &str| -> Vec<(&'static str, Value)> {
        basic("ann@example.com")
            .into_iter()
            .filter(|(k, _)| *k != key)
            .collect()
    };
    let plus = |k: &'static str, v: Value| {
        let mut f = basic("ann@example.com");
        f.retain(|(key, _)| *key != k);
        f.push((k, v));
        f
    };
    let header = |name: &str, value: &str| {
        plus(
            "headers",
            Value::Map(vec![(Value::from(name), Value::from(value))]),
        )
    };
    let cases: Vec<(&str, Fields, &str)> = vec![
        ("unparsable to", plus("to", strs(&["not an address"])), "to"),
        ("no recipient", plus("to", strs(&[])), "to"),
        ("bad cc", plus("cc", strs(&["a@@b"])), "cc"),
        ("bad bcc", plus("bcc", strs(&["<>"])), "bcc"),
        ("bad from", plus("from", Value::from("nobody")), "from"),
        (
            "bad reply_to",
            plus("reply_to", Value::from("x@")),
            "reply_to",
        ),
        ("no subject", without("subject"), "subject"),
        ("no body", without("text"), "text"),
        (
            "CRLF in subject",
            plus("subject", Value::from("Hi\r\nBcc: evil@attacker.example")),
            "subject",
        ),
        (
            "LF in to",
            plus("to", strs(&["ann@example.com\nBcc: evil@attacker.example"])),
            "to",
        ),
        (
            "CRLF in header value",
            header("X-Tag", "1\r\nBcc: evil@attacker.example"),
            "headers",
        ),
        ("bad header name", header("X Tag", "1"), "headers"),
        ("colon in header name", header("X-Tag:", "1"), "headers"),
        (
            "header overrides From",
            header("From", "evil@attacker.example"),
            "headers",
        ),
        (
            "header overrides Bcc",
            header("bcc", "evil@attacker.example"),
            "headers",
        ),
        (
            "header overrides Message-ID",
            header("Message-ID", "<x@y>"),
            "headers",
        ),
        (
            "too big",
            plus("text", Value::from("x".repeat(8000))),
            "size",
        ),
        (
            "empty idempotency key",
            plus("idempotency_key", Value::from("")),
            "idempotency_key",
        ),
        (
            "negative send_at",
            plus("send_at_ms", Value::from(-5)),
            "send_at_ms",
        ),
    ];
    for (what, fields, want_field) in cases {
        let (ok, err) = raw_call(&daemon, "mail.send", fields);
        assert!(!ok, "{what} was accepted");
        assert_eq!(code(&err), "INVALID_MAIL", "{what}: {err}");
        assert_eq!(s(&err, "field"), want_field, "{what}: {err}");
    }

    // Wrong MessagePack types are BAD_REQUEST, as for every op.
    for (what, fields) in [
        ("number as subject", plus("subject", Value::from(5))),
        ("str as to", plus("to", Value::from("ann@example.com"))),
        ("headers as list", plus("headers", strs(&["X: y"]))),
        (
            "attachment without data",
            plus(
                "attachments",
                Value::Array(vec![Value::Map(vec![(
                    Value::from("filename"),
                    Value::from("a"),
                )])]),
            ),
        ),
    ] {
        let (ok, err) = raw_call(&daemon, "mail.send", fields);
        assert!(!ok, "{what} was accepted");
        assert_eq!(code(&err), "BAD_REQUEST", "{what}: {err}");
    }
    let mut r = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("satchel:m:s:*")
        .query(&mut r)
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    let len: u64 = redis::cmd("XLEN")
        .arg("satchel:m:stream")
        .query(&mut r)
        .unwrap();
    assert_eq!(len, 0);
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn header_injection_attempts_never_reach_the_wire() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let evil = "evil@attacker.example";
    let attempts: Vec<Vec<(&str, Value)>> = vec![
        vec![("subject", Value::from(format!("Hi\r\nBcc: {evil}")))],
        vec![("subject", Value::from(format!("Hi\nBcc: {evil}")))],
        vec![("subject", Value::from(format!("Hi\rBcc: {evil}")))],
        vec![("to", strs(&[&format!("ann@example.com\r\nBcc: {evil}")]))],
        vec![(
            "from",
            Value::from(format!("app@example.org\r\nBcc: {evil}")),
        )],
        vec![(
            "reply_to",
            Value::from(format!("a@example.org\nBcc: {evil}")),
        )],
        vec![(
            "headers",
            Value::Map(vec![(
                Value::from("X-A"),
                Value::from(format!("1\r\nBcc: {evil}")),
            )]),
        )],
        vec![(
            "headers",
            Value::Map(vec![(Value::from("X-A: 1\r\nBcc"), Value::from(evil))]),
        )],
        vec![(
            "attachments",
            Value::Array(vec![Value::Map(vec![
                (
                    Value::from("filename"),
                    Value::from(format!("a.txt\r\nBcc: {evil}")),
                ),
                (Value::from("data"), Value::Binary(b"x".to_vec())),
            ])]),
        )],
    ];
    for extra in attempts {
        let mut fields = basic("ann@example.com");
        for (k, v) in extra {
            fields.retain(|(key, _)| *key != k);
            fields.push((k, v));
        }
        let (code, msg) = server_err(c.call("mail.send", fields).await);
        assert_eq!(code, "INVALID_MAIL", "{msg}");
    }
    // A display name with quotes and a non-ASCII subject are fine and get encoded.
    let mut fields = basic("\"Ann, \\\"the\\\" Boss\" <ann@example.com>");
    fields.retain(|(k, _)| *k != "subject");
    fields.push(("subject", Value::from("Grüße: Bcc: nobody")));
    let id = s(&send(&c, fields).await, "mail_id").to_owned();
    wait_status(&c, &id, "sent").await;
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert!(
        got[0]["rcpt_tos"] == serde_json::json!(["ann@example.com"]),
        "{:?}",
        got[0]
    );
    let data = got[0]["data"].as_str().unwrap();
    assert!(!data.contains(evil), "{data}");
    assert!(!data.to_ascii_lowercase().contains("\r\nbcc:"), "{data}");
}

#[tokio::test]
async fn same_idempotency_key_returns_the_first_mail_and_queues_nothing() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let mut calls = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        calls.push(tokio::spawn(async move {
            let mut f = basic("ann@example.com");
            f.push(("idempotency_key", Value::from("order-42-receipt")));
            send(&c, f).await
        }));
    }
    let mut ids = Vec::new();
    let mut firsts = 0;
    for call in calls {
        let r = call.await.unwrap();
        if field(&r, "duplicate").as_bool() == Some(false) {
            firsts += 1;
        }
        ids.push(s(&r, "mail_id").to_owned());
    }
    assert_eq!(firsts, 1, "exactly one send is not a duplicate");
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    wait_status(&c, &ids[0], "sent").await;
    let mut f = basic("ann@example.com");
    f.push(("idempotency_key", Value::from("order-42-receipt")));
    let again = send(&c, f).await;
    assert_eq!(s(&again, "mail_id"), ids[0]);
    assert_eq!(s(&again, "status"), "sent");
    assert_eq!(field(&again, "duplicate").as_bool(), Some(true));
    // A different key is a different mail.
    let mut f = basic("ann@example.com");
    f.push(("idempotency_key", Value::from("order-43-receipt")));
    let other = send(&c, f).await;
    assert_ne!(s(&other, "mail_id"), ids[0]);
    wait_status(&c, s(&other, "mail_id"), "sent").await;
    assert_eq!(sink.count(), 2);
}

/// Concurrent sends share enqueue script runs (group commit): plain, scheduled and
/// idempotent mails mixed in one batch each get their own, correct answer.
#[tokio::test]
async fn concurrent_sends_of_every_kind_are_each_enqueued_once() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let at = now_ms() + 1500;
    let mut calls = Vec::new();
    for i in 0..150usize {
        let c = c.clone();
        calls.push(tokio::spawn(async move {
            let mut f = basic(&format!("r{i}@example.com"));
            match i % 3 {
                0 => {}
                1 => f.push(("idempotency_key", Value::from(format!("k{}", i % 10)))),
                _ => f.push(("send_at_ms", Value::from(at))),
            }
            (i, send(&c, f).await)
        }));
    }
    let mut by_key: std::collections::HashMap<usize, Vec<(String, bool)>> = Default::default();
    let mut ids = std::collections::HashSet::new();
    for call in calls {
        let (i, r) = call.await.unwrap();
        let id = s(&r, "mail_id").to_owned();
        let dup = field(&r, "duplicate").as_bool().unwrap();
        match i % 3 {
            0 => assert_eq!((s(&r, "status"), dup), ("queued", false), "{r}"),
            1 => by_key.entry(i % 10).or_default().push((id.clone(), dup)),
            _ => assert_eq!((s(&r, "status"), dup), ("scheduled", false), "{r}"),
        }
        ids.insert(id);
    }
    // Keys k1, k3, .. k9 (i % 3 == 1 hits every residue mod 10): one first send each.
    assert_eq!(by_key.len(), 10);
    for (key, sends) in &by_key {
        assert_eq!(
            sends.iter().filter(|(_, dup)| !dup).count(),
            1,
            "key k{key}: {sends:?}"
        );
        assert!(
            sends.iter().all(|(id, _)| *id == sends[0].0),
            "key k{key}: {sends:?}"
        );
    }
    assert_eq!(ids.len(), 50 + 10 + 50);
    for id in &ids {
        wait_status(&c, id, "sent").await;
    }
    assert_eq!(sink.count(), ids.len(), "each mail delivered once");
}

/// The retention clock runs from a mail's last change, but never while it is queued:
/// a mail that waits longer than `status_retention_ms` for a worker is still
/// delivered.
#[tokio::test]
async fn a_queued_mail_outlives_the_retention_time_and_is_delivered() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = with(fast(sink.port), "SATCHEL_MAIL_STATUS_RETENTION_MS", "300");
    let env = with(env, "SATCHEL_MAIL_IDEMPOTENCY_TTL_MS", "300");
    // A producer only: nothing delivers until the worker starts.
    let producer = start(&redis, &with(env.clone(), "SATCHEL_MAIL_ENABLED", "false"));
    let c = producer.client().await;
    let id = s(&send(&c, basic("ann@example.com")).await, "mail_id").to_owned();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(s(&status(&c, &id).await, "status"), "queued");
    let worker = start(&redis, &env);
    let cw = worker.client().await;
    wait_status(&cw, &id, "sent").await;
    assert_eq!(sink.count(), 1);
}

#[tokio::test]
async fn transient_451_twice_then_success_is_sent_with_attempts_3() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let id = s(
        &send(&c, basic("fail451-twice+a@example.com")).await,
        "mail_id",
    )
    .to_owned();
    let st = wait_status(&c, &id, "sent").await;
    assert_eq!(field(&st, "attempts").as_u64(), Some(3), "{st}");
    assert!(
        s(&st, "last_error").contains("451"),
        "the last transient error is kept: {st}"
    );
    // Failing after DATA is transient too.
    let id = s(
        &send(&c, basic("fail-after-data+a@example.com")).await,
        "mail_id",
    )
    .to_owned();
    let st = wait_status(&c, &id, "sent").await;
    assert_eq!(field(&st, "attempts").as_u64(), Some(2), "{st}");
    let got = sink.received();
    assert_eq!(got.len(), 2);
    // Same Message-ID on every attempt: the message is built once, at enqueue.
    assert_eq!(with_message_id(&got, &id).len(), 1);
}

#[tokio::test]
async fn permanent_550_is_dead_at_once_with_the_reply_and_retry_revives_it() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let id = s(&send(&c, basic("reject550+a@example.com")).await, "mail_id").to_owned();
    let st = wait_status(&c, &id, "dead").await;
    assert_eq!(field(&st, "attempts").as_u64(), Some(1), "{st}");
    assert!(s(&st, "last_error").contains("550"), "{st}");
    assert!(s(&st, "last_error").contains("no such user here"), "{st}");
    let dead = c
        .call("mail.dead", vec![("limit", Value::from(10))])
        .await
        .unwrap();
    let list = dead.as_array().unwrap();
    assert_eq!(list.len(), 1, "{dead}");
    assert_eq!(s(&list[0], "mail_id"), id);
    assert_eq!(s(&list[0], "subject"), "Hello");
    assert_eq!(
        field(&list[0], "to").as_array().unwrap()[0].as_str(),
        Some("reject550+a@example.com")
    );
    assert!(s(&list[0], "last_error").contains("550"));
    assert!(field(&list[0], "dead_ms").as_u64().unwrap() > 0);

    // retry: queued again with attempts from 0, then dead again (the sink still refuses).
    let r = c
        .call("mail.retry", vec![("mail_id", Value::from(id.as_str()))])
        .await
        .unwrap();
    assert_eq!(s(&r, "status"), "queued");
    let st = wait_status(&c, &id, "dead").await;
    assert_eq!(field(&st, "attempts").as_u64(), Some(1), "{st}");

    // Some recipients refused: the others get it, the refusals are recorded.
    let mut f = basic("ok@example.com");
    f.push(("cc", strs(&["reject550+b@example.com"])));
    let id2 = s(&send(&c, f).await, "mail_id").to_owned();
    let st = wait_status(&c, &id2, "sent").await;
    let refused = field(&st, "refused").as_array().unwrap();
    assert_eq!(refused.len(), 1, "{st}");
    assert!(
        refused[0]
            .as_str()
            .unwrap()
            .starts_with("reject550+b@example.com: "),
        "{st}"
    );
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["rcpt_tos"], serde_json::json!(["ok@example.com"]));

    // mail.dead is newest first, and `limit` bounds it.
    let id_b = s(
        &send(&c, basic("reject550+b2@example.com")).await,
        "mail_id",
    )
    .to_owned();
    wait_status(&c, &id_b, "dead").await;
    let dead = c.call("mail.dead", vec![]).await.unwrap();
    let ids: Vec<&str> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|d| s(d, "mail_id"))
        .collect();
    assert_eq!(ids, [id_b.as_str(), id.as_str()]);
    let one = c
        .call("mail.dead", vec![("limit", Value::from(1))])
        .await
        .unwrap();
    assert_eq!(one.as_array().unwrap().len(), 1);

    // A 421 at RCPT is transient: retried until max_attempts, then dead.
    let daemon2_env = with(fast(sink.port), "SATCHEL_MAIL_MAX_ATTEMPTS", "2");
    drop(daemon);
    let daemon = start(&redis, &daemon2_env);
    let c = daemon.client().await;
    let id3 = s(&send(&c, basic("down421@example.com")).await, "mail_id").to_owned();
    let st = wait_status(&c, &id3, "dead").await;
    assert_eq!(field(&st, "attempts").as_u64(), Some(2), "{st}");
    assert!(
        s(&st, "last_error").contains("gave up after 2 attempts"),
        "{st}"
    );
}

#[tokio::test]
async fn scheduled_mail_is_never_sent_early() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let at = now_ms() + 1500;
    let mut f = basic("ann@example.com");
    f.push(("send_at_ms", Value::from(at)));
    let r = send(&c, f).await;
    assert_eq!(s(&r, "status"), "scheduled");
    let id = s(&r, "mail_id").to_owned();
    let st = status(&c, &id).await;
    assert_eq!(s(&st, "status"), "scheduled");
    assert_eq!(field(&st, "next_attempt_ms").as_u64(), Some(at));
    // A send_at in the past is just queued.
    let mut f = basic("bob@example.com");
    f.push(("send_at_ms", Value::from(now_ms() - 10_000)));
    assert_eq!(s(&send(&c, f).await, "status"), "queued");
    wait_status(&c, &id, "sent").await;
    let got = sink.received();
    let ours = with_message_id(&got, &id);
    assert_eq!(ours.len(), 1);
    let t = ours[0]["t_ms"].as_u64().unwrap();
    assert!(t >= at, "delivered at {t}, {} ms before send_at", at - t);
}

#[tokio::test]
async fn cancel_stops_waiting_mail_and_unknown_ids_are_not_found() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let mut f = basic("ann@example.com");
    f.push(("send_at_ms", Value::from(now_ms() + 600_000)));
    let id = s(&send(&c, f).await, "mail_id").to_owned();
    let cancel = |id: String| {
        let c = c.clone();
        async move {
            c.call("mail.cancel", vec![("mail_id", Value::from(id))])
                .await
        }
    };
    let r = cancel(id.clone()).await.unwrap();
    assert_eq!(field(&r, "cancelled").as_bool(), Some(true));
    assert_eq!(s(&status(&c, &id).await, "status"), "cancelled");
    let r = cancel(id.clone()).await.unwrap();
    assert_eq!(
        field(&r, "cancelled").as_bool(),
        Some(false),
        "cancelling twice"
    );

    // A retrying mail can be cancelled too, and is then never delivered.
    let env = with(fast(sink.port), "SATCHEL_MAIL_RETRY_BASE_MS", "2000");
    let env = with(env, "SATCHEL_MAIL_RETRY_MAX_MS", "2000");
    drop(daemon);
    let daemon = start(&redis, &env);
    let c = daemon.client().await;
    let id = s(
        &send(&c, basic("fail451-twice+c@example.com")).await,
        "mail_id",
    )
    .to_owned();
    wait_status(&c, &id, "retrying").await;
    let r = c
        .call("mail.cancel", vec![("mail_id", Value::from(id.as_str()))])
        .await
        .unwrap();
    assert_eq!(field(&r, "cancelled").as_bool(), Some(true));
    // A sent mail cannot be cancelled.
    let sent = s(&send(&c, basic("ann@example.com")).await, "mail_id").to_owned();
    wait_status(&c, &sent, "sent").await;
    let r = c
        .call("mail.cancel", vec![("mail_id", Value::from(sent.as_str()))])
        .await
        .unwrap();
    assert_eq!(field(&r, "cancelled").as_bool(), Some(false));
    // ... nor retried.
    let (code, _) = server_err(
        c.call("mail.retry", vec![("mail_id", Value::from(sent.as_str()))])
            .await,
    );
    assert_eq!(code, "BAD_REQUEST");

    for op in ["mail.status", "mail.cancel", "mail.retry"] {
        let (code, _) = server_err(c.call(op, vec![("mail_id", Value::from("nope"))]).await);
        assert_eq!(code, "NOT_FOUND", "{op}");
    }
    // The cancelled retry never reached the sink (give it past its retry time).
    let stats_ok = eventually(Duration::from_secs(5), || {
        let c = c.clone();
        async move {
            let st = c.stats().await.unwrap();
            field(field(&st, "mail"), "retrying").as_u64() == Some(0)
                && field(field(&st, "mail"), "queued").as_u64() == Some(0)
        }
    })
    .await;
    assert!(stats_ok);
    assert_eq!(s(&status(&c, &id).await, "status"), "cancelled");
    assert_eq!(
        sink.received()
            .iter()
            .filter(|m| m["rcpt_tos"][0].as_str().unwrap().starts_with("fail451"))
            .count(),
        0
    );
}

#[tokio::test]
async fn kill_9_during_delivery_of_200_mails_loses_none_and_duplicates_at_most_concurrency() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = with(fast(sink.port), "SATCHEL_MAIL_CONCURRENCY", "16");
    let mut daemon = start(&redis, &env);
    let c = daemon.client().await;
    let mut ids = Vec::new();
    for i in 0..200 {
        let r = send(&c, basic(&format!("slow30+{i}@example.com"))).await;
        ids.push(s(&r, "mail_id").to_owned());
    }
    assert!(
        wait_until(WAIT, || sink.count() >= 40),
        "deliveries did not start"
    );
    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(5)).expect("killed");
    let before = sink.count();
    assert!(
        before < 200,
        "all delivered before the kill; make the sink slower"
    );

    let daemon = start(&redis, &env);
    let all = wait_until(Duration::from_secs(40), || {
        let got = sink.received();
        ids.iter().all(|id| !with_message_id(&got, id).is_empty())
    });
    let got = sink.received();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        per_id.insert(id.clone(), with_message_id(&got, id).len());
    }
    let missing = per_id.values().filter(|n| **n == 0).count();
    if !all {
        let log = daemon.log_text();
        let tail = &log[log.len().saturating_sub(4000)..];
        let mut r = redis.conn();
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg("satchel:m:stream")
            .arg("workers")
            .query(&mut r)
            .unwrap();
        let counts: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg("satchel:m:counts")
            .query(&mut r)
            .unwrap();
        panic!("{missing} of 200 never delivered; pending {pending:?}; counts {counts:?}\n{tail}");
    }
    let duplicates: usize = per_id.values().map(|n| n - 1).sum();
    eprintln!("delivered before the kill: {before}; duplicates after restart: {duplicates}");
    assert!(duplicates <= 16, "{duplicates} duplicates > concurrency 16");
    let c = daemon.client().await;
    for id in &ids {
        // A mail the killed daemon delivered but did not record is reclaimed, then
        // either recorded or (a duplicate) sent again: either way it ends `sent`.
        wait_status(&c, id, "sent").await;
    }
    let stats = c.stats().await.unwrap();
    assert!(
        field(field(&stats, "mail"), "local_reclaimed")
            .as_u64()
            .unwrap()
            > 0
    );
    // Every entry is acknowledged and deleted: nothing left in the stream.
    let mut r = redis.conn();
    let ok = wait_until(WAIT, || {
        redis::cmd("XLEN")
            .arg("satchel:m:stream")
            .query::<u64>(&mut r)
            .unwrap()
            == 0
    });
    assert!(ok, "stream not empty");
}

#[tokio::test]
async fn two_daemons_share_a_queue_of_300_without_duplicates() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = with(fast(sink.port), "SATCHEL_MAIL_CONCURRENCY", "4");
    let a = start(&redis, &env);
    let b = start(&redis, &env);
    let (ca, cb) = (a.client().await, b.client().await);
    for i in 0..300 {
        let c = if i % 2 == 0 { &ca } else { &cb };
        send(c, basic(&format!("slow5+{i}@example.com"))).await;
    }
    assert!(
        wait_until(Duration::from_secs(40), || sink.count() >= 300),
        "only {} of 300 delivered",
        sink.count()
    );
    let got = sink.received();
    assert_eq!(got.len(), 300, "duplicates delivered");
    let local = |st: &Value| field(field(st, "mail"), "local_sent").as_u64().unwrap();
    let (sa, sb) = (
        local(&ca.stats().await.unwrap()),
        local(&cb.stats().await.unwrap()),
    );
    assert_eq!(sa + sb, 300);
    assert!(sa > 0 && sb > 0, "both daemons deliver: {sa} + {sb}");
}

#[tokio::test]
async fn sigterm_lets_deliveries_in_flight_complete_before_exit() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let mut daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            s(
                &send(&c, basic(&format!("slow1500+{i}@example.com"))).await,
                "mail_id",
            )
            .to_owned(),
        );
    }
    let in_flight = eventually(WAIT, || {
        let c = c.clone();
        async move {
            let st = c.stats().await.unwrap();
            field(field(&st, "mail"), "local_sending").as_u64() == Some(3)
        }
    })
    .await;
    assert!(in_flight);
    assert_eq!(sink.count(), 0);
    daemon.signal(Signal::SIGTERM);
    let exit = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("daemon exited");
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
    assert_eq!(
        sink.count(),
        3,
        "in-flight deliveries completed before exit"
    );
    let mut r = redis.conn();
    for id in &ids {
        let st: String = redis::cmd("HGET")
            .arg(format!("satchel:m:s:{id}"))
            .arg("status")
            .query(&mut r)
            .unwrap();
        assert_eq!(st, "sent");
    }
    let len: u64 = redis::cmd("XLEN")
        .arg("satchel:m:stream")
        .query(&mut r)
        .unwrap();
    assert_eq!(len, 0, "acknowledged and deleted before exit");
}

#[tokio::test]
async fn mail_waits_while_smtp_is_down_and_goes_out_after() {
    let redis = RedisServer::start();
    let port = unused_port();
    let daemon = start(&redis, &fast(port));
    let c = daemon.client().await;
    let id = s(&send(&c, basic("ann@example.com")).await, "mail_id").to_owned();
    let st = wait_status(&c, &id, "retrying").await;
    assert!(s(&st, "last_error").contains("connect"), "{st}");
    assert!(field(&st, "next_attempt_ms").as_u64().is_some());
    let sink = SmtpSink::start_on(port);
    let st = wait_status(&c, &id, "sent").await;
    assert!(field(&st, "attempts").as_u64().unwrap() >= 2);
    assert_eq!(sink.count(), 1);
}

/// A self-signed certificate for `localhost` and its key, as PEM files in `dir`.
fn self_signed_localhost(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test]
async fn starttls_smtps_and_auth_against_a_test_certificate() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = self_signed_localhost(dir.path());
    let port = unused_port();
    let sink = SmtpSink::start_with(
        port,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
            "--require-tls",
            "--auth",
            "mailer:s3cret",
        ],
    );
    let env = with(
        fast(port),
        "SATCHEL_MAIL_SMTP_URL",
        &format!("smtp://mailer:s3cret@localhost:{port}?tls=required"),
    );
    let env = with(env, "SATCHEL_MAIL_TLS_CA_FILE", cert_path.to_str().unwrap());
    let daemon = start(&redis, &env);
    let c = daemon.client().await;
    let id = s(&send(&c, basic("ann@example.com")).await, "mail_id").to_owned();
    wait_status(&c, &id, "sent").await;
    let got = sink.received();
    assert_eq!(got[0]["tls"], true);
    assert_eq!(got[0]["auth"], "mailer");

    // A wrong password is a permanent refusal (535): dead, with the reply.
    let env = with(
        env,
        "SATCHEL_MAIL_SMTP_URL",
        &format!("smtp://mailer:wrong@localhost:{port}?tls=required"),
    );
    drop(daemon);
    let daemon = start(&redis, &env);
    let c = daemon.client().await;
    let id = s(&send(&c, basic("ann@example.com")).await, "mail_id").to_owned();
    let st = wait_status(&c, &id, "dead").await;
    assert!(s(&st, "last_error").contains("535"), "{st}");

    // smtps:// (TLS from the first byte), also over our own nodelay stream.
    let tls_port = unused_port();
    let tls_sink = SmtpSink::start_with(
        tls_port,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
            "--implicit-tls",
            "--auth",
            "mailer:s3cret",
        ],
    );
    let env = with(
        env,
        "SATCHEL_MAIL_SMTP_URL",
        &format!("smtps://mailer:s3cret@localhost:{tls_port}"),
    );
    drop(daemon);
    let daemon = start(&redis, &env);
    let c = daemon.client().await;
    let id = s(&send(&c, basic("ann@example.com")).await, "mail_id").to_owned();
    wait_status(&c, &id, "sent").await;
    let got = tls_sink.received();
    assert_eq!(got[0]["tls"], true);
    assert_eq!(got[0]["auth"], "mailer");
}

#[tokio::test]
async fn file_transport_writes_eml_files_when_no_smtp_is_configured() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &redis.url(),
        &[("SATCHEL_MAIL_FILE_DIR", dir.path().to_str().unwrap())],
    );
    let c = daemon.client().await;
    let id = s(&send(&c, basic("ann@example.com")).await, "mail_id").to_owned();
    wait_status(&c, &id, "sent").await;
    let eml = std::fs::read_to_string(dir.path().join(format!("{id}.eml"))).unwrap();
    assert!(eml.contains("Subject: Hello"), "{eml}");
    assert!(eml.contains("From: satchel@localhost"), "{eml}");
}

#[tokio::test]
async fn redis_down_answers_unavailable_or_sends_directly() {
    let mut redis = RedisServer::start();
    let sink = SmtpSink::start();
    let a = start(&redis, &fast(sink.port));
    let b = start(
        &redis,
        &with(fast(sink.port), "SATCHEL_MAIL_ON_REDIS_DOWN", "direct"),
    );
    let (ca, cb) = (a.client().await, b.client().await);
    redis.stop();
    let ok = eventually(WAIT, || {
        let ca = ca.clone();
        async move {
            matches!(ca.call("mail.send", basic("ann@example.com")).await,
                Err(ClientError::Server { ref code, .. }) if code == "UNAVAILABLE")
        }
    })
    .await;
    assert!(ok, "mail.send must be UNAVAILABLE while redis is down");
    let ok = eventually(WAIT, || {
        let cb = cb.clone();
        async move {
            match cb.call("mail.send", basic("direct@example.com")).await {
                Ok(r) => s(&r, "status") == "sent",
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(ok, "direct mode sends while redis is down");
    assert!(
        sink.received()
            .iter()
            .any(|m| m["rcpt_tos"] == serde_json::json!(["direct@example.com"]))
    );
}

#[tokio::test]
async fn a_poison_entry_left_by_a_dead_consumer_goes_dead() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let mut r = redis.conn();
    // A consumer that died mid-delivery eight times: status `sending`, attempts at the
    // limit, its entry pending on a consumer that no longer exists.
    let _: () = redis::cmd("HSET")
        .arg("satchel:m:s:poison1")
        .arg(&[
            ("status", "sending"),
            ("attempts", "8"),
            ("from", "app@example.org"),
            ("rcpt", "ann@example.com"),
            ("to", "ann@example.com"),
            ("subject", "Crashy"),
            ("raw", "Subject: Crashy\r\n\r\nx\r\n"),
        ])
        .query(&mut r)
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", "satchel:m:stream", "workers", "0", "MKSTREAM"])
        .query(&mut r)
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&["satchel:m:stream", "*", "id", "poison1"])
        .query(&mut r)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "workers",
            "ghost",
            "COUNT",
            "1",
            "STREAMS",
            "satchel:m:stream",
            ">",
        ])
        .query(&mut r)
        .unwrap();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    let ok = eventually(WAIT, || {
        let c = c.clone();
        async move { s(&status(&c, "poison1").await, "status") == "dead" }
    })
    .await;
    assert!(ok, "{}", daemon.log_text());
    let st = status(&c, "poison1").await;
    assert!(s(&st, "last_error").contains("poison"), "{st}");
    assert_eq!(sink.count(), 0);
    let ok = wait_until(WAIT, || {
        redis::cmd("XLEN")
            .arg("satchel:m:stream")
            .query::<u64>(&mut r)
            .unwrap()
            == 0
    });
    assert!(ok, "the poison entry is acknowledged and deleted");
}

#[tokio::test]
async fn a_slow_delivery_keeps_its_claim_and_is_not_sent_twice() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    // Deliveries take 5x the claim idle time; two daemons watch each other's entries.
    let env = with(fast(sink.port), "SATCHEL_MAIL_CLAIM_IDLE_MS", "300");
    let a = start(&redis, &env);
    let b = start(&redis, &env);
    let c = a.client().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let r = send(&c, basic(&format!("slow1500+{i}@example.com"))).await;
        ids.push(s(&r, "mail_id").to_owned());
    }
    for id in &ids {
        let st = wait_status(&c, id, "sent").await;
        assert_eq!(field(&st, "attempts").as_u64(), Some(1), "{st}");
    }
    assert_eq!(sink.count(), 4, "no delivery was taken over mid-flight");
    let cb = b.client().await;
    let reclaimed = |st: &Value| {
        field(field(st, "mail"), "local_reclaimed")
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        reclaimed(&c.stats().await.unwrap()) + reclaimed(&cb.stats().await.unwrap()),
        0
    );
}

#[tokio::test]
async fn the_global_rate_limit_holds_across_daemons() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = with(fast(sink.port), "SATCHEL_MAIL_RATE_PER_SEC", "10");
    let a = start(&redis, &env);
    let _b = start(&redis, &env);
    let c = a.client().await;
    for i in 0..30 {
        send(&c, basic(&format!("r{i}@example.com"))).await;
    }
    assert!(
        wait_until(WAIT, || sink.count() >= 30),
        "only {} sent",
        sink.count()
    );
    let mut times: Vec<u64> = sink
        .received()
        .iter()
        .map(|m| m["t_ms"].as_u64().unwrap())
        .collect();
    times.sort();
    // 30 mails at 10/s in fixed one-second windows take more than two seconds.
    // 30 mails at 10/s need three one-second windows, so more than one second even
    // when the first window is nearly over (minus delivery jitter).
    let span = times[29] - times[0];
    assert!(span >= 900, "30 mails in {span} ms at rate_per_sec 10");
    // and no one-second window holds more than two windows' worth.
    for (i, t) in times.iter().enumerate() {
        let within = times[i..].iter().take_while(|u| **u < t + 1000).count();
        assert!(within <= 20, "{within} mails within 1 s of {t}");
    }
}

#[tokio::test]
async fn sent_mail_keeps_a_bounded_status_record_and_no_body() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let env = with(
        fast(sink.port),
        "SATCHEL_MAIL_STATUS_RETENTION_MS",
        "600000",
    );
    let env = with(env, "SATCHEL_MAIL_IDEMPOTENCY_TTL_MS", "60000");
    let daemon = start(&redis, &env);
    let c = daemon.client().await;
    let mut f = basic("ann@example.com");
    f.push(("idempotency_key", Value::from("k1")));
    let id = s(&send(&c, f).await, "mail_id").to_owned();
    wait_status(&c, &id, "sent").await;
    let mut r = redis.conn();
    let key = format!("satchel:m:s:{id}");
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut r).unwrap();
    assert!(ttl > 590_000 && ttl <= 600_000, "status TTL {ttl}");
    let has_raw: bool = redis::cmd("HEXISTS")
        .arg(&key)
        .arg("raw")
        .query(&mut r)
        .unwrap();
    assert!(!has_raw, "the message body is dropped once sent");
    let idem_ttl: i64 = redis::cmd("PTTL")
        .arg("satchel:m:idem:k1")
        .query(&mut r)
        .unwrap();
    assert!(
        idem_ttl > 50_000 && idem_ttl <= 60_000,
        "idempotency TTL {idem_ttl}"
    );
    let len: u64 = redis::cmd("XLEN")
        .arg("satchel:m:stream")
        .query(&mut r)
        .unwrap();
    assert_eq!(len, 0, "acknowledged entries are deleted from the stream");
    let _ = sink;
}

#[tokio::test]
async fn reclaimed_entries_already_sent_or_deleted_are_acknowledged_without_delivery() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let mut r = redis.conn();
    // A consumer that wrote `sent` and died before its ack; and one whose entry was
    // deleted from the stream while pending.
    let _: () = redis::cmd("HSET")
        .arg("satchel:m:s:done1")
        .arg(&[
            ("status", "sent"),
            ("attempts", "1"),
            ("from", "app@example.org"),
            ("rcpt", "ann@example.com"),
        ])
        .query(&mut r)
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", "satchel:m:stream", "workers", "0", "MKSTREAM"])
        .query(&mut r)
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&["satchel:m:stream", "*", "id", "done1"])
        .query(&mut r)
        .unwrap();
    let gone: String = redis::cmd("XADD")
        .arg(&["satchel:m:stream", "*", "id", "gone1"])
        .query(&mut r)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "workers",
            "ghost",
            "COUNT",
            "2",
            "STREAMS",
            "satchel:m:stream",
            ">",
        ])
        .query(&mut r)
        .unwrap();
    let _: u64 = redis::cmd("XDEL")
        .arg("satchel:m:stream")
        .arg(&gone)
        .query(&mut r)
        .unwrap();
    let _daemon = start(&redis, &fast(sink.port));
    let ok = wait_until(WAIT, || {
        let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(&["satchel:m:stream", "workers"])
            .query(&mut r)
            .unwrap();
        pending.0 == 0
    });
    assert!(ok, "both entries leave the pending list");
    let len: u64 = redis::cmd("XLEN")
        .arg("satchel:m:stream")
        .query(&mut r)
        .unwrap();
    assert_eq!(len, 0);
    assert_eq!(sink.count(), 0, "an entry already sent is not sent again");
}

/// Standard base64 (for checking attachments in delivered messages).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn big_attachment(len: usize) -> (Value, Vec<u8>) {
    let data: Vec<u8> = (0..len as u64).map(|i| (i * 7919 % 251) as u8).collect();
    let v = Value::Array(vec![Value::Map(vec![
        (Value::from("filename"), Value::from("scan.bin")),
        (Value::from("data"), Value::Binary(data.clone())),
    ])]);
    (v, data)
}

fn body_key_exists(redis: &RedisServer, id: &str) -> bool {
    let mut conn = redis.conn();
    redis::cmd("EXISTS")
        .arg(format!("satchel:m:s:{id}:b"))
        .query::<i64>(&mut conn)
        .unwrap()
        == 1
}

#[tokio::test]
async fn a_large_mail_travels_in_pieces_through_retries_and_its_body_is_removed_when_done() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = start(&redis, &fast(sink.port));
    let c = daemon.client().await;
    // ~4 MiB rendered: four body pieces, never one command.
    let (attachments, data) = big_attachment(3_000_000);
    let mut fields = basic("fail451-twice+big@example.com");
    fields.push(("attachments", attachments.clone()));
    let id = s(&send(&c, fields).await, "mail_id").to_owned();
    let mut conn = redis.conn();
    let pieces: i64 = redis::cmd("LLEN")
        .arg(format!("satchel:m:s:{id}:b"))
        .query(&mut conn)
        .unwrap_or(0);
    let sent = wait_status(&c, &id, "sent").await;
    assert!(sent.to_string().contains("\"attempts\": 3"), "{sent}");
    assert!(
        pieces == 4 || pieces == 0,
        "{pieces} pieces (0: already sent)"
    );
    let got = sink.received();
    let delivered = got[0]["data"].as_str().unwrap().replace("\r\n", "");
    let encoded = base64(&data);
    assert!(
        delivered.contains(&encoded),
        "the attachment arrived whole ({} bytes of message)",
        delivered.len()
    );
    assert!(
        !body_key_exists(&redis, &id),
        "the body key outlived the sent mail"
    );

    // Scheduled, then cancelled: the body goes with it.
    let mut fields = basic("ann@example.com");
    fields.push(("attachments", attachments.clone()));
    fields.push(("send_at_ms", Value::from(now_ms() + 60_000)));
    let id = s(&send(&c, fields).await, "mail_id").to_owned();
    assert!(body_key_exists(&redis, &id));
    let r = c
        .call("mail.cancel", vec![("mail_id", Value::from(id.as_str()))])
        .await
        .unwrap();
    assert!(r.to_string().contains("true"), "{r}");
    assert!(!body_key_exists(&redis, &id));

    // Scheduled a moment ahead: delivered from its body key when due.
    let mut fields = basic("bob@example.com");
    fields.push(("attachments", attachments));
    fields.push(("send_at_ms", Value::from(now_ms() + 300)));
    let id = s(&send(&c, fields).await, "mail_id").to_owned();
    wait_status(&c, &id, "sent").await;
    assert!(
        sink.received()
            .iter()
            .any(|m| m["rcpt_tos"].to_string().contains("bob@example.com")
                && m["data"].as_str().unwrap().len() > 4_000_000)
    );
    assert!(!body_key_exists(&redis, &id));
}

#[tokio::test]
async fn opportunistic_starttls_delivers_to_a_relay_with_a_self_signed_certificate() {
    // A stock relay (Postfix's snakeoil certificate): STARTTLS offered, a certificate
    // no CA vouches for.
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = self_signed_localhost(dir.path());
    let port = unused_port();
    let sink = SmtpSink::start_with(
        port,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    // The default: smtp:// is tls=opportunistic.
    let env = with(
        fast(port),
        "SATCHEL_MAIL_SMTP_URL",
        &format!("smtp://localhost:{port}"),
    );
    let daemon = start(&redis, &env);
    let c = daemon.client().await;
    for _ in 0..2 {
        let id = s(&send(&c, basic("ann@example.com")).await, "mail_id").to_owned();
        wait_status(&c, &id, "sent").await;
    }
    let got = sink.received();
    assert!(got.iter().all(|m| m["tls"] == true), "encrypted: {got:?}");
    let warned = daemon
        .log_text()
        .matches("certificate does not verify; sending over unverified TLS")
        .count();
    assert_eq!(warned, 1, "logged once per relay");

    // tls=required insists on a verified certificate: retrying, and it says why.
    let env = with(
        env,
        "SATCHEL_MAIL_SMTP_URL",
        &format!("smtp://localhost:{port}?tls=required"),
    );
    drop(daemon);
    let daemon = start(&redis, &env);
    let c = daemon.client().await;
    let id = s(&send(&c, basic("bob@example.com")).await, "mail_id").to_owned();
    let st = wait_status(&c, &id, "retrying").await;
    assert!(s(&st, "last_error").contains("certificate"), "{st}");
    // … and with the CA it delivers.
    let env = with(env, "SATCHEL_MAIL_TLS_CA_FILE", cert_path.to_str().unwrap());
    drop(daemon);
    let daemon = start(&redis, &env);
    let c = daemon.client().await;
    wait_status(&c, &id, "sent").await;
    assert!(
        !daemon.log_text().contains("unverified TLS"),
        "tls=required never falls back"
    );
}

/// Sends a mail, lets the pooled connection sit idle past the sink's idle limit
/// (`sink_args`), then sends another: it must go out on a fresh connection at once
/// (`attempts: 1`), not be deferred to a retry.
async fn a_mail_after_an_idle_pool_goes_out_at_once(sink_args: &[&str]) {
    let redis = RedisServer::start();
    let port = unused_port();
    let sink = SmtpSink::start_with(port, sink_args);
    let daemon = start(&redis, &fast(port));
    let c = daemon.client().await;
    let first = s(&send(&c, basic("ann@example.com")).await, "mail_id").to_owned();
    wait_status(&c, &first, "sent").await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let second = s(&send(&c, basic("bob@example.com")).await, "mail_id").to_owned();
    let st = wait_status(&c, &second, "sent").await;
    assert_eq!(
        field(&st, "attempts").as_u64(),
        Some(1),
        "sent on a fresh connection at once, not deferred: {st}"
    );
    assert_eq!(sink.count(), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_while_idle_is_replaced_at_once() {
    // The sink closes a session idle for 1 s without a word, as a relay's own idle
    // timeout does: the pooled connection is dead when the next mail takes it.
    a_mail_after_an_idle_pool_goes_out_at_once(&["--idle-close", "1"]).await;
}

#[tokio::test]
async fn a_pooled_connection_the_server_timed_out_is_replaced_at_once() {
    // The sink answers the next MAIL FROM of a session idle for 1 s with a 421, as a
    // relay closing idle sessions does: the pooled connection holds that 421.
    a_mail_after_an_idle_pool_goes_out_at_once(&["--idle-421", "1"]).await;
}
