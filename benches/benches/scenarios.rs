//! Routing quality on simulated endpoints, for openai-router and (with `--litellm PYTHON`)
//! for `LiteLLM`'s Router, against the same endpoints, the same offered load and the same clock.
//!
//! - **degradation**: three equal endpoints; midway, one turns five times slower. Latency p50
//!   and p99 and each endpoint's share of the traffic, per second, for every strategy.
//! - **quota**: three endpoints with 30k, 60k and 90k TPM counted over 10 s windows as Azure
//!   counts them, offered 1.3 times their sum. Share of the summed quota served, upstream 429s
//!   and how many reached callers, router throttles, latency, served tokens per minute over time.
//! - **pressure**: the matrix routing under pressure is judged on, each cell with its own
//!   parameters (window lengths, request sizes, endpoint counts differ from cell to cell, so
//!   that no claim rests on one parameter set):
//!   - quota under every upstream quota model (fixed, sliding and provisioned windows) at 1.3
//!     and 2 times the summed quota, Poisson arrivals, a caller that retries a refusal once at
//!     the `Retry-After` it was given;
//!   - degradation at 3, 5 and 20 times slower, open loop and closed loop (callers that send
//!     the next request when the last is answered), with a recovery phase, each beside an
//!     oracle: the same load on the healthy endpoints alone.
//!
//! Real time on loopback. Each run starts a fresh simulated world on the same seed. The `LiteLLM`
//! runs go through `benches/litellm/driver.py`, which offers the same requests (the same
//! arrival times, or the same number of closed-loop callers) and writes one record per
//! request; this process owns the simulator and the clock of every run, and computes every
//! figure from the records the same way for both routers.
//!
//! Writes `scenarios.json` (summaries and per-second series) to `--out` (default
//! `target/bench`), which `cargo run -p benches --bin bench-report` turns into tables and
//! plots. `cargo bench -p benches --bench scenarios [-- --litellm PYTHON] [--only NAME]
//! [--case TEXT] [--quick]`; `--only` keeps the runs whose scenario name starts with NAME,
//! `--case` those whose cell's description contains TEXT (one quota cell, say, for an A/B:
//! written to `scenarios-case.json`, never over a full run's results); `--quick` runs
//! the pressure matrix alone, with short phases (under three minutes without `LiteLLM`).
//! `cargo xtask bench [--quick] [--compare litellm]` runs it with the rest.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::too_many_lines,
    reason = "a benchmark report: a failed setup should stop it loudly"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, QuotaModel, Router, StateStore, StrategyKind};
use serde_json::{Value, json};
use state_redis::{RedisOptions, RedisStore};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use upstream_sim::redis_server::RedisServer;
use upstream_sim::{EndpointConfig, LatencyModel, Limits, Sim, SimDialect, WindowKind};

const MODEL: &str = "gpt-4o-mini";
const API_KEY: &str = "sk-bench";
const SEED: u64 = 7;
/// Every request's deadline, and the attempts one request may make.
const DEADLINE: Duration = Duration::from_secs(3);
/// The pressure matrix's deadline (the gateway deadline).
const PRESSURE_DEADLINE: Duration = Duration::from_secs(30);
const ATTEMPTS: u32 = 3;
/// The router's default max queue wait, which the quota cells' p99 bound adds.
const MAX_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// "Settled": requests sent this long after the slowdown.
const SETTLE: f64 = 3.0;
/// The recovered endpoint must be back within this long.
const RAMP: u64 = 10;
/// Endpoint names; the first is the one that slows.
const NAMES: [&str; 4] = ["ep0", "ep1", "ep2", "ep3"];
const SLOW_ENDPOINT: &str = NAMES[0];

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
    /// A refusal retried once at its `Retry-After`: whether the retry was served.
    retry: Option<bool>,
}

/// Who routes a run.
#[derive(Debug, Clone)]
enum System {
    Ours {
        strategy: StrategyKind,
        replicas: usize,
        redis: bool,
        /// Prompt-cache affinity (the default) or none.
        affinity: bool,
    },
    LiteLlm {
        strategy: &'static str,
    },
}

impl System {
    fn ours(strategy: StrategyKind) -> Self {
        Self::Ours {
            strategy,
            replicas: 1,
            redis: false,
            affinity: true,
        }
    }

    fn ours_without_affinity(strategy: StrategyKind) -> Self {
        Self::Ours {
            strategy,
            replicas: 1,
            redis: false,
            affinity: false,
        }
    }

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
                affinity: true,
                ..
            } => strategy.as_str().to_owned(),
            Self::Ours {
                strategy,
                replicas: 1,
                affinity: false,
                ..
            } => format!("{}, no cache affinity", strategy.as_str()),
            Self::Ours {
                strategy,
                replicas,
                redis,
                ..
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

/// How the load is offered.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Load {
    /// Requests at `rate` a second whatever the answers: evenly spaced, or Poisson arrivals.
    Open { rate: f64, poisson: bool },
    /// `callers` callers, each sending its next request when its last is answered.
    Closed { callers: usize },
}

/// The simulated world of a run.
#[derive(Debug, Clone, PartialEq)]
enum World {
    /// Equal endpoints without quotas; `SLOW_ENDPOINT` turns `slowdown` times slower at `at`
    /// and back at `recover`. An oracle run has the healthy endpoints alone and no slowdown.
    Degrade {
        endpoints: usize,
        latency: LatencyModel,
        slowdown: f64,
        at: u64,
        recover: Option<u64>,
        oracle: bool,
    },
    /// Endpoints with these TPMs (and RPMs, when set) over windows of `window` and `kind`.
    Quota {
        tpms: Vec<u64>,
        rpm_per_ktpm: Option<u64>,
        window: Duration,
        kind: WindowKind,
        latency: LatencyModel,
        offered: f64,
    },
}

