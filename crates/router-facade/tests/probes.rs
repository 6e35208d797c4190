//! Deployments that go out (disabled, or cooling for long) come back by a health probe, never
//! by a caller's request: against upstream-sim over loopback, in paused time. Each scenario
//! breaks one of two endpoints upstream, keeps callers coming, mends it, and checks that no
//! caller's request reached it while it was out, that the probes kept to their schedule, and
//! that it was back within one probe interval of the mend.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::time::Duration;

use router_facade::types::{ChatCompletionRequest, ChatMessage, EmbeddingRequest};
use router_facade::{
    Availability, DeploymentStats, Endpoint, ErrorKind, HealthPolicy, Router, RouterBuilder,
    StrategyKind,
};
use tokio::time::Instant;
use upstream_sim::{EndpointConfig, Fault, LatencyModel, Sim, SimDialect, SimEndpoint, Times};

const KEY: &str = "sk-sim-good";
const JITTER: f64 = 0.1;

/// A group size and a probe schedule: the scenarios hold across several.
#[derive(Debug, Clone, Copy)]
struct World {
    endpoints: usize,
    interval: Duration,
    max_interval: Duration,
    jitter: f64,
}

/// Two endpoints; probes from 10 s, doubling to 80 s, ±10 %.
const STANDARD: World = World {
    endpoints: 2,
    interval: Duration::from_secs(10),
    max_interval: Duration::from_secs(80),
    jitter: JITTER,
};

async fn sim() -> Sim {
    sim_of(STANDARD.endpoints).await
}

async fn sim_of(endpoints: usize) -> Sim {
    sim_for(endpoints, Calls::Chat).await
}

/// `endpoints` endpoints, each serving `dep{i}`; reasoning models (which refuse `max_tokens`)
/// when the callers' requests are for them.
async fn sim_for(endpoints: usize, calls: Calls) -> Sim {
    let endpoints = (0..endpoints).map(|i| {
        let config = EndpointConfig::new(format!("ep{i}"), SimDialect::OpenAi)
            .with_api_key(KEY)
            .with_models([format!("dep{i}")])
            .with_latency(LatencyModel::new(
                Duration::from_millis(50),
                Duration::from_millis(1),
            ));
        if calls.reasoning() {
            config.with_reasoning_models([format!("dep{i}")])
        } else {
            config
        }
    });
    Sim::start(11, endpoints).await.unwrap()
}

fn policy(world: World) -> HealthPolicy {
    HealthPolicy::default()
        .with_probes(Duration::from_secs(60), world.interval, world.max_interval)
        .with_jitter(world.jitter)
}

fn builder(sim: &Sim) -> RouterBuilder {
    builder_in(sim, STANDARD)
}

fn builder_in(sim: &Sim, world: World) -> RouterBuilder {
    let mut builder = Router::builder()
        .seed(5)
        .strategy(StrategyKind::RoundRobin)
        .health_policy(policy(world));
    for (i, endpoint) in sim.endpoints().iter().enumerate() {
        builder = builder.endpoint(
            Endpoint::openai(endpoint.name(), endpoint.openai_base_url())
                .api_key(KEY)
                .deployment("m", format!("dep{i}")),
        );
    }
    builder
}

/// What callers send: chat completions capped with `max_tokens`; chat completions to
/// reasoning models, capped with `max_completion_tokens` or not capped at all; or embeddings.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Calls {
    Chat,
    ReasoningChat,
    UncappedReasoningChat,
    Embeddings,
}

impl Calls {
    fn reasoning(self) -> bool {
        matches!(self, Self::ReasoningChat | Self::UncappedReasoningChat)
    }
}

/// Sends one caller's request; it must be served (the other endpoint serves while one is out).
async fn call(router: &Router, calls: Calls) -> String {
    match calls {
        Calls::Chat | Calls::ReasoningChat | Calls::UncappedReasoningChat => {
            let mut request = ChatCompletionRequest::new("m", vec![ChatMessage::user("hello")]);
            match calls {
                Calls::Chat => request.max_tokens = Some(4),
                Calls::ReasoningChat => request.max_completion_tokens = Some(4),
                _ => {}
            }
            router.chat(&request).await.unwrap().endpoint.to_string()
        }
        Calls::Embeddings => router
            .embeddings(&EmbeddingRequest::new("m", "hello"))
            .await
            .unwrap()
            .endpoint
            .to_string(),
    }
}

/// The requests `endpoint` received, split into callers' and probes' (a probe asks about
/// "ping"; callers about "hello").
fn received(endpoint: &SimEndpoint) -> (usize, Vec<serde_json::Value>) {
    let mut callers = 0;
    let mut probes = Vec::new();
    for request in endpoint.requests() {
        let text = request.body.to_string();
        if text.contains("ping") {
            probes.push(request.body);
        } else if text.contains("hello") {
            callers += 1;
        }
    }
    (callers, probes)
}

