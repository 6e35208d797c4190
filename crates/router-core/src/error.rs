//! The one error type of the router.
//!
//! [`Error`] is opaque, one pointer wide (so `Result<T, Error>` stays cheap), and answers the
//! questions the router asks of every failure: what [`kind`](Error::kind) it is, whether another
//! attempt [may succeed](Error::is_retryable), how long the upstream asked us to
//! [wait](Error::retry_after), and what it means for the endpoint's
//! [health](Error::health_effect).
//!
//! # The failure table
//!
//! | upstream says | [`ErrorKind`] | retryable | health effect |
//! |---|---|---|---|
//! | 429 with retry-after / reset headers | `RateLimited` | yes | `Cooldown` for exactly that long |
//! | 429 `insufficient_quota` | `QuotaExhausted` | yes (elsewhere) | `Disable` |
//! | 429 "Request too large" | `RequestTooLarge` | yes (a larger quota may take it) | none |
//! | 401 | `Unauthorized` | yes (elsewhere) | `Disable` |
//! | 403 | `Forbidden` | yes (elsewhere) | `Disable` |
//! | 404, Azure `DeploymentNotFound` | `NotFound` | yes (elsewhere) | `Disable` |
//! | 408 | `RequestTimeout` | yes | `Failure` |
//! | 409 | `Conflict` | yes | `Failure` |
//! | 5xx | `ServerError` | yes | `Failure` |
//! | connect error | `Connect` | yes | `Failure` |
//! | timeout (connect, first byte, between chunks) | `Timeout` | yes | `Failure` |
//! | connection reset or closed | `Transport` | yes | `Failure` |
//! | malformed body | `Decode` | yes | `Failure` |
//! | `error` event mid-stream | `StreamError` | yes, before the first byte reached the caller | `Failure` |
//! | stream cut before `[DONE]` | `StreamTruncated` | yes, before the first byte reached the caller | `Failure` |
//! | 400 `content_filter` | `ContentFilter` | no | none |
//! | 400 `context_length_exceeded` | `ContextLengthExceeded` | no | none |
//! | 400 other | `BadRequest` | no | none |
//! | 422 | `Unprocessable` | no | none |
//! | any other status | `UnexpectedStatus` | no | none |
//!
//! An upstream `x-should-retry: true|false` header overrides the retryable column, as the
//! official SDKs do.
//!
//! # Secrets
//!
//! An `Error` never holds a credential: backends build it from the status, the parsed error
//! body (with their key scrubbed from the message) and the endpoint's name.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use router_types::ErrorBody;

use crate::endpoint::EndpointId;
use crate::ratelimit::{self, RateLimitInfo};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Every failure of the router, of a backend or of an upstream.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    status: Option<u16>,
    endpoint: Option<EndpointId>,
    retry_after: Option<Duration>,
    should_retry: Option<bool>,
    message: Option<String>,
    body: Option<ErrorBody>,
    source: Option<BoxError>,
    /// Azure spilled the request over to its spillover deployment, which failed too.
    spilled: bool,
    /// Attempts the router made for the request (0: none, or not said).
    attempts: u32,
}

/// What kind of failure an [`Error`] is. Field-less and `Copy`, for matching and metric labels.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// 429: throttled (tokens or requests per minute, or capacity).
    RateLimited,
    /// 429 `insufficient_quota`: billing or quota exhausted; not transient.
    QuotaExhausted,
    /// 429 "Request too large": the request alone exceeds the endpoint's per-minute budget.
    RequestTooLarge,
    /// 401: bad key, expired token, or wrong endpoint.
    Unauthorized,
    /// 403: access denied (RBAC, network rules, region).
    Forbidden,
    /// 404: the deployment or model does not exist there.
    NotFound,
    /// 400: the request is invalid.
    BadRequest,
    /// 400 `content_filter`: the prompt was filtered.
    ContentFilter,
    /// 400 `context_length_exceeded`: the prompt plus the output cap exceed the model's window.
    ContextLengthExceeded,
    /// 422: unprocessable request.
    Unprocessable,
    /// 408: the upstream timed out the request.
    RequestTimeout,
    /// 409: conflict or lock timeout upstream.
    Conflict,
    /// 5xx: the upstream failed.
    ServerError,
    /// A status outside the table.
    UnexpectedStatus,
    /// The connection could not be made.
    Connect,
    /// A timeout: connecting, waiting for headers, or waiting between stream chunks.
    Timeout,
    /// The connection broke (reset, closed early) before a complete answer.
    Transport,
    /// The upstream's body was not what the protocol says.
    Decode,
    /// The upstream sent an `error` event in the middle of a stream.
    StreamError,
    /// The stream ended before `[DONE]`.
    StreamTruncated,
    /// The backend does not support this operation.
    Unsupported,
    /// Invalid configuration or builder input; the message names the field.
    Config,
    /// The request could not be sent as given (for example, it does not serialize).
    InvalidRequest,
    /// No model group has the requested model; the message lists the known ones.
    UnknownModel,
    /// No deployment of the group can serve the request (all disabled, or none left to try).
    Unavailable,
    /// The router throttled the request: every deployment is out of quota or cooling down
    /// beyond the request's deadline (or the waitlist is full); [`Error::retry_after`] is the
    /// soonest recovery across the group.
    Throttled,
    /// The request's deadline passed before an answer.
    DeadlineExceeded,
}

