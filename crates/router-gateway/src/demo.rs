//! The demo: every strategy, the same workload, simulated endpoints, a table each.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::console::say;
use crate::problem::{Context as _, Problem, bail};
use futures_core::Stream as _;
use indicatif::{ProgressBar, ProgressStyle};
use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, HealthPolicy, Router, StrategyKind};
use upstream_sim::{
    Counters, EndpointConfig, Fault, LatencyModel, Limits, Sim, SimDialect, SimEndpoint, Times,
};

const MODEL: &str = "gpt-4o-mini";

/// Options of `openai-router demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Seconds of load per strategy.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seed of the simulated endpoints and of the router's random choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Strategies to run, comma-separated (default: all built-in).
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<String>,
    /// One in this many requests is streamed.
    #[arg(long, default_value_t = 4)]
    stream_every: u64,
}

/// The simulated world: four endpoints, as the issue describes them.
fn world() -> Vec<EndpointConfig> {
    let ms = Duration::from_millis;
    vec![
        EndpointConfig::new("azure-fast", SimDialect::Azure)
            .with_api_key("demo-key-azure-fast")
            .with_models(["gpt4o-mini-fast"])
            .with_latency(LatencyModel::new(ms(60), ms(3)).with_jitter(0.2)),
        EndpointConfig::new("openai-slow", SimDialect::OpenAi)
            .with_api_key("demo-key-openai-slow")
            .with_models([MODEL])
            .with_latency(LatencyModel::new(ms(300), ms(12)).with_jitter(0.2)),
        EndpointConfig::new("azure-flaky", SimDialect::Azure)
            .with_api_key("demo-key-azure-flaky")
            .with_models(["gpt4o-mini-flaky"])
            .with_latency(LatencyModel::new(ms(80), ms(4)).with_jitter(0.2)),
        // 30,000 TPM over 1 s windows: 500 tokens a second, about a dozen requests.
        EndpointConfig::new("openai-throttled", SimDialect::OpenAi)
            .with_api_key("demo-key-openai-throttled")
            .with_models([MODEL])
            .with_latency(LatencyModel::new(ms(70), ms(3)).with_jitter(0.2))
            .with_limits(
                Limits::per_minute(Some(30_000), None).with_window(Duration::from_secs(1)),
            ),
    ]
}

fn router_for(sim: &Sim, strategy: StrategyKind, seed: u64) -> Result<Router, Problem> {
    let mut builder = Router::builder()
        .strategy(strategy)
        .seed(seed)
        .request_timeout(Duration::from_secs(30))
        .health_policy(HealthPolicy::default().with_ejection(
            3,
            Duration::from_secs(2),
            Duration::from_secs(30),
        ));
    for endpoint in sim.endpoints() {
        let name = endpoint.name();
        let key = format!("demo-key-{name}");
        let configured = match endpoint.dialect() {
            SimDialect::Azure => {
                let deployment = format!("gpt4o-mini-{}", name.trim_start_matches("azure-"));
                Endpoint::azure(&name, endpoint.url())
                    .api_version("2024-10-21")
                    .deployment(MODEL, deployment)
            }
            SimDialect::OpenAi => Endpoint::openai(&name, endpoint.openai_base_url()).model(MODEL),
        };
        builder = builder.endpoint(configured.api_key(key));
    }
    builder.build().context("cannot build the router")
}

/// What one strategy's run produced.
#[derive(Debug, Default)]
struct Outcome {
    served_by: BTreeMap<String, u64>,
    latencies: Vec<Duration>,
    retries: u64,
    failures: u64,
    failure_examples: Vec<String>,
    upstream_errors: BTreeMap<String, u64>,
}

pub(crate) async fn run(args: Args) -> Result<ExitCode, Problem> {
    let strategies: Vec<StrategyKind> = if args.strategies.is_empty() {
        StrategyKind::ALL.to_vec()
    } else {
        args.strategies
            .iter()
            .map(|s| s.parse().context("--strategies"))
            .collect::<Result<_, _>>()?
    };
    if args.concurrency == 0 || args.duration == 0 {
        bail!("--concurrency and --duration must be at least 1");
    }
    say(&format!(
        "openai-router demo: {} strategies x {} s, {} concurrent requests, seed {}",
        strategies.len(),
        args.duration,
        args.concurrency,
        args.seed
    ));
    say("simulated endpoints on 127.0.0.1 (no keys, no network):");
    say("  azure-fast        Azure   60 ms to first token, 3 ms/token");
    say("  openai-slow       OpenAI  300 ms to first token, 12 ms/token");
    say("  azure-flaky       Azure   80 ms, 4 ms/token; answers 503 from halfway through each run");
    say("  openai-throttled  OpenAI  70 ms, 3 ms/token; 30k TPM in 1 s windows: 429 + retry-after");
    say("");

    let mut total_failures = 0;
    for (run, strategy) in strategies.iter().enumerate() {
        // A fresh world per strategy, so that every strategy meets the same one.
        let sim = Sim::start(args.seed, world())
            .await
            .context("cannot start the simulated endpoints")?;
        let router = router_for(&sim, *strategy, args.seed.wrapping_add(run as u64))?;
        let outcome = drive(&router, &sim, &args, *strategy).await;
        total_failures += outcome.failures;
        say(&table(*strategy, &outcome, &sim));
    }
    if total_failures == 0 {
        say("caller-visible failures: 0. Every upstream error was absorbed by failover.");
        Ok(ExitCode::SUCCESS)
    } else {
        say(&format!("caller-visible failures: {total_failures}"));
        Ok(ExitCode::FAILURE)
    }
}

