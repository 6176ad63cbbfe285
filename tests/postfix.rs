//! Against a real MTA (issue 16): Debian's Postfix, run privately by the test
//! (tests/support/postfix.rs) with STARTTLS on a self-signed certificate, as a stock
//! install offers it. With the default `smtp://` URL (tls=opportunistic) mail is
//! delivered over TLS; a DKIM signature survives Postfix's delivery (its
//! Return-Path, Delivered-To and Received headers) and verifies with dkimpy; Postfix's
//! own `550 5.1.1 … User unknown` makes a mail dead with class `bad-mailbox` and puts
//! the address on the suppression list.

mod support;

use std::time::Duration;

use rmpv::Value;
use satchel::client::{Client, Mail};
use support::dkim::{keygen, verify};
use support::postfix::Postfix;
use support::*;

async fn wait_status(c: &Client, id: &str, want: &str) -> Value {
    let started = std::time::Instant::now();
    loop {
        let s = c.mail_status(id).await.unwrap();
        if field(&s, "status").as_str() == Some(want) {
            return s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{id} never became {want}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mail(to: &[&str], subject: &str) -> Mail {
    Mail {
        from: Some("Exam Team <noreply@sender.test>".into()),
        to: to.iter().map(|s| s.to_string()).collect(),
        subject: subject.into(),
        text: Some("Your results are published.".into()),
        html: Some("<p>Your results are <b>published</b>.</p>".into()),
        ..Mail::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_postfix_gets_signed_mail_over_starttls_and_its_5_1_1_is_a_suppressed_bad_mailbox()
{
    let postfix = Postfix::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("dkim.pem");
    let (record_name, record) = keygen("sender.test", "s1", "rsa-sha256", &key);
    let redis = RedisServer::start();
    let toml = format!(
        "[mail]\nsmtp_url = \"smtp://127.0.0.1:{}\"\nretry_base_ms = 100\nretry_max_ms = 300\n\
         [[mail.dkim]]\ndomain = \"sender.test\"\nselector = \"s1\"\nkey_file = {:?}\n",
        postfix.port,
        key.display().to_string()
    );
    let d = Daemon::start_with_config(&redis.url(), &toml, &[]);
    let c = d.client().await;

    // Delivered with the default URL, over STARTTLS on a certificate no CA vouches for.
    let q = c
        .mail_send(&mail(&["Ann <ann@example.test>"], "Résultats"))
        .await
        .unwrap();
    let st = wait_status(&c, &q.mail_id, "sent").await;
    assert_eq!(field(&st, "attempts").as_u64(), Some(1), "{st}");
    assert!(
        wait_until(Duration::from_secs(10), || postfix.mailbox().len() == 1),
        "not in the mailbox: {}",
        postfix.log()
    );
    assert!(
        postfix
            .log()
            .contains("TLS connection established from localhost"),
        "not over TLS: {}",
        postfix.log()
    );
    assert!(
        postfix.mailbox()[0].contains("(using TLS"),
        "{}",
        postfix.mailbox()[0]
    );
    assert!(d.log_text().contains("sending over unverified TLS"));

    // The signature verifies after Postfix's delivery, with an independent verifier.
    let results = verify(
        &serde_json::json!({ record_name: record }),
        &postfix.mailbox(),
    );
    assert_eq!(results[0]["verified"], true, "{results:?}");
    assert!(postfix.mailbox()[0].contains("Delivered-To: ann@example.test"));

    // An unknown user: Postfix's 550 5.1.1 → dead, bad-mailbox, suppressed.
    let q = c
        .mail_send(&mail(&["bob@example.test"], "Hi Bob"))
        .await
        .unwrap();
    let st = wait_status(&c, &q.mail_id, "dead").await;
    assert_eq!(field(&st, "class").as_str(), Some("bad-mailbox"), "{st}");
    let err = field(&st, "last_error").as_str().unwrap_or("").to_owned();
    assert!(
        err.contains("5.1.1") && err.contains("User unknown"),
        "{err}"
    );
    let q = c
        .mail_send(&mail(&["bob@example.test", "ann@example.test"], "Both"))
        .await
        .unwrap();
    assert_eq!(q.suppressed, vec!["bob@example.test".to_owned()]);
    wait_status(&c, &q.mail_id, "sent").await;
    assert!(wait_until(Duration::from_secs(10), || postfix
        .mailbox()
        .len()
        == 2));
    let q = c
        .mail_send(&mail(&["bob@EXAMPLE.test"], "Again"))
        .await
        .unwrap();
    assert_eq!(q.status, "suppressed");
}
