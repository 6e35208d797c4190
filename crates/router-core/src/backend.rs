//! The `Backend` trait: one upstream endpoint, whatever its wire protocol.
//!
//! A backend sends one request to one endpoint and reports, besides the body, what the router
//! needs to route the next one: the status, the rate-limit headers ([`RateLimitInfo`]) and the
//! timings (to headers, to the first chunk of a stream). It does not retry, fail over or keep
//! state about other endpoints: that is the router's job.
//!
//! # Streams
//!
//! [`EventStream`] yields the upstream's events as typed chunks. It ends after `[DONE]`; an
//! `error` event becomes an [`ErrorKind::StreamError`](crate::ErrorKind::StreamError) item, and
//! a connection that closes before `[DONE]` an
//! [`ErrorKind::StreamTruncated`](crate::ErrorKind::StreamTruncated) item. After an error
//! item the stream ends. Dropping the stream closes the upstream connection.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_core::Stream;
use router_types::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
    CompletionResponse, CreateResponse, EmbeddingRequest, EmbeddingResponse, Response,
    ResponseStreamEvent, Usage,
};

use crate::endpoint::EndpointId;
use crate::error::Error;
use crate::ratelimit::RateLimitInfo;
use crate::trace::TraceContext;

/// One upstream endpoint. Implemented by `backend-openai`, `backend-azure`, and by users for
/// their own upstreams. Object safe: the router holds `Arc<dyn Backend>`.
///
/// The request's `model` is already the name this endpoint knows (for Azure, the deployment):
/// the router rewrites it before calling.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// The endpoint's configured name.
    fn endpoint(&self) -> &EndpointId;

    /// `POST /chat/completions`, not streamed.
    async fn chat(
        &self,
        request: &ChatCompletionRequest,
        options: &CallOptions,
    ) -> Result<Reply<ChatCompletionResponse>, Error>;

    /// `POST /chat/completions` with `stream: true` (set by the backend whatever the request
    /// says). Returns once the upstream's headers arrived.
    async fn chat_stream(
        &self,
        request: &ChatCompletionRequest,
        options: &CallOptions,
    ) -> Result<ChatStream, Error>;

    /// `POST /embeddings`.
    async fn embeddings(
        &self,
        request: &EmbeddingRequest,
        options: &CallOptions,
    ) -> Result<Reply<EmbeddingResponse>, Error>;

    /// `POST /completions` (legacy), not streamed.
    async fn completions(
        &self,
        request: &CompletionRequest,
        options: &CallOptions,
    ) -> Result<Reply<CompletionResponse>, Error>;

    /// `POST /completions` (legacy) with `stream: true` (set by the backend whatever the
    /// request says). Returns once the upstream's headers arrived. By default, an
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) error (the router then tries
    /// another deployment), so that backends written before it need no change.
    async fn completions_stream(
        &self,
        request: &CompletionRequest,
        options: &CallOptions,
    ) -> Result<CompletionStream, Error> {
        let _ = (request, options);
        Err(Error::unsupported(
            self.endpoint().clone(),
            "streamed legacy completions",
        ))
    }

    /// `POST /responses` (the Responses API), not streamed. By default, an
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) error.
    async fn responses(
        &self,
        request: &CreateResponse,
        options: &CallOptions,
    ) -> Result<Reply<Response>, Error> {
        let _ = (request, options);
        Err(Error::unsupported(
            self.endpoint().clone(),
            "the Responses API",
        ))
    }

    /// `POST /responses` with `stream: true` (set by the backend): the named events, ending
    /// with `response.completed` (or another terminal event). By default, an
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) error.
    async fn responses_stream(
        &self,
        request: &CreateResponse,
        options: &CallOptions,
    ) -> Result<ResponseStream, Error> {
        let _ = (request, options);
        Err(Error::unsupported(
            self.endpoint().clone(),
            "the Responses API",
        ))
    }

    /// A call on a response the upstream stored (`id`), made through deployment `model`:
    /// retrieve it, delete it, list its input items, or cancel it. The answer's body as sent.
    /// By default, an [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) error.
    async fn stored_response(
        &self,
        model: &str,
        id: &str,
        call: StoredCall,
        options: &CallOptions,
    ) -> Result<Reply<serde_json::Value>, Error> {
        let _ = (model, id, call, options);
        Err(Error::unsupported(
            self.endpoint().clone(),
            "stored responses",
        ))
    }
}

/// What is asked of a stored response ([`Backend::stored_response`]).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredCall {
    /// `GET /responses/{id}`.
    Retrieve,
    /// `DELETE /responses/{id}`.
    Delete,
    /// `GET /responses/{id}/input_items`.
    InputItems,
    /// `POST /responses/{id}/cancel`.
    Cancel,
}

