//! The request pipeline.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_core::Stream;
use router_core::{
    Admission, Availability, CallOptions, ChatStream, EndpointId, Error, ErrorKind, InFlightGuard,
    LatencyClass, NothingEligible, RateLimitInfo, Reply, ResponseMeta, RetryBudget, Rng, Selection,
    Slot, StateStats, select,
};
use router_types::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
    CompletionResponse, EmbeddingRequest, EmbeddingResponse, Usage,
};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::config::RouterBuilder;
use crate::estimate;
use crate::estimate::Estimate;
use crate::limits::{Limiters, Permit};
use crate::reservation::{Reservation, Used};
use crate::snapshot::{Deployment, Group, RouterSnapshot};
use crate::waitlist::{Place, Waitlist};

/// The router's clock: tokio's, so that paused time in tests applies.
pub(crate) fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Many OpenAI and Azure OpenAI endpoints behind one client.
///
/// Cheap to clone (clones share everything) and safe to share across tasks. See the crate docs
/// for an example.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

struct Shared {
    snapshot: ArcSwap<Live>,
    origin: std::time::Instant,
    requests: AtomicU64,
    seed: u64,
    reload: Mutex<()>,
    waitlist: Waitlist,
    limiters: Limiters,
}

/// A snapshot with the retry budget that goes with its policy.
#[derive(Debug)]
struct Live {
    snapshot: RouterSnapshot,
    budget: RetryBudget,
}

/// Per-request options.
#[non_exhaustive]
#[derive(Debug, Clone, Default)]
pub struct RequestOptions {
    /// This request's deadline across all its attempts, instead of the router's
    /// `request_timeout`.
    pub timeout: Option<Duration>,
    /// Its class when it has to wait for quota: a lower class is served first; within a
    /// class, first come first served. Default 0.
    pub priority: u8,
    /// Who is calling, for the router's per-caller limits (a gateway key's name, a tenant).
    pub caller: Option<String>,
}

impl RequestOptions {
    /// Options with a timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Options naming the caller, for per-caller limits.
    #[must_use]
    pub fn with_caller(mut self, caller: impl Into<String>) -> Self {
        self.caller = Some(caller.into());
        self
    }

    /// Options with a waiting class (lower is served first).
    #[must_use]
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }
}

/// An answer and how the router got it. Dereferences to the body.
#[derive(Debug, Clone)]
pub struct Routed<T> {
    /// The upstream's answer.
    pub body: T,
    /// The endpoint that answered.
    pub endpoint: EndpointId,
    /// The deployment name it answered under.
    pub deployment: String,
    /// Attempts made, this one included.
    pub attempts: u32,
    /// Status, rate-limit headers and timings of the answering attempt.
    pub meta: ResponseMeta,
}

impl<T> Routed<T> {
    /// The body alone.
    pub fn into_body(self) -> T {
        self.body
    }
}

impl<T> Deref for Routed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.body
    }
}

/// One deployment's state, for dashboards and tests.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentStats {
    /// The endpoint.
    pub endpoint: EndpointId,
    /// The model group.
    pub model: String,
    /// The endpoint's name for it.
    pub deployment: String,
    /// Its weight.
    pub weight: u32,
    /// Its priority tier.
    pub priority: u32,
    /// In flight, latency estimates, availability and counters.
    pub state: StateStats,
}

impl Router {
    /// A builder.
    pub fn builder() -> RouterBuilder {
        RouterBuilder::default()
    }

