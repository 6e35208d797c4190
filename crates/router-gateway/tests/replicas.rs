//! Separate `openai-router serve` processes on one real `redis-server`: a gateway key's limit
//! holds once across the replicas, not once per replica, and while Redis is away each replica
//! keeps to its local share of it and fails no request.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers fail loudly by design"
)]

mod common;
use common::{free_port, hash};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::process::{Child, Command};
use upstream_sim::redis_server::RedisServer;
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

const UPSTREAM_KEY: &str = "sk-replicas-upstream-0123456789";
/// One gateway key per phase, so that no phase sees another's window.
const KEYS: [(&str, &str); 3] = [
    ("team-a", "sk-gw-replicas-team-a-0123"),
    ("team-b", "sk-gw-replicas-team-b-0123"),
    ("team-c", "sk-gw-replicas-team-c-0123"),
];
/// Each key's limit: 60 requests a minute, so 10 in any 10 s window.
const RPM: u64 = 60;
const PER_WINDOW: u64 = RPM / 6;
const REPLICAS: usize = 4;
/// Requests each replica is sent at once, per phase: 3.2 times the limit in all.
const BURST: usize = 8;
/// A key whose window holds enough requests for the replicas to lease slices of it: 600 a
/// minute, 100 in any 10 s.
const SLICED_KEY: (&str, &str) = ("team-d", "sk-gw-replicas-team-d-0123");
const SLICED_RPM: u64 = 600;
/// A key with two requests in flight at most, across the replicas.
const CONCURRENT_KEY: (&str, &str) = ("team-e", "sk-gw-replicas-team-e-0123");

struct Replica {
    child: Child,
    base: String,
    log: PathBuf,
}

/// Starts replica `n`. A port picked free can be taken by another test's process before the
/// gateway binds it: then it is started again on another.
async fn start(sim: &Sim, redis: &str, dir: &Path, n: usize) -> Replica {
    for _ in 0..5 {
        if let Some(replica) = try_start(sim, redis, dir, n).await {
            return replica;
        }
    }
    panic!("replica {n} found no free port in 5 tries");
}