/// Per-call options from the router.
#[non_exhaustive]
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The request's deadline across all its attempts. A backend must give up by then (its
    /// own timeouts still apply when they are shorter).
    pub deadline: Option<Instant>,
    /// The Azure deployment the upstream may spill this request over to when the one it is
    /// sent to is out of capacity (`x-ms-spillover-deployment`); backends of other upstreams
    /// ignore it.
    pub spillover_deployment: Option<String>,
    /// The W3C trace this call belongs to, with the attempt's own span id: sent as
    /// `traceparent` (and the caller's `tracestate` as it came), so that the upstream's logs
    /// place the call in the caller's trace.
    pub trace: Option<(TraceContext, Option<String>)>,
}

impl CallOptions {
    /// Options with a deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

/// What the upstream's answer said besides its body.
#[non_exhaustive]
#[derive(Debug, Clone, Default)]
pub struct ResponseMeta {
    /// The HTTP status.
    pub status: u16,
    /// Rate-limit headers.
    pub rate_limits: RateLimitInfo,
    /// The upstream's request id (`x-request-id` or `apim-request-id`).
    pub request_id: Option<String>,
    /// The Azure region that served (`x-ms-region`).
    pub region: Option<String>,
    /// The Azure model session (`azureml-model-session`), which names the model instance.
    pub model_session: Option<String>,
    /// Azure spilled the request over from this deployment (an `x-ms-spillover-from-<name>`
    /// header): the deployment it was sent to was full, and its spillover deployment served.
    pub spilled_from: Option<String>,
    /// From sending the request to the answer's headers.
    pub time_to_headers: Duration,
    /// From sending the request to the end of the body (non-streamed answers).
    pub elapsed: Duration,
}

impl ResponseMeta {
    /// Metadata with a status and nothing else.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            ..Self::default()
        }
    }
}

/// A non-streamed answer: the body and its metadata.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    /// The parsed body.
    pub body: T,
    /// Status, headers and timings.
    pub meta: ResponseMeta,
}

impl<T> Reply<T> {
    /// A reply.
    pub fn new(body: T, meta: ResponseMeta) -> Self {
        Self { body, meta }
    }
}

/// An event type of a stream: tells content from bookkeeping, for time-to-first-token.
pub trait StreamItem {
    /// Whether the event carries generated output (text, tool calls, a finish reason), as
    /// opposed to Azure's filter annotations or a usage-only chunk.
    fn has_content(&self) -> bool;

    /// The usage of the whole call, when this event reports it at the stream's end: a chat or
    /// legacy completion's usage-only chunk (`stream_options.include_usage`), a response's
    /// `response.completed`. `None` by default.
    fn final_usage(&self) -> Option<Usage> {
        None
    }

    /// Whether the stream ends with this event, without a `[DONE]` after it (the Responses
    /// API's terminal events). `false` by default.
    fn is_last(&self) -> bool {
        false
    }

    /// The service tier the event says served the request (`service_tier`). `None` by default.
    fn service_tier(&self) -> Option<&str> {
        None
    }
}

impl StreamItem for ChatCompletionChunk {
    fn has_content(&self) -> bool {
        ChatCompletionChunk::has_content(self)
    }

    fn final_usage(&self) -> Option<Usage> {
        self.usage.clone().filter(|_| self.choices.is_empty())
    }

    fn service_tier(&self) -> Option<&str> {
        self.service_tier.as_deref()
    }
}

impl StreamItem for ResponseStreamEvent {
    fn has_content(&self) -> bool {
        // Output as it is generated (text, refusals, tool-call arguments), or the end.
        let delta = self
            .kind
            .strip_prefix("response.")
            .is_some_and(|rest| rest.rsplit('.').next() == Some("delta"));
        delta || self.is_last()
    }

    fn final_usage(&self) -> Option<Usage> {
        let usage = self.response.as_ref()?.usage.as_ref()?;
        (self.kind == "response.completed" || self.kind == "response.incomplete").then(|| Usage {
            prompt_tokens: usage.input_tokens,
            completion_tokens: Some(usage.output_tokens),
            total_tokens: usage.total_tokens,
            ..Usage::default()
        })
    }

    fn is_last(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "response.completed" | "response.incomplete" | "response.failed" | "error"
        )
    }
}

impl StreamItem for CompletionResponse {
    fn has_content(&self) -> bool {
        self.choices
            .iter()
            .any(|c| !c.text.is_empty() || c.finish_reason.is_some())
    }