    pub(crate) fn from_builder(builder: RouterBuilder) -> Result<Self, Error> {
        let origin = now();
        let seed = builder.seed.unwrap_or_else(|| Rng::new().fork_seed());
        // Token estimates (and so the tokenizers, tens of MB) only where something counts
        // tokens: an endpoint's quota, shared state, or a router-side token limit.
        let needs_estimates = builder.endpoints.iter().any(|e| e.limits.is_limited())
            || builder.store.is_some()
            || builder
                .group_limits
                .iter()
                .chain(&builder.caller_limits)
                .any(|(_, l)| l.counts_tokens())
            || builder
                .default_caller_limits
                .is_some_and(|l| l.counts_tokens());
        let snapshot = RouterSnapshot::build(builder, None, origin)?;
        if needs_estimates {
            crate::estimate::warm_up();
        }
        Ok(Self {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(Live::new(snapshot)),
                origin,
                requests: AtomicU64::new(0),
                seed,
                reload: Mutex::new(()),
                waitlist: Waitlist::default(),
                limiters: Limiters::default(),
            }),
        })
    }

    /// Replaces the configuration. Deployments whose endpoint and deployment name did not
    /// change keep their live state (in flight, latency, cooldowns) and connections; requests
    /// already running finish on the configuration they started with.
    ///
    /// # Errors
    ///
    /// A [`Config`](ErrorKind::Config) error naming the field; the old configuration stays.
    pub fn reconfigure(&self, builder: RouterBuilder) -> Result<(), Error> {
        let _one_at_a_time = self
            .shared
            .reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.shared.snapshot.load();
        let next = RouterSnapshot::build(builder, Some(&current.snapshot), self.shared.origin)?;
        self.shared.snapshot.store(Arc::new(Live::new(next)));
        Ok(())
    }

    /// The model groups served, sorted.
    pub fn models(&self) -> Vec<String> {
        self.shared
            .snapshot
            .load()
            .snapshot
            .models()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Every deployment's state now, in configuration order.
    pub fn stats(&self) -> Vec<DeploymentStats> {
        let live = self.shared.snapshot.load();
        let at = now();
        live.snapshot
            .deployments
            .iter()
            .map(|d| DeploymentStats {
                endpoint: d.endpoint.clone(),
                model: d.model.clone(),
                deployment: d.name.clone(),
                weight: d.weight,
                priority: d.priority,
                state: d.state.stats(at),
            })
            .collect()
    }

    /// A chat completion (not streamed).
    pub async fn chat(
        &self,
        request: &ChatCompletionRequest,
    ) -> Result<Routed<ChatCompletionResponse>, Error> {
        self.chat_with(request, &RequestOptions::default()).await
    }

    /// A chat completion with per-request options.
    pub async fn chat_with(
        &self,
        request: &ChatCompletionRequest,
        options: &RequestOptions,
    ) -> Result<Routed<ChatCompletionResponse>, Error> {
        let expected = self.expected_completion();
        self.execute(
            &request.model,
            LatencyClass::Generation,
            options,
            request.output_cap().unwrap_or(expected),
            || estimate::chat(request, expected),
            completion_tokens_chat,
            |body: &ChatCompletionResponse| used(body.usage.as_ref()),
            |d, call| {
                let request = renamed(request, &d.name);
                async move { d.backend.chat(&request, &call).await }
            },
        )
        .await
    }

    /// Embeddings.
    pub async fn embeddings(
        &self,
        request: &EmbeddingRequest,
    ) -> Result<Routed<EmbeddingResponse>, Error> {
        self.embeddings_with(request, &RequestOptions::default())
            .await
    }

    /// Embeddings with per-request options.
    pub async fn embeddings_with(
        &self,
        request: &EmbeddingRequest,
        options: &RequestOptions,
    ) -> Result<Routed<EmbeddingResponse>, Error> {
        self.execute(
            &request.model,
            LatencyClass::Call,
            options,
            0,
            || estimate::embeddings(request),
            |_| None,
            |body: &EmbeddingResponse| used(body.usage.as_ref()),
            |d, call| {
                let request = renamed(request, &d.name);
                async move { d.backend.embeddings(&request, &call).await }
            },
        )
        .await
    }

    /// A legacy completion (not streamed).
    pub async fn completions(
        &self,
        request: &CompletionRequest,
    ) -> Result<Routed<CompletionResponse>, Error> {
        self.completions_with(request, &RequestOptions::default())
            .await
    }

    /// A legacy completion with per-request options.
    pub async fn completions_with(
        &self,
        request: &CompletionRequest,
        options: &RequestOptions,
    ) -> Result<Routed<CompletionResponse>, Error> {
        let expected = self.expected_completion();
        self.execute(
            &request.model,
            LatencyClass::Generation,
            options,
            request.max_tokens.unwrap_or(16),
            || estimate::completions(request, expected),
            |body: &CompletionResponse| body.usage.as_ref().and_then(|u| u.completion_tokens),
            |body: &CompletionResponse| used(body.usage.as_ref()),
            |d, call| {
                let request = renamed(request, &d.name);
                async move { d.backend.completions(&request, &call).await }
            },
        )
        .await
    }

    fn expected_completion(&self) -> u32 {
        self.shared
            .snapshot
            .load()
            .snapshot
            .settings
            .expected_completion
    }

    fn rng(&self) -> Rng {
        let n = self.shared.requests.fetch_add(1, Ordering::Relaxed);
        Rng::with_seed(self.shared.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one generic pipeline for every operation"
    )]
    async fn execute<T, F, Fut>(
        &self,
        model: &str,
        class: LatencyClass,
        options: &RequestOptions,
        output_hint: u32,
        charge: impl FnOnce() -> Estimate,
        output_tokens: fn(&T) -> Option<u64>,
        used_tokens: fn(&T) -> Option<Used>,
        call: F,
    ) -> Result<Routed<T>, Error>
    where
        F: Fn(Arc<Deployment>, CallOptions) -> Fut,
        Fut: Future<Output = Result<Reply<T>, Error>>,
    {
        let mut attempt = Attempts::begin(self, model, options, charge)?;
        attempt.output_hint = output_hint;
        attempt.admit().await?;
        loop {
            let (deployment, guard, reservation) = attempt.next(class).await?;
            let started = Instant::now();
            let span = attempt.span(&deployment);
            let result = attempt
                .within_deadline(
                    call(Arc::clone(&deployment), attempt.call_options()).instrument(span),
                )
                .await;
            match result {
                Ok(reply) => {
                    let elapsed = started.elapsed();
                    let sample = match (class, output_tokens(&reply.body)) {
                        (LatencyClass::Generation, Some(tokens)) => {
                            elapsed / u32::try_from(tokens.max(1)).unwrap_or(u32::MAX)
                        }
                        _ => elapsed,
                    };
                    let at = now();
                    deployment.state.observe_latency(class, sample, at);
                    deployment.state.record_success();
                    Attempts::upstream_said(&deployment, &reply.meta.rate_limits, at);
                    if let Some(reservation) = reservation {
                        reservation
                            .settle(used_tokens(&reply.body), &reply.meta.rate_limits)
                            .await;
                    }
                    drop(guard);
                    return Ok(attempt.routed(reply, &deployment));
                }
                Err(error) => {
                    drop(guard);
                    if let Some(reservation) = reservation {
                        reservation.release().await;
                    }
                    attempt.failed(&deployment, error, class).await?;
                }
            }
        }
    }

    /// A streamed chat completion. Fails over to another deployment until the first content
    /// chunk arrives (events before it, such as Azure's prompt-filter event, are held back
    /// until then); after that, a failure is the stream's last item, never a retry, so no chunk
    /// reaches the caller twice.
    pub async fn chat_stream(
        &self,
        request: &ChatCompletionRequest,
    ) -> Result<RouterStream, Error> {
        self.chat_stream_with(request, &RequestOptions::default())
            .await
    }

    /// A streamed chat completion with per-request options.
    pub async fn chat_stream_with(
        &self,
        request: &ChatCompletionRequest,
        options: &RequestOptions,
    ) -> Result<RouterStream, Error> {
        let class = LatencyClass::Stream;
        let expected = self.expected_completion();
        let mut attempt = Attempts::begin(self, &request.model, options, || {
            estimate::chat(request, expected)
        })?;
        attempt.output_hint = request.output_cap().unwrap_or(expected);
        attempt.admit().await?;
        loop {
            let (deployment, guard, reservation) = attempt.next(class).await?;
            let span = attempt.span(&deployment);
            let call = attempt.call_options();
            let mut request = renamed(request, &deployment.name);
            // To account its tokens, ask for the usage chunk; the caller, who did not, never sees it.
            let inject = reservation.is_some()
                && deployment.stream_usage
                && request
                    .stream_options
                    .as_ref()
                    .and_then(|o| o.include_usage)
                    != Some(true);
            if inject {
                request
                    .to_mut()
                    .stream_options
                    .get_or_insert_with(Default::default)
                    .include_usage = Some(true);
            }
            let backend = Arc::clone(&deployment.backend);
            let started = Instant::now();
            let opened = attempt
                .within_deadline(
                    async move { first_content(backend.chat_stream(&request, &call).await?).await }
                        .instrument(span),
                )
                .await;
            match opened {
                Ok(Opened {
                    stream,
                    held,
                    ended,
                }) => {
                    let at = now();
                    let ttft = stream
                        .time_to_first_content()
                        .or_else(|| stream.time_to_first_event())
                        .unwrap_or_else(|| started.elapsed());
                    deployment.state.observe_latency(class, ttft, at);
                    Attempts::upstream_said(&deployment, &stream.meta().rate_limits, at);
                    let mut routed = RouterStream {
                        info: stream.meta().rate_limits.clone(),
                        held,
                        inner: Some(stream),
                        guard: Some(guard),
                        endpoint: deployment.endpoint.clone(),
                        attempts: attempt.count,
                        health: attempt.live.snapshot.settings.health,
                        deployment,
                        reservation,
                        strip_usage: inject,
                        used: None,
                        _permit: attempt.permit.take(),
                    };
                    if ended {
                        routed.finish(None);
                    }
                    return Ok(routed);
                }
                Err(error) => {
                    drop(guard);
                    if let Some(reservation) = reservation {
                        reservation.release().await;
                    }
                    attempt.failed(&deployment, error, class).await?;
                }
            }
        }
    }
}

