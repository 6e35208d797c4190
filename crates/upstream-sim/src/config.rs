//! What a simulated endpoint is: its dialect, credentials, latency, limits and content.
//!
//! Every type here deserializes from the TOML the `upstream-sim` binary reads (durations in
//! milliseconds, fields named as below); see `examples/sim.toml`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole simulator: a seed and its endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Seed for every random draw (latency jitter, generated text, embeddings).
    #[serde(default)]
    pub seed: u64,
    /// The endpoints, each on its own port.
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<EndpointConfig>,
}

/// Which API dialect an endpoint speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimDialect {
    /// OpenAI: `POST /v1/chat/completions` with `Authorization: Bearer <key>`; the model in
    /// the body.
    #[default]
    OpenAi,
    /// Azure OpenAI: `POST /openai/deployments/{deployment}/chat/completions?api-version=…`,
    /// or `POST /openai/v1/chat/completions` with the deployment as `model`; `api-key: <key>` or
    /// `Authorization: Bearer <entra token>`.
    Azure,
}

/// One simulated endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// A name for counters and logs.
    pub name: String,
    /// The dialect.
    #[serde(default)]
    pub dialect: SimDialect,
    /// The port to listen on, on 127.0.0.1; 0 picks a free one.
    #[serde(default)]
    pub port: u16,
    /// The key a request must carry; `None` accepts any request.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Azure only: a bearer token accepted in place of the key (Entra ID).
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// Azure only: Entra ID tokens from this issuer are accepted in place of the key, until
    /// they expire (a [`TokenIssuer`](crate::TokenIssuer)'s `verifier()`).
    #[serde(default)]
    pub entra: Option<String>,
    /// Model (OpenAI) or deployment (Azure) names served; empty serves any name.
    #[serde(default)]
    pub models: Vec<String>,
    /// Model or deployment names that are reasoning models: their chat completions refuse
    /// `max_tokens` (400 `unsupported_parameter`, before any quota check) and take
    /// `max_completion_tokens`, as OpenAI's o-series and GPT-5 do.
    #[serde(default)]
    pub reasoning_models: Vec<String>,
    /// How fast it answers.
    #[serde(default)]
    pub latency: LatencyModel,
    /// Its quota.
    #[serde(default)]
    pub limits: Limits,
    /// What it generates.
    #[serde(default)]
    pub output: OutputModel,
}

impl EndpointConfig {
    /// An endpoint named `name` in `dialect` with default latency, no limits and no key.
    pub fn new(name: impl Into<String>, dialect: SimDialect) -> Self {
        Self {
            name: name.into(),
            dialect,
            port: 0,
            api_key: None,
            bearer_token: None,
            entra: None,
            models: Vec::new(),
            reasoning_models: Vec::new(),
            latency: LatencyModel::default(),
            limits: Limits::default(),
            output: OutputModel::default(),
        }
    }

    /// Requires `key`.
    #[must_use]
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Azure: also accepts `Authorization: Bearer <token>`.
    #[must_use]
    pub fn with_bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(token.into());
        self
    }

    /// Azure: also accepts the unexpired tokens `issuer` issued (Entra ID).
    #[must_use]
    pub fn with_entra(mut self, issuer: &crate::TokenIssuer) -> Self {
        self.entra = Some(issuer.verifier());
        self
    }

    /// Serves requests that ask for the `priority` tier at `default`.
    #[must_use]
    pub fn with_priority_downgraded(mut self) -> Self {
        self.output.downgrade_priority = true;
        self
    }

    /// Serves only these model or deployment names.
    #[must_use]
    pub fn with_models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.models = models.into_iter().map(Into::into).collect();
        self
    }

    /// Serves these names as reasoning models: their chat completions refuse `max_tokens`.
    #[must_use]
    pub fn with_reasoning_models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.reasoning_models = models.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the latency model.
    #[must_use]
    pub fn with_latency(mut self, latency: LatencyModel) -> Self {
        self.latency = latency;
        self
    }

    /// Sets the quota.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets what it generates.
    #[must_use]
    pub fn with_output(mut self, output: OutputModel) -> Self {
        self.output = output;
        self
    }
}

/// Time to first token plus time per token, each scaled by a random factor in
/// `[1 - jitter, 1 + jitter]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyModel {
    /// Time to first token, in milliseconds.
    #[serde(default = "defaults::ttft_ms")]
    pub ttft_ms: u64,
    /// Time per generated token, in milliseconds (may be fractional).
    #[serde(default = "defaults::per_token_ms")]
    pub per_token_ms: f64,
    /// Relative jitter, 0 to 1.
    #[serde(default)]
    pub jitter: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self {
            ttft_ms: defaults::ttft_ms(),
            per_token_ms: defaults::per_token_ms(),
            jitter: 0.0,
        }
    }
}

impl LatencyModel {
    /// A model with no jitter.
    pub fn new(ttft: Duration, per_token: Duration) -> Self {
        Self {
            ttft_ms: ttft.as_millis() as u64,
            per_token_ms: per_token.as_secs_f64() * 1000.0,
            jitter: 0.0,
        }
    }

