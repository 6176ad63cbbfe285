//! Shared mail templates (issue 16): stored in Redis, rendered with minijinja at
//! enqueue (html escaped, text not, a missing variable named), so a mail queued before
//! a template changes keeps what it was rendered with. Real daemon, Redis, SMTP sink.

mod support;

use std::time::Duration;

use rmpv::Value;
use satchel::client::{Client, Mail};
use satchel::protocol::ErrorCode;
use support::*;

fn daemon(redis: &RedisServer, sink: &SmtpSink) -> Daemon {
    let smtp = format!("smtp://127.0.0.1:{}?tls=none", sink.port);
    Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_MAIL_SMTP_URL", smtp.as_str()),
            ("SATCHEL_MAIL_FROM", "school@example.org"),
        ],
    )
}

fn vars(pairs: &[(&str, Value)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

fn templated(name: &str, v: Value) -> Mail {
    Mail {
        to: vec!["ann@example.com".into()],
        template: Some(name.into()),
        vars: Some(v),
        ..Mail::default()
    }
}

async fn sent(c: &Client, id: &str) {
    assert!(
        eventually(Duration::from_secs(10), || {
            let c = c.clone();
            let id = id.to_owned();
            async move {
                let s = c.mail_status(&id).await.unwrap();
                field(&s, "status").as_str() == Some("sent")
            }
        })
        .await,
        "{id} was not sent"
    );
}

/// The delivered message with quoted-printable undone (for searching its text).
fn decoded(m: &serde_json::Value) -> String {
    let raw = m["data"].as_str().unwrap_or("");
    let bytes = quoted_printable::decode(raw, quoted_printable::ParseMode::Robust).unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_render_escaped_html_plain_text_and_name_a_missing_variable() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let d = daemon(&redis, &sink);
    let c = d.client().await;
    c.mail_template_put(
        "results",
        "Résultats pour {{ name }}",
        None,
        Some("<h1>Résultats</h1><p>{{ name }}: {{ score }}/100</p>"),
    )
    .await
    .unwrap();
    assert_eq!(c.mail_template_list().await.unwrap(), vec!["results"]);
    let got = c.mail_template_get("results").await.unwrap();
    assert_eq!(
        field(&got, "subject").as_str(),
        Some("Résultats pour {{ name }}")
    );

    let q = c
        .mail_send(&templated(
            "results",
            vars(&[
                ("name", Value::from("<script>alert(1)</script> Zoë")),
                ("score", Value::from(91)),
            ]),
        ))
        .await
        .unwrap();
    sent(&c, &q.mail_id).await;
    let st = c.mail_status(&q.mail_id).await.unwrap();
    assert_eq!(field(&st, "template").as_str(), Some("results"));
    let m = sink.received().pop().unwrap();
    let text = decoded(&m);
    assert!(
        text.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt; Zoë: 91/100"),
        "html escaped: {text}"
    );
    assert!(
        text.contains("<script>alert(1)</script> Zoë: 91/100"),
        "the text part (made from the html) is not escaped: {text}"
    );
    assert!(
        !text.contains("<p><script>"),
        "never unescaped in html: {text}"
    );
    assert!(
        text.contains("Subject: =?utf-8?"),
        "non-ASCII subject encoded: {text}"
    );

    // A variable the template uses and vars lacks: INVALID_MAIL naming it, nothing queued.
    let e = c
        .mail_send(&templated("results", vars(&[("name", Value::from("Ann"))])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidMail), "{e}");
    assert_eq!(e.field(), Some("vars"));
    assert!(e.to_string().contains("`score`"), "{e}");
    // An unknown template, and a template with subject given too.
    let e = c
        .mail_send(&templated("nope", vars(&[])))
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("template"), "{e}");
    let e = c
        .call(
            "mail.send",
            vec![
                ("to", Value::Array(vec!["a@b.c".into()])),
                ("template", "results".into()),
                ("subject", "x".into()),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("template"), "{e}");
    // Bad templates and names are refused when stored.
    for (fields, bad) in [
        (
            vec![
                ("name", "t".into()),
                ("subject", "{{ oops".into()),
                ("text", "t".into()),
            ],
            "subject",
        ),
        (
            vec![
                ("name", "t".into()),
                ("subject", "s".into()),
                ("html", "{% if %}".into()),
            ],
            "html",
        ),
        (vec![("name", "t".into()), ("subject", "s".into())], "text"),
        (
            vec![
                ("name", "a b".into()),
                ("subject", "s".into()),
                ("text", "t".into()),
            ],
            "name",
        ),
    ] {
        let e = c
            .call("mail.template.put", fields.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{fields:?}: {e}");
        assert_eq!(e.field(), Some(bad), "{fields:?}: {e}");
    }
    assert!(c.mail_template_delete("results").await.unwrap());
    assert!(!c.mail_template_delete("results").await.unwrap());
    let e = c.mail_template_get("results").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_queued_before_its_template_changed_keeps_what_it_was_rendered_with() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let d = daemon(&redis, &sink);
    let c = d.client().await;
    c.mail_template_put("notice", "Notice", Some("version one for {{ who }}"), None)
        .await
        .unwrap();
    let q = c
        .mail_send(&Mail {
            send_at_ms: Some(satchel::host::now_ms() + 1500),
            ..templated("notice", vars(&[("who", Value::from("Ann"))]))
        })
        .await
        .unwrap();
    assert_eq!(q.status, "scheduled");
    c.mail_template_put("notice", "Notice", Some("version two for {{ who }}"), None)
        .await
        .unwrap();
    sent(&c, &q.mail_id).await;
    let text = decoded(&sink.received().pop().unwrap());
    assert!(text.contains("version one for Ann"), "{text}");
    assert!(!text.contains("version two"), "{text}");
}
