//! Gateway processes sharing one Redis, under overload of one gateway key's token limit.
//!
//! `--replicas N` (default 4) release `openai-router serve` processes on one `redis-server`,
//! one simulated upstream with no quota of its own (so that only the router's limit binds),
//! and one gateway key with a tokens-per-minute limit. The load generator sends requests
//! open-loop at `--overload X` (default 1.5) times the key's limit, spread evenly over the
//! replicas, for `--seconds S` (default 60). Reported: the tokens admitted against the limit
//! (over the run, and in the fullest 10 s), the requests served and throttled, the Redis
//! commands per request (from `INFO commandstats`), and the answers' latency p50/p99; then the
//! same load with each replica on its own (no Redis), where the key gets its limit once per
//! replica. Prints a table and writes it to `target/bench/replicas.md`.
//!
//! `cargo bench -p router-gateway --bench replicas [-- --seconds 60 --replicas 4 --overload 1.5]`
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::process::{Child, Command};
use upstream_sim::redis_server::RedisServer;
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

const KEY: &str = "sk-bench-replicas-key-0123456789";
/// The key's limit.
const TPM: u64 = 600_000;
/// Every request is the same, so the router charges each the same estimate.
const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}],"max_tokens":500}"#;

struct Options {
    seconds: u64,
    replicas: usize,
    overload: f64,
}

fn options() -> Options {
    let mut options = Options {
        seconds: 60,
        replicas: 4,
        overload: 1.5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after each option");
        match arg.as_str() {
            "--seconds" => options.seconds = value().parse().expect("--seconds N"),
            "--replicas" => options.replicas = value().parse().expect("--replicas N"),
            "--overload" => options.overload = value().parse().expect("--overload X"),
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

async fn start(sim: &Sim, redis: Option<&str>, dir: &Path, n: usize) -> Replica {
    let port = free_port();
    let redis = redis.map_or(String::new(), |url| format!("redis_url = \"{url}\""));
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

[[keys]]
name = "bench"
sha256 = "{}"
tpm = {TPM}
"#,
        sim.endpoints()[0].openai_base_url(),
        hex_sha256(KEY),
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
    latencies: Vec<Duration>,
}

async fn load(replicas: &[Replica], rate: f64, seconds: u64) -> Run {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let started = Instant::now();
    let total = (rate * seconds as f64) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let served = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let url = format!(
            "{}/v1/chat/completions",
            replicas[i as usize % replicas.len()].base
        );
        let (client, served) = (client.clone(), Arc::clone(&served));
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
            if status == 200 {
                served.fetch_add(1, Ordering::Relaxed);
            }
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
        run.latencies.push(latency);
        match status {
            200 => {
                run.served += 1;
                run.served_at.push(at);
            }
            429 => run.throttled += 1,
            _ => run.other += 1,
        }
    }
    run.latencies.sort();
    run
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
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

    let mut rows = String::new();
    let mut estimate = 0;
    for shared in [true, false] {
        let redis = RedisServer::start().await.unwrap();
        let url = redis.url();
        let mut replicas = Vec::new();
        for n in 0..options.replicas {
            replicas.push(start(&sim, shared.then_some(url.as_str()), &dir, n).await);
        }
        if shared {
            // What the router charges each request: the window's total after one.
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
            estimate = held.trim().parse::<f64>().expect("the key's window total") as u64;
            redis_cli(redis.port, &["flushall"]);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let per_request = estimate.max(1) as f64;
        let rate = TPM as f64 / 60.0 / per_request * options.overload;
        let (trips_before, all_before) = redis_calls(redis.port);
        let run = load(&replicas, rate, options.seconds).await;
        let (trips, all) = redis_calls(redis.port);
        let (trips, all) = (trips - trips_before, all - all_before);
        let sent = run.served + run.throttled + run.other;
        let limit = TPM as f64 * options.seconds as f64 / 60.0;
        let admitted = run.served as f64 * per_request;
        let window = fullest_window(&run.served_at) as f64 * per_request;
        let _ = writeln!(
            rows,
            "| {} | {} | {:.0} | {:.3} | {:.3} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} |",
            if shared { "one Redis" } else { "each alone" },
            sent,
            admitted,
            admitted / limit,
            window / (TPM as f64 / 6.0),
            run.served,
            run.throttled,
            run.other,
            trips as f64 / sent.max(1) as f64,
            percentile(&run.latencies, 0.5).as_secs_f64() * 1000.0,
            percentile(&run.latencies, 0.99).as_secs_f64() * 1000.0,
            all as f64 / sent.max(1) as f64,
        );
        for mut replica in replicas {
            let _ = replica.child.kill().await;
        }
    }
    let report = format!(
        "{} gateway processes, one key at {TPM} TPM, {:.1}x overload for {} s, {} tokens charged a request:\n\n\
         | replicas | sent | tokens admitted | of the limit over the run | of the limit in the fullest 10 s | served | throttled | other | Redis round trips a request | p50 ms | p99 ms | commands run in Redis a request (scripts' own calls included) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n{rows}",
        options.replicas, options.overload, options.seconds, estimate
    );
    println!("{report}");
    let out = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("replicas.md"), &report).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
