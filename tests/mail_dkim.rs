//! DKIM signing (issue 16): mail whose From domain has a `[[mail.dkim]]` key is
//! signed once at enqueue; the delivered bytes verify with dkimpy, an independent
//! verifier (tests/dkim_verify.py), for rsa-sha256 and ed25519-sha256, with
//! attachments, text and html, non-ASCII subjects and display names; a second From,
//! a changed Subject or body fail it. Keys come from `satchel dkim keygen`. Bad keys
//! are config errors that name the file. Real daemon, Redis and SMTP sink.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use satchel::client::{Attachment, Mail};
use support::dkim::{keygen, verify};
use support::*;

fn dkim_toml(entries: &[(&str, &str, &Path, &str)]) -> String {
    entries
        .iter()
        .map(|(domain, selector, key, alg)| {
            format!(
                "[[mail.dkim]]\ndomain = {domain:?}\nselector = {selector:?}\nkey_file = {:?}\nalgorithm = {alg:?}\n",
                key.display().to_string()
            )
        })
        .collect()
}

fn mail(from: &str, subject: &str, with_attachment: bool) -> Mail {
    Mail {
        from: Some(from.into()),
        to: vec!["Jürgen Groß <juergen@example.com>".into()],
        cc: vec!["\"Smith, Ann\" <ann@example.com>".into()],
        reply_to: Some("Öffice <office@example.org>".into()),
        subject: subject.into(),
        text: Some("Grüße,\n\nyour results are in.  Trailing spaces   \n\n\n".into()),
        html: Some("<p>Grüße, <b>your results</b> are in.</p>".into()),
        attachments: if with_attachment {
            vec![Attachment {
                filename: "résultats.pdf".into(),
                content_type: "application/pdf".into(),
                data: (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect(),
            }]
        } else {
            Vec::new()
        },
        ..Mail::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_mail_verifies_with_an_independent_verifier_and_tampering_breaks_it() {
    let dir = tempfile::tempdir().unwrap();
    let rsa_key = dir.path().join("rsa.pem");
    let ed_key = dir.path().join("ed.pem");
    let (rsa_name, rsa_record) = keygen("rsa.example.org", "s2026", "rsa-sha256", &rsa_key);
    let (ed_name, ed_record) = keygen("Ed.Example.org", "ed1", "ed25519-sha256", &ed_key);
    assert_eq!(rsa_name, "s2026._domainkey.rsa.example.org");
    assert!(rsa_record.starts_with("v=DKIM1; k=rsa; p="));
    assert!(ed_record.starts_with("v=DKIM1; k=ed25519; p="));
    let records = serde_json::json!({ rsa_name: rsa_record, ed_name: ed_record });

    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let toml = format!(
        "[mail]\nsmtp_url = \"smtp://127.0.0.1:{}?tls=none\"\n{}",
        sink.port,
        dkim_toml(&[
            ("rsa.example.org", "s2026", &rsa_key, "rsa-sha256"),
            ("Ed.Example.org", "ed1", &ed_key, "ed25519-sha256"),
        ])
    );
    let d = Daemon::start_with_config(&redis.url(), &toml, &[]);
    let c = d.client().await;
    let sends = [
        mail(
            "Zoë Müller <noreply@rsa.example.org>",
            "Résultats publiés ✓",
            true,
        ),
        Mail {
            cc: Vec::new(),
            reply_to: None,
            ..mail("noreply@RSA.example.org", "Plain ASCII subject", false)
        },
        mail(
            "Exam Team <noreply@ed.example.org>",
            "Ihre Ergebnisse – ÄÖÜ",
            true,
        ),
        mail("Exam Team <noreply@ed.example.org>", "No attachment", false),
        mail("nobody@unsigned.example.net", "Not ours to sign", false),
    ];
    for (i, m) in sends.iter().enumerate() {
        let mut m = m.clone();
        m.headers.push(("X-Test-Index".into(), i.to_string()));
        c.mail_send(&m).await.unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(15), || sink.count() == sends.len()),
        "delivered {} of {}",
        sink.count(),
        sends.len()
    );
    let mut received = sink.received();
    // In the order sent (deliveries may overtake each other).
    let index_of = |m: &serde_json::Value| {
        let data = m["data"].as_str().unwrap_or("");
        let at = data.find("X-Test-Index: ").expect("the index header") + 14;
        data[at..at + 1].parse::<usize>().unwrap()
    };
    received.sort_by_key(index_of);
    let messages: Vec<String> = received
        .iter()
        .map(|m| m["data"].as_str().unwrap().to_owned())
        .collect();
    let results = verify(&records, &messages);
    eprintln!("{results:#?}");
    for (i, r) in results.iter().enumerate().take(4) {
        assert_eq!(r["signed"], true, "mail {i} is not signed");
        assert_eq!(r["verified"], true, "mail {i} does not verify");
        for tamper in [
            "from_added_top",
            "from_added_bottom",
            "subject_changed",
            "body_changed",
        ] {
            assert_eq!(r[tamper], false, "mail {i} still verifies with {tamper}");
        }
    }
    assert_eq!(
        results[4]["signed"], false,
        "a domain without a key is signed"
    );
    // (dkimpy refuses any message with two From headers by itself; the h= check
    // below is what shows From is signed twice.) Mail 1 has no Reply-To: it is
    // named in h= all the same, so one cannot be added.
    assert_eq!(
        results[1]["reply_to_added"], false,
        "a Reply-To could be added"
    );
    // One signature per message, d= the configured domain, From signed twice.
    let first = &messages[0];
    assert_eq!(first.matches("DKIM-Signature:").count(), 1);
    assert!(first.contains("d=rsa.example.org; s=s2026;"), "{first}");
    assert!(
        first.contains(
            "h=from:from:to:cc:reply-to:subject:date:message-id:mime-version:content-type;"
        )
    );
    assert!(messages[2].contains("a=ed25519-sha256; c=relaxed/relaxed; d=Ed.Example.org; s=ed1;"));
}

#[test]
fn a_missing_unreadable_or_mismatched_key_is_a_config_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ed_key = dir.path().join("ed.pem");
    keygen("example.org", "ed", "ed25519-sha256", &ed_key);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.pem");
    let cases = [
        (&missing, "rsa-sha256", "No such file"),
        (
            &ed_key,
            "rsa-sha256",
            "needs algorithm = \"ed25519-sha256\"",
        ),
        (&garbage, "ed25519-sha256", "not an ed25519 private key"),
    ];
    for (file, alg, says) in cases {
        let cfg = dir.path().join("satchel.toml");
        std::fs::write(&cfg, dkim_toml(&[("example.org", "s1", file, alg)])).unwrap();
        let o = Command::new(satchel_bin())
            .args(["check-config", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("mail.dkim"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains(says), "{alg} {}: {err}", file.display());
    }
    // A good entry passes, and check-config prints it without the key.
    let cfg = dir.path().join("satchel.toml");
    std::fs::write(
        &cfg,
        dkim_toml(&[("example.org", "ed", &ed_key, "ed25519-sha256")]),
    )
    .unwrap();
    let o = Command::new(satchel_bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(printed.contains("[[mail.dkim]]"), "{printed}");
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_broken_at_reload_is_logged_with_its_file_and_the_running_key_keeps_signing() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ed.pem");
    let (name, record) = keygen("example.org", "ed", "ed25519-sha256", &key);
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let toml = format!(
        "[mail]\nsmtp_url = \"smtp://127.0.0.1:{}?tls=none\"\n{}",
        sink.port,
        dkim_toml(&[("example.org", "ed", &key, "ed25519-sha256")])
    );
    let d = Daemon::start_with_config(&redis.url(), &toml, &[]);
    std::fs::write(&key, "not a key").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let logged = wait_until(Duration::from_secs(5), || {
        let log = d.log_text();
        log.contains("reload failed") && log.contains(&key.display().to_string())
    });
    assert!(logged, "{}", d.log_text());
    let c = d.client().await;
    c.mail_send(&mail("App <app@example.org>", "After a bad reload", false))
        .await
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || sink.count() == 1));
    let data = sink.received()[0]["data"].as_str().unwrap().to_owned();
    let r = verify(&serde_json::json!({ name: record }), &[data]);
    assert_eq!(r[0]["verified"], true, "{r:?}");
}
