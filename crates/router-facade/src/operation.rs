//! What differs between the kinds of request the router serves, and nothing else: how a request
//! is estimated, sent to one deployment, and turned into the caller's answer. The one attempt
//! loop (the `path` module) serves them all.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use router_core::{Backend, CallOptions, EndpointId, Error, LatencyClass, Reply};
use router_types::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    CreateResponse, EmbeddingRequest, EmbeddingResponse, Response, ResponseStreamEvent,
    StreamOptions, Usage,
};

use crate::attempt::Attempt;
use crate::estimate::{self, Estimate};
use crate::options::{Routed, Served, TokensUsed};
use crate::reservation::Used;
use crate::stream::{Opened, RouterStream, first_content};

type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// Sends `operation` (a copy of a caller's request, [`Operation::owned`]) on `attempt` until
/// `deadline`, for the deployment's latency alone: a shadow probe. Answered, it is completed as
/// a caller's would be (the answer then finished, [`Operation::finish`], and dropped); failed,
/// the error's effect; cut at its deadline, cancelled (the probe's own budget ran out, not the
/// deployment's fault).
pub(crate) async fn shadow<O: Operation>(
    operation: O,
    attempt: Attempt,
    call: CallOptions,
    deadline: tokio::time::Instant,
) {
    let started = tokio::time::Instant::now();
    match tokio::time::timeout_at(deadline, operation.send(&attempt, call)).await {
        Ok(Ok(sent)) => {
            let output = operation
                .complete(
                    sent,
                    attempt,
                    Served {
                        attempts: 1,
                        caller: None,
                        waited: Duration::ZERO,
                    },
                    started.elapsed(),
                )
                .await;
            let _ = tokio::time::timeout_at(deadline, O::finish(output)).await;
        }
        Ok(Err(error)) => attempt.failed(&error).await,
        Err(_) => attempt.cancelled().await,
    }
}

/// One kind of request.
pub(crate) trait Operation: Sync {
    /// What a successful send gives.
    type Sent: Send;
    /// What the caller gets.
    type Output: Send;
    /// The same request, owned, to send in the background ([`shadow`]).
    type Owned: Operation<Output = Self::Output> + Send + 'static;

    /// The model group asked for.
    fn model(&self) -> &str;
    /// The latency signal it feeds and is routed on.
    fn class(&self) -> LatencyClass;
    /// Its cost for quotas; `expected` is the configured output for requests without a cap.
    fn estimate(&self, expected: u32) -> Estimate;
    /// The output tokens it expects, to estimate how long serving it takes.
    fn output_hint(&self, expected: u32) -> u32;
    /// What tells a retry of this request from another request (the same body, the same
    /// fingerprint): a promised turn is kept for the request it was promised to.
    fn fingerprint(&self) -> u64;
    /// Sends it to the attempt's deployment.
    fn send<'a>(&'a self, attempt: &Attempt, call: CallOptions) -> Call<'a, Self::Sent>;
    /// The same request, owned.
    fn owned(&self) -> Self::Owned;
    /// Whether a copy may be sent besides it (a shadow probe): not for a request whose
    /// upstream keeps state (a stored response would be stored twice).
    fn copyable(&self) -> bool {
        true
    }
    /// The id of the stored state it continues (`previous_response_id`): only the deployment
    /// that stored it can serve it.
    fn continues(&self) -> Option<&str> {
        None
    }
    /// Its prompt-cache key in the body: `prompt_cache_key`, else `user`.
    fn cache_key(&self) -> Option<&str> {
        None
    }
    /// Who served `output`, for the request's span: the endpoint, the deployment, the
    /// attempts, and the tokens when already known (a stream's come at its end).
    fn served(output: &Self::Output) -> (&EndpointId, &str, u32, Option<TokensUsed>);
    /// The id under which the upstream stored what `output` answered, for the requests that
    /// continue it.
    fn stored(&self, output: &Self::Output) -> Option<String> {
        let _ = output;
        None
    }
    /// Ends an answer nobody waits for (a shadow probe's): a stream is read to its end, so that
    /// its outcome is recorded as a caller's would be.
    fn finish(output: Self::Output) -> impl Future<Output = ()> + Send;
    /// The caller's answer, ending the attempt (a stream keeps it until the stream ends).
    fn complete(
        &self,
        sent: Self::Sent,
        attempt: Attempt,
        served: Served,
        took: Duration,
    ) -> impl Future<Output = Self::Output> + Send;
}

