//! The `rate_limit_headers` fuzz target's committed corpus and kept crashes, replayed on stable (the
//! target itself runs under `cargo xtask fuzz`).

#[test]
fn the_rate_limit_headers_fuzz_corpus_holds() {
    let ran = router_types::fuzzing::replay(
        "rate_limit_headers",
        router_core::fuzzing::rate_limit_headers,
    );
    assert!(ran > 0);
}
