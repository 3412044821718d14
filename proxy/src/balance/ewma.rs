//! Peak-EWMA latency estimate, after linkerd2-proxy's `linkerd/ewma` (read, not copied): a
//! sample above the decayed estimate replaces it at once (the "peak": a slowing endpoint is
//! noticed on its first slow response), a lower one is averaged in with a weight that grows
//! with the time since the last sample, and reads project the estimate decayed toward zero, so
//! an endpoint that stopped getting traffic because it was slow is tried again later.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub(crate) struct PeakEwma {
    /// Nanoseconds; `None` before the first sample.
    value: Option<f64>,
    stamp: Instant,
    decay: f64,
}

impl PeakEwma {
    pub(crate) fn new(decay: Duration, now: Instant) -> PeakEwma {
        PeakEwma {
            value: None,
            stamp: now,
            decay: decay.max(Duration::from_millis(1)).as_secs_f64(),
        }
    }

    /// The estimate projected to `now`, in nanoseconds; `None` before the first sample.
    pub(crate) fn get_at(&self, now: Instant) -> Option<f64> {
        let v = self.value?;
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        Some(v * (-elapsed / self.decay).exp())
    }

    /// Records a latency sample taken at `now`.
    pub(crate) fn add_peak(&mut self, sample: Duration, now: Instant) {
        let s = sample.as_secs_f64() * 1e9;
        match self.get_at(now) {
            Some(cur) if cur >= s => {
                let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
                let alpha = 1.0 - (-elapsed / self.decay).exp();
                // `cur` is already decayed; average the stored value toward the sample.
                let stored = self.value.unwrap_or(s);
                self.value = Some(stored * (1.0 - alpha) + s * alpha);
            }
            _ => self.value = Some(s),
        }
        if now > self.stamp {
            self.stamp = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_replaces_lower_samples_average_and_reads_decay() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::from_secs(10), t0);
        assert_eq!(e.get_at(t0), None);
        e.add_peak(Duration::from_millis(10), t0);
        assert_eq!(e.get_at(t0), Some(10e6));
        // A higher sample replaces the estimate at once.
        e.add_peak(Duration::from_millis(200), t0 + Duration::from_millis(1));
        let v = e.get_at(t0 + Duration::from_millis(1)).unwrap();
        assert!((v - 200e6).abs() < 1.0, "{v}");
        // A lower sample one second later moves it only part of the way (alpha ≈ 0.095).
        let t1 = t0 + Duration::from_secs(1);
        e.add_peak(Duration::from_millis(10), t1);
        let v = e.get_at(t1).unwrap();
        assert!(v > 150e6 && v < 190e6, "{v}");
        // Unread for a minute, it decays toward zero (so the endpoint gets tried again).
        let v = e.get_at(t1 + Duration::from_secs(60)).unwrap();
        assert!(v < 1e6, "{v}");
    }
}
