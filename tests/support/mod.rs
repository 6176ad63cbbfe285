//! Test harness: real processes only. Each test starts its own `redis-server` on a
//! free port in a private directory and its own `satchel serve`, and kills both when
//! it is done. Never touches the shared Redis on 6379.
#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use satchel::Client;
use satchel::protocol::msgpack::Writer;

pub mod dkim;
pub mod load;
pub mod near;
pub mod postfix;
pub mod topology;

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking variant for use outside a runtime.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// A private redis-server.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (e.g. `--appendonly yes`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        for _ in 0..10 {
            let mut server = RedisServer {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().expect("tempdir"),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            if server.spawn() {
                return server;
            }
            // The port was taken between the probe and redis' bind: try another.
            server.stop();
        }
        panic!("redis-server did not start after 10 tries");
    }

    /// Starts on a given port (for "Redis appears later" tests).
    pub fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            extra: Vec::new(),
        };
        assert!(server.spawn(), "redis-server did not start on port {port}");
        server
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed (apt-get install redis-server; .ci/run does this)",
            );
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(10), || redis_ping(port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same data directory.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    pub fn pause(&self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGCONT);
    }

    /// `CLIENT KILL TYPE normal SKIPME yes`: every client connection but the one
    /// asking (the daemons' connections) is closed by Redis.
    pub fn kill_clients(&self) {
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query(&mut self.conn())
            .expect("CLIENT KILL");
    }

    /// A synchronous connection for test assertions straight against Redis.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.stop();
    }
}

pub(crate) fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A `satchel serve` child process with its own socket directory.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
}

pub fn satchel_bin() -> &'static str {
    env!("CARGO_BIN_EXE_satchel")
}

impl Daemon {
    /// Starts a daemon against `redis_url` with extra `SATCHEL_*` settings, and waits
    /// until its socket answers a ping.
    pub fn start(redis_url: &str, env: &[(&str, &str)]) -> Daemon {
        let daemon = Self::spawn(redis_url, env, None);
        daemon.wait_ready();
        daemon
    }

    /// Starts a daemon with a config file written from `toml`.
    pub fn start_with_config(redis_url: &str, toml: &str, env: &[(&str, &str)]) -> Daemon {
        let daemon = Self::spawn(redis_url, env, Some(toml));
        daemon.wait_ready();
        daemon
    }

    pub fn spawn(redis_url: &str, env: &[(&str, &str)], toml: Option<&str>) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = env
            .iter()
            .find(|(k, _)| *k == "SATCHEL_SERVER_SOCKET")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| dir.path().join("satchel.sock"));
        let log = dir.path().join("daemon.log");
        let mut cmd = Command::new(satchel_bin());
        cmd.arg("serve");
        if let Some(toml) = toml {
            let path = dir.path().join("satchel.toml");
            std::fs::write(&path, toml).expect("write config");
            cmd.arg("--config").arg(path);
        }
        // A clean environment: no SATCHEL_* or NOTIFY_SOCKET from the test runner.
        for (k, _) in std::env::vars() {
            if k.starts_with("SATCHEL_")
                || k == "NOTIFY_SOCKET"
                || k.starts_with("LISTEN_")
                || k.starts_with("WATCHDOG_")
            {
                cmd.env_remove(k);
            }
        }
        cmd.env("SATCHEL_SERVER_SOCKET", &socket)
            .env("SATCHEL_REDIS_URL", redis_url)
            .env("SATCHEL_LOG_LEVEL", "info,satchel=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let logfile = std::fs::File::create(&log).expect("log file");
        cmd.stdout(Stdio::null()).stderr(logfile);
        let child = cmd.spawn().expect("spawn satchel");
        Daemon {
            child: Some(child),
            dir,
            socket,
            log,
        }
    }

    pub fn wait_ready(&self) {
        let ok = wait_until(Duration::from_secs(15), || {
            let Ok(mut s) = StdUnixStream::connect(&self.socket) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            s.write_all(&frame(&request(1, "ping", |_| 0))).is_ok() && read_frame(&mut s).is_some()
        });
        assert!(ok, "daemon did not become ready; log:\n{}", self.log_text());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits (up to 5 s) until `stats.inflight` reaches `n`, counting the probing
    /// `stats` request itself; returns whether it did.
    pub fn wait_inflight(&self, n: u64) -> bool {
        let mut probe = self.raw();
        wait_until(Duration::from_secs(5), || {
            probe
                .write_all(&frame(&request(1, "stats", |_| 0)))
                .unwrap();
            let (_, _, stats) = decode(&read_frame(&mut probe).unwrap());
            field(&stats, "inflight").as_u64().unwrap() >= n
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket)
            .await
            .expect("connect to daemon")
    }

    pub fn raw(&self) -> StdUnixStream {
        let s = StdUnixStream::connect(&self.socket).expect("connect to daemon");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        signal(self.pid(), sig);
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Encodes `{id, op, ...}`; `fields` writes the extra pairs and returns their count.
pub fn request(id: u64, op: &str, fields: impl FnOnce(&mut Writer) -> u32) -> Vec<u8> {
    let mut extra = Writer::new();
    let n = fields(&mut extra);
    let mut w = Writer::new();
    w.map(2 + n)
        .str("id")
        .uint(id)
        .str("op")
        .str(op)
        .raw(extra.as_slice());
    w.into_vec()
}

pub fn frame(body: &[u8]) -> Vec<u8> {
    satchel::protocol::encode_frame(body)
}

/// Reads one frame from a blocking socket; None on EOF, error or timeout.
pub fn read_frame(s: &mut StdUnixStream) -> Option<Bytes> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(Bytes::from(body))
}

/// Decodes a response frame into (id, ok, value) where value is result or error.
pub fn decode(frame: &[u8]) -> (Option<u64>, bool, rmpv::Value) {
    let v = rmpv::decode::read_value(&mut &frame[..]).expect("response is MessagePack");
    let id = satchel::client::get(&v, "id").and_then(|v| v.as_u64());
    let ok = satchel::client::get(&v, "ok")
        .and_then(|v| v.as_bool())
        .expect("ok field");
    let body = satchel::client::get(&v, if ok { "result" } else { "error" })
        .cloned()
        .unwrap_or(rmpv::Value::Nil);
    (id, ok, body)
}

/// The `code` of an error body.
pub fn code(err: &rmpv::Value) -> &str {
    satchel::client::get(err, "code")
        .and_then(|v| v.as_str())
        .unwrap_or("")
}

pub fn field<'a>(v: &'a rmpv::Value, key: &str) -> &'a rmpv::Value {
    satchel::client::get(v, key).unwrap_or_else(|| panic!("no `{key}` in {v}"))
}

