//! The OpenAI-compatible HTTP server over the router.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use router_facade::types::{
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ErrorResponse,
};
use router_facade::{Error, ErrorKind, RequestOptions, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, GatewayKey, digest};

/// What the handlers share.
pub(crate) struct AppState {
    pub(crate) router: Router,
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) keys: ArcSwap<Vec<GatewayKey>>,
    pub(crate) config_path: Option<PathBuf>,
}

/// The routes.
pub(crate) fn app(state: Arc<AppState>, body_limit: usize) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route",
                "invalid_request_error",
                Some("not_found"),
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// An OpenAI-shaped error answer.
fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = ErrorResponse::new(message, kind, code);
    (status, axum::Json(body)).into_response()
}

/// Maps a router error to the status and body an OpenAI client expects.
fn router_error(e: &Error) -> Response {
    let (status, kind, code) = match e.kind() {
        ErrorKind::UnknownModel => (
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
        ),
        ErrorKind::Throttled | ErrorKind::RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        ),
        ErrorKind::BadRequest
        | ErrorKind::ContentFilter
        | ErrorKind::ContextLengthExceeded
        | ErrorKind::Unprocessable => {
            // The caller's request is at fault: the upstream's own answer, as it was.
            let status = e
                .status()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            if let Some(body) = e.body() {
                let upstream = ErrorResponse {
                    error: body.clone(),
                    extra: router_facade::types::Extra::default(),
                };
                return (status, axum::Json(upstream)).into_response();
            }
            (status, "invalid_request_error", None)
        }
        ErrorKind::InvalidRequest => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
        ErrorKind::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("no_deployment_available"),
        ),
        ErrorKind::DeadlineExceeded | ErrorKind::Timeout => {
            (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("timeout"))
        }
        _ => (
            StatusCode::BAD_GATEWAY,
            "server_error",
            Some("upstream_error"),
        ),
    };
    let mut response = error(status, &e.to_string(), kind, code);
    if let Some(wait) = e
        .retry_after()
        .filter(|_| status == StatusCode::TOO_MANY_REQUESTS)
    {
        let headers = response.headers_mut();
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
            headers.insert(header::RETRY_AFTER, value);
        }
        if let Ok(value) = HeaderValue::from_str(&wait.as_millis().to_string()) {
            headers.insert("retry-after-ms", value);
        }
    }
    response
}

/// Who is calling: the key's name, or `None` when no keys are configured.
#[expect(clippy::result_large_err, reason = "the error is the answer to send")]
fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    model: &str,
) -> Result<Option<String>, Response> {
    let keys = state.keys.load();
    if keys.is_empty() {
        return Ok(None);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()));
    let Some(presented) = presented else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing API key: send Authorization: Bearer <key>",
            "invalid_request_error",
            Some("invalid_api_key"),
        ));
    };
    let wanted = digest(presented.trim());
    // Compare every digest in full, whichever matches: no early exit to time.
    let mut found: Option<&GatewayKey> = None;
    for key in keys.iter() {
        let same = key
            .digest
            .iter()
            .zip(wanted.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if same {
            found = Some(key);
        }
    }
    let Some(key) = found else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "invalid API key",
            "invalid_request_error",
            Some("invalid_api_key"),
        ));
    };
    if !key.models.is_empty() && !key.models.iter().any(|m| m == model) {
        return Err(error(
            StatusCode::FORBIDDEN,
            &format!("this key may not use model `{model}`"),
            "invalid_request_error",
            Some("model_not_allowed"),
        ));
    }
    Ok(Some(key.name.clone()))
}

/// The body, or the OpenAI-shaped answer to a body that could not be read (too large: 413).
#[expect(clippy::result_large_err, reason = "the error is the answer to send")]
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Response> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let code = (status == StatusCode::PAYLOAD_TOO_LARGE).then_some("request_too_large");
        error(
            status,
            &rejection.body_text(),
            "invalid_request_error",
            code,
        )
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("the body is not a valid request: {e}"),
            "invalid_request_error",
            None,
        )
    })
}

fn options(caller: Option<String>) -> RequestOptions {
    let mut options = RequestOptions::default();
    if let Some(caller) = caller {
        options = options.with_caller(caller);
    }
    options
}

fn json<T: Serialize>(body: &T) -> Response {
    axum::Json(body).into_response()
}

