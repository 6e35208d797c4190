//! The Redis store against a real `redis-server`, and routers sharing it. Real time (Redis
//! keeps its own clock), bounded to a few seconds each.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "support/fleet.rs"]
mod fleet;

use router_core::{
    Admission, Charge, Learned, Learning, Limits, MemoryStore, QuotaModel, Settlement, StateStore,
};
use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, Router};
use state_redis::{RedisOptions, RedisStore};
use upstream_sim::redis_server::RedisServer;
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

fn options(test: &str) -> RedisOptions {
    // A prefix per test, so that tests share nothing even on one server. A generous call
    // timeout: on a loaded CI machine a script call can take longer than the default 100 ms,
    // and the tests that count fallbacks would count that one (a stopped Redis refuses at
    // once, so no test needs a short timeout).
    RedisOptions::default()
        .with_prefix(format!("test-{test}-{}", std::process::id()))
        .with_timeout(Duration::from_secs(2))
}

#[tokio::test]
async fn scripts_reserve_deny_settle_and_share_cooldowns() {
    let redis = RedisServer::start().await.unwrap();
    let a = RedisStore::connect(&redis.url(), options("scripts"))
        .await
        .unwrap();
    let b = RedisStore::connect(&redis.url(), options("scripts"))
        .await
        .unwrap();
    assert!(a.is_shared() && b.is_shared());
    // 6,000 TPM over 10 s: 1,000 tokens.
    let limits = Limits::per_minute(Some(6_000), Some(600));
    let charge = Charge {
        tokens: 600,
        requests: 1,
    };
    let now = Instant::now();
    let Admission::Admitted {
        tokens_left,
        requests_left,
        ticket,
        ..
    } = a.reserve("ep/m", &limits, charge, now).await.unwrap()
    else {
        panic!("an empty window admits");
    };
    assert!(
        (tokens_left.unwrap() - 400.0).abs() < 1e-6,
        "{tokens_left:?}"
    );
    assert!((requests_left.unwrap() - 99.0).abs() < 1e-6);
    // The other replica sees the same window: nothing leaves it before the admission is a
    // window (and the margin) old.
    let Admission::Denied {
        retry_after,
        cooling,
    } = b.reserve("ep/m", &limits, charge, now).await.unwrap()
    else {
        panic!("only 400 left for both replicas");
    };
    assert!(!cooling);
    assert!(
        retry_after > Duration::from_millis(9_800) && retry_after <= Duration::from_millis(10_050),
        "{retry_after:?}"
    );
    // Settling gives back what the estimate overshot.
    let back = Settlement {
        ticket,
        tokens_back: 500,
        ..Settlement::default()
    };
    a.settle("ep/m", &limits, back, now).await.unwrap();
    assert!(matches!(
        b.reserve("ep/m", &limits, charge, now).await.unwrap(),
        Admission::Admitted { .. }
    ));
    // A cooldown one replica saw stops the other.
    a.cool_down("ep/other", Duration::from_secs(5), now)
        .await
        .unwrap();
    let Admission::Denied {
        retry_after,
        cooling,
    } = b
        .reserve("ep/other", &Limits::default(), charge, now)
        .await
        .unwrap()
    else {
        panic!("cooling");
    };
    assert!(cooling && retry_after > Duration::from_secs(4));
    assert_eq!(a.fallbacks() + b.fallbacks(), 0);
}

/// What one replica learns from a refusal, every replica keeps to: the share comes back with
/// the next admission anywhere, and the Lua scripts cut and grow it as `MemoryStore` does.
#[tokio::test]
async fn a_refusal_one_replica_saw_teaches_every_replica() {
    let redis = RedisServer::start().await.unwrap();
    // Per request: a replica that leases slices hears of another's refusal only with its
    // next call (`a_cooldown_reaches_a_replica_spending_a_slice_within_its_life`).
    let per_request = || options("learned").with_slices(None);
    let a = RedisStore::connect(&redis.url(), per_request())
        .await
        .unwrap();
    let b = RedisStore::connect(&redis.url(), per_request())
        .await
        .unwrap();
    let local = MemoryStore::new();
    let limits = Limits::per_minute(Some(60_000), Some(600));
    let charge = Charge {
        tokens: 100,
        requests: 1,
    };
    let now = Instant::now();
    let told = |admission: Admission| match admission {
        Admission::Admitted { learned, .. } => learned,
        Admission::Denied { .. } => panic!("admitted expected: {admission:?}"),
    };
    assert_eq!(
        told(b.reserve("ep/m", &limits, charge, now).await.unwrap()),
        Learned::FULL
    );
    assert!(matches!(
        local.reserve_now("ep/m", &limits, charge, now),
        Admission::Admitted { .. }
    ));
    // The window holds a hundredth of the limits when the upstream says it is full: the
    // share is cut as deep as one refusal may (a half), by the Lua as by `MemoryStore`.
    let wait = Duration::from_millis(300);
    let learned = a.refused("ep/m", &limits, wait, now).await.unwrap();
    let expected = local.refused_now("ep/m", &limits, wait, now);
    assert!((learned.share - expected.share).abs() < 1e-9, "{learned:?}");
    assert!((learned.share - 0.5).abs() < 1e-9, "{learned:?}");
    // A second refusal within the window is the same overshoot: no second cut.
    let again = b.refused("ep/m", &limits, wait, now).await.unwrap();
    assert_eq!(again, learned);
    // The other replica is cooled; when the wait ends the window is full (the upstream said
    // so), and a tenth of it leaves each tenth of a window: admitted then, and told the share.
    assert!(matches!(
        b.reserve("ep/m", &limits, charge, now).await.unwrap(),
        Admission::Denied { cooling: true, .. }
    ));
    tokio::time::sleep(wait + Duration::from_millis(200)).await;
    let Admission::Denied {
        retry_after,
        cooling,
    } = b.reserve("ep/m", &limits, charge, now).await.unwrap()
    else {
        panic!("the window is full when the wait ends");
    };
    assert!(
        !cooling
            && retry_after > Duration::from_millis(600)
            && retry_after <= Duration::from_secs(1),
        "{retry_after:?}"
    );
    tokio::time::sleep(retry_after).await;
    let after = told(b.reserve("ep/m", &limits, charge, now).await.unwrap());
    assert_eq!(after, learned);
    // Successes grow the share back, a little for a little time served.
    let served = Settlement {
        served: true,
        ..Settlement::default()
    };
    b.settle("ep/m", &limits, served, now).await.unwrap();
    let grown = told(a.reserve("ep/m", &limits, charge, now).await.unwrap());
    assert!(
        grown.share > learned.share && grown.share < 1.0,
        "{grown:?} after {learned:?}"
    );
    assert_eq!(a.fallbacks() + b.fallbacks(), 0);
}

