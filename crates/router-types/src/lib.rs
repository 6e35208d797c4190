//! Wire types for the OpenAI and Azure OpenAI APIs the router speaks: chat completions (plain and
//! streamed), embeddings, legacy completions and the error body.
//!
//! # Forward compatibility
//!
//! A router forwards what it does not understand. Every struct here therefore keeps the fields it
//! does not model in an `extra` map (`#[serde(flatten)]`) and writes them back unchanged, and every
//! enum that the upstream may extend ([`Role`], [`FinishReason`]) keeps values it does not know in
//! an `Other(String)` variant. Nothing here uses `deny_unknown_fields`.
//!
//! Two wire details follow the official SDKs:
//! - an optional field sent as `null` and an absent one are the same value (`None`); the `null`
//!   is not written back;
//! - fields the OpenAI specification marks *required but nullable* (`message.content`,
//!   `choices[].finish_reason`, the four keys of the error object) are always written, as `null`
//!   when `None`, because clients index them directly.
//!
//! # Examples
//!
//! ```
//! use router_types::{ChatCompletionRequest, ChatMessage};
//!
//! let mut request = ChatCompletionRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello!")]);
//! request.max_completion_tokens = Some(64);
//! // A field this crate does not model travels untouched.
//! request.extra.insert("reasoning_effort".into(), "low".into());
//!
//! let json = serde_json::to_value(&request)?;
//! assert_eq!(json["reasoning_effort"], "low");
//! assert_eq!(json["messages"][0]["content"], "Hello!");
//! # Ok::<(), serde_json::Error>(())
//! ```

mod chat;
mod completions;
mod embeddings;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod responses;
mod shared;

pub use chat::{
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatMessage, ChunkChoice, ContentPart, FunctionCall, FunctionCallDelta, FunctionDefinition,
    ImageUrl, MessageContent, StreamOptions, Tool, ToolCall, ToolCallDelta,
};
pub use completions::{CompletionChoice, CompletionRequest, CompletionResponse};
pub use embeddings::{Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingVector};
pub use error::{ErrorBody, ErrorCode, ErrorResponse};
pub use responses::{CreateResponse, Response, ResponseStreamEvent, ResponseUsage};
pub use shared::{
    CompletionTokensDetails, ContentFilterDetection, ContentFilterResults, ContentFilterSeverity,
    Extra, FinishReason, PromptFilterResult, PromptInput, PromptTokensDetails, Role, Usage,
};
