//! One task per connection. It reads frames, runs up to `max_inflight_per_conn`
//! requests concurrently, and writes responses as they complete (in any order).
//!
//! Backpressure: at the in-flight bound the task stops reading, and while the client
//! is not reading its responses the task blocks in the write, so a connection never
//! holds more than the bound's worth of requests plus one socket buffer.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::dispatch;
use super::{Peer, Shared};
use crate::protocol::{ErrorCode, FrameCodec, FrameError, OpError, Request, Response};
use crate::stats::Stats;

/// Sends one error frame with a nil id and closes: for refusals right after accept.
pub(crate) async fn refuse(stream: UnixStream, err: OpError) {
    let mut writer = FramedWrite::new(stream, FrameCodec::new(usize::MAX));
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        writer.send(Response::error(None, &err).0),
    )
    .await;
}

/// A connection task yields to the runtime after reading this many requests in a row.
/// Without it, a pipelined burst is parsed and started in full before any other task
/// runs, so the Redis connection and the mail enqueue batches wait for the whole
/// burst, then the burst waits for Redis: stop-and-go. Measured with `loadgen mail`
/// (64 in flight, one runtime thread): mail.send 20k/s without, 41-48k/s with 16;
/// cache.get unchanged (BENCHMARKS.md).
const YIELD_EVERY: usize = 16;

pub(crate) async fn serve(
    stream: UnixStream,
    peer: Peer,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let (max_frame, max_inflight, max_inflight_bytes) = {
        let cfg = shared.config.load();
        (
            cfg.server.max_frame_bytes as usize,
            cfg.server.max_inflight_per_conn as usize,
            cfg.server.max_inflight_bytes_per_conn as usize,
        )
    };
    let (rd, wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, FrameCodec::new(max_frame));
    let mut writer = FramedWrite::new(wr, FrameCodec::new(usize::MAX));
    let mut inflight = FuturesUnordered::new();
    // Bytes of request frames held by in-flight requests (a flood of large values
    // stops the reading before it costs memory).
    let mut inflight_bytes = 0usize;
    let mut reading = true;
    let mut draining = false;
    let mut since_yield = 0usize;

    loop {
        if draining && inflight.is_empty() {
            // Frames that already arrived whole are "read": they get an answer.
            answer_buffered(&mut reader, &mut writer, &shared).await;
            break;
        }
        if !reading && inflight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(first) = inflight.next(), if !inflight.is_empty() => {
                if write_batch(&mut writer, first, &mut inflight, &mut inflight_bytes).await.is_err() {
                    return;
                }
            }
            _ = shutdown.cancelled(), if !draining => draining = true,
            frame = reader.next(), if reading
                && inflight.len() < max_inflight
                && inflight_bytes < max_inflight_bytes => {
                let response = match frame {
                    None => {
                        reading = false;
                        continue;
                    }
                    Some(Ok(frame)) => {
                        Stats::bump(&shared.stats.requests);
                        since_yield += 1;
                        if since_yield >= YIELD_EVERY {
                            since_yield = 0;
                            tokio::task::yield_now().await;
                        }
                        if draining {
                            Some(shutting_down(&shared, &frame))
                        } else {
                            match Request::parse(frame) {
                                Ok(req) => {
                                    let len = req.frame_len();
                                    inflight_bytes += len;
                                    inflight.push(
                                        dispatch::handle(&shared, &peer, req).map(move |r| (r, len)),
                                    );
                                    None
                                }
                                Err(bad) => {
                                    Stats::bump(&shared.stats.errors);
                                    Some(Response::error(bad.id, &bad.error))
                                }
                            }
                        }
                    }
                    Some(Err(FrameError::TooLarge { len, max })) => {
                        Stats::bump(&shared.stats.errors);
                        let err = OpError::new(
                            ErrorCode::TooLarge,
                            format!("frame of {len} bytes exceeds max_frame_bytes ({max}); closing the connection"),
                        );
                        // Finish what is in flight, then close: the stream can no
                        // longer be re-synchronised after an oversize prefix.
                        reading = false;
                        Some(Response::error(None, &err))
                    }
                    Some(Err(FrameError::Io(_))) => {
                        reading = false;
                        None
                    }
                };
                if let Some(response) = response
                    && writer.send(response.0).await.is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = writer.flush().await;
}

/// Writes one response and every other one that is already complete, then flushes
/// once: under pipelining this turns many small writes into one syscall.
async fn write_batch<F>(
    writer: &mut FramedWrite<tokio::net::unix::OwnedWriteHalf, FrameCodec>,
    first: (Response, usize),
    inflight: &mut FuturesUnordered<F>,
    inflight_bytes: &mut usize,
) -> Result<(), FrameError>
where
    F: std::future::Future<Output = (Response, usize)>,
{
    *inflight_bytes -= first.1;
    writer.feed(first.0.0).await?;
    while let Some(Some((next, len))) = inflight.next().now_or_never() {
        *inflight_bytes -= len;
        writer.feed(next.0).await?;
    }
    writer.flush().await
}

async fn answer_buffered(
    reader: &mut FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec>,
    writer: &mut FramedWrite<tokio::net::unix::OwnedWriteHalf, FrameCodec>,
    shared: &Shared,
) {
    use tokio_util::codec::Decoder;
    let mut codec = reader.decoder().clone();
    while let Ok(Some(frame)) = codec.decode(reader.read_buffer_mut()) {
        Stats::bump(&shared.stats.requests);
        if writer.feed(shutting_down(shared, &frame).0).await.is_err() {
            return;
        }
    }
}

/// The answer to a request read after shutdown began: same id if it has one.
fn shutting_down(shared: &Shared, frame: &Bytes) -> Response {
    Stats::bump(&shared.stats.errors);
    let id = Request::parse(frame.clone()).ok().map(|r| r.id);
    Response::error(
        id,
        &OpError::new(ErrorCode::ShuttingDown, "the daemon is shutting down")
            .with_retry_after(1000),
    )
}