#[tokio::test]
async fn the_learning_policy_reaches_the_scripts_and_the_fallback() {
    // A gentler policy: a refusal leaves at least 0.8 of the share, whatever the window held.
    let redis = RedisServer::start().await.unwrap();
    let policy = Learning::new(0.95, 0.8, 0.05, 0.2);
    let store = RedisStore::connect(&redis.url(), options("policy").with_learning(policy))
        .await
        .unwrap();
    let local = MemoryStore::with_learning(policy);
    let limits = Limits::per_minute(Some(60_000), Some(600));
    let charge = Charge {
        tokens: 100,
        requests: 1,
    };
    let now = Instant::now();
    assert!(matches!(
        store.reserve("ep/m", &limits, charge, now).await.unwrap(),
        Admission::Admitted { .. }
    ));
    local.reserve_now("ep/m", &limits, charge, now);
    let wait = Duration::from_millis(300);
    let learned = store.refused("ep/m", &limits, wait, now).await.unwrap();
    let expected = local.refused_now("ep/m", &limits, wait, now);
    assert!((learned.share - 0.8).abs() < 1e-9, "{learned:?}");
    assert!(
        (learned.share - expected.share).abs() < 1e-9,
        "{expected:?}"
    );
    assert_eq!(store.fallbacks(), 0);
}

#[tokio::test]
async fn provisioned_throughput_admits_under_full_utilisation_and_drains_what_is_settled() {
    let redis = RedisServer::start().await.unwrap();
    let a = RedisStore::connect(&redis.url(), options("ptu"))
        .await
        .unwrap();
    let b = RedisStore::connect(&redis.url(), options("ptu"))
        .await
        .unwrap();
    // 30,000 TPM over 1 s: 500 tokens of utilisation, draining 500 a second. The RPM is not
    // metered under provisioned throughput.
    let limits = Limits {
        window: Duration::from_secs(1),
        model: QuotaModel::Provisioned,
        ..Limits::per_minute(Some(30_000), Some(1))
    };
    let charge = |tokens| Charge {
        tokens,
        requests: 1,
    };
    let now = Instant::now();
    let admitted = |admission: Admission| match admission {
        Admission::Admitted { ticket, .. } => ticket,
        Admission::Denied { .. } => panic!("admitted expected: {admission:?}"),
    };
    let first = admitted(a.reserve("ep/p", &limits, charge(291), now).await.unwrap());
    // Under 100 %: the other replica's request is admitted and takes it over (a window log
    // would refuse it: 582 > 500).
    admitted(b.reserve("ep/p", &limits, charge(291), now).await.unwrap());
    let Admission::Denied { retry_after, .. } =
        b.reserve("ep/p", &limits, charge(1), now).await.unwrap()
    else {
        panic!("over 100 %, refused");
    };
    // Until the first has drained (291 / 500 s) and the margin, less the time the calls took.
    assert!(
        retry_after > Duration::from_millis(450) && retry_after <= Duration::from_millis(592),
        "{retry_after:?}"
    );
    // The first used 100: 391 held, under 100 % again.
    let back = Settlement {
        ticket: first,
        tokens_back: 191,
        ..Settlement::default()
    };
    a.settle("ep/p", &limits, back, now).await.unwrap();
    admitted(b.reserve("ep/p", &limits, charge(1), now).await.unwrap());
    // The same requests on a window log: the second does not fit.
    let window = Limits {
        model: QuotaModel::Window,
        rpm: None,
        ..limits
    };
    admitted(a.reserve("ep/w", &window, charge(291), now).await.unwrap());
    assert!(matches!(
        b.reserve("ep/w", &window, charge(291), now).await.unwrap(),
        Admission::Denied { .. }
    ));
    assert_eq!(a.fallbacks() + b.fallbacks(), 0);
}

/// A settlement under provisioned throughput redraws the drain from the settled admission on,
/// in Redis as in the process: what is taken beyond the estimate drains before what came after
/// it, and what is given back lets what came after it drain sooner.
#[tokio::test]
async fn a_provisioned_settlement_redraws_the_drain_in_redis_as_in_the_process() {
    let redis = RedisServer::start().await.unwrap();
    let store = RedisStore::connect(&redis.url(), options("redraw"))
        .await
        .unwrap();
    let local = MemoryStore::new();
    // 60,000 TPM over 1 s: 1,000 tokens of utilisation, draining 1,000 a second.
    let limits = Limits {
        window: Duration::from_secs(1),
        model: QuotaModel::Provisioned,
        ..Limits::per_minute(Some(60_000), None)
    };
    let charge = |tokens| Charge {
        tokens,
        requests: 1,
    };
    let ticket = |admission: Admission| match admission {
        Admission::Admitted { ticket, .. } => ticket,
        Admission::Denied { .. } => panic!("admitted expected: {admission:?}"),
    };
    let one = charge(1);
    // (what the first asks, what it gives back, the second, the third), and when the first
    // request of one token fits again: 0 then 400, the first taking 300 more, then 300 (held
    // 1,000): the first drains by 0.3 s (held until 0.31 s), not at once. 400 and 400, the
    // first giving it all back, then 600: the second drains by 0.4 s, not 0.8 s.
    let cases: [(u64, i64, u64, u64, f64); 2] =
        [(0, -300, 400, 300, 0.31), (400, 400, 400, 600, 0.41)];
    for (case, (first, back, second, third, fits)) in cases.into_iter().enumerate() {
        let key = format!("ep/redraw{case}");
        let now = Instant::now();
        let settlement = |ticket| Settlement {
            ticket,
            tokens_back: back,
            ..Settlement::default()
        };
        let shared = ticket(
            store
                .reserve(&key, &limits, charge(first), now)
                .await
                .unwrap(),
        );
        ticket(
            store
                .reserve(&key, &limits, charge(second), now)
                .await
                .unwrap(),
        );
        store
            .settle(&key, &limits, settlement(shared), now)
            .await
            .unwrap();
        ticket(
            store
                .reserve(&key, &limits, charge(third), now)
                .await
                .unwrap(),
        );
        let mine = ticket(local.reserve_now(&key, &limits, charge(first), now));
        ticket(local.reserve_now(&key, &limits, charge(second), now));
        local.settle_now(&key, &limits, settlement(mine), now);
        ticket(local.reserve_now(&key, &limits, charge(third), now));
        let by = now + Duration::from_secs(5);
        let theirs = store
            .openings(&key, &limits, one, 1, now, by)
            .await
            .unwrap()
            .expect("Redis walks its log");
        let ours = local.openings_now(&key, &limits, one, 1, now, by);
        assert_eq!(
            ours,
            vec![now + Duration::from_secs_f64(fits)],
            "case {case}"
        );
        // Redis's clock moved on by the calls' time.
        let redis_at = theirs[0].saturating_duration_since(now).as_secs_f64();
        assert!(
            (redis_at - fits).abs() < 0.1,
            "case {case}: Redis says {redis_at} s, the process {fits} s"
        );
    }
    assert_eq!(store.fallbacks(), 0);
}

