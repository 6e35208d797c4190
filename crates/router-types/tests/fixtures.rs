//! Every payload in `fixtures/` parses into its type and is written back without losing a field.
//!
//! "Without losing a field" is checked on JSON values: the re-serialized payload equals the
//! original once `null`-valued keys are removed from both (an optional `null` and an absent key
//! are the same value; see the crate docs). The checks on required-nullable fields below make
//! sure that rule does not hide a dropped `content` or `finish_reason`.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers fail loudly by design"
)]

use std::fs;
use std::path::{Path, PathBuf};

use router_types::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
    CompletionResponse, CreateResponse, EmbeddingRequest, EmbeddingResponse, ErrorResponse,
    FinishReason, MessageContent, Response, ResponseStreamEvent,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn read(rel: &str) -> String {
    fs::read_to_string(fixtures().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn strip_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

/// Parses `text` as `T`, writes it back, and compares; returns the typed value.
fn round_trip<T: DeserializeOwned + Serialize>(what: &str, text: &str) -> T {
    let original: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    let typed: T = serde_json::from_str(text).unwrap_or_else(|e| {
        panic!(
            "{what} does not parse as {}: {e}",
            std::any::type_name::<T>()
        )
    });
    let written = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        strip_nulls(&written),
        strip_nulls(&original),
        "{what}: round trip changed the payload"
    );
    typed
}

fn json<T: DeserializeOwned + Serialize>(rel: &str) -> T {
    round_trip(rel, &read(rel))
}

/// The `data:` payloads of an SSE file, `[DONE]` excluded.
fn sse_data(rel: &str) -> Vec<String> {
    read(rel)
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.trim_start().to_owned())
        .filter(|data| data != "[DONE]")
        .collect()
}

#[test]
fn openai_chat_requests() {
    let basic: ChatCompletionRequest = json("openai/chat_request_basic.json");
    assert_eq!(basic.model, "gpt-4o-mini");
    let images: ChatCompletionRequest = json("openai/chat_request_image_parts.json");
    let Some(MessageContent::Parts(parts)) = &images.messages[0].content else {
        panic!("image request content should be parts");
    };
    assert!(
        parts
            .iter()
            .any(|p| p.kind == "image_url" && p.image_url.is_some())
    );
    assert!(images.max_tokens.is_some());
    let tools: ChatCompletionRequest = json("openai/chat_request_tools.json");
    let tool = &tools.tools.as_ref().unwrap()[0];
    assert_eq!(tool.function.as_ref().unwrap().name, "get_current_weather");
    let logprobs: ChatCompletionRequest = json("openai/chat_request_logprobs.json");
    assert!(
        logprobs.extra.contains_key("logprobs"),
        "unmodelled fields land in extra"
    );
}

#[test]
fn openai_chat_responses() {
    let basic: ChatCompletionResponse = json("openai/chat_response_basic.json");
    assert_eq!(basic.choices[0].finish_reason, Some(FinishReason::Stop));
    assert!(basic.usage.as_ref().unwrap().total_tokens > 0);
    let tools: ChatCompletionResponse = json("openai/chat_response_tool_calls.json");
    let message = &tools.choices[0].message;
    assert_eq!(
        tools.choices[0].finish_reason,
        Some(FinishReason::ToolCalls)
    );
    assert!(
        message
            .tool_calls
            .as_ref()
            .is_some_and(|calls| !calls.is_empty())
    );
    // Required-nullable: an assistant message with tool calls keeps `"content": null`.
    let written = serde_json::to_value(&tools).unwrap();
    assert!(
        written["choices"][0]["message"]
            .as_object()
            .unwrap()
            .contains_key("content")
    );
    let _: ChatCompletionResponse = json("openai/chat_response_logprobs.json");
}

