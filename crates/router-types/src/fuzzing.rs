//! The wire types' fuzz target body (`fuzz/fuzz_targets/types.rs`), here so that the corpus
//! replay (`tests/fuzz_corpus.rs`) runs it on stable: not part of the crate's API.

#![allow(
    clippy::panic,
    clippy::expect_used,
    reason = "a fuzz target reports a broken property by panicking"
)]

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The request and response types: JSON in `data`, read as each type in turn.
pub fn types(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    round_trip::<crate::ChatCompletionRequest>(&value);
    round_trip::<crate::ChatCompletionResponse>(&value);
    round_trip::<crate::ChatCompletionChunk>(&value);
    round_trip::<crate::EmbeddingRequest>(&value);
    round_trip::<crate::EmbeddingResponse>(&value);
    round_trip::<crate::CompletionRequest>(&value);
    round_trip::<crate::CompletionResponse>(&value);
    round_trip::<crate::CreateResponse>(&value);
    round_trip::<crate::Response>(&value);
    round_trip::<crate::ResponseStreamEvent>(&value);
    round_trip::<crate::ErrorResponse>(&value);
}

fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) {
    let name = std::any::type_name::<T>();
    let Ok(read) = serde_json::from_value::<T>(value.clone()) else {
        return;
    };
    let written = serde_json::to_value(&read).unwrap_or_else(|e| panic!("{name}: {e}"));
    let again: T = serde_json::from_value(written.clone())
        .unwrap_or_else(|e| panic!("{name}: its own output does not read back: {e}"));
    let rewritten = serde_json::to_value(&again).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(written, rewritten, "{name}: a second round trip changed it");
    if let (Value::Object(given), Value::Object(out)) = (value, &written) {
        for (key, field) in given {
            assert!(
                field.is_null() || out.contains_key(key) || is_no_model(key, field),
                "{name}: the field `{key}` was dropped"
            );
        }
    }
}

/// `"model": ""`, which the request types write as no `model` at all: they cannot tell the
/// two apart (`model` is a `String`), and must write none for Azure's deployment paths, which
/// carry the deployment in the URL. Nothing is lost: the router names every request's model
/// per endpoint, and an empty name is no model group. (Found by the fuzzer; kept in
/// `fuzz/regressions/types/empty-model-dropped`.)
fn is_no_model(key: &str, field: &Value) -> bool {
    key == "model" && field.as_str() == Some("")
}

/// Runs `body` on every input committed for the fuzz target `target`: its corpus
/// (`fuzz/corpus/TARGET/`) and the crashes it once found (`fuzz/regressions/TARGET/`), for
/// the replay tests that run in CI on stable. Returns how many inputs ran; panics, naming the
/// file, when one breaks the target's property, and when the corpus is missing or empty.
pub fn replay(target: &str, body: fn(&[u8])) -> usize {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut ran = 0;
    for folder in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(folder).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let data = match std::fs::read(&path) {
                Ok(data) => data,
                // A fuzzer running beside the tests minimises the corpus in place: an input it
                // removed since the listing is no longer part of it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("{}: cannot read: {e}", path.display()),
            };
            let outcome = std::panic::catch_unwind(|| body(&data));
            assert!(outcome.is_ok(), "{}: the property broke", path.display());
            ran += 1;
        }
    }
    assert!(
        ran > 0,
        "no corpus for the fuzz target `{target}` under {}",
        root.display()
    );
    ran
}
