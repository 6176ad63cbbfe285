//! Property tests for the frame codec and request decoding: no input panics, and
//! what a client encodes is what the daemon decodes.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use rmpv::Value;
use satchel::protocol::msgpack::{Reader, validate_one};
use satchel::protocol::{FrameCodec, Request, encode_frame};
use tokio_util::codec::Decoder;

/// Arbitrary MessagePack values, nested a few levels.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f32>().prop_map(Value::F32),
        any::<f64>().prop_map(Value::F64),
        ".{0,40}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Value::Binary),
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(t, d)| Value::Ext(t, d)),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((inner.clone(), inner), 0..8).prop_map(Value::Map),
        ]
    })
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut codec = FrameCodec::new(256);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            let _ = Request::parse(frame);
        }
        let _ = Request::parse(Bytes::from(bytes.clone()));
        let _ = Reader::new(&bytes).skip();
    }

    #[test]
    fn frames_round_trip_even_when_split(body in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..310) {
        let wire = encode_frame(&body);
        let cut = cut.min(wire.len());
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&wire[..cut]);
        let early = codec.decode(&mut buf).unwrap();
        if cut < wire.len() {
            prop_assert!(early.is_none());
            buf.extend_from_slice(&wire[cut..]);
            prop_assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), Bytes::from(body));
        } else {
            prop_assert_eq!(early.unwrap(), Bytes::from(body));
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn any_value_is_skipped_exactly(v in value()) {
        let bytes = encode(&v);
        prop_assert_eq!(Reader::new(&bytes).skip().unwrap().len(), bytes.len());
        prop_assert!(validate_one(&bytes).is_ok());
    }

    #[test]
    fn requests_decode_to_what_the_client_encoded(
        id in any::<u64>(),
        op in "[a-z.]{1,20}",
        fields in proptest::collection::vec(("[a-z_]{1,12}", value()), 0..6),
    ) {
        // Later duplicates would shadow nothing: keep field names unique.
        let mut unique: Vec<(String, Value)> = Vec::new();
        for (k, v) in fields {
            if k != "id" && k != "op" && !unique.iter().any(|(u, _)| *u == k) {
                unique.push((k, v));
            }
        }
        let mut map = vec![(Value::from("id"), Value::from(id)), (Value::from("op"), Value::from(op.clone()))];
        map.extend(unique.iter().map(|(k, v)| (Value::from(k.as_str()), v.clone())));
        let req = Request::parse(Bytes::from(encode(&Value::Map(map)))).unwrap();
        prop_assert_eq!(req.id, id);
        prop_assert_eq!(req.op(), op.as_str());
        for (k, v) in &unique {
            let raw = req.raw(k).unwrap().to_vec();
            prop_assert_eq!(raw, encode(v));
        }
    }
}