/// A request whose `model` the router rewrites to each endpoint's deployment name.
pub(crate) trait Named: Clone {
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
named!(
    ChatCompletionRequest,
    EmbeddingRequest,
    CompletionRequest,
    CreateResponse
);

/// A request answered in one body.
pub(crate) trait Plain: Named + Send + Sync + serde::Serialize {
    type Response: Send;
    const CLASS: LatencyClass;
    /// The call a health probe of a deployment it was sent to makes.
    fn probe_kind(&self) -> router_core::CallKind;
    fn estimate(&self, expected: u32) -> Estimate;
    fn output_hint(&self, expected: u32) -> u32;
    /// The answer's usage, when it reports one.
    fn usage(response: &Self::Response) -> Option<&Usage>;
    /// Output tokens generated, for the per-token latency sample of generations.
    fn output_tokens(response: &Self::Response) -> Option<u64> {
        Self::usage(response).and_then(|u| u.completion_tokens)
    }
    fn used(response: &Self::Response) -> Option<Used> {
        Self::usage(response).map(Used::from)
    }
    /// Whether a copy may be sent besides it ([`Operation::copyable`]).
    fn copyable(&self) -> bool {
        true
    }
    /// [`Operation::continues`].
    fn continues(&self) -> Option<&str> {
        None
    }
    /// [`Operation::cache_key`].
    fn cache_key(&self) -> Option<&str> {
        None
    }
    /// The service tier it asks for (`service_tier`).
    fn asked_tier(&self) -> Option<&str> {
        None
    }
    /// The service tier the answer says served it.
    fn served_tier(response: &Self::Response) -> Option<&str> {
        let _ = response;
        None
    }
    /// Whether the upstream stores what it answers.
    fn stores(&self) -> bool {
        false
    }
    /// The id the answer is stored under, when the upstream stores it.
    fn stored_id(response: &Self::Response) -> Option<&str> {
        let _ = response;
        None
    }
    fn call<'a>(
        backend: &'a dyn Backend,
        request: &'a Self,
        call: &'a CallOptions,
    ) -> Call<'a, Reply<Self::Response>>;
}

/// Says, in the attempt's span, who answered: the upstream's request id (OpenAI's
/// `x-request-id`, Azure's `apim-request-id`), Azure's region and model session, so that a
/// trace leads to the upstream's own logs.
fn identify(meta: &router_core::ResponseMeta, attempts: u32) {
    tracing::debug!(
        status = meta.status,
        attempts,
        upstream_request_id = meta.request_id.as_deref(),
        region = meta.region.as_deref(),
        model_session = meta.model_session.as_deref(),
        "answered"
    );
}

/// A prompt-cache key in a request's body: `prompt_cache_key`, else `user` (strings only).
fn body_cache_key(extra: &router_types::Extra) -> Option<&str> {
    ["prompt_cache_key", "user"]
        .into_iter()
        .find_map(|field| extra.get(field)?.as_str())
        .filter(|key| !key.is_empty())
}

/// A hash of a request's JSON body, written straight into the hasher (no buffer): the same
/// request gives the same fingerprint within this process.
pub(crate) fn fingerprint<T: serde::Serialize>(value: &T) -> u64 {
    use std::hash::Hasher as _;
    struct Hashing(std::collections::hash_map::DefaultHasher);
    impl std::io::Write for Hashing {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.write(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hashing = Hashing(std::collections::hash_map::DefaultHasher::new());
    // A request that does not serialize is sent nowhere anyway; it fingerprints as far as it went.
    let _ = serde_json::to_writer(&mut hashing, value);
    hashing.0.finish()
}

/// The request with its model renamed to the deployment; copied only when the names differ.
fn renamed<'a, R: Named>(request: &'a R, deployment: &str) -> Cow<'a, R> {
    if request.model() == deployment {
        return Cow::Borrowed(request);
    }
    let mut copy = request.clone();
    copy.set_model(deployment.to_owned());
    Cow::Owned(copy)
}

/// A plain request, by reference (a caller's) or owned (a shadow probe's).
pub(crate) struct Once<'r, R: Clone>(pub(crate) Cow<'r, R>);

impl<'r, R: Clone> Once<'r, R> {
    pub(crate) fn of(request: &'r R) -> Self {
        Self(Cow::Borrowed(request))
    }
}

impl<R: Plain + 'static> Operation for Once<'_, R> {
    type Sent = Reply<R::Response>;
    type Output = Routed<R::Response>;
    type Owned = Once<'static, R>;

    fn served(output: &Self::Output) -> (&EndpointId, &str, u32, Option<TokensUsed>) {
        (
            &output.endpoint,
            &output.deployment,
            output.attempts,
            output.tokens,
        )
    }

