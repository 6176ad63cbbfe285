//! The dispatch table: op name → handler. Handlers take a decoded [`Request`] and
//! return the encoded `result` or an [`OpError`]; they never see the socket.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::Shared;
use crate::peer::Peer;
use crate::protocol::msgpack::Writer;
use crate::protocol::{ErrorCode, OpError, PROTOCOL_VERSION, Request, Response, encode_result};
use crate::push::Session;
use crate::service::{OpResult, RequestCtx};
use crate::stats::{Sample, encode_map, prometheus_text};

/// The server's own ops; each service lists its own (`hello` reports them all).
pub const CORE_OPS: &[&str] = &["hello", "ping", "stats", "health"];

/// `ping {delay_ms}` is capped so a client cannot park a request for ever.
const MAX_PING_DELAY_MS: u64 = 60_000;

/// Handles one request and turns the outcome into a response, counting it.
pub(crate) async fn handle(
    shared: &Shared,
    peer: &Peer,
    session: &Session,
    req: Request,
) -> Response {
    // A guard, not a pair of calls: a client that hangs up drops this future
    // half-way, and the gauge must still come down.
    let _inflight = shared.stats.inflight.enter();
    let started = Instant::now();
    let config = shared.config.load_full();
    let ctx = RequestCtx {
        peer,
        config: &config,
        session,
    };
    let result = match req.op() {
        "hello" => hello(shared, &req),
        "ping" => ping(&req).await,
        // Rare ops with large futures are boxed, so that every in-flight request (its
        // future is moved into the connection's FuturesUnordered) stays small.
        "stats" => Box::pin(stats(shared, &req)).await,
        "health" => Box::pin(health(shared)).await,
        op => match shared.service_for(op) {
            Some(service) => service.handle(ctx, &req).await,
            None => Err(OpError::new(
                ErrorCode::UnknownOp,
                format!("unknown op `{op}`; `hello` lists the ops this server knows"),
            )
            .with_field("op")),
        },
    };
    shared.timings.request(req.op(), started.elapsed());
    match result {
        Ok(body) => Response::ok(req.id, body),
        Err(err) => {
            shared.stats.errors.inc();
            Response::error(Some(req.id), &err)
        }
    }
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
    encode_result(&Hello {
        protocol: (wanted as u64).min(PROTOCOL_VERSION),
        server: format!("satchel/{}", env!("CARGO_PKG_VERSION")),
        max_frame: cfg.server.max_frame_bytes,
        max_inflight: cfg.server.max_inflight_per_conn,
        ops: shared.ops(),
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

/// Every sample of the daemon, in `stats` order: the server's, Redis', then each
/// service's section.
pub async fn samples(shared: &Shared) -> Vec<Sample> {
    let mut all = shared.stats.samples();
    all.push(Sample::gauge("redis.connected", shared.backend.is_up()));
    all.push(Sample::info("redis.url", shared.backend.url()));
    for service in shared.services() {
        all.extend(service.stats().await);
    }
    all
}

/// `stats {format?}`: the samples as nested maps, or (`format: "prometheus"`) as
/// the Prometheus text format in one str.
async fn stats(shared: &Shared, req: &Request) -> OpResult {
    let format = req.opt_str("format")?;
    let all = samples(shared).await;
    match format {
        None | Some("map") => Ok(encode_map(&all)),
        Some("prometheus") => {
            let mut w = Writer::new();
            w.str(&prometheus_text(all, None));
            Ok(w.into_vec())
        }
        Some(other) => Err(OpError::bad_request(
            "format",
            format!("format must be \"map\" or \"prometheus\", got {other:?}"),
        )),
    }
}

#[derive(Serialize)]
struct Health {
    redis: RedisHealth,
}

#[derive(Serialize)]
struct RedisHealth {
    connected: bool,
    latency_us: u64,
    /// What `INFO` said at the last (re)connect; nil before the first.
    durability: Option<crate::backend::durability::Durability>,
}

/// A liveness check that goes all the way to Redis (a PING).
async fn health(shared: &Shared) -> OpResult {
    let started = Instant::now();
    let _: String = shared.backend.query(&redis::cmd("PING")).await?;
    encode_result(&Health {
        redis: RedisHealth {
            connected: true,
            latency_us: started.elapsed().as_micros() as u64,
            durability: shared.backend.durability().map(|d| (*d).clone()),
        },
    })
}
