//! The Rust client: one connection shared by many tasks, requests pipelined and
//! matched to responses by id. The CLI and the integration tests use it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rmpv::Value;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::protocol::{ErrorCode, FrameCodec};

mod local;
use local::LocalCache;
pub use local::LocalStats;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {message}")]
    Connect { path: String, message: String },
    #[error("connection closed")]
    Closed,
    #[error("malformed response: {0}")]
    Protocol(String),
    #[error("{code}: {message}")]
    Server {
        /// The wire code, e.g. `NOT_FOUND`; kept as a string so codes added by newer
        /// servers still reach the caller.
        code: String,
        message: String,
        retry_after_ms: Option<u64>,
        /// The request field at fault, when the daemon named one.
        field: Option<String>,
    },
}

impl ClientError {
    /// The protocol error code, when the server answered with one we know.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => ErrorCode::parse(code),
            _ => None,
        }
    }

    /// The request field the daemon named as the culprit, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            ClientError::Server { field, .. } => field.as_deref(),
            _ => None,
        }
    }
}

/// Callers waiting for a response, by id; `None` once the connection is gone, so a
/// call made after the reader stopped fails at once instead of waiting for ever.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, ClientError>>>>>>;

/// A connection to the daemon. Clone it freely: clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    outgoing: mpsc::Sender<Bytes>,
    pending: Pending,
    /// A connection-level error the daemon sent (then it closed the connection).
    fatal: Arc<Mutex<Option<ClientError>>>,
    next_id: Arc<AtomicU64>,
    /// The in-process cache, when asked for ([`ClientBuilder::local_cache_bytes`]).
    local: Option<Arc<LocalCache>>,
}

/// Options for [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    path: std::path::PathBuf,
    local_cache_bytes: u64,
}

impl ClientBuilder {
    /// Keep values this process read in its own memory, up to `bytes` (0, the
    /// default: off). Hits then cost no I/O; the daemon's push frames keep it
    /// coherent (protocol.md, "Push frames"). Needs the daemon's near-cache
    /// (`cache.near`); without it the local cache stays off.
    pub fn local_cache_bytes(mut self, bytes: u64) -> ClientBuilder {
        self.local_cache_bytes = bytes;
        self
    }

    pub async fn connect(self) -> Result<Client, ClientError> {
        let local =
            (self.local_cache_bytes > 0).then(|| Arc::new(LocalCache::new(self.local_cache_bytes)));
        let client = Client::open(&self.path, local.clone()).await?;
        if let Some(local) = &local {
            // Before any read goes out on this connection.
            let tracked = client.call("cache.track", vec![]).await;
            let on = matches!(&tracked, Ok(r) if get(r, "tracking").and_then(Value::as_bool) == Some(true));
            local.live.store(on, Ordering::Release);
        }
        Ok(client)
    }
}

impl Client {
    /// A client with options (the local cache); [`Client::connect`] is the default.
    pub fn builder(path: impl AsRef<Path>) -> ClientBuilder {
        ClientBuilder {
            path: path.as_ref().to_owned(),
            local_cache_bytes: 0,
        }
    }

    /// The local cache's counters (all zero without one).
    pub fn local_stats(&self) -> LocalStats {
        self.local.as_ref().map(|l| l.stats()).unwrap_or_default()
    }

    /// The local cache when it may answer reads.
    fn live_local(&self) -> Option<&LocalCache> {
        self.local.as_deref().filter(|l| l.is_live())
    }

    fn forget_local(&self, keys: &[&str]) {
        if let Some(l) = &self.local {
            for k in keys {
                l.invalidate(k);
            }
        }
    }

