//! Azure OpenAI as a dialect of the OpenAI wire protocol.
//!
//! Azure serves the OpenAI API in two URL forms:
//!
//! - **deployments**: `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=…`
//!   (also `/embeddings` and `/completions`), where the URL names the deployment and an
//!   `api-version` is required;
//! - **v1**: `{endpoint}/openai/v1/chat/completions`, where the body's `model` is the
//!   deployment name and `api-version` is optional.
//!
//! Requests authenticate with an `api-key` header, or with `Authorization: Bearer <token>` from a
//! [`TokenProvider`] (Microsoft Entra ID, scope `https://cognitiveservices.azure.com/.default`).
//! OpenAI's `OpenAI-Organization` and `OpenAI-Project` headers are never sent to Azure.
//!
//! Everything else (JSON, SSE, errors, rate-limit headers, timeouts) is `backend-openai`'s.
//!
//! # Examples
//!
//! ```no_run
//! use backend_azure::AzureBackend;
//! use router_core::{Backend, CallOptions};
//! use router_types::{ChatCompletionRequest, ChatMessage};
//!
//! # async fn run() -> Result<(), router_core::Error> {
//! let backend = AzureBackend::builder("azure-east", "https://my-resource.openai.azure.com")
//!     .api_version("2024-10-21")
//!     .api_key(std::env::var("AZURE_OPENAI_API_KEY").unwrap_or_default())
//!     .build()?;
//! // `model` is the deployment name on this resource.
//! let request = ChatCompletionRequest::new("gpt-4o-mini-east", vec![ChatMessage::user("Hi!")]);
//! let reply = backend.chat(&request, &CallOptions::default()).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use backend_openai::{
    Credential, Dialect, HttpClient, OpenAiBackend, Operation, Timeouts, base_url_with_slash,
};
use http::{HeaderMap, HeaderName};
use router_core::{
    Backend, CallOptions, ChatStream, CompletionStream, EndpointId, Error, ErrorKind, Reply,
    ResponseStream, StoredCall,
};
use router_types::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    CreateResponse, EmbeddingRequest, EmbeddingResponse, Response,
};
use secrecy::SecretString;
use url::Url;

pub use backend_openai::{StaticToken, TokenProvider};

#[cfg(feature = "entra-id")]
mod entra;
#[cfg(feature = "entra-id")]
pub use entra::{COGNITIVE_SERVICES_SCOPE, EntraId, EntraOptions, MAX_REFRESH_AHEAD};

/// Which of Azure's URL forms an endpoint uses.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AzureApi {
    /// `/openai/deployments/{deployment}/…?api-version=…`.
    Deployments {
        /// The dated API version, such as `2024-10-21` or `2025-04-01-preview`.
        api_version: String,
    },
    /// `/openai/v1/…`, with the deployment as the body's `model`.
    V1 {
        /// `preview` for preview features; none for GA.
        api_version: Option<String>,
    },
}

impl AzureApi {
    /// Whether streamed chat accepts `stream_options` (for the usage chunk): the v1 form does,
    /// and the dated versions from `2024-09-01-preview` (GA `2024-10-21`); older ones refuse it.
    pub fn accepts_stream_options(&self) -> bool {
        match self {
            Self::Deployments { api_version } => api_version
                .get(..10)
                .is_some_and(|date| date >= "2024-09-01"),
            Self::V1 { .. } => true,
        }
    }
}

/// Azure's URLs and headers.
#[derive(Debug, Clone)]
pub struct AzureDialect {
    resource: Url,
    api: AzureApi,
    headers: HeaderMap,
}

impl AzureDialect {
    /// The dialect for the resource `endpoint` (`https://{resource}.openai.azure.com`; a
    /// trailing `/openai` or `/openai/v1` is accepted and removed).
    ///
    /// # Errors
    ///
    /// A [`Config`](ErrorKind::Config) error when the URL is not an http(s) URL, or the
    /// deployments form has an empty `api_version`.
    pub fn new(endpoint: &str, api: AzureApi) -> Result<Self, Error> {
        let mut resource = base_url_with_slash(endpoint, "endpoint")?;
        for suffix in ["openai/v1/", "openai/"] {
            if let Some(stripped) = resource.path().strip_suffix(suffix) {
                let stripped = stripped.to_owned();
                resource.set_path(&stripped);
                break;
            }
        }
        if let AzureApi::Deployments { api_version } = &api
            && api_version.trim().is_empty()
        {
            return Err(Error::config(
                "api_version: required for the deployments URL form (for example 2024-10-21)",
            ));
        }
        Ok(Self {
            resource,
            api,
            headers: HeaderMap::new(),
        })
    }

    /// The URL form.
    pub fn api(&self) -> &AzureApi {
        &self.api
    }
}

