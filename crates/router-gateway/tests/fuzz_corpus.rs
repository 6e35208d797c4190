//! The gateway's fuzz targets' committed corpora and kept crashes (`config`,
//! `gateway_request`), replayed on stable (the targets themselves run under
//! `cargo xtask fuzz`).

use router_facade::types::fuzzing::replay;

#[test]
fn the_config_fuzz_corpus_holds() {
    assert!(replay("config", router_gateway::fuzzing::config) > 0);
}

#[test]
fn the_gateway_request_fuzz_corpus_holds() {
    assert!(replay("gateway_request", router_gateway::fuzzing::gateway_request) > 0);
}
