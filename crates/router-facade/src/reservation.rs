//! A deployment's quota held by one request until it settles.

use std::sync::Arc;

use router_core::{Charge, Limits, RateLimitInfo, Settlement, StateStore};

use crate::builder::QuotaAccounting;
use crate::estimate::Estimate;

/// What an answer said it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Used {
    /// Prompt tokens as the upstream counted them.
    pub(crate) prompt: u64,
    /// Prompt plus completion tokens.
    pub(crate) total: u64,
}

impl From<&router_types::Usage> for Used {
    fn from(usage: &router_types::Usage) -> Self {
        Self {
            prompt: usage.prompt_tokens,
            total: usage.total_tokens,
        }
    }
}

/// Tokens and a request reserved on a deployment. Settle it with the real usage, or release it;
/// dropped unsettled (a cancelled request), it releases itself in the background.
#[derive(Debug)]
pub(crate) struct Reservation {
    store: Arc<dyn StateStore>,
    key: Arc<str>,
    limits: Limits,
    charge: Charge,
    output: u64,
    accounting: QuotaAccounting,
    open: bool,
}

impl Reservation {
    pub(crate) fn new(
        store: Arc<dyn StateStore>,
        key: Arc<str>,
        limits: Limits,
        estimate: Estimate,
        accounting: QuotaAccounting,
    ) -> Self {
        Self {
            store,
            key,
            limits,
            charge: estimate.charge,
            output: estimate.output,
            accounting,
            open: true,
        }
    }

    /// What settling with `used` (the estimate when unknown) and the upstream's headers gives
    /// back. At admission accounting the output cap stays charged, as the upstream charged it;
    /// only the prompt estimate is corrected to the upstream's count.
    fn settlement(&self, used: Option<Used>, info: Option<&RateLimitInfo>) -> Settlement {
        let allowance = info.map_or((None, None), |info| {
            router_core::upstream_allowance(&self.limits, info)
        });
        let used = used.map_or(self.charge.tokens, |used| match self.accounting {
            QuotaAccounting::Admission => used.prompt + self.output,
            QuotaAccounting::Usage => used.total,
        });
        Settlement {
            tokens_back: i64::try_from(self.charge.tokens).unwrap_or(i64::MAX)
                - i64::try_from(used).unwrap_or(i64::MAX),
            requests_back: 0,
            remaining_tokens: allowance.0,
            remaining_requests: allowance.1,
        }
    }

    /// The request succeeded having used `used`.
    pub(crate) async fn settle(mut self, used: Option<Used>, info: &RateLimitInfo) {
        self.open = false;
        let settlement = self.settlement(used, Some(info));
        self.apply(settlement).await;
    }

    /// The request failed: everything back.
    pub(crate) async fn release(mut self) {
        self.open = false;
        self.apply(Settlement::release(self.charge)).await;
    }

    /// Settles without waiting (from `poll_next`): `used` tokens, the estimate when unknown.
    pub(crate) fn settle_detached(mut self, used: Option<Used>, info: &RateLimitInfo) {
        self.open = false;
        let settlement = self.settlement(used, Some(info));
        self.spawn(settlement);
    }

    /// Releases without waiting.
    pub(crate) fn release_detached(mut self) {
        self.open = false;
        self.spawn(Settlement::release(self.charge));
    }

    fn spawn(&self, settlement: Settlement) {
        let (store, key, limits) = (Arc::clone(&self.store), Arc::clone(&self.key), self.limits);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = store
                    .settle(&key, &limits, settlement, crate::clock::now())
                    .await;
            });
        }
    }

    async fn apply(&self, settlement: Settlement) {
        if let Err(error) = self
            .store
            .settle(&self.key, &self.limits, settlement, crate::clock::now())
            .await
        {
            tracing::debug!(key = %self.key, %error, "quota store could not settle");
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.open {
            self.open = false;
            self.spawn(Settlement::release(self.charge));
        }
    }
}
