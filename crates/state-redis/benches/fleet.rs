//! One Redis serving a fleet of replicas that lease slices: by default 100 replicas (each a
//! `RedisStore` with its own connection, in this process) asking 2,000 requests a second each
//! of one deployment's window, 1.5 times its limit in tokens used, for 30 s; then the same replicas calling
//! Redis once per request, at a twentieth of the rate (at the full rate that would be 400,000
//! script calls a second, past what one Redis serves). Reported: requests asked and admitted,
//! the fullest window against the limit, script calls per request and per second, commands
//! per request, Redis's CPU (a share of one core), the store's time on a reservation (p50,
//! p99, max) and the calls answered from a local share. Prints a table and writes it to
//! `target/bench/fleet.md`.
//!
//! `cargo bench -p state-redis --bench fleet [-- --replicas 100 --rate 2000 --seconds 30
//! --window-ms 10000 --tokens 100 --overload 1.5]` (part of `cargo xtask bench`).

#![expect(
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a benchmark report: a failed setup should stop it loudly"
)]

#[path = "../tests/support/fleet.rs"]
mod fleet;

use std::fmt::Write as _;
use std::time::Duration;

use upstream_sim::redis_server::RedisServer;

fn main() {
    let mut base = fleet::Fleet {
        replicas: 100,
        rate: 2_000.0,
        seconds: 30.0,
        window: Duration::from_secs(10),
        tokens: 100,
        overload: 1.5,
        slices: Some(state_redis::DEFAULT_SLICE_LIFE),
        prefix: "fleet".to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after each option");
        match arg.as_str() {
            "--replicas" => base.replicas = value().parse().expect("--replicas N"),
            "--rate" => base.rate = value().parse().expect("--rate R"),
            "--seconds" => base.seconds = value().parse().expect("--seconds S"),
            "--window-ms" => {
                base.window = Duration::from_millis(value().parse().expect("--window-ms M"));
            }
            "--tokens" => base.tokens = value().parse().expect("--tokens T"),
            "--overload" => base.overload = value().parse().expect("--overload X"),
            // cargo bench passes `--bench`.
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut rows = String::new();
        for slices in [true, false] {
            let redis = RedisServer::start().await.expect("redis-server");
            let fleet = fleet::Fleet {
                rate: if slices { base.rate } else { base.rate / 20.0 },
                slices: if slices { base.slices } else { None },
                prefix: format!("fleet-{slices}"),
                ..base.clone()
            };
            let report = fleet::run(&redis.url(), &fleet).await;
            let secs = report.elapsed.as_secs_f64();
            let _ = writeln!(
                rows,
                "| {} | {} x {:.0}/s | {:.0}/s | {} | {} | {:.4} | {:.4} | {:.0} | {:.2} | {:.1} % | {:.3} | {:.3} | {:.1} | {} |",
                if slices { "leased slices" } else { "a call per request" },
                fleet.replicas,
                fleet.rate,
                report.asked as f64 / secs,
                report.asked,
                report.admitted,
                report.fullest_share(),
                report.calls_per_request(),
                report.calls as f64 / secs,
                report.commands as f64 / report.asked.max(1) as f64,
                report.redis_cpu / secs * 100.0,
                report.reserve_p50.as_secs_f64() * 1000.0,
                report.reserve_p99.as_secs_f64() * 1000.0,
                report.reserve_max.as_secs_f64() * 1000.0,
                report.fallbacks,
            );
            println!("{}", rows.lines().last().unwrap_or_default());
        }
        let report = format!(
            "{} replicas on one redis-server, one window of {} s asked {:.1}x its limit in \
             tokens used (requests of {} tokens, two thirds used), {} s:\n\n\
             | replicas call Redis | replicas x requests asked each | asked in all | asked | admitted | fullest window of the limit | script calls a request | script calls a second | commands a request | Redis CPU (of one core) | reservation p50 ms | p99 ms | max ms | calls answered from a local share |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n{rows}",
            base.replicas,
            base.window.as_secs_f64(),
            base.overload,
            base.tokens,
            base.seconds,
        );
        println!("{report}");
        std::fs::create_dir_all("target/bench").expect("target/bench");
        std::fs::write("target/bench/fleet.md", &report).expect("fleet.md");
    });
}