/// Each of the openings Redis walked is within `within` of the local log's (Redis's clock moves
/// on by the calls' time).
fn assert_close(shared: &[Instant], mine: &[Instant], now: Instant, within: Duration, what: &str) {
    let since = |times: &[Instant]| -> Vec<Duration> {
        times
            .iter()
            .map(|t| t.saturating_duration_since(now))
            .collect()
    };
    for (theirs, ours) in shared.iter().zip(mine) {
        let apart = theirs
            .max(ours)
            .saturating_duration_since(*theirs.min(ours));
        assert!(
            apart < within,
            "{what}: Redis {:?} vs local {:?}",
            since(shared),
            since(mine)
        );
    }
}

/// When the next requests would fit, walked from the log in Redis, agrees with the same log
/// kept in the process: the openings a refusal's `Retry-After` is promised from.
#[tokio::test]
async fn openings_walked_in_redis_agree_with_the_local_log() {
    let redis = RedisServer::start().await.unwrap();
    let a = RedisStore::connect(&redis.url(), options("openings"))
        .await
        .unwrap();
    let local = MemoryStore::new();
    // 6,000 TPM over 10 s: 1,000 tokens; three of 300 fit.
    let limits = Limits::per_minute(Some(6_000), None);
    let charge = Charge {
        tokens: 300,
        requests: 1,
    };
    let now = Instant::now();
    for _ in 0..2 {
        assert!(matches!(
            a.reserve("ep/o", &limits, charge, now).await.unwrap(),
            Admission::Admitted { .. }
        ));
        assert!(matches!(
            local.reserve_now("ep/o", &limits, charge, now),
            Admission::Admitted { .. }
        ));
    }
    let by = now + Duration::from_secs(60);
    let shared = a
        .openings("ep/o", &limits, charge, 5, now, by)
        .await
        .unwrap()
        .expect("Redis walks its log");
    let mine = local.openings_now("ep/o", &limits, charge, 5, now, by);
    // One fits now; the two admitted leave together (10 s and the margin), and the next
    // after the first opening's own admission leaves.
    assert_eq!(shared.len(), 5, "{shared:?}");
    assert_close(
        &shared,
        &mine,
        now,
        Duration::from_millis(200),
        "5 openings",
    );
    assert!(shared[1] >= now + Duration::from_secs(10), "{shared:?}");
    // A shared cooldown comes first.
    a.cool_down("ep/o", Duration::from_secs(20), now)
        .await
        .unwrap();
    let cooled = a
        .openings("ep/o", &limits, charge, 1, now, by)
        .await
        .unwrap()
        .unwrap();
    assert!(cooled[0] >= now + Duration::from_secs(19), "{cooled:?}");
    assert_eq!(a.fallbacks(), 0);
}

/// Redis hands a waiting request's walk only the marks it can reach (those that must leave
/// for its openings, and one after), with the window's totals: the openings still agree with
/// the whole log kept in the process, for the first opening, a few, and more than the log
/// holds, and after a cooldown.
#[tokio::test]
async fn openings_walked_from_the_marks_redis_hands_over_agree_with_the_whole_log() {
    let redis = RedisServer::start().await.unwrap();
    // Per request: under leased shares the log holds slices and is not walked.
    let a = RedisStore::connect(&redis.url(), options("prefix").with_slices(None))
        .await
        .unwrap();
    let local = MemoryStore::new();
    // 6,000 TPM over 10 s: 1,000 tokens, held by 300 admissions of 3 tokens.
    let limits = Limits::per_minute(Some(6_000), None);
    let small = Charge {
        tokens: 3,
        requests: 1,
    };
    let now = Instant::now();
    for _ in 0..300 {
        assert!(matches!(
            a.reserve("ep/p", &limits, small, now).await.unwrap(),
            Admission::Admitted { .. }
        ));
        assert!(matches!(
            local.reserve_now("ep/p", &limits, small, now),
            Admission::Admitted { .. }
        ));
    }
    let by = now + Duration::from_secs(60);
    let asked = Charge {
        tokens: 150,
        requests: 1,
    };
    let compare = |shared: &[Instant], mine: &[Instant], what: &str| {
        assert_eq!(shared.len(), mine.len(), "{what}: {shared:?} vs {mine:?}");
        assert_close(shared, mine, now, Duration::from_millis(400), what);
    };
    for n in [1, 4, 12] {
        let shared = a
            .openings("ep/p", &limits, asked, n, now, by)
            .await
            .unwrap()
            .expect("Redis walks its log");
        let mine = local.openings_now("ep/p", &limits, asked, n, now, by);
        compare(&shared, &mine, &format!("{n} openings"));
        // 100 tokens are free now; the rest come as the 3-token marks leave, 10 s on (less
        // the time the admissions took: Redis's clock moved on meanwhile).
        assert!(mine[0] >= now + Duration::from_secs(10), "{mine:?}");
    }
    a.cool_down("ep/p", Duration::from_secs(12), now)
        .await
        .unwrap();
    local.cool_down_now("ep/p", Duration::from_secs(12), now);
    let shared = a
        .openings("ep/p", &limits, asked, 3, now, by)
        .await
        .unwrap()
        .unwrap();
    let mine = local.openings_now("ep/p", &limits, asked, 3, now, by);
    compare(&shared, &mine, "after a cooldown");
    assert_eq!(a.fallbacks(), 0);
}

fn request() -> ChatCompletionRequest {
    let mut request = ChatCompletionRequest::new(
        "m",
        vec![ChatMessage::user("share the quota between replicas")],
    );
    request.max_tokens = Some(60);
    request
}

