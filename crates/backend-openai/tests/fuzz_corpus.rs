//! The `sse` fuzz target's committed corpus and kept crashes, replayed on stable (the
//! target itself runs under `cargo xtask fuzz`).

#[test]
fn the_sse_fuzz_corpus_holds() {
    let ran = router_types::fuzzing::replay("sse", backend_openai::fuzzing::sse);
    assert!(ran > 0);
}
