//! Per-batcher statistics, recorded with atomics on the hot path (no lock, no allocation).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (µs) of the latency histogram buckets; the last bucket is unbounded.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    50, 100, 200, 300, 500, 750, 1_000, 2_000, 3_000, 5_000, 10_000, 20_000, 50_000, 100_000,
    500_000, 1_000_000,
];

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    Overloaded,
    TimedOut,
    ShuttingDown,
    InvalidInput,
    Execution,
}

impl FailureReason {
    pub const ALL: [FailureReason; 5] = [
        FailureReason::Overloaded,
        FailureReason::TimedOut,
        FailureReason::ShuttingDown,
        FailureReason::InvalidInput,
        FailureReason::Execution,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FailureReason::Overloaded => "overloaded",
            FailureReason::TimedOut => "timed_out",
            FailureReason::ShuttingDown => "shutting_down",
            FailureReason::InvalidInput => "invalid_input",
            FailureReason::Execution => "execution",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct AtomicHistogram {
    counts: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl AtomicHistogram {
    pub(crate) fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let ix = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.counts[ix].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn snapshot(&self) -> Histogram {
        Histogram {
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

/// A latency histogram: `counts[i]` samples were ≤ `LATENCY_BOUNDS_US[i]` µs (and above the
/// previous bound); the last count is above every bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[derive(Debug)]
pub(crate) struct Recorder {
    pub(crate) queue_depth: AtomicUsize,
    pub(crate) success: AtomicU64,
    failures: [AtomicU64; FailureReason::ALL.len()],
    /// `batch_sizes[n]` batches of n rows (index 0 unused).
    batch_sizes: Vec<AtomicU64>,
    pub(crate) queue_wait: AtomicHistogram,
    pub(crate) compute: AtomicHistogram,
    pub(crate) request: AtomicHistogram,
}

impl Recorder {
    pub(crate) fn new(max_batch: usize) -> Recorder {
        Recorder {
            queue_depth: AtomicUsize::new(0),
            success: AtomicU64::new(0),
            failures: Default::default(),
            batch_sizes: (0..=max_batch).map(|_| AtomicU64::new(0)).collect(),
            queue_wait: AtomicHistogram::default(),
            compute: AtomicHistogram::default(),
            request: AtomicHistogram::default(),
        }
    }

    pub(crate) fn fail(&self, reason: FailureReason) {
        let ix = FailureReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("listed");
        self.failures[ix].fetch_add(1, Relaxed);
    }

    pub(crate) fn batch(&self, rows: usize) {
        if let Some(c) = self.batch_sizes.get(rows) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> BatchStats {
        BatchStats {
            queue_depth: self.queue_depth.load(Relaxed),
            success: self.success.load(Relaxed),
            failures: FailureReason::ALL
                .iter()
                .zip(&self.failures)
                .map(|(r, c)| (*r, c.load(Relaxed)))
                .collect(),
            batch_sizes: self
                .batch_sizes
                .iter()
                .enumerate()
                .filter_map(|(n, c)| Some((n, c.load(Relaxed))).filter(|(_, c)| *c > 0))
                .collect(),
            queue_wait: self.queue_wait.snapshot(),
            compute: self.compute.snapshot(),
            request: self.request.snapshot(),
        }
    }
}

/// A snapshot of a batcher's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchStats {
    /// Requests waiting in the queue now.
    pub queue_depth: usize,
    /// Requests answered with outputs.
    pub success: u64,
    pub failures: Vec<(FailureReason, u64)>,
    /// (rows in the batch, number of batches executed with that many rows).
    pub batch_sizes: Vec<(usize, u64)>,
    /// Time from submission to the start of the batch's execution, per request.
    pub queue_wait: Histogram,
    /// Forward-pass time, per batch.
    pub compute: Histogram,
    /// Time from submission to answer, per request.
    pub request: Histogram,
}

impl BatchStats {
    /// Executed batches.
    pub fn batches(&self) -> u64 {
        self.batch_sizes.iter().map(|(_, c)| c).sum()
    }

    /// Rows executed per batch, on average.
    pub fn mean_batch_size(&self) -> f64 {
        let rows: u64 = self.batch_sizes.iter().map(|(n, c)| *n as u64 * c).sum();
        rows as f64 / self.batches().max(1) as f64
    }

    pub fn failures_of(&self, reason: FailureReason) -> u64 {
        self.failures
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| *c)
            .unwrap_or(0)
    }
}
