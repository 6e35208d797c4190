//! The Responses API through the Router, against upstream-sim over real HTTP on loopback: an
//! OpenAI endpoint and an Azure one (whose Responses API is not under a deployment).

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use router_facade::types::CreateResponse;
use router_facade::{Endpoint, ErrorKind, Limits, MemoryStore, Router, StateStore, StrategyKind};
use upstream_sim::{EndpointConfig, Fault, LatencyModel, Sim, SimDialect, Times};

const MODEL: &str = "gpt-4.1-mini";

async fn sim() -> Sim {
    let endpoints = [SimDialect::OpenAi, SimDialect::Azure]
        .into_iter()
        .enumerate()
        .map(|(i, dialect)| {
            EndpointConfig::new(format!("ep{i}"), dialect)
                .with_api_key(format!("key-{i}"))
                .with_models([format!("dep-{i}")])
                .with_latency(LatencyModel::new(
                    Duration::from_millis(50),
                    Duration::from_millis(2),
                ))
        });
    Sim::start(4, endpoints).await.unwrap()
}

/// Round robin over both endpoints, each with a quota counted in `store`.
fn router(sim: &Sim, store: &Arc<MemoryStore>) -> Router {
    let mut builder = Router::builder()
        .strategy(StrategyKind::RoundRobin)
        .seed(1)
        .state_store(Arc::clone(store) as Arc<dyn StateStore>);
    for (i, endpoint) in sim.endpoints().iter().enumerate() {
        let configured = match endpoint.dialect() {
            SimDialect::OpenAi => Endpoint::openai(endpoint.name(), endpoint.openai_base_url()),
            SimDialect::Azure => {
                Endpoint::azure(endpoint.name(), endpoint.url()).api_version("2025-04-01-preview")
            }
        };
        builder = builder.endpoint(
            configured
                .api_key(format!("key-{i}"))
                .deployment(MODEL, format!("dep-{i}"))
                .tpm(600_000),
        );
    }
    builder.build().unwrap()
}

fn request(words: &str) -> CreateResponse {
    let mut request = CreateResponse {
        model: MODEL.to_owned(),
        input: Some(serde_json::json!([{"role": "user", "content": words}])),
        max_output_tokens: Some(6),
        ..CreateResponse::default()
    };
    request
        .extra
        .insert("store".to_owned(), serde_json::Value::Bool(false));
    request
}

/// What each endpoint's quota holds in `store` now.
fn held(store: &MemoryStore, sim: &Sim) -> Vec<f64> {
    let limits = Limits::per_minute(Some(600_000), None);
    sim.endpoints()
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let key = format!("ep{i}/{MODEL}");
            limits.tokens().unwrap().capacity
                - store
                    .tokens_level(&key, &limits, std::time::Instant::now())
                    .unwrap_or(limits.tokens().unwrap().capacity)
        })
        .collect()
}

#[tokio::test]
async fn a_response_is_routed_to_either_dialect_and_charged_what_the_upstream_counted() {
    let sim = sim().await;
    let store = Arc::new(MemoryStore::new());
    let router = router(&sim, &store);
    for i in 0..2 {
        let answer = router.responses(&request("Say hello to us")).await.unwrap();
        assert_eq!(answer.endpoint.as_str(), format!("ep{i}"));
        let body = &answer.body;
        assert_eq!(body.status.as_deref(), Some("completed"), "{body:?}");
        let text = body.output[0]["content"][0]["text"].as_str().unwrap();
        assert_eq!(text.split_whitespace().count(), 6, "{text}");
        let usage = body.usage.as_ref().unwrap();
        assert_eq!(usage.output_tokens, 6);
        // Charged what the upstream counted: its input tokens and the output cap.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let charged = held(&store, &sim)[i];
        assert!(
            (charged - (usage.input_tokens + 6) as f64).abs() < 1e-6,
            "ep{i}: charged {charged}, counted {} + 6",
            usage.input_tokens
        );
        let seen = sim.endpoints()[i].last_request().unwrap();
        assert_eq!(
            seen.body["model"],
            format!("dep-{i}"),
            "the deployment's name"
        );
        let path = if i == 0 {
            "/v1/responses"
        } else {
            "/openai/responses"
        };
        assert_eq!(seen.path, path);
    }
    let azure = sim.endpoints()[1].last_request().unwrap();
    assert_eq!(
        azure.query.as_deref(),
        Some("api-version=2025-04-01-preview")
    );
}

