//! The routes of the OpenAI-compatible API, and what each handler does: read the body, check
//! the key, call the router, answer (or relay the stream), count the answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use router_facade::types::{
    ChatCompletionRequest, CompletionRequest, CreateResponse, EmbeddingRequest,
};
use router_facade::{
    ErrorKind, QuotaLeft, RequestOptions, ResponseMeta, Routed, Router, RouterStream, StoredCall,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

use crate::auth::{GatewayKey, authenticate};
use crate::error::{ATTEMPTS, ApiError, ENDPOINT};
use crate::metrics::{Metrics, UNKNOWN_MODEL};

/// What the handlers share.
pub(crate) struct AppState {
    pub(crate) router: Router,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) keys: ArcSwap<Vec<GatewayKey>>,
    /// `router.cache_affinity_header`, lowercased.
    pub(crate) affinity_header: ArcSwap<Option<String>>,
    /// What the status page shows that needs history.
    pub(crate) status: crate::status::Board,
    /// Who may see the status page.
    pub(crate) status_access: ArcSwap<crate::status::Access>,
}

impl AppState {
    /// Counts an answer of `route` for `model` (as a label only when it is a configured group).
    fn count(
        &self,
        route: &'static str,
        model: Option<&str>,
        response: &Response,
        started: Instant,
    ) {
        let label = model
            .filter(|m| self.router.serves(m))
            .unwrap_or(UNKNOWN_MODEL);
        self.metrics
            .answered(route, label, response.status().as_u16(), started.elapsed());
    }

    /// Where an answer came from, noted on the status page with the time it took (to its
    /// headers, for a stream).
    fn served(&self, served: ServedBy, started: Instant) -> ServedBy {
        self.status
            .answered(&served.endpoint, &served.deployment, started.elapsed());
        served
    }

    /// An answer of `route` served: its retries and the tokens it used.
    fn answered<T>(&self, route: &'static str, answer: &Routed<T>) {
        self.metrics.retried(answer.attempts);
        self.metrics.waited(answer.waited);
        if let Some(used) = answer.tokens {
            self.metrics.tokens(route, &answer.model, used);
        }
    }

    /// The options of a request from `headers` for `model`, once its key checks out.
    fn options(&self, headers: &HeaderMap, model: &str) -> Result<RequestOptions, ApiError> {
        let keys = self.keys.load();
        let mut options = RequestOptions::default();
        if let Some(key) = authenticate(&keys, headers, model)? {
            options = options.with_caller(key.name.clone());
            if let Some(priority) = key.priority {
                options = options.with_priority(priority);
            }
            if let Some(wait) = key.max_queue_wait {
                options = options.with_max_queue_wait(wait);
            }
        }
        // Azure's spillover, as the caller asked (passed on to Azure deployments only).
        if let Some(spill) = headers
            .get("x-ms-spillover-deployment")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.trim().is_empty())
        {
            options = options.with_spillover_deployment(spill.trim());
        }
        // The caller's W3C trace, continued into the upstream calls.
        if let Some(parent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
            let state = headers.get("tracestate").and_then(|v| v.to_str().ok());
            options = options.with_traceparent(parent, state);
        }
        // The prompt-cache key from the configured header (the body's own key comes first).
        if let Some(name) = self.affinity_header.load().as_deref()
            && let Some(key) = headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.trim().is_empty())
        {
            options = options.with_cache_key(key.trim());
        }
        Ok(options)
    }
}

/// How much of a request body the gateway reads, and for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    pub(crate) bytes: usize,
    pub(crate) within: Duration,
}

/// Reads the request's body before the route does, within `limits`: a body that does not
/// arrive in time is answered 408 (a slow client holds no handler), one over the size 413.
async fn read_body_in_time(
    axum::extract::State(limits): axum::extract::State<BodyLimits>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(limits.within, axum::body::to_bytes(body, limits.bytes)).await {
        Err(_) => ApiError::unreadable(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:.0} s",
                limits.within.as_secs_f64()
            ),
        )
        .into_response(),
        Ok(Err(_)) => ApiError::unreadable(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {} bytes", limits.bytes),
        )
        .into_response(),
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
    }
}

