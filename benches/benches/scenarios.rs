//! Routing quality on simulated endpoints, for openai-router and (with `--litellm PYTHON`)
//! for `LiteLLM`'s Router, against the same endpoints, the same offered load and the same clock.
//!
//! - **degradation**: three equal endpoints; midway, one turns five times slower. Latency p50
//!   and p99 and each endpoint's share of the traffic, per second, for every strategy.
//! - **quota**: three endpoints with 30k, 60k and 90k TPM counted over 10 s windows as Azure
//!   counts them, offered 1.3 times their sum. Share of the summed quota served, upstream 429s
//!   and how many reached callers, router throttles, latency, served tokens per minute over time.
//!
//! Real time on loopback. Each run starts a fresh simulated world on the same seed; the load is
//! open loop (one request every 1/rate seconds whatever the answers). The `LiteLLM` runs go
//! through `benches/litellm/driver.py`, which offers the same requests and writes one record
//! per request; this process owns the simulator and the clock of every run, and computes every
//! figure from the records the same way for both routers.
//!
//! Writes `scenarios.json` (summaries and per-second series) to `--out` (default
//! `target/bench`), which `cargo run -p benches --bin bench-report` turns into tables and
//! plots. `cargo bench -p benches --bench scenarios [-- --litellm PYTHON] [--only NAME]`;
//! `cargo xtask bench [--compare litellm]` runs it with the rest.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::too_many_lines,
    reason = "a benchmark report: a failed setup should stop it loudly"
)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, Router, StateStore, StrategyKind};
use serde_json::{Value, json};
use state_redis::{RedisOptions, RedisStore};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use upstream_sim::redis_server::RedisServer;
use upstream_sim::{EndpointConfig, LatencyModel, Limits, Sim, SimDialect};

const MODEL: &str = "gpt-4o-mini";
const API_KEY: &str = "sk-bench";
const SEED: u64 = 7;
/// Words of every prompt, and its output cap: about 120 tokens charged a request.
const PROMPT_WORDS: u64 = 40;
const MAX_TOKENS: u32 = 60;
/// Every request's deadline, and the attempts one request may make.
const DEADLINE: Duration = Duration::from_secs(3);
const ATTEMPTS: u32 = 3;

/// The degradation scenario.
const DEGRADE_RATE: f64 = 30.0;
const DEGRADE_SECONDS: u64 = 20;
const DEGRADE_AT: u64 = 10;
const SLOWDOWN: f64 = 5.0;
/// The simulated endpoints of every run, by name; the first is the one that slows.
const ENDPOINTS: [&str; 3] = ["ep0", "ep1", "ep2"];
const SLOW_ENDPOINT: &str = ENDPOINTS[0];
/// "Settled": requests sent this long after the slowdown.
const SETTLE: f64 = 3.0;

/// The quota scenario.
const TPMS: [u64; 3] = [30_000, 60_000, 90_000];
const QUOTA_SECONDS: u64 = 30;
const QUOTA_WINDOW: Duration = Duration::from_secs(10);
const OFFERED: f64 = 1.3;
const PER_REQUEST: f64 = 120.0;

/// How a request ended, the same classes for both routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// The router refused without an upstream call (all over quota or cooling down).
    Throttled,
    /// An upstream 429 reached the caller.
    Upstream429,
    Timeout,
    Error,
}

impl Outcome {
    fn parse(name: &str) -> Self {
        match name {
            "ok" => Self::Ok,
            "throttled" => Self::Throttled,
            "upstream_429" => Self::Upstream429,
            "timeout" => Self::Timeout,
            _ => Self::Error,
        }
    }
}

/// One request as its caller saw it.
#[derive(Debug, Clone)]
struct Record {
    /// Seconds from the start of the run to when the request was sent.
    t: f64,
    ms: f64,
    endpoint: Option<String>,
    outcome: Outcome,
    error: Option<String>,
}

/// Who routes a run.
#[derive(Debug, Clone)]
enum System {
    Ours {
        strategy: StrategyKind,
        replicas: usize,
        redis: bool,
    },
    LiteLlm {
        strategy: &'static str,
    },
}

