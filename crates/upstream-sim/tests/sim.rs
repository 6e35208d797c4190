//! upstream-sim as a client sees it: determinism, latency, quota, configuration.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::time::Duration;

use serde_json::{Value, json};
use upstream_sim::{
    EndpointConfig, Fault, HeaderMode, LatencyModel, Limits, Sim, SimConfig, SimDialect, Times,
    WindowKind,
};

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = client.post(url).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn chat_body() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8})
}

async fn transcript(seed: u64) -> Vec<String> {
    let config = EndpointConfig::new("e", SimDialect::OpenAi)
        .with_latency(LatencyModel::instant().with_jitter(0.5));
    let sim = Sim::start(seed, [config]).await.unwrap();
    let url = format!("{}/chat/completions", sim.endpoints()[0].openai_base_url());
    let client = reqwest::Client::new();
    let mut texts = Vec::new();
    for _ in 0..4 {
        let (_, _, body) = post(&client, &url, chat_body()).await;
        texts.push(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    texts
}

#[tokio::test]
async fn same_seed_same_answers() {
    let a = transcript(11).await;
    assert_eq!(a, transcript(11).await);
    assert_ne!(a, transcript(12).await);
    assert!(
        a.iter().all(|t| t.split(' ').count() == 8),
        "max_tokens caps the output"
    );
}

#[tokio::test(start_paused = true)]
async fn latency_model_in_paused_time() {
    let latency = LatencyModel::new(Duration::from_secs(2), Duration::from_millis(100));
    let sim = Sim::start(
        1,
        [EndpointConfig::new("slow", SimDialect::OpenAi).with_latency(latency)],
    )
    .await
    .unwrap();
    let endpoint = &sim.endpoints()[0];
    let url = format!("{}/chat/completions", endpoint.openai_base_url());
    let client = reqwest::Client::new();
    let started = tokio::time::Instant::now();
    post(&client, &url, chat_body()).await;
    let took = started.elapsed();
    // 2 s to the first token and 8 tokens at 100 ms.
    assert!(
        took >= Duration::from_millis(2800) && took < Duration::from_millis(3200),
        "{took:?}"
    );

    endpoint.set_latency(latency.scaled(5.0));
    let started = tokio::time::Instant::now();
    post(&client, &url, chat_body()).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(14) && took < Duration::from_secs(16),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn quota_refuses_with_headers_then_recovers() {
    // 1,200 TPM and 12 RPM over 10 s windows: 200 tokens and 2 requests per window.
    let limits = Limits::per_minute(Some(1_200), Some(12)).with_window(Duration::from_secs(10));
    let config = EndpointConfig::new("q", SimDialect::OpenAi)
        .with_latency(LatencyModel::instant())
        .with_limits(limits);
    let sim = Sim::start(1, [config]).await.unwrap();
    let url = format!("{}/chat/completions", sim.endpoints()[0].openai_base_url());
    let client = reqwest::Client::new();

    let (status, headers, _) = post(&client, &url, chat_body()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-ratelimit-limit-requests"], "12");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "1");
    assert_eq!(headers["x-ratelimit-limit-tokens"], "1200");
    post(&client, &url, chat_body()).await;
    let (status, headers, body) = post(&client, &url, chat_body()).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(headers["retry-after"], "10");
    assert_eq!(headers["retry-after-ms"], "10000");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");

    tokio::time::advance(Duration::from_secs(10)).await;
    let (status, _, _) = post(&client, &url, chat_body()).await;
    assert_eq!(status, 200, "a new window");
    let counters = sim.endpoints()[0].counters();
    assert_eq!(
        (counters.ok, counters.rate_limited, counters.requests),
        (3, 1, 4)
    );
}

#[tokio::test]
async fn azure_throttle_message_and_remaining_headers_only() {
    let limits = Limits::per_minute(None, Some(6)).with_window(Duration::from_secs(10));
    let config = EndpointConfig::new("az", SimDialect::Azure)
        .with_latency(LatencyModel::instant())
        .with_limits(limits);
    let sim = Sim::start(1, [config]).await.unwrap();
    let url = format!(
        "{}/openai/deployments/d/chat/completions?api-version=2024-10-21",
        sim.endpoints()[0].url()
    );
    let client = reqwest::Client::new();
    let (status, headers, _) = post(&client, &url, chat_body()).await;
    assert_eq!(status, 200);
    assert!(headers.contains_key("x-ratelimit-remaining-requests"));
    assert!(
        !headers.contains_key("x-ratelimit-limit-requests"),
        "Azure sends no limit headers"
    );
    let (status, _, body) = post(&client, &url, chat_body()).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "429");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("call rate limit")
    );
}

#[tokio::test]
async fn fraction_faults_are_deterministic() {
    async fn failures(seed: u64) -> Vec<u16> {
        let config =
            EndpointConfig::new("f", SimDialect::OpenAi).with_latency(LatencyModel::instant());
        let sim = Sim::start(seed, [config]).await.unwrap();
        sim.endpoints()[0].inject(Fault::status(503), Times::Fraction(0.5));
        let url = format!("{}/chat/completions", sim.endpoints()[0].openai_base_url());
        let client = reqwest::Client::new();
        let mut statuses = Vec::new();
        for _ in 0..16 {
            statuses.push(post(&client, &url, chat_body()).await.0);
        }
        statuses
    }
    let a = failures(5).await;
    assert_eq!(a, failures(5).await);
    assert!(a.contains(&503) && a.contains(&200), "{a:?}");
}

#[tokio::test]
async fn example_config_parses_and_starts() {
    let text = include_str!("../examples/sim.toml");
    let mut config: SimConfig = toml::from_str(text).unwrap();
    assert_eq!(config.endpoints.len(), 2);
    for endpoint in &mut config.endpoints {
        endpoint.port = 0; // the example's fixed ports may be taken
    }
    let sim = Sim::spawn(config).await.unwrap();
    assert_eq!(
        sim.endpoint("azure-east").unwrap().dialect(),
        SimDialect::Azure
    );
    let models: Value = reqwest::get(format!(
        "{}/models",
        sim.endpoint("openai-fast").unwrap().openai_base_url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap_or(Value::Null);
    // The key is required even to list models.
    assert_eq!(models["error"]["code"], "invalid_api_key");
}

#[test]
fn unknown_config_fields_are_refused() {
    let error =
        toml::from_str::<SimConfig>("[[endpoint]]\nname = \"a\"\nlatencyy = {}\n").unwrap_err();
    assert!(error.to_string().contains("latencyy"), "{error}");
}

async fn quota_endpoint(limits: Limits) -> (Sim, String) {
    let config = EndpointConfig::new("q", SimDialect::OpenAi)
        .with_latency(LatencyModel::instant())
        .with_limits(limits);
    let sim = Sim::start(1, [config]).await.unwrap();
    let url = format!("{}/chat/completions", sim.endpoints()[0].openai_base_url());
    (sim, url)
}

#[tokio::test(start_paused = true)]
async fn a_sliding_window_over_http_frees_at_the_admissions_age_with_whole_seconds() {
    // 12 RPM over 10 s: 2 requests in any 10 s.
    let limits = Limits::per_minute(None, Some(12))
        .with_window(Duration::from_secs(10))
        .with_kind(WindowKind::Sliding);
    let (_sim, url) = quota_endpoint(limits).await;
    let client = reqwest::Client::new();
    assert_eq!(post(&client, &url, chat_body()).await.0, 200);
    tokio::time::advance(Duration::from_millis(6_500)).await;
    assert_eq!(post(&client, &url, chat_body()).await.0, 200);
    tokio::time::advance(Duration::from_secs(1)).await;
    let (status, headers, _) = post(&client, &url, chat_body()).await;
    assert_eq!(status, 429);
    // The first admission frees 2.5 s from now: whole seconds rounded up, and the millis.
    assert_eq!(headers["retry-after"], "3");
    assert_eq!(headers["retry-after-ms"], "2500");
    tokio::time::advance(Duration::from_millis(2_500)).await;
    assert_eq!(post(&client, &url, chat_body()).await.0, 200);
    // A fixed window would have restarted at 10 s; the sliding one still holds the second
    // admission (6.5 s) and the third (10 s).
    assert_eq!(post(&client, &url, chat_body()).await.0, 429);
}

#[tokio::test(start_paused = true)]
async fn headers_can_be_missing_minus_one_or_stale() {
    let limits = || Limits::per_minute(Some(60_000), Some(12)).with_window(Duration::from_secs(10));
    let client = reqwest::Client::new();

    let (_sim, url) = quota_endpoint(limits().with_headers(HeaderMode::Missing)).await;
    let (status, headers, _) = post(&client, &url, chat_body()).await;
    assert_eq!(status, 200);
    assert!(
        headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-ratelimit")),
        "{headers:?}"
    );
    post(&client, &url, chat_body()).await;
    let (status, headers, body) = post(&client, &url, chat_body()).await;
    assert_eq!(status, 429);
    assert!(headers.get("retry-after").is_none() && headers.get("retry-after-ms").is_none());
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("try again in"),
        "{body}"
    );

    let (_sim, url) = quota_endpoint(limits().with_headers(HeaderMode::MinusOne)).await;
    let (_, headers, _) = post(&client, &url, chat_body()).await;
    assert_eq!(headers["x-ratelimit-remaining-requests"], "-1");
    assert_eq!(headers["x-ratelimit-remaining-tokens"], "-1");

    let (_sim, url) = quota_endpoint(limits().with_headers(HeaderMode::Stale)).await;
    let (_, first, _) = post(&client, &url, chat_body()).await;
    let (_, second, _) = post(&client, &url, chat_body()).await;
    assert_eq!(first["x-ratelimit-remaining-requests"], "1");
    assert_eq!(
        second["x-ratelimit-remaining-requests"], "1",
        "still the value of the first answer"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    let (_, later, _) = post(&client, &url, chat_body()).await;
    assert_eq!(
        later["x-ratelimit-remaining-requests"], "1",
        "a window later: fresh again"
    );
}

#[tokio::test(start_paused = true)]
async fn provisioned_throughput_answers_retry_after_ms_until_it_drains() {
    // 60,000 TPM: 1,000 tokens drain a second; 1 s of it is 100 %.
    let limits = Limits::per_minute(Some(60_000), None)
        .with_window(Duration::from_secs(1))
        .with_kind(WindowKind::Provisioned);
    let (_sim, url) = quota_endpoint(limits).await;
    let client = reqwest::Client::new();
    let big = || json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 700});
    assert_eq!(post(&client, &url, big()).await.0, 200);
    assert_eq!(
        post(&client, &url, big()).await.0,
        200,
        "under 100 % when it came"
    );
    let (status, headers, _) = post(&client, &url, big()).await;
    assert_eq!(status, 429);
    let wait: u64 = headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!(
        (390..=420).contains(&wait),
        "about 400 ms over 100 %: {wait}"
    );
    tokio::time::advance(Duration::from_millis(wait + 1)).await;
    assert_eq!(post(&client, &url, big()).await.0, 200);
}
