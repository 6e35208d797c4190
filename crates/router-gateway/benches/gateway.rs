//! The gateway under load, against the same load sent straight to the simulated upstream.
//!
//! The gateway (the release `openai-router` binary) is pinned to core 0; this process (the
//! load generator and the simulated upstream) to core 1. Reported: added latency p50/p99 at one
//! connection, requests/s at 50 connections (plain and streamed), and the gateway's peak RSS.
//!
//! `cargo bench -p router-gateway --bench gateway` (part of `cargo xtask bench`).

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark report"
)]

use std::io::Write as _;
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

fn main() {
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
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("openai-router-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[[endpoints]]\nname = \"sim\"\nkind = \"openai\"\nurl = \"{}\"\nmodels = [\"gpt-4o-mini\"]\n",
            sim.endpoints()[0].openai_base_url()
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
        let pid = gateway.id().unwrap();
        let client = reqwest::Client::builder().tcp_nodelay(true).pool_max_idle_per_host(64).build().unwrap();
        let via = format!("http://127.0.0.1:{port}/v1/chat/completions");
        let direct = format!("{}/chat/completions", sim.endpoints()[0].openai_base_url());
        for _ in 0..250 {
            if client.get(format!("http://127.0.0.1:{port}/healthz")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Warm up both paths.
        sequential(&client, &direct, 200).await;
        sequential(&client, &via, 200).await;

        // GATEWAY_BENCH_SEQUENTIAL lengthens the one-connection phase (to profile it).
        let n = std::env::var("GATEWAY_BENCH_SEQUENTIAL").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
        sequential(&client, &far, 200).await;
        let straight = sequential(&client, &direct, n).await;
        let across = sequential(&client, &far, n).await;
        let gatewayed = sequential(&client, &via, n).await;
        let (p50, p99) = (percentile(&straight, 0.5), percentile(&straight, 0.99));
        let (g50, g99) = (percentile(&gatewayed, 0.5), percentile(&gatewayed, 0.99));
        let rps_direct = throughput(&client, &direct, BODY, 50, 5).await;
        let rps_gateway = throughput(&client, &via, BODY, 50, 5).await;
        let streams_direct = throughput(&client, &direct, STREAM_BODY, 50, 5).await;
        let streams_gateway = throughput(&client, &via, STREAM_BODY, 50, 5).await;
        let rss = peak_rss_mib(pid);
        println!("gateway benchmark (gateway on core 0; load generator and upstream on core 1)");
        println!("| measure | straight to the upstream | through the gateway | added |");
        println!("|---|---|---|---|");
        println!("| latency p50, 1 connection | {:.0} µs | {:.0} µs | {:.0} µs |", us(p50), us(g50), us(g50) - us(p50));
        println!("| latency p99, 1 connection | {:.0} µs | {:.0} µs | {:.0} µs |", us(p99), us(g99), us(g99) - us(p99));
        println!(
            "| (floor) an upstream on core 0, 1 connection: one cross-core round trip | p50 {:.0} µs, p99 {:.0} µs | | |",
            us(percentile(&across, 0.5)),
            us(percentile(&across, 0.99))
        );
        println!("| requests/s, 50 connections | {rps_direct:.0} | {rps_gateway:.0} | |");
        println!("| streamed requests/s, 50 connections | {streams_direct:.0} | {streams_gateway:.0} | |");
        println!("| gateway peak RSS | | {rss:.1} MiB | |");
        gateway.start_kill().unwrap();
    });
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
