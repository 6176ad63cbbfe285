//! Fault and abuse suite (issue 6), cache and core part: real processes, killed,
//! paused and restarted; hostile clients. RELIABILITY.md reports what these measure.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rmpv::Value;
use satchel::ClientError;
use support::*;

/// Per-op bound used to detect hangs: far above any configured timeout.
const HANG: Duration = Duration::from_secs(5);

fn code_str(e: &ClientError) -> String {
    match e {
        ClientError::Server { code, .. } => code.clone(),
        other => format!("{other}"),
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: HashMap<String, u64>,
    wrong_answers: Vec<String>,
}

/// Each worker owns its keys and remembers what it wrote, so a get can be checked:
/// it must return the last acknowledged value or a value whose write failed
/// ambiguously after it (a TIMEOUT may have applied), never anything else.
async fn cache_worker(c: satchel::Client, worker: usize, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let mut possible: HashMap<String, Vec<u64>> = HashMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("w{worker}:k{}", n % 20);
        let set = tokio::time::timeout(HANG, c.cache_set(&key, Value::from(n), None, &[])).await;
        match set.expect("cache.set hung") {
            Ok(()) => {
                tally.ok += 1;
                possible.insert(key.clone(), vec![n]);
            }
            Err(e) => {
                *tally.errors.entry(code_str(&e)).or_default() += 1;
                possible.entry(key.clone()).or_default().push(n);
            }
        }
        let got = tokio::time::timeout(HANG, c.cache_get(&key)).await;
        match got.expect("cache.get hung") {
            Ok(v) => {
                tally.ok += 1;
                let allowed = possible.get(&key).cloned().unwrap_or_default();
                let fine = match &v {
                    Some(v) => v.as_u64().is_some_and(|x| allowed.contains(&x)),
                    // A miss is wrong only if a write to this key was acknowledged.
                    None => allowed.len() > 1 || allowed.is_empty() || !tally.errors.is_empty(),
                };
                if !fine {
                    tally
                        .wrong_answers
                        .push(format!("{key}: got {v:?}, allowed {allowed:?}"));
                }
            }
            Err(e) => *tally.errors.entry(code_str(&e)).or_default() += 1,
        }
    }
    tally
}

async fn run_workers(
    daemon: &Daemon,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    let mut handles = Vec::new();
    for w in 0..workers {
        let c = daemon.client().await;
        handles.push(tokio::spawn(cache_worker(c, w, stop.clone())));
    }
    handles
}

