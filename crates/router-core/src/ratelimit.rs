//! Rate-limit signals from upstream headers.
//!
//! OpenAI sends `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every answer, the
//! resets as Go-style durations (`1s`, `6m0s`, `20ms`) meaning "until the bucket is full again".
//! Azure sends only the two `remaining` headers on success; on 429 it sends `retry-after`
//! (seconds), sometimes `retry-after-ms` or `x-ms-retry-after-ms`, and has been seen sending
//! `x-rate-limit-reset-tokens: 55` (integer seconds, dashes) instead. Negative values (Azure's
//! Responses API sends `-1`) mean "unknown". `x-should-retry` is the upstream's own verdict.
//!
//! # Examples
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use router_core::RateLimitInfo;
//!
//! let headers = [
//!     ("x-ratelimit-remaining-tokens", &b"149984"[..]),
//!     ("x-ratelimit-reset-tokens", b"6m0s"),
//!     ("retry-after-ms", b"250"),
//! ];
//! let info = RateLimitInfo::from_headers(headers, SystemTime::now());
//! assert_eq!(info.remaining_tokens, Some(149_984));
//! assert_eq!(info.reset_tokens, Some(Duration::from_secs(360)));
//! assert_eq!(info.retry_after, Some(Duration::from_millis(250)));
//! ```

use std::time::{Duration, SystemTime};

/// What the upstream's headers said about its limits. Every field is optional: upstreams send
/// different subsets, and a value that does not parse is left out rather than guessed.
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// `x-ratelimit-limit-requests`.
    pub limit_requests: Option<u64>,
    /// `x-ratelimit-limit-tokens`.
    pub limit_tokens: Option<u64>,
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<u64>,
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<u64>,
    /// `x-ratelimit-reset-requests`: until the request bucket is full.
    pub reset_requests: Option<Duration>,
    /// `x-ratelimit-reset-tokens` (or Azure's `x-rate-limit-reset-tokens`): until the token
    /// bucket is full.
    pub reset_tokens: Option<Duration>,
    /// `retry-after-ms`, else `x-ms-retry-after-ms`, else `retry-after` (seconds or HTTP date).
    pub retry_after: Option<Duration>,
    /// `x-should-retry: true|false`.
    pub should_retry: Option<bool>,
}

impl RateLimitInfo {
    /// Parses the headers of one answer. Names must be lowercase (as `http::HeaderMap` gives
    /// them); `now` resolves `retry-after` given as an HTTP date.
    pub fn from_headers<'a, I>(headers: I, now: SystemTime) -> Self
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let mut info = Self::default();
        let (mut retry_ms, mut ms_retry_ms, mut retry_after) = (None, None, None);
        for (name, value) in headers {
            let Ok(value) = std::str::from_utf8(value) else {
                continue;
            };
            let value = value.trim();
            match name {
                "x-ratelimit-limit-requests" => info.limit_requests = parse_count(value),
                "x-ratelimit-limit-tokens" => info.limit_tokens = parse_count(value),
                "x-ratelimit-remaining-requests" => info.remaining_requests = parse_count(value),
                "x-ratelimit-remaining-tokens" => info.remaining_tokens = parse_count(value),
                "x-ratelimit-reset-requests" => info.reset_requests = parse_go_duration(value),
                "x-ratelimit-reset-tokens" | "x-rate-limit-reset-tokens" => {
                    info.reset_tokens = parse_go_duration(value);
                }
                "retry-after-ms" => retry_ms = parse_millis(value),
                "x-ms-retry-after-ms" => ms_retry_ms = parse_millis(value),
                "retry-after" => retry_after = parse_retry_after(value, now),
                "x-should-retry" => {
                    info.should_retry = match value {
                        "true" => Some(true),
                        "false" => Some(false),
                        _ => None,
                    };
                }
                _ => {}
            }
        }
        info.retry_after = retry_ms.or(ms_retry_ms).or(retry_after);
        info
    }

    /// How long to stay away after a 429: the explicit retry-after, else the reset of the
    /// exhausted bucket, else the longer of the two resets.
    pub fn retry_hint(&self) -> Option<Duration> {
        if self.retry_after.is_some() {
            return self.retry_after;
        }
        if self.remaining_tokens == Some(0) && self.reset_tokens.is_some() {
            return self.reset_tokens;
        }
        if self.remaining_requests == Some(0) && self.reset_requests.is_some() {
            return self.reset_requests;
        }
        self.reset_tokens.max(self.reset_requests)
    }

    /// Whether any rate-limit header was present.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A non-negative integer count; negative values mean "unknown".
fn parse_count(value: &str) -> Option<u64> {
    value.parse::<u64>().ok()
}

fn parse_millis(value: &str) -> Option<Duration> {
    let millis: f64 = value.parse().ok()?;
    seconds(millis / 1000.0)
}

fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(value) = value.parse::<f64>() {
        return seconds(value);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(LONGEST_WAIT),
    )
}

/// Parses a Go-style duration (`6m0s`, `1.5s`, `20ms`, `1h2m3s`, `250us`, `10ns`) or a bare
/// number of seconds (`55`, as Azure sends). Returns `None` for anything else, including
/// negative values.
///
/// ```
/// use std::time::Duration;
/// use router_core::ratelimit::parse_go_duration;
///
/// assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
/// assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
/// assert_eq!(parse_go_duration("55"), Some(Duration::from_secs(55)));
/// assert_eq!(parse_go_duration("soon"), None);
/// ```
pub fn parse_go_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if let Ok(value) = value.parse::<f64>() {
        return seconds(value);
    }
    let mut rest = value;
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        // Longest unit first, so that `ms` is not read as `m` followed by `s`.
        let (unit_seconds, unit_len) = [
            ("ms", 1e-3),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ns", 1e-9),
            ("h", 3600.0),
            ("m", 60.0),
            ("s", 1.0),
        ]
        .iter()
        .find(|(unit, _)| rest.starts_with(unit))
        .map(|(unit, seconds)| (*seconds, unit.len()))?;
        rest = &rest[unit_len..];
        total += number * unit_seconds;
    }
    seconds(total)
}

/// The longest wait a header is read as: a year. A larger number (`retry-after: 1e300`) reads
/// as a year rather than overflowing the clock arithmetic that a wait ends in.
pub const LONGEST_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A wait of `value` seconds, at most [`LONGEST_WAIT`]; `None` when negative or not a number.
fn seconds(value: f64) -> Option<Duration> {
    (value >= 0.0).then(|| {
        if value >= LONGEST_WAIT.as_secs_f64() {
            LONGEST_WAIT
        } else {
            Duration::from_secs_f64(value)
        }
    })
}

