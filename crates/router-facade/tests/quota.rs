//! Quota-aware routing against upstream-sim endpoints that enforce TPM the way Azure does.
//! Paused time: a simulated minute runs in well under a second.

#![expect(
    clippy::unwrap_used,
    clippy::print_stderr,
    reason = "test helpers fail loudly and report"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, ErrorKind, QuotaModel, RequestOptions, Router, StrategyKind};
use upstream_sim::{
    EndpointConfig, Fault, HeaderMode, LatencyModel, Limits, Sim, SimDialect, Times, WindowKind,
};

const MODEL: &str = "gpt-4o-mini";
const TPMS: [u64; 3] = [30_000, 60_000, 90_000];

async fn sim() -> Sim {
    let latency =
        LatencyModel::new(Duration::from_millis(200), Duration::from_millis(10)).with_jitter(0.2);
    let endpoints = TPMS.iter().enumerate().map(|(i, tpm)| {
        EndpointConfig::new(
            format!("ep{i}"),
            if i == 1 {
                SimDialect::Azure
            } else {
                SimDialect::OpenAi
            },
        )
        .with_models([MODEL])
        .with_latency(latency)
        .with_limits(Limits::per_minute(Some(*tpm), None).with_window(Duration::from_secs(10)))
    });
    Sim::start(5, endpoints).await.unwrap()
}

fn router(sim: &Sim, strategy: StrategyKind) -> Router {
    let mut builder = Router::builder()
        .strategy(strategy)
        .seed(3)
        .request_timeout(Duration::from_secs(5));
    for (endpoint, tpm) in sim.endpoints().iter().zip(TPMS) {
        let configured = match endpoint.dialect() {
            SimDialect::OpenAi => Endpoint::openai(endpoint.name(), endpoint.openai_base_url()),
            SimDialect::Azure => Endpoint::azure(endpoint.name(), endpoint.url())
                .api_version("2024-10-21")
                .api_key("k"),
        };
        builder = builder.endpoint(configured.model(MODEL).tpm(tpm));
    }
    builder.build().unwrap()
}

fn request(i: u64) -> ChatCompletionRequest {
    let words = [
        "route", "each", "call", "where", "quota", "room", "left", "fast",
    ];
    let prompt: Vec<&str> = (0..40).map(|k| words[((i + k) % 8) as usize]).collect();
    let mut request = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user(prompt.join(" "))]);
    request.max_tokens = Some(60);
    request
}

/// One instant endpoint with room for about one request a second (6,000 TPM over 1 s: 100
/// tokens, about one request), behind a router with a 30 s deadline and `max_queue_wait`.
async fn one_request_a_second(max_queue_wait: Duration) -> (Sim, Router) {
    let endpoint = EndpointConfig::new("only", SimDialect::OpenAi)
        .with_models([MODEL])
        .with_latency(LatencyModel::instant());
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let router = Router::builder()
        .endpoint(
            Endpoint::openai("only", sim.endpoints()[0].openai_base_url())
                .model(MODEL)
                .tpm(6_000)
                .quota_window(Duration::from_secs(1)),
        )
        .request_timeout(Duration::from_secs(30))
        .max_queue_wait(max_queue_wait)
        .build()
        .unwrap();
    (sim, router)
}

/// The `TPMS` endpoints counting over windows of `kind` and `window`, and a router told each
/// one's TPM and window: seeds (simulator, router) and the router's deadline in seconds.
async fn windowed(
    kind: WindowKind,
    window: Duration,
    latency: LatencyModel,
    seeds: (u64, u64),
    deadline_s: u64,
) -> (Sim, Router) {
    windowed_saying(
        kind,
        window,
        HeaderMode::Truthful,
        latency,
        seeds,
        deadline_s,
    )
    .await
}

/// As [`windowed`], the endpoints' rate-limit headers sent as `headers` says.
async fn windowed_saying(
    kind: WindowKind,
    window: Duration,
    headers: HeaderMode,
    latency: LatencyModel,
    (sim_seed, router_seed): (u64, u64),
    deadline_s: u64,
) -> (Sim, Router) {
    let endpoints = TPMS.iter().enumerate().map(|(i, tpm)| {
        EndpointConfig::new(format!("ep{i}"), SimDialect::OpenAi)
            .with_models([MODEL])
            .with_latency(latency)
            .with_limits(
                Limits::per_minute(Some(*tpm), None)
                    .with_window(window)
                    .with_kind(kind)
                    .with_headers(headers),
            )
    });
    let sim = Sim::start(sim_seed, endpoints).await.unwrap();
    let mut builder = Router::builder()
        .seed(router_seed)
        .request_timeout(Duration::from_secs(deadline_s));
    for (endpoint, tpm) in sim.endpoints().iter().zip(TPMS) {
        builder = builder.endpoint(
            Endpoint::openai(endpoint.name(), endpoint.openai_base_url())
                .model(MODEL)
                .tpm(tpm)
                .quota_window(window)
                .quota_model(if kind == WindowKind::Provisioned {
                    QuotaModel::Provisioned
                } else {
                    QuotaModel::Window
                }),
        );
    }
    (sim, builder.build().unwrap())
}

#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    throttled_with_wait: AtomicU64,
    upstream_429: AtomicU64,
    other: AtomicU64,
}

/// Offers `rate` requests a second for `seconds`, open loop.
async fn offer(router: &Router, rate: f64, seconds: u64) -> Arc<Tally> {
    offer_sized(router, rate, seconds, None).await
}

