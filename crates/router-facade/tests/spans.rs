//! The router's spans, collected in-process by a `tracing` layer, and the caller's W3C trace
//! continued into the upstream calls. A test binary of its own: tracing caches which callsites
//! are wanted across threads, so a subscriber set for one test sees everything only when no
//! other test shares the process.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, RequestOptions, Router, StrategyKind};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use upstream_sim::{EndpointConfig, Fault, LatencyModel, Sim, SimDialect, Times};

const MODEL: &str = "gpt-4o-mini";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A span's fields as recorded so far.
#[derive(Debug, Clone, Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// A span that closed: its name, its parent's name and its fields.
#[derive(Debug, Clone)]
struct Closed {
    name: &'static str,
    parent: Option<&'static str>,
    fields: BTreeMap<String, String>,
}

/// Collects every span as it closes.
#[derive(Debug, Clone, Default)]
struct Spans(Arc<Mutex<Vec<Closed>>>);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        ctx.span(id).unwrap().extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(fields);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let fields = span.extensions_mut().remove::<Fields>().unwrap_or_default();
        self.0.lock().unwrap().push(Closed {
            name: span.name(),
            parent: span.parent().map(|p| p.name()),
            fields: fields.0,
        });
    }
}

/// A request that fails over is one `request` span (who served, the attempts, the tokens,
/// the caller's trace id) over one `attempt` span per attempt (where, the outcome, the
/// upstream's status, a span id of its own); each upstream call carries the caller's trace
/// with that attempt's span id as `traceparent`, and the caller's `tracestate` as it came. A
/// request without a trace sends none.
#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one failover followed through its spans and upstream headers"
)]
async fn spans_say_who_served_and_the_callers_trace_reaches_every_attempt() {
    let endpoints = (0..2).map(|i| {
        EndpointConfig::new(format!("ep{i}"), SimDialect::OpenAi)
            .with_models([MODEL])
            .with_latency(LatencyModel::instant())
    });
    let sim = Sim::start(11, endpoints).await.unwrap();
    let mut builder = Router::builder()
        .strategy(StrategyKind::RoundRobin)
        .max_attempts(2);
    for endpoint in sim.endpoints() {
        builder = builder
            .endpoint(Endpoint::openai(endpoint.name(), endpoint.openai_base_url()).model(MODEL));
    }
    let router = builder.build().unwrap();
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::DEBUG)
        .with(spans.clone());
    let _default = tracing::subscriber::set_default(subscriber);

    let mut request = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("traced")]);
    request.max_tokens = Some(8);
    let traced = RequestOptions::default().with_traceparent(
        &format!("00-{TRACE}-00f067aa0ba902b7-01"),
        Some("vendor=opaque"),
    );
    // `ep0` fails once (500): the request that meets it first goes on to `ep1`.
    sim.endpoints()[0].inject(Fault::status(500), Times::Next(1));
    let mut failed_over = None;
    for _ in 0..4 {
        let answer = router.chat_with(&request, &traced).await.unwrap();
        if answer.attempts == 2 {
            failed_over = Some(answer);
            break;
        }
    }
    let answer = failed_over.expect("a request met the failing endpoint first");
    assert_eq!(answer.endpoint.as_str(), "ep1");

    let closed = spans.0.lock().unwrap().clone();
    let requests: Vec<&Closed> = closed.iter().filter(|s| s.name == "request").collect();
    let last = requests.last().unwrap();
    let field = |span: &Closed, name: &str| span.fields.get(name).cloned().unwrap_or_default();
    assert_eq!(field(last, "outcome"), "served", "{last:?}");
    assert_eq!(field(last, "attempts"), "2", "{last:?}");
    assert_eq!(field(last, "endpoint"), "ep1", "{last:?}");
    assert_eq!(field(last, "model"), MODEL, "{last:?}");
    assert_eq!(field(last, "trace_id"), TRACE, "{last:?}");
    assert!(
        field(last, "input_tokens").parse::<u64>().unwrap() > 0,
        "{last:?}"
    );
    assert!(
        field(last, "output_tokens").parse::<u64>().is_ok(),
        "{last:?}"
    );
    assert!(field(last, "elapsed_ms").parse::<u64>().is_ok(), "{last:?}");

    // The last two attempts were this request's: the failure, then the answer.
    let attempts: Vec<&Closed> = closed.iter().filter(|s| s.name == "attempt").collect();
    assert!(
        attempts.iter().all(|a| a.parent == Some("request")),
        "{attempts:?}"
    );
    let [failed, served] = attempts[attempts.len() - 2..] else {
        panic!("{attempts:?}");
    };
    assert_eq!(
        (
            field(failed, "endpoint").as_str(),
            field(failed, "outcome").as_str(),
            field(failed, "status").as_str()
        ),
        ("ep0", "server_error", "500"),
        "{failed:?}"
    );
    assert_eq!(
        (
            field(served, "endpoint").as_str(),
            field(served, "outcome").as_str()
        ),
        ("ep1", "answered"),
        "{served:?}"
    );
    let (first_span, second_span) = (field(failed, "span_id"), field(served, "span_id"));
    assert_eq!(first_span.len(), 16);
    assert_ne!(
        first_span, second_span,
        "each attempt has a span of its own"
    );

    // Each upstream call carried the caller's trace, under that attempt's span id.
    for (endpoint, span_id) in [(0, &first_span), (1, &second_span)] {
        let seen = sim.endpoints()[endpoint].last_request().unwrap();
        assert_eq!(
            seen.header("traceparent"),
            Some(format!("00-{TRACE}-{span_id}-01").as_str()),
            "ep{endpoint}"
        );
        assert_eq!(seen.header("tracestate"), Some("vendor=opaque"));
    }

    // Without a trace from the caller, none is sent.
    let plain = router.chat(&request).await.unwrap();
    let seen = sim.endpoints()[usize::from(plain.endpoint.as_str() == "ep1")]
        .last_request()
        .unwrap();
    assert_eq!(seen.header("traceparent"), None);
    assert_eq!(seen.header("tracestate"), None);
    // Nor is an invalid one continued.
    let invalid = RequestOptions::default().with_traceparent("00-not-a-trace-01", None);
    assert!(invalid.trace.is_none());
}
