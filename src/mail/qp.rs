//! Text bodies for the MIME message: the transfer encoding lettre would choose, with
//! a faster quoted-printable encoder.
//!
//! Why: lettre's quoted-printable path (the `quoted_printable` crate plus a separate
//! CRLF pass) was 18% of the daemon's CPU per `mail.send` of a 1 KB HTML body; HTML
//! from templates is usually one long line, which needs QP. This encoder does the
//! line-ending normalisation and the encoding in one pass over the bytes.

use lettre::message::SinglePart;
use lettre::message::header::{ContentTransferEncoding, ContentType};

/// Longest encoded line, without its CRLF (RFC 2045 6.7, rule 5).
const MAX_LINE: usize = 76;

/// A `text/plain` or `text/html` (UTF-8) part. Short-lined ASCII stays 7bit (lettre
/// decides, as before); other text is quoted-printable, or base64 when more than a
/// third of it would need escaping (lettre's own rule).
pub fn text_part(content_type: ContentType, text: &str) -> SinglePart {
    let builder = SinglePart::builder().header(content_type);
    let b = text.as_bytes();
    if b.is_ascii() && !line_too_long(b) {
        return builder.body(text.to_owned());
    }
    // Branch-free so it vectorises: bytes outside TAB and SP..='~'.
    let escaped: usize = b
        .iter()
        .map(|&c| usize::from(c.wrapping_sub(b' ') > b'~' - b' ' && c != b'\t'))
        .sum();
    if escaped <= b.len() / 3 {
        builder.body(lettre::message::Body::dangerous_pre_encoded(
            encode(b),
            ContentTransferEncoding::QuotedPrintable,
        ))
    } else {
        builder
            .header(ContentTransferEncoding::Base64)
            .body(text.to_owned())
    }
}

/// lettre's test for "a line is too long for 7bit" (76 bytes or more between LFs).
fn line_too_long(b: &[u8]) -> bool {
    let mut start = 0;
    for i in memchr::memchr_iter(b'\n', b) {
        if i - start >= MAX_LINE {
            return true;
        }
        start = i;
    }
    b.len() - start >= MAX_LINE
}

/// Quoted-printable, text mode: CRLF and bare LF are hard line breaks (written as
/// CRLF), a bare CR is `=0D`, whitespace before a hard break or at the end is
/// escaped, and soft breaks keep every line within 76 characters.
pub fn encode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 16 + 8);
    let mut lines = input.split(|&c| c == b'\n').peekable();
    while let Some(line) = lines.next() {
        let last = lines.peek().is_none();
        let line = if !last {
            line.strip_suffix(b"\r").unwrap_or(line)
        } else {
            line
        };
        encode_line(line, &mut out);
        if !last {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// Bytes written as themselves (anywhere but at the end of a line, where whitespace
/// must be escaped: RFC 2045 6.7, rule 3).
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = b'!';
    while c <= b'~' {
        t[c as usize] = true;
        c += 1;
    }
    t[b'=' as usize] = false;
    t[b' ' as usize] = true;
    t[b'\t' as usize] = true;
    t
};

/// Whether byte `i` of `line` is written as itself.
fn literal(line: &[u8], i: usize) -> bool {
    PLAIN[line[i] as usize] && (i + 1 < line.len() || !matches!(line[i], b' ' | b'\t'))
}

/// One hard line (no CR LF inside except bare CRs, which are escaped). Every encoded
/// line but the last of a hard line ends in a soft break `=`, so holds 75 characters
/// before it; the last may hold 76.
fn encode_line(line: &[u8], out: &mut Vec<u8>) {
    let n = line.len();
    let mut col = 0;
    let mut i = 0;
    while i < n {
        if literal(line, i) {
            // Copy the whole run of literal bytes, a line's worth at a time.
            let mut end = i + 1;
            while end < n && PLAIN[line[end] as usize] {
                end += 1;
            }
            if end == n && end - 1 > i && !literal(line, end - 1) {
                end -= 1; // trailing whitespace: escaped below
            }
            while i < end {
                let left = end - i;
                let room = if end == n && left <= MAX_LINE - col {
                    left
                } else {
                    (MAX_LINE - 1).saturating_sub(col)
                };
                if room == 0 {
                    out.extend_from_slice(b"=\r\n");
                    col = 0;
                    continue;
                }
                let take = left.min(room);
                out.extend_from_slice(&line[i..i + take]);
                col += take;
                i += take;
            }
        } else {
            let limit = if i + 1 == n { MAX_LINE } else { MAX_LINE - 1 };
            if col + 3 > limit {
                out.extend_from_slice(b"=\r\n");
                col = 0;
            }
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            let c = line[i];
            out.extend_from_slice(&[b'=', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]]);
            col += 3;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the encoded text must decode to: line endings as CRLF.
    fn crlf(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &c) in input.iter().enumerate() {
            if c == b'\n' && (i == 0 || input[i - 1] != b'\r') {
                out.push(b'\r');
            }
            out.push(c);
        }
        out
    }

    fn check(input: &[u8]) {
        let enc = encode(input);
        for line in enc.split(|&c| c == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(line.len() <= MAX_LINE, "line of {}: {line:?}", line.len());
            assert!(line.iter().all(|c| matches!(c, b'\t' | b' '..=b'~')));
            assert!(
                !matches!(line.last(), Some(b' ' | b'\t')),
                "whitespace at the end of {line:?}"
            );
        }
        let decoded = quoted_printable::decode(&enc, quoted_printable::ParseMode::Strict)
            .expect("strict decode");
        assert_eq!(
            decoded,
            crlf(input),
            "encoded: {}",
            String::from_utf8_lossy(&enc)
        );
    }

    #[test]
    fn known_cases() {
        assert_eq!(encode(b"a=b"), b"a=3Db");
        assert_eq!(encode(b"trail \nx\t"), b"trail=20\r\nx=09");
        assert_eq!(encode("é".as_bytes()), b"=C3=A9");
        assert_eq!(encode(b"a\rb"), b"a=0Db");
        let long = "x".repeat(200);
        check(long.as_bytes());
        check("=".repeat(100).as_bytes());
        check(format!("{}=", "y".repeat(74)).as_bytes());
        check(format!("{} \r\n", "y".repeat(75)).as_bytes());
    }

    #[test]
    fn html_that_lettre_would_send_as_qp_goes_as_qp() {
        let html = "<p>Thank you for your order. Items ship within two days.</p>".repeat(20);
        let part = text_part(ContentType::TEXT_HTML, &html);
        let text = String::from_utf8(part.formatted()).unwrap();
        assert!(
            text.contains("Content-Transfer-Encoding: quoted-printable"),
            "{text}"
        );
        let short = text_part(ContentType::TEXT_PLAIN, "short\nlines");
        let text = String::from_utf8(short.formatted()).unwrap();
        assert!(text.contains("Content-Transfer-Encoding: 7bit"), "{text}");
        let binaryish = text_part(ContentType::TEXT_PLAIN, &"\u{1}".repeat(100));
        let text = String::from_utf8(binaryish.formatted()).unwrap();
        assert!(text.contains("Content-Transfer-Encoding: base64"), "{text}");
    }

    proptest! {
        #[test]
        fn decodes_back_to_the_input_with_crlf_lines(
            input in proptest::collection::vec(
                prop_oneof![
                    Just(b' '), Just(b'\t'), Just(b'\r'), Just(b'\n'), Just(b'='),
                    b'a'..=b'z', any::<u8>()
                ],
                0..400,
            )
        ) {
            check(&input);
        }
    }
}
