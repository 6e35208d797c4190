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

impl From<Used> for crate::options::TokensUsed {
    fn from(used: Used) -> Self {
        Self {
            input: used.prompt,
            output: used.total.saturating_sub(used.prompt),
        }
    }
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
    /// The store's name for this admission.
    ticket: u64,
    charge: Charge,
    output: u64,
    /// The prompt as the router counted it (before scaling to the upstream's way).
    counted_prompt: u64,
    accounting: QuotaAccounting,
    open: bool,
}

/// Reservations alive in this process, across routers: each is settled, released or kept
/// before it is dropped, so after the load this is back to zero ([`Router::open_reservations`]).
///
/// [`Router::open_reservations`]: crate::Router::open_reservations
pub(crate) static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Reservation {
    pub(crate) fn new(
        store: Arc<dyn StateStore>,
        key: Arc<str>,
        limits: Limits,
        ticket: u64,
        estimate: Estimate,
        accounting: QuotaAccounting,
    ) -> Self {
        LIVE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            store,
            key,
            limits,
            ticket,
            charge: estimate.charge,
            output: estimate.output,
            counted_prompt: estimate.counted_prompt,
            accounting,
            open: true,
        }
    }

    /// What settling with `used` (the estimate when unknown) and the upstream's headers gives
    /// back. At admission accounting the output cap stays charged, as the upstream charged it;
    /// only the prompt estimate is corrected to the upstream's count.
    fn settlement(&self, used: Option<Used>, info: Option<&RateLimitInfo>) -> Settlement {
        let used = used.map_or(self.charge.tokens, |used| match self.accounting {
            QuotaAccounting::Admission => used.prompt + self.output,
            QuotaAccounting::Usage => used.total,
        });
        Settlement {
            ticket: self.ticket,
            tokens_back: i64::try_from(self.charge.tokens).unwrap_or(i64::MAX)
                - i64::try_from(used).unwrap_or(i64::MAX),
            requests_back: 0,
            remaining_tokens: info.and_then(|info| info.remaining_tokens),
            remaining_requests: info.and_then(|info| info.remaining_requests),
            reset: info.and_then(|info| info.reset_tokens.max(info.reset_requests)),
            served: true,
        }
    }

    /// The prompt as the router counted it, before scaling to the upstream's way.
    pub(crate) fn counted_prompt(&self) -> u64 {
        self.counted_prompt
    }

    /// The request succeeded having used `used`.
    pub(crate) async fn settle(mut self, used: Option<Used>, info: &RateLimitInfo) {
        self.open = false;
        let settlement = self.settlement(used, Some(info));
        self.apply(settlement).await;
    }

    /// The request was served elsewhere (Azure spilled it over to `key`'s deployment): this
    /// reservation goes back, and the same charge is taken on `key` under `limits`, however
    /// full the store thinks it is (the upstream served it there). The new reservation, when
    /// the store answered.
    pub(crate) async fn move_to(mut self, key: Arc<str>, limits: Limits) -> Option<Self> {
        self.open = false;
        self.apply(Settlement::release(self.ticket, self.charge))
            .await;
        let now = crate::clock::now();
        // Taken whatever the log says: reserved as nothing, then charged by a settlement that
        // takes the rest.
        let nothing = Charge {
            tokens: 0,
            requests: 0,
        };
        let Ok(router_core::Admission::Admitted { ticket, .. }) =
            self.store.reserve(&key, &limits, nothing, now).await
        else {
            return None;
        };
        let taken = Settlement {
            ticket,
            tokens_back: -i64::try_from(self.charge.tokens).unwrap_or(i64::MAX),
            requests_back: -i64::try_from(self.charge.requests).unwrap_or(i64::MAX),
            ..Settlement::default()
        };
        let _ = self.store.settle(&key, &limits, taken, now).await;
        LIVE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Self {
            store: Arc::clone(&self.store),
            key,
            limits,
            ticket,
            charge: self.charge,
            output: self.output,
            counted_prompt: self.counted_prompt,
            accounting: self.accounting,
            open: true,
        })
    }

    /// The request failed: everything back.
    pub(crate) async fn release(mut self) {
        self.open = false;
        self.apply(Settlement::release(self.ticket, self.charge))
            .await;
    }

    /// Settles without waiting (from `poll_next`): `used` tokens, the estimate when unknown.
    pub(crate) fn settle_detached(mut self, used: Option<Used>, info: &RateLimitInfo) {
        self.open = false;
        let settlement = self.settlement(used, Some(info));
        self.spawn(settlement);
    }

    /// The upstream admitted the request and counts it, whatever became of it (a stream that
    /// broke or that its caller dropped): the estimate stays held until it leaves the window,
    /// with no call to the store.
    pub(crate) fn keep(mut self) {
        self.open = false;
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
        LIVE.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if self.open {
            self.open = false;
            self.spawn(Settlement::release(self.ticket, self.charge));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{Strategy as _, any, prop, prop_assert, proptest};
    use router_core::{Admission, MemoryStore};

    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Reserve {
            prompt: u64,
            output: u64,
        },
        Settle {
            which: usize,
            prompt: u64,
            completion: u64,
            detached: bool,
        },
        Release(usize),
        /// A stream the upstream admitted ended early: its estimate stays held.
        Keep(usize),
        Drop(usize),
    }

    fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
        proptest::prop_oneof![
            (1u64..500, 0u64..500).prop_map(|(prompt, output)| Op::Reserve { prompt, output }),
            (any::<usize>(), 0u64..600, 0u64..600, any::<bool>()).prop_map(
                |(which, prompt, completion, detached)| Op::Settle {
                    which,
                    prompt,
                    completion,
                    detached
                }
            ),
            any::<usize>().prop_map(Op::Release),
            any::<usize>().prop_map(Op::Keep),
            any::<usize>().prop_map(Op::Drop),
        ]
    }

    /// Lets the settlements spawned by detached calls and drops run.
    async fn settle_spawned() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    proptest! {
        /// The store's buckets hold exactly what the open reservations and the settled ones
        /// account for, after every step: a reservation takes its estimate; settling keeps what
        /// the accounting says was used (the prompt as counted plus the output cap at
        /// admission, the real total under usage accounting) and the request; releasing,
        /// detached or not, and dropping give everything back. Time does not move, so nothing
        /// refills: any token or request not given back, or given back twice, shows.
        #[test]
        fn reservations_neither_leak_nor_give_back_twice(
            ops in prop::collection::vec(arb_op(), 0..80),
            usage in any::<bool>(),
        ) {
            let accounting = if usage { QuotaAccounting::Usage } else { QuotaAccounting::Admission };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let store = Arc::new(MemoryStore::new());
                let dyn_store: Arc<dyn StateStore> = Arc::clone(&store) as Arc<dyn StateStore>;
                let key: Arc<str> = Arc::from("endpoint/model");
                // 60,000 tokens and 600 requests a minute over 10 s: 10,000 and 100 at once.
                let limits = Limits::per_minute(Some(60_000), Some(600));
                let (tokens_full, requests_full) = (10_000.0, 100.0);
                let now = crate::clock::now();
                let mut open: Vec<(Reservation, Charge)> = Vec::new();
                let (mut kept_tokens, mut kept_requests) = (0.0_f64, 0.0_f64);
                for op in ops {
                    match op {
                        Op::Reserve { prompt, output } => {
                            let estimate = Estimate::new(prompt, output);
                            let admitted = dyn_store.reserve(&key, &limits, estimate.charge, now).await.unwrap();
                            if let Admission::Admitted { ticket, .. } = admitted {
                                let reservation = Reservation::new(Arc::clone(&dyn_store), Arc::clone(&key), limits, ticket, estimate, accounting);
                                open.push((reservation, estimate.charge));
                            }
                        }
                        Op::Settle { which, prompt, completion, detached } if !open.is_empty() => {
                            let (reservation, charge) = open.swap_remove(which % open.len());
                            let used = Used { prompt, total: prompt + completion };
                            let output = reservation.output;
                            kept_tokens += match accounting {
                                QuotaAccounting::Admission => (prompt + output) as f64,
                                QuotaAccounting::Usage => used.total as f64,
                            };
                            kept_requests += charge.requests as f64;
                            if detached {
                                reservation.settle_detached(Some(used), &RateLimitInfo::default());
                            } else {
                                reservation.settle(Some(used), &RateLimitInfo::default()).await;
                            }
                        }
                        Op::Release(which) if !open.is_empty() => {
                            let (reservation, _) = open.swap_remove(which % open.len());
                            reservation.release().await;
                        }
                        Op::Keep(which) if !open.is_empty() => {
                            let (reservation, charge) = open.swap_remove(which % open.len());
                            kept_tokens += charge.tokens as f64;
                            kept_requests += charge.requests as f64;
                            reservation.keep();
                        }
                        Op::Drop(which) if !open.is_empty() => {
                            drop(open.swap_remove(which % open.len()));
                        }
                        _ => {}
                    }
                    settle_spawned().await;
                    let held: f64 = open.iter().map(|(_, c)| c.tokens as f64).sum();
                    let expected = (tokens_full - held - kept_tokens).min(tokens_full);
                    let level = store.tokens_level(&key, &limits, now).unwrap();
                    prop_assert!((level - expected).abs() < 1e-6, "tokens: {level}, expected {expected}");
                    let expected = requests_full - open.len() as f64 - kept_requests;
                    let level = store.requests_level(&key, &limits, now).unwrap();
                    prop_assert!((level - expected).abs() < 1e-6, "requests: {level}, expected {expected}");
                }
                drop(open);
                settle_spawned().await;
                let level = store.tokens_level(&key, &limits, now).unwrap();
                let expected = (tokens_full - kept_tokens).min(tokens_full);
                prop_assert!((level - expected).abs() < 1e-6, "after all: {level}, expected {expected}");
                Ok(())
            })?;
        }
    }
}