    /// No latency at all.
    pub fn instant() -> Self {
        Self::new(Duration::ZERO, Duration::ZERO)
    }

    /// Sets the jitter.
    #[must_use]
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// Multiplies both times by `factor` (5.0 makes the endpoint five times slower).
    #[must_use]
    pub fn scaled(mut self, factor: f64) -> Self {
        self.ttft_ms = (self.ttft_ms as f64 * factor).round() as u64;
        self.per_token_ms *= factor;
        self
    }
}

/// A quota enforced the way Azure does: the estimated cost of a request (prompt tokens from
/// its characters, plus its output cap times `n`) is charged when it arrives, over short
/// windows of the kind [`WindowKind`] says; a request that does not fit gets a 429 with
/// `retry-after` (whole seconds, rounded up) and `retry-after-ms` for when it would. The
/// `x-ratelimit-*` headers are as [`HeaderMode`] says.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Tokens per minute; `None` is unlimited.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Requests per minute; `None` is unlimited.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// The window, in milliseconds: the window's budget is the per-minute limit times
    /// `window / 60 s`. Azure evaluates over 1 s or 10 s.
    #[serde(default = "defaults::window_ms")]
    pub window_ms: u64,
    /// How the window counts.
    #[serde(default)]
    pub kind: WindowKind,
    /// How truthful the `x-ratelimit-*` and `retry-after` headers are.
    #[serde(default)]
    pub headers: HeaderMode,
}

/// How a quota's window counts what it admitted.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WindowKind {
    /// Windows one after another, each with its whole budget from its start (the budgets
    /// restart at each edge).
    #[default]
    Fixed,
    /// A log of admissions: what a request used frees only when that request's admission is
    /// a whole window old.
    Sliding,
    /// Provisioned throughput (PTU): a leaky bucket on utilisation that drains at the
    /// per-minute rate; a request is admitted while utilisation is under 100 % (and may take
    /// it over), refused until it has drained below. Requests per minute are not limited.
    Provisioned,
}

/// How an endpoint reports its quota in headers.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeaderMode {
    /// `x-ratelimit-remaining-*` as the quota stands; 429s with `retry-after` and
    /// `retry-after-ms`.
    #[default]
    Truthful,
    /// No `x-ratelimit-*` headers, and 429s without `retry-after` headers (the message still
    /// says when, as Azure's does).
    Missing,
    /// `x-ratelimit-remaining-*` of `-1`, as some gateways in front of Azure send.
    MinusOne,
    /// `x-ratelimit-remaining-*` as the quota stood up to a window ago.
    Stale,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tpm: None,
            rpm: None,
            window_ms: defaults::window_ms(),
            kind: WindowKind::default(),
            headers: HeaderMode::default(),
        }
    }
}

impl Limits {
    /// No limits.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Tokens and requests per minute over fixed 10-second windows.
    pub fn per_minute(tpm: Option<u64>, rpm: Option<u64>) -> Self {
        Self {
            tpm,
            rpm,
            ..Self::default()
        }
    }

    /// Sets how the window counts.
    #[must_use]
    pub fn with_kind(mut self, kind: WindowKind) -> Self {
        self.kind = kind;
        self
    }

    /// Sets how truthful the headers are.
    #[must_use]
    pub fn with_headers(mut self, headers: HeaderMode) -> Self {
        self.headers = headers;
        self
    }

    /// Sets the window.
    #[must_use]
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window_ms = (window.as_millis() as u64).max(1);
        self
    }

    pub(crate) fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms.max(1))
    }

    /// The budget of one window for a per-minute `limit` (at least 1).
    pub(crate) fn per_window(&self, limit: u64) -> u64 {
        ((u128::from(limit) * u128::from(self.window_ms.max(1)) / 60_000) as u64).max(1)
    }
}

/// What an endpoint generates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputModel {
    /// Tokens generated per choice when the request sets no output cap (otherwise the cap,
    /// if smaller).
    #[serde(default = "defaults::completion_tokens")]
    pub completion_tokens: u32,
    /// Output cap charged against the quota when the request sets none.
    #[serde(default = "defaults::default_max_tokens")]
    pub default_max_tokens: u32,
    /// Embedding dimensions when the request sets none.
    #[serde(default = "defaults::dimensions")]
    pub dimensions: u32,
    /// Requests that ask for the `priority` service tier are served at `default`, as Azure and
    /// OpenAI do when priority traffic grows too fast (the answer's `service_tier` says so).
    #[serde(default)]
    pub downgrade_priority: bool,
}

impl Default for OutputModel {
    fn default() -> Self {
        Self {
            completion_tokens: defaults::completion_tokens(),
            default_max_tokens: defaults::default_max_tokens(),
            dimensions: defaults::dimensions(),
            downgrade_priority: false,
        }
    }
}

mod defaults {
    pub(super) fn ttft_ms() -> u64 {
        50
    }
    pub(super) fn per_token_ms() -> f64 {
        2.0
    }
    pub(super) fn window_ms() -> u64 {
        10_000
    }
    pub(super) fn completion_tokens() -> u32 {
        16
    }
    pub(super) fn default_max_tokens() -> u32 {
        256
    }
    pub(super) fn dimensions() -> u32 {
        8
    }
}
