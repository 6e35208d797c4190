//! Decoding a server-sent event stream into typed events.
//!
//! Framing (lines, partial UTF-8, comments, `id:`/`retry:` fields, multi-line `data:`) is
//! `eventsource-stream`'s job. Here each event's data becomes a typed item, `[DONE]` ends the
//! stream (or an item that says it is the last, `StreamItem::is_last`: the Responses API's
//! terminal events, after which the connection closes), an `error` object becomes a [`StreamError`](router_core::ErrorKind::StreamError), and
//! the end of the connection before `[DONE]` becomes
//! [`StreamTruncated`](router_core::ErrorKind::StreamTruncated). An idle gap longer than the
//! between-chunks timeout, or the deadline, ends it with a
//! [`Timeout`](router_core::ErrorKind::Timeout). One timer serves the whole stream: it is
//! moved on only when it fires before its time, so a fast stream's events register no timer
//! each (on the gateway bench, a timer per pending event was a visible share of a stream's
//! cost).

use std::future::Future as _;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{EventStreamError, Eventsource};
use futures_core::Stream;
use futures_util::StreamExt;
use router_core::{EndpointId, Error, ErrorKind, Event};
use router_types::ErrorResponse;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::time::{Instant, Sleep};

use crate::scrub::Scrubber;

/// What the byte stream under the event decoder yields as an error: the upstream's, or an
/// event grown past the size limit (nothing more of it is buffered).
#[derive(Debug)]
enum BodyError<E> {
    Upstream(E),
    TooLarge(usize),
}

impl<E: std::fmt::Display> std::fmt::Display for BodyError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Upstream(e) => e.fmt(f),
            Self::TooLarge(limit) => write!(f, "a stream event is larger than {limit} bytes"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for BodyError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Upstream(e) => Some(e),
            Self::TooLarge(_) => None,
        }
    }
}

/// The bytes since the last blank line (`\n\n`, `\n\r\n`, or `\r\r` for CR-only streams)
/// once `chunk` has arrived, given `pending` bytes before it: how much of the event being read
/// the decoder holds. `last` keeps the stream's last three bytes, for a blank line split across
/// chunks. Scanned from the chunk's end: a chunk that ends an event costs a byte or two.
fn pending_after(pending: usize, chunk: &[u8], last: &mut [u8; 3]) -> usize {
    let n = chunk.len();
    // The byte `back` places before `chunk[i]`, reaching into `last` before the chunk.
    let before = |i: usize, back: usize| -> u8 {
        if i >= back {
            chunk[i - back]
        } else {
            last[3 + i - back]
        }
    };
    let mut since = None;
    for i in (0..n).rev() {
        let byte = chunk[i];
        let blank = (byte == b'\n'
            && (before(i, 1) == b'\n' || (before(i, 1) == b'\r' && before(i, 2) == b'\n')))
            || (byte == b'\r' && before(i, 1) == b'\r');
        if blank {
            since = Some(n - 1 - i);
            break;
        }
    }
    let mut tail = [0_u8; 3];
    for (k, slot) in tail.iter_mut().enumerate() {
        *slot = before(n, 3 - k);
    }
    *last = tail;
    since.unwrap_or(pending + n)
}

/// Raw bytes of one unfinished event that the decoder may hold beyond its data limit: room for
/// the `data: ` prefixes, fields and comments around data of the limit's size.
const EVENT_SLACK: usize = 64 * 1024;

/// `body` with no unfinished event holding more than twice `max_event` plus [`EVENT_SLACK`]
/// raw bytes in the decoder's buffer (an event's data is held to `max_event` exactly, by
/// `decode`, however the body was cut; this bound is for what is not data): the stream ends
/// there with [`BodyError::TooLarge`], naming `max_event`, the limit the user set.
fn bounded_events<B, E>(
    body: B,
    max_event: usize,
) -> impl Stream<Item = Result<Bytes, BodyError<E>>> + Send + Unpin + 'static
where
    B: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    let mut pending = 0;
    let mut last = [0_u8; 3];
    let raw = max_event.saturating_mul(2).saturating_add(EVENT_SLACK);
    body.map(move |chunk| {
        let chunk = chunk.map_err(BodyError::Upstream)?;
        pending = pending_after(pending, &chunk, &mut last);
        if pending > raw {
            return Err(BodyError::TooLarge(max_event));
        }
        Ok(chunk)
    })
}

