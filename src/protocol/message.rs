//! Request and response envelopes.
//!
//! A request is a map `{"id": uint, "op": str, ...fields}`. The envelope is decoded
//! eagerly; op fields are located (as byte ranges into the frame) but decoded only when
//! a handler asks for them, so a value the daemon merely stores is never re-encoded.

use std::ops::Range;

use bytes::Bytes;

use super::msgpack::{DecodeError, Head, Reader, Writer};
use super::{ErrorCode, OpError};

/// One decoded request. Cheap to clone: the frame is shared.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: u64,
    op: Range<usize>,
    frame: Bytes,
    fields: Vec<(Range<usize>, Range<usize>)>,
}

/// Why a frame is not a request. `id` is set when the frame got far enough to have
/// one, so the client can match the error to its request.
#[derive(Debug, Clone)]
pub struct RequestError {
    pub id: Option<u64>,
    pub error: OpError,
}

fn range_of(frame: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - frame.as_ptr() as usize;
    start..start + part.len()
}

impl Request {
    /// Decodes the envelope of one frame.
    pub fn parse(frame: Bytes) -> Result<Request, RequestError> {
        let bad = |id: Option<u64>, msg: String| RequestError {
            id,
            error: OpError::new(ErrorCode::BadRequest, msg),
        };
        let mut r = Reader::new(&frame);
        let decode = |e: DecodeError| format!("body is not valid MessagePack: {e}");
        let n = match r.head() {
            Ok(Head::Map(n)) => n,
            Ok(other) => {
                return Err(bad(
                    None,
                    format!("request must be a map, got {}", other.type_name()),
                ));
            }
            Err(e) => return Err(bad(None, decode(e))),
        };
        let mut id = None;
        let mut id_err = None;
        let mut op = None;
        let mut op_err = None;
        let mut fields = Vec::with_capacity(n.min(16) as usize);
        for _ in 0..n {
            let key = r.head().map_err(|e| bad(None, decode(e)))?;
            let value = r.clone().head().map_err(|e| bad(None, decode(e)))?;
            let raw = r.skip().map_err(|e| bad(None, decode(e)))?;
            // Non-string keys are unknown fields, and unknown fields are ignored.
            let Head::Str(key) = key else { continue };
            match key {
                b"id" => match value {
                    Head::Uint(v) => id = Some(v),
                    other => id_err = Some(other.type_name()),
                },
                b"op" => match value {
                    Head::Str(s) if std::str::from_utf8(s).is_ok() => {
                        op = Some(range_of(&frame, s))
                    }
                    other => op_err = Some(other.type_name()),
                },
                _ => fields.push((range_of(&frame, key), range_of(&frame, raw))),
            }
        }
        if !r.is_empty() {
            return Err(bad(
                id,
                decode(DecodeError::TrailingBytes(frame.len() - r.position())),
            ));
        }
        let Some(id) = id else {
            let msg = match id_err {
                Some(t) => format!("field `id` must be an unsigned int, got {t}"),
                None => "request has no `id` field".to_owned(),
            };
            return Err(RequestError {
                id: None,
                error: OpError::bad_request("id", msg),
            });
        };
        let Some(op) = op else {
            let msg = match op_err {
                Some(t) => format!("field `op` must be a str, got {t}"),
                None => "request has no `op` field".to_owned(),
            };
            return Err(RequestError {
                id: Some(id),
                error: OpError::bad_request("op", msg),
            });
        };
        Ok(Request {
            id,
            op,
            frame,
            fields,
        })
    }

    /// Size of the request's frame body, for memory budgets.
    pub fn frame_len(&self) -> usize {
        self.frame.len()
    }

    pub fn op(&self) -> &str {
        // Checked to be UTF-8 in `parse`.
        std::str::from_utf8(&self.frame[self.op.clone()]).unwrap_or("")
    }

