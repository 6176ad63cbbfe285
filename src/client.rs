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
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, ClientError>>>>>;

/// A connection to the daemon. Clone it freely: clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    outgoing: mpsc::Sender<Bytes>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
}

impl Client {
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| ClientError::Connect {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let (rd, wr) = stream.into_split();
        let pending: Pending = Arc::default();
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
        tokio::spawn(async move {
            let mut reader = FramedRead::new(rd, FrameCodec::new(u32::MAX as usize));
            while let Some(Ok(frame)) = reader.next().await {
                let Ok((id, outcome)) = decode_response(&frame) else {
                    continue;
                };
                let Some(id) = id else { continue };
                let waiter = reader_pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(outcome);
                }
            }
            if let Ok(mut p) = reader_pending.lock() {
                for (_, waiter) in p.drain() {
                    let _ = waiter.send(Err(ClientError::Closed));
                }
            }
        });
        Ok(Client {
            outgoing,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
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
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| ClientError::Closed)?
            .insert(id, tx);
        if self.outgoing.send(Bytes::from(body)).await.is_err() {
            self.pending
                .lock()
                .map_err(|_| ClientError::Closed)?
                .remove(&id);
            return Err(ClientError::Closed);
        }
        rx.await.map_err(|_| ClientError::Closed)?
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
        }),
    ))
}
