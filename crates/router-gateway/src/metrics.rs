//! `/metrics`: the `OpenMetrics` text exposition, through `prometheus-client` (no exposition
//! text written by hand).
//!
//! Two kinds of families. What the handlers record as answers go out (relaxed atomics in
//! `prometheus-client`'s counters and histograms): answers by route, model group and status,
//! their durations, time to first token, retries, throttles, and the OpenTelemetry `GenAI`
//! metrics under their Prometheus names (`gen_ai_client_operation_duration_seconds`,
//! `gen_ai_client_token_usage`, `gen_ai_server_time_to_first_token_seconds`, with the
//! semantic conventions' bucket boundaries). And what the router knows at scrape time, read by
//! a collector from `Router::stats()` and its other views: per deployment, its state,
//! cooldown, in flight, successes and failures by kind, latency estimate, quota left, learned
//! limits; the queue; whether state is shared and how often the shared store fell back.
//!
//! Labels are bounded: routes are fixed, `model` is a configured group or `unknown`
//! ([`UNKNOWN_MODEL`]), deployments and queue lanes come from the configuration.

use std::borrow::Cow;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use router_facade::{Availability, DeploymentStats, Router, TokensUsed};

/// The `model` label of a request for a model group that is not configured (or a body that
/// named none): one value, so that clients cannot grow the label set.
pub(crate) const UNKNOWN_MODEL: &str = "unknown";