/// One row of the kind table: everything the router and a server answering for it need to
/// know about a kind, in one place.
struct Row {
    kind: ErrorKind,
    name: &'static str,
    retryable: bool,
    effect: HealthEffect,
    status: u16,
    description: &'static str,
}

const fn row(
    kind: ErrorKind,
    name: &'static str,
    retryable: bool,
    effect: HealthEffect,
    status: u16,
    description: &'static str,
) -> Row {
    Row {
        kind,
        name,
        retryable,
        effect,
        status,
        description,
    }
}

use HealthEffect::{Cooldown, Disable, Failure, None as Nothing};

/// The kinds, in declaration order (a test checks it): name, retryable, health effect, the HTTP
/// status a server answering for the router gives, and the description `Display` starts with.
#[rustfmt::skip]
const TABLE: [Row; 27] = [
    row(ErrorKind::RateLimited, "rate_limited", true, Cooldown, 429, "rate limited"),
    row(ErrorKind::QuotaExhausted, "quota_exhausted", true, Disable, 502, "quota exhausted"),
    row(ErrorKind::RequestTooLarge, "request_too_large", true, Nothing, 502, "request too large for the endpoint's quota"),
    row(ErrorKind::Unauthorized, "unauthorized", true, Disable, 502, "unauthorized"),
    row(ErrorKind::Forbidden, "forbidden", true, Disable, 502, "forbidden"),
    row(ErrorKind::NotFound, "not_found", true, Disable, 502, "not found"),
    row(ErrorKind::BadRequest, "bad_request", false, Nothing, 400, "bad request"),
    row(ErrorKind::ContentFilter, "content_filter", false, Nothing, 400, "blocked by the content filter"),
    row(ErrorKind::ContextLengthExceeded, "context_length_exceeded", false, Nothing, 400, "context length exceeded"),
    row(ErrorKind::Unprocessable, "unprocessable", false, Nothing, 422, "unprocessable request"),
    row(ErrorKind::RequestTimeout, "request_timeout", true, Failure, 502, "request timed out upstream"),
    row(ErrorKind::Conflict, "conflict", true, Failure, 502, "conflict"),
    row(ErrorKind::ServerError, "server_error", true, Failure, 502, "upstream server error"),
    row(ErrorKind::UnexpectedStatus, "unexpected_status", false, Nothing, 502, "unexpected status"),
    row(ErrorKind::Connect, "connect", true, Failure, 502, "connection failed"),
    row(ErrorKind::Timeout, "timeout", true, Failure, 504, "timed out"),
    row(ErrorKind::Transport, "transport", true, Failure, 502, "connection broken"),
    row(ErrorKind::Decode, "decode", true, Failure, 502, "malformed response"),
    row(ErrorKind::StreamError, "stream_error", true, Failure, 502, "error event in stream"),
    row(ErrorKind::StreamTruncated, "stream_truncated", true, Failure, 502, "stream ended before [DONE]"),
    row(ErrorKind::Unsupported, "unsupported", true, Nothing, 502, "unsupported operation"),
    row(ErrorKind::Config, "config", false, Nothing, 502, "invalid configuration"),
    row(ErrorKind::InvalidRequest, "invalid_request", false, Nothing, 400, "invalid request"),
    row(ErrorKind::UnknownModel, "unknown_model", false, Nothing, 404, "unknown model"),
    row(ErrorKind::Unavailable, "unavailable", false, Nothing, 503, "no deployment available"),
    row(ErrorKind::Throttled, "throttled", false, Nothing, 429, "throttled by the router"),
    row(ErrorKind::DeadlineExceeded, "deadline_exceeded", false, Nothing, 504, "deadline exceeded"),
];

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [Self; 27] = {
        let mut all = [Self::RateLimited; 27];
        let mut i = 0;
        while i < TABLE.len() {
            all[i] = TABLE[i].kind;
            i += 1;
        }
        all
    };

    /// How many kinds there are.
    pub const COUNT: usize = Self::ALL.len();

    fn row(self) -> &'static Row {
        &TABLE[self as usize]
    }

    /// A short `snake_case` name, stable, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        self.row().name
    }

    /// The kind's position in [`ALL`](Self::ALL), for per-kind counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The kind at `index` of [`ALL`](Self::ALL) (`InvalidRequest` when out of range).
    pub fn from_index(index: usize) -> Self {
        Self::ALL
            .get(index)
            .copied()
            .unwrap_or(Self::InvalidRequest)
    }

    /// Whether another attempt, on another endpoint, may succeed.
    pub fn is_retryable(self) -> bool {
        self.row().retryable
    }

    /// What the failure says about the endpoint that produced it.
    pub fn health_effect(self) -> HealthEffect {
        self.row().effect
    }

    /// The HTTP status a server answering for the router gives a caller for this kind: 429 for
    /// throttling, the 4xx of a request at fault (a caller's own upstream answer keeps the
    /// upstream's status), 404 for an unknown model, 503 when nothing can serve, 504 for
    /// deadlines and timeouts, 502 for an upstream that failed.
    pub fn status(self) -> u16 {
        self.row().status
    }

    /// What happened, in a few words ("upstream server error"), for people.
    pub fn describe(self) -> &'static str {
        self.row().description
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a failure means for the endpoint that produced it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthEffect {
    /// Nothing: the request was at fault, not the endpoint.
    None,
    /// Cool the endpoint down for the error's [`retry_after`](Error::retry_after).
    Cooldown,
    /// Count a failure toward ejection.
    Failure,
    /// Disable the deployment: out until a health probe finds it serving (or it is reconfigured).
    Disable,
}

