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

/// A six-node Redis Cluster (three primaries, three replicas), started once per
/// test binary (creating one takes seconds) and shared by its tests, which keep
/// apart by `redis.prefix`. Its processes are children of a thread that lives as
/// long as the test process, with `PR_SET_PDEATHSIG`, so they die with it.
pub struct Cluster {
    pub ports: Vec<u16>,
}

static CLUSTER: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();

impl Cluster {
    pub fn shared() -> &'static Cluster {
        CLUSTER.get_or_init(Cluster::start)
    }

    fn start() -> Cluster {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("cluster-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
            let mut children = Vec::new();
            for p in &ports {
                let d = dir.join(p.to_string());
                std::fs::create_dir_all(&d).expect("cluster node dir");
                let mut cmd = Command::new("redis-server");
                cmd.args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                    .args([
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                    ])
                    .args([
                        "--cluster-node-timeout",
                        "2000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    // A replica in sync at once, not after the default 5 s delay.
                    .args(["--repl-diskless-sync-delay", "0"])
                    .arg("--dir")
                    .arg(&d)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                // SAFETY: prctl is async-signal-safe; it only sets this child's
                // parent-death signal.
                unsafe {
                    use std::os::unix::process::CommandExt;
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                children.push(cmd.spawn().expect("redis-server must be installed"));
            }
            for p in &ports {
                assert!(
                    wait_until(Duration::from_secs(10), || redis_ping(*p)),
                    "cluster node {p} did not start"
                );
            }
            let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            let out = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .output()
                .expect("redis-cli must be installed");
            assert!(
                out.status.success(),
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            let cluster = Cluster { ports };
            assert!(
                wait_until(Duration::from_secs(30), || cluster.is_ok()),
                "the cluster never became ok"
            );
            tx.send(cluster).expect("send the cluster");
            // Keep the children's parent thread alive until the process exits.
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("cluster start")
    }

    /// Every node says `cluster_state:ok` and agrees on three primaries with a replica
    /// each.
    pub fn is_ok(&self) -> bool {
        self.ports.iter().all(|p| {
            let info: String = redis::Client::open(format!("redis://127.0.0.1:{p}"))
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query(&mut c))
                .unwrap_or_default();
            info.contains("cluster_state:ok")
        }) && self.primaries().len() == 3
            && self.replica_of_each()
    }

    /// Every primary has a replica that is in sync and acknowledging writes (`WAIT`
    /// on a write of a key the primary serves); "online" alone comes a second
    /// before a new replica acknowledges anything.
    fn replica_of_each(&self) -> bool {
        self.primaries().iter().all(|p| {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut self.node(*p))
                .unwrap_or_default();
            if !(info.contains("connected_slaves:1") && info.contains("state=online")) {
                return false;
            }
            let Some(key) = (0..1000)
                .map(|i| format!("harness:probe:{i}"))
                .find(|k| self.primary_of(k) == *p)
            else {
                return false;
            };
            let mut conn = self.node(*p);
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .query::<()>(&mut conn)
                .is_ok()
                && redis::cmd("WAIT").arg(1).arg(200).query::<i64>(&mut conn) == Ok(1)
        })
    }

    /// A connection to one node.
    pub fn node(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|c| c.get_connection())
            .expect("connect to a cluster node")
    }

    /// The ports of the primaries now.
    pub fn primaries(&self) -> Vec<u16> {
        self.ports
            .iter()
            .copied()
            .filter(|p| {
                redis::cmd("ROLE")
                    .query::<Vec<redis::Value>>(&mut self.node(*p))
                    .ok()
                    .and_then(|r| r.into_iter().next())
                    == Some(redis::Value::BulkString(b"master".to_vec()))
            })
            .collect()
    }

    /// The primary that holds `key`'s slot now.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.node(self.ports[0]))
            .expect("CLUSTER KEYSLOT");
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.node(self.ports[0]))
            .expect("CLUSTER SLOTS");
        for range in slots {
            let redis::Value::Array(f) = range else {
                continue;
            };
            let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) = (f.first(), f.get(1))
            else {
                continue;
            };
            if (*lo..=*hi).contains(&(slot as i64))
                && let Some(redis::Value::Array(n)) = f.get(2)
                && let Some(redis::Value::Int(port)) = n.get(1)
            {
                return *port as u16;
            }
        }
        panic!("no primary holds slot {slot}");
    }

    /// A replica of the primary on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        self.ports
            .iter()
            .copied()
            .find(|p| {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut self.node(*p))
                    .unwrap_or_default();
                info.contains("role:slave") && info.contains(&format!("master_port:{port}"))
            })
            .expect("a replica of that primary")
    }

    /// A synchronous cluster client for assertions straight against Redis.
    pub fn client(&self) -> redis::cluster::ClusterConnection {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        redis::cluster::ClusterClient::new(nodes)
            .and_then(|c| c.get_connection())
            .expect("cluster client")
    }

    /// `[redis]` for a daemon on this cluster with its own key prefix.
    pub fn redis_toml(&self, prefix: &str) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .take(3)
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        format!(
            "[redis]\ncluster_nodes = [{}]\nprefix = \"{prefix}\"\n",
            nodes.join(", ")
        )
    }
}
