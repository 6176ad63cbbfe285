//! SMTP delivery through our own small connection pool.
//!
//! Why not lettre's `AsyncSmtpTransport`: its pool never sets TCP_NODELAY, so every
//! message on a reused connection waits ~40 ms for Nagle + delayed ACK, and it drops
//! the connection on any 4xx/5xx reply. We keep lettre for the SMTP conversation
//! (`AsyncSmtpConnection`, STARTTLS, AUTH) over a TCP stream we connect ourselves with
//! nodelay, and drive MAIL/RCPT/DATA one command at a time so that a refused
//! recipient does not sink the others.

mod tls;

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lettre::Address;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::transport::{Delivered, SendError};
use crate::config::{MailConfig, SmtpUrl, TlsMode};

/// One SMTP session, idle in the pool or carrying a transaction.
pub type Connection = AsyncSmtpConnection;

/// An idle connection is closed after this long rather than reused: servers drop idle
/// clients, and a reused dead connection costs an attempt.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// A pool of SMTP connections. A connection is taken for one transaction and put
/// back when the server is still in a known state.
pub struct SmtpPool {
    url: SmtpUrl,
    tls: Option<TlsParameters>,
    /// `tls=opportunistic`: the same, without certificate checks, for a relay whose
    /// certificate does not verify (RFC 7435: encrypted, unauthenticated beats
    /// plaintext; Postfix's `may`).
    unverified: Option<TlsParameters>,
    /// Set once this relay's certificate failed to verify: later connections go
    /// unverified at once, and the warning is logged once.
    relay_unverified: AtomicBool,
    hello: ClientId,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    max_idle_conns: usize,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl fmt::Debug for SmtpPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpPool").field("url", &self.url).finish()
    }
}

fn stale() -> SendError {
    SendError::Transient("the SMTP connection closed before MAIL FROM was answered".into())
}

/// `RSET`: lettre has no command type for it.
struct Rset;
impl fmt::Display for Rset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RSET\r\n")
    }
}

/// A failed SMTP command: the server replied 4xx/5xx, or the connection broke
/// (network error, timeout, unparsable reply).
enum Fail {
    Reply(lettre::transport::smtp::Error),
    Broken(String),
}

impl From<lettre::transport::smtp::Error> for Fail {
    fn from(e: lettre::transport::smtp::Error) -> Fail {
        if e.is_transient() || e.is_permanent() {
            Fail::Reply(e)
        } else {
            Fail::Broken(e.to_string())
        }
    }
}

impl Fail {
    fn is_permanent(&self) -> bool {
        matches!(self, Fail::Reply(e) if e.is_permanent())
    }

    fn is_transient_reply(&self) -> bool {
        matches!(self, Fail::Reply(e) if e.is_transient())
    }

    /// Whether the connection is still usable after this failure (the server answered
    /// with a reply code other than 421, which means it is closing).
    fn reusable(&self) -> bool {
        match self {
            Fail::Reply(e) => e.status().map(|c| c.to_string()).as_deref() != Some("421"),
            Fail::Broken(_) => false,
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Reply(e) => write!(f, "{e}"),
            Fail::Broken(e) => f.write_str(e),
        }
    }
}

/// Whether a failed setup was the relay's certificate not verifying (rustls says
/// "invalid peer certificate: UnknownIssuer / NotValidForName / Expired …").
fn certificate_problem(error: &str) -> bool {
    error.starts_with("STARTTLS") && error.contains("certificate")
}

fn smtp_error(stage: &str, e: impl Into<Fail>) -> SendError {
    let e = e.into();
    let text = format!("{stage}: {e}");
    if e.is_permanent() {
        SendError::Permanent(text)
    } else {
        SendError::Transient(text)
    }
}

