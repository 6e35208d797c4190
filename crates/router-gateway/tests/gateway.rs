//! The `openai-router` binary serving upstream-sim endpoints, driven over real HTTP: raw
//! requests for framing and headers, and the official `openai` Python package as a client.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers fail loudly by design"
)]

mod common;
use common::{free_port, hash};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;
use tokio::process::{Child, Command};
use upstream_sim::{
    EndpointConfig, Fault, LatencyModel, Sim, SimDialect, Spill, Times, TokenIssuer,
    TokenIssuerConfig,
};

const UPSTREAM_KEY: &str = "sk-upstream-secret-7d1f";
const AZURE_KEY: &str = "az-upstream-secret-91ab";
const GATEWAY_KEY: &str = "sk-gw-team-a-4e2c";

struct Gateway {
    child: Child,
    base: String,
    dir: PathBuf,
}

impl Gateway {
    async fn logs(mut self) -> String {
        self.child.start_kill().unwrap();
        let mut logs = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            stderr.read_to_string(&mut logs).await.unwrap();
        }
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut logs).await.unwrap();
        }
        logs
    }
}

async fn start(sim: &Sim, extra: &str) -> Gateway {
    start_with(sim, extra, 5000).await
}

/// Writes a gateway configuration for `sim` into a fresh folder; returns it and the port.
fn write_config(sim: &Sim, extra: &str, timeout: u64) -> (PathBuf, u16) {
    let dir = std::env::temp_dir().join(format!(
        "openai-router-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let (openai, azure) = (&sim.endpoints()[0], &sim.endpoints()[1]);
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"

[router]
strategy = "round-robin"
request_timeout_ms = {timeout}
cache_affinity_header = "x-session-id"

[[endpoints]]
name = "oai"
kind = "openai"
url = "{}"
api_key_env = "TEST_UPSTREAM_KEY"
models = ["gpt-4o-mini", "text-embedding-3-small", "gpt-3.5-turbo-instruct"]

[[endpoints]]
name = "az"
kind = "azure"
url = "{}"
api_version = "2024-10-21"
api_key_env = "TEST_AZURE_KEY"
deployments = {{ "gpt-4o-mini" = "mini-dep", "text-embedding-3-small" = "emb-dep" }}

[[keys]]
name = "team-a"
sha256 = "{}"
models = ["gpt-4o-mini", "text-embedding-3-small", "gpt-3.5-turbo-instruct"]
{extra}
"#,
        openai.openai_base_url(),
        azure.url(),
        hash(GATEWAY_KEY)
    );
    let path = dir.join("router.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(config.as_bytes())
        .unwrap();
    (dir, port)
}

async fn start_with(sim: &Sim, extra: &str, timeout: u64) -> Gateway {
    start_in(sim, extra, timeout, &[]).await
}

/// The proxy variables the gateway's upstream client reads; a test sets them only on purpose.
const PROXY_VARS: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

async fn start_in(sim: &Sim, extra: &str, timeout: u64, env: &[(&str, String)]) -> Gateway {
    start_serving(sim, extra, timeout, env, "").await
}

/// As [`start_in`], with `server` lines added to the `[server]` table.
async fn start_serving(
    sim: &Sim,
    extra: &str,
    timeout: u64,
    env: &[(&str, String)],
    server: &str,
) -> Gateway {
    let (dir, port) = write_config(sim, extra, timeout);
    let path = dir.join("router.toml");
    if !server.is_empty() {
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replacen("[server]\n", &format!("[server]\n{server}\n"), 1);
        std::fs::write(&path, text).unwrap();
    }
    let mut command = Command::new(env!("CARGO_BIN_EXE_openai-router"));
    for var in PROXY_VARS {
        command.env_remove(var);
    }
    command
        .args(["serve", "--config"])
        .arg(&path)
        .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        .env("TEST_AZURE_KEY", AZURE_KEY)
        // Every log line, so that tests can look for secrets in them. The pipes are read only
        // when a test asks for the logs: a test with much traffic sets a quieter `RUST_LOG`,
        // or a full pipe would stall the gateway.
        .env("RUST_LOG", "trace");
    for (var, value) in env {
        command.env(var, value);
    }
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    if server.contains("tls") {
        // HTTPS: ready once the port accepts connections.
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                let base = format!("https://localhost:{port}");
                return Gateway { child, base, dir };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the gateway did not start");
    }
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..250 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            return Gateway { child, base, dir };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway did not start");
}

async fn sim() -> Sim {
    Sim::start(
        3,
        [
            EndpointConfig::new("oai", SimDialect::OpenAi)
                .with_api_key(UPSTREAM_KEY)
                .with_models([
                    "gpt-4o-mini",
                    "text-embedding-3-small",
                    "gpt-3.5-turbo-instruct",
                ])
                .with_latency(LatencyModel::instant()),
            EndpointConfig::new("az", SimDialect::Azure)
                .with_api_key(AZURE_KEY)
                .with_models(["mini-dep", "emb-dep"])
                .with_latency(LatencyModel::instant())
                .with_priority_downgraded(),
        ],
    )
    .await
    .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(gateway: &Gateway, path: &str, key: Option<&str>, body: Value) -> reqwest::Response {
    let mut request = client().post(format!("{}{path}", gateway.base)).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one gateway, one walk through its surface"
)]
async fn raw_http_framing_headers_and_errors() {
    let sim = sim().await;
    let gateway = start(&sim, "").await;

    // Unknown fields reach the upstream; unknown answer fields reach the client.
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "x_future": {"a": 1}});
    let response = post(&gateway, "/v1/chat/completions", Some(GATEWAY_KEY), body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    let seen = sim
        .endpoints()
        .iter()
        .find_map(upstream_sim::SimEndpoint::last_request)
        .unwrap();
    assert_eq!(seen.body["x_future"]["a"], 1);
    assert!(answer.get("x_sim_extra").is_some() || answer.get("prompt_filter_results").is_some());
    // The client's credential never goes upstream: each upstream got its own.
    for endpoint in sim.endpoints() {
        for request in endpoint.requests() {
            let auth = format!("{:?}", request.headers);
            assert!(
                !auth.contains(GATEWAY_KEY),
                "gateway key forwarded upstream"
            );
        }
    }

    // A stream: SSE events, each `data: {json}`, then `data: [DONE]`.
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let response = post(&gateway, "/v1/chat/completions", Some(GATEWAY_KEY), body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    for event in &events[..events.len() - 1] {
        let data = event.strip_prefix("data: ").unwrap();
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert!(chunk.get("choices").is_some());
    }

    // Embeddings and models.
    let response = post(
        &gateway,
        "/v1/embeddings",
        Some(GATEWAY_KEY),
        json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let ids = model_ids(&gateway).await;
    assert!(
        ids.iter().any(|m| m == "gpt-4o-mini") && ids.iter().any(|m| m == "text-embedding-3-small")
    );

    // OpenAI-shaped errors with the right status.
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let response = post(&gateway, "/v1/chat/completions", None, chat.clone()).await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    let response = post(
        &gateway,
        "/v1/chat/completions",
        Some("sk-wrong"),
        chat.clone(),
    )
    .await;
    assert_eq!(response.status(), 401);
    let unknown = json!({"model": "gpt-9", "messages": []});
    let response = post(&gateway, "/v1/chat/completions", Some(GATEWAY_KEY), unknown).await;
    assert_eq!(response.status(), 403, "not on the key's allow-list");
    let response = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .bearer_auth(GATEWAY_KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );

    // A body over the limit (16 MiB by default): 413, OpenAI-shaped.
    let huge = vec![b' '; 17 * 1024 * 1024];
    let response = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .bearer_auth(GATEWAY_KEY)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "request_too_large"
    );

    // Every upstream throttles beyond the deadline: 429 with Retry-After.
    for endpoint in sim.endpoints() {
        endpoint.inject(Fault::rate_limited(Duration::from_secs(30)), Times::Next(1));
    }
    let response = post(
        &gateway,
        "/v1/chat/completions",
        Some(GATEWAY_KEY),
        chat.clone(),
    )
    .await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((25..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "rate_limit_exceeded"
    );

    // Prometheus metrics: answers by route and status, streams' time to first token, the
    // deployments' state.
    let metrics = metrics_text(&gateway).await;
    assert!(
        metrics.contains(
            r#"openai_router_requests_total{route="chat",model="gpt-4o-mini",status="200"} 2"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"status="429"} 1"#), "{metrics}");
    assert!(
        metrics.contains("openai_router_time_to_first_token_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"openai_router_in_flight{endpoint="az",model="gpt-4o-mini",deployment="mini-dep"} 0"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"openai_router_deployment_state{endpoint="oai",model="gpt-4o-mini",deployment="gpt-4o-mini"} 1"#), "rate limited: {metrics}");
    // No quota is configured here, so the 429s taught nothing about what the upstream admits.
    assert!(metrics.contains(r#"openai_router_admitted_share{endpoint="oai",model="gpt-4o-mini",deployment="gpt-4o-mini"} 1.0"#), "{metrics}");
    // The GenAI semantic conventions' names beside ours: the plain answer's tokens (the
    // stream's usage is counted when the upstream sends it, which it does when the caller or
    // the router's quota accounting asks: here neither), embeddings' input tokens only, the
    // stream's first token, every answer's duration and the 429's with its error type;
    // OpenMetrics, ended as the format wants.
    for line in [
        r#"gen_ai_client_token_usage_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini",gen_ai_token_type="input"} 1"#,
        r#"gen_ai_client_token_usage_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini",gen_ai_token_type="output"} 1"#,
        r#"gen_ai_client_token_usage_count{gen_ai_operation_name="embeddings",gen_ai_request_model="text-embedding-3-small",gen_ai_token_type="input"} 1"#,
        r#"gen_ai_server_time_to_first_token_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini"} 1"#,
        r#"gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini"} 2"#,
        r#"gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini",error_type="429"} 1"#,
        "# TYPE gen_ai_client_token_usage histogram",
    ] {
        assert!(metrics.contains(line), "{line} is not in {metrics}");
    }
    assert!(
        !metrics.contains(
            r#"gen_ai_request_model="text-embedding-3-small",gen_ai_token_type="output""#
        ),
        "embeddings have no output tokens: {metrics}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    assert!(!metrics.contains(".."), "help texts end once: {metrics}");
    assert!(!metrics.contains(GATEWAY_KEY));

    // Keys never appear in the logs, even at trace level.
    let logs = gateway.logs().await;
    assert_no_secret(&logs, &[UPSTREAM_KEY, AZURE_KEY, GATEWAY_KEY]);
    assert!(logs.contains("serving"), "the logs were captured: {logs}");
}

/// A gateway with `server` settings in `[server]`, and the address it listens on.
async fn on_the_edge(server: &str) -> (Sim, Gateway, String) {
    let sim = sim().await;
    let gateway = start_serving(&sim, "", 5000, &[], server).await;
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    (sim, gateway, addr)
}

/// The gateway on a network edge: a client that sends its request head slowly is
/// disconnected, one whose body does not arrive in time is answered 408, a head over the
/// limit is answered 431, and connections beyond the cap wait to be accepted until one
/// closes.
#[tokio::test]
async fn slow_or_greedy_clients_cannot_hold_the_gateway() {
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpStream;
    let (_sim, _gateway, addr) = on_the_edge(
        "header_read_timeout_ms = 500\nbody_read_timeout_ms = 500\nmax_connections = 3\nmax_header_bytes = 16384",
    )
    .await;
    let read_all = |mut stream: TcpStream| async move {
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        (read.is_ok(), String::from_utf8_lossy(&answer).into_owned())
    };

    // A head trickled a byte at a time: the connection is closed after about 500 ms.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let started = std::time::Instant::now();
    let head =
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n";
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let (ended, _) = read_all(slow).await;
    assert!(ended, "the slow head's connection was not closed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );

    // A body that does not arrive: 408, OpenAI-shaped.
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\nconnection: close\r\n\r\n{\"model\"")
        .await
        .unwrap();
    let (_, answer) = read_all(stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");

    // A head over the limit: 431.
    let mut greedy = TcpStream::connect(&addr).await.unwrap();
    let big = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let _ = greedy.write_all(big.as_bytes()).await;
    let (_, answer) = read_all(greedy).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );

    // Three connections part-way through a head take every place; a fourth is answered only
    // once one closes.
    let mut partial = Vec::new();
    for _ in 0..3 {
        let mut connection = TcpStream::connect(&addr).await.unwrap();
        connection
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        partial.push(connection);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fourth = TcpStream::connect(&addr).await.unwrap();
    fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0_u8; 64];
    let waited = tokio::time::timeout(Duration::from_millis(200), fourth.read(&mut first)).await;
    assert!(waited.is_err(), "answered beyond the connection cap");
    drop(partial.pop());
    let (_, answer) = read_all(fourth).await;
    let answer = format!("{}{answer}", String::from_utf8_lossy(&first));
    assert!(answer.contains("200 OK"), "{answer}");
}

/// One answer read off a kept-alive connection: its head and a `content-length` body.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut answer = Vec::new();
    let mut byte = [0_u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            Ok(Ok(1)) => answer.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0_u8; length];
    stream.read_exact(&mut body).await.ok()?;
    answer.extend(body);
    Some(String::from_utf8_lossy(&answer).into_owned())
}

/// Kept-alive connections: one that idles longer than a request head may take still serves
/// its next request (clients keep idle connections for a minute or more and reuse them);
/// one that idles past `idle_timeout_ms` is closed; and when every place is taken, an idle
/// one is closed at once for a client that waits.
#[tokio::test]
async fn kept_alive_connections_idle_past_the_head_timeout_and_make_room_when_full() {
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpStream;
    let (_sim, _gateway, addr) =
        on_the_edge("header_read_timeout_ms = 300\nidle_timeout_ms = 4000\nmax_connections = 2")
            .await;
    let ask = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";

    let mut a = TcpStream::connect(&addr).await.unwrap();
    a.write_all(ask).await.unwrap();
    let answer = read_answer(&mut a).await.expect("the first answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Three head timeouts of idling, then the next request on the same connection.
    tokio::time::sleep(Duration::from_millis(900)).await;
    a.write_all(ask).await.unwrap();
    let answer = read_answer(&mut a)
        .await
        .expect("the connection idled past the head timeout was closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A second kept-alive connection: both places taken, both idle.
    let mut b = TcpStream::connect(&addr).await.unwrap();
    b.write_all(ask).await.unwrap();
    assert!(read_answer(&mut b).await.is_some());
    // A third client is served well before either idle connection times out: one of them
    // was closed to make room.
    let started = std::time::Instant::now();
    let mut c = TcpStream::connect(&addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut c)
        .await
        .expect("the waiting client's answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the waiting client was served only after {:?}",
        started.elapsed()
    );
    let mut end = [0_u8; 1];
    let closed = |read: Result<std::io::Result<usize>, _>| matches!(read, Ok(Ok(0) | Err(_)));
    let a_closed = closed(tokio::time::timeout(Duration::from_millis(100), a.read(&mut end)).await);
    let b_closed = closed(tokio::time::timeout(Duration::from_millis(100), b.read(&mut end)).await);
    assert!(
        a_closed || b_closed,
        "no idle connection was closed to make room"
    );

    // Idle past `idle_timeout_ms`: closed.
    let mut d = TcpStream::connect(&addr).await.unwrap();
    d.write_all(ask).await.unwrap();
    assert!(read_answer(&mut d).await.is_some());
    let idled = std::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), d.read(&mut end)).await;
    assert!(
        closed(read),
        "the idle connection stayed open past its idle timeout"
    );
    assert!(
        idled.elapsed() >= Duration::from_millis(3500),
        "closed after {:?} idle, before the idle timeout",
        idled.elapsed()
    );
}

/// A venv under the target directory with the official `openai` package from `PyPI`.
fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("py-openai");
    let python = venv.join("bin/python");
    let ready = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(
            made.success(),
            "python3 -m venv failed: install python3-venv"
        );
        let installed = std::process::Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai>=1.50,<4",
            ])
            .status()
            .unwrap();
        assert!(installed.success(), "pip install openai failed");
    }
    python
}

async fn run_python(gateway: &Gateway, phase: &str, key: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client.py");
    let output = Command::new(python())
        .arg(script)
        .arg(phase)
        .env("OPENAI_BASE_URL", format!("{}/v1", gateway.base))
        .env("OPENAI_API_KEY", key)
        .env("OPEN_KEY", OPEN_KEY)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "python phase `{phase}` failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

const OPEN_KEY: &str = "sk-gw-team-b-no-allowlist";

#[tokio::test]
async fn the_official_python_client() {
    let sim = sim().await;
    let extra = format!(
        "\n[[keys]]\nname = \"team-b\"\nsha256 = \"{}\"\n",
        hash(OPEN_KEY)
    );
    let gateway = start(&sim, &extra).await;
    for phase in [
        "basic",
        "stream_tools",
        "legacy_stream",
        "responses",
        "embeddings",
        "errors",
        "cache_affinity",
        "service_tier",
    ] {
        run_python(&gateway, phase, GATEWAY_KEY).await;
    }
    // The tiers the answers reported, per deployment: `az` serves priority requests at default.
    let metrics = metrics_text(&gateway).await;
    assert!(
        metrics.contains(r#"openai_router_service_tier_downgrades_total{endpoint="az",model="gpt-4o-mini",deployment="mini-dep"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"openai_router_service_tier_downgrades_total{endpoint="oai",model="gpt-4o-mini",deployment="gpt-4o-mini"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"openai_router_service_tier_total{endpoint="oai",model="gpt-4o-mini",deployment="gpt-4o-mini",tier="priority"} 2"#),
        "{metrics}"
    );
    for endpoint in sim.endpoints() {
        endpoint.inject(
            Fault::status_with_code(400, "context_length_exceeded"),
            Times::Always,
        );
    }
    run_python(&gateway, "bad_request", GATEWAY_KEY).await;
    for endpoint in sim.endpoints() {
        endpoint.clear_faults();
        endpoint.inject(Fault::rate_limited(Duration::from_secs(30)), Times::Next(1));
    }
    run_python(&gateway, "throttled", GATEWAY_KEY).await;
    drop(gateway);

    // A shorter deadline, so that a 2 s cooldown makes the gateway answer 429 + Retry-After: 2.
    drop(sim);
    let fresh = self::sim().await;
    let gateway = start_with(&fresh, "", 1500).await;
    for endpoint in fresh.endpoints() {
        endpoint.inject(Fault::rate_limited(Duration::from_secs(2)), Times::Next(1));
    }
    run_python(&gateway, "throttled_then_retried", GATEWAY_KEY).await;
    let logs = gateway.logs().await;
    assert_no_secret(&logs, &[UPSTREAM_KEY, AZURE_KEY, GATEWAY_KEY, OPEN_KEY]);
}

/// The usual gateway, plus `gpt-4o` served only by an endpoint that answers 503, with
/// `[router.fallbacks]` sending it to `gpt-4o-mini`; the key with no allow-list is `OPEN_KEY`.
async fn gateway_with_a_fallback() -> (Sim, Sim, Gateway) {
    let sim = sim().await;
    let down = Sim::start(
        5,
        [EndpointConfig::new("down", SimDialect::OpenAi)
            .with_api_key(UPSTREAM_KEY)
            .with_models(["gpt-4o"])
            .with_latency(LatencyModel::instant())],
    )
    .await
    .unwrap();
    down.endpoints()[0].inject(Fault::status(503), Times::Always);
    let extra = format!(
        "\n[[keys]]\nname = \"team-b\"\nsha256 = \"{}\"\n\n[[endpoints]]\nname = \"down\"\nkind = \"openai\"\nurl = \"{}\"\napi_key_env = \"TEST_UPSTREAM_KEY\"\nmodels = [\"gpt-4o\"]\n\n[router.fallbacks]\n\"gpt-4o\" = [\"gpt-4o-mini\"]\n",
        hash(OPEN_KEY),
        down.endpoints()[0].openai_base_url()
    );
    let gateway = start(&sim, &extra).await;
    (sim, down, gateway)
}

/// `[router.fallbacks]` through the official client: `gpt-4o` falls back to `gpt-4o-mini`,
/// and the answer's header says so.
#[tokio::test]
async fn fallbacks_through_the_official_python_client() {
    let (_sim, down, gateway) = gateway_with_a_fallback().await;
    run_python(&gateway, "fallback", OPEN_KEY).await;
    assert!(
        down.endpoints()[0].counters().requests >= 2,
        "gpt-4o was tried before falling back"
    );
}

/// An Azure endpoint serving `gpt-4o` as `gpt4o-entra` that accepts only the tokens
/// `endpoint` is configured to, and the gateway's `[[endpoints]]` table for it with `entra` as
/// its `entra = { … }` value, `credential` (keyed for `OPEN_KEY`).
async fn entra_endpoint(endpoint: EndpointConfig, credential: &str) -> (Sim, String) {
    let azure = Sim::start(
        7,
        [endpoint
            .with_api_key("a-key-nobody-sends")
            .with_models(["gpt4o-entra"])
            .with_latency(LatencyModel::instant())],
    )
    .await
    .unwrap();
    let table = format!(
        "\n[[keys]]\nname = \"team-b\"\nsha256 = \"{}\"\n\n[[endpoints]]\nname = \"entra\"\nkind = \"azure\"\nurl = \"{}\"\napi_version = \"2024-10-21\"\ndeployments = {{ \"gpt-4o\" = \"gpt4o-entra\" }}\nentra = {{ {credential} }}\n",
        hash(OPEN_KEY),
        azure.endpoints()[0].url(),
    );
    (azure, table)
}

/// Entra ID through the gateway and the official Python client: an Azure endpoint configured
/// with `entra = { credential = "client-secret", … }` gets its token from a loopback token
/// endpoint (one token for every request), and neither the client secret nor the token is
/// logged.
#[tokio::test]
async fn entra_id_through_the_official_python_client() {
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const CLIENT: &str = "gateway-app";
    const SECRET: &str = "entra-secret-for-the-gateway-only";
    let sim = sim().await;
    let issuer = TokenIssuer::start(TokenIssuerConfig::new(TENANT, CLIENT, SECRET))
        .await
        .unwrap();
    let (azure, extra) = entra_endpoint(
        EndpointConfig::new("entra", SimDialect::Azure).with_entra(&issuer),
        &format!(
            "credential = \"client-secret\", tenant_id = \"{TENANT}\", client_id = \"{CLIENT}\", client_secret_env = \"TEST_ENTRA_SECRET\", authority_host = \"{}\"",
            issuer.authority_host()
        ),
    )
    .await;
    let gateway = start_in(
        &sim,
        &extra,
        5000,
        &[("TEST_ENTRA_SECRET", SECRET.to_owned())],
    )
    .await;
    run_python(&gateway, "entra", OPEN_KEY).await;
    assert_eq!(issuer.issued(), 1, "one token for every request");
    assert_eq!(azure.endpoints()[0].counters().requests, 2);
    let logs = gateway.logs().await;
    assert_no_secret(&logs, &[SECRET, "sim-entra."]);
}

/// Entra ID with a managed identity through the gateway: App Service's environment
/// (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`) points at the loopback identity endpoint, and the
/// gateway's `entra = { credential = "managed-identity" }` endpoint gets its token there.
#[tokio::test]
async fn entra_managed_identity_through_the_official_python_client() {
    const IDENTITY_SECRET: &str = "app-service-identity-secret";
    let sim = sim().await;
    let issuer = TokenIssuer::start(
        TokenIssuerConfig::new("unused", "unused", "unused").with_managed_identity(IDENTITY_SECRET),
    )
    .await
    .unwrap();
    let (azure, extra) = entra_endpoint(
        EndpointConfig::new("entra", SimDialect::Azure).with_entra(&issuer),
        "credential = \"managed-identity\"",
    )
    .await;
    let env = [
        ("IDENTITY_ENDPOINT", issuer.identity_endpoint()),
        ("IDENTITY_HEADER", IDENTITY_SECRET.to_owned()),
    ];
    let gateway = start_in(&sim, &extra, 5000, &env).await;
    run_python(&gateway, "entra", OPEN_KEY).await;
    assert_eq!(issuer.issued(), 1, "one token for every request");
    assert_eq!(azure.endpoints()[0].counters().requests, 2);
    let logs = gateway.logs().await;
    assert_no_secret(&logs, &[IDENTITY_SECRET, "sim-entra."]);
}

/// Entra ID from the Azure CLI through the gateway: a stand-in `az` first on the gateway's
/// `PATH` answers `az account get-access-token` as the CLI does (it records each call), and the
/// gateway's `entra = { credential = "azure-cli" }` endpoint sends its token.
#[cfg(unix)]
#[tokio::test]
async fn entra_from_the_azure_cli_through_the_official_python_client() {
    use std::os::unix::fs::PermissionsExt as _;
    const TOKEN: &str = "token-from-the-azure-cli";
    let sim = sim().await;
    let (azure, extra) = entra_endpoint(
        EndpointConfig::new("entra", SimDialect::Azure).with_bearer_token(TOKEN),
        "credential = \"azure-cli\"",
    )
    .await;
    let bin = std::env::temp_dir().join(format!("fake-az-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&bin).unwrap();
    let calls = bin.join("calls");
    let script = format!(
        "#!/bin/sh\n# A stand-in for the Azure CLI.\necho \"$*\" >> '{}'\ncase \"$*\" in\n  \"account get-access-token\"*) printf '{{\"accessToken\":\"{TOKEN}\",\"expires_on\":%s,\"tokenType\":\"Bearer\"}}\\n' \"$(( $(date +%s) + 3600 ))\" ;;\n  *) echo \"unexpected: $*\" >&2; exit 2 ;;\nesac\n",
        calls.display()
    );
    let az = bin.join("az");
    std::fs::write(&az, script).unwrap();
    std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let gateway = start_in(&sim, &extra, 5000, &[("PATH", path)]).await;
    run_python(&gateway, "entra", OPEN_KEY).await;
    let called = std::fs::read_to_string(&calls).unwrap_or_default();
    assert_eq!(
        called.lines().count(),
        1,
        "one token for every request: {called}"
    );
    assert!(
        called.contains("account get-access-token") && called.contains("cognitiveservices"),
        "{called}"
    );
    assert_eq!(azure.endpoints()[0].counters().requests, 2);
    assert_no_secret(&gateway.logs().await, &[TOKEN]);
    let _ = std::fs::remove_dir_all(bin);
}

/// Azure spillover through the gateway and the official Python client: the caller names the
/// spillover deployment (`x-ms-spillover-deployment`); the provisioned deployment is full, Azure
/// serves the request on the pay-as-you-go one, and the gateway credits that one: the metrics
/// count the spill on the full deployment.
#[tokio::test]
async fn spillover_through_the_official_python_client() {
    let sim = sim().await;
    let east = Sim::start(
        8,
        [EndpointConfig::new("east", SimDialect::Azure)
            .with_api_key(AZURE_KEY)
            .with_models(["ptu", "paygo"])
            .with_latency(LatencyModel::instant())],
    )
    .await
    .unwrap();
    let url = east.endpoints()[0].url();
    let extra = format!(
        "\n[[keys]]\nname = \"team-b\"\nsha256 = \"{}\"\n\n[[endpoints]]\nname = \"east-ptu\"\nkind = \"azure\"\nurl = \"{url}\"\napi_version = \"2024-10-21\"\napi_key_env = \"TEST_AZURE_KEY\"\ndeployments = {{ \"gpt-4o\" = \"ptu\" }}\n\n[[endpoints]]\nname = \"east-paygo\"\nkind = \"azure\"\nurl = \"{url}\"\napi_version = \"2024-10-21\"\napi_key_env = \"TEST_AZURE_KEY\"\ndeployments = {{ \"gpt-4o\" = \"paygo\" }}\npriority = 1\n",
        hash(OPEN_KEY)
    );
    let gateway = start(&sim, &extra).await;
    east.endpoints()[0].spill(Some(Spill::Serves));
    run_python(&gateway, "spillover", OPEN_KEY).await;
    let metrics = metrics_text(&gateway).await;
    assert!(
        metrics.contains(r#"openai_router_spilled_over_total{endpoint="east-ptu",model="gpt-4o",deployment="ptu"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"openai_router_upstream_successes_total{endpoint="east-paygo",model="gpt-4o",deployment="paygo"} 1"#),
        "{metrics}"
    );
    let seen = east.endpoints()[0].last_request().unwrap();
    assert_eq!(seen.header("x-ms-spillover-deployment"), Some("paygo"));
}

/// A folder holding the official `openai` npm package (v4: it runs on Debian's Node.js 18 as
/// on newer ones) and the Node client script, installed from the npm registry when missing.
fn node_client() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-openai");
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node not found: `cargo xtask ci` installs Debian's nodejs and npm"
    );
    if !dir.join("node_modules/openai/package.json").is_file() {
        std::fs::create_dir_all(&dir).unwrap();
        let installed = std::process::Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&dir)
            .arg("openai@4")
            .status()
            .unwrap();
        assert!(installed.success(), "npm install openai@4 failed");
    }
    let script = dir.join("client.mjs");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/client.mjs"),
        &script,
    )
    .unwrap();
    script
}

/// The official `openai` npm package against the gateway: chat, a stream with its usage,
/// embeddings, a fallback's header, and the typed error of a wrong key.
#[tokio::test]
async fn the_official_node_client() {
    let (_sim, _down, gateway) = gateway_with_a_fallback().await;
    let output = Command::new("node")
        .arg(node_client())
        .env("OPENAI_BASE_URL", format!("{}/v1", gateway.base))
        .env("OPENAI_API_KEY", OPEN_KEY)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "the node client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok node"));
}

/// Answers say where they came from: the model group, the upstream's request id, and Azure's
/// region and model session, on plain answers and streams.
#[tokio::test]
async fn answers_carry_the_upstream_s_identity() {
    let sim = sim().await;
    let gateway = start(&sim, "").await;
    let mut seen = std::collections::HashMap::new();
    for stream in [false, false, true, true] {
        let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream});
        let response = post(&gateway, "/v1/chat/completions", Some(GATEWAY_KEY), body).await;
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            header("x-openai-router-model").as_deref(),
            Some("gpt-4o-mini")
        );
        let id = header("x-openai-router-upstream-request-id").unwrap();
        assert!(id.starts_with("req_sim"), "{id}");
        let azure = header("x-ms-region").is_some();
        if azure {
            assert_eq!(header("x-ms-region").as_deref(), Some("Simulated Region"));
            assert_eq!(
                header("azureml-model-session").as_deref(),
                Some("sim-model-session")
            );
        } else {
            assert_eq!(header("azureml-model-session"), None);
        }
        *seen.entry((stream, azure)).or_insert(0) += 1;
        response.bytes().await.unwrap();
    }
    // Round robin: both endpoints, plain and streamed.
    assert_eq!(seen.len(), 4, "{seen:?}");
}

/// Every answer says which endpoint and deployment served it and after how many attempts;
/// an error says where it failed last; a key with limits of its own is told what its window
/// has left, in OpenAI's `x-ratelimit-*` names, and a key without gets none of those.
#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one key's window walked through: answers, an error, the refusal"
)]
async fn answers_and_errors_say_where_they_went_and_what_the_key_has_left() {
    let sim = sim().await;
    // 60 a minute: 10 in the router's 10 s window.
    let extra = format!(
        "\n[[keys]]\nname = \"team-b\"\nsha256 = \"{}\"\nrpm = 60\n",
        hash(OPEN_KEY)
    );
    let gateway = start(&sim, &extra).await;
    let chat = |stream: bool| {
        json!({"model": "gpt-4o-mini", "stream": stream,
            "messages": [{"role": "user", "content": "where did this go"}]})
    };
    let header = |response: &reqwest::Response, name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    for (n, stream) in [false, true, false].into_iter().enumerate() {
        let response = post(
            &gateway,
            "/v1/chat/completions",
            Some(OPEN_KEY),
            chat(stream),
        )
        .await;
        assert_eq!(response.status(), 200);
        let endpoint = header(&response, "x-openai-router-endpoint").unwrap();
        let deployment = header(&response, "x-openai-router-deployment").unwrap();
        let pair = (endpoint.as_str(), deployment.as_str());
        assert!(
            pair == ("oai", "gpt-4o-mini") || pair == ("az", "mini-dep"),
            "{pair:?}"
        );
        assert_eq!(
            header(&response, "x-openai-router-attempts").as_deref(),
            Some("1")
        );
        assert_eq!(
            header(&response, "x-ratelimit-limit-requests").as_deref(),
            Some("10")
        );
        assert_eq!(
            header(&response, "x-ratelimit-remaining-requests"),
            Some((9 - n).to_string()),
            "request {n}"
        );
        assert_eq!(header(&response, "x-ratelimit-remaining-tokens"), None);
        response.bytes().await.unwrap();
    }
    // A key with no limits of its own is told nothing of them. The caller's W3C trace goes
    // on to the upstream: the same trace, the attempt's own span id.
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .bearer_auth(GATEWAY_KEY)
        .header("traceparent", parent)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let served = header(&response, "x-openai-router-endpoint").unwrap();
    let upstream = &sim.endpoints()[usize::from(served == "az")];
    let seen = upstream.last_request().unwrap();
    let sent = seen.header("traceparent").unwrap();
    assert!(
        sent.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && sent.ends_with("-01"),
        "{sent}"
    );
    assert_ne!(sent, parent, "the attempt has a span of its own");
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), None);
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), None);

    // Both endpoints failing: the error names the last one tried and the attempts made.
    for endpoint in sim.endpoints() {
        endpoint.inject(Fault::status(500), Times::Always);
    }
    let response = post(
        &gateway,
        "/v1/chat/completions",
        Some(GATEWAY_KEY),
        chat(false),
    )
    .await;
    assert_eq!(response.status(), 502);
    let attempts: u32 = header(&response, "x-openai-router-attempts")
        .unwrap()
        .parse()
        .unwrap();
    assert!(attempts >= 2, "{attempts} attempts");
    let last = header(&response, "x-openai-router-endpoint").unwrap();
    assert!(last == "oai" || last == "az", "{last}");
    for endpoint in sim.endpoints() {
        endpoint.clear_faults();
    }

    // team-b spends the rest of its window; the next is refused by its own limit, before any
    // attempt and with no endpoint to name.
    for _ in 0..7 {
        let response = post(
            &gateway,
            "/v1/chat/completions",
            Some(OPEN_KEY),
            chat(false),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    let response = post(
        &gateway,
        "/v1/chat/completions",
        Some(OPEN_KEY),
        chat(false),
    )
    .await;
    assert_eq!(response.status(), 429);
    assert_eq!(
        header(&response, "x-openai-router-attempts").as_deref(),
        Some("0")
    );
    assert_eq!(header(&response, "x-openai-router-endpoint"), None);
    assert!(header(&response, "retry-after").is_some());
}

async fn model_ids(gateway: &Gateway) -> Vec<String> {
    let models: Value = client()
        .get(format!("{}/v1/models", gateway.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Sends the gateway a signal (`HUP`, `TERM`).
fn signal(gateway: &Gateway, name: &str) {
    let pid = gateway.child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

fn hangup(gateway: &Gateway) {
    signal(gateway, "HUP");
}

#[tokio::test]
async fn sighup_reloads_and_a_bad_file_keeps_the_old_configuration() {
    let sim = sim().await;
    let gateway = start(&sim, "").await;
    assert!(!model_ids(&gateway).await.contains(&"gpt-4.1".to_owned()));
    let path = gateway.dir.join("router.toml");
    let text = std::fs::read_to_string(&path).unwrap();

    // A new model group on the OpenAI endpoint.
    let grown = text.replacen(
        "\"gpt-3.5-turbo-instruct\"]",
        "\"gpt-3.5-turbo-instruct\", \"gpt-4.1\"]",
        1,
    );
    assert_ne!(grown, text);
    std::fs::write(&path, &grown).unwrap();
    hangup(&gateway);
    let mut reloaded = false;
    for _ in 0..100 {
        if model_ids(&gateway).await.contains(&"gpt-4.1".to_owned()) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reloaded, "SIGHUP did not reload");

    // A broken file: refused, the running configuration stays.
    std::fs::write(&path, "[[endpoints]]\nname = \"x\"\nkind = \"nonsense\"\n").unwrap();
    hangup(&gateway);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(model_ids(&gateway).await.contains(&"gpt-4.1".to_owned()));
    let body =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "still there?"}]});
    assert_eq!(
        post(&gateway, "/v1/chat/completions", Some(GATEWAY_KEY), body)
            .await
            .status(),
        200
    );
    let logs = gateway.logs().await;
    assert!(
        logs.contains("reload refused"),
        "the refusal is logged: {logs}"
    );
}

#[tokio::test]
async fn check_probe_reports_each_endpoint() {
    let sim = sim().await;
    let (dir, _) = write_config(&sim, "", 5000);
    let output = Command::new(env!("CARGO_BIN_EXE_openai-router"))
        .args(["check", "--probe", "--config"])
        .arg(dir.join("router.toml"))
        .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        .env("TEST_AZURE_KEY", "az-wrong-key")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "a failed probe fails the check");
    assert!(stdout.contains("oai / gpt-4o-mini: ok"), "{stdout}");
    assert!(
        stdout.contains("oai / text-embedding-3-small: ok"),
        "{stdout}"
    );
    assert!(
        stdout.contains("az / gpt-4o-mini: FAILED (unauthorized)"),
        "{stdout}"
    );
    assert!(!stdout.contains("az-wrong-key"), "no key in the output");
}

