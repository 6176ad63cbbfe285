//! The one interface between the server and what it serves.
//!
//! A service (cache, mail) owns a set of ops. The server knows it only through this
//! trait: it routes each request by its op name to the service that listed it, starts
//! every service's background tasks on the daemon's task tracker, and asks each for
//! its `stats` samples. A service never sees a socket, and the server never knows what
//! an op means.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::peer::Peer;
use crate::protocol::{OpError, Request};
use crate::push::Session;
use crate::stats::Sample;

/// The encoded `result` of an op, or its error.
pub type OpResult = Result<Vec<u8>, OpError>;

/// What a request carries besides its fields: who sent it, and the configuration
/// in force when it arrived (one snapshot for the whole request, even across a
/// SIGHUP reload).
#[derive(Debug, Clone, Copy)]
pub struct RequestCtx<'a> {
    pub peer: &'a Peer,
    pub config: &'a Config,
    /// The connection the request came on (for pushes back to it).
    pub session: &'a Session,
}

pub trait Service: Send + Sync + 'static {
    /// The ops this service answers, as `hello` lists them.
    fn ops(&self) -> &'static [&'static str];

    /// Runs one request whose op is in [`Service::ops`].
    fn handle<'a>(&'a self, ctx: RequestCtx<'a>, req: &'a Request) -> BoxFuture<'a, OpResult>;

    /// Starts the service's background tasks; each is spawned on `tasks` and stops
    /// when `shutdown` is cancelled.
    fn start(self: Arc<Self>, tasks: &TaskTracker, shutdown: &CancellationToken);

    /// This service's section of `stats` (dotted names under its own prefix).
    fn stats(&self) -> BoxFuture<'_, Vec<Sample>>;

    /// The connection `session` closed: forget what the service kept for it.
    fn disconnected(&self, _session: u64) {}

    /// A few words for the `systemctl status` line (no Redis round trip).
    fn status_line(&self) -> Option<String> {
        None
    }
}