    /// One read through the local cache: a local hit (as `{hit, value, ttl_ms}`), or
    /// the daemon's answer, kept unless an invalidation overtook it.
    async fn read_through(
        &self,
        op: &str,
        key: &str,
        fields: Vec<(&str, Value)>,
    ) -> Result<Value, ClientError> {
        let Some(local) = self.live_local() else {
            return self.call(op, fields).await;
        };
        if let Some((value, ttl)) = local.get(key) {
            return Ok(Value::Map(vec![
                (Value::from("hit"), Value::from(true)),
                (Value::from("value"), value),
                (Value::from("ttl_ms"), Value::from(ttl)),
            ]));
        }
        let epoch = local.begin(key);
        let r = self.call(op, fields).await;
        local.finish(key, epoch, r.as_ref().ok().and_then(keepable));
        r
    }

    /// The socket a client uses when told none: `SATCHEL_SOCKET`, else the rule the
    /// daemon uses too ([`crate::config::default_socket_path_for`], protocol.md).
    pub fn default_socket_path() -> std::path::PathBuf {
        std::env::var_os("SATCHEL_SOCKET")
            .filter(|s| !s.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(crate::config::default_socket_path)
    }

    /// Connects to [`Client::default_socket_path`].
    pub async fn connect_default() -> Result<Client, ClientError> {
        Client::connect(Client::default_socket_path()).await
    }

    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::open(path.as_ref(), None).await
    }

    async fn open(path: &Path, local: Option<Arc<LocalCache>>) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| ClientError::Connect {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let (rd, wr) = stream.into_split();
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (outgoing, mut rx) = mpsc::channel::<Bytes>(1024);
        // Writer: batches whatever is queued into one flush.
        tokio::spawn(async move {
            let mut writer = FramedWrite::new(wr, FrameCodec::new(usize::MAX));
            while let Some(frame) = rx.recv().await {
                if writer.feed(frame).await.is_err() {
                    return;
                }
                while let Ok(frame) = rx.try_recv() {
                    if writer.feed(frame).await.is_err() {
                        return;
                    }
                }
                if writer.flush().await.is_err() {
                    return;
                }
            }
        });
        let reader_pending = pending.clone();
        let reader_local = local.clone();
        let fatal: Arc<Mutex<Option<ClientError>>> = Arc::default();
        let reader_fatal = fatal.clone();
        tokio::spawn(async move {
            let mut reader = FramedRead::new(rd, FrameCodec::new(u32::MAX as usize));
            while let Some(Ok(frame)) = reader.next().await {
                let (id, outcome) = match decode_response(&frame) {
                    Ok(decoded) => decoded,
                    // A push frame (`cache.track`, protocol.md): not an answer.
                    Err(_) if is_push(&frame) => {
                        if let (Some(local), Ok(msg)) =
                            (&reader_local, rmpv::decode::read_value(&mut &frame[..]))
                        {
                            local.on_push(&msg);
                        }
                        continue;
                    }
                    Err(e) => {
                        // Which caller it was for cannot be known, so nobody can be
                        // answered reliably any more: fail them all and close.
                        let e = ClientError::Protocol(format!(
                            "malformed frame from the daemon ({e}); connection closed"
                        ));
                        if let Ok(mut f) = reader_fatal.lock() {
                            *f = Some(e.clone());
                        }
                        let waiting = reader_pending.lock().ok().and_then(|mut p| p.take());
                        for (_, waiter) in waiting.into_iter().flatten() {
                            let _ = waiter.send(Err(e.clone()));
                        }
                        return;
                    }
                };
                let Some(id) = id else {
                    // An error with no id is about the connection itself (FORBIDDEN,
                    // connection limit, TOO_LARGE): every caller gets it.
                    if let Err(e) = outcome
                        && let Ok(mut p) = reader_pending.lock()
                        && let Some(p) = p.as_mut()
                    {
                        for (_, waiter) in p.drain() {
                            let _ = waiter.send(Err(e.clone()));
                        }
                        if let Ok(mut f) = reader_fatal.lock() {
                            *f = Some(e);
                        }
                    }
                    continue;
                };
                let waiter = reader_pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.as_mut().and_then(|p| p.remove(&id)));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(outcome);
                }
            }
            // Pushes are per connection: what was kept can no longer be trusted.
            if let Some(local) = &reader_local {
                local.live.store(false, Ordering::Release);
                local.flush();
            }
            let waiting = reader_pending.lock().ok().and_then(|mut p| p.take());
            for (_, waiter) in waiting.into_iter().flatten() {
                let _ = waiter.send(Err(ClientError::Closed));
            }
        });
        Ok(Client {
            outgoing,
            pending,
            fatal,
            next_id: Arc::new(AtomicU64::new(1)),
            local,
        })
    }

    /// Sends `{id, op, ...fields}` and waits for its response's `result`.
    pub async fn call(&self, op: &str, fields: Vec<(&str, Value)>) -> Result<Value, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut map = Vec::with_capacity(fields.len() + 2);
        map.push((Value::from("id"), Value::from(id)));
        map.push((Value::from("op"), Value::from(op)));
        for (k, v) in fields {
            map.push((Value::from(k), v));
        }
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &Value::Map(map))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Some(e) = self.fatal.lock().ok().and_then(|f| f.clone()) {
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().map_err(|_| ClientError::Closed)?;
            let Some(pending) = pending.as_mut() else {
                return Err(self.fatal_or_closed());
            };
            pending.insert(id, tx);
        }
        if self.outgoing.send(Bytes::from(body)).await.is_err() {
            if let Ok(mut p) = self.pending.lock()
                && let Some(p) = p.as_mut()
            {
                p.remove(&id);
            }
            return Err(ClientError::Closed);
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// The error that ended the connection, if the daemon or the framing gave one.
    fn fatal_or_closed(&self) -> ClientError {
        self.fatal
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or(ClientError::Closed)
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call("ping", vec![]).await.map(|_| ())
    }

    pub async fn hello(&self) -> Result<Value, ClientError> {
        self.call(
            "hello",
            vec![
                ("protocol", Value::from(1)),
                ("client", Value::from("satchel-rs")),
            ],
        )
        .await
    }

    pub async fn stats(&self) -> Result<Value, ClientError> {
        self.call("stats", vec![]).await
    }
}