#[tokio::test]
async fn a_streamed_response_ends_with_its_completed_event_and_is_accounted() {
    let sim = sim().await;
    let store = Arc::new(MemoryStore::new());
    let router = router(&sim, &store);
    for i in 0..2 {
        let mut stream = router
            .responses_stream(&request("Stream a greeting"))
            .await
            .unwrap();
        assert_eq!(stream.endpoint().as_str(), format!("ep{i}"));
        let mut events = Vec::new();
        while let Some(event) = stream.next().await {
            events.push(event.unwrap());
        }
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds.first(), Some(&"response.created"), "{kinds:?}");
        assert_eq!(kinds.last(), Some(&"response.completed"), "{kinds:?}");
        let deltas: String = events
            .iter()
            .filter(|e| e.kind == "response.output_text.delta")
            .map(|e| e.extra["delta"].as_str().unwrap())
            .collect();
        let completed = events.last().unwrap().response.as_ref().unwrap();
        assert_eq!(
            completed.output[0]["content"][0]["text"].as_str().unwrap(),
            deltas
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        let usage = completed.usage.as_ref().unwrap();
        let charged = held(&store, &sim)[i];
        assert!(
            (charged - (usage.input_tokens + 6) as f64).abs() < 1e-6,
            "ep{i}: charged {charged}, counted {} + 6",
            usage.input_tokens
        );
        assert_eq!(
            sim.endpoints()[i].last_request().unwrap().body["stream"],
            true
        );
    }
    let stats = router.stats();
    assert!(stats.iter().all(|s| s.state.in_flight == 0), "{stats:?}");
}

#[tokio::test]
async fn a_stream_cut_before_its_output_fails_over_and_one_cut_after_is_the_callers_error() {
    let sim = sim().await;
    let store = Arc::new(MemoryStore::new());
    let router = router(&sim, &store);
    // Cut after `response.created` and the output item: nothing generated yet, so the
    // request goes to the other endpoint.
    sim.endpoints()[0].inject(Fault::TruncateStream { after_events: 2 }, Times::Next(1));
    let mut stream = router.responses_stream(&request("hi")).await.unwrap();
    assert_eq!(stream.endpoint().as_str(), "ep1");
    assert_eq!(stream.attempts(), 2);
    while let Some(event) = stream.next().await {
        event.unwrap();
    }
    // Cut after output began: the caller's stream ends with the error.
    sim.endpoints()[0].inject(Fault::TruncateStream { after_events: 4 }, Times::Next(1));
    let mut stream = router.responses_stream(&request("hi")).await.unwrap();
    assert_eq!(stream.endpoint().as_str(), "ep0");
    let mut last = None;
    while let Some(event) = stream.next().await {
        last = Some(event);
    }
    let error = last.unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::StreamTruncated, "{error}");
}

fn continuing(id: &str) -> CreateResponse {
    let mut request = request("and then?");
    request.extra.remove("store");
    request.extra.insert(
        "previous_response_id".to_owned(),
        serde_json::Value::String(id.to_owned()),
    );
    request
}

#[tokio::test]
async fn a_continuation_goes_to_the_deployment_that_stored_its_response_and_only_there() {
    let sim = sim().await;
    let store = Arc::new(MemoryStore::new());
    let router = router(&sim, &store);
    // Stored (no `store: false`): round robin places the first on ep0, the stream on ep1.
    let mut stored = request("remember this");
    stored.extra.remove("store");
    let first = router.responses(&stored).await.unwrap();
    assert_eq!(first.endpoint.as_str(), "ep0");
    let mut stream = router.responses_stream(&stored).await.unwrap();
    assert_eq!(stream.endpoint().as_str(), "ep1");
    let mut streamed_id = None;
    while let Some(event) = stream.next().await {
        let event = event.unwrap();
        if let Some(response) = event
            .response
            .filter(|_| event.kind == "response.completed")
        {
            streamed_id = Some(response.id);
        }
    }
    let streamed_id = streamed_id.unwrap();
    // Each continuation goes where its response is, however round robin would turn.
    for _ in 0..3 {
        let answer = router.responses(&continuing(&first.body.id)).await.unwrap();
        assert_eq!(answer.endpoint.as_str(), "ep0");
        let answer = router.responses(&continuing(&streamed_id)).await.unwrap();
        assert_eq!(answer.endpoint.as_str(), "ep1");
    }
    // Its deployment failing: the caller's error names it; nothing goes elsewhere.
    sim.endpoints()[0].inject(Fault::status(500), Times::Always);
    let before = sim.endpoints()[1].counters().requests;
    let error = router
        .responses(&continuing(&first.body.id))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("`ep0`/`dep-0`"), "{error}");
    assert_eq!(sim.endpoints()[1].counters().requests, before, "{error}");
}

#[tokio::test]
async fn a_continuation_is_refused_where_the_router_cannot_tell_which_deployment_stored_it() {
    let sim = sim().await;
    let store = Arc::new(MemoryStore::new());
    let router = router(&sim, &store);
    let continued = continuing("resp_made_elsewhere");
    let error = router.responses(&continued).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidRequest, "{error}");
    assert!(
        error.to_string().contains("previous_response_id"),
        "{error}"
    );
    assert!(sim.endpoints().iter().all(|e| e.counters().requests == 0));
    // A response made with `store: false` is not remembered either.
    let unstored = router.responses(&request("forget this")).await.unwrap();
    let error = router
        .responses(&continuing(&unstored.body.id))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidRequest, "{error}");
    // A group of one deployment has only the one place the response can be.
    let single = Router::builder()
        .endpoint(
            Endpoint::openai("ep0", sim.endpoints()[0].openai_base_url())
                .api_key("key-0")
                .deployment(MODEL, "dep-0"),
        )
        .build()
        .unwrap();
    single.responses(&continued).await.unwrap();
}