impl System {
    fn system_name(&self) -> &'static str {
        match self {
            Self::Ours { .. } => "openai-router",
            Self::LiteLlm { .. } => "litellm",
        }
    }

    fn label(&self) -> String {
        match self {
            Self::Ours {
                strategy,
                replicas: 1,
                ..
            } => strategy.as_str().to_owned(),
            Self::Ours {
                strategy,
                replicas,
                redis,
            } => format!(
                "{}, {replicas} replicas, {}",
                strategy.as_str(),
                if *redis {
                    "shared Redis"
                } else {
                    "local accounting"
                }
            ),
            Self::LiteLlm { strategy } => (*strategy).to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Degradation,
    Quota,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Degradation => "degradation",
            Self::Quota => "quota",
        }
    }

    fn rate(self) -> f64 {
        match self {
            Self::Degradation => DEGRADE_RATE,
            Self::Quota => OFFERED * TPMS.iter().sum::<u64>() as f64 / 60.0 / PER_REQUEST,
        }
    }

    fn seconds(self) -> u64 {
        match self {
            Self::Degradation => DEGRADE_SECONDS,
            Self::Quota => QUOTA_SECONDS,
        }
    }

    fn world(self) -> Vec<EndpointConfig> {
        let latency = LatencyModel::new(Duration::from_millis(100), Duration::from_millis(5))
            .with_jitter(0.2);
        (0..ENDPOINTS.len())
            .map(|i| {
                let limits = match self {
                    Self::Degradation => Limits::unlimited(),
                    Self::Quota => {
                        Limits::per_minute(Some(TPMS[i]), None).with_window(QUOTA_WINDOW)
                    }
                };
                EndpointConfig::new(ENDPOINTS[i], SimDialect::OpenAi)
                    .with_models([MODEL])
                    .with_api_key(API_KEY)
                    .with_latency(latency)
                    .with_limits(limits)
            })
            .collect()
    }

    /// The TPM each router is told per endpoint. In the degradation scenario the endpoints
    /// have no limit; a large figure gives the usage-based strategies a denominator.
    fn told_tpm(self, i: usize) -> u64 {
        match self {
            Self::Degradation => 1_000_000,
            Self::Quota => TPMS[i],
        }
    }
}

fn request(i: u64) -> ChatCompletionRequest {
    // Must match `prompt()` in benches/litellm/driver.py.
    let words = [
        "route", "each", "call", "where", "quota", "room", "left", "fast",
    ];
    let prompt: Vec<&str> = (0..PROMPT_WORDS)
        .map(|k| words[((i + k) % 8) as usize])
        .collect();
    let mut request = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user(prompt.join(" "))]);
    request.max_tokens = Some(MAX_TOKENS);
    request
}

/// The simulator's cumulative charged tokens, sampled every 500 ms from the run's start.
#[derive(Default)]
struct Samples {
    points: Mutex<Vec<(f64, u64)>>,
}

fn sample(sim: &Sim, started: Instant, samples: &Arc<Samples>) -> tokio::task::JoinHandle<()> {
    let endpoints = sim.endpoints().to_vec();
    let samples = Arc::clone(samples);
    tokio::spawn(async move {
        // On the run's clock, so that samples fall on the quota windows' edges.
        let mut ticks = tokio::time::interval_at(started.into(), Duration::from_millis(500));
        loop {
            ticks.tick().await;
            let charged = endpoints.iter().map(|e| e.counters().tokens_charged).sum();
            samples
                .points
                .lock()
                .unwrap()
                .push((started.elapsed().as_secs_f64(), charged));
        }
    })
}

/// Everything measured in one run.
struct RunData {
    records: Vec<Record>,
    /// Tokens the endpoints admitted while the load was offered.
    charged: u64,
    upstream_429s: u64,
    samples: Vec<(f64, u64)>,
    elapsed: f64,
}