/// Looks up a key in a MessagePack map value.
pub fn get<'a>(map: &'a Value, key: &str) -> Option<&'a Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// Whether a frame is a push frame (`{push: …}`, no `id`), not an answer.
pub fn is_push(frame: &[u8]) -> bool {
    rmpv::decode::read_value(&mut &frame[..])
        .ok()
        .is_some_and(|v| get(&v, "push").is_some() && get(&v, "id").is_none())
}

/// Decodes a response frame into its id and its outcome.
#[allow(clippy::type_complexity)]
pub fn decode_response(
    frame: &[u8],
) -> Result<(Option<u64>, Result<Value, ClientError>), ClientError> {
    let value = rmpv::decode::read_value(&mut &frame[..])
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let id = get(&value, "id").and_then(Value::as_u64);
    let ok = get(&value, "ok")
        .and_then(Value::as_bool)
        .ok_or_else(|| ClientError::Protocol("response has no `ok`".into()))?;
    if ok {
        let result = get(&value, "result").cloned().unwrap_or(Value::Nil);
        return Ok((id, Ok(result)));
    }
    let err = get(&value, "error")
        .ok_or_else(|| ClientError::Protocol("error response has no `error`".into()))?;
    let text = |k| get(err, k).and_then(Value::as_str).unwrap_or("").to_owned();
    Ok((
        id,
        Err(ClientError::Server {
            code: text("code"),
            message: text("message"),
            retry_after_ms: get(err, "retry_after_ms").and_then(Value::as_u64),
            field: get(err, "field").and_then(Value::as_str).map(str::to_owned),
        }),
    ))
}

/// The outcome of [`Client::cache_fetch`].
#[derive(Debug, Clone, PartialEq)]
pub enum Fetch {
    Hit(Value),
    /// This caller holds the lease: load the value and [`Client::cache_fill`] it.
    Lease(String),
    /// The wait ran out: load the value but do not fill.
    Miss,
}

fn str_list(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::from(*s)).collect())
}

