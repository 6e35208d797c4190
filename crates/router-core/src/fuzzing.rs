//! The rate-limit header parser's fuzz target body (`fuzz/fuzz_targets/rate_limit_headers.rs`),
//! here so that the corpus replay (`tests/fuzz_corpus.rs`) runs it on stable: not part of the
//! crate's API.

#![allow(
    clippy::panic,
    clippy::expect_used,
    reason = "a fuzz target reports a broken property by panicking"
)]

use std::time::{Duration, SystemTime};

/// Rate-limit headers: `data` as lines of `name: value` (names lowercased, as the HTTP
/// library gives them).
pub fn rate_limit_headers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let headers: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.to_owned()))
        .collect();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let parse = |pad: &str| {
        let padded: Vec<(String, String)> = headers
            .iter()
            .map(|(name, value)| (name.clone(), format!("{pad}{}{pad}", value.trim())))
            .collect();
        crate::RateLimitInfo::from_headers(
            padded.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
            now,
        )
    };
    let info = parse("");
    assert_eq!(
        info,
        parse("  "),
        "whitespace around values changed the reading"
    );
    let _ = info.retry_hint();
    let _ = info.is_empty();
    for (_, value) in &headers {
        let _ = crate::ratelimit::parse_go_duration(value);
    }
    let _ = crate::ratelimit::retry_hint_in_message(&text);
}
