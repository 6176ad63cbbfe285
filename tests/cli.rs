//! The `satchel` CLI against a real daemon, Redis and SMTP server: what it prints and
//! the exit codes scripts rely on (0 ok, 2 invalid input, 3 not found, 4 unreachable).

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

struct Cli<'a> {
    socket: &'a std::path::Path,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(satchel_bin())
            .args(args)
            .arg("--socket")
            .arg(self.socket)
            .output()
            .expect("run satchel");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn mail_send_status_dead_retry_and_cancel_from_the_command_line() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = Daemon::start(
        &redis.url(),
        &[
            (
                "SATCHEL_MAIL_SMTP_URL",
                &format!("smtp://127.0.0.1:{}", sink.port),
            ),
            ("SATCHEL_MAIL_FROM", "app@example.org"),
            ("SATCHEL_MAIL_RETRY_BASE_MS", "100"),
        ],
    );
    let cli = Cli {
        socket: &daemon.socket,
    };
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.csv");
    std::fs::write(&report, "a,b\n1,2\n").unwrap();

    let (code, out, err) = cli.run(&[
        "mail",
        "send",
        "--json",
        "--to",
        "Ann <ann@example.com>",
        "--subject",
        "Results",
        "--text",
        "See attached",
        "--html",
        "<p>See attached</p>",
        "--attach",
        report.to_str().unwrap(),
        "--header",
        "X-Exam: 42",
    ]);
    assert_eq!(code, 0, "{err}");
    let sent = json(&out);
    let id = sent["mail_id"].as_str().unwrap().to_owned();
    assert_eq!(sent["status"], "queued");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (_, out, _) = cli.run(&["mail", "status", "--json", &id]);
            json(&out)["status"] == "sent"
        }),
        "never sent"
    );
    let got = sink.received();
    assert_eq!(got.len(), 1);
    let raw = got[0].to_string();
    assert!(
        raw.contains("report.csv") && raw.contains("text/csv") && raw.contains("X-Exam"),
        "{raw}"
    );

    // Human output names the fields.
    let (code, out, _) = cli.run(&["mail", "status", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("status: \"sent\""), "{out}");

    // A permanent failure shows up in `mail dead`, and `mail retry` queues it again.
    let (code, out, _) = cli.run(&[
        "mail",
        "send",
        "--json",
        "--to",
        "reject550@example.com",
        "--subject",
        "x",
        "--text",
        "y",
    ]);
    assert_eq!(code, 0);
    let dead_id = json(&out)["mail_id"].as_str().unwrap().to_owned();
    assert!(wait_until(Duration::from_secs(10), || {
        let (_, out, _) = cli.run(&["mail", "dead", "--json"]);
        json(&out)
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["mail_id"] == dead_id.as_str()))
    }));
    let (code, out, _) = cli.run(&["mail", "retry", &dead_id]);
    assert_eq!((code, out.as_str()), (0, "queued"));

    // A scheduled mail can be cancelled.
    let later = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000)
        .to_string();
    let (_, out, _) = cli.run(&[
        "mail",
        "send",
        "--json",
        "--to",
        "b@example.com",
        "--subject",
        "s",
        "--text",
        "t",
        "--send-at-ms",
        &later,
    ]);
    let later_id = json(&out)["mail_id"].as_str().unwrap().to_owned();
    assert_eq!(json(&out)["status"], "scheduled");
    assert_eq!(
        cli.run(&["mail", "cancel", &later_id]),
        (0, "cancelled".into(), String::new())
    );
}