/// One upstream with 60,000 TPM over 1 s windows (1,000 tokens a second); three routers, each
/// configured with the whole quota, each offered the whole quota for `seconds`.
async fn replicas(
    shared: Option<&RedisServer>,
    test: &str,
    seconds: u64,
) -> (u64, u64, Vec<String>) {
    let endpoint = EndpointConfig::new("up", SimDialect::OpenAi)
        .with_models(["m"])
        .with_latency(LatencyModel::instant())
        .with_limits(
            upstream_sim::Limits::per_minute(Some(60_000), None)
                .with_window(Duration::from_secs(1)),
        );
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let mut routers = Vec::new();
    for _ in 0..3 {
        let mut builder = Router::builder()
            .endpoint(
                Endpoint::openai("up", sim.endpoints()[0].openai_base_url())
                    .model("m")
                    .tpm(60_000)
                    .quota_window(Duration::from_secs(1)),
            )
            // Waits are bounded by the max queue wait (2 s); the deadline leaves a loaded CI
            // machine slack to run a request that waited its whole turn.
            .request_timeout(Duration::from_secs(10));
        if let Some(redis) = shared {
            builder = builder.state_store(Arc::new(
                RedisStore::connect(&redis.url(), options(test))
                    .await
                    .unwrap(),
            ));
        }
        routers.push(builder.build().unwrap());
    }
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for router in &routers {
        // About 80 tokens a request: 12 a second each is the whole quota per router.
        let (router, failures, ok) = (router.clone(), Arc::clone(&failures), Arc::clone(&ok));
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(83));
            let mut inner = Vec::new();
            for _ in 0..seconds * 12 {
                ticks.tick().await;
                let (router, failures, ok) =
                    (router.clone(), Arc::clone(&failures), Arc::clone(&ok));
                inner.push(tokio::spawn(async move {
                    match router.chat(&request()).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) if e.is_throttled() => 0,
                        Err(e) => {
                            assert_ne!(
                                e.status(),
                                Some(429),
                                "an upstream 429 reached a caller: {e}"
                            );
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{:?}: {e}", e.kind()));
                            0
                        }
                    };
                }));
            }
            for task in inner {
                task.await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let counters = sim.endpoints()[0].counters();
    (
        counters.rate_limited,
        ok.load(Ordering::Relaxed),
        std::mem::take(&mut *failures.lock().unwrap()),
    )
}

#[tokio::test]
async fn replicas_sharing_redis_stay_within_the_quota_and_without_it_overshoot() {
    let redis = RedisServer::start().await.unwrap();
    let (alone_429s, alone_ok, alone_failed) = replicas(None, "alone", 3).await;
    let (shared_429s, shared_ok, shared_failed) = replicas(Some(&redis), "shared", 3).await;
    eprintln!(
        "without sharing: {alone_429s} upstream 429s, {alone_ok} served; with Redis: {shared_429s} 429s, {shared_ok} served"
    );
    assert!(
        alone_failed.is_empty() && shared_failed.is_empty(),
        "requests failed: {alone_failed:?} {shared_failed:?}"
    );
    // Local accounting: each replica spends the whole quota, the three thrice it, and the
    // upstream refuses the excess (each replica learns from its own 429s to stay under what it
    // is admitted, so the excess shrinks but stays). Shared: they spend one quota; the few 429s
    // left are at the upstream's window edges, which a continuous bucket does not see.
    assert!(
        alone_429s >= 10,
        "replicas with local accounting each use the whole quota: {alone_429s}"
    );
    assert!(
        shared_429s * 3 < alone_429s,
        "sharing should keep the replicas within one quota: {shared_429s} vs {alone_429s}"
    );
    assert!(shared_ok > 0);
}

#[tokio::test]
async fn redis_going_away_fails_no_request_and_sharing_resumes() {
    let mut redis = RedisServer::start().await.unwrap();
    let endpoint = EndpointConfig::new("up", SimDialect::OpenAi)
        .with_models(["m"])
        .with_latency(LatencyModel::instant());
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let store = Arc::new(
        RedisStore::connect(&redis.url(), options("away"))
            .await
            .unwrap(),
    );
    let router = Router::builder()
        .endpoint(
            Endpoint::openai("up", sim.endpoints()[0].openai_base_url())
                .model("m")
                .tpm(600_000),
        )
        .state_store(Arc::clone(&store) as Arc<dyn StateStore>)
        .build()
        .unwrap();
    for _ in 0..5 {
        router.chat(&request()).await.unwrap();
    }
    assert!(store.is_shared());
    assert_eq!(store.fallbacks(), 0);

    redis.stop().await;
    for _ in 0..20 {
        router.chat(&request()).await.unwrap(); // no request fails because Redis did
    }
    assert!(store.fallbacks() > 0, "the fallback is counted");
    assert!(!store.is_shared());

    redis.restart().await.unwrap();
    let started = Instant::now();
    while !store.is_shared() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sharing did not resume"
        );
        router.chat(&request()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fallbacks = store.fallbacks();
    for _ in 0..5 {
        router.chat(&request()).await.unwrap();
    }
    assert_eq!(store.fallbacks(), fallbacks, "shared again");
}

/// Where each stored response lives is kept in Redis: a replica that did not create a
/// response sends its continuation to the deployment that stored it, and a replica started
/// afterwards (as after a restart) does too.
#[tokio::test]
async fn replicas_send_a_continuation_where_another_stored_its_response() {
    use router_facade::StrategyKind;
    use router_facade::types::CreateResponse;
    let redis = RedisServer::start().await.unwrap();
    let endpoints = (0..2).map(|i| {
        EndpointConfig::new(format!("ep{i}"), SimDialect::OpenAi)
            .with_models(["m"])
            .with_latency(LatencyModel::instant())
    });
    let sim = Sim::start(3, endpoints).await.unwrap();
    let replica = || async {
        let store = RedisStore::connect(&redis.url(), options("affinity"))
            .await
            .unwrap();
        let mut builder = Router::builder()
            .strategy(StrategyKind::RoundRobin)
            .state_store(Arc::new(store));
        for endpoint in sim.endpoints() {
            builder = builder
                .endpoint(Endpoint::openai(endpoint.name(), endpoint.openai_base_url()).model("m"));
        }
        builder.build().unwrap()
    };
    let request = |previous: Option<&str>| {
        let mut request = CreateResponse {
            model: "m".to_owned(),
            input: Some(serde_json::json!("hello")),
            max_output_tokens: Some(4),
            ..CreateResponse::default()
        };
        if let Some(id) = previous {
            request
                .extra
                .insert("previous_response_id".to_owned(), serde_json::json!(id));
        }
        request
    };
    let a = replica().await;
    // Round robin: the first on ep0, the second on ep1.
    a.responses(&request(None)).await.unwrap();
    let second = a.responses(&request(None)).await.unwrap();
    assert_eq!(second.endpoint.as_str(), "ep1");
    // Another replica, whose round robin starts at ep0, and then a new one: both to ep1.
    for router in [replica().await, replica().await] {
        for _ in 0..2 {
            let next = router
                .responses(&request(Some(&second.body.id)))
                .await
                .unwrap();
            assert_eq!(next.endpoint.as_str(), "ep1");
        }
    }
    // One no replica placed: refused, naming the field.
    let error = replica()
        .await
        .responses(&request(Some("resp_unknown")))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("previous_response_id"),
        "{error}"
    );
}

/// A store on one server (one URL) or on a cluster (several).
async fn store_on(urls: &[String], test: &str) -> RedisStore {
    if urls.len() == 1 {
        RedisStore::connect(&urls[0], options(test)).await.unwrap()
    } else {
        RedisStore::connect_cluster(urls, options(test))
            .await
            .unwrap()
    }
}

