//! Faults a test can inject into an endpoint.

use std::time::Duration;

/// Something to go wrong with a request.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with an error status and the dialect's error body. `code` picks the variant
    /// (`insufficient_quota`, `content_filter`, `context_length_exceeded`, …); `retry_after`
    /// adds `retry-after` and `retry-after-ms` headers.
    Status {
        /// The HTTP status.
        status: u16,
        /// The error code in the body; the status's usual one when `None`.
        code: Option<String>,
        /// The wait to announce.
        retry_after: Option<Duration>,
    },
    /// Close the connection before sending headers.
    Reset,
    /// Wait this long before sending headers.
    StallBeforeHeaders(Duration),
    /// Stream: stop sending after this many events, for this long, then go on.
    StallMidStream {
        /// Events sent before the stall.
        after_events: usize,
        /// How long the stall lasts.
        duration: Duration,
    },
    /// Stream: end the body cleanly after this many events, without `[DONE]`.
    TruncateStream {
        /// Events sent before the end.
        after_events: usize,
    },
    /// Stream: break the connection after this many events.
    ResetMidStream {
        /// Events sent before the break.
        after_events: usize,
    },
    /// Stream: send an `{"error": …}` event after this many events, then end.
    ErrorEvent {
        /// Events sent before the error.
        after_events: usize,
    },
    /// Answer 200 with a body (or, for a stream, a first event) that is not valid JSON.
    MalformedJson,
    /// Answer 429 announcing `wait` in one of the ways upstreams do (or not at all).
    Throttled {
        /// The wait announced.
        wait: Duration,
        /// How it is announced.
        form: WaitForm,
    },
    /// Answer 200 with `content-type: text/html` and an HTML page, as a proxy or a captive
    /// portal in front of the endpoint would.
    WrongContentType,
    /// Answer 200 with a JSON body (or, for a stream, one event) of about this many bytes.
    Oversized(usize),
}

/// How a 429 announces its wait ([`Fault::Throttled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitForm {
    /// `retry-after: SECONDS` alone.
    Seconds,
    /// `retry-after-ms: MILLISECONDS` alone.
    Millis,
    /// Azure's `x-ms-retry-after-ms` alone.
    AzureMillis,
    /// `retry-after` as an HTTP date.
    HttpDate,
    /// `x-ratelimit-remaining-tokens: 0` and `x-ratelimit-reset-tokens` as a Go duration.
    ResetTokens,
    /// No header: "Please try again in …" in the error message only.
    InMessage,
    /// Nothing at all.
    Unannounced,
}

impl Fault {
    /// An error status with the dialect's usual body.
    pub fn status(status: u16) -> Self {
        Self::Status {
            status,
            code: None,
            retry_after: None,
        }
    }

    /// A 429 announcing `retry_after`.
    pub fn rate_limited(retry_after: Duration) -> Self {
        Self::Status {
            status: 429,
            code: None,
            retry_after: Some(retry_after),
        }
    }

    /// An error status with a specific code in the body.
    pub fn status_with_code(status: u16, code: impl Into<String>) -> Self {
        Self::Status {
            status,
            code: Some(code.into()),
            retry_after: None,
        }
    }

    /// Whether the fault acts on the stream body rather than before the headers.
    pub(crate) fn is_mid_stream(&self) -> bool {
        matches!(
            self,
            Self::StallMidStream { .. }
                | Self::TruncateStream { .. }
                | Self::ResetMidStream { .. }
                | Self::ErrorEvent { .. }
        )
    }
}

/// Azure's spillover, for an endpoint whose deployments are full (`SimEndpoint::spill`): a
/// request that names a spillover deployment (`x-ms-spillover-deployment`) is spilled over to
/// it, and the answer says so with an `x-ms-spillover-from-<deployment asked for>` header; one
/// that names none is refused with 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spill {
    /// The spillover deployment serves the request.
    Serves,
    /// The spillover deployment fails too: 503 with `x-ms-spillover-error`.
    Fails,
}

/// How often an injected fault applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Times {
    /// To the next `n` requests.
    Next(u32),
    /// To every request until cleared.
    Always,
    /// To each request with this probability (drawn from the seeded generator).
    Fraction(f64),
}

#[derive(Debug)]
pub(crate) struct Injected {
    pub(crate) fault: Fault,
    pub(crate) times: Times,
}

/// Takes the fault that applies to this request, if any, using `draw` for fractions.
pub(crate) fn take(faults: &mut Vec<Injected>, draw: f64) -> Option<Fault> {
    let position = faults.iter().position(|f| match f.times {
        Times::Next(n) => n > 0,
        Times::Always => true,
        Times::Fraction(p) => draw < p,
    })?;
    let injected = &mut faults[position];
    let fault = injected.fault.clone();
    if let Times::Next(n) = &mut injected.times {
        *n -= 1;
        if *n == 0 {
            faults.remove(position);
        }
    }
    Some(fault)
}
