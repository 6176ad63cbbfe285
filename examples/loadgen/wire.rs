//! Minimal framing for the load generator (no client library in the measured path).

use satchel::protocol::msgpack::Writer;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A complete request frame `{id, op, ...fields}`; `fields` are (name, encoded value).
pub fn request_frame(id: u64, op: &str, fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = Writer::new();
    w.map(2 + fields.len() as u32)
        .str("id")
        .uint(id)
        .str("op")
        .str(op);
    for (k, v) in fields {
        w.str(k).raw(v);
    }
    satchel::protocol::encode_frame(w.as_slice())
}

pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    body: &mut Vec<u8>,
) -> std::io::Result<()> {
    let n = rd.read_u32().await? as usize;
    body.resize(n, 0);
    rd.read_exact(body).await?;
    Ok(())
}
