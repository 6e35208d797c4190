//! How requests authenticate.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use http::HeaderName;
use router_core::Error;
use secrecy::{ExposeSecret, SecretString};

/// Where a request's credential comes from. `Debug` never shows a secret.
#[derive(Clone)]
#[non_exhaustive]
pub enum Credential {
    /// `Authorization: Bearer <key>` (OpenAI and compatible servers).
    Bearer(SecretString),
    /// The key in a named header (Azure's `api-key`).
    Header(HeaderName, SecretString),
    /// `Authorization: Bearer <token>`, with a token fetched before each request (Azure Entra
    /// ID). The provider caches and refreshes.
    TokenProvider(Arc<dyn TokenProvider>),
    /// No credential (a local OpenAI-compatible server).
    None,
}

impl Credential {
    /// The fixed secret, if this credential has one: used to scrub it from upstream messages.
    pub(crate) fn fixed_secret(&self) -> Option<&str> {
        match self {
            Self::Bearer(secret) | Self::Header(_, secret) => Some(secret.expose_secret()),
            Self::TokenProvider(_) | Self::None => None,
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bearer(_) => f.write_str("Bearer([REDACTED])"),
            Self::Header(name, _) => write!(f, "Header({name}, [REDACTED])"),
            Self::TokenProvider(provider) => {
                f.debug_tuple("TokenProvider").field(provider).finish()
            }
            Self::None => f.write_str("None"),
        }
    }
}

/// Supplies bearer tokens, for example Microsoft Entra ID tokens with the scope
/// `https://cognitiveservices.azure.com/.default`.
///
/// Called before every request, retries included, so implementations cache the token and
/// refresh it ahead of its expiry. `Debug` must not print the token.
#[async_trait]
pub trait TokenProvider: Send + Sync + fmt::Debug {
    /// A currently valid token.
    async fn token(&self) -> Result<SecretString, Error>;
}

/// A fixed token, for tests and short-lived tools.
#[derive(Clone)]
pub struct StaticToken(SecretString);

impl StaticToken {
    /// A provider that always returns `token`.
    pub fn new(token: impl Into<String>) -> Self {
        Self(SecretString::from(token.into()))
    }
}

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticToken([REDACTED])")
    }
}

#[async_trait]
impl TokenProvider for StaticToken {
    async fn token(&self) -> Result<SecretString, Error> {
        Ok(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let credentials = [
            Credential::Bearer(SecretString::from("sk-very-secret")),
            Credential::Header(
                HeaderName::from_static("api-key"),
                SecretString::from("sk-very-secret"),
            ),
            Credential::TokenProvider(Arc::new(StaticToken::new("sk-very-secret"))),
        ];
        for credential in credentials {
            let shown = format!("{credential:?}");
            assert!(!shown.contains("sk-very-secret"), "{shown}");
            assert!(shown.contains("REDACTED"), "{shown}");
        }
    }
}
