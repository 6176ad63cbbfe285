//! `mail.isolate_by_uid`: each app (peer uid) sees and steers only its own mail;
//! `mail.admin_uids` see all. Real processes of three uids (two apps, and root as
//! the operator) talk to one daemon through the CLI.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use support::*;

const APP_A: u32 = 4242;
const APP_B: u32 = 4343;

/// Runs the CLI as `uid` (None: as this process, root); returns (exit code, stdout).
fn cli(socket: &std::path::Path, uid: Option<u32>, args: &[&str]) -> (i32, serde_json::Value) {
    let mut cmd = Command::new(satchel_bin());
    cmd.args(args).arg("--json").arg("--socket").arg(socket);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("run satchel");
    let text = String::from_utf8_lossy(&out.stdout);
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(text.trim()).unwrap_or(serde_json::Value::Null),
    )
}

fn send(socket: &std::path::Path, uid: Option<u32>, to: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "mail",
        "send",
        "--to",
        to,
        "--subject",
        "Results",
        "--text",
        "hi",
    ];
    args.extend_from_slice(extra);
    let (code, out) = cli(socket, uid, &args);
    assert_eq!(code, 0, "{uid:?} send: {out}");
    assert_eq!(out["duplicate"], false, "{out}");
    out["mail_id"].as_str().expect("mail_id").to_owned()
}

#[test]
fn one_app_cannot_see_list_cancel_retry_or_learn_of_another_apps_mail() {
    assert!(
        nix::unistd::getuid().is_root(),
        "this test runs clients as other uids and must run as root (CI does)"
    );
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let smtp = format!("smtp://127.0.0.1:{}", sink.port);
    let daemon = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_MAIL_ISOLATE_BY_UID", "true"),
            ("SATCHEL_MAIL_SMTP_URL", &smtp),
            ("SATCHEL_SERVER_SOCKET_MODE", "0666"),
        ],
    );
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = daemon.socket.as_path();
    let (a, b) = (Some(APP_A), Some(APP_B));

    // Both apps use the same idempotency key: two mails, neither a duplicate.
    let a_mail = send(s, a, "ann@example.com", &["--idempotency-key", "results-1"]);
    let b_mail = send(s, b, "bob@example.com", &["--idempotency-key", "results-1"]);
    assert_ne!(a_mail, b_mail);
    // A repeat by the same app is still a duplicate.
    let (_, again) = cli(
        s,
        a,
        &[
            "mail",
            "send",
            "--to",
            "ann@example.com",
            "--subject",
            "Results",
            "--text",
            "hi",
            "--idempotency-key",
            "results-1",
        ],
    );
    assert_eq!(
        (again["mail_id"].as_str(), again["duplicate"].as_bool()),
        (Some(a_mail.as_str()), Some(true))
    );

    // Each app sees its own; the other gets NOT_FOUND (exit 3), never FORBIDDEN.
    assert_eq!(cli(s, a, &["mail", "status", &a_mail]).0, 0);
    assert_eq!(cli(s, b, &["mail", "status", &a_mail]).0, 3);
    assert_eq!(cli(s, a, &["mail", "status", &b_mail]).0, 3);
    // The operator sees both, with their owners.
    let (code, st) = cli(s, None, &["mail", "status", &a_mail]);
    assert_eq!((code, st["uid"].as_u64()), (0, Some(APP_A as u64)), "{st}");
    assert!(
        wait_until(Duration::from_secs(20), || sink.count() >= 2),
        "both apps' mail is delivered"
    );

    // Dead mail: listed only to its owner (and the operator).
    let dead = send(s, a, "reject550@example.com", &[]);
    assert!(wait_until(Duration::from_secs(20), || {
        cli(s, a, &["mail", "status", &dead]).1["status"] == "dead"
    }));
    let listed = |uid: Option<u32>| -> Vec<serde_json::Value> {
        let (code, out) = cli(s, uid, &["mail", "dead"]);
        assert_eq!(code, 0, "{out}");
        out.as_array().cloned().unwrap_or_default()
    };
    assert!(listed(a).iter().any(|d| d["mail_id"] == dead.as_str()));
    assert!(
        listed(a).iter().all(|d| d.get("uid").is_none()),
        "an app's answer names no owner"
    );
    assert!(listed(b).is_empty(), "{:?}", listed(b));
    assert!(
        listed(None)
            .iter()
            .any(|d| d["mail_id"] == dead.as_str() && d["uid"].as_u64() == Some(APP_A as u64))
    );
    // B cannot retry it, nor tell it exists; A can.
    assert_eq!(cli(s, b, &["mail", "retry", &dead]).0, 3);
    assert_eq!(
        cli(s, a, &["mail", "status", &dead]).1["status"],
        "dead",
        "B's retry did nothing"
    );

    // A scheduled mail of A: B cannot cancel it (NOT_FOUND), A can.
    let later = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000)
        .to_string();
    let scheduled = send(s, a, "ann@example.com", &["--send-at-ms", &later]);
    assert_eq!(cli(s, b, &["mail", "cancel", &scheduled]).0, 3);
    assert_eq!(
        cli(s, a, &["mail", "status", &scheduled]).1["status"],
        "scheduled"
    );
    assert_eq!(cli(s, a, &["mail", "cancel", &scheduled]).0, 0);
    assert_eq!(
        cli(s, a, &["mail", "status", &scheduled]).1["status"],
        "cancelled"
    );

    // The operator steers anyone's mail.
    assert_eq!(
        cli(s, None, &["mail", "retry", &dead]),
        (0, serde_json::json!("queued"))
    );
}