/// What a failure of the byte stream or its framing is.
fn failure<E>(endpoint: &EndpointId, error: EventStreamError<BodyError<E>>) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    match error {
        EventStreamError::Transport(BodyError::TooLarge(limit)) => Error::transport(
            ErrorKind::Decode,
            endpoint.clone(),
            format!(
                "a stream event is larger than {limit} bytes (the endpoint's max_answer_bytes)"
            ),
            None,
        ),
        EventStreamError::Transport(BodyError::Upstream(e)) => Error::transport(
            ErrorKind::Transport,
            endpoint.clone(),
            "the stream broke",
            Some(Box::new(e)),
        ),
        e => Error::transport(
            ErrorKind::Decode,
            endpoint.clone(),
            format!("the event stream is malformed: {e}"),
            None,
        ),
    }
}

/// One event's data: an error object or an item.
#[derive(Deserialize)]
#[serde(untagged)]
enum Frame<T> {
    Error(ErrorResponse),
    Item(T),
}

/// One event's data as a frame. An error object has a top-level `"error"` key, so data without
/// that string anywhere is parsed straight into `T` (one pass); only the rest goes through the
/// untagged `Frame`, which buffers the document to try each shape.
fn parse<T: DeserializeOwned>(data: &str) -> Result<Frame<T>, serde_json::Error> {
    if data.contains("\"error\"") {
        serde_json::from_str::<Frame<T>>(data)
    } else {
        serde_json::from_str::<T>(data).map(Frame::Item)
    }
}

struct State<S> {
    events: S,
    endpoint: EndpointId,
    scrubber: Scrubber,
    idle: Duration,
    deadline: Option<Instant>,
    finished: bool,
    /// When the last event (or the stream's start) came.
    last: Instant,
    /// One timer for the whole stream, armed for [`State::due`] as of some earlier event and
    /// moved on only when it fires early: an event costs no timer registration, a stream
    /// about one per idle period.
    timer: Pin<Box<Sleep>>,
}

impl<S> State<S> {
    /// When the stream times out unless an event comes first.
    fn due(&self) -> Instant {
        let idle = self.last + self.idle;
        self.deadline.map_or(idle, |deadline| deadline.min(idle))
    }
}