/// A stream opened up to its first content chunk.
struct Opened {
    stream: ChatStream,
    held: VecDeque<ChatCompletionChunk>,
    ended: bool,
}

async fn first_content(mut stream: ChatStream) -> Result<Opened, Error> {
    let mut held = VecDeque::new();
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await {
            Some(Ok(chunk)) => {
                let content = chunk.has_content();
                held.push_back(chunk);
                if content {
                    return Ok(Opened {
                        stream,
                        held,
                        ended: false,
                    });
                }
            }
            Some(Err(error)) => return Err(error),
            None => {
                return Ok(Opened {
                    stream,
                    held,
                    ended: true,
                });
            }
        }
    }
}

fn used(usage: Option<&Usage>) -> Option<Used> {
    usage.map(|u| Used {
        prompt: u.prompt_tokens,
        total: u.total_tokens,
    })
}

fn completion_tokens_chat(body: &ChatCompletionResponse) -> Option<u64> {
    body.usage
        .as_ref()
        .and_then(|u: &Usage| u.completion_tokens)
}

/// A request whose `model` the router rewrites to each endpoint's deployment name.
trait Named: Clone {
    fn model(&self) -> &str;
    fn set_model(&mut self, model: String);
}

macro_rules! named {
    ($($t:ty),*) => {$(
        impl Named for $t {
            fn model(&self) -> &str {
                &self.model
            }
            fn set_model(&mut self, model: String) {
                self.model = model;
            }
        }
    )*};
}
named!(ChatCompletionRequest, EmbeddingRequest, CompletionRequest);

