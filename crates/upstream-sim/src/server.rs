//! The HTTP side: routing, auth, admission, faults, and the answers of both dialects.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::{EndpointConfig, HeaderMode, SimDialect};
use crate::faults::{self, Fault, WaitForm};
use crate::limiter::{Admission, Snapshot};
use crate::state::{EndpointState, RecordedRequest};

pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// Bodies larger than this are refused with 413.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// A request that the connection should answer by closing (an injected reset).
#[derive(Debug)]
pub(crate) struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected connection reset")
    }
}

impl std::error::Error for Reset {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Chat,
    Embeddings,
    Completions,
    /// `POST /responses`: answered as a stateless response (nothing is stored), streamed as
    /// named events that end with `response.completed` (no `[DONE]`).
    Responses,
    Models,
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Serves one request, spilling it over first when the endpoint's deployments are full
/// (`SimEndpoint::spill`).
pub(crate) async fn answer(
    state: Arc<EndpointState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Reset> {
    let Some(spill) = state.spill() else {
        return handle(state, request).await;
    };
    // The deployment asked for: in the path (deployments form), else the body's `model`.
    let asked = request
        .uri()
        .path()
        .split("/deployments/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("deployment")
        .to_ascii_lowercase();
    let to = request
        .headers()
        .get("x-ms-spillover-deployment")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let from = format!("x-ms-spillover-from-{asked}");
    let mark = |mut response: Response<Body>| {
        if let Ok(name) = http::HeaderName::from_bytes(from.as_bytes()) {
            response
                .headers_mut()
                .insert(name, HeaderValue::from_static("true"));
        }
        response
    };
    match (to, spill) {
        (None, _) => {
            let seq = state.next_seq();
            state.counters.rate_limited.inc();
            Ok(state.reply_error(
                seq,
                429,
                None,
                "Requests to the deployment have exceeded its provisioned throughput.",
                Some(Duration::from_secs(1)),
            ))
        }
        (Some(to), crate::faults::Spill::Fails) => {
            let seq = state.next_seq();
            state.counters.faults.inc();
            let mut response = mark(state.reply_error(
                seq,
                503,
                None,
                &format!("The spillover deployment {to} could not serve the request."),
                None,
            ));
            response
                .headers_mut()
                .insert("x-ms-spillover-error", HeaderValue::from_static("503"));
            Ok(response)
        }
        (Some(_), crate::faults::Spill::Serves) => Ok(mark(handle(state, request).await?)),
    }
}

/// Serves one request.
pub(crate) async fn handle(
    state: Arc<EndpointState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Reset> {
    let seq = state.next_seq();
    let in_flight = state.enter();
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(state.reply_error(seq, 413, None, "request body too large", None)),
    };
    let json_body: Option<Value> = serde_json::from_slice(&body).ok();
    if let Some(tag) = json_body
        .as_ref()
        .and_then(|b| b.pointer("/metadata/call_tag"))
        .and_then(Value::as_str)
    {
        state.tally(tag);
    }
    state.record(RecordedRequest::new(&parts, json_body.clone()));
    let config = state.config();
    if let Some((call, id)) = stored_route(config.dialect, &parts.method, parts.uri.path()) {
        return Ok(stored_call(&state, seq, &config, &parts, call, &id));
    }
    let (operation, model, body) = match validate(&state, seq, &config, &parts, json_body) {
        Ok(valid) => valid,
        Err(response) => return Ok(*response),
    };

    let mut rng = state.rng(seq);
    let fault = {
        let mut injected = state.faults();
        faults::take(&mut injected, rng.f64())
    };
    let stream = body["stream"].as_bool() == Some(true) && operation != Operation::Embeddings;
    if let Some(fault) = &fault {
        state.counters.faults.inc();
        if let Some(reply) = before_headers(&state, seq, fault, stream).await {
            return reply;
        }
    }

    let cost = estimate_cost(operation, &body, &config);
    let snapshot = match state.admit(cost) {
        Admission::Admitted(snapshot) => snapshot,
        Admission::TooManyRequests(snapshot) => {
            state.counters.rate_limited.inc();
            return Ok(state.reply_throttled(seq, &snapshot, false));
        }
        Admission::TooManyTokens(snapshot) => {
            state.counters.rate_limited.inc();
            return Ok(state.reply_throttled(seq, &snapshot, true));
        }
        Admission::TooLarge(snapshot) => {
            state.counters.rate_limited.inc();
            let message = format!(
                "Request too large for {model} on tokens per min (TPM): Limit {}, Requested {cost}.",
                snapshot.limit_tokens.unwrap_or_default()
            );
            return Ok(state.reply_error(seq, 429, Some("rate_limit_exceeded"), &message, None));
        }
    };
    state.counters.tokens_charged.add(cost);

    let generation = Generation::plan(&config, operation, &body, &model, seq, &mut rng)
        .with_cache(&state, cacheable_prefix(operation, &model, &body));
    if operation == Operation::Responses && body["store"] != Value::Bool(false) {
        state.store_response(generation.response_json(), body["input"].clone());
    }
    if stream {
        state.counters.streams.inc();
        let malformed = matches!(fault, Some(Fault::MalformedJson));
        let mid_stream = fault.filter(Fault::is_mid_stream);
        return Ok(state.reply_stream(
            seq,
            &snapshot,
            &generation,
            mid_stream,
            malformed,
            in_flight,
        ));
    }
    // A zero sleep would still wait for the timer's next millisecond tick.
    let latency = generation.total_latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    drop(in_flight);
    if matches!(fault, Some(Fault::MalformedJson)) {
        return Ok(state.reply_raw(seq, 200, "{\"id\": \"broken", Some(&snapshot)));
    }
    state.counters.ok.inc();
    state
        .counters
        .completion_tokens
        .add(u64::from(generation.completion_tokens()));
    Ok(state.reply_json(seq, 200, &generation.response_json(), Some(&snapshot)))
}

/// A fault that acts before the response's headers: its reply (a reset, an error status, a
/// wrong or oversized answer), or `None` once it has acted (a stall) or when it acts later.
async fn before_headers(
    state: &Arc<EndpointState>,
    seq: u64,
    fault: &Fault,
    stream: bool,
) -> Option<Result<Response<Body>, Reset>> {
    let reply = match fault {
        Fault::Reset => return Some(Err(Reset)),
        Fault::StallBeforeHeaders(duration) => {
            tokio::time::sleep(*duration).await;
            return None;
        }
        Fault::Status {
            status,
            code,
            retry_after,
        } => state.reply_error(
            seq,
            *status,
            code.as_deref(),
            &status_message(*status, code.as_deref()),
            *retry_after,
        ),
        Fault::Throttled { wait, form } => state.reply_throttled_as(seq, *wait, *form),
        Fault::WrongContentType => {
            let page = "<html><body><h1>Sign in to continue</h1></body></html>";
            let mut response = state.reply_raw(seq, 200, page, None);
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("text/html"));
            response
        }
        Fault::Oversized(bytes) if stream => {
            let event = format!("data: {{\"pad\": \"{}\"}}\n\n", "x".repeat(*bytes));
            let mut response = state.reply_raw(seq, 200, event, None);
            response.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            response
        }
        Fault::Oversized(bytes) => {
            let body = json!({"id": "chatcmpl-oversized", "object": "chat.completion",
                "padding": "x".repeat(*bytes)});
            state.reply_json(seq, 200, &body, None)
        }
        _ => return None,
    };
    Some(Ok(reply))
}

/// What is asked of a stored response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoredCall {
    Retrieve,
    Delete,
    InputItems,
    Cancel,
}

/// `GET`/`DELETE /responses/{id}`, `GET .../input_items`, `POST .../cancel`, under either
/// dialect's base.
fn stored_route(dialect: SimDialect, method: &Method, path: &str) -> Option<(StoredCall, String)> {
    let rest = match dialect {
        SimDialect::OpenAi => path.strip_prefix("/v1/responses/")?,
        SimDialect::Azure => path
            .strip_prefix("/openai/v1/responses/")
            .or_else(|| path.strip_prefix("/openai/responses/"))?,
    };
    let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let call = match (method.as_str(), tail) {
        ("GET", "") => StoredCall::Retrieve,
        ("DELETE", "") => StoredCall::Delete,
        ("GET", "input_items") => StoredCall::InputItems,
        ("POST", "cancel") => StoredCall::Cancel,
        _ => return None,
    };
    (!id.is_empty()).then(|| (call, percent_decode(id)))
}

/// Answers a call on a stored response.
fn stored_call(
    state: &EndpointState,
    seq: u64,
    config: &EndpointConfig,
    parts: &http::request::Parts,
    call: StoredCall,
    id: &str,
) -> Response<Body> {
    if !authorized(config, &parts.headers) {
        state.counters.unauthorized.inc();
        let given = given_key(config.dialect, &parts.headers);
        return state.reply_error(
            seq,
            401,
            None,
            &unauthorized_message(config.dialect, &given),
            None,
        );
    }
    let missing = |state: &EndpointState| {
        state.counters.not_found.inc();
        state.reply_error(
            seq,
            404,
            Some("not_found"),
            &format!("Response with id '{id}' not found."),
            None,
        )
    };
    let Some((response, input)) = state.stored_response(id) else {
        return missing(state);
    };
    state.counters.ok.inc();
    match call {
        StoredCall::Retrieve => state.reply_json(seq, 200, &response, None),
        StoredCall::Delete => {
            state.delete_response(id);
            state.reply_json(
                seq,
                200,
                &json!({"id": id, "object": "response.deleted", "deleted": true}),
                None,
            )
        }
        StoredCall::InputItems => {
            let items = match input {
                Value::String(text) => json!([{"type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": text}]}]),
                Value::Array(items) => Value::Array(items),
                _ => json!([]),
            };
            state.reply_json(
                seq,
                200,
                &json!({"object": "list", "data": items,
                "has_more": false, "first_id": null, "last_id": null}),
                None,
            )
        }
        StoredCall::Cancel => state.reply_error(
            seq,
            400,
            Some("invalid_request_error"),
            "Only responses created with background=true can be cancelled.",
            None,
        ),
    }
}