/// Finds a wait in an error message: Azure's "retry after 33 seconds" or OpenAI's
/// "try again in 84ms" / "try again in 1.5s" / "try again in 6m0s".
pub fn retry_hint_in_message(message: &str) -> Option<Duration> {
    let lower = message.to_ascii_lowercase();
    if let Some(at) = lower.find("retry after ") {
        let rest = &lower[at + "retry after ".len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() && rest[digits.len()..].trim_start().starts_with("second") {
            return digits
                .parse()
                .ok()
                .map(|s| Duration::from_secs(s).min(LONGEST_WAIT));
        }
    }
    if let Some(at) = lower.find("try again in ") {
        let rest = &lower[at + "try again in ".len()..];
        let token: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == 'µ')
            .collect();
        let token = token.trim_end_matches('.');
        return parse_go_duration(token).filter(|_| !token.chars().all(|c| c.is_ascii_digit()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Found by the `rate_limit_headers` fuzz target: a number of seconds too large for a
    /// `Duration` panicked; every form now reads as at most a year.
    #[test]
    fn waits_too_long_for_the_clock_read_as_a_year() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for (name, value) in [
            ("retry-after", "1e300"),
            ("retry-after-ms", "1e300"),
            ("x-ms-retry-after-ms", "18446744073709551616000"),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ("x-ratelimit-reset-tokens", "99999999999999999999h"),
        ] {
            let info = RateLimitInfo::from_headers([(name, value.as_bytes())], now);
            assert_eq!(info.retry_hint(), Some(LONGEST_WAIT), "{name}: {value}");
        }
        assert_eq!(
            retry_hint_in_message("retry after 99999999999999999999 seconds"),
            None,
            "more seconds than a u64 holds is no number"
        );
        assert_eq!(
            retry_hint_in_message("retry after 9999999999999 seconds"),
            Some(LONGEST_WAIT)
        );
    }

    fn headers_from_fixture(rel: &str) -> Vec<(String, Vec<u8>)> {
        let path = format!("{}/../../fixtures/{rel}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| {
                (
                    name.trim().to_ascii_lowercase(),
                    value.trim().as_bytes().to_vec(),
                )
            })
            .collect()
    }

    fn parse(headers: &[(String, Vec<u8>)]) -> RateLimitInfo {
        RateLimitInfo::from_headers(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn openai_success_headers() {
        let info = parse(&headers_from_fixture("openai/headers_200_ratelimit.txt"));
        assert_eq!(info.limit_requests, Some(60));
        assert_eq!(info.limit_tokens, Some(150_000));
        assert_eq!(info.remaining_requests, Some(59));
        assert_eq!(info.remaining_tokens, Some(149_984));
        assert_eq!(info.reset_requests, Some(Duration::from_secs(1)));
        assert_eq!(info.reset_tokens, Some(Duration::from_secs(360)));
        assert_eq!(info.retry_after, None);
    }

    #[test]
    fn azure_headers() {
        let ok = parse(&headers_from_fixture("azure/headers_200_chat.txt"));
        assert!(ok.remaining_tokens.is_some() && ok.remaining_requests.is_some());
        assert_eq!(ok.limit_tokens, None);
        // The 429 without retry-after but with Azure's dashed reset header.
        let throttled = parse(&headers_from_fixture("azure/headers_429_token_limit.txt"));
        assert_eq!(throttled.reset_tokens, Some(Duration::from_secs(55)));
        assert_eq!(throttled.retry_hint(), Some(Duration::from_secs(55)));
        assert_eq!(
            throttled.remaining_requests, None,
            "placeholder value is not a number"
        );
    }

    #[test]
    fn retry_after_precedence() {
        let h = |pairs: &[(&str, &str)]| {
            let owned: Vec<(String, Vec<u8>)> = pairs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
                .collect();
            parse(&owned).retry_after
        };
        assert_eq!(
            h(&[("retry-after", "2"), ("retry-after-ms", "1500")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            h(&[("retry-after", "2"), ("x-ms-retry-after-ms", "700")]),
            Some(Duration::from_millis(700))
        );
        assert_eq!(
            h(&[("retry-after", "1.5")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            h(&[("retry-after", "Thu, 01 Jan 1970 00:00:30 GMT")]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(h(&[("retry-after", "soon")]), None);
        assert_eq!(h(&[("retry-after", "-3")]), None);
    }

    #[test]
    fn negative_counts_are_unknown() {
        let owned = vec![
            ("x-ratelimit-limit-tokens".to_owned(), b"-1".to_vec()),
            ("x-ratelimit-remaining-tokens".to_owned(), b"-1".to_vec()),
            ("x-ratelimit-reset-tokens".to_owned(), b"0".to_vec()),
        ];
        let info = parse(&owned);
        assert_eq!(info.limit_tokens, None);
        assert_eq!(info.remaining_tokens, None);
        assert_eq!(info.reset_tokens, Some(Duration::ZERO));
    }

    #[test]
    fn retry_hint_prefers_the_exhausted_bucket() {
        let mut info = RateLimitInfo {
            remaining_requests: Some(0),
            remaining_tokens: Some(5000),
            reset_requests: Some(Duration::from_millis(800)),
            reset_tokens: Some(Duration::from_secs(20)),
            ..RateLimitInfo::default()
        };
        assert_eq!(info.retry_hint(), Some(Duration::from_millis(800)));
        info.remaining_requests = Some(3);
        assert_eq!(info.retry_hint(), Some(Duration::from_secs(20)));
    }

    #[test]
    fn go_durations() {
        let cases = [
            ("1s", Some(1.0)),
            ("6m0s", Some(360.0)),
            ("12ms", Some(0.012)),
            ("1.5s", Some(1.5)),
            ("1h2m3s", Some(3723.0)),
            ("250us", Some(0.000_25)),
            ("250µs", Some(0.000_25)),
            ("10ns", Some(1e-8)),
            ("2m30.5s", Some(150.5)),
            ("", None),
            ("s", None),
            ("5x", None),
            ("-1s", None),
        ];
        for (text, expected) in cases {
            let got = parse_go_duration(text).map(|d| d.as_secs_f64());
            match (got, expected) {
                (Some(g), Some(e)) => assert!((g - e).abs() < 1e-9, "{text}: {g} != {e}"),
                (g, e) => assert_eq!(g, e, "{text}"),
            }
        }
    }

    #[test]
    fn hints_in_messages() {
        assert_eq!(
            retry_hint_in_message("Please retry after 45 seconds. Please go here"),
            Some(Duration::from_secs(45))
        );
        assert_eq!(
            retry_hint_in_message("Please try again in 1.5s. Visit"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_hint_in_message("Please try again in 6m0s."),
            Some(Duration::from_secs(360))
        );
        assert_eq!(retry_hint_in_message("try again in a moment"), None);
        assert_eq!(retry_hint_in_message("nothing here"), None);
    }

    proptest! {
        #[test]
        fn go_duration_round_trips_composed_parts(h in 0u64..50, m in 0u64..60, s in 0u64..60, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{s}s{ms}ms");
            let expected = Duration::from_secs(h * 3600 + m * 60 + s) + Duration::from_millis(ms);
            let got = parse_go_duration(&text).unwrap();
            prop_assert!((got.as_secs_f64() - expected.as_secs_f64()).abs() < 1e-6);
        }

        #[test]
        fn parsers_never_panic(text in "\\PC{0,24}") {
            let _ = parse_go_duration(&text);
            let _ = retry_hint_in_message(&text);
            let _ = RateLimitInfo::from_headers([("retry-after", text.as_bytes())], SystemTime::now());
        }
    }
}
