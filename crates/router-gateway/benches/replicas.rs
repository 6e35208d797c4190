//! Gateway processes sharing one Redis, under overload of one limit: a gateway key's, a model
//! group's or a deployment's.
//!
//! `--replicas N` (default 4) `openai-router serve` processes on one `redis-server`, one
//! simulated upstream with no quota of its own (so that only the router's limit binds), and
//! one limit in tokens per minute set so that `--rate R` requests a second (default 1,000, in
//! all) are `--overload X` (default 1.5) times it. The load generator sends requests
//! open-loop, spread evenly over the replicas, for `--seconds S` (default 60), once for each
//! limit that binds (`--bind key|group|deployment|all`, default all) and each way of sharing
//! it: leased slices (the default), one Redis call per request (`redis_slice_ms = 0`), and
//! each replica on its own (no Redis: the limit once per replica). Then, with slices and the
//! key's limit, Redis is stopped for the middle third of a run (`--no-kill` skips it;
//! `--sharing slices|per-request|alone|all` runs some ways of sharing only; `--cluster` puts
//! the replicas on a three-master Redis Cluster instead of one server):
//! no request may fail, each replica keeps to its local share, and sharing resumes.
//!
//! Reported: tokens admitted against the limit (over the run, and in the fullest 10 s),
//! requests served and throttled, Redis round trips and commands run per request (`INFO
//! commandstats`), and the served requests' latency p50/p99 (the store's added latency is
//! the difference from the replicas on their own). Prints tables and writes them to
//! `target/bench/replicas.md`.
//!
//! `cargo bench -p router-gateway --bench replicas [-- --seconds 60 --replicas 4 --rate 1000]`
//! (part of `cargo xtask bench`).

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a benchmark report: a failed setup should stop it loudly"
)]

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::process::{Child, Command};
use upstream_sim::redis_server::RedisServer;
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

const KEY: &str = "sk-bench-replicas-key-0123456789";
/// Every request is the same, so the router charges each the same estimate.
const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}],"max_tokens":500}"#;

struct Options {
    seconds: u64,
    replicas: usize,
    overload: f64,
    rate: f64,
    binds: Vec<Bind>,
    sharings: Vec<Sharing>,
    kill: bool,
    cluster: bool,
}

/// Which limit binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bind {
    Key,
    Group,
    Deployment,
}

impl Bind {
    fn name(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Group => "group",
            Self::Deployment => "deployment",
        }
    }
}

/// How the replicas share the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sharing {
    Slices,
    PerRequest,
    /// Each replica with the whole limit, in its own process's store.
    Alone,
    /// Each replica with its part of the limit (the limit over the replicas), in its own
    /// process's store: the same load admitted as shared, with no Redis on the path (the
    /// latency the others are compared with).
    AloneParts,
}

impl Sharing {
    fn name(self) -> &'static str {
        match self {
            Self::Slices => "one Redis, leased slices",
            Self::PerRequest => "one Redis, a call per request",
            Self::Alone => "each alone, the whole limit",
            Self::AloneParts => "each alone, its part of the limit",
        }
    }
}