impl SmtpPool {
    pub fn new(cfg: &MailConfig) -> Result<SmtpPool, String> {
        let url = cfg
            .smtp_url
            .clone()
            .ok_or("mail.smtp_url is required for the SMTP transport")?;
        let params = |verify: bool| -> Result<TlsParameters, String> {
            let mut builder = TlsParameters::builder(url.host.clone());
            if let Some(pem) = &cfg.tls_ca_pem {
                let cert = Certificate::from_pem(pem)
                    .map_err(|e| format!("mail.tls_ca_file {}: {e}", cfg.tls_ca_file))?;
                builder = builder.add_root_certificate(cert);
            }
            if !verify {
                builder = builder
                    .dangerous_accept_invalid_certs(true)
                    .dangerous_accept_invalid_hostnames(true);
            }
            builder.build_rustls().map_err(|e| e.to_string())
        };
        let tls = match url.tls {
            TlsMode::None => None,
            _ => Some(params(true)?),
        };
        let unverified = match url.tls {
            TlsMode::Opportunistic => Some(params(false)?),
            _ => None,
        };
        Ok(SmtpPool {
            relay_unverified: AtomicBool::new(false),
            unverified,
            url,
            tls,
            hello: ClientId::Domain(crate::host::hostname()),
            idle: Mutex::new(Vec::new()),
            max_idle_conns: cfg.concurrency as usize,
            connect_timeout: cfg.smtp_connect_timeout(),
            command_timeout: cfg.smtp_command_timeout(),
        })
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < MAX_IDLE && !conn.has_broken() {
                return Some(conn);
            }
        }
        None
    }

    pub(crate) fn put_back(&self, conn: AsyncSmtpConnection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle_conns {
            idle.push((conn, Instant::now()));
        }
    }

    async fn tcp(&self, addr: (&str, u16)) -> Result<TcpStream, SendError> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| {
            SendError::Transient(format!(
                "connect to {}:{}: {e}",
                self.url.host, self.url.port
            ))
        })?;
        // The point of owning the pool: without this, each message on a reused
        // connection waits for the peer's delayed ACK (~40 ms).
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// Connects, greets, upgrades to TLS and authenticates, all within the connect
    /// timeout. With `tls=opportunistic`, a relay whose certificate does not verify
    /// is connected to again and used unverified (logged once per relay).
    pub async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let unverified = self.unverified.as_ref();
        if self.relay_unverified.load(Ordering::Relaxed) {
            return self.connect_with(unverified).await;
        }
        match self.connect_with(None).await {
            Err(SendError::Transient(e)) if unverified.is_some() && certificate_problem(&e) => {
                if !self.relay_unverified.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        relay = %self.url.host,
                        error = %e,
                        "the SMTP relay's certificate does not verify; sending over unverified TLS \
                         (smtp_url tls=opportunistic; use tls=required with mail.tls_ca_file to insist)"
                    );
                }
                self.connect_with(unverified).await
            }
            other => other,
        }
    }

    /// One connection attempt; `starttls_params` replaces the verified parameters
    /// for an opportunistic STARTTLS.
    async fn connect_with(
        &self,
        starttls_params: Option<&TlsParameters>,
    ) -> Result<AsyncSmtpConnection, SendError> {
        let addr = (self.url.host.as_str(), self.url.port);
        let setup = async {
            let mut conn = match (self.url.tls, &self.tls) {
                (TlsMode::Implicit, Some(tls)) => {
                    let tcp = self.tcp(addr).await?;
                    // TLS from the first byte over our nodelay stream: lettre's
                    // network stream does the handshake, and goes back in wrapped.
                    #[allow(deprecated)]
                    let mut stream =
                        lettre::transport::smtp::client::AsyncNetworkStream::use_existing_tokio1(
                            Box::new(tcp),
                        );
                    stream
                        .upgrade_tls(tls.clone())
                        .await
                        .map_err(|e| smtp_error("TLS handshake", e))?;
                    AsyncSmtpConnection::connect_with_transport(
                        Box::new(tls::TlsStream(stream.compat())),
                        &self.hello,
                    )
                    .await
                    .map_err(|e| smtp_error("greeting", e))?
                }
                _ => {
                    let tcp = self.tcp(addr).await?;
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)
                        .await
                        .map_err(|e| smtp_error("greeting", e))?
                }
            };
            match (self.url.tls, &self.tls) {
                (TlsMode::Required, Some(tls)) => {
                    if !conn.can_starttls() {
                        return Err(SendError::Transient(format!(
                            "{} does not offer STARTTLS and smtp_url requires TLS",
                            self.url.host
                        )));
                    }
                    conn.starttls(tls.clone(), &self.hello)
                        .await
                        .map_err(|e| smtp_error("STARTTLS", e))?;
                }
                (TlsMode::Opportunistic, Some(tls)) if conn.can_starttls() => {
                    let params = starttls_params.unwrap_or(tls);
                    conn.starttls(params.clone(), &self.hello)
                        .await
                        .map_err(|e| smtp_error("STARTTLS", e))?;
                }
                _ => {}
            }
            if let Some((user, pass)) = &self.url.credentials {
                conn.auth(
                    &[Mechanism::Plain, Mechanism::Login],
                    &Credentials::new(user.clone(), pass.clone()),
                )
                .await
                .map_err(|e| smtp_error("AUTH", e))?;
            }
            Ok(conn)
        };
        timeout(self.connect_timeout, setup).await.map_err(|_| {
            SendError::Transient(format!(
                "no SMTP session with {}:{} within {:?}",
                self.url.host, self.url.port, self.connect_timeout
            ))
        })?
    }

    /// Sends one message on an idle or new connection.
    pub async fn send(
        &self,
        from: &str,
        rcpts: &[String],
        raw: &[u8],
    ) -> Result<Delivered, SendError> {
        self.send_on(self.checkout().await?, from, rcpts, raw).await
    }

    /// An idle connection, or a new one.
    pub(crate) async fn checkout(&self) -> Result<AsyncSmtpConnection, SendError> {
        match self.take_idle() {
            Some(conn) => Ok(conn),
            None => self.connect().await,
        }
    }

    /// Sends one message on `conn`. A connection found dead before the server saw
    /// anything of this message (closed while it sat idle in the pool or behind the
    /// rate limiter) is replaced once, without costing an attempt.
    pub(crate) async fn send_on(
        &self,
        conn: AsyncSmtpConnection,
        from: &str,
        rcpts: &[String],
        raw: &[u8],
    ) -> Result<Delivered, SendError> {
        let conn = match self.transaction(conn, from, rcpts, raw).await {
            Ok(outcome) => return outcome,
            Err(Stale) => self.connect().await?,
        };
        self.transaction(conn, from, rcpts, raw)
            .await
            .unwrap_or_else(|Stale| Err(stale()))
    }

    async fn cmd<C: fmt::Display>(
        &self,
        conn: &mut AsyncSmtpConnection,
        c: C,
    ) -> Result<lettre::transport::smtp::response::Response, Fail> {
        match timeout(self.command_timeout, conn.command(c)).await {
            Ok(r) => r.map_err(Fail::from),
            Err(_) => Err(Fail::Broken(format!(
                "no reply within {:?}",
                self.command_timeout
            ))),
        }
    }

    /// MAIL, RCPT for each recipient, DATA. `Err(Stale)` when the connection failed
    /// at MAIL FROM with a network error or a 421 (an idle pooled connection the
    /// server closed or timed out).
    async fn transaction(
        &self,
        mut conn: AsyncSmtpConnection,
        from: &str,
        rcpts: &[String],
        raw: &[u8],
    ) -> Result<Result<Delivered, SendError>, Stale> {
        let sender = match Address::from_str(from) {
            Ok(a) => a,
            Err(e) => return Ok(Err(SendError::Permanent(format!("sender {from}: {e}")))),
        };
        let mut params = Vec::new();
        let non_ascii_addr = !from.is_ascii() || rcpts.iter().any(|r| !r.is_ascii());
        if non_ascii_addr {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                self.put_back(conn);
                return Ok(Err(SendError::Permanent(
                    "the server does not support SMTPUTF8, needed for these addresses".into(),
                )));
            }
            params.push(MailParameter::SmtpUtfEight);
        }
        if !raw.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        if let Err(e) = self.cmd(&mut conn, Mail::new(Some(sender), params)).await {
            // A closed connection, or a 421 the server sent while the session sat
            // idle (its idle timeout): nothing of this message reached it, so a new
            // connection is tried at once rather than the mail deferred (the trap
            // of lettre #743 and nodemailer #511).
            if !e.reusable() {
                return Err(Stale);
            }
            return Ok(Err(self.fail(conn, "MAIL FROM", e).await));
        }
        let mut accepted = 0usize;
        let mut delivered = Delivered::default();
        for rcpt in rcpts {
            let addr = match Address::from_str(rcpt) {
                Ok(a) => a,
                Err(e) => {
                    delivered.refused.push((rcpt.clone(), e.to_string()));
                    continue;
                }
            };
            match self.cmd(&mut conn, Rcpt::new(addr, vec![])).await {
                Ok(_) => accepted += 1,
                Err(e) if e.is_permanent() => delivered
                    .refused
                    .push((rcpt.clone(), format!("RCPT TO: {e}"))),
                Err(e) if e.is_transient_reply() => {
                    if !e.reusable() {
                        return Ok(Err(self.fail(conn, "RCPT TO", e).await));
                    }
                    delivered
                        .deferred
                        .push((rcpt.clone(), format!("RCPT TO: {e}")))
                }
                Err(e) => return Ok(Err(self.fail(conn, "RCPT TO", e).await)),
            }
        }
        if accepted == 0 {
            self.reset(conn).await;
            return Ok(Err(SendError::Refused(delivered)));
        }
        if let Err(e) = self.cmd(&mut conn, Data).await {
            return Ok(Err(self.fail(conn, "DATA", e).await));
        }
        let sent = match timeout(self.command_timeout, conn.message(raw)).await {
            Ok(r) => r.map_err(Fail::from),
            Err(_) => Err(Fail::Broken(format!(
                "no reply to the message within {:?}",
                self.command_timeout
            ))),
        };
        match sent {
            Ok(_) => {
                self.put_back(conn);
                Ok(Ok(delivered))
            }
            Err(e) => Ok(Err(self.fail(conn, "end of DATA", e).await)),
        }
    }

    /// Classifies a failed command and keeps the connection when it is still good.
    async fn fail(&self, conn: AsyncSmtpConnection, stage: &str, e: Fail) -> SendError {
        if e.reusable() {
            self.reset(conn).await;
        } else {
            let mut conn = conn;
            // A timed-out or broken connection may be mid-reply: never reuse it.
            let _ = timeout(Duration::from_millis(200), conn.abort()).await;
        }
        smtp_error(stage, e)
    }

    async fn reset(&self, mut conn: AsyncSmtpConnection) {
        if self.cmd(&mut conn, Rset).await.is_ok() {
            self.put_back(conn);
        }
    }
}

/// Marker: the pooled connection was dead before this message touched it.
struct Stale;
