//! What the router adds to a request.
//!
//! - In process: `Router::chat` over a backend that answers at once, against calling that
//!   backend directly. Target: at most 2 µs added.
//! - Over HTTP on loopback: `Router::chat` to an upstream-sim endpoint against a plain reqwest
//!   call to the same endpoint, one request at a time. Target: at most 5 µs added.

#![expect(clippy::unwrap_used, reason = "a benchmark setup fails loudly")]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use router_core::{Backend, CallOptions};
use router_facade::{Endpoint, Router, StrategyKind};
use router_types::{ChatCompletionRequest, ChatMessage};
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

fn request() -> ChatCompletionRequest {
    ChatCompletionRequest::new("gpt-4o-mini", vec![ChatMessage::user("hello")])
}

fn in_process(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let backend = Arc::new(benches::Instant::new("direct"));
    let mut builder = Router::builder().strategy(StrategyKind::LeastLatency);
    for i in 0..4 {
        builder = builder.endpoint(
            Endpoint::custom(format!("e{i}"), Arc::new(benches::Instant::new("routed")))
                .model("gpt-4o-mini"),
        );
    }
    let router = builder.build().unwrap();
    let request = request();
    let mut group = c.benchmark_group("in_process");
    group.bench_function("backend_direct", |b| {
        b.to_async(&runtime).iter(|| async {
            black_box(
                backend
                    .chat(&request, &CallOptions::default())
                    .await
                    .unwrap(),
            );
        });
    });
    group.bench_function("router", |b| {
        b.to_async(&runtime).iter(|| async {
            black_box(router.chat(&request).await.unwrap());
        });
    });
    group.finish();
}

fn over_http(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sim =
        runtime
            .block_on(Sim::start(
                1,
                [EndpointConfig::new("sim", SimDialect::OpenAi)
                    .with_latency(LatencyModel::instant())],
            ))
            .unwrap();
    let base = sim.endpoints()[0].openai_base_url();
    let router = Router::builder()
        .endpoint(Endpoint::openai("sim", base.clone()).model("gpt-4o-mini"))
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let url = format!("{base}/chat/completions");
    let request = request();
    let body = serde_json::to_vec(&request).unwrap();
    let mut group = c.benchmark_group("over_http");
    group.bench_function("reqwest_direct", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let bytes = response.bytes().await.unwrap();
            black_box(
                serde_json::from_slice::<router_types::ChatCompletionResponse>(&bytes).unwrap(),
            );
        });
    });
    group.bench_function("router", |b| {
        b.to_async(&runtime).iter(|| async {
            black_box(router.chat(&request).await.unwrap());
        });
    });
    group.finish();
}

criterion_group!(benches, in_process, over_http);
criterion_main!(benches);
