//! Mixed load for failover tests: `mail.send` loops and a cache set/get loop through
//! one daemon, recording every accepted mail (and when) and every error code, and a
//! count of what the SMTP sink delivered per mail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmpv::Value;
use satchel::client::{Client, Mail};
use tokio::task::JoinHandle;

use super::{Daemon, SmtpSink, eventually};

/// What the load saw, once stopped.
pub struct Outcome {
    /// Accepted mail ids, with when `ok` arrived.
    pub accepted: Vec<(String, Instant)>,
    /// Error codes of refused sends, with counts.
    pub errors: HashMap<String, u64>,
    pub cache_ok: u64,
    pub cache_err: u64,
}

impl Outcome {
    /// The longest stretch without an accepted send.
    pub fn longest_gap(&self) -> Duration {
        let mut times: Vec<Instant> = self.accepted.iter().map(|(_, at)| *at).collect();
        times.sort();
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    pub fn ids(&self) -> Vec<String> {
        self.accepted.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Only what an outage may answer: `UNAVAILABLE` or `TIMEOUT`.
    pub fn assert_only_outage_errors(&self) {
        for code in self.errors.keys() {
            assert!(
                code == "UNAVAILABLE" || code == "TIMEOUT",
                "unexpected {code}"
            );
        }
    }
}

/// Running load; [`MixedLoad::stop`] ends it.
pub struct MixedLoad {
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<(String, Instant)>>>,
    errors: Arc<Mutex<HashMap<String, u64>>>,
    cache_ok: Arc<AtomicU64>,
    cache_err: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl MixedLoad {
    /// `senders` mail loops (each one send at a time) and one cache loop, each on a
    /// connection of its own.
    pub async fn start(d: &Daemon, senders: usize) -> MixedLoad {
        let load = MixedLoad {
            stop: Arc::default(),
            accepted: Arc::default(),
            errors: Arc::default(),
            cache_ok: Arc::default(),
            cache_err: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for w in 0..senders {
            let (c, stop, accepted, errors) = (
                d.client().await,
                load.stop.clone(),
                load.accepted.clone(),
                load.errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let m = Mail {
                        to: vec!["a@example.com".into()],
                        subject: format!("failover {w}-{n}"),
                        text: Some("t".into()),
                        ..Mail::default()
                    };
                    match tokio::time::timeout(Duration::from_secs(10), c.mail_send(&m)).await {
                        Ok(Ok(q)) => accepted.lock().unwrap().push((q.mail_id, Instant::now())),
                        Ok(Err(e)) => {
                            let code = e
                                .code()
                                .map(|c| c.as_str().to_owned())
                                .unwrap_or_else(|| e.to_string());
                            *errors.lock().unwrap().entry(code).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => panic!("mail.send hung during the fault"),
                    }
                }
            }));
        }
        let (c, stop, ok, err) = (
            d.client().await,
            load.stop.clone(),
            load.cache_ok.clone(),
            load.cache_err.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (o, e) = cache_traffic(c, stop).await.unwrap_or_default();
            ok.store(o, Ordering::Relaxed);
            err.store(e, Ordering::Relaxed);
        }));
        MixedLoad { tasks, ..load }
    }

    /// Waits (at most `limit`) until a send is accepted after `after`.
    pub async fn accepts_after(&self, after: Instant, limit: Duration) -> bool {
        eventually(limit, || {
            let accepted = self.accepted.clone();
            async move { accepted.lock().unwrap().iter().any(|(_, at)| *at > after) }
        })
        .await
    }

    pub async fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Outcome {
            accepted: self.accepted.lock().unwrap().clone(),
            errors: self.errors.lock().unwrap().clone(),
            cache_ok: self.cache_ok.load(Ordering::Relaxed),
            cache_err: self.cache_err.load(Ordering::Relaxed),
        }
    }
}

/// Cache set/get traffic on 50 keys until `stop`, counting answers and errors (a
/// short pause after an error, so an outage is not a busy loop).
pub fn cache_traffic(c: Client, stop: Arc<AtomicBool>) -> JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (mut ok, mut err) = (0, 0);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let key = format!("k{}", n % 50);
            let r = if n.is_multiple_of(3) {
                c.cache_set(&key, Value::from(n), None, &[])
                    .await
                    .map(|_| ())
            } else {
                c.cache_get(&key).await.map(|_| ())
            };
            if r.is_ok() {
                ok += 1;
            } else {
                err += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        (ok, err)
    })
}

/// Deliveries per mail id (from the Message-ID the daemon assigns).
pub fn delivered(sink: &SmtpSink) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for m in sink.received() {
        let data = m["data"].as_str().unwrap_or("");
        if let Some(id) = data
            .split("Message-ID: <")
            .nth(1)
            .or_else(|| data.split("Message-Id: <").nth(1))
            .and_then(|rest| rest.split('@').next())
        {
            *out.entry(id.to_owned()).or_default() += 1;
        }
    }
    out
}

/// Waits (at most `limit`) until every id reached the sink; (missing, duplicates).
pub fn settle(sink: &SmtpSink, ids: &[String], limit: Duration) -> (usize, usize) {
    let count = || {
        let got = delivered(sink);
        let missing = ids.iter().filter(|id| !got.contains_key(*id)).count();
        let dups = got.values().map(|n| n.saturating_sub(1)).sum::<usize>();
        (missing, dups)
    };
    super::wait_until(limit, || count().0 == 0);
    count()
}