fn options() -> Options {
    let mut options = Options {
        seconds: 60,
        replicas: 4,
        overload: 1.5,
        rate: 1_000.0,
        binds: vec![Bind::Key, Bind::Group, Bind::Deployment],
        sharings: vec![
            Sharing::AloneParts,
            Sharing::Slices,
            Sharing::PerRequest,
            Sharing::Alone,
        ],
        kill: true,
        cluster: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after each option");
        match arg.as_str() {
            "--seconds" => options.seconds = value().parse().expect("--seconds N"),
            "--replicas" => options.replicas = value().parse().expect("--replicas N"),
            "--overload" => options.overload = value().parse().expect("--overload X"),
            "--rate" => options.rate = value().parse().expect("--rate R"),
            "--bind" => {
                options.binds = match value().as_str() {
                    "key" => vec![Bind::Key],
                    "group" => vec![Bind::Group],
                    "deployment" => vec![Bind::Deployment],
                    "all" => options.binds.clone(),
                    other => panic!("--bind key|group|deployment|all, not {other}"),
                };
            }
            "--sharing" => {
                options.sharings = match value().as_str() {
                    "slices" => vec![Sharing::Slices],
                    "per-request" => vec![Sharing::PerRequest],
                    "alone" => vec![Sharing::AloneParts, Sharing::Alone],
                    "all" => options.sharings.clone(),
                    other => panic!("--sharing slices|per-request|alone|all, not {other}"),
                };
            }
            "--no-kill" => options.kill = false,
            "--cluster" => options.cluster = true,
            // cargo bench passes `--bench`.
            _ => {}
        }
    }
    options
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn hex_sha256(key: &str) -> String {
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

struct Replica {
    child: Child,
    base: String,
}

/// The limit `tpm` on the scope `bind` names, shared as `sharing` says among `replicas`.
struct Setup<'a> {
    /// The `[router]` lines naming the Redis.
    redis: Option<&'a str>,
    sharing: Sharing,
    bind: Bind,
    tpm: u64,
    replicas: usize,
}

async fn start(sim: &Sim, setup: &Setup<'_>, dir: &Path, n: usize) -> Replica {
    let port = free_port();
    let redis = match (setup.sharing, setup.redis) {
        (Sharing::Alone | Sharing::AloneParts, _) | (_, None) => String::new(),
        (Sharing::Slices, Some(lines)) => lines.to_owned(),
        (Sharing::PerRequest, Some(lines)) => format!("{lines}\nredis_slice_ms = 0"),
    };
    let tpm = if setup.sharing == Sharing::AloneParts {
        setup.tpm / setup.replicas as u64
    } else {
        setup.tpm
    };
    let limit = |bind: Bind| {
        if setup.bind == bind {
            format!("tpm = {tpm}")
        } else {
            String::new()
        }
    };
    let config = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[router]
max_queue_wait_ms = 0
{redis}

[[endpoints]]
name = "oai"
kind = "openai"
url = "{}"
api_key_env = "BENCH_UPSTREAM_KEY"
models = ["gpt-4o-mini"]
{}

[[keys]]
name = "bench"
sha256 = "{}"
{}

[[groups]]
model = "gpt-4o-mini"
{}
"#,
        sim.endpoints()[0].openai_base_url(),
        limit(Bind::Deployment),
        hex_sha256(KEY),
        limit(Bind::Key),
        limit(Bind::Group),
    );
    let path = dir.join(format!("replica-{n}.toml"));
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_openai-router"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("BENCH_UPSTREAM_KEY", "sk-bench-upstream")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..500 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            return Replica { child, base };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("replica {n} did not start");
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One `redis-server`, or a three-master Redis Cluster (`--cluster`).
enum Store {
    Single(RedisServer),
    Cluster(upstream_sim::redis_server::RedisCluster),
}

impl Store {
    async fn start(cluster: bool) -> Self {
        if cluster {
            Self::Cluster(
                upstream_sim::redis_server::RedisCluster::start(3)
                    .await
                    .unwrap(),
            )
        } else {
            Self::Single(RedisServer::start().await.unwrap())
        }
    }

    /// The gateway's `[router]` lines naming it.
    fn lines(&self) -> String {
        match self {
            Self::Single(redis) => format!("redis_url = \"{}\"", redis.url()),
            Self::Cluster(cluster) => format!(
                "redis_cluster = true\nredis_url = \"{}\"",
                cluster.urls().join(",")
            ),
        }
    }

    /// `redis_calls` over every node.
    fn calls(&self) -> (u64, u64) {
        let ports = match self {
            Self::Single(redis) => vec![redis.port],
            Self::Cluster(cluster) => cluster.ports.clone(),
        };
        ports
            .into_iter()
            .map(redis_calls)
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }
}

/// Round trips (script calls and plain commands sent by a client) and commands run in all
/// (each script's own calls included) so far, from `INFO commandstats`; `INFO` itself left out.
fn redis_calls(port: u16) -> (u64, u64) {
    let mut trips = 0;
    let mut all = 0;
    for line in redis_cli(port, &["info", "commandstats"]).lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let name = rest.split(':').next().unwrap_or_default();
        let calls: u64 = rest
            .split("calls=")
            .nth(1)
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if name == "info" {
            continue;
        }
        all += calls;
        if matches!(name, "evalsha" | "eval" | "script|load" | "zrem") {
            trips += calls;
        }
    }
    (trips, all)
}

struct Run {
    served: u64,
    throttled: u64,
    other: u64,
    /// When each served request was sent (since the start).
    served_at: Vec<Duration>,
    /// The served requests' latencies, sorted.
    latencies: Vec<Duration>,
}