/// Routes, authenticates and checks a request; an `Err` is the answer to send instead.
fn validate(
    state: &EndpointState,
    seq: u64,
    config: &EndpointConfig,
    parts: &http::request::Parts,
    json_body: Option<Value>,
) -> Result<(Operation, String, Value), Box<Response<Body>>> {
    let Some((operation, path_model)) = route(config.dialect, &parts.method, parts.uri.path())
    else {
        state.counters.not_found.inc();
        return Err(Box::new(state.reply_error(
            seq,
            404,
            Some("not_found"),
            "no such path",
            None,
        )));
    };
    if config.dialect == SimDialect::Azure
        && path_model.is_some()
        && !query_has(parts.uri.query(), "api-version")
    {
        state.counters.bad_request.inc();
        return Err(Box::new(state.reply_error(
            seq,
            400,
            Some("BadRequest"),
            "api-version query parameter is required",
            None,
        )));
    }
    if !authorized(config, &parts.headers) {
        state.counters.unauthorized.inc();
        let given = given_key(config.dialect, &parts.headers);
        return Err(Box::new(state.reply_error(
            seq,
            401,
            None,
            &unauthorized_message(config.dialect, &given),
            None,
        )));
    }
    if operation == Operation::Models {
        return Err(Box::new(state.reply_json(
            seq,
            200,
            &models_list(config),
            None,
        )));
    }
    let Some(body) = json_body else {
        state.counters.bad_request.inc();
        return Err(Box::new(state.reply_error(
            seq,
            400,
            Some("invalid_request_error"),
            "the body is not valid JSON",
            None,
        )));
    };
    let model = path_model
        .or_else(|| body["model"].as_str().map(str::to_owned))
        .unwrap_or_default();
    if !config.models.is_empty() && !config.models.contains(&model) {
        state.counters.not_found.inc();
        return Err(Box::new(state.reply_error(
            seq,
            404,
            None,
            &model_not_found(config.dialect, &model),
            None,
        )));
    }
    if operation == Operation::Chat
        && config.reasoning_models.contains(&model)
        && !body["max_tokens"].is_null()
    {
        // Both dialects: Azure passes OpenAI's validation error through as it is.
        state.counters.bad_request.inc();
        let error = json!({"error": {
            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "unsupported_parameter",
        }});
        return Err(Box::new(state.reply_json(seq, 400, &error, None)));
    }

    Ok((operation, model, body))
}

