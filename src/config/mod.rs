//! Configuration: a TOML file in which every key is optional, then environment
//! overrides `SATCHEL_<SECTION>_<KEY>`, then validation that names the offending key.
//!
//! The defaults serve a developer with no file at all: a socket under
//! `$XDG_RUNTIME_DIR` and the Redis on localhost.
//!
//! This module is a leaf: it imports nothing from the services. Values that need
//! parsing (`mail.smtp_url`, the transport choice, files named by the config) are
//! parsed or read once, here, so a service gets typed values and never a string to
//! re-parse.

mod dkim;
mod mail;
mod smtp_url;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use dkim::{DkimAlgorithm, DkimEntry, DkimKey};
pub use mail::{MailConfig, OnRedisDown, TransportChoice, TransportKind};
pub use smtp_url::{SmtpUrl, TlsMode};

/// Longest lease a `cache.fetch` may ask for; tag-invalidation records live this long.
pub const MAX_LEASE_MS: u64 = 600_000;
/// Longest a `cache.fetch` may wait for another caller's fill.
pub const MAX_WAIT_MS: u64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub redis: RedisConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
    pub mail: MailConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Path of the Unix socket. Ignored under socket activation.
    pub socket: PathBuf,
    /// Octal permission bits of the socket file, e.g. "0660".
    pub socket_mode: String,
    /// Group (name or numeric gid) to give the socket file; empty leaves it as created.
    pub socket_group: String,
    pub max_frame_bytes: u64,
    pub max_inflight_per_conn: u64,
    /// Bytes of request frames one connection may have in flight; at the bound the
    /// daemon stops reading that socket (one frame over the bound is always let in).
    pub max_inflight_bytes_per_conn: u64,
    /// Bytes of responses one connection may have waiting to be written; while more
    /// wait, the daemon stops reading that socket (the client is not reading).
    pub max_output_bytes_per_conn: u64,
    /// Largest answer to one request; a bigger one is `TOO_LARGE`, decided before
    /// it is built.
    pub max_response_bytes: u64,
    pub max_connections: u64,
    pub shutdown_timeout_ms: u64,
    /// Threads of the async runtime; 0 = one per CPU core. One is the default: the
    /// daemon mostly waits on sockets, and on one thread a request never pays a
    /// cross-thread wake-up between its connection task and the Redis connection
    /// (measured in BENCHMARKS.md: 1.8x the cache.get throughput of two threads).
    pub worker_threads: u64,
    /// Peer uids allowed to talk to the daemon; empty (with empty `allow_gids`) = anyone
    /// who can open the socket.
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `redis+unix:///path/to/redis.sock`.
    pub url: String,
    /// Every key the daemon writes starts with `<prefix>:`.
    pub prefix: String,
    pub connect_timeout_ms: u64,
    pub response_timeout_ms: u64,
    /// Commands the daemon keeps in flight on its shared Redis connection.
    pub max_inflight: u64,
    /// Microseconds a lone cache command (no other command in flight) busy-polls for
    /// its reply before the runtime thread sleeps; 0 = never.
    pub spin_us: u64,
    /// Refuse `mail.send` (UNAVAILABLE, with the reason) while `INFO` shows a
    /// durability warning (eviction, no AOF); the cache keeps working.
    pub require_durable: bool,
    /// TLS where the URL does not say so (`rediss://` always means TLS).
    pub tls: bool,
    /// PEM root certificates to trust instead of the system's (a private CA).
    pub tls_ca_file: String,
    /// A client certificate and its key (PEM) for mutual TLS; both or neither.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// ACL user and password; override what the URL's userinfo says.
    pub username: String,
    pub password: String,
    /// Sentinel mode: the sentinels to ask (`host:port`) for the master named
    /// `sentinel_master`; the daemon follows failovers by itself.
    pub sentinel_nodes: Vec<String>,
    pub sentinel_master: String,
    /// Cluster mode: seed nodes (`host:port`); the rest of the cluster is discovered.
    pub cluster_nodes: Vec<String>,
    /// The TLS files' contents, read once when the config is loaded.
    #[serde(skip)]
    pub tls_files: Option<Arc<RedisTlsFiles>>,
}