/// As `offer`, with each request's output cap set to `output` when given.
async fn offer_sized(router: &Router, rate: f64, seconds: u64, output: Option<u32>) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let total = (rate * seconds as f64) as u64;
    let mut tasks = Vec::new();
    for i in 0..total {
        ticks.tick().await;
        let (router, tally) = (router.clone(), Arc::clone(&tally));
        let mut req = request(i);
        req.max_tokens = output.or(req.max_tokens);
        tasks.push(tokio::spawn(async move {
            match router.chat(&req).await {
                Ok(_) => tally.ok.fetch_add(1, Ordering::Relaxed),
                Err(e) if e.is_throttled() && e.retry_after().is_some() => {
                    tally.throttled_with_wait.fetch_add(1, Ordering::Relaxed)
                }
                Err(e) if e.status() == Some(429) => {
                    tally.upstream_429.fetch_add(1, Ordering::Relaxed)
                }
                Err(e) => {
                    eprintln!("unexpected error: {e}");
                    tally.other.fetch_add(1, Ordering::Relaxed)
                }
            };
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    tally
}

#[tokio::test(start_paused = true)]
async fn at_1_3x_the_summed_quota_the_router_serves_the_quota_and_no_429_reaches_callers() {
    let sim = sim().await;
    let router = router(&sim, StrategyKind::LeastLatency);
    let summed_tpm: u64 = TPMS.iter().sum();
    // Each request is charged about 120 tokens upstream: offer 1.3 times what fits.
    let per_request = 120.0;
    let rate = 1.3 * summed_tpm as f64 / 60.0 / per_request;
    let seconds = 60;
    let tally = offer(&router, rate, seconds).await;

    let charged: u64 = sim
        .endpoints()
        .iter()
        .map(|e| e.counters().tokens_charged)
        .sum();
    let upstream_429s: u64 = sim
        .endpoints()
        .iter()
        .map(|e| e.counters().rate_limited)
        .sum();
    let served_share = charged as f64 / (summed_tpm as f64 * seconds as f64 / 60.0);
    let ok = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "served {ok}, throttled {}, share of summed quota {served_share:.3}, upstream 429s {upstream_429s}",
        tally.throttled_with_wait.load(Ordering::Relaxed)
    );
    assert_eq!(
        tally.upstream_429.load(Ordering::Relaxed),
        0,
        "an upstream 429 reached a caller"
    );
    assert_eq!(tally.other.load(Ordering::Relaxed), 0, "unexpected errors");
    assert!(
        tally.throttled_with_wait.load(Ordering::Relaxed) > 0,
        "the excess is throttled, with retry-after"
    );
    assert!(
        served_share >= 0.9,
        "served only {served_share:.3} of the summed quota"
    );
    // The simulator's fixed windows do not line up with the router's continuous buckets: a
    // few 429s happen at window edges, and failover absorbs every one of them.
    assert!(
        upstream_429s * 30 <= ok,
        "too many upstream 429s: {upstream_429s} for {ok} served"
    );
}

#[tokio::test(start_paused = true)]
async fn usage_based_spreads_by_headroom() {
    let sim = sim().await;
    let router = router(&sim, StrategyKind::UsageBased);
    let summed_tpm: u64 = TPMS.iter().sum();
    let rate = 0.8 * summed_tpm as f64 / 60.0 / 120.0;
    let tally = offer(&router, rate, 30).await;
    assert_eq!(
        tally.other.load(Ordering::Relaxed) + tally.upstream_429.load(Ordering::Relaxed),
        0
    );
    let served: Vec<u64> = sim.endpoints().iter().map(|e| e.counters().ok).collect();
    // Traffic follows the quotas: the 90k endpoint serves more than the 30k one.
    assert!(served[2] > served[0], "{served:?}");
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_are_served_in_priority_then_arrival_order() {
    // One endpoint with room for about one request a second. The last of the three waits
    // about 3 s for its turn.
    let (_sim, router) = one_request_a_second(Duration::from_secs(30)).await;
    // Fill the bucket (100 tokens) with one request.
    let mut big = request(0);
    big.max_tokens = Some(40);
    router.chat(&big).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, priority) in [("low-1", 1), ("low-2", 1), ("high", 0)] {
        let (router, order, req) = (router.clone(), Arc::clone(&order), big.clone());
        tasks.push(tokio::spawn(async move {
            router
                .chat_with(&req, &RequestOptions::default().with_priority(priority))
                .await
                .unwrap();
            order.lock().unwrap().push(name);
        }));
        tokio::task::yield_now().await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec!["high", "low-1", "low-2"]);
    let _ = ErrorKind::Throttled;
}

#[tokio::test(start_paused = true)]
async fn caller_and_group_limits_wait_or_throttle_with_retry_after() {
    let endpoint = EndpointConfig::new("only", SimDialect::OpenAi)
        .with_models([MODEL])
        .with_latency(LatencyModel::instant());
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let router = Router::builder()
        .endpoint(Endpoint::openai("only", sim.endpoints()[0].openai_base_url()).model(MODEL))
        // 12 a minute: two in any 10 s window.
        .caller_limits("team-a", router_facade::RateLimits::new().with_rpm(12))
        .group_limits(MODEL, router_facade::RateLimits::new().with_concurrency(8))
        .build()
        .unwrap();
    let team_a = RequestOptions::default()
        .with_caller("team-a")
        .with_timeout(Duration::from_secs(2));
    // Each answer says what the caller's window has left: two, one taken, then none.
    for left in [1, 0] {
        let answer = router.chat_with(&request(2 - left), &team_a).await.unwrap();
        let quota = answer.caller_quota.unwrap();
        assert_eq!(
            (quota.limit_requests, quota.requests_left),
            (Some(2), Some(left))
        );
        assert_eq!((quota.limit_tokens, quota.tokens_left), (None, None));
        assert_eq!(quota.window, Duration::from_secs(10));
    }
    let error = router.chat_with(&request(3), &team_a).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Throttled, "{error}");
    assert_eq!(error.attempts(), 0, "refused before any attempt");
    // The first leaves the caller's window after 10 s and the 50 ms margin.
    let turn = Duration::from_millis(10_050);
    assert_eq!(error.retry_after(), Some(turn));
    assert!(error.to_string().contains("team-a"));
    // Another caller is not affected.
    let team_b = RequestOptions::default().with_caller("team-b");
    let answer = router.chat_with(&request(4), &team_b).await.unwrap();
    assert_eq!(answer.caller_quota, None, "team-b has no limits of its own");
    // With a deadline past its turn, team-a waits for it.
    let patient = RequestOptions::default()
        .with_caller("team-a")
        .with_timeout(Duration::from_secs(30))
        .with_max_queue_wait(Duration::from_secs(15));
    let started = tokio::time::Instant::now();
    let answer = router.chat_with(&request(5), &patient).await.unwrap();
    assert_eq!(started.elapsed(), turn);
    assert_eq!(
        answer.waited, turn,
        "the answer says how long it waited for its turn"
    );
    assert_eq!(
        sim.endpoints()[0].counters().requests,
        4,
        "the throttled request never left the router"
    );
}

/// Every chunk of `stream`, which must not fail.
async fn read_all<T>(mut stream: router_facade::RouterStream<T>) -> Vec<T>
where
    T: router_facade::StreamItem + Send + Unpin + 'static,
{
    use futures_util::StreamExt;
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap());
    }
    chunks
}