/// The request with its model renamed to the deployment; copied only when the names differ.
fn renamed<'a, R: Named>(request: &'a R, deployment: &str) -> Cow<'a, R> {
    if request.model() == deployment {
        return Cow::Borrowed(request);
    }
    let mut copy = request.clone();
    copy.set_model(deployment.to_owned());
    Cow::Owned(copy)
}

/// The attempts of one request: the snapshot it started with, its deadline, what it tried,
/// what it reserves, and its place when it waits.
struct Attempts<'r> {
    router: &'r Router,
    live: Arc<Live>,
    model: &'r str,
    deadline: Instant,
    tried: Vec<bool>,
    count: u32,
    rng: Rng,
    buffers: Selection,
    last_error: Option<Error>,
    /// The request's cost, when a deployment of the group has a quota or the store is shared.
    estimate: Option<Estimate>,
    priority: u8,
    place: Option<Place>,
    /// Attempts that count against `max_attempts` and the retry budget.
    charged: u32,
    /// The last attempt was refused with a 429.
    after_rate_limit: bool,
    /// Output tokens the request expects (its cap), to estimate how long it takes.
    output_hint: u32,
    /// The router-side limits that apply, and the slots they granted.
    scopes: Vec<(String, crate::RateLimits)>,
    permit: Option<Permit>,
}

