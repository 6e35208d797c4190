//! The Azure backend against upstream-sim's Azure dialect over real HTTP on loopback.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::sync::Arc;
use std::time::Duration;

use backend_azure::{AzureApi, AzureBackend, StaticToken};
use futures_util::StreamExt;
use router_core::{Backend, CallOptions, ErrorKind};
use router_types::{ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest};
use serde_json::json;
use upstream_sim::{EndpointConfig, Fault, LatencyModel, Limits, Sim, SimDialect, Times};

const KEY: &str = "az-sim-key-abcdef";
const TOKEN: &str = "entra-token-xyz";

async fn sim() -> Sim {
    let config = EndpointConfig::new("az", SimDialect::Azure)
        .with_api_key(KEY)
        .with_bearer_token(TOKEN)
        .with_models(["gpt4o-east", "emb-east", "instruct-east"])
        .with_latency(LatencyModel::instant())
        .with_limits(Limits::per_minute(Some(60_000), Some(360)));
    Sim::start(3, [config]).await.unwrap()
}

fn deployments(sim: &Sim) -> AzureBackend {
    AzureBackend::builder("az", sim.endpoints()[0].url())
        .api_version("2024-10-21")
        .api_key(KEY)
        .build()
        .unwrap()
}

fn chat(model: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(model, vec![ChatMessage::user("Hello")])
}

#[tokio::test]
async fn deployments_form_url_and_headers() {
    let sim = sim().await;
    let mut request = chat("gpt4o-east");
    request
        .extra
        .insert("data_sources".into(), json!([{"type": "azure_search"}]));
    let reply = deployments(&sim)
        .chat(&request, &CallOptions::default())
        .await
        .unwrap();
    let seen = sim.endpoints()[0].last_request().unwrap();
    assert_eq!(seen.path, "/openai/deployments/gpt4o-east/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(seen.header("api-key"), Some(KEY));
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(
        seen.header("openai-organization"),
        None,
        "never OpenAI headers to Azure"
    );
    assert_eq!(
        seen.body["data_sources"][0]["type"], "azure_search",
        "Azure-only field passes"
    );
    // Azure's success headers: only the two `remaining` ones.
    let limits = &reply.meta.rate_limits;
    assert!(limits.remaining_tokens.is_some() && limits.remaining_requests.is_some());
    assert_eq!(limits.limit_tokens, None);
    assert!(
        reply
            .meta
            .request_id
            .as_deref()
            .is_some_and(|id| id.starts_with("req_sim"))
    );
    assert!(
        reply.body.prompt_filter_results.is_some(),
        "Azure filter results reach the caller"
    );
}

#[tokio::test]
async fn v1_form_puts_the_deployment_in_the_body() {
    let sim = sim().await;
    let backend = AzureBackend::builder("az", format!("{}/openai/v1", sim.endpoints()[0].url()))
        .v1()
        .api_key(KEY)
        .build()
        .unwrap();
    backend
        .chat(&chat("gpt4o-east"), &CallOptions::default())
        .await
        .unwrap();
    let seen = sim.endpoints()[0].last_request().unwrap();
    assert_eq!(seen.path, "/openai/v1/chat/completions");
    assert_eq!(seen.query, None);
    assert_eq!(seen.body["model"], "gpt4o-east");

    let preview = AzureBackend::builder("az", sim.endpoints()[0].url())
        .api(AzureApi::V1 {
            api_version: Some("preview".into()),
        })
        .api_key(KEY)
        .build()
        .unwrap();
    preview
        .embeddings(
            &EmbeddingRequest::new("emb-east", "text"),
            &CallOptions::default(),
        )
        .await
        .unwrap();
    let seen = sim.endpoints()[0].last_request().unwrap();
    assert_eq!(seen.path, "/openai/v1/embeddings");
    assert_eq!(seen.query.as_deref(), Some("api-version=preview"));
}

#[tokio::test]
async fn entra_bearer_token() {
    let sim = sim().await;
    let backend = AzureBackend::builder("az", sim.endpoints()[0].url())
        .api_version("2024-10-21")
        .token_provider(Arc::new(StaticToken::new(TOKEN)))
        .build()
        .unwrap();
    backend
        .chat(&chat("gpt4o-east"), &CallOptions::default())
        .await
        .unwrap();
    let seen = sim.endpoints()[0].last_request().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(seen.header("api-key"), None);
    assert!(!format!("{backend:?}").contains(TOKEN));
}

#[tokio::test]
async fn stream_opens_with_the_prompt_filter_event() {
    let sim = sim().await;
    let mut stream = deployments(&sim)
        .chat_stream(&chat("gpt4o-east"), &CallOptions::default())
        .await
        .unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.id.is_empty() && first.choices.is_empty());
    assert!(first.prompt_filter_results.is_some());
    assert!(stream.time_to_first_event().is_some());
    assert!(
        stream.time_to_first_content().is_none(),
        "a filter event is not a token"
    );
    let mut rest = 0;
    while let Some(item) = stream.next().await {
        item.unwrap();
        rest += 1;
    }
    assert!(rest > 2);
    assert!(stream.time_to_first_content().is_some());
}

#[tokio::test]
async fn embeddings_and_completions_use_their_deployment_paths() {
    let sim = sim().await;
    let backend = deployments(&sim);
    backend
        .embeddings(
            &EmbeddingRequest::new("emb-east", "hi"),
            &CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        sim.endpoints()[0].last_request().unwrap().path,
        "/openai/deployments/emb-east/embeddings"
    );
    backend
        .completions(
            &CompletionRequest::new("instruct-east", "Say"),
            &CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        sim.endpoints()[0].last_request().unwrap().path,
        "/openai/deployments/instruct-east/completions"
    );
}

#[tokio::test]
async fn azure_errors() {
    let sim = sim().await;
    let backend = deployments(&sim);
    let missing = backend
        .chat(&chat("no-such-deployment"), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    assert_eq!(
        missing.body().unwrap().code_str().as_deref(),
        Some("DeploymentNotFound")
    );

    let wrong_key = AzureBackend::builder("az", sim.endpoints()[0].url())
        .api_version("2024-10-21")
        .api_key("az-wrong")
        .build()
        .unwrap();
    let denied = wrong_key
        .chat(&chat("gpt4o-east"), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(denied.kind(), ErrorKind::Unauthorized);

    sim.endpoints()[0].inject(
        Fault::status_with_code(400, "content_filter"),
        Times::Next(1),
    );
    let filtered = backend
        .chat(&chat("gpt4o-east"), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(filtered.kind(), ErrorKind::ContentFilter);
    assert!(!filtered.is_retryable());

    sim.endpoints()[0].inject(Fault::rate_limited(Duration::from_secs(7)), Times::Next(1));
    let throttled = backend
        .chat(&chat("gpt4o-east"), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(throttled.kind(), ErrorKind::RateLimited);
    assert_eq!(throttled.retry_after(), Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn missing_api_version_is_refused_by_azure() {
    // The sim enforces what Azure does; the dialect never sends a deployments URL without one.
    let sim = sim().await;
    let client = reqwest_free_post(&sim.endpoints()[0].url()).await;
    assert_eq!(client, 400);
}

/// A bare HTTP/1.1 request without api-version, written by hand (this crate has no reqwest).
async fn reqwest_free_post(base: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /openai/deployments/gpt4o-east/chat/completions HTTP/1.1\r\nhost: {addr}\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await.unwrap();
    answer.split(' ').nth(1).unwrap().parse().unwrap()
}
