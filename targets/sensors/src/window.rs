//! A sliding window over 3-axis samples, in a fixed-capacity ring.

use heapless::Deque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowError {
    /// The window is empty or longer than the ring's capacity.
    Length { len: usize, capacity: usize },
    /// The hop is 0 or longer than the window.
    Hop { hop: usize, len: usize },
}

/// The last `len` samples (at most `CAP`); every `hop` samples, once full, a window is ready.
#[derive(Debug)]
pub struct Window<const CAP: usize> {
    samples: Deque<[f32; 3], CAP>,
    len: usize,
    hop: usize,
    since_last: usize,
}

impl<const CAP: usize> Window<CAP> {
    pub fn new(len: usize, hop: usize) -> Result<Self, WindowError> {
        if len == 0 || len > CAP {
            return Err(WindowError::Length { len, capacity: CAP });
        }
        if hop == 0 || hop > len {
            return Err(WindowError::Hop { hop, len });
        }
        Ok(Window {
            samples: Deque::new(),
            len,
            hop,
            since_last: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Adds a sample; true when a window is ready (full, and `hop` samples since the last).
    pub fn push(&mut self, sample: [f32; 3]) -> bool {
        if self.samples.len() == self.len {
            self.samples.pop_front();
        }
        // Cannot fail: one was removed above when the ring held `len` (≤ CAP) samples.
        let _ = self.samples.push_back(sample);
        self.since_last += 1;
        if self.samples.len() == self.len && self.since_last >= self.hop {
            self.since_last = 0;
            return true;
        }
        false
    }

    /// The window channel-major, `[x…, y…, z…]` (a `[3, len]` tensor), oldest sample first.
    /// `out` must hold `3 * len` values.
    pub fn write_channel_major(&self, out: &mut [f32]) {
        for (t, s) in self.samples.iter().enumerate() {
            for (axis, v) in s.iter().enumerate() {
                if let Some(o) = out.get_mut(axis * self.len + t) {
                    *o = *v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_come_every_hop_once_full_oldest_first() {
        let mut w = Window::<8>::new(4, 2).unwrap();
        let ready: [bool; 8] =
            core::array::from_fn(|i| w.push([i as f32, 10.0 + i as f32, -(i as f32)]));
        // Full after 4 samples; then every 2.
        assert_eq!(ready, [false, false, false, true, false, true, false, true]);
        let mut out = [0.0; 12];
        w.write_channel_major(&mut out);
        assert_eq!(
            out,
            [4.0, 5.0, 6.0, 7.0, 14.0, 15.0, 16.0, 17.0, -4.0, -5.0, -6.0, -7.0]
        );
    }

    #[test]
    fn impossible_sizes_are_refused() {
        assert_eq!(
            Window::<4>::new(5, 1).unwrap_err(),
            WindowError::Length {
                len: 5,
                capacity: 4
            }
        );
        assert!(Window::<4>::new(0, 1).is_err());
        assert_eq!(
            Window::<4>::new(4, 0).unwrap_err(),
            WindowError::Hop { hop: 0, len: 4 }
        );
        assert!(Window::<4>::new(2, 3).is_err());
    }
}
