//! The I/O-free core of the router.
//!
//! This crate knows no HTTP client, no server and no Redis. It holds what every other crate
//! agrees on:
//!
//! - [`Error`], the one error type: a [`kind`](Error::kind), the upstream status, the endpoint
//!   that failed, [`is_retryable`](Error::is_retryable), [`retry_after`](Error::retry_after) and
//!   what the failure means for the endpoint's health ([`HealthEffect`]);
//! - the [`Backend`] trait that an upstream implements (OpenAI, Azure, or your own), with the
//!   [`Reply`] and [`EventStream`] types that carry what the router needs besides the body;
//! - [`RateLimitInfo`], parsed from `x-ratelimit-*`, `retry-after`, `retry-after-ms` and
//!   `x-ms-retry-after-ms` headers, and the Go-style duration parser behind it.
//!
//! # Examples
//!
//! A custom backend is an `impl Backend`:
//!
//! ```
//! use async_trait::async_trait;
//! use router_core::{Backend, CallOptions, ChatStream, EndpointId, Error, Reply, ResponseMeta};
//! use router_types::*;
//!
//! #[derive(Debug)]
//! struct Echo(EndpointId);
//!
//! #[async_trait]
//! impl Backend for Echo {
//!     fn endpoint(&self) -> &EndpointId { &self.0 }
//!
//!     async fn chat(&self, request: &ChatCompletionRequest, _: &CallOptions)
//!         -> Result<Reply<ChatCompletionResponse>, Error> {
//!         let text = request.messages.last().map(ChatMessage::text).unwrap_or_default();
//!         let message = ChatMessage::assistant(text);
//!         let choice = ChatChoice { index: 0, message, finish_reason: Some(FinishReason::Stop),
//!             logprobs: None, content_filter_results: None, extra: Extra::new() };
//!         let body = ChatCompletionResponse { choices: vec![choice], ..Default::default() };
//!         Ok(Reply::new(body, ResponseMeta::new(200)))
//!     }
//!
//!     async fn chat_stream(&self, _: &ChatCompletionRequest, _: &CallOptions)
//!         -> Result<ChatStream, Error> {
//!         Err(Error::unsupported(self.0.clone(), "streaming"))
//!     }
//!
//!     async fn embeddings(&self, _: &EmbeddingRequest, _: &CallOptions)
//!         -> Result<Reply<EmbeddingResponse>, Error> {
//!         Err(Error::unsupported(self.0.clone(), "embeddings"))
//!     }
//!
//!     async fn completions(&self, _: &CompletionRequest, _: &CallOptions)
//!         -> Result<Reply<CompletionResponse>, Error> {
//!         Err(Error::unsupported(self.0.clone(), "completions"))
//!     }
//! }
//! ```

mod backend;
mod endpoint;
mod error;
pub mod ewma;
#[doc(hidden)]
pub mod fuzzing;
pub mod quota;
pub mod ratelimit;
mod retry;
mod rng;
pub mod select;
pub mod state;
pub mod strategy;
mod trace;

pub use backend::{
    Backend, CallOptions, ChatStream, CompletionStream, Event, EventStream, Reply, ResponseMeta,
    ResponseStream, StoredCall, StreamItem,
};
pub use endpoint::EndpointId;
pub use error::{Error, ErrorKind, HealthEffect};
pub use quota::{
    Admission, Charge, Drain, Learned, Learner, Learning, Lease, Limits, Log, MAX_OPENINGS, Mark,
    MemoryStore, QuotaModel, QuotaView, Settlement, StateStore, upstream_allowance,
};
pub use ratelimit::RateLimitInfo;
pub use retry::RetryBudget;
pub use rng::Rng;
pub use select::{Ask, NothingEligible, Reason, Selection, Slot, probe_beside, select, soonest};
pub use state::{
    Availability, CallKind, DeploymentState, HealthPolicy, InFlightGuard, LatencyClass, Out,
    ProbeOutcome, SERVICE_TIERS, StateStats,
};
pub use strategy::{
    Candidate, LeastBusy, LeastLatency, ProbeMode, RoundRobin, Strategy, StrategyKind, UsageBased,
    Weighted, p2c, pick_tiered, sample_two,
};
pub use trace::TraceContext;
