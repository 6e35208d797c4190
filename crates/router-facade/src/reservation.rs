//! A deployment's quota held by one request until it settles.

use std::sync::Arc;

use router_core::{Charge, Limits, RateLimitInfo, Settlement, StateStore};

/// Tokens and a request reserved on a deployment. Settle it with the real usage, or release it;
/// dropped unsettled (a cancelled request), it releases itself in the background.
pub(crate) struct Reservation {
    store: Arc<dyn StateStore>,
    key: Arc<str>,
    limits: Limits,
    charge: Charge,
    open: bool,
}

impl Reservation {
    pub(crate) fn new(
        store: Arc<dyn StateStore>,
        key: Arc<str>,
        limits: Limits,
        charge: Charge,
    ) -> Self {
        Self {
            store,
            key,
            limits,
            charge,
            open: true,
        }
    }

    /// What settling with `used` tokens (the estimate when unknown) and the upstream's headers
    /// gives back.
    fn settlement(&self, used: Option<u64>, info: Option<&RateLimitInfo>) -> Settlement {
        let used = used.unwrap_or(self.charge.tokens);
        Settlement {
            tokens_back: i64::try_from(self.charge.tokens).unwrap_or(i64::MAX)
                - i64::try_from(used).unwrap_or(i64::MAX),
            requests_back: 0,
            remaining_tokens: info.and_then(|i| i.remaining_tokens),
            remaining_requests: info.and_then(|i| i.remaining_requests),
        }
    }

    /// The request succeeded having used `used` tokens.
    pub(crate) async fn settle(mut self, used: Option<u64>, info: &RateLimitInfo) {
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
    pub(crate) fn settle_detached(mut self, used: Option<u64>, info: &RateLimitInfo) {
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
                    .settle(&key, &limits, settlement, crate::router::now())
                    .await;
            });
        }
    }

    async fn apply(&self, settlement: Settlement) {
        if let Err(error) = self
            .store
            .settle(&self.key, &self.limits, settlement, crate::router::now())
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
