//! `openai-router check --probe`: each endpoint alone, a one-token request per model it serves.

use std::time::Duration;

use crate::config::Config;
use crate::console::say;
use crate::problem::Problem;

/// Sends each endpoint, alone, a one-token request for each model it serves (an embeddings
/// request for models named like embeddings), and prints what happened. `true` when all
/// answered.
pub(crate) async fn probe(config: &Config) -> Result<bool, Problem> {
    use router_facade::types::{ChatCompletionRequest, ChatMessage, EmbeddingRequest};
    let mut all_ok = true;
    for endpoint in &config.endpoints {
        let alone = Config {
            endpoints: vec![endpoint.clone()],
            keys: Vec::new(),
            ..config.clone()
        };
        let router = alone
            .builder()?
            .max_attempts(1)
            .request_timeout(Duration::from_secs(30))
            .build()?;
        for model in router.models() {
            let started = std::time::Instant::now();
            let result = if model.contains("embedding") {
                router
                    .embeddings(&EmbeddingRequest::new(&model, "probe"))
                    .await
                    .map(|_| ())
            } else {
                let mut request =
                    ChatCompletionRequest::new(&model, vec![ChatMessage::user("Say ok")]);
                request.max_tokens = Some(1);
                match router.chat(&request).await {
                    // A reasoning model refuses `max_tokens`: the form it takes.
                    Err(e) if refuses(&e, "max_tokens") => {
                        request.max_tokens = None;
                        request.max_completion_tokens = Some(1);
                        router.chat(&request).await.map(|_| ())
                    }
                    result => result.map(|_| ()),
                }
            };
            let line = match result {
                Ok(()) => format!(
                    "  {} / {model}: ok in {} ms",
                    endpoint.name,
                    started.elapsed().as_millis()
                ),
                Err(e) => {
                    all_ok = false;
                    format!("  {} / {model}: FAILED ({}): {e}", endpoint.name, e.kind())
                }
            };
            say(&line);
        }
    }
    Ok(all_ok)
}

/// Whether the upstream refused `param` of the request (400 naming it).
fn refuses(error: &router_facade::Error, param: &str) -> bool {
    error.status() == Some(400)
        && error
            .body()
            .is_some_and(|body| body.param.as_deref() == Some(param))
}
