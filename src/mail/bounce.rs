//! What an SMTP failure means for the recipient: a class from the reply's basic code
//! and its RFC 3463 enhanced status code (`5.1.1`), for `mail.status`, `mail.dead`,
//! events, and the suppression list (an address that does not exist is not mailed
//! again: hammering dead addresses hurts the sender's reputation).

/// The class of a delivery failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The mailbox does not exist (5.1.1, 5.1.10 …): suppressed.
    BadMailbox,
    /// The domain does not exist or takes no mail (5.1.2): suppressed.
    BadDomain,
    /// x.2.2, 552.
    MailboxFull,
    /// 5.7.x: refused by policy (spam, authentication, reputation).
    Policy,
    /// 5.3.4 (and 5.2.3): the message is too large for the server.
    MessageTooLarge,
    /// 4xx, connection errors, timeouts.
    Transient,
    Other,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::BadMailbox => "bad-mailbox",
            Class::BadDomain => "bad-domain",
            Class::MailboxFull => "mailbox-full",
            Class::Policy => "policy",
            Class::MessageTooLarge => "message-too-large",
            Class::Transient => "transient",
            Class::Other => "other",
        }
    }

    /// Whether an address that failed so goes on the suppression list.
    pub fn suppresses(self) -> bool {
        matches!(self, Class::BadMailbox | Class::BadDomain)
    }
}

/// The first SMTP reply code in `text` (`550` in "RCPT TO: 550 5.1.1 <a@b>: no such
/// user"), and the enhanced status code right after it, if any.
fn codes(text: &str) -> (Option<u16>, Option<(u8, u16, u16)>) {
    let b = text.as_bytes();
    let mut i = 0;
    while i + 3 <= b.len() {
        let starts = i == 0 || !b[i - 1].is_ascii_alphanumeric();
        let three = b[i..i + 3].iter().all(u8::is_ascii_digit);
        let ends = b
            .get(i + 3)
            .is_none_or(|c| !c.is_ascii_alphanumeric() && *c != b'.');
        if starts && three && ends && matches!(b[i], b'2'..=b'5') {
            let basic = (b[i] - b'0') as u16 * 100
                + (b[i + 1] - b'0') as u16 * 10
                + (b[i + 2] - b'0') as u16;
            // "550 5.1.1 …", "550-5.1.1 …", and lettre's "permanent error (550): 5.1.1 …".
            let rest = text[i + 3..].trim_start_matches([' ', '-', '(', ')', ':']);
            return (Some(basic), enhanced(rest));
        }
        i += 1;
    }
    (None, None)
}

/// `5.1.1 …` → (5, 1, 1).
fn enhanced(s: &str) -> Option<(u8, u16, u16)> {
    let token = s.split(|c: char| c.is_whitespace()).next()?;
    let mut parts = token.split('.');
    let class: u8 = parts.next()?.parse().ok()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    (parts.next().is_none() && matches!(class, 2 | 4 | 5)).then_some((class, subject, detail))
}

/// Classifies one failure as the server (or the connection) reported it.
pub fn classify(text: &str) -> Class {
    let (basic, enhanced) = codes(text);
    if let Some((class, subject, detail)) = enhanced {
        match (class, subject, detail) {
            (5, 1, 1 | 3 | 6 | 10) => return Class::BadMailbox,
            (5, 1, 2) => return Class::BadDomain,
            (4 | 5, 2, 2) => return Class::MailboxFull,
            (5, 7, _) => return Class::Policy,
            (5, 3, 4) | (5, 2, 3) => return Class::MessageTooLarge,
            (4, _, _) => return Class::Transient,
            _ => {}
        }
    }
    match basic {
        Some(552) if enhanced.is_none() => Class::MailboxFull,
        Some(400..=499) | None => Class::Transient,
        _ => Class::Other,
    }
}

/// An address as the suppression list keys it: the domain in lower case (the local
/// part may be case-sensitive, RFC 5321 2.4).
pub fn normalize(address: &str) -> String {
    let address = address.trim();
    match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => address.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_rfc_3463_and_the_basic_code() {
        for (text, class) in [
            (
                "RCPT TO: 550 5.1.1 <a@b.c>: Recipient address rejected: User unknown",
                Class::BadMailbox,
            ),
            (
                "a@b.c: RCPT TO: permanent error (550): 5.1.1 <a@b.c>: no such user here",
                Class::BadMailbox,
            ),
            (
                "end of DATA: permanent error (554): 5.7.1 rejected as spam",
                Class::Policy,
            ),
            (
                "RCPT TO: transient error (451): 4.3.0 try later",
                Class::Transient,
            ),
            (
                "550-5.1.1 The email account that you tried to reach does not exist",
                Class::BadMailbox,
            ),
            (
                "RCPT TO: 550 5.1.10 RESOLVER.ADR.RecipientNotFound",
                Class::BadMailbox,
            ),
            ("550 5.1.6 mailbox has moved", Class::BadMailbox),
            ("RCPT TO: 550 5.1.2 Host unknown", Class::BadDomain),
            (
                "452 4.2.2 The email account is over quota",
                Class::MailboxFull,
            ),
            ("552 5.2.2 Mailbox full", Class::MailboxFull),
            (
                "552 Requested mail action aborted: exceeded storage allocation",
                Class::MailboxFull,
            ),
            (
                "554 5.7.1 Service unavailable; client host blocked",
                Class::Policy,
            ),
            (
                "end of DATA: 552 5.3.4 Message size exceeds fixed limit",
                Class::MessageTooLarge,
            ),
            (
                "RCPT TO: 451 4.3.0 temporary failure, try again",
                Class::Transient,
            ),
            ("421 service shutting down", Class::Transient),
            ("connection refused", Class::Transient),
            ("no reply to the message within 60s", Class::Transient),
            ("554 Transaction failed", Class::Other),
            ("sender x: invalid address", Class::Transient),
        ] {
            assert_eq!(classify(text), class, "{text}");
        }
        // A number that is not a reply code is not read as one.
        assert_eq!(
            classify("listening on 127.0.0.1:5500, 550ms"),
            Class::Transient
        );
    }

    #[test]
    fn addresses_compare_case_insensitively_in_the_domain_only() {
        assert_eq!(normalize(" Ann.Lee@Example.COM "), "Ann.Lee@example.com");
        assert_ne!(normalize("Ann@example.com"), normalize("ann@example.com"));
    }
}
