//! A small, allocation-free MessagePack scanner and a writer.
//!
//! satchel keeps client values as the exact bytes the client sent (so an int8 stays an
//! int8 and a bin stays a bin) and only looks inside the request envelope. The scanner
//! walks values iteratively, so no nesting depth can overflow the stack, and every
//! length is checked against the buffer, so no input can make it read out of bounds.

use std::fmt;

/// The head of one MessagePack value: scalars and byte strings complete, containers
/// as their element count (their elements follow).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Head<'a> {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Ext(i8, &'a [u8]),
    Array(u32),
    Map(u32),
}

impl Head<'_> {
    /// A short name of the type, for error messages ("expected str, got map").
    pub fn type_name(&self) -> &'static str {
        match self {
            Head::Nil => "nil",
            Head::Bool(_) => "bool",
            Head::Uint(_) | Head::Int(_) => "int",
            Head::Float(_) => "float",
            Head::Str(_) => "str",
            Head::Bin(_) => "bin",
            Head::Ext(..) => "ext",
            Head::Array(_) => "array",
            Head::Map(_) => "map",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer ended inside a value.
    Truncated,
    /// 0xc1 is the one byte MessagePack never uses.
    ReservedMarker,
    /// Bytes were left after the one value a frame must hold.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated MessagePack value"),
            DecodeError::ReservedMarker => f.write_str("invalid MessagePack marker 0xc1"),
            DecodeError::TrailingBytes(n) => {
                write!(f, "{n} bytes after the MessagePack value")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// A cursor over a buffer of MessagePack.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let out = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len8(&mut self) -> Result<usize, DecodeError> {
        Ok(self.byte()? as usize)
    }
    fn len16(&mut self) -> Result<usize, DecodeError> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }
    fn len32(&mut self) -> Result<usize, DecodeError> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    /// Reads the head of the next value.
    pub fn head(&mut self) -> Result<Head<'a>, DecodeError> {
        let m = self.byte()?;
        Ok(match m {
            0x00..=0x7f => Head::Uint(m as u64),
            0x80..=0x8f => Head::Map((m & 0x0f) as u32),
            0x90..=0x9f => Head::Array((m & 0x0f) as u32),
            0xa0..=0xbf => Head::Str(self.take((m & 0x1f) as usize)?),
            0xc0 => Head::Nil,
            0xc1 => return Err(DecodeError::ReservedMarker),
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xc4 => {
                let n = self.len8()?;
                Head::Bin(self.take(n)?)
            }
            0xc5 => {
                let n = self.len16()?;
                Head::Bin(self.take(n)?)
            }
            0xc6 => {
                let n = self.len32()?;
                Head::Bin(self.take(n)?)
            }
            0xc7 => {
                let n = self.len8()?;
                let t = self.byte()? as i8;
                Head::Ext(t, self.take(n)?)
            }
            0xc8 => {
                let n = self.len16()?;
                let t = self.byte()? as i8;
                Head::Ext(t, self.take(n)?)
            }
            0xc9 => {
                let n = self.len32()?;
                let t = self.byte()? as i8;
                Head::Ext(t, self.take(n)?)
            }
            0xca => Head::Float(f32::from_be_bytes(self.be()?) as f64),
            0xcb => Head::Float(f64::from_be_bytes(self.be()?)),
            0xcc => Head::Uint(self.byte()? as u64),
            0xcd => Head::Uint(u16::from_be_bytes(self.be()?) as u64),
            0xce => Head::Uint(u32::from_be_bytes(self.be()?) as u64),
            0xcf => Head::Uint(u64::from_be_bytes(self.be()?)),
            0xd0 => Head::Int(self.byte()? as i8 as i64),
            0xd1 => Head::Int(i16::from_be_bytes(self.be()?) as i64),
            0xd2 => Head::Int(i32::from_be_bytes(self.be()?) as i64),
            0xd3 => Head::Int(i64::from_be_bytes(self.be()?)),
            0xd4 => self.fixext(1)?,
            0xd5 => self.fixext(2)?,
            0xd6 => self.fixext(4)?,
            0xd7 => self.fixext(8)?,
            0xd8 => self.fixext(16)?,
            0xd9 => {
                let n = self.len8()?;
                Head::Str(self.take(n)?)
            }
            0xda => {
                let n = self.len16()?;
                Head::Str(self.take(n)?)
            }
            0xdb => {
                let n = self.len32()?;
                Head::Str(self.take(n)?)
            }
            0xdc => Head::Array(self.len16()? as u32),
            0xdd => Head::Array(self.len32()? as u32),
            0xde => Head::Map(self.len16()? as u32),
            0xdf => Head::Map(self.len32()? as u32),
            0xe0..=0xff => Head::Int(m as i8 as i64),
        })
    }

    fn fixext(&mut self, n: usize) -> Result<Head<'a>, DecodeError> {
        let t = self.byte()? as i8;
        Ok(Head::Ext(t, self.take(n)?))
    }

    /// Skips one complete value and returns the bytes it occupied. Iterative: a
    /// deeply nested value costs a counter, not stack.
    pub fn skip(&mut self) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        let mut remaining: u64 = 1;
        while remaining > 0 {
            remaining -= 1;
            match self.head()? {
                Head::Array(n) => remaining += n as u64,
                Head::Map(n) => remaining += 2 * n as u64,
                _ => {}
            }
        }
        Ok(&self.buf[start..self.pos])
    }
}

