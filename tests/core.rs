//! The daemon core over the real socket, against a real redis-server.

mod support;

use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rmpv::Value;
use satchel::ClientError;
use satchel::protocol::ErrorCode;
use support::*;

fn bad_request_then_still_usable(body: &[u8], want_id: Option<u64>) {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let mut s = daemon.raw();
    s.write_all(&frame(body)).unwrap();
    let (id, ok, err) = decode(&read_frame(&mut s).expect("an error frame"));
    assert!(!ok);
    assert_eq!(code(&err), "BAD_REQUEST", "{err}");
    assert_eq!(id, want_id);
    s.write_all(&frame(&request(9, "ping", |_| 0))).unwrap();
    let (id, ok, result) = decode(&read_frame(&mut s).expect("connection still usable"));
    assert_eq!((id, ok, result.as_str()), (Some(9), true, Some("pong")));
}

#[tokio::test]
async fn hello_ping_and_stats_answer() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    let hello = c.hello().await.unwrap();
    assert_eq!(field(&hello, "protocol").as_u64(), Some(1));
    assert!(
        field(&hello, "server")
            .as_str()
            .unwrap()
            .starts_with("satchel/")
    );
    assert_eq!(field(&hello, "max_frame").as_u64(), Some(8 * 1024 * 1024));
    assert_eq!(field(&hello, "max_inflight").as_u64(), Some(1024));
    let ops: Vec<&str> = field(&hello, "ops")
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for op in ["hello", "ping", "stats"] {
        assert!(ops.contains(&op), "{ops:?}");
    }
    assert_eq!(c.call("ping", vec![]).await.unwrap().as_str(), Some("pong"));
    let stats = c.stats().await.unwrap();
    for key in ["uptime_ms", "connections", "requests", "errors"] {
        assert!(field(&stats, key).is_u64(), "{key} in {stats}");
    }
    assert!(field(&stats, "requests").as_u64().unwrap() >= 3);
    assert_eq!(
        field(field(&stats, "redis"), "connected").as_bool(),
        Some(true)
    );
    let health = c.call("health", vec![]).await.unwrap();
    assert_eq!(
        field(field(&health, "redis"), "connected").as_bool(),
        Some(true)
    );
}

#[tokio::test]
async fn hello_negotiates_down_and_rejects_bad_versions() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    let hello = c
        .call("hello", vec![("protocol", Value::from(7))])
        .await
        .unwrap();
    assert_eq!(field(&hello, "protocol").as_u64(), Some(1));
    let err = c
        .call("hello", vec![("protocol", Value::from("one"))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    assert!(err.to_string().contains("protocol"), "{err}");
    let err = c
        .call("hello", vec![("protocol", Value::from(0))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
}

#[tokio::test]
async fn unknown_op_is_typed_and_unknown_fields_are_ignored() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    let err = c.call("cache.frobnicate", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownOp));
    let pong = c
        .call("ping", vec![("some_future_field", Value::from(true))])
        .await
        .unwrap();
    assert_eq!(pong.as_str(), Some("pong"));
}

#[test]
fn garbage_body_is_bad_request_and_connection_survives() {
    bad_request_then_still_usable(&[0xc1, 0xff, 0x00], None);
}

#[test]
fn non_map_body_is_bad_request_and_connection_survives() {
    let mut w = satchel::protocol::msgpack::Writer::new();
    w.array(2).uint(1).str("ping");
    bad_request_then_still_usable(w.as_slice(), None);
}

#[test]
fn missing_id_is_bad_request_and_connection_survives() {
    let mut w = satchel::protocol::msgpack::Writer::new();
    w.map(1).str("op").str("ping");
    bad_request_then_still_usable(w.as_slice(), None);
}

#[test]
fn wrong_op_type_is_bad_request_with_the_id() {
    let mut w = satchel::protocol::msgpack::Writer::new();
    w.map(2).str("id").uint(5).str("op").uint(3);
    bad_request_then_still_usable(w.as_slice(), Some(5));
}

#[test]
fn oversize_length_prefix_gets_too_large_and_close_without_hurting_others() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_SERVER_MAX_FRAME_BYTES", "65536"),
            ("SATCHEL_CACHE_MAX_VALUE_BYTES", "32768"),
        ],
    );
    let mut other = daemon.raw();
    let mut s = daemon.raw();
    // One write: the daemon may close as soon as it has read the length prefix, and a
    // second write would then fail with EPIPE.
    let mut oversize = (65537u32).to_be_bytes().to_vec();
    oversize.extend_from_slice(&[0u8; 100]);
    s.write_all(&oversize).unwrap();
    let (id, ok, err) = decode(&read_frame(&mut s).expect("TOO_LARGE frame"));
    assert_eq!((id, ok, code(&err)), (None, false, "TOO_LARGE"));
    assert!(
        read_frame(&mut s).is_none(),
        "connection must be closed after TOO_LARGE"
    );
    other.write_all(&frame(&request(1, "ping", |_| 0))).unwrap();
    let (id, ok, _) = decode(&read_frame(&mut other).expect("other client still served"));
    assert_eq!((id, ok), (Some(1), true));
}

