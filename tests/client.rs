//! The Rust client (`satchel::Client`) against a real daemon, and against a peer
//! that breaks the framing.

mod support;

use std::time::Duration;

use rmpv::Value;
use satchel::{Client, ClientError};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_malformed_frame_fails_every_waiter_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    // A "daemon" that reads one request and answers with a frame that is not
    // MessagePack, then keeps the connection open.
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await.unwrap();
        s.write_all(&[0, 0, 0, 1, 0xc1]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let client = Client::connect(&path).await.unwrap();
    let (first, second) = tokio::time::timeout(
        Duration::from_secs(5),
        futures::future::join(client.ping(), client.call("ping", vec![])),
    )
    .await
    .expect("the callers were answered, not left waiting");
    for r in [first.map(|_| Value::Nil), second] {
        match r {
            Err(ClientError::Protocol(m)) => assert!(m.contains("malformed"), "{m}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }
    // Later calls on the broken connection fail at once with the same reason.
    let later = tokio::time::timeout(Duration::from_secs(1), client.ping())
        .await
        .expect("answered at once");
    assert!(matches!(later, Err(ClientError::Protocol(_))), "{later:?}");
    peer.abort();
}

#[tokio::test]
async fn a_server_error_keeps_its_code_message_and_field() {
    let redis = RedisServer::start();
    let daemon = Daemon::start(&redis.url(), &[]);
    let client = daemon.client().await;
    let err = client
        .cache_set("", Value::from(1), None, &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(satchel::protocol::ErrorCode::BadRequest));
    assert_eq!(err.field(), Some("key"), "{err:?}");
    let err = client
        .call("cache.get", vec![("key", Value::from(7))])
        .await
        .unwrap_err();
    assert_eq!(err.field(), Some("key"), "{err:?}");
}
