//! Fuzzes everything the daemon does with untrusted bytes before an op runs: frame
//! splitting, envelope decoding, and the typed field accessors handlers use.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use satchel::protocol::msgpack::{Reader, validate_one};
use satchel::protocol::{FrameCodec, Request};
use tokio_util::codec::Decoder;

const FIELDS: &[&str] = &["key", "keys", "value", "ttl_ms", "tags", "prefix", "lease", "lease_ms", "wait_ms", "protocol", "to", "subject"];

fuzz_target!(|data: &[u8]| {
    let _ = validate_one(data);
    let _ = Reader::new(data).skip();
    let mut codec = FrameCodec::new(4096);
    let mut buf = BytesMut::from(data);
    let mut frames = vec![Bytes::copy_from_slice(data)];
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        frames.push(frame);
    }
    for frame in frames {
        if let Ok(req) = Request::parse(frame) {
            let _ = req.op();
            for f in FIELDS {
                let _ = req.raw(f);
                let _ = req.opt_str(f);
                let _ = req.opt_int(f);
                let _ = req.opt_positive(f);
                let _ = req.opt_bool(f);
                let _ = req.opt_str_list(f);
            }
        }
    }
});