/// A sample's labels, in the order they are written (the families read at scrape time).
type Labels = Vec<(&'static str, String)>;

/// A label value recorded on the request path: static where it can be (no allocation).
pub(crate) type Label = Cow<'static, str>;

/// The label set of a family recorded on the request path: `N` labels, no allocation for the
/// set itself.
type Key<const N: usize> = [(&'static str, Label); N];

/// A status code as a label value (the common ones without an allocation).
fn code(status: u16) -> Label {
    const CODES: [(u16, &str); 16] = [
        (200, "200"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (413, "413"),
        (422, "422"),
        (429, "429"),
        (431, "431"),
        (499, "499"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    CODES.iter().find(|(c, _)| *c == status).map_or_else(
        || Cow::Owned(status.to_string()),
        |(_, text)| Cow::Borrowed(*text),
    )
}

/// Makes a histogram with fixed bucket boundaries (a `Family` calls it per label set).
type Buckets = fn() -> Histogram;

/// Upper bounds of the gateway's own latency buckets, in seconds.
const LATENCY: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `GenAI` semantic conventions' boundaries: operation duration (s), token usage, and time
/// to first token (s).
const GEN_AI_DURATION: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
const GEN_AI_TOKENS: [f64; 14] = [
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];
const GEN_AI_TTFT: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

fn latency_buckets() -> Histogram {
    Histogram::new(LATENCY)
}

fn duration_buckets() -> Histogram {
    Histogram::new(GEN_AI_DURATION)
}

fn token_buckets() -> Histogram {
    Histogram::new(GEN_AI_TOKENS)
}

fn ttft_buckets() -> Histogram {
    Histogram::new(GEN_AI_TTFT)
}

/// The `GenAI` `gen_ai.operation.name` of a route.
fn operation(route: &str) -> &'static str {
    match route {
        "chat" => "chat",
        "embeddings" => "embeddings",
        "completions" => "text_completion",
        "responses" => "responses",
        _ => "other",
    }
}

/// The gateway's own counters and histograms.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Answers by route, model group (or `unknown`) and status.
    requests: Family<Key<3>, Counter>,
    /// Every answer by matched route template, method and status.
    http: Family<Key<3>, Counter>,
    http_latency: Family<Key<1>, Histogram, Buckets>,
    latency: Family<Key<1>, Histogram, Buckets>,
    ttft: Histogram,
    retries: Counter,
    throttles: Counter,
    queue_wait: Histogram,
    operation_duration: Family<Vec<(&'static str, Label)>, Histogram, Buckets>,
    token_usage: Family<Key<3>, Histogram, Buckets>,
    server_ttft: Family<Key<2>, Histogram, Buckets>,
}

impl Default for Metrics {
    #[expect(clippy::too_many_lines, reason = "one registration after another")]
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Key<3>, Counter>::default();
        registry.register(
            "openai_router_requests",
            "Answers by route, model group and status",
            requests.clone(),
        );
        let http = Family::<Key<3>, Counter>::default();
        registry.register(
            "openai_router_http_requests",
            "Every answer of every route, by route template (unmatched: none matched), method \
             and status",
            http.clone(),
        );
        let http_latency =
            Family::<Key<1>, Histogram, Buckets>::new_with_constructor(latency_buckets as Buckets);
        registry.register_with_unit(
            "openai_router_http_request_duration",
            "Time to every answer's headers, by route template",
            Unit::Seconds,
            http_latency.clone(),
        );
        let latency =
            Family::<Key<1>, Histogram, Buckets>::new_with_constructor(latency_buckets as Buckets);
        registry.register_with_unit(
            "openai_router_request_duration",
            "Time to the whole answer (to the headers, for streams), by route",
            Unit::Seconds,
            latency.clone(),
        );
        let ttft = Histogram::new(LATENCY);
        registry.register_with_unit(
            "openai_router_time_to_first_token",
            "Streams: time from the request to the first content chunk sent",
            Unit::Seconds,
            ttft.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "openai_router_retries",
            "Attempts beyond each request's first",
            retries.clone(),
        );
        let queue_wait = Histogram::new(LATENCY);
        registry.register_with_unit(
            "openai_router_queue_wait",
            "Time served requests waited for their turn (the router's limits, quotas, \
             cooldowns) before their first attempt",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let throttles = Counter::default();
        registry.register(
            "openai_router_throttled",
            "Answers of 429: requests the router throttled (or an upstream's 429 it could not \
             route around)",
            throttles.clone(),
        );
        let operation_duration =
            Family::<Vec<(&'static str, Label)>, Histogram, Buckets>::new_with_constructor(
                duration_buckets as Buckets,
            );
        registry.register_with_unit(
            "gen_ai_client_operation_duration",
            "GenAI operation duration (gen_ai.client.operation.duration) as callers see it, by \
             gen_ai.operation.name, gen_ai.request.model and error.type (the status) on \
             failures",
            Unit::Seconds,
            operation_duration.clone(),
        );
        let token_usage =
            Family::<Key<3>, Histogram, Buckets>::new_with_constructor(token_buckets as Buckets);
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens used per answer (gen_ai.client.token.usage), by gen_ai.operation.name, \
             gen_ai.request.model and gen_ai.token.type (input or output), as the upstream \
             counted them",
            token_usage.clone(),
        );
        let server_ttft =
            Family::<Key<2>, Histogram, Buckets>::new_with_constructor(ttft_buckets as Buckets);
        registry.register_with_unit(
            "gen_ai_server_time_to_first_token",
            "Streams: time to the first content chunk (gen_ai.server.time_to_first_token), by \
             gen_ai.operation.name and gen_ai.request.model",
            Unit::Seconds,
            server_ttft.clone(),
        );
        Self {
            registry,
            requests,
            http,
            http_latency,
            latency,
            ttft,
            retries,
            throttles,
            queue_wait,
            operation_duration,
            token_usage,
            server_ttft,
        }
    }
}

impl Metrics {
    /// One answer of `route`; `model` is the request's model group when the router serves it,
    /// else [`UNKNOWN_MODEL`] (the caller decides, with [`Router::serves`]).
    pub(crate) fn answered(&self, route: &'static str, model: &str, status: u16, took: Duration) {
        let model: Label = Cow::Owned(model.to_owned());
        self.requests
            .get_or_create(&[
                ("route", Cow::Borrowed(route)),
                ("model", model.clone()),
                ("status", code(status)),
            ])
            .inc();
        self.latency
            .get_or_create(&[("route", Cow::Borrowed(route))])
            .observe(took.as_secs_f64());
        let mut labels = vec![
            ("gen_ai_operation_name", Cow::Borrowed(operation(route))),
            ("gen_ai_request_model", model),
        ];
        if status >= 400 {
            labels.push(("error_type", code(status)));
        }
        self.operation_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if status == 429 {
            self.throttles.inc();
        }
    }

    /// An answer of any route: its template (`/v1/models`, or `unmatched`), method and status.
    pub(crate) fn http(&self, route: Label, method: &http::Method, status: u16, took: Duration) {
        // Methods a client invents do not grow the label set.
        let method = match *method {
            http::Method::GET => "GET",
            http::Method::POST => "POST",
            http::Method::DELETE => "DELETE",
            http::Method::PUT => "PUT",
            http::Method::PATCH => "PATCH",
            http::Method::HEAD => "HEAD",
            http::Method::OPTIONS => "OPTIONS",
            _ => "other",
        };
        self.http
            .get_or_create(&[
                ("route", route.clone()),
                ("method", Cow::Borrowed(method)),
                ("status", code(status)),
            ])
            .inc();
        self.http_latency
            .get_or_create(&[("route", route)])
            .observe(took.as_secs_f64());
    }

    /// The tokens an answer of `route` for `model` used (a configured group's name).
    pub(crate) fn tokens(&self, route: &'static str, model: &str, used: TokensUsed) {
        // Embeddings have input tokens only.
        let output = (route != "embeddings").then_some(("output", used.output));
        let model: Label = Cow::Owned(model.to_owned());
        for (kind, count) in std::iter::once(("input", used.input)).chain(output) {
            self.token_usage
                .get_or_create(&[
                    ("gen_ai_operation_name", Cow::Borrowed(operation(route))),
                    ("gen_ai_request_model", model.clone()),
                    ("gen_ai_token_type", Cow::Borrowed(kind)),
                ])
                .observe(count as f64);
        }
    }

    /// Answers the gateway throttled (429) since it started.
    pub(crate) fn throttled(&self) -> u64 {
        self.throttles.get()
    }

    /// A served request waited `waited` for its turn.
    pub(crate) fn waited(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// Attempts beyond the first.
    pub(crate) fn retried(&self, attempts: u32) {
        self.retries.inc_by(u64::from(attempts.saturating_sub(1)));
    }

    /// A stream of `route` for `model` sent its first content chunk `ttft` after the request
    /// arrived.
    pub(crate) fn first_token(&self, route: &'static str, model: &str, ttft: Duration) {
        self.ttft.observe(ttft.as_secs_f64());
        self.server_ttft
            .get_or_create(&[
                ("gen_ai_operation_name", Cow::Borrowed(operation(route))),
                ("gen_ai_request_model", Cow::Owned(model.to_owned())),
            ])
            .observe(ttft.as_secs_f64());
    }

    /// The exposition: the gateway's families, then the router's as it is now, then `# EOF`.
    pub(crate) fn render(&self, router: &Router) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut live = Registry::default();
        live.register_collector(Box::new(RouterNow(router.clone())));
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &live);
        let _ = encode_eof(&mut out);
        out
    }
}

/// The router's state at scrape time.
#[derive(Debug)]
struct RouterNow(Router);

/// One gauge or counter family: a sample per label set.
fn family<V: Copy>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, V)>,
    encode: impl Fn(V, prometheus_client::encoding::MetricEncoder<'_>) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, value) in samples {
        if labels.is_empty() {
            // A family of one sample without labels: `name value`, not `name{} value`.
            return encode(value, metric);
        }
        encode(value, metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<V: EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> std::fmt::Result {
    family(
        encoder,
        name,
        help,
        unit,
        MetricType::Gauge,
        samples,
        |v, e| ConstGauge::new(v).encode(e),
    )
}

fn counters(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    family(
        encoder,
        name,
        help,
        None,
        MetricType::Counter,
        samples,
        |v, e| ConstCounter::new(v).encode(e),
    )
}

/// A deployment's labels.
fn labels(s: &DeploymentStats) -> Labels {
    vec![
        ("endpoint", s.endpoint.as_str().to_owned()),
        ("model", s.model.clone()),
        ("deployment", s.deployment.clone()),
    ]
}

fn with(mut labels: Labels, name: &'static str, value: impl Into<String>) -> Labels {
    labels.push((name, value.into()));
    labels
}

impl Collector for RouterNow {
    #[expect(clippy::too_many_lines, reason = "one metric family after another")]
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let router = &self.0;
        let e = &mut encoder;
        gauges(
            e,
            "openai_router_waiting",
            "Requests waiting for a turn",
            None,
            [(Labels::new(), router.waiting())],
        )?;
        gauges(
            e,
            "openai_router_queue",
            "Requests waiting for a turn, by lane (a model group, or a limit's scope) and \
             priority class",
            None,
            router.queue().into_iter().map(|w| {
                (
                    vec![("lane", w.lane), ("priority", w.priority.to_string())],
                    w.count,
                )
            }),
        )?;
        gauges(
            e,
            "openai_router_open_reservations",
            "Quota reservations not yet settled or released",
            None,
            [(Labels::new(), router.open_reservations())],
        )?;
        gauges(
            e,
            "openai_router_state_shared",
            "Whether quotas, cooldowns and limits are shared with other replicas now (1: the \
             shared store answers; 0: in-process, or its local share while it is away)",
            None,
            [(Labels::new(), u32::from(router.state_shared()))],
        )?;
        counters(
            e,
            "openai_router_state_fallbacks",
            "Calls the shared state store answered from this replica's local share (it failed \
             or was slower than its timeout)",
            [(Labels::new(), router.state_fallbacks())],
        )?;
        let stats = router.stats();
        let now = std::time::Instant::now();
        gauges(
            e,
            "openai_router_in_flight",
            "Requests in flight per deployment (streams until they end)",
            None,
            stats.iter().map(|s| (labels(s), s.state.in_flight)),
        )?;
        let availability = |s: &DeploymentStats| -> (u32, Option<std::time::Instant>) {
            match s.state.availability {
                Availability::Ready => (0, None),
                Availability::RateLimited(at) => (1, Some(at)),
                Availability::Ejected(at) => (2, Some(at)),
                Availability::Disabled(_) => (3, None),
                Availability::Probing => (4, None),
                _ => (5, None),
            }
        };
        gauges(
            e,
            "openai_router_deployment_state",
            "0 ready, 1 rate limited (cooling down), 2 ejected, 3 disabled, 4 half-open with \
             its one request in flight",
            None,
            stats.iter().map(|s| (labels(s), availability(s).0)),
        )?;
        gauges(
            e,
            "openai_router_cooldown",
            "Seconds until a cooling or ejected deployment is back",
            Some(&Unit::Seconds),
            stats.iter().map(|s| {
                let left = availability(s)
                    .1
                    .map_or(0.0, |at| at.saturating_duration_since(now).as_secs_f64());
                (labels(s), left)
            }),
        )?;
        gauges(
            e,
            "openai_router_deployment_out",
            "1 while the deployment is out until a health probe finds it serving (disabled, or \
             cooling or ejected for longer than probe_after), labelled with why; 0 otherwise",
            None,
            stats.iter().map(|s| match s.state.out {
                Some(out) => (with(labels(s), "why", out.why.as_str()), 1),
                None => (with(labels(s), "why", ""), 0),
            }),
        )?;
        gauges(
            e,
            "openai_router_next_probe",
            "Seconds until an out deployment's next health probe (0 when it is not out)",
            Some(&Unit::Seconds),
            stats.iter().map(|s| {
                let left = s.state.out.map_or(0.0, |out| {
                    out.next_probe.saturating_duration_since(now).as_secs_f64()
                });
                (labels(s), left)
            }),
        )?;
        gauges(
            e,
            "openai_router_deployment_state_age",
            "Seconds since the deployment's health last changed (it went out or came back; \
             since the router started when neither happened)",
            Some(&Unit::Seconds),
            stats.iter().map(|s| {
                (
                    labels(s),
                    now.saturating_duration_since(s.state.since).as_secs_f64(),
                )
            }),
        )?;
        counters(
            e,
            "openai_router_health_probes",
            "Health probes this process sent to the deployment",
            stats.iter().map(|s| (labels(s), s.state.probes)),
        )?;
        gauges(
            e,
            "openai_router_last_probe_served",
            "Whether the deployment's last health probe was served (1) or failed (0), \
             labelled with what it failed with; deployments never probed are left out",
            None,
            stats.iter().filter_map(|s| {
                s.state.last_probe.map(|probe| match probe.failed {
                    None => (with(labels(s), "failed", ""), 1),
                    Some(kind) => (with(labels(s), "failed", kind.as_str()), 0),
                })
            }),
        )?;
        counters(
            e,
            "openai_router_upstream_successes",
            "Answers each deployment served",
            stats.iter().map(|s| (labels(s), s.state.successes)),
        )?;
        counters(
            e,
            "openai_router_upstream_failures",
            "Failed attempts by kind",
            stats.iter().flat_map(|s| {
                s.state
                    .failures
                    .iter()
                    .map(|(kind, n)| (with(labels(s), "kind", kind.as_str()), *n))
            }),
        )?;
        counters(
            e,
            "openai_router_spilled_over",
            "Requests Azure spilled over from the deployment (it was full) to their spillover \
             deployment",
            stats.iter().map(|s| (labels(s), s.state.spilled_over)),
        )?;
        counters(
            e,
            "openai_router_service_tier",
            "Answers by the service tier they reported (service_tier)",
            stats.iter().flat_map(|s| {
                s.state
                    .service_tiers
                    .iter()
                    .map(|(tier, n)| (with(labels(s), "tier", *tier), *n))
            }),
        )?;
        counters(
            e,
            "openai_router_service_tier_downgrades",
            "Requests that asked for the priority tier and were served at another",
            stats.iter().map(|s| (labels(s), s.state.tier_downgrades)),
        )?;
        gauges(
            e,
            "openai_router_latency_estimate",
            "PeakEWMA time to first token per deployment",
            Some(&Unit::Seconds),
            stats.iter().map(|s| (labels(s), s.state.latency_stream)),
        )?;
        gauges(
            e,
            "openai_router_learned_tpm",
            "Tokens per minute the upstream announced",
            None,
            stats
                .iter()
                .filter_map(|s| s.state.learned_tpm.map(|tpm| (labels(s), tpm))),
        )?;
        gauges(
            e,
            "openai_router_admitted_share",
            "Share of the configured limits the upstream was seen to admit (1 until it refused \
             what they allowed)",
            None,
            stats.iter().map(|s| (labels(s), s.state.admits.share)),
        )?;
        gauges(
            e,
            "openai_router_quota_left",
            "What is left of a deployment's quota window as the router sees it, by resource \
             (tokens, requests)",
            None,
            stats.iter().flat_map(|s| {
                let quota = s.quota;
                [
                    quota.and_then(|q| q.tokens_left).map(|v| ("tokens", v)),
                    quota.and_then(|q| q.requests_left).map(|v| ("requests", v)),
                ]
                .into_iter()
                .flatten()
                .map(|(resource, left)| (with(labels(s), "resource", resource), left.max(0.0)))
            }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_tokens_and_first_tokens_are_exposed_in_both_namings() {
        let metrics = Metrics::default();
        metrics.answered("chat", "gpt-4o-mini", 200, Duration::from_millis(30));
        metrics.answered("chat", "gpt-4o-mini", 429, Duration::from_millis(2));
        metrics.tokens("chat", "gpt-4o-mini", TokensUsed::new(12, 300));
        metrics.first_token("chat", "gpt-4o-mini", Duration::from_millis(40));
        metrics.retried(3);
        let mut out = String::new();
        encode_registry(&mut out, &metrics.registry).unwrap();
        for line in [
            r#"openai_router_requests_total{route="chat",model="gpt-4o-mini",status="200"} 1"#,
            r#"openai_router_requests_total{route="chat",model="gpt-4o-mini",status="429"} 1"#,
            "openai_router_throttled_total 1",
            "openai_router_retries_total 2",
            r#"gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini"} 1"#,
            r#"gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini",error_type="429"} 1"#,
            r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini",gen_ai_token_type="output"} 300.0"#,
            r#"gen_ai_client_token_usage_bucket{le="16.0",gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini",gen_ai_token_type="input"} 1"#,
            r#"gen_ai_server_time_to_first_token_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o-mini"} 1"#,
            "openai_router_time_to_first_token_seconds_count 1",
        ] {
            assert!(out.contains(line), "{line} not in:\n{out}");
        }
    }
}