/// `replicas` routers, each configured with the same per-caller `limits`, each sent `sends` of
/// the caller's requests in turn (all within one 10 s window); returns how many were served and
/// throttled. With the limits in Redis the routers admit one window's worth between them; each
/// in its own process admits one window's worth of its own.
async fn callers_admitted(
    shared: Option<&[String]>,
    test: &str,
    replicas: usize,
    limits: router_facade::RateLimits,
    sends: usize,
) -> (u64, u64) {
    use router_facade::RequestOptions;
    let endpoint = EndpointConfig::new("up", SimDialect::OpenAi)
        .with_models(["m"])
        .with_latency(LatencyModel::instant());
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let mut routers = Vec::new();
    for _ in 0..replicas {
        let mut builder = Router::builder()
            .endpoint(Endpoint::openai("up", sim.endpoints()[0].openai_base_url()).model("m"))
            .caller_limits("team-a", limits)
            // Throttled at once rather than waiting 10 s for the window.
            .request_timeout(Duration::from_secs(2));
        if let Some(urls) = shared {
            builder = builder.state_store(Arc::new(store_on(urls, test).await));
        }
        routers.push(builder.build().unwrap());
    }
    let options = RequestOptions::default().with_caller("team-a");
    let (mut served, mut throttled) = (0, 0);
    for router in &routers {
        for _ in 0..sends {
            match router.chat_with(&request(), &options).await {
                Ok(_) => served += 1,
                Err(e) => {
                    assert!(e.is_throttled(), "{e}");
                    assert!(e.to_string().contains("caller:team-a"), "{e}");
                    throttled += 1;
                }
            }
        }
    }
    assert_eq!(sim.endpoints()[0].counters().requests, served);
    (served, throttled)
}

/// 12 requests a minute: 2 in any 10 s.
fn twelve_a_minute() -> router_facade::RateLimits {
    router_facade::RateLimits::new().with_rpm(12)
}

#[tokio::test]
async fn a_callers_limit_holds_across_replicas_sharing_redis() {
    let redis = RedisServer::start().await.unwrap();
    assert_eq!(
        callers_admitted(None, "callers-alone", 3, twelve_a_minute(), 4).await,
        (6, 6)
    );
    assert_eq!(
        callers_admitted(
            Some(&[redis.url()]),
            "callers-shared",
            3,
            twelve_a_minute(),
            4
        )
        .await,
        (2, 10),
        "three replicas on one Redis admit the caller's limit once"
    );
}

/// The same across limits of requests, of tokens and of both, and two to five replicas: the
/// replicas on one Redis admit what one router alone admits, where each alone admits its own.
#[tokio::test]
async fn a_callers_limit_holds_whatever_the_limit_and_the_replica_count() {
    use router_facade::RateLimits;
    let redis = RedisServer::start().await.unwrap();
    let cases = [
        (2, RateLimits::new().with_rpm(60)),
        (4, RateLimits::new().with_tpm(2_000)),
        (3, RateLimits::new().with_rpm(30).with_tpm(3_000)),
        (5, RateLimits::new().with_rpm(6)),
    ];
    let sends = 12;
    for (i, (replicas, limits)) in cases.into_iter().enumerate() {
        let (one, _) = callers_admitted(None, &format!("case-{i}-one"), 1, limits, sends).await;
        assert!(
            (1..sends as u64).contains(&one),
            "case {i}: the limit should bind one router: {one} of {sends}"
        );
        let (alone, _) =
            callers_admitted(None, &format!("case-{i}-alone"), replicas, limits, sends).await;
        assert_eq!(alone, one * replicas as u64, "case {i}: each alone");
        let (shared, _) = callers_admitted(
            Some(&[redis.url()]),
            &format!("case-{i}-shared"),
            replicas,
            limits,
            sends,
        )
        .await;
        assert_eq!(
            shared, one,
            "case {i} ({replicas} replicas, {limits:?}): on one Redis"
        );
    }
}

/// Concurrency slots are leases in Redis: one replica's slots count against every replica's
/// limit, a released slot is free to the others at once, a live replica's leases outlive
/// their expiry by being renewed, and a dead replica's free when it passes.
#[tokio::test]
async fn concurrency_leases_are_shared_renewed_and_freed_by_expiry() {
    let redis = RedisServer::start().await.unwrap();
    let ttl = Duration::from_millis(600);
    let replica = |test: &'static str| {
        let url = redis.url();
        async move {
            RedisStore::connect(&url, options(test).with_lease_ttl(ttl))
                .await
                .unwrap()
        }
    };
    let (a, b) = (replica("leases").await, replica("leases").await);
    assert!(a.leases());
    let now = Instant::now();
    let first = a.lease("limit:group:m", 2, now).await.unwrap().unwrap();
    let second = a.lease("limit:group:m", 2, now).await.unwrap().unwrap();
    assert_ne!(first, second);
    assert_eq!(a.leases_held(), 2);
    assert!(
        b.lease("limit:group:m", 2, now).await.unwrap().is_none(),
        "the other replica's leases count"
    );
    a.release(&first).await.unwrap();
    let on_b = b.lease("limit:group:m", 2, now).await.unwrap().unwrap();
    // `a` keeps renewing `second` past its expiry.
    tokio::time::sleep(ttl * 2).await;
    assert!(
        b.lease("limit:group:m", 2, now).await.unwrap().is_none(),
        "a live replica's lease expired under it"
    );
    // `a` dies holding `second`: nothing renews it, and it frees within its expiry.
    drop(a);
    let died = Instant::now();
    loop {
        if let Some(lease) = b.lease("limit:group:m", 2, now).await.unwrap() {
            b.release(&lease).await.unwrap();
            break;
        }
        assert!(
            died.elapsed() < ttl * 3,
            "a dead replica's lease outlived its expiry: {:?}",
            died.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.release(&on_b).await.unwrap();
    assert_eq!(b.leases_held(), 0);
}

/// While Redis is away a replica leases from its local share of a concurrency limit (a half
/// here: 2 of 4), and no call fails.
#[tokio::test]
async fn without_redis_leases_come_from_the_local_share() {
    let mut redis = RedisServer::start().await.unwrap();
    let store = RedisStore::connect(&redis.url(), options("lease-away").with_local_share(0.5))
        .await
        .unwrap();
    redis.stop().await;
    let now = Instant::now();
    let mut held = Vec::new();
    while let Some(lease) = store.lease("limit:caller:x", 4, now).await.unwrap() {
        held.push(lease);
        assert!(held.len() <= 4);
    }
    assert_eq!(held.len(), 2);
    assert!(store.fallbacks() > 0);
    store.release(&held.pop().unwrap()).await.unwrap();
    assert!(
        store
            .lease("limit:caller:x", 4, now)
            .await
            .unwrap()
            .is_some()
    );
}

/// A model group's concurrency limit of one, on two routers sharing Redis: while one router's
/// request is in flight the other's is throttled for concurrency; once it ends (its lease
/// given back as the request's permit drops), the other's is served.
#[tokio::test]
async fn a_groups_concurrency_limit_holds_across_replicas() {
    use router_facade::RateLimits;
    let redis = RedisServer::start().await.unwrap();
    let endpoint = EndpointConfig::new("up", SimDialect::OpenAi)
        .with_models(["m"])
        .with_latency(LatencyModel::new(
            Duration::from_millis(800),
            Duration::ZERO,
        ));
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let mut routers = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(&redis.url(), options("group-concurrency"))
            .await
            .unwrap();
        routers.push(
            Router::builder()
                .endpoint(Endpoint::openai("up", sim.endpoints()[0].openai_base_url()).model("m"))
                .group_limits("m", RateLimits::new().with_concurrency(1))
                .state_store(Arc::new(store))
                .build()
                .unwrap(),
        );
    }
    let first = {
        let router = routers[0].clone();
        tokio::spawn(async move { router.chat(&request()).await })
    };
    let started = Instant::now();
    while sim.endpoints()[0].counters().requests == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the first request never left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = routers[1].chat(&request()).await.unwrap_err();
    assert!(refused.is_throttled(), "{refused}");
    assert!(refused.to_string().contains("concurrency"), "{refused}");
    first.await.unwrap().unwrap();
    // The lease goes back on a task: give it a moment.
    let ended = Instant::now();
    loop {
        match routers[1].chat(&request()).await {
            Ok(_) => break,
            Err(e) if e.is_throttled() && ended.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the slot was not given back: {e}"),
        }
    }
}

