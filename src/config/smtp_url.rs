//! `mail.smtp_url`, parsed once when the config is loaded.
//!
//! `smtp://[user:pass@]host[:port][?tls=opportunistic|required|none]` (port 25,
//! STARTTLS when offered) or `smtps://…` (TLS from the first byte, port 465).

use std::fmt;

use serde::{Deserialize, Serialize};

/// How `smtp_url` asks for TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `smtps://`: TLS from the first byte.
    Implicit,
    /// STARTTLS, and fail if the server does not offer it.
    Required,
    /// STARTTLS when the server offers it.
    Opportunistic,
    None,
}

/// A parsed `smtp_url`. Serializes back to the text it was parsed from, so
/// `satchel check-config` prints what the operator wrote.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SmtpUrl {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub credentials: Option<(String, String)>,
    text: String,
}

impl fmt::Debug for SmtpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log the password.
        f.debug_struct("SmtpUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|c| &c.0))
            .finish()
    }
}

impl TryFrom<String> for SmtpUrl {
    type Error = String;
    fn try_from(text: String) -> Result<SmtpUrl, String> {
        SmtpUrl::parse(&text)
    }
}

impl From<SmtpUrl> for String {
    fn from(url: SmtpUrl) -> String {
        url.text
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl SmtpUrl {
    pub fn parse(url: &str) -> Result<SmtpUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("expected smtp://host[:port] or smtps://host[:port]")?;
        let (implicit, default_port) = match scheme {
            "smtp" => (false, 25),
            "smtps" => (true, 465),
            other => return Err(format!("unknown scheme {other:?}; use smtp or smtps")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let credentials = match userinfo {
            Some(u) => {
                let (user, pass) = u.split_once(':').ok_or("userinfo must be user:password")?;
                Some((percent_decode(user)?, percent_decode(pass)?))
            }
            None => None,
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("bad port {p:?} in smtp_url"))?,
            ),
            _ => (hostport, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("smtp_url has no host".into());
        }
        let mut tls = if implicit {
            TlsMode::Implicit
        } else {
            TlsMode::Opportunistic
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("tls", v)) if !implicit => {
                    tls = match v {
                        "required" => TlsMode::Required,
                        "opportunistic" => TlsMode::Opportunistic,
                        "none" => TlsMode::None,
                        _ => {
                            return Err(format!("tls={v:?}: use required, opportunistic or none"));
                        }
                    }
                }
                _ => return Err(format!("unknown smtp_url parameter {pair:?}")),
            }
        }
        Ok(SmtpUrl {
            host: host.to_owned(),
            port,
            tls,
            credentials,
            text: url.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls_parse_with_tls_modes_and_credentials() {
        let u = SmtpUrl::parse("smtp://mail.example.com").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("mail.example.com", 25, TlsMode::Opportunistic)
        );
        let u = SmtpUrl::parse("smtp://me%40x.org:p%3Ass@localhost:2525?tls=required").unwrap();
        assert_eq!(u.port, 2525);
        assert_eq!(u.tls, TlsMode::Required);
        assert_eq!(
            u.credentials,
            Some(("me@x.org".to_owned(), "p:ss".to_owned()))
        );
        let u = SmtpUrl::parse("smtps://h").unwrap();
        assert_eq!((u.port, u.tls), (465, TlsMode::Implicit));
        assert!(SmtpUrl::parse("http://h").is_err());
        assert!(SmtpUrl::parse("smtp://h?tls=maybe").is_err());
        assert!(SmtpUrl::parse("smtp://h:port").is_err());
        assert!(!format!("{:?}", SmtpUrl::parse("smtp://u:secret@h").unwrap()).contains("secret"));
    }

    #[test]
    fn serializes_back_to_the_text_it_was_parsed_from() {
        let text = "smtp://u:p@h:2525?tls=none";
        let u = SmtpUrl::parse(text).unwrap();
        assert_eq!(String::from(u), text);
    }
}