impl<'r> Attempts<'r> {
    fn begin(
        router: &'r Router,
        model: &'r str,
        options: &RequestOptions,
        charge: impl FnOnce() -> Estimate,
    ) -> Result<Self, Error> {
        let live = router.shared.snapshot.load_full();
        let Some(group) = live.snapshot.groups.get(model) else {
            return Err(Error::with_message(
                ErrorKind::UnknownModel,
                format!(
                    "model `{model}` is not served here; known models: {}",
                    live.snapshot.models().join(", ")
                ),
            ));
        };
        let members = group.members.len();
        let scopes = live
            .snapshot
            .settings
            .scopes(model, options.caller.as_deref());
        let accounted = live.snapshot.store.is_shared()
            || scopes.iter().any(|(_, l)| l.counts_tokens())
            || group
                .members
                .iter()
                .any(|d| d.state.limits(&d.limits).is_limited());
        let timeout = options
            .timeout
            .unwrap_or(live.snapshot.settings.request_timeout);
        live.budget.deposit();
        Ok(Self {
            deadline: Instant::now() + timeout,
            tried: vec![false; members],
            count: 0,
            rng: router.rng(),
            buffers: Selection::default(),
            last_error: None,
            estimate: accounted.then(charge),
            priority: options.priority,
            place: None,
            charged: 0,
            after_rate_limit: false,
            output_hint: 0,
            scopes,
            permit: None,
            router,
            model,
            live,
        })
    }

    /// Passes the router-side limits (waiting for room within the deadline).
    async fn admit(&mut self) -> Result<(), Error> {
        if self.scopes.is_empty() {
            return Ok(());
        }
        let charge = self.estimate.map_or(
            router_core::Charge {
                tokens: 0,
                requests: 1,
            },
            |e| e.charge,
        );
        let permit = self
            .router
            .shared
            .limiters
            .admit(&self.scopes, charge, self.deadline)
            .await?;
        self.permit = Some(permit);
        Ok(())
    }

    fn group(&self) -> &Group {
        // `begin` checked that the group exists in this snapshot, which never changes.
        &self.live.snapshot.groups[self.model]
    }

    /// Picks the next deployment, reserves its quota and starts a request on it; waits (in
    /// order) when nothing can take the request yet but something will before the deadline;
    /// the error when there is nothing, the attempts are spent, the budget is, or the deadline
    /// has passed.
    async fn next(
        &mut self,
        class: LatencyClass,
    ) -> Result<(Arc<Deployment>, InFlightGuard, Option<Reservation>), Error> {
        let settings = &self.live.snapshot.settings;
        if Instant::now() >= self.deadline {
            return Err(self.give_up());
        }
        // A failover after a 429 is free: the throttled deployment cools down, so it cannot
        // storm, and the request must not fail while another deployment (or this one, later)
        // has room.
        if self.count > 0 && !self.after_rate_limit {
            let spent = self.charged >= settings.retry.max_attempts;
            if spent || !self.live.budget.try_withdraw() {
                return Err(self.give_up());
            }
        }
        if !self.after_rate_limit || self.count == 0 {
            self.charged += 1;
        }
        let live = Arc::clone(&self.live);
        let group = &live.snapshot.groups[self.model];
        let waitlist = &self.router.shared.waitlist;
        // Someone waits already: queue behind them, first come first served within a class.
        if self.place.is_none() && self.count == 0 && !waitlist.is_empty() {
            self.join_waitlist();
        }
        let mut refusals = 0;
        loop {
            if let Some(place) = &self.place {
                waitlist.until_first(place, self.deadline).await;
            }
            let at = now();
            let slots: Vec<Slot<'_>> = group
                .members
                .iter()
                .map(|d| {
                    let limits = d.state.limits(&d.limits);
                    let (headroom, ready_at) = match self.estimate.map(|e| e.charge) {
                        Some(charge) if limits.is_limited() => (
                            d.state.quota.headroom(&limits, at),
                            d.state.quota.available_at(&limits, charge, at),
                        ),
                        _ => (None, None),
                    };
                    Slot {
                        state: &d.state,
                        weight: d.weight,
                        priority: d.priority,
                        headroom,
                        ready_at,
                    }
                })
                .collect();
            let tried = &self.tried;
            let picked = select(
                &slots,
                |i| tried[i],
                class,
                group.strategy.as_ref(),
                at,
                &mut self.rng,
                &mut self.buffers,
            );
            let index = match picked {
                Ok(index) => index,
                Err(nothing) => {
                    let waitable = self.last_error.as_ref().is_none_or(Error::is_rate_limited);
                    if waitable && self.may_wait(nothing.soonest, class).await {
                        continue;
                    }
                    return Err(self.nothing_eligible(nothing));
                }
            };
            let deployment = Arc::clone(&group.members[index]);
            let Ok(reservation) = self.reserve(&deployment, at).await else {
                // The store said no (another replica used the quota, or shares a cooldown):
                // the view now knows; choose again.
                refusals += 1;
                if refusals > group.members.len() * 4 {
                    // Replicas keep taking the room first: throttle, and say when to retry.
                    let soonest = Some(now() + Duration::from_millis(100));
                    return Err(self.nothing_eligible(NothingEligible {
                        soonest,
                        all_tried: false,
                    }));
                }
                continue;
            };
            self.tried[index] = true;
            self.count += 1;
            if let Some(place) = self.place.take() {
                waitlist.leave(place);
            }
            tracing::trace!(
                model = self.model,
                endpoint = %deployment.endpoint,
                strategy = group.strategy.name(),
                attempt = self.count,
                "picked"
            );
            let guard = deployment.state.start();
            return Ok((deployment, guard, reservation));
        }
    }

