//! The OpenAI wire protocol over HTTP: the [`Backend`](router_core::Backend) for OpenAI and any
//! OpenAI-compatible server, and the codec that `backend-azure` reuses for Azure OpenAI.
//!
//! - [`OpenAiBackend`] sends chat completions (plain and streamed), embeddings and legacy
//!   completions to one endpoint, maps every failure to a [`router_core::Error`] of the right
//!   kind, and reports status, rate-limit headers and timings with each answer.
//! - [`Dialect`] is the small, synchronous seam where dialects differ: the URL of each
//!   [`Operation`] and the fixed headers. [`OpenAiDialect`] is OpenAI's; `backend-azure` has
//!   Azure's.
//! - [`Credential`] says how requests authenticate: a bearer key, a key in a named header, or a
//!   [`TokenProvider`] asked for a fresh bearer token before each request.
//! - [`HttpClient`] is the shared connection pool (rustls, no redirects, `TCP_NODELAY`), with
//!   the [`Timeouts`] each backend applies: connect, first byte, between chunks.
//!
//! Streams are decoded from server-sent events by `eventsource-stream`, which keeps partial
//! lines and partial UTF-8 characters across network chunks and accepts `\n`, `\r\n` and `\r`.
//!
//! # Examples
//!
//! ```no_run
//! use backend_openai::OpenAiBackend;
//! use router_core::{Backend, CallOptions};
//! use router_types::{ChatCompletionRequest, ChatMessage};
//!
//! # async fn run() -> Result<(), router_core::Error> {
//! let backend = OpenAiBackend::builder("openai-main", "https://api.openai.com/v1")
//!     .api_key(std::env::var("OPENAI_API_KEY").unwrap_or_default())
//!     .build()?;
//! let request = ChatCompletionRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hi!")]);
//! let reply = backend.chat(&request, &CallOptions::default()).await?;
//! println!("{:?} in {:?}", reply.body.choices[0].message.text(), reply.meta.time_to_headers);
//! # Ok(()) }
//! ```

mod backend;
mod client;
mod credential;
mod dialect;
#[doc(hidden)]
pub mod fuzzing;
mod scrub;
mod sse;

pub use backend::{DEFAULT_MAX_ANSWER_BYTES, OpenAiBackend, OpenAiBackendBuilder};
pub use client::{HttpClient, Timeouts};
pub use credential::{Credential, StaticToken, TokenProvider};
pub use dialect::{Dialect, OpenAiDialect, Operation, base_url_with_slash};