/// What `redis.tls_*_file` hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTlsFiles {
    pub ca: Option<Vec<u8>>,
    /// Certificate and key, PEM.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// Every entry of `nodes` is `host:port`.
fn host_ports(key: &'static str, nodes: &[String]) -> Result<(), ConfigError> {
    for node in nodes {
        let ok = node
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(invalid(key, format!("{node:?} is not host:port")));
        }
    }
    Ok(())
}

/// Which shape of Redis the daemon talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisMode {
    /// One server, `redis.url`.
    Single,
    /// A master found through sentinels, followed across failovers.
    Sentinel { nodes: Vec<String>, master: String },
    /// A Redis Cluster, found from seed nodes.
    Cluster { nodes: Vec<String> },
}

impl RedisConfig {
    pub fn mode(&self) -> RedisMode {
        if !self.cluster_nodes.is_empty() {
            RedisMode::Cluster {
                nodes: self.cluster_nodes.clone(),
            }
        } else if self.sentinel_nodes.is_empty() {
            RedisMode::Single
        } else {
            RedisMode::Sentinel {
                nodes: self.sentinel_nodes.clone(),
                master: self.sentinel_master.clone(),
            }
        }
    }

    /// One mode at a time, each complete.
    fn validate_mode(&self) -> Result<(), ConfigError> {
        if !self.cluster_nodes.is_empty() {
            if !self.sentinel_nodes.is_empty() || !self.sentinel_master.is_empty() {
                return Err(invalid(
                    "redis.cluster_nodes",
                    "choose one: redis.cluster_nodes (a Redis Cluster) or redis.sentinel_nodes (Sentinel), not both",
                ));
            }
            if self.url != DEFAULT_REDIS_URL {
                return Err(invalid(
                    "redis.url",
                    "choose one: redis.url (one server) or redis.cluster_nodes (a Redis Cluster); \
                     remove redis.url / SATCHEL_REDIS_URL, and use redis.tls, redis.username and \
                     redis.password for what the URL said",
                ));
            }
            return host_ports("redis.cluster_nodes", &self.cluster_nodes);
        }
        if self.sentinel_nodes.is_empty() {
            if !self.sentinel_master.is_empty() {
                return Err(invalid(
                    "redis.sentinel_nodes",
                    "required with redis.sentinel_master (the sentinels to ask for it)",
                ));
            }
            return Ok(());
        }
        if self.sentinel_master.is_empty() {
            return Err(invalid(
                "redis.sentinel_master",
                "required with redis.sentinel_nodes (the name the sentinels monitor)",
            ));
        }
        if self.url != DEFAULT_REDIS_URL {
            return Err(invalid(
                "redis.url",
                "choose one: redis.url (one server) or redis.sentinel_nodes (the sentinels \
                 name the server); remove redis.url / SATCHEL_REDIS_URL, and use redis.tls, \
                 redis.username and redis.password for what the URL said",
            ));
        }
        host_ports("redis.sentinel_nodes", &self.sentinel_nodes)
    }