/// Checks that `buf` holds exactly one well-formed MessagePack value.
pub fn validate_one(buf: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf);
    r.skip()?;
    if !r.is_empty() {
        return Err(DecodeError::TrailingBytes(buf.len() - r.position()));
    }
    Ok(())
}

/// Builds MessagePack into a byte vector. Infallible: writing to a `Vec` cannot fail.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Writer { buf: Vec::new() }
    }

    pub fn with_capacity(n: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    pub fn map(&mut self, len: u32) -> &mut Self {
        let _ = rmp::encode::write_map_len(&mut self.buf, len);
        self
    }

    pub fn array(&mut self, len: u32) -> &mut Self {
        let _ = rmp::encode::write_array_len(&mut self.buf, len);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        let _ = rmp::encode::write_str(&mut self.buf, s);
        self
    }

    pub fn bin(&mut self, b: &[u8]) -> &mut Self {
        let _ = rmp::encode::write_bin(&mut self.buf, b);
        self
    }

    pub fn uint(&mut self, v: u64) -> &mut Self {
        let _ = rmp::encode::write_uint(&mut self.buf, v);
        self
    }

    pub fn int(&mut self, v: i64) -> &mut Self {
        let _ = rmp::encode::write_sint(&mut self.buf, v);
        self
    }

    pub fn float(&mut self, v: f64) -> &mut Self {
        let _ = rmp::encode::write_f64(&mut self.buf, v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        let _ = rmp::encode::write_bool(&mut self.buf, v);
        self
    }

    pub fn nil(&mut self) -> &mut Self {
        let _ = rmp::encode::write_nil(&mut self.buf);
        self
    }

    /// Appends bytes that already are one encoded MessagePack value.
    pub fn raw(&mut self, value: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(value);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_handles_nesting_without_recursion() {
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0xc0);
        assert_eq!(Reader::new(&deep).skip().unwrap().len(), deep.len());
        assert_eq!(Reader::new(&deep[..50]).skip(), Err(DecodeError::Truncated));
    }

    #[test]
    fn huge_declared_lengths_are_truncation_not_allocation() {
        assert_eq!(
            Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff]).skip(),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            Reader::new(&[0xc6, 0xff, 0xff, 0xff, 0xff, 1]).skip(),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn reads_every_int_width() {
        for (bytes, want) in [
            (vec![0xd0, 0xff], Head::Int(-1)),
            (vec![0xcd, 0x01, 0x00], Head::Uint(256)),
            (vec![0xff], Head::Int(-1)),
            (vec![0xcf, 0, 0, 0, 0, 0, 0, 0, 7], Head::Uint(7)),
        ] {
            assert_eq!(Reader::new(&bytes).head().unwrap(), want);
        }
    }
}
