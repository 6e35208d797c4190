//! The retry budget: retries may add only a share of the traffic.
//!
//! When every deployment is failing, per-request retries multiply the load on them (a retry
//! storm). A budget caps retries at a share of recent requests, as Envoy's and Finagle's do:
//! every first attempt deposits `ratio` of a token, every retry withdraws one, and a floor lets
//! a quiet router retry at all.
//!
//! What it may save is what [`RetryBudget::WINDOW`] of traffic deposits (at least
//! `max_saved`): the budget is a share of the last ten seconds' requests, whatever the rate.
//! A fixed cap would make it stricter the busier the router is: at 800 requests a second, 100
//! saved retries are five-eighths of a second of deposits, so a deployment failing half its
//! answers for two seconds would exhaust it, though its failures were well within the share
//! of those ten seconds.
//!
//! Lock-free: one atomic balance in thousandths of a token, and the window's requests in one
//! atomic counter per second.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One counter per second of [`RetryBudget::WINDOW`].
const SECONDS: usize = RetryBudget::WINDOW.as_secs() as usize;

/// A shared retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
    /// The least it may save, in thousandths.
    floor: i64,
    origin: Instant,
    /// Requests per second of the window: `(second << 32) | count`, one slot per second
    /// modulo [`SECONDS`]; a slot whose second is older than the window counts nothing.
    seconds: [AtomicU64; SECONDS],
}

const UNIT: i64 = 1000;

impl RetryBudget {
    /// How far back the requests that bound the savings go.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// A budget allowing retries of `ratio` (0.2 = 20 %) of requests, holding at most
    /// `max_saved` unused retries or what the last [`WINDOW`](Self::WINDOW) of requests
    /// deposited, whichever is more, and starting with `initial` of them; its clock starts at
    /// `origin`.
    pub fn new(ratio: f64, initial: u32, max_saved: u32, origin: Instant) -> Self {
        Self {
            balance: AtomicI64::new(i64::from(initial) * UNIT),
            deposit: (ratio.clamp(0.0, 10.0) * UNIT as f64) as i64,
            floor: i64::from(max_saved.max(initial)) * UNIT,
            origin,
            seconds: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() & u64::from(u32::MAX)
    }

    /// A first attempt at `now`: adds to the budget.
    pub fn deposit(&self, now: Instant) {
        let second = self.second(now);
        let slot = &self.seconds[(second % SECONDS as u64) as usize];
        // Relaxed: a count; a lost race only misplaces one request by a second.
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
            Some(if packed >> 32 == second {
                packed + 1
            } else {
                (second << 32) | 1
            })
        });
        let cap = self.cap_at(second);
        let deposit = self.deposit;
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                // What a busier window saved is let go as the window forgets that traffic.
                Some((b + deposit).min(cap))
            });
    }

    /// The most it may save in the second `second`, in thousandths.
    fn cap_at(&self, second: u64) -> i64 {
        let recent: u64 = self
            .seconds
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|packed| second.saturating_sub(packed >> 32) < SECONDS as u64)
            .map(|packed| packed & u64::from(u32::MAX))
            .sum();
        let window = i64::try_from(recent)
            .unwrap_or(i64::MAX)
            .saturating_mul(self.deposit);
        window.max(self.floor)
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

    /// The most it may save at `now`: `max_saved`, or the deposits of the last
    /// [`WINDOW`](Self::WINDOW).
    pub fn cap(&self, now: Instant) -> f64 {
        self.cap_at(self.second(now)) as f64 / UNIT as f64
    }
}

impl Default for RetryBudget {
    /// 20 % of requests, starting with 10 retries, saving up to 100 (or the window's share).
    fn default() -> Self {
        Self::new(0.2, 10, 100, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(0.2, 0, 100, t0);
        assert!(!budget.try_withdraw(), "nothing saved yet");
        for _ in 0..10 {
            budget.deposit(t0);
        }
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw(), "two retries per ten requests");
    }

    #[test]
    fn savings_are_capped_when_quiet() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(1.0, 0, 3, t0);
        // One request a second for 100 s: the window holds ten of them, but at ratio 1 a
        // ten-second window's share is 10 > 3; at a lower ratio the floor binds.
        for s in 0..100 {
            budget.deposit(t0 + Duration::from_secs(s));
        }
        assert!(
            (budget.available() - 10.0).abs() < 1e-9,
            "{}",
            budget.available()
        );
        let quiet = RetryBudget::new(0.2, 0, 3, t0);
        for s in 0..100 {
            quiet.deposit(t0 + Duration::from_secs(s));
        }
        assert!(
            (quiet.available() - 3.0).abs() < 1e-9,
            "{}",
            quiet.available()
        );
    }

    #[test]
    fn a_busy_router_saves_a_windows_share() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(0.2, 10, 100, t0);
        // 800 requests a second for 10 s: a fixed cap would hold 100; the window holds 20 %
        // of 8 000.
        for ms in 0..8_000_u64 {
            budget.deposit(t0 + Duration::from_micros(ms * 1_250));
        }
        let last = t0 + Duration::from_micros(7_999 * 1_250);
        assert!(
            (budget.cap(last) - 1_600.0).abs() < 1.0,
            "{}",
            budget.cap(last)
        );
        assert!(budget.available() > 1_500.0, "{}", budget.available());
        // Half the traffic failing for two seconds (one deployment of two, say) is 800
        // retries: a fixed cap would refuse 380 of them; the window's share refuses none.
        let mut refused = 0;
        for ms in 0..1_600_u64 {
            budget.deposit(last + Duration::from_micros(ms * 1_250));
            if ms % 2 == 0 && !budget.try_withdraw() {
                refused += 1;
            }
        }
        assert_eq!(refused, 0);
    }

    #[test]
    fn the_window_forgets_old_traffic() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(0.2, 0, 5, t0);
        for _ in 0..1_000 {
            budget.deposit(t0);
        }
        assert!((budget.cap(t0) - 200.0).abs() < 1e-9);
        for _ in 0..50 {
            assert!(budget.try_withdraw());
        }
        // Eleven seconds later the burst is outside the window: the cap is the floor again,
        // and the next request lets go of what that traffic saved.
        let later = t0 + Duration::from_secs(11);
        assert!(
            (budget.cap(later) - 5.0).abs() < 1e-9,
            "{}",
            budget.cap(later)
        );
        assert!((budget.available() - 150.0).abs() < 1e-9);
        budget.deposit(later);
        assert!(
            (budget.available() - 5.0).abs() < 1e-9,
            "{}",
            budget.available()
        );
    }

    #[test]
    fn every_failing_deployment_still_stops_a_storm() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(0.2, 10, 100, t0);
        // Everything fails for a minute at 500 requests a second: retries are at most about
        // 20 % of requests plus what was saved at the start.
        let (mut requests, mut retries) = (0_u64, 0_u64);
        for ms in 0..30_000_u64 {
            budget.deposit(t0 + Duration::from_millis(ms * 2));
            requests += 1;
            while budget.try_withdraw() {
                retries += 1;
            }
        }
        let share = retries as f64 / requests as f64;
        assert!(share <= 0.2 + 1e-3, "{share}");
        assert!(share >= 0.19, "{share}");
    }
}