/// One run's parameters.
#[derive(Debug, Clone, PartialEq)]
struct Scenario {
    /// `degradation`, `quota`, `pressure-degradation`, `pressure-quota`.
    name: &'static str,
    /// The cell within the scenario (empty for the classic two).
    case: String,
    world: World,
    load: Load,
    seconds: u64,
    prompt_words: u64,
    max_tokens: u32,
    deadline: Duration,
    /// Whether a caller retries a refusal once at its `Retry-After`.
    retry: bool,
    /// Conversations: request `i` belongs to session `i % sessions`, whose
    /// [`SESSION_WORDS`]-word system prompt (its own, cacheable upstream) comes first and
    /// whose `prompt_cache_key` it carries.
    sessions: Option<u64>,
}

impl Scenario {
    fn degradation() -> Self {
        Self {
            name: "degradation",
            case: String::new(),
            world: World::Degrade {
                endpoints: 3,
                latency: LatencyModel::new(Duration::from_millis(100), Duration::from_millis(5))
                    .with_jitter(0.2),
                slowdown: 5.0,
                at: 10,
                recover: None,
                oracle: false,
            },
            load: Load::Open {
                rate: 30.0,
                poisson: false,
            },
            seconds: 20,
            prompt_words: 40,
            max_tokens: 60,
            deadline: DEADLINE,
            retry: false,
            sessions: None,
        }
    }

    fn quota() -> Self {
        let tpms = vec![30_000, 60_000, 90_000];
        let offered = 1.3;
        Self {
            name: "quota",
            case: String::new(),
            load: Load::Open {
                rate: open_rate(&tpms, offered, 120.0),
                poisson: false,
            },
            world: World::Quota {
                tpms,
                rpm_per_ktpm: None,
                window: Duration::from_secs(10),
                kind: WindowKind::Fixed,
                latency: LatencyModel::new(Duration::from_millis(100), Duration::from_millis(5))
                    .with_jitter(0.2),
                offered,
            },
            seconds: 30,
            prompt_words: 40,
            max_tokens: 60,
            deadline: DEADLINE,
            retry: false,
            sessions: None,
        }
    }

    fn endpoints(&self) -> usize {
        match &self.world {
            World::Degrade {
                endpoints, oracle, ..
            } => endpoints - usize::from(*oracle),
            World::Quota { tpms, .. } => tpms.len(),
        }
    }

    /// The endpoints' names in the run (an oracle has no slowed endpoint).
    fn names(&self) -> Vec<&'static str> {
        let skip = usize::from(matches!(self.world, World::Degrade { oracle: true, .. }));
        NAMES[skip..skip + self.endpoints()].to_vec()
    }

    fn world(&self) -> Vec<EndpointConfig> {
        self.names()
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let (latency, limits) = match &self.world {
                    World::Degrade { latency, .. } => (*latency, Limits::unlimited()),
                    World::Quota {
                        tpms,
                        rpm_per_ktpm,
                        window,
                        kind,
                        latency,
                        ..
                    } => (
                        *latency,
                        Limits::per_minute(Some(tpms[i]), rpm_per_ktpm.map(|r| tpms[i] / 1000 * r))
                            .with_window(*window)
                            .with_kind(*kind),
                    ),
                };
                EndpointConfig::new(*name, SimDialect::OpenAi)
                    .with_models([MODEL])
                    .with_api_key(API_KEY)
                    .with_latency(latency)
                    .with_limits(limits)
            })
            .collect()
    }

    /// The TPM (and RPM) each router is told per endpoint. Without quotas, a large TPM gives
    /// the usage-based strategies a denominator.
    fn told(&self, i: usize) -> (u64, Option<u64>) {
        match &self.world {
            // Quota is not what a degradation run is about: room for its load, whatever the
            // prompts' size.
            World::Degrade { .. } => (1_000_000 * (self.charged_words() / 40).max(1), None),
            World::Quota {
                tpms, rpm_per_ktpm, ..
            } => (tpms[i], rpm_per_ktpm.map(|r| tpms[i] / 1000 * r)),
        }
    }

    fn quota_window(&self) -> Option<Duration> {
        match &self.world {
            World::Quota { window, .. } => Some(*window),
            World::Degrade { .. } => None,
        }
    }

    /// How the router is told the upstreams meter their quota: truthfully, provisioned
    /// throughput where the simulator meters it so.
    fn quota_model(&self) -> QuotaModel {
        match &self.world {
            World::Quota {
                kind: WindowKind::Provisioned,
                ..
            } => QuotaModel::Provisioned,
            _ => QuotaModel::Window,
        }
    }

    /// When each open-loop request is sent, in seconds from the start.
    fn arrivals(&self) -> Vec<f64> {
        let Load::Open { rate, poisson } = self.load else {
            return Vec::new();
        };
        let seconds = self.seconds as f64;
        if !poisson {
            let total = (rate * seconds) as u64;
            return (0..total).map(|i| i as f64 / rate).collect();
        }
        let mut rng = router_facade::Rng::with_seed(SEED ^ 0x5eed);
        let mut t = 0.0;
        let mut out = Vec::new();
        loop {
            t += -(1.0 - rng.unit()).ln() / rate;
            if t >= seconds {
                return out;
            }
            out.push(t);
        }
    }

    /// Request `i` of this scenario (see [`Scenario::sessions`]).
    fn request(&self, i: u64) -> ChatCompletionRequest {
        let mut request = request(i, self.prompt_words, self.max_tokens);
        if let Some(sessions) = self.sessions {
            let session = i % sessions;
            let words: Vec<&str> = (0..SESSION_WORDS)
                .map(|k| VOCABULARY[((session * 7 + k) % 8) as usize])
                .collect();
            let system = format!("session {session}: {}", words.join(" "));
            request.messages.insert(0, ChatMessage::system(system));
            request.extra.insert(
                "prompt_cache_key".into(),
                format!("session-{session}").into(),
            );
        }
        request
    }

    /// The words of a request's prompt, its session's system prompt included.
    fn charged_words(&self) -> u64 {
        self.prompt_words + self.sessions.map_or(0, |_| SESSION_WORDS)
    }

    /// The unloaded p99 of one request: the latency model at its jitter's top.
    fn unloaded_ms(&self) -> f64 {
        let latency = match &self.world {
            World::Degrade { latency, .. } | World::Quota { latency, .. } => *latency,
        };
        (latency.ttft_ms as f64 + latency.per_token_ms * f64::from(self.max_tokens))
            * (1.0 + latency.jitter)
    }

    fn describe(&self) -> String {
        let load = match self.load {
            Load::Open { rate, poisson } => format!(
                "{rate:.1} requests/s{}",
                if poisson { ", Poisson" } else { "" }
            ),
            Load::Closed { callers } => format!("{callers} closed-loop callers"),
        };
        format!("{} s at {load}", self.seconds)
    }
}

