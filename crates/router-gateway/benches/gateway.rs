//! The gateway under load, against the same load sent straight to the simulated upstream.
//!
//! The gateway (the release `openai-router` binary) is pinned to core 0; this process (the
//! load generator and the simulated upstream) to core 1. Reported: added latency p50/p99 at one
//! connection, requests/s at 50 connections (plain and streamed), and the gateway's peak RSS.
//! With `--litellm PYTHON` (a venv's Python with `litellm[proxy]`), the `LiteLLM` proxy is
//! measured the same way, in the same run, pinned to the same core. Both gateways require a
//! key. Writes `gateway.json` to `--out` (default `target/bench`) for `bench-report`.
//!
//! `cargo bench -p router-gateway --bench gateway [-- --litellm PYTHON]` (part of
//! `cargo xtask bench [--compare litellm]`).

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::too_many_lines,
    reason = "a benchmark report: a failed setup should stop it loudly"
)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}],"max_tokens":8}"#;
const STREAM_BODY: &str = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hello"}],"max_tokens":8}"#;

fn pin_self(core: u32) {
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid])
        .stdout(Stdio::null())
        .status();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

async fn sequential(client: &reqwest::Client, url: &str, n: usize) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let response = client
            .post(url)
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        response.bytes().await.unwrap();
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    latencies
}

