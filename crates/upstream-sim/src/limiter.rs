//! Azure-style quota: estimated cost charged at admission over fixed windows.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Limits;

#[derive(Debug)]
pub(crate) struct Limiter {
    limits: Limits,
    origin: Instant,
    window: u64,
    requests: u64,
    tokens: u64,
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
    /// Until the window ends and the budgets are full again.
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
        self.origin = now;
        self.window = 0;
        self.requests = 0;
        self.tokens = 0;
    }

    fn roll(&mut self, now: Instant) -> Duration {
        let window = self.limits.window();
        let elapsed = now.saturating_duration_since(self.origin);
        let index = (elapsed.as_nanos() / window.as_nanos().max(1)) as u64;
        if index != self.window {
            self.window = index;
            self.requests = 0;
            self.tokens = 0;
        }
        let window_end = window.saturating_mul(u32::try_from(index + 1).unwrap_or(u32::MAX));
        window_end.saturating_sub(elapsed)
    }

    fn snapshot(&self, reset: Duration) -> Snapshot {
        let request_budget = self.limits.rpm.map(|rpm| self.limits.per_window(rpm));
        let token_budget = self.limits.tpm.map(|tpm| self.limits.per_window(tpm));
        Snapshot {
            limit_requests: self.limits.rpm,
            limit_tokens: self.limits.tpm,
            remaining_requests: request_budget.map(|b| b.saturating_sub(self.requests)),
            remaining_tokens: token_budget.map(|b| b.saturating_sub(self.tokens)),
            reset,
        }
    }

    /// Charges one request of `cost` tokens, or refuses it.
    pub(crate) fn admit(&mut self, now: Instant, cost: u64) -> Admission {
        let reset = self.roll(now);
        if let Some(tpm) = self.limits.tpm
            && cost > self.limits.per_window(tpm)
        {
            return Admission::TooLarge(self.snapshot(reset));
        }
        if let Some(rpm) = self.limits.rpm
            && self.requests + 1 > self.limits.per_window(rpm)
        {
            return Admission::TooManyRequests(self.snapshot(reset));
        }
        if let Some(tpm) = self.limits.tpm
            && self.tokens + cost > self.limits.per_window(tpm)
        {
            return Admission::TooManyTokens(self.snapshot(reset));
        }
        self.requests += 1;
        self.tokens += cost;
        Admission::Admitted(self.snapshot(reset))
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