/// The routes.
pub(crate) fn app(state: Arc<AppState>, body: BodyLimits) -> axum::Router {
    let body_limit = body.bytes;
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route(
            "/v1/responses/{id}",
            get(|state, headers, id| stored(state, headers, id, StoredCall::Retrieve))
                .delete(|state, headers, id| stored(state, headers, id, StoredCall::Delete)),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(|state, headers, id| stored(state, headers, id, StoredCall::InputItems)),
        )
        .route(
            "/v1/responses/{id}/cancel",
            post(|state, headers, id| stored(state, headers, id, StoredCall::Cancel)),
        )
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/status", get(status_page))
        .route("/status.json", get(status_data))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .fallback(|| async { ApiError::no_route() })
        .method_not_allowed_fallback(|| async { ApiError::wrong_method() })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.metrics),
            count_route,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            body,
            read_body_in_time,
        ))
        .with_state(state)
}

/// Counts every answer by the route that matched (its template, `/v1/responses/{id}`;
/// `unmatched` for none), method and status.
async fn count_route(
    State(metrics): State<Arc<Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or(std::borrow::Cow::Borrowed("unmatched"), |p| {
            template(p.as_str())
        });
    let method = request.method().clone();
    // The answer's span: the router's request span goes inside it, and a caller's
    // `traceparent` makes it a child of the caller's span in the exported traces.
    let span = tracing::info_span!(
        "http",
        route = %route,
        method = %method,
        status = tracing::field::Empty,
    );
    crate::telemetry::continue_trace(&span, request.headers());
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    span.record("status", response.status().as_u16());
    metrics.http(
        route,
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// The routes' templates, as label values without an allocation per answer.
const TEMPLATES: [&str; 13] = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/responses",
    "/v1/responses/{id}",
    "/v1/responses/{id}/input_items",
    "/v1/responses/{id}/cancel",
    "/v1/models",
    "/metrics",
    "/status",
    "/status.json",
    "/healthz",
    "/readyz",
];

fn template(path: &str) -> crate::metrics::Label {
    TEMPLATES.iter().find(|t| **t == path).map_or_else(
        || std::borrow::Cow::Owned(path.to_owned()),
        |t| std::borrow::Cow::Borrowed(*t),
    )
}

/// The body as a request, or why not (too large: 413).
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body =
        body.map_err(|rejection| ApiError::unreadable(rejection.status(), rejection.body_text()))?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_body(format!("the body is not a valid request: {e}")))
}

fn json<T: Serialize>(body: &T) -> Response {
    axum::Json(body).into_response()
}

/// Reads a request of type `R`, answers it with `answer` (which gives back the request's model
/// with the answer), and counts the answer under `route`.
async fn handle<R, F>(
    state: &Arc<AppState>,
    route: &'static str,
    body: Result<Bytes, BytesRejection>,
    answer: impl FnOnce(R) -> F,
) -> Response
where
    R: DeserializeOwned,
    F: Future<Output = (String, Response)>,
{
    let started = Instant::now();
    match parse::<R>(body) {
        Ok(request) => {
            let (model, response) = answer(request).await;
            state.count(route, Some(&model), &response, started);
            response
        }
        Err(error) => {
            let response = error.into_response();
            state.count(route, None, &response, started);
            response
        }
    }
}

async fn chat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let answer = |request: ChatCompletionRequest| async {
        let response = chat_answer(&state, &headers, &request, started)
            .await
            .unwrap_or_else(IntoResponse::into_response);
        (request.model, response)
    };
    handle(&state, "chat", body, answer).await
}

