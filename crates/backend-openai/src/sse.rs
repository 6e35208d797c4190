//! Decoding a server-sent event stream into typed events.
//!
//! Framing (lines, partial UTF-8, comments, `id:`/`retry:` fields, multi-line `data:`) is
//! `eventsource-stream`'s job. Here each event's data becomes a typed item, `[DONE]` ends the
//! stream, an `error` object becomes a [`StreamError`](router_core::ErrorKind::StreamError), and
//! the end of the connection before `[DONE]` becomes
//! [`StreamTruncated`](router_core::ErrorKind::StreamTruncated). An idle gap longer than the
//! between-chunks timeout, or the deadline, ends it with a
//! [`Timeout`](router_core::ErrorKind::Timeout).

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{EventStreamError, Eventsource};
use futures_core::Stream;
use futures_util::StreamExt;
use router_core::{EndpointId, Error, ErrorKind};
use router_types::ErrorResponse;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::backend::Scrubber;

/// One event's data: an error object or an item.
#[derive(Deserialize)]
#[serde(untagged)]
enum Frame<T> {
    Error(ErrorResponse),
    Item(T),
}

struct State<S> {
    events: S,
    endpoint: EndpointId,
    scrubber: Scrubber,
    idle: Duration,
    deadline: Option<Instant>,
    finished: bool,
}

/// Decodes `body` (the raw byte stream of a 200 answer) into items of type `T`.
pub(crate) fn decode<T, B, E>(
    body: B,
    endpoint: EndpointId,
    scrubber: Scrubber,
    idle: Duration,
    deadline: Option<Instant>,
) -> impl Stream<Item = Result<T, Error>> + Send + 'static
where
    T: DeserializeOwned + Send + 'static,
    B: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let state = State {
        events: body.eventsource(),
        endpoint,
        scrubber,
        idle,
        deadline,
        finished: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        if state.finished {
            return None;
        }
        loop {
            let wait = match state.deadline {
                Some(deadline) => state.idle.min(deadline.saturating_duration_since(Instant::now())),
                None => state.idle,
            };
            let next = tokio::time::timeout(wait, state.events.next()).await;
            let outcome = match next {
                Err(_elapsed) => Err(Error::transport(
                    ErrorKind::Timeout,
                    state.endpoint.clone(),
                    format!("no stream event for {:.3}s", wait.as_secs_f64()),
                    None,
                )),
                Ok(None) => Err(Error::transport(
                    ErrorKind::StreamTruncated,
                    state.endpoint.clone(),
                    "the connection closed before `data: [DONE]`",
                    None,
                )),
                Ok(Some(Err(EventStreamError::Transport(e)))) => Err(Error::transport(
                    ErrorKind::Transport,
                    state.endpoint.clone(),
                    "the stream broke",
                    Some(Box::new(e)),
                )),
                Ok(Some(Err(e))) => Err(Error::transport(
                    ErrorKind::Decode,
                    state.endpoint.clone(),
                    format!("the event stream is malformed: {e}"),
                    None,
                )),
                Ok(Some(Ok(event))) => {
                    let data = event.data.trim();
                    if data.is_empty() {
                        continue;
                    }
                    if data == "[DONE]" {
                        return None;
                    }
                    match serde_json::from_str::<Frame<T>>(data) {
                        Ok(Frame::Item(item)) => Ok(item),
                        Ok(Frame::Error(mut body)) => {
                            body.error.message = state.scrubber.scrub(&body.error.message);
                            Err(Error::stream_event(state.endpoint.clone(), body.error))
                        }
                        Err(e) => Err(Error::transport(
                            ErrorKind::Decode,
                            state.endpoint.clone(),
                            format!("a stream event is not valid JSON of the expected shape: {e}"),
                            None,
                        )),
                    }
                }
            };
            if outcome.is_err() {
                state.finished = true;
            }
            return Some((outcome, state));
        }
    })
}
