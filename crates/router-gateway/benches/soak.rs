//! The chaos soak: the release gateway on loopback, a mixed closed-loop load through it, and a
//! seeded schedule of faults against its upstreams (upstream-sim endpoints), its Redis and its
//! configuration; then invariants checked from both sides' records, printed as a table and
//! written to `target/soak/report.md`. Exits non-zero when one fails.
//!
//! `cargo xtask soak [--minutes M] [--seed S]` (10 minutes by default; `cargo xtask ci` runs
//! four), or `cargo bench -p router-gateway --bench soak -- --minutes M --seed S`. The same seed
//! gives the same fault schedule and the same request mix (what the faults meet differs with
//! timing).
//!
//! The load: `--workers` clients (16), each with a gateway key (three keys: priorities 0 and
//! 2, one with a requests-per-minute limit), sending plain and streamed chat (some asking for
//! usage), embeddings, and streams dropped after their first bytes. Every request carries a
//! tag in `metadata.call_tag`, which the upstreams count, so the upstream calls of each client
//! request are known.
//!
//! The faults (one every two seconds, for a few seconds each, until 85 % of the run): 429 in
//! every way upstreams announce a wait (`retry-after` seconds, an HTTP date or a day,
//! `retry-after-ms`, `x-ms-retry-after-ms`, `x-ratelimit-reset-tokens`, the message, nothing),
//! 5xx bursts, connection resets, stalls before headers and between events, truncated streams,
//! resets mid-stream, malformed JSON, in-band error events, an HTML page as the answer, answers
//! over `max_answer_bytes`, slowdowns, Redis killed and restarted, and SIGHUP reloads that add,
//! change and remove endpoints.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::cast_precision_loss,
    reason = "a soak report: a failed setup stops it loudly, and rates are for people to read"
)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest as _;
use upstream_sim::redis_server::RedisServer;
use upstream_sim::{EndpointConfig, Fault, LatencyModel, Limits, Sim, SimDialect, Times, WaitForm};

/// The gateway's deadline for one request, and its attempts.
const DEADLINE: Duration = Duration::from_secs(6);
const MAX_ATTEMPTS: u32 = 3;
/// Loopback scheduling on a busy 2-core machine: how late past the deadline an answer may be.
const SLACK: Duration = Duration::from_millis(1500);
const MAX_ANSWER_BYTES: usize = 1 << 20;
const KEYS: [&str; 3] = ["sk-soak-a-1", "sk-soak-b-2", "sk-soak-c-3"];
const UPSTREAM_KEY: &str = "sk-soak-upstream";

struct Args {
    minutes: f64,
    seed: u64,
    workers: usize,
    out: PathBuf,
}

fn args() -> Args {
    let mut args = Args {
        minutes: 10.0,
        seed: 1,
        workers: 16,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/soak"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| panic!("{name} takes a value"));
        match arg.as_str() {
            "--minutes" => args.minutes = value("--minutes").parse().expect("--minutes: a number"),
            "--seed" => args.seed = value("--seed").parse().expect("--seed: a whole number"),
            "--workers" => args.workers = value("--workers").parse().expect("--workers: a number"),
            "--out" => args.out = PathBuf::from(value("--out")),
            _ => {} // `cargo bench` passes `--bench`
        }
    }
    args
}

// ---------------------------------------------------------------------------------------
// The world: upstreams, Redis, the gateway.

/// The upstreams: four configured at start, a fifth added by a reload.
const ENDPOINTS: [(&str, SimDialect); 5] = [
    ("oai-1", SimDialect::OpenAi),
    ("oai-2", SimDialect::OpenAi),
    ("az-1", SimDialect::Azure),
    ("az-2", SimDialect::Azure),
    ("oai-3", SimDialect::OpenAi),
];

fn latency(index: usize) -> LatencyModel {
    let ttft = [8, 15, 12, 20, 10][index];
    LatencyModel::new(Duration::from_millis(ttft), Duration::from_millis(2)).with_jitter(0.2)
}

async fn upstreams(seed: u64) -> Sim {
    let configs = ENDPOINTS.iter().enumerate().map(|(i, (name, dialect))| {
        let models: &[&str] = match dialect {
            SimDialect::OpenAi => &["gpt-4o-mini", "text-embedding-3-small"],
            SimDialect::Azure => &["mini", "embed"],
        };
        let mut config = EndpointConfig::new(*name, *dialect)
            .with_api_key(UPSTREAM_KEY)
            .with_models(models.iter().copied())
            .with_latency(latency(i));
        if i == 1 {
            // One endpoint with a quota the load reaches: real 429s beside the injected ones.
            config = config.with_limits(Limits::per_minute(Some(400_000), Some(3_000)));
        }
        config
    });
    Sim::start(seed, configs)
        .await
        .expect("the upstreams start")
}

/// The configuration's shapes, cycled by SIGHUP reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The four endpoints of the start.
    Start,
    /// A fifth endpoint added.
    Added,
    /// `oai-1` weighted 3 with a tokens-per-minute quota; `az-2` at a lower priority.
    Changed,
    /// `az-2` removed.
    Removed,
}

