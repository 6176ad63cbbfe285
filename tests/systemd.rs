//! systemd integration: notify datagrams read from our own NOTIFY_SOCKET, socket
//! activation through systemd-socket-activate, and a real systemd (PID 1 of a private
//! pid+mount namespace) driving the shipped unit files.

mod support;

use std::io::Write;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::*;

/// Collects notify datagrams sent to a socket we bind.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
            seen: Vec::new(),
        }
    }

    /// Reads datagrams until one contains a line satisfying `pred`, up to `timeout`.
    fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(m) = self.seen.iter().find(|m| m.lines().any(&pred)) {
            let m = m.clone();
            self.seen.retain(|x| *x != m);
            return Some(m);
        }
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(&pred) {
                    return Some(msg);
                }
                self.seen.push(msg);
            }
        }
        None
    }
}

#[test]
fn notifies_ready_status_watchdog_reloading_and_stopping() {
    let redis = RedisServer::start();
    let mut notify = NotifySocket::bind();
    let notify_path = notify.path.to_str().unwrap().to_owned();
    let mut daemon = Daemon::spawn(
        &redis.url(),
        &[("NOTIFY_SOCKET", &notify_path), ("WATCHDOG_USEC", "400000")],
        None,
    );
    assert!(
        notify
            .wait_for(Duration::from_secs(10), |l| l == "READY=1")
            .is_some(),
        "READY=1"
    );
    // READY=1 is sent once the socket accepts.
    let mut s = daemon.raw();
    s.write_all(&frame(&request(1, "ping", |_| 0))).unwrap();
    assert!(read_frame(&mut s).is_some());
    let status = notify
        .wait_for(Duration::from_secs(5), |l| l.starts_with("STATUS="))
        .expect("STATUS=");
    assert!(status.contains("redis up"), "{status}");
    assert!(status.contains("mail queue 0, sending 0"), "{status}");
    for _ in 0..2 {
        assert!(
            notify
                .wait_for(Duration::from_secs(2), |l| l == "WATCHDOG=1")
                .is_some(),
            "WATCHDOG=1"
        );
    }
    daemon.signal(Signal::SIGHUP);
    let reloading = notify
        .wait_for(Duration::from_secs(5), |l| l == "RELOADING=1")
        .expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert!(
        notify
            .wait_for(Duration::from_secs(5), |l| l == "READY=1")
            .is_some(),
        "READY=1 after reload"
    );
    daemon.signal(Signal::SIGTERM);
    assert!(
        notify
            .wait_for(Duration::from_secs(5), |l| l == "STOPPING=1")
            .is_some(),
        "STOPPING=1"
    );
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success());
}

#[test]
fn a_frozen_event_loop_stops_the_watchdog_pings() {
    let redis = RedisServer::start();
    let mut notify = NotifySocket::bind();
    let notify_path = notify.path.to_str().unwrap().to_owned();
    let daemon = Daemon::spawn(
        &redis.url(),
        &[("NOTIFY_SOCKET", &notify_path), ("WATCHDOG_USEC", "200000")],
        None,
    );
    assert!(
        notify
            .wait_for(Duration::from_secs(10), |l| l == "WATCHDOG=1")
            .is_some()
    );
    daemon.signal(Signal::SIGSTOP);
    // Drain what was already queued, then expect silence.
    while notify
        .wait_for(Duration::from_millis(150), |l| l == "WATCHDOG=1")
        .is_some()
    {}
    notify.seen.clear();
    assert!(
        notify
            .wait_for(Duration::from_millis(600), |l| l == "WATCHDOG=1")
            .is_none()
    );
    daemon.signal(Signal::SIGCONT);
    assert!(
        notify
            .wait_for(Duration::from_secs(2), |l| l == "WATCHDOG=1")
            .is_some(),
        "pings resume"
    );
}