#[tokio::test]
async fn streams_are_accounted_without_changing_what_the_caller_receives() {
    use futures_util::StreamExt;
    let endpoint = EndpointConfig::new("only", SimDialect::OpenAi)
        .with_models([MODEL])
        .with_latency(LatencyModel::instant());
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let router = Router::builder()
        .endpoint(
            Endpoint::openai("only", sim.endpoints()[0].openai_base_url())
                .model(MODEL)
                .tpm(600_000),
        )
        .build()
        .unwrap();
    // The caller did not ask for usage: the router asks upstream, and strips the usage chunk.
    let chunks = read_all(router.chat_stream(&request(1)).await.unwrap()).await;
    let seen = sim.endpoints()[0].last_request().unwrap();
    assert_eq!(
        seen.body["stream_options"]["include_usage"], true,
        "the router asked for usage"
    );
    assert!(
        chunks.iter().all(|c| c.usage.is_none()),
        "the caller gets no usage chunk"
    );
    assert!(!chunks.last().unwrap().choices.is_empty());

    // The caller asked: it gets the usage chunk, unchanged.
    let mut asked = request(2);
    asked.stream_options = Some(router_facade::types::StreamOptions {
        include_usage: Some(true),
        ..Default::default()
    });
    let mut stream = router.chat_stream(&asked).await.unwrap();
    let mut last = None;
    while let Some(chunk) = stream.next().await {
        last = Some(chunk.unwrap());
    }
    let last = last.unwrap();
    assert!(last.choices.is_empty() && last.usage.is_some());
}

/// One endpoint answering at `latency` with 6,000 TPM, its router, and the token level of its
/// quota in the router's store at a time.
async fn accounted(latency: LatencyModel) -> (Sim, Router, impl Fn(tokio::time::Instant) -> f64) {
    let endpoint = EndpointConfig::new("only", SimDialect::OpenAi)
        .with_models([MODEL])
        .with_latency(latency);
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let store = Arc::new(router_facade::MemoryStore::new());
    let router = Router::builder()
        .endpoint(
            Endpoint::openai("only", sim.endpoints()[0].openai_base_url())
                .model(MODEL)
                .tpm(6_000),
        )
        .state_store(Arc::clone(&store) as Arc<dyn router_facade::StateStore>)
        .build()
        .unwrap();
    let limits = router_facade::Limits::per_minute(Some(6_000), None);
    let key = format!("only/{MODEL}");
    let level =
        move |at: tokio::time::Instant| store.tokens_level(&key, &limits, at.into_std()).unwrap();
    (sim, router, level)
}

#[tokio::test(start_paused = true)]
async fn a_dropped_request_gives_its_reservation_back() {
    let slow = LatencyModel::new(Duration::from_secs(10), Duration::from_millis(10));
    let (_sim, router, level) = accounted(slow).await;
    let full = level(tokio::time::Instant::now());
    let pending = request(1);
    let call = router.chat(&pending);
    assert!(
        tokio::time::timeout(Duration::from_millis(10), call)
            .await
            .is_err(),
        "dropped mid-flight"
    );
    let during = tokio::time::Instant::now();
    tokio::task::yield_now().await; // the release runs on the runtime
    tokio::task::yield_now().await;
    let level = level(during);
    assert!((level - full).abs() < 1.0, "released: {level} of {full}");
}