fn hash(key: &str) -> String {
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

fn config_text(sim: &Sim, redis: &str, listen: u16, shape: Shape) -> String {
    let mut text = format!(
        r#"[server]
listen = "127.0.0.1:{listen}"
drain_grace_ms = 5000

[router]
strategy = "least-latency"
probe_mode = "live"
max_attempts = {MAX_ATTEMPTS}
request_timeout_ms = {}
first_byte_timeout_ms = 2000
stream_first_byte_timeout_ms = 2000
between_chunks_timeout_ms = 1500
max_answer_bytes = {MAX_ANSWER_BYTES}
redis_url = "{redis}"

[[keys]]
name = "team-a"
sha256 = "{}"
priority = 0

[[keys]]
name = "team-b"
sha256 = "{}"
priority = 2

[[keys]]
name = "team-c"
sha256 = "{}"
rpm = 3000
"#,
        DEADLINE.as_millis(),
        hash(KEYS[0]),
        hash(KEYS[1]),
        hash(KEYS[2]),
    );
    for (i, endpoint) in sim.endpoints().iter().enumerate() {
        let name = endpoint.name();
        let included = match name.as_str() {
            "oai-3" => shape == Shape::Added,
            "az-2" => shape != Shape::Removed,
            _ => true,
        };
        if !included {
            continue;
        }
        let _ = writeln!(text, "\n[[endpoints]]\nname = \"{name}\"");
        match endpoint.dialect() {
            SimDialect::OpenAi => {
                let _ = writeln!(
                    text,
                    "kind = \"openai\"\nurl = \"{}\"\nmodels = [\"gpt-4o-mini\", \"text-embedding-3-small\"]",
                    endpoint.openai_base_url()
                );
            }
            SimDialect::Azure => {
                let _ = writeln!(
                    text,
                    "kind = \"azure\"\nurl = \"{}\"\napi_version = \"2024-10-21\"\ndeployments = {{ \"gpt-4o-mini\" = \"mini\", \"text-embedding-3-small\" = \"embed\" }}",
                    endpoint.url()
                );
            }
        }
        text.push_str("api_key_env = \"SOAK_UPSTREAM_KEY\"\n");
        if shape == Shape::Changed && i == 0 {
            text.push_str("weight = 3\ntpm = 2000000\n");
        }
        if shape == Shape::Changed && name == "az-2" {
            text.push_str("priority = 1\n");
        }
    }
    text
}

struct Gateway {
    child: tokio::process::Child,
    pid: u32,
    base: String,
    config: PathBuf,
    log: PathBuf,
}

async fn start_gateway(sim: &Sim, redis: &str, out: &Path) -> Gateway {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = out.join("router.toml");
    std::fs::write(&config, config_text(sim, redis, port, Shape::Start)).unwrap();
    let log = out.join("gateway.log");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_openai-router"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("SOAK_UPSTREAM_KEY", UPSTREAM_KEY)
        .env(
            "RUST_LOG",
            std::env::var("SOAK_GATEWAY_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("the release gateway starts");
    let pid = child.id().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            return Gateway {
                child,
                pid,
                base,
                config,
                log,
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway did not start; see {}", log.display());
}

// ---------------------------------------------------------------------------------------
// The fault schedule.

#[derive(Debug, Clone)]
enum Action {
    Inject(usize, Fault, Times),
    Clear(usize),
    Slow(usize),
    Restore(usize),
    RedisStop,
    RedisStart,
    Reload(Shape),
}

/// What a fault is called in the report.
fn kind(action: &Action) -> Option<String> {
    Some(match action {
        Action::Inject(_, fault, _) => match fault {
            Fault::Throttled { form, wait } if *wait >= Duration::from_secs(3600) => {
                format!("429 {form:?} (a day)")
            }
            Fault::Throttled { form, .. } => format!("429 {form:?}"),
            Fault::Status { status, .. } => format!("{status} burst"),
            Fault::Reset => "connection reset".to_owned(),
            Fault::StallBeforeHeaders(_) => "stall before headers".to_owned(),
            Fault::StallMidStream { .. } => "stall between events".to_owned(),
            Fault::TruncateStream { .. } => "truncated stream".to_owned(),
            Fault::ResetMidStream { .. } => "reset mid-stream".to_owned(),
            Fault::ErrorEvent { .. } => "in-band error event".to_owned(),
            Fault::MalformedJson => "malformed JSON".to_owned(),
            Fault::WrongContentType => "HTML answer".to_owned(),
            Fault::Oversized(_) => "oversized answer".to_owned(),
            other => format!("{other:?}"),
        },
        Action::Slow(_) => "slowdown x8".to_owned(),
        Action::RedisStop => "Redis killed".to_owned(),
        Action::Reload(shape) => format!("SIGHUP reload ({shape:?})"),
        Action::Clear(_) | Action::Restore(_) | Action::RedisStart => return None,
    })
}

/// One fault drawn from `rng`, for a configured endpoint.
fn draw_fault(rng: &mut fastrand::Rng, day_long: &mut bool) -> (Fault, Times) {
    let wait = Duration::from_millis(rng.u64(300..3000));
    let often = Times::Fraction(rng.f64() * 0.5 + 0.3);
    let form = [
        WaitForm::Seconds,
        WaitForm::Millis,
        WaitForm::AzureMillis,
        WaitForm::HttpDate,
        WaitForm::ResetTokens,
        WaitForm::InMessage,
        WaitForm::Unannounced,
    ][rng.usize(0..7)];
    let after_events = rng.usize(1..6);
    match rng.u32(0..14) {
        0 | 1 => (Fault::Throttled { wait, form }, often),
        2 if !std::mem::replace(day_long, true) => (
            Fault::Throttled {
                wait: Duration::from_secs(86_400),
                form: WaitForm::Seconds,
            },
            Times::Next(1),
        ),
        3 => (
            Fault::status([500, 502, 503][rng.usize(0..3)]),
            Times::Next(rng.u32(5..40)),
        ),
        4 => (Fault::Reset, often),
        5 => (
            Fault::StallBeforeHeaders(Duration::from_millis(rng.u64(500..3500))),
            Times::Next(rng.u32(1..6)),
        ),
        6 => (
            Fault::StallMidStream {
                after_events,
                duration: Duration::from_millis(rng.u64(200..2500)),
            },
            Times::Next(rng.u32(1..6)),
        ),
        7 => (Fault::TruncateStream { after_events }, often),
        8 => (Fault::ResetMidStream { after_events }, often),
        9 => (Fault::ErrorEvent { after_events }, often),
        10 => (Fault::MalformedJson, often),
        11 => (Fault::WrongContentType, often),
        12 => (
            Fault::Oversized(MAX_ANSWER_BYTES * 2),
            Times::Next(rng.u32(1..4)),
        ),
        _ => (Fault::status(500), Times::Next(1)),
    }
}

/// The whole run's schedule: an action every two seconds until 85 % of `run`, each fault
/// cleared a few seconds later; Redis and reloads now and then.
fn schedule(seed: u64, run: Duration) -> Vec<(Duration, Action)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut plan = Vec::new();
    let end = run.mul_f64(0.85);
    let mut at = Duration::from_secs(3);
    let shapes = [Shape::Added, Shape::Changed, Shape::Removed, Shape::Start];
    let mut reloads = 0;
    // One day-long `retry-after` per run: the deployment it hits stays out for the rest.
    let mut day_long = false;
    while at < end {
        let hold = Duration::from_millis(rng.u64(1000..4000));
        match rng.u32(0..20) {
            0 => {
                plan.push((at, Action::RedisStop));
                plan.push((at + hold, Action::RedisStart));
            }
            1 | 2 => {
                plan.push((at, Action::Reload(shapes[reloads % shapes.len()])));
                reloads += 1;
            }
            3 | 4 => {
                let endpoint = rng.usize(0..4);
                plan.push((at, Action::Slow(endpoint)));
                plan.push((at + hold, Action::Restore(endpoint)));
            }
            _ => {
                let endpoint = rng.usize(0..5);
                let (fault, times) = draw_fault(&mut rng, &mut day_long);
                plan.push((at, Action::Inject(endpoint, fault, times)));
                plan.push((at + hold, Action::Clear(endpoint)));
            }
        }
        at += Duration::from_secs(2);
    }
    // The run ends in the configuration it started with, Redis up, nothing injected.
    plan.push((end, Action::Reload(Shape::Start)));
    plan.sort_by_key(|(at, _)| *at);
    plan
}

async fn act(
    action: &Action,
    sim: &Sim,
    redis: &mut RedisServer,
    gateway: &Gateway,
    redis_url: &str,
) {
    let endpoint = |i: usize| &sim.endpoints()[i];
    match action {
        Action::Inject(i, fault, times) => endpoint(*i).inject(fault.clone(), *times),
        Action::Clear(i) => endpoint(*i).clear_faults(),
        Action::Slow(i) => endpoint(*i).set_latency(latency(*i).scaled(8.0)),
        Action::Restore(i) => endpoint(*i).set_latency(latency(*i)),
        Action::RedisStop => redis.stop().await,
        Action::RedisStart => redis.restart().await.expect("Redis restarts"),
        Action::Reload(shape) => {
            let port: u16 = gateway.base.rsplit(':').next().unwrap().parse().unwrap();
            std::fs::write(&gateway.config, config_text(sim, redis_url, port, *shape)).unwrap();
            let sent = std::process::Command::new("kill")
                .args(["-HUP", &gateway.pid.to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The load and its records.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Chat,
    Stream,
    Embeddings,
    Dropped,
}

/// How one request ended, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    /// An OpenAI-shaped error: its status (or `stream` for an error event mid-stream).
    Error(String),
    /// The client hung up on purpose.
    Dropped,
    /// Anything else: the invariant's failure, described.
    Broken(String),
}

#[derive(Debug)]
struct Record {
    kind: Kind,
    tag: String,
    elapsed: Duration,
    outcome: Outcome,
}

fn body(kind: Kind, tag: &str, rng: &mut fastrand::Rng) -> (&'static str, Value, usize) {
    let max_tokens = rng.usize(2..17);
    let messages = json!([{"role": "user", "content": format!("soak {tag}")}]);
    let metadata = json!({"call_tag": tag});
    match kind {
        Kind::Embeddings => (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": format!("soak {tag}"), "metadata": metadata}),
            0,
        ),
        Kind::Chat => (
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "messages": messages, "max_tokens": max_tokens, "metadata": metadata}),
            max_tokens,
        ),
        Kind::Stream | Kind::Dropped => {
            let mut body = json!({"model": "gpt-4o-mini", "messages": messages, "max_tokens": max_tokens,
                "stream": true, "metadata": metadata});
            if rng.bool() {
                body["stream_options"] = json!({"include_usage": true});
            }
            ("/v1/chat/completions", body, max_tokens)
        }
    }
}

/// Whether a non-2xx body is OpenAI-shaped: `{"error": {"message": …, "type": …}}`; the
/// outcome names the status and the message, its numbers blanked (for the report's
/// breakdown).
fn openai_error(status: u16, text: &str) -> Outcome {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if v["error"]["message"].is_string() && v["error"]["type"].is_string() => {
            Outcome::Error(format!(
                "{status}: {}",
                gist(v["error"]["message"].as_str().unwrap_or_default())
            ))
        }
        _ => Outcome::Broken(format!("{status} not OpenAI-shaped: {}", clip(text))),
    }
}

fn clip(text: &str) -> String {
    text.chars().take(160).collect()
}

/// A message with its numbers as `#` and endpoint names as `*`, cut to 110 characters: the
/// same failure reads the same whatever the request.
fn gist(message: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in message.chars() {
        match c {
            '`' => {
                quoted = !quoted;
                if quoted {
                    out.push_str("`*");
                } else {
                    out.push('`');
                }
            }
            _ if quoted => {}
            c if c.is_ascii_digit() => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            c => out.push(c),
        }
    }
    out.chars().take(110).collect()
}

/// A relayed stream: one completion's chunks, each content token once and in order, usage
/// last and only when asked, `[DONE]` at the end; or, after the first byte, the same up to
/// an OpenAI-shaped error event, which ends it.
fn check_stream(text: &str, tokens: usize, usage_asked: bool) -> Outcome {
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    let (mut ids, mut words, mut usage) = (Vec::new(), 0, 0);
    for (i, event) in events.iter().enumerate() {
        let last = i + 1 == events.len();
        let data = event
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect::<String>();
        if data == "[DONE]" {
            if !last {
                return Outcome::Broken("events after [DONE]".to_owned());
            }
            ids.dedup();
            if ids.len() != 1 {
                return Outcome::Broken(format!("chunks of several completions: {ids:?}"));
            }
            if words != tokens {
                return Outcome::Broken(format!("{words} content tokens, not {tokens}"));
            }
            if usage != usize::from(usage_asked) {
                return Outcome::Broken(format!("{usage} usage chunks"));
            }
            return Outcome::Ok;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
            return Outcome::Broken(format!("an event is not JSON: {}", clip(&data)));
        };
        if chunk.get("error").is_some() {
            // The gateway ends every stream with `[DONE]`, one that failed too.
            let done_next = events
                .get(i + 1)
                .is_some_and(|e| e.trim() == "data: [DONE]");
            return if !(last || (done_next && i + 2 == events.len())) {
                Outcome::Broken("events after an error event".to_owned())
            } else if let Some(message) = chunk["error"]["message"].as_str() {
                Outcome::Error(format!("stream: {}", gist(message)))
            } else {
                Outcome::Broken(format!("an error event not OpenAI-shaped: {}", clip(&data)))
            };
        }
        if let Some(id) = chunk["id"].as_str().filter(|id| !id.is_empty()) {
            ids.push(id.to_owned());
        }
        if chunk["usage"].is_object() && chunk["choices"].as_array().is_some_and(Vec::is_empty) {
            usage += 1;
        } else if usage > 0 {
            return Outcome::Broken("a chunk after the usage chunk".to_owned());
        }
        if let Some(content) = chunk["choices"][0]["delta"]["content"].as_str() {
            words += content.split_whitespace().count();
        }
    }
    Outcome::Broken("the stream ended without [DONE] or an error event".to_owned())
}

async fn one_request(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    kind: Kind,
    tag: String,
    rng: &mut fastrand::Rng,
) -> Record {
    let (path, request, tokens) = body(kind, &tag, rng);
    let usage_asked = request["stream_options"]["include_usage"] == true;
    let started = Instant::now();
    let sent = client
        .post(format!("{base}{path}"))
        .bearer_auth(key)
        .json(&request)
        .send()
        .await;
    let mut wait = None;
    let outcome = match sent {
        Err(e) => Outcome::Broken(format!("no answer: {e}")),
        Ok(response) => {
            let status = response.status().as_u16();
            if status == 429 || status == 503 {
                // As the SDKs do: wait what `retry-after` says (at most 2 s) before the next.
                wait = Some(
                    response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
                        .map_or(Duration::from_millis(200), |s| {
                            Duration::from_secs_f64(s.clamp(0.05, 2.0))
                        }),
                );
            }
            if kind == Kind::Dropped && status == 200 {
                let mut response = response;
                let _ = response.chunk().await;
                drop(response);
                Outcome::Dropped
            } else {
                match response.text().await {
                    Err(e) => Outcome::Broken(format!("{status}: the body broke: {e}")),
                    Ok(text) if status != 200 => openai_error(status, &text),
                    Ok(text) if matches!(kind, Kind::Stream | Kind::Dropped) => {
                        check_stream(&text, tokens, usage_asked)
                    }
                    Ok(text) => match serde_json::from_str::<Value>(&text) {
                        Ok(v) if v["object"] == "chat.completion" || v["object"] == "list" => {
                            Outcome::Ok
                        }
                        _ => Outcome::Broken(format!("200 with an odd body: {}", clip(&text))),
                    },
                }
            }
        }
    };
    let elapsed = started.elapsed();
    if let Some(wait) = wait {
        tokio::time::sleep(wait).await;
    }
    Record {
        kind,
        tag,
        elapsed,
        outcome,
    }
}

async fn worker(
    index: usize,
    seed: u64,
    base: String,
    until: Instant,
    records: Arc<Mutex<Vec<Record>>>,
) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9));
    let client = reqwest::Client::builder()
        .timeout(DEADLINE + SLACK + Duration::from_secs(5))
        .build()
        .unwrap();
    let key = KEYS[index % KEYS.len()];
    let mut n = 0_u64;
    while Instant::now() < until {
        let kind = match rng.u32(0..20) {
            0..=7 => Kind::Chat,
            8..=13 => Kind::Stream,
            14..=17 => Kind::Embeddings,
            _ => Kind::Dropped,
        };
        let record =
            one_request(&client, &base, key, kind, format!("w{index}-{n}"), &mut rng).await;
        records.lock().unwrap().push(record);
        n += 1;
    }
}

