//! What the router's traces say, in a test binary of its own: a subscriber set for one
//! thread sees every event only when no other test shares the process (tracing caches which
//! callsites are wanted across threads).

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::time::Duration;

use futures_util::StreamExt;
use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, Router, StrategyKind};
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

const MODEL: &str = "gpt-4o-mini";

/// A writer the test's subscriber writes its lines into.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A trace of an answered request names who answered (the upstream's request id, Azure's
/// region and model session, in the attempt's span with its endpoint), streamed or not, and
/// never the API key.
#[tokio::test]
async fn traces_name_the_upstreams_request_id_region_and_model_session() {
    let endpoints = [SimDialect::OpenAi, SimDialect::Azure]
        .into_iter()
        .enumerate()
        .map(|(i, dialect)| {
            EndpointConfig::new(format!("ep{i}"), dialect)
                .with_api_key(format!("key-{i}"))
                .with_models([format!("dep-{i}")])
                .with_latency(LatencyModel::new(Duration::from_millis(5), Duration::ZERO))
        });
    let sim = Sim::start(9, endpoints).await.unwrap();
    let mut builder = Router::builder().strategy(StrategyKind::RoundRobin);
    for (i, endpoint) in sim.endpoints().iter().enumerate() {
        let configured = match endpoint.dialect() {
            SimDialect::OpenAi => Endpoint::openai(endpoint.name(), endpoint.openai_base_url()),
            SimDialect::Azure => {
                Endpoint::azure(endpoint.name(), endpoint.url()).api_version("2024-10-21")
            }
        };
        builder = builder.endpoint(
            configured
                .api_key(format!("key-{i}"))
                .deployment(MODEL, format!("dep-{i}")),
        );
    }
    let router = builder.build().unwrap();
    let request = || {
        let mut request = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hello")]);
        request.max_tokens = Some(8);
        request
    };
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    // Round robin: one request each, then a stream each.
    for _ in 0..2 {
        router.chat(&request()).await.unwrap();
    }
    for _ in 0..2 {
        let mut stream = router.chat_stream(&request()).await.unwrap();
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
        }
    }
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let answered: Vec<&str> = text.lines().filter(|l| l.contains("answered")).collect();
    assert_eq!(answered.len(), 4, "{text}");
    let azure: Vec<&&str> = answered
        .iter()
        .filter(|l| l.contains("endpoint=ep1"))
        .collect();
    assert_eq!(azure.len(), 2, "{text}");
    for line in azure {
        for part in [
            "upstream_request_id=\"",
            "region=\"Simulated Region\"",
            "model_session=",
        ] {
            assert!(line.contains(part), "{part} missing in {line}");
        }
    }
    assert!(
        answered
            .iter()
            .any(|l| l.contains("endpoint=ep0") && l.contains("upstream_request_id=")),
        "{text}"
    );
    assert!(
        !text.contains("key-0") && !text.contains("key-1"),
        "a key in the trace: {text}"
    );
}
