//! The retry budget: retries may add at most `ratio` (default 20 %) to the requests sent.
//!
//! Every original request deposits `ratio` of a token, every retry withdraws a whole one, so
//! over any stretch retries ≤ ratio × requests (plus nothing: the budget starts empty, which
//! keeps the bound strict). The balance is capped so a long quiet success streak cannot bank
//! an unbounded retry storm.

use std::sync::atomic::{AtomicI64, Ordering};

/// Milli-tokens per retry.
const TOKEN: i64 = 1_000;

/// A shared retry budget (one per outbound).
#[derive(Debug)]
pub struct RetryBudget {
    per_request: i64,
    cap: i64,
    balance: AtomicI64,
}

impl Default for RetryBudget {
    /// 20 % extra, at most 100 retries banked.
    fn default() -> Self {
        RetryBudget::new(0.2, 100)
    }
}

impl RetryBudget {
    /// `ratio` (0…1) extra requests at most, with at most `max_banked` retries saved up.
    pub fn new(ratio: f64, max_banked: u32) -> RetryBudget {
        RetryBudget {
            per_request: (ratio.clamp(0.0, 1.0) * TOKEN as f64) as i64,
            cap: i64::from(max_banked) * TOKEN,
            balance: AtomicI64::new(0),
        }
    }

    /// Records an original request.
    pub fn deposit(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some((b + self.per_request).min(self.cap))
            });
    }

    /// Takes the budget for one retry; `false` when it is spent (do not retry).
    pub fn try_withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b >= TOKEN).then_some(b - TOKEN)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_twenty_percent_of_requests() {
        let b = RetryBudget::default();
        assert!(!b.try_withdraw(), "an empty budget allows no retry");
        let mut retries = 0;
        for _ in 0..1_000 {
            b.deposit();
            // A caller retrying every failure, all of them failing.
            if b.try_withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 200);
    }

    #[test]
    fn banked_retries_are_capped() {
        let b = RetryBudget::new(0.2, 3);
        for _ in 0..10_000 {
            b.deposit();
        }
        let n = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(n, 3);
    }
}
