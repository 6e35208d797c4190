//! What a caller says about one request, and what it gets back besides the body.

use std::ops::Deref;
use std::time::Duration;

use router_core::{EndpointId, ResponseMeta, StateStats, TraceContext};

/// Per-request options.
#[non_exhaustive]
#[derive(Debug, Clone, Default)]
pub struct RequestOptions {
    /// This request's deadline across all its attempts, instead of the router's
    /// `request_timeout`.
    pub timeout: Option<Duration>,
    /// Its class when it has to wait for quota: a lower class is served first; within a
    /// class, first come first served. Default 0.
    pub priority: u8,
    /// Who is calling, for the router's per-caller limits (a gateway key's name, a tenant).
    pub caller: Option<String>,
    /// The longest this request may wait for its turn, instead of the router's
    /// `max_queue_wait` (never longer than its deadline).
    pub max_queue_wait: Option<Duration>,
    /// On Azure deployments, the deployment Azure may spill the request over to when the one
    /// it is sent to is out of capacity (sent as `x-ms-spillover-deployment`).
    pub spillover_deployment: Option<String>,
    /// The request's prompt-cache key when its body has neither `prompt_cache_key` nor
    /// `user` (the gateway: a configured header); see
    /// [`RouterBuilder::cache_affinity`](crate::RouterBuilder::cache_affinity).
    pub cache_key: Option<String>,
    /// The caller's W3C trace (its `traceparent`), continued into every upstream call with
    /// each attempt's own span id, and its `tracestate`, passed on as it came.
    pub trace: Option<(TraceContext, Option<String>)>,
}

impl RequestOptions {
    /// Options continuing the caller's trace: `traceparent` and `tracestate` as the caller
    /// sent them. A `traceparent` that is not valid W3C trace context is ignored.
    #[must_use]
    pub fn with_traceparent(mut self, traceparent: &str, tracestate: Option<&str>) -> Self {
        self.trace = TraceContext::parse(traceparent).map(|context| {
            let state = tracestate
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            (context, state)
        });
        self
    }

    /// Options with a timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Options with a prompt-cache key, for requests whose body names none.
    #[must_use]
    pub fn with_cache_key(mut self, key: impl Into<String>) -> Self {
        self.cache_key = Some(key.into());
        self
    }

    /// Options naming the caller, for per-caller limits.
    #[must_use]
    pub fn with_caller(mut self, caller: impl Into<String>) -> Self {
        self.caller = Some(caller.into());
        self
    }

    /// Options with the longest wait for a turn (0: refused at once when nothing has room).
    #[must_use]
    pub fn with_max_queue_wait(mut self, wait: Duration) -> Self {
        self.max_queue_wait = Some(wait);
        self
    }

    /// Options naming the Azure deployment a request may spill over to.
    #[must_use]
    pub fn with_spillover_deployment(mut self, deployment: impl Into<String>) -> Self {
        self.spillover_deployment = Some(deployment.into());
        self
    }

    /// Options with a waiting class (lower is served first).
    #[must_use]
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }
}

/// What a caller's own router-side limits ([`RouterBuilder::caller_limits`](crate::RouterBuilder::caller_limits))
/// have left after a request's admission: for clients that pace themselves (the gateway
/// answers it as `x-ratelimit-*` headers).
///
/// The limits are per minute, enforced over a sliding window ([`window`](Self::window), 10 s):
/// the limits here are what one window holds (the per-minute limit times the window's part of
/// a minute), and what is left is what the caller may send at once now. `None` where that
/// dimension is not limited. With a shared store leasing slices, what is left is what the
/// store last said plus what this replica holds unspent: near, not exact.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotaLeft {
    /// Requests the window holds.
    pub limit_requests: Option<u64>,
    /// Tokens the window holds.
    pub limit_tokens: Option<u64>,
    /// Requests left in the window after this one.
    pub requests_left: Option<u64>,
    /// Tokens left in the window after this one's estimate.
    pub tokens_left: Option<u64>,
    /// The window.
    pub window: Duration,
}

/// Tokens an answer used, as the upstream counted them (its `usage`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokensUsed {
    /// Prompt (input) tokens.
    pub input: u64,
    /// Completion (output) tokens.
    pub output: u64,
}

impl TokensUsed {
    /// `input` prompt and `output` completion tokens.
    pub fn new(input: u64, output: u64) -> Self {
        Self { input, output }
    }
}

/// How a request was served, for its answer: the attempts made and what the caller has left.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served {
    pub(crate) attempts: u32,
    pub(crate) caller: Option<QuotaLeft>,
    pub(crate) waited: Duration,
}

/// An answer and how the router got it. Dereferences to the body.
#[derive(Debug, Clone)]
pub struct Routed<T> {
    /// The upstream's answer.
    pub body: T,
    /// The endpoint that answered.
    pub endpoint: EndpointId,
    /// The deployment name it answered under.
    pub deployment: String,
    /// The model group that answered: the one asked for, or a fallback
    /// ([`RouterBuilder::fallbacks`](crate::RouterBuilder::fallbacks)).
    pub model: String,
    /// Attempts made, this one included, in every group tried (a fallback's and those before
    /// it).
    pub attempts: u32,
    /// Status, rate-limit headers and timings of the answering attempt.
    pub meta: ResponseMeta,
    /// What the caller's own limits have left, when it has any
    /// ([`RequestOptions::with_caller`]).
    pub caller_quota: Option<QuotaLeft>,
    /// The tokens the answer used, when it said.
    pub tokens: Option<TokensUsed>,
    /// How long the request waited for its turn in the group that served it (the router's
    /// limits, quota, cooldowns) before its first attempt there.
    pub waited: Duration,
}

impl<T> Routed<T> {
    /// The body alone.
    pub fn into_body(self) -> T {
        self.body
    }
}

impl<T> Deref for Routed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.body
    }
}

/// One deployment's state, for dashboards and tests.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentStats {
    /// The endpoint.
    pub endpoint: EndpointId,
    /// The model group.
    pub model: String,
    /// The endpoint's name for it.
    pub deployment: String,
    /// Its weight.
    pub weight: u32,
    /// Its priority tier.
    pub priority: u32,
    /// In flight, latency estimates, availability and counters.
    pub state: StateStats,
    /// Its quota and what is left of it, when it has one (configured, or announced by the
    /// upstream's headers).
    pub quota: Option<QuotaStats>,
}

/// Requests waiting in one lane of the router's waitlist, of one priority class
/// ([`Router::queue`](crate::Router::queue)).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The lane: a model group, or a router-side limit's scope (`caller:team-a`).
    pub lane: String,
    /// The priority class (lower is served first).
    pub priority: u8,
    /// How many wait.
    pub count: usize,
}

/// A deployment's quota and what is left of it, as this router sees it: what the state store
/// said at the last admission, refilled at the limits' rates since (with a shared store,
/// other replicas' use since then is not in it).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotaStats {
    /// Tokens per minute, configured or announced.
    pub tpm: Option<u64>,
    /// Requests per minute, configured or announced.
    pub rpm: Option<u64>,
    /// The window the limits hold over.
    pub window: Duration,
    /// The share of them the router keeps to (below 1 once the upstream refused what they
    /// allowed).
    pub share: f64,
    /// Tokens left in the window.
    pub tokens_left: Option<f64>,
    /// Requests left in the window.
    pub requests_left: Option<f64>,
}