// ---------------------------------------------------------------------------------------
// Samples of the gateway process, and its gauges.

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    rss_kib: f64,
    fds: f64,
    /// The descriptors by what they are.
    by: Fds,
}

/// Open descriptors by what they are: sockets of clients' connections (and the listener),
/// of connections to the upstreams, to Redis, and the rest (other sockets, files, pipes,
/// the runtime's own).
#[derive(Debug, Clone, Copy, Default)]
struct Fds {
    clients: f64,
    upstream: f64,
    redis: f64,
    rest: f64,
}

impl std::fmt::Display for Fds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "clients {:.0}, upstream {:.0}, Redis {:.0}, other {:.0}",
            self.clients, self.upstream, self.redis, self.rest
        )
    }
}

/// The ports that tell the gateway's sockets apart.
struct Ports {
    gateway: u16,
    upstream: Vec<u16>,
    redis: u16,
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|tail| tail.split('/').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or(0)
}

/// The TCP sockets of `pid`'s network namespace: inode to (local port, remote port).
fn tcp_sockets(pid: u32) -> HashMap<u64, (u16, u16)> {
    let mut sockets = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = |field: &str| {
                field
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            };
            if let (Some(local), Some(remote), Some(inode)) = (
                fields.get(1).and_then(|f| port(f)),
                fields.get(2).and_then(|f| port(f)),
                fields.get(9).and_then(|f| f.parse().ok()),
            ) {
                sockets.insert(inode, (local, remote));
            }
        }
    }
    sockets
}