async fn chat_answer(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    request: &ChatCompletionRequest,
    started: Instant,
) -> Result<Response, ApiError> {
    let options = state.options(headers, &request.model)?;
    if request.is_stream() {
        let stream = state.router.chat_stream_with(request, &options).await?;
        state.metrics.retried(stream.attempts());
        state.metrics.waited(stream.waited());
        let served = state.served(ServedBy::stream(&stream), started);
        let relayed = crate::sse::relay(stream, Arc::clone(&state.metrics), "chat", started);
        return Ok(served_by(relayed, &served));
    }
    let answer = state.router.chat_with(request, &options).await?;
    state.answered("chat", &answer);
    Ok(served_by(
        json(&answer.body),
        &state.served(ServedBy::routed(&answer), started),
    ))
}

/// Where an answer came from, taken from the router's answer before the body is written.
struct ServedBy {
    model: String,
    endpoint: String,
    deployment: String,
    attempts: u32,
    caller: Option<QuotaLeft>,
    meta: ResponseMeta,
}

impl ServedBy {
    fn routed<T>(answer: &Routed<T>) -> Self {
        Self {
            model: answer.model.clone(),
            endpoint: answer.endpoint.to_string(),
            deployment: answer.deployment.clone(),
            attempts: answer.attempts,
            caller: answer.caller_quota,
            meta: answer.meta.clone(),
        }
    }

    fn stream<T: router_facade::StreamItem + Send + 'static>(stream: &RouterStream<T>) -> Self {
        Self {
            model: stream.model().to_owned(),
            endpoint: stream.endpoint().to_string(),
            deployment: stream.deployment().to_owned(),
            attempts: stream.attempts(),
            caller: stream.caller_quota(),
            meta: stream.meta().clone(),
        }
    }
}

/// Says where an answer came from: the model group that served it (`x-openai-router-model`,
/// the one asked for or a fallback), the endpoint and deployment (`x-openai-router-endpoint`,
/// `-deployment`), the attempts it took (`x-openai-router-attempts`), and what the upstream
/// said of itself: its request id (`x-openai-router-upstream-request-id`, OpenAI's
/// `x-request-id` or Azure's `apim-request-id`), and Azure's `x-ms-region` and
/// `azureml-model-session` as sent. A caller with limits of its own gets what they have left
/// as OpenAI's `x-ratelimit-*` headers ([`caller_quota_headers`]).
fn served_by(mut response: Response, served: &ServedBy) -> Response {
    let attempts = served.attempts.to_string();
    let headers = response.headers_mut();
    for (name, value) in [
        (SERVED_BY, Some(served.model.as_str())),
        (ENDPOINT, Some(served.endpoint.as_str())),
        (DEPLOYMENT, Some(served.deployment.as_str())),
        (ATTEMPTS, Some(attempts.as_str())),
        (UPSTREAM_REQUEST_ID, served.meta.request_id.as_deref()),
        ("x-ms-region", served.meta.region.as_deref()),
        (
            "azureml-model-session",
            served.meta.model_session.as_deref(),
        ),
    ] {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    }
    if let Some(quota) = &served.caller {
        caller_quota_headers(headers, quota);
    }
    response
}

/// The caller's own limits as OpenAI names them: `x-ratelimit-limit-requests` and
/// `-tokens` (what the router's window holds), `x-ratelimit-remaining-requests` and
/// `-tokens` (what is left in it now), for the dimensions its key limits.
fn caller_quota_headers(headers: &mut HeaderMap, quota: &QuotaLeft) {
    for (name, value) in [
        ("x-ratelimit-limit-requests", quota.limit_requests),
        ("x-ratelimit-remaining-requests", quota.requests_left),
        ("x-ratelimit-limit-tokens", quota.limit_tokens),
        ("x-ratelimit-remaining-tokens", quota.tokens_left),
    ] {
        if let Some(value) = value {
            headers.insert(name, HeaderValue::from(value));
        }
    }
}

/// The header naming the upstream's request id.
const UPSTREAM_REQUEST_ID: &str = "x-openai-router-upstream-request-id";

/// The header naming the model group that served.
const SERVED_BY: &str = "x-openai-router-model";

/// The header naming the deployment that served.
const DEPLOYMENT: &str = "x-openai-router-deployment";

