//! Legacy completions: request and response (the response is also the stream chunk).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::StreamOptions;
use crate::shared::{
    ContentFilterResults, Extra, FinishReason, PromptFilterResult, PromptInput, Usage,
};

/// `POST /completions` request body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The model, or for Azure the deployment. The router rewrites it per endpoint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// The prompt: text, texts, tokens or token arrays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<PromptInput>,
    /// Output cap; the upstream's default is 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// How many choices to return.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// How many choices to generate server-side, returning the best `n`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
    /// Whether to stream the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Fields this version does not model (`temperature`, `echo`, `suffix`, `logprobs`…).
    #[serde(flatten)]
    pub extra: Extra,
}

impl CompletionRequest {
    /// A request for `model` with `prompt`.
    pub fn new(model: impl Into<String>, prompt: impl Into<PromptInput>) -> Self {
        Self {
            model: model.into(),
            prompt: Some(prompt.into()),
            ..Self::default()
        }
    }
}

/// `POST /completions` response body, and each chunk of a streamed one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// `cmpl-…`.
    #[serde(default)]
    pub id: String,
    /// `text_completion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The generated choices.
    #[serde(default)]
    pub choices: Vec<CompletionChoice>,
    /// Token usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend configuration fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Azure's prompt filter verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_filter_results: Option<Vec<PromptFilterResult>>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One choice of a legacy completion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// The generated text.
    #[serde(default)]
    pub text: String,
    /// Position among the choices.
    #[serde(default)]
    pub index: u32,
    /// Log probabilities, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
    /// Why generation stopped. Always written, `null` when `None`.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
    /// Azure's completion filter verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_filter_results: Option<ContentFilterResults>,
    /// Fields this version does not model (Azure's singular `content_filter_result`…).
    #[serde(flatten)]
    pub extra: Extra,
}