async fn drive(router: &Router, sim: &Sim, args: &Args, strategy: StrategyKind) -> Outcome {
    let duration = Duration::from_secs(args.duration);
    let before: Vec<Counters> = sim.endpoints().iter().map(SimEndpoint::counters).collect();
    let progress = ProgressBar::new(duration.as_millis() as u64);
    progress.set_style(
        ProgressStyle::with_template("{prefix:>15} [{bar:32}] {elapsed:>3} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    progress.set_prefix(strategy.as_str());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let router = router.clone();
        let stop = Arc::clone(&stop);
        let stream_every = args.stream_every.max(1);
        workers.push(tokio::spawn(async move {
            work(router, stop, worker as u64, stream_every).await
        }));
    }
    let flaky = sim.endpoint("azure-flaky").cloned();
    let mut broke = false;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress.set_position(started.elapsed().as_millis() as u64);
        if !broke && started.elapsed() >= duration / 2 {
            broke = true;
            if let Some(flaky) = &flaky {
                flaky.inject(Fault::status(503), Times::Always);
            }
            progress.set_message("azure-flaky now fails");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut outcome = Outcome::default();
    for worker in workers {
        if let Ok(part) = worker.await {
            merge(&mut outcome, part);
        }
    }
    progress.finish_and_clear();
    for (endpoint, before) in sim.endpoints().iter().zip(before) {
        let now = endpoint.counters();
        let errors = (now.rate_limited - before.rate_limited) + (now.faults - before.faults);
        outcome.upstream_errors.insert(endpoint.name(), errors);
    }
    outcome
}

async fn work(router: Router, stop: Arc<AtomicBool>, worker: u64, stream_every: u64) -> Outcome {
    let mut outcome = Outcome::default();
    let mut n = 0_u64;
    // Bounded in count as well as in time.
    while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
        n += 1;
        let words = 8 + (worker * 7 + n * 13) % 40;
        let prompt = "hello ".repeat(words as usize);
        let mut request = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user(prompt)]);
        request.max_tokens = Some(16);
        let started = Instant::now();
        let result = if (worker + n).is_multiple_of(stream_every) {
            stream_once(&router, &request).await
        } else {
            router
                .chat(&request)
                .await
                .map(|answer| (answer.endpoint.to_string(), answer.attempts))
        };
        match result {
            Ok((endpoint, attempts)) => {
                outcome.latencies.push(started.elapsed());
                *outcome.served_by.entry(endpoint).or_default() += 1;
                outcome.retries += u64::from(attempts.saturating_sub(1));
            }
            Err(error) => {
                outcome.failures += 1;
                if outcome.failure_examples.len() < 3 {
                    outcome.failure_examples.push(error.to_string());
                }
            }
        }
    }
    outcome
}

async fn stream_once(
    router: &Router,
    request: &ChatCompletionRequest,
) -> Result<(String, u32), router_facade::Error> {
    let mut stream = router.chat_stream(request).await?;
    let endpoint = stream.endpoint().to_string();
    let attempts = stream.attempts();
    while let Some(item) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx)).await
    {
        item?;
    }
    Ok((endpoint, attempts))
}

fn merge(total: &mut Outcome, part: Outcome) {
    for (endpoint, n) in part.served_by {
        *total.served_by.entry(endpoint).or_default() += n;
    }
    total.latencies.extend(part.latencies);
    total.retries += part.retries;
    total.failures += part.failures;
    total.failure_examples.extend(part.failure_examples);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn table(strategy: StrategyKind, outcome: &Outcome, sim: &Sim) -> String {
    let mut latencies = outcome.latencies.clone();
    latencies.sort_unstable();
    let served: u64 = outcome.served_by.values().sum();
    let absorbed: u64 = outcome.upstream_errors.values().sum();
    let mut out = String::new();
    let _ = writeln!(out, "== {strategy} ==");
    let _ = writeln!(
        out,
        "  {:<18} {:>8} {:>7} {:>16}",
        "endpoint", "requests", "share", "upstream errors"
    );
    for endpoint in sim.endpoints() {
        let name = endpoint.name();
        let n = outcome.served_by.get(&name).copied().unwrap_or(0);
        let share = if served == 0 {
            0.0
        } else {
            100.0 * n as f64 / served as f64
        };
        let errors = outcome.upstream_errors.get(&name).copied().unwrap_or(0);
        let _ = writeln!(out, "  {name:<18} {n:>8} {share:>6.1}% {errors:>16}");
    }
    let _ = writeln!(
        out,
        "  served {served}, p50 {:.0} ms, p99 {:.0} ms, upstream errors absorbed {absorbed}, retries {}, caller-visible failures {}",
        percentile(&latencies, 50.0).as_secs_f64() * 1000.0,
        percentile(&latencies, 99.0).as_secs_f64() * 1000.0,
        outcome.retries,
        outcome.failures
    );
    for example in &outcome.failure_examples {
        let _ = writeln!(out, "  failure: {example}");
    }
    out
}
