//! A web service that embeds satchel: it runs the daemon inside its own tokio runtime,
//! does cache-aside and sends mail through the in-process handle (no socket hop for
//! its own calls), and serves satchel's socket for the other processes on the host (a
//! Node worker, the CLI), which share the same cache and mail queue.
//!
//!   SATCHEL_SERVER_SOCKET=/tmp/app.sock SATCHEL_REDIS_URL=redis://127.0.0.1:6379 \
//!   EMBEDDED_LISTEN=127.0.0.1:8080 cargo run --example embedded
//!
//! HTTP:
//!   GET  /exam/<id>          the exam, through cache-aside (`cache.get_or_set`):
//!                            loaded at most once per TTL however many ask at once
//!   POST /notify?to=<addr>   queues a mail; answers its mail_id
//!   GET  /loads              how many times an exam was loaded from the "database"
//!
//! Every `SATCHEL_*` variable configures the embedded daemon as it does `satchel
//! serve`. SIGTERM or SIGINT stops both servers through one cancellation token.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use satchel::embed::{Handle, Mail};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The app's "database": slow, and counted.
struct Db {
    loads: AtomicU64,
}

impl Db {
    async fn exam(&self, id: u64) -> Result<Vec<u8>, std::io::Error> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let exam = rmpv::Value::Map(vec![
            ("id".into(), id.into()),
            ("title".into(), format!("Exam {id}: Algebra I final").into()),
            ("seats".into(), 120.into()),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &exam)?;
        Ok(bytes)
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn route(
    satchel: &Handle,
    db: &Db,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (req.method(), path.split('/').collect::<Vec<_>>().as_slice()) {
        (&Method::GET, ["", "exam", id]) => {
            let Ok(id) = id.parse::<u64>() else {
                return reply(StatusCode::BAD_REQUEST, "id must be a number\n".into());
            };
            let key = format!("exam:{id}");
            let loaded = match satchel
                .cache()
                .get_or_set(&key, Some(60_000), || db.exam(id))
                .await
            {
                Ok(loaded) => loaded.map(|b| b.to_vec()),
                // The cache is out: serve from the database, uncached.
                Err(_) => db.exam(id).await,
            };
            match loaded.map(|bytes| rmpv::decode::read_value(&mut &bytes[..])) {
                Ok(Ok(exam)) => reply(StatusCode::OK, format!("{exam}\n")),
                Ok(Err(e)) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("database: {e}\n"),
                ),
            }
        }
        (&Method::POST, ["", "notify"]) => {
            let Some(to) = query.strip_prefix("to=") else {
                return reply(StatusCode::BAD_REQUEST, "to=<address> is required\n".into());
            };
            let mail = Mail {
                to: vec![to.to_owned()],
                subject: "Your results are published".into(),
                text: Some("See the exam page for your results.".into()),
                ..Mail::default()
            };
            match satchel.mail().send(mail).await {
                Ok(sent) => reply(StatusCode::OK, format!("{}\n", sent.mail_id)),
                Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            }
        }
        (&Method::GET, ["", "loads"]) => reply(
            StatusCode::OK,
            format!("{}\n", db.loads.load(Ordering::Relaxed)),
        ),
        _ => reply(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    // The embedded daemon: its socket, its Redis and mail workers, on our tracker.
    let satchel = satchel::embed::start(
        satchel::Config::load(None)?,
        shutdown.clone(),
        tasks.clone(),
    )
    .await?;
    let db = Arc::new(Db {
        loads: AtomicU64::new(0),
    });
    let listen = std::env::var("EMBEDDED_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!(
        "embedded: http on {listen}, satchel socket {}",
        satchel.config().server.socket.display()
    );
    let mut signals = signal_hook_tokio::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            use futures::StreamExt;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = signals.next() => shutdown.cancel(),
            }
        });
    }
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted?,
        };
        let (satchel, db) = (satchel.clone(), db.clone());
        tasks.spawn(async move {
            let service = service_fn(move |req| {
                let (satchel, db) = (satchel.clone(), db.clone());
                async move { Ok::<_, Infallible>(route(&satchel, &db, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}
