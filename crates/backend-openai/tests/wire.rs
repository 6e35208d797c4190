//! The OpenAI backend against upstream-sim over real HTTP on loopback.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail loudly by design"
)]

use std::time::{Duration, Instant};

use backend_openai::{OpenAiBackend, Timeouts};
use futures_util::StreamExt;
use router_core::{Backend, CallOptions, ChatStream, Error, ErrorKind};
use router_types::{
    ChatCompletionChunk, ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest,
    FinishReason, FunctionDefinition, StreamOptions, Tool,
};
use serde_json::json;
use upstream_sim::{EndpointConfig, Fault, LatencyModel, Limits, Sim, SimDialect, Times};

const KEY: &str = "sk-sim-secret-key-0123456789";

async fn sim_with(config: EndpointConfig) -> Sim {
    Sim::start(7, [config]).await.unwrap()
}

fn endpoint() -> EndpointConfig {
    EndpointConfig::new("oai", SimDialect::OpenAi)
        .with_api_key(KEY)
        .with_models([
            "gpt-4o-mini",
            "text-embedding-3-small",
            "gpt-3.5-turbo-instruct",
        ])
        .with_latency(LatencyModel::instant())
}

fn backend(sim: &Sim) -> OpenAiBackend {
    OpenAiBackend::builder("oai", sim.endpoints()[0].openai_base_url())
        .api_key(KEY)
        .build()
        .unwrap()
}

fn chat_request() -> ChatCompletionRequest {
    ChatCompletionRequest::new("gpt-4o-mini", vec![ChatMessage::user("Say hello")])
}

async fn collect(stream: ChatStream) -> (Vec<ChatCompletionChunk>, Option<Error>) {
    let mut chunks = Vec::new();
    let mut stream = stream;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => chunks.push(chunk),
            Err(error) => {
                assert!(stream.next().await.is_none(), "nothing after an error");
                return (chunks, Some(error));
            }
        }
    }
    (chunks, None)
}

fn text(chunks: &[ChatCompletionChunk]) -> String {
    chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.as_ref()?.content.clone())
        .collect()
}

#[tokio::test]
async fn chat_sends_the_exact_wire_shape_and_keeps_unknown_fields() {
    let sim = sim_with(endpoint().with_limits(Limits::per_minute(Some(100_000), Some(600)))).await;
    let backend = OpenAiBackend::builder("oai", sim.endpoints()[0].openai_base_url())
        .api_key(KEY)
        .organization("org-sim")
        .project("proj_sim")
        .build()
        .unwrap();
    let mut request = chat_request();
    request.max_completion_tokens = Some(5);
    request
        .extra
        .insert("x_future_param".into(), json!({"nested": [1, 2]}));

    let reply = backend
        .chat(&request, &CallOptions::default())
        .await
        .unwrap();

    let seen = sim.endpoints()[0].last_request().unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.query, None);
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("openai-organization"), Some("org-sim"));
    assert_eq!(seen.header("openai-project"), Some("proj_sim"));
    assert_eq!(seen.header("api-key"), None);
    assert_eq!(
        seen.body["x_future_param"],
        json!({"nested": [1, 2]}),
        "unknown request field"
    );
    assert_eq!(seen.body["model"], "gpt-4o-mini");

    let body = &reply.body;
    assert_eq!(body.choices[0].finish_reason, Some(FinishReason::Stop));
    assert_eq!(body.usage.as_ref().unwrap().completion_tokens, Some(5));
    assert_eq!(
        body.extra["x_sim_extra"]["served_by"], "upstream-sim",
        "unknown response field"
    );
    assert_eq!(reply.meta.status, 200);
    assert!(
        reply
            .meta
            .request_id
            .as_deref()
            .is_some_and(|id| id.starts_with("req_sim"))
    );
    let limits = &reply.meta.rate_limits;
    assert_eq!(limits.limit_tokens, Some(100_000));
    assert_eq!(limits.limit_requests, Some(600));
    assert!(limits.remaining_tokens.is_some() && limits.reset_tokens.is_some());
}

#[tokio::test]
async fn stream_yields_typed_chunks_until_done() {
    let sim = sim_with(endpoint()).await;
    let backend = backend(&sim);
    let mut request = chat_request();
    request.stream_options = Some(StreamOptions {
        include_usage: Some(true),
        ..StreamOptions::default()
    });
    let stream = backend
        .chat_stream(&request, &CallOptions::default())
        .await
        .unwrap();
    assert_eq!(stream.meta().status, 200);
    let seen = sim.endpoints()[0].last_request().unwrap();
    assert_eq!(seen.body["stream"], true, "the backend asks for a stream");
    let (chunks, error) = collect(stream).await;
    assert!(error.is_none(), "{error:?}");
    assert!(!text(&chunks).is_empty());
    let finish = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .find_map(|c| c.finish_reason.clone());
    assert_eq!(finish, Some(FinishReason::Stop));
    let last = chunks.last().unwrap();
    assert!(
        last.choices.is_empty() && last.usage.is_some(),
        "usage chunk last"
    );
    assert_eq!(sim.endpoints()[0].counters().ok, 1);
}

