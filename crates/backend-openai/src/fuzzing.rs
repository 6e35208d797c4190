//! The SSE decoder's fuzz target body (`fuzz/fuzz_targets/sse.rs`), here so that the corpus
//! replay (`tests/fuzz_corpus.rs`) runs it on stable: not part of the crate's API.

#![allow(
    clippy::panic,
    clippy::expect_used,
    reason = "a fuzz target reports a broken property by panicking"
)]

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use router_core::EndpointId;
use router_types::ChatCompletionChunk;

use crate::scrub::Scrubber;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}

/// One decoded event, reduced to what must not depend on how the body was cut into chunks:
/// the event's data, or the error's kind and message.
pub type Decoded = Result<String, String>;

/// Decodes `parts` (a chat stream's body as it arrived, chunk by chunk) with an event limit
/// of `max_event` bytes, on the caller's runtime.
pub async fn decode_chat_stream(parts: Vec<Bytes>, max_event: usize) -> Vec<Decoded> {
    let body = futures_util::stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>));
    crate::sse::decode::<ChatCompletionChunk, _, _>(
        body,
        EndpointId::new("fuzz"),
        Scrubber::default(),
        Duration::from_secs(3600),
        None,
        max_event,
    )
    .map(|event| match event {
        Ok(event) => Ok(event.data.unwrap_or_default()),
        Err(error) => Err(format!("{:?}: {error}", error.kind())),
    })
    .collect()
    .await
}

/// The SSE decoder over `data`: the first two bytes pick where the body is cut (and whether
/// a small event limit applies); the decoded events must not depend on the cuts.
pub fn sse(data: &[u8]) {
    let [a, b, body @ ..] = data else {
        return;
    };
    let limit = if a & 1 == 1 { 64 } else { 1 << 20 };
    let whole = vec![Bytes::copy_from_slice(body)];
    let first = usize::from(*a) % (body.len() + 1);
    let second = first + usize::from(*b) % (body.len() - first + 1);
    let cut = vec![
        Bytes::copy_from_slice(&body[..first]),
        Bytes::copy_from_slice(&body[first..second]),
        Bytes::copy_from_slice(&body[second..]),
    ];
    let bytewise: Vec<Bytes> = if body.len() <= 64 {
        body.iter()
            .map(|byte| Bytes::copy_from_slice(&[*byte]))
            .collect()
    } else {
        cut.clone()
    };
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let expected = decode_chat_stream(whole, limit).await;
            let got = decode_chat_stream(cut, limit).await;
            assert_eq!(expected, got, "cut at {first} and {second}");
            let got = decode_chat_stream(bytewise, limit).await;
            assert_eq!(expected, got, "a byte at a time");
        });
    });
}