pub fn path_gone(p: &Path) -> bool {
    !p.exists()
}

/// A real SMTP server (tests/smtp_sink.py, aiosmtpd) on a free port, recording every
/// message it accepts as a JSON line. See the script for the per-recipient behaviours
/// (`reject550@`, `fail451-twice@`, `down421@`, `fail-after-data@`, `slow<ms>@`).
pub struct SmtpSink {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    out: PathBuf,
    args: Vec<String>,
}

impl SmtpSink {
    pub fn start() -> SmtpSink {
        Self::start_with(free_port(), &[])
    }

    /// Starts on a given port (for "SMTP comes up later" tests).
    pub fn start_on(port: u16) -> SmtpSink {
        Self::start_with(port, &[])
    }

    /// Starts with extra arguments (`--tls-cert`, `--tls-key`, `--require-tls`,
    /// `--auth user:pass`).
    pub fn start_with(port: u16, args: &[&str]) -> SmtpSink {
        let check = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            matches!(check, Ok(s) if s.success()),
            "the mail tests need python3 with aiosmtpd: `pip install aiosmtpd` (.ci/run does this)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("received.jsonl");
        let mut sink = SmtpSink {
            child: None,
            port,
            dir,
            out,
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        sink.spawn();
        sink
    }

    fn spawn(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp_sink.py");
        let log = std::fs::File::create(self.dir.path().join("sink.log")).expect("sink log");
        let child = Command::new("python3")
            .arg(script)
            .args(["--port", &self.port.to_string()])
            .arg("--out")
            .arg(&self.out)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn python3 tests/smtp_sink.py");
        self.child = Some(child);
        let port = self.port;
        let implicit_tls = self.args.iter().any(|a| a == "--implicit-tls");
        let ok = wait_until(Duration::from_secs(15), || {
            if implicit_tls {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            } else {
                smtp_greets(port)
            }
        });
        assert!(
            ok,
            "SMTP sink did not start on port {port}:\n{}",
            std::fs::read_to_string(self.dir.path().join("sink.log")).unwrap_or_default()
        );
    }

    /// Every message accepted so far, oldest first.
    pub fn received(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn count(&self) -> usize {
        self.received().len()
    }

    /// Every RCPT address the sink was asked so far (accepted or refused).
    pub fn rcpts(&self) -> Vec<String> {
        let mut path = self.out.clone().into_os_string();
        path.push(".rcpt");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn smtp_greets(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).is_ok() && &buf == b"220"
}

/// A port nothing listens on right now.
pub fn unused_port() -> u16 {
    free_port()
}