async fn run(
    scenario: Scenario,
    system: &System,
    python: Option<&Path>,
    out: &Path,
    redis: Option<&RedisServer>,
) -> RunData {
    let sim = Sim::start(SEED, scenario.world()).await.unwrap();
    let samples = Arc::new(Samples::default());
    let (records, started, charged) = match system {
        System::Ours {
            strategy,
            replicas,
            redis: shared,
        } => {
            let mut routers = Vec::new();
            for _ in 0..*replicas {
                let store: Option<Arc<dyn StateStore>> = match (shared, redis) {
                    (true, Some(redis)) => Some(Arc::new(
                        RedisStore::connect(
                            &redis.url(),
                            RedisOptions::default().with_prefix(format!(
                                "bench-{}-{}",
                                scenario.name(),
                                std::process::id()
                            )),
                        )
                        .await
                        .unwrap(),
                    )),
                    _ => None,
                };
                routers.push(our_router(scenario, &sim, *strategy, store));
            }
            let started = start_windows(&sim);
            let sampling = sample(&sim, started, &samples);
            let degrade = degrade_later(scenario, &sim, started);
            let (records, charged) = offer(&routers, scenario, &sim, started).await;
            sampling.abort();
            degrade.abort();
            (records, started, charged)
        }
        System::LiteLlm { strategy } => {
            let python = python.expect("a LiteLLM run needs --litellm");
            litellm(scenario, strategy, &sim, python, out, &samples).await
        }
    };
    let upstream_429s = sim
        .endpoints()
        .iter()
        .map(|e| e.counters().rate_limited)
        .sum();
    let samples = samples.points.lock().unwrap().clone();
    RunData {
        records,
        charged,
        upstream_429s,
        samples,
        elapsed: started.elapsed().as_secs_f64(),
    }
}

fn our_router(
    scenario: Scenario,
    sim: &Sim,
    strategy: StrategyKind,
    store: Option<Arc<dyn StateStore>>,
) -> Router {
    let mut builder = Router::builder()
        .strategy(strategy)
        .request_timeout(DEADLINE)
        .max_attempts(ATTEMPTS);
    for (i, endpoint) in sim.endpoints().iter().enumerate() {
        let mut configured = Endpoint::openai(endpoint.name(), endpoint.openai_base_url())
            .api_key(API_KEY)
            .model(MODEL)
            .tpm(scenario.told_tpm(i));
        if scenario == Scenario::Quota {
            configured = configured.quota_window(QUOTA_WINDOW);
        }
        builder = builder.endpoint(configured);
    }
    if let Some(store) = store {
        builder = builder.state_store(store);
    }
    builder.build().unwrap()
}

/// The clock of a run starts with the endpoints' quota windows: every run measures whole
/// windows, whenever its router was ready.
fn start_windows(sim: &Sim) -> Instant {
    for endpoint in sim.endpoints() {
        endpoint.restart_windows();
    }
    Instant::now()
}

/// In the degradation scenario, slows the first endpoint down midway.
fn degrade_later(scenario: Scenario, sim: &Sim, started: Instant) -> tokio::task::JoinHandle<()> {
    let slow = sim.endpoint(SLOW_ENDPOINT).cloned();
    tokio::spawn(async move {
        if scenario != Scenario::Degradation {
            return;
        }
        tokio::time::sleep_until((started + Duration::from_secs(DEGRADE_AT)).into()).await;
        if let Some(slow) = slow {
            slow.set_latency(slow.latency().scaled(SLOWDOWN));
        }
    })
}

/// Offers the scenario's load through our routers (round robin over replicas).
async fn offer(
    routers: &[Router],
    scenario: Scenario,
    sim: &Sim,
    started: Instant,
) -> (Vec<Record>, u64) {
    let rate = scenario.rate();
    let total = (rate * scenario.seconds() as f64) as u64;
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let router = routers[(i as usize) % routers.len()].clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let t = sent.duration_since(started).as_secs_f64();
            let answer = router.chat(&request(i)).await;
            let ms = sent.elapsed().as_secs_f64() * 1000.0;
            match answer {
                Ok(answered) => Record {
                    t,
                    ms,
                    endpoint: Some(answered.endpoint.to_string()),
                    outcome: Outcome::Ok,
                    error: None,
                },
                Err(e) => {
                    let outcome = if e.is_throttled() {
                        Outcome::Throttled
                    } else if e.status() == Some(429) {
                        Outcome::Upstream429
                    } else if e.kind() == router_facade::ErrorKind::DeadlineExceeded {
                        Outcome::Timeout
                    } else {
                        Outcome::Error
                    };
                    Record {
                        t,
                        ms,
                        endpoint: None,
                        outcome,
                        error: Some(e.to_string()),
                    }
                }
            }
        }));
    }
    let charged = charged(sim);
    let mut records = Vec::with_capacity(tasks.len());
    for task in tasks {
        records.push(task.await.unwrap());
    }
    (records, charged)
}

fn charged(sim: &Sim) -> u64 {
    sim.endpoints()
        .iter()
        .map(|e| e.counters().tokens_charged)
        .sum()
}

