//! Durability checks: what `INFO` says about the Redis under the mail queue shows up
//! in `health` and the log, and `redis.require_durable` refuses mail while it is unsafe.

mod support;

use std::time::Duration;

use rmpv::Value;
use satchel::client::Mail;
use satchel::protocol::ErrorCode;
use support::*;

async fn durability(c: &satchel::Client) -> Value {
    let started = std::time::Instant::now();
    loop {
        if let Ok(h) = c.call("health", vec![]).await {
            let d = field(field(&h, "redis"), "durability").clone();
            if !d.is_nil() {
                return d;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "health never reported durability"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mail() -> Mail {
    Mail {
        to: vec!["a@example.test".into()],
        subject: "s".into(),
        text: Some("t".into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_and_no_aof_are_reported_and_require_durable_refuses_mail() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"]);
    let d = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_REDIS_REQUIRE_DURABLE", "true"),
            ("SATCHEL_MAIL_ENABLED", "false"),
        ],
    );
    let c = d.client().await;
    let dur = durability(&c).await;
    assert_eq!(field(&dur, "eviction_policy").as_str(), Some("allkeys-lru"));
    assert_eq!(field(&dur, "aof").as_bool(), Some(false));
    let warnings = field(&dur, "warnings").as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{dur}");
    assert!(
        d.log_text()
            .contains("redis durability: maxmemory-policy is allkeys-lru")
    );
    assert!(d.log_text().contains("redis durability: AOF is off"));
    let err = c.mail_send(&mail()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    assert!(err.to_string().contains("maxmemory-policy"), "{err}");
    // The cache keeps working.
    c.cache_set("k", Value::from(1), None, &[]).await.unwrap();
    assert_eq!(c.cache_get("k").await.unwrap(), Some(Value::from(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_redis_has_no_warnings_and_takes_mail() {
    let redis = RedisServer::start_with(&["--appendonly", "yes"]);
    let d = Daemon::start(
        &redis.url(),
        &[
            ("SATCHEL_REDIS_REQUIRE_DURABLE", "true"),
            ("SATCHEL_MAIL_ENABLED", "false"),
        ],
    );
    let c = d.client().await;
    let dur = durability(&c).await;
    assert_eq!(field(&dur, "eviction_policy").as_str(), Some("noeviction"));
    assert_eq!(field(&dur, "aof").as_bool(), Some(true));
    assert!(
        field(&dur, "warnings").as_array().unwrap().is_empty(),
        "{dur}"
    );
    assert_eq!(c.mail_send(&mail()).await.unwrap().status, "queued");
}