async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let answer = |request: EmbeddingRequest| async {
        let response = async {
            let options = state.options(&headers, &request.model)?;
            let answer = state.router.embeddings_with(&request, &options).await?;
            state.answered("embeddings", &answer);
            Ok::<_, ApiError>(served_by(
                json(&answer.body),
                &state.served(ServedBy::routed(&answer), started),
            ))
        }
        .await
        .unwrap_or_else(IntoResponse::into_response);
        (request.model, response)
    };
    handle(&state, "embeddings", body, answer).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let answer = |request: CompletionRequest| async {
        let response = async {
            let options = state.options(&headers, &request.model)?;
            if request.stream == Some(true) {
                let stream = state
                    .router
                    .completions_stream_with(&request, &options)
                    .await?;
                state.metrics.retried(stream.attempts());
                state.metrics.waited(stream.waited());
                let served = state.served(ServedBy::stream(&stream), started);
                let relayed =
                    crate::sse::relay(stream, Arc::clone(&state.metrics), "completions", started);
                return Ok::<_, ApiError>(served_by(relayed, &served));
            }
            let answer = state.router.completions_with(&request, &options).await?;
            state.answered("completions", &answer);
            Ok(served_by(
                json(&answer.body),
                &state.served(ServedBy::routed(&answer), started),
            ))
        }
        .await
        .unwrap_or_else(IntoResponse::into_response);
        (request.model, response)
    };
    handle(&state, "completions", body, answer).await
}

async fn responses(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let answer = |request: CreateResponse| async {
        let response = async {
            let options = state.options(&headers, &request.model)?;
            if request.stream == Some(true) {
                let stream = state
                    .router
                    .responses_stream_with(&request, &options)
                    .await?;
                state.metrics.retried(stream.attempts());
                state.metrics.waited(stream.waited());
                let served = state.served(ServedBy::stream(&stream), started);
                let relayed =
                    crate::sse::relay(stream, Arc::clone(&state.metrics), "responses", started);
                return Ok::<_, ApiError>(served_by(relayed, &served));
            }
            let answer = state.router.responses_with(&request, &options).await?;
            state.answered("responses", &answer);
            Ok(served_by(
                json(&answer.body),
                &state.served(ServedBy::routed(&answer), started),
            ))
        }
        .await
        .unwrap_or_else(IntoResponse::into_response);
        (request.model, response)
    };
    handle(&state, "responses", body, answer).await
}

/// A call on a stored response: authorized against the model group whose deployment stored
/// it, and sent there.
async fn stored(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    call: StoredCall,
) -> Response {
    let Ok(Path(id)) = id else {
        // An id that is not UTF-8 once percent-decoded: found by the `gateway_request` fuzz
        // target, which answered axum's plain-text 400.
        return ApiError::bad_body("the response id in the path is not valid UTF-8")
            .into_response();
    };
    let started = Instant::now();
    let model = state.router.stored_response_model(&id).await;
    let response = async {
        let options = state.options(&headers, model.as_deref().unwrap_or_default())?;
        // The upstream no longer has it: a 404 to the caller (routing's own 404s, a
        // deployment that does not exist, are the gateway's 502).
        let answer = state
            .router
            .stored_response_with(&id, call, &options)
            .await
            .map_err(|error| match error.kind() {
                ErrorKind::NotFound => ApiError::not_found(error.to_string()),
                _ => ApiError::from(error),
            })?;
        Ok::<_, ApiError>(served_by(
            json(&answer.body),
            &state.served(ServedBy::routed(&answer), started),
        ))
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    state.count("responses", model.as_deref(), &response, started);
    response
}

/// The address a request's connection came from (set on every request by the server's
/// connection loop).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) std::net::SocketAddr);

async fn status_page(
    State(state): State<Arc<AppState>>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    crate::status::page(
        **state.status_access.load(),
        peer.map(|p| (p.0).0),
        &headers,
    )
}

async fn status_data(
    State(state): State<Arc<AppState>>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    crate::status::data(
        **state.status_access.load(),
        peer.map(|p| (p.0).0),
        &headers,
        &state.router,
        &state.status,
        state.metrics.throttled(),
    )
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut response = state.metrics.render(&state.router).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
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