fn route(dialect: SimDialect, method: &Method, path: &str) -> Option<(Operation, Option<String>)> {
    let operation = |rest: &str| match rest {
        "chat/completions" => Some(Operation::Chat),
        "embeddings" => Some(Operation::Embeddings),
        "completions" => Some(Operation::Completions),
        "responses" => Some(Operation::Responses),
        _ => None,
    };
    if method == Method::GET {
        let models = match dialect {
            SimDialect::OpenAi => path == "/v1/models",
            SimDialect::Azure => path == "/openai/v1/models",
        };
        return models.then_some((Operation::Models, None));
    }
    if method != Method::POST {
        return None;
    }
    match dialect {
        SimDialect::OpenAi => Some((operation(path.strip_prefix("/v1/")?)?, None)),
        SimDialect::Azure => {
            if let Some(rest) = path.strip_prefix("/openai/v1/") {
                return Some((operation(rest)?, None));
            }
            if path == "/openai/responses" {
                return Some((Operation::Responses, None));
            }
            let rest = path.strip_prefix("/openai/deployments/")?;
            let (deployment, op) = rest.split_once('/')?;
            let deployment = percent_decode(deployment);
            Some((operation(op)?, Some(deployment)))
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_has(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('='))
            .any(|(k, v)| k == name && !v.is_empty())
    })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

fn authorized(config: &EndpointConfig, headers: &HeaderMap) -> bool {
    let Some(key) = &config.api_key else {
        return true;
    };
    let bearer = header(headers, "authorization").and_then(|v| v.strip_prefix("Bearer "));
    match config.dialect {
        SimDialect::OpenAi => bearer == Some(key.as_str()),
        SimDialect::Azure => {
            header(headers, "api-key") == Some(key.as_str())
                || (bearer.is_some() && bearer == config.bearer_token.as_deref())
                || bearer.is_some_and(|token| {
                    config
                        .entra
                        .as_deref()
                        .is_some_and(|seed| crate::entra::verify(seed, token))
                })
        }
    }
}

fn given_key(dialect: SimDialect, headers: &HeaderMap) -> String {
    let value = match dialect {
        SimDialect::OpenAi => {
            header(headers, "authorization").and_then(|v| v.strip_prefix("Bearer "))
        }
        SimDialect::Azure => header(headers, "api-key"),
    };
    value.unwrap_or("").to_owned()
}

fn unauthorized_message(dialect: SimDialect, given: &str) -> String {
    match dialect {
        // Echoes the key verbatim, as OpenAI once did: a test that the router scrubs it.
        SimDialect::OpenAi => format!("Incorrect API key provided: {given}. You can find your API key at https://platform.openai.com/account/api-keys."),
        SimDialect::Azure => "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.".to_owned(),
    }
}

fn model_not_found(dialect: SimDialect, model: &str) -> String {
    match dialect {
        SimDialect::OpenAi => format!("The model `{model}` does not exist or you do not have access to it."),
        SimDialect::Azure => "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.".to_owned(),
    }
}

fn status_message(status: u16, code: Option<&str>) -> String {
    match (status, code) {
        (429, Some("insufficient_quota")) => "You exceeded your current quota, please check your plan and billing details.".to_owned(),
        (400, Some("content_filter")) => "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.".to_owned(),
        (400, Some("context_length_exceeded")) => "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens. Please reduce the length of the messages.".to_owned(),
        (429, _) => "Rate limit reached (simulated). Please try again later.".to_owned(),
        (500..=599, _) => "The server had an error while processing your request. Sorry about that! (simulated)".to_owned(),
        _ => format!("simulated error {status}"),
    }
}

fn models_list(config: &EndpointConfig) -> Value {
    let data: Vec<Value> = config
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "upstream-sim"}))
        .collect();
    json!({"object": "list", "data": data})
}

/// Prompt tokens estimated from characters (about four per token), as Azure does at admission.
fn text_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

