//! `mail.send` fields → a validated, fully built RFC 5322 message.
//!
//! Everything is checked and the message is rendered before anything is queued, so
//! the queue only ever holds bytes ready for the wire, and a retry sends exactly the
//! same bytes (same Message-ID, same Date).

use std::collections::HashSet;

use lettre::message::header::{
    self, ContentTransferEncoding, ContentType, HeaderName, HeaderValue,
};
use lettre::message::{Attachment, Body as MimeBody, Mailbox, Mailboxes, MultiPart, SinglePart};
use rmpv::Value;

use super::MailError;
use crate::protocol::{OpError, Request};

/// Header names a caller may not set through `headers`: they are set from dedicated
/// fields, or they define the MIME structure we build.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "message-id",
    "sender",
    "reply-to",
    "subject",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

/// One attachment as the client sent it.
#[derive(Debug, Clone)]
pub struct AttachmentIn {
    pub filename: String,
    pub content_type: String,
    pub data: Vec<u8>,
}

/// The fields of `mail.send`, type-checked (wrong MessagePack types are BAD_REQUEST
/// here) but not yet validated.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub from: Option<String>,
    pub reply_to: Option<String>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub headers: Vec<(String, String)>,
    pub attachments: Vec<AttachmentIn>,
    pub idempotency_key: Option<String>,
    pub send_at_ms: Option<i64>,
}

/// A message ready for the queue.
#[derive(Debug, Clone)]
pub struct Built {
    pub mail_id: String,
    pub message_id: String,
    /// Envelope sender (bare address).
    pub from: String,
    /// Envelope recipients (bare addresses: to + cc + bcc, deduplicated).
    pub rcpts: Vec<String>,
    /// The visible recipients, for `mail.dead`.
    pub to_display: Vec<String>,
    pub subject: String,
    pub raw: Vec<u8>,
}

fn bad_type(field: &str, want: &str, got: &Value) -> OpError {
    let got = match got {
        Value::Nil => "nil",
        Value::Boolean(_) => "bool",
        Value::Integer(_) => "int",
        Value::F32(_) | Value::F64(_) => "float",
        Value::String(_) => "str",
        Value::Binary(_) => "bin",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Ext(..) => "ext",
    };
    OpError::bad_request(field, format!("`{field}` must be {want}, got {got}"))
}

fn decode_field(req: &Request, name: &str) -> Result<Option<Value>, OpError> {
    let Some(raw) = req.raw(name) else {
        return Ok(None);
    };
    let v = rmpv::decode::read_value(&mut &raw[..])
        .map_err(|e| OpError::bad_request(name, format!("`{name}`: {e}")))?;
    Ok(if v.is_nil() { None } else { Some(v) })
}

fn as_text(field: &str, v: &Value) -> Result<String, OpError> {
    match v {
        Value::String(s) => s
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| OpError::bad_request(field, format!("`{field}` is not valid UTF-8"))),
        other => Err(bad_type(field, "a str", other)),
    }
}

impl Draft {
    /// Reads the fields of a `mail.send` request.
    pub fn from_request(req: &Request) -> Result<Draft, OpError> {
        let list = |name: &str| -> Result<Vec<String>, OpError> {
            Ok(req
                .opt_str_list(name)?
                .unwrap_or_default()
                .into_iter()
                .map(str::to_owned)
                .collect())
        };
        let mut d = Draft {
            to: list("to")?,
            cc: list("cc")?,
            bcc: list("bcc")?,
            from: req.opt_str("from")?.map(str::to_owned),
            reply_to: req.opt_str("reply_to")?.map(str::to_owned),
            subject: req.opt_str("subject")?.unwrap_or_default().to_owned(),
            text: req.opt_str("text")?.map(str::to_owned),
            html: req.opt_str("html")?.map(str::to_owned),
            idempotency_key: req.opt_str("idempotency_key")?.map(str::to_owned),
            send_at_ms: req.opt_int("send_at_ms")?,
            ..Draft::default()
        };
        if let Some(v) = decode_field(req, "headers")? {
            let Value::Map(pairs) = v else {
                return Err(bad_type("headers", "a map of str to str", &v));
            };
            for (k, v) in pairs {
                d.headers
                    .push((as_text("headers", &k)?, as_text("headers", &v)?));
            }
        }
        if let Some(v) = decode_field(req, "attachments")? {
            let Value::Array(items) = v else {
                return Err(bad_type("attachments", "an array of maps", &v));
            };
            for item in items {
                let Value::Map(pairs) = item else {
                    return Err(bad_type("attachments", "an array of maps", &item));
                };
                let mut a = AttachmentIn {
                    filename: String::new(),
                    content_type: String::new(),
                    data: Vec::new(),
                };
                let mut has_data = false;
                for (k, v) in pairs {
                    match k.as_str() {
                        Some("filename") => a.filename = as_text("attachments", &v)?,
                        Some("content_type") => a.content_type = as_text("attachments", &v)?,
                        Some("data") => {
                            a.data = match v {
                                Value::Binary(b) => b,
                                // A str is accepted too: many clients cannot make bin.
                                Value::String(s) => s.into_bytes(),
                                other => {
                                    return Err(bad_type("attachments", "bin data", &other));
                                }
                            };
                            has_data = true;
                        }
                        _ => {}
                    }
                }
                if !has_data {
                    return Err(OpError::bad_request(
                        "attachments",
                        "every attachment needs `data`",
                    ));
                }
                d.attachments.push(a);
            }
        }
        Ok(d)
    }

