//! Azure-style quotas: the estimated cost charged at admission, over windows of three kinds
//! ([`WindowKind`]): fixed windows that restart at each edge, a sliding log of admissions,
//! and provisioned throughput's leaky bucket on utilisation.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{HeaderMode, Limits, WindowKind};

#[derive(Debug)]
pub(crate) struct Limiter {
    limits: Limits,
    origin: Instant,
    /// Fixed windows: the current window's index and what it admitted.
    window: u64,
    requests: u64,
    tokens: u64,
    /// Sliding windows: each admission in the last window, oldest first.
    log: VecDeque<(Instant, u64)>,
    /// Provisioned: utilisation in tokens (the capacity is 100 %), as of `level_at`.
    level: f64,
    level_at: Instant,
    /// `HeaderMode::Stale`: the snapshot the headers report, and when it was taken.
    reported: Option<(Instant, Snapshot)>,
}

/// What the limiter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Admitted(Snapshot),
    /// Over the request budget of the window.
    TooManyRequests(Snapshot),
    /// Over the token budget of the window.
    TooManyTokens(Snapshot),
    /// The request alone costs more than a whole window's tokens.
    TooLarge(Snapshot),
}

/// The budgets after the decision, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) limit_requests: Option<u64>,
    pub(crate) limit_tokens: Option<u64>,
    pub(crate) remaining_requests: Option<u64>,
    pub(crate) remaining_tokens: Option<u64>,
    /// Admitted: until the budgets are full again. Refused: until the request would fit.
    pub(crate) reset: Duration,
}

impl Limiter {
    pub(crate) fn new(limits: Limits, origin: Instant) -> Self {
        Self {
            limits,
            origin,
            window: 0,
            requests: 0,
            tokens: 0,
            log: VecDeque::new(),
            level: 0.0,
            level_at: origin,
            reported: None,
        }
    }

    pub(crate) fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Starts the windows again from `now`, with full budgets.
    pub(crate) fn restart(&mut self, now: Instant) {
        *self = Self::new(self.limits, now);
    }

    fn token_budget(&self) -> Option<u64> {
        self.limits.tpm.map(|tpm| self.limits.per_window(tpm))
    }

    fn request_budget(&self) -> Option<u64> {
        match self.limits.kind {
            WindowKind::Provisioned => None,
            _ => self.limits.rpm.map(|rpm| self.limits.per_window(rpm)),
        }
    }

    /// Moves to `now`: a new fixed window, expired log entries, drained utilisation. Returns
    /// the time until the budgets are full again.
    fn roll(&mut self, now: Instant) -> Duration {
        let window = self.limits.window();
        match self.limits.kind {
            WindowKind::Fixed => {
                let elapsed = now.saturating_duration_since(self.origin);
                let index = (elapsed.as_nanos() / window.as_nanos().max(1)) as u64;
                if index != self.window {
                    self.window = index;
                    self.requests = 0;
                    self.tokens = 0;
                }
                let end = window.saturating_mul(u32::try_from(index + 1).unwrap_or(u32::MAX));
                end.saturating_sub(elapsed)
            }
            WindowKind::Sliding => {
                while self.log.front().is_some_and(|(at, _)| *at + window <= now) {
                    self.log.pop_front();
                }
                self.requests = self.log.len() as u64;
                self.tokens = self.log.iter().map(|(_, t)| t).sum();
                self.log.back().map_or(Duration::ZERO, |(at, _)| {
                    (*at + window).saturating_duration_since(now)
                })
            }
            WindowKind::Provisioned => {
                let rate = self.drain_rate();
                let dt = now.saturating_duration_since(self.level_at).as_secs_f64();
                self.level = (self.level - rate * dt).max(0.0);
                self.level_at = now;
                self.tokens = self.level.ceil() as u64;
                Duration::from_secs_f64(self.level / rate.max(1e-9))
            }
        }
    }

    /// Provisioned: tokens drained per second.
    fn drain_rate(&self) -> f64 {
        self.limits
            .tpm
            .map_or(f64::INFINITY, |tpm| tpm as f64 / 60.0)
    }

    fn snapshot(&self, reset: Duration) -> Snapshot {
        Snapshot {
            limit_requests: self.request_budget().and(self.limits.rpm),
            limit_tokens: self.limits.tpm,
            remaining_requests: self
                .request_budget()
                .map(|b| b.saturating_sub(self.requests)),
            remaining_tokens: self.token_budget().map(|b| b.saturating_sub(self.tokens)),
            reset,
        }
    }