async fn load(replicas: &[Replica], rate: f64, seconds: u64) -> Run {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let started = Instant::now();
    let total = (rate * seconds as f64) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let url = format!(
            "{}/v1/chat/completions",
            replicas[i as usize % replicas.len()].base
        );
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let status = client
                .post(url)
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(BODY)
                .send()
                .await
                .map_or(0, |r| r.status().as_u16());
            (status, sent - started, sent.elapsed())
        }));
    }
    let mut run = Run {
        served: 0,
        throttled: 0,
        other: 0,
        served_at: Vec::new(),
        latencies: Vec::new(),
    };
    for task in tasks {
        let (status, at, latency) = task.await.unwrap();
        match status {
            200 => {
                run.served += 1;
                run.served_at.push(at);
                run.latencies.push(latency);
            }
            429 => run.throttled += 1,
            _ => run.other += 1,
        }
    }
    run.latencies.sort();
    run
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// The most requests served among those sent in any 10 s.
fn fullest_window(at: &[Duration]) -> usize {
    let mut sorted = at.to_vec();
    sorted.sort();
    let mut best = 0;
    let mut j = 0;
    for i in 0..sorted.len() {
        while sorted[i].saturating_sub(sorted[j]) >= Duration::from_secs(10) {
            j += 1;
        }
        best = best.max(i + 1 - j);
    }
    best
}

async fn start_fleet(sim: &Sim, setup: &Setup<'_>, dir: &Path, n: usize) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for i in 0..n {
        replicas.push(start(sim, setup, dir, i).await);
    }
    replicas
}

async fn stop_fleet(replicas: Vec<Replica>) {
    for mut replica in replicas {
        let _ = replica.child.kill().await;
    }
}

/// What the router charges each request: a key's window total after one, with one call per
/// request (under slices the window holds slices).
async fn charge_per_request(sim: &Sim, dir: &Path) -> u64 {
    let redis = RedisServer::start().await.unwrap();
    let url = format!("redis_url = \"{}\"", redis.url());
    let setup = Setup {
        redis: Some(&url),
        sharing: Sharing::PerRequest,
        bind: Bind::Key,
        tpm: 60_000_000,
        replicas: 1,
    };
    let replicas = start_fleet(sim, &setup, dir, 1).await;
    let status = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", replicas[0].base))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let held = redis_cli(
        redis.port,
        &["hget", "{openai-router:limit:caller:bench}:a", "T"],
    );
    stop_fleet(replicas).await;
    held.trim().parse::<f64>().expect("the key's window total") as u64
}

