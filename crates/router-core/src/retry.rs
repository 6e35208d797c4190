//! The retry budget: retries may add only a share of the traffic.
//!
//! When every deployment is failing, per-request retries multiply the load on them (a retry
//! storm). A budget caps retries at a share of recent requests, as Envoy's and Finagle's do:
//! every first attempt deposits `ratio` of a token, every retry withdraws one, and a floor lets
//! a quiet router retry at all. Lock-free: one atomic balance in thousandths of a token.

use std::sync::atomic::{AtomicI64, Ordering};

/// A shared retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
    cap: i64,
}

const UNIT: i64 = 1000;

impl RetryBudget {
    /// A budget allowing retries of `ratio` (0.2 = 20 %) of requests, holding at most
    /// `max_saved` unused retries, and starting with `initial` of them.
    pub fn new(ratio: f64, initial: u32, max_saved: u32) -> Self {
        let cap = i64::from(max_saved.max(initial)) * UNIT;
        Self {
            balance: AtomicI64::new(i64::from(initial) * UNIT),
            deposit: (ratio.clamp(0.0, 10.0) * UNIT as f64) as i64,
            cap,
        }
    }

    /// A first attempt: adds to the budget.
    pub fn deposit(&self) {
        let (deposit, cap) = (self.deposit, self.cap);
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + deposit).min(cap))
            });
    }

    /// A retry: takes one from the budget; `false` when there is none.
    pub fn try_withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= UNIT).then_some(b - UNIT)
            })
            .is_ok()
    }

    /// Retries available now.
    pub fn available(&self) -> f64 {
        self.balance.load(Ordering::Relaxed) as f64 / UNIT as f64
    }
}

impl Default for RetryBudget {
    /// 20 % of requests, starting with 10 retries, saving up to 100.
    fn default() -> Self {
        Self::new(0.2, 10, 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests() {
        let budget = RetryBudget::new(0.2, 0, 100);
        assert!(!budget.try_withdraw(), "nothing saved yet");
        for _ in 0..10 {
            budget.deposit();
        }
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw(), "two retries per ten requests");
    }

    #[test]
    fn savings_are_capped() {
        let budget = RetryBudget::new(1.0, 0, 3);
        for _ in 0..100 {
            budget.deposit();
        }
        assert!((budget.available() - 3.0).abs() < 1e-9);
    }
}