fn sample(pid: u32, at: f64, ports: &Ports) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let sockets = tcp_sockets(pid);
    let mut by = Fds::default();
    let mut fds = 0.0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        fds += 1.0;
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok());
        match inode.and_then(|inode| sockets.get(&inode)) {
            Some((local, _)) if *local == ports.gateway => by.clients += 1.0,
            Some((_, remote)) if ports.upstream.contains(remote) => by.upstream += 1.0,
            Some((_, remote)) if *remote == ports.redis => by.redis += 1.0,
            _ => by.rest += 1.0,
        }
    }
    Some(Sample {
        at,
        rss_kib,
        fds,
        by,
    })
}

/// The least-squares slope of `value` over time, per minute.
fn slope(samples: &[Sample], value: fn(&Sample) -> f64) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.at).sum::<f64>() / n;
    let mean_v = samples.iter().map(value).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.at - mean_t) * (value(s) - mean_v);
        den += (s.at - mean_t).powi(2);
    }
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

/// The Theil-Sen slope of `value` per minute: the median of the slopes between every two
/// samples, which one sample far off (a moment's spike while an oversized answer is refused)
/// does not move as it moves a least-squares fit.
fn robust_slope(samples: &[Sample], value: fn(&Sample) -> f64) -> f64 {
    let mut slopes = Vec::new();
    for (i, a) in samples.iter().enumerate() {
        for b in &samples[i + 1..] {
            if b.at > a.at {
                slopes.push((value(b) - value(a)) / (b.at - a.at) * 60.0);
            }
        }
    }
    if slopes.is_empty() {
        return 0.0;
    }
    slopes.sort_by(f64::total_cmp);
    let mid = slopes.len() / 2;
    if slopes.len() % 2 == 0 {
        f64::midpoint(slopes[mid - 1], slopes[mid])
    } else {
        slopes[mid]
    }
}

