//! Shared pieces of the benchmarks: an in-process backend that answers at once, so that what
//! is measured is the router and nothing else.

use async_trait::async_trait;
use router_core::{Backend, CallOptions, ChatStream, EndpointId, Error, Reply, ResponseMeta};
use router_types::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, CompletionRequest,
    CompletionResponse, EmbeddingRequest, EmbeddingResponse, Extra, FinishReason,
};

/// A backend that answers every chat request at once with a fixed response.
#[derive(Debug)]
pub struct Instant {
    id: EndpointId,
    answer: ChatCompletionResponse,
}

impl Instant {
    /// A backend named `name`.
    pub fn new(name: &str) -> Self {
        let choice = ChatChoice {
            index: 0,
            message: ChatMessage::assistant("ok"),
            finish_reason: Some(FinishReason::Stop),
            logprobs: None,
            content_filter_results: None,
            extra: Extra::new(),
        };
        Self {
            id: EndpointId::new(name),
            answer: ChatCompletionResponse {
                id: "bench".into(),
                choices: vec![choice],
                ..ChatCompletionResponse::default()
            },
        }
    }
}

#[async_trait]
impl Backend for Instant {
    fn endpoint(&self) -> &EndpointId {
        &self.id
    }

    async fn chat(
        &self,
        _: &ChatCompletionRequest,
        _: &CallOptions,
    ) -> Result<Reply<ChatCompletionResponse>, Error> {
        Ok(Reply::new(self.answer.clone(), ResponseMeta::new(200)))
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