impl Client {
    /// `cache.get`: the value, or None on a miss.
    pub async fn cache_get(&self, key: &str) -> Result<Option<Value>, ClientError> {
        let r = self
            .read_through("cache.get", key, vec![("key", Value::from(key))])
            .await?;
        Ok(hit_value(&r))
    }

    /// `cache.mget`: one entry per key, in order (local hits are not asked for).
    pub async fn cache_mget(&self, keys: &[&str]) -> Result<Vec<Option<Value>>, ClientError> {
        let mut out: Vec<Option<Value>> = vec![None; keys.len()];
        let mut ask: Vec<usize> = (0..keys.len()).collect();
        let local = self.live_local();
        if let Some(local) = local {
            ask.clear();
            for (i, k) in keys.iter().enumerate() {
                match local.get(k) {
                    Some((v, _)) => out[i] = Some(v),
                    None => ask.push(i),
                }
            }
            if ask.is_empty() {
                return Ok(out);
            }
        }
        let ask_keys: Vec<&str> = ask.iter().map(|&i| keys[i]).collect();
        let epochs: Vec<u64> = match local {
            Some(l) => ask_keys.iter().map(|k| l.begin(k)).collect(),
            None => Vec::new(),
        };
        let r = self
            .call("cache.mget", vec![("keys", str_list(&ask_keys))])
            .await;
        let items = r.as_ref().ok().and_then(Value::as_array);
        if let Some(local) = local {
            for (j, k) in ask_keys.iter().enumerate() {
                local.finish(
                    k,
                    epochs[j],
                    items.and_then(|i| i.get(j)).and_then(keepable),
                );
            }
        }
        let items = items.ok_or_else(|| match &r {
            Err(e) => e.clone(),
            Ok(_) => ClientError::Protocol("cache.mget result is not an array".into()),
        })?;
        for (j, &i) in ask.iter().enumerate() {
            out[i] = items.get(j).and_then(hit_value);
        }
        Ok(out)
    }

    /// `cache.set` with an optional TTL (ms) and tags.
    pub async fn cache_set(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        tags: &[&str],
    ) -> Result<(), ClientError> {
        let mut fields = vec![("key", Value::from(key)), ("value", value)];
        if let Some(ttl) = ttl_ms {
            fields.push(("ttl_ms", Value::from(ttl)));
        }
        if !tags.is_empty() {
            fields.push(("tags", str_list(tags)));
        }
        self.forget_local(&[key]);
        let r = self.call("cache.set", fields).await.map(|_| ());
        self.forget_local(&[key]);
        r
    }

    /// `cache.del`: how many of `keys` existed.
    pub async fn cache_del(&self, keys: &[&str]) -> Result<u64, ClientError> {
        let r = self.call("cache.del", vec![("keys", str_list(keys))]).await;
        self.forget_local(keys);
        Ok(get(&r?, "deleted").and_then(Value::as_u64).unwrap_or(0))
    }

    /// `cache.invalidate` by tags and/or prefix: how many keys were removed.
    pub async fn cache_invalidate(
        &self,
        tags: &[&str],
        prefix: Option<&str>,
    ) -> Result<u64, ClientError> {
        let mut fields = Vec::new();
        if !tags.is_empty() {
            fields.push(("tags", str_list(tags)));
        }
        if let Some(p) = prefix {
            fields.push(("prefix", Value::from(p)));
        }
        let r = self.call("cache.invalidate", fields).await?;
        Ok(get(&r, "deleted").and_then(Value::as_u64).unwrap_or(0))
    }

    /// `cache.fetch`: a hit, a lease, or a miss after waiting.
    pub async fn cache_fetch(
        &self,
        key: &str,
        lease_ms: Option<u64>,
        wait_ms: Option<u64>,
    ) -> Result<Fetch, ClientError> {
        let mut fields = vec![("key", Value::from(key))];
        if let Some(ms) = lease_ms {
            fields.push(("lease_ms", Value::from(ms)));
        }
        if let Some(ms) = wait_ms {
            fields.push(("wait_ms", Value::from(ms)));
        }
        let r = self.read_through("cache.fetch", key, fields).await?;
        if let Some(v) = hit_value(&r) {
            return Ok(Fetch::Hit(v));
        }
        Ok(match get(&r, "lease").and_then(Value::as_str) {
            Some(lease) => Fetch::Lease(lease.to_owned()),
            None => Fetch::Miss,
        })
    }

