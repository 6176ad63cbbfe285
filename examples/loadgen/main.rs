//! Load generator for BENCHMARKS.md. Release builds only:
//!
//! ```sh
//! cargo run --release --example loadgen -- ping
//! ```
//!
//! Every comparison runs both sides in the same process run, on the same machine,
//! one after the other, and prints ratios.

mod cache;
mod cluster;
mod embedded;
mod fanout;
mod invalidation;
mod mail;
mod soak;
mod stats;
mod wire;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stats::Samples;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

fn usage() -> ! {
    eprintln!(
        "usage: loadgen ping|cache|mail|cluster|fanout|invalidation|embedded|soak [--secs N] [--runs N] [--rate OPS]\n  (invalidation: --runs is the number of writes)"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3u64);
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3usize);
    match args.first().map(String::as_str) {
        Some("ping") => ping(Duration::from_secs(secs), runs),
        Some("cache") => cache::run(Duration::from_secs(secs), runs),
        Some("soak") => {
            let rate = args
                .iter()
                .position(|a| a == "--rate")
                .and_then(|i| args.get(i + 1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(2000u64);
            soak::run(secs, rate)
        }
        Some("mail") => mail::mail(Duration::from_secs(secs), runs),
        Some("cluster") => cluster::run(Duration::from_secs(secs), runs),
        Some("fanout") => fanout::run(Duration::from_secs(secs), runs),
        Some("invalidation") => invalidation::run(runs),
        Some("embedded") => embedded::run(Duration::from_secs(secs), runs),
        Some("--echo-server") => echo_server(Path::new(
            args.get(1).map(String::as_str).unwrap_or_else(|| usage()),
        )),
        _ => usage(),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A plain Unix-socket echo server in its own process: reads frames, writes them back.
/// The floor any framed protocol over a Unix socket pays.
fn echo_server(path: &Path) {
    rt().block_on(async {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind echo");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut rd, wr) = stream.into_split();
                let mut wr = tokio::io::BufWriter::new(wr);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if wr.write_all(&buf[..n]).await.is_err() || wr.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {}", path.display());
}

/// The daemon binary: `SATCHEL_BIN` (to compare two builds with one load generator),
/// else the `satchel` built beside this example.
fn satchel_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SATCHEL_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/release/examples/loadgen → target/release/satchel
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("satchel"))
        .expect("target dir")
}

/// Starts `satchel serve` on a private socket against `redis_url`.
pub fn start_daemon(dir: &Path, redis_url: &str) -> (Proc, PathBuf) {
    start_daemon_with(dir, redis_url, &[])
}

/// As [`start_daemon`], with extra `SATCHEL_*` settings.
pub fn start_daemon_with(dir: &Path, redis_url: &str, env: &[(&str, &str)]) -> (Proc, PathBuf) {
    let socket = dir.join("satchel.sock");
    let bin = satchel_bin();
    assert!(
        bin.exists(),
        "build the daemon first: cargo build --release ({} missing)",
        bin.display()
    );
    let child = Command::new(bin)
        .arg("serve")
        .env("SATCHEL_SERVER_SOCKET", &socket)
        .env("SATCHEL_REDIS_URL", redis_url)
        .env("SATCHEL_LOG_LEVEL", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn satchel");
    wait_for_socket(&socket);
    (Proc(child), socket)
}

fn ping(duration: Duration, runs: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let echo_path = dir.path().join("echo.sock");
    let _echo = Proc(
        Command::new(std::env::current_exe().expect("exe"))
            .arg("--echo-server")
            .arg(&echo_path)
            .spawn()
            .expect("spawn echo"),
    );
    wait_for_socket(&echo_path);
    // ping needs no Redis; point at a closed port so nothing else is measured.
    let (_daemon, socket) = start_daemon(dir.path(), "redis://127.0.0.1:1");
    let frame = wire::request_frame(1, "ping", &[]);
    println!(
        "ping round trips, one connection, {runs} alternating runs of {}s per case, medians; \
         2 cores shared by client, daemon and echo server",
        duration.as_secs()
    );
    crate::stats::print_header();
    rt().block_on(async {
        for depth in [1usize, 64] {
            let mut echo = Vec::new();
            let mut sat = Vec::new();
            for _ in 0..runs {
                echo.push(run_pipelined(&echo_path, &frame, depth, duration).await);
                sat.push(run_pipelined(&socket, &frame, depth, duration).await);
            }
            let echo = stats::Summary::median_of(&echo);
            let sat = stats::Summary::median_of(&sat);
            echo.print(&format!("echo (plain socket), {depth} in flight"));
            sat.print(&format!("satchel ping, {depth} in flight"));
            sat.print_ratio("satchel/echo", &echo);
        }
    });
}

/// Keeps `depth` copies of `frame` in flight on one connection for `duration`;
/// records each round trip. With `rewrite_ids`, each request gets a fresh id.
pub async fn run_pipelined(path: &Path, frame: &[u8], depth: usize, duration: Duration) -> Samples {
    let stream = UnixStream::connect(path).await.expect("connect");
    let (rd, wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, rd);
    let mut wr = tokio::io::BufWriter::with_capacity(256 * 1024, wr);
    let mut sent_at = std::collections::VecDeque::with_capacity(depth);
    let mut samples = Samples::default();
    let started = Instant::now();
    for _ in 0..depth {
        wr.write_all(frame).await.expect("write");
        sent_at.push_back(Instant::now());
    }
    wr.flush().await.expect("flush");
    let mut body = Vec::new();
    while started.elapsed() < duration {
        wire::read_frame(&mut rd, &mut body).await.expect("read");
        // Responses on one connection may come out of order; with identical requests
        // the oldest outstanding send time is the fair attribution.
        let t0 = sent_at.pop_front().expect("outstanding");
        samples.record(t0.elapsed());
        wr.write_all(frame).await.expect("write");
        sent_at.push_back(Instant::now());
        if rd.buffer().len() < 4 {
            wr.flush().await.expect("flush");
        }
    }
    samples.finish(started.elapsed());
    samples
}
