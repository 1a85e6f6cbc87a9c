//! What the simulated agents of one process count, and the snapshot that crosses processes.
//!
//! Counters are atomics shared by every agent of the process; times (when an activate order
//! arrived, when it was acknowledged) are unix microseconds, so snapshots of several simulator
//! processes on one machine merge into one latency distribution.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Now, as unix microseconds.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A list of samples (microseconds) behind a lock.
#[derive(Debug, Default)]
pub struct Samples(Mutex<Vec<u64>>);

impl Samples {
    /// Adds one sample.
    pub fn push(&self, v: u64) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(v);
    }

    /// Adds a duration, in microseconds.
    pub fn record(&self, d: Duration) {
        self.push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    fn take(&self, reset: bool) -> Vec<u64> {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if reset {
            std::mem::take(&mut *v)
        } else {
            v.clone()
        }
    }
}

/// Counters of one simulator process.
#[derive(Debug, Default)]
pub struct Stats {
    /// Agents attached right now.
    pub connected: AtomicU64,
    /// Failed connection attempts.
    pub connect_errors: AtomicU64,
    /// Streams lost and re-established.
    pub reconnects: AtomicU64,
    /// Orders received.
    pub orders: AtomicU64,
    /// Orders whose sequence was applied before (re-sends).
    pub duplicates: AtomicU64,
    /// Orders below the last applied sequence.
    pub stale: AtomicU64,
    /// Orders that failed validation.
    pub invalid_orders: AtomicU64,
    /// Hold messages received.
    pub holds: AtomicU64,
    /// Results sent.
    pub results: AtomicU64,
    /// Health reports sent.
    pub health_reports: AtomicU64,
    /// Heartbeats sent.
    pub heartbeats: AtomicU64,
    /// Simulated start failures.
    pub failures: AtomicU64,
    /// Rollbacks (ordered or by the dead-man switch).
    pub rollbacks: AtomicU64,
    /// Dead-man switches fired for lack of a confirm.
    pub confirm_timeouts: AtomicU64,
    /// Artifact bytes downloaded.
    pub fetched_bytes: AtomicU64,
    /// Health bursts finished.
    pub bursts_done: AtomicU64,
    /// Time from dialling to the welcome, per attach.
    pub attach_us: Samples,
    /// When each new activate order arrived (unix µs).
    pub activate_received_us: Samples,
    /// When each `ACTIVATED` result was sent (unix µs).
    pub activate_acked_us: Samples,
}

/// A copy of [`Stats`] that can be merged and sent between processes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub connected: u64,
    pub connect_errors: u64,
    pub reconnects: u64,
    pub orders: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub invalid_orders: u64,
    pub holds: u64,
    pub results: u64,
    pub health_reports: u64,
    pub heartbeats: u64,
    pub failures: u64,
    pub rollbacks: u64,
    pub confirm_timeouts: u64,
    pub fetched_bytes: u64,
    pub bursts_done: u64,
    pub attach_us: Vec<u64>,
    pub activate_received_us: Vec<u64>,
    pub activate_acked_us: Vec<u64>,
}

impl Stats {
    /// The current figures; with `reset`, the sample lists start empty again (counters are
    /// cumulative: compare two snapshots).
    pub fn snapshot(&self, reset: bool) -> Snapshot {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            connected: c(&self.connected),
            connect_errors: c(&self.connect_errors),
            reconnects: c(&self.reconnects),
            orders: c(&self.orders),
            duplicates: c(&self.duplicates),
            stale: c(&self.stale),
            invalid_orders: c(&self.invalid_orders),
            holds: c(&self.holds),
            results: c(&self.results),
            health_reports: c(&self.health_reports),
            heartbeats: c(&self.heartbeats),
            failures: c(&self.failures),
            rollbacks: c(&self.rollbacks),
            confirm_timeouts: c(&self.confirm_timeouts),
            fetched_bytes: c(&self.fetched_bytes),
            bursts_done: c(&self.bursts_done),
            attach_us: self.attach_us.take(reset),
            activate_received_us: self.activate_received_us.take(reset),
            activate_acked_us: self.activate_acked_us.take(reset),
        }
    }
}

impl Snapshot {
    /// Adds another process's figures to these.
    pub fn merge(&mut self, o: Snapshot) {
        self.connected += o.connected;
        self.connect_errors += o.connect_errors;
        self.reconnects += o.reconnects;
        self.orders += o.orders;
        self.duplicates += o.duplicates;
        self.stale += o.stale;
        self.invalid_orders += o.invalid_orders;
        self.holds += o.holds;
        self.results += o.results;
        self.health_reports += o.health_reports;
        self.heartbeats += o.heartbeats;
        self.failures += o.failures;
        self.rollbacks += o.rollbacks;
        self.confirm_timeouts += o.confirm_timeouts;
        self.fetched_bytes += o.fetched_bytes;
        self.bursts_done += o.bursts_done;
        self.attach_us.extend(o.attach_us);
        self.activate_received_us.extend(o.activate_received_us);
        self.activate_acked_us.extend(o.activate_acked_us);
    }
}

/// p50, p99 and max of `values` (nearest rank); `None` when empty.
pub fn percentiles(values: &[u64]) -> Option<(u64, u64, u64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = |p: f64| {
        let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[i.clamp(1, v.len()) - 1]
    };
    Some((rank(50.0), rank(99.0), v[v.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentiles(&v), Some((50, 99, 100)));
        assert_eq!(percentiles(&[7]), Some((7, 7, 7)));
        assert_eq!(percentiles(&[]), None);
    }
}
