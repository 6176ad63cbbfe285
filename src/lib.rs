//! satchel: a local sidecar that gives co-located apps a Redis-backed cache and a
//! durable mail queue over one Unix socket. ARCHITECTURE.md is the one-page tour.
//!
//! The crate, in the order a request flows through it (socket → frame → request →
//! service → response → frame):
//!
//! - [`server`]: the accept loop, one task per connection (read buffer, output
//!   buffer, backpressure), and dispatch by an op table.
//! - [`peer`]: who is on the other end (SO_PEERCRED) and the allow lists.
//! - [`protocol`]: bytes on the wire (length-prefixed MessagePack frames, request and
//!   response envelopes, stable error codes). protocol.md is its contract.
//! - [`service`]: the one trait the server knows services by.
//! - [`push`]: frames the daemon sends a connection unasked (`cache.track`), ordered
//!   with its answers.
//! - [`cache`]: the cache-aside service (`cache.*` ops): values, leases, invalidation.
//! - [`mail`]: the durable mail queue (`mail.*` ops): group-committed enqueue, a Redis
//!   Streams consumer group, retries, dead letters, SMTP through a nodelay pool; the
//!   event stream (`mail.events`), bounce classes and the suppression list, signed
//!   webhooks, shared templates, DKIM signing.
//! - [`backend`]: the only door to Redis, on one server, through Sentinel or on a
//!   Cluster: the shared connection with its in-flight permits and fail-fast health
//!   gate, dedicated connections for blocking reads, pub/sub, the near-cache's
//!   tracking, and the `WAIT` lane for replicated enqueues.
//!
//! Around them:
//!
//! - [`config`]: TOML + `SATCHEL_*` environment overrides, parsed once into typed
//!   values; imports nothing from the services.
//! - [`stats`]: counters, RAII level guards, latency histograms, and the samples
//!   behind `stats` and its Prometheus text.
//! - [`metrics`]: the HTTP endpoint (`[metrics] listen`): `/metrics` and `/healthz`.
//! - [`host`]: the clock and the host name.
//! - [`systemd`]: readiness, status, watchdog, socket activation; nothing else knows
//!   about systemd.
//! - [`daemon`]: the process around the server: logging, signals, reload, the
//!   graceful-stop deadline (`satchel serve`).
//! - [`client`] and [`cli`]: the Rust client, and the `satchel` subcommands built on it.
//!
//! To embed satchel in your own tokio runtime: [`embed::start`] with a
//! [`config::Config`], your `CancellationToken` and `TaskTracker`; its [`embed::Handle`]
//! calls the services in process while other processes use the socket.

pub mod backend;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod embed;
pub mod host;
pub mod mail;
pub mod metrics;
pub mod peer;
pub mod protocol;
pub mod push;
pub mod server;
pub mod service;
pub mod stats;
pub mod systemd;

pub use client::{Client, ClientError};
pub use config::Config;
pub use server::Server;
