//! Router-side rate limits: per model group and per caller (requests, tokens, concurrency).
//!
//! These protect the router's users from each other and the upstreams from one user, on top of
//! the upstreams' own quotas. Requests and tokens are token buckets (10 s of the per-minute
//! limit at once, refilled continuously), charged with the request's estimate at admission;
//! concurrency is a count held until the request (or its stream) ends. A request over a
//! requests or tokens limit waits for its turn if that comes before its deadline, else it is
//! throttled with `retry_after`; a request over a concurrency limit is throttled at once.
//! These buckets are per process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use router_core::{Admission, Charge, Error, ErrorKind, Limits, MemoryStore, Settlement};
use tokio::time::Instant;

/// Limits the router enforces itself. `None` is unlimited.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute (estimated at admission: prompt plus output cap).
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: Option<u32>,
}

impl RateLimits {
    /// No limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets requests per minute.
    #[must_use]
    pub fn with_rpm(mut self, rpm: u64) -> Self {
        self.rpm = Some(rpm);
        self
    }

    /// Sets tokens per minute.
    #[must_use]
    pub fn with_tpm(mut self, tpm: u64) -> Self {
        self.tpm = Some(tpm);
        self
    }

    /// Sets the concurrency limit.
    #[must_use]
    pub fn with_concurrency(mut self, concurrency: u32) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some() || self.concurrency.is_some()
    }

    /// Whether a token limit is set (admission then needs a token estimate).
    pub(crate) fn counts_tokens(&self) -> bool {
        self.tpm.is_some()
    }

    fn buckets(&self) -> Limits {
        Limits::per_minute(self.tpm, self.rpm)
    }
}

/// The router's limiters, kept across reconfigurations.
#[derive(Debug, Default)]
pub(crate) struct Limiters {
    buckets: MemoryStore,
    in_flight: DashMap<String, Arc<AtomicU32>>,
}

/// Slots held by an admitted request; released on drop.
#[derive(Debug, Default)]
pub(crate) struct Permit {
    held: Vec<Arc<AtomicU32>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        for count in &self.held {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn throttled(scope: &str, what: &str, retry_after: Duration) -> Error {
    Error::with_message(
        ErrorKind::Throttled,
        format!("{scope}: over its {what} limit"),
    )
    .with_retry_after(retry_after)
}

impl Limiters {
    /// Admits a request of `charge` under every `(scope, limits)`, waiting for room until
    /// `deadline` when that is enough.
    pub(crate) async fn admit(
        &self,
        scopes: &[(String, RateLimits)],
        charge: Charge,
        deadline: Instant,
    ) -> Result<Permit, Error> {
        let mut permit = Permit::default();
        for (scope, limits) in scopes {
            if let Some(max) = limits.concurrency {
                let count = Arc::clone(self.in_flight.entry(scope.clone()).or_default().value());
                let taken = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                });
                if taken.is_err() {
                    return Err(throttled(scope, "concurrency", Duration::from_secs(1)));
                }
                permit.held.push(count);
            }
        }
        let mut charged: Vec<(&str, Limits)> = Vec::new();
        for (scope, limits) in scopes {
            let buckets = limits.buckets();
            if !buckets.is_limited() {
                continue;
            }
            loop {
                let now = Instant::now();
                match self
                    .buckets
                    .reserve_now(scope, &buckets, charge, now.into_std())
                {
                    Admission::Admitted { .. } => {
                        charged.push((scope, buckets));
                        break;
                    }
                    Admission::Denied { retry_after, .. } => {
                        if now + retry_after > deadline {
                            // Give back what the scopes before this one took.
                            for (scope, buckets) in &charged {
                                self.buckets.settle_now(
                                    scope,
                                    buckets,
                                    Settlement::release(charge),
                                    now.into_std(),
                                );
                            }
                            let what = if limits.rpm.is_some() && limits.tpm.is_none() {
                                "requests"
                            } else {
                                "rate"
                            };
                            return Err(throttled(scope, what, retry_after));
                        }
                        tokio::time::sleep(retry_after).await;
                    }
                }
            }
        }
        Ok(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_wait_within_the_deadline_or_are_throttled() {
        let limiters = Limiters::default();
        // 12 a minute over 10 s: 2 at once, one more every 5 s.
        let scopes = vec![("caller:a".to_owned(), RateLimits::new().with_rpm(12))];
        let charge = Charge {
            tokens: 10,
            requests: 1,
        };
        let far = Instant::now() + Duration::from_secs(60);
        limiters.admit(&scopes, charge, far).await.unwrap();
        limiters.admit(&scopes, charge, far).await.unwrap();
        let started = Instant::now();
        limiters.admit(&scopes, charge, far).await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "waited for its turn"
        );
        let soon = Instant::now() + Duration::from_secs(1);
        let error = limiters.admit(&scopes, charge, soon).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Throttled);
        assert_eq!(error.retry_after(), Some(Duration::from_secs(5)));
        assert!(error.to_string().contains("caller:a"));
    }

    #[tokio::test]
    async fn concurrency_is_held_until_the_permit_drops() {
        let limiters = Limiters::default();
        let scopes = vec![("group:m".to_owned(), RateLimits::new().with_concurrency(1))];
        let far = Instant::now() + Duration::from_secs(60);
        let first = limiters
            .admit(&scopes, Charge::default(), far)
            .await
            .unwrap();
        let error = limiters
            .admit(&scopes, Charge::default(), far)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Throttled);
        assert!(error.retry_after().is_some());
        drop(first);
        limiters
            .admit(&scopes, Charge::default(), far)
            .await
            .unwrap();
    }
}
