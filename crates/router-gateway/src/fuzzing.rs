//! The gateway's fuzz targets' bodies (`fuzz/fuzz_targets/`), here so that the corpus
//! replay (`tests/fuzz_corpus.rs`) runs the same code on stable. Each takes the fuzzer's bytes
//! and panics only when a property the gateway promises is broken; not part of any API. The
//! other targets' bodies are beside the code they test: `backend_openai::fuzzing::sse`,
//! `router_core::fuzzing::rate_limit_headers`, `router_types::fuzzing::types`.
//!
//! - [`config`]: any file is accepted or refused with a message, and a `LiteLLM`
//!   configuration that converts always converts to a file that parses.
//! - [`gateway_request`]: any method, path, headers and body, through the whole service (keys,
//!   validation, the router, a simulated upstream on loopback), is answered, and every error
//!   is OpenAI-shaped JSON.

#![allow(
    clippy::panic,
    clippy::expect_used,
    reason = "a fuzz target reports a broken property by panicking"
)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::routes::{AppState, BodyLimits, app};

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
}

/// The configuration file, and the `LiteLLM` conversion, on the text in `data`.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = crate::config::Config::parse(&text) {
        let _ = config.keys();
        let _ = config.affinity_header();
        // Building only: nothing is connected to (a file may name any host).
        let _ = config.builder();
    }
    if let Ok(converted) = crate::litellm::convert(&text)
        && let Err(error) = crate::config::Config::parse(&converted.toml)
    {
        panic!(
            "a LiteLLM file converted to TOML that does not parse: {error}\n{}",
            converted.toml
        );
    }
}

/// The service in-process behind one simulated upstream, built once per thread.
struct Service {
    app: axum::Router,
    /// Kept alive with the service.
    _sim: upstream_sim::Sim,
}

thread_local! {
    static SERVICE: Service = RUNTIME.with(|runtime| runtime.block_on(service()));
}

async fn service() -> Service {
    use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};
    let sim = Sim::start(
        7,
        [EndpointConfig::new("fuzz", SimDialect::OpenAi)
            .with_models([
                "gpt-4o-mini",
                "text-embedding-3-small",
                "gpt-3.5-turbo-instruct",
            ])
            .with_latency(LatencyModel::instant())],
    )
    .await
    .expect("the simulated upstream starts");
    let text = format!(
        r#"
[router]
request_timeout_ms = 2000

[[endpoints]]
name = "fuzz"
kind = "openai"
url = "{}"
models = ["gpt-4o-mini", "text-embedding-3-small", "gpt-3.5-turbo-instruct"]
"#,
        sim.endpoints()[0].openai_base_url()
    );
    let config = crate::config::Config::parse(&text).expect("the fuzz configuration parses");
    let state = Arc::new(AppState {
        router: config.router().await.expect("the fuzz router builds"),
        metrics: Arc::default(),
        keys: arc_swap::ArcSwap::from_pointee(Vec::new()),
        affinity_header: arc_swap::ArcSwap::from_pointee(Some("x-session-id".to_owned())),
        status: crate::status::Board::default(),
        status_access: arc_swap::ArcSwap::from_pointee(crate::status::Access::default()),
    });
    let limits = BodyLimits {
        bytes: 1 << 20,
        within: Duration::from_secs(5),
    };
    Service {
        app: app(state, limits),
        _sim: sim,
    }
}

/// One request through the service: `data` is `METHOD PATH` on the first line, then header
/// lines (`name: value`) up to an empty line, then the body.
pub fn gateway_request(data: &[u8]) {
    let Some(request) = request_from(data) else {
        return;
    };
    let app = SERVICE.with(|service| service.app.clone());
    RUNTIME.with(|runtime| {
        runtime.block_on(async move {
            use tower::ServiceExt as _;
            let described = format!("{} {}", request.method(), request.uri());
            let response = tokio::time::timeout(Duration::from_secs(10), app.oneshot(request))
                .await
                .unwrap_or_else(|_| panic!("{described}: no answer within 10 s"))
                .unwrap_or_else(|never| match never {});
            let status = response.status();
            let body = tokio::time::timeout(
                Duration::from_secs(10),
                axum::body::to_bytes(response.into_body(), 16 << 20),
            )
            .await
            .unwrap_or_else(|_| panic!("{described}: the body did not end within 10 s"))
            .unwrap_or_else(|e| panic!("{described}: the body failed: {e}"));
            if status.is_client_error() || status.is_server_error() {
                let error: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                    panic!(
                        "{described}: {status} with a body that is not JSON: {}",
                        String::from_utf8_lossy(&body)
                    )
                });
                assert!(
                    error["error"]["message"].is_string() && error["error"]["type"].is_string(),
                    "{described}: {status} is not OpenAI-shaped: {error}"
                );
            }
        });
    });
}

fn request_from(data: &[u8]) -> Option<http::Request<axum::body::Body>> {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, path) = lines.next()?.split_once(' ')?;
    let mut builder = http::Request::builder().method(method).uri(path);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        builder = builder.header(name.trim(), value.trim());
    }
    builder.body(axum::body::Body::from(body.to_vec())).ok()
}
