//! The batching window: which queued requests form the next batch, and when.
//!
//! A plain state machine with no I/O, no threads and no clock of its own: callers pass `now`.
//! The driver owns timers and workers; everything about *policy* lives here and is tested with
//! a fake clock.
//!
//! Semantics (Triton's dynamic batcher):
//! - requests with the same `key` (equal non-batch shape) may share a batch; others never do;
//! - higher priority levels drain first, FIFO within a level;
//! - a batch goes out at once when it reaches `max_batch` rows or the largest reachable
//!   preferred size, or when the oldest queued request has waited `max_delay`;
//! - a request whose deadline passes while queued is expired, never executed;
//! - a full queue rejects at once and queues nothing.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Policy knobs of one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowConfig {
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Sorted ascending, each in `1..=max_batch`.
    pub preferred: Vec<usize>,
    pub max_queue: usize,
    pub priority_levels: usize,
}

/// One queued request, as the window sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Caller's handle for the request (a slot number in the driver).
    pub id: u32,
    /// Rows (batch entries) the request carries.
    pub rows: usize,
    /// Requests batch together only when their keys are equal.
    pub key: u64,
    /// 0 is the highest priority.
    pub priority: usize,
    pub arrived: Instant,
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The queue holds `max_queue` requests already.
    QueueFull,
    /// The request alone is larger than a batch.
    TooManyRows,
    /// The priority level does not exist.
    NoSuchPriority,
}

#[derive(Debug)]
pub struct Window {
    config: WindowConfig,
    levels: Vec<VecDeque<Entry>>,
    len: usize,
}

