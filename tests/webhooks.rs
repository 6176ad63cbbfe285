//! Signed webhooks (issue 15): events POSTed to a real HTTP receiver (tests/
//! http_receiver.py, which checks the signature itself with Python's hmac), retried
//! through 500s and a timeout, sent once across daemons, taken over after a crash,
//! dropped after their max age.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use satchel::client::{Client, Mail};
use support::*;

const SECRET: &str = "test-webhook-secret";

struct Receiver {
    child: Child,
    port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start(plan: &str) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("posts.jsonl");
        let port = unused_port();
        let child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/http_receiver.py"
            ))
            .args([
                "--port",
                &port.to_string(),
                "--secret",
                SECRET,
                "--plan",
                plan,
            ])
            .args(["--sleep", "2"])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "the HTTP receiver did not start"
        );
        Receiver {
            child,
            port,
            out,
            _dir: dir,
        }
    }

    fn posts(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Answers per event id.
    fn answers(&self) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for p in self.posts() {
            out.entry(p["event_id"].as_str().unwrap_or("").to_owned())
                .or_default()
                .push(p["answer"].as_str().unwrap_or("").to_owned());
        }
        out
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn daemon(redis: &RedisServer, sink: &SmtpSink, hook: &Receiver, extra: &[(&str, &str)]) -> Daemon {
    let smtp = format!("smtp://127.0.0.1:{}?tls=none", sink.port);
    let url = hook.url();
    let mut env = vec![
        ("SATCHEL_MAIL_SMTP_URL", smtp.as_str()),
        ("SATCHEL_MAIL_FROM", "app@example.org"),
        ("SATCHEL_MAIL_WEBHOOK_URL", url.as_str()),
        ("SATCHEL_MAIL_WEBHOOK_SECRET", SECRET),
        ("SATCHEL_MAIL_WEBHOOK_TIMEOUT_MS", "500"),
        ("SATCHEL_MAIL_WEBHOOK_RETRY_BASE_MS", "100"),
    ];
    env.extend_from_slice(extra);
    Daemon::start(&redis.url(), &env)
}

fn mail(n: usize) -> Mail {
    Mail {
        to: vec!["ann@example.com".into()],
        subject: format!("hook {n}"),
        text: Some("t".into()),
        ..Mail::default()
    }
}

async fn stat(c: &Client, name: &str) -> u64 {
    let s = c.stats().await.unwrap();
    field(field(&s, "mail"), name).as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_survives_500s_and_a_timeout_arrives_signed_and_once() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let hook = Receiver::start("500,500,sleep");
    let d = daemon(&redis, &sink, &hook, &[]);
    let c = d.client().await;
    let q = c.mail_send(&mail(1)).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || hook
            .answers()
            .values()
            .any(|a| a.iter().any(|x| x == "200"))),
        "no webhook got through: {:?}",
        hook.posts()
    );
    // The held request is recorded when it ends; give it (and any stray retry) time.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let posts = hook.posts();
    let answers = hook.answers();
    assert_eq!(
        answers.len(),
        1,
        "one event (only `sent` by default): {posts:?}"
    );
    let (event_id, got) = answers.into_iter().next().unwrap();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, ["200", "500", "500", "sleep"], "{got:?}");
    for p in &posts {
        assert_eq!(p["signature_ok"], true, "{p}");
        assert_eq!(p["body"]["mail_id"], q.mail_id.as_str());
        assert_eq!(p["body"]["status"], "sent");
        assert_eq!(p["body"]["event_id"], event_id.as_str());
        assert!(p["timestamp"].as_str().unwrap().parse::<u64>().unwrap() > 1_700_000_000_000);
    }
    assert_eq!(stat(&c, "webhooks_delivered").await, 1);
    assert_eq!(stat(&c, "webhooks_failed_attempts").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_send_each_event_once_and_a_crashed_daemons_retry_is_taken_over() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let hook = Receiver::start("500");
    // A alone takes the first event, fails its POST, and is killed before its retry
    // (3-6 s later) is due.
    let mut a = daemon(
        &redis,
        &sink,
        &hook,
        &[("SATCHEL_MAIL_WEBHOOK_RETRY_BASE_MS", "6000")],
    );
    let ca = a.client().await;
    let first = ca.mail_send(&mail(0)).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            let ca = ca.clone();
            async move { stat(&ca, "webhooks_failed_attempts").await == 1 }
        })
        .await,
        "A never tried: {:?}",
        hook.posts()
    );
    a.kill();
    // Two other daemons: B takes over A's retry; both send new events.
    let b = daemon(&redis, &sink, &hook, &[]);
    let c2 = daemon(&redis, &sink, &hook, &[]);
    let cb = b.client().await;
    for n in 1..=20 {
        cb.mail_send(&mail(n)).await.unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(30), || {
            let a = hook.answers();
            a.len() == 21 && a.values().all(|x| x.iter().any(|y| y == "200"))
        }),
        "not every event got through: {:?}",
        hook.answers()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, got) in hook.answers() {
        assert_eq!(
            got.iter().filter(|x| *x == "200").count(),
            1,
            "{id} delivered twice: {got:?}"
        );
    }
    let first_body = hook
        .posts()
        .into_iter()
        .find(|p| p["body"]["mail_id"] == first.mail_id.as_str())
        .unwrap();
    assert_eq!(first_body["body"]["status"], "sent");
    drop(c2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_failing_past_its_max_age_is_dropped_and_counted() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let plan = vec!["500"; 200].join(",");
    let hook = Receiver::start(&plan);
    let d = daemon(
        &redis,
        &sink,
        &hook,
        &[("SATCHEL_MAIL_WEBHOOK_MAX_AGE_MS", "400")],
    );
    let c = d.client().await;
    c.mail_send(&mail(1)).await.unwrap();
    assert!(
        eventually(Duration::from_secs(15), || {
            let c = c.clone();
            async move { stat(&c, "webhooks_dropped").await == 1 }
        })
        .await,
        "never dropped: {:?}",
        hook.posts()
    );
    assert!(
        d.log_text()
            .contains("webhook dropped after mail.webhook_max_age_ms")
    );
    let tries = hook.posts().len();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        hook.posts().len(),
        tries,
        "a dropped event is not tried again"
    );
}

#[test]
fn webhook_config_errors_name_the_key() {
    for (env, key) in [
        (
            vec![
                ("SATCHEL_MAIL_WEBHOOK_URL", "ftp://example.com/x"),
                ("SATCHEL_MAIL_WEBHOOK_SECRET", "s"),
            ],
            "mail.webhook_url",
        ),
        (
            vec![
                ("SATCHEL_MAIL_WEBHOOK_URL", "not a url"),
                ("SATCHEL_MAIL_WEBHOOK_SECRET", "s"),
            ],
            "mail.webhook_url",
        ),
        (
            vec![("SATCHEL_MAIL_WEBHOOK_URL", "https://example.com/x")],
            "mail.webhook_secret",
        ),
        (
            vec![("SATCHEL_MAIL_WEBHOOK_EVENTS", "sent,teleported")],
            "mail.webhook_events",
        ),
    ] {
        let out = Command::new(satchel_bin())
            .arg("check-config")
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{env:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{env:?}: {err}");
    }
    let out = Command::new(satchel_bin())
        .arg("check-config")
        .env_clear()
        .env(
            "SATCHEL_MAIL_WEBHOOK_URL",
            "https://hooks.example.com/satchel",
        )
        .env("SATCHEL_MAIL_WEBHOOK_SECRET", "do-not-print-me")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("do-not-print-me") && text.contains("<redacted>"),
        "{text}"
    );
}
