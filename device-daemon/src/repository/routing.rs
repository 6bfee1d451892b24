//! Canary and shadow routing between a stable and a candidate version, with automatic
//! rollback. The policy is a plain state machine (no I/O, no clock): the HTTP layer asks where
//! a request goes and reports how the candidate did.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use crate::config::Routing;

/// Where one request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The version that answers.
    pub serve: u64,
    /// A version that gets a copy of the request, for comparison only.
    pub shadow: Option<u64>,
}

/// Counts the HTTP layer and `/metrics` report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouterStats {
    pub to_candidate: u64,
    pub to_stable: u64,
    pub rolled_back: bool,
    pub shadow_compared: u64,
    pub shadow_top1_agree: u64,
    pub shadow_max_abs_diff: f64,
    /// Why the candidate was rolled back.
    pub rollback_reason: Option<String>,
}

#[derive(Debug)]
pub struct Router {
    rule: Routing,
    /// The candidate's last `window` outcomes: (failed, latency).
    window: VecDeque<(bool, Duration)>,
    stats: RouterStats,
}

impl Router {
    pub fn new(rule: Routing) -> Router {
        Router {
            window: VecDeque::with_capacity(rule.window.max(1)),
            rule,
            stats: RouterStats::default(),
        }
    }

    pub fn rule(&self) -> &Routing {
        &self.rule
    }

    pub fn stats(&self) -> &RouterStats {
        &self.stats
    }

    /// A request with this key: sticky, since the same key always hashes the same way.
    pub fn route(&mut self, key: Option<&str>, fallback: u64) -> Route {
        if self.stats.rolled_back {
            self.stats.to_stable += 1;
            return Route {
                serve: self.rule.stable,
                shadow: None,
            };
        }
        if self.rule.shadow {
            self.stats.to_stable += 1;
            return Route {
                serve: self.rule.stable,
                shadow: Some(self.rule.candidate),
            };
        }
        // Without a key the request is placed by the caller's fallback number (a counter), so
        // unkeyed traffic still splits by the configured share.
        let bucket = match key {
            Some(k) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                k.hash(&mut h);
                h.finish() % 100
            }
            None => fallback % 100,
        };
        if bucket < self.rule.percent as u64 {
            self.stats.to_candidate += 1;
            Route {
                serve: self.rule.candidate,
                shadow: None,
            }
        } else {
            self.stats.to_stable += 1;
            Route {
                serve: self.rule.stable,
                shadow: None,
            }
        }
    }

    /// How a request the candidate served (or shadowed) went. Returns the rollback reason when
    /// this outcome tripped the rule.
    pub fn record_candidate(&mut self, failed: bool, latency: Duration) -> Option<String> {
        if self.stats.rolled_back {
            return None;
        }
        if self.window.len() == self.rule.window.max(1) {
            self.window.pop_front();
        }
        self.window.push_back((failed, latency));
        if self.window.len() < self.rule.window.max(1) {
            return None;
        }
        let n = self.window.len() as f64;
        let error_rate = self.window.iter().filter(|(f, _)| *f).count() as f64 / n;
        let mut latencies: Vec<Duration> = self.window.iter().map(|(_, l)| *l).collect();
        latencies.sort_unstable();
        let p99 = latencies[((0.99 * n).ceil() as usize).clamp(1, latencies.len()) - 1];
        let reason = match (self.rule.max_error_rate, self.rule.max_p99_ms) {
            (Some(max), _) if error_rate > max => Some(format!(
                "error rate {error_rate:.2} over the last {n} requests exceeds {max}"
            )),
            (_, Some(max)) if p99.as_secs_f64() * 1e3 > max => Some(format!(
                "p99 {:.1} ms over the last {n} requests exceeds {max} ms",
                p99.as_secs_f64() * 1e3
            )),
            _ => None,
        };
        if let Some(r) = &reason {
            self.stats.rolled_back = true;
            self.stats.rollback_reason = Some(r.clone());
        }
        reason
    }

    /// Compares a shadow answer with the served one (first output, top-1 over the last axis).
    pub fn record_shadow(&mut self, served: &[f32], shadow: &[f32], classes: usize) {
        self.stats.shadow_compared += 1;
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
        };
        let rows = served.len().checked_div(classes).unwrap_or(0);
        let agree = served.len() == shadow.len()
            && (0..rows).all(|r| {
                argmax(&served[r * classes..(r + 1) * classes])
                    == argmax(&shadow[r * classes..(r + 1) * classes])
            });
        if agree {
            self.stats.shadow_top1_agree += 1;
        }
        if served.len() == shadow.len() {
            let d = served
                .iter()
                .zip(shadow)
                .map(|(a, b)| (a - b).abs() as f64)
                .fold(0.0, f64::max);
            self.stats.shadow_max_abs_diff = self.stats.shadow_max_abs_diff.max(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> Routing {
        Routing {
            stable: 1,
            candidate: 2,
            percent: 30,
            shadow: false,
            key: "route_key".into(),
            max_error_rate: Some(0.2),
            max_p99_ms: Some(50.0),
            window: 10,
        }
    }

    #[test]
    fn a_key_always_lands_on_the_same_side_and_keys_split_by_percent() {
        let mut r = Router::new(rule());
        let mut to_candidate = 0;
        for k in 0..2000 {
            let key = format!("device-{k}");
            let first = r.route(Some(&key), 0);
            assert_eq!(r.route(Some(&key), 0), first, "sticky");
            to_candidate += (first.serve == 2) as usize;
        }
        assert!(
            (500..=700).contains(&to_candidate),
            "{to_candidate} of 2000 at 30%"
        );
    }

    #[test]
    fn too_many_candidate_errors_roll_back_to_stable() {
        let mut r = Router::new(rule());
        for _ in 0..7 {
            assert_eq!(r.record_candidate(false, Duration::from_millis(1)), None);
        }
        assert_eq!(r.record_candidate(true, Duration::from_millis(1)), None);
        assert_eq!(r.record_candidate(true, Duration::from_millis(1)), None);
        // 3 errors in a window of 10 is 0.3 > 0.2.
        let why = r.record_candidate(true, Duration::from_millis(1)).unwrap();
        assert!(why.contains("error rate 0.30"), "{why}");
        assert!(r.stats().rolled_back);
        for k in 0..100 {
            assert_eq!(r.route(Some(&k.to_string()), k).serve, 1);
        }
    }

    #[test]
    fn a_slow_candidate_rolls_back_on_p99() {
        let mut r = Router::new(rule());
        for i in 0..10 {
            let slow = if i == 9 { 80 } else { 5 };
            let out = r.record_candidate(false, Duration::from_millis(slow));
            assert_eq!(out.is_some(), i == 9);
        }
    }

    #[test]
    fn shadow_mode_serves_stable_and_mirrors_to_the_candidate() {
        let mut r = Router::new(Routing {
            shadow: true,
            ..rule()
        });
        assert_eq!(
            r.route(Some("x"), 0),
            Route {
                serve: 1,
                shadow: Some(2)
            }
        );
        r.record_shadow(&[0.1, 0.9, 0.2, 0.3], &[0.2, 0.8, 0.1, 0.4], 2);
        assert_eq!(
            (r.stats().shadow_compared, r.stats().shadow_top1_agree),
            (1, 1)
        );
        r.record_shadow(&[0.1, 0.9], &[0.9, 0.1], 2);
        assert_eq!(r.stats().shadow_top1_agree, 1);
        assert!((r.stats().shadow_max_abs_diff - 0.8).abs() < 1e-6);
    }
}
