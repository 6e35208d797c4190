//! The `types` fuzz target's committed corpus and kept crashes, replayed on stable (the
//! target itself runs under `cargo xtask fuzz`).

#[test]
fn the_types_fuzz_corpus_holds() {
    let ran = router_types::fuzzing::replay("types", router_types::fuzzing::types);
    assert!(ran > 0);
}
