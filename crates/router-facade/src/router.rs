//! The public [`Router`]: what a caller holds. Each call goes down the request path (the
//! `path` module) with the operation of its kind.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use router_core::{Error, Rng, StoredCall};
use router_types::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    CreateResponse, EmbeddingRequest, EmbeddingResponse, Response, ResponseStreamEvent,
};

use crate::builder::RouterBuilder;
use crate::clock::now;
use crate::limits::Limiters;
use crate::operation::{Once, Streamed};
use crate::options::{DeploymentStats, RequestOptions, Routed, Waiting};
use crate::path::run;
use crate::shared::{Budget, Shared};
use crate::snapshot::RouterSnapshot;
use crate::stream::RouterStream;
use crate::waitlist::Waitlist;

/// Many OpenAI and Azure OpenAI endpoints behind one client.
///
/// Cheap to clone (clones share everything) and safe to share across tasks. See the crate docs
/// for an example.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

impl Router {
    /// A builder.
    pub fn builder() -> RouterBuilder {
        RouterBuilder::default()
    }

    pub(crate) fn from_builder(builder: &RouterBuilder) -> Result<Self, Error> {
        let origin = now();
        let seed = builder.seed.unwrap_or_else(|| Rng::new().fork_seed());
        let policy = builder.retry;
        let snapshot = RouterSnapshot::build(builder, None, origin)?;
        if snapshot.may_count_tokens {
            crate::estimate::warm_up();
        }
        let prober = Arc::clone(&snapshot.prober);
        let router = Self {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(snapshot),
                waitlist: Waitlist::default(),
                limiters: Limiters::default(),
                budget: ArcSwap::from_pointee(Budget::new(policy)),
                origin,
                requests: AtomicU64::new(0),
                seed,
                reload: Mutex::new(()),
                affinities: crate::affinity::Affinities::default(),
            }),
        };
        let home = Arc::downgrade(&router.shared);
        prober.set_start(Box::new(move |wake| {
            tokio::spawn(crate::prober::probe_forever(home.clone(), wake));
        }));
        Ok(router)
    }

    /// Replaces the configuration. Deployments whose endpoint and deployment name did not
    /// change keep their live state (in flight, latency, cooldowns) and connections; requests
    /// already running finish on the configuration they started with. The retry budget is
    /// kept while the retry policy stays the same.
    ///
    /// A kept deployment that is out (disabled, or cooling for long: see
    /// [`DeploymentStats`]) is probed at once: reloading is how an operator who fixed
    /// something upstream says "look again" without a restart.
    ///
    /// # Errors
    ///
    /// A [`Config`](router_core::ErrorKind::Config) error naming the field; the old
    /// configuration stays.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "a builder is used up, as by `build`"
    )]
    pub fn reconfigure(&self, builder: RouterBuilder) -> Result<(), Error> {
        let shared = &self.shared;
        let _one_at_a_time = shared.reload.lock().unwrap_or_else(PoisonError::into_inner);
        let policy = builder.retry;
        let current = shared.snapshot.load();
        let next = RouterSnapshot::build(&builder, Some(&current), shared.origin)?;
        if next.may_count_tokens {
            crate::estimate::warm_up();
        }
        let at = now();
        let mut look = false;
        for deployment in &next.deployments {
            look |= deployment.state.probe_now(at);
        }
        let prober = Arc::clone(&next.prober);
        shared.snapshot.store(Arc::new(next));
        if shared.budget.load().policy != policy {
            shared.budget.store(Arc::new(Budget::new(policy)));
        }
        if look {
            prober.kick();
        }
        Ok(())
    }

    /// The model groups served, sorted.
    pub fn models(&self) -> Vec<String> {
        self.shared
            .snapshot
            .load()
            .models()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Whether `model` is a model group served here (without allocating).
    pub fn serves(&self, model: &str) -> bool {
        self.shared.snapshot.load().groups.contains_key(model)
    }

    /// Requests waiting for a turn now (queued by the router's limits or a full model group).
    pub fn waiting(&self) -> usize {
        self.shared.waitlist.count()
    }

    /// Requests waiting for a turn now, by lane (a model group, or a router-side limit's
    /// scope: `caller:team-a`, `group:gpt-4o`) and priority class (lower is served first).
    pub fn queue(&self) -> Vec<Waiting> {
        self.shared
            .waitlist
            .by_lane()
            .into_iter()
            .map(|(lane, priority, count)| Waiting {
                lane,
                priority,
                count,
            })
            .collect()
    }

    /// Whether the state store is shared with other replicas right now: `false` for the
    /// in-process store, and for a shared one (Redis) answering from its local share while it
    /// is away.
    pub fn state_shared(&self) -> bool {
        self.shared.snapshot.load().store.is_shared()
    }

    /// Calls the shared state store answered from its local share (it failed or was slower
    /// than its timeout), since it started: each may admit beyond the shared limit, up to the
    /// local share. Zero for an in-process store.
    pub fn state_fallbacks(&self) -> u64 {
        self.shared.snapshot.load().store.fallbacks()
    }

    /// Quota reservations not yet settled or released, in this process (all routers
    /// together): a request holds one from admission until its answer (a stream's end) is
    /// settled. Zero when nothing is in flight; a number that stays up after the load is a
    /// leak.
    pub fn open_reservations(&self) -> usize {
        crate::reservation::LIVE.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every deployment's state now, in configuration order.
    pub fn stats(&self) -> Vec<DeploymentStats> {
        let snapshot = self.shared.snapshot.load();
        let at = now();
        snapshot
            .deployments
            .iter()
            .map(|d| DeploymentStats {
                endpoint: d.endpoint.clone(),
                model: d.model.clone(),
                deployment: d.name.clone(),
                weight: d.weight,
                priority: d.priority,
                state: d.state.stats(at),
                quota: d.quota_stats(at),
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
        run(&self.shared, Once::of(request), options).await
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
        run(&self.shared, Once::of(request), options).await
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
        run(&self.shared, Once::of(request), options).await
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
        run(&self.shared, Streamed::of(request), options).await
    }

    /// A response (the Responses API), not streamed: routed, failed over and accounted as a
    /// chat completion is. The upstream keeps what it answers (unless `store: false`): the
    /// request is never copied to probe another deployment, and the router remembers, in its
    /// state store (shared across replicas when the store is), which deployment stored each
    /// response for 30 days. A request that continues one (`previous_response_id`) goes to
    /// that deployment only, with no failover or fallback, and its error names it; one the
    /// router did not place is refused when its group has more than one deployment.
    pub async fn responses(&self, request: &CreateResponse) -> Result<Routed<Response>, Error> {
        self.responses_with(request, &RequestOptions::default())
            .await
    }

    /// A response with per-request options.
    pub async fn responses_with(
        &self,
        request: &CreateResponse,
        options: &RequestOptions,
    ) -> Result<Routed<Response>, Error> {
        run(&self.shared, Once::of(request), options).await
    }

    /// A streamed response: the upstream's named events, ending with `response.completed`;
    /// failed over until the first output arrives, as a chat stream is.
    pub async fn responses_stream(
        &self,
        request: &CreateResponse,
    ) -> Result<RouterStream<ResponseStreamEvent>, Error> {
        self.responses_stream_with(request, &RequestOptions::default())
            .await
    }

    /// A streamed response with per-request options.
    pub async fn responses_stream_with(
        &self,
        request: &CreateResponse,
        options: &RequestOptions,
    ) -> Result<RouterStream<ResponseStreamEvent>, Error> {
        run(&self.shared, Streamed::of(request), options).await
    }

    /// The model group whose deployment stored response `id`, when this router (or another
    /// sharing its state store) placed it: what a gateway authorizes a caller against before
    /// [`stored_response`](Self::stored_response).
    pub async fn stored_response_model(&self, id: &str) -> Option<String> {
        let live = self.shared.snapshot.load_full();
        crate::path::locate(&live, id).await.map(|(model, _)| model)
    }

    /// A call on a stored response (retrieve, delete, list its input items, cancel), sent to
    /// the deployment that stored it, once (no failover: no other deployment has it); the
    /// upstream's answer as sent. An error naming the id when the router did not place it.
    pub async fn stored_response(
        &self,
        id: &str,
        call: StoredCall,
    ) -> Result<Routed<serde_json::Value>, Error> {
        self.stored_response_with(id, call, &RequestOptions::default())
            .await
    }

    /// A call on a stored response with per-request options (its timeout).
    pub async fn stored_response_with(
        &self,
        id: &str,
        call: StoredCall,
        options: &RequestOptions,
    ) -> Result<Routed<serde_json::Value>, Error> {
        let live = self.shared.snapshot.load_full();
        let timeout = options.timeout.unwrap_or(live.settings.request_timeout);
        crate::path::stored_call(&live, id, call, timeout).await
    }

    /// A streamed legacy completion: routed, failed over and accounted as
    /// [`chat_stream`](Self::chat_stream) is; its chunks are legacy completions' (`text`
    /// choices).
    pub async fn completions_stream(
        &self,
        request: &CompletionRequest,
    ) -> Result<RouterStream<CompletionResponse>, Error> {
        self.completions_stream_with(request, &RequestOptions::default())
            .await
    }

    /// A streamed legacy completion with per-request options.
    pub async fn completions_stream_with(
        &self,
        request: &CompletionRequest,
        options: &RequestOptions,
    ) -> Result<RouterStream<CompletionResponse>, Error> {
        run(&self.shared, Streamed::of(request), options).await
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("models", &self.models())
            .finish_non_exhaustive()
    }
}
