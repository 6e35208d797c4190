//! The demo: every strategy, the same workload, simulated endpoints, a table each.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Where to write the picture of each strategy's traffic share over time (SVG); by
    /// default `openai-router-demo/traffic-share.svg` in the system's temporary folder.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
    /// Serve the status page (`/status`, `/status.json`) of the strategy running, on this
    /// loopback address (`127.0.0.1:8090`), to watch the run in a browser.
    #[arg(long)]
    status: Option<std::net::SocketAddr>,
}

/// The router running now and its status board, for the demo's status page.
struct Watched {
    router: Router,
    board: Arc<crate::status::Board>,
}

/// Serves `/status` and `/status.json` for whatever router `watched` holds, on `address`
/// (loopback only: the page is served to this machine).
async fn serve_status(
    address: std::net::SocketAddr,
    watched: Arc<arc_swap::ArcSwapOption<Watched>>,
) -> Result<(), Problem> {
    use axum::routing::get;
    if !address.ip().is_loopback() {
        bail!(
            "--status: {address} is not a loopback address; the demo serves its status page to this machine only"
        );
    }
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("--status: cannot listen on {address}"))?;
    let access = crate::status::Access {
        enabled: true,
        admin: None,
    };
    let page = move |headers: axum::http::HeaderMap| async move {
        crate::status::page(access, Some(address), &headers)
    };
    let data = move |headers: axum::http::HeaderMap| {
        let watched = watched.load_full();
        async move {
            match watched.as_deref() {
                Some(w) => {
                    crate::status::data(access, Some(address), &headers, &w.router, &w.board, 0)
                }
                None => axum::response::IntoResponse::into_response((
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "no strategy is running",
                )),
            }
        }
    };
    let app = axum::Router::new()
        .route("/status", get(page))
        .route("/status.json", get(data));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "the demo's status page stopped");
        }
    });
    say(&format!("status page: http://{address}/status"));
    Ok(())
}

/// Answers per endpoint in each second of one strategy's run.
#[derive(Debug, Default)]
struct Timeline {
    /// Endpoint names, in the order of the counts.
    endpoints: Vec<String>,
    /// One row a second: answers each endpoint served in it.
    seconds: Vec<Vec<u64>>,
}

/// Answers per endpoint so far, shared by the workers (for the live line and the picture).
#[derive(Debug)]
struct Live {
    endpoints: Vec<String>,
    served: Vec<AtomicU64>,
    failed: AtomicU64,
}

impl Live {
    fn new(sim: &Sim) -> Self {
        let endpoints: Vec<String> = sim.endpoints().iter().map(SimEndpoint::name).collect();
        Self {
            served: endpoints.iter().map(|_| AtomicU64::default()).collect(),
            endpoints,
            failed: AtomicU64::default(),
        }
    }

    fn served(&self, endpoint: &str) {
        if let Some(i) = self.endpoints.iter().position(|e| e == endpoint) {
            self.served[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counts(&self) -> Vec<u64> {
        self.served
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// The live line: answers so far, each endpoint's share, failures.
    fn line(&self) -> String {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        let mut line = format!("{total} served");
        for (name, n) in self.endpoints.iter().zip(&counts) {
            let share = if total == 0 {
                0.0
            } else {
                100.0 * *n as f64 / total as f64
            };
            let _ = write!(line, ", {name} {share:.0}%");
        }
        let failed = self.failed.load(Ordering::Relaxed);
        let _ = write!(line, ", {failed} failed");
        line
    }
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

    let watched = Arc::new(arc_swap::ArcSwapOption::<Watched>::empty());
    if let Some(address) = args.status {
        serve_status(address, Arc::clone(&watched)).await?;
    }
    let mut total_failures = 0;
    let mut timelines = Vec::new();
    for (run, strategy) in strategies.iter().enumerate() {
        // A fresh world per strategy, so that every strategy meets the same one.
        let sim = Sim::start(args.seed, world())
            .await
            .context("cannot start the simulated endpoints")?;
        let router = router_for(&sim, *strategy, args.seed.wrapping_add(run as u64))?;
        let board = Arc::new(crate::status::Board::sampled_every(Duration::from_secs(1)));
        watched.store(Some(Arc::new(Watched {
            router: router.clone(),
            board: Arc::clone(&board),
        })));
        let (outcome, timeline) = drive(&router, &sim, &args, *strategy, &board).await;
        total_failures += outcome.failures;
        say(&table(*strategy, &outcome, &sim));
        timelines.push((*strategy, timeline));
    }
    let path = args.svg.clone().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("openai-router-demo")
            .join("traffic-share.svg")
    });
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&path, picture(&timelines, args.duration)));
    match written {
        Ok(()) => say(&format!(
            "traffic share over time, per strategy: file://{}",
            std::path::absolute(&path).unwrap_or(path).display()
        )),
        Err(error) => say(&format!(
            "could not write the picture to {}: {error}",
            path.display()
        )),
    }
    if total_failures == 0 {
        say("caller-visible failures: 0. Every upstream error was absorbed by failover.");
        Ok(ExitCode::SUCCESS)
    } else {
        say(&format!("caller-visible failures: {total_failures}"));
        Ok(ExitCode::FAILURE)
    }
}