    /// Reads the TLS files the section names, once, so that a missing file is an error
    /// at start (and at reload) that names its key.
    pub fn read_files(&mut self) -> Result<(), ConfigError> {
        let read = |key: &'static str, path: &str| -> Result<Option<Vec<u8>>, ConfigError> {
            if path.is_empty() {
                return Ok(None);
            }
            std::fs::read(path)
                .map(Some)
                .map_err(|e| invalid(key, format!("{path}: {e}")))
        };
        let ca = read("redis.tls_ca_file", &self.tls_ca_file)?;
        let cert = read("redis.tls_cert_file", &self.tls_cert_file)?;
        let key = read("redis.tls_key_file", &self.tls_key_file)?;
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "redis.tls_key_file",
                    "required with redis.tls_cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "redis.tls_cert_file",
                    "required with redis.tls_key_file",
                ));
            }
        };
        self.tls_files =
            (ca.is_some() || client.is_some()).then(|| Arc::new(RedisTlsFiles { ca, client }));
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub max_key_bytes: u64,
    pub max_value_bytes: u64,
    /// TTL of an entry stored without `ttl_ms`.
    pub default_ttl_ms: u64,
    /// How long a `cache.fetch` lease lasts when the request names none.
    pub lease_ms: u64,
    /// How long `cache.fetch` waits for another caller's fill when the request names none.
    pub wait_ms: u64,
    /// Give each peer uid its own key space.
    pub isolate_by_uid: bool,
    /// Most keys one `cache.mget` or `cache.del` may name.
    pub max_keys_per_request: u64,
    /// Most tags (plus the prefix) one `cache.invalidate` may name.
    pub max_invalidations_per_request: u64,
    /// Keep recently read values in the daemon's memory, coherent by Redis tracking.
    pub near: bool,
    /// Bytes the near-cache may hold (keys, values and per-entry overhead).
    pub near_max_bytes: u64,
    /// The longest a near entry is served as a hit, whatever its Redis TTL.
    pub near_max_ttl_ms: u64,
    /// The most a request's `max_stale_ms` may ask; also how long unverified near
    /// entries are kept for it.
    pub max_stale_ms: u64,
    /// Keys one `cache.track` connection may have read before it gets a flush.
    pub track_max_keys: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_key_bytes: 1024,
            max_value_bytes: 1024 * 1024,
            default_ttl_ms: 3_600_000,
            lease_ms: 2000,
            wait_ms: 3000,
            isolate_by_uid: false,
            max_keys_per_request: 10_000,
            max_invalidations_per_request: 1000,
            near: true,
            near_max_bytes: 64 * 1024 * 1024,
            near_max_ttl_ms: 60_000,
            max_stale_ms: 300_000,
            track_max_keys: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `satchel=debug,redis=warn`, …
    pub level: String,
}

/// `[metrics]`: the HTTP endpoint for Prometheus (`GET /metrics`) and load balancers
/// or probes (`GET /healthz`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to serve on, e.g. `127.0.0.1:9464`; `""` = off. Read at start.
    pub listen: String,
}

impl MetricsConfig {
    /// The address to listen on, if the endpoint is on.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

/// The socket path used when none is configured, for this process.
pub fn default_socket_path() -> PathBuf {
    default_socket_path_for(
        nix::unistd::getuid().as_raw(),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
    )
}

/// The one rule (protocol.md, "Transport"), shared by the daemon and every client:
/// root uses the system path the shipped units use, `/run/satchel/satchel.sock`,
/// whatever its environment says (a root shell with `XDG_RUNTIME_DIR=/run/user/0`
/// must still reach the system daemon); anyone else uses
/// `$XDG_RUNTIME_DIR/satchel/satchel.sock` when that variable is set and non-empty,
/// else `/tmp/satchel-<uid>/satchel.sock`.
pub fn default_socket_path_for(uid: u32, xdg_runtime_dir: Option<&std::ffi::OsStr>) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/run/satchel/satchel.sock");
    }
    match xdg_runtime_dir.filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("satchel/satchel.sock"),
        None => PathBuf::from(format!("/tmp/satchel-{uid}/satchel.sock")),
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: default_socket_path(),
            socket_mode: "0660".into(),
            socket_group: String::new(),
            max_frame_bytes: 8 * 1024 * 1024,
            max_inflight_per_conn: 1024,
            max_inflight_bytes_per_conn: 4 * 1024 * 1024,
            max_output_bytes_per_conn: 4 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            max_connections: 1024,
            shutdown_timeout_ms: 10_000,
            worker_threads: 1,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
        }
    }
}

/// `redis.url` when nothing sets it.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: DEFAULT_REDIS_URL.into(),
            prefix: "satchel".into(),
            connect_timeout_ms: 1000,
            response_timeout_ms: 1000,
            max_inflight: 1024,
            spin_us: 40,
            require_durable: false,
            tls: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            username: String::new(),
            password: String::new(),
            sentinel_nodes: Vec::new(),
            sentinel_master: String::new(),
            cluster_nodes: Vec::new(),
            tls_files: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl ServerConfig {
    pub fn socket_mode_bits(&self) -> u32 {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8).unwrap_or(0o660)
    }
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

