//! Frames the daemon sends a connection unasked: `{push: "invalidate", keys: [...]}`
//! and `{push: "flush"}` (protocol.md, "Push frames"). Only connections that asked
//! (`cache.track`) get them.
//!
//! A service queues a [`Push`] on the connection's [`Session`]; the connection task
//! moves queued pushes into its output before it adds any answer finished after them,
//! so a push is ordered before every answer produced after it was queued. That is the
//! guarantee a client's local cache builds on: an invalidation queued before a write
//! is answered reaches every tracking connection ahead of anything that connection
//! hears later.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::protocol::msgpack::Writer;

/// One thing to tell a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// The value of this key (as the client named it) may have changed.
    Invalidate(String),
    /// Drop everything read so far: the daemon lost track.
    Flush,
}

/// Where a service queues pushes for one connection. Unbounded on purpose: a
/// connection holds at most `cache.track_max_keys` tracked keys and each yields at
/// most one push until the client reads it again, so the queue is bounded by that.
pub type PushSender = mpsc::UnboundedSender<Push>;
pub type PushReceiver = mpsc::UnboundedReceiver<Push>;

/// One connection, as the services see it.
#[derive(Debug)]
pub struct Session {
    /// Unique for the daemon's lifetime.
    pub id: u64,
    pub pushes: PushSender,
}

impl Session {
    pub fn new() -> (Session, PushReceiver) {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        (Session { id, pushes: tx }, rx)
    }
}

/// Encodes `pushes` as frames bodies, in order: consecutive invalidations share one
/// frame (at most `MAX_KEYS_PER_FRAME` keys), a flush is a frame of its own.
pub fn encode(pushes: &[Push]) -> Vec<Vec<u8>> {
    const MAX_KEYS_PER_FRAME: usize = 1000;
    let mut frames = Vec::new();
    let mut keys: Vec<&str> = Vec::new();
    let flush_keys = |keys: &mut Vec<&str>, frames: &mut Vec<Vec<u8>>| {
        for chunk in keys.chunks(MAX_KEYS_PER_FRAME) {
            let mut w =
                Writer::with_capacity(32 + chunk.iter().map(|k| k.len() + 5).sum::<usize>());
            w.map(2)
                .str("push")
                .str("invalidate")
                .str("keys")
                .array(chunk.len() as u32);
            for k in chunk {
                w.str(k);
            }
            frames.push(w.into_vec());
        }
        keys.clear();
    };
    for p in pushes {
        match p {
            Push::Invalidate(k) => keys.push(k),
            Push::Flush => {
                flush_keys(&mut keys, &mut frames);
                let mut w = Writer::with_capacity(16);
                w.map(1).str("push").str("flush");
                frames.push(w.into_vec());
            }
        }
    }
    flush_keys(&mut keys, &mut frames);
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidations_coalesce_and_flushes_keep_their_place() {
        let frames = encode(&[
            Push::Invalidate("a".into()),
            Push::Invalidate("b".into()),
            Push::Flush,
            Push::Invalidate("c".into()),
        ]);
        let decoded: Vec<rmpv::Value> = frames
            .iter()
            .map(|f| rmpv::decode::read_value(&mut &f[..]).unwrap())
            .collect();
        assert_eq!(decoded.len(), 3);
        assert_eq!(
            decoded[0].to_string(),
            r#"{"push": "invalidate", "keys": ["a", "b"]}"#
        );
        assert_eq!(decoded[1].to_string(), r#"{"push": "flush"}"#);
        assert_eq!(
            decoded[2].to_string(),
            r#"{"push": "invalidate", "keys": ["c"]}"#
        );
    }
}
