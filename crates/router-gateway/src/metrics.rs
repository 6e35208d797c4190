//! `/metrics`: Prometheus text exposition, written by hand from atomics and the router's
//! stats (no exporter crate, nothing on the request path but a few relaxed increments).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use router_facade::{Availability, DeploymentStats, Router};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    sum_micros: AtomicU64,
    total: AtomicU64,
}

impl Histogram {
    fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
        }
        let total = self.total.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let labels = labels.trim_end_matches(',');
        let block = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{block} {sum}");
        let _ = writeln!(out, "{name}_count{block} {total}");
    }
}

/// The `model` label of a request for a model group that is not configured (or a body that
/// named none): one value, so that clients cannot grow the label set.
pub(crate) const UNKNOWN_MODEL: &str = "unknown";

/// The gateway's own counters.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Answers by (route, model group or `unknown`, status).
    requests: DashMap<(&'static str, String, u16), AtomicU64>,
    latency: DashMap<&'static str, Histogram>,
    ttft: Histogram,
    retries: AtomicU64,
    throttles: AtomicU64,
}

impl Metrics {
    /// One answer of `route`; `model` is the request's model group when the router serves it,
    /// else [`UNKNOWN_MODEL`] (the caller decides, with [`Router::serves`]).
    pub(crate) fn answered(&self, route: &'static str, model: &str, status: u16, took: Duration) {
        let key = (route, model.to_owned(), status);
        if let Some(count) = self.requests.get(&key) {
            count.fetch_add(1, Ordering::Relaxed);
        } else {
            self.requests
                .entry(key)
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
        self.latency.entry(route).or_default().observe(took);
        if status == 429 {
            self.throttles.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Attempts beyond the first.
    pub(crate) fn retried(&self, attempts: u32) {
        self.retries
            .fetch_add(u64::from(attempts.saturating_sub(1)), Ordering::Relaxed);
    }

    /// A stream's first chunk reached the client.
    pub(crate) fn first_token(&self, ttft: Duration) {
        self.ttft.observe(ttft);
    }

    /// The exposition.
    #[expect(clippy::too_many_lines, reason = "one metric family after another")]
    pub(crate) fn render(&self, router: &Router) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP openai_router_requests_total Answers by route, model group and status.\n",
        );
        out.push_str("# TYPE openai_router_requests_total counter\n");
        let mut rows: Vec<_> = self
            .requests
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
            .collect();
        rows.sort();
        for ((route, model, status), n) in rows {
            let _ = writeln!(
                out,
                "openai_router_requests_total{{route=\"{route}\",model=\"{}\",status=\"{status}\"}} {n}",
                escape(&model)
            );
        }
        out.push_str("# HELP openai_router_request_duration_seconds Time to the whole answer (to the headers, for streams).\n");
        out.push_str("# TYPE openai_router_request_duration_seconds histogram\n");
        for entry in &self.latency {
            entry.value().render(
                &mut out,
                "openai_router_request_duration_seconds",
                &format!("route=\"{}\",", entry.key()),
            );
        }
        out.push_str("# HELP openai_router_time_to_first_token_seconds Streams: time to the first content chunk.\n");
        out.push_str("# TYPE openai_router_time_to_first_token_seconds histogram\n");
        self.ttft
            .render(&mut out, "openai_router_time_to_first_token_seconds", "");
        let _ = writeln!(
            out,
            "# TYPE openai_router_retries_total counter\nopenai_router_retries_total {}",
            self.retries.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE openai_router_throttled_total counter\nopenai_router_throttled_total {}",
            self.throttles.load(Ordering::Relaxed)
        );

        let _ = writeln!(
            out,
            "# HELP openai_router_waiting Requests waiting for a turn.\n# TYPE openai_router_waiting gauge\nopenai_router_waiting {}",
            router.waiting()
        );
        let _ = writeln!(
            out,
            "# HELP openai_router_open_reservations Quota reservations not yet settled or released.\n# TYPE openai_router_open_reservations gauge\nopenai_router_open_reservations {}",
            router.open_reservations()
        );
        let _ = writeln!(
            out,
            "# HELP openai_router_state_shared Whether quotas, cooldowns and limits are shared with other replicas now (1: the shared store answers; 0: in-process, or its local share while it is away).\n# TYPE openai_router_state_shared gauge\nopenai_router_state_shared {}",
            u8::from(router.state_shared())
        );
        let _ = writeln!(
            out,
            "# HELP openai_router_state_fallbacks_total Calls the shared state store answered from this replica's local share (it failed or was slower than its timeout).\n# TYPE openai_router_state_fallbacks_total counter\nopenai_router_state_fallbacks_total {}",
            router.state_fallbacks()
        );
        let stats = router.stats();
        per_deployment(
            &mut out,
            &stats,
            "openai_router_in_flight",
            "gauge",
            Some("Requests in flight per deployment (streams until they end)."),
            &|s| s.state.in_flight.to_string(),
        );
        let now = std::time::Instant::now();
        let availability = |s: &DeploymentStats| match s.state.availability {
            Availability::Ready => (0, None),
            Availability::RateLimited(at) => (1, Some(at)),
            Availability::Ejected(at) => (2, Some(at)),
            Availability::Disabled(_) => (3, None),
            Availability::Probing => (4, None),
            _ => (5, None),
        };
        per_deployment(
            &mut out,
            &stats,
            "openai_router_deployment_state",
            "gauge",
            Some(
                "0 ready, 1 rate limited, 2 ejected, 3 disabled, 4 half-open with its one request in flight.",
            ),
            &|s| availability(s).0.to_string(),
        );
        per_deployment(
            &mut out,
            &stats,
            "openai_router_cooldown_seconds",
            "gauge",
            Some("Seconds until a cooling deployment is back."),
            &|s| {
                availability(s)
                    .1
                    .map_or(0.0, |at| at.saturating_duration_since(now).as_secs_f64())
                    .to_string()
            },
        );
        per_deployment(
            &mut out,
            &stats,
            "openai_router_upstream_successes_total",
            "counter",
            None,
            &|s| s.state.successes.to_string(),
        );
        per_deployment(
            &mut out,
            &stats,
            "openai_router_spilled_over_total",
            "counter",
            Some(
                "Requests Azure spilled over from the deployment (it was full) to their spillover deployment.",
            ),
            &|s| s.state.spilled_over.to_string(),
        );
        out.push_str("# HELP openai_router_service_tier_total Answers by the service tier they reported (service_tier).\n# TYPE openai_router_service_tier_total counter\n");
        for s in &stats {
            for (tier, n) in &s.state.service_tiers {
                let _ = writeln!(
                    out,
                    "openai_router_service_tier_total{{{},tier=\"{tier}\"}} {n}",
                    labels(s)
                );
            }
        }
        per_deployment(
            &mut out,
            &stats,
            "openai_router_service_tier_downgrades_total",
            "counter",
            Some("Requests that asked for the priority tier and were served at another."),
            &|s| s.state.tier_downgrades.to_string(),
        );
        out.push_str("# HELP openai_router_upstream_failures_total Failed attempts by kind.\n# TYPE openai_router_upstream_failures_total counter\n");
        for s in &stats {
            for (kind, n) in &s.state.failures {
                let _ = writeln!(
                    out,
                    "openai_router_upstream_failures_total{{{},kind=\"{}\"}} {n}",
                    labels(s),
                    kind.as_str()
                );
            }
        }
        per_deployment(
            &mut out,
            &stats,
            "openai_router_latency_estimate_seconds",
            "gauge",
            Some("PeakEWMA time to first token per deployment."),
            &|s| s.state.latency_stream.to_string(),
        );
        out.push_str("# HELP openai_router_learned_tpm Tokens per minute the upstream announced.\n# TYPE openai_router_learned_tpm gauge\n");
        for s in &stats {
            if let Some(tpm) = s.state.learned_tpm {
                let _ = writeln!(out, "openai_router_learned_tpm{{{}}} {tpm}", labels(s));
            }
        }
        per_deployment(
            &mut out,
            &stats,
            "openai_router_admitted_share",
            "gauge",
            Some(
                "Share of the configured limits the upstream was seen to admit (1 until it refused what they allowed).",
            ),
            &|s| format!("{:.3}", s.state.admits.share),
        );
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family with one sample per deployment: its `HELP` (when given) and `TYPE`
/// lines, then `name{labels} value` for each.
fn per_deployment(
    out: &mut String,
    stats: &[DeploymentStats],
    name: &str,
    kind: &str,
    help: Option<&str>,
    value: &dyn Fn(&DeploymentStats) -> String,
) {
    if let Some(help) = help {
        let _ = writeln!(out, "# HELP {name} {help}");
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for s in stats {
        let _ = writeln!(out, "{name}{{{}}} {}", labels(s), value(s));
    }
}

fn labels(s: &DeploymentStats) -> String {
    format!(
        "endpoint=\"{}\",model=\"{}\",deployment=\"{}\"",
        escape(s.endpoint.as_str()),
        escape(&s.model),
        escape(&s.deployment)
    )
}
