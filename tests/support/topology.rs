//! Redis beyond one server, for tests: a master with a replica watched by three
//! sentinels (all plain `redis-server` processes on free ports, in private
//! directories). See `../shared/recipes/redis-topologies.md`.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{RedisServer, free_port, redis_ping, wait_until};

/// The name the sentinels monitor.
pub const MASTER_NAME: &str = "satchelmaster";

/// One `redis-server --sentinel`.
pub struct SentinelServer {
    child: Option<Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl SentinelServer {
    fn start(master_port: u16) -> SentinelServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 5000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir.path().display()
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run does this)");
        assert!(
            wait_until(Duration::from_secs(10), || redis_ping(port)),
            "sentinel did not start on {port}"
        );
        SentinelServer {
            child: Some(child),
            port,
            _dir: dir,
        }
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .and_then(|c| c.get_connection())
            .expect("connect to sentinel")
    }

    /// `SENTINEL MASTER <name>` as a map.
    fn master_info(&self) -> HashMap<String, String> {
        redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(MASTER_NAME)
            .query(&mut self.conn())
            .unwrap_or_default()
    }

    /// The port of the master this sentinel names now.
    pub fn master_port(&self) -> Option<u16> {
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER_NAME)
            .query(&mut self.conn())
            .ok()?;
        addr.map(|(_, p)| p)
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One master, one replica, three sentinels (quorum 2, down after 1 s).
pub struct SentinelSet {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<SentinelServer>,
}

impl SentinelSet {
    /// Starts everything with `extra` arguments for both data servers, and waits
    /// until the replica is in sync and every sentinel knows the replica and the
    /// other two sentinels (so a failover can be agreed on).
    pub fn start(extra: &[&str]) -> SentinelSet {
        let master = RedisServer::start_with(extra);
        let mport = master.port.to_string();
        let mut args = vec!["--replicaof", "127.0.0.1", mport.as_str()];
        args.extend_from_slice(extra);
        let replica = RedisServer::start_with(&args);
        assert!(
            wait_until(Duration::from_secs(20), || {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut master.conn())
                    .unwrap_or_default();
                info.contains("state=online")
            }),
            "the replica never came online"
        );
        let sentinels: Vec<_> = (0..3).map(|_| SentinelServer::start(master.port)).collect();
        assert!(
            wait_until(Duration::from_secs(30), || {
                sentinels.iter().all(|s| {
                    let m = s.master_info();
                    m.get("num-slaves").map(String::as_str) == Some("1")
                        && m.get("num-other-sentinels").map(String::as_str) == Some("2")
                })
            }),
            "the sentinels never saw each other and the replica"
        );
        SentinelSet {
            master,
            replica,
            sentinels,
        }
    }

    /// `[redis]` for a daemon that finds the master through these sentinels.
    pub fn redis_toml(&self) -> String {
        let nodes: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("\"127.0.0.1:{}\"", s.port))
            .collect();
        format!(
            "[redis]\nsentinel_nodes = [{}]\nsentinel_master = \"{MASTER_NAME}\"\n",
            nodes.join(", ")
        )
    }

    /// The master port every reachable sentinel agrees on, if they agree.
    pub fn agreed_master_port(&self) -> Option<u16> {
        let ports: Vec<Option<u16>> = self.sentinels.iter().map(|s| s.master_port()).collect();
        let first = ports.first().copied().flatten()?;
        ports.iter().all(|p| *p == Some(first)).then_some(first)
    }
}

/// What the daemon's URL must be while the config names sentinels (the default).
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";