    /// `cache.fill`: whether the value was stored (false: the lease was voided).
    pub async fn cache_fill(
        &self,
        key: &str,
        lease: &str,
        value: Value,
        ttl_ms: Option<u64>,
        tags: &[&str],
    ) -> Result<bool, ClientError> {
        let mut fields = vec![
            ("key", Value::from(key)),
            ("lease", Value::from(lease)),
            ("value", value),
        ];
        if let Some(ttl) = ttl_ms {
            fields.push(("ttl_ms", Value::from(ttl)));
        }
        if !tags.is_empty() {
            fields.push(("tags", str_list(tags)));
        }
        let r = self.call("cache.fill", fields).await;
        self.forget_local(&[key]);
        Ok(get(&r?, "stored").and_then(Value::as_bool).unwrap_or(false))
    }

    /// Cache-aside with leases: returns the cached value, or runs `loader` (in exactly
    /// one caller per key across all daemons while others wait) and caches its result.
    /// When no lease comes back in time, the loader runs without filling.
    pub async fn get_or_set<F, Fut, E>(
        &self,
        key: &str,
        ttl_ms: Option<u64>,
        loader: F,
    ) -> Result<Value, GetOrSetError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Value, E>>,
    {
        match self
            .cache_fetch(key, None, None)
            .await
            .map_err(GetOrSetError::Client)?
        {
            Fetch::Hit(v) => Ok(v),
            Fetch::Lease(lease) => {
                let value = loader().await.map_err(GetOrSetError::Loader)?;
                self.cache_fill(key, &lease, value.clone(), ttl_ms, &[])
                    .await
                    .map_err(GetOrSetError::Client)?;
                Ok(value)
            }
            Fetch::Miss => loader().await.map_err(GetOrSetError::Loader),
        }
    }
}

/// Why [`Client::get_or_set`] failed: the daemon, or the caller's loader.
#[derive(Debug, thiserror::Error)]
pub enum GetOrSetError<E> {
    #[error(transparent)]
    Client(ClientError),
    #[error("loader failed")]
    Loader(E),
}

/// A read's answer that may be kept locally: a fresh hit with its TTL.
fn keepable(r: &Value) -> Option<(&Value, u64)> {
    if get(r, "hit").and_then(Value::as_bool) != Some(true)
        || get(r, "stale").and_then(Value::as_bool) == Some(true)
    {
        return None;
    }
    let ttl = get(r, "ttl_ms").and_then(Value::as_u64)?;
    Some((get(r, "value")?, ttl))
}

fn hit_value(r: &Value) -> Option<Value> {
    if get(r, "hit").and_then(Value::as_bool) == Some(true) {
        Some(get(r, "value").cloned().unwrap_or(Value::Nil))
    } else {
        None
    }
}

/// A mail for [`Client::mail_send`]; fields mirror `mail.send` in protocol.md.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mail {
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub from: Option<String>,
    pub reply_to: Option<String>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub headers: Vec<(String, String)>,
    pub attachments: Vec<Attachment>,
    pub idempotency_key: Option<String>,
    pub send_at_ms: Option<u64>,
    /// Render subject, text and html from this stored template (`mail.template.put`)
    /// with `vars`, instead of giving them.
    pub template: Option<String>,
    pub vars: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub data: Vec<u8>,
}

/// What `mail.send` answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub mail_id: String,
    /// `queued` or `scheduled` for a new mail; the first mail's status for a duplicate.
    pub status: String,
    pub duplicate: bool,
    /// Replicas that acknowledged the mail, when the daemon has
    /// `mail.min_replicas_ack` set.
    pub replicas: Option<u64>,
    /// Recipients not sent to: they are on the suppression list.
    pub suppressed: Vec<String>,
}