/// The same store on a real three-master Redis Cluster: quota windows, cooldowns, leases and
/// router-side limits hold across replicas as on one server, and the keys of different
/// deployments spread over the masters (each script touches one hash slot).
#[tokio::test]
async fn on_a_redis_cluster_windows_leases_and_limits_hold_across_replicas() {
    use upstream_sim::redis_server::RedisCluster;
    let cluster = RedisCluster::start(3).await.unwrap();
    let urls = cluster.urls();
    let (a, b) = (
        store_on(&urls, "cluster").await,
        store_on(&urls, "cluster").await,
    );
    assert!(a.is_shared() && b.is_shared());
    let limits = Limits::per_minute(None, Some(60)); // 10 requests in any 10 s
    let charge = Charge {
        tokens: 0,
        requests: 1,
    };
    let now = Instant::now();
    for d in 0..12 {
        let key = format!("endpoint-{d}/m");
        for n in 0..10 {
            let store = if n % 2 == 0 { &a } else { &b };
            let admission = store.reserve(&key, &limits, charge, now).await.unwrap();
            assert!(
                matches!(admission, Admission::Admitted { .. }),
                "{key}: {admission:?}"
            );
        }
        let denied = b.reserve(&key, &limits, charge, now).await.unwrap();
        assert!(
            matches!(denied, Admission::Denied { cooling: false, .. }),
            "{key}: the eleventh of two replicas: {denied:?}"
        );
    }
    a.cool_down("endpoint-0/m", Duration::from_secs(30), now)
        .await
        .unwrap();
    let cooling = b
        .reserve("endpoint-0/m", &Limits::default(), charge, now)
        .await
        .unwrap();
    assert!(
        matches!(cooling, Admission::Denied { cooling: true, .. }),
        "{cooling:?}"
    );
    let lease = a.lease("limit:group:m", 1, now).await.unwrap().unwrap();
    assert!(b.lease("limit:group:m", 1, now).await.unwrap().is_none());
    a.release(&lease).await.unwrap();
    let lease = b.lease("limit:group:m", 1, now).await.unwrap().unwrap();
    b.release(&lease).await.unwrap();
    assert_eq!(
        a.fallbacks() + b.fallbacks(),
        0,
        "every call was answered by the cluster"
    );
    // Leased slices on the cluster: 6,000 tokens a window, requests of 50 (120 a window,
    // sliced). The two replicas together never admit past the window; the unspent parts of
    // their slices are all it may leave unused.
    let sliced = Limits::per_minute(Some(36_000), None);
    let small = Charge {
        tokens: 50,
        requests: 1,
    };
    let mut admitted = 0;
    let mut denied_in_a_row = 0;
    for n in 0..400 {
        let store = if n % 2 == 0 { &a } else { &b };
        match store
            .reserve("sliced/m", &sliced, small, now)
            .await
            .unwrap()
        {
            Admission::Admitted { .. } => {
                admitted += 1;
                denied_in_a_row = 0;
            }
            Admission::Denied { .. } => denied_in_a_row += 1,
        }
        if denied_in_a_row >= 4 {
            break;
        }
    }
    assert!(
        (100..=120).contains(&admitted),
        "slices on the cluster admitted {admitted} of 120"
    );
    let per_node = cluster.keys_per_node().await.unwrap();
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "the keys all landed on one master: {per_node:?}"
    );

    assert_eq!(
        callers_admitted(Some(&urls), "cluster-callers", 3, twelve_a_minute(), 4).await,
        (2, 10),
        "three replicas on one cluster admit the caller's limit once"
    );
}

/// A deployment one replica ejected after consecutive failures (500s, 503s, connection resets)
/// or disabled (401, 403, 404, `insufficient_quota`) is out for the other replicas too:
/// the ejection is shared as a cooldown of its length, a disabling as one of five minutes, so
/// they send it nothing until it ends (without sharing, each replica would spend its own
/// failures finding out).
#[tokio::test]
async fn an_ejection_or_a_disabling_one_replica_made_keeps_every_replica_away() {
    use upstream_sim::Fault;
    let redis = RedisServer::start().await.unwrap();
    let faults = [
        Fault::Status {
            status: 500,
            code: None,
            retry_after: None,
        },
        Fault::Status {
            status: 503,
            code: None,
            retry_after: None,
        },
        Fault::Reset,
        Fault::Status {
            status: 401,
            code: None,
            retry_after: None,
        },
        Fault::Status {
            status: 403,
            code: None,
            retry_after: None,
        },
        Fault::Status {
            status: 404,
            code: None,
            retry_after: None,
        },
        Fault::Status {
            status: 429,
            code: Some("insufficient_quota".to_owned()),
            retry_after: None,
        },
    ];
    for (i, fault) in faults.into_iter().enumerate() {
        ejection_case(&redis, fault, &format!("ejection-{i}")).await;
    }
}

