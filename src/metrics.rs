//! The metrics endpoint (`[metrics] listen`): `GET /metrics`, the Prometheus text
//! format (every `stats` sample, request latency per op, Redis round trips), and
//! `GET /healthz`, 200 when the socket accepts and Redis answers, else 503 and why.
//!
//! It runs beside the socket path, never in its way: a TCP listener and tasks of its
//! own (on the daemon's tracker and shutdown token), at most [`MAX_CONNECTIONS`]
//! scrapers at once (one more is answered 503 at once), one request per connection,
//! and each connection dropped after [`CONNECTION_TIMEOUT`] whatever it is doing. An
//! answer is a few tens of KiB, so a slow or stuck scraper holds at most
//! `MAX_CONNECTIONS` of them. hyper serves HTTP/1.1; prometheus-client writes the text.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::Shared;
use crate::stats::prometheus_text;

/// Scrapers served at once.
const MAX_CONNECTIONS: usize = 8;
/// The longest a connection is kept, request and answer included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// `/healthz`'s bound on each of its two checks.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections being answered 503 at once; past that they are dropped.
const MAX_REFUSALS: usize = 64;
/// How long a 503 waits for the client to read it and hang up.
const BUSY_LINGER: Duration = Duration::from_millis(200);
/// The answer to a connection over [`MAX_CONNECTIONS`].
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\nconnection: close\r\n\r\nbusy\n";

/// The Prometheus text format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the endpoint until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics endpoint listening (/metrics, /healthz)");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over the limit: told at once, not left waiting in the backlog.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                tasks.spawn(async move {
                    busy(stream).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let shared = shared.clone();
        let token = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
            }
        });
    }
}

/// Answers 503 and closes without a reset: the write side is shut and what the client
/// sent is read and dropped (briefly), since closing with its request unread would make
/// Linux reset the connection, and the client could see that instead of the answer.
async fn busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(BUSY_LINGER, async {
        stream.write_all(BUSY).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut left = 16 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn answer<B>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let samples = crate::server::samples(shared).await;
            let body = prometheus_text(samples, Some(&shared.timings));
            text(StatusCode::OK, TEXT_FORMAT, body)
        }
        "/healthz" => match health(shared).await {
            Ok(()) => text(StatusCode::OK, PLAIN, "ok\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{why}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; this endpoint serves /metrics and /healthz\n".into(),
        ),
    }
}

/// The socket takes a connection (one is opened and dropped: the daemon counts it
/// in `connections_total`) and Redis answers a PING.
async fn health(shared: &Shared) -> Result<(), String> {
    let Some(path) = &shared.socket_path else {
        return Err("the socket has no path to check".into());
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, tokio::net::UnixStream::connect(path)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("socket {}: {e}", path.display())),
        Err(_) => return Err(format!("socket {}: connect timed out", path.display())),
    }
    let cmd = redis::cmd("PING");
    let ping = shared.backend.query::<String>(&cmd);
    match tokio::time::timeout(HEALTH_TIMEOUT, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("redis: {e}")),
        Err(_) => Err(format!(
            "redis: no answer to PING within {HEALTH_TIMEOUT:?}"
        )),
    }
}
