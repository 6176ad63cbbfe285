//! The `[mail]` section. Every key has a default, so an empty file (or none) gives a
//! working queue that writes `.eml` files; set `smtp_url` to deliver over SMTP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dkim::DkimEntry;
use super::{ConfigError, SmtpUrl};

/// `mail.transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// SMTP when `smtp_url` is set, else `.eml` files.
    Auto,
    Smtp,
    File,
}

/// `mail.on_redis_down`: what `mail.send` does while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisDown {
    /// Answer `UNAVAILABLE`.
    Error,
    /// Send synchronously over the transport.
    Direct,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    /// Whether this daemon runs delivery workers. `mail.send` works either way, so a
    /// fleet can have a few senders and many producers.
    pub enabled: bool,
    /// The `From` of a `mail.send` that names none.
    pub from: String,
    pub transport: TransportChoice,
    /// `smtp://[user:pass@]host[:port][?tls=required|opportunistic|none]` (port 25,
    /// default tls opportunistic) or `smtps://…` (implicit TLS, port 465); `""` = none.
    #[serde(with = "optional_smtp_url")]
    pub smtp_url: Option<SmtpUrl>,
    /// Extra PEM root certificates to trust for SMTP TLS (e.g. a test or internal CA).
    pub tls_ca_file: String,
    /// The contents of `tls_ca_file`, read once when the config is loaded.
    #[serde(skip)]
    pub tls_ca_pem: Option<Arc<Vec<u8>>>,
    /// Where the file transport writes `<mail_id>.eml`.
    pub file_dir: PathBuf,
    /// Deliveries in flight per daemon.
    pub concurrency: u64,
    /// Global delivery rate across every daemon sharing the Redis; 0 = unlimited.
    pub rate_per_sec: u64,
    pub max_attempts: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// A pending entry idle this long belongs to a dead consumer and is reclaimed.
    pub claim_idle_ms: u64,
    pub max_message_bytes: u64,
    /// Most recipients (to + cc + bcc) of one mail.
    pub max_recipients: u64,
    pub idempotency_ttl_ms: u64,
    pub status_retention_ms: u64,
    pub smtp_connect_timeout_ms: u64,
    pub smtp_command_timeout_ms: u64,
    pub on_redis_down: OnRedisDown,
    /// Each peer uid (SO_PEERCRED) sees and steers only its own mail.
    pub isolate_by_uid: bool,
    /// Uids that see and steer every app's mail (the operator's CLI).
    pub admin_uids: Vec<u32>,
    /// Replicas that must hold a mail before `mail.send` answers (Redis `WAIT`);
    /// 0 = do not wait. Fewer within the timeout is still `ok`, but counted.
    pub min_replicas_ack: u64,
    /// How long `mail.send` waits for `min_replicas_ack` replicas.
    pub replica_ack_timeout_ms: u64,
    /// The event stream (`mail.events`) keeps about this many events (`MAXLEN ~`).
    pub events_max: u64,
    /// A recipient whose mailbox or domain does not exist (5.1.1, 5.1.2 …) goes on a
    /// suppression list, and later mail is not sent to it.
    pub suppression: bool,
    /// How long an address stays on the suppression list.
    pub suppress_ttl_ms: u64,
    /// Where events are POSTed (`http://` or `https://`); `""` = no webhooks.
    pub webhook_url: String,
    /// The HMAC-SHA256 key of `X-Satchel-Signature`; required with `webhook_url`.
    pub webhook_secret: String,
    /// The statuses whose events are sent.
    pub webhook_events: Vec<String>,
    pub webhook_timeout_ms: u64,
    /// First retry delay of a failed POST; doubles with jitter, capped at 10 minutes.
    pub webhook_retry_base_ms: u64,
    /// An event that has failed this long is dropped (logged and counted).
    pub webhook_max_age_ms: u64,
    /// `[[mail.dkim]]`: signing keys by `From` domain (file only, no environment
    /// override).
    pub dkim: Vec<DkimEntry>,
}

/// `smtp_url` in the file and the environment is a string, `""` meaning none.
mod optional_smtp_url {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::SmtpUrl;

