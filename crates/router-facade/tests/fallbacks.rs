//! Fallback model groups and the context-window fallback, against upstream-sim over loopback.
//! Three groups on three endpoints: `big` (ep0), `mini` (ep1) and `long` (ep2), each endpoint
//! serving its group under its own deployment name.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::time::Duration;

use futures_util::StreamExt as _;
use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, ErrorKind, Router, RouterBuilder};
use upstream_sim::{EndpointConfig, Fault, LatencyModel, Sim, SimDialect, Times};

const GROUPS: [&str; 3] = ["big", "mini", "long"];

async fn sim() -> Sim {
    let endpoints = GROUPS.iter().enumerate().map(|(i, group)| {
        EndpointConfig::new(format!("ep{i}"), SimDialect::OpenAi)
            .with_models([format!("{group}-deployment")])
            .with_latency(LatencyModel::new(
                Duration::from_millis(100),
                Duration::from_millis(1),
            ))
    });
    Sim::start(4, endpoints).await.unwrap()
}

fn builder(sim: &Sim) -> RouterBuilder {
    let mut builder = Router::builder().seed(2);
    for (endpoint, group) in sim.endpoints().iter().zip(GROUPS) {
        builder = builder.endpoint(
            Endpoint::openai(endpoint.name(), endpoint.openai_base_url())
                .deployment(group, format!("{group}-deployment")),
        );
    }
    builder
}

fn request(model: &str) -> ChatCompletionRequest {
    let mut request = ChatCompletionRequest::new(model, vec![ChatMessage::user("hello")]);
    request.max_tokens = Some(8);
    request
}

#[tokio::test(start_paused = true)]
async fn a_group_that_cannot_serve_falls_back_in_order_within_the_deadline() {
    let sim = sim().await;
    let router = builder(&sim)
        .fallbacks("big", ["mini", "long"])
        .max_attempts(2)
        .request_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // Served where asked while it can: the answer names the group.
    let answer = router.chat(&request("big")).await.unwrap();
    assert_eq!(
        (answer.model.as_str(), answer.deployment.as_str()),
        ("big", "big-deployment")
    );

    // `big` fails (5xx on every attempt): `mini` serves, and says so.
    sim.endpoints()[0].inject(Fault::status(500), Times::Always);
    let answer = router.chat(&request("big")).await.unwrap();
    assert_eq!(answer.model, "mini");
    assert_eq!(answer.endpoint.as_str(), "ep1");
    assert_eq!(answer.attempts, 2, "big's one deployment, then mini's");
    // Streams too.
    let mut stream = router.chat_stream(&request("big")).await.unwrap();
    assert_eq!(stream.model(), "mini");
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }

    // `mini` cooling down after a 429 for a second: a request for `mini` alone would wait
    // that second (within its max queue wait); one with a fallback goes to `long` at once.
    sim.endpoints()[1].inject(Fault::rate_limited(Duration::from_secs(1)), Times::Next(1));
    let started = tokio::time::Instant::now();
    let big = router.clone();
    let waiting = tokio::spawn(async move { big.chat(&request("mini")).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let answer = router.chat(&request("big")).await.unwrap();
    assert_eq!(answer.model, "long");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "fell back after {:?}",
        started.elapsed()
    );
    let waited = waiting.await.unwrap().unwrap();
    assert_eq!(waited.model, "mini");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "mini's own request waited"
    );

    // Nothing left anywhere: the last group's error, never an upstream 429.
    sim.endpoints()[1].inject(Fault::status(503), Times::Always);
    sim.endpoints()[2].inject(Fault::status(503), Times::Always);
    let error = router.chat(&request("big")).await.unwrap_err();
    assert_eq!(error.status(), Some(503), "{error}");
    // The error says where it failed last and after how many attempts, in every group.
    assert_eq!(
        error.endpoint().map(router_facade::EndpointId::as_str),
        Some("ep2")
    );
    assert_eq!(
        error.attempts(),
        3,
        "big's, mini's and long's one deployment each"
    );
    // A fallback's own fallbacks are not followed, and a group without any stays put.
    let error = router.chat(&request("long")).await.unwrap_err();
    assert_eq!(error.status(), Some(503), "{error}");
}

#[tokio::test(start_paused = true)]
async fn the_request_s_own_faults_do_not_fall_back() {
    let sim = sim().await;
    let router = builder(&sim).fallbacks("big", ["mini"]).build().unwrap();
    for code in ["invalid_request_error", "content_filter"] {
        sim.endpoints()[0].inject(Fault::status_with_code(400, code), Times::Next(1));
        let error = router.chat(&request("big")).await.unwrap_err();
        assert_eq!(error.status(), Some(400), "{code}: {error}");
        assert_eq!(
            sim.endpoints()[1].counters().requests,
            0,
            "{code}: fell back"
        );
    }
    // Nor do they count against the deployment: it serves the next request.
    let answer = router.chat(&request("big")).await.unwrap();
    assert_eq!(answer.model, "big");
    assert_eq!(router.stats()[0].state.consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn a_prompt_too_long_for_its_group_goes_to_the_larger_one() {
    let sim = sim().await;
    let router = builder(&sim)
        .fallbacks("big", ["mini"])
        .context_window_fallback("big", "long")
        .build()
        .unwrap();
    sim.endpoints()[0].inject(
        Fault::status_with_code(400, "context_length_exceeded"),
        Times::Next(1),
    );
    let answer = router.chat(&request("big")).await.unwrap();
    assert_eq!(answer.model, "long");
    assert_eq!(sim.endpoints()[1].counters().requests, 0, "not to `mini`");
    // Without a larger group configured, the caller gets the upstream's answer.
    sim.endpoints()[1].inject(
        Fault::status_with_code(400, "context_length_exceeded"),
        Times::Next(1),
    );
    let error = router.chat(&request("mini")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ContextLengthExceeded, "{error}");
}

#[test]
fn fallbacks_must_name_served_groups() {
    let endpoint = || Endpoint::openai("e", "http://127.0.0.1:1/v1").model("big");
    let error = Router::builder()
        .endpoint(endpoint())
        .fallbacks("big", ["nowhere"])
        .build()
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("`big` falls back to `nowhere`, which no endpoint serves"),
        "{error}"
    );
    let error = Router::builder()
        .endpoint(endpoint())
        .context_window_fallback("big", "big")
        .build()
        .unwrap_err();
    assert!(
        error.to_string().contains("falls back to itself"),
        "{error}"
    );
    let error = Router::builder()
        .endpoint(endpoint())
        .fallbacks("small", ["big"])
        .build()
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("no endpoint serves model `small`"),
        "{error}"
    );
}