/// The gateway's gauges that must come back to zero: summed over its deployments.
async fn gauges(client: &reqwest::Client, base: &str) -> BTreeMap<&'static str, f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for name in [
        "openai_router_in_flight",
        "openai_router_waiting",
        "openai_router_open_reservations",
    ] {
        let sum = text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        out.insert(name, sum);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The run.

struct Invariant {
    name: &'static str,
    held: bool,
    detail: String,
}

fn main() {
    let args = args();
    std::fs::create_dir_all(&args.out).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let held = runtime.block_on(run(&args));
    if !held {
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> bool {
    let run = Duration::from_secs_f64(args.minutes * 60.0);
    println!(
        "soak: {:.1} min, seed {}, {} workers; the release gateway on loopback",
        args.minutes, args.seed, args.workers
    );
    let sim = upstreams(args.seed).await;
    let mut redis = RedisServer::start().await.expect("redis-server starts");
    let redis_url = redis.url();
    let mut gateway = start_gateway(&sim, &redis_url, &args.out).await;
    let ports = Ports {
        gateway: port_of(&gateway.base),
        upstream: sim.endpoints().iter().map(|e| e.addr().port()).collect(),
        redis: port_of(&redis_url),
    };
    let plan = schedule(args.seed, run);
    let started = Instant::now();
    let until = started + run;
    let records = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..args.workers)
        .map(|i| {
            tokio::spawn(worker(
                i,
                args.seed,
                gateway.base.clone(),
                until,
                Arc::clone(&records),
            ))
        })
        .collect();
    let mut injected: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut next = plan.iter().peekable();
    let mut said = Instant::now();
    while Instant::now() < until {
        let now = started.elapsed();
        while let Some((at, action)) = next.peek() {
            if *at > now {
                break;
            }
            if let Some(kind) = kind(action) {
                *injected.entry(kind).or_default() += 1;
            }
            act(action, &sim, &mut redis, &gateway, &redis_url).await;
            next.next();
        }
        if let Some(s) = sample(gateway.pid, now.as_secs_f64(), &ports) {
            samples.push(s);
        }
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            progress(&records, &samples, injected.values().sum(), now);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for worker in workers {
        worker.await.unwrap();
    }
    // Whatever the schedule left: cleared, Redis up.
    for endpoint in sim.endpoints() {
        endpoint.clear_faults();
    }
    let records = std::mem::take(&mut *records.lock().unwrap());
    let invariants = check(&records, &sim, &gateway, &samples, run).await;
    let _ = gateway.child.start_kill();
    let report = report(args, &records, &injected, &invariants, &samples);
    std::fs::write(args.out.join("report.md"), &report).unwrap();
    println!("{report}");
    println!("written to {}", args.out.join("report.md").display());
    // Last, so a log cut to its tail still says which invariant failed and how.
    for failed in invariants.iter().filter(|i| !i.held) {
        println!("FAILED: {}: {}", failed.name, failed.detail);
    }
    invariants.iter().all(|i| i.held)
}

fn progress(records: &Mutex<Vec<Record>>, samples: &[Sample], faults: u64, now: Duration) {
    let records = records.lock().unwrap();
    let ok = records.iter().filter(|r| r.outcome == Outcome::Ok).count();
    let broken = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Broken(_)))
        .count();
    let last = samples.last().copied();
    println!(
        "  {:>5.0}s  requests {:>7}  ok {:>7}  broken {:>3}  faults {:>4}  rss {:>6.1} MiB  fds {:>4} ({})",
        now.as_secs_f64(),
        records.len(),
        ok,
        broken,
        faults,
        last.map_or(0.0, |s| s.rss_kib / 1024.0),
        last.map_or(0.0, |s| s.fds),
        last.map(|s| s.by).unwrap_or_default(),
    );
}

async fn check(
    records: &[Record],
    sim: &Sim,
    gateway: &Gateway,
    samples: &[Sample],
    run: Duration,
) -> Vec<Invariant> {
    let mut out = Vec::new();
    let answered = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Broken(_)))
        .collect::<Vec<_>>();
    out.push(Invariant {
        name: "every request ended in a success or an OpenAI-shaped error",
        held: answered.is_empty(),
        detail: answered.first().map_or_else(
            || format!("{} requests", records.len()),
            |r| {
                format!(
                    "{} broken; first: {} {:?}: {:?}",
                    answered.len(),
                    r.tag,
                    r.kind,
                    r.outcome
                )
            },
        ),
    });
    let late: Vec<_> = records
        .iter()
        .filter(|r| r.elapsed > DEADLINE + SLACK)
        .collect();
    let slowest = records.iter().map(|r| r.elapsed).max().unwrap_or_default();
    out.push(Invariant {
        name: "every request ended before its deadline",
        held: late.is_empty(),
        detail: format!(
            "deadline {} s (+{} ms slack); slowest {:.2} s; {} late",
            DEADLINE.as_secs(),
            SLACK.as_millis(),
            slowest.as_secs_f64(),
            late.len()
        ),
    });
    let streams = records.iter().filter(|r| r.kind == Kind::Stream).count();
    let spliced = records
        .iter()
        .filter(|r| matches!(&r.outcome, Outcome::Broken(why) if why.contains("completions") || why.contains("content tokens") || why.contains("usage")))
        .count();
    out.push(Invariant {
        name: "no stream spliced from two upstreams or duplicated",
        held: spliced == 0,
        detail: format!("{streams} streams checked; {spliced} spliced or duplicated"),
    });
    let mut calls: HashMap<String, u32> = HashMap::new();
    for endpoint in sim.endpoints() {
        for (tag, n) in endpoint.call_tallies() {
            *calls.entry(tag).or_default() += n;
        }
    }
    let most = calls.values().copied().max().unwrap_or(0);
    // How many upstream calls the requests that failed with a 5xx had: one means none was
    // retried.
    let mut failed_calls: BTreeMap<u32, u64> = BTreeMap::new();
    let mut failed_keys: BTreeMap<usize, u64> = BTreeMap::new();
    for r in records {
        if let Outcome::Error(message) = &r.outcome
            && message.starts_with('5')
        {
            let worker: usize = r.tag[1..].split('-').next().unwrap().parse().unwrap();
            *failed_keys.entry(worker % KEYS.len()).or_default() += 1;
            *failed_calls
                .entry(calls.get(&r.tag).copied().unwrap_or(0))
                .or_default() += 1;
        }
    }
    let over = calls.values().filter(|n| **n > MAX_ATTEMPTS).count();
    let upstream: u32 = calls.values().sum();
    out.push(Invariant {
        name: "no request called upstream more than the retry policy allows",
        held: over == 0,
        detail: format!(
            "max_attempts {MAX_ATTEMPTS}; {upstream} upstream calls for {} requests; most for one: {most}; over: {over}; requests failed 5xx by their upstream calls: {failed_calls:?}, by key: {failed_keys:?}",
            records.len()
        ),
    });
    out.push(settled(sim, gateway).await);
    out.extend(flat(samples, run));
    out.push(logs(&gateway.log));
    out
}