async fn ejection_case(redis: &RedisServer, fault: upstream_sim::Fault, test: &str) {
    use router_facade::StrategyKind;
    let endpoints = ["bad", "good"].map(|name| {
        EndpointConfig::new(name, SimDialect::OpenAi)
            .with_models(["m"])
            .with_latency(LatencyModel::instant())
    });
    let sim = Sim::start(1, endpoints).await.unwrap();
    // An ejection takes consecutive failures; a disabling, one.
    let least = match &fault {
        upstream_sim::Fault::Status { status, .. } if *status < 500 => 1,
        _ => 3,
    };
    sim.endpoints()[0].inject(fault, upstream_sim::Times::Always);
    let mut routers = Vec::new();
    for _ in 0..2 {
        let mut builder = Router::builder().strategy(StrategyKind::RoundRobin);
        for (i, name) in ["bad", "good"].into_iter().enumerate() {
            builder = builder
                .endpoint(Endpoint::openai(name, sim.endpoints()[i].openai_base_url()).model("m"));
        }
        let store = RedisStore::connect(&redis.url(), options(test))
            .await
            .unwrap();
        routers.push(builder.state_store(Arc::new(store)).build().unwrap());
    }
    // The first replica meets the failures (each request fails over to `good`) until it
    // ejects or disables `bad`.
    let mut sent = 0;
    while !routers[0].stats().iter().any(|d| {
        d.endpoint.as_str() == "bad"
            && matches!(
                d.state.availability,
                router_core::Availability::Ejected(_) | router_core::Availability::Disabled(_)
            )
    }) {
        routers[0].chat(&request()).await.unwrap();
        sent += 1;
        assert!(
            sent < 50,
            "`bad` was never ejected: {:?}",
            routers[0].stats()
        );
    }
    let failures = sim.endpoints()[0].counters().requests;
    assert!(failures >= least, "{test}: {failures}");
    for _ in 0..20 {
        routers[1].chat(&request()).await.unwrap();
    }
    assert_eq!(
        sim.endpoints()[0].counters().requests,
        failures,
        "{test}: the second replica sent requests to a deployment the first had taken out"
    );
}

/// After a shared cooldown, a deployment is half-open for every replica together: one request
/// across them until one is served. While the first replica's probe is in flight, the second
/// replica's request waits for it instead of going out beside it; once the probe is served,
/// both send freely.
#[tokio::test]
async fn after_a_shared_cooldown_one_probe_goes_out_across_replicas() {
    let redis = RedisServer::start().await.unwrap();
    let endpoint = EndpointConfig::new("up", SimDialect::OpenAi)
        .with_models(["m"])
        .with_latency(LatencyModel::new(
            Duration::from_millis(600),
            Duration::ZERO,
        ));
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    let mut routers = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(&redis.url(), options("probe"))
            .await
            .unwrap();
        routers.push(
            Router::builder()
                .endpoint(Endpoint::openai("up", sim.endpoints()[0].openai_base_url()).model("m"))
                .max_queue_wait(Duration::from_secs(5))
                .state_store(Arc::new(store))
                .build()
                .unwrap(),
        );
    }
    // A third replica saw a 429 with an 800 ms wait and shared it.
    RedisStore::connect(&redis.url(), options("probe"))
        .await
        .unwrap()
        .cool_down("up/m", Duration::from_millis(800), Instant::now())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let probe = {
        let router = routers[0].clone();
        tokio::spawn(async move { router.chat(&request()).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = {
        let router = routers[1].clone();
        tokio::spawn(async move { router.chat(&request()).await })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        sim.endpoints()[0].counters().requests,
        1,
        "the first replica's probe only: the second replica's request went out beside it"
    );
    probe.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(sim.endpoints()[0].counters().requests, 2);
    // Whole again: both replicas send at once.
    let (first, second) = (request(), request());
    let (a, b) = tokio::join!(routers[0].chat(&first), routers[1].chat(&second));
    a.unwrap();
    b.unwrap();
}

/// Script calls Redis has run so far (`EVALSHA`, `EVAL`), from `INFO commandstats`.
async fn script_calls(redis: &RedisServer) -> u64 {
    fleet::redis_stats(&redis.url()).await.0
}

/// One run of replicas admitting from one window: what each admission really used, when.
struct Spent {
    /// (when admitted, tokens used), every replica's.
    used: Vec<(Instant, f64)>,
    asked: u64,
    calls: u64,
}

/// `replicas` stores on one Redis, each offered 2.5 times its part of a window of `cap`
/// tokens every `window`, in requests of `tokens`, for `windows` windows; each settles at
/// once, giving back a part of its estimate (what the upstream did not use: two thirds used
/// on average, so 1.67 times the window is asked for in tokens used).
async fn spend_together(
    redis: &RedisServer,
    options: RedisOptions,
    replicas: usize,
    window: Duration,
    cap: u64,
    tokens: u64,
    windows: u32,
) -> Spent {
    let limits = Limits {
        tpm: Some(cap * 60_000 / u64::try_from(window.as_millis()).unwrap()),
        rpm: None,
        window,
        ..Limits::default()
    };
    let overload = 2.5;
    let per_tick = Duration::from_millis(5);
    // Requests per tick per replica, fractional: carried over.
    let rate = overload * cap as f64 / tokens as f64 / window.as_secs_f64() / replicas as f64
        * per_tick.as_secs_f64();
    let before = script_calls(redis).await;
    let mut tasks = Vec::new();
    for r in 0..replicas {
        let store = RedisStore::connect(&redis.url(), options.clone())
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut ticks = tokio::time::interval(per_tick);
            let (mut owed, mut asked, mut used) = (0.0_f64, 0_u64, Vec::new());
            let charge = Charge {
                tokens,
                requests: 1,
            };
            while started.elapsed() < window * windows {
                ticks.tick().await;
                owed += rate;
                while owed >= 1.0 {
                    owed -= 1.0;
                    asked += 1;
                    let now = Instant::now();
                    let Admission::Admitted { ticket, .. } =
                        store.reserve("ep/m", &limits, charge, now).await.unwrap()
                    else {
                        continue;
                    };
                    // Between a third and all of the estimate used, by request.
                    let back = (tokens as f64 * ((asked + r as u64) % 3) as f64 / 3.0) as i64;
                    used.push((now, tokens as f64 - back as f64));
                    let settlement = Settlement {
                        ticket,
                        tokens_back: back,
                        served: true,
                        ..Settlement::default()
                    };
                    store
                        .settle("ep/m", &limits, settlement, Instant::now())
                        .await
                        .unwrap();
                }
            }
            assert_eq!(store.fallbacks(), 0, "every call was answered by Redis");
            (asked, used)
        }));
    }
    let mut spent = Spent {
        used: Vec::new(),
        asked: 0,
        calls: 0,
    };
    for task in tasks {
        let (asked, used) = task.await.unwrap();
        spent.asked += asked;
        spent.used.extend(used);
    }
    spent.calls = script_calls(redis).await - before;
    spent.used.sort_by_key(|(at, _)| *at);
    spent
}

/// The most used in any `window` (sliding over the admissions), and in all.
fn fullest(used: &[(Instant, f64)], window: Duration) -> (f64, f64) {
    let (mut best, mut sum, mut j) = (0.0_f64, 0.0, 0);
    for i in 0..used.len() {
        sum += used[i].1;
        while used[i].0.duration_since(used[j].0) >= window {
            sum -= used[j].1;
            j += 1;
        }
        best = best.max(sum);
    }
    (best, used.iter().map(|(_, t)| t).sum())
}

