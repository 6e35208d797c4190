//! Traces exported over OTLP: the router's `request` and `attempt` spans (and the gateway's
//! `http` span around each answer) sent to an OpenTelemetry collector, when the standard
//! environment names one.
//!
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL, `…/v1/traces`) or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (the collector's base URL; `/v1/traces` is appended) turns
//! exporting on: OTLP over HTTP with protobuf bodies, batched. `OTEL_SERVICE_NAME` names the
//! service (`openai-router` by default). Nothing is exported without them, and no exporter is
//! built. The HTTP client is hyper's (the server's own HTTP stack; only the backends know
//! `reqwest`), plain HTTP: a collector on loopback or a sidecar, as collectors are usually
//! run; an `https://` endpoint is refused at start with that said.
//!
//! A caller's W3C `traceparent` makes the gateway's `http` span a child of the caller's span,
//! so the exported spans continue the caller's trace.

use std::fmt;

use axum::http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The collector's traces URL, from the standard environment, when exporting is on.
pub(crate) fn endpoint() -> Option<String> {
    let set = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| {
        set("OTEL_EXPORTER_OTLP_ENDPOINT")
            .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
    })
}

/// Sends OTLP requests with hyper's client, on the gateway's runtime (the exporter's batch
/// thread has no runtime of its own).
struct Client {
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        use http_body_util::BodyExt as _;
        let request = request.map(http_body_util::Full::new);
        let http = self.http.clone();
        let answer = self.runtime.spawn(async move {
            let call = async {
                let response = http.request(request).await?;
                let (parts, body) = response.into_parts();
                let body = body.collect().await?.to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            tokio::time::timeout(std::time::Duration::from_secs(10), call)
                .await
                .map_err(|_| HttpError::from("no answer from the collector within 10 s"))?
        });
        answer.await?
    }
}

/// The tracer provider exporting to `endpoint`, batched, its HTTP calls made on `runtime`.
pub(crate) fn provider(
    endpoint: &str,
    runtime: tokio::runtime::Handle,
) -> Result<SdkTracerProvider, String> {
    if !endpoint.starts_with("http://") {
        return Err(format!(
            "OTEL_EXPORTER_OTLP_ENDPOINT: {endpoint}: traces are exported over plain HTTP \
             (a collector on loopback or a sidecar); an http:// URL is needed"
        ));
    }
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Client { http, runtime })
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| {
            format!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot export traces to {endpoint}: {e}")
        })?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "openai-router".to_owned());
    Ok(SdkTracerProvider::builder()
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(service)
                .build(),
        )
        .with_batch_exporter(exporter)
        .build())
}

/// The tracing layer sending spans to `provider`'s tracer.
pub(crate) fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("openai-router"))
}

/// Makes `span` a child of the caller's span named by `headers`' `traceparent` (when exporting
/// is on and the header is valid; otherwise nothing changes).
pub(crate) fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    struct Headers<'a>(&'a HeaderMap);
    impl opentelemetry::propagation::Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(axum::http::HeaderName::as_str).collect()
        }
    }
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        // Without the exporting layer there is nothing to attach to: fine.
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn only_plain_http_collectors_are_taken() {
        let handle = tokio::runtime::Handle::current();
        let error = super::provider("https://collector.example:4318/v1/traces", handle.clone())
            .unwrap_err();
        assert!(error.contains("an http:// URL is needed"), "{error}");
        assert!(super::provider("http://127.0.0.1:4318/v1/traces", handle).is_ok());
    }
}
