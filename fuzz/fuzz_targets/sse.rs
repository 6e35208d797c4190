//! The SSE decoder: the same events however the body is cut into chunks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| backend_openai::fuzzing::sse(data));
