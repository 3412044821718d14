//! The retry budget of `retry_idempotent`: over any sliding window of `ttl` (default 10 s),
//! retries may add at most `ratio` (default 20 %) to the requests sent, plus a small reserve
//! of `min_per_sec` × `ttl` (default 10 per second) so a quiet service can still retry the odd
//! failure. Finagle's `RetryBudget` and linkerd2's retry budget (ratio 0.2, 10 retries per
//! second, 10 s) are the model; the code is our own.
//!
//! The window is `SLOTS` one-`ttl/SLOTS` slots of deposits (original requests) and withdrawals
//! (retries); a slot older than the window is cleared when the clock passes it. One mutex,
//! taken once per request and once per retry, and only on an outbound with
//! `retry_idempotent = true`: an outbound without it has no budget at all.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Slots of the sliding window.
const SLOTS: usize = 10;

/// A shared retry budget (one per outbound per event loop).
#[derive(Debug)]
pub struct RetryBudget {
    /// Milli-retries one request earns (`ratio` × 1000).
    per_request: u64,
    /// Retries always allowed per window, × 1000.
    reserve: u64,
    slot_len: Duration,
    epoch: Instant,
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// The slot number (time since the epoch / slot length) of `slots[newest % SLOTS]`.
    newest: u64,
    /// Per slot: (requests, retries).
    slots: [(u64, u64); SLOTS],
}

impl Default for RetryBudget {
    /// 20 % extra, 10 retries per second at least, over 10 s.
    fn default() -> Self {
        RetryBudget::new(0.2, 10, Duration::from_secs(10))
    }
}

impl RetryBudget {
    /// At most `ratio` (0…1) extra requests plus `min_per_sec` retries per second, over any
    /// window of `ttl`.
    pub fn new(ratio: f64, min_per_sec: u32, ttl: Duration) -> RetryBudget {
        Self::new_at(ratio, min_per_sec, ttl, Instant::now())
    }

    /// [`RetryBudget::new`] with a given start (tests drive the clock).
    pub fn new_at(ratio: f64, min_per_sec: u32, ttl: Duration, now: Instant) -> RetryBudget {
        let ttl = ttl.max(Duration::from_millis(SLOTS as u64));
        RetryBudget {
            per_request: (ratio.clamp(0.0, 1.0) * 1000.0) as u64,
            reserve: u64::from(min_per_sec).saturating_mul(ttl.as_millis() as u64),
            slot_len: ttl / SLOTS as u32,
            epoch: now,
            window: Mutex::new(Window::default()),
        }
    }

    /// The current window, its stale slots cleared.
    fn at(&self, now: Instant) -> std::sync::MutexGuard<'_, Window> {
        let slot = (now.saturating_duration_since(self.epoch).as_nanos()
            / self.slot_len.as_nanos().max(1)) as u64;
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if slot > w.newest {
            for s in (w.newest + 1)..=slot.min(w.newest + SLOTS as u64) {
                w.slots[(s % SLOTS as u64) as usize] = (0, 0);
            }
            w.newest = slot;
        }
        w
    }

    /// Records an original request, now.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// [`RetryBudget::deposit`] at `now`.
    pub fn deposit_at(&self, now: Instant) {
        let mut w = self.at(now);
        let i = (w.newest % SLOTS as u64) as usize;
        w.slots[i].0 += 1;
    }

    /// Takes the budget for one retry, now; `false` when it is spent (do not retry).
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    /// [`RetryBudget::try_withdraw`] at `now`.
    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let mut w = self.at(now);
        let (requests, retries) = w
            .slots
            .iter()
            .fold((0u64, 0u64), |(a, b), (r, t)| (a + r, b + t));
        let earned = self.reserve + requests * self.per_request;
        if earned < (retries + 1) * 1000 {
            return false;
        }
        let i = (w.newest % SLOTS as u64) as usize;
        w.slots[i].1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn retries_stay_within_twenty_percent_of_requests() {
        let t0 = Instant::now();
        let b = RetryBudget::new_at(0.2, 0, TTL, t0);
        assert!(!b.try_withdraw_at(t0), "an empty budget allows no retry");
        let mut retries = 0;
        for _ in 0..1_000 {
            b.deposit_at(t0);
            // A caller retrying every failure, all of them failing.
            if b.try_withdraw_at(t0) {
                retries += 1;
            }
        }
        assert_eq!(retries, 200);
    }

    #[test]
    fn a_quiet_service_still_gets_the_minimum_per_second() {
        let t0 = Instant::now();
        let b = RetryBudget::new_at(0.2, 10, TTL, t0);
        // No request yet: the reserve (10/s × 10 s) and not one more.
        let n = (0..1_000).filter(|_| b.try_withdraw_at(t0)).count();
        assert_eq!(n, 100);
        // 50 requests earn 10 more.
        for _ in 0..50 {
            b.deposit_at(t0);
        }
        let n = (0..1_000).filter(|_| b.try_withdraw_at(t0)).count();
        assert_eq!(n, 10);
    }

    #[test]
    fn requests_and_retries_leave_the_window() {
        let t0 = Instant::now();
        let b = RetryBudget::new_at(0.2, 0, TTL, t0);
        for _ in 0..10_000 {
            b.deposit_at(t0);
        }
        // Earned 2,000; spend them all.
        let n = (0..5_000).filter(|_| b.try_withdraw_at(t0)).count();
        assert_eq!(n, 2_000);
        // Nothing is banked beyond the window: 11 s later the old requests count no more.
        let later = t0 + Duration::from_secs(11);
        assert!(!b.try_withdraw_at(later));
        for _ in 0..10 {
            b.deposit_at(later);
        }
        let n = (0..100).filter(|_| b.try_withdraw_at(later)).count();
        assert_eq!(n, 2, "20 % of the window's 10 requests");
        // Half a window on, the earlier deposits still count, and so do the retries.
        let mid = later + Duration::from_secs(5);
        assert!(!b.try_withdraw_at(mid));
    }
}