/// The open-loop rate that offers `offered` times the summed TPM with requests of `per_request`
/// tokens.
fn open_rate(tpms: &[u64], offered: f64, per_request: f64) -> f64 {
    offered * tpms.iter().sum::<u64>() as f64 / 60.0 / per_request
}

/// Tokens a request is charged: about 1.33 tokens a word plus the chat overhead, and its cap.
fn per_request(words: u64, max_tokens: u32) -> f64 {
    words as f64 * 4.0 / 3.0 + 8.0 + f64::from(max_tokens)
}

/// Phase lengths of the pressure matrix: full, or `--quick`.
#[derive(Debug, Clone, Copy)]
struct Phases {
    equal: u64,
    slow: u64,
    recovered: u64,
    quota: u64,
}

const FULL: Phases = Phases {
    equal: 10,
    slow: 15,
    recovered: 15,
    quota: 60,
};

const QUICK: Phases = Phases {
    equal: 3,
    slow: 4,
    recovered: 8,
    quota: 6,
};

/// A quota cell: model, offered, window (s), TPMs, RPM per 1k TPM, prompt words, output cap.
type QuotaCell = (WindowKind, f64, u64, &'static [u64], Option<u64>, u64, u32);

/// The pressure matrix. Every cell differs from its neighbours in more than the one parameter
/// it is named by (window length, request size, endpoint count, latency model), so that the
/// targets are shown to hold across parameter sets, not on one.
fn pressure(phases: Phases) -> Vec<Scenario> {
    let mut cells = Vec::new();
    // Quota: (model, offered, window, TPMs, RPM per 1k TPM, prompt words, output cap).
    let quota: [QuotaCell; 6] = [
        (
            WindowKind::Fixed,
            1.3,
            10,
            &[30_000, 60_000, 90_000],
            None,
            40,
            60,
        ),
        (WindowKind::Fixed, 2.0, 1, &[120_000, 240_000], None, 40, 60),
        // The world: 6k / 12k / 24k TPM, RPM = TPM/1000 x 6, ~150 prompt tokens.
        (
            WindowKind::Sliding,
            1.3,
            10,
            &[6_000, 12_000, 24_000],
            Some(6),
            110,
            150,
        ),
        (
            WindowKind::Sliding,
            2.0,
            1,
            &[15_000, 30_000, 30_000, 60_000],
            None,
            40,
            60,
        ),
        (
            WindowKind::Provisioned,
            1.3,
            1,
            &[30_000, 60_000, 90_000],
            None,
            100,
            150,
        ),
        (
            WindowKind::Provisioned,
            2.0,
            10,
            &[20_000, 40_000, 60_000],
            None,
            40,
            60,
        ),
    ];
    for cell in quota {
        cells.push(quota_cell(cell, phases, None));
    }
    // Degradation: (slowdown, closed loop callers or open rate, endpoints, TTFT, per token,
    // output cap).
    let degrade: [(f64, Load, usize, u64, u64, u32); 6] = [
        (
            3.0,
            Load::Open {
                rate: 30.0,
                poisson: true,
            },
            3,
            100,
            5,
            60,
        ),
        (
            5.0,
            Load::Open {
                rate: 40.0,
                poisson: true,
            },
            4,
            150,
            5,
            60,
        ),
        (
            20.0,
            Load::Open {
                rate: 25.0,
                poisson: true,
            },
            3,
            150,
            4,
            100,
        ),
        (3.0, Load::Closed { callers: 24 }, 3, 150, 5, 60),
        (5.0, Load::Closed { callers: 24 }, 3, 150, 5, 60),
        (20.0, Load::Closed { callers: 32 }, 4, 100, 5, 60),
    ];
    for cell in degrade {
        cells.push(degrade_cell(cell, phases, None));
    }
    cells
}

/// Conversations whose turns share a cacheable system prompt (800-word prefixes,
/// `prompt_cache_key` set; about five turns a session in the run) in a quota cell and a
/// degradation cell: the pressure targets with prompt-cache affinity on, and how many
/// prefixes the upstreams found cached, with affinity and without. Not in `--quick`.
fn sessions(phases: Phases) -> Vec<Scenario> {
    let sessions = 150;
    vec![
        quota_cell(
            (
                WindowKind::Sliding,
                1.3,
                10,
                &[120_000, 240_000, 360_000],
                None,
                40,
                60,
            ),
            phases,
            Some(sessions),
        ),
        degrade_cell(
            (5.0, Load::Closed { callers: 24 }, 3, 150, 5, 60),
            phases,
            Some(sessions * 4),
        ),
    ]
}

/// A quota cell of the pressure matrix, with `sessions` when its requests are conversations.
fn quota_cell(cell: QuotaCell, phases: Phases, sessions: Option<u64>) -> Scenario {
    let (kind, offered, window, tpms, rpm, words, max_tokens) = cell;
    let per = per_request(words + sessions.map_or(0, |_| SESSION_WORDS), max_tokens);
    Scenario {
        name: "pressure-quota",
        case: format!(
            "{} {window} s windows, {offered}x, {} endpoints, {per:.0}-token requests{}",
            kind_name(kind),
            tpms.len(),
            sessions.map_or(String::new(), |n| format!(", {n} sessions"))
        ),
        world: World::Quota {
            tpms: tpms.to_vec(),
            rpm_per_ktpm: rpm,
            window: Duration::from_secs(window),
            kind,
            latency: LatencyModel::new(Duration::from_millis(150), Duration::from_millis(4))
                .with_jitter(0.2),
            offered,
        },
        load: Load::Open {
            rate: open_rate(tpms, offered, per),
            poisson: true,
        },
        seconds: phases.quota,
        prompt_words: words,
        max_tokens,
        deadline: PRESSURE_DEADLINE,
        retry: true,
        sessions,
    }
}

/// A degradation cell: (slowdown, load, endpoints, TTFT ms, per token ms, output cap), with
/// `sessions` when its requests are conversations.
fn degrade_cell(
    (slowdown, load, endpoints, ttft, per_token, max_tokens): (f64, Load, usize, u64, u64, u32),
    phases: Phases,
    sessions: Option<u64>,
) -> Scenario {
    let latency = LatencyModel::new(
        Duration::from_millis(ttft),
        Duration::from_millis(per_token),
    )
    .with_jitter(0.2);
    let at = phases.equal;
    let recover = at + phases.slow;
    let loop_name = match load {
        Load::Open { .. } => "open loop",
        Load::Closed { .. } => "closed loop",
    };
    Scenario {
        name: "pressure-degradation",
        case: format!(
            "{slowdown:.0}x, {loop_name}, {endpoints} endpoints, {ttft} ms + {per_token} ms x {max_tokens}{}",
            sessions.map_or(String::new(), |n| format!(", {n} sessions"))
        ),
        world: World::Degrade {
            endpoints,
            latency,
            slowdown,
            at,
            recover: Some(recover),
            oracle: false,
        },
        load,
        seconds: recover + phases.recovered,
        prompt_words: 40,
        max_tokens,
        deadline: PRESSURE_DEADLINE,
        retry: false,
        sessions,
    }
}

fn kind_name(kind: WindowKind) -> &'static str {
    match kind {
        WindowKind::Sliding => "sliding",
        WindowKind::Provisioned => "provisioned",
        _ => "fixed",
    }
}

