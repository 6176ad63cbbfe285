//! Getting a built message to its recipients: the transport `mail.transport`
//! chooses ([`smtp`] through our own connection pool, or [`file`]: `.eml` files in a
//! directory), and what a delivery attempt's result means.

use std::path::PathBuf;

use super::file;
use super::smtp::{self, SmtpPool};
use crate::config::{MailConfig, TransportKind};

/// What an SMTP server did with one message that it accepted (for at least one
/// recipient).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Recipients refused for good (5xx at RCPT), with the server's reply.
    pub refused: Vec<(String, String)>,
    /// Recipients refused for now (4xx at RCPT); the message goes to them later.
    pub deferred: Vec<(String, String)>,
}

/// Why a message was not accepted at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// 4xx, connection errors, timeouts: a later attempt may succeed.
    #[error("{0}")]
    Transient(String),
    /// 5xx: no point trying again.
    #[error("{0}")]
    Permanent(String),
    /// Every recipient was refused at RCPT: each refusal, so each recipient's class
    /// is known. Transient while any was refused only for now.
    #[error("every recipient was refused: {}", list(.0))]
    Refused(Delivered),
}

fn list(d: &Delivered) -> String {
    d.deferred
        .iter()
        .chain(&d.refused)
        .map(|(r, e)| format!("{r}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl SendError {
    /// Whether a later attempt may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SendError::Transient(_) => true,
            SendError::Permanent(_) => false,
            SendError::Refused(d) => !d.deferred.is_empty(),
        }
    }
}

/// One way of delivering mail, chosen by `mail.transport`.
// One per daemon: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Transport {
    Smtp(SmtpPool),
    File(PathBuf),
}

/// A transport made ready for one delivery before that delivery is throttled and
/// begun, so that the global rate limiter's permit is followed by the SMTP
/// transaction itself and not by a connection setup of unknown length (the server
/// then sees no more than `rate_per_sec` messages in any second, give or take one
/// transaction).
pub enum Ready {
    /// An idle or new connection (it may turn out stale by the time it is used, and
    /// is then replaced once), or why none could be made.
    Smtp(Result<Box<smtp::Connection>, SendError>),
    File,
}

impl Transport {
    pub fn from_config(cfg: &MailConfig) -> Result<Transport, String> {
        Ok(match cfg.transport_kind() {
            TransportKind::File => Transport::File(cfg.file_dir.clone()),
            TransportKind::Smtp => Transport::Smtp(SmtpPool::new(cfg)?),
        })
    }

    pub async fn send(
        &self,
        from: &str,
        rcpts: &[String],
        raw: &[u8],
        name: &str,
    ) -> Result<Delivered, SendError> {
        let ready = self.ready().await;
        self.send_ready(ready, from, rcpts, raw, name).await
    }

    /// An SMTP connection (idle or new) for the next delivery; connection errors are
    /// kept and reported by [`Transport::send_ready`].
    pub async fn ready(&self) -> Ready {
        match self {
            Transport::Smtp(pool) => Ready::Smtp(pool.checkout().await.map(Box::new)),
            Transport::File(_) => Ready::File,
        }
    }

    /// Hands back a readied connection that was not needed (the entry needed no
    /// delivery).
    pub fn release(&self, ready: Ready) {
        if let (Transport::Smtp(pool), Ready::Smtp(Ok(conn))) = (self, ready) {
            pool.put_back(*conn);
        }
    }

    /// Sends one message on a readied transport.
    pub async fn send_ready(
        &self,
        ready: Ready,
        from: &str,
        rcpts: &[String],
        raw: &[u8],
        name: &str,
    ) -> Result<Delivered, SendError> {
        match (self, ready) {
            (Transport::Smtp(pool), Ready::Smtp(conn)) => {
                pool.send_on(*conn?, from, rcpts, raw).await
            }
            (Transport::File(dir), _) => file::write_eml(dir, name, raw)
                .await
                .map(|()| Delivered::default())
                .map_err(|e| SendError::Transient(format!("cannot write {}: {e}", dir.display()))),
            (Transport::Smtp(pool), Ready::File) => pool.send(from, rcpts, raw).await,
        }
    }
}
