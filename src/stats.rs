//! Counters, levels, and the one list of samples that both the `stats` op and the
//! Prometheus text are made from.
//!
//! A [`Counter`] only goes up. A [`Level`] goes up and down (connections open,
//! requests in flight, deliveries running) and is only ever moved by a guard, so a
//! future dropped half-way (a client that hangs up) cannot leak it. Each part of the
//! daemon reports what it counts as [`Sample`]s; the sample's [`Kind`] says whether
//! it is a counter or a gauge, so no second list of "which numbers are gauges" exists
//! anywhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::protocol::msgpack::Writer;

/// A number that only goes up (requests served, mails sent).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A level that goes up and down; moved only through [`LevelGuard`]s.
#[derive(Debug, Default)]
pub struct Level(AtomicU64);

impl Level {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Raises the level until the guard is dropped.
    pub fn enter(&self) -> LevelGuard<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        LevelGuard(self)
    }

    /// As [`Level::enter`], for a guard that moves into a spawned task.
    pub fn enter_owned(self: &Arc<Self>) -> OwnedLevelGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        OwnedLevelGuard(self.clone())
    }
}

#[must_use = "the level drops back as soon as the guard is dropped"]
pub struct LevelGuard<'a>(&'a Level);

impl Drop for LevelGuard<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[must_use = "the level drops back as soon as the guard is dropped"]
pub struct OwnedLevelGuard(Arc<Level>);

impl Drop for OwnedLevelGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The server's own counters (each service keeps its own).
#[derive(Debug)]
pub struct ServerStats {
    started: Instant,
    /// Connections open right now.
    pub connections: Arc<Level>,
    /// Connections accepted since start.
    pub connections_total: Counter,
    /// Connections refused (max_connections, allow_uids/allow_gids).
    pub connections_refused: Counter,
    /// Requests received (including ones answered with an error).
    pub requests: Counter,
    /// Requests answered with an error.
    pub errors: Counter,
    /// Requests being handled right now.
    pub inflight: Level,
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats {
            started: Instant::now(),
            connections: Arc::default(),
            connections_total: Counter::default(),
            connections_refused: Counter::default(),
            requests: Counter::default(),
            errors: Counter::default(),
            inflight: Level::default(),
        }
    }
}

impl ServerStats {
    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn samples(&self) -> Vec<Sample> {
        vec![
            Sample::gauge("uptime_ms", self.uptime_ms()),
            Sample::gauge("connections", self.connections.get()),
            Sample::counter("connections_total", self.connections_total.get()),
            Sample::counter("connections_refused", self.connections_refused.get()),
            Sample::counter("requests", self.requests.get()),
            Sample::counter("errors", self.errors.get()),
            Sample::gauge("inflight", self.inflight.get()),
        ]
    }
}

/// Whether a sample is a running total, a level, or text that is not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Text (a URL, a policy name): in `stats`, never in Prometheus.
    Info,
}

/// One value of a sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    /// Not known right now (e.g. queue counts while Redis is down): `nil` in
    /// `stats`, left out of Prometheus so a scrape never shows a made-up zero.
    Unknown,
}

impl From<u64> for Reading {
    fn from(v: u64) -> Reading {
        Reading::Uint(v)
    }
}
impl From<i64> for Reading {
    fn from(v: i64) -> Reading {
        Reading::Int(v)
    }
}
impl From<f64> for Reading {
    fn from(v: f64) -> Reading {
        Reading::Float(v)
    }
}
impl From<bool> for Reading {
    fn from(v: bool) -> Reading {
        Reading::Bool(v)
    }
}
impl From<&str> for Reading {
    fn from(v: &str) -> Reading {
        Reading::Text(v.to_owned())
    }
}
impl From<String> for Reading {
    fn from(v: String) -> Reading {
        Reading::Text(v)
    }
}
impl<T: Into<Reading>> From<Option<T>> for Reading {
    fn from(v: Option<T>) -> Reading {
        v.map_or(Reading::Unknown, Into::into)
    }
}

/// One named number of the daemon. `name` is a dotted path: `cache.hits` is the
/// key `hits` of the map `cache` in `stats`, and `satchel_cache_hits_total` in
/// Prometheus.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub kind: Kind,
    pub value: Reading,
}

impl Sample {
    pub fn counter(name: &'static str, value: impl Into<Reading>) -> Sample {
        Sample {
            name,
            kind: Kind::Counter,
            value: value.into(),
        }
    }
    pub fn gauge(name: &'static str, value: impl Into<Reading>) -> Sample {
        Sample {
            name,
            kind: Kind::Gauge,
            value: value.into(),
        }
    }
    pub fn info(name: &'static str, value: impl Into<Reading>) -> Sample {
        Sample {
            name,
            kind: Kind::Info,
            value: value.into(),
        }
    }
}