async fn drive(
    router: &Router,
    sim: &Sim,
    args: &Args,
    strategy: StrategyKind,
    board: &Arc<crate::status::Board>,
) -> (Outcome, Timeline) {
    let duration = Duration::from_secs(args.duration);
    let before: Vec<Counters> = sim.endpoints().iter().map(SimEndpoint::counters).collect();
    let progress = ProgressBar::new(duration.as_millis() as u64);
    progress.set_style(
        ProgressStyle::with_template("{prefix:>15} [{bar:24}] {elapsed:>3} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    progress.set_prefix(strategy.as_str());
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Live::new(sim));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let router = router.clone();
        let stop = Arc::clone(&stop);
        let live = Arc::clone(&live);
        let board = Arc::clone(board);
        let stream_every = args.stream_every.max(1);
        workers.push(tokio::spawn(async move {
            work(router, stop, live, board, worker as u64, stream_every).await
        }));
    }
    let flaky = sim.endpoint("azure-flaky").cloned();
    let mut broke = false;
    let mut timeline = Timeline {
        endpoints: live.endpoints.clone(),
        seconds: Vec::new(),
    };
    let mut last = live.counts();
    let mut next_second = Duration::from_secs(1);
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress.set_position(started.elapsed().as_millis() as u64);
        if started.elapsed() >= next_second {
            next_second += Duration::from_secs(1);
            board.sample(router, 0);
            let now = live.counts();
            timeline
                .seconds
                .push(now.iter().zip(&last).map(|(n, l)| n - l).collect());
            last = now;
        }
        if !broke && started.elapsed() >= duration / 2 {
            broke = true;
            if let Some(flaky) = &flaky {
                flaky.inject(Fault::status(503), Times::Always);
            }
        }
        let phase = if broke { " (azure-flaky fails)" } else { "" };
        progress.set_message(format!("{}{phase}", live.line()));
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
    (outcome, timeline)
}

async fn work(
    router: Router,
    stop: Arc<AtomicBool>,
    live: Arc<Live>,
    board: Arc<crate::status::Board>,
    worker: u64,
    stream_every: u64,
) -> Outcome {
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
            router.chat(&request).await.map(|answer| {
                (
                    answer.endpoint.to_string(),
                    answer.deployment.clone(),
                    answer.attempts,
                )
            })
        };
        match result {
            Ok((endpoint, deployment, attempts)) => {
                live.served(&endpoint);
                board.answered(&endpoint, &deployment, started.elapsed());
                outcome.latencies.push(started.elapsed());
                *outcome.served_by.entry(endpoint).or_default() += 1;
                outcome.retries += u64::from(attempts.saturating_sub(1));
            }
            Err(error) => {
                live.failed.fetch_add(1, Ordering::Relaxed);
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
) -> Result<(String, String, u32), router_facade::Error> {
    let mut stream = router.chat_stream(request).await?;
    let endpoint = stream.endpoint().to_string();
    let deployment = stream.deployment().to_owned();
    let attempts = stream.attempts();
    while let Some(item) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx)).await
    {
        item?;
    }
    Ok((endpoint, deployment, attempts))
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