    fn model(&self) -> &str {
        self.0.as_ref().model()
    }

    fn class(&self) -> LatencyClass {
        R::CLASS
    }

    fn estimate(&self, expected: u32) -> Estimate {
        self.0.as_ref().estimate(expected)
    }

    fn output_hint(&self, expected: u32) -> u32 {
        self.0.as_ref().output_hint(expected)
    }

    fn fingerprint(&self) -> u64 {
        fingerprint(self.0.as_ref())
    }

    fn send<'a>(&'a self, attempt: &Attempt, call: CallOptions) -> Call<'a, Self::Sent> {
        let deployment = std::sync::Arc::clone(attempt.deployment());
        deployment.state.note_call(self.0.as_ref().probe_kind());
        Box::pin(async move {
            let request = renamed(self.0.as_ref(), &deployment.name);
            R::call(deployment.backend.as_ref(), &request, &call).await
        })
    }

    fn owned(&self) -> Self::Owned {
        Once(Cow::Owned(self.0.as_ref().clone()))
    }

    fn copyable(&self) -> bool {
        self.0.as_ref().copyable()
    }

    fn continues(&self) -> Option<&str> {
        self.0.as_ref().continues()
    }

    fn cache_key(&self) -> Option<&str> {
        self.0.as_ref().cache_key()
    }

    fn stored(&self, output: &Self::Output) -> Option<String> {
        self.0
            .as_ref()
            .stores()
            .then(|| R::stored_id(&output.body).map(str::to_owned))
            .flatten()
    }

    async fn finish(_: Self::Output) {}

    async fn complete(
        &self,
        reply: Self::Sent,
        attempt: Attempt,
        served: Served,
        took: Duration,
    ) -> Self::Output {
        // A generation's signal is its time per output token, so that long and short answers
        // compare fairly.
        let sample = match (R::CLASS, R::output_tokens(&reply.body)) {
            (LatencyClass::Generation, Some(tokens)) => {
                took / u32::try_from(tokens.max(1)).unwrap_or(u32::MAX)
            }
            _ => took,
        };
        let deployment = std::sync::Arc::clone(attempt.deployment());
        identify(&reply.meta, served.attempts);
        if let Some(served) = R::served_tier(&reply.body) {
            deployment
                .state
                .record_tier(self.0.as_ref().asked_tier(), served);
        }
        let used = R::used(&reply.body);
        attempt.answered(sample, used, &reply.meta).await;
        Routed {
            body: reply.body,
            endpoint: deployment.endpoint.clone(),
            deployment: deployment.name.clone(),
            model: deployment.model.clone(),
            attempts: served.attempts,
            meta: reply.meta,
            caller_quota: served.caller,
            tokens: used.map(Into::into),
            waited: served.waited,
        }
    }
}

impl Plain for ChatCompletionRequest {
    type Response = ChatCompletionResponse;
    const CLASS: LatencyClass = LatencyClass::Generation;

    fn probe_kind(&self) -> router_core::CallKind {
        // Capped as the caller capped it: reasoning models refuse `max_tokens`.
        if self.max_completion_tokens.is_some() {
            router_core::CallKind::ChatMaxCompletionTokens
        } else {
            router_core::CallKind::Chat
        }
    }

    fn estimate(&self, expected: u32) -> Estimate {
        estimate::chat(self, expected)
    }

    fn output_hint(&self, expected: u32) -> u32 {
        self.output_cap().unwrap_or(expected)
    }

    fn cache_key(&self) -> Option<&str> {
        body_cache_key(&self.extra)
    }

    fn asked_tier(&self) -> Option<&str> {
        self.extra.get("service_tier")?.as_str()
    }

    fn served_tier(response: &Self::Response) -> Option<&str> {
        response.service_tier.as_deref()
    }

    fn usage(response: &Self::Response) -> Option<&Usage> {
        response.usage.as_ref()
    }

    fn call<'a>(
        backend: &'a dyn Backend,
        request: &'a Self,
        call: &'a CallOptions,
    ) -> Call<'a, Reply<Self::Response>> {
        backend.chat(request, call)
    }
}

impl Plain for EmbeddingRequest {
    type Response = EmbeddingResponse;
    const CLASS: LatencyClass = LatencyClass::Call;

    fn probe_kind(&self) -> router_core::CallKind {
        router_core::CallKind::Embeddings
    }

    fn estimate(&self, _expected: u32) -> Estimate {
        estimate::embeddings(self)
    }

    fn output_hint(&self, _expected: u32) -> u32 {
        0
    }

    fn usage(response: &Self::Response) -> Option<&Usage> {
        response.usage.as_ref()
    }