/// The samples as the `stats` result: nested maps by dotted name, in sample order.
pub fn encode_map(samples: &[Sample]) -> Vec<u8> {
    let mut w = Writer::with_capacity(64 * samples.len());
    write_level(&mut w, samples, 0);
    w.into_vec()
}

/// Writes the samples (all sharing the first `depth` name parts) as one map.
fn write_level(w: &mut Writer, samples: &[Sample], depth: usize) {
    let part = |s: &Sample| s.name.split('.').nth(depth).unwrap_or("");
    let is_leaf = |s: &Sample| s.name.split('.').count() == depth + 1;
    // Group consecutive samples by their name part at this depth.
    let mut groups: Vec<(&str, usize, usize)> = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        match groups.last_mut() {
            Some((name, _, end)) if *name == part(s) && !is_leaf(s) => *end = i + 1,
            _ => groups.push((part(s), i, i + 1)),
        }
    }
    w.map(groups.len() as u32);
    for (name, start, end) in groups {
        w.str(name);
        let first = &samples[start];
        if is_leaf(first) {
            match &first.value {
                Reading::Uint(v) => w.uint(*v),
                Reading::Int(v) => w.int(*v),
                Reading::Float(v) => w.float(*v),
                Reading::Bool(v) => w.bool(*v),
                Reading::Text(v) => w.str(v),
                Reading::Unknown => w.nil(),
            };
        } else {
            write_level(w, &samples[start..end], depth + 1);
        }
    }
}

/// The samples in the Prometheus text exposition format: `satchel_` + the dotted
/// name with `_` for `.`; counters end in `_total`; booleans are 0/1; text and
/// unknown values are left out.
pub fn prometheus_text(samples: &[Sample]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for s in samples {
        let value = match &s.value {
            Reading::Uint(v) => v.to_string(),
            Reading::Int(v) => v.to_string(),
            Reading::Float(v) => v.to_string(),
            Reading::Bool(v) => (*v as u8).to_string(),
            Reading::Text(_) | Reading::Unknown => continue,
        };
        let base: String = s
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        let (name, kind) = match s.kind {
            Kind::Counter if base.ends_with("_total") => (format!("satchel_{base}"), "counter"),
            Kind::Counter => (format!("satchel_{base}_total"), "counter"),
            Kind::Gauge => (format!("satchel_{base}"), "gauge"),
            Kind::Info => continue,
        };
        let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Sample> {
        vec![
            Sample::counter("requests", 42u64),
            Sample::counter("connections_total", 3u64),
            Sample::gauge("inflight", 1u64),
            Sample::gauge("redis.connected", true),
            Sample::info("redis.url", "redis://x"),
            Sample::gauge("mail.queued", None::<i64>),
            Sample::gauge("mail.delivery_rate", 2.5),
            Sample::counter("mail.local_sent", 7u64),
            Sample::counter("cache.near.hits", 5u64),
        ]
    }

    #[test]
    fn prometheus_text_types_samples_and_skips_what_is_not_a_number() {
        assert_eq!(
            prometheus_text(&samples()),
            "# TYPE satchel_requests_total counter\nsatchel_requests_total 42\n\
             # TYPE satchel_connections_total counter\nsatchel_connections_total 3\n\
             # TYPE satchel_inflight gauge\nsatchel_inflight 1\n\
             # TYPE satchel_redis_connected gauge\nsatchel_redis_connected 1\n\
             # TYPE satchel_mail_delivery_rate gauge\nsatchel_mail_delivery_rate 2.5\n\
             # TYPE satchel_mail_local_sent_total counter\nsatchel_mail_local_sent_total 7\n\
             # TYPE satchel_cache_near_hits_total counter\nsatchel_cache_near_hits_total 5\n"
        );
    }

    #[test]
    fn the_stats_map_nests_by_dotted_name_in_sample_order() {
        let v = rmpv::decode::read_value(&mut &encode_map(&samples())[..]).unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"requests": 42, "connections_total": 3, "inflight": 1, "redis": {"connected": true, "url": "redis://x"}, "mail": {"queued": nil, "delivery_rate": 2.5, "local_sent": 7}, "cache": {"near": {"hits": 5}}}"#
        );
    }

    #[test]
    fn a_level_guard_gives_back_its_count_when_dropped_anywhere() {
        let level = Arc::new(Level::default());
        let a = level.enter();
        let b = level.enter_owned();
        assert_eq!(level.get(), 2);
        drop(a);
        let fut = async move {
            let _held = b;
            std::future::pending::<()>().await
        };
        drop(fut); // a future dropped half-way (a client that hung up)
        assert_eq!(level.get(), 0);
    }
}
