//! Any method, path, headers and body through the gateway's service, in-process.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| router_gateway::fuzzing::gateway_request(data));