    fn final_usage(&self) -> Option<Usage> {
        self.usage.clone().filter(|_| self.choices.is_empty())
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<Event<T>, Error>> + Send>>;

/// One decoded event of a stream: the typed item, and the event's `data` as the upstream sent
/// it when the backend kept it (so that a relay can pass it on without encoding it again).
#[derive(Debug, Clone, PartialEq)]
pub struct Event<T> {
    /// The typed item.
    pub item: T,
    /// The event's data field, exactly as received (`None` from backends that do not keep it).
    pub data: Option<String>,
}

impl<T> Event<T> {
    /// An event without its original data.
    pub fn typed(item: T) -> Self {
        Self { item, data: None }
    }
}

/// A streamed answer: typed events, the answer's metadata, and when the first content arrived.
pub struct EventStream<T> {
    inner: BoxStream<T>,
    meta: ResponseMeta,
    sent_at: Instant,
    first_item: Option<Duration>,
    first_content: Option<Duration>,
    clock: fn() -> Instant,
}

/// A streamed chat completion.
pub type ChatStream = EventStream<ChatCompletionChunk>;
/// A streamed legacy completion.
pub type CompletionStream = EventStream<CompletionResponse>;
/// A streamed response (the Responses API's named events).
pub type ResponseStream = EventStream<ResponseStreamEvent>;

impl<T: StreamItem + Send + 'static> EventStream<T> {
    /// Wraps `events`, an upstream answer's decoded events, sent at `sent_at`. `clock` reads the
    /// same clock as `sent_at` (a runtime's clock, so that paused time in tests applies).
    pub fn new(
        events: impl Stream<Item = Result<T, Error>> + Send + 'static,
        meta: ResponseMeta,
        sent_at: Instant,
        clock: fn() -> Instant,
    ) -> Self {
        let inner = Box::pin(events);
        Self::with_data(Typed { inner }, meta, sent_at, clock)
    }

    /// As [`new`](Self::new), from events that keep the upstream's data as received.
    pub fn with_data(
        events: impl Stream<Item = Result<Event<T>, Error>> + Send + 'static,
        meta: ResponseMeta,
        sent_at: Instant,
        clock: fn() -> Instant,
    ) -> Self {
        Self {
            inner: Box::pin(events),
            meta,
            sent_at,
            first_item: None,
            first_content: None,
            clock,
        }
    }
}

impl<T: StreamItem> EventStream<T> {
    /// Status, headers and time to headers.
    pub fn meta(&self) -> &ResponseMeta {
        &self.meta
    }

    /// From sending the request to the first event of any kind, once it arrived.
    pub fn time_to_first_event(&self) -> Option<Duration> {
        self.first_item
    }

    /// From sending the request to the first event with content (time to first token), once it
    /// arrived.
    pub fn time_to_first_content(&self) -> Option<Duration> {
        self.first_content
    }

    /// The next event with its original data, as [`Stream::poll_next`] yields the item alone.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event<T>, Error>>> {
        let polled = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok(event))) = &polled
            && (self.first_item.is_none()
                || (self.first_content.is_none() && event.item.has_content()))
        {
            let since = (self.clock)().saturating_duration_since(self.sent_at);
            self.first_item.get_or_insert(since);
            if event.item.has_content() {
                self.first_content.get_or_insert(since);
            }
        }
        polled
    }
}

impl<T: StreamItem> Stream for EventStream<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .poll_event(cx)
            .map(|next| next.map(|event| event.map(|e| e.item)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

/// Typed items as events without data.
struct Typed<S> {
    inner: Pin<Box<S>>,
}

impl<T, S> Stream for Typed<S>
where
    S: Stream<Item = Result<T, Error>>,
{
    type Item = Result<Event<T>, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .inner
            .as_mut()
            .poll_next(cx)
            .map(|next| next.map(|item| item.map(Event::typed)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl<T> fmt::Debug for EventStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream")
            .field("meta", &self.meta)
            .field("first_item", &self.first_item)
            .field("first_content", &self.first_content)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use router_types::{ChatDelta, ChunkChoice};

    fn chunk(content: Option<&str>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            choices: content
                .map(|c| ChunkChoice {
                    delta: Some(ChatDelta {
                        content: Some(c.to_owned()),
                        ..ChatDelta::default()
                    }),
                    ..ChunkChoice::default()
                })
                .into_iter()
                .collect(),
            ..ChatCompletionChunk::default()
        }
    }

    #[tokio::test]
    async fn first_content_skips_annotation_events() {
        let sent_at = Instant::now();
        let events = futures_util::stream::iter(vec![Ok(chunk(None)), Ok(chunk(Some("hi")))]);
        let mut stream = EventStream::new(events, ResponseMeta::new(200), sent_at, Instant::now);
        assert!(stream.next().await.unwrap().is_ok());
        assert!(stream.time_to_first_event().is_some());
        assert!(
            stream.time_to_first_content().is_none(),
            "filter event has no content"
        );
        assert!(stream.next().await.unwrap().is_ok());
        assert!(stream.time_to_first_content().is_some());
        assert!(stream.next().await.is_none());
    }

    fn assert_dyn_backend(_: &dyn Backend) {}

    #[test]
    fn backend_is_object_safe() {
        // Compiles only while `Backend` stays dyn compatible.
        let _ = assert_dyn_backend;
    }
}
