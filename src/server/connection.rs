//! One task per connection. It reads frames, runs up to `max_inflight_per_conn`
//! requests concurrently, and writes responses as they complete (in any order).
//!
//! Responses coalesce in an output buffer: the socket gets one write per wake-up of
//! this task, not one per response. Why it matters: a Unix socket charges about 1 KiB
//! of buffer per write however small, so a daemon that writes each 25-byte answer on
//! its own fills the client's receive side after a few hundred answers; a client that
//! pipelines its requests in many small writes before it reads then deadlocks with
//! the daemon (both blocked in a write).
//!
//! Backpressure: the task stops reading the socket while `max_inflight_per_conn`
//! requests (or `max_inflight_bytes_per_conn` of request frames) are in flight, or
//! while `max_output_bytes_per_conn` of responses wait to be written (the client is
//! not reading). So a connection never holds more than those bounds (plus one frame
//! and one response) however the client behaves, and while the client does read, it
//! may write up to `max_inflight_per_conn` requests before reading anything.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::dispatch;
use crate::peer::Peer;
use crate::protocol::{ErrorCode, FrameCodec, FrameError, OpError, Request, Response};
use crate::push::{self, Push, PushReceiver, Session};

/// A connection task yields to the runtime after reading this many requests in a row.
/// Without it, a pipelined burst is parsed and started in full before any other task
/// runs, so the Redis connection and the mail enqueue batches wait for the whole
/// burst, then the burst waits for Redis: stop-and-go. Measured with `loadgen mail`
/// (64 in flight, one runtime thread): mail.send 20k/s without, 41-48k/s with 16;
/// cache.get unchanged (BENCHMARKS.md).
const YIELD_EVERY: usize = 16;
/// An idle connection's output buffer keeps at most this much capacity, so a burst
/// of large answers does not pin memory for the life of the connection.
const KEEP_CAPACITY: usize = 64 * 1024;
/// An answer's result at least this large is written from its own buffer.
const OWN_CHUNK: usize = 64 * 1024;
/// How long the last answers may take to drain once the connection is closing.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// Sends one error frame with a nil id and closes: for refusals right after accept.
///
/// A lingering close: after the frame, the write side is shut and what the client
/// sent (its `hello`) is read and dropped until it hangs up (at most [`LINGER`]).
/// Closing with its bytes unread would make Linux reset the connection, and a
/// client could then see "connection reset" instead of the refusal.
pub(crate) async fn refuse(stream: UnixStream, err: OpError) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, wr) = stream.into_split();
    let mut out = Output::new(wr, usize::MAX);
    out.push(Response::error(None, &err));
    let _ = tokio::time::timeout(FINAL_FLUSH, out.drain()).await;
    let _ = out.wr.shutdown().await;
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut left = 1 << 20;
        while left > 0 {
            match rd.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    })
    .await;
}

/// How long a refused connection is drained before it is closed.
const LINGER: Duration = Duration::from_millis(200);

/// The responses waiting to be written, and the socket they go to. Small answers
/// coalesce in `tail`; a large result goes into the queue as its own chunk, as it
/// came from the service, so it is never copied (writes are vectored).
struct Output {
    wr: OwnedWriteHalf,
    queue: VecDeque<Bytes>,
    tail: BytesMut,
    /// Bytes in `queue` and `tail`.
    pending: usize,
    max: usize,
}

impl Output {
    fn new(wr: OwnedWriteHalf, max: usize) -> Output {
        Output {
            wr,
            queue: VecDeque::new(),
            tail: BytesMut::new(),
            pending: 0,
            max,
        }
    }

    fn push(&mut self, response: Response) {
        let len = response.len();
        let (head, result) = response.into_parts();
        self.tail.reserve(4 + head.len());
        self.tail.put_u32(len as u32);
        self.tail.extend_from_slice(&head);
        if result.len() >= OWN_CHUNK {
            self.queue.push_back(self.tail.split().freeze());
            self.queue.push_back(Bytes::from(result));
        } else {
            self.tail.extend_from_slice(&result);
        }
        self.pending += 4 + len;
    }

    /// Queued push frames (`first`, then whatever else is queued), each ahead of
    /// every answer added after it. Cheap when nothing is queued.
    fn push_frames(&mut self, first: Option<Push>, rx: &mut PushReceiver) {
        let mut queued: Vec<Push> = first.into_iter().collect();
        while let Ok(p) = rx.try_recv() {
            queued.push(p);
        }
        if queued.is_empty() {
            return;
        }
        for body in push::encode(&queued) {
            self.tail.reserve(4 + body.len());
            self.tail.put_u32(body.len() as u32);
            self.tail.extend_from_slice(&body);
            self.pending += 4 + body.len();
        }
    }

    fn pending(&self) -> bool {
        self.pending > 0
    }

    /// Whether the client is far enough behind that reading must pause.
    fn full(&self) -> bool {
        self.pending >= self.max
    }

