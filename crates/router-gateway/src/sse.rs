//! The stream relay: a routed chat stream as server-sent events, through axum's
//! [`Sse`](axum::response::sse::Sse) response.
//!
//! Each upstream event is passed on with its data as the upstream sent it (the router already
//! parsed it once, to find the first content and the usage); only events without their
//! original data (from a custom backend) are encoded again. The usage chunk the router asked
//! for and the caller did not never reaches the relay. A failure after the first byte is an
//! `error` event (as OpenAI sends one); every stream ends with `data: [DONE]`. Writes of events
//! that are ready together are coalesced by hyper, which keeps polling the body while events
//! are ready and flushes once.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::HeaderValue;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_core::Stream;
use router_facade::RouterStream;

use crate::error::error_event;
use crate::metrics::Metrics;

/// Relays `stream`; `started` is when the request arrived, for the time-to-first-token metric.
pub(crate) fn relay(stream: RouterStream, metrics: Arc<Metrics>, started: Instant) -> Response {
    let events = Relay {
        stream,
        metrics,
        started,
        first: true,
        state: State::Open,
    };
    // axum's response says `text/event-stream` and `no-cache`; proxies in front must not
    // buffer it either.
    let mut response = Sse::new(events).into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The upstream's stream has ended: `[DONE]` is next.
    Done,
    Ended,
}

struct Relay {
    stream: RouterStream,
    metrics: Arc<Metrics>,
    started: Instant,
    first: bool,
    state: State,
}

impl Stream for Relay {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.state {
            State::Ended => return Poll::Ready(None),
            State::Done => {
                this.state = State::Ended;
                return Poll::Ready(Some(Ok(Event::default().data("[DONE]"))));
            }
            State::Open => {}
        }
        let event = match this.stream.poll_event(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                this.state = State::Ended;
                return Poll::Ready(Some(Ok(Event::default().data("[DONE]"))));
            }
            Poll::Ready(Some(Err(error))) => {
                this.state = State::Done;
                Event::default().data(error_event(&error.to_string()))
            }
            Poll::Ready(Some(Ok(event))) => {
                if this.first && event.item.has_content() {
                    this.first = false;
                    this.metrics.first_token(this.started.elapsed());
                }
                match event.data {
                    Some(data) => Event::default().data(data),
                    None => match serde_json::to_string(&event.item) {
                        Ok(json) => Event::default().data(json),
                        Err(e) => Event::default()
                            .data(error_event(&format!("cannot encode a chunk: {e}"))),
                    },
                }
            }
        };
        Poll::Ready(Some(Ok(event)))
    }
}
