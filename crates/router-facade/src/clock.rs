//! The router's clock: tokio's, so that paused time in tests applies to every timestamp the
//! router takes (latency samples, cooldowns, quota buckets).

/// Now, as a `std` instant on tokio's clock.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