/// Room given back (a request dropped in flight gives its reservation back) is used at once:
/// the next request is admitted now, not held to the block that an earlier refusal left in
/// the router's view of the deployment, nor refused on it.
#[tokio::test(start_paused = true)]
async fn room_given_back_is_used_at_once_whatever_an_earlier_refusal_blocked() {
    let endpoint = EndpointConfig::new("only", SimDialect::OpenAi)
        .with_models([MODEL])
        .with_latency(LatencyModel::new(Duration::from_secs(5), Duration::ZERO));
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    // 6,000 TPM over 10 s: 1,000 tokens, two requests of about 450.
    let router = Router::builder()
        .endpoint(
            Endpoint::openai("only", sim.endpoints()[0].openai_base_url())
                .model(MODEL)
                .tpm(6_000)
                .quota_window(Duration::from_secs(10)),
        )
        .request_timeout(Duration::from_secs(30))
        .max_queue_wait(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut req = request(0);
    req.max_tokens = Some(400);
    let spawn = || {
        let (router, req) = (router.clone(), req.clone());
        tokio::spawn(async move { router.chat(&req).await })
    };
    let (first, second) = (spawn(), spawn());
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The window is full until the first is 10 s old: a third is refused at once.
    let started = tokio::time::Instant::now();
    let refused = router.chat(&req).await.unwrap_err();
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "refused at once: {refused}"
    );
    assert_eq!(refused.kind(), ErrorKind::Throttled, "{refused}");
    assert!(
        refused.retry_after().unwrap() > Duration::from_secs(2),
        "{refused}"
    );
    // The first is dropped and gives its reservation back: there is room now.
    first.abort();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let started = tokio::time::Instant::now();
    router.chat(&req).await.unwrap();
    assert!(
        started.elapsed() <= Duration::from_millis(5_050),
        "sent at once and answered in 5 s: {:?}",
        started.elapsed()
    );
    second.await.unwrap().unwrap();
}

