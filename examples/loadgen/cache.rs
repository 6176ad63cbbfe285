//! `loadgen cache`: cache.get through satchel against GET straight to Redis, the
//! thundering-herd comparison, and the daemon's CPU per request.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::client::{Client, Fetch};
use satchel::protocol::msgpack::{Head, Reader};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::stats::{Samples, Summary};
use crate::{Proc, start_daemon, wire};

const KEYS: u64 = 10_000;
const VALUE_BYTES: usize = 200;

/// A private redis-server for the benchmark (never the shared 6379).
pub fn start_redis(dir: &Path) -> (Proc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(child), port)
}

fn key(i: u64) -> String {
    format!("bench:{}", i % KEYS)
}

/// The id of a response frame.
fn response_id(frame: &[u8]) -> Option<u64> {
    let mut r = Reader::new(frame);
    let Ok(Head::Map(n)) = r.head() else {
        return None;
    };
    for _ in 0..n {
        let k = r.head().ok()?;
        let v = r.clone().head().ok()?;
        r.skip().ok()?;
        if let (Head::Str(b"id"), Head::Uint(id)) = (k, v) {
            return Some(id);
        }
    }
    None
}

/// `depth` cache.get requests in flight on one connection for `duration`.
async fn satchel_gets(socket: PathBuf, depth: usize, duration: Duration) -> Samples {
    satchel_requests(socket, depth, duration, "cache.get").await
}