impl Dialect for AzureDialect {
    fn url(&self, operation: Operation, model: &str) -> Result<Url, Error> {
        let bad = |e: url::ParseError| Error::config(format!("endpoint: cannot build a URL: {e}"));
        match &self.api {
            AzureApi::Deployments { api_version } if operation == Operation::Responses => {
                // The Responses API is not under a deployment: the body's `model` names it.
                let mut url = self.resource.join("openai/responses").map_err(bad)?;
                url.query_pairs_mut()
                    .append_pair("api-version", api_version);
                Ok(url)
            }
            AzureApi::Deployments { api_version } => {
                if model.is_empty() {
                    return Err(Error::with_message(
                        ErrorKind::InvalidRequest,
                        "model: empty; on Azure it names the deployment",
                    ));
                }
                let mut url = self.resource.join("openai/deployments/").map_err(bad)?;
                url.path_segments_mut()
                    .map_err(|()| Error::config("endpoint: cannot have a path"))?
                    .pop_if_empty()
                    .push(model)
                    .extend(operation.path().split('/'));
                url.query_pairs_mut()
                    .append_pair("api-version", api_version);
                Ok(url)
            }
            AzureApi::V1 { api_version } => {
                let mut url = self
                    .resource
                    .join("openai/v1/")
                    .map_err(bad)?
                    .join(operation.path())
                    .map_err(bad)?;
                if let Some(version) = api_version {
                    url.query_pairs_mut().append_pair("api-version", version);
                }
                Ok(url)
            }
        }
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn spills_over(&self) -> bool {
        true
    }
}

/// An Azure OpenAI endpoint.
#[derive(Clone)]
pub struct AzureBackend {
    inner: OpenAiBackend,
}

impl AzureBackend {
    /// A builder for the endpoint `name` on the Azure resource at `endpoint`.
    pub fn builder(name: impl AsRef<str>, endpoint: impl Into<String>) -> AzureBackendBuilder {
        AzureBackendBuilder {
            name: EndpointId::new(name),
            endpoint: endpoint.into(),
            api: None,
            credential: Credential::None,
            timeouts: Timeouts::default(),
            max_answer: backend_openai::DEFAULT_MAX_ANSWER_BYTES,
            client: None,
        }
    }
}

impl fmt::Debug for AzureBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AzureBackend").field(&self.inner).finish()
    }
}

#[async_trait]
impl Backend for AzureBackend {
    fn endpoint(&self) -> &EndpointId {
        self.inner.endpoint()
    }

    async fn chat(
        &self,
        request: &ChatCompletionRequest,
        options: &CallOptions,
    ) -> Result<Reply<ChatCompletionResponse>, Error> {
        self.inner.chat(request, options).await
    }

    async fn chat_stream(
        &self,
        request: &ChatCompletionRequest,
        options: &CallOptions,
    ) -> Result<ChatStream, Error> {
        self.inner.chat_stream(request, options).await
    }

    async fn embeddings(
        &self,
        request: &EmbeddingRequest,
        options: &CallOptions,
    ) -> Result<Reply<EmbeddingResponse>, Error> {
        self.inner.embeddings(request, options).await
    }

    async fn completions(
        &self,
        request: &CompletionRequest,
        options: &CallOptions,
    ) -> Result<Reply<CompletionResponse>, Error> {
        self.inner.completions(request, options).await
    }

    async fn completions_stream(
        &self,
        request: &CompletionRequest,
        options: &CallOptions,
    ) -> Result<CompletionStream, Error> {
        self.inner.completions_stream(request, options).await
    }

    async fn responses(
        &self,
        request: &CreateResponse,
        options: &CallOptions,
    ) -> Result<Reply<Response>, Error> {
        self.inner.responses(request, options).await
    }

    async fn responses_stream(
        &self,
        request: &CreateResponse,
        options: &CallOptions,
    ) -> Result<ResponseStream, Error> {
        self.inner.responses_stream(request, options).await
    }

    async fn stored_response(
        &self,
        model: &str,
        id: &str,
        call: StoredCall,
        options: &CallOptions,
    ) -> Result<Reply<serde_json::Value>, Error> {
        self.inner.stored_response(model, id, call, options).await
    }
}

/// Builds an [`AzureBackend`]; `build()` checks everything once.
#[must_use]
pub struct AzureBackendBuilder {
    name: EndpointId,
    endpoint: String,
    api: Option<AzureApi>,
    credential: Credential,
    timeouts: Timeouts,
    max_answer: usize,
    client: Option<HttpClient>,
}

impl AzureBackendBuilder {
    /// Uses the deployments URL form with this dated API version (`2024-10-21`).
    pub fn api_version(mut self, api_version: impl Into<String>) -> Self {
        self.api = Some(AzureApi::Deployments {
            api_version: api_version.into(),
        });
        self
    }

    /// Uses the `/openai/v1` URL form (GA, no api-version).
    pub fn v1(mut self) -> Self {
        self.api = Some(AzureApi::V1 { api_version: None });
        self
    }

    /// Uses this URL form.
    pub fn api(mut self, api: AzureApi) -> Self {
        self.api = Some(api);
        self
    }