async fn throughput(
    client: &reqwest::Client,
    url: &str,
    body: &'static str,
    connections: usize,
    seconds: u64,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, url, done, stop) = (
            client.clone(),
            url.to_owned(),
            Arc::clone(&done),
            Arc::clone(&stop),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                response.bytes().await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A simulated upstream on its own thread pinned to core 0 (the gateway's core): the cost of
/// one cross-core round trip, the floor under any extra hop on this machine.
fn upstream_on_core_0() -> String {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(tid) = std::fs::read_link("/proc/thread-self")
            && let Some(tid) = tid.file_name().and_then(|t| t.to_str())
        {
            let _ = std::process::Command::new("taskset")
                .args(["-p", "-c", "0", tid])
                .stdout(Stdio::null())
                .status();
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let sim = Sim::start(
                2,
                [EndpointConfig::new("far", SimDialect::OpenAi)
                    .with_models(["gpt-4o-mini"])
                    .with_latency(LatencyModel::instant())],
            )
            .await
            .unwrap();
            sender.send(sim.endpoints()[0].openai_base_url()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    format!("{}/chat/completions", receiver.recv().unwrap())
}

/// The key both gateways require (the `LiteLLM` proxy refuses to start without one).
const KEY: &str = "sk-bench-0123456789abcdef0123456789abcdef";

struct Args {
    /// The Python of a venv with `litellm[proxy]`: also run the `LiteLLM` proxy.
    litellm: Option<PathBuf>,
    out: PathBuf,
}

fn args() -> Args {
    let mut args = Args {
        litellm: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--litellm" => args.litellm = it.next().map(PathBuf::from),
            "--out" => args.out = it.next().map(PathBuf::from).expect("--out DIR"),
            _ => {} // `cargo bench` passes `--bench`
        }
    }
    args
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `url` answers (any status), for at most 60 s.
async fn wait_for(
    client: &reqwest::Client,
    url: &str,
    child: &mut tokio::process::Child,
    what: &str,
) {
    for _ in 0..600 {
        if client.get(url).send().await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before answering: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not answer {url} within 60 s");
}

/// One gateway measured: latency at one connection, requests/s at 50 (plain and streamed), RSS.
async fn measure(
    client: &reqwest::Client,
    url: &str,
    sequential_n: usize,
    pid: u32,
    straight: &[Duration],
) -> serde_json::Value {
    sequential(client, url, sequential_n / 10 + 20).await;
    let latencies = sequential(client, url, sequential_n).await;
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!(
        "      p50 {:.0} µs, p99 {:.0} µs at one connection; now 50 connections",
        us(p50),
        us(p99)
    );
    let rps = throughput(client, url, BODY, 50, 5).await;
    let streamed = throughput(client, url, STREAM_BODY, 50, 5).await;
    println!("      {rps:.0} requests/s, {streamed:.0} streamed requests/s");
    serde_json::json!({
        "p50_us": us(p50), "p99_us": us(p99),
        "added_p50_us": us(p50) - us(percentile(straight, 0.5)),
        "added_p99_us": us(p99) - us(percentile(straight, 0.99)),
        "rps": rps, "streamed_rps": streamed, "peak_rss_mib": peak_rss_mib(pid),
        "sequential_requests": sequential_n,
    })
}

fn main() {
    let args = args();
    pin_self(1);
    let far = upstream_on_core_0();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let sim = Sim::start(1, [EndpointConfig::new("sim", SimDialect::OpenAi).with_models(["gpt-4o-mini"]).with_latency(LatencyModel::instant())])
            .await
            .unwrap();
        let upstream = sim.endpoints()[0].openai_base_url();
        let dir = std::env::temp_dir().join(format!("openai-router-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .default_headers(
                [(reqwest::header::AUTHORIZATION, format!("Bearer {KEY}").parse().unwrap())]
                    .into_iter()
                    .collect(),
            )
            .build()
            .unwrap();
        let direct = format!("{upstream}/chat/completions");

        println!("[1/3] straight to the simulated upstream, and one cross-core round trip");
        sequential(&client, &direct, 200).await;
        sequential(&client, &far, 200).await;
        // GATEWAY_BENCH_SEQUENTIAL lengthens the one-connection phase (to profile it).
        let n = std::env::var("GATEWAY_BENCH_SEQUENTIAL").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
        let straight = sequential(&client, &direct, n).await;
        let across = sequential(&client, &far, n).await;
        let rps_direct = throughput(&client, &direct, BODY, 50, 5).await;
        let streams_direct = throughput(&client, &direct, STREAM_BODY, 50, 5).await;

        println!("[2/3] openai-router serve (pinned to core 0)");
        let port = free_port();
        let digest = sha2::Sha256::digest(KEY.as_bytes()).iter().fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        });
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[[endpoints]]\nname = \"sim\"\nkind = \"openai\"\nurl = \"{upstream}\"\nmodels = [\"gpt-4o-mini\"]\n[[keys]]\nname = \"bench\"\nsha256 = \"{digest}\"\n"
        );
        let path = dir.join("router.toml");
        std::fs::File::create(&path).unwrap().write_all(config.as_bytes()).unwrap();
        let mut gateway = tokio::process::Command::new("taskset")
            .args(["-c", "0", env!("CARGO_BIN_EXE_openai-router"), "serve", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_for(&client, &format!("http://127.0.0.1:{port}/healthz"), &mut gateway, "openai-router").await;
        let pid = gateway.id().unwrap();
        let ours = measure(&client, &format!("http://127.0.0.1:{port}/v1/chat/completions"), n, pid, &straight).await;
        gateway.start_kill().unwrap();

        let litellm = match &args.litellm {
            None => serde_json::Value::Null,
            Some(python) => {
                println!("[3/3] the LiteLLM proxy (pinned to core 0; one worker)");
                let port = free_port();
                let config = format!(
                    "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n      api_base: {upstream}\n      api_key: sk-bench-upstream\n"
                );
                let path = dir.join("litellm.yaml");
                std::fs::write(&path, config).unwrap();
                let cli = python.with_file_name("litellm");
                let log = args.out.join("litellm-proxy.log");
                std::fs::create_dir_all(&args.out).unwrap();
                let mut proxy = tokio::process::Command::new("taskset")
                    .args(["-c", "0"])
                    .arg(&cli)
                    .args(["--config"])
                    .arg(&path)
                    .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--num_workers", "1"])
                    .env("LITELLM_MASTER_KEY", KEY)
                    .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
                    .env("LITELLM_LOG", "ERROR")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {}: {e}", cli.display()));
                wait_for(&client, &format!("http://127.0.0.1:{port}/health/liveliness"), &mut proxy, "the LiteLLM proxy").await;
                let pid = proxy.id().unwrap();
                // A tenth of the sequential requests: each takes milliseconds here.
                let theirs = measure(&client, &format!("http://127.0.0.1:{port}/v1/chat/completions"), n / 10, pid, &straight).await;
                proxy.start_kill().unwrap();
                theirs
            }
        };

        let results = serde_json::json!({
            "direct": {
                "p50_us": us(percentile(&straight, 0.5)), "p99_us": us(percentile(&straight, 0.99)),
                "rps": rps_direct, "streamed_rps": streams_direct,
            },
            "cross_core": {"p50_us": us(percentile(&across, 0.5)), "p99_us": us(percentile(&across, 0.99))},
            "openai-router": ours,
            "litellm": litellm,
        });
        std::fs::create_dir_all(&args.out).unwrap();
        let out = args.out.join("gateway.json");
        std::fs::write(&out, serde_json::to_vec_pretty(&results).unwrap()).unwrap();
        println!("{}", serde_json::to_string_pretty(&results).unwrap());
        println!("wrote {}", out.display());
    });
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
