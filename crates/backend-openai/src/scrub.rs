//! Keys out of upstream text.

use std::sync::Arc;

use secrecy::{ExposeSecret as _, SecretString};

/// Removes the endpoint's own key from upstream text: some upstreams echo the key they were
/// given ("Incorrect API key provided: sk-…"), and that text ends up in errors and logs.
#[derive(Clone, Default)]
pub(crate) struct Scrubber {
    secret: Option<Arc<SecretString>>,
}

impl Scrubber {
    pub(crate) fn new(secret: Option<&str>) -> Self {
        Self {
            secret: secret
                .filter(|s| !s.is_empty())
                .map(|s| Arc::new(SecretString::from(s.to_owned()))),
        }
    }

    pub(crate) fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(secret) if text.contains(secret.expose_secret()) => {
                text.replace(secret.expose_secret(), "[REDACTED]")
            }
            _ => text.to_owned(),
        }
    }
}
