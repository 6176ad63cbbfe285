//! Sentinel mode: which server is the master now.
//!
//! The redis crate finds a master through sentinels (its `SentinelClient` asks each
//! sentinel in turn and checks the answer with `ROLE`), but it does not follow a
//! failover: a client it built keeps talking to the old address. So the backend
//! asks again ([`Sentinels::master`]) whenever it has a reason to think the master
//! moved — its connection was lost, a command got `READONLY`, the probe's `ROLE`
//! says "slave", or a sentinel announced `+switch-master` ([`Sentinels::events`]) —
//! and swaps in clients for the new address.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, TlsMode};
use tokio::sync::Mutex;

use crate::config::RedisConfig;

/// The sentinels of one master name.
pub struct Sentinels {
    client: Mutex<SentinelClient>,
    master: String,
    /// How long one lookup may take before it counts as failed (a stopped sentinel
    /// must not hang the probe).
    timeout: Duration,
}

impl std::fmt::Debug for Sentinels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinels")
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

/// `host:port` → an address, plain or TLS as the config says.
fn sentinel_addr(node: &str, tls: bool) -> Result<ConnectionAddr, String> {
    let (host, port) = node
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("{node:?} is not host:port"))?;
    Ok(if tls {
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host, port)
    })
}

impl Sentinels {
    /// The sentinels in `cfg`: spoken to with the same TLS settings as the servers,
    /// and without credentials (`redis.username`/`password` are the servers').
    pub fn new(
        cfg: &RedisConfig,
        nodes: &[String],
        master: &str,
    ) -> Result<Sentinels, redis::RedisError> {
        let tls = cfg.tls || cfg.url.starts_with("rediss://");
        let addrs = nodes
            .iter()
            .map(|n| sentinel_addr(n, tls))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "sentinel", e))
            })?;
        let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?;
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        b = b
            .set_client_to_redis_tcp_settings(tcp.clone())
            .set_client_to_sentinel_tcp_settings(tcp);
        if tls {
            b = b
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        }
        if let Some(files) = &cfg.tls_files {
            b = b
                .set_client_to_redis_certificates(super::tls_certificates(files))
                .set_client_to_sentinel_certificates(super::tls_certificates(files));
        }
        if !cfg.username.is_empty() {
            b = b.set_client_to_redis_username(&cfg.username);
        }
        if !cfg.password.is_empty() {
            b = b.set_client_to_redis_password(&cfg.password);
        }
        Ok(Sentinels {
            client: Mutex::new(b.build()?),
            master: master.to_owned(),
            timeout: cfg.connect_timeout() * 2,
        })
    }

    pub fn master_name(&self) -> &str {
        &self.master
    }

    /// Asks the sentinels for the master's address (checked with `ROLE` by the crate).
    pub async fn master(&self) -> Result<(String, u16), String> {
        let lookup = async {
            let mut client = self.client.lock().await;
            client.async_get_client().await
        };
        let client = tokio::time::timeout(self.timeout, lookup)
            .await
            .map_err(|_| format!("no sentinel answered within {:?}", self.timeout))?
            .map_err(|e| format!("sentinels for {:?}: {e}", self.master))?;
        match client.get_connection_info().addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                Ok((host.clone(), *port))
            }
            other => Err(format!(
                "sentinels named an address of another kind: {other:?}"
            )),
        }
    }

    /// `+switch-master` announcements for this master, from one sentinel; the stream
    /// ends when that sentinel's connection does.
    pub async fn events(&self) -> Result<BoxStream<'static, ()>, String> {
        let subscribed = async {
            let client = self.client.lock().await.async_get_sentinel_client().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(self.timeout, subscribed)
            .await
            .map_err(|_| format!("no sentinel answered within {:?}", self.timeout))?
            .map_err(|e| e.to_string())?;
        let master = self.master.clone();
        Ok(pubsub
            .into_on_message()
            // "<master name> <old ip> <old port> <new ip> <new port>"
            .filter_map(move |msg| {
                let ours = msg
                    .get_payload::<String>()
                    .is_ok_and(|p| p.split(' ').next() == Some(master.as_str()));
                futures::future::ready(ours.then_some(()))
            })
            .boxed())
    }
}
