//! Property: unknown fields survive a round trip through every request type, whatever they are.

use proptest::prelude::*;
use router_types::{ChatCompletionChunk, ChatCompletionRequest, EmbeddingRequest};
use serde_json::{Map, Value, json};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[a-z ]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Keys the types model; an unknown field must not collide with them.
const KNOWN: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "input",
    "encoding_format",
    "dimensions",
    "id",
    "object",
    "created",
    "choices",
    "usage",
    "system_fingerprint",
    "service_tier",
    "prompt_filter_results",
];

fn arb_extra() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("x_[a-z]{1,8}", arb_json(), 0..5).prop_map(|m| {
        m.into_iter()
            .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
            .collect()
    })
}

proptest! {
    #[test]
    fn chat_request_keeps_unknown_fields(extra in arb_extra()) {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut().unwrap().extend(extra.clone());
        let parsed: ChatCompletionRequest = serde_json::from_value(body.clone()).unwrap();
        prop_assert_eq!(&parsed.extra, &extra);
        prop_assert_eq!(serde_json::to_value(&parsed).unwrap(), body);
    }

    #[test]
    fn embedding_request_keeps_unknown_fields(extra in arb_extra()) {
        let mut body = json!({"model": "m", "input": ["a", "b"]});
        body.as_object_mut().unwrap().extend(extra.clone());
        let parsed: EmbeddingRequest = serde_json::from_value(body.clone()).unwrap();
        prop_assert_eq!(serde_json::to_value(&parsed).unwrap(), body);
    }

    #[test]
    fn chunk_keeps_unknown_fields_in_nested_objects(extra in arb_extra()) {
        let mut delta = json!({"content": "x"});
        delta.as_object_mut().unwrap().extend(extra.clone());
        let body = json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": null}],
        });
        let parsed: ChatCompletionChunk = serde_json::from_value(body.clone()).unwrap();
        prop_assert_eq!(serde_json::to_value(&parsed).unwrap(), body);
    }
}