    fn subject_present(&self) -> bool {
        !self.subject.is_empty()
    }
}

fn invalid(field: &str, message: impl Into<String>) -> MailError {
    MailError::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

fn no_crlf(field: &str, value: &str) -> Result<(), MailError> {
    if value.contains(['\r', '\n']) {
        return Err(invalid(
            field,
            format!("`{field}` must not contain CR or LF (header injection)"),
        ));
    }
    Ok(())
}

fn mailbox(field: &str, s: &str) -> Result<Mailbox, MailError> {
    no_crlf(field, s)?;
    s.parse::<Mailbox>()
        .map_err(|e| invalid(field, format!("`{s}` is not a mail address: {e}")))
}

/// RFC 5322 field name: printable US-ASCII except colon.
fn header_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 76
        && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// What [`build`] takes from `[mail]`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `mail.from`: the `From` of a draft that names none.
    pub default_from: String,
    pub max_message_bytes: u64,
    pub max_recipients: u64,
    /// `[[mail.dkim]]`: a message whose `From` domain has an entry is signed.
    pub dkim: Vec<crate::config::DkimEntry>,
}

impl Limits {
    pub fn of(cfg: &crate::config::MailConfig) -> Limits {
        Limits {
            default_from: cfg.from.clone(),
            max_message_bytes: cfg.max_message_bytes,
            max_recipients: cfg.max_recipients,
            dkim: cfg.dkim.clone(),
        }
    }

    /// Whether a mail may be signed: signing costs an RSA operation (~1 ms), so
    /// such mail is rendered off the runtime thread.
    pub fn signs(&self) -> bool {
        !self.dkim.is_empty()
    }
}

