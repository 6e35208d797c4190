//! Router-side rate limits: per model group and per caller (requests, tokens, concurrency).
//!
//! These protect the router's users from each other and the upstreams from one user, on top of
//! the upstreams' own quotas. Requests and tokens are counted over sliding 10 s windows (no
//! 10 s holds more than 10 s of the per-minute limit: the same [`Log`](router_core::Log)
//! arithmetic as the upstreams' quotas), charged with the request's estimate at admission;
//! concurrency is a slot held until the request (or its stream) ends. A request over a
//! requests or tokens limit waits for its turn in the scope's lane of the router's waitlist if
//! that comes before its deadline, else it is throttled with `retry_after`; a request over a
//! concurrency limit is throttled at once.
//!
//! The windows live in the router's state store under `limit:{scope}`, beside the
//! deployments' quotas: in the process with the default store, shared by every replica with a
//! shared one (`state-redis`), which also answers from a local share of each limit while it
//! is away. Concurrency slots are leases in a store that keeps them
//! ([`StateStore::leases`]: shared, and freed by their expiry when a replica dies), else a
//! count in this process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use router_core::{Admission, Charge, Error, ErrorKind, Lease, Limits, Settlement, StateStore};
use tokio::time::Instant;

use crate::options::QuotaLeft;

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

    pub(crate) fn windows(&self) -> Limits {
        Limits::per_minute(self.tpm, self.rpm)
    }
}

/// One router-side limit that applies to a request: its name (`group:{model}`,
/// `caller:{name}`), which is also its waiting lane, its key in the state store, and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scope {
    pub(crate) name: String,
    /// Its windows' and leases' key in the state store: `limit:caller:team-a` (a deployment's
    /// is `endpoint/model`).
    key: String,
    pub(crate) limits: RateLimits,
}

impl Scope {
    pub(crate) fn new(name: String, limits: RateLimits) -> Self {
        Self {
            key: format!("limit:{name}"),
            name,
            limits,
        }
    }
}

/// The router's limiters, kept across reconfigurations: the in-process concurrency counts, for
/// a state store that does not keep concurrency limits itself (requests and tokens are always
/// counted in the state store).
#[derive(Debug, Default)]
pub(crate) struct Limiters {
    in_flight: DashMap<String, Arc<AtomicU32>>,
}

/// Slots held by an admitted request; released on drop (a store's leases by a task, or by
/// their expiry when no runtime is left to run it).
#[derive(Debug, Default)]
pub(crate) struct Permit {
    held: Vec<Arc<AtomicU32>>,
    leases: Vec<Lease>,
    store: Option<Arc<dyn StateStore>>,
    /// What each scope's windows had left after the admission: (scope index, tokens,
    /// requests).
    left: Vec<(usize, Option<f64>, Option<f64>)>,
}