impl Error {
    fn new(kind: ErrorKind) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                status: None,
                endpoint: None,
                retry_after: None,
                should_retry: None,
                message: None,
                body: None,
                source: None,
                spilled: false,
                attempts: 0,
            }),
        }
    }

    /// An error of `kind` with a message.
    pub fn with_message(kind: ErrorKind, message: impl Into<String>) -> Self {
        let mut error = Self::new(kind);
        error.inner.message = Some(message.into());
        error
    }

    /// Classifies an upstream answer with an error status.
    ///
    /// `body` is the parsed error object when the upstream sent one (its message must already be
    /// free of secrets); `rate_limits` are the answer's parsed headers, which give
    /// [`retry_after`](Self::retry_after) and the `x-should-retry` override.
    pub fn upstream(
        endpoint: EndpointId,
        status: u16,
        body: Option<ErrorBody>,
        rate_limits: &RateLimitInfo,
    ) -> Self {
        let kind = classify(status, body.as_ref());
        let mut error = Self::new(kind);
        error.inner.status = Some(status);
        error.inner.endpoint = Some(endpoint);
        error.inner.should_retry = rate_limits.should_retry;
        error.inner.retry_after = rate_limits.retry_hint().or_else(|| {
            body.as_ref()
                .and_then(|b| ratelimit::retry_hint_in_message(&b.message))
        });
        error.inner.body = body;
        error
    }

    /// An `error` event received mid-stream.
    pub fn stream_event(endpoint: EndpointId, body: ErrorBody) -> Self {
        let mut error = Self::new(ErrorKind::StreamError);
        error.inner.endpoint = Some(endpoint);
        error.inner.body = Some(body);
        error
    }

    /// A transport-level failure (`Connect`, `Timeout`, `Transport`, `Decode`,
    /// `StreamTruncated`) at `endpoint`, with what happened and its cause.
    pub fn transport(
        kind: ErrorKind,
        endpoint: EndpointId,
        message: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        let mut error = Self::with_message(kind, message);
        error.inner.endpoint = Some(endpoint);
        error.inner.source = source;
        error
    }

    /// The backend at `endpoint` does not support `operation`.
    pub fn unsupported(endpoint: EndpointId, operation: &str) -> Self {
        let mut error = Self::with_message(
            ErrorKind::Unsupported,
            format!("this backend does not support {operation}"),
        );
        error.inner.endpoint = Some(endpoint);
        error
    }

    /// Invalid configuration; `message` names the field and the problem.
    pub fn config(message: impl Into<String>) -> Self {
        Self::with_message(ErrorKind::Config, message)
    }

    /// Prefixes the message with `context` (`"endpoints[2] (`east`)"`), keeping the kind: for
    /// configuration errors raised deep inside, named from the outside.
    #[must_use]
    pub fn in_context(mut self, context: impl fmt::Display) -> Self {
        self.inner.message = Some(match self.inner.message.take() {
            Some(message) => format!("{context}: {message}"),
            None => context.to_string(),
        });
        self
    }

    /// Our own message (not the upstream's), when there is one.
    pub fn message(&self) -> Option<&str> {
        self.inner.message.as_deref()
    }

    /// Sets the endpoint the error came from.
    #[must_use]
    pub fn with_endpoint(mut self, endpoint: EndpointId) -> Self {
        self.inner.endpoint = Some(endpoint);
        self
    }

    /// Sets how many attempts the router made for the request before it failed.
    #[must_use]
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.inner.attempts = attempts;
        self
    }

    /// Attempts the router made on the upstreams for the request before it failed, in every
    /// model group tried: 0 when it made none (the router's own limits refused it, nothing
    /// was eligible) or when the error is a backend's, not the router's answer.
    pub fn attempts(&self) -> u32 {
        self.inner.attempts
    }

    /// Sets how long to wait before trying the endpoint again.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.inner.retry_after = Some(retry_after);
        self
    }

    /// Sets the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The upstream's HTTP status, when it answered.
    pub fn status(&self) -> Option<u16> {
        self.inner.status
    }

    /// The endpoint that failed, when one did.
    pub fn endpoint(&self) -> Option<&EndpointId> {
        self.inner.endpoint.as_ref()
    }

    /// Marks the error as Azure's answer after spilling the request over to the spillover
    /// deployment (`x-ms-spillover-error`, `x-ms-spillover-from-*`): both deployments tried.
    #[must_use]
    pub fn with_spilled(mut self) -> Self {
        self.inner.spilled = true;
        self
    }

    /// Whether Azure had spilled the request over to its spillover deployment already, which
    /// failed too ([`with_spilled`](Self::with_spilled)).
    pub fn spilled(&self) -> bool {
        self.inner.spilled
    }

    /// How long the upstream asked to wait (`retry-after-ms`, `retry-after`, reset headers, or
    /// the "retry after N seconds" of the message), when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// The upstream's error object, when it sent one.
    pub fn body(&self) -> Option<&ErrorBody> {
        self.inner.body.as_ref()
    }

    /// Whether another attempt, on another endpoint, may succeed. An upstream
    /// `x-should-retry` header overrides the kind's default.
    pub fn is_retryable(&self) -> bool {
        self.inner
            .should_retry
            .unwrap_or_else(|| self.inner.kind.is_retryable())
    }

    /// What the failure means for the endpoint's health.
    pub fn health_effect(&self) -> HealthEffect {
        self.inner.kind.health_effect()
    }

    /// Whether the upstream throttled the request (429, not quota exhaustion).
    pub fn is_rate_limited(&self) -> bool {
        self.inner.kind == ErrorKind::RateLimited
    }

    /// Whether the router itself throttled the request (no deployment had room in time).
    pub fn is_throttled(&self) -> bool {
        self.inner.kind == ErrorKind::Throttled
    }

    /// Whether a timeout caused it.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::Timeout | ErrorKind::RequestTimeout
        )
    }

    /// Whether the upstream answered (with an error status or an error event).
    pub fn is_upstream(&self) -> bool {
        self.inner.status.is_some() || self.inner.kind == ErrorKind::StreamError
    }
}

