//! A fleet of replicas in one process, each a `RedisStore` with its own connection to one real
//! `redis-server`, admitting requests of one deployment's window open-loop: what one Redis
//! serves when every replica leases slices (or calls once per request). Shared by the `fleet`
//! bench (100 replicas at 2,000 requests a second each) and its short form in the tests.
//!
//! Each replica asks `rate` requests a second of `tokens` each, in ticks of 5 ms. An admitted
//! request settles at once, using two thirds of its estimate on average (the rest given
//! back); the window's limit is set so that what the fleet would use is `overload` times it. Usage is binned in
//! 10 ms bins per replica; the fullest window is the most used in any run of bins a window
//! long (a lower bound of the fullest sliding window, which the bound must hold for too).

#![allow(
    clippy::expect_used,
    dead_code,
    reason = "a test and bench helper (a failed setup stops it loudly); the test reads fewer of \
              the report's fields than the bench"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use router_core::{Admission, Charge, Limits, Settlement, StateStore};
use state_redis::{RedisOptions, RedisStore};

const TICK: Duration = Duration::from_millis(5);
const BIN: Duration = Duration::from_millis(10);

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    pub(crate) replicas: usize,
    /// Requests a second each replica asks.
    pub(crate) rate: f64,
    pub(crate) seconds: f64,
    pub(crate) window: Duration,
    pub(crate) tokens: u64,
    pub(crate) overload: f64,
    /// Slices' life (`None`: a call per request).
    pub(crate) slices: Option<Duration>,
    pub(crate) prefix: String,
}

/// What it did.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(crate) asked: u64,
    pub(crate) admitted: u64,
    /// Tokens a window may hold.
    pub(crate) cap: f64,
    /// The most used in any window's worth of bins.
    pub(crate) fullest: f64,
    /// Script calls Redis ran.
    pub(crate) calls: u64,
    /// Commands Redis ran in all (each script's own included).
    pub(crate) commands: u64,
    /// Redis's CPU time over the run (user and system), seconds.
    pub(crate) redis_cpu: f64,
    pub(crate) elapsed: Duration,
    /// Calls answered from a local share.
    pub(crate) fallbacks: u64,
    /// The store's time on a reservation (sampled): p50, p99, max.
    pub(crate) reserve_p50: Duration,
    pub(crate) reserve_p99: Duration,
    pub(crate) reserve_max: Duration,
}

impl Report {
    pub(crate) fn calls_per_request(&self) -> f64 {
        self.calls as f64 / self.asked.max(1) as f64
    }

    pub(crate) fn fullest_share(&self) -> f64 {
        self.fullest / self.cap
    }
}

