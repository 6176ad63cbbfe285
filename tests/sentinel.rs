//! Sentinel mode (issue 14): the daemon finds the master through sentinels and follows
//! failovers by itself. One master, one replica and three sentinels, all real
//! `redis-server` processes started here.

mod support;

use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::client::{Client, Mail};
use support::load::*;
use support::near::*;
use support::topology::*;
use support::*;

fn mail_toml(set: &SentinelSet, sink: &SmtpSink, extra: &str) -> String {
    format!(
        "{}\n[mail]\nsmtp_url = \"smtp://127.0.0.1:{}?tls=none\"\nfrom = \"app@example.org\"\n\
         retry_base_ms = 100\nretry_max_ms = 500\nclaim_idle_ms = 1000\nmax_attempts = 1000\n\
         smtp_connect_timeout_ms = 500\nsmtp_command_timeout_ms = 1000\n{extra}",
        set.redis_toml(),
        sink.port
    )
}

/// `stats` → `redis.url` (it names the master the daemon talks to now).
async fn redis_url(c: &Client) -> String {
    let s = c.stats().await.unwrap();
    field(field(&s, "redis"), "url")
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn follows(c: &Client, port: u16, limit: Duration) -> bool {
    let want = format!("127.0.0.1:{port}");
    eventually(limit, || {
        let c = c.clone();
        let want = want.clone();
        async move { redis_url(&c).await.ends_with(&want) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_master_under_load_loses_no_acknowledged_mail() {
    let mut set = SentinelSet::start(&[]);
    let sink = SmtpSink::start();
    let d = Daemon::start_with_config(
        DEFAULT_URL,
        &mail_toml(
            &set,
            &sink,
            "min_replicas_ack = 1\nreplica_ack_timeout_ms = 500\n",
        ),
        &[],
    );
    let c = d.client().await;
    assert!(
        follows(&c, set.master.port, Duration::from_secs(10)).await,
        "the daemon never found the master: {}",
        redis_url(&c).await
    );
    // health names the replica (and so no "no connected replica" warning).
    let h = c.call("health", vec![]).await.unwrap();
    let dur = field(field(&h, "redis"), "durability");
    assert_eq!(field(dur, "replicas").as_u64(), Some(1), "{h}");
    let q = c
        .mail_send(&Mail {
            to: vec!["a@example.com".into()],
            subject: "before".into(),
            text: Some("t".into()),
            ..Mail::default()
        })
        .await
        .unwrap();
    assert_eq!(q.replicas, Some(1), "one replica acknowledged it");

    let load = MixedLoad::start(&d, 4).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let old = set.master.port;
    let killed = Instant::now();
    set.master.stop(); // SIGKILL
    let new_port = set.replica.port;
    assert!(
        follows(&c, new_port, Duration::from_secs(30)).await,
        "the daemon did not follow the failover to {new_port}: {}",
        redis_url(&c).await
    );
    let followed = killed.elapsed();
    // Mail is accepted again on the new master.
    assert!(
        load.accepts_after(killed + followed, Duration::from_secs(10))
            .await,
        "no mail accepted after the daemon followed the new master"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.stop().await;
    let before = out.accepted.iter().filter(|(_, at)| *at < killed).count();
    let ids = out.ids();
    let (missing, dups) = settle(&sink, &ids, Duration::from_secs(60));
    let s = c.stats().await.unwrap();
    let under = field(field(&s, "mail"), "under_replicated").as_u64();
    eprintln!(
        "sentinel failover (SIGKILL of master {old}): daemon on the new master {new_port} after {followed:?}; \
         mail outage {:?} (longest stretch without an accepted send); {} mails accepted ({before} before the kill), \
         errors {:?}, under-replicated {under:?}, missing {missing}, duplicates {dups}; \
         cache {} ok / {} failed",
        out.longest_gap(),
        ids.len(),
        out.errors,
        out.cache_ok,
        out.cache_err,
    );
    assert_eq!(missing, 0, "acknowledged mail lost in the failover");
    out.assert_only_outage_errors();
    assert!(!out.errors.is_empty(), "the outage was not observed");
    assert!(before > 0, "no load before the kill");
    // With the only replica promoted, nothing is left to acknowledge: still ok,
    // counted, and the durability warning says so.
    let q = c
        .mail_send(&Mail {
            to: vec!["a@example.com".into()],
            subject: "after".into(),
            text: Some("t".into()),
            ..Mail::default()
        })
        .await
        .unwrap();
    assert_eq!(q.replicas, Some(0));
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = c.clone();
            async move {
                let h = c.call("health", vec![]).await.unwrap();
                h.to_string().contains("no connected replica")
            }
        })
        .await,
        "no warning about the missing replica"
    );
    assert!(d.log_text().contains("redis master moved; following it"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_with_the_old_master_alive_is_followed_and_the_caches_stay_coherent() {
    let set = SentinelSet::start(&[]);
    let d = Daemon::start_with_config(
        DEFAULT_URL,
        &format!("{}\n[mail]\nenabled = false\n", set.redis_toml()),
        &[],
    );
    let c = d.client().await;
    assert!(follows(&c, set.master.port, Duration::from_secs(10)).await);
    wait_tracking(&c).await;
    // An app with a local cache on top of the near-cache.
    let local = Client::builder(&d.socket)
        .local_cache_bytes(1 << 20)
        .connect()
        .await
        .unwrap();
    let v1 = Value::from("one");
    c.cache_set("k", v1.clone(), None, &[]).await.unwrap();
    read_into_near(&c, "k", &v1).await;
    assert_eq!(local.cache_get("k").await.unwrap(), Some(v1.clone()));

    // A planned failover: the old master stays up and becomes a replica.
    let _: () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER_NAME)
        .query(&mut set.sentinels[0].conn())
        .unwrap();
    let new_port = set.replica.port;
    assert!(
        wait_until(Duration::from_secs(30), || set.agreed_master_port()
            == Some(new_port)),
        "the sentinels did not fail over"
    );
    assert!(
        follows(&c, new_port, Duration::from_secs(10)).await,
        "the daemon kept talking to the old master: {}",
        redis_url(&c).await
    );
    wait_tracking(&c).await;

    // Writes go to the new master.
    let mut cache_ok = false;
    for _ in 0..100 {
        if c.cache_set("w", Value::from(1), None, &[]).await.is_ok() {
            cache_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cache_ok, "cache.set never worked on the new master");
    let on_new: Option<Vec<u8>> = redis::cmd("GET")
        .arg(vkey("w"))
        .query(&mut set.replica.conn())
        .unwrap();
    assert!(on_new.is_some(), "the write did not reach the new master");

    // A writer straight to the new master is seen by the near-cache and by the
    // app's local cache: tracking moved with the master.
    let v2 = Value::from("two");
    assert_eq!(c.cache_get("k").await.unwrap(), Some(v1.clone()));
    read_into_near(&c, "k", &v1).await;
    assert_eq!(local.cache_get("k").await.unwrap(), Some(v1.clone()));
    let _: () = redis::cmd("SET")
        .arg(vkey("k"))
        .arg(blob(&v2, 60_000))
        .query(&mut set.replica.conn())
        .unwrap();
    let limit = Duration::from_millis(500);
    let t = time_until_changed(&c, "k", &v1, limit).await;
    assert!(
        t.is_some(),
        "the near-cache kept the old value past {limit:?}"
    );
    assert_eq!(c.cache_get("k").await.unwrap(), Some(v2.clone()));
    assert!(
        eventually(limit, || {
            let local = local.clone();
            let v2 = v2.clone();
            async move { local.cache_get("k").await.unwrap() == Some(v2) }
        })
        .await,
        "the app's local cache kept the old value past {limit:?}"
    );
    eprintln!("sentinel: a direct write to the new master reached the near-cache in {t:?}");
}