    /// The raw encoded bytes of a field, if present (nil counts as present here).
    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| &self.frame[k.clone()] == name.as_bytes())
            .map(|(_, v)| &self.frame[v.clone()])
    }

    /// The head of an optional field; an explicit nil is the same as absent.
    fn head(&self, name: &str) -> Option<Head<'_>> {
        let raw = self.raw(name)?;
        match Reader::new(raw).head() {
            Ok(Head::Nil) | Err(_) => None,
            Ok(h) => Some(h),
        }
    }

    fn wrong_type(name: &str, want: &str, got: &Head<'_>) -> OpError {
        OpError::bad_request(
            name,
            format!("field `{name}` must be {want}, got {}", got.type_name()),
        )
    }

    fn missing(name: &str) -> OpError {
        OpError::bad_request(name, format!("field `{name}` is required"))
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<&str>, OpError> {
        match self.head(name) {
            None => Ok(None),
            Some(Head::Str(s)) => std::str::from_utf8(s).map(Some).map_err(|_| {
                OpError::bad_request(name, format!("field `{name}` is not valid UTF-8"))
            }),
            Some(other) => Err(Self::wrong_type(name, "a str", &other)),
        }
    }

    pub fn str(&self, name: &str) -> Result<&str, OpError> {
        self.opt_str(name)?.ok_or_else(|| Self::missing(name))
    }

    /// An optional signed integer (any MessagePack int width).
    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, OpError> {
        match self.head(name) {
            None => Ok(None),
            Some(Head::Int(v)) => Ok(Some(v)),
            Some(Head::Uint(v)) => i64::try_from(v)
                .map(Some)
                .map_err(|_| OpError::bad_request(name, format!("field `{name}` is too big"))),
            // JavaScript encoders send integers beyond 32 bits (Date.now()) as float64;
            // an integral float is accepted as the integer it holds.
            Some(Head::Float(f))
                if f.fract() == 0.0 && f.is_finite() && f.abs() < 9.007_199_254_740_992e15 =>
            {
                Ok(Some(f as i64))
            }
            Some(other) => Err(Self::wrong_type(name, "an int", &other)),
        }
    }

    /// An optional integer that must be > 0 (durations, limits).
    pub fn opt_positive(&self, name: &str) -> Result<Option<u64>, OpError> {
        match self.opt_int(name)? {
            None => Ok(None),
            Some(v) if v > 0 => Ok(Some(v as u64)),
            Some(v) => Err(OpError::bad_request(
                name,
                format!("field `{name}` must be > 0, got {v}"),
            )),
        }
    }

    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>, OpError> {
        match self.head(name) {
            None => Ok(None),
            Some(Head::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(Self::wrong_type(name, "a bool", &other)),
        }
    }

    /// An optional array of strings.
    pub fn opt_str_list(&self, name: &str) -> Result<Option<Vec<&str>>, OpError> {
        let Some(raw) = self.raw(name) else {
            return Ok(None);
        };
        let mut r = Reader::new(raw);
        let n = match r.head() {
            Ok(Head::Nil) => return Ok(None),
            Ok(Head::Array(n)) => n,
            Ok(other) => return Err(Self::wrong_type(name, "an array of str", &other)),
            Err(_) => return Ok(None),
        };
        let mut out = Vec::with_capacity(n.min(1024) as usize);
        for i in 0..n {
            match r.head() {
                Ok(Head::Str(s)) => out.push(std::str::from_utf8(s).map_err(|_| {
                    OpError::bad_request(name, format!("`{name}[{i}]` is not valid UTF-8"))
                })?),
                Ok(other) => {
                    return Err(OpError::bad_request(
                        name,
                        format!("`{name}[{i}]` must be a str, got {}", other.type_name()),
                    ));
                }
                Err(_) => return Err(OpError::bad_request(name, "truncated array")),
            }
        }
        Ok(Some(out))
    }

    pub fn str_list(&self, name: &str) -> Result<Vec<&str>, OpError> {
        self.opt_str_list(name)?.ok_or_else(|| Self::missing(name))
    }
}

/// Encodes a typed `result` (rare ops: stats, health, mail) as a MessagePack map with
/// field names. Hot ops (cache) write their results with [`Writer`] directly.
pub fn encode_result<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, OpError> {
    rmp_serde::to_vec_named(value)
        .map_err(|e| OpError::new(ErrorCode::Internal, format!("cannot encode result: {e}")))
}

/// One encoded response body, in two parts so that a large `result` (an `mget`
/// answer of many MiB) is never copied: `head` is the envelope up to the result,
/// `result` the result's bytes (empty for an error, whose `head` is all of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    head: Vec<u8>,
    result: Vec<u8>,
}

impl Response {
    /// `{"id": id, "ok": true, "result": <result>}`; `result` is already encoded.
    pub fn ok(id: u64, result: Vec<u8>) -> Response {
        let mut w = Writer::with_capacity(24);
        w.map(3)
            .str("id")
            .uint(id)
            .str("ok")
            .bool(true)
            .str("result");
        Response {
            head: w.into_vec(),
            result,
        }
    }