async fn collect(handles: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut all = Tally::default();
    for h in handles {
        let t = h.await.unwrap();
        all.ok += t.ok;
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
        all.wrong_answers.extend(t.wrong_answers);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load_gives_unavailable_never_wrong_answers_and_recovers() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let daemon = Daemon::start(&redis.url(), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = run_workers(&daemon, 8, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.restart();
    let restarted = Instant::now();
    let probe = daemon.client().await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let p = probe.clone();
            async move { p.cache_get("w0:k1").await.is_ok() }
        })
        .await,
        "daemon did not recover by itself"
    );
    let recovery = restarted.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let tally = collect(handles).await;
    eprintln!(
        "redis restart: {} ok, errors {:?}, recovered {recovery:?} after restart",
        tally.ok, tally.errors
    );
    assert!(
        tally.wrong_answers.is_empty(),
        "wrong answers: {:?}",
        tally.wrong_answers
    );
    assert!(!tally.errors.is_empty(), "the outage was not observed");
    for code in tally.errors.keys() {
        assert!(
            code == "UNAVAILABLE" || code == "TIMEOUT",
            "unexpected error {code}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_times_out_within_the_bound_piles_nothing_up_and_resumes() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(
        &redis.url(),
        &[("SATCHEL_REDIS_RESPONSE_TIMEOUT_MS", "1000")],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let handles = run_workers(&daemon, 8, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.pause();
    let paused = Instant::now();
    let probe = daemon.client().await;
    let mut max_inflight = 0;
    let mut slowest = Duration::ZERO;
    while paused.elapsed() < Duration::from_secs(5) {
        let t0 = Instant::now();
        let r = tokio::time::timeout(HANG, probe.cache_get("w0:k1"))
            .await
            .expect("hung while paused");
        slowest = slowest.max(t0.elapsed());
        if let Err(e) = r {
            assert!(
                matches!(code_str(&e).as_str(), "TIMEOUT" | "UNAVAILABLE"),
                "{e}"
            );
        }
        let stats = probe.stats().await.unwrap();
        max_inflight = max_inflight.max(field(&stats, "inflight").as_u64().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis.resume();
    assert!(
        eventually(Duration::from_secs(10), || {
            let p = probe.clone();
            async move { p.cache_get("w0:k1").await.is_ok() }
        })
        .await,
        "traffic did not resume after SIGCONT"
    );
    stop.store(true, Ordering::Relaxed);
    let tally = collect(handles).await;
    eprintln!(
        "redis paused 5 s: slowest request {slowest:?}, max inflight {max_inflight}, errors {:?}",
        tally.errors
    );
    assert!(
        slowest < Duration::from_millis(2500),
        "a request took {slowest:?} (response timeout is 1 s)"
    );
    assert!(
        max_inflight <= 32,
        "requests piled up: {max_inflight} in flight"
    );
    assert!(tally.wrong_answers.is_empty(), "{:?}", tally.wrong_answers);
    for code in tally.errors.keys() {
        assert!(
            code == "UNAVAILABLE" || code == "TIMEOUT",
            "unexpected error {code}"
        );
    }
}

#[test]
fn sigterm_under_full_load_answers_everything_read_and_exits_zero() {
    let redis = RedisServer::start();
    let mut daemon = Daemon::start(&redis.url(), &[]);
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for conn in 0..16u64 {
        let s = daemon.raw();
        let mut w = s.try_clone().unwrap();
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut id = 0u64;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let body = if id.is_multiple_of(2) {
                    request(id, "cache.get", |w| {
                        w.str("key").str(&format!("c{conn}"));
                        1
                    })
                } else {
                    request(id, "cache.set", |w| {
                        w.str("key").str(&format!("c{conn}")).str("value").uint(id);
                        2
                    })
                };
                if w.write_all(&frame(&body)).is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        });
        readers.push(std::thread::spawn(move || {
            let mut s = s;
            let (mut ok, mut refused, mut other) = (0u64, 0u64, Vec::new());
            while let Some(f) = read_frame(&mut s) {
                let (_, is_ok, body) = decode(&f);
                if is_ok {
                    ok += 1;
                } else if code(&body) == "SHUTTING_DOWN" {
                    refused += 1;
                } else {
                    other.push(body.to_string());
                }
            }
            (ok, refused, other)
        }));
    }
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(12))
        .expect("exit within shutdown_timeout_ms");
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut refused) = (0, 0);
    for r in readers {
        let (o, s, other) = r.join().unwrap();
        assert!(other.is_empty(), "unexpected errors: {other:?}");
        ok += o;
        refused += s;
    }
    eprintln!(
        "SIGTERM under load: {ok} answered, {refused} SHUTTING_DOWN, {} sent, exit after {took:?}",
        sent.load(Ordering::Relaxed)
    );
    assert!(status.success(), "{status:?}");
    assert!(ok > 0);
    assert!(ok + refused <= sent.load(Ordering::Relaxed));
    assert!(path_gone(&daemon.socket));
}

fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[test]
fn two_thousand_connections_beyond_max_connections_get_a_clear_error_not_a_hang() {
    raise_nofile();
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let rss_before = daemon.rss_kib();
    let conns: Vec<UnixStream> = (0..2000)
        .map(|_| {
            let s = UnixStream::connect(&daemon.socket).expect("connect");
            s.set_read_timeout(Some(HANG)).unwrap();
            s
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    for (i, s) in conns.iter().enumerate() {
        let mut s = s.try_clone().unwrap();
        let _ = s.write_all(&frame(&request(i as u64, "ping", |_| 0)));
        let f = read_frame(&mut s).expect("every connection gets an answer, none hangs");
        let (id, ok, body) = decode(&f);
        if ok {
            served += 1;
        } else {
            assert_eq!((id, code(&body)), (None, "UNAVAILABLE"), "{body}");
            assert!(body.to_string().contains("max_connections"), "{body}");
            refused += 1;
        }
    }
    eprintln!(
        "2000 connections: {served} served, {refused} refused; RSS {} -> {} KiB",
        rss_before,
        daemon.rss_kib()
    );
    assert_eq!(served, 1024, "max_connections is 1024");
    assert_eq!(refused, 976);
    assert!(daemon.rss_kib() < rss_before + 128 * 1024);
    drop(conns);
    // Slots are released: a new client is served again.
    assert!(wait_until(Duration::from_secs(5), || {
        let mut s = daemon.raw();
        let _ = s.write_all(&frame(&request(1, "ping", |_| 0)));
        read_frame(&mut s).map(|f| decode(&f).1).unwrap_or(false)
    }));
}

/// Pings on a fresh connection while something else goes on; returns the slowest.
fn ping_latency_while(daemon: &Daemon, busy: impl Fn() -> bool) -> Duration {
    let mut s = daemon.raw();
    let mut slowest = Duration::ZERO;
    let mut id = 0;
    while busy() {
        id += 1;
        let t0 = Instant::now();
        s.write_all(&frame(&request(id, "ping", |_| 0))).unwrap();
        assert!(read_frame(&mut s).is_some(), "ping not answered");
        slowest = slowest.max(t0.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    slowest
}

#[test]
fn a_client_sending_one_byte_at_a_time_does_not_slow_others() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let mut slow = daemon.raw();
    let msg = frame(&request(1, "ping", |_| 0));
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        for b in &msg {
            slow.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
        let (id, ok, _) = decode(&read_frame(&mut slow).expect("the slow request is answered too"));
        assert_eq!((id, ok), (Some(1), true));
    });
    let slowest = ping_latency_while(&daemon, || started.elapsed() < Duration::from_secs(2));
    writer.join().unwrap();
    eprintln!("one byte per 150 ms: other client's slowest ping {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
}

#[test]
fn a_flood_of_1mib_values_keeps_rss_bounded_and_others_served() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let value = vec![0x42u8; 1024 * 1024 - 16];
    let done = Arc::new(AtomicBool::new(false));
    let pid = daemon.pid();
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut floods = Vec::new();
    for conn in 0..4 {
        let s = daemon.raw();
        let mut w = s.try_clone().unwrap();
        let value = value.clone();
        let writer = std::thread::spawn(move || {
            for id in 0..150u64 {
                let body = request(id, "cache.set", |m| {
                    m.str("key")
                        .str(&format!("big{conn}:{}", id % 8))
                        .str("value")
                        .bin(&value);
                    2
                });
                w.write_all(&frame(&body)).unwrap();
            }
        });
        floods.push(std::thread::spawn(move || {
            let mut s = s;
            let mut ok = 0;
            for _ in 0..150 {
                let (_, is_ok, body) = decode(&read_frame(&mut s).expect("answer"));
                assert!(is_ok, "{body}");
                ok += 1;
            }
            writer.join().unwrap();
            ok
        }));
    }
    let flooding = Arc::new(AtomicBool::new(true));
    let slowest = {
        let flag = flooding.clone();
        let waiter = std::thread::spawn(move || {
            let total: i32 = floods.into_iter().map(|f| f.join().unwrap()).sum();
            flag.store(false, Ordering::Relaxed);
            total
        });
        let slowest = ping_latency_while(&daemon, || flooding.load(Ordering::Relaxed));
        assert_eq!(waiter.join().unwrap(), 600);
        slowest
    };
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_mib = peak.load(Ordering::Relaxed) / 1024;
    eprintln!(
        "600 MiB of 1 MiB values over 4 connections: daemon peak RSS {peak_mib} MiB, other client's slowest ping {slowest:?}"
    );
    // Bound (README, max_inflight_bytes_per_conn): 4 connections x 4 copies x
    // (4 MiB in flight + one 1 MiB frame) = 80 MiB, plus the baseline.
    assert!(peak_mib < 120, "peak RSS {peak_mib} MiB");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
}

#[test]
fn a_process_of_another_uid_is_refused_by_allow_uids() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::getuid().is_root() {
        eprintln!(
            "!!!!!!!! SKIPPED allow_uids cross-uid test: needs root to run a client as nobody !!!!!!!!"
        );
        return;
    }
    let redis = RedisServer::start();
    let daemon = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_SERVER_ALLOW_UIDS", "0"),
            ("SATCHEL_SERVER_SOCKET_MODE", "0666"),
        ],
    );
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ping = |uid: Option<u32>| {
        let mut cmd = std::process::Command::new(satchel_bin());
        cmd.arg("ping").arg("--socket").arg(&daemon.socket);
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = ping(Some(65534));
    assert_eq!(code, Some(5), "nobody is refused: {stderr}");
    assert!(stderr.contains("FORBIDDEN"), "{stderr}");
    assert_eq!(ping(None).0, Some(0), "root is allowed");
}

#[test]
fn the_socket_group_follows_the_config() {
    use std::os::unix::fs::MetadataExt;
    let redis = RedisServer::start();
    let daemon = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_SERVER_SOCKET_GROUP", "65534"),
            ("SATCHEL_SERVER_SOCKET_MODE", "0660"),
        ],
    );
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.gid(), 65534);
    assert_eq!(meta.mode() & 0o777, 0o660);
}

#[test]
fn raw_garbage_from_many_clients_never_panics_the_daemon() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..200 {
        let mut s = daemon.raw();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let len = (next() % 64) as usize;
        let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half the time a well-formed length prefix, half the time raw bytes.
        let bytes = if next().is_multiple_of(2) {
            frame(&body)
        } else {
            body
        };
        let _ = s.write_all(&bytes);
        let mut sink = [0u8; 4096];
        let _ = s.read(&mut sink);
    }
    let mut s = daemon.raw();
    s.write_all(&frame(&request(1, "ping", |_| 0))).unwrap();
    assert!(decode(&read_frame(&mut s).expect("still alive")).1);
    assert!(
        !daemon.log_text().contains("panicked"),
        "{}",
        daemon.log_text()
    );
}
