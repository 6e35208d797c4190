//! Every error the gateway answers, OpenAI-shaped: `{"error": {message, type, param, code}}`
//! with the status an OpenAI client expects, and `Retry-After` (whole seconds) plus
//! `retry-after-ms` on a 429 that knows its wait.
//!
//! A router error's status is its kind's ([`ErrorKind::status`]); its `type` and `code` follow
//! from the status. A request the upstream refused as the caller's fault (400, 422, content
//! filter, context length) is answered with the upstream's own status and error object, as it
//! was.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use router_facade::types::{ErrorBody, ErrorResponse, Extra};
use router_facade::{Error, ErrorKind};

/// The header naming the endpoint that served an answer (or failed last).
pub(crate) const ENDPOINT: &str = "x-openai-router-endpoint";

/// The header counting the attempts a request took.
pub(crate) const ATTEMPTS: &str = "x-openai-router-attempts";

/// An error answer.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// The router's error for a request.
    Router(Error),
    /// The gateway's own refusal (authentication, a body it cannot read, a route it does not
    /// have).
    Gateway {
        status: StatusCode,
        message: String,
        code: Option<&'static str>,
    },
}

impl ApiError {
    fn gateway(status: StatusCode, message: impl Into<String>, code: Option<&'static str>) -> Self {
        Self::Gateway {
            status,
            message: message.into(),
            code,
        }
    }

    /// 401: no key, or not a key of this gateway.
    pub(crate) fn unauthorized(message: &str) -> Self {
        Self::gateway(StatusCode::UNAUTHORIZED, message, Some("invalid_api_key"))
    }

    /// 403: the key may not use `model`.
    pub(crate) fn forbidden_model(model: &str) -> Self {
        Self::gateway(
            StatusCode::FORBIDDEN,
            format!("this key may not use model `{model}`"),
            Some("model_not_allowed"),
        )
    }

    /// 400: the body is not a request of this route.
    pub(crate) fn bad_body(message: impl Into<String>) -> Self {
        Self::gateway(StatusCode::BAD_REQUEST, message, None)
    }

    /// The body could not be read (413 when it is over the limit).
    pub(crate) fn unreadable(status: StatusCode, message: impl Into<String>) -> Self {
        let code = (status == StatusCode::PAYLOAD_TOO_LARGE).then_some("request_too_large");
        Self::gateway(status, message, code)
    }

    /// 404: what the request names does not exist (a stored response the upstream no longer
    /// has), with the upstream's message.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::gateway(StatusCode::NOT_FOUND, message, Some("not_found"))
    }

    /// 404: no such route.
    pub(crate) fn no_route() -> Self {
        Self::gateway(StatusCode::NOT_FOUND, "no such route", Some("not_found"))
    }

    /// A route asked with a method it does not take.
    pub(crate) fn wrong_method() -> Self {
        Self::gateway(
            StatusCode::METHOD_NOT_ALLOWED,
            "this route does not take that method",
            Some("method_not_allowed"),
        )
    }

    /// The status answered.
    #[cfg(test)]
    pub(crate) fn status(&self) -> u16 {
        match self {
            Self::Router(error) => router_status(error).as_u16(),
            Self::Gateway { status, .. } => status.as_u16(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        Self::Router(error)
    }
}

/// The status of a router error: the upstream's own for a request at fault, else the kind's.
fn router_status(error: &Error) -> StatusCode {
    let upstream = error
        .status()
        .filter(|_| at_fault(error.kind()))
        .and_then(|s| StatusCode::from_u16(s).ok());
    upstream
        .or_else(|| StatusCode::from_u16(error.kind().status()).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY)
}

/// Kinds where the caller's request is at fault, answered as the upstream answered.
fn at_fault(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::BadRequest
            | ErrorKind::ContentFilter
            | ErrorKind::ContextLengthExceeded
            | ErrorKind::Unprocessable
    )
}

/// OpenAI's error `type` and `code` for a status the gateway answers.
fn type_and_code(status: StatusCode) -> (&'static str, Option<&'static str>) {
    match status.as_u16() {
        429 => ("rate_limit_error", Some("rate_limit_exceeded")),
        404 => ("invalid_request_error", Some("model_not_found")),
        400..=499 => ("invalid_request_error", None),
        503 => ("server_error", Some("no_deployment_available")),
        504 => ("server_error", Some("timeout")),
        _ => ("server_error", Some("upstream_error")),
    }
}

fn body(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    (status, axum::Json(ErrorResponse::new(message, kind, code))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = match self {
            Self::Gateway {
                status,
                message,
                code,
            } => return body(status, &message, "invalid_request_error", code),
            Self::Router(error) => error,
        };
        let status = router_status(&error);
        let mut response = if at_fault(error.kind())
            && let Some(upstream) = error.body()
        {
            let answer = ErrorResponse {
                error: ErrorBody::clone(upstream),
                extra: Extra::default(),
            };
            (status, axum::Json(answer)).into_response()
        } else {
            let (kind, code) = type_and_code(status);
            body(status, &error.to_string(), kind, code)
        };
        // Where it failed last, and after how many attempts (none: refused before any).
        let headers = response.headers_mut();
        headers.insert(ATTEMPTS, HeaderValue::from(error.attempts()));
        if let Some(value) = error
            .endpoint()
            .and_then(|e| HeaderValue::from_str(e.as_str()).ok())
        {
            headers.insert(ENDPOINT, value);
        }
        if let Some(wait) = error
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
}

/// The data of an `error` event, sent when a stream fails after its first byte (as OpenAI
/// does).
pub(crate) fn error_event(message: &str) -> String {
    serde_json::to_string(&ErrorResponse::new(message, "server_error", None)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn router_errors_get_their_kinds_status_and_a_retry_after() {
        let throttled = Error::with_message(ErrorKind::Throttled, "busy")
            .with_retry_after(Duration::from_millis(1500));
        let response = ApiError::from(throttled).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1500");
        for (kind, status) in [
            (ErrorKind::UnknownModel, 404),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::DeadlineExceeded, 504),
            (ErrorKind::ServerError, 502),
            (ErrorKind::InvalidRequest, 400),
        ] {
            let error = ApiError::from(Error::with_message(kind, "x"));
            assert_eq!(error.status(), status, "{kind}");
            assert_eq!(error.into_response().status().as_u16(), status, "{kind}");
        }
    }
}