/// `INFO` fields summed: script calls, all commands, CPU seconds.
pub(crate) async fn redis_stats(url: &str) -> (u64, u64, f64) {
    let client = redis::Client::open(url).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let info: String = redis::cmd("INFO")
        .arg("all")
        .query_async(&mut connection)
        .await
        .expect("INFO");
    let (mut calls, mut commands, mut cpu) = (0, 0, 0.0);
    for line in info.lines() {
        if let Some(rest) = line.strip_prefix("cmdstat_") {
            let name = rest.split(':').next().unwrap_or_default();
            let n: u64 = rest
                .split("calls=")
                .nth(1)
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if name == "info" {
                continue;
            }
            commands += n;
            if matches!(name, "evalsha" | "eval") {
                calls += n;
            }
        } else if let Some(v) = line
            .strip_prefix("used_cpu_user:")
            .or_else(|| line.strip_prefix("used_cpu_sys:"))
        {
            cpu += v.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    (calls, commands, cpu)
}

/// Runs the fleet against the Redis at `url`.
pub(crate) async fn run(url: &str, fleet: &Fleet) -> Report {
    let window_ms = u64::try_from(fleet.window.as_millis()).expect("window");
    // What the fleet uses of what it asks, a window long: two thirds of each estimate.
    let used_per_window = fleet.rate * fleet.replicas as f64 * fleet.tokens as f64 * 2.0 / 3.0
        * fleet.window.as_secs_f64();
    let cap = (used_per_window / fleet.overload).floor();
    let limits = Limits {
        tpm: Some((cap * 60_000.0 / window_ms as f64) as u64),
        rpm: None,
        window: fleet.window,
        ..Limits::default()
    };
    let cap = limits.tpm.map_or(0.0, |tpm| tpm as f64 / 60.0) * fleet.window.as_secs_f64();
    let options = RedisOptions::default()
        .with_prefix(&fleet.prefix)
        .with_timeout(Duration::from_secs(1))
        .with_slices(fleet.slices);
    let mut stores = Vec::new();
    for _ in 0..fleet.replicas {
        stores.push(Arc::new(
            RedisStore::connect(url, options.clone())
                .await
                .expect("store"),
        ));
    }
    let before = redis_stats(url).await;
    let started = Instant::now();
    let bins = (fleet.seconds / BIN.as_secs_f64()).ceil() as usize + 2;
    let mut tasks = Vec::new();
    for (r, store) in stores.iter().enumerate() {
        let (store, fleet) = (Arc::clone(store), fleet.clone());
        tasks.push(tokio::spawn(async move {
            replica(&store, &fleet, &limits, started, bins, r).await
        }));
    }
    let mut used = vec![0.0_f64; bins];
    let (mut asked, mut admitted, mut samples) = (0, 0, Vec::new());
    for task in tasks {
        let one = task.await.expect("replica task");
        asked += one.asked;
        admitted += one.admitted;
        for (all, mine) in used.iter_mut().zip(one.used) {
            *all += mine;
        }
        samples.extend(one.samples);
    }
    let elapsed = started.elapsed();
    let after = redis_stats(url).await;
    let fallbacks = stores.iter().map(|s| s.fallbacks()).sum();
    let per_window = (fleet.window.as_secs_f64() / BIN.as_secs_f64()).round() as usize;
    let mut fullest = 0.0_f64;
    let mut sum = 0.0;
    for i in 0..used.len() {
        sum += used[i];
        if i >= per_window {
            sum -= used[i - per_window];
        }
        fullest = fullest.max(sum);
    }
    samples.sort();
    let at = |p: f64| {
        samples
            .get(((samples.len().saturating_sub(1)) as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    Report {
        asked,
        admitted,
        cap,
        fullest,
        calls: after.0 - before.0,
        commands: after.1 - before.1,
        redis_cpu: after.2 - before.2,
        elapsed,
        fallbacks,
        reserve_p50: at(0.5),
        reserve_p99: at(0.99),
        reserve_max: samples.last().copied().unwrap_or_default(),
    }
}

/// What one replica asked, admitted and used (per bin), and the sampled reservation times.
struct Replica {
    asked: u64,
    admitted: u64,
    used: Vec<f64>,
    samples: Vec<Duration>,
}

/// Replica `r`: asks its rate until the run's end.
async fn replica(
    store: &RedisStore,
    fleet: &Fleet,
    limits: &Limits,
    started: Instant,
    bins: usize,
    r: usize,
) -> Replica {
    let mut out = Replica {
        asked: 0,
        admitted: 0,
        used: vec![0.0_f64; bins],
        samples: Vec::new(),
    };
    let mut owed = 0.0_f64;
    let per_tick = fleet.rate * TICK.as_secs_f64();
    let charge = Charge {
        tokens: fleet.tokens,
        requests: 1,
    };
    // Replicas start spread over a tick, as independent processes would.
    tokio::time::sleep(TICK.mul_f64(r as f64 / fleet.replicas as f64)).await;
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while started.elapsed().as_secs_f64() < fleet.seconds {
        ticks.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            out.asked += 1;
            let now = Instant::now();
            let admission = store
                .reserve("ep/m", limits, charge, now)
                .await
                .expect("reserve");
            if out.asked.is_multiple_of(64) {
                out.samples.push(now.elapsed());
            }
            let Admission::Admitted { ticket, .. } = admission else {
                continue;
            };
            out.admitted += 1;
            let back = (fleet.tokens as f64 * ((out.asked + r as u64) % 3) as f64 / 3.0) as i64;
            let bin = ((now - started).as_secs_f64() / BIN.as_secs_f64()) as usize;
            out.used[bin.min(bins - 1)] += fleet.tokens as f64 - back as f64;
            let settlement = Settlement {
                ticket,
                tokens_back: back,
                served: true,
                ..Settlement::default()
            };
            store
                .settle("ep/m", limits, settlement, Instant::now())
                .await
                .expect("settle");
        }
    }
    out
}