#[tokio::test]
async fn stream_with_tools_carries_tool_call_deltas() {
    let sim = sim_with(endpoint()).await;
    let mut request = chat_request();
    request.tools = Some(vec![Tool::function(FunctionDefinition {
        name: "get_weather".into(),
        parameters: Some(json!({"type": "object"})),
        ..FunctionDefinition::default()
    })]);
    let stream = backend(&sim)
        .chat_stream(&request, &CallOptions::default())
        .await
        .unwrap();
    let (chunks, error) = collect(stream).await;
    assert!(error.is_none());
    let deltas: Vec<_> = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.as_ref()?.tool_calls.clone())
        .flatten()
        .collect();
    assert_eq!(
        deltas[0].function.as_ref().unwrap().name.as_deref(),
        Some("get_weather")
    );
    let arguments: String = deltas
        .iter()
        .filter_map(|d| d.function.as_ref()?.arguments.clone())
        .collect();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&arguments).unwrap()["location"],
        "Boston"
    );
    let finish = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .find_map(|c| c.finish_reason.clone());
    assert_eq!(finish, Some(FinishReason::ToolCalls));
}

#[tokio::test]
async fn embeddings_and_completions() {
    let sim = sim_with(endpoint()).await;
    let backend = backend(&sim);
    let mut request = EmbeddingRequest::new(
        "text-embedding-3-small",
        router_types::PromptInput::Texts(vec!["a".into(), "b".into()]),
    );
    request.dimensions = Some(4);
    let reply = backend
        .embeddings(&request, &CallOptions::default())
        .await
        .unwrap();
    assert_eq!(
        sim.endpoints()[0].last_request().unwrap().path,
        "/v1/embeddings"
    );
    assert_eq!(reply.body.data.len(), 2);
    let router_types::EmbeddingVector::Float(vector) = &reply.body.data[1].embedding else {
        panic!("float embedding expected");
    };
    assert_eq!(vector.len(), 4);

    let mut request = CompletionRequest::new("gpt-3.5-turbo-instruct", "Say this is a test");
    request.max_tokens = Some(3);
    let reply = backend
        .completions(&request, &CallOptions::default())
        .await
        .unwrap();
    assert_eq!(
        sim.endpoints()[0].last_request().unwrap().path,
        "/v1/completions"
    );
    assert_eq!(reply.body.choices[0].text.split(' ').count(), 3);
}

#[tokio::test]
async fn base_url_path_is_honoured() {
    // The seed ignored the configured base URL; a wrong base must reach the wrong path.
    let sim = sim_with(endpoint()).await;
    let wrong = OpenAiBackend::builder("oai", format!("{}/v2", sim.endpoints()[0].url()))
        .api_key(KEY)
        .build()
        .unwrap();
    let error = wrong
        .chat(&chat_request(), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert_eq!(
        sim.endpoints()[0].last_request().unwrap().path,
        "/v2/chat/completions"
    );
}

#[tokio::test]
async fn unauthorized_never_leaks_the_key() {
    let sim = sim_with(endpoint()).await;
    let wrong_key = "sk-wrong-key-that-must-not-leak";
    let backend = OpenAiBackend::builder("oai", sim.endpoints()[0].openai_base_url())
        .api_key(wrong_key)
        .build()
        .unwrap();
    let error = backend
        .chat(&chat_request(), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized);
    assert_eq!(error.status(), Some(401));
    // The simulator echoes the key it was given, as OpenAI once did.
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("[REDACTED]"), "{shown}");
    assert!(!shown.contains(wrong_key), "{shown}");
    assert!(!format!("{backend:?}").contains(wrong_key));
}

async fn error_for(fault: Fault, stream: bool) -> Error {
    let sim = sim_with(endpoint()).await;
    sim.endpoints()[0].inject(fault, Times::Next(1));
    let backend = backend(&sim);
    if stream {
        match backend
            .chat_stream(&chat_request(), &CallOptions::default())
            .await
        {
            Err(error) => error,
            Ok(stream) => collect(stream).await.1.expect("the stream should fail"),
        }
    } else {
        backend
            .chat(&chat_request(), &CallOptions::default())
            .await
            .unwrap_err()
    }
}