impl Window {
    /// Queues are allocated here, at full capacity, and never grow afterwards.
    pub fn new(config: WindowConfig) -> Window {
        let levels = (0..config.priority_levels.max(1))
            .map(|_| VecDeque::with_capacity(config.max_queue))
            .collect();
        Window {
            config,
            levels,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn offer(&mut self, entry: Entry) -> Result<(), Rejection> {
        if entry.rows > self.config.max_batch || entry.rows == 0 {
            return Err(Rejection::TooManyRows);
        }
        if self.len >= self.config.max_queue {
            return Err(Rejection::QueueFull);
        }
        let level = self
            .levels
            .get_mut(entry.priority)
            .ok_or(Rejection::NoSuchPriority)?;
        level.push_back(entry);
        self.len += 1;
        Ok(())
    }

    /// When the driver must look again even if nothing arrives: the oldest request's window
    /// closing, or the earliest deadline.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let oldest = self.oldest().map(|a| a + self.config.max_delay);
        let deadline = self.entries().filter_map(|e| e.deadline).min();
        match (oldest, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Removes every request whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant, mut expired: impl FnMut(Entry)) {
        for level in &mut self.levels {
            let before = level.len();
            level.retain(|e| {
                let dead = e.deadline.is_some_and(|d| d <= now);
                if dead {
                    expired(*e);
                }
                !dead
            });
            self.len -= before - level.len();
        }
    }

    /// Moves the next batch into `out` if one is due at `now` (or at once with `flush`, used
    /// on shutdown). Returns the batch's rows; 0 when nothing is due.
    pub fn take_batch(&mut self, now: Instant, flush: bool, out: &mut Vec<Entry>) -> usize {
        out.clear();
        let Some(head) = self.entries().next().copied() else {
            return 0;
        };
        // Rows reachable for the head's key, in priority and arrival order.
        let mut reachable = 0;
        for e in self.entries().filter(|e| e.key == head.key) {
            if reachable + e.rows > self.config.max_batch {
                break;
            }
            reachable += e.rows;
        }
        let waited_out = self
            .oldest()
            .is_some_and(|a| now >= a + self.config.max_delay);
        let target = if reachable == self.config.max_batch || waited_out || flush {
            reachable
        } else {
            match self
                .config
                .preferred
                .iter()
                .rev()
                .find(|&&p| p <= reachable)
            {
                Some(&p) => p,
                None => return 0,
            }
        };
        let mut rows = 0;
        for level in &mut self.levels {
            let mut i = 0;
            while i < level.len() && rows < target {
                let e = level[i];
                if e.key == head.key && rows + e.rows <= target {
                    rows += e.rows;
                    out.push(e);
                    level.remove(i);
                } else if e.key == head.key {
                    // FIFO: a request that does not fit is not overtaken by later ones.
                    break;
                } else {
                    i += 1;
                }
            }
        }
        self.len -= out.len();
        rows
    }

    /// Empties the queue (shutdown), handing every request to `f`.
    pub fn drain(&mut self, mut f: impl FnMut(Entry)) {
        for level in &mut self.levels {
            for e in level.drain(..) {
                f(e);
            }
        }
        self.len = 0;
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.levels.iter().flat_map(|l| l.iter())
    }

    fn oldest(&self) -> Option<Instant> {
        self.entries().map(|e| e.arrived).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> WindowConfig {
        WindowConfig {
            max_batch: 8,
            max_delay: 2 * MS,
            preferred: vec![],
            max_queue: 16,
            priority_levels: 2,
        }
    }

    struct Clock(Instant);
    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + MS * ms as u32
        }
    }

    fn entry(id: u32, rows: usize, at: Instant) -> Entry {
        Entry {
            id,
            rows,
            key: 0,
            priority: 1,
            arrived: at,
            deadline: None,
        }
    }

    fn take(w: &mut Window, now: Instant) -> Vec<u32> {
        let mut out = vec![];
        w.take_batch(now, false, &mut out);
        out.iter().map(|e| e.id).collect()
    }

    #[test]
    fn the_window_counts_from_the_oldest_request() {
        let c = Clock(Instant::now());
        let mut w = Window::new(config());
        w.offer(entry(1, 1, c.at(0))).unwrap();
        w.offer(entry(2, 1, c.at(1))).unwrap();
        assert_eq!(w.next_wakeup(), Some(c.at(2)));
        assert!(take(&mut w, c.at(1)).is_empty());
        assert_eq!(take(&mut w, c.at(2)), [1, 2]);
        assert!(w.is_empty());
        assert_eq!(w.next_wakeup(), None);
    }

    #[test]
    fn a_full_batch_goes_out_at_once() {
        let c = Clock(Instant::now());
        let mut w = Window::new(config());
        for i in 0..10 {
            w.offer(entry(i, 1, c.at(0))).unwrap();
        }
        assert_eq!(take(&mut w, c.at(0)), [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(w.len(), 2);
        assert!(take(&mut w, c.at(1)).is_empty());
        assert_eq!(take(&mut w, c.at(2)), [8, 9]);
    }

    #[test]
    fn rows_count_not_requests() {
        let c = Clock(Instant::now());
        let mut w = Window::new(config());
        w.offer(entry(1, 5, c.at(0))).unwrap();
        w.offer(entry(2, 5, c.at(0))).unwrap();
        w.offer(entry(3, 3, c.at(0))).unwrap();
        // 5 + 5 > 8: the second request waits; nothing full yet, so the window decides.
        assert!(take(&mut w, c.at(0)).is_empty());
        assert_eq!(take(&mut w, c.at(2)), [1]);
        // Now 5 + 3 = 8 is a full batch.
        assert_eq!(take(&mut w, c.at(2)), [2, 3]);
        assert_eq!(w.offer(entry(9, 9, c.at(2))), Err(Rejection::TooManyRows));
    }

    #[test]
    fn the_largest_reachable_preferred_size_goes_out_at_once() {
        let c = Clock(Instant::now());
        let mut w = Window::new(WindowConfig {
            preferred: vec![2, 4],
            ..config()
        });
        w.offer(entry(1, 1, c.at(0))).unwrap();
        assert!(take(&mut w, c.at(0)).is_empty());
        for i in 2..=6 {
            w.offer(entry(i, 1, c.at(0))).unwrap();
        }
        assert_eq!(take(&mut w, c.at(0)), [1, 2, 3, 4]);
        assert_eq!(take(&mut w, c.at(0)), [5, 6]);
        assert!(w.is_empty());
    }

    #[test]
    fn expired_requests_are_removed_without_executing() {
        let c = Clock(Instant::now());
        let mut w = Window::new(WindowConfig {
            max_delay: 10 * MS,
            ..config()
        });
        w.offer(Entry {
            deadline: Some(c.at(1)),
            ..entry(1, 1, c.at(0))
        })
        .unwrap();
        w.offer(entry(2, 1, c.at(0))).unwrap();
        assert_eq!(w.next_wakeup(), Some(c.at(1)));
        let mut expired = vec![];
        w.expire(c.at(0), |e| expired.push(e.id));
        assert!(expired.is_empty());
        w.expire(c.at(1), |e| expired.push(e.id));
        assert_eq!(expired, [1]);
        assert_eq!(w.len(), 1);
        assert_eq!(take(&mut w, c.at(10)), [2]);
    }

    #[test]
    fn a_full_queue_rejects_and_queues_nothing() {
        let c = Clock(Instant::now());
        let mut w = Window::new(WindowConfig {
            max_queue: 2,
            ..config()
        });
        w.offer(entry(1, 1, c.at(0))).unwrap();
        w.offer(entry(2, 1, c.at(0))).unwrap();
        assert_eq!(w.offer(entry(3, 1, c.at(0))), Err(Rejection::QueueFull));
        assert_eq!(w.len(), 2);
        assert_eq!(take(&mut w, c.at(2)), [1, 2]);
    }

    #[test]
    fn higher_priority_drains_first_fifo_within_a_level() {
        let c = Clock(Instant::now());
        let mut w = Window::new(WindowConfig {
            max_batch: 3,
            ..config()
        });
        w.offer(entry(1, 1, c.at(0))).unwrap();
        w.offer(entry(2, 1, c.at(0))).unwrap();
        w.offer(Entry {
            priority: 0,
            ..entry(3, 1, c.at(1))
        })
        .unwrap();
        w.offer(Entry {
            priority: 0,
            ..entry(4, 1, c.at(1))
        })
        .unwrap();
        assert_eq!(take(&mut w, c.at(1)), [3, 4, 1]);
        assert_eq!(take(&mut w, c.at(2)), [2]);
        assert_eq!(
            w.offer(Entry {
                priority: 5,
                ..entry(9, 1, c.at(2))
            }),
            Err(Rejection::NoSuchPriority)
        );
    }

    #[test]
    fn only_equal_shapes_share_a_batch() {
        let c = Clock(Instant::now());
        let mut w = Window::new(config());
        w.offer(entry(1, 1, c.at(0))).unwrap();
        w.offer(Entry {
            key: 7,
            ..entry(2, 1, c.at(0))
        })
        .unwrap();
        w.offer(entry(3, 1, c.at(0))).unwrap();
        assert_eq!(take(&mut w, c.at(2)), [1, 3]);
        assert_eq!(take(&mut w, c.at(2)), [2]);
    }

    #[test]
    fn shutdown_flushes_then_drains() {
        let c = Clock(Instant::now());
        let mut w = Window::new(config());
        w.offer(entry(1, 1, c.at(0))).unwrap();
        let mut out = vec![];
        assert_eq!(w.take_batch(c.at(0), true, &mut out), 1);
        w.offer(entry(2, 1, c.at(0))).unwrap();
        w.offer(Entry {
            key: 3,
            ..entry(3, 1, c.at(0))
        })
        .unwrap();
        let mut drained = vec![];
        w.drain(|e| drained.push(e.id));
        assert_eq!(drained, [2, 3]);
        assert!(w.is_empty());
    }
}