impl Permit {
    /// What the caller's scope among `scopes` (those it was admitted under) has left.
    pub(crate) fn caller_quota(&self, scopes: &[Scope]) -> Option<QuotaLeft> {
        let (index, scope) = scopes
            .iter()
            .enumerate()
            .find(|(_, s)| s.name.starts_with("caller:"))?;
        let (_, tokens, requests) = self.left.iter().find(|(i, _, _)| *i == index)?;
        let windows = scope.limits.windows();
        let part = windows.window.as_secs_f64() / 60.0;
        let held = |per_minute: Option<u64>| per_minute.map(|l| (l as f64 * part).floor() as u64);
        let whole = |left: Option<f64>, per_minute: Option<u64>| {
            per_minute.and(left).map(|l| l.max(0.0).floor() as u64)
        };
        Some(QuotaLeft {
            limit_requests: held(scope.limits.rpm),
            limit_tokens: held(scope.limits.tpm),
            requests_left: whole(*requests, scope.limits.rpm),
            tokens_left: whole(*tokens, scope.limits.tpm),
            window: windows.window,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        for count in &self.held {
            count.fetch_sub(1, Ordering::Relaxed);
        }
        let leases = std::mem::take(&mut self.leases);
        if let (false, Some(store), Ok(runtime)) = (
            leases.is_empty(),
            self.store.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            runtime.spawn(async move {
                for lease in &leases {
                    if let Err(error) = store.release(lease).await {
                        tracing::debug!(lease = lease.id(), %error, "a lease is left to expire");
                    }
                }
            });
        }
    }
}

/// Why a request may not pass the router-side limits now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The scope that refused (`caller:team-a`).
    pub(crate) scope: String,
    /// How long until it has room.
    pub(crate) retry_after: Duration,
    /// Whether its concurrency limit refused (waiting for a time would not help: a slot frees
    /// when a request ends).
    pub(crate) concurrency: bool,
    what: &'static str,
}

impl Refusal {
    /// The caller's error: throttled by the router, with when to retry.
    pub(crate) fn error(&self) -> Error {
        Error::with_message(
            ErrorKind::Throttled,
            format!("{}: over its {} limit", self.scope, self.what),
        )
        .with_retry_after(self.retry_after)
    }
}

impl Limiters {
    /// Admits a request of `charge` under every scope now, or says which refused and for how
    /// long. Nothing is taken from any scope unless all admit. Requests and tokens are counted
    /// in `store` (shared by replicas when it is); concurrency too when the store
    /// [`leases`](StateStore::leases), else in this process. A store that fails (rather than
    /// falling back on its own) does not refuse the request: its limit is not enforced for it.
    pub(crate) async fn try_admit(
        &self,
        store: &Arc<dyn StateStore>,
        scopes: &[Scope],
        charge: Charge,
        now: Instant,
    ) -> Result<Permit, Refusal> {
        let now = now.into_std();
        let mut permit = Permit {
            held: Vec::new(),
            leases: Vec::new(),
            store: Some(Arc::clone(store)),
            left: Vec::new(),
        };
        for scope in scopes {
            let Some(max) = scope.limits.concurrency else {
                continue;
            };
            let taken = if store.leases() {
                match store.lease(&scope.key, max, now).await {
                    Ok(Some(lease)) => {
                        permit.leases.push(lease);
                        true
                    }
                    Ok(None) => false,
                    Err(error) => {
                        tracing::warn!(scope = %scope.name, %error, "the state store could not lease; counting in this process");
                        self.count(&scope.name, max, &mut permit)
                    }
                }
            } else {
                self.count(&scope.name, max, &mut permit)
            };
            if !taken {
                // The slots taken so far go back as `permit` drops.
                return Err(Refusal {
                    scope: scope.name.clone(),
                    retry_after: Duration::from_secs(1),
                    concurrency: true,
                    what: "concurrency",
                });
            }
        }
        let mut charged: Vec<(&str, Limits, u64)> = Vec::new();
        for (index, scope) in scopes.iter().enumerate() {
            let windows = scope.limits.windows();
            if !windows.is_limited() {
                continue;
            }
            match store.reserve(&scope.key, &windows, charge, now).await {
                Ok(Admission::Admitted {
                    ticket,
                    tokens_left,
                    requests_left,
                    ..
                }) => {
                    charged.push((&scope.key, windows, ticket));
                    permit.left.push((index, tokens_left, requests_left));
                }
                Ok(Admission::Denied { retry_after, .. }) => {
                    // Give back what the scopes before this one took.
                    for (key, windows, ticket) in &charged {
                        let back = Settlement::release(*ticket, charge);
                        if let Err(error) = store.settle(key, windows, back, now).await {
                            tracing::warn!(%key, %error, "could not give a reservation back");
                        }
                    }
                    let what = if scope.limits.rpm.is_some() && scope.limits.tpm.is_none() {
                        "requests"
                    } else {
                        "rate"
                    };
                    return Err(Refusal {
                        scope: scope.name.clone(),
                        retry_after,
                        concurrency: false,
                        what,
                    });
                }
                Err(error) => {
                    tracing::warn!(scope = %scope.name, %error, "the state store failed; the limit is not enforced for this request");
                }
            }
        }
        Ok(permit)
    }