/// In flight, waiters, reservations and upstream requests back to zero once the load stops
/// (polled for up to 15 s: dropped streams settle in the background).
async fn settled(sim: &Sim, gateway: &Gateway) -> Invariant {
    let client = reqwest::Client::new();
    let mut last = (BTreeMap::new(), 0);
    for _ in 0..60 {
        let gauges = gauges(&client, &gateway.base).await;
        let upstream: u64 = sim.endpoints().iter().map(|e| e.counters().in_flight).sum();
        let zero = gauges.values().all(|v| *v == 0.0) && upstream == 0;
        last = (gauges, upstream);
        if zero {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (gauges, upstream) = last;
    Invariant {
        name: "in flight, waiters, reservations and upstream calls back to zero",
        held: gauges.values().all(|v| *v == 0.0) && upstream == 0,
        detail: format!(
            "in flight {}, waiting {}, open reservations {}, upstream requests open {upstream}",
            gauges["openai_router_in_flight"],
            gauges["openai_router_waiting"],
            gauges["openai_router_open_reservations"],
        ),
    }
}

/// How long the gateway's resident memory takes to settle under the soak's load: its
/// allocator's segments and the pools of the first reloads' endpoints grow over the first two
/// minutes or so, then hold. Measured: four two-minute runs fitted 5.0, 5.7, 9.0 and 11.8 MiB of
/// growth over their last 80 % (steps between 50 and 110 s); an eight-minute run held 86 to
/// 91 MiB from 150 s to its end (two single-sample spikes to 110 and 107 MiB), a fitted
/// growth of -2.6 MiB. RSS is judged after it (at most half the run, at least its first 20 %).
const WARM_UP: Duration = Duration::from_secs(150);

/// RSS flat after the warm-up, and open file descriptors flat over the last 80 % of the run:
/// the growth over each span under 8 MiB (or 10 % of the mean, if more; RSS's slope a
/// Theil-Sen median, robust to a spike) and under 16 descriptors (a least-squares fit).
fn flat(samples: &[Sample], run: Duration) -> [Invariant; 2] {
    let from = run.as_secs_f64() * 0.2;
    let tail: Vec<Sample> = samples.iter().copied().filter(|s| s.at >= from).collect();
    let span_min = run.as_secs_f64() * 0.8 / 60.0;
    let settled_from = from.max(WARM_UP.as_secs_f64().min(run.as_secs_f64() * 0.5));
    let settled: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.at >= settled_from)
        .collect();
    let settled_min = (run.as_secs_f64() - settled_from) / 60.0;
    let n = settled.len().max(1) as f64;
    let mean_rss = settled.iter().map(|s| s.rss_kib).sum::<f64>() / n;
    let rss_slope = robust_slope(&settled, |s| s.rss_kib);
    let rss_growth = rss_slope * settled_min;
    let rss_limit = (8.0 * 1024.0_f64).max(mean_rss * 0.1);
    let fd_slope = slope(&tail, |s| s.fds);
    let fd_growth = fd_slope * span_min;
    let max_fds = tail.iter().map(|s| s.fds).fold(0.0, f64::max);
    let kind_growth = |value: fn(&Sample) -> f64| slope(&tail, value) * span_min;
    let at_most = tail
        .iter()
        .max_by(|a, b| a.fds.total_cmp(&b.fds))
        .map(|s| s.by)
        .unwrap_or_default();
    [
        Invariant {
            name: "RSS flat after the warm-up",
            held: settled.len() >= 4 && rss_growth < rss_limit,
            detail: format!(
                "from {settled_from:.0} s: mean {:.1} MiB; median slope {:+.2} MiB/min; growth \
                 {:+.1} MiB (limit {:.1})",
                mean_rss / 1024.0,
                rss_slope / 1024.0,
                rss_growth / 1024.0,
                rss_limit / 1024.0
            ),
        },
        Invariant {
            name: "open file descriptors flat over the last 80 % of the run",
            held: !tail.is_empty() && fd_growth < 16.0,
            detail: format!(
                "slope {fd_slope:+.2}/min; fitted growth {fd_growth:+.1} (limit 16): clients {:+.1}, \
                 upstream {:+.1}, Redis {:+.1}, other {:+.1}; most {max_fds:.0} ({at_most})",
                kind_growth(|s| s.by.clients),
                kind_growth(|s| s.by.upstream),
                kind_growth(|s| s.by.redis),
                kind_growth(|s| s.by.rest),
            ),
        },
    ]
}

/// No panic, and every error line names its cause (an `error` field).
fn logs(path: &Path) -> Invariant {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let panics = text.matches("panicked").count();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    let causeless: Vec<&&str> = errors.iter().filter(|l| !l.contains("error=")).collect();
    Invariant {
        name: "no panic, no error log without a cause",
        held: panics == 0 && causeless.is_empty(),
        detail: format!(
            "{panics} panics, {} error lines, {} without a cause{}",
            errors.len(),
            causeless.len(),
            causeless
                .first()
                .map_or(String::new(), |l| format!("; first: {}", clip(l)))
        ),
    }
}

fn report(
    args: &Args,
    records: &[Record],
    injected: &BTreeMap<String, u64>,
    invariants: &[Invariant],
    samples: &[Sample],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Soak: {:.1} min, seed {}, {} workers\n\n`cargo xtask soak --minutes {} --seed {} --workers {}`\n",
        args.minutes, args.seed, args.workers, args.minutes, args.seed, args.workers
    );
    let mut outcomes: BTreeMap<(Kind, Outcome), u64> = BTreeMap::new();
    let mut messages: BTreeMap<&str, u64> = BTreeMap::new();
    for r in records {
        let outcome = match &r.outcome {
            Outcome::Broken(_) => Outcome::Broken(String::new()),
            Outcome::Error(message) => {
                *messages.entry(message.as_str()).or_default() += 1;
                Outcome::Error(message.split(':').next().unwrap_or_default().to_owned())
            }
            other => other.clone(),
        };
        *outcomes.entry((r.kind, outcome)).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "{} requests ({:.0}/s):\n\n| kind | outcome | requests |\n|---|---|---:|",
        records.len(),
        records.len() as f64 / (args.minutes * 60.0)
    );
    for ((kind, outcome), n) in &outcomes {
        let outcome = match outcome {
            Outcome::Ok => "ok".to_owned(),
            Outcome::Error(status) => format!("OpenAI-shaped error {status}"),
            Outcome::Dropped => "dropped by the client".to_owned(),
            Outcome::Broken(_) => "BROKEN".to_owned(),
        };
        let _ = writeln!(out, "| {kind:?} | {outcome} | {n} |");
    }
    let mut messages: Vec<_> = messages.into_iter().collect();
    messages.sort_by_key(|m| std::cmp::Reverse(m.1));
    let _ = writeln!(
        out,
        "\nThe errors callers saw, by message (numbers as #, endpoint names as *):\n\n| status: message | requests |\n|---|---:|"
    );
    for (message, n) in messages.iter().take(15) {
        let _ = writeln!(out, "| {} | {n} |", message.replace('|', "\\|"));
    }
    let _ = writeln!(
        out,
        "\nFaults injected ({}):\n\n| fault | times |\n|---|---:|",
        injected.values().sum::<u64>()
    );
    for (kind, n) in injected {
        let _ = writeln!(out, "| {kind} | {n} |");
    }
    let peak = samples.iter().map(|s| s.rss_kib).fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "\nGateway peak RSS {:.1} MiB.\n\n| invariant | held | detail |\n|---|---|---|",
        peak / 1024.0
    );
    for i in invariants {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            i.name,
            if i.held { "yes" } else { "**NO**" },
            i.detail
        );
    }
    out
}