/// Validates a draft and renders the message. Linear in the recipients and the
/// content: each header is set once from its whole list (lettre's `to()` re-parses
/// the header on every call, which made 20,000 recipients take minutes).
pub fn build(d: &Draft, limits: &Limits, mail_id: String) -> Result<Built, MailError> {
    let recipients = d.to.len() + d.cc.len() + d.bcc.len();
    if recipients as u64 > limits.max_recipients {
        return Err(MailError::TooLarge {
            field: "to".into(),
            message: format!(
                "{recipients} recipients (to + cc + bcc); mail.max_recipients is {}",
                limits.max_recipients
            ),
        });
    }
    let (default_from, max_bytes) = (limits.default_from.as_str(), limits.max_message_bytes);
    if !d.subject_present() {
        return Err(invalid("subject", "`subject` is required"));
    }
    no_crlf("subject", &d.subject)?;
    if d.text.is_none() && d.html.is_none() {
        return Err(invalid("text", "one of `text` or `html` is required"));
    }
    let from = mailbox("from", d.from.as_deref().unwrap_or(default_from))?;
    let to: Vec<Mailbox> =
        d.to.iter()
            .map(|s| mailbox("to", s))
            .collect::<Result<_, _>>()?;
    let cc: Vec<Mailbox> =
        d.cc.iter()
            .map(|s| mailbox("cc", s))
            .collect::<Result<_, _>>()?;
    let bcc: Vec<Mailbox> = d
        .bcc
        .iter()
        .map(|s| mailbox("bcc", s))
        .collect::<Result<_, _>>()?;
    if to.is_empty() && cc.is_empty() && bcc.is_empty() {
        return Err(invalid("to", "at least one recipient is required"));
    }
    let reply_to = d
        .reply_to
        .as_deref()
        .map(|s| mailbox("reply_to", s))
        .transpose()?;
    let mut seen = HashSet::new();
    let mut custom = Vec::with_capacity(d.headers.len());
    for (name, value) in &d.headers {
        if !header_name_ok(name) {
            return Err(invalid(
                "headers",
                format!("{name:?} is not a valid header name"),
            ));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(invalid(
                "headers",
                format!("header {name} is set by satchel and cannot be overridden"),
            ));
        }
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(invalid("headers", format!("header {name} appears twice")));
        }
        no_crlf("headers", value)?;
        let hn = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| invalid("headers", format!("{name:?} is not a valid header name")))?;
        custom.push(HeaderValue::new(hn, value.clone()));
    }
    let mut parts = Vec::with_capacity(d.attachments.len());
    for a in &d.attachments {
        no_crlf("attachments", &a.filename)?;
        if a.filename.is_empty() {
            return Err(invalid(
                "attachments",
                "every attachment needs a `filename`",
            ));
        }
        let ct = if a.content_type.is_empty() {
            "application/octet-stream"
        } else {
            &a.content_type
        };
        no_crlf("attachments", ct)?;
        let ct = ContentType::parse(ct)
            .map_err(|_| invalid("attachments", format!("{ct:?} is not a content type")))?;
        // Always base64: lettre would pick 7bit for ASCII data and put its bare LFs on
        // the wire, which strict servers refuse (SMTP smuggling defences).
        let body = MimeBody::new_with_encoding(a.data.clone(), ContentTransferEncoding::Base64)
            .map_err(|_| invalid("attachments", "cannot encode the attachment"))?;
        parts.push(Attachment::new(a.filename.clone()).body(body, ct));
    }
    // Cheap early bound before rendering (base64 grows attachments by a third).
    let approx: usize = d.text.as_ref().map_or(0, String::len)
        + d.html.as_ref().map_or(0, String::len)
        + d.attachments.iter().map(|a| a.data.len()).sum::<usize>();
    if approx as u64 > max_bytes {
        return Err(too_big(approx as u64, max_bytes));
    }

    let domain = from.email.domain().to_owned();
    let message_id = format!("<{mail_id}@{domain}>");
    // Envelope recipients: to + cc + bcc, each address once.
    let mut rcpt_addrs = Vec::new();
    let mut seen = HashSet::new();
    for m in to.iter().chain(&cc).chain(&bcc) {
        if seen.insert(m.email.to_string().to_ascii_lowercase()) {
            rcpt_addrs.push(m.email.clone());
        }
    }
    let rcpts: Vec<String> = rcpt_addrs.iter().map(ToString::to_string).collect();
    // Given explicitly: otherwise lettre re-parses the From/To/Cc headers it just
    // wrote to derive the envelope (~8% of the daemon's CPU per mail.send).
    let envelope = lettre::address::Envelope::new(Some(from.email.clone()), rcpt_addrs)
        .map_err(|e| invalid("to", e.to_string()))?;
    let mut b = lettre::Message::builder()
        .envelope(envelope)
        .from(from.clone())
        .subject(d.subject.clone())
        .message_id(Some(message_id.clone()))
        .date_now();
    if !to.is_empty() {
        b = b.header(header::To::from(Mailboxes::from_iter(to.iter().cloned())));
    }
    if !cc.is_empty() {
        b = b.header(header::Cc::from(Mailboxes::from_iter(cc.iter().cloned())));
    }
    if let Some(r) = reply_to {
        b = b.reply_to(r);
    }
    for h in custom {
        b = b.raw_header(h);
    }
    let plain = |t: &str| super::qp::text_part(ContentType::TEXT_PLAIN, t);
    let html = |h: &str| super::qp::text_part(ContentType::TEXT_HTML, h);
    let body = match (&d.text, &d.html) {
        (Some(t), Some(h)) => Body::Multi(
            MultiPart::alternative()
                .singlepart(plain(t))
                .singlepart(html(h)),
        ),
        (Some(t), None) => Body::Single(plain(t)),
        (None, Some(h)) => Body::Single(html(h)),
        (None, None) => unreachable!("checked above"),
    };
    let message = if parts.is_empty() {
        match body {
            Body::Multi(m) => b.multipart(m),
            Body::Single(s) => b.singlepart(s),
        }
    } else {
        let mut mixed = match body {
            Body::Multi(m) => MultiPart::mixed().multipart(m),
            Body::Single(s) => MultiPart::mixed().singlepart(s),
        };
        for p in parts {
            mixed = mixed.singlepart(p);
        }
        b.multipart(mixed)
    }
    .map_err(|e| invalid("to", e.to_string()))?;
    let mut raw = message.formatted();
    if let Some(entry) = limits
        .dkim
        .iter()
        .find(|e| e.domain.eq_ignore_ascii_case(&domain))
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        raw = super::dkim::sign(entry, &raw, now).map_err(|message| MailError::Signing {
            domain: domain.clone(),
            message,
        })?;
    }
    if raw.len() as u64 > max_bytes {
        return Err(too_big(raw.len() as u64, max_bytes));
    }
    Ok(Built {
        mail_id,
        message_id,
        from: from.email.to_string(),
        rcpts,
        to_display: d.to.iter().chain(&d.cc).cloned().collect(),
        subject: d.subject.clone(),
        raw,
    })
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