/// The oracle of a degradation cell: the same load on its healthy endpoints alone, as long as
/// the cell's slow phase after it settled (measured after the same settling time).
fn oracle(cell: &Scenario) -> Option<Scenario> {
    let World::Degrade {
        endpoints,
        latency,
        at,
        recover: Some(recover),
        ..
    } = cell.world
    else {
        return None;
    };
    let slow = recover - at;
    let loop_name = match cell.load {
        Load::Open { .. } => "open loop",
        Load::Closed { .. } => "closed loop",
    };
    Some(Scenario {
        name: "pressure-oracle",
        case: format!(
            "{loop_name}, {} healthy endpoints, {} ms + {} ms x {}",
            endpoints - 1,
            latency.ttft_ms,
            latency.per_token_ms,
            cell.max_tokens
        ),
        world: World::Degrade {
            endpoints,
            latency,
            slowdown: 1.0,
            at: 0,
            recover: Some(slow),
            oracle: true,
        },
        seconds: slow,
        sessions: None,
        ..cell.clone()
    })
}

/// The words prompts are made of. Must match `prompt()` in benches/litellm/driver.py.
const VOCABULARY: [&str; 8] = [
    "route", "each", "call", "where", "quota", "room", "left", "fast",
];

/// The words of a session's system prompt: about 1,100 tokens as upstream-sim counts them
/// (a prefix of 1,024 tokens or more is cached).
const SESSION_WORDS: u64 = 800;

fn request(i: u64, words: u64, max_tokens: u32) -> ChatCompletionRequest {
    let prompt: Vec<&str> = (0..words)
        .map(|k| VOCABULARY[((i + k) % 8) as usize])
        .collect();
    // The number makes every request its own, as real callers' are (a retry is the same
    // request again).
    let text = format!("{} {i}", prompt.join(" "));
    let mut request = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user(text)]);
    request.max_tokens = Some(max_tokens);
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
    upstream_requests: u64,
    /// Requests whose prompt prefix the upstream had cached.
    cache_hits: u64,
    samples: Vec<(f64, u64)>,
    elapsed: f64,
}