/// Offers the same load through `LiteLLM`'s Router (`benches/litellm/driver.py`).
async fn litellm(
    scenario: Scenario,
    strategy: &str,
    sim: &Sim,
    python: &Path,
    out: &Path,
    samples: &Arc<Samples>,
) -> (Vec<Record>, Instant, u64) {
    let name = format!("litellm-{}-{strategy}", scenario.name());
    let endpoints: Vec<Value> = sim
        .endpoints()
        .iter()
        .enumerate()
        .map(|(i, e)| {
            json!({"name": e.name(), "api_base": e.openai_base_url(), "api_key": API_KEY,
                   "tpm": scenario.told_tpm(i)})
        })
        .collect();
    let spec = json!({
        "strategy": strategy, "model": MODEL, "endpoints": endpoints,
        "rate": scenario.rate(), "seconds": scenario.seconds(),
        "prompt_words": PROMPT_WORDS, "max_tokens": MAX_TOKENS,
        "timeout_s": DEADLINE.as_secs_f64(), "num_retries": ATTEMPTS - 1,
    });
    let spec_path = out.join(format!("{name}.spec.json"));
    let records_path = out.join(format!("{name}.records.jsonl"));
    let log_path = out.join(format!("{name}.log"));
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let _ = std::fs::remove_file(&records_path);
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("litellm/driver.py");
    let mut child = tokio::process::Command::new(python)
        .arg(&driver)
        .arg(&spec_path)
        .arg(&records_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(120), stdout.next_line()).await;
    assert!(
        matches!(&ready, Ok(Ok(Some(line))) if line == "ready"),
        "the LiteLLM driver did not start: {ready:?}; see {}",
        log_path.display()
    );
    let mut stdin = child.stdin.take().unwrap();
    let started = start_windows(sim);
    stdin.write_all(b"go\n").await.unwrap();
    stdin.flush().await.unwrap();
    let sampling = sample(sim, started, samples);
    let degrade = degrade_later(scenario, sim, started);
    let offered_until = started + Duration::from_secs(scenario.seconds());
    tokio::time::sleep_until(offered_until.into()).await;
    let charged = charged(sim);
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .expect("the LiteLLM driver did not finish")
        .unwrap();
    sampling.abort();
    degrade.abort();
    assert!(
        status.success(),
        "the LiteLLM driver failed ({status}); see {}",
        log_path.display()
    );
    let text = std::fs::read_to_string(&records_path).unwrap();
    let records = text
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            Record {
                t: v["t"].as_f64().unwrap_or_default(),
                ms: v["ms"].as_f64().unwrap_or_default(),
                endpoint: v["endpoint"].as_str().map(str::to_owned),
                outcome: Outcome::parse(v["outcome"].as_str().unwrap_or_default()),
                error: v["error"].as_str().map(str::to_owned),
            }
        })
        .collect();
    (records, started, charged)
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

fn latencies(records: &[Record], from: f64, to: f64) -> Vec<f64> {
    let mut ms: Vec<f64> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Ok && r.t >= from && r.t < to)
        .map(|r| r.ms)
        .collect();
    ms.sort_unstable_by(f64::total_cmp);
    ms
}

fn count(records: &[Record], outcome: Outcome) -> usize {
    records.iter().filter(|r| r.outcome == outcome).count()
}