/// `check --probe` on a reasoning model, which refuses `max_tokens`: the refusal of the form is
/// not a failure; the check asks again with `max_completion_tokens` and reports ok. A failure
/// after that is still reported.
#[tokio::test]
async fn check_probe_asks_reasoning_models_in_their_form() {
    let sim = Sim::start(
        4,
        [EndpointConfig::new("oai", SimDialect::OpenAi)
            .with_api_key(UPSTREAM_KEY)
            .with_models(["o4-mini"])
            .with_reasoning_models(["o4-mini"])
            .with_latency(LatencyModel::instant())],
    )
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "openai-router-reasoning-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"
[[endpoints]]
name = "oai"
kind = "openai"
url = "{}"
api_key_env = "TEST_UPSTREAM_KEY"
models = ["o4-mini"]
"#,
        sim.endpoints()[0].openai_base_url()
    );
    std::fs::write(dir.join("router.toml"), config).unwrap();
    let check = || async {
        let output = Command::new(env!("CARGO_BIN_EXE_openai-router"))
            .args(["check", "--probe", "--config"])
            .arg(dir.join("router.toml"))
            .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
            .output()
            .await
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (ok, stdout) = check().await;
    assert!(ok, "{stdout}");
    assert!(stdout.contains("oai / o4-mini: ok"), "{stdout}");
    let sent: Vec<_> = sim.endpoints()[0]
        .requests()
        .into_iter()
        .map(|r| r.body)
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0]["max_tokens"], 1, "{sent:?}");
    assert_eq!(sent[1]["max_completion_tokens"], 1, "{sent:?}");
    assert!(sent[1].get("max_tokens").is_none(), "{sent:?}");

    sim.endpoints()[0].inject(
        Fault::status_with_code(429, "insufficient_quota"),
        Times::Always,
    );
    let (ok, stdout) = check().await;
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains("oai / o4-mini: FAILED (quota_exhausted)"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_call() {
    let slow = LatencyModel::new(Duration::from_secs(5), Duration::from_millis(10));
    let sim = Sim::start(
        4,
        [
            EndpointConfig::new("oai", SimDialect::OpenAi)
                .with_api_key(UPSTREAM_KEY)
                .with_latency(slow),
            EndpointConfig::new("az", SimDialect::Azure)
                .with_api_key(AZURE_KEY)
                .with_latency(slow),
        ],
    )
    .await
    .unwrap();
    let gateway = start(&sim, "").await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let request = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .bearer_auth(GATEWAY_KEY)
        .json(&body)
        .timeout(Duration::from_secs(1))
        .send();
    assert!(request.await.is_err(), "the client gives up first");
    let reached: u64 = sim.endpoints().iter().map(|e| e.counters().requests).sum();
    assert_eq!(
        reached, 1,
        "the call reached an upstream before the client left"
    );
    // The gateway drops its call, so the upstream connection closes and nothing is in flight.
    let mut released = false;
    for _ in 0..50 {
        let upstream: u64 = sim.endpoints().iter().map(|e| e.counters().in_flight).sum();
        let metrics = metrics_text(&gateway).await;
        let gateway_in_flight: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("openai_router_in_flight{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if upstream == 0 && gateway_in_flight == 0 {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        released,
        "the upstream call was not cancelled within 1 s (its answer takes 5 s)"
    );
}

async fn metrics_text(gateway: &Gateway) -> String {
    client()
        .get(format!("{}/metrics", gateway.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// No key, of the gateway's or an upstream's, in what the gateway printed.
fn assert_no_secret(logs: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!logs.contains(secret), "a key in the logs");
    }
}

#[tokio::test]
async fn every_route_is_counted_under_a_bounded_model_label() {
    let sim = sim().await;
    let gateway = start(&sim, "").await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        post(&gateway, "/v1/chat/completions", Some(GATEWAY_KEY), chat)
            .await
            .status(),
        200
    );
    let embed = json!({"model": "text-embedding-3-small", "input": "hi"});
    assert_eq!(
        post(&gateway, "/v1/embeddings", Some(GATEWAY_KEY), embed)
            .await
            .status(),
        200
    );
    let complete = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 4});
    assert_eq!(
        post(&gateway, "/v1/completions", Some(GATEWAY_KEY), complete)
            .await
            .status(),
        200
    );
    // Model names the gateway does not serve, each different: one label value for all.
    for i in 0..3 {
        let body = json!({"model": format!("made-up-model-{i}"), "input": "hi"});
        post(&gateway, "/v1/embeddings", Some(GATEWAY_KEY), body).await;
    }
    let unreadable = client()
        .post(format!("{}/v1/completions", gateway.base))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(unreadable.status(), 400);
    let text = metrics_text(&gateway).await;
    for line in [
        r#"openai_router_requests_total{route="chat",model="gpt-4o-mini",status="200"} 1"#,
        r#"openai_router_requests_total{route="embeddings",model="text-embedding-3-small",status="200"} 1"#,
        r#"openai_router_requests_total{route="completions",model="gpt-3.5-turbo-instruct",status="200"} 1"#,
        r#"openai_router_requests_total{route="embeddings",model="unknown",status="403"} 3"#,
        r#"openai_router_requests_total{route="completions",model="unknown",status="400"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(
        !text.contains("made-up-model"),
        "a client's model name became a label"
    );
    assert!(
        text.contains(r#"openai_router_request_duration_seconds_count{route="embeddings"} 4"#),
        "{text}"
    );
    // Every route, not only the API's, by its template; paths that match none and methods a
    // client invents under one value each.
    for path in [
        "/v1/models",
        "/v1/responses/resp_1/input_items",
        "/no/such/route",
        "/nope",
    ] {
        client()
            .get(format!("{}{path}", gateway.base))
            .bearer_auth(GATEWAY_KEY)
            .send()
            .await
            .unwrap();
    }
    client()
        .request(
            reqwest::Method::from_bytes(b"BREW").unwrap(),
            format!("{}/v1/models", gateway.base),
        )
        .send()
        .await
        .unwrap();
    let text = metrics_text(&gateway).await;
    for line in [
        r#"openai_router_http_requests_total{route="/v1/models",method="GET",status="200"} 1"#,
        r#"openai_router_http_requests_total{route="/v1/models",method="other",status="405"} 1"#,
        r#"openai_router_http_requests_total{route="/healthz",method="GET",status="200"}"#,
        r#"openai_router_http_requests_total{route="unmatched",method="GET",status="404"} 2"#,
        r#"openai_router_http_requests_total{route="/v1/chat/completions",method="POST",status="200"} 1"#,
        r#"openai_router_http_requests_total{route="/v1/responses/{id}/input_items",method="GET","#,
        "openai_router_queue_wait_seconds_count 3",
    ] {
        assert!(
            text.contains(line),
            "missing {line} in
{text}"
        );
    }
    assert!(!text.contains("resp_1") && !text.contains("BREW") && !text.contains("/nope"));
}

/// A forward proxy on loopback: records each connection's first request line and pipes the
/// connection to the target it names.
async fn forward_proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let record = std::sync::Arc::clone(&record);
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let n = client.peek(&mut head).await.unwrap();
                let line = String::from_utf8_lossy(&head[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                record.lock().unwrap().push(line.clone());
                // `POST http://127.0.0.1:PORT/v1/... HTTP/1.1`: the upstream accepts the
                // absolute form as it is.
                let target = line
                    .split(' ')
                    .nth(1)
                    .and_then(|url| url.strip_prefix("http://"))
                    .and_then(|rest| rest.split('/').next())
                    .unwrap()
                    .to_owned();
                let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (address, seen)
}

#[tokio::test]
async fn upstream_calls_go_through_the_proxy_the_environment_names() {
    let sim = sim().await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});

    let (proxy, seen) = forward_proxy().await;
    let env = [("HTTP_PROXY", proxy.clone())];
    let gateway = start_in(&sim, "", 5000, &env).await;
    for _ in 0..2 {
        let response = post(
            &gateway,
            "/v1/chat/completions",
            Some(GATEWAY_KEY),
            chat.clone(),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    let lines = seen.lock().unwrap().clone();
    assert!(!lines.is_empty(), "no upstream call went through the proxy");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("POST http://127.0.0.1:") && l.contains("/chat/completions")),
        "{lines:?}"
    );
    drop(gateway);

    // NO_PROXY names the upstreams' host: they are called directly.
    let (proxy, seen) = forward_proxy().await;
    let env = [("HTTP_PROXY", proxy), ("NO_PROXY", "127.0.0.1".to_owned())];
    let gateway = start_in(&sim, "", 5000, &env).await;
    let response = post(&gateway, "/v1/chat/completions", Some(GATEWAY_KEY), chat).await;
    assert_eq!(response.status(), 200);
    assert!(seen.lock().unwrap().is_empty(), "NO_PROXY was not honoured");
}