/// `depth` requests of `op` (cache.get, or ping for the daemon's floor) in flight.
async fn satchel_requests(
    socket: PathBuf,
    depth: usize,
    duration: Duration,
    op: &'static str,
) -> Samples {
    let stream = UnixStream::connect(&socket).await.expect("connect");
    let (rd, wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
    let mut wr = tokio::io::BufWriter::with_capacity(256 * 1024, wr);
    const RING: usize = 1 << 16;
    let mut sent_at = vec![Instant::now(); RING];
    let mut samples = Samples::default();
    let mut next_id = 0u64;
    let mut body = Vec::new();
    let frame_for = |id: u64| {
        let mut key_field = satchel::protocol::msgpack::Writer::new();
        key_field.str(&key(id.wrapping_mul(7919)));
        wire::request_frame(id, op, &[("key", key_field.as_slice())])
    };
    let started = Instant::now();
    for _ in 0..depth {
        wr.write_all(&frame_for(next_id)).await.expect("write");
        sent_at[next_id as usize % RING] = Instant::now();
        next_id += 1;
    }
    wr.flush().await.expect("flush");
    while started.elapsed() < duration {
        wire::read_frame(&mut rd, &mut body).await.expect("read");
        let id = response_id(&body).expect("id");
        assert!(
            op == "ping" || body.windows(4).any(|w| w == b"\xa3hit"),
            "response has hit"
        );
        samples.record(sent_at[id as usize % RING].elapsed());
        wr.write_all(&frame_for(next_id)).await.expect("write");
        sent_at[next_id as usize % RING] = Instant::now();
        next_id += 1;
        if rd.buffer().len() < 4 {
            wr.flush().await.expect("flush");
        }
    }
    samples.finish(started.elapsed());
    samples
}

/// `depth` tasks doing GET on one multiplexed redis-crate connection.
async fn direct_gets(url: String, depth: usize, duration: Duration) -> Samples {
    let client = redis::Client::open(url.as_str()).expect("client");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let started = Instant::now();
    let counter = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..depth)
        .map(|_| {
            let mut conn = conn.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut samples = Samples::default();
                while started.elapsed() < duration {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    let v: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(format!("direct:{}", key(i.wrapping_mul(7919))))
                        .query_async(&mut conn)
                        .await
                        .expect("GET");
                    assert!(v.is_some());
                    samples.record(t0.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut all = Samples::default();
    for t in tasks {
        all.merge(t.await.expect("task"));
    }
    all.finish(started.elapsed());
    all
}

async fn parallel<F, Fut>(conns: usize, f: F) -> Samples
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Samples> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns).map(|_| tokio::spawn(f())).collect();
    let mut all = Samples::default();
    for t in tasks {
        all.merge(t.await.expect("task"));
    }
    all.finish(started.elapsed());
    all
}

/// A daemon under test, and what it served during one run.
struct Target {
    label: &'static str,
    socket: PathBuf,
    pid: u32,
}

/// Near hits and all hits a daemon has counted so far.
pub async fn hit_counts(client: &Client) -> (u64, u64) {
    let stats = client.stats().await.expect("stats");
    let cache = satchel::client::get(&stats, "cache").expect("cache stats");
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let near = satchel::client::get(cache, "near").and_then(|m| satchel::client::get(m, "hits"));
    (n(near), n(satchel::client::get(cache, "hits")))
}

/// One measured run against `t`, with the daemon's CPU per get (from /proc) and
/// how many of the gets were near hits.
async fn measured(
    t: &Target,
    conns: usize,
    depth: usize,
    duration: Duration,
) -> (Samples, f64, u64, u64) {
    let client = Client::connect(&t.socket).await.expect("connect");
    let (near0, hits0) = hit_counts(&client).await;
    let cpu0 = cpu_ticks(t.pid);
    let s = t.socket.clone();
    let samples = parallel(conns, move || satchel_gets(s.clone(), depth, duration)).await;
    let cpu = (cpu_ticks(t.pid) - cpu0) as f64 / 100.0;
    let (near1, hits1) = hit_counts(&client).await;
    let gets = hits1 - hits0;
    (samples, cpu * 1e6 / gets.max(1) as f64, near1 - near0, gets)
}

pub fn run(duration: Duration, runs: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_redis, port) = start_redis(dir.path());
    let url = format!("redis://127.0.0.1:{port}");
    let near_dir = dir.path().join("near");
    let plain_dir = dir.path().join("plain");
    std::fs::create_dir_all(&near_dir).expect("dir");
    std::fs::create_dir_all(&plain_dir).expect("dir");
    let (daemon, socket) = start_daemon(&near_dir, &url);
    let (plain, plain_socket) =
        crate::start_daemon_with(&plain_dir, &url, &[("SATCHEL_CACHE_NEAR", "false")]);
    let targets = [
        Target {
            label: "satchel cache.get, near-cache",
            socket: socket.clone(),
            pid: daemon.0.id(),
        },
        Target {
            label: "satchel cache.get, near off",
            socket: plain_socket,
            pid: plain.0.id(),
        },
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Same 10,000 keys with 200-byte values on both sides.
        let client = Client::connect(&socket).await.expect("connect");
        let value = Value::Binary(vec![b'x'; VALUE_BYTES]);
        let mut direct = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for i in 0..KEYS {
            client.cache_set(&key(i), value.clone(), None, &[]).await.expect("set");
            let _: () = redis::cmd("SET")
                .arg(format!("direct:{}", key(i)))
                .arg(vec![b'x'; VALUE_BYTES])
                .query_async(&mut direct)
                .await
                .unwrap();
        }
        // Warm the near-cache: every key read once (a read right after this
        // daemon's own write is not kept, see ARCHITECTURE.md).
        for _ in 0..2 {
            for i in 0..KEYS {
                client.cache_get(&key(i)).await.expect("get");
            }
        }
        println!(
            "cache.get hits through satchel (near-cache on, and off) vs GET straight to Redis (redis crate),\n\
             {KEYS} keys, {VALUE_BYTES}-byte values; {runs} alternating runs of {}s per case, medians;\n\
             2 cores shared by load generator, daemons and redis-server",
            duration.as_secs()
        );
        crate::stats::print_header();
        // LOADGEN_CACHE_ONLY=1|64|512|cpu runs one case alone (for profiling).
        let only = std::env::var("LOADGEN_CACHE_ONLY").ok();
        let wanted = |case: &str| only.as_deref().is_none_or(|o| o == case);
        for (conns, depth) in [(1usize, 1usize), (1, 64), (8, 64)] {
            if !wanted(&(conns * depth).to_string()) {
                continue;
            }
            let mut dir_ = Vec::new();
            let mut per_target: Vec<Vec<(Samples, f64, u64, u64)>> = vec![Vec::new(), Vec::new()];
            for _ in 0..runs {
                let u = url.clone();
                dir_.push(parallel(conns, move || direct_gets(u.clone(), depth, duration)).await);
                for (t, out) in targets.iter().zip(per_target.iter_mut()) {
                    out.push(measured(t, conns, depth, duration).await);
                }
            }
            let d = Summary::median_of(&dir_);
            d.print(&format!("direct GET, {conns} conn x {depth}"));
            for (t, out) in targets.iter().zip(per_target) {
                let cpu = median(out.iter().map(|o| o.1).collect());
                let near: u64 = out.iter().map(|o| o.2).sum();
                let gets: u64 = out.iter().map(|o| o.3).sum();
                let samples: Vec<Samples> = out.into_iter().map(|o| o.0).collect();
                let s = Summary::median_of(&samples);
                s.print(&format!("{}, {conns} conn x {depth}", t.label));
                s.print_ratio("satchel/direct", &d);
                println!(
                    "  daemon CPU {cpu:.2} µs per get; near hits {near} of {gets} gets, Redis hits {}",
                    gets - near
                );
            }
        }
        if only.is_some() {
            if wanted("cpu") {
                cpu_per_get(targets[0].label, &socket, daemon.0.id()).await;
            }
            return;
        }
        // The floor of any satchel request from this load generator: ping needs no Redis.
        let mut pings = Vec::new();
        for _ in 0..runs {
            pings.push(satchel_requests(socket.clone(), 1, duration, "ping").await);
        }
        Summary::median_of(&pings).print("satchel ping (no Redis), 1 conn x 1");
        herd(&socket, &url).await;
        cpu_per_get(targets[0].label, &socket, daemon.0.id()).await;
        cpu_per_get(targets[1].label, &targets[1].socket, plain.0.id()).await;
    });
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// 200 callers want one missing key whose load takes 50 ms.
async fn herd(socket: &Path, url: &str) {
    const CALLERS: usize = 200;
    let client = Client::connect(socket).await.expect("connect");
    let loads = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let c = client.clone();
            let loads = loads.clone();
            tokio::spawn(async move {
                match c
                    .cache_fetch("herd:leased", Some(5000), Some(5000))
                    .await
                    .expect("fetch")
                {
                    Fetch::Hit(_) => {}
                    Fetch::Lease(lease) => {
                        loads.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        c.cache_fill("herd:leased", &lease, Value::from("v"), None, &[])
                            .await
                            .expect("fill");
                    }
                    Fetch::Miss => {
                        loads.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let leased = loads.load(Ordering::Relaxed);
    // Naive cache-aside straight to Redis: GET, on a miss load and SET.
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let naive = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let mut conn = conn.clone();
            let naive = naive.clone();
            tokio::spawn(async move {
                let v: Option<Vec<u8>> = redis::cmd("GET")
                    .arg("herd:naive")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if v.is_none() {
                    naive.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _: () = redis::cmd("SET")
                        .arg("herd:naive")
                        .arg("v")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let _: () = redis::cmd("DEL")
        .arg("herd:naive")
        .query_async(&mut conn)
        .await
        .unwrap();
    println!(
        "herd: {CALLERS} concurrent callers, one missing key, 50 ms load: loads with cache.fetch/fill = {leased}, naive GET-then-SET = {}",
        naive.load(Ordering::Relaxed)
    );
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name; utime and stime are 14th and 15th overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Offers a fixed rate of cache.get (in batches every millisecond) and divides the
/// daemon's CPU time (utime+stime from /proc) by the requests served.
async fn cpu_per_get(label: &str, socket: &Path, pid: u32) {
    const RATE: u64 = 20_000;
    const SECS: u64 = 5;
    let client = Client::connect(socket).await.expect("connect");
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let before = cpu_ticks(pid);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut interval = tokio::time::interval(Duration::from_millis(1));
    let mut pending = tokio::task::JoinSet::new();
    while started.elapsed() < Duration::from_secs(SECS) {
        interval.tick().await;
        let due = (started.elapsed().as_secs_f64() * RATE as f64) as u64;
        while sent < due {
            let c = client.clone();
            let k = key(sent);
            pending.spawn(async move { c.cache_get(&k).await.expect("get") });
            sent += 1;
        }
        while pending.try_join_next().is_some() {}
    }
    while pending.join_next().await.is_some() {}
    let cpu_s = (cpu_ticks(pid) - before) as f64 / ticks_per_sec;
    println!(
        "{label}: daemon CPU at {RATE} gets/s offered for {SECS}s: {:.2} µs per get ({sent} gets, {:.2} s CPU); peak RSS {} KiB",
        cpu_s * 1e6 / sent as f64,
        cpu_s,
        vm_hwm_kib(pid)
    );
}
