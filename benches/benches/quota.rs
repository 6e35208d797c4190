//! The quota scenario: 3 endpoints with different TPM limits, offered 1.3 times their sum.
//!
//! Real time on loopback: the simulated endpoints count their quota over 10 s windows, as
//! Azure counts tokens, so a minute of load is six quota windows. Reported:
//! the share of the summed quota served, upstream 429s (and how many reached callers: the
//! target is none), router throttles carrying retry-after, p50/p99 latency. Then the same
//! load through 3 replicas: sharing one Redis, and each on its own.
//!
//! `cargo bench -p benches --bench quota` (part of `cargo xtask bench`).

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark report"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, Router, StateStore, StrategyKind};
use state_redis::{RedisOptions, RedisStore};
use upstream_sim::redis_server::RedisServer;
use upstream_sim::{EndpointConfig, LatencyModel, Limits, Sim, SimDialect};

const MODEL: &str = "gpt-4o-mini";
const TPMS: [u64; 3] = [30_000, 60_000, 90_000];
const SECONDS: u64 = 60;
/// The quota window of the endpoints and of the router.
const WINDOW: Duration = Duration::from_secs(10);
/// Tokens the simulator charges one request (prompt estimate plus the 60-token cap).
const PER_REQUEST: f64 = 120.0;

fn world() -> Vec<EndpointConfig> {
    let latency =
        LatencyModel::new(Duration::from_millis(100), Duration::from_millis(5)).with_jitter(0.2);
    TPMS.iter()
        .enumerate()
        .map(|(i, tpm)| {
            EndpointConfig::new(format!("ep{i}-{}k", tpm / 1000), SimDialect::OpenAi)
                .with_models([MODEL])
                .with_latency(latency)
                .with_limits(Limits::per_minute(Some(*tpm), None).with_window(WINDOW))
        })
        .collect()
}

fn router(sim: &Sim, store: Option<Arc<dyn StateStore>>) -> Router {
    let mut builder = Router::builder()
        .strategy(StrategyKind::LeastLatency)
        .request_timeout(Duration::from_secs(3));
    for (endpoint, tpm) in sim.endpoints().iter().zip(TPMS) {
        builder = builder.endpoint(
            Endpoint::openai(endpoint.name(), endpoint.openai_base_url())
                .model(MODEL)
                .tpm(tpm)
                .quota_window(WINDOW),
        );
    }
    if let Some(store) = store {
        builder = builder.state_store(store);
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

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    throttled: AtomicU64,
    upstream_429: AtomicU64,
    other: AtomicU64,
    latencies: std::sync::Mutex<Vec<Duration>>,
}

/// Offers `rate` requests a second, spread over `routers`, for `SECONDS`; returns the tally
/// and the tokens the upstreams had charged when the offering ended.
async fn offer(routers: &[Router], rate: f64, sim: &Sim) -> (Arc<Tally>, u64) {
    let tally = Arc::new(Tally::default());
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let total = (rate * SECONDS as f64) as u64;
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        ticks.tick().await;
        let (router, tally) = (
            routers[(i as usize) % routers.len()].clone(),
            Arc::clone(&tally),
        );
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            match router.chat(&request(i)).await {
                Ok(_) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    tally.latencies.lock().unwrap().push(started.elapsed());
                }
                Err(e) if e.is_throttled() && e.retry_after().is_some() => {
                    tally.throttled.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.status() == Some(429) => {
                    tally.upstream_429.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    println!("  other error: {e}");
                    tally.other.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Charged at admission: what the upstreams admitted while the load was offered.
    let charged = sim
        .endpoints()
        .iter()
        .map(|e| e.counters().tokens_charged)
        .sum();
    for task in tasks {
        task.await.unwrap();
    }
    (tally, charged)
}

fn report(
    name: &str,
    sim: &Sim,
    tally: &Tally,
    charged: u64,
    offered_for: Duration,
    elapsed: Duration,
) {
    let summed: u64 = TPMS.iter().sum();
    let upstream_429s: u64 = sim
        .endpoints()
        .iter()
        .map(|e| e.counters().rate_limited)
        .sum();
    let share = charged as f64 / (summed as f64 * offered_for.as_secs_f64() / 60.0);
    let mut latencies = tally.latencies.lock().unwrap().clone();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "| {name} | {:.1} % | {upstream_429s} | {} | {} | {} | {} | {:.0} ms | {:.0} ms |",
        share * 100.0,
        tally.upstream_429.load(Ordering::Relaxed),
        tally.throttled.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
        tally.ok.load(Ordering::Relaxed),
        pct(0.5).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
    );
    let per_endpoint: Vec<String> = sim
        .endpoints()
        .iter()
        .map(|e| {
            format!(
                "{}: {:.0} tokens/min",
                e.name(),
                e.counters().tokens_charged as f64 * 60.0 / elapsed.as_secs_f64()
            )
        })
        .collect();
    println!("|   | {} | | | | | | | |", per_endpoint.join(", "));
}

async fn scenario(name: &str, replicas: usize, redis: Option<&RedisServer>) {
    let sim = Sim::start(7, world()).await.unwrap();
    let mut routers = Vec::new();
    for _ in 0..replicas {
        let store: Option<Arc<dyn StateStore>> = match redis {
            Some(redis) => Some(Arc::new(
                RedisStore::connect(
                    &redis.url(),
                    RedisOptions::default().with_prefix(format!("bench-{name}")),
                )
                .await
                .unwrap(),
            )),
            None => None,
        };
        routers.push(router(&sim, store));
    }
    let summed: u64 = TPMS.iter().sum();
    let rate = 1.3 * summed as f64 / 60.0 / PER_REQUEST;
    let started = Instant::now();
    let (tally, charged) = offer(&routers, rate, &sim).await;
    let offered_for = Duration::from_secs(SECONDS);
    report(name, &sim, &tally, charged, offered_for, started.elapsed());
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "quota scenario: TPM {TPMS:?} (sum {}), offered 1.3x for {SECONDS} s, {} s quota windows",
            TPMS.iter().sum::<u64>(),
            WINDOW.as_secs()
        );
        println!("| run | share of summed quota served | upstream 429s | 429s reaching callers | router throttles (retry-after) | other errors | served | p50 | p99 |");
        println!("|---|---|---|---|---|---|---|---|---|");
        scenario("1 router", 1, None).await;
        let redis = RedisServer::start().await.unwrap();
        scenario("3 replicas, shared Redis", 3, Some(&redis)).await;
        scenario("3 replicas, local accounting", 3, None).await;
    });
}