    pub fn serialize<S: Serializer>(url: &Option<SmtpUrl>, s: S) -> Result<S::Ok, S::Error> {
        match url {
            Some(u) => u.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SmtpUrl>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        SmtpUrl::try_from(text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            enabled: true,
            from: "satchel@localhost".into(),
            transport: TransportChoice::Auto,
            smtp_url: None,
            tls_ca_file: String::new(),
            tls_ca_pem: None,
            file_dir: std::env::temp_dir().join("satchel-mail"),
            concurrency: 16,
            rate_per_sec: 0,
            max_attempts: 8,
            retry_base_ms: 30_000,
            retry_max_ms: 3_600_000,
            claim_idle_ms: 60_000,
            max_message_bytes: 10 * 1024 * 1024,
            max_recipients: 1000,
            idempotency_ttl_ms: 24 * 3600 * 1000,
            status_retention_ms: 7 * 24 * 3600 * 1000,
            smtp_connect_timeout_ms: 10_000,
            smtp_command_timeout_ms: 60_000,
            on_redis_down: OnRedisDown::Error,
            isolate_by_uid: false,
            admin_uids: vec![0],
            min_replicas_ack: 0,
            replica_ack_timeout_ms: 200,
            events_max: 100_000,
            suppression: true,
            suppress_ttl_ms: 30 * 24 * 3600 * 1000,
            webhook_url: String::new(),
            webhook_secret: String::new(),
            webhook_events: vec!["sent".into(), "dead".into(), "suppressed".into()],
            webhook_timeout_ms: 5_000,
            webhook_retry_base_ms: 1_000,
            webhook_max_age_ms: 24 * 3600 * 1000,
            dkim: Vec::new(),
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("mail.{key}"),
        message: message.into(),
    }
}

/// Which transport the config selects, after resolving `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Smtp,
    File,
}

impl MailConfig {
    pub fn transport_kind(&self) -> TransportKind {
        match self.transport {
            TransportChoice::Smtp => TransportKind::Smtp,
            TransportChoice::File => TransportKind::File,
            TransportChoice::Auto if self.smtp_url.is_none() => TransportKind::File,
            TransportChoice::Auto => TransportKind::Smtp,
        }
    }

    /// Reads the files the section names, once, so that a missing or unreadable file
    /// is an error at start (and at reload) that names it.
    pub fn read_files(&mut self) -> Result<(), ConfigError> {
        self.tls_ca_pem = None;
        if !self.tls_ca_file.is_empty() {
            let pem = std::fs::read(&self.tls_ca_file)
                .map_err(|e| invalid("tls_ca_file", format!("{}: {e}", self.tls_ca_file)))?;
            lettre::transport::smtp::client::Certificate::from_pem(&pem).map_err(|e| {
                invalid(
                    "tls_ca_file",
                    format!("{}: not a PEM certificate: {e}", self.tls_ca_file),
                )
            })?;
            self.tls_ca_pem = Some(Arc::new(pem));
        }
        for entry in &mut self.dkim {
            entry
                .read_key()
                .map_err(|e| invalid("dkim", format!("domain {}: key_file {e}", entry.domain)))?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = self.from.parse::<lettre::message::Mailbox>() {
            return Err(invalid("from", format!("not a mail address: {e}")));
        }
        if self.transport == TransportChoice::Smtp && self.smtp_url.is_none() {
            return Err(invalid("smtp_url", "required when transport = \"smtp\""));
        }
        if self.transport_kind() == TransportKind::File && self.file_dir.as_os_str().is_empty() {
            return Err(invalid("file_dir", "must not be empty"));
        }
        for (key, v) in [
            ("concurrency", self.concurrency),
            ("max_attempts", self.max_attempts),
            ("retry_base_ms", self.retry_base_ms),
            ("claim_idle_ms", self.claim_idle_ms),
            ("max_message_bytes", self.max_message_bytes),
            ("max_recipients", self.max_recipients),
            ("idempotency_ttl_ms", self.idempotency_ttl_ms),
            ("status_retention_ms", self.status_retention_ms),
            ("smtp_connect_timeout_ms", self.smtp_connect_timeout_ms),
            ("smtp_command_timeout_ms", self.smtp_command_timeout_ms),
            ("events_max", self.events_max),
            ("suppress_ttl_ms", self.suppress_ttl_ms),
            ("webhook_timeout_ms", self.webhook_timeout_ms),
            ("webhook_retry_base_ms", self.webhook_retry_base_ms),
            ("webhook_max_age_ms", self.webhook_max_age_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.replica_ack_timeout_ms == 0 || self.replica_ack_timeout_ms > 10_000 {
            return Err(invalid(
                "replica_ack_timeout_ms",
                "must be between 1 and 10000",
            ));
        }
        if self.min_replicas_ack > 64 {
            return Err(invalid("min_replicas_ack", "must be at most 64"));
        }
        if !self.webhook_url.is_empty() {
            match reqwest::Url::parse(&self.webhook_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(invalid(
                        "webhook_url",
                        format!(
                            "must be an http:// or https:// URL, got {:?}",
                            self.webhook_url
                        ),
                    ));
                }
            }
            if self.webhook_secret.is_empty() {
                return Err(invalid(
                    "webhook_secret",
                    "required with webhook_url (it signs every POST)",
                ));
            }
        }
        let mut domains = std::collections::HashSet::new();
        for entry in &self.dkim {
            entry.validate().map_err(|e| invalid("dkim", e))?;
            if !domains.insert(entry.domain.to_ascii_lowercase()) {
                return Err(invalid(
                    "dkim",
                    format!("domain {} has two entries; keep one", entry.domain),
                ));
            }
        }
        for st in &self.webhook_events {
            if !crate::mail::MailStatus::ALL
                .iter()
                .any(|m| m.as_str() == st)
            {
                return Err(invalid(
                    "webhook_events",
                    format!("{st:?} is not a mail status"),
                ));
            }
        }
        if self.concurrency > 4096 {
            return Err(invalid("concurrency", "must be at most 4096"));
        }
        if self.retry_max_ms < self.retry_base_ms {
            return Err(invalid("retry_max_ms", "must be >= retry_base_ms"));
        }
        if self.claim_idle_ms < 100 {
            return Err(invalid(
                "claim_idle_ms",
                "must be at least 100 (the heartbeat runs at a third of it)",
            ));
        }
        // A duplicate send must still find the first mail's status record.
        if self.idempotency_ttl_ms > self.status_retention_ms {
            return Err(invalid(
                "idempotency_ttl_ms",
                "must not exceed status_retention_ms",
            ));
        }
        Ok(())
    }

    pub fn claim_idle(&self) -> Duration {
        Duration::from_millis(self.claim_idle_ms)
    }
    pub fn smtp_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.smtp_connect_timeout_ms)
    }
    /// `mail.suppress_ttl_ms` while the suppression list is on.
    pub fn suppression_ttl(&self) -> Option<u64> {
        self.suppression.then_some(self.suppress_ttl_ms)
    }

