//! `loadgen mail`: the mail queue's benchmarks (BENCHMARKS.md, "Mail").
//!
//! Starts its own redis-server and SMTP sink (tests/smtp_sink.py, aiosmtpd) on free
//! ports, and satchel daemons against them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use satchel::protocol::msgpack::Writer;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

use crate::stats::{Samples, Summary};
use crate::{Proc, rt, run_pipelined, satchel_bin, wait_for_socket, wire};

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub(crate) fn wait_tcp(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on port {port}");
}

pub(crate) fn start_redis(dir: &Path) -> (Proc, String) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on the PATH");
    wait_tcp(port);
    (Proc(child), format!("redis://127.0.0.1:{port}"))
}

pub(crate) struct Sink {
    _proc: Proc,
    pub(crate) port: u16,
    out: PathBuf,
}

impl Sink {
    pub(crate) fn start(dir: &Path, name: &str) -> Sink {
        let port = free_port();
        let out = dir.join(format!("{name}.jsonl"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp_sink.py");
        let child = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string()])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 with aiosmtpd (pip install aiosmtpd)");
        wait_tcp(port);
        Sink {
            _proc: Proc(child),
            port,
            out,
        }
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub(crate) fn count(&self) -> usize {
        std::fs::read_to_string(&self.out)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn wait_count(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            assert!(
                Instant::now() < deadline,
                "sink got {} of {n}",
                self.count()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Accepted messages per second, from the sink's own timestamps of the first and
    /// last `n` messages after `skip`.
    fn rate(&self, skip: usize) -> f64 {
        let mut t: Vec<u64> = self
            .lines()
            .iter()
            .filter_map(|m| m["t_us"].as_u64())
            .collect();
        t.sort_unstable();
        let t = &t[skip..];
        (t.len() - 1) as f64 / ((t[t.len() - 1] - t[0]) as f64 / 1e6)
    }
}

pub(crate) fn start_satchel(
    dir: &Path,
    name: &str,
    redis_url: &str,
    env: &[(&str, String)],
) -> (Proc, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(satchel_bin());
    cmd.arg("serve")
        .env("SATCHEL_SERVER_SOCKET", &socket)
        .env("SATCHEL_REDIS_URL", redis_url)
        .env("SATCHEL_LOG_LEVEL", "warn")
        .env("SATCHEL_MAIL_FROM", "bench@example.org");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn satchel");
    wait_for_socket(&socket);
    (Proc(child), socket)
}

fn html_1k() -> String {
    let mut s = String::from("<html><body><h1>Your receipt</h1>");
    while s.len() < 1000 {
        s.push_str("<p>Thank you for your order. Items ship within two days.</p>");
    }
    s.push_str("</body></html>");
    s
}

pub(crate) fn send_frame(id: u64, to: &str, extra_header: Option<(&str, &str)>) -> Vec<u8> {
    let mut w = Writer::new();
    w.map(5 + extra_header.is_some() as u32)
        .str("id")
        .uint(id)
        .str("op")
        .str("mail.send")
        .str("to")
        .array(1)
        .str(to)
        .str("subject")
        .str("Your receipt")
        .str("html")
        .str(&html_1k());
    if let Some((k, v)) = extra_header {
        w.str("headers").map(1).str(k).str(v);
    }
    satchel::protocol::encode_frame(w.as_slice())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

pub fn mail(duration: Duration, runs: usize) {
    // LOADGEN_MAIL_ONLY=1..4 runs one part (for profiling).
    let only: Option<u32> = std::env::var("LOADGEN_MAIL_ONLY")
        .ok()
        .and_then(|v| v.parse().ok());
    let part = |n: u32| only.is_none_or(|o| o == n);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_redis, redis_url) = start_redis(dir);
    println!(
        "mail benchmarks; 2 cores shared by loadgen, satchel, redis-server and the Python \
         SMTP sink; medians of {runs} runs"
    );

    if part(1) {
        enqueue_rates(dir, &redis_url, duration, runs);
    }
    if part(2) {
        delivery_rates(dir, &redis_url, runs);
    }
    if part(3) {
        latency(dir, &redis_url, duration, runs);
    }
    if part(4) {
        let raw = render_message();
        let sink = Sink::start(dir, "nagle");
        let (ours, lettres) = rt().block_on(nagle_check(sink.port, &raw));
        println!("\n4. one reused SMTP connection, sequential messages (Nagle regression check)");
        println!(
            "   satchel's pool (nodelay):           {:>8.2} ms per message",
            ours
        );
        println!(
            "   lettre's pooled AsyncSmtpTransport: {:>8.2} ms per message",
            lettres
        );
    }
}

fn enqueue_rates(dir: &Path, redis_url: &str, duration: Duration, runs: usize) {
    // 1. Enqueue rate: a producer-only daemon (no workers), one connection.
    let (_producer, psock) = start_satchel(
        dir,
        "producer",
        redis_url,
        &[("SATCHEL_MAIL_ENABLED", "false".into())],
    );
    let frame = send_frame(1, "ann@example.com", None);
    println!("\n1. enqueue: mail.send with a 1 KB html body, one connection");
    crate::stats::print_header();
    rt().block_on(async {
        for depth in [1usize, 64] {
            let mut all = Vec::new();
            for _ in 0..runs {
                all.push(run_pipelined(&psock, &frame, depth, duration).await);
            }
            Summary::median_of(&all).print(&format!("mail.send, {depth} in flight"));
        }
    });
    drop(_producer);
    // Concurrent sends share one enqueue script run (group commit); per mail, Redis
    // spends the script time divided by the mails (one XADD each).
    let info: String = redis_cmd(redis_url, &["INFO", "commandstats"]);
    let stat = |cmd: &str, field: &str| -> f64 {
        info.lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| {
                l.split([':', ','])
                    .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0.0)
    };
    let (runs_, mails, usec) = (
        stat("evalsha", "calls"),
        stat("xadd", "calls"),
        stat("evalsha", "usec"),
    );
    println!(
        "   redis-server: {mails:.0} mails in {runs_:.0} script runs ({:.1} per run), {:.1} µs of script time per mail",
        mails / runs_.max(1.0),
        usec / mails.max(1.0)
    );
    redis_cmd::<()>(redis_url, &["FLUSHALL"]);
}

fn delivery_rates(dir: &Path, redis_url: &str, runs: usize) {
    // 2. Delivery rate vs the sink's ceiling.
    let n = 3000usize;
    let mut plain_rates = Vec::new();
    let mut satchel_rates = Vec::new();
    let raw = render_message();
    for run in 0..runs {
        let sink = Sink::start(dir, &format!("plain{run}"));
        rt().block_on(plain_sender(sink.port, 16, n, &raw));
        sink.wait_count(n, Duration::from_secs(120));
        plain_rates.push(sink.rate(n / 10));

        let sink = Sink::start(dir, &format!("satchel{run}"));
        redis_cmd::<()>(redis_url, &["FLUSHALL"]);
        let (producer, psock) = start_satchel(
            dir,
            "producer",
            redis_url,
            &[("SATCHEL_MAIL_ENABLED", "false".into())],
        );
        rt().block_on(async {
            let frame = send_frame(1, "ann@example.com", None);
            enqueue_n(&psock, &frame, n).await;
        });
        drop(producer);
        let (_worker, _) = start_satchel(
            dir,
            "worker",
            redis_url,
            &[
                (
                    "SATCHEL_MAIL_SMTP_URL",
                    format!("smtp://127.0.0.1:{}", sink.port),
                ),
                ("SATCHEL_MAIL_CONCURRENCY", "16".into()),
            ],
        );
        sink.wait_count(n, Duration::from_secs(120));
        satchel_rates.push(sink.rate(n / 10));
    }
    let plain = median(plain_rates);
    let sat = median(satchel_rates);
    println!("\n2. delivery of {n} queued mails to the local aiosmtpd sink (16 connections each)");
    println!("   plain pipelined SMTP sender (the sink's ceiling): {plain:>8.0} mails/s");
    println!("   satchel, concurrency 16:                          {sat:>8.0} mails/s");
    println!("   ratio satchel/ceiling: {:.2}", sat / plain);
}

fn latency(dir: &Path, redis_url: &str, duration: Duration, runs: usize) {
    // 3. Enqueue → SMTP-accepted latency at 1,000 mails/s offered.
    redis_cmd::<()>(redis_url, &["FLUSHALL"]);
    let sink = Sink::start(dir, "latency");
    let (_worker, wsock) = start_satchel(
        dir,
        "latency",
        redis_url,
        &[
            (
                "SATCHEL_MAIL_SMTP_URL",
                format!("smtp://127.0.0.1:{}", sink.port),
            ),
            ("SATCHEL_MAIL_CONCURRENCY", "16".into()),
        ],
    );
    let total = (duration.as_secs().max(1) * 1000 * runs as u64) as usize;
    let ack = rt().block_on(paced_sends(&wsock, 1000, total));
    sink.wait_count(total, Duration::from_secs(120));
    let mut e2e = Samples::default();
    for m in sink.lines() {
        let data = m["data"].as_str().unwrap_or("");
        let Some(sent) = data
            .split("\r\n")
            .find_map(|l| l.strip_prefix("X-Bench-T: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            continue;
        };
        let t = m["t_us"].as_u64().unwrap();
        e2e.record(Duration::from_micros(t.saturating_sub(sent)));
    }
    e2e.finish(Duration::from_secs(1));
    println!(
        "\n3. latency at 1,000 mails/s offered for {} s, concurrency 16",
        total / 1000
    );
    println!(
        "   mail.send → ok:              p50 {:>8.2} ms  p99 {:>8.2} ms",
        ack.p(50.0) / 1000.0,
        ack.p(99.0) / 1000.0
    );
    println!(
        "   mail.send → SMTP-accepted:   p50 {:>8.2} ms  p99 {:>8.2} ms  (p90 {:.2}, p99.9 {:.2}, max {:.2})",
        e2e.p(50.0) / 1000.0,
        e2e.p(99.0) / 1000.0,
        e2e.p(90.0) / 1000.0,
        e2e.p(99.9) / 1000.0,
        e2e.p(100.0) / 1000.0
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn redis_cmd<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> T {
    let mut conn = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("redis");
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn).expect("redis command")
}

/// The message both senders send: what satchel renders for the benchmark mail.
fn render_message() -> Vec<u8> {
    let draft = satchel::mail::message::Draft {
        to: vec!["ann@example.com".into()],
        subject: "Your receipt".into(),
        html: Some(html_1k()),
        ..Default::default()
    };
    let limits = satchel::mail::message::Limits {
        default_from: "bench@example.org".into(),
        max_message_bytes: 1 << 20,
        max_recipients: 1000,
        dkim: Vec::new(),
    };
    satchel::mail::message::build(&draft, &limits, "bench".into())
        .expect("render")
        .raw
}

/// Sends `n` mail.send frames with 64 in flight and waits for every answer.
async fn enqueue_n(socket: &Path, frame: &[u8], n: usize) {
    let stream = UnixStream::connect(socket).await.expect("connect");
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let mut body = Vec::new();
    let mut sent = 0;
    let mut got = 0;
    while got < n {
        while sent < n && sent - got < 64 {
            wr.write_all(frame).await.expect("write");
            sent += 1;
        }
        wire::read_frame(&mut rd, &mut body).await.expect("read");
        got += 1;
    }
}

/// The sink's ceiling: `conns` connections with nodelay, each sending MAIL, RCPT and
/// DATA in one write, then the message, reading only the replies it must.
async fn plain_sender(port: u16, conns: usize, n: usize, raw: &[u8]) {
    let mut body = raw.to_vec();
    body.extend_from_slice(b"\r\n.\r\n");
    let body = Arc::new(body);
    let per = n.div_ceil(conns);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let body = body.clone();
        let count = per.min(n.saturating_sub(c * per));
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            let (rd, mut wr) = tcp.into_split();
            let mut rd = BufReader::new(rd);
            let mut line = String::new();
            let mut reply = async |rd: &mut BufReader<_>| loop {
                line.clear();
                rd.read_line(&mut line).await.expect("reply");
                if line.as_bytes().get(3) != Some(&b'-') {
                    return line.clone();
                }
            };
            reply(&mut rd).await; // greeting
            wr.write_all(b"EHLO bench\r\n").await.unwrap();
            reply(&mut rd).await;
            for _ in 0..count {
                wr.write_all(
                    b"MAIL FROM:<bench@example.org>\r\nRCPT TO:<ann@example.com>\r\nDATA\r\n",
                )
                .await
                .unwrap();
                for _ in 0..3 {
                    reply(&mut rd).await;
                }
                wr.write_all(&body).await.unwrap();
                let r = reply(&mut rd).await;
                assert!(r.starts_with("250"), "{r}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
}

/// Offers `rate` mail.send per second on one connection (not waiting for answers),
/// each stamped with its send time; returns the send → ok latencies.
async fn paced_sends(socket: &Path, rate: u64, total: usize) -> Samples {
    let stream = UnixStream::connect(socket).await.expect("connect");
    let (rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut rd = tokio::io::BufReader::new(rd);
        let mut body = Vec::new();
        let mut at = HashMap::new();
        for _ in 0..total {
            wire::read_frame(&mut rd, &mut body).await.expect("read");
            let v = rmpv::decode::read_value(&mut &body[..]).expect("msgpack");
            let id = satchel::client::get(&v, "id")
                .and_then(|v| v.as_u64())
                .unwrap();
            at.insert(id, Instant::now());
        }
        at
    });
    let mut sent_at = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    for i in 0..total as u64 {
        tick.tick().await;
        let stamp = now_us().to_string();
        let frame = send_frame(i, "ann@example.com", Some(("X-Bench-T", &stamp)));
        sent_at.insert(i, Instant::now());
        wr.write_all(&frame).await.expect("write");
    }
    let answered = reader.await.expect("reader");
    let mut s = Samples::default();
    for (id, t) in answered {
        s.record(t - sent_at[&id]);
    }
    s.finish(started.elapsed());
    s
}

/// Mean ms per message over one reused connection: satchel's pool, then lettre's.
async fn nagle_check(port: u16, raw: &[u8]) -> (f64, f64) {
    use lettre::AsyncTransport;
    let n = 200;
    let cfg = satchel::config::MailConfig {
        smtp_url: Some(
            satchel::config::SmtpUrl::parse(&format!("smtp://127.0.0.1:{port}?tls=none"))
                .expect("url"),
        ),
        concurrency: 1,
        ..Default::default()
    };
    let pool = satchel::mail::smtp::SmtpPool::new(&cfg).expect("pool");
    let rcpts = vec!["ann@example.com".to_owned()];
    pool.send("bench@example.org", &rcpts, raw)
        .await
        .expect("warm up");
    let t = Instant::now();
    for _ in 0..n {
        pool.send("bench@example.org", &rcpts, raw)
            .await
            .expect("send");
    }
    let ours = t.elapsed().as_secs_f64() * 1000.0 / n as f64;

    let transport =
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .pool_config(lettre::transport::smtp::PoolConfig::new().max_size(1))
            .build();
    let envelope = lettre::address::Envelope::new(
        Some("bench@example.org".parse().unwrap()),
        vec!["ann@example.com".parse().unwrap()],
    )
    .unwrap();
    transport.send_raw(&envelope, raw).await.expect("warm up");
    let n_lettre = 50;
    let t = Instant::now();
    for _ in 0..n_lettre {
        transport.send_raw(&envelope, raw).await.expect("send");
    }
    let theirs = t.elapsed().as_secs_f64() * 1000.0 / n_lettre as f64;
    (ours, theirs)
}
