//! The stream relay: a routed stream (a chat completion's, or a legacy completion's), from its
//! first content chunk to its end.
//!
//! A stream is opened by [`first_content`]: events before the first content chunk (Azure's
//! prompt-filter annotations, the role chunk) are held back, so that the attempt can still fail
//! over if the stream breaks before any content; once content arrives the stream belongs to the
//! caller, and a failure is its last item, never a retry. [`RouterStream`] then hands out the
//! held events and the rest, each with the upstream's data as received (so a relay can pass it
//! on without encoding it again), drops the usage chunk the router asked for and the caller did
//! not, and ends its [`Attempt`] when the upstream's stream ends, fails, or the caller drops it.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use router_core::{EndpointId, Error, Event, EventStream, RateLimitInfo, ResponseMeta, StreamItem};
use router_types::ChatCompletionChunk;

use crate::attempt::Attempt;
use crate::options::{QuotaLeft, Served, TokensUsed};
use crate::reservation::Used;

/// A routed stream: the upstream's chunks, then the end, or one error item. Chunks are chat
/// completion chunks ([`Router::chat_stream`](crate::Router::chat_stream)), or legacy
/// completions' (`RouterStream<CompletionResponse>`,
/// [`Router::completions_stream`](crate::Router::completions_stream)).
///
/// Holds the deployment's in-flight slot (and the request's router-side limit slots) until it
/// ends or is dropped; its success or failure is recorded when it ends.
pub struct RouterStream<T = ChatCompletionChunk> {
    held: VecDeque<Event<T>>,
    inner: Option<EventStream<T>>,
    attempt: Option<Attempt>,
    endpoint: EndpointId,
    model: String,
    meta: ResponseMeta,
    deployment: String,
    attempts: u32,
    caller_quota: Option<QuotaLeft>,
    waited: std::time::Duration,
    /// The router asked for the usage chunk; the caller did not: drop it.
    strip_usage: bool,
    used: Option<Used>,
    info: RateLimitInfo,
}

/// A stream opened up to its first content chunk.
pub(crate) struct Opened<T> {
    stream: EventStream<T>,
    held: VecDeque<Event<T>>,
    ended: bool,
}

impl<T> Opened<T> {
    pub(crate) fn stream(&self) -> &EventStream<T> {
        &self.stream
    }
}

/// Reads `stream` up to its first content chunk (or its end), holding what came before.
pub(crate) async fn first_content<T: StreamItem + Send + 'static>(
    mut stream: EventStream<T>,
) -> Result<Opened<T>, Error> {
    let mut held = VecDeque::new();
    loop {
        match std::future::poll_fn(|cx| stream.poll_event(cx)).await {
            Some(Ok(event)) => {
                let content = event.item.has_content();
                held.push_back(event);
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

impl<T: StreamItem + Send + 'static> RouterStream<T> {
    /// The stream of an opened attempt.
    pub(crate) fn new(
        opened: Opened<T>,
        attempt: Attempt,
        served: Served,
        strip_usage: bool,
    ) -> Self {
        let Opened {
            stream,
            held,
            ended,
        } = opened;
        let mut routed = Self {
            info: stream.meta().rate_limits.clone(),
            endpoint: attempt.deployment().endpoint.clone(),
            model: attempt.deployment().model.clone(),
            meta: stream.meta().clone(),
            deployment: attempt.deployment().name.clone(),
            held,
            inner: Some(stream),
            attempt: Some(attempt),
            attempts: served.attempts,
            caller_quota: served.caller,
            waited: served.waited,
            strip_usage,
            used: None,
        };
        if ended {
            routed.finish(Ok(()));
        }
        routed
    }

    /// Records the service tier the events read so far (up to the first content) say served
    /// it, on the answering deployment; `asked` is the tier the request asked for.
    pub(crate) fn record_tier(&self, asked: Option<&str>) {
        let Some(attempt) = &self.attempt else {
            return;
        };
        if let Some(served) = self.held.iter().find_map(|event| event.item.service_tier()) {
            attempt.deployment().state.record_tier(asked, served);
        }
    }

    /// The events read before the first content and not yet handed out.
    pub(crate) fn held(&self) -> impl Iterator<Item = &T> {
        self.held.iter().map(|event| &event.item)
    }

    /// The endpoint streaming.
    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// The deployment name it streams under.
    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    /// The tokens the stream used, once its usage chunk has passed (at its end; the router
    /// asks for it where the upstream can send one, whether or not the caller did).
    pub fn tokens(&self) -> Option<TokensUsed> {
        self.used.map(Into::into)
    }

    /// How long the request waited for its turn before its first attempt in the group that
    /// serves it.
    pub fn waited(&self) -> std::time::Duration {
        self.waited
    }

    /// What the caller's own limits have left, when it has any.
    pub fn caller_quota(&self) -> Option<QuotaLeft> {
        self.caller_quota
    }

    /// The model group that serves it: the one asked for, or a fallback
    /// ([`RouterBuilder::fallbacks`](crate::RouterBuilder::fallbacks)).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The answering attempt's status, headers (rate limits, the upstream's request id, Azure's
    /// region and model session) and time to headers.
    pub fn meta(&self) -> &ResponseMeta {
        &self.meta
    }

    /// Attempts made to open it, this one included, in every group tried.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The next event, with the upstream's data as received when the backend kept it (the
    /// built-in backends do): what a relay writes without encoding the chunk again.
    /// [`Stream::poll_next`] yields the same events' chunks.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event<T>, Error>>> {
        while let Some(event) = self.held.pop_front() {
            if !self.usage_chunk(&event.item) {
                return Poll::Ready(Some(Ok(event)));
            }
        }
        loop {
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(None);
            };
            return match inner.poll_event(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(event))) => {
                    if self.usage_chunk(&event.item) {
                        continue;
                    }
                    Poll::Ready(Some(Ok(event)))
                }
                Poll::Ready(Some(Err(error))) => {
                    self.finish(Err(&error));
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Ready(None) => {
                    self.finish(Ok(()));
                    Poll::Ready(None)
                }
            };
        }
    }

    fn finish(&mut self, outcome: Result<(), &Error>) {
        if let Some(attempt) = self.attempt.take() {
            attempt.finished(outcome, self.used, &self.info);
        }
        self.inner = None;
    }

    /// Notes a usage chunk; `true` when the caller must not see it.
    fn usage_chunk(&mut self, chunk: &T) -> bool {
        if let Some(usage) = chunk.final_usage() {
            self.used = Some(Used::from(&usage));
            return self.strip_usage;
        }
        false
    }
}

impl<T: StreamItem + Send + Unpin + 'static> Stream for RouterStream<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .poll_event(cx)
            .map(|next| next.map(|event| event.map(|e| e.item)))
    }
}

impl<T> fmt::Debug for RouterStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterStream")
            .field("endpoint", &self.endpoint)
            .field("attempts", &self.attempts)
            .field("held", &self.held.len())
            .field("open", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}