    /// One vectored write of what is pending, as much as the socket takes now.
    /// One per call: a client reading a 60 MiB answer as fast as it comes must not
    /// keep this task in a write loop while other requests wait.
    fn write_now(&mut self) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(self.queue.len().min(63) + 1);
        slices.extend(self.queue.iter().take(63).map(|c| IoSlice::new(c)));
        if slices.len() == self.queue.len() && !self.tail.is_empty() {
            slices.push(IoSlice::new(&self.tail));
        }
        let mut n = match self.wr.try_write_vectored(&slices) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        self.pending -= n;
        while n > 0 {
            match self.queue.front_mut() {
                Some(chunk) if chunk.len() <= n => {
                    n -= chunk.len();
                    self.queue.pop_front();
                }
                Some(chunk) => {
                    chunk.advance(n);
                    n = 0;
                }
                None => {
                    self.tail.advance(n);
                    n = 0;
                }
            }
        }
        if self.tail.is_empty() && self.tail.capacity() > KEEP_CAPACITY {
            self.tail = BytesMut::new();
        }
        Ok(())
    }

    /// Waits until everything is written.
    async fn drain(&mut self) -> std::io::Result<()> {
        while self.pending() {
            self.wr.writable().await?;
            self.write_now()?;
        }
        Ok(())
    }
}

pub(crate) async fn serve(
    stream: UnixStream,
    peer: Peer,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let limits = {
        let cfg = shared.config.load();
        Limits {
            max_frame: cfg.server.max_frame_bytes as usize,
            max_inflight: cfg.server.max_inflight_per_conn as usize,
            max_inflight_bytes: cfg.server.max_inflight_bytes_per_conn as usize,
            max_output: cfg.server.max_output_bytes_per_conn as usize,
        }
    };
    let (session, mut pushes) = Session::new();
    serve_session(
        stream,
        peer,
        &shared,
        shutdown,
        &session,
        &mut pushes,
        limits,
    )
    .await;
    shared.disconnected(session.id);
}

/// The per-connection bounds, read once when it opens.
#[derive(Clone, Copy)]
struct Limits {
    max_frame: usize,
    max_inflight: usize,
    max_inflight_bytes: usize,
    max_output: usize,
}

async fn serve_session(
    stream: UnixStream,
    peer: Peer,
    shared: &Arc<Shared>,
    shutdown: CancellationToken,
    session: &Session,
    pushes: &mut PushReceiver,
    limits: Limits,
) {
    let Limits {
        max_frame,
        max_inflight,
        max_inflight_bytes,
        max_output,
    } = limits;
    let (rd, wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, FrameCodec::new(max_frame));
    let mut out = Output::new(wr, max_output);
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
            answer_buffered(&mut reader, &mut out, shared);
            break;
        }
        if !reading && inflight.is_empty() {
            break;
        }
        let may_read = reading
            && inflight.len() < max_inflight
            && inflight_bytes < max_inflight_bytes
            && !out.full();
        // Biased: finished requests first, then reading while there is input, and
        // writing last, so everything this wake-up produced goes out in one write.
        tokio::select! {
            biased;
            // Pushes first: each must precede every answer finished after it.
            Some(p) = pushes.recv() => {
                out.push_frames(Some(p), pushes);
            }
            Some((response, len)) = inflight.next(), if !inflight.is_empty() => {
                out.push_frames(None, pushes);
                inflight_bytes -= len;
                out.push(response);
                while let Some(Some((response, len))) = inflight.next().now_or_never() {
                    out.push_frames(None, pushes);
                    inflight_bytes -= len;
                    out.push(response);
                }
            }
            _ = shutdown.cancelled(), if !draining => draining = true,
            frame = reader.next(), if may_read => {
                let response = match frame {
                    None => {
                        reading = false;
                        continue;
                    }
                    Some(Ok(frame)) => {
                        shared.stats.requests.inc();
                        since_yield += 1;
                        if since_yield >= YIELD_EVERY {
                            since_yield = 0;
                            // What is answered goes out before the yield, so a client
                            // with many requests in flight starts on these answers
                            // while this task reads on, instead of the two taking
                            // turns (loadgen cache, 64 in flight: 1.2-1.6x a direct
                            // GET without, 2.2-2.5x with; BENCHMARKS.md).
                            if out.pending() && out.write_now().is_err() {
                                return;
                            }
                            tokio::task::yield_now().await;
                        }
                        if draining {
                            Some(shutting_down(shared, &frame))
                        } else {
                            match Request::parse(frame) {
                                Ok(req) => {
                                    let len = req.frame_len();
                                    inflight_bytes += len;
                                    inflight.push(
                                        dispatch::handle(shared, &peer, session, req)
                                            .map(move |r| (r, len)),
                                    );
                                    None
                                }
                                Err(bad) => {
                                    shared.stats.errors.inc();
                                    Some(Response::error(bad.id, &bad.error))
                                }
                            }
                        }
                    }
                    Some(Err(FrameError::TooLarge { len, max })) => {
                        shared.stats.errors.inc();
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
                if let Some(response) = response {
                    out.push_frames(None, pushes);
                    out.push(response);
                }
            }
            ready = out.wr.writable(), if out.pending() => {
                if ready.and_then(|()| out.write_now()).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tokio::time::timeout(FINAL_FLUSH, out.drain()).await;
}

fn answer_buffered(
    reader: &mut FramedRead<OwnedReadHalf, FrameCodec>,
    out: &mut Output,
    shared: &Shared,
) {
    use tokio_util::codec::Decoder;
    let mut codec = reader.decoder().clone();
    while let Ok(Some(frame)) = codec.decode(reader.read_buffer_mut()) {
        shared.stats.requests.inc();
        out.push(shutting_down(shared, &frame));
    }
}

/// The answer to a request read after shutdown began: same id if it has one.
fn shutting_down(shared: &Shared, frame: &Bytes) -> Response {
    shared.stats.errors.inc();
    let id = Request::parse(frame.clone()).ok().map(|r| r.id);
    Response::error(
        id,
        &OpError::new(ErrorCode::ShuttingDown, "the daemon is shutting down")
            .with_retry_after(1000),
    )
}