#[test]
fn exit_codes_say_what_happened() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let cli = Cli {
        socket: &daemon.socket,
    };
    // not found
    assert_eq!(cli.run(&["mail", "status", "no-such-mail"]).0, 3);
    assert_eq!(cli.run(&["cache", "get", "missing"]).0, 3);
    // invalid input: the daemon's INVALID_MAIL / BAD_REQUEST, and a file that is not there
    let (code, _, err) = cli.run(&[
        "mail",
        "send",
        "--to",
        "not an address",
        "--subject",
        "s",
        "--text",
        "t",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("INVALID_MAIL"), "{err}");
    assert_eq!(
        cli.run(&[
            "mail",
            "send",
            "--to",
            "a@b.c",
            "--subject",
            "s",
            "--text",
            "t",
            "--attach",
            "/nonexistent/file"
        ])
        .0,
        2
    );
    assert_eq!(
        cli.run(&["cache", "set", "k", "{not json", "--json-value"])
            .0,
        2
    );
    // ok
    let (code, out, _) = cli.run(&["cache", "set", "k", "{\"a\": [1, 2]}", "--json-value"]);
    assert_eq!((code, out.as_str()), (0, "stored"));
    let (code, out, _) = cli.run(&["cache", "get", "k", "--json"]);
    assert_eq!((code, json(&out)), (0, serde_json::json!({"a": [1, 2]})));
    let (code, out, _) = cli.run(&["stats", "--json"]);
    assert_eq!(code, 0);
    assert!(json(&out)["cache"]["sets"].as_u64() == Some(1));
    // stats for Prometheus: every sample line is `name value`, described and typed
    // just above it.
    let (code, out, _) = cli.run(&["stats", "--prometheus"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 3 && lines.len().is_multiple_of(3), "{out}");
    for triple in lines.chunks(3) {
        let (name, value) = triple[2].split_once(' ').expect("name value");
        assert!(
            name.starts_with("satchel_")
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name}"
        );
        assert!(value.parse::<f64>().is_ok(), "{value}");
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        assert!(
            triple[0].starts_with(&format!("# HELP {name} stats: ")),
            "{}",
            triple[0]
        );
        assert_eq!(triple[1], format!("# TYPE {name} {kind}"));
    }
    assert!(lines.contains(&"satchel_cache_sets_total 1"), "{out}");
    assert!(lines.contains(&"satchel_redis_connected 1"), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("satchel_requests_total "))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("satchel_mail_queue_depth "))
    );
    assert_eq!(cli.run(&["stats", "--prometheus", "--json"]).0, 2);
    // unreachable
    let gone = Cli {
        socket: std::path::Path::new("/nonexistent/satchel.sock"),
    };
    let (code, _, err) = gone.run(&["ping"]);
    assert_eq!(code, 4, "{err}");
}

/// Runs the CLI with its stdout already closed by the reader (as `| head -0`
/// would), and returns (exit code, stderr).
fn run_into_closed_pipe(args: &[&str]) -> (Option<i32>, String) {
    use std::process::Stdio;
    let mut child = Command::new(satchel_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run satchel");
    drop(child.stdout.take()); // the reader goes away before anything is written
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_subcommand_exits_quietly_when_its_reader_goes_away() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let socket = daemon.socket.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "").unwrap();
    Cli {
        socket: &daemon.socket,
    }
    .run(&["cache", "set", "k", "v"]);
    for args in [
        vec!["--socket", socket, "ping"],
        vec!["--socket", socket, "stats"],
        vec!["--socket", socket, "stats", "--prometheus"],
        vec!["--socket", socket, "--json", "stats"],
        vec!["--socket", socket, "cache", "get", "k"],
        vec!["--socket", socket, "mail", "dead"],
        vec!["check-config", "--config", cfg.to_str().unwrap()],
    ] {
        let (code, err) = run_into_closed_pipe(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} printed to stderr: {err}");
    }
}

#[test]
fn socket_and_json_are_accepted_before_or_after_the_subcommand() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let daemon = Daemon::start(
        &redis.url(),
        &[(
            "SATCHEL_MAIL_SMTP_URL",
            &format!("smtp://127.0.0.1:{}", sink.port),
        )],
    );
    let socket = daemon.socket.to_str().unwrap();
    for args in [
        vec!["--socket", socket, "--json", "mail", "send"],
        vec!["mail", "--socket", socket, "send", "--json"],
        vec!["mail", "send", "--socket", socket, "--json"],
    ] {
        let out = Command::new(satchel_bin())
            .args(&args)
            .args(["--to", "ann@example.com", "--subject", "s", "--text", "t"])
            .env_remove("SATCHEL_SOCKET")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sent = json(String::from_utf8_lossy(&out.stdout).trim());
        assert_eq!(sent["status"], "queued", "{args:?}");
    }
    // SATCHEL_SOCKET is the fallback when --socket is not given.
    let out = Command::new(satchel_bin())
        .args(["ping"])
        .env("SATCHEL_SOCKET", socket)
        .output()
        .unwrap();
    assert!(out.status.success());
}