fn strings(items: &[String]) -> Value {
    Value::Array(items.iter().map(|s| Value::from(s.as_str())).collect())
}

impl Mail {
    fn fields(&self) -> Vec<(&'static str, Value)> {
        let mut f = vec![("to", strings(&self.to))];
        match &self.template {
            Some(t) => {
                f.push(("template", Value::from(t.as_str())));
                if let Some(v) = &self.vars {
                    f.push(("vars", v.clone()));
                }
            }
            None => f.push(("subject", Value::from(self.subject.as_str()))),
        }
        let opt = |v: &Option<String>| v.as_deref().map(Value::from);
        if !self.cc.is_empty() {
            f.push(("cc", strings(&self.cc)));
        }
        if !self.bcc.is_empty() {
            f.push(("bcc", strings(&self.bcc)));
        }
        for (name, v) in [
            ("from", opt(&self.from)),
            ("reply_to", opt(&self.reply_to)),
            ("text", opt(&self.text)),
            ("html", opt(&self.html)),
            ("idempotency_key", opt(&self.idempotency_key)),
        ] {
            if let Some(v) = v {
                f.push((name, v));
            }
        }
        if !self.headers.is_empty() {
            f.push((
                "headers",
                Value::Map(
                    self.headers
                        .iter()
                        .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str())))
                        .collect(),
                ),
            ));
        }
        if !self.attachments.is_empty() {
            f.push((
                "attachments",
                Value::Array(
                    self.attachments
                        .iter()
                        .map(|a| {
                            Value::Map(vec![
                                (Value::from("filename"), Value::from(a.filename.as_str())),
                                (
                                    Value::from("content_type"),
                                    Value::from(a.content_type.as_str()),
                                ),
                                (Value::from("data"), Value::Binary(a.data.clone())),
                            ])
                        })
                        .collect(),
                ),
            ));
        }
        if let Some(at) = self.send_at_ms {
            f.push(("send_at_ms", Value::from(at)));
        }
        f
    }
}

fn text_of(v: &Value, key: &str) -> String {
    get(v, key).and_then(Value::as_str).unwrap_or("").to_owned()
}