    /// Reserves the request's cost on `deployment`; `Err` when the store refused.
    async fn reserve(
        &self,
        deployment: &Deployment,
        at: std::time::Instant,
    ) -> Result<Option<Reservation>, ()> {
        let Some(estimate) = self.estimate else {
            return Ok(None);
        };
        let charge = estimate.charge;
        let limits = deployment.state.limits(&deployment.limits);
        let store = &self.live.snapshot.store;
        if !limits.is_limited() && !store.is_shared() {
            return Ok(None);
        }
        match store.reserve(&deployment.key, &limits, charge, at).await {
            Ok(Admission::Admitted {
                tokens_left,
                requests_left,
            }) => {
                deployment
                    .state
                    .quota
                    .update(tokens_left, requests_left, at);
                Ok(Some(Reservation::new(
                    Arc::clone(store),
                    Arc::clone(&deployment.key),
                    limits,
                    estimate,
                    self.live.snapshot.settings.accounting,
                )))
            }
            Ok(Admission::Denied {
                retry_after,
                cooling,
            }) => {
                if cooling {
                    deployment.state.cool_down_shared(retry_after, at);
                } else {
                    deployment.state.quota.block(retry_after, at);
                }
                Err(())
            }
            Err(error) => {
                // A store that fails must not fail the request: route on the local view.
                tracing::debug!(key = %deployment.key, %error, "quota store unavailable; not reserving");
                Ok(None)
            }
        }
    }

    /// Waits for the soonest recovery when it comes before the deadline and the waitlist has
    /// room; `Ok(false)` when the request should fail now instead.
    async fn may_wait(&mut self, soonest: Option<std::time::Instant>, class: LatencyClass) -> bool {
        let Some(soonest) = soonest else {
            return false;
        };
        let until = Instant::from_std(soonest);
        // Worth waiting only if the request can still be served before its deadline.
        let service = self.expected_service(class).mul_f64(1.5);
        if until + service > self.deadline || (self.place.is_none() && !self.join_waitlist()) {
            return false;
        }
        tokio::time::sleep_until(until).await;
        true
    }

    /// How long the fastest deployment is expected to take to serve this request.
    fn expected_service(&self, class: LatencyClass) -> Duration {
        let at = now();
        let tokens = match class {
            LatencyClass::Generation => f64::from(self.output_hint.max(1)),
            LatencyClass::Stream | LatencyClass::Call => 1.0,
        };
        let fastest = self
            .group()
            .members
            .iter()
            .map(|d| d.state.latency(class, at))
            .fold(f64::INFINITY, f64::min);
        if fastest.is_finite() {
            Duration::from_secs_f64((fastest * tokens).max(0.0))
        } else {
            Duration::ZERO
        }
    }