async fn chat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = std::time::Instant::now();
    let request: ChatCompletionRequest = match parse(body) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let response = chat_answer(&state, &headers, &request, started).await;
    state.metrics.answered(
        "chat",
        &request.model,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

async fn chat_answer(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    request: &ChatCompletionRequest,
    started: std::time::Instant,
) -> Response {
    let caller = match authenticate(state, headers, &request.model) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let options = options(caller);
    if request.is_stream() {
        return match state.router.chat_stream_with(request, &options).await {
            Ok(stream) => {
                state.metrics.retried(stream.attempts());
                sse(stream, Arc::clone(state), started)
            }
            Err(e) => router_error(&e),
        };
    }
    match state.router.chat_with(request, &options).await {
        Ok(answer) => {
            state.metrics.retried(answer.attempts);
            json(&answer.body)
        }
        Err(e) => router_error(&e),
    }
}

/// Relays a stream as server-sent events, each event written as soon as it arrives.
fn sse(
    stream: router_facade::RouterStream,
    state: Arc<AppState>,
    started: std::time::Instant,
) -> Response {
    let mut first = true;
    let events = stream
        .map(move |item| {
            let frame = match item {
                Ok(chunk) => match serde_json::to_string(&chunk) {
                    Ok(json) if first && chunk.has_content() => {
                        first = false;
                        state.metrics.first_token(started.elapsed());
                        format!("data: {json}\n\n")
                    }
                    Ok(json) => format!("data: {json}\n\n"),
                    Err(e) => format!(
                        "data: {}\n\n",
                        error_event(&format!("cannot encode a chunk: {e}"))
                    ),
                },
                // An error after the first byte: an error event, as OpenAI sends one.
                Err(e) => format!("data: {}\n\n", error_event(&e.to_string())),
            };
            Ok::<_, Infallible>(Bytes::from(frame))
        })
        .chain(futures_util::stream::once(async {
            Ok(Bytes::from_static(b"data: [DONE]\n\n"))
        }));
    let mut response = Response::new(Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn error_event(message: &str) -> String {
    serde_json::to_string(&ErrorResponse::new(message, "server_error", None)).unwrap_or_default()
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: EmbeddingRequest = match parse(body) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let caller = match authenticate(&state, &headers, &request.model) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    match state
        .router
        .embeddings_with(&request, &options(caller))
        .await
    {
        Ok(answer) => json(&answer.body),
        Err(e) => router_error(&e),
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: CompletionRequest = match parse(body) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let caller = match authenticate(&state, &headers, &request.model) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    if request.stream == Some(true) {
        return error(
            StatusCode::BAD_REQUEST,
            "streamed legacy completions are not supported yet",
            "invalid_request_error",
            Some("unsupported"),
        );
    }
    match state
        .router
        .completions_with(&request, &options(caller))
        .await
    {
        Ok(answer) => json(&answer.body),
        Err(e) => router_error(&e),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut response = state.metrics.render(&state.router).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<serde_json::Value> = state
        .router
        .models()
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "openai-router"}))
        .collect();
    json(&serde_json::json!({"object": "list", "data": data}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let usable = state.router.stats().iter().any(|s| {
        !matches!(
            s.state.availability,
            router_facade::Availability::Disabled(_)
        )
    });
    if usable {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no usable deployment").into_response()
    }
}

/// Reloads the configuration file on SIGHUP; a bad file is refused and the old one stays.
#[cfg(unix)]
pub(crate) async fn reload_on_hangup(state: Arc<AppState>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        let Some(path) = &state.config_path else {
            continue;
        };
        match reload(&state, path) {
            Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
            Err(e) => {
                tracing::error!(config = %path.display(), error = %format!("{e:#}"), "reload refused; the old configuration stays");
            }
        }
    }
}

fn reload(state: &AppState, path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let keys = config.keys()?;
    state.router.reconfigure(config.builder()?)?;
    state.keys.store(Arc::new(keys));
    Ok(())
}

/// Serves until Ctrl-C or SIGTERM, then lets in-flight requests finish.
pub(crate) async fn serve(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    use axum::serve::ListenerExt as _;
    let keys = config.keys()?;
    if keys.is_empty() {
        tracing::warn!(
            "no gateway keys configured: the gateway is open to anyone who can reach it"
        );
    }
    let router = config.router().await?;
    let state = Arc::new(AppState {
        router,
        metrics: crate::metrics::Metrics::default(),
        keys: ArcSwap::from_pointee(keys),
        config_path: path,
    });
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    let address = listener.local_addr()?;
    let listener = listener.tap_io(|tcp| {
        // Every SSE event leaves at once, not after a delayed ACK.
        let _ = tcp.set_nodelay(true);
    });
    crate::demo::say(&format!(
        "openai-router: serving {} model group(s) on http://{address}/v1",
        state.router.models().len()
    ));
    #[cfg(unix)]
    tokio::spawn(reload_on_hangup(Arc::clone(&state)));
    axum::serve(listener, app(state, config.server.body_limit_bytes))
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down; letting in-flight requests finish");
    let _ = Duration::ZERO;
}