fn prompt_tokens(operation: Operation, body: &Value) -> u64 {
    let input_tokens = |value: &Value| -> u64 {
        match value {
            Value::String(s) => text_tokens(s.chars().count()),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => text_tokens(s.chars().count()),
                    Value::Number(_) => 1,
                    Value::Array(tokens) => tokens.len() as u64,
                    _ => 0,
                })
                .sum(),
            _ => 0,
        }
    };
    match operation {
        Operation::Chat => {
            let messages = body["messages"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let chars: usize = messages.iter().map(content_chars).sum();
            text_tokens(chars) + 3 * messages.len() as u64 + 3
        }
        Operation::Embeddings => input_tokens(&body["input"]),
        Operation::Completions => input_tokens(&body["prompt"]),
        Operation::Responses => {
            // A string, or input items whose content is a string or parts with text.
            let (chars, items) = match &body["input"] {
                Value::String(s) => (s.chars().count(), 1),
                Value::Array(items) => (items.iter().map(content_chars).sum(), items.len()),
                _ => (0, 0),
            };
            let instructions = body["instructions"]
                .as_str()
                .map_or(0, |i| i.chars().count());
            text_tokens(chars + instructions) + 3 * items as u64 + 3
        }
        Operation::Models => 0,
    }
}

/// The characters of a message's (or an input item's) `content`: a string, or parts with
/// text.
/// The prompt prefix an upstream could serve from its prompt cache: everything but the last
/// message (chat) or input item (responses), with the instructions, hashed with the model and
/// `prompt_cache_key`, and its tokens; `None` when it is shorter than 1,024 tokens (OpenAI
/// caches no shorter prefix).
fn cacheable_prefix(operation: Operation, model: &str, body: &Value) -> Option<(u64, u64)> {
    use std::hash::{Hash as _, Hasher as _};
    let items = match operation {
        Operation::Chat => body["messages"].as_array()?,
        Operation::Responses => body["input"].as_array()?,
        _ => return None,
    };
    let prefix = &items[..items.len().saturating_sub(1)];
    let instructions = body["instructions"].as_str().unwrap_or_default();
    let chars: usize =
        prefix.iter().map(content_chars).sum::<usize>() + instructions.chars().count();
    let tokens = text_tokens(chars) + 3 * prefix.len() as u64;
    if tokens < 1024 {
        return None;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (model, body["prompt_cache_key"].as_str(), instructions).hash(&mut hasher);
    for item in prefix {
        item.to_string().hash(&mut hasher);
    }
    Some((hasher.finish(), tokens))
}

fn content_chars(message: &Value) -> usize {
    match &message["content"] {
        Value::String(s) => s.chars().count(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .map(|t| t.chars().count())
            .sum(),
        _ => 0,
    }
}

fn output_cap(body: &Value) -> Option<u32> {
    body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64())
        .or_else(|| body["max_output_tokens"].as_u64())
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn choices(body: &Value) -> u32 {
    body["n"].as_u64().map_or(1, |n| n.clamp(1, 128) as u32)
}

/// Prompt estimate plus output cap times choices, as Azure charges at admission.
fn estimate_cost(operation: Operation, body: &Value, config: &EndpointConfig) -> u64 {
    let prompt = prompt_tokens(operation, body);
    match operation {
        Operation::Embeddings | Operation::Models => prompt,
        Operation::Chat | Operation::Completions | Operation::Responses => {
            let cap = output_cap(body).unwrap_or(config.output.default_max_tokens);
            prompt + u64::from(cap) * u64::from(choices(body))
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "router",
    "sends",
    "each",
    "request",
    "to",
    "an",
    "endpoint",
    "with",
    "room",
    "and",
    "low",
    "latency",
    "while",
    "quotas",
    "add",
    "up",
    "so",
    "callers",
    "never",
    "see",
    "a",
    "throttle",
    "when",
    "any",
    "deployment",
    "can",
    "serve",
    "it",
];

/// What one request generates, decided before any of it is sent.
pub(crate) struct Generation {
    operation: Operation,
    model: String,
    id: String,
    created: u64,
    dialect: SimDialect,
    choices: u32,
    tokens: Vec<&'static str>,
    tool_call: Option<(String, String)>,
    prompt_tokens: u64,
    include_usage: bool,
    embeddings: Vec<Vec<f64>>,
    ttft: Duration,
    per_token: Duration,
    /// Prompt tokens served from the endpoint's prompt cache (`cached_tokens` in the usage).
    cached_tokens: u64,
    /// The service tier that serves it: the one asked for (`auto` and unknown tiers: `default`),
    /// `priority` downgraded to `default` when the endpoint is set to.
    service_tier: &'static str,
}

impl Generation {
    fn plan(
        config: &EndpointConfig,
        operation: Operation,
        body: &Value,
        model: &str,
        seq: u64,
        rng: &mut fastrand::Rng,
    ) -> Self {
        let cap = output_cap(body).unwrap_or(u32::MAX);
        let count = config.output.completion_tokens.min(cap).max(1);
        let tokens = (0..count)
            .map(|_| WORDS[rng.usize(..WORDS.len())])
            .collect();
        let tool_call = (operation == Operation::Chat)
            .then(|| tool_to_call(body))
            .flatten()
            .map(|name| (format!("call_sim{seq}"), name));
        let embeddings = if operation == Operation::Embeddings {
            let inputs = match &body["input"] {
                Value::Array(items) => items.len().max(1),
                _ => 1,
            };
            let dims = body["dimensions"]
                .as_u64()
                .map_or(config.output.dimensions, |d| d.clamp(1, 4096) as u32);
            (0..inputs)
                .map(|_| {
                    (0..dims)
                        .map(|_| (rng.f64() * 2.0 - 1.0) * 0.05)
                        .map(|x| (x * 1e6).round() / 1e6)
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        let latency = config.latency;
        let mut jitter = || 1.0 + latency.jitter * (rng.f64() * 2.0 - 1.0);
        let ttft = Duration::from_secs_f64(latency.ttft_ms as f64 / 1000.0 * jitter().max(0.0));
        let per_token = Duration::from_secs_f64(latency.per_token_ms / 1000.0 * jitter().max(0.0));
        Self {
            operation,
            model: model.to_owned(),
            id: match operation {
                Operation::Completions => format!("cmpl-sim{seq}"),
                // Unique across endpoints, as real response ids are: a router keeps where each
                // one is stored.
                Operation::Responses => format!(
                    "resp_sim{seq}_{}",
                    config
                        .name
                        .chars()
                        .filter(char::is_ascii_alphanumeric)
                        .collect::<String>()
                ),
                _ => format!("chatcmpl-sim{seq}"),
            },
            created: 1_700_000_000 + seq,
            dialect: config.dialect,
            choices: choices(body),
            tokens,
            tool_call,
            prompt_tokens: prompt_tokens(operation, body),
            include_usage: body["stream_options"]["include_usage"].as_bool() == Some(true),
            embeddings,
            ttft,
            per_token,
            cached_tokens: 0,
            service_tier: match body["service_tier"].as_str() {
                Some("priority") if !config.output.downgrade_priority => "priority",
                Some("flex") => "flex",
                Some("scale") => "scale",
                _ => "default",
            },
        }
    }

    /// Served `prefix` (its hash and tokens) from the endpoint's prompt cache, if it is there.
    fn with_cache(mut self, state: &EndpointState, prefix: Option<(u64, u64)>) -> Self {
        if let Some((key, tokens)) = prefix {
            self.cached_tokens = state.prompt_cache(key, tokens, Instant::now());
        }
        self
    }

    pub(crate) fn completion_tokens(&self) -> u32 {
        match self.operation {
            Operation::Embeddings | Operation::Models => 0,
            _ => self.tokens.len() as u32 * self.choices,
        }
    }

    fn total_latency(&self) -> Duration {
        match self.operation {
            Operation::Embeddings | Operation::Models => self.ttft,
            _ => self.ttft + self.per_token.saturating_mul(self.tokens.len() as u32),
        }
    }

    fn usage(&self) -> Value {
        match self.operation {
            Operation::Embeddings | Operation::Models => {
                json!({"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens})
            }
            Operation::Responses => {
                let output = u64::from(self.completion_tokens());
                json!({
                    "input_tokens": self.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": self.cached_tokens},
                    "output_tokens": output,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": self.prompt_tokens + output,
                })
            }
            _ => {
                let completion = u64::from(self.completion_tokens());
                json!({
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": self.prompt_tokens + completion,
                    "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                })
            }
        }
    }

    fn text(&self) -> String {
        let mut text = String::new();
        for (i, token) in self.tokens.iter().enumerate() {
            if i > 0 {
                text.push(' ');
            }
            text.push_str(token);
        }
        text
    }

    fn response_json(&self) -> Value {
        match self.operation {
            Operation::Chat => {
                let choices: Vec<Value> = (0..self.choices)
                    .map(|index| {
                        let (message, finish) = match &self.tool_call {
                            Some((id, name)) => (
                                json!({"role": "assistant", "content": null, "tool_calls": [{
                                    "id": id, "type": "function",
                                    "function": {"name": name, "arguments": "{\"location\":\"Boston\"}"},
                                }]}),
                                "tool_calls",
                            ),
                            None => (json!({"role": "assistant", "content": self.text(), "refusal": null}), "stop"),
                        };
                        json!({"index": index, "message": message, "logprobs": null, "finish_reason": finish})
                    })
                    .collect();
                let mut response = json!({
                    "id": self.id, "object": "chat.completion", "created": self.created,
                    "model": self.model, "choices": choices, "usage": self.usage(),
                    "system_fingerprint": "fp_sim", "service_tier": self.service_tier,
                    "x_sim_extra": {"served_by": "upstream-sim"},
                });
                if self.dialect == SimDialect::Azure {
                    response["prompt_filter_results"] =
                        json!([{"prompt_index": 0, "content_filter_results": safe_filters()}]);
                }
                response
            }
            Operation::Completions => {
                let choices: Vec<Value> = (0..self.choices)
                    .map(|index| json!({"text": self.text(), "index": index, "logprobs": null, "finish_reason": "stop"}))
                    .collect();
                json!({"id": self.id, "object": "text_completion", "created": self.created,
                    "model": self.model, "choices": choices, "usage": self.usage()})
            }
            Operation::Responses => self.response_object("completed", true),
            Operation::Embeddings => {
                let data: Vec<Value> = self
                    .embeddings
                    .iter()
                    .enumerate()
                    .map(|(index, vector)| json!({"object": "embedding", "index": index, "embedding": vector}))
                    .collect();
                json!({"object": "list", "data": data, "model": self.model, "usage": self.usage()})
            }
            Operation::Models => json!({}),
        }
    }

    /// A response object with `status`, with its output and usage when `done`.
    fn response_object(&self, status: &str, done: bool) -> Value {
        let output = if done {
            json!([{"type": "message", "id": format!("msg_{}", self.id), "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": self.text(), "annotations": []}]}])
        } else {
            json!([])
        };
        json!({"id": self.id, "object": "response", "created_at": self.created,
            "status": status, "error": null, "incomplete_details": null, "instructions": null,
            "model": self.model, "output": output, "parallel_tool_calls": true,
            "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}},
            "usage": if done { self.usage() } else { Value::Null }})
    }

    /// A streamed response's named events (each event's `type` is its name).
    fn response_events(&self) -> Vec<(Duration, String)> {
        let item = format!("msg_{}", self.id);
        let mut events = Vec::new();
        let mut push = |delay: Duration, mut event: Value| {
            event["sequence_number"] = json!(events.len());
            events.push((delay, event.to_string()));
        };
        push(
            Duration::ZERO,
            json!({"type": "response.created", "response": self.response_object("in_progress", false)}),
        );
        push(
            Duration::ZERO,
            json!({"type": "response.output_item.added", "output_index": 0,
            "item": {"type": "message", "id": item, "status": "in_progress", "role": "assistant", "content": []}}),
        );
        for (n, token) in self.tokens.iter().enumerate() {
            let (delay, delta) = if n == 0 {
                (self.ttft, (*token).to_owned())
            } else {
                (self.per_token, format!(" {token}"))
            };
            push(
                delay,
                json!({"type": "response.output_text.delta", "item_id": item,
                "output_index": 0, "content_index": 0, "delta": delta}),
            );
        }
        push(
            Duration::ZERO,
            json!({"type": "response.output_text.done", "item_id": item,
            "output_index": 0, "content_index": 0, "text": self.text()}),
        );
        push(
            Duration::ZERO,
            json!({"type": "response.completed", "response": self.response_object("completed", true)}),
        );
        events
    }

    /// The stream's events, each with the delay before it.
    fn events(&self) -> Vec<(Duration, String)> {
        if self.operation == Operation::Responses {
            return self.response_events();
        }
        let mut events = Vec::new();
        let chunk = |choices: Value, usage: Option<Value>| -> String {
            let mut value = match self.operation {
                Operation::Completions => json!({"id": self.id, "object": "text_completion",
                    "created": self.created, "model": self.model, "choices": choices}),
                _ => {
                    json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "system_fingerprint": "fp_sim",
                    "service_tier": self.service_tier, "choices": choices})
                }
            };
            if self.include_usage {
                value["usage"] = usage.unwrap_or(Value::Null);
            }
            value.to_string()
        };
        if self.dialect == SimDialect::Azure && self.operation == Operation::Chat {
            events.push((Duration::ZERO, json!({"id": "", "object": "", "created": 0, "model": "",
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": safe_filters()}],
                "choices": []}).to_string()));
        }
        let per_choice = |f: &dyn Fn(u32) -> Value| -> Value {
            Value::Array((0..self.choices).map(f).collect())
        };
        if self.operation == Operation::Chat {
            events.push((self.ttft, chunk(per_choice(&|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})), None)));
            if let Some((id, name)) = &self.tool_call {
                events.push((Duration::ZERO, chunk(per_choice(&|i| json!({"index": i, "delta": {"tool_calls": [{"index": 0, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}, "logprobs": null, "finish_reason": null})), None)));
                for piece in ["{\"location\":", "\"Boston\"}"] {
                    events.push((self.per_token, chunk(per_choice(&|i| json!({"index": i, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, "logprobs": null, "finish_reason": null})), None)));
                }
            } else {
                for (n, token) in self.tokens.iter().enumerate() {
                    let text = if n == 0 {
                        (*token).to_owned()
                    } else {
                        format!(" {token}")
                    };
                    events.push((if n == 0 { Duration::ZERO } else { self.per_token }, chunk(per_choice(&|i| json!({"index": i, "delta": {"content": text}, "logprobs": null, "finish_reason": null})), None)));
                }
            }
            let finish = if self.tool_call.is_some() {
                "tool_calls"
            } else {
                "stop"
            };
            events.push((Duration::ZERO, chunk(per_choice(&|i| json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": finish})), None)));
        } else {
            for (n, token) in self.tokens.iter().enumerate() {
                let text = if n == 0 {
                    (*token).to_owned()
                } else {
                    format!(" {token}")
                };
                events.push((if n == 0 { self.ttft } else { self.per_token }, chunk(per_choice(&|i| json!({"text": text, "index": i, "logprobs": null, "finish_reason": null})), None)));
            }
            events.push((Duration::ZERO, chunk(per_choice(&|i| json!({"text": "", "index": i, "logprobs": null, "finish_reason": "stop"})), None)));
        }
        if self.include_usage {
            events.push((Duration::ZERO, chunk(json!([]), Some(self.usage()))));
        }
        events
    }
}

fn safe_filters() -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    json!({"hate": safe, "self_harm": safe, "sexual": safe, "violence": safe})
}

/// The tool the simulated model calls: the named one, else the first, when tools are given,
/// `tool_choice` is not `none` and the conversation ends with the user.
fn tool_to_call(body: &Value) -> Option<String> {
    let tools = body["tools"].as_array()?;
    if body["tool_choice"] == "none" {
        return None;
    }
    if let Some(name) = body["tool_choice"]["function"]["name"].as_str() {
        return Some(name.to_owned());
    }
    let last_is_user = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .is_some_and(|m| m["role"] == "user");
    if !last_is_user {
        return None;
    }
    tools.first()?["function"]["name"]
        .as_str()
        .map(str::to_owned)
}

impl EndpointState {
    fn base_headers(&self, seq: u64, snapshot: Option<&Snapshot>, headers: &mut HeaderMap) {
        let dialect = self.config().dialect;
        let insert = |headers: &mut HeaderMap, name: &'static str, value: String| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        };
        insert(headers, "x-request-id", format!("req_sim{seq}"));
        if dialect == SimDialect::Azure {
            insert(headers, "apim-request-id", format!("apim-sim-{seq}"));
            insert(headers, "x-ms-region", "Simulated Region".to_owned());
            insert(
                headers,
                "azureml-model-session",
                "sim-model-session".to_owned(),
            );
        }
        let snapshot = snapshot.copied().unwrap_or_else(|| self.peek());
        let (mode, snapshot) = self.limiter().reported(Instant::now(), snapshot);
        let remaining = |value: u64| match mode {
            HeaderMode::MinusOne => "-1".to_owned(),
            _ => value.to_string(),
        };
        if mode == HeaderMode::Missing {
            return;
        }
        if let Some(left) = snapshot.remaining_requests {
            insert(headers, "x-ratelimit-remaining-requests", remaining(left));
        }
        if let Some(left) = snapshot.remaining_tokens {
            insert(headers, "x-ratelimit-remaining-tokens", remaining(left));
        }
        // Azure sends only the two `remaining` headers; OpenAI all six.
        if dialect == SimDialect::OpenAi {
            if let Some(limit) = snapshot.limit_requests {
                insert(headers, "x-ratelimit-limit-requests", limit.to_string());
                insert(
                    headers,
                    "x-ratelimit-reset-requests",
                    go_duration(snapshot.reset),
                );
            }
            if let Some(limit) = snapshot.limit_tokens {
                insert(headers, "x-ratelimit-limit-tokens", limit.to_string());
                insert(
                    headers,
                    "x-ratelimit-reset-tokens",
                    go_duration(snapshot.reset),
                );
            }
        }
    }

    pub(crate) fn reply_raw(
        &self,
        seq: u64,
        status: u16,
        body: impl Into<Bytes>,
        snapshot: Option<&Snapshot>,
    ) -> Response<Body> {
        let mut response = Response::new(full(body));
        *response.status_mut() =
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        self.base_headers(seq, snapshot, response.headers_mut());
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        response
    }

    pub(crate) fn reply_json(
        &self,
        seq: u64,
        status: u16,
        body: &Value,
        snapshot: Option<&Snapshot>,
    ) -> Response<Body> {
        self.reply_raw(seq, status, body.to_string(), snapshot)
    }

    pub(crate) fn reply_error(
        &self,
        seq: u64,
        status: u16,
        code: Option<&str>,
        message: &str,
        retry_after: Option<Duration>,
    ) -> Response<Body> {
        let body = match self.config().dialect {
            SimDialect::OpenAi => {
                let (kind, default_code) = match status {
                    401 => ("invalid_request_error", Some("invalid_api_key")),
                    404 => ("invalid_request_error", Some("model_not_found")),
                    429 if code == Some("insufficient_quota") => ("insufficient_quota", None),
                    429 => ("requests", Some("rate_limit_exceeded")),
                    500..=599 => ("server_error", None),
                    _ => ("invalid_request_error", None),
                };
                json!({"error": {"message": message, "type": kind, "param": null, "code": code.or(default_code)}})
            }
            SimDialect::Azure => {
                let default_code = match status {
                    404 => "DeploymentNotFound".to_owned(),
                    500..=599 => "InternalServerError".to_owned(),
                    other => other.to_string(),
                };
                let code = code.map_or(default_code, str::to_owned);
                let mut error = json!({"code": code, "message": message});
                if code == "content_filter" {
                    error["param"] = json!("prompt");
                    error["status"] = json!(400);
                    error["innererror"] = json!({"code": "ResponsibleAIPolicyViolation", "content_filter_result": {"hate": {"filtered": true, "severity": "high"}}});
                }
                json!({"error": error})
            }
        };
        let mut response = self.reply_json(seq, status, &body, None);
        if let Some(wait) = retry_after {
            let headers = response.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&wait.as_secs_f64().ceil().max(1.0).to_string()) {
                headers.insert("retry-after", v);
            }
            if let Ok(v) = HeaderValue::from_str(&wait.as_millis().to_string()) {
                headers.insert("retry-after-ms", v);
            }
        }
        response
    }

    /// A 429 announcing `wait` as `form` says ([`Fault::Throttled`]).
    fn reply_throttled_as(&self, seq: u64, wait: Duration, form: WaitForm) -> Response<Body> {
        let message = match form {
            WaitForm::InMessage => format!(
                "Rate limit reached on tokens per min. Please try again in {}.",
                go_duration(wait)
            ),
            _ => "Rate limit reached on tokens per min.".to_owned(),
        };
        let mut response = self.reply_error(seq, 429, None, &message, None);
        let headers = response.headers_mut();
        let mut set = |name: &'static str, value: String| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        };
        match form {
            WaitForm::Seconds => set("retry-after", wait.as_secs().max(1).to_string()),
            WaitForm::Millis => set("retry-after-ms", wait.as_millis().to_string()),
            WaitForm::AzureMillis => set("x-ms-retry-after-ms", wait.as_millis().to_string()),
            WaitForm::HttpDate => set(
                "retry-after",
                httpdate::fmt_http_date(
                    std::time::SystemTime::now() + wait + Duration::from_secs(1),
                ),
            ),
            WaitForm::ResetTokens => {
                set("x-ratelimit-remaining-tokens", "0".to_owned());
                set("x-ratelimit-reset-tokens", go_duration(wait));
            }
            WaitForm::InMessage | WaitForm::Unannounced => {}
        }
        response
    }

    fn reply_throttled(&self, seq: u64, snapshot: &Snapshot, tokens: bool) -> Response<Body> {
        let wait = snapshot.reset.max(Duration::from_millis(1));
        let message = match self.config().dialect {
            SimDialect::Azure => format!(
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version simulated have exceeded {} rate limit of your current OpenAI S0 pricing tier. Please retry after {} seconds.",
                if tokens { "token" } else { "call" },
                wait.as_secs_f64().ceil().max(1.0)
            ),
            SimDialect::OpenAi => format!(
                "Rate limit reached on {} per min. Please try again in {}.",
                if tokens { "tokens" } else { "requests" },
                go_duration(wait)
            ),
        };
        let headers = self.limiter().limits().headers;
        let announced = (headers != HeaderMode::Missing).then_some(wait);
        let mut response = self.reply_error(seq, 429, None, &message, announced);
        self.base_headers(seq, Some(snapshot), response.headers_mut());
        response
    }

    fn reply_stream(
        self: &Arc<Self>,
        seq: u64,
        snapshot: &Snapshot,
        generation: &Generation,
        fault: Option<Fault>,
        malformed: bool,
        in_flight: crate::state::InFlight,
    ) -> Response<Body> {
        let mut events = generation.events();
        if malformed && let Some(first) = events.first_mut() {
            "{\"id\": \"broken".clone_into(&mut first.1);
        }
        let state = Arc::clone(self);
        let completion_tokens = u64::from(generation.completion_tokens());
        let plan = StreamPlan {
            named: generation.operation == Operation::Responses,
            events,
            next: 0,
            fault,
            done: false,
            state,
            completion_tokens,
            in_flight: Some(in_flight),
        };
        let body = futures_util::stream::unfold(plan, StreamPlan::step);
        let body = StreamBody::new(body.map(|item: io::Result<Bytes>| item.map(Frame::data)));
        let mut response = Response::new(BodyExt::boxed(body));
        self.base_headers(seq, Some(snapshot), response.headers_mut());
        let headers = response.headers_mut();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert("cache-control", HeaderValue::from_static("no-cache"));
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        response
    }

    fn peek(&self) -> Snapshot {
        self.limiter().peek(Instant::now())
    }
}

struct StreamPlan {
    /// Each event is named by its data's `type`, and the stream ends without `[DONE]` (the
    /// Responses API's events).
    named: bool,
    events: Vec<(Duration, String)>,
    next: usize,
    fault: Option<Fault>,
    done: bool,
    state: Arc<EndpointState>,
    completion_tokens: u64,
    in_flight: Option<crate::state::InFlight>,
}

impl StreamPlan {
    async fn step(mut self) -> Option<(io::Result<Bytes>, Self)> {
        if self.done {
            self.in_flight.take();
            return None;
        }
        let sent = self.next;
        match &self.fault {
            Some(Fault::TruncateStream { after_events }) if sent >= *after_events => {
                self.done = true;
                return None;
            }
            Some(Fault::ResetMidStream { after_events }) if sent >= *after_events => {
                self.done = true;
                return Some((
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "injected reset",
                    )),
                    self,
                ));
            }
            Some(Fault::ErrorEvent { after_events }) if sent >= *after_events => {
                self.done = true;
                let event = json!({"error": {"message": "The server had an error while processing your request. Sorry about that! (simulated)", "type": "server_error", "param": null, "code": null}});
                return Some((Ok(Bytes::from(format!("data: {event}\n\n"))), self));
            }
            Some(Fault::StallMidStream {
                after_events,
                duration,
            }) if sent == *after_events => {
                let duration = *duration;
                self.fault = None;
                tokio::time::sleep(duration).await;
            }
            _ => {}
        }
        if let Some((delay, data)) = self.events.get(self.next) {
            if !delay.is_zero() {
                tokio::time::sleep(*delay).await;
            }
            let mut frame = String::with_capacity(data.len() + 8);
            if self.named
                && let Ok(event) = serde_json::from_str::<Value>(data)
                && let Some(name) = event["type"].as_str()
            {
                let _ = writeln!(frame, "event: {name}");
            }
            let _ = write!(frame, "data: {data}\n\n");
            self.next += 1;
            return Some((Ok(Bytes::from(frame)), self));
        }
        self.done = true;
        self.state.counters.ok.inc();
        self.state
            .counters
            .completion_tokens
            .add(self.completion_tokens);
        if self.named {
            self.in_flight.take();
            return None;
        }
        Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), self))
    }
}

/// Formats a duration the way OpenAI's reset headers do: `1s`, `6m0s`, `250ms`.
pub(crate) fn go_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let seconds = duration.as_secs_f64();
    let minutes = (seconds / 60.0).floor() as u64;
    let rest = seconds - minutes as f64 * 60.0;
    let rest = (rest * 1000.0).round() / 1000.0;
    if minutes > 0 {
        format!("{minutes}m{rest}s")
    } else {
        format!("{rest}s")
    }
}

impl RecordedRequest {
    fn new(parts: &http::request::Parts, body: Option<Value>) -> Self {
        let mut headers = BTreeMap::new();
        for (name, value) in &parts.headers {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            headers
                .entry(name.as_str().to_owned())
                .and_modify(|v: &mut String| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        Self {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers,
            body: body.unwrap_or(Value::Null),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_match_openai_style() {
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn routes_both_dialects() {
        assert_eq!(
            route(SimDialect::OpenAi, &Method::POST, "/v1/chat/completions"),
            Some((Operation::Chat, None))
        );
        assert_eq!(
            route(
                SimDialect::Azure,
                &Method::POST,
                "/openai/deployments/gpt%2D4o/embeddings"
            ),
            Some((Operation::Embeddings, Some("gpt-4o".to_owned())))
        );
        assert_eq!(
            route(SimDialect::Azure, &Method::POST, "/openai/v1/completions"),
            Some((Operation::Completions, None))
        );
        assert_eq!(
            route(SimDialect::OpenAi, &Method::POST, "/openai/v1/completions"),
            None
        );
        assert_eq!(
            route(SimDialect::OpenAi, &Method::DELETE, "/v1/chat/completions"),
            None
        );
    }
}