    /// `{"id": id|nil, "ok": false, "error": {"code", "message", ...}}`.
    pub fn error(id: Option<u64>, err: &OpError) -> Response {
        let mut w = Writer::with_capacity(64 + err.message.len());
        w.map(3).str("id");
        match id {
            Some(id) => w.uint(id),
            None => w.nil(),
        };
        w.str("ok").bool(false).str("error");
        let extra = err.retry_after_ms.is_some() as u32 + err.field.is_some() as u32;
        w.map(2 + extra)
            .str("code")
            .str(err.code.as_str())
            .str("message")
            .str(&err.message);
        if let Some(ms) = err.retry_after_ms {
            w.str("retry_after_ms").uint(ms);
        }
        if let Some(field) = &err.field {
            w.str("field").str(field);
        }
        Response {
            head: w.into_vec(),
            result: Vec::new(),
        }
    }

    /// Bytes of the body (without the length prefix).
    pub fn len(&self) -> usize {
        self.head.len() + self.result.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The envelope and the result, to write one after the other.
    pub fn into_parts(self) -> (Vec<u8>, Vec<u8>) {
        (self.head, self.result)
    }

    /// The whole body in one buffer (a copy; for tests and small answers).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.result);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(w: &Writer) -> Bytes {
        Bytes::copy_from_slice(w.as_slice())
    }

    #[test]
    fn parses_envelope_and_keeps_raw_values() {
        let mut w = Writer::new();
        w.map(4).str("id").uint(7).str("op").str("cache.set");
        w.str("value").raw(&[0xd0, 0x05]).str("extra").nil();
        let req = Request::parse(frame(&w)).unwrap();
        assert_eq!(req.id, 7);
        assert_eq!(req.op(), "cache.set");
        assert_eq!(req.raw("value"), Some(&[0xd0, 0x05][..]));
        assert_eq!(req.opt_int("value").unwrap(), Some(5));
        assert_eq!(req.opt_str("extra").unwrap(), None);
    }

    #[test]
    fn missing_id_is_bad_request_with_nil_id() {
        let mut w = Writer::new();
        w.map(1).str("op").str("ping");
        let err = Request::parse(frame(&w)).unwrap_err();
        assert_eq!(err.id, None);
        assert_eq!(err.error.code, ErrorCode::BadRequest);
    }

    #[test]
    fn integral_floats_are_accepted_as_ints_and_fractions_are_not() {
        let mut w = Writer::new();
        w.map(4).str("id").uint(1).str("op").str("x");
        w.str("a").raw(&{
            let mut b = vec![0xcb];
            b.extend_from_slice(&1_764_000_000_000f64.to_be_bytes());
            b
        });
        w.str("b").raw(&{
            let mut b = vec![0xcb];
            b.extend_from_slice(&1.5f64.to_be_bytes());
            b
        });
        let req = Request::parse(frame(&w)).unwrap();
        assert_eq!(req.opt_int("a").unwrap(), Some(1_764_000_000_000));
        assert!(req.opt_int("b").is_err());
    }

    #[test]
    fn wrong_field_type_names_the_field() {
        let mut w = Writer::new();
        w.map(3)
            .str("id")
            .uint(1)
            .str("op")
            .str("x")
            .str("key")
            .uint(3);
        let req = Request::parse(frame(&w)).unwrap();
        let err = req.str("key").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("key"));
        assert!(
            err.message.contains("must be a str, got int"),
            "{}",
            err.message
        );
    }

    /// The byte-level example in protocol.md, checked.
    #[test]
    fn protocol_md_hex_example_is_true() {
        let request = [
            0x82, 0xa2, 0x69, 0x64, 0x01, 0xa2, 0x6f, 0x70, 0xa4, 0x70, 0x69, 0x6e, 0x67,
        ];
        let req = Request::parse(Bytes::copy_from_slice(&request)).unwrap();
        assert_eq!((req.id, req.op()), (1, "ping"));
        let mut pong = Writer::new();
        pong.str("pong");
        let response = Response::ok(1, pong.into_vec());
        assert_eq!(
            &response.to_vec()[..],
            &[
                0x83, 0xa2, 0x69, 0x64, 0x01, 0xa2, 0x6f, 0x6b, 0xc3, 0xa6, 0x72, 0x65, 0x73, 0x75,
                0x6c, 0x74, 0xa4, 0x70, 0x6f, 0x6e, 0x67
            ]
        );
        assert_eq!(
            crate::protocol::encode_frame(&request)[..4],
            [0, 0, 0, 0x0d]
        );
    }
}