#[test]
fn openai_streams() {
    for rel in [
        "openai/chat_stream_basic.sse",
        "openai/synthetic_chat_stream_include_usage.sse",
        "openai/synthetic_chat_stream_tool_calls.sse",
    ] {
        let chunks: Vec<ChatCompletionChunk> =
            sse_data(rel).iter().map(|d| round_trip(rel, d)).collect();
        assert!(chunks.len() >= 3, "{rel}: too few events");
        // Required-nullable: every chunk choice writes `finish_reason`, null or not.
        for chunk in &chunks {
            let written = serde_json::to_value(chunk).unwrap();
            for choice in written["choices"].as_array().unwrap() {
                assert!(
                    choice.as_object().unwrap().contains_key("finish_reason"),
                    "{rel}"
                );
            }
        }
    }
    let usage = sse_data("openai/synthetic_chat_stream_include_usage.sse");
    let last: ChatCompletionChunk = serde_json::from_str(usage.last().unwrap()).unwrap();
    assert!(last.choices.is_empty() && last.usage.is_some());

    let tool_calls = sse_data("openai/synthetic_chat_stream_tool_calls.sse");
    let indexes: std::collections::BTreeSet<u32> = tool_calls
        .iter()
        .map(|d| serde_json::from_str::<ChatCompletionChunk>(d).unwrap())
        .flat_map(|c| c.choices)
        .filter_map(|c| c.delta?.tool_calls)
        .flatten()
        .map(|t| t.index)
        .collect();
    assert_eq!(indexes.len(), 2, "two parallel tool calls");

    let midstream = sse_data("openai/synthetic_chat_stream_midstream_error.sse");
    let _: ChatCompletionChunk = round_trip("midstream[0]", &midstream[0]);
    let error: ErrorResponse = round_trip("midstream[1]", &midstream[1]);
    assert_eq!(error.error.kind.as_deref(), Some("server_error"));
}

#[test]
fn openai_other_endpoints() {
    let _: EmbeddingRequest = json("openai/embeddings_request.json");
    let embeddings: EmbeddingResponse = json("openai/embeddings_response.json");
    assert!(!embeddings.data.is_empty());
    let completion: CompletionRequest = json("openai/completions_request.json");
    assert_eq!(completion.max_tokens, Some(7));
    let _: CompletionResponse = json("openai/completions_response.json");
    let _: CreateResponse = json("openai/responses_request_basic.json");
    let response: Response = json("openai/responses_response_basic.json");
    assert!(response.usage.is_some());
    for data in sse_data("openai/responses_stream_basic.sse") {
        let event: ResponseStreamEvent = round_trip("responses_stream_basic.sse", &data);
        assert!(event.kind.starts_with("response."));
    }
}

#[test]
fn openai_errors() {
    let tokens: ErrorResponse = json("openai/error_429_rate_limit_tokens.json");
    assert!(tokens.error.is("rate_limit_exceeded"));
    let quota: ErrorResponse = json("openai/error_429_insufficient_quota.json");
    assert!(quota.error.is("insufficient_quota"));
    let context: ErrorResponse = json("openai/error_400_context_length_exceeded.json");
    assert!(context.error.is("context_length_exceeded"));
}

#[test]
fn azure_payloads() {
    let _: ChatCompletionRequest = json("azure/chat_request_basic.json");
    let basic: ChatCompletionResponse = json("azure/chat_response_basic.json");
    assert!(
        basic.object.is_none() && basic.model.is_none(),
        "Azure example omits both"
    );
    let filtered: ChatCompletionResponse = json("azure/chat_response_with_filter_results.json");
    assert!(filtered.prompt_filter_results.is_some());
    assert!(filtered.choices[0].content_filter_results.is_some());
    let not_run: CompletionResponse = json("azure/completion_response_filter_not_run.json");
    assert!(
        not_run.choices[0]
            .extra
            .contains_key("content_filter_result")
    );
    let _: EmbeddingRequest = json("azure/embeddings_request.json");
    let _: EmbeddingResponse = json("azure/embeddings_response_truncated.json");
    let _: CreateResponse = json("azure/v1_responses_request.json");
    let _: Response = json("azure/v1_responses_response.json");
}