    fn call<'a>(
        backend: &'a dyn Backend,
        request: &'a Self,
        call: &'a CallOptions,
    ) -> Call<'a, Reply<Self::Response>> {
        backend.embeddings(request, call)
    }
}

impl Plain for CompletionRequest {
    type Response = CompletionResponse;
    const CLASS: LatencyClass = LatencyClass::Generation;

    fn probe_kind(&self) -> router_core::CallKind {
        router_core::CallKind::Completions
    }

    fn estimate(&self, expected: u32) -> Estimate {
        estimate::completions(self, expected)
    }

    fn output_hint(&self, _expected: u32) -> u32 {
        // OpenAI's default `max_tokens` for legacy completions.
        self.max_tokens.unwrap_or(16)
    }

    fn cache_key(&self) -> Option<&str> {
        body_cache_key(&self.extra)
    }

    fn usage(response: &Self::Response) -> Option<&Usage> {
        response.usage.as_ref()
    }

    fn call<'a>(
        backend: &'a dyn Backend,
        request: &'a Self,
        call: &'a CallOptions,
    ) -> Call<'a, Reply<Self::Response>> {
        backend.completions(request, call)
    }
}

impl Plain for CreateResponse {
    type Response = Response;
    const CLASS: LatencyClass = LatencyClass::Generation;

    fn probe_kind(&self) -> router_core::CallKind {
        router_core::CallKind::Responses
    }

    fn estimate(&self, expected: u32) -> Estimate {
        estimate::responses(self, expected)
    }

    fn output_hint(&self, expected: u32) -> u32 {
        self.max_output_tokens.unwrap_or(expected)
    }

    fn usage(_: &Self::Response) -> Option<&Usage> {
        None
    }

    fn output_tokens(response: &Self::Response) -> Option<u64> {
        response.usage.as_ref().map(|u| u.output_tokens)
    }

    fn used(response: &Self::Response) -> Option<Used> {
        response.usage.as_ref().map(|u| Used {
            prompt: u.input_tokens,
            total: u.total_tokens,
        })
    }

    fn copyable(&self) -> bool {
        // A continuation reads what an earlier one stored.
        !self.stores() && Plain::continues(self).is_none()
    }

    fn continues(&self) -> Option<&str> {
        self.extra.get("previous_response_id")?.as_str()
    }

    fn cache_key(&self) -> Option<&str> {
        body_cache_key(&self.extra)
    }

    fn stores(&self) -> bool {
        // Stored unless `store: false`.
        self.extra.get("store") != Some(&serde_json::Value::Bool(false))
    }

    fn stored_id(response: &Self::Response) -> Option<&str> {
        Some(response.id.as_str()).filter(|id| !id.is_empty())
    }

    fn call<'a>(
        backend: &'a dyn Backend,
        request: &'a Self,
        call: &'a CallOptions,
    ) -> Call<'a, Reply<Self::Response>> {
        backend.responses(request, call)
    }
}

/// A request answered in a stream of chunks; estimated as when it is answered in one body.
pub(crate) trait Streaming: Plain + 'static {
    /// Each event's chunk.
    type Chunk: router_core::StreamItem + Send + Unpin + 'static;
    /// Asks the upstream for the usage at the stream's end.
    fn ask_usage(&mut self);
    /// The id the answer is stored under, when `chunk` says it (a response's
    /// `response.created`).
    fn stored_id_in(chunk: &Self::Chunk) -> Option<String> {
        let _ = chunk;
        None
    }
    /// Whether the caller asked for the usage chunk.
    fn includes_usage(&self) -> bool;
    fn open<'a>(
        backend: &'a dyn Backend,
        request: &'a Self,
        call: &'a CallOptions,
    ) -> Call<'a, router_core::EventStream<Self::Chunk>>;
}

macro_rules! streaming {
    ($($t:ty => $chunk:ty, $open:ident);*) => {$(
        impl Streaming for $t {
            type Chunk = $chunk;
            fn ask_usage(&mut self) {
                self.stream_options
                    .get_or_insert_with(StreamOptions::default)
                    .include_usage = Some(true);
            }
            fn includes_usage(&self) -> bool {
                self.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true)
            }
            fn open<'a>(
                backend: &'a dyn Backend,
                request: &'a Self,
                call: &'a CallOptions,
            ) -> Call<'a, router_core::EventStream<Self::Chunk>> {
                backend.$open(request, call)
            }
        }
    )*};
}
streaming!(
    ChatCompletionRequest => router_types::ChatCompletionChunk, chat_stream;
    CompletionRequest => CompletionResponse, completions_stream
);