async fn run(
    scenario: &Scenario,
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
            affinity,
        } => {
            let mut routers = Vec::new();
            for _ in 0..*replicas {
                let store: Option<Arc<dyn StateStore>> = match (shared, redis) {
                    (true, Some(redis)) => Some(Arc::new(
                        RedisStore::connect(
                            &redis.url(),
                            RedisOptions::default().with_prefix(format!(
                                "bench-{}-{}",
                                scenario.name,
                                std::process::id()
                            )),
                        )
                        .await
                        .unwrap(),
                    )),
                    _ => None,
                };
                routers.push(our_router(scenario, &sim, *strategy, *affinity, store));
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
    let sum = |f: fn(&upstream_sim::Counters) -> u64| {
        sim.endpoints().iter().map(|e| f(&e.counters())).sum()
    };
    let samples = samples.points.lock().unwrap().clone();
    RunData {
        records,
        charged,
        upstream_429s: sum(|c| c.rate_limited),
        upstream_requests: sum(|c| c.requests),
        cache_hits: sum(|c| c.cache_hits),
        samples,
        elapsed: started.elapsed().as_secs_f64(),
    }
}

fn our_router(
    scenario: &Scenario,
    sim: &Sim,
    strategy: StrategyKind,
    affinity: bool,
    store: Option<Arc<dyn StateStore>>,
) -> Router {
    let mut builder = Router::builder()
        .strategy(strategy)
        .request_timeout(scenario.deadline)
        .max_attempts(ATTEMPTS);
    if !affinity {
        builder = builder.no_cache_affinity();
    }
    for (i, endpoint) in sim.endpoints().iter().enumerate() {
        let (tpm, rpm) = scenario.told(i);
        let mut configured = Endpoint::openai(endpoint.name(), endpoint.openai_base_url())
            .api_key(API_KEY)
            .model(MODEL)
            .tpm(tpm);
        if let Some(rpm) = rpm {
            configured = configured.rpm(rpm);
        }
        if let Some(window) = scenario.quota_window() {
            configured = configured.quota_window(window);
        }
        configured = configured.quota_model(scenario.quota_model());
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

/// In a degradation run, slows the first endpoint down at `at` and back at `recover`.
fn degrade_later(scenario: &Scenario, sim: &Sim, started: Instant) -> tokio::task::JoinHandle<()> {
    let slow = sim.endpoint(SLOW_ENDPOINT).cloned();
    let world = scenario.world.clone();
    tokio::spawn(async move {
        let (
            World::Degrade {
                slowdown,
                at,
                recover,
                oracle: false,
                ..
            },
            Some(slow),
        ) = (world, slow)
        else {
            return;
        };
        let healthy = slow.latency();
        tokio::time::sleep_until((started + Duration::from_secs(at)).into()).await;
        slow.set_latency(healthy.scaled(slowdown));
        if let Some(recover) = recover {
            tokio::time::sleep_until((started + Duration::from_secs(recover)).into()).await;
            slow.set_latency(healthy);
        }
    })
}

/// Sends request `i` and records how it ended; a refusal is retried once at its
/// `Retry-After` when the scenario says so.
async fn one(router: &Router, scenario: &Scenario, i: u64, started: Instant) -> Record {
    let sent = Instant::now();
    let t = sent.duration_since(started).as_secs_f64();
    let request = scenario.request(i);
    let answer = router.chat(&request).await;
    let ms = sent.elapsed().as_secs_f64() * 1000.0;
    match answer {
        Ok(answered) => Record {
            t,
            ms,
            endpoint: Some(answered.endpoint.to_string()),
            outcome: Outcome::Ok,
            error: None,
            retry: None,
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
            let mut retry = None;
            if scenario.retry
                && outcome == Outcome::Throttled
                && let Some(wait) = e.retry_after()
                && t + wait.as_secs_f64() < scenario.seconds as f64
            {
                // A client that does as it was told: back at the `Retry-After`.
                tokio::time::sleep(wait).await;
                retry = Some(router.chat(&request).await.is_ok());
            }
            Record {
                t,
                ms,
                endpoint: None,
                outcome,
                error: Some(e.to_string()),
                retry,
            }
        }
    }
}

/// Offers the scenario's load through our routers (round robin over replicas).
async fn offer(
    routers: &[Router],
    scenario: &Scenario,
    sim: &Sim,
    started: Instant,
) -> (Vec<Record>, u64) {
    let mut tasks = Vec::new();
    match scenario.load {
        Load::Open { .. } => {
            for (i, at) in scenario.arrivals().into_iter().enumerate() {
                tokio::time::sleep_until((started + Duration::from_secs_f64(at)).into()).await;
                let router = routers[i % routers.len()].clone();
                let scenario = scenario.clone();
                tasks.push(tokio::spawn(async move {
                    vec![one(&router, &scenario, i as u64, started).await]
                }));
            }
        }
        Load::Closed { callers } => {
            let end = started + Duration::from_secs(scenario.seconds);
            for caller in 0..callers {
                let router = routers[caller % routers.len()].clone();
                let scenario = scenario.clone();
                tasks.push(tokio::spawn(async move {
                    let mut records = Vec::new();
                    let mut i = caller as u64;
                    while Instant::now() < end {
                        records.push(one(&router, &scenario, i, started).await);
                        i += callers as u64;
                    }
                    records
                }));
            }
            tokio::time::sleep_until(end.into()).await;
        }
    }
    let charged = charged(sim);
    let mut records = Vec::new();
    for task in tasks {
        records.extend(task.await.unwrap());
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
    scenario: &Scenario,
    strategy: &str,
    sim: &Sim,
    python: &Path,
    out: &Path,
    samples: &Arc<Samples>,
) -> (Vec<Record>, Instant, u64) {
    let slug: String = scenario
        .case
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = format!("litellm-{}-{slug}-{strategy}", scenario.name);
    let endpoints: Vec<Value> = sim
        .endpoints()
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (tpm, rpm) = scenario.told(i);
            json!({"name": e.name(), "api_base": e.openai_base_url(), "api_key": API_KEY,
                   "tpm": tpm, "rpm": rpm})
        })
        .collect();
    let callers = match scenario.load {
        Load::Closed { callers } => Some(callers),
        Load::Open { .. } => None,
    };
    let spec = json!({
        "strategy": strategy, "model": MODEL, "endpoints": endpoints,
        "arrivals": scenario.arrivals(), "callers": callers, "seconds": scenario.seconds,
        "prompt_words": scenario.prompt_words, "max_tokens": scenario.max_tokens,
        "timeout_s": scenario.deadline.as_secs_f64(), "num_retries": ATTEMPTS - 1,
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
    let offered_until = started + Duration::from_secs(scenario.seconds);
    tokio::time::sleep_until(offered_until.into()).await;
    let charged = charged(sim);
    let status = tokio::time::timeout(scenario.deadline + Duration::from_secs(120), child.wait())
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
                retry: None,
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

/// Each endpoint's share of the requests served among those sent in `[from, to)`.
fn shares(records: &[Record], names: &[&str], from: f64, to: f64) -> Vec<f64> {
    let served: Vec<&Record> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Ok && r.t >= from && r.t < to)
        .collect();
    names
        .iter()
        .map(|name| {
            let n = served
                .iter()
                .filter(|r| r.endpoint.as_deref() == Some(name))
                .count();
            if served.is_empty() {
                0.0
            } else {
                n as f64 / served.len() as f64
            }
        })
        .collect()
}

/// Per-second series: latency p50/p99 of the requests sent in that second, and the share of
/// them each endpoint served.
fn series(records: &[Record], names: &[&str], seconds: u64) -> Value {
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut by_endpoint: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for s in 0..seconds {
        let (from, to) = (s as f64, s as f64 + 1.0);
        let ms = latencies(records, from, to);
        p50.push(percentile(&ms, 0.5));
        p99.push(percentile(&ms, 0.99));
        for (i, share) in shares(records, names, from, to).into_iter().enumerate() {
            by_endpoint[i].push(share);
        }
    }
    json!({
        "p50_ms": p50, "p99_ms": p99,
        "share": names.iter().zip(by_endpoint).map(|(n, s)| ((*n).to_owned(), json!(s))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Tokens the endpoints admitted in each quota window of the run, as tokens per minute:
/// `[window start s, window end s, tokens/min]`. The windows restart with the run's clock and
/// the samples fall on their edges; windows shorter than 5 s are summed to 5 s for reading.
fn tokens_per_window(samples: &[(f64, u64)], window: Duration, seconds: u64) -> Value {
    let at = |edge: f64| {
        samples
            .iter()
            .min_by(|a, b| (a.0 - edge).abs().total_cmp(&(b.0 - edge).abs()))
            .map_or(0, |s| s.1)
    };
    let window = window.as_secs_f64().max(5.0);
    let windows = (seconds as f64 / window).round() as u64;
    let points: Vec<Value> = (0..windows)
        .map(|k| {
            let (from, to) = (k as f64 * window, (k + 1) as f64 * window);
            json!([from, to, (at(to) - at(from)) as f64 * 60.0 / window])
        })
        .collect();
    json!(points)
}

fn summarize(scenario: &Scenario, system: &System, data: &RunData) -> Value {
    let records = &data.records;
    let names = scenario.names();
    let errors: Vec<&str> = records
        .iter()
        .filter_map(|r| r.error.as_deref())
        .take(3)
        .collect();
    let mut summary = json!({
        "scenario": scenario.name,
        "case": scenario.case,
        "load": scenario.describe(),
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
        "series": series(records, &names, scenario.seconds),
    });
    let all = latencies(records, 0.0, f64::MAX);
    summary["sessions"] = json!(scenario.sessions);
    summary["cache_hit_share"] =
        json!(data.cache_hits as f64 / data.upstream_requests.max(1) as f64);
    summary["p50_ms"] = json!(percentile(&all, 0.5));
    summary["p99_ms"] = json!(percentile(&all, 0.99));
    match &scenario.world {
        World::Degrade {
            at,
            recover,
            oracle,
            endpoints,
            ..
        } => {
            let at = *at as f64;
            let end = recover.map_or(f64::MAX, |r| r as f64);
            summary["at_s"] = json!(at);
            summary["recover_s"] = json!(recover);
            let before = latencies(records, 2.0, at);
            let after = latencies(records, at, end);
            let slow_phase = shares(records, &names, at, end);
            // No herding: the least any endpoint served while all were equal.
            let least_before = shares(records, &names, 2.0, at)
                .into_iter()
                .fold(f64::MAX, f64::min);
            summary["least_share_before"] = json!(least_before);
            summary["fair_share"] = json!(1.0 / *endpoints as f64);
            summary["before_p50_ms"] = json!(percentile(&before, 0.5));
            summary["before_p99_ms"] = json!(percentile(&before, 0.99));
            summary["after_p50_ms"] = json!(percentile(&after, 0.5));
            summary["after_p99_ms"] = json!(percentile(&after, 0.99));
            // Once the requests already on their way to the slow endpoint are done.
            let settled = latencies(records, at + SETTLE, end);
            summary["settled_p99_ms"] = json!(percentile(&settled, 0.99));
            if !oracle {
                summary["slow_share_after"] = json!(slow_phase[0]);
            }
            if let (Some(recover), false) = (recover, oracle) {
                // The recovered endpoint's share, second by second, and the most it had in a
                // second while it ramped back (herding onto it would show there).
                let recover = *recover as f64;
                let fair = 1.0 / *endpoints as f64;
                let mut back_within = None;
                let mut most = 0.0_f64;
                for s in 0..RAMP {
                    let from = recover + s as f64;
                    let share = shares(records, &names, from, from + 1.0);
                    if back_within.is_none() && share[0] >= 0.75 * fair {
                        back_within = Some(s + 1);
                    }
                    most = most.max(share[0]);
                }
                summary["recovered_within_s"] = json!(back_within);
                summary["most_share_during_ramp"] = json!(most);
            }
        }
        World::Quota {
            tpms,
            window,
            offered,
            kind,
            ..
        } => {
            let summed: u64 = tpms.iter().sum();
            let quota = summed as f64 * scenario.seconds as f64 / 60.0;
            // The most the upstreams themselves admit of their quota with requests of this
            // size: a window's budget holds a whole number of them (provisioned throughput
            // has no windows to fill: it drains its rate, and starts with a window's worth).
            let charge = per_request(scenario.charged_words(), scenario.max_tokens);
            let ceiling = if *kind == WindowKind::Provisioned {
                1.0 + window.as_secs_f64() / scenario.seconds as f64
            } else {
                let budget = |tpm: u64| tpm as f64 * window.as_secs_f64() / 60.0;
                let fits: f64 = tpms
                    .iter()
                    .map(|tpm| (budget(*tpm) / charge).floor() * charge)
                    .sum();
                fits / tpms.iter().map(|tpm| budget(*tpm)).sum::<f64>()
            };
            summary["upstream_ceiling"] = json!(ceiling);
            summary["share_served"] = json!(data.charged as f64 / quota);
            summary["upstream_429s"] = json!(data.upstream_429s);
            summary["upstream_requests"] = json!(data.upstream_requests);
            summary["upstream_429_share"] =
                json!(data.upstream_429s as f64 / data.upstream_requests.max(1) as f64);
            summary["tokens_per_window"] =
                tokens_per_window(&data.samples, *window, scenario.seconds);
            summary["summed_tpm"] = json!(summed);
            summary["offered"] = json!(offered);
            summary["p99_bound_ms"] =
                json!(scenario.unloaded_ms() + MAX_QUEUE_WAIT.as_secs_f64() * 1000.0);
            let retries: Vec<bool> = records.iter().filter_map(|r| r.retry).collect();
            summary["retries"] = json!(retries.len());
            summary["retries_served"] = json!(retries.iter().filter(|ok| **ok).count());
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
    let pct = |key: &str| {
        summary[key]
            .as_f64()
            .map_or("-".to_owned(), |v| format!("{:.1} %", v * 100.0))
    };
    if summary["share_served"].is_number() {
        format!(
            "{} of the summed quota served; upstream 429s {}/{} ({} reached callers); {} throttled ({} of {} retries at Retry-After served), {} timed out, {} other; p50/p99 {}/{}",
            pct("share_served"),
            summary["upstream_429s"],
            summary["upstream_requests"],
            summary["upstream_429_to_caller"],
            summary["throttled"],
            summary["retries_served"],
            summary["retries"],
            summary["timeout"],
            summary["error"],
            ms("p50_ms"),
            ms("p99_ms"),
        )
    } else {
        format!(
            "least share before {}; p50/p99 before {}/{}, after {}/{}, settled p99 {}{}; slow endpoint's share after {}; back within {} s, its most share while ramping {}; {} ok, {} failed",
            pct("least_share_before"),
            ms("before_p50_ms"),
            ms("before_p99_ms"),
            ms("after_p50_ms"),
            ms("after_p99_ms"),
            ms("settled_p99_ms"),
            summary["p99_vs_oracle"]
                .as_f64()
                .map_or(String::new(), |r| format!(" ({r:.2}x the oracle)")),
            pct("slow_share_after"),
            summary["recovered_within_s"],
            pct("most_share_during_ramp"),
            summary["ok"],
            summary["requests"].as_u64().unwrap_or_default()
                - summary["ok"].as_u64().unwrap_or_default(),
        )
    }
}

struct Args {
    python: Option<PathBuf>,
    out: PathBuf,
    only: Option<String>,
    case: Option<String>,
    quick: bool,
}

fn args() -> Args {
    let mut args = Args {
        python: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        only: None,
        case: None,
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--litellm" => args.python = it.next().map(PathBuf::from),
            "--out" => args.out = it.next().map(PathBuf::from).expect("--out DIR"),
            "--only" => args.only = it.next(),
            "--case" => args.case = it.next(),
            "--quick" => args.quick = true,
            // `cargo bench` passes `--bench`; criterion-style filters are not used here.
            _ => {}
        }
    }
    args
}

fn plan(args: &Args) -> Vec<(Scenario, System)> {
    let mut plan: Vec<(Scenario, System)> = Vec::new();
    if !args.quick {
        for kind in StrategyKind::ALL {
            plan.push((Scenario::degradation(), System::ours(kind)));
        }
        plan.push((Scenario::quota(), System::ours(StrategyKind::LeastLatency)));
        plan.push((
            Scenario::quota(),
            System::Ours {
                strategy: StrategyKind::LeastLatency,
                replicas: 3,
                redis: true,
                affinity: true,
            },
        ));
        if args.python.is_some() {
            for scenario in [Scenario::degradation(), Scenario::quota()] {
                for strategy in [
                    "simple-shuffle",
                    "least-busy",
                    "latency-based-routing",
                    "usage-based-routing-v2",
                ] {
                    plan.push((scenario.clone(), System::LiteLlm { strategy }));
                }
            }
        }
    }
    let mut cells = pressure(if args.quick { QUICK } else { FULL });
    if !args.quick {
        cells.extend(sessions(FULL));
    }
    let mut oracles: Vec<Scenario> = Vec::new();
    for cell in &cells {
        if let Some(oracle) = oracle(cell)
            && !oracles.contains(&oracle)
        {
            oracles.push(oracle);
        }
    }
    for oracle in oracles {
        plan.push((oracle, System::ours(StrategyKind::LeastLatency)));
    }
    for cell in cells {
        plan.push((cell.clone(), System::ours(StrategyKind::LeastLatency)));
        if cell.sessions.is_some() {
            // Beside the same router without affinity (LiteLLM's driver has no sessions).
            plan.push((
                cell,
                System::ours_without_affinity(StrategyKind::LeastLatency),
            ));
            continue;
        }
        if args.python.is_some() {
            let theirs = if cell.name == "pressure-quota" {
                "usage-based-routing-v2"
            } else {
                "latency-based-routing"
            };
            plan.push((cell, System::LiteLlm { strategy: theirs }));
        }
    }
    if let Some(only) = &args.only {
        plan.retain(|(scenario, _)| scenario.name.starts_with(only.as_str()));
    }
    if let Some(case) = &args.case {
        plan.retain(|(scenario, _)| scenario.case.contains(case.as_str()));
    }
    // A degradation cell kept without its oracle gets it back, first.
    let mut needed: Vec<Scenario> = Vec::new();
    for (scenario, _) in &plan {
        if let Some(oracle) = oracle(scenario)
            && !needed.contains(&oracle)
            && !plan.iter().any(|(s, _)| *s == oracle)
        {
            needed.push(oracle);
        }
    }
    let mut with_oracles: Vec<(Scenario, System)> = needed
        .into_iter()
        .map(|oracle| (oracle, System::ours(StrategyKind::LeastLatency)))
        .collect();
    with_oracles.extend(plan);
    with_oracles
}

fn main() {
    let args = args();
    std::fs::create_dir_all(&args.out).unwrap();
    let plan = plan(&args);
    let total: u64 = plan.iter().map(|(s, _)| s.seconds).sum();
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
        // Oracle p99s by the cell they stand beside (the same world and load, healthy).
        let mut oracle_p99: BTreeMap<String, f64> = BTreeMap::new();
        let mut summaries = Vec::new();
        for (n, (scenario, system)) in plan.iter().enumerate() {
            println!(
                "[{}/{}] {}{} · {} · {} ({})",
                n + 1,
                plan.len(),
                scenario.name,
                if scenario.case.is_empty() {
                    String::new()
                } else {
                    format!(" · {}", scenario.case)
                },
                system.system_name(),
                system.label(),
                scenario.describe(),
            );
            let data = run(
                scenario,
                system,
                args.python.as_deref(),
                &args.out,
                redis.as_ref(),
            )
            .await;
            let mut summary = summarize(scenario, system, &data);
            if scenario.name == "pressure-oracle" {
                if let Some(p99) = summary["settled_p99_ms"].as_f64() {
                    oracle_p99.insert(scenario.case.clone(), p99);
                }
            } else if let Some(oracle) = oracle(scenario) {
                let key = oracle.case;
                if let (Some(o), Some(p99)) =
                    (oracle_p99.get(&key), summary["settled_p99_ms"].as_f64())
                {
                    summary["oracle_p99_ms"] = json!(o);
                    summary["p99_vs_oracle"] = json!(p99 / o);
                }
            }
            println!("      {}", one_line(&summary));
            summaries.push(summary);
        }
        summaries
    });
    let path = args.out.join(match (&args.only, &args.case, args.quick) {
        (_, Some(_), _) => "scenarios-case.json".to_owned(),
        (Some(only), None, _) => format!("scenarios-{only}.json"),
        (None, None, true) => "scenarios-quick.json".to_owned(),
        (None, None, false) => "scenarios.json".to_owned(),
    });
    let classic = Scenario::degradation();
    let World::Degrade { at, slowdown, .. } = classic.world else {
        unreachable!("the classic degradation scenario degrades")
    };
    let quota = Scenario::quota();
    let document = json!({
        "degradation": {"rate": 30.0, "seconds": classic.seconds, "at": at,
                        "slowdown": slowdown, "slow_endpoint": SLOW_ENDPOINT},
        "quota": {"tpms": [30_000, 60_000, 90_000], "seconds": quota.seconds, "window_s": 10,
                  "offered": 1.3},
        "pressure": {"quick": args.quick, "settle_s": SETTLE, "ramp_s": RAMP,
                     "max_queue_wait_s": MAX_QUEUE_WAIT.as_secs_f64()},
        "deadline_s": DEADLINE.as_secs_f64(), "attempts": ATTEMPTS,
        "runs": summaries,
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&document).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