#[test]
fn azure_errors() {
    let filter: ErrorResponse = json("azure/error_400_content_filter_prompt.json");
    assert!(filter.error.is("content_filter"));
    assert!(filter.error.extra.contains_key("innererror"));
    let throttled: ErrorResponse = json("azure/error_429_token_rate_limit.json");
    assert_eq!(throttled.error.code_str().as_deref(), Some("429"));
    assert!(throttled.error.kind.is_none());
    let missing: ErrorResponse = json("azure/error_404_deployment_not_found.json");
    assert!(missing.error.is("DeploymentNotFound"));
    let key: ErrorResponse = json("azure/error_401_invalid_key.json");
    assert_eq!(key.error.code_str().as_deref(), Some("401"));
}

#[test]
fn azure_streams() {
    for rel in [
        "azure/chat_stream_async_filter_passes.sse",
        "azure/chat_stream_async_filter_blocked.sse",
    ] {
        let chunks: Vec<ChatCompletionChunk> =
            sse_data(rel).iter().map(|d| round_trip(rel, d)).collect();
        let first = &chunks[0];
        assert!(
            first.id.is_empty() && first.choices.is_empty(),
            "{rel}: prompt filter event"
        );
        // Annotation events have no delta but keep their filter results and offsets.
        assert!(
            chunks
                .iter()
                .flat_map(|c| &c.choices)
                .any(|c| c.delta.is_none()
                    && c.content_filter_results.is_some()
                    && c.extra.contains_key("content_filter_offsets")),
            "{rel}: annotation events"
        );
    }
    let blocked = sse_data("azure/chat_stream_async_filter_blocked.sse");
    let last: ChatCompletionChunk = serde_json::from_str(blocked.last().unwrap()).unwrap();
    assert_eq!(
        last.choices[0].finish_reason,
        Some(FinishReason::ContentFilter)
    );
}

#[test]
fn every_fixture_is_covered() {
    // A new fixture must be added to one of the tests above.
    let covered = [
        "openai/chat_request_basic.json",
        "openai/chat_request_image_parts.json",
        "openai/chat_request_tools.json",
        "openai/chat_request_logprobs.json",
        "openai/chat_response_basic.json",
        "openai/chat_response_tool_calls.json",
        "openai/chat_response_logprobs.json",
        "openai/chat_stream_basic.sse",
        "openai/synthetic_chat_stream_include_usage.sse",
        "openai/synthetic_chat_stream_tool_calls.sse",
        "openai/synthetic_chat_stream_midstream_error.sse",
        "openai/embeddings_request.json",
        "openai/embeddings_response.json",
        "openai/completions_request.json",
        "openai/completions_response.json",
        "openai/responses_request_basic.json",
        "openai/responses_response_basic.json",
        "openai/responses_stream_basic.sse",
        "openai/error_429_rate_limit_tokens.json",
        "openai/error_429_insufficient_quota.json",
        "openai/error_400_context_length_exceeded.json",
        "openai/headers_200_ratelimit.txt",
        "azure/chat_request_basic.json",
        "azure/chat_response_basic.json",
        "azure/chat_response_with_filter_results.json",
        "azure/chat_stream_async_filter_passes.sse",
        "azure/chat_stream_async_filter_blocked.sse",
        "azure/completion_response_filter_not_run.json",
        "azure/embeddings_request.json",
        "azure/embeddings_response_truncated.json",
        "azure/error_400_content_filter_prompt.json",
        "azure/error_401_invalid_key.json",
        "azure/error_404_deployment_not_found.json",
        "azure/error_429_token_rate_limit.json",
        "azure/headers_200_chat.txt",
        "azure/headers_429_token_limit.txt",
        "azure/v1_responses_request.json",
        "azure/v1_responses_response.json",
    ];
    for dir in ["openai", "azure"] {
        for entry in fs::read_dir(fixtures().join(dir)).unwrap() {
            let name = format!("{dir}/{}", entry.unwrap().file_name().to_string_lossy());
            assert!(
                covered.contains(&name.as_str()),
                "fixture {name} is not tested"
            );
        }
    }
}