    /// `Some((replicas, timeout))` when `mail.send` waits for replicas.
    pub fn replica_ack(&self) -> Option<(u64, Duration)> {
        (self.min_replicas_ack > 0).then(|| {
            (
                self.min_replicas_ack,
                Duration::from_millis(self.replica_ack_timeout_ms),
            )
        })
    }
    pub fn smtp_command_timeout(&self) -> Duration {
        Duration::from_millis(self.smtp_command_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(vars: &[(&str, &str)]) -> Result<Config, String> {
        Config::load_with_env(
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid_and_env_overrides_reach_the_mail_section() {
        let c = load(&[]).unwrap();
        assert_eq!(c.mail.concurrency, 16);
        assert_eq!(c.mail.max_message_bytes, 10 * 1024 * 1024);
        assert_eq!(c.mail.transport_kind(), super::TransportKind::File);
        let c = load(&[
            ("SATCHEL_MAIL_CONCURRENCY", "4"),
            (
                "SATCHEL_MAIL_SMTP_URL",
                "smtp://u:p@mail.example.com:587?tls=required",
            ),
            ("SATCHEL_MAIL_ENABLED", "false"),
        ])
        .unwrap();
        assert_eq!(c.mail.concurrency, 4);
        assert!(!c.mail.enabled);
        assert_eq!(c.mail.transport_kind(), super::TransportKind::Smtp);
    }

    #[test]
    fn invalid_mail_settings_name_the_key() {
        for (var, value, key) in [
            ("SATCHEL_MAIL_SMTP_URL", "http://x", "mail.smtp_url"),
            ("SATCHEL_MAIL_FROM", "not an address", "mail.from"),
            ("SATCHEL_MAIL_CONCURRENCY", "0", "mail.concurrency"),
            ("SATCHEL_MAIL_TRANSPORT", "pigeon", "mail.transport"),
            ("SATCHEL_MAIL_RETRY_MAX_MS", "10", "mail.retry_max_ms"),
            (
                "SATCHEL_MAIL_IDEMPOTENCY_TTL_MS",
                "999999999999",
                "mail.idempotency_ttl_ms",
            ),
            ("SATCHEL_MAIL_ON_REDIS_DOWN", "panic", "mail.on_redis_down"),
            (
                "SATCHEL_MAIL_TLS_CA_FILE",
                "/nonexistent/ca.pem",
                "mail.tls_ca_file",
            ),
        ] {
            let e = load(&[(var, value)]).unwrap_err();
            assert!(e.contains(key), "{var}={value}: {e}");
        }
    }
}
