//! The configuration file and the LiteLLM conversion.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| router_gateway::fuzzing::config(data));