    /// Authenticates with `api-key: <key>`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.credential = Credential::Header(
            HeaderName::from_static("api-key"),
            SecretString::from(key.into()),
        );
        self
    }

    /// Authenticates with `Authorization: Bearer <token>` from `provider` (Entra ID).
    pub fn token_provider(mut self, provider: Arc<dyn TokenProvider>) -> Self {
        self.credential = Credential::TokenProvider(provider);
        self
    }

    /// Sets the timeouts.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The largest non-streamed answer body it reads (`OpenAiBackendBuilder::max_answer_bytes`).
    pub fn max_answer_bytes(mut self, bytes: usize) -> Self {
        self.max_answer = bytes;
        self
    }

    /// Shares a connection pool with other backends.
    pub fn http_client(mut self, client: HttpClient) -> Self {
        self.client = Some(client);
        self
    }

    /// Checks the settings and builds the backend.
    ///
    /// # Errors
    ///
    /// A [`Config`](ErrorKind::Config) error naming the endpoint and the field: no URL form
    /// chosen, an invalid endpoint URL, an empty api-version, or no credential.
    pub fn build(self) -> Result<AzureBackend, Error> {
        let name = self.name;
        let context = |e: Error| e.in_context(format!("endpoint `{name}`"));
        let api = self.api.ok_or_else(|| {
            context(Error::config(
                "api_version: choose the deployments form with an api-version, or the v1 form",
            ))
        })?;
        if matches!(self.credential, Credential::None) {
            return Err(context(Error::config(
                "credential: Azure needs an api key or a token provider",
            )));
        }
        let dialect = AzureDialect::new(&self.endpoint, api).map_err(context)?;
        let mut builder = OpenAiBackend::with_dialect(name.as_str(), Box::new(dialect))
            .credential(self.credential)
            .timeouts(self.timeouts)
            .max_answer_bytes(self.max_answer);
        if let Some(client) = self.client {
            builder = builder.http_client(client);
        }
        Ok(AzureBackend {
            inner: builder.build()?,
        })
    }
}

impl fmt::Debug for AzureBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureBackendBuilder")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("api", &self.api)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployments() -> AzureApi {
        AzureApi::Deployments {
            api_version: "2024-10-21".into(),
        }
    }

    #[test]
    fn deployment_urls() {
        for endpoint in [
            "https://res.openai.azure.com",
            "https://res.openai.azure.com/",
            "https://res.openai.azure.com/openai",
            "https://res.openai.azure.com/openai/v1/",
        ] {
            let dialect = AzureDialect::new(endpoint, deployments()).unwrap();
            assert_eq!(
                dialect
                    .url(Operation::Chat, "gpt-4o mini")
                    .unwrap()
                    .as_str(),
                "https://res.openai.azure.com/openai/deployments/gpt-4o%20mini/chat/completions?api-version=2024-10-21",
                "{endpoint}"
            );
        }
        let dialect = AzureDialect::new("https://res.openai.azure.com", deployments()).unwrap();
        assert_eq!(
            dialect.url(Operation::Embeddings, "emb").unwrap().as_str(),
            "https://res.openai.azure.com/openai/deployments/emb/embeddings?api-version=2024-10-21"
        );
        assert!(dialect.url(Operation::Chat, "").is_err());
    }

    #[test]
    fn v1_urls() {
        let dialect = AzureDialect::new(
            "https://res.openai.azure.com",
            AzureApi::V1 { api_version: None },
        )
        .unwrap();
        assert_eq!(
            dialect.url(Operation::Chat, "dep").unwrap().as_str(),
            "https://res.openai.azure.com/openai/v1/chat/completions"
        );
        let preview = AzureDialect::new(
            "https://res.openai.azure.com",
            AzureApi::V1 {
                api_version: Some("preview".into()),
            },
        )
        .unwrap();
        assert_eq!(
            preview.url(Operation::Completions, "dep").unwrap().as_str(),
            "https://res.openai.azure.com/openai/v1/completions?api-version=preview"
        );
    }

    #[test]
    fn build_errors_name_endpoint_and_field() {
        let no_form = AzureBackend::builder("east", "https://r.openai.azure.com")
            .api_key("k")
            .build();
        assert!(
            no_form
                .unwrap_err()
                .to_string()
                .contains("invalid configuration: endpoint `east`: api_version")
        );
        let no_key = AzureBackend::builder("east", "https://r.openai.azure.com")
            .v1()
            .build();
        assert!(no_key.unwrap_err().to_string().contains("credential"));
        let empty_version = AzureBackend::builder("east", "https://r.openai.azure.com")
            .api_version(" ")
            .api_key("k")
            .build();
        assert!(
            empty_version
                .unwrap_err()
                .to_string()
                .contains("api_version")
        );
    }

    #[test]
    fn debug_hides_the_key() {
        let backend = AzureBackend::builder("east", "https://r.openai.azure.com")
            .v1()
            .api_key("az-secret-key")
            .build()
            .unwrap();
        let shown = format!("{backend:?}");
        assert!(!shown.contains("az-secret-key"), "{shown}");
    }
}