#[test]
fn serves_a_socket_passed_by_socket_activation() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(format!("--setenv=SATCHEL_REDIS_URL={}", redis.url()))
        // A socket path that is NOT the activated one: the daemon must ignore it.
        .arg(format!(
            "--setenv=SATCHEL_SERVER_SOCKET={}",
            dir.path().join("unused.sock").display()
        ))
        .arg("--")
        .arg(satchel_bin())
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate must be installed (package systemd)");
    assert!(wait_until(Duration::from_secs(5), || socket.exists()));
    // The daemon starts on the first connection.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&frame(&request(7, "ping", |_| 0))).unwrap();
    let (id, ok, result) = decode(&read_frame(&mut s).expect("pong over the activated socket"));
    assert_eq!((id, ok, result.as_str()), (Some(7), true, Some("pong")));
    assert!(
        !dir.path().join("unused.sock").exists(),
        "daemon bound its own socket"
    );
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------
// A real systemd in a private pid+mount namespace (../shared/recipes).

const STUB_TARGETS: &[&str] = &[
    "sysinit.target",
    "basic.target",
    "sockets.target",
    "timers.target",
    "paths.target",
    "local-fs.target",
    "network.target",
    "network-online.target",
    "multi-user.target",
    "shutdown.target",
];

struct NamespacedSystemd {
    unshare: Child,
    pid: u32,
    install_dir: PathBuf,
}

impl NamespacedSystemd {
    fn systemctl(&self, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "-p", "systemctl"])
            .args(args)
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn show(&self, unit: &str, prop: &str) -> String {
        self.systemctl(&["show", "-p", prop, "--value", unit])
    }
}

