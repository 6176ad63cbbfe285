//! The dispatch table: op name → handler. Handlers take a decoded [`Request`] and
//! return the encoded `result` or an [`OpError`]; they never see the socket.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Peer, Shared};
use crate::protocol::msgpack::Writer;
use crate::protocol::{ErrorCode, OpError, PROTOCOL_VERSION, Request, Response};
use crate::stats::{CoreSnapshot, Stats};

/// The core ops; each service module lists its own (`hello` reports them all).
pub const CORE_OPS: &[&str] = &["hello", "ping", "stats", "health"];

/// Every op this server answers, as `hello` reports them.
pub fn all_ops() -> Vec<&'static str> {
    let mut ops = CORE_OPS.to_vec();
    ops.extend_from_slice(crate::cache::OPS);
    ops.extend_from_slice(crate::mail::OPS);
    ops
}

/// `ping {delay_ms}` is capped so a client cannot park a request for ever.
const MAX_PING_DELAY_MS: u64 = 60_000;

type OpResult = Result<Vec<u8>, OpError>;

/// Handles one request and turns the outcome into a response, counting it.
pub(crate) async fn handle(shared: &Shared, peer: &Peer, req: Request) -> Response {
    shared.stats.inflight.fetch_add(1, Ordering::Relaxed);
    let result = match req.op() {
        "hello" => hello(shared, &req),
        "ping" => ping(&req).await,
        // Rare ops with large futures are boxed, so that every in-flight request (its
        // future is moved into the connection's FuturesUnordered) stays small.
        "stats" => Box::pin(stats(shared)).await,
        "health" => Box::pin(health(shared)).await,
        op if op.starts_with("cache.") => {
            let cfg = shared.config.load();
            shared.cache.handle(&cfg.cache, peer, &req).await
        }
        op if op.starts_with("mail.") => Box::pin(crate::mail::handle(shared, &req)).await,
        other => Err(OpError::new(
            ErrorCode::UnknownOp,
            format!("unknown op `{other}`; `hello` lists the ops this server knows"),
        )
        .with_field("op")),
    };
    shared.stats.inflight.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(body) => Response::ok(req.id, &body),
        Err(err) => {
            Stats::bump(&shared.stats.errors);
            Response::error(Some(req.id), &err)
        }
    }
}

fn encode<T: Serialize>(value: &T) -> OpResult {
    rmp_serde::to_vec_named(value)
        .map_err(|e| OpError::new(ErrorCode::Internal, format!("cannot encode result: {e}")))
}

#[derive(Serialize)]
struct Hello<'a> {
    protocol: u64,
    server: String,
    max_frame: u64,
    max_inflight: u64,
    ops: Vec<&'a str>,
}

fn hello(shared: &Shared, req: &Request) -> OpResult {
    let wanted = req
        .opt_int("protocol")?
        .ok_or_else(|| OpError::bad_request("protocol", "field `protocol` is required"))?;
    if wanted < 1 {
        return Err(OpError::bad_request(
            "protocol",
            format!("protocol must be >= 1, got {wanted}"),
        ));
    }
    // Optional and informational only; still type-checked like every field.
    let _client = req.opt_str("client")?;
    let cfg = shared.config.load();
    encode(&Hello {
        protocol: (wanted as u64).min(PROTOCOL_VERSION),
        server: format!("satchel/{}", env!("CARGO_PKG_VERSION")),
        max_frame: cfg.server.max_frame_bytes,
        max_inflight: cfg.server.max_inflight_per_conn,
        ops: all_ops(),
    })
}

async fn ping(req: &Request) -> OpResult {
    if let Some(ms) = req.opt_positive("delay_ms")? {
        if ms > MAX_PING_DELAY_MS {
            return Err(OpError::bad_request(
                "delay_ms",
                format!("delay_ms is capped at {MAX_PING_DELAY_MS}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut w = Writer::with_capacity(5);
    w.str("pong");
    Ok(w.into_vec())
}

#[derive(Serialize)]
struct RedisStats<'a> {
    connected: bool,
    url: &'a str,
}

#[derive(Serialize)]
struct StatsResult<'a> {
    uptime_ms: u64,
    connections: u64,
    connections_total: u64,
    connections_refused: u64,
    requests: u64,
    errors: u64,
    inflight: u64,
    redis: RedisStats<'a>,
    cache: crate::cache::CacheStatsSnapshot,
    mail: crate::mail::MailStats,
}

async fn stats(shared: &Shared) -> OpResult {
    let CoreSnapshot {
        uptime_ms,
        connections,
        connections_total,
        connections_refused,
        requests,
        errors,
        inflight,
    } = shared.stats.snapshot();
    encode(&StatsResult {
        uptime_ms,
        connections,
        connections_total,
        connections_refused,
        requests,
        errors,
        inflight,
        redis: RedisStats {
            connected: shared.backend.is_up(),
            url: shared.backend.url(),
        },
        cache: shared.cache.stats.snapshot(),
        mail: crate::mail::stats(shared).await,
    })
}

#[derive(Serialize)]
struct Health {
    redis: RedisHealth,
}

#[derive(Serialize)]
struct RedisHealth {
    connected: bool,
    latency_us: u64,
}

/// A liveness check that goes all the way to Redis (a PING).
async fn health(shared: &Shared) -> OpResult {
    let started = Instant::now();
    let _: String = shared.backend.query(&redis::cmd("PING")).await?;
    encode(&Health {
        redis: RedisHealth {
            connected: true,
            latency_us: started.elapsed().as_micros() as u64,
        },
    })
}
