//! A load generator: closed loop (N clients back to back) or open loop (Poisson arrivals at a
//! fixed rate), against any [`Target`] — the in-process batcher today, the HTTP API later.
//!
//! Open-loop latency is measured from each request's *scheduled* arrival, so a saturated
//! system cannot hide its queueing by slowing the generator down (coordinated omission).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::stats::Summary;

const SPIN: Duration = Duration::from_micros(200);

/// How one call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused for load (queue full, HTTP 503 overloaded).
    Rejected,
    TimedOut,
    Failed,
}

/// Something to send requests to. `seq` numbers the calls, for targets that vary inputs.
pub trait Target: Sync {
    fn call(&self, seq: u64) -> Outcome;
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub duration_s: f64,
    pub sent: u64,
    pub ok: u64,
    pub rejected: u64,
    pub timed_out: u64,
    pub failed: u64,
    /// Successful requests per second.
    pub throughput_per_s: f64,
    /// Latency of successful requests.
    pub latency_us: Option<Summary>,
}

struct Tally {
    seq: AtomicU64,
    counts: [AtomicU64; 4],
    samples: Mutex<Vec<Duration>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            seq: AtomicU64::new(0),
            counts: Default::default(),
            samples: Mutex::new(Vec::new()),
        }
    }

    fn report(self, wall: Duration) -> LoadReport {
        let c = |o: Outcome| self.counts[o as usize].load(Ordering::Relaxed);
        let mut samples = self.samples.into_inner().unwrap_or_else(|p| p.into_inner());
        let ok = c(Outcome::Ok);
        LoadReport {
            duration_s: wall.as_secs_f64(),
            sent: self.seq.load(Ordering::Relaxed),
            ok,
            rejected: c(Outcome::Rejected),
            timed_out: c(Outcome::TimedOut),
            failed: c(Outcome::Failed),
            throughput_per_s: ok as f64 / wall.as_secs_f64(),
            latency_us: Summary::of(&mut samples),
        }
    }
}

/// `clients` threads, each sending its next request as soon as the previous one is answered.
pub fn closed_loop(target: &dyn Target, clients: usize, duration: Duration) -> LoadReport {
    let tally = Tally::new();
    let start = Instant::now();
    let end = start + duration;
    std::thread::scope(|s| {
        for _ in 0..clients.max(1) {
            s.spawn(|| {
                let mut local = Vec::with_capacity(4096);
                while Instant::now() < end {
                    let seq = tally.seq.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let outcome = target.call(seq);
                    tally.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
                    if outcome == Outcome::Ok {
                        local.push(t.elapsed());
                    }
                }
                tally
                    .samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(local);
            });
        }
    });
    let wall = start.elapsed();
    tally.report(wall)
}

/// Poisson arrivals at `rate` per second for `duration`, served by a pool of `concurrency`
/// threads (requests wait client-side when all are busy, and that wait counts).
pub fn open_loop(
    target: &dyn Target,
    rate: f64,
    duration: Duration,
    concurrency: usize,
    seed: u64,
) -> LoadReport {
    let mut rng = seed.max(1);
    let mut next_uniform = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        ((rng >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut schedule = Vec::new();
    let mut t = 0.0;
    loop {
        t += -next_uniform().ln() / rate.max(1e-9);
        if t >= duration.as_secs_f64() {
            break;
        }
        schedule.push(Duration::from_secs_f64(t));
    }
    let tally = Tally::new();
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| {
                let mut local = Vec::with_capacity(4096);
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&at) = schedule.get(k) else { break };
                    let due = start + at;
                    // Sleep overshoots by tens of microseconds; that lateness would be counted
                    // as the target's latency, so the last stretch is spun.
                    if let Some(wait) = due.checked_duration_since(Instant::now() + SPIN) {
                        std::thread::sleep(wait);
                    }
                    while Instant::now() < due {
                        std::thread::yield_now();
                    }
                    tally.seq.fetch_add(1, Ordering::Relaxed);
                    let outcome = target.call(k as u64);
                    tally.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
                    if outcome == Outcome::Ok {
                        local.push(due.elapsed());
                    }
                }
                tally
                    .samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(local);
            });
        }
    });
    let wall = start.elapsed().max(duration);
    tally.report(wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Every(u64);
    impl Target for Every {
        fn call(&self, seq: u64) -> Outcome {
            if seq.is_multiple_of(self.0) {
                Outcome::Rejected
            } else {
                Outcome::Ok
            }
        }
    }

    #[test]
    fn a_closed_loop_counts_every_outcome() {
        let r = closed_loop(&Every(4), 2, Duration::from_millis(20));
        assert!(r.sent > 0);
        assert_eq!(r.ok + r.rejected, r.sent);
        assert_eq!(r.rejected, r.sent.div_ceil(4));
        assert_eq!(r.latency_us.map(|s| s.count as u64), Some(r.ok));
    }

    #[test]
    fn an_open_loop_sends_about_rate_times_duration() {
        let r = open_loop(&Every(u64::MAX), 2000.0, Duration::from_millis(200), 4, 7);
        // Poisson with mean 400: far outside ±25% only with negligible probability.
        assert!((300..=500).contains(&r.sent), "sent {}", r.sent);
        assert_eq!(r.ok + r.rejected, r.sent);
    }
}