fn ep0(router: &Router) -> DeploymentStats {
    router
        .stats()
        .into_iter()
        .find(|s| s.endpoint.as_str() == "ep0")
        .unwrap()
}

/// The scenario: break ep0 upstream, keep callers coming for `out_for`, mend it, and check.
async fn goes_out_and_comes_back(
    world: World,
    calls: Calls,
    why: ErrorKind,
    out_for: Duration,
    break_it: impl FnOnce(&SimEndpoint),
    mend_it: impl FnOnce(&SimEndpoint),
) {
    let sim = sim_for(world.endpoints, calls).await;
    let broken = sim.endpoint("ep0").unwrap().clone();
    let router = builder_in(&sim, world).build().unwrap();
    for _ in 0..2 * world.endpoints {
        call(&router, calls).await;
    }
    assert!(received(&broken).0 >= 1, "ep0 served before it broke");

    break_it(&broken);
    let mut tries = 0;
    while ep0(&router).state.out.is_none() {
        call(&router, calls).await;
        tries += 1;
        assert!(tries < 10, "ep0 never went out: {:?}", ep0(&router).state);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let out = ep0(&router).state.out.unwrap();
    assert_eq!(out.why, why);
    let out_at = Instant::now();
    let callers_before = received(&broken).0;

    // Out: callers keep coming, one a second; the other endpoints serve them all.
    while out_at.elapsed() < out_for {
        assert_ne!(
            call(&router, calls).await,
            "ep0",
            "{:?}",
            ep0(&router).state
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stats = ep0(&router).state;
    assert!(
        !matches!(stats.availability, Availability::Ready),
        "still out after {out_for:?}: {stats:?}"
    );
    let (callers, mut probes) = received(&broken);
    assert_eq!(callers, callers_before, "no caller's request while out");
    if calls == Calls::UncappedReasoningChat {
        // The first probe's `max_tokens` was refused: it asked again with
        // `max_completion_tokens`, and so did every probe after it.
        let first = probes.remove(0);
        assert_eq!(first["max_tokens"], 1, "{first}");
    }
    // The schedule: the interval doubles to the longest, each jittered; so at most this many
    // probes fit in `out_for`.
    let mut most = 0;
    let mut at = Duration::ZERO;
    let mut step = world.interval;
    let shortest = 1.0 - world.jitter;
    while at + step.mul_f64(shortest) <= out_for + Duration::from_secs(1) {
        at += step.mul_f64(shortest);
        step = (step * 2).min(world.max_interval);
        most += 1;
    }
    assert!(
        (2..=most).contains(&probes.len()),
        "{} probes in {out_for:?}, schedule allows 2..={most}",
        probes.len()
    );
    assert_eq!(stats.probes, probes.len() as u64);
    let last = stats.last_probe.unwrap();
    assert!(last.failed.is_some(), "{last:?}");
    // A probe is the cheapest call of the kind the deployment serves.
    for probe in &probes {
        match calls {
            Calls::Chat => assert_eq!(probe["max_tokens"], 1, "{probe}"),
            Calls::ReasoningChat | Calls::UncappedReasoningChat => {
                assert_eq!(probe["max_completion_tokens"], 1, "{probe}");
                assert!(probe.get("max_tokens").is_none(), "{probe}");
            }
            Calls::Embeddings => assert_eq!(probe["input"], "ping", "{probe}"),
        }
    }

    // Mended: back within one probe interval (the next probe, booked before the mend).
    mend_it(&broken);
    let mended = Instant::now();
    let next = ep0(&router).state.out.unwrap().next_probe;
    let wait = next.saturating_duration_since(mended.into_std());
    assert!(
        wait <= world.max_interval.mul_f64(1.0 + world.jitter) + Duration::from_secs(1),
        "next probe {wait:?} away"
    );
    while ep0(&router).state.out.is_some() {
        assert_ne!(call(&router, calls).await, "ep0");
        assert!(
            mended.elapsed() <= wait + Duration::from_secs(2),
            "not back {:?} after the mend; the next probe was {wait:?} away",
            mended.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(received(&broken).0, callers_before, "back by a probe");
    let stats = ep0(&router).state;
    assert_eq!(stats.last_probe.unwrap().failed, None);
    // Back: callers reach it again.
    let mut served_by_ep0 = 0;
    let tries = 3 * world.endpoints;
    for _ in 0..tries {
        if call(&router, calls).await == "ep0" {
            served_by_ep0 += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        served_by_ep0 >= 2,
        "{served_by_ep0} of {tries} after it came back"
    );
}

#[tokio::test(start_paused = true)]
async fn a_revoked_key_comes_back_when_restored() {
    goes_out_and_comes_back(
        STANDARD,
        Calls::Chat,
        ErrorKind::Unauthorized,
        Duration::from_secs(100),
        |ep| ep.set_api_key(Some("sk-rotated")),
        |ep| ep.set_api_key(Some(KEY)),
    )
    .await;
}

/// The revoked key again, in other worlds: three and four endpoints, probes from 3 s to 20 s
/// jittered by ±30 %, and from 30 s to 300 s without jitter.
#[tokio::test(start_paused = true)]
async fn a_revoked_key_comes_back_across_schedules_and_group_sizes() {
    for world in [
        World {
            endpoints: 3,
            interval: Duration::from_secs(3),
            max_interval: Duration::from_secs(20),
            jitter: 0.3,
        },
        World {
            endpoints: 4,
            interval: Duration::from_secs(30),
            max_interval: Duration::from_secs(300),
            jitter: 0.0,
        },
    ] {
        goes_out_and_comes_back(
            world,
            Calls::Chat,
            ErrorKind::Unauthorized,
            Duration::from_secs(100),
            |ep| ep.set_api_key(Some("sk-rotated")),
            |ep| ep.set_api_key(Some(KEY)),
        )
        .await;
    }
}

/// Billing exhausted upstream: every answer 429 `insufficient_quota` until the faults clear.
fn out_of_quota(endpoint: &SimEndpoint) {
    endpoint.inject(
        Fault::status_with_code(429, "insufficient_quota"),
        Times::Always,
    );
}

#[tokio::test(start_paused = true)]
async fn insufficient_quota_comes_back_when_billing_is_fixed() {
    goes_out_and_comes_back(
        STANDARD,
        Calls::Chat,
        ErrorKind::QuotaExhausted,
        Duration::from_secs(100),
        out_of_quota,
        SimEndpoint::clear_faults,
    )
    .await;
}

/// `insufficient_quota` on reasoning models, whose upstream refuses `max_tokens` before it
/// looks at the quota: a probe in the form callers use (`max_completion_tokens`), or, when
/// callers set no cap, one that learns the form from the refusal, meets the quota error and
/// keeps the deployment out (a probe whose form was refused would have brought it back, and a
/// caller's request would have met the error).
#[tokio::test(start_paused = true)]
async fn insufficient_quota_on_a_reasoning_model_stays_out_until_fixed() {
    for calls in [Calls::ReasoningChat, Calls::UncappedReasoningChat] {
        goes_out_and_comes_back(
            STANDARD,
            calls,
            ErrorKind::QuotaExhausted,
            Duration::from_secs(100),
            out_of_quota,
            SimEndpoint::clear_faults,
        )
        .await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_missing_deployment_comes_back_when_it_is_created() {
    goes_out_and_comes_back(
        STANDARD,
        Calls::Embeddings,
        ErrorKind::NotFound,
        Duration::from_secs(100),
        |ep| ep.set_models(&["another"]),
        |ep| ep.set_models(&["dep0"]),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_day_long_retry_after_is_probed_past_its_cap_and_comes_back() {
    // The wait is capped at 300 s; the deployment stays out past the cap (no caller's request
    // ends it) until a probe is served.
    goes_out_and_comes_back(
        STANDARD,
        Calls::Chat,
        ErrorKind::RateLimited,
        Duration::from_secs(400),
        |ep| {
            ep.inject(
                Fault::rate_limited(Duration::from_secs(86_400)),
                Times::Always,
            );
        },
        SimEndpoint::clear_faults,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_probes_an_out_deployment_at_once() {
    let sim = sim().await;
    let broken = sim.endpoint("ep0").unwrap().clone();
    let slow = HealthPolicy::default()
        .with_probes(
            Duration::from_secs(60),
            Duration::from_secs(600),
            Duration::from_secs(600),
        )
        .with_jitter(0.0);
    let router = builder(&sim).health_policy(slow).build().unwrap();
    broken.set_api_key(Some("sk-rotated"));
    while ep0(&router).state.out.is_none() {
        call(&router, Calls::Chat).await;
    }
    broken.set_api_key(Some(KEY));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(ep0(&router).state.out.is_some(), "no probe for 600 s");
    assert!(received(&broken).1.is_empty());
    // The operator fixed the key and reloads the same configuration: a probe goes at once,
    // and the deployment keeps the rest of its state (its latency and counters).
    let before = ep0(&router).state;
    router
        .reconfigure(builder(&sim).health_policy(slow))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = ep0(&router).state;
    assert!(after.out.is_none(), "{after:?}");
    assert_eq!(received(&broken).1.len(), 1);
    assert_eq!(after.successes, before.successes);
    assert_eq!(after.failures, before.failures);
}

#[tokio::test(start_paused = true)]
async fn a_short_cooldown_ends_by_itself_without_a_probe() {
    let sim = sim().await;
    let broken = sim.endpoint("ep0").unwrap().clone();
    let router = builder(&sim).build().unwrap();
    broken.inject(Fault::rate_limited(Duration::from_secs(5)), Times::Next(1));
    for _ in 0..4 {
        call(&router, Calls::Chat).await;
    }
    assert!(ep0(&router).state.out.is_none());
    tokio::time::sleep(Duration::from_secs(6)).await;
    for _ in 0..4 {
        call(&router, Calls::Chat).await;
    }
    assert!(
        received(&broken).1.is_empty(),
        "no probe for a short cooldown"
    );
    assert_eq!(ep0(&router).state.availability, Availability::Ready);
}

/// Two replicas sharing a real Redis, in real time (Redis keeps its own clock): the probes
/// of a deployment both see out are sent once between them, each knows why it is out, and
/// both take it back when one replica's probe is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_probe_once_between_them() {
    use std::sync::Arc;
    use upstream_sim::redis_server::RedisServer;

    let redis = RedisServer::start().await.unwrap();
    let sim = sim().await;
    let broken = sim.endpoint("ep0").unwrap().clone();
    let interval = Duration::from_millis(400);
    let policy = HealthPolicy::default()
        .with_probes(Duration::from_secs(1), interval, interval * 2)
        .with_jitter(JITTER);
    let replica = || async {
        // Redis given 2 s: on a loaded machine a call over the default 100 ms would be
        // answered locally (a local lease), and each replica would probe alone.
        let options = state_redis::RedisOptions::default()
            .with_prefix("probes-test")
            .with_timeout(Duration::from_secs(2));
        let store = state_redis::RedisStore::connect(&redis.url(), options)
            .await
            .unwrap();
        builder(&sim)
            .health_policy(policy)
            .state_store(Arc::new(store))
            .build()
            .unwrap()
    };
    let (a, b) = (replica().await, replica().await);
    broken.set_api_key(Some("sk-rotated"));
    while ep0(&a).state.out.is_none() {
        call(&a, Calls::Chat).await;
    }
    // B is told through the store: its requests never reach ep0, which is out for it too.
    let callers = received(&broken).0;
    for _ in 0..6 {
        assert_eq!(call(&b, Calls::Chat).await, "ep1");
    }
    assert!(ep0(&b).state.out.is_some(), "{:?}", ep0(&b).state);

    // Three seconds of probing: the schedule of one replica, not of two.
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let probes = received(&broken).1.len();
    let (by_a, by_b) = (ep0(&a).state.probes, ep0(&b).state.probes);
    assert_eq!(
        a.state_fallbacks() + b.state_fallbacks(),
        0,
        "Redis answered every call"
    );
    assert_eq!(probes as u64, by_a + by_b, "each probe sent once");
    // One replica alone: a probe at 0.36 s at the soonest, then every 0.72 s at the soonest.
    let elapsed = started.elapsed().as_secs_f64() + 1.0;
    let alone = 1 + ((elapsed - 0.36) / 0.72).floor() as usize;
    assert!(
        (2..=alone).contains(&probes),
        "{probes} probes ({by_a} by A, {by_b} by B) in {elapsed:.1} s; one replica sends at most {alone}"
    );
    for replica in [&a, &b] {
        assert_eq!(ep0(replica).state.out.unwrap().why, ErrorKind::Unauthorized);
    }
    assert_eq!(
        received(&broken).0,
        callers,
        "no caller's request while out"
    );

    // Mended: both are back within a probe interval and a look (jittered), and both send
    // callers there again.
    broken.set_api_key(Some(KEY));
    let mended = std::time::Instant::now();
    while ep0(&a).state.out.is_some() || ep0(&b).state.out.is_some() {
        assert!(
            mended.elapsed() < interval * 2 + interval + Duration::from_secs(2),
            "not back after {:?}: A {:?}, B {:?}",
            mended.elapsed(),
            ep0(&a).state.out,
            ep0(&b).state.out
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for replica in [&a, &b] {
        let mut to_ep0 = 0;
        for _ in 0..6 {
            if call(replica, Calls::Chat).await == "ep0" {
                to_ep0 += 1;
            }
        }
        assert!(
            to_ep0 >= 1,
            "{:?}; fallbacks {}",
            ep0(replica).state,
            replica.state_fallbacks()
        );
    }
}
