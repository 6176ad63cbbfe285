//! Reading loosely typed Redis replies (script results, stream entries), where the
//! redis crate's `FromRedisValue` would need a type per shape. One copy, used by
//! every module that reads such replies.

use redis::Value;

/// A bulk or simple string, or an integer, as text.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A non-negative integer, or a string holding one.
pub fn uint(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// The bytes of a bulk string.
pub fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        _ => None,
    }
}
