//! The Responses API (`POST /responses`): kept to what a router needs to forward it faithfully.
//!
//! The router routes responses as it routes chat completions; a response the upstream stores
//! (the default) stays where it was made, so a continuation (`previous_response_id`) can only
//! go to the deployment that stored it. These types let the router parse, account and forward
//! the payloads without losing anything.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::shared::Extra;

/// `POST /responses` request body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateResponse {
    /// The model, or for Azure the deployment.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// A string or an array of input items, kept as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// Whether to stream named events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Output cap including reasoning tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A response object (`object: "response"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// `resp_…`.
    #[serde(default)]
    pub id: String,
    /// `completed`, `in_progress`, `failed`, `incomplete`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The model that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Output items, kept as JSON.
    #[serde(default)]
    pub output: Vec<Value>,
    /// Token usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ResponseUsage>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Token usage of a response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponseUsage {
    /// Input tokens.
    #[serde(default)]
    pub input_tokens: u64,
    /// Output tokens, reasoning included.
    #[serde(default)]
    pub output_tokens: u64,
    /// Input plus output tokens.
    #[serde(default)]
    pub total_tokens: u64,
    /// Fields this version does not model (token details).
    #[serde(flatten)]
    pub extra: Extra,
}

/// One named event of a streamed response; `kind` equals the SSE event name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponseStreamEvent {
    /// `response.created`, `response.output_text.delta`, `response.completed`, `error`, …
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The response, on lifecycle events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Response>,
    /// Fields this version does not model (`delta`, `item_id`, `sequence_number`…).
    #[serde(flatten)]
    pub extra: Extra,
}