/// Leased shares across window lengths, request sizes and replica counts: replicas admitting
/// from slices never use more than the window in any window's time, use nearly as much as
/// replicas asking per request do, and call Redis a small fraction as often as they admit
/// (per request: once to reserve, once to settle).
#[tokio::test]
async fn replicas_admitting_from_leased_slices_stay_within_the_window_with_few_calls() {
    let redis = RedisServer::start().await.unwrap();
    // (replicas, window, tokens a window, tokens a request)
    for (case, (replicas, window_ms, cap, tokens)) in [
        (2, 1_000, 20_000, 100),
        (4, 2_000, 100_000, 300),
        (3, 500, 8_000, 25),
    ]
    .into_iter()
    .enumerate()
    {
        let window = Duration::from_millis(window_ms);
        let mut runs = Vec::new();
        for life in [Some(state_redis::DEFAULT_SLICE_LIFE), None] {
            let options = options(&format!("slices-{case}-{}", life.is_some())).with_slices(life);
            let run = spend_together(&redis, options, replicas, window, cap, tokens, 4).await;
            let (most, all) = fullest(&run.used, window);
            let requests = run.used.len() as f64;
            let what = format!(
                "{} {replicas} replicas, {window_ms} ms windows of {cap} tokens, {tokens} a \
                 request: {requests} admitted of {} asked, {} calls, fullest window {most:.0}, \
                 in all {all:.0}",
                if life.is_some() {
                    "slices:"
                } else {
                    "per request:"
                },
                run.asked,
                run.calls
            );
            eprintln!("{what}");
            assert!(most <= cap as f64 * 1.005, "over the window: {what}");
            if life.is_none() {
                assert!(run.calls as f64 >= requests, "{what}");
            }
            runs.push((all, run.calls, requests));
        }
        let ((sliced, sliced_calls, sliced_requests), (per_request, per_request_calls, _)) =
            (runs[0], runs[1]);
        // A slice lives a twentieth of the window: a few calls a life per replica.
        let lives = 4.0 * 20.0 * replicas as f64;
        assert!(
            (sliced_calls as f64) <= lives * 3.0,
            "{sliced_calls} calls over {lives} slice lives"
        );
        assert!(
            sliced_calls * 4 <= per_request_calls && (sliced_calls as f64) < sliced_requests / 2.0,
            "slices: {sliced_calls} calls for {sliced_requests} requests; per request {per_request_calls}"
        );
        // What a replica holds unspent no other can use (about a fortieth of the window):
        // a small cost in what is used.
        assert!(
            sliced >= per_request * 0.95,
            "slices used {sliced:.0}, per request {per_request:.0}"
        );
    }
}

/// The fleet bench's short form: ten replicas leasing slices of one 2 s window (100 ms
/// slices), asked 1.5 times its limit at 400 requests a second each: within the limit in
/// every window, reaching it, under a tenth of a call a request (a replica calls about ten
/// times a second: twice a life under contention), nothing answered from a local share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_leasing_slices_keeps_one_window_with_few_calls() {
    let redis = RedisServer::start().await.unwrap();
    let report = fleet::run(
        &redis.url(),
        &fleet::Fleet {
            replicas: 10,
            rate: 400.0,
            seconds: 5.0,
            window: Duration::from_secs(2),
            tokens: 50,
            overload: 1.5,
            slices: Some(state_redis::DEFAULT_SLICE_LIFE),
            prefix: format!("fleet-{}", std::process::id()),
        },
    )
    .await;
    eprintln!("{report:?}");
    assert!(report.fullest_share() <= 1.0 + 1e-9, "{report:?}");
    // The window's limit is reached, not left unused: most of what the fleet asked beyond
    // the first window is admitted up to it.
    assert!(report.fullest_share() >= 0.9, "{report:?}");
    assert!(report.calls_per_request() < 0.1, "{report:?}");
    assert_eq!(report.fallbacks, 0);
}

/// Under leased shares a replica spends its slice without asking Redis, so a cooldown another
/// replica shares reaches it with its next call: within a slice's life. The replica that
/// cooled down stops at once, and a refusal it hears closes its slices too.
#[tokio::test]
async fn a_cooldown_reaches_a_replica_spending_a_slice_within_its_life() {
    let redis = RedisServer::start().await.unwrap();
    let a = RedisStore::connect(&redis.url(), options("slice-cool"))
        .await
        .unwrap();
    let b = RedisStore::connect(&redis.url(), options("slice-cool"))
        .await
        .unwrap();
    // 600,000 TPM over 10 s windows: 100,000 tokens a window, slices living 500 ms.
    let limits = Limits::per_minute(Some(600_000), Some(6_000));
    let life = Duration::from_millis(500);
    let charge = Charge {
        tokens: 100,
        requests: 1,
    };
    for store in [&a, &b] {
        let admitted = store.reserve("ep/m", &limits, charge, Instant::now()).await;
        assert!(
            matches!(admitted, Ok(Admission::Admitted { .. })),
            "{admitted:?}"
        );
    }
    let cooled = Instant::now();
    a.cool_down("ep/m", Duration::from_secs(5), cooled)
        .await
        .unwrap();
    let mine = a.reserve("ep/m", &limits, charge, Instant::now()).await;
    assert!(
        matches!(mine, Ok(Admission::Denied { cooling: true, .. })),
        "the replica that cooled down stops at once: {mine:?}"
    );
    let reached = loop {
        let admission = b
            .reserve("ep/m", &limits, charge, Instant::now())
            .await
            .unwrap();
        if matches!(admission, Admission::Denied { cooling: true, .. }) {
            break cooled.elapsed();
        }
        assert!(
            matches!(admission, Admission::Admitted { .. }),
            "{admission:?}"
        );
        assert!(
            cooled.elapsed() < life * 2,
            "the cooldown did not reach the other replica within a slice's life"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("the cooldown reached the other replica after {reached:?}");
    // A refusal a replica hears closes its slices: nothing more from them.
    let c = RedisStore::connect(&redis.url(), options("slice-refused"))
        .await
        .unwrap();
    assert!(matches!(
        c.reserve("ep/n", &limits, charge, Instant::now())
            .await
            .unwrap(),
        Admission::Admitted { .. }
    ));
    c.refused("ep/n", &limits, Duration::from_secs(2), Instant::now())
        .await
        .unwrap();
    assert!(matches!(
        c.reserve("ep/n", &limits, charge, Instant::now())
            .await
            .unwrap(),
        Admission::Denied { cooling: true, .. }
    ));
    assert_eq!(a.fallbacks() + b.fallbacks() + c.fallbacks(), 0);
}
