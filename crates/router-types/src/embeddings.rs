//! Embeddings: request and response.

use serde::{Deserialize, Serialize};

use crate::shared::{Extra, PromptInput, Usage};

/// `POST /embeddings` request body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    /// The model, or for Azure the deployment. The router rewrites it per endpoint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// What to embed: text, texts, tokens or token arrays.
    #[serde(default)]
    pub input: PromptInput,
    /// `float` or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    /// Output dimensions (text-embedding-3 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// Fields this version does not model (`user`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

impl EmbeddingRequest {
    /// A request to embed `input` with `model`.
    pub fn new(model: impl Into<String>, input: impl Into<PromptInput>) -> Self {
        Self {
            model: model.into(),
            input: input.into(),
            ..Self::default()
        }
    }
}

/// `POST /embeddings` response body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    /// `list`; absent in some Azure examples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// One embedding per input, in input order by `index`.
    #[serde(default)]
    pub data: Vec<Embedding>,
    /// The model that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Token usage (`completion_tokens` absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// `embedding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The vector.
    pub embedding: EmbeddingVector,
    /// Which input this embeds.
    #[serde(default)]
    pub index: u32,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// An embedding vector: floats, or base64 of little-endian `f32`s with `encoding_format: base64`.
///
/// Floats are kept as `f64` so that the digits the upstream sent are written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `encoding_format: float` (the default).
    Float(Vec<f64>),
    /// `encoding_format: base64`.
    Base64(String),
}