impl Client {
    /// `mail.send`: answered once the mail is durably queued.
    pub async fn mail_send(&self, mail: &Mail) -> Result<Queued, ClientError> {
        let r = self.call("mail.send", mail.fields()).await?;
        Ok(Queued {
            mail_id: text_of(&r, "mail_id"),
            status: text_of(&r, "status"),
            duplicate: get(&r, "duplicate")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            replicas: get(&r, "replicas").and_then(Value::as_u64),
            suppressed: get(&r, "suppressed")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// `mail.status`: the status record as a map (see protocol.md for its keys).
    pub async fn mail_status(&self, mail_id: &str) -> Result<Value, ClientError> {
        self.call("mail.status", vec![("mail_id", Value::from(mail_id))])
            .await
    }

    /// `mail.cancel`: whether the mail was stopped before delivery.
    pub async fn mail_cancel(&self, mail_id: &str) -> Result<bool, ClientError> {
        let r = self
            .call("mail.cancel", vec![("mail_id", Value::from(mail_id))])
            .await?;
        Ok(get(&r, "cancelled")
            .and_then(Value::as_bool)
            .unwrap_or(false))
    }

    /// `mail.retry`: queues a dead mail again; returns its new status.
    pub async fn mail_retry(&self, mail_id: &str) -> Result<String, ClientError> {
        let r = self
            .call("mail.retry", vec![("mail_id", Value::from(mail_id))])
            .await?;
        Ok(text_of(&r, "status"))
    }

    /// `mail.events`: events after `since` (None: only new ones from now; `"0"`: from
    /// the oldest kept), waiting up to `wait_ms` for the first; the events and the
    /// cursor to pass as the next `since`.
    pub async fn mail_events(
        &self,
        since: Option<&str>,
        limit: Option<u64>,
        wait_ms: Option<u64>,
        mail_id: Option<&str>,
    ) -> Result<(Vec<Value>, String), ClientError> {
        let mut fields = Vec::new();
        if let Some(s) = since {
            fields.push(("since", Value::from(s)));
        }
        if let Some(l) = limit {
            fields.push(("limit", Value::from(l)));
        }
        if let Some(w) = wait_ms {
            fields.push(("wait_ms", Value::from(w)));
        }
        if let Some(m) = mail_id {
            fields.push(("mail_id", Value::from(m)));
        }
        let r = self.call("mail.events", fields).await?;
        let events = get(&r, "events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok((events, text_of(&r, "cursor")))
    }

    /// `mail.suppression.list`: one page of `{address, reason, class, at_ms}` and the
    /// next page's cursor (None at the end).
    pub async fn mail_suppression_list(
        &self,
        limit: Option<u64>,
        cursor: Option<&str>,
    ) -> Result<(Vec<Value>, Option<String>), ClientError> {
        let mut fields = Vec::new();
        if let Some(l) = limit {
            fields.push(("limit", Value::from(l)));
        }
        if let Some(c) = cursor {
            fields.push(("cursor", Value::from(c)));
        }
        let r = self.call("mail.suppression.list", fields).await?;
        let entries = get(&r, "entries")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let next = get(&r, "cursor").and_then(Value::as_str).map(str::to_owned);
        Ok((entries, next))
    }

    /// `mail.suppression.add`: stop mailing `address`.
    pub async fn mail_suppression_add(
        &self,
        address: &str,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut fields = vec![("address", Value::from(address))];
        if let Some(r) = reason {
            fields.push(("reason", Value::from(r)));
        }
        self.call("mail.suppression.add", fields).await?;
        Ok(())
    }

    /// `mail.suppression.remove`: whether `address` was on the list.
    pub async fn mail_suppression_remove(&self, address: &str) -> Result<bool, ClientError> {
        let r = self
            .call(
                "mail.suppression.remove",
                vec![("address", Value::from(address))],
            )
            .await?;
        Ok(get(&r, "removed").and_then(Value::as_bool) == Some(true))
    }

    /// `mail.template.put`: stores (or replaces) a template.
    pub async fn mail_template_put(
        &self,
        name: &str,
        subject: &str,
        text: Option<&str>,
        html: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut fields = vec![
            ("name", Value::from(name)),
            ("subject", Value::from(subject)),
        ];
        if let Some(t) = text {
            fields.push(("text", Value::from(t)));
        }
        if let Some(h) = html {
            fields.push(("html", Value::from(h)));
        }
        self.call("mail.template.put", fields).await?;
        Ok(())
    }

    /// `mail.template.get`: `{name, subject, text?, html?}`.
    pub async fn mail_template_get(&self, name: &str) -> Result<Value, ClientError> {
        self.call("mail.template.get", vec![("name", Value::from(name))])
            .await
    }

    /// `mail.template.delete`: whether it existed.
    pub async fn mail_template_delete(&self, name: &str) -> Result<bool, ClientError> {
        let r = self
            .call("mail.template.delete", vec![("name", Value::from(name))])
            .await?;
        Ok(get(&r, "deleted").and_then(Value::as_bool) == Some(true))
    }

    /// `mail.template.list`: the names.
    pub async fn mail_template_list(&self) -> Result<Vec<String>, ClientError> {
        let r = self.call("mail.template.list", vec![]).await?;
        Ok(get(&r, "templates")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `mail.dead`: dead mail, newest first.
    pub async fn mail_dead(&self, limit: Option<u64>) -> Result<Vec<Value>, ClientError> {
        let fields = limit
            .map(|l| vec![("limit", Value::from(l))])
            .unwrap_or_default();
        let r = self.call("mail.dead", fields).await?;
        Ok(r.as_array().cloned().unwrap_or_default())
    }
}