#[test]
fn ten_thousand_pipelined_requests_are_all_answered_with_matching_ids() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let mut s = daemon.raw();
    let mut writer = s.try_clone().unwrap();
    const N: u64 = 10_000;
    let sender = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for id in 1..=N {
            let op = if id % 3 == 0 { "stats" } else { "ping" };
            buf.extend_from_slice(&frame(&request(id, op, |_| 0)));
        }
        writer.write_all(&buf).unwrap();
    });
    let mut seen = vec![false; N as usize + 1];
    for _ in 0..N {
        let (id, ok, _) = decode(&read_frame(&mut s).expect("a response"));
        let id = id.expect("id") as usize;
        assert!(ok);
        assert!(!seen[id], "id {id} answered twice");
        seen[id] = true;
    }
    sender.join().unwrap();
    assert!(seen[1..].iter().all(|&b| b), "every id answered");
}

/// Writes `n` pings, each with its own `write()`, and only then reads: the daemon
/// must keep reading while its answers wait in its output buffer (it used to write
/// one small frame per syscall, fill the socket, block, stop reading, and hang).
fn pipeline_with_one_write_per_request(n: u64) {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let mut s = daemon.raw();
    let started = Instant::now();
    for id in 1..=n {
        s.write_all(&frame(&request(id, "ping", |_| 0)))
            .unwrap_or_else(|e| panic!("write {id} of {n} blocked or failed: {e}"));
    }
    let mut seen = vec![false; n as usize + 1];
    for _ in 0..n {
        let (id, ok, _) = decode(&read_frame(&mut s).expect("an answer within the read timeout"));
        let id = id.expect("id") as usize;
        assert!(ok && !seen[id], "id {id}");
        seen[id] = true;
    }
    assert!(seen[1..].iter().all(|&b| b));
    eprintln!(
        "{n} pings, one write each, then read: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_client_that_writes_1000_requests_one_write_each_before_reading_gets_every_answer() {
    pipeline_with_one_write_per_request(1000);
}

#[test]
fn a_client_that_writes_5000_requests_one_write_each_before_reading_gets_every_answer() {
    pipeline_with_one_write_per_request(5000);
}

#[test]
fn the_inflight_gauge_comes_down_when_a_client_hangs_up_mid_request() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    {
        let mut s = daemon.raw();
        // One answer comes back quickly and finds the client gone; the daemon then
        // drops the connection with the long ping still in flight.
        s.write_all(&frame(&request(1, "ping", |w| {
            w.str("delay_ms").uint(20_000);
            1
        })))
        .unwrap();
        s.write_all(&frame(&request(2, "ping", |w| {
            w.str("delay_ms").uint(100);
            1
        })))
        .unwrap();
        assert!(daemon.wait_inflight(3), "both pings in flight");
    }
    // Long before the 20 s ping would end, only the probing `stats` is in flight.
    let mut probe = daemon.raw();
    let came_down = wait_until(Duration::from_secs(5), || {
        probe
            .write_all(&frame(&request(1, "stats", |_| 0)))
            .unwrap();
        let (_, _, stats) = decode(&read_frame(&mut probe).unwrap());
        field(&stats, "inflight").as_u64() == Some(1)
    });
    assert!(came_down, "inflight leaked after the client hung up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_connections_are_served() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let mut clients = Vec::new();
    for _ in 0..300 {
        clients.push(daemon.client().await);
    }
    // Connections are admitted by the accept loop asynchronously: the last few may
    // still be in the listen backlog when the first one asks.
    let first = clients[0].clone();
    let all_admitted = eventually(Duration::from_secs(5), || {
        let c = first.clone();
        async move {
            let stats = c.stats().await.unwrap();
            field(&stats, "connections").as_u64().unwrap() >= 300
        }
    })
    .await;
    assert!(all_admitted, "{}", clients[0].stats().await.unwrap());
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(async move { c.call("ping", vec![]).await }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().as_str(), Some("pong"));
    }
}