/// Calls the replicas' stores answered from their local shares.
async fn fallbacks(replicas: &[Replica]) -> u64 {
    let client = reqwest::Client::new();
    let mut total = 0;
    for replica in replicas {
        let Ok(response) = client.get(format!("{}/metrics", replica.base)).send().await else {
            continue;
        };
        let metrics = response.text().await.unwrap_or_default();
        total += metrics
            .lines()
            .find_map(|l| l.strip_prefix("openai_router_state_fallbacks_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Whether every replica's store says it shares again.
async fn all_shared(replicas: &[Replica]) -> bool {
    let client = reqwest::Client::new();
    for replica in replicas {
        let Ok(response) = client.get(format!("{}/metrics", replica.base)).send().await else {
            return false;
        };
        let metrics = response.text().await.unwrap_or_default();
        if !metrics.contains("openai_router_state_shared 1") {
            return false;
        }
    }
    true
}

#[tokio::main]
async fn main() {
    let options = options();
    let sim = Sim::start(
        7,
        [EndpointConfig::new("oai", SimDialect::OpenAi)
            .with_api_key("sk-bench-upstream")
            .with_models(["gpt-4o-mini"])
            .with_latency(LatencyModel::new(Duration::from_millis(20), Duration::ZERO))],
    )
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("openai-router-bench-replicas-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();

    let estimate = charge_per_request(&sim, &dir).await;
    let per_request = estimate.max(1) as f64;
    let tpm = (options.rate / options.overload * per_request * 60.0) as u64;
    let limit = tpm as f64 * options.seconds as f64 / 60.0;
    let mut rows = String::new();
    for &bind in &options.binds {
        let mut alone_p99 = None;
        for &sharing in &options.sharings {
            // Each replica alone with the whole limit is shown once: any limit is n times
            // over then.
            if sharing == Sharing::Alone && bind != options.binds[0] {
                continue;
            }
            let store = Store::start(options.cluster).await;
            let url = store.lines();
            let setup = Setup {
                redis: Some(&url),
                sharing,
                bind,
                tpm,
                replicas: options.replicas,
            };
            let replicas = start_fleet(&sim, &setup, &dir, options.replicas).await;
            let (trips_before, all_before) = store.calls();
            let run = load(&replicas, options.rate, options.seconds).await;
            let (trips, all) = store.calls();
            let (trips, all) = (trips - trips_before, all - all_before);
            let fell_back = fallbacks(&replicas).await;
            let sent = run.served + run.throttled + run.other;
            let admitted = run.served as f64 * per_request;
            let window = fullest_window(&run.served_at) as f64 * per_request;
            let p99 = percentile(&run.latencies, 0.99);
            if sharing == Sharing::AloneParts {
                alone_p99 = Some(p99);
            }
            let added = alone_p99.map_or(String::new(), |alone| {
                format!("{:+.1}", (p99.as_secs_f64() - alone.as_secs_f64()) * 1000.0)
            });
            let _ = writeln!(
                rows,
                "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {} | {} | {} | {:.3} | {:.2} | {} | {:.1} | {:.1} | {} |",
                bind.name(),
                sharing.name(),
                sent,
                admitted,
                admitted / limit,
                window / (tpm as f64 / 6.0),
                run.served,
                run.throttled,
                run.other,
                trips as f64 / sent.max(1) as f64,
                all as f64 / sent.max(1) as f64,
                fell_back,
                percentile(&run.latencies, 0.5).as_secs_f64() * 1000.0,
                p99.as_secs_f64() * 1000.0,
                added,
            );
            println!("{}", rows.lines().last().unwrap_or_default());
            stop_fleet(replicas).await;
        }
    }
    let mut report = format!(
        "{} gateway processes{}, {:.0} requests a second offered in all ({:.1}x the limit) for {} s; \
         every request charged {estimate} tokens, the limit {tpm} TPM:\n\n\
         | limit | sharing | sent | tokens admitted | of the limit over the run | of the limit in the fullest 10 s | served | throttled | other | Redis round trips a request | commands run in Redis a request | calls answered from a local share | p50 ms | p99 ms | p99 added by the store, ms |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n{rows}",
        options.replicas,
        if options.cluster {
            " on a three-master Redis Cluster"
        } else {
            ""
        },
        options.rate,
        options.overload,
        options.seconds
    );
    if options.kill && !options.cluster {
        report.push_str(&kill_redis(&sim, &dir, &options, tpm, per_request).await);
    }
    println!("{report}");
    let out = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("replicas.md"), &report).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Slices and the key's limit, Redis stopped for the middle third of the run: requests
/// failed (none may), tokens admitted while it was away against the replicas' local shares
/// (a third each by default), and how long after its return every replica shared again.
async fn kill_redis(
    sim: &Sim,
    dir: &Path,
    options: &Options,
    tpm: u64,
    per_request: f64,
) -> String {
    let mut redis = RedisServer::start().await.unwrap();
    let url = format!("redis_url = \"{}\"", redis.url());
    let setup = Setup {
        redis: Some(&url),
        sharing: Sharing::Slices,
        bind: Bind::Key,
        tpm,
        replicas: options.replicas,
    };
    let replicas = Arc::new(start_fleet(sim, &setup, dir, options.replicas).await);
    let third = Duration::from_secs(options.seconds) / 3;
    let loader = {
        let replicas = Arc::clone(&replicas);
        let (rate, seconds) = (options.rate, options.seconds);
        tokio::spawn(async move { load(&replicas, rate, seconds).await })
    };
    tokio::time::sleep(third).await;
    redis.stop().await;
    tokio::time::sleep(third).await;
    redis.restart().await.unwrap();
    let back = Instant::now();
    let mut resumed = None;
    while back.elapsed() < third {
        if all_shared(&replicas).await {
            resumed = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = loader.await.unwrap();
    let away = |at: &Duration| *at >= third && *at < third * 2;
    let served_away = run.served_at.iter().filter(|at| away(at)).count() as f64;
    let admitted_away = served_away * per_request;
    let shares = options.replicas as f64 / 3.0;
    let allowed = tpm as f64 * third.as_secs_f64() / 60.0 * shares;
    if let Ok(replicas) = Arc::try_unwrap(replicas) {
        stop_fleet(replicas).await;
    }
    format!(
        "\nRedis stopped for the middle third ({} s) of a run with leased slices, the key's limit:\n\n\
         | sent | served | throttled | failed (not 200 or 429) | tokens admitted while Redis was away | the local shares allow ({} replicas x 1/3) | every replica sharing again after Redis returned |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {} | {} | {admitted_away:.0} | {allowed:.0} | {} |\n",
        third.as_secs(),
        options.replicas,
        run.served + run.throttled + run.other,
        run.served,
        run.throttled,
        run.other,
        resumed.map_or("not within a third of the run".to_owned(), |d| format!(
            "{} ms",
            d.as_millis()
        )),
    )
}