impl Drop for NamespacedSystemd {
    fn drop(&mut self) {
        // SIGRTMIN+14 = poweroff for systemd; nix has no Signal for real-time ones.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGRTMIN() + 14);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.unshare.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        let _ = std::fs::remove_dir_all(&self.install_dir);
        // systemd leaves empty cgroup folders behind (in every hierarchy on a
        // cgroup-v1/hybrid host); remove the empty ones, deepest first.
        let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            roots.extend(entries.flatten().map(|e| e.path()));
        }
        for root in roots {
            for top in ["system.slice", "init.scope"] {
                let top = root.join(top);
                if top.is_dir() {
                    let _ = Command::new("find")
                        .arg(&top)
                        .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

fn unshare_permitted() -> bool {
    Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--mount-proc", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && Path::new("/lib/systemd/systemd").exists()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn real_systemd_drives_the_shipped_units() {
    if !unshare_permitted() {
        eprintln!(
            "\n!!!!!!!! SKIPPED real_systemd_drives_the_shipped_units: unshare --pid --mount is not permitted here (or /lib/systemd/systemd is missing). The shipped units were NOT tested under a real systemd. !!!!!!!!\n"
        );
        return;
    }
    let redis = RedisServer::start();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    // DynamicUser implies PrivateTmp: binary and config must live outside /tmp.
    let install_dir = PathBuf::from(format!(
        "/usr/local/lib/satchel-test-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&install_dir).unwrap();
    std::fs::copy(satchel_bin(), install_dir.join("satchel")).unwrap();
    write(
        &install_dir.join("satchel.toml"),
        &format!(
            "[redis]\nurl = \"{}\"\n[log]\nlevel = \"info,satchel=debug\"\n",
            redis.url()
        ),
    );
    let units = tempfile::tempdir().unwrap();
    let unitdir = units.path();
    for target in STUB_TARGETS {
        write(&unitdir.join(target), "[Unit]\nDescription=stub\n");
    }
    write(
        &unitdir.join("test.target"),
        "[Unit]\nDescription=test\nWants=satchel.socket\n",
    );
    std::fs::copy(
        repo.join("systemd/satchel.service"),
        unitdir.join("satchel.service"),
    )
    .unwrap();
    std::fs::copy(
        repo.join("systemd/satchel.socket"),
        unitdir.join("satchel.socket"),
    )
    .unwrap();
    let socket = unitdir.join("satchel.sock");
    let log = install_dir.join("daemon.log");
    // Drop-ins change only paths, the log target and the watchdog period; every
    // hardening line stays as shipped.
    write(
        &unitdir.join("satchel.service.d/test.conf"),
        &format!(
            "[Service]\nExecStart=\nExecStart={bin} serve --config {cfg}\nWatchdogSec=2s\nStandardOutput=append:{log}\nStandardError=append:{log}\n",
            bin = install_dir.join("satchel").display(),
            cfg = install_dir.join("satchel.toml").display(),
            log = log.display(),
        ),
    );
    write(
        &unitdir.join("satchel.socket.d/test.conf"),
        &format!(
            "[Socket]\nListenStream=\nListenStream={}\nSocketGroup=\nSocketMode=0666\n",
            socket.display()
        ),
    );
    let unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--mount-proc", "sh", "-c"])
        .arg(format!(
            "mount --make-rprivate / && mount -t tmpfs tmpfs /run && exec env container=test SYSTEMD_UNIT_PATH={} /lib/systemd/systemd --system --unit=test.target --log-target=kmsg --show-status=no",
            unitdir.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare");
    let unshare_pid = unshare.id();
    let mut pid = 0;
    wait_until(Duration::from_secs(5), || {
        let out = Command::new("pgrep")
            .args(["-P", &unshare_pid.to_string()])
            .output();
        pid = out
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0);
        pid != 0
    });
    assert_ne!(pid, 0, "systemd did not start in the namespace");
    let sd = NamespacedSystemd {
        unshare,
        pid,
        install_dir: install_dir.clone(),
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    assert!(
        wait_until(Duration::from_secs(10), || sd
            .show("satchel.socket", "ActiveState")
            == "active"),
        "satchel.socket did not become active: {}",
        sd.systemctl(&["status", "satchel.socket"])
    );
    assert_eq!(
        sd.show("satchel.service", "ActiveState"),
        "inactive",
        "started before any connection"
    );

    // Socket activation on first connect.
    let ping = |id: u64| -> bool {
        let Ok(mut s) = UnixStream::connect(&socket) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        s.write_all(&frame(&request(id, "ping", |_| 0))).is_ok()
            && read_frame(&mut s).map(|f| decode(&f).1).unwrap_or(false)
    };
    assert!(
        ping(1),
        "no pong over the activated socket; log:\n{}",
        log_text()
    );
    assert!(
        wait_until(Duration::from_secs(5), || sd
            .show("satchel.service", "ActiveState")
            == "active"),
        "service not active (Type=notify READY=1 missing?): {}\n{}",
        sd.systemctl(&["status", "satchel.service"]),
        log_text()
    );
    assert!(
        wait_until(Duration::from_secs(5), || sd
            .show("satchel.service", "StatusText")
            .contains("connections")),
        "STATUS= not shown"
    );

    // systemctl stop → clean exit.
    sd.systemctl(&["stop", "satchel.service"]);
    assert!(wait_until(Duration::from_secs(10), || sd
        .show("satchel.service", "ActiveState")
        == "inactive"));
    assert_eq!(
        sd.show("satchel.service", "Result"),
        "success",
        "log:\n{}",
        log_text()
    );
    assert_eq!(sd.show("satchel.service", "ExecMainStatus"), "0");

    // Watchdog: a frozen daemon is killed.
    assert!(ping(2), "socket activation after stop");
    assert!(wait_until(Duration::from_secs(5), || sd
        .show("satchel.service", "ActiveState")
        == "active"));
    let main_pid: u32 = sd.show("satchel.service", "MainPID").parse().unwrap();
    assert_ne!(main_pid, 0);
    // MainPID is in the namespace's pid space; find the host pid of that process.
    let host_pid = host_pid_of(pid, main_pid).expect("daemon's host pid");
    signal(host_pid, Signal::SIGSTOP);
    let killed = wait_until(Duration::from_secs(15), || {
        sd.show("satchel.service", "Result") == "watchdog"
    });
    signal(host_pid, Signal::SIGCONT);
    assert!(
        killed,
        "watchdog did not fire: {}",
        sd.systemctl(&["status", "satchel.service"])
    );
}

/// Maps a pid inside the namespace (whose PID 1 is `ns_init`) to the host pid by
/// scanning /proc/<pid>/status NSpid lines.
fn host_pid_of(ns_init: u32, ns_pid: u32) -> Option<u32> {
    let init_ns = std::fs::read_link(format!("/proc/{ns_init}/ns/pid")).ok()?;
    for entry in std::fs::read_dir("/proc").ok()? {
        let name = entry.ok()?.file_name();
        let Ok(pid) = name.to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != Some(init_ns.clone()) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:"))?.to_owned();
        if nspid
            .split_whitespace()
            .last()
            .and_then(|s| s.parse::<u32>().ok())
            == Some(ns_pid)
        {
            return Some(pid);
        }
    }
    None
}
