//! Gateway keys: who may call, and which models they may use.
//!
//! The configuration holds only each key's SHA-256; a presented key (`Authorization: Bearer`,
//! or Azure's `api-key` header) is hashed and compared with every configured digest in full,
//! in constant time (`subtle`), without stopping at the first match or the first differing
//! byte, so that the time taken says nothing about how close a guess was.

use std::time::Duration;

use axum::http::{HeaderMap, header};
use subtle::ConstantTimeEq as _;

use crate::error::ApiError;

/// A gateway key as the server holds it: its name, the digest, what it may do.
#[derive(Debug, Clone)]
pub(crate) struct GatewayKey {
    pub(crate) name: String,
    pub(crate) digest: [u8; 32],
    pub(crate) models: Vec<String>,
    /// Its requests' longest wait for a turn, when it has its own.
    pub(crate) max_queue_wait: Option<Duration>,
    /// Its requests' waiting class (lower is served first; 0 unless configured).
    pub(crate) priority: Option<u8>,
}

/// Who is calling: the key, or `None` when no keys are configured.
pub(crate) fn authenticate<'k>(
    keys: &'k [GatewayKey],
    headers: &HeaderMap,
    model: &str,
) -> Result<Option<&'k GatewayKey>, ApiError> {
    if keys.is_empty() {
        return Ok(None);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()));
    let Some(presented) = presented else {
        return Err(ApiError::unauthorized(
            "missing API key: send Authorization: Bearer <key>",
        ));
    };
    let wanted = digest(presented.trim());
    // Compare every digest in full, whichever matches: no early exit to time.
    let mut found: Option<&GatewayKey> = None;
    for key in keys {
        if bool::from(key.digest.ct_eq(&wanted)) {
            found = Some(key);
        }
    }
    let Some(key) = found else {
        return Err(ApiError::unauthorized("invalid API key"));
    };
    if !key.models.is_empty() && !key.models.iter().any(|m| m == model) {
        return Err(ApiError::forbidden_model(model));
    }
    Ok(Some(key))
}

pub(crate) fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The hex SHA-256 of a key, as the configuration stores it.
pub(crate) fn hash_key(key: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest.iter().fold(String::with_capacity(64), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// The digest of a presented key.
pub(crate) fn digest(key: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn key_digests() {
        let hex = hash_key("sk-gw-test");
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_digest(&hex), Some(digest("sk-gw-test")));
        assert_eq!(parse_digest("xyz"), None);
    }

    #[test]
    fn keys_are_checked_by_digest_and_model() {
        let keys = vec![GatewayKey {
            name: "team-a".to_owned(),
            digest: digest("sk-a"),
            models: vec!["m".to_owned()],
            max_queue_wait: None,
            priority: None,
        }];
        let mut headers = HeaderMap::new();
        assert!(
            authenticate(&[], &headers, "m").unwrap().is_none(),
            "no keys: open"
        );
        assert_eq!(
            authenticate(&keys, &headers, "m").unwrap_err().status(),
            401
        );
        headers.insert("api-key", HeaderValue::from_static("sk-b"));
        assert_eq!(
            authenticate(&keys, &headers, "m").unwrap_err().status(),
            401
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-a"),
        );
        let key = authenticate(&keys, &headers, "m").unwrap().unwrap();
        assert_eq!(key.name, "team-a");
        assert_eq!(
            authenticate(&keys, &headers, "other").unwrap_err().status(),
            403
        );
    }
}
