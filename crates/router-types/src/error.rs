//! The error body of OpenAI and Azure OpenAI: `{"error": {message, type, param, code}}`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::shared::Extra;

/// The envelope of an error response, and of an error event mid-stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
    /// Fields this version does not model.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ErrorResponse {
    /// An error body with `message`, `type` and `code`, as the gateway writes them.
    pub fn new(message: impl Into<String>, kind: impl Into<String>, code: Option<&str>) -> Self {
        Self {
            error: ErrorBody {
                message: message.into(),
                kind: Some(kind.into()),
                param: None,
                code: code.map(|c| ErrorCode::Text(c.to_owned())),
                extra: Extra::new(),
            },
            extra: Extra::new(),
        }
    }
}

/// The error object. OpenAI always sends all four keys; Azure often leaves out `type`, sends
/// `code` as a string such as `"429"` or `DeploymentNotFound`, and adds `status` and `innererror`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable text.
    #[serde(default)]
    pub message: String,
    /// `invalid_request_error`, `insufficient_quota`, `tokens`, … Always written.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The request parameter at fault. Always written.
    #[serde(default)]
    pub param: Option<String>,
    /// A machine-readable code. Always written.
    #[serde(default)]
    pub code: Option<ErrorCode>,
    /// Fields this version does not model (`status`, `innererror`…).
    #[serde(flatten)]
    pub extra: Extra,
}

impl ErrorBody {
    /// The code as text, whether it came as a string or a number.
    pub fn code_str(&self) -> Option<String> {
        self.code.as_ref().map(ToString::to_string)
    }

    /// Whether `code` or `type` equals `value`.
    pub fn is(&self, value: &str) -> bool {
        self.kind.as_deref() == Some(value)
            || matches!(&self.code, Some(ErrorCode::Text(code)) if code == value)
    }
}

/// An error code: usually a string, sometimes a number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ErrorCode {
    /// `rate_limit_exceeded`, `"429"`, `DeploymentNotFound`, …
    Text(String),
    /// A numeric code.
    Number(i64),
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(text) => f.write_str(text),
            Self::Number(number) => write!(f, "{number}"),
        }
    }
}