impl Streaming for CreateResponse {
    type Chunk = ResponseStreamEvent;

    fn ask_usage(&mut self) {}

    fn stored_id_in(event: &ResponseStreamEvent) -> Option<String> {
        let response = event.response.as_ref()?;
        (!response.id.is_empty()).then(|| response.id.clone())
    }

    fn includes_usage(&self) -> bool {
        // `response.completed` always carries it.
        true
    }

    fn open<'a>(
        backend: &'a dyn Backend,
        request: &'a Self,
        call: &'a CallOptions,
    ) -> Call<'a, router_core::EventStream<Self::Chunk>> {
        backend.responses_stream(request, call)
    }
}

/// A streamed request (a chat completion's or a legacy completion's), by reference (a
/// caller's) or owned (a shadow probe's).
pub(crate) struct Streamed<'r, R: Clone = ChatCompletionRequest>(pub(crate) Cow<'r, R>);

impl<'r, R: Clone> Streamed<'r, R> {
    pub(crate) fn of(request: &'r R) -> Self {
        Self(Cow::Borrowed(request))
    }
}

impl<R: Streaming> Streamed<'_, R> {
    /// Whether the router asks for the usage chunk (to account the stream's tokens) where the
    /// caller did not; the caller never sees it then.
    fn injects_usage(&self, attempt: &Attempt) -> bool {
        attempt.is_accounted() && attempt.deployment().stream_usage && !self.0.includes_usage()
    }
}

impl<R: Streaming> Operation for Streamed<'_, R> {
    type Sent = Opened<R::Chunk>;
    type Output = RouterStream<R::Chunk>;
    type Owned = Streamed<'static, R>;

    fn served(output: &Self::Output) -> (&EndpointId, &str, u32, Option<TokensUsed>) {
        (
            output.endpoint(),
            output.deployment(),
            output.attempts(),
            output.tokens(),
        )
    }

    fn model(&self) -> &str {
        self.0.as_ref().model()
    }

    fn class(&self) -> LatencyClass {
        LatencyClass::Stream
    }

    fn estimate(&self, expected: u32) -> Estimate {
        Plain::estimate(self.0.as_ref(), expected)
    }

    fn output_hint(&self, expected: u32) -> u32 {
        Plain::output_hint(self.0.as_ref(), expected)
    }

    fn fingerprint(&self) -> u64 {
        fingerprint(self.0.as_ref())
    }

    fn send<'a>(&'a self, attempt: &Attempt, call: CallOptions) -> Call<'a, Self::Sent> {
        let deployment = std::sync::Arc::clone(attempt.deployment());
        deployment.state.note_call(self.0.as_ref().probe_kind());
        let inject = self.injects_usage(attempt);
        Box::pin(async move {
            let mut request = renamed(self.0.as_ref(), &deployment.name);
            if inject {
                request.to_mut().ask_usage();
            }
            first_content(R::open(deployment.backend.as_ref(), &request, &call).await?).await
        })
    }

    fn owned(&self) -> Self::Owned {
        Streamed(Cow::Owned(self.0.as_ref().clone()))
    }

    fn copyable(&self) -> bool {
        Plain::copyable(self.0.as_ref())
    }

    fn continues(&self) -> Option<&str> {
        Plain::continues(self.0.as_ref())
    }

    fn cache_key(&self) -> Option<&str> {
        Plain::cache_key(self.0.as_ref())
    }

    fn stored(&self, output: &Self::Output) -> Option<String> {
        if !Plain::stores(self.0.as_ref()) {
            return None;
        }
        output.held().find_map(R::stored_id_in)
    }

    async fn finish(mut stream: RouterStream<R::Chunk>) {
        std::future::poll_fn(|cx| {
            use futures_core::Stream as _;
            loop {
                match Pin::new(&mut stream).poll_next(cx) {
                    std::task::Poll::Ready(Some(_)) => {}
                    std::task::Poll::Ready(None) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await;
    }

    async fn complete(
        &self,
        opened: Opened<R::Chunk>,
        mut attempt: Attempt,
        served: Served,
        took: Duration,
    ) -> Self::Output {
        let stream = opened.stream();
        let ttft = stream
            .time_to_first_content()
            .or_else(|| stream.time_to_first_event())
            .unwrap_or(took);
        identify(stream.meta(), served.attempts);
        attempt.opened(ttft, stream.meta());
        let strip_usage = self.injects_usage(&attempt);
        let routed = RouterStream::new(opened, attempt, served, strip_usage);
        routed.record_tier(Plain::asked_tier(self.0.as_ref()));
        routed
    }
}
