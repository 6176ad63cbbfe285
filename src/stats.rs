//! Counters, levels, and the one list of samples that both the `stats` op and the
//! Prometheus text are made from.
//!
//! A [`Counter`] only goes up. A [`Level`] goes up and down (connections open,
//! requests in flight, deliveries running) and is only ever moved by a guard, so a
//! future dropped half-way (a client that hangs up) cannot leak it. Each part of the
//! daemon reports what it counts as [`Sample`]s; the sample's [`Kind`] says whether
//! it is a counter or a gauge, so no second list of "which numbers are gauges" exists
//! anywhere.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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

/// The samples in the Prometheus text exposition format (0.0.4, what node_exporter's
/// textfile collector reads), by prometheus-client: `satchel_` + the dotted name with
/// `_` for `.`; counters end in `_total`; booleans are 0/1; text and unknown values
/// are left out. With `timings`, the request-latency and Redis round-trip histograms
/// follow (the metrics endpoint).
pub fn prometheus_text(samples: Vec<Sample>, timings: Option<&Timings>) -> String {
    let mut registry = Registry::with_prefix("satchel");
    registry.register_collector(Box::new(SampleCollector(samples)));
    if let Some(t) = timings {
        registry.register(
            "request_duration_seconds",
            "Time from reading a request to its answer being ready, by op (unknown ops as other)",
            t.requests.clone(),
        );
        registry.register(
            "redis_rtt_seconds",
            "Round trip of the health probe's PING to Redis",
            t.redis_rtt.clone(),
        );
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// The samples of one scrape, as prometheus-client metrics.
#[derive(Debug)]
struct SampleCollector(Vec<Sample>);

impl Collector for SampleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for s in &self.0 {
            let number = match s.value {
                Reading::Uint(v) => v as f64,
                Reading::Int(v) => v as f64,
                Reading::Float(v) => v,
                Reading::Bool(v) => f64::from(u8::from(v)),
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
            // The sample's place in the `stats` answer.
            let help = format!("stats: {}", s.name);
            match s.kind {
                Kind::Info => {}
                Kind::Counter => {
                    // The encoder adds `_total`.
                    let name = base.strip_suffix("_total").unwrap_or(&base);
                    let m = encoder.encode_descriptor(name, &help, None, MetricType::Counter)?;
                    match s.value {
                        Reading::Float(_) => ConstCounter::new(number).encode(m)?,
                        _ => ConstCounter::new(number.max(0.0) as u64).encode(m)?,
                    }
                }
                Kind::Gauge => {
                    let m = encoder.encode_descriptor(&base, &help, None, MetricType::Gauge)?;
                    match s.value {
                        Reading::Float(_) => ConstGauge::new(number).encode(m)?,
                        Reading::Uint(v) => ConstGauge::new(v).encode(m)?,
                        _ => ConstGauge::new(number as i64).encode(m)?,
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// 10 µs to ~10 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-5, 2.0, 21))
}

/// Request latency per op and Redis round-trip time: histograms for the metrics
/// endpoint (`stats` has none). Each known op's histogram is made once, so recording
/// one is a lookup in a map that never changes and a short uncontended lock; an op a
/// client made up counts as `other`, so no client can grow the set of series.
#[derive(Debug)]
pub struct Timings {
    requests: Family<OpLabel, Histogram, fn() -> Histogram>,
    by_op: HashMap<&'static str, Histogram>,
    other: Histogram,
    pub redis_rtt: Histogram,
}

impl Timings {
    pub fn new(ops: &[&'static str], redis_rtt: Histogram) -> Timings {
        let requests: Family<OpLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let by_op = ops
            .iter()
            .map(|&op| (op, requests.get_or_create(&OpLabel { op }).clone()))
            .collect();
        let other = requests.get_or_create(&OpLabel { op: "other" }).clone();
        Timings {
            requests,
            by_op,
            other,
            redis_rtt,
        }
    }

    pub fn request(&self, op: &str, took: Duration) {
        self.by_op
            .get(op)
            .unwrap_or(&self.other)
            .observe(took.as_secs_f64());
    }
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
            prometheus_text(samples(), None),
            "# HELP satchel_requests_total stats: requests\n# TYPE satchel_requests_total counter\nsatchel_requests_total 42\n\
             # HELP satchel_connections_total stats: connections_total\n# TYPE satchel_connections_total counter\nsatchel_connections_total 3\n\
             # HELP satchel_inflight stats: inflight\n# TYPE satchel_inflight gauge\nsatchel_inflight 1\n\
             # HELP satchel_redis_connected stats: redis.connected\n# TYPE satchel_redis_connected gauge\nsatchel_redis_connected 1\n\
             # HELP satchel_mail_delivery_rate stats: mail.delivery_rate\n# TYPE satchel_mail_delivery_rate gauge\nsatchel_mail_delivery_rate 2.5\n\
             # HELP satchel_mail_local_sent_total stats: mail.local_sent\n# TYPE satchel_mail_local_sent_total counter\nsatchel_mail_local_sent_total 7\n\
             # HELP satchel_cache_near_hits_total stats: cache.near.hits\n# TYPE satchel_cache_near_hits_total counter\nsatchel_cache_near_hits_total 5\n"
        );
    }

    #[test]
    fn timings_put_made_up_ops_under_other() {
        let t = Timings::new(&["cache.get"], latency_histogram());
        t.request("cache.get", Duration::from_micros(30));
        t.request("no.such.op.1", Duration::from_micros(30));
        t.request("no.such.op.2", Duration::from_micros(30));
        let text = prometheus_text(Vec::new(), Some(&t));
        assert!(
            text.contains("satchel_request_duration_seconds_count{op=\"cache.get\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("satchel_request_duration_seconds_count{op=\"other\"} 2"),
            "{text}"
        );
        assert!(!text.contains("no.such.op"), "{text}");
        assert!(
            text.contains(
                "satchel_request_duration_seconds_bucket{op=\"cache.get\",le=\"+Inf\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE satchel_redis_rtt_seconds histogram"),
            "{text}"
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