#[test]
fn mail_queued_without_an_owner_is_visible_to_admins_only() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[("SATCHEL_MAIL_ENABLED", "false")]);
    let s = daemon.socket.clone();
    let id = send(&s, None, "ann@example.com", &[]);
    // As a mail of an older satchel would be: no owner recorded.
    let mut conn = redis.conn();
    let _: () = redis::cmd("HDEL")
        .arg(format!("satchel:m:s:{id}"))
        .arg("owner")
        .query(&mut conn)
        .unwrap();
    drop(daemon);
    let daemon = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_MAIL_ENABLED", "false"),
            ("SATCHEL_MAIL_ISOLATE_BY_UID", "true"),
            ("SATCHEL_MAIL_ADMIN_UIDS", "4444"),
        ],
    );
    // This process is not an admin now (root, admin_uids = [4444]): not its mail.
    assert_eq!(cli(&daemon.socket, None, &["mail", "status", &id]).0, 3);
    let daemon = {
        drop(daemon);
        Daemon::start(
            &redis.url(),
            &[
                ("SATCHEL_MAIL_ENABLED", "false"),
                ("SATCHEL_MAIL_ISOLATE_BY_UID", "true"),
            ],
        )
    };
    let (code, st) = cli(&daemon.socket, None, &["mail", "status", &id]);
    assert_eq!(code, 0, "an admin (root, the default) sees it");
    assert!(st.get("uid").is_none(), "no owner to name: {st}");
}

/// `mail events --since 0 --json` as `uid`: the events, one JSON object per line.
fn events(socket: &std::path::Path, uid: Option<u32>) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(satchel_bin());
    cmd.args(["mail", "events", "--since", "0", "--json", "--socket"])
        .arg(socket);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("run satchel");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect()
}

#[test]
fn each_app_follows_only_its_own_mails_events() {
    assert!(
        nix::unistd::getuid().is_root(),
        "this test runs clients as other uids and must run as root (CI does)"
    );
    let redis = RedisServer::start();
    let daemon = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_MAIL_ENABLED", "false"),
            ("SATCHEL_MAIL_ISOLATE_BY_UID", "true"),
            ("SATCHEL_SERVER_SOCKET_MODE", "0666"),
        ],
    );
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = daemon.socket.as_path();
    let a_mail = send(s, Some(APP_A), "ann@example.com", &[]);
    let b_mail = send(s, Some(APP_B), "bob@example.com", &[]);
    let a_events = events(s, Some(APP_A));
    assert_eq!(a_events.len(), 1, "{a_events:?}");
    assert_eq!(a_events[0]["mail_id"], a_mail.as_str());
    assert!(a_events[0].get("uid").is_none(), "{a_events:?}");
    let b_events = events(s, Some(APP_B));
    assert_eq!(b_events.len(), 1, "{b_events:?}");
    assert_eq!(b_events[0]["mail_id"], b_mail.as_str());
    // The operator sees both, each with its owner.
    let all = events(s, None);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0]["uid"], APP_A);
    assert_eq!(all[1]["uid"], APP_B);
}
