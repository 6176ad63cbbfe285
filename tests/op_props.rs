//! Property test over every op's arguments, against a real daemon: whatever fields
//! and types a client sends, the answer is a well-formed response with the request's
//! id and, on failure, one of the documented error codes (never INTERNAL), and the
//! connection keeps working.

mod support;

use std::io::Write;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use satchel::protocol::msgpack::Writer;
use support::*;

const OPS: &[&str] = &[
    "hello",
    "ping",
    "stats",
    "health",
    "cache.get",
    "cache.mget",
    "cache.set",
    "cache.del",
    "cache.fetch",
    "cache.fill",
    "cache.invalidate",
    "mail.send",
    "mail.status",
    "mail.cancel",
    "mail.retry",
    "mail.dead",
    "nope",
    "",
];

const FIELDS: &[&str] = &[
    "key",
    "keys",
    "value",
    "ttl_ms",
    "tags",
    "prefix",
    "lease",
    "lease_ms",
    "wait_ms",
    "protocol",
    "client",
    "delay_ms",
    "to",
    "cc",
    "bcc",
    "from",
    "reply_to",
    "subject",
    "text",
    "html",
    "headers",
    "attachments",
    "idempotency_key",
    "send_at_ms",
    "mail_id",
    "limit",
];

/// Fields whose integer value is a wait: keep them short so the test stays fast
/// (their types are still fuzzed).
const WAITS: &[&str] = &["wait_ms", "delay_ms", "lease_ms", "send_at_ms"];

const CODES: &[&str] = &[
    "BAD_REQUEST",
    "UNKNOWN_OP",
    "TOO_LARGE",
    "UNAVAILABLE",
    "TIMEOUT",
    "FORBIDDEN",
    "SHUTTING_DOWN",
    "INVALID_MAIL",
    "NOT_FOUND",
];

#[derive(Debug, Clone)]
enum V {
    Nil,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<V>),
    Map(Vec<(String, V)>),
}

fn value() -> impl Strategy<Value = V> {
    let leaf = prop_oneof![
        Just(V::Nil),
        any::<bool>().prop_map(V::Bool),
        any::<i64>().prop_map(V::Int),
        (0u64..200).prop_map(V::Uint),
        any::<u64>().prop_map(V::Uint),
        any::<f64>().prop_map(V::Float),
        "[a-z0-9:@. <>\r\n*]{0,24}".prop_map(V::Str),
        proptest::collection::vec(any::<u8>(), 0..32).prop_map(V::Bin),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(V::Array),
            proptest::collection::vec(("[a-z_]{1,10}", inner), 0..6).prop_map(V::Map),
        ]
    })
}

fn write(w: &mut Writer, v: &V, wait: bool) {
    match v {
        V::Nil => {
            w.nil();
        }
        V::Bool(b) => {
            w.bool(*b);
        }
        V::Int(i) if wait => {
            w.int(i % 100);
        }
        V::Int(i) => {
            w.int(*i);
        }
        V::Uint(u) if wait => {
            w.uint(u % 100);
        }
        V::Uint(u) => {
            w.uint(*u);
        }
        V::Float(f) => {
            w.raw(&{
                let mut b = vec![0xcb];
                b.extend_from_slice(&f.to_be_bytes());
                b
            });
        }
        V::Str(s) => {
            w.str(s);
        }
        V::Bin(b) => {
            w.bin(b);
        }
        V::Array(a) => {
            w.array(a.len() as u32);
            for x in a {
                write(w, x, wait);
            }
        }
        V::Map(m) => {
            w.map(m.len() as u32);
            for (k, x) in m {
                w.str(k);
                write(w, x, wait);
            }
        }
    }
}

#[test]
fn any_arguments_to_any_op_get_a_typed_answer_and_never_harm_the_connection() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_CACHE_WAIT_MS", "50"),
            ("SATCHEL_CACHE_LEASE_MS", "100"),
        ],
    );
    let s = std::cell::RefCell::new(daemon.raw());
    s.borrow()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let fields = proptest::collection::vec((proptest::sample::select(FIELDS), value()), 0..6);
    let strategy = (proptest::sample::select(OPS), fields, any::<u32>());
    let mut runner = TestRunner::new(Config {
        cases: 600,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |(op, fields, id)| {
            let id = id as u64;
            let mut w = Writer::new();
            w.map(2 + fields.len() as u32)
                .str("id")
                .uint(id)
                .str("op")
                .str(op);
            for (name, v) in &fields {
                w.str(name);
                write(&mut w, v, WAITS.contains(name));
            }
            let mut s = s.borrow_mut();
            s.write_all(&frame(w.as_slice())).unwrap();
            let f = read_frame(&mut s).expect("an answer");
            let (got_id, ok, body) = decode(&f);
            prop_assert_eq!(got_id, Some(id));
            if !ok {
                let c = code(&body);
                prop_assert!(CODES.contains(&c), "{op}: unexpected code {c}: {body}");
            }
            Ok(())
        })
        .unwrap();
    let mut s = s.into_inner();
    s.write_all(&frame(&request(1, "ping", |_| 0))).unwrap();
    assert!(decode(&read_frame(&mut s).unwrap()).1);
    assert!(!daemon.log_text().contains("panicked"));
}
