//! Your own upstream behind the router: implement `Backend`, add it with `Endpoint::custom`.
//!
//! Here an in-process "cache" backend answers known prompts at once and fails the rest with a
//! retryable error, so the router falls over to a (simulated) OpenAI endpoint.
//!
//! `cargo run -p router-facade --example custom_backend`

#![expect(clippy::print_stdout, reason = "an example shows its results")]

use std::sync::Arc;

use async_trait::async_trait;
use router_facade::types::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, CompletionRequest,
    CompletionResponse, EmbeddingRequest, EmbeddingResponse, FinishReason,
};
use router_facade::{
    Backend, CallOptions, ChatStream, Endpoint, EndpointId, Error, ErrorKind, Reply, ResponseMeta,
    Router, StrategyKind,
};
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

#[derive(Debug)]
struct Cache {
    id: EndpointId,
}

#[async_trait]
impl Backend for Cache {
    fn endpoint(&self) -> &EndpointId {
        &self.id
    }

    async fn chat(
        &self,
        request: &ChatCompletionRequest,
        _: &CallOptions,
    ) -> Result<Reply<ChatCompletionResponse>, Error> {
        let prompt = request
            .messages
            .last()
            .map(ChatMessage::text)
            .unwrap_or_default();
        if prompt != "What is 2 + 2?" {
            // Retryable, and with no health effect: the router simply tries the next endpoint.
            return Err(Error::unsupported(
                self.id.clone(),
                "prompts not in the cache",
            ));
        }
        let choice = ChatChoice {
            index: 0,
            message: ChatMessage::assistant("4"),
            finish_reason: Some(FinishReason::Stop),
            logprobs: None,
            content_filter_results: None,
            extra: router_facade::types::Extra::default(),
        };
        let body = ChatCompletionResponse {
            id: "cache-1".into(),
            choices: vec![choice],
            ..Default::default()
        };
        Ok(Reply::new(body, ResponseMeta::new(200)))
    }

    async fn chat_stream(
        &self,
        _: &ChatCompletionRequest,
        _: &CallOptions,
    ) -> Result<ChatStream, Error> {
        Err(Error::unsupported(self.id.clone(), "streaming"))
    }

    async fn embeddings(
        &self,
        _: &EmbeddingRequest,
        _: &CallOptions,
    ) -> Result<Reply<EmbeddingResponse>, Error> {
        Err(Error::unsupported(self.id.clone(), "embeddings"))
    }

    async fn completions(
        &self,
        _: &CompletionRequest,
        _: &CallOptions,
    ) -> Result<Reply<CompletionResponse>, Error> {
        Err(Error::unsupported(self.id.clone(), "completions"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sim = Sim::start(
        1,
        [EndpointConfig::new("openai", SimDialect::OpenAi)
            .with_api_key("openai-key")
            .with_latency(LatencyModel::instant())],
    )
    .await?;
    let router = Router::builder()
        // Tier 0: the cache; tier 1: the real endpoint, used only when the cache cannot answer.
        .endpoint(
            Endpoint::custom(
                "cache",
                Arc::new(Cache {
                    id: EndpointId::new("cache"),
                }),
            )
            .model("gpt-4o-mini"),
        )
        .endpoint(
            Endpoint::openai("openai", sim.endpoints()[0].openai_base_url())
                .api_key("openai-key")
                .model("gpt-4o-mini")
                .priority(1),
        )
        .strategy(StrategyKind::RoundRobin)
        .build()?;

    let cached = router
        .chat(&ChatCompletionRequest::new(
            "gpt-4o-mini",
            vec![ChatMessage::user("What is 2 + 2?")],
        ))
        .await?;
    println!(
        "{} answered {:?} in {} attempt(s)",
        cached.endpoint,
        cached.choices[0].message.text(),
        cached.attempts
    );
    assert_eq!(cached.endpoint.as_str(), "cache");

    let other = router
        .chat(&ChatCompletionRequest::new(
            "gpt-4o-mini",
            vec![ChatMessage::user("Tell me a story")],
        ))
        .await?;
    println!(
        "{} answered in {} attempt(s)",
        other.endpoint, other.attempts
    );
    assert_eq!((other.endpoint.as_str(), other.attempts), ("openai", 2));

    let stats = router.stats();
    assert_eq!(stats[0].state.failures, vec![(ErrorKind::Unsupported, 1)]);
    Ok(())
}
