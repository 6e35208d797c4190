//! The stream relay: a routed stream (chat or legacy completions) as server-sent events.
//!
//! Each upstream event is passed on with its data as the upstream sent it (the router already
//! parsed it once, to find the first content and the usage); only events without their
//! original data (from a custom backend) are encoded again. The usage chunk the router asked
//! for and the caller did not never reaches the relay. A failure after the first byte is an
//! `error` event (as OpenAI sends one); every stream ends with `data: [DONE]`.
//!
//! Events that are ready together leave in one write. The upstream's body reaches the relay
//! one chunk at a time through the HTTP client's connection task, so after an event the next
//! one is often a task switch away even when it is already in the socket buffer. When the
//! upstream has nothing ready, the relay therefore yields once before handing hyper what it
//! holds: if more arrived meanwhile, it joins the same write. On the gateway bench (50
//! connections, 11 events a stream, an upstream that answers at once) the kernel's socket
//! writes were a third of the gateway's time with one `writev` per event; holding for the
//! upstream's next event raised the streamed rate from about 9.5k to about 16k a second. An
//! upstream that sends its tokens apart in time gets each event written on its own after a
//! few polls (microseconds). axum's own `Sse` response frames every event on its own, which is
//! why the relay writes its frames itself.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::BytesMut;
use futures_core::Stream;
use router_facade::types::{ChatCompletionChunk, CompletionResponse, ResponseStreamEvent};
use router_facade::{RouterStream, StreamItem};

use crate::error::error_event;
use crate::metrics::Metrics;

/// At most this much is held for one write.
const MAX_WRITE: usize = 16 * 1024;

/// Polls that find nothing new before held events are written. hyper polls a body once more
/// when it went pending and then yields its task; the third poll comes after the scheduler has
/// let the upstream's connection task run. (With another server's polling this only changes
/// how many events share a write, never whether they leave: held events always wake the task.)
const HOLD_POLLS: u8 = 3;

/// How a kind of stream is framed: chat and legacy completions send unnamed events and end
/// with `data: [DONE]`; the Responses API names each event by its `type` and ends with its
/// terminal event.
pub(crate) trait Framed: StreamItem + serde::Serialize + Send + Unpin + 'static {
    /// The event's name, when events are named.
    fn name(&self) -> Option<&str> {
        None
    }
    /// Whether `data: [DONE]` ends the stream.
    const DONE: bool = true;
    /// A failure after the first byte, as `(name, data)`.
    fn failure(message: &str) -> (Option<&'static str>, String) {
        (None, error_event(message))
    }
}

impl Framed for ChatCompletionChunk {}

impl Framed for CompletionResponse {}

impl Framed for ResponseStreamEvent {
    fn name(&self) -> Option<&str> {
        Some(&self.kind)
    }

    const DONE: bool = false;

    fn failure(message: &str) -> (Option<&'static str>, String) {
        let event = serde_json::json!({"type": "error", "code": "server_error", "message": message, "param": null});
        (Some("error"), event.to_string())
    }
}

/// Relays `stream`, an answer of `route`; `started` is when the request arrived, for the
/// time-to-first-token metric. The tokens it used are counted when it ends.
pub(crate) fn relay<T: Framed>(
    stream: RouterStream<T>,
    metrics: Arc<Metrics>,
    route: &'static str,
    started: Instant,
) -> Response {
    let frames = Relay {
        model: stream.model().to_owned(),
        stream,
        metrics,
        route,
        started,
        first: true,
        ended: false,
        idle: 0,
        held: BytesMut::new(),
    };
    let mut response = Response::new(Body::from_stream(frames));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies in front must not buffer the stream either.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Appends one event with `data` (each line its own `data:` field, as the format requires),
/// named `name` when given.
fn frame(out: &mut BytesMut, name: Option<&str>, data: &str) {
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\n");
    }
    for line in data.lines() {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
}

struct Relay<T> {
    stream: RouterStream<T>,
    metrics: Arc<Metrics>,
    route: &'static str,
    /// The model group serving (a configured one: a bounded label).
    model: String,
    started: Instant,
    first: bool,
    /// The upstream's stream has ended and `[DONE]` is written (or held).
    ended: bool,
    /// Polls in a row that found nothing new while events are held.
    idle: u8,
    held: BytesMut,
}

impl<T: Framed> Relay<T> {
    /// Reads every event that is ready into `held` (up to `MAX_WRITE`); `Pending` when the
    /// upstream has nothing more ready now.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while !self.ended && self.held.len() < MAX_WRITE {
            match self.stream.poll_event(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if T::DONE {
                        frame(&mut self.held, None, "[DONE]");
                    }
                    self.ended = true;
                    if let Some(used) = self.stream.tokens() {
                        self.metrics.tokens(self.route, &self.model, used);
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    let (name, data) = T::failure(&error.to_string());
                    frame(&mut self.held, name, &data);
                    if T::DONE {
                        frame(&mut self.held, None, "[DONE]");
                    }
                    self.ended = true;
                }
                Poll::Ready(Some(Ok(event))) => {
                    if self.first && event.item.has_content() {
                        self.first = false;
                        self.metrics
                            .first_token(self.route, &self.model, self.started.elapsed());
                    }
                    let name = event.item.name();
                    if let Some(data) = &event.data {
                        frame(&mut self.held, name, data);
                    } else {
                        let json = serde_json::to_string(&event.item).unwrap_or_else(|e| {
                            error_event(&format!("cannot encode a chunk: {e}"))
                        });
                        frame(&mut self.held, name, &json);
                    }
                }
            }
        }
        Poll::Ready(())
    }
}

impl<T: Framed> Stream for Relay<T> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let before = this.held.len();
        let filled = this.fill(cx);
        if this.held.is_empty() {
            return if this.ended {
                Poll::Ready(None)
            } else {
                Poll::Pending
            };
        }
        if this.held.len() > before {
            this.idle = 0;
        } else {
            this.idle += 1;
        }
        if filled.is_pending() && this.idle < HOLD_POLLS {
            // Nothing more is ready yet: let the upstream's connection task run, in case the
            // next event is already on its way, before writing. The wake-up makes sure that
            // what is held leaves however the server polls.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.idle = 0;
        Poll::Ready(Some(Ok(this.held.split().freeze())))
    }
}