fn too_big(size: u64, limit: u64) -> MailError {
    MailError::Invalid {
        field: "size".into(),
        message: format!("the message is {size} bytes, mail.max_message_bytes is {limit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft() -> Draft {
        Draft {
            to: vec!["Ann <ann@example.com>".into()],
            subject: "Hi".into(),
            text: Some("hello".into()),
            ..Draft::default()
        }
    }

    fn limits(from: &str) -> Limits {
        Limits {
            default_from: from.into(),
            max_message_bytes: 1 << 20,
            max_recipients: 1000,
            dkim: Vec::new(),
        }
    }

    fn field_of(r: Result<Built, MailError>) -> String {
        match r {
            Err(MailError::Invalid { field, .. } | MailError::TooLarge { field, .. }) => field,
            other => panic!("expected INVALID_MAIL, got {other:?}"),
        }
    }

    #[test]
    fn builds_a_message_with_display_names_and_a_stable_message_id() {
        let b = build(&draft(), &limits("App <app@example.org>"), "m1".into()).unwrap();
        let text = String::from_utf8(b.raw).unwrap();
        assert!(text.contains("Message-ID: <m1@example.org>"), "{text}");
        assert!(text.contains("From: App <app@example.org>"), "{text}");
        assert_eq!(b.rcpts, vec!["ann@example.com"]);
    }

    #[test]
    fn every_validation_failure_names_its_field() {
        let d = |f: fn(&mut Draft)| {
            let mut d = draft();
            f(&mut d);
            field_of(build(&d, &limits("a@b.c"), "m".into()))
        };
        assert_eq!(d(|d| d.to = vec!["not an address".into()]), "to");
        assert_eq!(d(|d| d.to.clear()), "to");
        assert_eq!(d(|d| d.subject.clear()), "subject");
        assert_eq!(d(|d| d.subject = "a\r\nBcc: x@y.z".into()), "subject");
        assert_eq!(d(|d| d.text = None), "text");
        assert_eq!(d(|d| d.cc = vec!["x@y.z\nBcc: e@v.il".into()]), "cc");
        assert_eq!(d(|d| d.from = Some("nope".into())), "from");
        assert_eq!(d(|d| d.reply_to = Some("@".into())), "reply_to");
        assert_eq!(
            d(|d| d.headers = vec![("X-A".into(), "1\r\nBcc: e@v.il".into())]),
            "headers"
        );
        assert_eq!(
            d(|d| d.headers = vec![("Bcc".into(), "e@v.il".into())]),
            "headers"
        );
        assert_eq!(
            d(|d| d.headers = vec![("Message-ID".into(), "<x@y>".into())]),
            "headers"
        );
        assert_eq!(
            d(|d| d.headers = vec![("X Bad".into(), "1".into())]),
            "headers"
        );
        assert_eq!(d(|d| d.text = Some("x".repeat(2 << 20))), "size");
        assert_eq!(
            d(|d| d.bcc = (0..1000).map(|i| format!("r{i}@example.com")).collect()),
            "to"
        );
    }

    #[test]
    fn many_recipients_land_in_one_to_header_each_once() {
        let mut d = draft();
        d.to = (0..500)
            .map(|i| format!("R{i} <r{i}@example.com>"))
            .collect();
        d.cc = vec!["r7@example.com".into(), "c@example.com".into()];
        let b = build(&d, &limits("a@b.c"), "m".into()).unwrap();
        assert_eq!(b.rcpts.len(), 501, "r7 is named twice, sent once");
        let text = String::from_utf8(b.raw).unwrap();
        assert_eq!(text.matches("\r\nTo: ").count(), 1, "{}", &text[..300]);
        assert!(text.contains("r499@example.com"));
        assert!(text.contains("Cc: r7@example.com, c@example.com"), "{text}");
    }
}
