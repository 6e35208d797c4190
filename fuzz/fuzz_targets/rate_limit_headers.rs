//! Rate-limit headers: `retry-after` forms, Go durations, `x-ratelimit-*`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| router_core::fuzzing::rate_limit_headers(data));