#[test]
fn connections_above_max_connections_get_a_clear_error() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[("SATCHEL_SERVER_MAX_CONNECTIONS", "2")]);
    let held: Vec<_> = (0..2).map(|_| daemon.raw()).collect();
    // Let the daemon count both before the third arrives.
    assert!(wait_until(Duration::from_secs(5), || {
        let mut probe = daemon.raw();
        match read_frame(&mut probe) {
            Some(f) => {
                let (id, ok, err) = decode(&f);
                id.is_none() && !ok && code(&err) == "UNAVAILABLE"
            }
            None => false,
        }
    }));
    drop(held);
}

#[test]
fn a_client_that_never_reads_does_not_grow_the_daemon() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let rss_before = daemon.rss_kib();
    let s = daemon.raw();
    s.set_nonblocking(true).unwrap();
    let mut s = s;
    let chunk: Vec<u8> = (1..=1000u64)
        .flat_map(|id| frame(&request(id, "stats", |_| 0)))
        .collect();
    let mut written = 0usize;
    let mut stalled_since: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Write until the daemon has stopped reading for a whole second.
    while Instant::now() < deadline {
        match s.write(&chunk) {
            Ok(n) => {
                written += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    assert!(
        stalled_since.is_some(),
        "the daemon kept reading {written} bytes from a client that never reads"
    );
    // What the daemon may hold for a client that never reads: its answers, up to
    // max_output_bytes_per_conn (4 MiB) plus one, the requests in flight (at most
    // max_inflight_bytes_per_conn, 4 MiB), and the kernel's socket buffers on both
    // sides (a few MiB on Linux). 64 MiB is far above that and far below unbounded.
    assert!(
        written < 64 * 1024 * 1024,
        "daemon buffered {written} bytes"
    );
    let grown = daemon.rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "daemon RSS grew by {grown} KiB");
    // Everyone else is still served.
    let mut other = daemon.raw();
    other.write_all(&frame(&request(1, "ping", |_| 0))).unwrap();
    assert!(read_frame(&mut other).is_some());
}

#[test]
fn peers_not_in_allow_lists_get_forbidden_and_are_closed() {
    let redis = RedisServer::start();
    let me = nix::unistd::getuid().as_raw();
    let daemon = Daemon::start(
        &redis.url(),
        &[("SATCHEL_SERVER_ALLOW_UIDS", &(me + 4242).to_string())],
    );
    // wait_ready's ping was refused too, so use spawn+poll on FORBIDDEN instead.
    let mut s = daemon.raw();
    let (id, ok, err) = decode(&read_frame(&mut s).expect("FORBIDDEN frame"));
    assert_eq!((id, ok, code(&err)), (None, false, "FORBIDDEN"));
    assert!(read_frame(&mut s).is_none(), "closed after FORBIDDEN");
}

#[test]
fn peers_in_allow_lists_are_served() {
    let redis = RedisServer::start();
    let me = nix::unistd::getuid().as_raw();
    let daemon = Daemon::start(
        &redis.url(),
        &[("SATCHEL_SERVER_ALLOW_UIDS", &format!("4242,{me}"))],
    );
    let mut s = daemon.raw();
    s.write_all(&frame(&request(1, "ping", |_| 0))).unwrap();
    assert!(decode(&read_frame(&mut s).unwrap()).1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_fast_with_unavailable_and_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let c = daemon.client().await;
    c.call("health", vec![]).await.unwrap();
    redis.stop();
    // The first request may be the one that discovers the outage; all of them must
    // come back quickly with UNAVAILABLE (or TIMEOUT) and never hang.
    for _ in 0..20 {
        let started = Instant::now();
        let err = c.call("health", vec![]).await.unwrap_err();
        let elapsed = started.elapsed();
        assert!(matches!(err.code(), Some(ErrorCode::Unavailable)), "{err}");
        if let ClientError::Server { retry_after_ms, .. } = &err {
            assert!(
                retry_after_ms.is_some(),
                "UNAVAILABLE carries retry_after_ms"
            );
        }
        assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    }
    // Redis-free ops keep answering.
    c.ping().await.unwrap();
    c.hello().await.unwrap();
    let stats = c.stats().await.unwrap();
    assert_eq!(
        field(field(&stats, "redis"), "connected").as_bool(),
        Some(false)
    );
    redis.restart();
    let recovered = eventually(Duration::from_secs(10), || {
        let c = c.clone();
        async move { c.call("health", vec![]).await.is_ok() }
    })
    .await;
    assert!(
        recovered,
        "daemon did not reconnect; log:\n{}",
        daemon.log_text()
    );
}

#[tokio::test]
async fn starts_without_redis_and_connects_when_it_appears() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let daemon = Daemon::start(&format!("redis://127.0.0.1:{port}"), &[]);
    let c = daemon.client().await;
    let stats = c.stats().await.unwrap();
    assert_eq!(
        field(field(&stats, "redis"), "connected").as_bool(),
        Some(false)
    );
    let err = c.call("health", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable));
    assert!(
        daemon.log_text().contains("redis-server"),
        "log says how to start redis"
    );
    let _redis = RedisServer::start_on(port);
    let connected = eventually(Duration::from_secs(10), || {
        let c = c.clone();
        async move { c.call("health", vec![]).await.is_ok() }
    })
    .await;
    assert!(connected, "daemon did not connect once redis appeared");
}

