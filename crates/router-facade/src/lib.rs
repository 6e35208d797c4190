//! The router: many OpenAI and Azure OpenAI endpoints serving the same models, behind one
//! client.
//!
//! Callers name a *model group*; each endpoint serves it under its own *deployment* name. For
//! every request the router loads one configuration snapshot, keeps the deployments that can
//! take it (not cooling down after a 429, not ejected after failures, not disabled by a bad
//! key), lets the group's strategy pick one, and sends the request with what is left of the
//! request's deadline. On a retryable failure it cools the deployment down as the error says
//! and tries another, up to `max_attempts` and within a retry budget; a stream fails over only
//! until its first content chunk. A deployment disabled (a bad key, a missing deployment,
//! `insufficient_quota`) or cooling for long is *out*: no request goes there until a health
//! probe, which the router sends on a slow schedule with backoff, finds it serving again (see
//! [`HealthPolicy::with_probes`] and [`StateStats::out`]).
//!
//! # Examples
//!
//! Two endpoints serving `gpt-4o-mini`, routed on latency (this runs against the simulator;
//! with real endpoints, put their URLs and keys):
//!
//! ```no_run
//! use router_facade::{Endpoint, Router, StrategyKind};
//! use router_types::{ChatCompletionRequest, ChatMessage};
//!
//! # async fn run() -> Result<(), router_facade::Error> {
//! let router = Router::builder()
//!     .endpoint(
//!         Endpoint::azure("azure-east", "https://east.openai.azure.com")
//!             .api_version("2024-10-21")
//!             .api_key(std::env::var("AZURE_EAST_KEY").unwrap_or_default())
//!             .deployment("gpt-4o-mini", "gpt4o-mini-east"),
//!     )
//!     .endpoint(
//!         Endpoint::openai("openai", "https://api.openai.com/v1")
//!             .api_key(std::env::var("OPENAI_API_KEY").unwrap_or_default())
//!             .model("gpt-4o-mini"),
//!     )
//!     .strategy(StrategyKind::LeastLatency)
//!     .build()?;
//!
//! let request = ChatCompletionRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello!")]);
//! let answer = router.chat(&request).await?;
//! println!("{} answered: {}", answer.endpoint, answer.choices[0].message.text());
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! - `openai` (default): OpenAI and OpenAI-compatible endpoints.
//! - `azure` (default): Azure OpenAI endpoints.

mod affinity;
mod attempt;
mod builder;
mod clock;
mod endpoint;
mod estimate;
mod kick;
mod limits;
mod operation;
mod options;
mod path;
mod prober;
mod reservation;
mod router;
mod settings;
mod shared;
mod snapshot;
mod stream;
mod waitlist;

pub use affinity::CacheAffinity;
pub use builder::{QuotaAccounting, RetryPolicy, RouterBuilder, StrategyFactory};
pub use endpoint::{DeploymentSpec, Endpoint};
pub use limits::RateLimits;
pub use options::{
    DeploymentStats, QuotaLeft, QuotaStats, RequestOptions, Routed, TokensUsed, Waiting,
};
pub use router::Router;
pub use stream::RouterStream;

pub use router_core::{
    Admission, Availability, Backend, CallKind, CallOptions, Candidate, Charge, ChatStream,
    CompletionStream, EndpointId, Error, ErrorKind, Event, EventStream, HealthPolicy, LatencyClass,
    Learned, Learning, Limits, MemoryStore, Out, ProbeMode, ProbeOutcome, QuotaModel,
    RateLimitInfo, Reply, ResponseMeta, ResponseStream, Rng, Settlement, StateStats, StateStore,
    StoredCall, Strategy, StrategyKind, StreamItem, TraceContext,
};
pub use router_types as types;

#[cfg(feature = "entra-id")]
pub use backend_azure::{COGNITIVE_SERVICES_SCOPE, EntraId, EntraOptions};
#[cfg(feature = "azure")]
pub use backend_azure::{StaticToken, TokenProvider};
#[cfg(feature = "openai")]
pub use backend_openai::Timeouts;

impl RouterBuilder {
    /// Checks everything and builds the router.
    ///
    /// # Errors
    ///
    /// A [`Config`](ErrorKind::Config) error naming the field and the problem: no endpoints, an
    /// endpoint without a model, a duplicate name, an invalid URL, a missing Azure api-version
    /// or credential, a zero weight or attempt count.
    pub fn build(self) -> Result<Router, Error> {
        Router::from_builder(&self)
    }
}

/// The README's examples, compiled as doc tests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
