//! The request and response types: reads, writes back unchanged, drops no field.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| router_types::fuzzing::types(data));