    /// Takes a place on the waitlist; `false` when it is full.
    fn join_waitlist(&mut self) -> bool {
        let max = self.live.snapshot.settings.max_waiting;
        self.place = self.router.shared.waitlist.join(self.priority, max);
        self.place.is_some()
    }

    /// Learns from an answer's rate-limit headers: limits announced, and how much is left.
    fn upstream_said(deployment: &Deployment, info: &RateLimitInfo, at: std::time::Instant) {
        deployment.state.learn(info);
        let limits = deployment.state.limits(&deployment.limits);
        let (tokens, requests) = router_core::upstream_allowance(&limits, info);
        deployment
            .state
            .quota
            .correct(&limits, tokens, requests, at);
    }

    fn span(&self, deployment: &Deployment) -> tracing::Span {
        tracing::debug_span!(
            "attempt",
            model = self.model,
            endpoint = %deployment.endpoint,
            deployment = %deployment.name,
            attempt = self.count,
        )
    }

    fn call_options(&self) -> CallOptions {
        CallOptions::default().with_deadline(self.deadline.into_std())
    }

    async fn within_deadline<T>(
        &self,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout_at(self.deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(Error::with_message(
                ErrorKind::DeadlineExceeded,
                format!(
                    "no answer for `{}` within the request's deadline",
                    self.model
                ),
            )),
        }
    }

    /// Records a failed attempt; `Ok` when another may follow.
    async fn failed(
        &mut self,
        deployment: &Deployment,
        error: Error,
        class: LatencyClass,
    ) -> Result<(), Error> {
        if error.kind() == ErrorKind::DeadlineExceeded || Instant::now() >= self.deadline {
            // The request's own budget ran out: not the endpoint's fault.
            return Err(match error.kind() {
                ErrorKind::DeadlineExceeded => error,
                _ => Error::with_message(
                    ErrorKind::DeadlineExceeded,
                    format!("the request's deadline passed; last attempt: {error}"),
                ),
            });
        }
        let health = self.live.snapshot.settings.health;
        let at = now();
        deployment
            .state
            .record_failure(&error, class, &health, at, &mut self.rng);
        if error.is_rate_limited() {
            // Tell the other replicas, through a shared store.
            let wait = error
                .retry_after()
                .unwrap_or(health.rate_limit_cooldown)
                .min(health.max_rate_limit_cooldown);
            let _ = self
                .live
                .snapshot
                .store
                .cool_down(&deployment.key, wait, at)
                .await;
        }
        if matches!(
            deployment.state.availability(now()),
            Availability::Disabled(_)
        ) {
            tracing::warn!(endpoint = %deployment.endpoint, deployment = %deployment.name, %error, "deployment disabled until reconfigured");
        }
        if !error.is_retryable() {
            return Err(error);
        }
        tracing::debug!(endpoint = %deployment.endpoint, attempt = self.count, %error, "failing over");
        self.after_rate_limit = error.is_rate_limited();
        if self.after_rate_limit {
            // Its cooldown keeps it out until it has room again; then it may be tried again.
            if let Some(index) = self
                .group()
                .members
                .iter()
                .position(|d| std::ptr::eq(&raw const **d, deployment))
            {
                self.tried[index] = false;
            }
        }
        self.last_error = Some(error);
        Ok(())
    }

    fn give_up(&mut self) -> Error {
        if let Some(place) = self.place.take() {
            self.router.shared.waitlist.leave(place);
        }
        if self.last_error.as_ref().is_some_and(Error::is_rate_limited) {
            let at = now();
            let soonest = self
                .group()
                .members
                .iter()
                .filter_map(|d| match d.state.availability(at) {
                    Availability::RateLimited(until) | Availability::Ejected(until) => Some(until),
                    _ => None,
                })
                .min();
            return self.nothing_eligible(NothingEligible {
                soonest,
                all_tried: false,
            });
        }
        self.last_error.take().unwrap_or_else(|| {
            Error::with_message(
                ErrorKind::Unavailable,
                format!("no attempt left for `{}`", self.model),
            )
        })
    }