/// One relayed stream, checked: every event a JSON chunk of the same completion (nothing
/// spliced from another stream), content tokens each once and in order, at most one usage
/// chunk (only when asked for, and last), one `[DONE]` at the very end.
fn check_stream(text: &str, tokens: usize, usage_asked: bool) -> Result<(), String> {
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    if events.last() != Some(&"data: [DONE]") {
        return Err(format!("does not end with [DONE]: {text}"));
    }
    let (mut ids, mut content, mut usage) = (Vec::new(), Vec::new(), 0);
    for event in &events[..events.len() - 1] {
        let data = event
            .strip_prefix("data: ")
            .ok_or(format!("not a data event: {event}"))?;
        let chunk: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        // Azure's prompt-filter annotation has no id of its own.
        if let Some(id) = chunk["id"].as_str().filter(|id| !id.is_empty()) {
            ids.push(id.to_owned());
        }
        if chunk["usage"].is_object() && chunk["choices"].as_array().is_some_and(Vec::is_empty) {
            usage += 1;
            continue;
        }
        if usage > 0 {
            return Err("a chunk after the usage chunk".to_owned());
        }
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str()
            && !text.is_empty()
        {
            content.push(text.to_owned());
        }
    }
    ids.dedup();
    if ids.len() != 1 {
        return Err(format!("chunks of several completions: {ids:?}"));
    }
    if content.concat().split_whitespace().count() != tokens {
        return Err(format!(
            "{} tokens, not {tokens}: {content:?}",
            content.len()
        ));
    }
    if usage != usize::from(usage_asked) {
        return Err(format!("{usage} usage chunks"));
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_streams_are_relayed_whole_and_unmixed() {
    let sim = sim().await;
    let gateway = start_in(&sim, "", 5000, &[("RUST_LOG", "warn".to_owned())]).await;
    let mut tasks = Vec::new();
    for i in 0..120_usize {
        let base = gateway.base.clone();
        tasks.push(tokio::spawn(async move {
            let usage_asked = i % 3 == 0;
            let mut body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 4 + i % 9,
                "messages": [{"role": "user", "content": "hi"}]});
            if usage_asked {
                body["stream_options"] = json!({"include_usage": true});
            }
            let response = tokio::time::timeout(
                Duration::from_secs(10),
                client()
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(GATEWAY_KEY)
                    .json(&body)
                    .send(),
            )
            .await
            .map_err(|_| "no headers".to_owned())?
            .unwrap();
            assert_eq!(response.status(), 200);
            let text = tokio::time::timeout(Duration::from_secs(10), response.text())
                .await
                .map_err(|_| "no body".to_owned())?
                .unwrap();
            check_stream(&text, 4 + i % 9, usage_asked)
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        if let Err(problem) = task.await.unwrap() {
            panic!("stream {i}: {problem}");
        }
    }
}

#[test]
fn the_stream_check_catches_splices_duplicates_and_a_missing_done() {
    let chunk = |id: &str, text: &str| {
        format!(
            "data: {}\n\n",
            json!({"id": id, "choices": [{"index": 0, "delta": {"content": text}}]})
        )
    };
    let good = format!(
        "{}{}data: [DONE]\n\n",
        chunk("a", "one "),
        chunk("a", "two")
    );
    assert_eq!(check_stream(&good, 2, false), Ok(()));
    let spliced = format!(
        "{}{}data: [DONE]\n\n",
        chunk("a", "one "),
        chunk("b", "two")
    );
    assert!(check_stream(&spliced, 2, false).is_err());
    let doubled = format!(
        "{}{}{}data: [DONE]\n\n",
        chunk("a", "one "),
        chunk("a", "two "),
        chunk("a", "two")
    );
    assert!(check_stream(&doubled, 2, false).is_err());
    let unfinished = format!("{}{}", chunk("a", "one "), chunk("a", "two"));
    assert!(check_stream(&unfinished, 2, false).is_err());
}

/// A caller's `x-ms-spillover-deployment` reaches the Azure endpoint, and only it.
#[tokio::test]
async fn the_callers_spillover_deployment_reaches_azure() {
    let sim = sim().await;
    let gateway = start(&sim, "").await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..4 {
        let response = client()
            .post(format!("{}/v1/chat/completions", gateway.base))
            .bearer_auth(GATEWAY_KEY)
            .header("x-ms-spillover-deployment", "standard-dep")
            .json(&chat)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let seen: Vec<_> = sim
        .endpoints()
        .iter()
        .map(|e| e.last_request().unwrap())
        .collect();
    let azure = seen
        .iter()
        .find(|r| r.path.starts_with("/openai/"))
        .unwrap();
    let openai = seen.iter().find(|r| r.path.starts_with("/v1/")).unwrap();
    assert_eq!(
        azure.header("x-ms-spillover-deployment"),
        Some("standard-dep")
    );
    assert_eq!(openai.header("x-ms-spillover-deployment"), None);
}

/// A self-signed certificate for `localhost`, written as `NAME.pem` and `NAME.key` into `dir`;
/// returns the certificate's PEM.
fn write_certificate(dir: &std::path::Path, name: &str) -> String {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let pem = issued.cert.pem();
    std::fs::write(dir.join(format!("{name}.pem")), &pem).unwrap();
    std::fs::write(
        dir.join(format!("{name}.key")),
        issued.signing_key.serialize_pem(),
    )
    .unwrap();
    pem
}

/// A client that trusts `pem` alone.
fn trusting(pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
        .resolve("localhost", std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .build()
        .unwrap()
}

/// HTTPS on the listener: requests are served over TLS with the configured certificate, plain
/// HTTP is not, a client that never completes its handshake is closed after the head timeout,
/// and SIGHUP serves a renewed certificate to new connections.
#[tokio::test]
async fn the_listener_serves_tls_and_rereads_its_certificate_on_sighup() {
    use tokio::io::AsyncWriteExt as _;
    let sim = sim().await;
    let certs = std::env::temp_dir().join(format!("openai-router-tls-{}", free_port()));
    std::fs::create_dir_all(&certs).unwrap();
    let first = write_certificate(&certs, "server");
    let server = format!(
        "header_read_timeout_ms = 400\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
        certs.join("server.pem").display(),
        certs.join("server.key").display()
    );
    let gateway = start_serving(&sim, "", 5000, &[], &server).await;
    assert!(gateway.base.starts_with("https://"), "{}", gateway.base);
    let chat = |client: reqwest::Client| {
        let url = format!("{}/v1/chat/completions", gateway.base);
        async move {
            client
                .post(url)
                .bearer_auth(GATEWAY_KEY)
                .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
        }
    };
    let answer = chat(trusting(&first)).await.unwrap();
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let port = gateway.base.rsplit(':').next().unwrap().to_owned();
    let plain = client()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // A connection that never sends its ClientHello is closed after the head timeout.
    let mut silent = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a silent TLS client still holds its socket");
    let _ = silent.shutdown().await;

    // A renewed certificate, reread on SIGHUP: new connections get it.
    let second = write_certificate(&certs, "server");
    hangup(&gateway);
    let mut renewed = false;
    for _ in 0..100 {
        if chat(trusting(&second)).await.is_ok() {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        renewed,
        "the renewed certificate was not served after SIGHUP"
    );
    assert!(
        chat(trusting(&first)).await.is_err(),
        "the old certificate is still served"
    );

    // A key file that does not load is refused; the renewed certificate stays.
    std::fs::write(certs.join("server.key"), "not a key").unwrap();
    hangup(&gateway);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(chat(trusting(&second)).await.unwrap().status(), 200);
    let logs = gateway.logs().await;
    assert!(
        logs.contains("server.tls.key_file"),
        "the refused reload does not name the field"
    );
    let _ = std::fs::remove_dir_all(&certs);
}

/// SIGTERM drains: the listener closes at once, streams in flight run to their end, and the
/// process exits; a stream longer than the grace period is cut when it runs out.
#[tokio::test]
async fn sigterm_drains_streams_in_flight_then_exits() {
    let sim = sim().await;
    let pace = |per_token: u64| {
        for endpoint in sim.endpoints() {
            endpoint.set_latency(LatencyModel::new(
                Duration::from_millis(5),
                Duration::from_millis(per_token),
            ));
        }
    };
    // A stream's headers leave the gateway after the upstream's first event: once they are
    // in, the stream is in flight.
    let stream = |base: String| async move {
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(GATEWAY_KEY)
            .json(
                &json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 16,
                "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response
    };

    // Three streams of 16 tokens (about 0.8 s each), then SIGTERM.
    pace(50);
    let mut gateway = start_serving(&sim, "", 10_000, &[("RUST_LOG", "info".to_owned())], "").await;
    let mut in_flight = Vec::new();
    for _ in 0..3 {
        in_flight.push(tokio::spawn(stream(gateway.base.clone()).await.bytes()));
    }
    signal(&gateway, "TERM");
    let address = gateway.base.trim_start_matches("http://").to_owned();
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&address).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "new connections are still accepted after SIGTERM");
    for task in in_flight {
        let text = task.await.unwrap().unwrap();
        check_stream(std::str::from_utf8(&text).unwrap(), 16, false).unwrap();
    }
    let status = tokio::time::timeout(Duration::from_secs(10), gateway.child.wait())
        .await
        .expect("the gateway did not exit after draining")
        .unwrap();
    assert!(status.success(), "{status}");

    // A grace of 300 ms and a stream of 16 tokens at 600 ms each: cut, and the process exits.
    pace(600);
    let mut gateway = start_serving(
        &sim,
        "",
        30_000,
        &[("RUST_LOG", "info".to_owned())],
        "drain_grace_ms = 300",
    )
    .await;
    let long = tokio::spawn(stream(gateway.base.clone()).await.bytes());
    let started = std::time::Instant::now();
    signal(&gateway, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(5), gateway.child.wait())
        .await
        .expect("the gateway outlived its drain grace period")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let cut = match long.await.unwrap() {
        Ok(text) => check_stream(std::str::from_utf8(&text).unwrap(), 16, false).is_err(),
        Err(_) => true,
    };
    assert!(cut, "the long stream ended whole within a 300 ms grace");
    let mut logs = String::new();
    let mut stderr = gateway.child.stderr.take().unwrap();
    stderr.read_to_string(&mut logs).await.unwrap();
    let mut stdout = gateway.child.stdout.take().unwrap();
    stdout.read_to_string(&mut logs).await.unwrap();
    assert!(logs.contains("drain grace period"), "{logs}");
}

/// A field of the gateway's `/proc/PID/status` in MiB (`VmRSS`, `VmHWM`).
fn memory_mib(gateway: &Gateway, field: &str) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", gateway.child.id().unwrap())).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 1024.0
}

/// Starts the gateway's peak resident set (`VmHWM`) over from its resident set now.
fn reset_peak_rss(gateway: &Gateway) {
    let path = format!("/proc/{}/clear_refs", gateway.child.id().unwrap());
    std::fs::write(&path, "5").unwrap_or_else(|e| panic!("resetting {path}: {e}"));
}

/// A 50 MB answer from upstream, plain or as one stream event, is refused at the limit
/// (`max_answer_bytes`, 1 MiB here) with an OpenAI-shaped 502 naming it, and refusing more of
/// them does not raise the gateway's peak resident set by anything near the answer's size
/// (7-10 MiB over two rounds under mimalloc, 2 under glibc; relaying the answers whole
/// raises it by about 150 MiB).
///
/// The first round warms up: the allocator commits its first arena then (mimalloc, about 20
/// MiB here, once), and the connection pools fill. mimalloc is told to give freed memory back at
/// once (`MIMALLOC_PURGE_DELAY=0`), so a later round that buffered an answer would have to touch
/// fresh pages and would raise the peak, even if it freed them before the measurement.
#[tokio::test]
async fn a_huge_upstream_answer_is_refused_without_being_buffered() {
    let sim = sim().await;
    let gateway = start_in(
        &sim,
        "",
        10_000,
        &[
            ("RUST_LOG", "warn".to_owned()),
            ("MIMALLOC_PURGE_DELAY", "0".to_owned()),
        ],
    )
    .await;
    let path = gateway.dir.join("router.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("[router]\n", "[router]\nmax_answer_bytes = 1048576\n", 1),
    )
    .unwrap();
    hangup(&gateway);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for endpoint in sim.endpoints() {
        endpoint.inject(Fault::Oversized(50 * 1024 * 1024), Times::Always);
    }
    let mut before = 0.0;
    for round in 0..3 {
        if round == 1 {
            before = memory_mib(&gateway, "VmRSS");
            reset_peak_rss(&gateway);
        }
        for stream in [false, true] {
            let answer = post(
                &gateway,
                "/v1/chat/completions",
                Some(GATEWAY_KEY),
                json!({"model": "gpt-4o-mini", "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
            assert_eq!(answer.status(), 502, "stream: {stream}");
            let body: Value = answer.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("1048576"), "stream: {stream}: {message}");
        }
    }
    let peak = memory_mib(&gateway, "VmHWM") - before;
    assert!(
        peak < 24.0,
        "the gateway's peak resident set rose by {peak:.1} MiB over two rounds of 50 MB answers"
    );
}

/// A 200 whose body is broken (malformed JSON, an HTML page) fails over to the other
/// endpoint through the gateway too, plain and streamed. (The chaos soak found such requests
/// answered 502 after one upstream call.)
#[tokio::test]
async fn a_malformed_answer_fails_over_through_the_gateway() {
    let sim = sim().await;
    let gateway = start_in(&sim, "", 5000, &[("RUST_LOG", "warn".to_owned())]).await;
    for fault in [Fault::MalformedJson, Fault::WrongContentType] {
        sim.endpoints()[0].inject(fault.clone(), Times::Always);
        for stream in [false, true, false, true] {
            let answer = post(
                &gateway,
                "/v1/chat/completions",
                Some(GATEWAY_KEY),
                json!({"model": "gpt-4o-mini", "stream": stream, "metadata": {"k": "v"},
                    "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
            let status = answer.status();
            let text = answer.text().await.unwrap();
            assert_eq!(status, 200, "{fault:?}, stream {stream}: {text}");
        }
        sim.endpoints()[0].clear_faults();
    }
}

async fn status_json(gateway: &Gateway) -> Value {
    let response = client()
        .get(format!("{}/status.json", gateway.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Every deployment `/status.json` lists, with its `endpoint/deployment` name.
fn deployments(status: &Value) -> impl Iterator<Item = (String, &Value)> {
    status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["deployments"].as_array().unwrap())
        .map(|d| {
            let place = format!(
                "{}/{}",
                d["endpoint"].as_str().unwrap(),
                d["deployment"].as_str().unwrap()
            );
            (place, d)
        })
}

/// The `endpoint/deployment` names `/status.json` lists, sorted.
fn places(status: &Value) -> Vec<String> {
    let mut places: Vec<String> = deployments(status).map(|(place, _)| place).collect();
    places.sort();
    places
}

/// The state `/status.json` gives `endpoint/deployment`.
fn deployment_in<'v>(status: &'v Value, place: &str) -> &'v Value {
    deployments(status)
        .find(|(name, _)| name == place)
        .map_or_else(|| panic!("{place} is not in {status}"), |(_, d)| d)
}

/// `/status.json` (to a loopback client, as configured by default) names every deployment of
/// every group, counts what they served with the last minute's latency, and shows a 429's
/// cooldown with why and until when, and the error in the last minute's; `/status` is the
/// page. With an admin key configured, both need it.
#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one gateway's status walked through, then the admin key's"
)]
async fn the_status_shows_every_deployment_and_a_cooldown_as_it_happens() {
    let sim = sim().await;
    let gateway = start(&sim, "").await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "status"}]});
    for _ in 0..4 {
        let response = post(
            &gateway,
            "/v1/chat/completions",
            Some(GATEWAY_KEY),
            chat.clone(),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    let status = status_json(&gateway).await;
    assert_eq!(
        places(&status),
        [
            "az/emb-dep",
            "az/mini-dep",
            "oai/gpt-3.5-turbo-instruct",
            "oai/gpt-4o-mini",
            "oai/text-embedding-3-small"
        ]
    );
    for place in ["oai/gpt-4o-mini", "az/mini-dep"] {
        let d = deployment_in(&status, place);
        assert_eq!(d["state"], "ready", "{d}");
        assert_eq!(d["served"], 2, "round robin: {d}");
        assert_eq!(d["last_minute"]["answers"], 2, "{d}");
        assert!(d["last_minute"]["p99_ms"].as_f64().unwrap() > 0.0, "{d}");
    }
    // A 429 with a 30 s wait from `oai`: the request goes to `az`, and `oai` cools down.
    sim.endpoints()[0].inject(Fault::rate_limited(Duration::from_secs(30)), Times::Next(1));
    for _ in 0..2 {
        let response = post(
            &gateway,
            "/v1/chat/completions",
            Some(GATEWAY_KEY),
            chat.clone(),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    let status = status_json(&gateway).await;
    let cooling = deployment_in(&status, "oai/gpt-4o-mini");
    assert_eq!(cooling["state"], "cooling", "{cooling}");
    assert!(
        cooling["why"].as_str().unwrap().contains("429"),
        "{cooling}"
    );
    let until = cooling["until_s"].as_f64().unwrap();
    assert!(until > 20.0 && until <= 30.0, "{cooling}");
    assert_eq!(
        cooling["errors_last_minute"]["rate_limited"], 1,
        "{cooling}"
    );
    assert_eq!(deployment_in(&status, "az/mini-dep")["state"], "ready");

    let page = client()
        .get(format!("{}/status", gateway.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("status.json"));
    drop(gateway);

    // With an admin key: nobody without it, loopback included.
    let admin = "sk-gw-admin-5f0e";
    let gateway = start_serving(
        &sim,
        "",
        5000,
        &[],
        &format!("admin_key_sha256 = \"{}\"", hash(admin)),
    )
    .await;
    let get = |auth: Option<&str>| {
        let mut request = client().get(format!("{}/status.json", gateway.base));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let refused = get(None).await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().contains_key("www-authenticate"));
    assert_eq!(get(Some("Bearer wrong")).await.unwrap().status(), 401);
    assert_eq!(
        get(Some(&format!("Bearer {admin}")))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get(Some(GATEWAY_KEY)).await.unwrap().status(),
        401,
        "a gateway key is not the admin key"
    );
}

/// A `WebDriver` session on Debian's headless Chromium, through `chromedriver` (`cargo xtask
/// ci` installs both when missing).
struct Browser {
    _driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver did not start ({e}): install Debian's chromium and \
                     chromium-driver (`cargo xtask ci` does when it runs as root)"
                )
            });
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        for _ in 0..250 {
            if http.get(format!("{base}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut options = json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--window-size=1500,1000"]});
        if std::path::Path::new("/usr/bin/chromium").is_file() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let created: Value = http
            .post(format!("{base}/session"))
            .json(
                &json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
                "goog:chromeOptions": options, "goog:loggingPrefs": {"browser": "ALL"}}}}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_owned();
        Self {
            _driver: driver,
            base,
            session,
            http,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        assert!(
            answer["value"].get("error").is_none(),
            "webdriver {path}: {answer}"
        );
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn run(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// The console's entries since the last call.
    async fn console(&self) -> Vec<Value> {
        self.call(
            reqwest::Method::POST,
            "/se/log",
            Some(json!({"type": "browser"})),
        )
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap()
    }

    /// The page's deployment rows: `endpoint/deployment` and state.
    async fn rows(&self) -> Vec<(String, String)> {
        let rows = self
            .run(
                "return Array.from(document.querySelectorAll('tr[data-deployment]'))\
                 .map(r => [r.dataset.deployment, r.dataset.state]);",
            )
            .await;
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_owned(),
                    r[1].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Waits (at most 20 s) until `place`'s row is in a state `wanted` accepts.
    async fn wait_for(&self, place: &str, wanted: impl Fn(&str) -> bool) -> String {
        for _ in 0..200 {
            if let Some((_, state)) = self.rows().await.into_iter().find(|(p, _)| p == place)
                && wanted(&state)
            {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{place} never reached the state wanted: {:?}",
            self.rows().await
        );
    }
}

/// The status page in a real browser (headless Chromium): it loads with no console error,
/// shows every deployment, and follows a simulated endpoint's 429: the cooling row appears,
/// then clears when the cooldown ends. A screenshot is left in the test's scratch folder.
#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one browser session: load, every row, the chart, a cooldown, the console"
)]
async fn the_status_page_in_a_browser_follows_a_cooldown() {
    let sim = sim().await;
    // Quiet logs: the page polls once a second.
    let gateway = start_in(&sim, "", 5000, &[("RUST_LOG", "warn".to_owned())]).await;
    let chat =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "browser"}]});
    for _ in 0..6 {
        let response = post(
            &gateway,
            "/v1/chat/completions",
            Some(GATEWAY_KEY),
            chat.clone(),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    // Steady traffic while the page is watched, so that its chart has something to show.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (base, stop, chat) = (
            gateway.base.clone(),
            std::sync::Arc::clone(&stop),
            chat.clone(),
        );
        tokio::spawn(async move {
            let client = client();
            let mut sent = 0_u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 2_000 {
                let response = client
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(GATEWAY_KEY)
                    .json(&chat)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                sent += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            sent
        })
    };
    let browser = Browser::start().await;
    browser.open(&format!("{}/status", gateway.base)).await;
    let expected = places(&status_json(&gateway).await);
    let mut shown = Vec::new();
    for _ in 0..100 {
        shown = browser.rows().await.into_iter().map(|(p, _)| p).collect();
        shown.sort();
        if shown == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(shown, expected, "every deployment has a row");
    assert_eq!(
        browser.wait_for("oai/gpt-4o-mini", |s| s == "ready").await,
        "ready"
    );
    // The traffic chart fills once two samples of the counters are taken (5 s apart).
    let mut bars = 0;
    for _ in 0..150 {
        bars = browser
            .run("return document.querySelectorAll('section[data-model=\"gpt-4o-mini\"] svg rect').length;")
            .await
            .as_u64()
            .unwrap();
        if bars > 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bars > 1, "the traffic chart stayed empty");

    // `oai` answers one 429 with a 3 s wait: its row shows the cooldown, then clears.
    sim.endpoints()[0].inject(Fault::rate_limited(Duration::from_secs(3)), Times::Next(1));
    for _ in 0..2 {
        let response = post(
            &gateway,
            "/v1/chat/completions",
            Some(GATEWAY_KEY),
            chat.clone(),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    browser
        .wait_for("oai/gpt-4o-mini", |s| s == "cooling")
        .await;
    let shot = browser.screenshot().await;
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &shot).unwrap();
    let after = browser
        .wait_for("oai/gpt-4o-mini", |s| s != "cooling")
        .await;
    assert!(after == "ready" || after == "half-open", "{after}");

    let errors: Vec<Value> = browser
        .console()
        .await
        .into_iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(load.await.unwrap() > 0);
    browser.call(reqwest::Method::DELETE, "", None).await;
}

/// A span an OTLP collector received: its name, trace id, span id and parent span id (hex).
#[derive(Debug, Clone)]
struct Exported {
    name: String,
    trace: String,
    span: String,
    parent: String,
}

/// An OTLP/HTTP collector on loopback (protobuf bodies on `/v1/traces`): its base URL and the
/// spans it received.
async fn collector() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Exported>>>) {
    use prost::Message as _;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = std::sync::Arc::clone(&received);
    let hex = |bytes: &[u8]| {
        bytes.iter().fold(String::new(), |mut out, b| {
            let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{b:02x}"));
            out
        })
    };
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = std::sync::Arc::clone(&store);
            async move {
                let request = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body)
                    .unwrap();
                let mut spans = store.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            spans.push(Exported {
                                name: span.name,
                                trace: hex(&span.trace_id),
                                span: hex(&span.span_id),
                                parent: hex(&span.parent_span_id),
                            });
                        }
                    }
                }
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, received)
}

