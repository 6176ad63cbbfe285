//! Redis Cluster mode (issue 14): six real `redis-server` nodes (three primaries,
//! three replicas), started once for this binary. Every cache and mail op, the
//! near-cache and a client's local cache, tag and prefix invalidation across
//! shards, and a failover of the shard that holds the mail under load.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::client::{Client, Mail};
use support::load::*;
use support::near::*;
use support::topology::*;
use support::*;

/// One test at a time: they share the cluster, and one fails a shard over.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn vkey_in(prefix: &str, key: &str) -> String {
    format!("{prefix}:c:s:v:{{{key}}}")
}

fn daemon(cluster: &Cluster, prefix: &str, extra: &str) -> Daemon {
    Daemon::start_with_config(
        DEFAULT_URL,
        &format!("{}\n{extra}", cluster.redis_toml(prefix)),
        &[],
    )
}

async fn connected(c: &Client) {
    assert!(
        eventually(Duration::from_secs(15), || {
            let c = c.clone();
            async move { c.call("health", vec![]).await.is_ok() }
        })
        .await,
        "the daemon never reached the cluster"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cache_op_works_and_invalidation_reaches_every_shard() {
    let _one = SERIAL.lock().await;
    let cluster = Cluster::shared();
    let d = daemon(cluster, "cops", "[mail]\nenabled = false\n");
    let c = d.client().await;
    connected(&c).await;

    // Keys spread over the shards.
    let keys: Vec<String> = (0..60).map(|i| format!("exam:{i}")).collect();
    for k in &keys {
        c.cache_set(k, Value::from(k.as_str()), None, &["exams"])
            .await
            .unwrap();
    }
    let shards: HashSet<u16> = keys
        .iter()
        .map(|k| cluster.primary_of(&vkey_in("cops", k)))
        .collect();
    assert_eq!(
        shards.len(),
        3,
        "60 keys should land on all three primaries"
    );
    assert_eq!(
        c.cache_get("exam:7").await.unwrap(),
        Some(Value::from("exam:7"))
    );
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let all = c.cache_mget(&refs).await.unwrap();
    assert!(
        all.iter()
            .zip(&keys)
            .all(|(v, k)| v == &Some(Value::from(k.as_str())))
    );

    // del of keys on several shards.
    let deleted = c
        .call(
            "cache.del",
            vec![(
                "keys",
                Value::Array(vec![
                    "exam:1".into(),
                    "exam:2".into(),
                    "exam:3".into(),
                    "nope".into(),
                ]),
            )],
        )
        .await
        .unwrap();
    assert_eq!(field(&deleted, "deleted").as_u64(), Some(3));
    assert_eq!(c.cache_get("exam:2").await.unwrap(), None);

    // fetch → lease → fill, and a second caller waits for the fill.
    let f = c
        .call(
            "cache.fetch",
            vec![("key", "report".into()), ("wait_ms", 0.into())],
        )
        .await
        .unwrap();
    let lease = field(&f, "lease").as_str().unwrap().to_owned();
    let f2 = c
        .call(
            "cache.fetch",
            vec![("key", "report".into()), ("wait_ms", 0.into())],
        )
        .await
        .unwrap();
    assert_eq!(field(&f2, "hit").as_bool(), Some(false));
    assert!(
        satchel::client::get(&f2, "lease").is_none(),
        "only one caller gets the lease: {f2}"
    );
    let filled = c
        .call(
            "cache.fill",
            vec![
                ("key", "report".into()),
                ("lease", lease.as_str().into()),
                ("value", "r1".into()),
                ("tags", Value::Array(vec!["reports".into()])),
            ],
        )
        .await
        .unwrap();
    assert_eq!(field(&filled, "stored").as_bool(), Some(true));
    assert_eq!(
        c.cache_get("report").await.unwrap(),
        Some(Value::from("r1"))
    );

    // A fill whose tag was invalidated after its lease is refused.
    let f = c
        .call(
            "cache.fetch",
            vec![("key", "late".into()), ("wait_ms", 0.into())],
        )
        .await
        .unwrap();
    let lease = field(&f, "lease").as_str().unwrap().to_owned();
    c.call(
        "cache.invalidate",
        vec![("tags", Value::Array(vec!["reports".into()]))],
    )
    .await
    .unwrap();
    let late = c
        .call(
            "cache.fill",
            vec![
                ("key", "late".into()),
                ("lease", lease.as_str().into()),
                ("value", "stale".into()),
                ("tags", Value::Array(vec!["reports".into()])),
            ],
        )
        .await
        .unwrap();
    assert_eq!(field(&late, "stored").as_bool(), Some(false));
    assert_eq!(
        c.cache_get("report").await.unwrap(),
        None,
        "tag invalidated"
    );

    // Tag invalidation removes the tagged keys on every shard.
    let inv = c
        .call(
            "cache.invalidate",
            vec![("tags", Value::Array(vec!["exams".into()]))],
        )
        .await
        .unwrap();
    assert_eq!(field(&inv, "deleted").as_u64(), Some(57));
    let mut direct = cluster.client();
    for k in &keys {
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(vkey_in("cops", k))
            .query(&mut direct)
            .unwrap();
        assert!(v.is_none(), "{k} survived the tag invalidation");
    }

    // Prefix invalidation scans every primary.
    for i in 0..60 {
        c.cache_set(&format!("user:{i}"), Value::from(i), None, &[])
            .await
            .unwrap();
    }
    c.cache_set("other", Value::from(1), None, &[])
        .await
        .unwrap();
    let inv = c
        .call("cache.invalidate", vec![("prefix", "user:".into())])
        .await
        .unwrap();
    assert_eq!(field(&inv, "deleted").as_u64(), Some(60));
    for i in 0..60 {
        assert_eq!(c.cache_get(&format!("user:{i}")).await.unwrap(), None);
    }
    assert_eq!(c.cache_get("other").await.unwrap(), Some(Value::from(1)));

    // A key that would split its value and lease over two slots is refused.
    let err = c.cache_get("}odd").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(satchel::protocol::ErrorCode::BadRequest),
        "{err}"
    );

    // health reads every primary's INFO: a replica each, AOF off warned about.
    let h = c.call("health", vec![]).await.unwrap();
    let dur = field(field(&h, "redis"), "durability");
    assert_eq!(field(dur, "replicas").as_u64(), Some(1), "{h}");
    assert!(h.to_string().contains("AOF is off"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_and_a_local_cache_stay_coherent_on_a_cluster() {
    let _one = SERIAL.lock().await;
    let cluster = Cluster::shared();
    let d = daemon(cluster, "near", "[mail]\nenabled = false\n");
    let c = d.client().await;
    connected(&c).await;
    wait_tracking(&c).await;
    let local = Client::builder(&d.socket)
        .local_cache_bytes(1 << 20)
        .connect()
        .await
        .unwrap();
    let mut direct = cluster.client();
    let mut seen = Vec::new();
    // A key on each shard, changed straight in Redis.
    for i in 0..12 {
        let key = format!("row:{i}");
        let v1 = Value::from(format!("v1-{i}"));
        c.cache_set(&key, v1.clone(), None, &[]).await.unwrap();
        read_into_near(&c, &key, &v1).await;
        assert_eq!(local.cache_get(&key).await.unwrap(), Some(v1.clone()));
        let v2 = Value::from(format!("v2-{i}"));
        let _: () = redis::cmd("SET")
            .arg(vkey_in("near", &key))
            .arg(blob(&v2, 60_000))
            .query(&mut direct)
            .unwrap();
        let limit = Duration::from_millis(500);
        let t = time_until_changed(&c, &key, &v1, limit).await;
        assert!(
            t.is_some(),
            "{key}: the near-cache kept the old value past {limit:?}"
        );
        assert_eq!(c.cache_get(&key).await.unwrap(), Some(v2.clone()));
        assert!(
            eventually(limit, || {
                let local = local.clone();
                let (key, v2) = (key.clone(), v2.clone());
                async move { local.cache_get(&key).await.unwrap() == Some(v2) }
            })
            .await,
            "{key}: the local cache kept the old value past {limit:?}"
        );
        seen.push((cluster.primary_of(&vkey_in("near", &key)), t.unwrap()));
    }
    let shards: HashSet<u16> = seen.iter().map(|(p, _)| *p).collect();
    assert_eq!(shards.len(), 3, "the keys covered every shard");
    let worst = seen.iter().map(|(_, t)| *t).max().unwrap();
    eprintln!("cluster: direct writes reached the near-cache in at most {worst:?}");
    assert!(near_counter(&c, "hits").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_of_the_mail_shard_under_load_loses_no_acknowledged_mail() {
    let _one = SERIAL.lock().await;
    let cluster = Cluster::shared();
    let sink = SmtpSink::start();
    let d = daemon(
        cluster,
        "fo",
        &format!(
            "[mail]\nsmtp_url = \"smtp://127.0.0.1:{}?tls=none\"\nfrom = \"app@example.org\"\n\
             retry_base_ms = 100\nretry_max_ms = 500\nclaim_idle_ms = 1000\nmax_attempts = 1000\n\
             smtp_connect_timeout_ms = 500\nsmtp_command_timeout_ms = 1000\n\
             min_replicas_ack = 1\nreplica_ack_timeout_ms = 500\n",
            sink.port
        ),
    );
    let c = d.client().await;
    connected(&c).await;
    let mail = |subject: String| Mail {
        to: vec!["a@example.com".into()],
        subject,
        text: Some("t".into()),
        ..Mail::default()
    };
    let q = c.mail_send(&mail("first".into())).await.unwrap();
    if q.replicas != Some(1) {
        let port = cluster.primary_of("{fo:m}:stream");
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut cluster.node(port))
            .unwrap();
        panic!("replicas {:?}; primary {port}: {info}", q.replicas);
    }
    // Every mail op, before the load: status, cancel of a scheduled mail, a hard
    // bounce to the dead letters, and its retry.
    let status_of = |id: String| {
        let c = c.clone();
        async move {
            let s = c.mail_status(&id).await.unwrap();
            field(&s, "status").as_str().unwrap_or_default().to_owned()
        }
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            let st = status_of(q.mail_id.clone());
            async move { st.await == "sent" }
        })
        .await,
        "the first mail was never sent"
    );
    let later = c
        .mail_send(&Mail {
            send_at_ms: Some(satchel::host::now_ms() + 600_000),
            ..mail("later".into())
        })
        .await
        .unwrap();
    assert_eq!(later.status, "scheduled");
    assert!(c.mail_cancel(&later.mail_id).await.unwrap());
    assert_eq!(status_of(later.mail_id.clone()).await, "cancelled");
    let bounce = c
        .mail_send(&Mail {
            to: vec!["reject550@example.com".into()],
            ..mail("bounce".into())
        })
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            let st = status_of(bounce.mail_id.clone());
            async move { st.await == "dead" }
        })
        .await,
        "a 550 did not make the mail dead"
    );
    let dead = c.mail_dead(Some(10)).await.unwrap();
    assert!(
        dead.iter()
            .any(|m| field(m, "mail_id").as_str() == Some(bounce.mail_id.as_str()))
    );
    c.mail_retry(&bounce.mail_id).await.unwrap();
    // The events of these mails, and the bounce's address on the suppression list
    // (it bounced with 550 5.1.1), all on the mail shard.
    let (events, _) = c
        .mail_events(Some("0"), Some(1000), None, None)
        .await
        .unwrap();
    let of = |id: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| field(e, "mail_id").as_str() == Some(id))
            .map(|e| field(e, "status").as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(of(&q.mail_id), ["queued", "sending", "sent"]);
    assert_eq!(of(&later.mail_id), ["scheduled", "cancelled"]);
    assert!(of(&bounce.mail_id).starts_with(&[
        "queued".into(),
        "sending".into(),
        "dead".into(),
        "queued".into()
    ]));
    let (listed, _) = c.mail_suppression_list(None, None).await.unwrap();
    assert!(
        listed
            .iter()
            .any(|e| field(e, "address").as_str() == Some("reject550@example.com")),
        "{listed:?}"
    );
    let skipped = c
        .mail_send(&Mail {
            to: vec!["reject550@example.com".into()],
            ..mail("skipped".into())
        })
        .await
        .unwrap();
    assert_eq!(skipped.status, "suppressed");
    assert!(
        c.mail_suppression_remove("reject550@example.com")
            .await
            .unwrap()
    );

    let load = MixedLoad::start(&d, 4).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let primary = cluster.primary_of("{fo:m}:stream");
    let replica = cluster.replica_of(primary);
    let started = Instant::now();
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut cluster.node(replica))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || cluster
            .primary_of("{fo:m}:stream")
            == replica
            && cluster.is_ok()),
        "the failover did not complete"
    );
    let switched = started.elapsed();
    // Mail is accepted after the switch.
    let after = Instant::now();
    assert!(
        load.accepts_after(after, Duration::from_secs(10)).await,
        "no mail accepted after the failover"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.stop().await;
    let ids = out.ids();
    let (missing, dups) = settle(&sink, &ids, Duration::from_secs(60));
    let s = c.stats().await.unwrap();
    let under = field(field(&s, "mail"), "under_replicated").as_u64();
    eprintln!(
        "cluster failover (CLUSTER FAILOVER of the mail shard {primary} → {replica}) in {switched:?}: \
         {} mails accepted, errors {:?}, longest stretch without an accepted send {:?}, \
         under-replicated {under:?}, missing {missing}, duplicates {dups}; cache {} ok / {} failed",
        ids.len(),
        out.errors,
        out.longest_gap(),
        out.cache_ok,
        out.cache_err,
    );
    assert_eq!(missing, 0, "acknowledged mail lost in the failover");
    out.assert_only_outage_errors();
    assert!(ids.len() > 10, "too little load to mean anything");
}