/// Per-second series: latency p50/p99 of the requests sent in that second, and the share of
/// them each endpoint served.
fn series(records: &[Record], seconds: u64) -> Value {
    let names = ENDPOINTS;
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut shares: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for s in 0..seconds {
        let (from, to) = (s as f64, s as f64 + 1.0);
        let ms = latencies(records, from, to);
        p50.push(percentile(&ms, 0.5));
        p99.push(percentile(&ms, 0.99));
        let served: Vec<&Record> = records
            .iter()
            .filter(|r| r.outcome == Outcome::Ok && r.t >= from && r.t < to)
            .collect();
        for (i, name) in names.iter().enumerate() {
            let n = served
                .iter()
                .filter(|r| r.endpoint.as_deref() == Some(name))
                .count();
            shares[i].push(if served.is_empty() {
                0.0
            } else {
                n as f64 / served.len() as f64
            });
        }
    }
    json!({
        "p50_ms": p50, "p99_ms": p99,
        "share": names.iter().zip(shares).map(|(n, s)| (n.to_string(), json!(s))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Tokens the endpoints admitted in each quota window of the run, as tokens per minute:
/// `[window start s, window end s, tokens/min]`. The windows restart with the run's clock and
/// the samples fall on their edges.
fn tokens_per_window(samples: &[(f64, u64)], seconds: u64) -> Value {
    let at = |edge: f64| {
        samples
            .iter()
            .min_by(|a, b| (a.0 - edge).abs().total_cmp(&(b.0 - edge).abs()))
            .map_or(0, |s| s.1)
    };
    let window = QUOTA_WINDOW.as_secs_f64();
    let windows = (seconds as f64 / window).round() as u64;
    let points: Vec<Value> = (0..windows)
        .map(|k| {
            let (from, to) = (k as f64 * window, (k + 1) as f64 * window);
            json!([from, to, (at(to) - at(from)) as f64 * 60.0 / window])
        })
        .collect();
    json!(points)
}

fn summarize(scenario: Scenario, system: &System, data: &RunData) -> Value {
    let records = &data.records;
    let errors: Vec<&str> = records
        .iter()
        .filter_map(|r| r.error.as_deref())
        .take(3)
        .collect();
    let mut summary = json!({
        "scenario": scenario.name(),
        "system": system.system_name(),
        "run": system.label(),
        "requests": records.len(),
        "ok": count(records, Outcome::Ok),
        "throttled": count(records, Outcome::Throttled),
        "upstream_429_to_caller": count(records, Outcome::Upstream429),
        "timeout": count(records, Outcome::Timeout),
        "error": count(records, Outcome::Error),
        "sample_errors": errors,
        "elapsed_s": data.elapsed,
        "series": series(records, scenario.seconds()),
    });
    let all = latencies(records, 0.0, f64::MAX);
    summary["p50_ms"] = json!(percentile(&all, 0.5));
    summary["p99_ms"] = json!(percentile(&all, 0.99));
    match scenario {
        Scenario::Degradation => {
            let at = DEGRADE_AT as f64;
            let before = latencies(records, 2.0, at);
            let after = latencies(records, at, f64::MAX);
            let served_after: Vec<&Record> = records
                .iter()
                .filter(|r| r.outcome == Outcome::Ok && r.t >= at)
                .collect();
            let slow = served_after
                .iter()
                .filter(|r| r.endpoint.as_deref() == Some(SLOW_ENDPOINT))
                .count();
            // No herding: the least any endpoint served while all were equal.
            let served_before: Vec<&Record> = records
                .iter()
                .filter(|r| r.outcome == Outcome::Ok && r.t >= 2.0 && r.t < at)
                .collect();
            let least_before = ENDPOINTS
                .iter()
                .map(|name| {
                    served_before
                        .iter()
                        .filter(|r| r.endpoint.as_deref() == Some(*name))
                        .count()
                })
                .min()
                .unwrap_or_default();
            summary["least_share_before"] =
                json!(least_before as f64 / served_before.len().max(1) as f64);
            summary["before_p50_ms"] = json!(percentile(&before, 0.5));
            summary["before_p99_ms"] = json!(percentile(&before, 0.99));
            summary["after_p50_ms"] = json!(percentile(&after, 0.5));
            summary["after_p99_ms"] = json!(percentile(&after, 0.99));
            // Once the requests already on their way to the slow endpoint are done.
            let settled = latencies(records, at + SETTLE, f64::MAX);
            summary["settled_p99_ms"] = json!(percentile(&settled, 0.99));
            summary["slow_share_after"] = json!(slow as f64 / served_after.len().max(1) as f64);
        }
        Scenario::Quota => {
            let summed: u64 = TPMS.iter().sum();
            let quota = summed as f64 * scenario.seconds() as f64 / 60.0;
            summary["share_served"] = json!(data.charged as f64 / quota);
            summary["upstream_429s"] = json!(data.upstream_429s);
            summary["tokens_per_window"] = tokens_per_window(&data.samples, scenario.seconds());
            summary["summed_tpm"] = json!(summed);
        }
    }
    summary
}

fn one_line(summary: &Value) -> String {
    let ms = |key: &str| {
        summary[key]
            .as_f64()
            .map_or("-".to_owned(), |v| format!("{v:.0} ms"))
    };
    match summary["scenario"].as_str() {
        Some("degradation") => format!(
            "least share before {:.1} %; p50/p99 before {}/{}, after {}/{}, settled p99 {}; slow endpoint's share after {:.1} %; {} ok, {} failed",
            summary["least_share_before"].as_f64().unwrap_or_default() * 100.0,
            ms("before_p50_ms"),
            ms("before_p99_ms"),
            ms("after_p50_ms"),
            ms("after_p99_ms"),
            ms("settled_p99_ms"),
            summary["slow_share_after"].as_f64().unwrap_or_default() * 100.0,
            summary["ok"],
            summary["requests"].as_u64().unwrap_or_default()
                - summary["ok"].as_u64().unwrap_or_default(),
        ),
        _ => format!(
            "{:.1} % of the summed quota served; upstream 429s {} ({} reached callers); {} throttled, {} timed out, {} other; p50/p99 {}/{}",
            summary["share_served"].as_f64().unwrap_or_default() * 100.0,
            summary["upstream_429s"],
            summary["upstream_429_to_caller"],
            summary["throttled"],
            summary["timeout"],
            summary["error"],
            ms("p50_ms"),
            ms("p99_ms"),
        ),
    }
}

struct Args {
    python: Option<PathBuf>,
    out: PathBuf,
    only: Option<String>,
}

fn args() -> Args {
    let mut args = Args {
        python: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--litellm" => args.python = it.next().map(PathBuf::from),
            "--out" => args.out = it.next().map(PathBuf::from).expect("--out DIR"),
            "--only" => args.only = it.next(),
            // `cargo bench` passes `--bench`; criterion-style filters are not used here.
            _ => {}
        }
    }
    args
}

fn main() {
    let args = args();
    std::fs::create_dir_all(&args.out).unwrap();
    let mut plan: Vec<(Scenario, System)> = Vec::new();
    for kind in StrategyKind::ALL {
        plan.push((
            Scenario::Degradation,
            System::Ours {
                strategy: kind,
                replicas: 1,
                redis: false,
            },
        ));
    }
    plan.push((
        Scenario::Quota,
        System::Ours {
            strategy: StrategyKind::LeastLatency,
            replicas: 1,
            redis: false,
        },
    ));
    plan.push((
        Scenario::Quota,
        System::Ours {
            strategy: StrategyKind::LeastLatency,
            replicas: 3,
            redis: true,
        },
    ));
    if args.python.is_some() {
        for scenario in [Scenario::Degradation, Scenario::Quota] {
            for strategy in [
                "simple-shuffle",
                "least-busy",
                "latency-based-routing",
                "usage-based-routing-v2",
            ] {
                plan.push((scenario, System::LiteLlm { strategy }));
            }
        }
    }
    if let Some(only) = &args.only {
        plan.retain(|(scenario, _)| scenario.name() == only);
    }
    let total: u64 = plan.iter().map(|(s, _)| s.seconds()).sum();
    println!(
        "scenarios: {} runs, about {} s of offered load{}",
        plan.len(),
        total,
        if args.python.is_some() {
            " (LiteLLM runs add a few seconds each to import it)"
        } else {
            ""
        }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let summaries = runtime.block_on(async {
        let needs_redis = plan
            .iter()
            .any(|(_, s)| matches!(s, System::Ours { redis: true, .. }));
        let redis = if needs_redis {
            Some(RedisServer::start().await.unwrap())
        } else {
            None
        };
        let mut summaries = Vec::new();
        for (n, (scenario, system)) in plan.iter().enumerate() {
            println!(
                "[{}/{}] {} · {} · {} ({} s at {:.1} requests/s)",
                n + 1,
                plan.len(),
                scenario.name(),
                system.system_name(),
                system.label(),
                scenario.seconds(),
                scenario.rate()
            );
            let data = run(
                *scenario,
                system,
                args.python.as_deref(),
                &args.out,
                redis.as_ref(),
            )
            .await;
            let summary = summarize(*scenario, system, &data);
            println!("      {}", one_line(&summary));
            summaries.push(summary);
        }
        summaries
    });
    let path = args.out.join(match &args.only {
        Some(only) => format!("scenarios-{only}.json"),
        None => "scenarios.json".to_owned(),
    });
    let document = json!({
        "degradation": {"rate": DEGRADE_RATE, "seconds": DEGRADE_SECONDS, "at": DEGRADE_AT,
                        "slowdown": SLOWDOWN, "slow_endpoint": SLOW_ENDPOINT},
        "quota": {"tpms": TPMS, "seconds": QUOTA_SECONDS, "window_s": QUOTA_WINDOW.as_secs(),
                  "offered": OFFERED, "rate": Scenario::Quota.rate()},
        "deadline_s": DEADLINE.as_secs_f64(), "attempts": ATTEMPTS,
        "runs": summaries,
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&document).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