#[tokio::test]
async fn every_status_maps_to_its_kind() {
    let cases = [
        (Fault::status(500), ErrorKind::ServerError, true),
        (Fault::status(502), ErrorKind::ServerError, true),
        (Fault::status(503), ErrorKind::ServerError, true),
        (Fault::status(408), ErrorKind::RequestTimeout, true),
        (Fault::status(409), ErrorKind::Conflict, true),
        (Fault::status(403), ErrorKind::Forbidden, true),
        (Fault::status(422), ErrorKind::Unprocessable, false),
        (Fault::status(400), ErrorKind::BadRequest, false),
        (
            Fault::status_with_code(400, "content_filter"),
            ErrorKind::ContentFilter,
            false,
        ),
        (
            Fault::status_with_code(400, "context_length_exceeded"),
            ErrorKind::ContextLengthExceeded,
            false,
        ),
        (
            Fault::status_with_code(429, "insufficient_quota"),
            ErrorKind::QuotaExhausted,
            true,
        ),
        (
            Fault::rate_limited(Duration::from_millis(2500)),
            ErrorKind::RateLimited,
            true,
        ),
    ];
    for (fault, kind, retryable) in cases {
        for stream in [false, true] {
            let error = error_for(fault.clone(), stream).await;
            assert_eq!(error.kind(), kind, "{fault:?} stream={stream}");
            assert_eq!(error.is_retryable(), retryable, "{fault:?}");
            assert_eq!(error.endpoint().unwrap().as_str(), "oai");
        }
    }
    let throttled = error_for(Fault::rate_limited(Duration::from_millis(2500)), false).await;
    assert_eq!(
        throttled.retry_after(),
        Some(Duration::from_millis(2500)),
        "retry-after-ms wins"
    );
}

#[tokio::test]
async fn unknown_model_is_not_found() {
    let sim = sim_with(endpoint()).await;
    let mut request = chat_request();
    request.model = "gpt-nope".into();
    let error = backend(&sim)
        .chat(&request, &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert!(error.to_string().contains("gpt-nope"));
}

#[tokio::test]
async fn quota_429_carries_the_window_reset() {
    // 600 TPM over 10 s windows: 100 tokens per window; each request reserves 16 + prompt.
    let limits = Limits::per_minute(Some(600), None).with_window(Duration::from_secs(10));
    let sim = sim_with(endpoint().with_limits(limits)).await;
    let backend = backend(&sim);
    let mut request = chat_request();
    request.max_tokens = Some(60);
    backend
        .chat(&request, &CallOptions::default())
        .await
        .unwrap();
    let error = backend
        .chat(&request, &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::RateLimited);
    let wait = error.retry_after().unwrap();
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(10),
        "{wait:?}"
    );
    assert_eq!(sim.endpoints()[0].counters().rate_limited, 1);
}

#[tokio::test]
async fn transport_failures_are_typed() {
    assert_eq!(
        error_for(Fault::Reset, false).await.kind(),
        ErrorKind::Transport
    );
    assert_eq!(
        error_for(Fault::Reset, true).await.kind(),
        ErrorKind::Transport
    );
    assert_eq!(
        error_for(Fault::MalformedJson, false).await.kind(),
        ErrorKind::Decode
    );
    assert_eq!(
        error_for(Fault::MalformedJson, true).await.kind(),
        ErrorKind::Decode
    );
    assert_eq!(
        error_for(Fault::TruncateStream { after_events: 2 }, true)
            .await
            .kind(),
        ErrorKind::StreamTruncated
    );
    assert_eq!(
        error_for(Fault::ResetMidStream { after_events: 2 }, true)
            .await
            .kind(),
        ErrorKind::Transport
    );
    let event = error_for(Fault::ErrorEvent { after_events: 2 }, true).await;
    assert_eq!(event.kind(), ErrorKind::StreamError);
    assert_eq!(event.body().unwrap().kind.as_deref(), Some("server_error"));
}

#[tokio::test]
async fn stream_chunks_before_a_cut_reach_the_caller() {
    let sim = sim_with(endpoint()).await;
    sim.endpoints()[0].inject(Fault::TruncateStream { after_events: 3 }, Times::Next(1));
    let stream = backend(&sim)
        .chat_stream(&chat_request(), &CallOptions::default())
        .await
        .unwrap();
    let (chunks, error) = collect(stream).await;
    assert_eq!(chunks.len(), 3);
    assert_eq!(error.unwrap().kind(), ErrorKind::StreamTruncated);
}

#[tokio::test]
async fn connection_refused_is_connect() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let backend = OpenAiBackend::builder("gone", format!("http://127.0.0.1:{port}/v1"))
        .build()
        .unwrap();
    let error = backend
        .chat(&chat_request(), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect);
    assert!(error.is_retryable());
}

