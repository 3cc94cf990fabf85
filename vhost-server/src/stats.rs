//! Per-queue statistics for the control socket's `query-stats`: counters
//! each queue's own worker thread bumps (relaxed atomics: one writer per
//! queue at a time, readers want a recent value, not a snapshot across
//! counters) and a latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

/// Power-of-two buckets: bucket 0 counts latencies under 1 us, bucket
/// `i` those in [2^(i-1), 2^i) us; the last one everything from 2^22 us
/// (4.2 s) on.
pub const BUCKETS: usize = 24;

/// A latency histogram.
pub struct Histogram([AtomicU64; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = ((u64::BITS - us.leading_zeros()) as usize).min(BUCKETS - 1);
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }

    /// The bucket bounds, counts, and an upper bound on the median and
    /// the 99th percentile (the top of the bucket holding it).
    pub fn to_json(&self) -> Value {
        let counts = self.counts();
        let bounds: Vec<Value> = (0..BUCKETS)
            .map(|i| match i {
                _ if i == BUCKETS - 1 => Value::Null,
                _ => json!(1u64 << i),
            })
            .collect();
        let total: u64 = counts.iter().sum();
        let upper = |q: f64| -> Value {
            if total == 0 {
                return Value::Null;
            }
            let want = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want {
                    return bounds[i].clone();
                }
            }
            Value::Null
        };
        json!({
            "bucket-upper-us": bounds,
            "counts": counts.to_vec(),
            "p50-upper-us": upper(0.5),
            "p99-upper-us": upper(0.99),
        })
    }
}

/// A counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_of_microseconds() {
        let h = Histogram::default();
        for us in [0, 1, 3, 4, 1000, 10_000_000] {
            h.record(Duration::from_micros(us));
        }
        let c = h.counts();
        // <1: 0; [1,2): 1; [2,4): 3; [4,8): 4; [512,1024): 1000; last.
        assert_eq!(
            (c[0], c[1], c[2], c[3], c[10], c[BUCKETS - 1]),
            (1, 1, 1, 1, 1, 1)
        );
        let j = h.to_json();
        assert_eq!(j["p50-upper-us"], 4);
        assert_eq!(j["p99-upper-us"], Value::Null);
        assert_eq!(j["bucket-upper-us"][3], 8);
        assert_eq!(Histogram::default().to_json()["p50-upper-us"], Value::Null);
    }
}