/// A continuation waits only for its own deployment's quota: when that one is full and the
/// other has room, it is refused at once with its own deployment's wait, not held on the
/// other's room.
#[tokio::test(start_paused = true)]
async fn a_continuation_waits_for_its_own_deployments_quota_only() {
    let sim = sim().await;
    // 6,000 TPM over 10 s: 1,000 tokens, two requests of about 400 on each endpoint.
    let mut builder = Router::builder()
        .strategy(StrategyKind::RoundRobin)
        .max_queue_wait(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(30));
    for (i, endpoint) in sim.endpoints().iter().enumerate() {
        let configured = match endpoint.dialect() {
            SimDialect::OpenAi => Endpoint::openai(endpoint.name(), endpoint.openai_base_url()),
            SimDialect::Azure => {
                Endpoint::azure(endpoint.name(), endpoint.url()).api_version("2025-04-01-preview")
            }
        };
        builder = builder.endpoint(
            configured
                .api_key(format!("key-{i}"))
                .deployment(MODEL, format!("dep-{i}"))
                .tpm(6_000)
                .quota_window(Duration::from_secs(10)),
        );
    }
    let router = builder.build().unwrap();
    let mut stored = request("keep this");
    stored.extra.remove("store");
    stored.max_output_tokens = Some(400);
    let first = router.responses(&stored).await.unwrap();
    assert_eq!(first.endpoint.as_str(), "ep0");
    let mut more = continuing(&first.body.id);
    more.max_output_tokens = Some(400);
    router.responses(&more).await.unwrap();
    // ep0's window is full for about 10 s; ep1's is empty.
    let started = tokio::time::Instant::now();
    let error = router.responses(&more).await.unwrap_err();
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "refused at once: {error}"
    );
    assert_eq!(error.kind(), ErrorKind::Throttled, "{error}");
    assert!(
        error.retry_after().unwrap() > Duration::from_secs(5),
        "its own deployment's wait: {error}"
    );
    assert_eq!(
        sim.endpoints()[1].counters().requests,
        0,
        "nothing went to ep1"
    );
}

/// Retrieving, listing the input of, cancelling and deleting a stored response: each goes to
/// the deployment that stored it, on either dialect, and answers as the upstream did.
#[tokio::test]
async fn calls_on_a_stored_response_go_to_the_deployment_that_stored_it() {
    use router_facade::StoredCall;
    let sim = sim().await;
    let store = Arc::new(MemoryStore::new());
    let router = router(&sim, &store);
    let mut stored = request("remember this");
    stored.extra.remove("store");
    for i in 0..2 {
        let created = router.responses(&stored).await.unwrap();
        let id = created.body.id.as_str();
        assert_eq!(created.endpoint.as_str(), format!("ep{i}"));
        assert_eq!(
            router.stored_response_model(id).await.as_deref(),
            Some(MODEL)
        );
        let retrieved = router
            .stored_response(id, StoredCall::Retrieve)
            .await
            .unwrap();
        assert_eq!(retrieved.endpoint.as_str(), format!("ep{i}"));
        assert_eq!(retrieved.body["id"], id);
        assert_eq!(retrieved.body["status"], "completed");
        let items = router
            .stored_response(id, StoredCall::InputItems)
            .await
            .unwrap();
        assert_eq!(
            items.body["data"][0]["content"], "remember this",
            "{}",
            items.body
        );
        let seen = sim.endpoints()[i].last_request().unwrap();
        assert!(
            seen.path.ends_with(&format!("/responses/{id}/input_items")),
            "{}",
            seen.path
        );
        assert_eq!(seen.method, "GET");
        // Only background responses can be cancelled: the upstream's 400, as it said it.
        let error = router
            .stored_response(id, StoredCall::Cancel)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::BadRequest, "{error}");
        assert!(error.to_string().contains("background"), "{error}");
        let deleted = router
            .stored_response(id, StoredCall::Delete)
            .await
            .unwrap();
        assert_eq!(deleted.body["deleted"], true);
        assert_eq!(sim.endpoints()[i].last_request().unwrap().method, "DELETE");
        let gone = router
            .stored_response(id, StoredCall::Retrieve)
            .await
            .unwrap_err();
        assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");
    }
    let unknown = router
        .stored_response("resp_elsewhere", StoredCall::Retrieve)
        .await
        .unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::InvalidRequest, "{unknown}");
    assert!(
        router
            .stored_response_model("resp_elsewhere")
            .await
            .is_none()
    );
}