    /// How long until a request of `cost` fits, when it does not now.
    fn wait_to_fit(&self, now: Instant, cost: u64) -> Option<Duration> {
        let window = self.limits.window();
        let tokens_over = self
            .token_budget()
            .is_some_and(|budget| self.tokens + cost > budget);
        let requests_over = self
            .request_budget()
            .is_some_and(|budget| self.requests + 1 > budget);
        match self.limits.kind {
            WindowKind::Sliding if tokens_over || requests_over => {
                // Free the oldest admissions until the request fits.
                let (mut tokens, mut requests) = (self.tokens, self.requests);
                let fits = |tokens: u64, requests: u64| {
                    self.token_budget().is_none_or(|b| tokens + cost <= b)
                        && self.request_budget().is_none_or(|b| requests < b)
                };
                for (at, used) in &self.log {
                    tokens -= used;
                    requests -= 1;
                    if fits(tokens, requests) {
                        return Some((*at + window).saturating_duration_since(now));
                    }
                }
                Some(window)
            }
            WindowKind::Provisioned => {
                let capacity = self.token_budget()? as f64;
                (self.level >= capacity).then(|| {
                    let over = self.level - capacity;
                    Duration::from_secs_f64(over / self.drain_rate().max(1e-9))
                        .max(Duration::from_millis(1))
                })
            }
            WindowKind::Fixed | WindowKind::Sliding => None,
        }
    }

    /// Charges one request of `cost` tokens, or refuses it.
    pub(crate) fn admit(&mut self, now: Instant, cost: u64) -> Admission {
        let reset = self.roll(now);
        if let Some(budget) = self.token_budget()
            && cost > budget
            && self.limits.kind != WindowKind::Provisioned
        {
            return Admission::TooLarge(self.snapshot(reset));
        }
        if self.limits.kind == WindowKind::Provisioned {
            if let Some(wait) = self.wait_to_fit(now, cost) {
                return Admission::TooManyTokens(self.snapshot(wait));
            }
            self.level += cost as f64;
            self.tokens = self.level.ceil() as u64;
            let full = Duration::from_secs_f64(self.level / self.drain_rate().max(1e-9));
            return Admission::Admitted(self.snapshot(full));
        }
        let refused_for = |limiter: &Self| limiter.wait_to_fit(now, cost).unwrap_or(reset);
        if let Some(budget) = self.request_budget()
            && self.requests + 1 > budget
        {
            let wait = refused_for(self);
            return Admission::TooManyRequests(self.snapshot(wait));
        }
        if let Some(budget) = self.token_budget()
            && self.tokens + cost > budget
        {
            let wait = refused_for(self);
            return Admission::TooManyTokens(self.snapshot(wait));
        }
        self.requests += 1;
        self.tokens += cost;
        let reset = match self.limits.kind {
            WindowKind::Sliding => {
                self.log.push_back((now, cost));
                self.limits.window()
            }
            _ => reset,
        };
        Admission::Admitted(self.snapshot(reset))
    }

    /// What the headers report of `fresh` at `now`, and how: with `HeaderMode::Stale`, the
    /// snapshot taken up to a window ago (taken anew once it is a window old).
    pub(crate) fn reported(&mut self, now: Instant, fresh: Snapshot) -> (HeaderMode, Snapshot) {
        let mode = self.limits.headers;
        if mode != HeaderMode::Stale {
            return (mode, fresh);
        }
        let window = self.limits.window();
        match self.reported {
            Some((at, old)) if at + window > now => (mode, old),
            _ => {
                self.reported = Some((now, fresh));
                (mode, fresh)
            }
        }
    }

