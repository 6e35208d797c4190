//! Types shared by several API families: usage, roles, finish reasons, prompts, Azure filters.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Fields a struct does not model, written back unchanged.
pub type Extra = Map<String, Value>;

/// Declares an open string enum: known values get variants, anything else is kept in `Other`.
macro_rules! open_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $wire:literal, )+ }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this version does not know, kept verbatim.
            Other(String),
        }

        impl $name {
            /// The value as it appears on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $wire, )+
                    Self::Other(other) => other,
                }
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                match value {
                    $( $wire => Self::$variant, )+
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Ok(Self::from(value.as_ref()))
            }
        }
    };
}

open_enum! {
    /// The author of a chat message.
    pub enum Role {
        /// Instructions from the application (older models).
        System => "system",
        /// Instructions from the application (o1 and later).
        Developer => "developer",
        /// The end user.
        User => "user",
        /// The model.
        Assistant => "assistant",
        /// The result of a tool call.
        Tool => "tool",
        /// The result of a function call (deprecated by OpenAI).
        Function => "function",
    }
}

open_enum! {
    /// Why a choice stopped generating.
    pub enum FinishReason {
        /// A natural stop or a stop sequence.
        Stop => "stop",
        /// The token limit was reached.
        Length => "length",
        /// The model called one or more tools.
        ToolCalls => "tool_calls",
        /// Content was withheld by a content filter.
        ContentFilter => "content_filter",
        /// The model called a function (deprecated by OpenAI).
        FunctionCall => "function_call",
    }
}

/// Token usage of one call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated (absent for embeddings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// Prompt plus completion tokens.
    #[serde(default)]
    pub total_tokens: u64,
    /// Breakdown of the prompt tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Breakdown of the completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Breakdown of prompt tokens. Azure may send `null` for a sub-field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Tokens served from the prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Audio input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_tokens: Option<u64>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Breakdown of completion tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    /// Tokens spent on reasoning (o-series and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    /// Audio output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_tokens: Option<u64>,
    /// Predicted-output tokens that appeared in the completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_prediction_tokens: Option<u64>,
    /// Predicted-output tokens that did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_prediction_tokens: Option<u64>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A prompt or embeddings input: text, texts, tokens or token arrays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One token array.
    Tokens(Vec<u32>),
    /// Several token arrays.
    TokenArrays(Vec<Vec<u32>>),
}

impl Default for PromptInput {
    fn default() -> Self {
        Self::Text(String::new())
    }
}

impl From<&str> for PromptInput {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<String> for PromptInput {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl PromptInput {
    /// Total characters of text and number of tokens given, for cost estimates.
    pub fn size_hint(&self) -> (usize, usize) {
        match self {
            Self::Text(text) => (text.chars().count(), 0),
            Self::Texts(texts) => (texts.iter().map(|t| t.chars().count()).sum(), 0),
            Self::Tokens(tokens) => (0, tokens.len()),
            Self::TokenArrays(arrays) => (0, arrays.iter().map(Vec::len).sum()),
        }
    }
}

/// Azure's content filter verdict on one prompt (`prompt_filter_results[]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptFilterResult {
    /// Which prompt of the request this is about.
    #[serde(default)]
    pub prompt_index: u32,
    /// The verdicts per category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_filter_results: Option<ContentFilterResults>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Azure's content filter verdicts per category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContentFilterResults {
    /// Hate speech.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hate: Option<ContentFilterSeverity>,
    /// Self harm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_harm: Option<ContentFilterSeverity>,
    /// Sexual content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sexual: Option<ContentFilterSeverity>,
    /// Violence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violence: Option<ContentFilterSeverity>,
    /// Jailbreak attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jailbreak: Option<ContentFilterDetection>,
    /// Protected material (text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_material_text: Option<ContentFilterDetection>,
    /// Protected material (code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_material_code: Option<ContentFilterDetection>,
    /// Other categories (custom block lists, errors) and fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ContentFilterResults {
    /// Whether any known category says the content was filtered.
    pub fn any_filtered(&self) -> bool {
        let severities = [&self.hate, &self.self_harm, &self.sexual, &self.violence];
        let detections = [
            &self.jailbreak,
            &self.protected_material_text,
            &self.protected_material_code,
        ];
        severities
            .iter()
            .any(|s| s.as_ref().is_some_and(|s| s.filtered))
            || detections
                .iter()
                .any(|d| d.as_ref().is_some_and(|d| d.filtered))
    }
}

/// A severity-graded filter category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContentFilterSeverity {
    /// Whether the content was withheld.
    #[serde(default)]
    pub filtered: bool,
    /// `safe`, `low`, `medium` or `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A detected-or-not filter category.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContentFilterDetection {
    /// Whether the content was withheld.
    #[serde(default)]
    pub filtered: bool,
    /// Whether the category was detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detected: Option<bool>,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_enums_keep_unknown_values() {
        let role: Role = serde_json::from_str("\"critic\"").unwrap();
        assert_eq!(role, Role::Other("critic".into()));
        assert_eq!(serde_json::to_string(&role).unwrap(), "\"critic\"");
        let reason: FinishReason = serde_json::from_str("\"content_filter\"").unwrap();
        assert_eq!(reason, FinishReason::ContentFilter);
    }

    #[test]
    fn prompt_input_size_hint() {
        assert_eq!(PromptInput::from("héllo").size_hint(), (5, 0));
        assert_eq!(
            PromptInput::TokenArrays(vec![vec![1, 2], vec![3]]).size_hint(),
            (0, 3)
        );
    }
}