fn classify(status: u16, body: Option<&ErrorBody>) -> ErrorKind {
    let is = |value: &str| body.is_some_and(|b| b.is(value));
    match status {
        429 if is("insufficient_quota") => ErrorKind::QuotaExhausted,
        429 if body.is_some_and(|b| b.message.starts_with("Request too large")) => {
            ErrorKind::RequestTooLarge
        }
        429 => ErrorKind::RateLimited,
        400 if is("content_filter") || has_inner_code(body, "ResponsibleAIPolicyViolation") => {
            ErrorKind::ContentFilter
        }
        400 if is("context_length_exceeded") => ErrorKind::ContextLengthExceeded,
        400 => ErrorKind::BadRequest,
        401 => ErrorKind::Unauthorized,
        403 => ErrorKind::Forbidden,
        404 => ErrorKind::NotFound,
        408 => ErrorKind::RequestTimeout,
        409 => ErrorKind::Conflict,
        422 => ErrorKind::Unprocessable,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::UnexpectedStatus,
    }
}

fn has_inner_code(body: Option<&ErrorBody>, code: &str) -> bool {
    body.and_then(|b| b.extra.get("innererror"))
        .and_then(|inner| inner.get("code"))
        .and_then(|c| c.as_str())
        == Some(code)
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind);
        if let Some(status) = self.inner.status {
            d.field("status", &status);
        }
        if let Some(endpoint) = &self.inner.endpoint {
            d.field("endpoint", endpoint);
        }
        if let Some(retry_after) = self.inner.retry_after {
            d.field("retry_after", &retry_after);
        }
        if self.inner.attempts > 0 {
            d.field("attempts", &self.inner.attempts);
        }
        if let Some(message) = &self.inner.message {
            d.field("message", message);
        }
        if let Some(body) = &self.inner.body {
            d.field("body", body);
        }
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.inner.kind.describe())?;
        if let Some(endpoint) = &self.inner.endpoint {
            write!(f, " at endpoint `{endpoint}`")?;
        }
        if let Some(status) = self.inner.status {
            write!(f, " (HTTP {status})")?;
        }
        if let Some(message) = &self.inner.message {
            write!(f, ": {message}")?;
        }
        if let Some(body) = &self.inner.body
            && !body.message.is_empty()
        {
            write!(f, ": {}", body.message)?;
        }
        if let Some(retry_after) = self.inner.retry_after {
            write!(f, "; retry after {:.3}s", retry_after.as_secs_f64())?;
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_types::ErrorResponse;

    fn body(json: &str) -> ErrorBody {
        serde_json::from_str::<ErrorResponse>(json).unwrap().error
    }

    fn fixture(rel: &str) -> ErrorBody {
        let path = format!("{}/../../fixtures/{rel}", env!("CARGO_MANIFEST_DIR"));
        body(&std::fs::read_to_string(path).unwrap())
    }

    fn upstream(status: u16, body: Option<ErrorBody>) -> Error {
        Error::upstream(
            EndpointId::new("ep"),
            status,
            body,
            &RateLimitInfo::default(),
        )
    }

    #[test]
    fn the_table_is_in_declaration_order() {
        for (i, row) in TABLE.iter().enumerate() {
            assert_eq!(row.kind as usize, i, "row {i} is {:?}", row.kind);
        }
    }

    #[test]
    fn kinds_index_round_trip() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
            assert_eq!(ErrorKind::from_index(i), *kind);
        }
        let names: std::collections::HashSet<_> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), ErrorKind::COUNT, "labels are distinct");
    }

    #[test]
    fn error_is_one_pointer() {
        assert_eq!(size_of::<Error>(), size_of::<usize>());
        assert_eq!(size_of::<Result<(), Error>>(), size_of::<usize>());
    }

    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one row per line of the failure table"
    )]
    fn every_row_of_the_failure_table() {
        let rows: [(u16, Option<ErrorBody>, ErrorKind, bool, HealthEffect); 16] = [
            (
                429,
                Some(fixture("openai/error_429_rate_limit_tokens.json")),
                ErrorKind::RateLimited,
                true,
                HealthEffect::Cooldown,
            ),
            (
                429,
                Some(fixture("azure/error_429_token_rate_limit.json")),
                ErrorKind::RateLimited,
                true,
                HealthEffect::Cooldown,
            ),
            (
                429,
                Some(fixture("openai/error_429_insufficient_quota.json")),
                ErrorKind::QuotaExhausted,
                true,
                HealthEffect::Disable,
            ),
            (
                429,
                Some(body(
                    r#"{"error":{"message":"Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000.","type":"tokens","code":"rate_limit_exceeded"}}"#,
                )),
                ErrorKind::RequestTooLarge,
                true,
                HealthEffect::None,
            ),
            (
                401,
                Some(fixture("azure/error_401_invalid_key.json")),
                ErrorKind::Unauthorized,
                true,
                HealthEffect::Disable,
            ),
            (403, None, ErrorKind::Forbidden, true, HealthEffect::Disable),
            (
                404,
                Some(fixture("azure/error_404_deployment_not_found.json")),
                ErrorKind::NotFound,
                true,
                HealthEffect::Disable,
            ),
            (
                400,
                Some(fixture("azure/error_400_content_filter_prompt.json")),
                ErrorKind::ContentFilter,
                false,
                HealthEffect::None,
            ),
            (
                400,
                Some(fixture("openai/error_400_context_length_exceeded.json")),
                ErrorKind::ContextLengthExceeded,
                false,
                HealthEffect::None,
            ),
            (
                400,
                Some(body(
                    r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":null}}"#,
                )),
                ErrorKind::BadRequest,
                false,
                HealthEffect::None,
            ),
            (
                422,
                None,
                ErrorKind::Unprocessable,
                false,
                HealthEffect::None,
            ),
            (
                408,
                None,
                ErrorKind::RequestTimeout,
                true,
                HealthEffect::Failure,
            ),
            (409, None, ErrorKind::Conflict, true, HealthEffect::Failure),
            (
                500,
                None,
                ErrorKind::ServerError,
                true,
                HealthEffect::Failure,
            ),
            (
                503,
                None,
                ErrorKind::ServerError,
                true,
                HealthEffect::Failure,
            ),
            (
                418,
                None,
                ErrorKind::UnexpectedStatus,
                false,
                HealthEffect::None,
            ),
        ];
        for (status, body, kind, retryable, effect) in rows {
            let error = upstream(status, body);
            assert_eq!(error.kind(), kind, "status {status}");
            assert_eq!(error.is_retryable(), retryable, "{kind:?}");
            assert_eq!(error.health_effect(), effect, "{kind:?}");
            assert_eq!(error.status(), Some(status));
        }
    }

    #[test]
    fn retry_after_from_headers_then_message() {
        let limits = RateLimitInfo {
            retry_after: Some(Duration::from_millis(1500)),
            ..RateLimitInfo::default()
        };
        let error = Error::upstream(EndpointId::new("a"), 429, None, &limits);
        assert_eq!(error.retry_after(), Some(Duration::from_millis(1500)));

        // Azure's text when no header came: "Please retry after 33 seconds."
        let azure = upstream(429, Some(fixture("azure/error_429_token_rate_limit.json")));
        assert_eq!(azure.retry_after(), Some(Duration::from_secs(33)));
        // OpenAI's text: "Please try again in 84ms."
        let openai = upstream(
            429,
            Some(fixture("openai/error_429_rate_limit_tokens.json")),
        );
        assert_eq!(openai.retry_after(), Some(Duration::from_millis(84)));
    }

    #[test]
    fn should_retry_header_overrides_the_kind() {
        let mut limits = RateLimitInfo {
            should_retry: Some(false),
            ..RateLimitInfo::default()
        };
        let error = Error::upstream(EndpointId::new("a"), 503, None, &limits);
        assert!(!error.is_retryable());
        limits.should_retry = Some(true);
        let error = Error::upstream(EndpointId::new("a"), 400, None, &limits);
        assert!(error.is_retryable());
    }

    #[test]
    fn display_names_endpoint_status_and_wait() {
        let limits = RateLimitInfo {
            retry_after: Some(Duration::from_secs(2)),
            ..RateLimitInfo::default()
        };
        let error = Error::upstream(
            EndpointId::new("azure-east"),
            429,
            Some(body(r#"{"error":{"message":"slow down","code":"429"}}"#)),
            &limits,
        );
        assert_eq!(
            error.to_string(),
            "rate limited at endpoint `azure-east` (HTTP 429): slow down; retry after 2.000s"
        );
    }
}