async fn try_start(sim: &Sim, redis: &str, dir: &Path, n: usize) -> Option<Replica> {
    let port = free_port();
    let mut keys = String::new();
    for (name, key) in KEYS {
        let _ = write!(
            keys,
            "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\nrpm = {RPM}\n\n",
            hash(key)
        );
    }
    let _ = write!(
        keys,
        "[[keys]]\nname = \"{}\"\nsha256 = \"{}\"\nrpm = {SLICED_RPM}\n\n",
        SLICED_KEY.0,
        hash(SLICED_KEY.1)
    );
    let _ = write!(
        keys,
        "[[keys]]\nname = \"{}\"\nsha256 = \"{}\"\nconcurrency = 2\n\n",
        CONCURRENT_KEY.0,
        hash(CONCURRENT_KEY.1)
    );
    let config = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[router]
# A refused request is throttled at once: its turn (10 s away, when the window frees) is over
# its max queue wait. The deadline is generous for a loaded machine.
max_queue_wait_ms = 2000
request_timeout_ms = 30000
{redis}

[[endpoints]]
name = "oai"
kind = "openai"
url = "{}"
api_key_env = "TEST_UPSTREAM_KEY"
models = ["gpt-4o-mini"]

{keys}"#,
        sim.endpoints()[0].openai_base_url(),
    );
    let path = dir.join(format!("replica-{n}.toml"));
    std::fs::write(&path, config).unwrap();
    let errors = dir.join(format!("replica-{n}.err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_openai-router"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        .env("RUST_LOG", "info")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errors).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..500 {
        let answered = client.get(format!("{base}/healthz")).send().await.is_ok();
        if answered {
            // Whoever answered, this replica must still be running (not refused the port).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if child.try_wait().unwrap().is_some() {
            let text = std::fs::read_to_string(&errors).unwrap_or_default();
            assert!(
                text.contains("Address already in use"),
                "replica {n} exited: {text}"
            );
            return None;
        }
        if answered {
            return Some(Replica {
                child,
                base,
                log: errors,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("replica {n} did not start");
}

/// A replica's `/metrics` text.
async fn metrics_of(client: &reqwest::Client, replica: &Replica) -> String {
    client
        .get(format!("{}/metrics", replica.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The simulated upstream, a scratch folder and `REPLICAS` gateway processes on it, each
/// configured with `redis` (its `[router]` lines naming the Redis).
struct Fleet {
    sim: Sim,
    dir: PathBuf,
    replicas: Vec<Replica>,
}

async fn fleet(redis: &str, label: &str) -> Fleet {
    fleet_answering(redis, label, LatencyModel::instant()).await
}

/// A fleet whose upstream answers after `latency`.
async fn fleet_answering(redis: &str, label: &str, latency: LatencyModel) -> Fleet {
    let sim = Sim::start(
        1,
        [EndpointConfig::new("oai", SimDialect::OpenAi)
            .with_api_key(UPSTREAM_KEY)
            .with_models(["gpt-4o-mini"])
            .with_latency(latency)],
    )
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "openai-router-replicas-{label}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut replicas = Vec::new();
    for n in 0..REPLICAS {
        replicas.push(start(&sim, redis, &dir, n).await);
    }
    Fleet { sim, dir, replicas }
}

async fn stop(replicas: Vec<Replica>, dir: &Path) {
    for mut replica in replicas {
        replica.child.kill().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends `BURST` requests with `key` to every replica at once; returns how many each served.
/// Every other answer must be the router's 429 naming the key's limit, with `retry-after`.
async fn burst(replicas: &[Replica], key: &str) -> Vec<u64> {
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for replica in replicas {
        for _ in 0..BURST {
            let request = client
                .post(format!("{}/v1/chat/completions", replica.base))
                .bearer_auth(key)
                .json(&json!({"model": "gpt-4o-mini", "max_tokens": 16,
                    "messages": [{"role": "user", "content": "one limit for all replicas"}]}));
            tasks.push(tokio::spawn(async move {
                let answer = request.send().await.unwrap();
                let status = answer.status().as_u16();
                let retry_after = answer.headers().contains_key("retry-after");
                let body: Value = answer.json().await.unwrap();
                (status, retry_after, body)
            }));
        }
    }
    let mut served = vec![0; replicas.len()];
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, retry_after, body) = task.await.unwrap();
        match status {
            200 => served[i / BURST] += 1,
            429 => {
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(message.contains("caller:"), "{body}");
                assert!(retry_after, "a 429 without retry-after: {body}");
            }
            other => {
                let n = i / BURST;
                let log = std::fs::read_to_string(&replicas[n].log).unwrap_or_default();
                panic!("key {key}: replica {n} answered {other}: {body}\nits log:\n{log}");
            }
        }
    }
    served
}

/// One request with `key` through each replica; whatever the answer.
async fn burst_one(replicas: &[Replica], key: &str) {
    let client = reqwest::Client::new();
    for replica in replicas {
        let _ = client
            .post(format!("{}/v1/chat/completions", replica.base))
            .bearer_auth(key)
            .json(&json!({"model": "gpt-4o-mini", "max_tokens": 16,
                "messages": [{"role": "user", "content": "are you shared again"}]}))
            .send()
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_limit_holds_once_across_gateway_processes_on_one_redis() {
    let mut redis = RedisServer::start().await.unwrap();
    let Fleet { sim, dir, replicas } =
        fleet(&format!("redis_url = \"{}\"", redis.url()), "one").await;

    // Shared: the four replicas admit the key's window once between them.
    let served = burst(&replicas, KEYS[0].1).await;
    assert_eq!(
        served.iter().sum::<u64>(),
        PER_WINDOW,
        "four replicas on one Redis: {served:?}"
    );
    assert_eq!(sim.endpoints()[0].counters().requests, PER_WINDOW);

    // Redis away: no request fails, and each replica keeps to its local share (a third,
    // rounded up by the window's arithmetic: at most half the window here).
    redis.stop().await;
    let served = burst(&replicas, KEYS[1].1).await;
    for (n, &count) in served.iter().enumerate() {
        assert!(
            (1..=PER_WINDOW / 2).contains(&count),
            "replica {n} admitted {count} of the key's {PER_WINDOW} alone: {served:?}"
        );
    }

    // Redis back: sharing resumes (each store reconnects in the background, and is asked
    // again half a second after a failure), as every replica's metrics say.
    redis.restart().await.unwrap();
    let back = Instant::now();
    let client = reqwest::Client::new();
    loop {
        // A request through each replica is what asks its store again.
        burst_one(&replicas, KEYS[0].1).await;
        let mut all = true;
        for replica in &replicas {
            all &= metrics_of(&client, replica)
                .await
                .contains("openai_router_state_shared 1");
        }
        if all {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "sharing did not resume within 5 s of Redis returning"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resumed = back.elapsed();
    let served = burst(&replicas, KEYS[2].1).await;
    let logs: Vec<String> = replicas
        .iter()
        .map(|r| std::fs::read_to_string(&r.log).unwrap_or_default())
        .collect();
    assert!(
        served.iter().sum::<u64>() == PER_WINDOW,
        "after Redis returned (shared again in {:.1}s): {served:?}\n{}",
        resumed.as_secs_f64(),
        logs.join("\n")
    );
    stop(replicas, &dir).await;
}

/// The same on a three-master Redis Cluster (`redis_cluster = true`, the nodes listed in
/// `redis_url`): the key's limit is admitted once between the four processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_limit_holds_once_across_gateway_processes_on_a_redis_cluster() {
    let cluster = upstream_sim::redis_server::RedisCluster::start(3)
        .await
        .unwrap();
    let Fleet { sim, dir, replicas } = fleet(
        &format!(
            "redis_cluster = true\nredis_url = \"{}\"",
            cluster.urls().join(",")
        ),
        "cluster",
    )
    .await;
    let served = burst(&replicas, KEYS[0].1).await;
    assert_eq!(
        served.iter().sum::<u64>(),
        PER_WINDOW,
        "four replicas on one cluster: {served:?}"
    );
    assert_eq!(sim.endpoints()[0].counters().requests, PER_WINDOW);
    stop(replicas, &dir).await;
}

/// Script calls the Redis at `port` has run (`INFO commandstats`, through `redis-cli`).
fn script_calls(port: u16) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "commandstats"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Leased slices across processes: four gateways share a key's window of 100 requests by
/// slices, together admitting no more than it and nearly all of it, with far fewer Redis
/// calls than requests (per request: one to reserve and one to settle each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_processes_leasing_slices_admit_a_keys_window_once_with_few_calls() {
    let redis = RedisServer::start().await.unwrap();
    // A Redis call may take 2 s before a replica answers from its local share: this test is
    // about slices, and the CI machine, running other tests beside it, has made calls slower
    // than the default 100 ms (the four local shares then admitted 133).
    let Fleet { sim, dir, replicas } = fleet(
        &format!("redis_url = \"{}\"\nredis_timeout_ms = 2000", redis.url()),
        "sliced",
    )
    .await;
    let before = script_calls(redis.port);
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    // 40 to each replica: 160, 1.6 times the window.
    for replica in &replicas {
        for _ in 0..40 {
            let request = client
                .post(format!("{}/v1/chat/completions", replica.base))
                .bearer_auth(SLICED_KEY.1)
                .json(&json!({"model": "gpt-4o-mini", "max_tokens": 16,
                    "messages": [{"role": "user", "content": "slices of one window"}]}));
            tasks.push(tokio::spawn(async move {
                request.send().await.unwrap().status().as_u16()
            }));
        }
    }
    let (mut served, mut throttled) = (0_u64, 0_u64);
    for task in tasks {
        match task.await.unwrap() {
            200 => served += 1,
            429 => throttled += 1,
            other => panic!("a request failed with {other}"),
        }
    }
    let calls = script_calls(redis.port) - before;
    // Calls a replica answered from its local share (Redis slower than the timeout): each
    // may admit up to its share of the window, so they are named when the bound fails.
    let mut fallbacks = 0_u64;
    for replica in &replicas {
        fallbacks += metrics_of(&client, replica)
            .await
            .lines()
            .find_map(|l| l.strip_prefix("openai_router_state_fallbacks_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    eprintln!(
        "slices: {served} served, {throttled} throttled, {calls} script calls, {fallbacks} local fallbacks"
    );
    let per_window = SLICED_RPM / 6;
    // Never past the window, and nearly all of it: a renewal ahead of need asks only for what
    // the open slices cannot serve, and a slice left unspent goes back before its life ends
    // (before, renewals sized to every request waiting left a fifth of the window unspent in
    // open slices, and the requests told to come back for it were throttled first).
    assert!(
        served <= per_window && served >= per_window * 9 / 10,
        "four gateways leasing slices of a window of {per_window}: {served} served \
         ({fallbacks} calls answered from local shares)"
    );
    assert_eq!(sim.endpoints()[0].counters().requests, served);
    assert!(
        calls * 2 < served + throttled,
        "{calls} script calls for {} requests",
        served + throttled
    );
    stop(replicas, &dir).await;
}

/// A replica killed with requests in flight holds its concurrency slots in Redis only until
/// their leases expire unrenewed (600 ms here): then another replica's requests are admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_concurrency_slots_free_within_their_lease() {
    let redis = RedisServer::start().await.unwrap();
    let lease = Duration::from_millis(600);
    let Fleet {
        sim,
        dir,
        mut replicas,
    } = fleet_answering(
        &format!(
            "redis_url = \"{}\"\nredis_lease_ms = {}",
            redis.url(),
            lease.as_millis()
        ),
        "killed",
        // Requests stay in flight for the whole test.
        LatencyModel::new(Duration::from_secs(60), Duration::ZERO),
    )
    .await;
    let client = reqwest::Client::new();
    let send = |base: &str, timeout: Duration| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(CONCURRENT_KEY.1)
            .timeout(timeout)
            .json(&json!({"model": "gpt-4o-mini", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hold a slot"}]}))
            .send()
    };
    // Replica 0 takes both slots; its requests hang upstream.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::spawn(send(
            &replicas[0].base,
            Duration::from_secs(120),
        )));
    }
    let started = Instant::now();
    while sim.endpoints()[0].counters().requests < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slots were not taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Held across replicas, for longer than a lease's life (renewed meanwhile).
    tokio::time::sleep(lease * 2).await;
    let refused = send(&replicas[1].base, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        refused.status().as_u16(),
        429,
        "both slots are held by replica 0"
    );
    // Killed: nothing renews its leases any more.
    let mut dead = replicas.remove(0);
    dead.child.kill().await.unwrap();
    let killed = Instant::now();
    let freed = loop {
        // An admitted request hangs upstream: the short timeout tells it from a 429.
        match send(&replicas[0].base, Duration::from_millis(400)).await {
            Ok(answer) => assert_eq!(answer.status().as_u16(), 429, "{answer:?}"),
            Err(error) if error.is_timeout() => break killed.elapsed(),
            Err(error) => panic!("{error}"),
        }
        assert!(
            killed.elapsed() < lease * 4,
            "the dead replica's slots were not freed within {:?}",
            lease * 4
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("a dead replica's slots freed {freed:?} after it was killed");
    for task in held {
        task.abort();
    }
    stop(replicas, &dir).await;
}
