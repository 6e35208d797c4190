//! Token estimates before sending, for quota reservations.
//!
//! Prompt tokens are counted with the model family's tokenizer (tiktoken's `o200k_base` for
//! gpt-4o, gpt-4.1, gpt-5 and the o-series; `cl100k_base` for gpt-4, gpt-3.5 and the
//! text-embedding models; `o200k_base` for names it does not know), plus the chat format's
//! overhead: 3 tokens a message, 1 more for a `name`, 3 to prime the reply. The output side is
//! the request's cap (`max_completion_tokens`, else `max_tokens`, else the configured expected
//! completion) times `n`. Azure charges the same kind of estimate at admission.
//!
//! Without the `tokenizer` feature, text counts as one token per four characters.

use router_core::Charge;
use router_types::{
    ChatCompletionRequest, CompletionRequest, CreateResponse, EmbeddingRequest, PromptInput,
};

/// Loads the tokenizers in the background, so that the first request that needs an estimate
/// does not wait for them (parsing their vocabularies takes a moment).
pub(crate) fn warm_up() {
    #[cfg(feature = "tokenizer")]
    std::thread::spawn(|| {
        let _ = tiktoken_rs::o200k_base_singleton();
        let _ = tiktoken_rs::cl100k_base_singleton();
    });
}

/// Tokens in `text` for `model`.
pub(crate) fn text_tokens(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    #[cfg(feature = "tokenizer")]
    {
        tokenizer(model).encode_ordinary(text).len() as u64
    }
    #[cfg(not(feature = "tokenizer"))]
    {
        let _ = model;
        (text.chars().count() as u64).div_ceil(4)
    }
}

#[cfg(feature = "tokenizer")]
fn tokenizer(model: &str) -> &'static tiktoken_rs::CoreBPE {
    let model = model.strip_prefix("ft:").unwrap_or(model);
    let cl100k = [
        "gpt-4",
        "gpt-3.5",
        "gpt-35",
        "text-embedding-",
        "davinci-002",
        "babbage-002",
    ];
    let is_cl100k = cl100k.iter().any(|prefix| model.starts_with(prefix))
        && !model.starts_with("gpt-4o")
        && !model.starts_with("gpt-4.1")
        && !model.starts_with("gpt-4.5");
    if is_cl100k {
        tiktoken_rs::cl100k_base_singleton()
    } else {
        tiktoken_rs::o200k_base_singleton()
    }
}

fn prompt_tokens(model: &str, input: &PromptInput) -> u64 {
    match input {
        PromptInput::Text(text) => text_tokens(model, text),
        PromptInput::Texts(texts) => texts.iter().map(|t| text_tokens(model, t)).sum(),
        PromptInput::Tokens(tokens) => tokens.len() as u64,
        PromptInput::TokenArrays(arrays) => arrays.iter().map(|a| a.len() as u64).sum(),
    }
}

/// A chat request's prompt tokens, format overhead included.
pub(crate) fn chat_prompt(request: &ChatCompletionRequest) -> u64 {
    let model = request.model.as_str();
    let per_message: u64 = request
        .messages
        .iter()
        .map(|m| {
            3 + text_tokens(model, &m.text())
                + m.name.as_ref().map_or(0, |n| 1 + text_tokens(model, n))
        })
        .sum();
    per_message + 3
}

/// A request's reservation, and how much of it is for output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Estimate {
    /// What is reserved: prompt plus output.
    pub(crate) charge: Charge,
    /// The output part: the cap times the choices.
    pub(crate) output: u64,
    /// The prompt as the router counted it, before [`scaled`](Self::scaled).
    pub(crate) counted_prompt: u64,
}

impl Estimate {
    pub(crate) fn new(prompt: u64, output: u64) -> Self {
        Self {
            charge: Charge {
                tokens: prompt + output,
                requests: 1,
            },
            output,
            counted_prompt: prompt,
        }
    }

    /// The estimate with its prompt counted the way a deployment's upstream counts prompts:
    /// the router's count times `ratio` (what the upstream reported using, over the router's
    /// count, learned per deployment), rounded up.
    pub(crate) fn scaled(self, ratio: f64) -> Self {
        if (ratio - 1.0).abs() < 1e-6 || !ratio.is_finite() {
            return self;
        }
        let prompt = (self.counted_prompt as f64 * ratio).ceil() as u64;
        Self {
            charge: Charge {
                tokens: prompt + self.output,
                requests: self.charge.requests,
            },
            ..self
        }
    }
}

