//! DKIM signing (RFC 6376, `relaxed/relaxed`; RFC 8463 for `ed25519-sha256`) of a
//! rendered message, once, at enqueue: the queue holds the signed bytes, so every
//! retry sends the same signature.
//!
//! The canonicalization is written here rather than taken from a crate. lettre's
//! `dkim` feature signs its own model of the headers rather than the bytes that go
//! on the wire, cannot sign one header name twice (so nothing stops a relay or an
//! attacker from adding a second `From`), and reads RSA keys in PKCS#1 only.
//! mail-auth, the complete implementation, does not build without a DNS resolver
//! backend (hickory or DNS over HTTPS) that a signer never uses. What is left is
//! the two canonicalizations below, checked by the tests against an independent
//! verifier (dkimpy); the signatures themselves are the `rsa` and `ed25519-dalek`
//! crates'.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

use crate::config::{DkimEntry, DkimKey};

/// The headers signed, in `h=` order. `from` twice: the second names a `From` that
/// does not exist, so a message with a second `From` added fails verification.
/// Headers absent from a message are still named, so they cannot be added later.
pub const SIGNED_HEADERS: &[&str] = &[
    "from",
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
];

/// The DER prefix of a SHA-256 DigestInfo (RFC 8017 §9.2 note 1): `rsa` wants it
/// spelled out when the hash comes from another `digest` generation than its own.
const SHA256_DIGEST_INFO: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// `raw` with a `DKIM-Signature` header in front, signed with `entry`'s key at
/// `now_s` (unix seconds). `raw` is a CRLF message as rendered for the queue.
pub fn sign(entry: &DkimEntry, raw: &[u8], now_s: u64) -> Result<Vec<u8>, String> {
    let key = entry
        .key
        .as_deref()
        .ok_or_else(|| format!("the DKIM key for {} was not loaded", entry.domain))?;
    let (head, body) = split(raw);
    let bh = BASE64.encode(Sha256::digest(relaxed_body(body)));
    let fields = header_fields(head);
    // The header without its signature, exactly as it will stand in the message
    // minus b='s value: what the verifier rebuilds and hashes.
    let unsigned = format!(
        "DKIM-Signature: v=1; a={}; c=relaxed/relaxed; d={}; s={};\r\n\tt={}; h={};\r\n\tbh={};\r\n\tb=",
        key.algorithm().as_str(),
        entry.domain,
        entry.selector,
        now_s,
        SIGNED_HEADERS.join(":"),
        bh,
    );
    let mut hasher = Sha256::new();
    for field in select(&fields, SIGNED_HEADERS) {
        hasher.update(relaxed_header(field));
        hasher.update(b"\r\n");
    }
    hasher.update(relaxed_header(unsigned.as_bytes()));
    let digest = hasher.finalize();
    let signature = match key {
        DkimKey::Rsa(k) => {
            let scheme = rsa::Pkcs1v15Sign {
                hash_len: Some(32),
                prefix: SHA256_DIGEST_INFO.into(),
            };
            k.sign(scheme, &digest).map_err(|e| e.to_string())?
        }
        DkimKey::Ed25519(k) => {
            use ed25519_dalek::Signer as _;
            k.sign(&digest).to_bytes().to_vec()
        }
    };
    let b = BASE64.encode(signature);
    let mut out = Vec::with_capacity(unsigned.len() + b.len() + b.len() / 64 * 3 + 2 + raw.len());
    out.extend_from_slice(unsigned.as_bytes());
    // Folded into lines a reader can take; whitespace in b= is ignored.
    for (i, chunk) in b.as_bytes().chunks(64).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n\t");
        }
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(raw);
    Ok(out)
}

/// The header block (without the blank line) and the body.
fn split(raw: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memmem::find(raw, b"\r\n\r\n") {
        Some(i) => (&raw[..i + 2], &raw[i + 4..]),
        None => (raw, &[]),
    }
}

/// Each header field, folded lines and all, without its final CRLF.
fn header_fields(head: &[u8]) -> Vec<&[u8]> {
    let mut fields: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        let Some(eol) = memchr::memmem::find(&head[i..], b"\r\n").map(|p| i + p) else {
            break;
        };
        let next = eol + 2;
        let continues = matches!(head.get(next), Some(b' ' | b'\t'));
        if !continues {
            fields.push(&head[start..eol]);
            start = next;
        }
        i = next;
    }
    if start < head.len() {
        fields.push(&head[start..]);
    }
    fields
}