    /// Takes one of `max` slots of `scope` in this process's count.
    fn count(&self, scope: &str, max: u32, permit: &mut Permit) -> bool {
        let count = Arc::clone(self.in_flight.entry(scope.to_owned()).or_default().value());
        let taken = count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if taken {
            permit.held.push(count);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_core::MemoryStore;

    fn store() -> Arc<dyn StateStore> {
        Arc::new(MemoryStore::new())
    }

    fn scope(name: &str, limits: RateLimits) -> Vec<Scope> {
        vec![Scope::new(name.to_owned(), limits)]
    }

    #[tokio::test]
    async fn requests_pass_until_the_window_is_full_then_say_when() {
        let limiters = Limiters::default();
        let store = store();
        // 12 a minute over 10 s: 2 in any 10 s; the first leaves the window after 10 s and
        // the 50 ms margin.
        let scopes = scope("caller:a", RateLimits::new().with_rpm(12));
        let charge = Charge {
            tokens: 10,
            requests: 1,
        };
        let now = Instant::now();
        limiters
            .try_admit(&store, &scopes, charge, now)
            .await
            .unwrap();
        limiters
            .try_admit(&store, &scopes, charge, now)
            .await
            .unwrap();
        let refusal = limiters
            .try_admit(&store, &scopes, charge, now)
            .await
            .unwrap_err();
        let wait = Duration::from_millis(10_050);
        assert_eq!(refusal.retry_after, wait);
        assert!(!refusal.concurrency);
        let error = refusal.error();
        assert_eq!(error.kind(), ErrorKind::Throttled);
        assert_eq!(error.retry_after(), Some(wait));
        assert!(error.to_string().contains("caller:a"));
        assert!(
            limiters
                .try_admit(&store, &scopes, charge, now + Duration::from_secs(5))
                .await
                .is_err(),
            "a bucket would have refilled one by now; the window has not"
        );
        limiters
            .try_admit(&store, &scopes, charge, now + wait)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_refusal_takes_nothing_from_the_scopes_that_admitted() {
        let limiters = Limiters::default();
        let store = store();
        let mut scopes = scope("group:m", RateLimits::new().with_rpm(60)); // 10 at once
        scopes.extend(scope("caller:a", RateLimits::new().with_rpm(6))); // 1 at once
        let charge = Charge {
            tokens: 0,
            requests: 1,
        };
        let now = Instant::now();
        limiters
            .try_admit(&store, &scopes, charge, now)
            .await
            .unwrap();
        for _ in 0..20 {
            assert!(
                limiters
                    .try_admit(&store, &scopes, charge, now)
                    .await
                    .is_err()
            );
        }
        // The group's bucket lost only the one admitted request.
        let group = &scopes[..1];
        for _ in 0..9 {
            limiters
                .try_admit(&store, group, charge, now)
                .await
                .unwrap();
        }
        assert!(
            limiters
                .try_admit(&store, group, charge, now)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn concurrency_is_held_until_the_permit_drops() {
        let limiters = Limiters::default();
        let store = store();
        let scopes = scope("group:m", RateLimits::new().with_concurrency(1));
        let now = Instant::now();
        let first = limiters
            .try_admit(&store, &scopes, Charge::default(), now)
            .await
            .unwrap();
        let refusal = limiters
            .try_admit(&store, &scopes, Charge::default(), now)
            .await
            .unwrap_err();
        assert!(refusal.concurrency);
        assert_eq!(refusal.error().kind(), ErrorKind::Throttled);
        drop(first);
        limiters
            .try_admit(&store, &scopes, Charge::default(), now)
            .await
            .unwrap();
    }
}
