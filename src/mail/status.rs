//! A mail's status: the enum the Rust code uses, and the strings the Lua scripts
//! write into Redis and the wire carries. [`MailStatus::as_str`] is the only place
//! the two are tied together, and a test checks that every status string the
//! scripts write is one of them.

use std::fmt;

use serde::{Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MailStatus {
    /// In the stream, waiting for a worker.
    Queued,
    /// `send_at_ms` is in the future.
    Scheduled,
    /// A worker is delivering it.
    Sending,
    /// A transient failure; due again at `next_attempt_ms`.
    Retrying,
    /// The SMTP server accepted it (for at least one recipient). Final.
    Sent,
    /// A permanent failure, `max_attempts` transient ones, or a poison entry.
    Dead,
    /// Stopped by `mail.cancel`. Final.
    Cancelled,
    /// Every recipient is on the suppression list: never sent. Final.
    Suppressed,
    /// Only in the answer to a duplicate `mail.send`: the first mail's status
    /// record has expired.
    Expired,
}

impl MailStatus {
    /// The statuses a mail can be in (not `Expired`), in the order `stats` lists them.
    pub const ALL: [MailStatus; 8] = [
        MailStatus::Queued,
        MailStatus::Scheduled,
        MailStatus::Sending,
        MailStatus::Retrying,
        MailStatus::Sent,
        MailStatus::Dead,
        MailStatus::Cancelled,
        MailStatus::Suppressed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MailStatus::Queued => "queued",
            MailStatus::Scheduled => "scheduled",
            MailStatus::Sending => "sending",
            MailStatus::Retrying => "retrying",
            MailStatus::Sent => "sent",
            MailStatus::Dead => "dead",
            MailStatus::Cancelled => "cancelled",
            MailStatus::Suppressed => "suppressed",
            MailStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<MailStatus> {
        Some(match s {
            "queued" => MailStatus::Queued,
            "scheduled" => MailStatus::Scheduled,
            "sending" => MailStatus::Sending,
            "retrying" => MailStatus::Retrying,
            "sent" => MailStatus::Sent,
            "dead" => MailStatus::Dead,
            "cancelled" => MailStatus::Cancelled,
            "suppressed" => MailStatus::Suppressed,
            "expired" => MailStatus::Expired,
            _ => return None,
        })
    }
}

impl fmt::Display for MailStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for MailStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_string() {
        for st in MailStatus::ALL.into_iter().chain([MailStatus::Expired]) {
            assert_eq!(MailStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(MailStatus::parse("pigeon"), None);
    }

    #[test]
    fn every_status_the_scripts_write_is_a_mail_status() {
        // The scripts set statuses with `'status', '<x>'` and count them with
        // `'HINCRBY', KEYS[n], '<x>'`; every such literal must parse.
        let mut seen = 0;
        for src in super::super::queue::script_sources() {
            for part in src.split("'status', '").skip(1) {
                let word = part.split('\'').next().unwrap_or("");
                assert!(
                    MailStatus::parse(word).is_some(),
                    "script writes status {word:?}"
                );
                seen += 1;
            }
            for part in src.split("'HINCRBY', ").skip(1) {
                let Some((_, rest)) = part.split_once(", ") else {
                    continue;
                };
                if let Some(word) = rest.strip_prefix('\'').and_then(|r| r.split('\'').next()) {
                    assert!(
                        MailStatus::parse(word).is_some(),
                        "script counts status {word:?}"
                    );
                    seen += 1;
                }
            }
        }
        assert!(
            seen > 10,
            "found only {seen} status literals; did the scripts change shape?"
        );
    }
}