    fn nothing_eligible(&mut self, nothing: NothingEligible) -> Error {
        if let Some(place) = self.place.take() {
            self.router.shared.waitlist.leave(place);
        }
        let mut soonest = nothing.soonest;
        if let Some(error) = self.last_error.take() {
            if !error.is_rate_limited() {
                return error;
            }
            // An upstream's 429 never reaches the caller: the router throttles instead.
            soonest = soonest.or_else(|| Some(now() + error.retry_after().unwrap_or_default()));
        }
        let members = self.group().members.len();
        let Some(at) = soonest else {
            return Error::with_message(
                ErrorKind::Unavailable,
                format!(
                    "no deployment of `{}` can serve the request (all {members} disabled or tried)",
                    self.model
                ),
            );
        };
        Error::with_message(
            ErrorKind::Throttled,
            format!(
                "no deployment of `{}` has room for the request before its deadline (all {members} out of quota or cooling down)",
                self.model
            ),
        )
        .with_retry_after(at.saturating_duration_since(now()))
    }

    fn routed<T>(&self, reply: Reply<T>, deployment: &Deployment) -> Routed<T> {
        Routed {
            body: reply.body,
            endpoint: deployment.endpoint.clone(),
            deployment: deployment.name.clone(),
            attempts: self.count,
            meta: reply.meta,
        }
    }
}

impl Drop for Attempts<'_> {
    fn drop(&mut self) {
        if let Some(place) = self.place.take() {
            self.router.shared.waitlist.leave(place);
        }
    }
}

impl Live {
    fn new(snapshot: RouterSnapshot) -> Self {
        let retry = snapshot.settings.retry;
        Self {
            budget: RetryBudget::new(
                retry.budget_ratio,
                retry.budget_min,
                retry.budget_min.max(100),
            ),
            snapshot,
        }
    }
}

/// A routed chat completion stream: the upstream's chunks, then the end, or one error item.
///
/// Holds the deployment's in-flight slot until it ends or is dropped; its success or failure
/// is recorded when it ends.
pub struct RouterStream {
    held: VecDeque<ChatCompletionChunk>,
    inner: Option<ChatStream>,
    guard: Option<InFlightGuard>,
    deployment: Arc<Deployment>,
    endpoint: EndpointId,
    attempts: u32,
    health: router_core::HealthPolicy,
    reservation: Option<Reservation>,
    /// The router asked for the usage chunk; the caller did not: drop it.
    strip_usage: bool,
    used: Option<Used>,
    info: RateLimitInfo,
    /// Router-side concurrency slots, held until the stream ends or drops.
    _permit: Option<Permit>,
}

impl RouterStream {
    /// The endpoint streaming.
    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// Attempts made to open it, this one included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    fn finish(&mut self, error: Option<&Error>) {
        match error {
            None => {
                self.deployment.state.record_success();
                if let Some(reservation) = self.reservation.take() {
                    reservation.settle_detached(self.used, &self.info);
                }
            }
            Some(error) => {
                self.deployment.state.record_failure(
                    error,
                    LatencyClass::Stream,
                    &self.health,
                    now(),
                    &mut Rng::new(),
                );
                if let Some(reservation) = self.reservation.take() {
                    reservation.release_detached();
                }
            }
        }
        self.inner = None;
        self.guard = None;
    }

    /// Notes a usage chunk; `true` when the caller must not see it.
    fn usage_chunk(&mut self, chunk: &ChatCompletionChunk) -> bool {
        if chunk.choices.is_empty()
            && let Some(usage) = &chunk.usage
        {
            self.used = used(Some(usage));
            return self.strip_usage;
        }
        false
    }
}

impl Stream for RouterStream {
    type Item = Result<ChatCompletionChunk, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while let Some(chunk) = this.held.pop_front() {
            if !this.usage_chunk(&chunk) {
                return Poll::Ready(Some(Ok(chunk)));
            }
        }
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            return match Pin::new(inner).poll_next(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    if this.usage_chunk(&chunk) {
                        continue;
                    }
                    Poll::Ready(Some(Ok(chunk)))
                }
                Poll::Ready(Some(Err(error))) => {
                    this.finish(Some(&error));
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Ready(None) => {
                    this.finish(None);
                    Poll::Ready(None)
                }
            };
        }
    }
}

impl fmt::Debug for RouterStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterStream")
            .field("endpoint", &self.endpoint)
            .field("attempts", &self.attempts)
            .field("held", &self.held.len())
            .field("open", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("models", &self.models())
            .finish_non_exhaustive()
    }
}
