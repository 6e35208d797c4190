//! What every request of one router shares, across reconfigurations: the current snapshot,
//! the waitlist, the router-side limiters, the retry budget and the seed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};
use router_core::{RetryBudget, Rng};

use crate::builder::RetryPolicy;
use crate::limits::Limiters;
use crate::snapshot::RouterSnapshot;
use crate::waitlist::Waitlist;

/// What every request of a router shares, across reconfigurations.
pub(crate) struct Shared {
    pub(crate) snapshot: ArcSwap<RouterSnapshot>,
    pub(crate) waitlist: Waitlist,
    pub(crate) limiters: Limiters,
    /// The retry budget, kept across reconfigurations while the retry policy stays the same.
    pub(crate) budget: ArcSwap<Budget>,
    pub(crate) origin: std::time::Instant,
    pub(crate) requests: AtomicU64,
    pub(crate) seed: u64,
    /// Reconfigurations, one at a time.
    pub(crate) reload: Mutex<()>,
    /// Where each cache key was served last (kept across reconfigurations).
    pub(crate) affinities: crate::affinity::Affinities,
}

/// A retry budget and the policy it was made for.
#[derive(Debug)]
pub(crate) struct Budget {
    pub(crate) policy: RetryPolicy,
    budget: RetryBudget,
}

impl Budget {
    pub(crate) fn new(policy: RetryPolicy) -> Self {
        Self {
            budget: RetryBudget::new(
                policy.budget_ratio,
                policy.budget_min,
                policy.budget_min.max(100),
                crate::clock::now(),
            ),
            policy,
        }
    }
}

impl Shared {
    /// The retry budget.
    pub(crate) fn budget(&self) -> BudgetGuard {
        BudgetGuard(self.budget.load())
    }

    /// A generator for one request: from the router's seed and the request's number, so that a
    /// seeded router replays exactly.
    pub(crate) fn rng(&self) -> Rng {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        Rng::with_seed(self.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
}

/// The retry budget, as loaded.
pub(crate) struct BudgetGuard(Guard<Arc<Budget>>);

impl std::ops::Deref for BudgetGuard {
    type Target = RetryBudget;

    fn deref(&self) -> &RetryBudget {
        &self.0.budget
    }
}