/// Colours of the endpoints in the picture, in their order.
const COLOURS: [&str; 6] = [
    "#1f8a4c", "#c47a00", "#c0392b", "#2b6cb0", "#7d3c98", "#0f766e",
];

/// One SVG: for each strategy, a band of each second's answers split by endpoint (their
/// shares, stacked), with a mark where `azure-flaky` starts failing (halfway).
fn picture(timelines: &[(StrategyKind, Timeline)], duration: u64) -> String {
    const WIDTH: f64 = 760.0;
    const BAND: f64 = 70.0;
    const LEFT: f64 = 150.0;
    const TOP: f64 = 40.0;
    const GAP: f64 = 22.0;
    let plot = WIDTH - LEFT - 20.0;
    let height = TOP + timelines.len() as f64 * (BAND + GAP) + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="20" y="20" font-size="14" font-weight="bold">Share of answers per endpoint, each second ({duration} s a strategy; dashed: azure-flaky starts failing)</text>"#
    );
    for (row, (strategy, timeline)) in timelines.iter().enumerate() {
        let top = TOP + row as f64 * (BAND + GAP);
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{strategy}</text><rect x="{LEFT}" y="{top}" width="{plot}" height="{BAND}" fill="#f4f5f7"/>"##,
            LEFT - 8.0,
            top + BAND / 2.0 + 4.0
        );
        let step = plot / duration.max(1) as f64;
        for (second, counts) in timeline.seconds.iter().enumerate() {
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let x = LEFT + second as f64 * step;
            let mut y = top + BAND;
            for (i, n) in counts.iter().enumerate() {
                let h = BAND * *n as f64 / total as f64;
                y -= h;
                if h > 0.0 {
                    let _ = writeln!(
                        svg,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}: {n} of {total}</title></rect>"#,
                        (step - 1.0).max(1.0),
                        COLOURS[i % COLOURS.len()],
                        timeline.endpoints[i]
                    );
                }
            }
        }
        let half = LEFT + plot / 2.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{half}" x2="{half}" y1="{}" y2="{}" stroke="#333" stroke-dasharray="3,3"/>"##,
            top - 4.0,
            top + BAND + 4.0
        );
    }
    let legend_y = height - 16.0;
    let mut x = LEFT;
    if let Some((_, timeline)) = timelines.first() {
        for (i, name) in timeline.endpoints.iter().enumerate() {
            let _ = writeln!(
                svg,
                r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{legend_y}">{name}</text>"#,
                legend_y - 9.0,
                COLOURS[i % COLOURS.len()],
                x + 14.0
            );
            x += 24.0 + 7.5 * name.len() as f64;
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_status_page_is_served_to_loopback_only() {
        let watched = Arc::new(arc_swap::ArcSwapOption::<Watched>::empty());
        let error = serve_status("192.0.2.7:8090".parse().unwrap(), Arc::clone(&watched))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("not a loopback address"),
            "{error}"
        );
        // On loopback: the page, and no data until a strategy runs.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        serve_status(address, watched).await.unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let page = client
            .get(format!("http://{address}/status"))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        let data = client
            .get(format!("http://{address}/status.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(data.status(), 503);
    }

    #[test]
    fn the_picture_has_a_band_per_strategy_and_a_bar_per_endpoint_second() {
        let timeline = || Timeline {
            endpoints: vec!["fast".to_owned(), "slow".to_owned()],
            seconds: vec![vec![3, 1], vec![4, 0], vec![0, 0]],
        };
        let svg = picture(
            &[
                (StrategyKind::RoundRobin, timeline()),
                (StrategyKind::LeastLatency, timeline()),
            ],
            3,
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">round-robin</text>") && svg.contains(">least-latency</text>"));
        // Second 1: both endpoints; second 2: one; second 3: nothing. Twice.
        assert_eq!(svg.matches("<title>").count(), 6);
        assert!(svg.contains("<title>fast: 3 of 4</title>"));
        assert_eq!(svg.matches("stroke-dasharray").count(), 2);
    }
}