#[test]
fn sigterm_answers_what_was_read_refuses_new_work_and_exits_zero() {
    let redis = RedisServer::start();
    let mut daemon = Daemon::start(&redis.url(), &[]);
    let mut s = daemon.raw();
    for id in 1..=20 {
        s.write_all(&frame(&request(id, "ping", |w| {
            w.str("delay_ms").uint(700);
            1
        })))
        .unwrap();
    }
    // Wait until the daemon has read all 20 (they are in flight).
    assert!(daemon.wait_inflight(21));
    daemon.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(&frame(&request(100, "ping", |_| 0))).unwrap();
    let mut answered = Vec::new();
    let mut refused = Vec::new();
    while let Some(f) = read_frame(&mut s) {
        let (id, ok, body) = decode(&f);
        if ok {
            answered.push(id.unwrap());
        } else {
            assert_eq!(code(&body), "SHUTTING_DOWN");
            refused.push(id.unwrap());
        }
    }
    answered.sort();
    assert_eq!(answered, (1..=20).collect::<Vec<_>>());
    assert_eq!(refused, vec![100]);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("daemon exited");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        daemon.log_text()
    );
    assert!(
        path_gone(&daemon.socket),
        "socket file removed on clean exit"
    );
}

#[test]
fn a_stale_socket_file_is_replaced_and_a_live_one_is_not_stolen() {
    let redis = RedisServer::start();
    let first = Daemon::start(&redis.url(), &[]);
    // A second daemon on the same path must refuse to start.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(satchel_bin())
        .arg("serve")
        .env("SATCHEL_SERVER_SOCKET", &first.socket)
        .env("SATCHEL_REDIS_URL", redis.url())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listening on it"), "{stderr}");
    // The first is untouched.
    let mut s = first.raw();
    s.write_all(&frame(&request(1, "ping", |_| 0))).unwrap();
    assert!(read_frame(&mut s).is_some());

    // A socket file left by a dead process is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let daemon = Daemon::start(
        &redis.url(),
        &[("SATCHEL_SERVER_SOCKET", stale.to_str().unwrap())],
    );
    let mut s = std::os::unix::net::UnixStream::connect(&stale).unwrap();
    s.write_all(&frame(&request(1, "ping", |_| 0))).unwrap();
    assert!(read_frame(&mut s).is_some());
    drop(daemon);
}