/// With the standard OTLP environment set, the gateway exports its spans: the answer's
/// `http` span as a child of the caller's `traceparent` span, the router's `request` span
/// inside it and an `attempt` span inside that, all in the caller's trace.
#[tokio::test]
async fn spans_are_exported_over_otlp_in_the_callers_trace() {
    let sim = sim().await;
    let (endpoint, received) = collector().await;
    let gateway = start_in(
        &sim,
        "",
        5000,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ],
    )
    .await;
    let (trace, parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let response = client()
        .post(format!("{}/v1/chat/completions", gateway.base))
        .bearer_auth(GATEWAY_KEY)
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "export"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut spans = Vec::new();
    for _ in 0..150 {
        spans = received
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == trace)
            .cloned()
            .collect();
        if ["http", "request", "attempt"]
            .iter()
            .all(|name| spans.iter().any(|s| s.name == *name))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let named = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in the caller's trace: {spans:?}"))
            .clone()
    };
    let (http, request, attempt) = (named("http"), named("request"), named("attempt"));
    assert_eq!(http.parent, parent, "the caller's span is the parent");
    assert_eq!(request.parent, http.span);
    assert_eq!(attempt.parent, request.span);
}

/// An upstream key revoked: the endpoint goes out (told once in the log, however many
/// requests met it), `/metrics` and `/status.json` say why and when the next probe comes, no
/// caller's request goes there; the key restored and the same configuration reloaded with
/// SIGHUP, it is probed at once and back, without waiting for its next probe.
#[tokio::test]
async fn a_revoked_key_goes_out_and_a_reload_brings_it_back() {
    let sim = sim().await;
    let oai = sim.endpoints()[0].clone();
    // Probes a minute apart: only the reload can bring it back within the test.
    let gateway = start(&sim, "[router.health]\nprobe_interval_ms = 60000\n").await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "out"}]});
    let send = || {
        post(
            &gateway,
            "/v1/chat/completions",
            Some(GATEWAY_KEY),
            chat.clone(),
        )
    };
    oai.set_api_key(Some("sk-revoked"));
    for response in futures_util::future::join_all((0..6).map(|_| send())).await {
        assert_eq!(response.status(), 200, "served by the Azure endpoint");
    }
    let status = status_json(&gateway).await;
    let out = deployment_in(&status, "oai/gpt-4o-mini");
    assert_eq!(out["out"]["why"], "unauthorized", "{out}");
    let next = out["out"]["next_probe_in_s"].as_f64().unwrap();
    assert!((40.0..=70.0).contains(&next), "{out}");
    assert!(
        out["why"].as_str().unwrap().contains("out until a probe"),
        "{out}"
    );
    let metrics = metrics_text(&gateway).await;
    assert!(
        metrics.contains(
            "openai_router_deployment_out{endpoint=\"oai\",model=\"gpt-4o-mini\",deployment=\"gpt-4o-mini\",why=\"unauthorized\"} 1"
        ),
        "{metrics}"
    );
    let probe_line = metrics
        .lines()
        .find(|l| {
            l.starts_with("openai_router_next_probe_seconds{endpoint=\"oai\",model=\"gpt-4o-mini\"")
        })
        .unwrap();
    let seconds: f64 = probe_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(seconds > 30.0, "{probe_line}");
    let callers = |oai: &upstream_sim::SimEndpoint| {
        oai.requests()
            .iter()
            .filter(|r| r.body.to_string().contains("\"out\""))
            .count()
    };
    let before = callers(&oai);
    for _ in 0..4 {
        let response = send().await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(callers(&oai), before, "no caller's request while out");

    // Fixed upstream; the operator reloads the same file.
    oai.set_api_key(Some(UPSTREAM_KEY));
    hangup(&gateway);
    let mut back = false;
    for _ in 0..150 {
        let status = status_json(&gateway).await;
        if deployment_in(&status, "oai/gpt-4o-mini")["out"].is_null() {
            let oai = deployment_in(&status, "oai/gpt-4o-mini");
            assert_eq!(oai["last_probe"]["outcome"], "served");
            // In its state since it came back: since the reload, well after the start, where
            // the Azure deployment's state began.
            let az = deployment_in(&status, "az/mini-dep");
            let (back_for, az_for) = (
                oai["state_for_s"].as_f64().unwrap(),
                az["state_for_s"].as_f64().unwrap(),
            );
            assert!(back_for < 5.0 && back_for <= az_for, "{oai} {az}");
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the reload did not probe it back");
    let metrics = metrics_text(&gateway).await;
    assert!(
        metrics.contains(
            "openai_router_last_probe_served{endpoint=\"oai\",model=\"gpt-4o-mini\",deployment=\"gpt-4o-mini\",failed=\"\"} 1"
        ),
        "{metrics}"
    );
    let mut to_oai = 0;
    for _ in 0..6 {
        let response = send().await;
        assert_eq!(response.status(), 200);
        if response.headers()["x-openai-router-endpoint"] == "oai" {
            to_oai += 1;
        }
    }
    assert!(to_oai >= 2, "{to_oai} of 6 went to the endpoint back");
    let logs = gateway.logs().await;
    let told = logs
        .lines()
        .filter(|l| l.contains("deployment out") && l.contains("oai"))
        .count();
    assert_eq!(told, 1, "one line when it went out");
    assert!(logs.contains("probe served"), "the return is logged");
    assert_no_secret(&logs, &[UPSTREAM_KEY, GATEWAY_KEY]);
}
