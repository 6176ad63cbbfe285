//! satchel: a local sidecar that gives co-located apps a Redis-backed cache and a
//! durable mail queue over one Unix socket.
//!
//! The crate, in the order a request flows through it:
//!
//! - [`protocol`]: bytes on the wire (length-prefixed MessagePack frames, request and
//!   response envelopes, stable error codes). protocol.md is its contract.
//! - [`server`]: the accept loop, one task per connection, the op dispatch table.
//! - [`cache`]: the cache-aside service (`cache.*` ops): values, leases, invalidation.
//! - [`backend`]: the shared Redis connection with a fail-fast health gate.
//! - [`mail`]: the durable mail queue (`mail.*` ops): concurrent sends enqueued in
//!   batches, a Redis Streams consumer group, retries, dead letters, SMTP delivery
//!   through a nodelay connection pool.
//! - [`config`]: TOML + `SATCHEL_*` environment overrides, validated.
//! - [`systemd`]: readiness, status, watchdog, socket activation; nothing else knows
//!   about systemd.
//! - [`daemon`]: the process around the server: logging, signals, reload, the
//!   graceful-stop deadline (`satchel serve`).
//! - [`client`]: the Rust client the CLI and the tests use.
//!
//! To embed satchel in your own tokio runtime, build a [`config::Config`], call
//! [`server::Server::bind`] and run it with your own `CancellationToken`.

pub mod backend;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod host;
pub mod mail;
pub mod peer;
pub mod protocol;
pub mod server;
pub mod service;
pub mod stats;
pub mod systemd;

pub use client::{Client, ClientError};
pub use config::Config;
pub use server::Server;