/// Decodes `body` (the raw byte stream of a 200 answer) into items of type `T`, each with the
/// event's data as received.
pub(crate) fn decode<T, B, E>(
    body: B,
    endpoint: EndpointId,
    scrubber: Scrubber,
    idle: Duration,
    deadline: Option<Instant>,
    max_event: usize,
) -> impl Stream<Item = Result<Event<T>, Error>> + Send + 'static
where
    T: DeserializeOwned + router_core::StreamItem + Send + 'static,
    B: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    // A line ending in a lone `\r` is complete only once the next byte shows it is not `\r\n`;
    // one `\n` after the body lets a CR-only stream's last blank line count. An event that the
    // upstream left unterminated stays unterminated: it still lacks its blank line.
    let body = body.chain(futures_util::stream::iter([Ok(Bytes::from_static(b"\n"))]));
    let body = bounded_events(body, max_event);
    let last = Instant::now();
    let mut state = State {
        events: body.eventsource(),
        endpoint,
        scrubber,
        idle,
        deadline,
        finished: false,
        last,
        timer: Box::pin(tokio::time::sleep_until(last)),
    };
    let due = state.due();
    state.timer.as_mut().reset(due);
    futures_util::stream::unfold(state, move |mut state| async move {
        if state.finished {
            return None;
        }
        loop {
            let next = std::future::poll_fn(|cx| {
                if let Poll::Ready(event) = state.events.poll_next_unpin(cx) {
                    return Poll::Ready(Ok(event));
                }
                while state.timer.as_mut().poll(cx).is_ready() {
                    let due = state.due();
                    if Instant::now() >= due {
                        return Poll::Ready(Err(due.saturating_duration_since(state.last)));
                    }
                    // Armed as of an earlier event: move it on to this one's due time.
                    state.timer.as_mut().reset(due);
                }
                Poll::Pending
            })
            .await;
            state.last = Instant::now();
            let outcome = match next {
                Err(wait) => Err(Error::transport(
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
                Ok(Some(Err(e))) => Err(failure(&state.endpoint, e)),
                Ok(Some(Ok(event))) if event.data.len() > max_event => Err(failure(
                    &state.endpoint,
                    EventStreamError::Transport(BodyError::<E>::TooLarge(max_event)),
                )),
                Ok(Some(Ok(event))) => {
                    let data = event.data.trim();
                    if data.is_empty() {
                        continue;
                    }
                    if data == "[DONE]" {
                        return None;
                    }
                    match parse::<T>(data) {
                        Ok(Frame::Item(item)) => {
                            // A terminal event (the Responses API's) ends the stream: no
                            // `[DONE]` follows it.
                            state.finished = item.is_last();
                            Ok(Event {
                                item,
                                data: Some(event.data),
                            })
                        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use router_types::ChatCompletionChunk;

    const STREAM: &str = concat!(
        ": keep-alive comment\n",
        "id: 1\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"héllo wörld 🦀\"},\"finish_reason\":null}]}\n\n",
        "retry: 100\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );

    async fn decode_parts(parts: Vec<Vec<u8>>) -> Vec<Result<ChatCompletionChunk, Error>> {
        decode_events(parts)
            .await
            .into_iter()
            .map(|e| e.map(|e| e.item))
            .collect()
    }

    async fn decode_events(parts: Vec<Vec<u8>>) -> Vec<Result<Event<ChatCompletionChunk>, Error>> {
        let body = futures_util::stream::iter(
            parts
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(Bytes::from(p))),
        );
        decode::<ChatCompletionChunk, _, _>(
            body,
            EndpointId::new("t"),
            Scrubber::default(),
            Duration::from_secs(5),
            None,
            crate::DEFAULT_MAX_ANSWER_BYTES,
        )
        .collect()
        .await
    }

    fn contents(items: &[Result<ChatCompletionChunk, Error>]) -> String {
        items
            .iter()
            .map(|item| item.as_ref().unwrap())
            .filter_map(|c| c.choices.first()?.delta.as_ref()?.content.clone())
            .collect()
    }

    #[tokio::test]
    async fn survives_a_split_at_every_byte() {
        let bytes = STREAM.as_bytes();
        let whole = decode_parts(vec![bytes.to_vec()]).await;
        assert_eq!(whole.len(), 3);
        assert_eq!(contents(&whole), "héllo wörld 🦀");
        // Every split point, including inside the multi-byte characters and inside `\n\n`.
        for at in 1..bytes.len() {
            let parts = vec![bytes[..at].to_vec(), bytes[at..].to_vec()];
            let items = decode_parts(parts).await;
            assert_eq!(contents(&items), "héllo wörld 🦀", "split at {at}");
            assert_eq!(items.len(), 3, "split at {at}");
        }
        // One byte at a time.
        let items = decode_parts(bytes.iter().map(|b| vec![*b]).collect()).await;
        assert_eq!(contents(&items), "héllo wörld 🦀");
    }

    #[tokio::test]
    async fn accepts_crlf_and_cr_line_endings() {
        for ending in ["\r\n", "\r"] {
            let text = STREAM.replace('\n', ending);
            let items = decode_parts(vec![text.into_bytes()]).await;
            assert_eq!(contents(&items), "héllo wörld 🦀", "{ending:?}");
            assert_eq!(items.len(), 3, "{ending:?}");
        }
    }

    #[tokio::test]
    async fn each_item_keeps_its_data_as_received() {
        let events = decode_events(vec![STREAM.as_bytes().to_vec()]).await;
        assert_eq!(events.len(), 3);
        let expected: Vec<&str> = STREAM
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .collect();
        for (event, data) in events.iter().zip(expected) {
            assert_eq!(event.as_ref().unwrap().data.as_deref(), Some(data));
        }
    }

    #[tokio::test]
    async fn content_that_mentions_error_is_still_an_item() {
        let text = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"the \\\"error\\\": key\"},\"finish_reason\":null}]}\n\n",
            "data: [DONE]\n\n",
        );
        let items = decode_parts(vec![text.as_bytes().to_vec()]).await;
        assert_eq!(items.len(), 1);
        assert_eq!(contents(&items), "the \"error\": key");
    }

    #[tokio::test]
    async fn cut_before_done_is_truncated() {
        let cut = STREAM.replace("data: [DONE]\n\n", "");
        let items = decode_parts(vec![cut.into_bytes()]).await;
        let last = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(last.kind(), ErrorKind::StreamTruncated);
        assert_eq!(items.len(), 4, "three chunks then the error");
    }

    #[tokio::test]
    async fn error_event_is_typed_and_ends_the_stream() {
        let text = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
            "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
            "data: {\"id\":\"c\",\"choices\":[]}\n\n",
        );
        let items = decode_parts(vec![text.as_bytes().to_vec()]).await;
        assert_eq!(items.len(), 2);
        let error = items[1].as_ref().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::StreamError);
        assert_eq!(error.body().unwrap().message, "boom");
    }

    #[tokio::test]
    async fn malformed_event_is_a_decode_error() {
        let items = decode_parts(vec![b"data: {\"id\": \"broken\n\n".to_vec()]).await;
        assert_eq!(items[0].as_ref().unwrap_err().kind(), ErrorKind::Decode);
        assert_eq!(items.len(), 1);
    }

    /// The events of `STREAM` (three chunks, then `[DONE]`), each after its gap, decoded with
    /// a 300 ms between-chunks timeout and `deadline` after the start, in paused time.
    async fn paced(
        gaps: [u64; 4],
        deadline: Option<u64>,
    ) -> Vec<Result<ChatCompletionChunk, Error>> {
        let events: Vec<String> = STREAM
            .split_inclusive("\n\n")
            .filter(|e| e.contains("data: "))
            .map(str::to_owned)
            .collect();
        assert_eq!(events.len(), 4);
        let parts = events.into_iter().zip(gaps);
        let body = futures_util::stream::unfold(parts, |mut parts| async move {
            let (event, gap) = parts.next()?;
            tokio::time::sleep(Duration::from_millis(gap)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from(event)), parts))
        });
        let start = Instant::now();
        decode::<ChatCompletionChunk, _, _>(
            Box::pin(body),
            EndpointId::new("t"),
            Scrubber::default(),
            Duration::from_millis(300),
            deadline.map(|d| start + Duration::from_millis(d)),
            crate::DEFAULT_MAX_ANSWER_BYTES,
        )
        .map(|item| item.map(|e| e.item))
        .collect()
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_last_event() {
        // Every gap under 300 ms, 800 ms in all: the one timer, armed at the start, is moved
        // on as events come, and never fires early.
        let items = paced([200, 200, 200, 200], None).await;
        assert_eq!(items.len(), 3, "{items:?}");
        assert!(items.iter().all(Result::is_ok), "{items:?}");
        // A gap of 400 ms after the second chunk: a timeout, naming the 300 ms waited.
        let items = paced([100, 100, 400, 100], None).await;
        assert_eq!(items.len(), 3, "{items:?}");
        let error = items[2].as_ref().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Timeout);
        assert!(error.to_string().contains("0.300s"), "{error}");
        // The deadline cuts a gap the idle timeout would allow.
        let items = paced([200, 200, 200, 200], Some(500)).await;
        assert_eq!(items.len(), 3, "{items:?}");
        assert_eq!(items[2].as_ref().unwrap_err().kind(), ErrorKind::Timeout);
    }

    #[test]
    fn pending_bytes_restart_at_each_blank_line_whatever_the_line_ends() {
        let mut last = [0_u8; 3];
        assert_eq!(pending_after(0, b"data: 1\n\ndata: 22", &mut last), 8);
        assert_eq!(pending_after(8, b"\r\n\r\n", &mut last), 0);
        let mut last = [0_u8; 3];
        assert_eq!(pending_after(0, b"data: 1\r\rdata", &mut last), 4);
        // Split across chunks.
        let mut last = [0_u8; 3];
        let pending = pending_after(0, b"data: 1\n", &mut last);
        assert_eq!(pending_after(pending, b"\ndata", &mut last), 4);
    }

    #[tokio::test]
    async fn an_event_over_the_limit_ends_the_stream_with_the_limit_named() {
        let big = format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}},\"finish_reason\":null}}]}}\n\n",
            "x".repeat(5_000)
        );
        // Sent in pieces, as a network delivers it.
        let parts: Vec<Result<Bytes, std::io::Error>> = big
            .into_bytes()
            .chunks(700)
            .map(|piece| Ok(Bytes::from(piece.to_vec())))
            .collect();
        let items: Vec<_> = decode::<ChatCompletionChunk, _, _>(
            futures_util::stream::iter(parts),
            EndpointId::new("t"),
            Scrubber::default(),
            Duration::from_secs(5),
            None,
            1_000,
        )
        .collect()
        .await;
        let error = items
            .iter()
            .find_map(|i| i.as_ref().err())
            .expect("an error");
        assert_eq!(error.kind(), ErrorKind::Decode, "{error}");
        assert!(
            error.to_string().contains("larger than 1000 bytes"),
            "{error}"
        );
    }
}
