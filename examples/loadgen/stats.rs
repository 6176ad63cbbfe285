//! Latency samples and throughput.

use std::time::Duration;

#[derive(Default)]
pub struct Samples {
    nanos: Vec<u64>,
    elapsed: Duration,
}

impl Samples {
    pub fn record(&mut self, d: Duration) {
        self.nanos.push(d.as_nanos() as u64);
    }

    /// Adds another run's samples (for several connections measured together).
    pub fn merge(&mut self, other: Samples) {
        self.nanos.extend(other.nanos);
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.elapsed = elapsed;
        self.nanos.sort_unstable();
    }

    pub fn ops_per_sec(&self) -> f64 {
        self.nanos.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// Percentile in microseconds.
    pub fn p(&self, pct: f64) -> f64 {
        if self.nanos.is_empty() {
            return f64::NAN;
        }
        let i = ((pct / 100.0) * (self.nanos.len() - 1) as f64).round() as usize;
        self.nanos[i] as f64 / 1000.0
    }
}

/// The header of the tables `Summary::print` fills.
pub fn print_header() {
    println!(
        "{:<40} {:>10} {:>9} {:>9}",
        "case", "ops/s", "p50 µs", "p99 µs"
    );
}

/// Medians over several runs of the same case.
pub struct Summary {
    pub ops_per_sec: f64,
    pub p50: f64,
    pub p99: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Summary {
    pub fn median_of(runs: &[Samples]) -> Summary {
        Summary {
            ops_per_sec: median(runs.iter().map(Samples::ops_per_sec).collect()),
            p50: median(runs.iter().map(|r| r.p(50.0)).collect()),
            p99: median(runs.iter().map(|r| r.p(99.0)).collect()),
        }
    }

    pub fn print(&self, label: &str) {
        println!(
            "{:<40} {:>10.0} {:>9.1} {:>9.1}",
            label, self.ops_per_sec, self.p50, self.p99
        );
    }

    /// `self` relative to `base`: throughput ratio and latency ratios.
    pub fn print_ratio(&self, label: &str, base: &Summary) {
        println!(
            "  ratio {label}: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
            self.ops_per_sec / base.ops_per_sec,
            self.p50 / base.p50,
            self.p99 / base.p99
        );
    }
}