impl RedisConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
}

/// Where the daemon's configuration comes from: a file (or none) and the
/// command line's `--socket`, which wins over both the file and the environment.
/// Kept for the life of the daemon, so a SIGHUP reload reads the same sources.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub socket: Option<PathBuf>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load(self.path.as_deref())?;
        if let Some(socket) = &self.socket {
            config.server.socket = socket.clone();
        }
        Ok(config)
    }
}

impl Config {
    /// Loads the file (if any), applies `SATCHEL_*` overrides from the process
    /// environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment passed in (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.to_owned(),
                        message: e.message().to_owned(),
                    })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        // serde_path_to_error names the key a bad value sits at ("mail.transport:
        // unknown variant `pigeon`…"), which toml's own error leaves out.
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e: serde_path_to_error::Error<toml::de::Error>| {
                let key = e.path().to_string();
                let message = e.into_inner().message().to_owned();
                ConfigError::Parse {
                    path: path
                        .map(Path::to_owned)
                        .unwrap_or_else(|| "<environment>".into()),
                    message: if key == "." || message.starts_with(&key) {
                        message
                    } else {
                        format!("`{key}`: {message}")
                    },
                }
            })?;
        config.validate()?;
        config.mail.read_files()?;
        config.redis.read_files()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.socket.as_os_str().is_empty() {
            return Err(invalid("server.socket", "must not be empty"));
        }
        match u32::from_str_radix(s.socket_mode.trim_start_matches("0o"), 8) {
            Ok(bits) if bits <= 0o777 => {}
            _ => {
                return Err(invalid(
                    "server.socket_mode",
                    format!(
                        "must be octal permission bits like \"0660\", got {:?}",
                        s.socket_mode
                    ),
                ));
            }
        }
        if !(1024..=u32::MAX as u64).contains(&s.max_frame_bytes) {
            return Err(invalid(
                "server.max_frame_bytes",
                "must be between 1024 and 4294967295",
            ));
        }
        if s.worker_threads > 1024 {
            return Err(invalid(
                "server.worker_threads",
                "must be between 0 (one per CPU core) and 1024",
            ));
        }
        if s.max_inflight_per_conn == 0 {
            return Err(invalid(
                "server.max_inflight_per_conn",
                "must be at least 1",
            ));
        }
        if s.max_inflight_bytes_per_conn == 0 {
            return Err(invalid(
                "server.max_inflight_bytes_per_conn",
                "must be at least 1",
            ));
        }
        if s.max_output_bytes_per_conn < 64 * 1024 {
            return Err(invalid(
                "server.max_output_bytes_per_conn",
                "must be at least 65536",
            ));
        }
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        let r = &self.redis;
        if let Err(e) = redis::Client::open(r.url.as_str()) {
            return Err(invalid("redis.url", format!("{e}")));
        }
        r.validate_mode()?;
        if r.prefix.is_empty() || r.prefix.contains(char::is_whitespace) {
            return Err(invalid(
                "redis.prefix",
                "must be non-empty and contain no whitespace",
            ));
        }
        if r.spin_us > 1000 {
            return Err(invalid("redis.spin_us", "must be between 0 and 1000"));
        }
        if r.max_inflight == 0 {
            return Err(invalid("redis.max_inflight", "must be at least 1"));
        }
        if r.connect_timeout_ms == 0 || r.response_timeout_ms == 0 {
            let key = if r.connect_timeout_ms == 0 {
                "redis.connect_timeout_ms"
            } else {
                "redis.response_timeout_ms"
            };
            return Err(invalid(key, "must be at least 1"));
        }
        let c = &self.cache;
        if c.max_key_bytes == 0 || c.max_key_bytes > 65536 {
            return Err(invalid(
                "cache.max_key_bytes",
                "must be between 1 and 65536",
            ));
        }
        if c.max_value_bytes == 0 || c.max_value_bytes >= s.max_frame_bytes {
            return Err(invalid(
                "cache.max_value_bytes",
                "must be at least 1 and below server.max_frame_bytes",
            ));
        }
        if s.max_response_bytes < 1024 * 1024 {
            return Err(invalid(
                "server.max_response_bytes",
                "must be at least 1048576",
            ));
        }
        if c.max_value_bytes > s.max_response_bytes / 2 {
            return Err(invalid(
                "cache.max_value_bytes",
                "must be at most half of server.max_response_bytes",
            ));
        }
        for (key, v) in [
            ("cache.max_keys_per_request", c.max_keys_per_request),
            (
                "cache.max_invalidations_per_request",
                c.max_invalidations_per_request,
            ),
        ] {
            if !(1..=1_000_000).contains(&v) {
                return Err(invalid(key, "must be between 1 and 1000000"));
            }
        }
        if c.near && c.near_max_bytes < 1024 * 1024 {
            return Err(invalid("cache.near_max_bytes", "must be at least 1048576"));
        }
        if c.near_max_ttl_ms == 0 || c.near_max_ttl_ms > 86_400_000 {
            return Err(invalid(
                "cache.near_max_ttl_ms",
                "must be between 1 and 86400000",
            ));
        }
        if c.track_max_keys == 0 || c.track_max_keys > 10_000_000 {
            return Err(invalid(
                "cache.track_max_keys",
                "must be between 1 and 10000000",
            ));
        }
        if c.max_stale_ms > 86_400_000 {
            return Err(invalid("cache.max_stale_ms", "must be at most 86400000"));
        }
        if c.default_ttl_ms == 0 {
            return Err(invalid("cache.default_ttl_ms", "must be at least 1"));
        }
        if c.lease_ms == 0 || c.lease_ms > MAX_LEASE_MS {
            return Err(invalid(
                "cache.lease_ms",
                format!("must be between 1 and {}", MAX_LEASE_MS),
            ));
        }
        if c.wait_ms > MAX_WAIT_MS {
            return Err(invalid(
                "cache.wait_ms",
                format!("must be at most {}", MAX_WAIT_MS),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", format!("{e}")));
        }
        self.mail.validate()?;
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "must be host:port with an IP address, like \"127.0.0.1:9464\", got {:?}",
                    self.metrics.listen
                ),
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `satchel check-config`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.redis.password.is_empty() {
            shown.redis.password = "<redacted>".into();
        }
        if !shown.mail.webhook_secret.is_empty() {
            shown.mail.webhook_secret = "<redacted>".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Applies `SATCHEL_<SECTION>_<KEY>=value` overrides. The value is parsed according to
/// the type of the key's default (string, integer, bool, list), so `SATCHEL_SERVER_SOCKET`
/// needs no TOML quoting. Variables naming no known section are left alone (the client
/// reads `SATCHEL_SOCKET`); a known section with an unknown key is an error.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("SATCHEL_"))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let rest = var["SATCHEL_".len()..].to_ascii_lowercase();
        let Some((section, section_defaults)) = defaults.iter().find_map(|(name, v)| {
            let t = v.as_table()?;
            rest.strip_prefix(name.as_str())?
                .strip_prefix('_')
                .map(|_| (name.clone(), t))
        }) else {
            continue;
        };
        let key = &rest[section.len() + 1..];
        let env_err = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let Some(default) = section_defaults.get(key) else {
            return Err(env_err(format!("`{section}` has no key `{key}`")));
        };
        let value = parse_env_value(default, &raw).map_err(env_err)?;
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            return Err(invalid(&section, "must be a table"));
        };
        section_table.insert(key.to_owned(), value);
    }
    Ok(())
}