    /// The budgets now, without charging.
    pub(crate) fn peek(&mut self, now: Instant) -> Snapshot {
        let reset = self.roll(now);
        self.snapshot(reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn charges_within_a_window_and_resets_after_it() {
        // 6,000 TPM over 10 s windows: 1,000 tokens per window; 60 RPM: 10 per window.
        let limits = Limits::per_minute(Some(6_000), Some(60)).with_window(Duration::from_secs(10));
        let origin = Instant::now();
        let mut limiter = Limiter::new(limits, origin);
        assert!(matches!(limiter.admit(origin, 600), Admission::Admitted(_)));
        let Admission::TooManyTokens(snapshot) =
            limiter.admit(origin + Duration::from_secs(4), 600)
        else {
            panic!("second request should not fit");
        };
        assert_eq!(snapshot.remaining_tokens, Some(400));
        assert_eq!(snapshot.reset, Duration::from_secs(6));
        assert!(matches!(
            limiter.admit(origin + Duration::from_secs(10), 600),
            Admission::Admitted(_)
        ));
        assert!(matches!(
            limiter.admit(origin, 1_001),
            Admission::TooLarge(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn restart_gives_full_budgets_and_moves_the_window_edges() {
        let limits = Limits::per_minute(Some(6_000), None).with_window(Duration::from_secs(10));
        let origin = Instant::now();
        let mut limiter = Limiter::new(limits, origin);
        assert!(matches!(limiter.admit(origin, 900), Admission::Admitted(_)));
        let later = origin + Duration::from_secs(3);
        limiter.restart(later);
        let Admission::Admitted(snapshot) = limiter.admit(later, 900) else {
            panic!("a restarted window has its whole budget");
        };
        // The window now ends 10 s after the restart, not at the old edge (7 s away).
        assert_eq!(snapshot.reset, Duration::from_secs(10));
        assert!(matches!(
            limiter.admit(later + Duration::from_secs(9), 200),
            Admission::TooManyTokens(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sliding_window_frees_only_what_a_window_old_admission_used() {
        // 6,000 TPM over 10 s: 1,000 tokens in any 10 s.
        let limits = Limits::per_minute(Some(6_000), None)
            .with_window(Duration::from_secs(10))
            .with_kind(WindowKind::Sliding);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut limiter = Limiter::new(limits, t0);
        assert!(matches!(limiter.admit(at(0), 400), Admission::Admitted(_)));
        assert!(matches!(limiter.admit(at(4), 400), Admission::Admitted(_)));
        // 800 used; 300 more does not fit until the first admission is 10 s old.
        let Admission::TooManyTokens(refused) = limiter.admit(at(6), 300) else {
            panic!("over the sliding budget");
        };
        assert_eq!(
            refused.reset,
            Duration::from_secs(4),
            "when the first admission frees"
        );
        assert_eq!(refused.remaining_tokens, Some(200));
        // A fixed window would have restarted at 10 s with everything free; the log still holds
        // the second admission then.
        let Admission::Admitted(snapshot) = limiter.admit(at(10), 300) else {
            panic!("the first admission has freed");
        };
        assert_eq!(snapshot.remaining_tokens, Some(300));
        assert!(matches!(
            limiter.admit(at(11), 400),
            Admission::TooManyTokens(_)
        ));
        // Everything older than 10 s is gone at 20 s.
        assert!(matches!(
            limiter.admit(at(20), 1_000),
            Admission::Admitted(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sliding_request_budget_waits_for_the_oldest_admission() {
        let limits = Limits::per_minute(None, Some(12))
            .with_window(Duration::from_secs(10))
            .with_kind(WindowKind::Sliding);
        let t0 = Instant::now();
        let mut limiter = Limiter::new(limits, t0);
        assert!(matches!(limiter.admit(t0, 1), Admission::Admitted(_)));
        let t3 = t0 + Duration::from_secs(3);
        assert!(matches!(limiter.admit(t3, 1), Admission::Admitted(_)));
        let Admission::TooManyRequests(refused) = limiter.admit(t3, 1) else {
            panic!("two a window");
        };
        assert_eq!(refused.reset, Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn provisioned_admits_under_full_utilisation_and_says_when_it_drains() {
        // 6,000 TPM: 100 tokens drain a second; 10 s of it (1,000 tokens) is 100 %.
        let limits = Limits::per_minute(Some(6_000), Some(1))
            .with_window(Duration::from_secs(10))
            .with_kind(WindowKind::Provisioned);
        let t0 = Instant::now();
        let mut limiter = Limiter::new(limits, t0);
        assert!(matches!(limiter.admit(t0, 900), Admission::Admitted(_)));
        // Under 100 % (900), so admitted, and it may take utilisation over (1,400).
        assert!(matches!(limiter.admit(t0, 500), Admission::Admitted(_)));
        let Admission::TooManyTokens(refused) = limiter.admit(t0, 10) else {
            panic!("over 100 %");
        };
        assert_eq!(
            refused.reset,
            Duration::from_secs(4),
            "400 over, 100 a second"
        );
        // Requests per minute do not apply to provisioned throughput.
        assert_eq!(refused.remaining_requests, None);
        let Admission::Admitted(_) = limiter.admit(t0 + Duration::from_millis(4_010), 10) else {
            panic!("drained below 100 %");
        };
    }

    #[tokio::test(start_paused = true)]
    async fn request_budget() {
        let limits = Limits::per_minute(None, Some(12)).with_window(Duration::from_secs(10));
        let origin = Instant::now();
        let mut limiter = Limiter::new(limits, origin);
        assert!(matches!(limiter.admit(origin, 1), Admission::Admitted(_)));
        assert!(matches!(limiter.admit(origin, 1), Admission::Admitted(_)));
        assert!(matches!(
            limiter.admit(origin, 1),
            Admission::TooManyRequests(_)
        ));
    }
}