/// The reservation of a chat request.
pub(crate) fn chat(request: &ChatCompletionRequest, expected_completion: u32) -> Estimate {
    let output = u64::from(request.output_cap().unwrap_or(expected_completion))
        * u64::from(request.n.unwrap_or(1).max(1));
    Estimate::new(chat_prompt(request), output)
}

/// The reservation of an embeddings request.
pub(crate) fn embeddings(request: &EmbeddingRequest) -> Estimate {
    Estimate::new(prompt_tokens(&request.model, &request.input), 0)
}

/// The reservation of a legacy completion.
pub(crate) fn completions(request: &CompletionRequest, expected_completion: u32) -> Estimate {
    let prompt = request
        .prompt
        .as_ref()
        .map_or(0, |p| prompt_tokens(&request.model, p));
    let choices = u64::from(request.best_of.or(request.n).unwrap_or(1).max(1));
    let cap = u64::from(request.max_tokens.unwrap_or(expected_completion.min(16)));
    Estimate::new(prompt, cap * choices)
}

/// The reservation of a response (the Responses API): the text of its input items and
/// instructions, a few tokens of format per item, and the output cap (or `expected_output`).
pub(crate) fn responses(request: &CreateResponse, expected_output: u32) -> Estimate {
    fn text(value: &serde_json::Value, out: &mut String) -> usize {
        match value {
            serde_json::Value::String(s) => {
                out.push_str(s);
                out.push(' ');
                1
            }
            serde_json::Value::Array(items) => items.iter().map(|item| text(item, out)).sum(),
            serde_json::Value::Object(fields) => {
                // Text fields of items and parts; not their `type`, `role` or ids.
                for key in ["content", "text", "output", "arguments"] {
                    if let Some(value) = fields.get(key) {
                        text(value, out);
                    }
                }
                1
            }
            _ => 0,
        }
    }
    let mut all = String::new();
    let items = request
        .input
        .as_ref()
        .map_or(0, |input| text(input, &mut all));
    if let Some(instructions) = request.extra.get("instructions").and_then(|i| i.as_str()) {
        all.push_str(instructions);
    }
    let prompt = text_tokens(&request.model, &all) + 3 * items as u64 + 3;
    let output = request.max_output_tokens.unwrap_or(expected_output);
    Estimate::new(prompt, u64::from(output))
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_types::ChatMessage;

    #[test]
    fn chat_overhead_and_output_cap() {
        let mut request = ChatCompletionRequest::new(
            "gpt-4o-mini",
            vec![
                ChatMessage::system("You are helpful."),
                ChatMessage::user("Hello!"),
            ],
        );
        let prompt = chat_prompt(&request);
        // Two messages of 3 + their text, and 3 to prime the reply.
        let text =
            text_tokens("gpt-4o-mini", "You are helpful.") + text_tokens("gpt-4o-mini", "Hello!");
        assert_eq!(prompt, 3 * 2 + 3 + text);
        request.max_completion_tokens = Some(100);
        request.n = Some(2);
        assert_eq!(chat(&request, 256).charge.tokens, prompt + 200);
        assert_eq!(chat(&request, 256).output, 200);
        request.max_completion_tokens = None;
        request.n = None;
        assert_eq!(
            chat(&request, 256).charge.tokens,
            prompt + 256,
            "the expected completion"
        );
    }

    #[cfg(feature = "tokenizer")]
    #[test]
    fn the_right_tokenizer_per_family() {
        // "hello world" is two tokens in both; a long number splits differently.
        assert_eq!(text_tokens("gpt-4o", "hello world"), 2);
        assert_eq!(text_tokens("gpt-35-turbo", "hello world"), 2);
        let number = "1234567890123456789";
        assert_ne!(text_tokens("gpt-4", number), 0);
        assert!(std::ptr::eq(
            tokenizer("gpt-4-turbo"),
            tiktoken_rs::cl100k_base_singleton()
        ));
        assert!(std::ptr::eq(
            tokenizer("gpt-4o-mini"),
            tiktoken_rs::o200k_base_singleton()
        ));
        assert!(std::ptr::eq(
            tokenizer("text-embedding-3-small"),
            tiktoken_rs::cl100k_base_singleton()
        ));
        assert!(std::ptr::eq(
            tokenizer("my-deployment"),
            tiktoken_rs::o200k_base_singleton()
        ));
    }

    #[test]
    fn embeddings_count_every_input() {
        let request =
            EmbeddingRequest::new("text-embedding-3-small", PromptInput::Tokens(vec![1, 2, 3]));
        assert_eq!(embeddings(&request).charge.tokens, 3);
    }
}