/// A streamed legacy completion is routed and accounted as a chat stream is: the router asks
/// the upstream for the usage chunk, charges what it reports, and the caller who did not ask
/// never sees it; the caller who asked gets it unchanged.
#[tokio::test(start_paused = true)]
async fn legacy_completion_streams_are_accounted_from_their_usage_chunk() {
    use router_facade::types::{CompletionRequest, StreamOptions};
    let (sim, router, level) = accounted(LatencyModel::instant()).await;
    let mut request = CompletionRequest::new(MODEL, "Say hello to the router");
    request.max_tokens = Some(5);
    let before = level(tokio::time::Instant::now());
    let chunks = read_all(router.completions_stream(&request).await.unwrap()).await;
    // The settlement runs on the runtime once the stream has ended.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let charged = before - level(tokio::time::Instant::now());
    let seen = sim.endpoints()[0].last_request().unwrap();
    assert_eq!(seen.body["stream"], true);
    assert_eq!(
        seen.body["stream_options"]["include_usage"], true,
        "the router asked for usage"
    );
    assert!(
        chunks.iter().all(|c| c.usage.is_none()),
        "the caller gets no usage chunk"
    );
    let text: String = chunks
        .iter()
        .flat_map(|c| c.choices.iter().map(|choice| choice.text.as_str()))
        .collect();
    assert_eq!(text.split_whitespace().count(), 5, "{text:?}");
    assert!(chunks.last().unwrap().choices[0].finish_reason.is_some());

    // Asked for: the usage chunk arrives last, and it is what the first stream was charged.
    request.stream_options = Some(StreamOptions {
        include_usage: Some(true),
        ..Default::default()
    });
    let chunks = read_all(router.completions_stream(&request).await.unwrap()).await;
    let last = chunks.last().unwrap();
    let usage = last.usage.as_ref().expect("the usage chunk");
    assert!(last.choices.is_empty());
    assert_eq!(usage.completion_tokens, Some(5));
    assert!(
        (charged - (usage.prompt_tokens + 5) as f64).abs() < 1e-6,
        "charged {charged}, the upstream counted {} + 5",
        usage.prompt_tokens
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_dropped_after_it_opened_keeps_its_charge() {
    // The upstream admitted it and counts it in its window whatever becomes of it: giving the
    // reservation back would let the router admit what the upstream then refuses.
    use futures_util::StreamExt;
    let slow = LatencyModel::new(Duration::from_millis(10), Duration::from_secs(1));
    let (_sim, router, level) = accounted(slow).await;
    let full = level(tokio::time::Instant::now());
    let mut stream = router.chat_stream(&request(1)).await.unwrap();
    stream.next().await.unwrap().unwrap();
    let opened = level(tokio::time::Instant::now());
    assert!(opened < full - 10.0, "reserved: {opened} of {full}");
    drop(stream);
    let after = tokio::time::Instant::now();
    tokio::task::yield_now().await; // a release would run on the runtime
    tokio::task::yield_now().await;
    let kept = level(after);
    assert!(
        (kept - opened).abs() < 1.0,
        "kept: {kept}, opened at {opened}, full {full}"
    );
    assert_eq!(
        router.stats()[0].state.in_flight,
        0,
        "the in-flight slot is released all the same"
    );
}

#[tokio::test(start_paused = true)]
async fn limits_not_configured_are_learned_from_the_upstreams_headers() {
    // The router is told nothing about this endpoint's quota; OpenAI-style headers tell it.
    let endpoint = EndpointConfig::new("only", SimDialect::OpenAi)
        .with_models([MODEL])
        .with_latency(LatencyModel::instant())
        .with_limits(
            Limits::per_minute(Some(6_000), Some(60)).with_window(Duration::from_secs(10)),
        );
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let router = Router::builder()
        .endpoint(Endpoint::openai("only", sim.endpoints()[0].openai_base_url()).model(MODEL))
        // The burst below waits up to a window for room.
        .max_queue_wait(Duration::from_secs(60))
        .build()
        .unwrap();
    router.chat(&request(0)).await.unwrap();
    let stats = &router.stats()[0].state;
    assert_eq!(
        (stats.learned_tpm, stats.learned_rpm),
        (Some(6_000), Some(60))
    );
    // From now on it reserves: a burst beyond the window's 1,000 tokens waits for room
    // instead of drawing 429s from the upstream.
    let mut tasks = Vec::new();
    for i in 1..=12 {
        let router = router.clone();
        tasks.push(tokio::spawn(async move { router.chat(&request(i)).await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // Without the learned limit all twelve would leave at once and five would draw a 429 (the
    // window holds 1,000 tokens, the first request used 120, each takes 120).
    let refused = sim.endpoints()[0].counters().rate_limited;
    assert!(refused < 5, "{refused} upstream 429s");
}

#[tokio::test]
async fn no_stream_options_for_azure_api_versions_that_refuse_them() {
    use futures_util::StreamExt;
    let endpoint = EndpointConfig::new("az", SimDialect::Azure)
        .with_models(["dep"])
        .with_latency(LatencyModel::instant());
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    for (version, asks) in [
        ("2024-06-01", false),
        ("2024-10-21", true),
        ("2024-09-01-preview", true),
    ] {
        let router = Router::builder()
            .endpoint(
                Endpoint::azure("az", sim.endpoints()[0].url())
                    .api_version(version)
                    .api_key("k")
                    .deployment(MODEL, "dep")
                    .tpm(600_000),
            )
            .build()
            .unwrap();
        let mut stream = router.chat_stream(&request(1)).await.unwrap();
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
        }
        let seen = sim.endpoints()[0].last_request().unwrap();
        assert_eq!(
            seen.body.get("stream_options").is_some(),
            asks,
            "api-version {version}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_expected_to_wait_too_long_is_refused_at_once_and_its_retry_after_works() {
    let (_sim, router) = one_request_a_second(Duration::from_millis(1_500)).await;
    let mut big = request(0);
    big.max_tokens = Some(40);
    router.chat(&big).await.unwrap();
    // The next one waits about a second for the bucket: within its max queue wait.
    let first = {
        let (router, req) = (router.clone(), big.clone());
        tokio::spawn(async move { router.chat(&req).await })
    };
    // Let it reach its place in line.
    tokio::time::sleep(Duration::from_millis(10)).await;
    // One more is behind it: about two seconds, over 1.5 s. Refused at once, not at 30 s.
    let started = tokio::time::Instant::now();
    let error = router.chat(&big).await.unwrap_err();
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "refused at once: {error}"
    );
    assert_eq!(error.kind(), ErrorKind::Throttled, "{error}");
    assert!(error.to_string().contains("max queue wait"), "{error}");
    let retry_after = error.retry_after().unwrap();
    assert!(
        retry_after > Duration::from_millis(1_500) && retry_after < Duration::from_secs(3),
        "the expected wait, one turn behind the waiter: {retry_after:?}"
    );
    first.await.unwrap().unwrap();
    // Retrying when told to: served.
    tokio::time::sleep(retry_after).await;
    router.chat(&big).await.unwrap();
    // The same request with a longer max queue wait of its own waits instead.
    let patient = RequestOptions::default().with_max_queue_wait(Duration::from_secs(10));
    router.chat(&big).await.unwrap();
    let started = tokio::time::Instant::now();
    router.chat_with(&big, &patient).await.unwrap();
    assert!(started.elapsed() > Duration::ZERO, "it waited for its turn");
}

/// The quota claims across upstream window kinds, window lengths and request sizes, not one
/// parameter set: at 1.3 times the summed quota, no upstream 429 reaches a caller, nothing
/// else fails, every refusal says when to retry, and the router serves most of the quota.
#[tokio::test(start_paused = true)]
async fn the_quota_holds_across_window_kinds_lengths_and_request_sizes() {
    let mut report = Vec::new();
    for kind in [
        WindowKind::Fixed,
        WindowKind::Sliding,
        WindowKind::Provisioned,
    ] {
        for window in [Duration::from_secs(1), Duration::from_secs(10)] {
            for output in [30_u32, 150] {
                let latency =
                    LatencyModel::new(Duration::from_millis(200), Duration::from_millis(5));
                let (sim, router) = windowed(kind, window, latency, (5, 3), 5).await;
                let per_request = 60.0 + f64::from(output);
                let rate = 1.3 * TPMS.iter().sum::<u64>() as f64 / 60.0 / per_request;
                let seconds = 30_u32;
                let tally = offer_sized(&router, rate, u64::from(seconds), Some(output)).await;
                let (share, upstream_429s, upstream_requests) = upstream_outcome(&sim, seconds);
                let case = format!("{kind:?} {}s out {output}", window.as_secs());
                let line = format!(
                    "{case}: share {share:.3}, upstream 429s {upstream_429s}/{upstream_requests}, ok {}, throttled {}",
                    tally.ok.load(Ordering::Relaxed),
                    tally.throttled_with_wait.load(Ordering::Relaxed)
                );
                eprintln!("{line}");
                report.push(line);
                assert_eq!(
                    tally.upstream_429.load(Ordering::Relaxed),
                    0,
                    "{case}: an upstream 429 reached a caller"
                );
                assert_eq!(
                    tally.other.load(Ordering::Relaxed),
                    0,
                    "{case}: unexpected errors"
                );
                assert!(
                    share >= SHARE_FLOOR,
                    "{case}: served only {share:.3} of the summed quota"
                );
                // Told the upstream meters provisioned throughput, the router serves its whole
                // drain rate whatever the request size (a window log served 91.2 % of it with
                // 210-token requests on 1 s).
                assert!(
                    kind != WindowKind::Provisioned || share >= 1.0,
                    "{case}: provisioned throughput served only {share:.3} of its rate"
                );
                // Where the upstream never refused, nothing was learned (a lesson regrows
                // while serving, so a refusal early in the run may be forgotten by its end).
                let learned = router
                    .stats()
                    .iter()
                    .filter(|d| !d.state.admits.is_full())
                    .count();
                assert!(
                    upstream_429s > 0 || learned == 0,
                    "{case}: {learned} deployments learned without a 429"
                );
                assert!(
                    upstream_429s * 100 <= upstream_requests * MAX_429_PERCENT,
                    "{case}: a 429 storm: {upstream_429s} of {upstream_requests} upstream requests"
                );
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// What every case above must serve at least. The lowest cases serve 91.2 %: 1 s windows
/// with 210-token requests, where the upstream itself admits at most 91 % of the summed quota
/// (a 500-token window holds two such requests, 84 %; 1,000 holds four, 84 %; 1,500 holds
/// seven, 98 %). With a continuous token bucket instead of a log of each window, the sliding
/// case served 85.9 % and drew a 429 for 2.9 % of its upstream requests.
const SHARE_FLOOR: f64 = 0.9;

/// What the `TPMS` endpoints saw over `seconds`: the share of their summed quota charged,
/// their 429s, and the requests they got.
fn upstream_outcome(sim: &Sim, seconds: u32) -> (f64, u64, u64) {
    let counters: Vec<_> = sim
        .endpoints()
        .iter()
        .map(upstream_sim::SimEndpoint::counters)
        .collect();
    let charged: u64 = counters.iter().map(|c| c.tokens_charged).sum();
    let share = charged as f64 / (TPMS.iter().sum::<u64>() as f64 * f64::from(seconds) / 60.0);
    (
        share,
        counters.iter().map(|c| c.rate_limited).sum(),
        counters.iter().map(|c| c.requests).sum(),
    )
}

/// The quota claims when the upstream's headers cannot be trusted: no `x-ratelimit-*` and
/// 429s without `retry-after` (the message alone says when), remaining counts of `-1`, or
/// counts as they stood up to a window ago. The router's own log keeps it under the quota
/// whatever the headers say: at 1.3 times the summed quota, upstream 429s stay under 2 % of
/// upstream requests, none reaches a caller, every refusal says when to retry, and most of
/// the quota is served.
#[tokio::test(start_paused = true)]
async fn the_quota_holds_when_the_upstreams_headers_are_missing_minus_one_or_stale() {
    let cases = [
        (WindowKind::Sliding, 10, 60_u32),
        (WindowKind::Fixed, 1, 150),
        (WindowKind::Provisioned, 1, 60),
    ];
    let mut served_without_headers = Vec::new();
    for headers in [HeaderMode::Missing, HeaderMode::MinusOne, HeaderMode::Stale] {
        for (at, (kind, window, output)) in cases.into_iter().enumerate() {
            let window = Duration::from_secs(window);
            let latency = LatencyModel::new(Duration::from_millis(200), Duration::from_millis(5));
            let (sim, router) = windowed_saying(kind, window, headers, latency, (6, 2), 5).await;
            let rate = 1.3 * TPMS.iter().sum::<u64>() as f64 / 60.0 / (60.0 + f64::from(output));
            let seconds = 30_u32;
            let tally = offer_sized(&router, rate, u64::from(seconds), Some(output)).await;
            let (share, upstream_429s, upstream_requests) = upstream_outcome(&sim, seconds);
            let case = format!(
                "{headers:?} headers, {kind:?} {}s out {output}",
                window.as_secs()
            );
            eprintln!(
                "{case}: share {share:.3}, upstream 429s {upstream_429s}/{upstream_requests}"
            );
            assert_eq!(
                tally.upstream_429.load(Ordering::Relaxed),
                0,
                "{case}: a 429 reached a caller"
            );
            assert_eq!(
                tally.other.load(Ordering::Relaxed),
                0,
                "{case}: unexpected errors"
            );
            assert!(
                upstream_429s as f64 <= 0.02 * upstream_requests as f64,
                "{case}: {upstream_429s} upstream 429s of {upstream_requests}"
            );
            assert!(
                share >= SHARE_FLOOR,
                "{case}: served only {share:.3} of the summed quota"
            );
            // Stale counts are not read as use the router did not see: they serve what no
            // headers do (sliding 10 s: 0.93 where no headers served 1.07, before repeats
            // were told apart).
            if headers == HeaderMode::Missing {
                served_without_headers.push(share);
            } else {
                let without = served_without_headers[at];
                assert!(
                    share >= 0.98 * without,
                    "{case}: served {share:.3} of the summed quota, {without:.3} without headers"
                );
            }
        }
    }
}

/// The most upstream requests any case may see answered 429, in percent. Every case stays at
/// or under 0.2 % over its 30 s (the target is 2 %).
const MAX_429_PERCENT: u64 = 1;

/// A client that comes back at the `Retry-After` it was given finds its turn: the refusal
/// promised it the opening the store's windows will have for it (walked from their logs,
/// not an even rate), requests arriving meanwhile are told to come after it, its turn is held
/// for it when it is due, and it stands ahead of those who arrived after the refusal. Across
/// window kinds, at 1.3 and 2 times the summed quota, with every refused request retried
/// once at its `Retry-After`: at least 90 % are served (the issue asks 80 %). Promises at
/// the group's even rate, taken by whoever came first, served 84 % to 97 % here.
#[tokio::test(start_paused = true)]
async fn a_retry_at_the_given_retry_after_is_served() {
    let mut report = Vec::new();
    // (kind, offered, window in seconds, output cap): the last, a few requests a window
    // each, is the world, where what a sliding window frees comes in bursts.
    for (kind, offered, window, output) in [
        (WindowKind::Fixed, 1.3, 10, 60),
        (WindowKind::Sliding, 2.0, 1, 60),
        (WindowKind::Provisioned, 2.0, 10, 60),
        (WindowKind::Sliding, 1.3, 10, 1_200),
    ] {
        let latency = LatencyModel::new(Duration::from_millis(150), Duration::from_millis(4));
        let (_sim, router) = windowed(kind, Duration::from_secs(window), latency, (9, 4), 30).await;
        let size = f64::from(output) + 60.0;
        let rate = offered * TPMS.iter().sum::<u64>() as f64 / 60.0 / size;
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut tasks = Vec::new();
        for i in 0..(rate * 40.0) as u64 {
            ticks.tick().await;
            let router = router.clone();
            tasks.push(tokio::spawn(async move {
                // Each request its own (the retry is the same request again).
                let mut req = request(i);
                req.max_tokens = Some(output);
                req.messages.push(ChatMessage::user(format!("caller {i}")));
                match router.chat(&req).await {
                    Ok(_) => None,
                    Err(e) => {
                        let wait = e.retry_after().expect("a refusal says when to retry");
                        assert!(e.is_throttled(), "{e}");
                        tokio::time::sleep(wait).await;
                        let again = router.chat(&req).await;
                        Some(again.is_ok())
                    }
                }
            }));
        }
        let mut retries = 0;
        let mut served = 0;
        for task in tasks {
            if let Some(ok) = task.await.unwrap() {
                retries += 1;
                served += usize::from(ok);
            }
        }
        let case = format!("{kind:?} {window}s at {offered}x, output cap {output}");
        report.push(format!("{case}: {served} of {retries} retries served"));
        assert!(
            retries > 20,
            "{case}: the load was over the quota: {retries} refusals"
        );
        assert!(
            served * 100 >= retries * 90,
            "{case}: only {served} of {retries} retries at Retry-After were served"
        );
    }
    eprintln!("{}", report.join("\n"));
}

/// An upstream whose `x-ratelimit-remaining-requests` says 0 is sent one request at a time
/// until one succeeds there, even when the router's own account (here a configured RPM far
/// above the upstream's) says room: six concurrent requests draw a 429 per exhausted window,
/// not one each.
#[tokio::test(start_paused = true)]
async fn an_upstream_that_says_nothing_is_left_gets_one_request_at_a_time() {
    let endpoint = EndpointConfig::new("only", SimDialect::OpenAi)
        .with_models([MODEL])
        .with_latency(LatencyModel::new(
            Duration::from_millis(50),
            Duration::from_millis(1),
        ))
        .with_limits(Limits::per_minute(None, Some(18)).with_window(Duration::from_secs(10)));
    let sim = Sim::start(2, [endpoint]).await.unwrap();
    let router = Router::builder()
        .endpoint(
            Endpoint::openai("only", sim.endpoints()[0].openai_base_url())
                .model(MODEL)
                .rpm(600),
        )
        .request_timeout(Duration::from_secs(60))
        .max_queue_wait(Duration::from_secs(45))
        .build()
        .unwrap();
    // Three requests use the upstream's window (three requests per 10 s); the third answer
    // says none is left.
    for i in 0..3 {
        router.chat(&request(i)).await.unwrap();
    }
    assert_eq!(sim.endpoints()[0].counters().rate_limited, 0);
    let tasks: Vec<_> = (3..9)
        .map(|i| {
            let router = router.clone();
            tokio::spawn(async move { router.chat(&request(i)).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // One 429 per window the requests exhaust (the one request that finds out the window is
    // still full); without the rule all six went at once and seven came back 429.
    let counters = sim.endpoints()[0].counters();
    assert!(
        counters.rate_limited <= 2,
        "{} 429s: the upstream said nothing was left",
        counters.rate_limited
    );
}

/// Wake-ups after a cooldown are paced: a 429 on a request the window admitted leaves it
/// full, letting what is left go a tenth at a time over a window from the end of the
/// upstream's wait, so the requests that queued behind it are admitted at the limit's rate,
/// one after another, not released together when the wait ends.
#[tokio::test(start_paused = true)]
async fn wake_ups_after_a_cooldown_are_paced_at_the_limits_rate() {
    // 6,000 TPM over 10 s windows: 1,000 tokens a window, 100 a second; requests of about
    // 120 tokens.
    let endpoint = EndpointConfig::new("only", SimDialect::OpenAi)
        .with_models([MODEL])
        .with_latency(LatencyModel::new(
            Duration::from_millis(50),
            Duration::from_millis(1),
        ));
    let sim = Sim::start(3, [endpoint]).await.unwrap();
    let router = Router::builder()
        .endpoint(
            Endpoint::openai("only", sim.endpoints()[0].openai_base_url())
                .model(MODEL)
                .tpm(6_000),
        )
        .request_timeout(Duration::from_secs(60))
        .max_queue_wait(Duration::from_secs(40))
        .build()
        .unwrap();
    let upstream = sim.endpoints()[0].clone();
    upstream.inject(Fault::rate_limited(Duration::from_secs(2)), Times::Next(1));
    let started = tokio::time::Instant::now();
    // Sample the upstream's request count every 50 ms.
    let sampling = {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticks = tokio::time::interval(Duration::from_millis(50));
            for _ in 0..400 {
                ticks.tick().await;
                samples.push((
                    started.elapsed().as_secs_f64(),
                    upstream.counters().requests,
                ));
            }
            samples
        })
    };
    let mut tasks = Vec::new();
    for i in 0..8 {
        let router = router.clone();
        tasks.push(tokio::spawn(async move { router.chat(&request(i)).await }));
        if i == 0 {
            // The first draws the 429; the others come while its cooldown runs.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let samples = sampling.await.unwrap();
    let at = |t: f64| {
        samples
            .iter()
            .rev()
            .find(|(s, _)| *s <= t)
            .map_or(0, |(_, n)| *n)
    };
    // The first request drew the 429 at once; its wait ends at 2 s. Eight requests would fit
    // the window at once, but none is released as a burst: at most two reach the upstream in
    // any second after the wait.
    let mut t = 2.0;
    while t < 18.0 {
        let sent = at(t + 1.0) - at(t);
        assert!(
            sent <= 2,
            "{sent} upstream requests between {t:.1} s and {:.1} s",
            t + 1.0
        );
        t += 0.25;
    }
    let counters = upstream.counters();
    assert_eq!((counters.faults, counters.ok), (1, 8), "{counters:?}");
}

/// Another client (a second router, not sharing the first's store) spends about half the
/// smallest endpoint's quota; the first router is offered 1.2 times what is left of the
/// summed quota. Returns the upstreams' 429s, their requests, and the share of the summed
/// quota charged, and how many of the other client's requests failed.
async fn beside_an_unseen_client(headers: HeaderMode) -> (u64, u64, f64, u64) {
    let window = Duration::from_secs(10);
    let latency = LatencyModel::new(Duration::from_millis(200), Duration::from_millis(5));
    let (sim, router) =
        windowed_saying(WindowKind::Sliding, window, headers, latency, (8, 6), 5).await;
    let first = &sim.endpoints()[0];
    let other = Router::builder()
        .seed(1)
        .request_timeout(Duration::from_secs(5))
        .endpoint(Endpoint::openai("unseen", first.openai_base_url()).model(MODEL))
        .build()
        .unwrap();
    let size = 60.0 + 60.0;
    let other_rate = 0.5 * TPMS[0] as f64 / 60.0 / size;
    let seconds = 40_u64;
    let unseen = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / other_rate));
        let mut calls = Vec::new();
        for i in 0..(other_rate * seconds as f64) as u64 {
            ticks.tick().await;
            let other = other.clone();
            calls.push(tokio::spawn(async move { other.chat(&request(i)).await }));
        }
        let mut failed = 0;
        for call in calls {
            failed += u64::from(call.await.unwrap().is_err());
        }
        failed
    });
    let left = TPMS.iter().sum::<u64>() as f64 - 0.5 * TPMS[0] as f64;
    let rate = 1.2 * left / 60.0 / size;
    let tally = offer(&router, rate, seconds).await;
    let unseen_failed = unseen.await.unwrap();
    assert_eq!(tally.upstream_429.load(Ordering::Relaxed), 0);
    assert_eq!(tally.other.load(Ordering::Relaxed), 0);
    let (share, upstream_429s, requests) = upstream_outcome(&sim, seconds as u32);
    (upstream_429s, requests, share, unseen_failed)
}

/// Remaining counts that repeat the report before them (a snapshot as it stood up to a window
/// ago, repeated) are not read as use the router did not see: beside another client spending
/// half the smallest endpoint's quota, stale headers serve as much as no headers at all
/// (they served 0.83 of the summed quota where no headers served 1.02, the router holding
/// its own admissions that had left the window as someone else's). Fresh counts are still
/// read (the store's unit tests show what a fresh count holds).
#[tokio::test(start_paused = true)]
async fn stale_remaining_counts_are_not_read_as_use_the_router_did_not_see() {
    let truthful = beside_an_unseen_client(HeaderMode::Truthful).await;
    let missing = beside_an_unseen_client(HeaderMode::Missing).await;
    let stale = beside_an_unseen_client(HeaderMode::Stale).await;
    eprintln!(
        "(upstream 429s, upstream requests, share served, the other client's failures): \
         truthful {truthful:?}, missing {missing:?}, stale {stale:?}"
    );
    assert!(
        stale.2 >= 0.97 * missing.2,
        "stale headers served {:.3} of the summed quota, no headers {:.3}",
        stale.2,
        missing.2
    );
    assert!(
        truthful.2 >= 0.97 * missing.2,
        "truthful headers served {:.3} of the summed quota, no headers {:.3}",
        truthful.2,
        missing.2
    );
}

/// A deployment's stats carry its quota and what is left of it after each admission; one
/// without a quota has none.
#[tokio::test(start_paused = true)]
async fn stats_say_what_is_left_of_each_quota() {
    let endpoints = ["metered", "open"].map(|name| {
        EndpointConfig::new(name, SimDialect::OpenAi)
            .with_models([MODEL])
            .with_latency(LatencyModel::instant())
    });
    let sim = Sim::start(1, endpoints).await.unwrap();
    let router = Router::builder()
        .endpoint(
            Endpoint::openai("metered", sim.endpoints()[0].openai_base_url())
                .model(MODEL)
                .rpm(600)
                .tpm(60_000),
        )
        .endpoint(Endpoint::openai("open", sim.endpoints()[1].openai_base_url()).model(MODEL))
        .strategy(StrategyKind::RoundRobin)
        .build()
        .unwrap();
    let before = router.stats();
    let quota = before[0].quota.unwrap();
    assert_eq!((quota.tpm, quota.rpm), (Some(60_000), Some(600)));
    assert_eq!(before[1].quota, None, "no quota configured or announced");
    for n in 0..4 {
        router.chat(&request(n)).await.unwrap();
    }
    let after = router.stats()[0].quota.unwrap();
    // Two of the four went to `metered`: its window's requests less two (time stands still).
    let full = 600.0 * quota.window.as_secs_f64() / 60.0;
    let left = after.requests_left.unwrap();
    assert!((left - (full - 2.0)).abs() < 1e-3, "{left} of {full}");
    assert!(after.tokens_left.unwrap() < 60_000.0 * quota.window.as_secs_f64() / 60.0);
}