/// The fields `names` pick, in order: each name takes the next instance from the
/// bottom (RFC 6376 §5.4.2); a name with none left picks nothing.
fn select<'a>(fields: &[&'a [u8]], names: &[&str]) -> Vec<&'a [u8]> {
    let mut used = vec![false; fields.len()];
    let mut picked = Vec::new();
    for name in names {
        let found = (0..fields.len()).rev().find(|&i| {
            !used[i]
                && field_name(fields[i]).is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()))
        });
        if let Some(i) = found {
            used[i] = true;
            picked.push(fields[i]);
        }
    }
    picked
}

fn field_name(field: &[u8]) -> Option<&[u8]> {
    let colon = memchr::memchr(b':', field)?;
    Some(trim_wsp_end(&field[..colon]))
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_wsp_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., last] = s {
        if !is_wsp(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// `relaxed` header canonicalization (§3.4.2): the name lower-cased, the value
/// unfolded, runs of whitespace one space, none around the colon or at the end.
/// No CRLF at the end.
fn relaxed_header(field: &[u8]) -> Vec<u8> {
    let colon = memchr::memchr(b':', field).unwrap_or(field.len());
    let mut out = Vec::with_capacity(field.len());
    out.extend(
        trim_wsp_end(&field[..colon])
            .iter()
            .map(u8::to_ascii_lowercase),
    );
    out.push(b':');
    let value_start = out.len();
    let mut pending_space = false;
    for &b in field.get(colon + 1..).unwrap_or_default() {
        match b {
            b'\r' | b'\n' => {}
            b' ' | b'\t' => pending_space = true,
            _ => {
                if pending_space && out.len() > value_start {
                    out.push(b' ');
                }
                pending_space = false;
                out.push(b);
            }
        }
    }
    out
}

/// `relaxed` body canonicalization (§3.4.4): whitespace runs one space, none at a
/// line's end, no empty lines at the end, and a final CRLF unless the body is empty.
fn relaxed_body(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut blank_run = 0usize;
    let mut lines = body.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if lines.peek().is_none() && line.is_empty() {
            break; // what follows the final CRLF
        }
        let mut canon = Vec::with_capacity(line.len());
        let mut space = false;
        for &b in line {
            if is_wsp(b) {
                space = true;
            } else {
                if space {
                    canon.push(b' ');
                }
                space = false;
                canon.push(b);
            }
        }
        if canon.is_empty() {
            blank_run += 1;
            continue;
        }
        for _ in 0..blank_run {
            out.extend_from_slice(b"\r\n");
        }
        blank_run = 0;
        out.extend_from_slice(&canon);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6376 §3.4.5's example, relaxed/relaxed.
    #[test]
    fn the_rfc_example_canonicalizes_as_the_rfc_says() {
        let msg = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n";
        let (head, body) = split(msg);
        let fields = header_fields(head);
        assert_eq!(fields.len(), 2);
        assert_eq!(relaxed_header(fields[0]), b"a:X");
        assert_eq!(relaxed_header(fields[1]), b"b:Y Z");
        assert_eq!(relaxed_header(b"Subject:  Re:  hi "), b"subject:Re: hi");
        assert_eq!(relaxed_body(body), b" C\r\nD E\r\n");
    }

    #[test]
    fn empty_bodies_and_bodies_without_a_final_crlf() {
        assert_eq!(relaxed_body(b""), b"");
        assert_eq!(relaxed_body(b"\r\n\r\n"), b"");
        assert_eq!(relaxed_body(b"x"), b"x\r\n");
        assert_eq!(relaxed_body(b"a\r\n\r\nb \r\n"), b"a\r\n\r\nb\r\n");
    }

    #[test]
    fn names_pick_instances_from_the_bottom_and_a_missing_one_picks_nothing() {
        let fields: Vec<&[u8]> = vec![b"From: a", b"To: x", b"from: b"];
        let picked = select(&fields, &["from", "from", "from", "cc"]);
        assert_eq!(picked, vec![&b"from: b"[..], b"From: a"]);
    }
}