/// A backend that waits 300 ms for headers and between chunks.
fn impatient_backend(sim: &Sim) -> OpenAiBackend {
    OpenAiBackend::builder("oai", sim.endpoints()[0].openai_base_url())
        .api_key(KEY)
        .timeouts(short_timeouts())
        .build()
        .unwrap()
}

fn short_timeouts() -> Timeouts {
    Timeouts::default()
        .with_first_byte(Duration::from_millis(300), Duration::from_millis(300))
        .with_between_chunks(Duration::from_millis(300))
}

// Timeouts run on real time, bounded: each waits 300 ms against a stall of 30 s.
#[tokio::test]
async fn stall_before_headers_times_out() {
    for stream in [false, true] {
        let sim = sim_with(endpoint()).await;
        sim.endpoints()[0].inject(
            Fault::StallBeforeHeaders(Duration::from_secs(30)),
            Times::Next(1),
        );
        let backend = impatient_backend(&sim);
        let started = Instant::now();
        let error = if stream {
            backend
                .chat_stream(&chat_request(), &CallOptions::default())
                .await
                .unwrap_err()
        } else {
            backend
                .chat(&chat_request(), &CallOptions::default())
                .await
                .unwrap_err()
        };
        assert_eq!(error.kind(), ErrorKind::Timeout, "stream={stream}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

#[tokio::test]
async fn stall_mid_stream_times_out() {
    let sim = sim_with(endpoint()).await;
    sim.endpoints()[0].inject(
        Fault::StallMidStream {
            after_events: 2,
            duration: Duration::from_secs(30),
        },
        Times::Next(1),
    );
    let backend = impatient_backend(&sim);
    let stream = backend
        .chat_stream(&chat_request(), &CallOptions::default())
        .await
        .unwrap();
    let (chunks, error) = collect(stream).await;
    assert_eq!(chunks.len(), 2);
    assert_eq!(error.unwrap().kind(), ErrorKind::Timeout);
}

#[tokio::test]
async fn the_deadline_cuts_a_long_first_byte_timeout() {
    let sim = sim_with(endpoint()).await;
    sim.endpoints()[0].inject(
        Fault::StallBeforeHeaders(Duration::from_secs(30)),
        Times::Next(1),
    );
    let started = Instant::now();
    let options = CallOptions::default().with_deadline(started + Duration::from_millis(200));
    let error = backend(&sim)
        .chat(&chat_request(), &options)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn time_to_first_content_is_measured() {
    let latency = LatencyModel::new(Duration::from_millis(120), Duration::from_millis(1));
    let sim = sim_with(endpoint().with_latency(latency)).await;
    let mut stream = backend(&sim)
        .chat_stream(&chat_request(), &CallOptions::default())
        .await
        .unwrap();
    while stream.next().await.is_some() {}
    let ttft = stream.time_to_first_content().unwrap();
    assert!(ttft >= Duration::from_millis(120), "{ttft:?}");
    assert!(stream.meta().time_to_headers < ttft);
}

/// A non-streamed answer larger than `max_answer_bytes` is a `Decode` error naming the limit,
/// read no further (a 502 through the gateway); the same answer under the limit is read whole,
/// and a stream of it is read an event at a time.
#[tokio::test]
async fn an_answer_over_the_size_limit_is_refused_with_the_limit_named() {
    let output = upstream_sim::OutputModel {
        completion_tokens: 20_000,
        ..upstream_sim::OutputModel::default()
    };
    let sim = sim_with(endpoint().with_output(output)).await;
    let url = sim.endpoints()[0].openai_base_url();
    let limited = |bytes: usize| {
        OpenAiBackend::builder("oai", url.as_str())
            .api_key(KEY)
            .max_answer_bytes(bytes)
            .build()
            .unwrap()
    };
    let request = ChatCompletionRequest::new("gpt-4o-mini", vec![ChatMessage::user("long")]);
    let error = limited(50_000)
        .chat(&request, &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Decode, "{error}");
    assert!(
        error.to_string().contains("larger than 50000 bytes"),
        "{error}"
    );
    let whole = limited(10_000_000)
        .chat(&request, &CallOptions::default())
        .await
        .unwrap();
    assert!(whole.body.choices[0].message.text().len() > 50_000);
    let mut streamed = request.clone();
    streamed.stream = Some(true);
    let stream = limited(50_000)
        .chat_stream(&streamed, &CallOptions::default())
        .await
        .unwrap();
    let (chunks, error) = collect(stream).await;
    assert!(error.is_none(), "{error:?}");
    assert!(text(&chunks).len() > 50_000);
}
