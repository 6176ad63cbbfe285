//! Group commit for `mail.send`: mails that arrive while an enqueue is in flight are
//! queued here and enqueued together by the next script run.
//!
//! Why: one script run per mail costs Redis ~27 µs, most of it the script call
//! itself; in batches the cost per mail falls by a third or more, and so does the
//! daemon's per-command overhead. Nothing waits on purpose: the first mail goes out
//! at once, and batches form only while Redis is busy with the previous ones.
//!
//! A batch runs in its own tracked task, never inside one request's future, so a
//! client that hangs up cannot cancel the enqueue of other clients' mail half-way.

use std::sync::{Mutex, OnceLock};

use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::queue::{Enqueued, NewMail, Queue};
use crate::backend::{Backend, BackendError};

/// Batches in flight at once: two keep Redis busy while the next batch forms.
const MAX_RUNNERS: usize = 2;
/// Mails per script run.
const MAX_BATCH_MAILS: usize = 64;
/// Message bytes per script run (at least one mail always goes), so that one run
/// never blocks Redis for long on large messages.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A failed enqueue gives the mail back (for `on_redis_down = "direct"`), unless
/// the runtime is being torn down.
pub type EnqueueResult = Result<Enqueued, (BackendError, Option<Box<NewMail>>)>;

struct Job {
    mail: NewMail,
    reply: oneshot::Sender<EnqueueResult>,
}

#[derive(Default)]
struct State {
    pending: Vec<Job>,
    runners: usize,
}

/// The settings batches are enqueued with: those of the send that started the
/// runner (a runner ends as soon as nothing is pending, so a reload applies within
/// moments).
#[derive(Debug, Clone, Copy)]
pub struct EnqueueSettings {
    pub idem_ttl_ms: u64,
    pub retention_ms: u64,
    /// Drop suppressed recipients (`mail.suppression`).
    pub suppression: bool,
    /// `mail.min_replicas_ack` and its timeout, when set.
    pub ack: Option<(u64, std::time::Duration)>,
}

/// Collects `mail.send`s and enqueues them in batches.
#[derive(Default)]
pub struct Enqueuer {
    state: Mutex<State>,
    tasks: OnceLock<TaskTracker>,
}

impl std::fmt::Debug for Enqueuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enqueuer").finish_non_exhaustive()
    }
}

impl Enqueuer {
    /// Runs batches on the daemon's task tracker (the shutdown waits for them).
    pub fn start(&self, tasks: &TaskTracker) {
        let _ = self.tasks.set(tasks.clone());
    }

    /// Enqueues one mail, possibly together with others; resolves once it is in
    /// Redis, or with the error and the mail handed back.
    pub async fn enqueue_or_return(
        self: &std::sync::Arc<Self>,
        backend: &std::sync::Arc<Backend>,
        queue: &Queue,
        settings: EnqueueSettings,
        mail: NewMail,
    ) -> EnqueueResult {
        let (reply, answer) = oneshot::channel();
        let spawn_runner = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.pending.push(Job { mail, reply });
            let spawn = st.runners < MAX_RUNNERS;
            if spawn {
                st.runners += 1;
            }
            spawn
        };
        if spawn_runner {
            let me = self.clone();
            let backend = backend.clone();
            let queue = queue.clone();
            let run = async move { me.run(&backend, &queue, settings).await };
            match self.tasks.get() {
                Some(tasks) => tasks.spawn(run),
                None => tokio::spawn(run),
            };
        }
        match answer.await {
            Ok(result) => result,
            // Only if the runtime is being torn down.
            Err(_) => Err((
                BackendError::Unavailable("the enqueue task ended without an answer".into()),
                None,
            )),
        }
    }

    /// Takes batches until none is pending, then ends.
    async fn run(&self, backend: &Backend, queue: &Queue, settings: EnqueueSettings) {
        loop {
            let batch = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let mut bytes = 0;
                let mut n = 0;
                while n < st.pending.len()
                    && n < MAX_BATCH_MAILS
                    && (n == 0 || bytes < MAX_BATCH_BYTES)
                {
                    bytes += st.pending[n].mail.inline_len();
                    n += 1;
                }
                if n == 0 {
                    st.runners -= 1;
                    return;
                }
                st.pending.drain(..n).collect::<Vec<Job>>()
            };
            let (mails, replies): (Vec<NewMail>, Vec<_>) =
                batch.into_iter().map(|j| (j.mail, j.reply)).unzip();
            let result = queue
                .enqueue(
                    backend,
                    &mails,
                    settings.idem_ttl_ms,
                    settings.retention_ms,
                    settings.suppression,
                    settings.ack,
                )
                .await;
            match result {
                Ok(answers) => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    for (reply, mail) in replies.into_iter().zip(mails) {
                        let _ = reply.send(Err((e.clone(), Some(Box::new(mail)))));
                    }
                }
            }
        }
    }
}