#[test]
fn socket_mode_follows_the_config() {
    use std::os::unix::fs::PermissionsExt;
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[("SATCHEL_SERVER_SOCKET_MODE", "0600")]);
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn check_config_prints_the_effective_config_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[server]\nmax_connections = 12\n").unwrap();
    let out = std::process::Command::new(satchel_bin())
        .args(["check-config", "--config"])
        .arg(&good)
        .env("SATCHEL_REDIS_PREFIX", "myapp")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_connections = 12"), "{text}");
    assert!(text.contains("prefix = \"myapp\""), "{text}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[redis]\nurll = \"x\"\n").unwrap();
    let out = std::process::Command::new(satchel_bin())
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("urll"));
}

#[test]
fn a_second_stop_signal_exits_at_once() {
    let redis = RedisServer::start();
    let mut daemon = Daemon::start(&redis.url(), &[]);
    let mut s = daemon.raw();
    s.write_all(&frame(&request(1, "ping", |w| {
        w.str("delay_ms").uint(30_000);
        1
    })))
    .unwrap();
    assert!(daemon.wait_inflight(2));
    daemon.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        daemon.wait_exit(Duration::from_millis(10)).is_none(),
        "first SIGTERM waits for the 30 s ping"
    );
    daemon.signal(Signal::SIGINT);
    let status = daemon
        .wait_exit(Duration::from_secs(5))
        .expect("exited after the second signal");
    assert_eq!(status.code(), Some(1));
}

#[test]
fn sighup_applies_a_changed_config_to_new_connections() {
    let redis = RedisServer::start();
    let me = nix::unistd::getuid().as_raw();
    let daemon = Daemon::start_with_config(
        &redis.url(),
        "[server]\nmax_inflight_per_conn = 1024\n",
        &[],
    );
    let config = daemon.dir.path().join("satchel.toml");
    std::fs::write(&config, format!("[server]\nallow_uids = [{}]\n", me + 4242)).unwrap();
    daemon.signal(Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let mut s = daemon.raw();
            let _ = s.write_all(&frame(&request(1, "ping", |_| 0)));
            read_frame(&mut s)
                .map(|f| code(&decode(&f).2) == "FORBIDDEN")
                .unwrap_or(false)
        }),
        "reloaded allow_uids not applied; log:\n{}",
        daemon.log_text()
    );
    // A broken file is rejected and the running config kept.
    std::fs::write(&config, "[server]\nmax_connections = \"many\"\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || daemon
        .log_text()
        .contains("reload failed")));
    let mut s = daemon.raw();
    let (_, _, err) = decode(&read_frame(&mut s).unwrap());
    assert_eq!(code(&err), "FORBIDDEN");
}

#[test]
fn root_gets_the_system_socket_whatever_xdg_runtime_dir_says() {
    // The daemon's default, as check-config reports it; the same rule as every
    // client (protocol.md, "Transport"). Tests run as root in CI; as another user
    // the non-root half of the rule is checked instead.
    let out = std::process::Command::new(satchel_bin())
        .arg("check-config")
        .env_remove("SATCHEL_SERVER_SOCKET")
        .env("XDG_RUNTIME_DIR", "/tmp/xdg-of-root")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let uid = nix::unistd::getuid().as_raw();
    let want = if uid == 0 {
        "socket = \"/run/satchel/satchel.sock\"".to_owned()
    } else {
        "socket = \"/tmp/xdg-of-root/satchel/satchel.sock\"".to_owned()
    };
    assert!(text.contains(&want), "uid {uid}: {text}");
    for (u, xdg, path) in [
        (0, Some("/run/user/0"), "/run/satchel/satchel.sock"),
        (0, None, "/run/satchel/satchel.sock"),
        (
            1000,
            Some("/run/user/1000"),
            "/run/user/1000/satchel/satchel.sock",
        ),
        (1000, Some(""), "/tmp/satchel-1000/satchel.sock"),
        (1000, None, "/tmp/satchel-1000/satchel.sock"),
    ] {
        assert_eq!(
            satchel::config::default_socket_path_for(u, xdg.map(std::ffi::OsStr::new)),
            std::path::PathBuf::from(path)
        );
    }
}

#[test]
fn a_socket_given_on_the_command_line_replaces_server_socket() {
    let out = std::process::Command::new(satchel_bin())
        .args(["--socket", "/tmp/elsewhere.sock", "check-config"])
        .env("SATCHEL_SERVER_SOCKET", "/tmp/from-env.sock")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("socket = \"/tmp/elsewhere.sock\""), "{text}");
}