fn parse_env_value(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    Ok(match default {
        Value::String(_) => Value::String(raw.to_owned()),
        Value::Integer(_) => Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| format!("expected an integer, got {raw:?}"))?,
        ),
        Value::Boolean(_) => Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(format!("expected true or false, got {raw:?}")),
        }),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<i64>()
                        .map(Value::Integer)
                        .unwrap_or_else(|_| Value::String(s.to_owned()))
                })
                .collect(),
        ),
        _ => return Err("this key cannot be set from the environment".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load_str(toml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("satchel.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load_with_env(Some(&path), env(vars))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = load_str("", &[]).unwrap();
        assert_eq!(c.server.max_inflight_per_conn, 1024);
        assert_eq!(c.redis.url, "redis://127.0.0.1:6379");
    }

    #[test]
    fn env_overrides_file_with_typed_values() {
        let c = load_str(
            "[server]\nmax_connections = 5\n",
            &[
                ("SATCHEL_SERVER_MAX_CONNECTIONS", "7"),
                ("SATCHEL_SERVER_SOCKET", "/tmp/x.sock"),
                ("SATCHEL_SERVER_ALLOW_UIDS", "1000, 1001"),
                ("SATCHEL_REDIS_URL", "redis+unix:///tmp/r.sock"),
                ("SATCHEL_SOCKET", "/ignored/for/the/client"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.max_connections, 7);
        assert_eq!(c.server.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.server.allow_uids, vec![1000, 1001]);
        assert_eq!(c.redis.url, "redis+unix:///tmp/r.sock");
    }

    #[test]
    fn sentinel_mode_is_complete_and_exclusive() {
        let c = load_str(
            "[redis]\nsentinel_nodes = [\"10.0.0.1:26379\", \"s2:26379\"]\nsentinel_master = \"m\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.redis.mode(),
            RedisMode::Sentinel {
                nodes: vec!["10.0.0.1:26379".into(), "s2:26379".into()],
                master: "m".into()
            }
        );
        let from_env = load_str(
            "",
            &[
                ("SATCHEL_REDIS_SENTINEL_NODES", "a:1,b:2"),
                ("SATCHEL_REDIS_SENTINEL_MASTER", "m"),
            ],
        )
        .unwrap();
        assert_eq!(from_env.redis.sentinel_nodes, vec!["a:1", "b:2"]);
        let both = load_str(
            "[redis]\nurl = \"redis://h:6380\"\nsentinel_nodes = [\"s:26379\"]\nsentinel_master = \"m\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            both.contains("redis.url") && both.contains("choose one"),
            "{both}"
        );
        let no_name = load_str("[redis]\nsentinel_nodes = [\"s:26379\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(no_name.contains("redis.sentinel_master"), "{no_name}");
        let no_nodes = load_str("[redis]\nsentinel_master = \"m\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(no_nodes.contains("redis.sentinel_nodes"), "{no_nodes}");
        let bad = load_str(
            "[redis]\nsentinel_nodes = [\"nope\"]\nsentinel_master = \"m\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("not host:port"), "{bad}");
        let both = load_str(
            "[redis]\ncluster_nodes = [\"c:7000\"]\nsentinel_nodes = [\"s:26379\"]\nsentinel_master = \"m\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(both.contains("redis.cluster_nodes"), "{both}");
        let c = load_str("", &[("SATCHEL_REDIS_CLUSTER_NODES", "c1:7000,c2:7001")]).unwrap();
        assert_eq!(
            c.redis.mode(),
            RedisMode::Cluster {
                nodes: vec!["c1:7000".into(), "c2:7001".into()]
            }
        );
        let ack = load_str("[mail]\nreplica_ack_timeout_ms = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(ack.contains("mail.replica_ack_timeout_ms"), "{ack}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = load_str("[server]\nsockett = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sockett"), "{e}");
        let e = load_str("[server]\nsocket_mode = \"999\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.socket_mode"), "{e}");
        let e = load_str("", &[("SATCHEL_SERVER_NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SATCHEL_SERVER_NOPE"), "{e}");
        let e = load_str("", &[("SATCHEL_SERVER_MAX_CONNECTIONS", "many")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SATCHEL_SERVER_MAX_CONNECTIONS") && e.contains("integer"),
            "{e}"
        );
        let e = load_str("[redis]\nspin_us = 5000\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("redis.spin_us"), "{e}");
        let e = load_str("[server]\nworker_threads = 5000\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.worker_threads"), "{e}");
        let e = load_str("[redis]\nurl = \"http://x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("redis.url"), "{e}");
    }
}
