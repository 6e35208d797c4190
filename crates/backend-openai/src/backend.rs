//! The backend: one endpoint, any dialect of the OpenAI wire.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use router_core::{
    Backend, CallOptions, ChatStream, CompletionStream, EndpointId, Error, ErrorKind, EventStream,
    RateLimitInfo, Reply, ResponseMeta, ResponseStream, StoredCall,
};
use router_types::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    CreateResponse, EmbeddingRequest, EmbeddingResponse, ErrorBody, ErrorResponse, Response,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::client::{HttpClient, Timeouts};
use crate::credential::Credential;
use crate::dialect::{Dialect, OpenAiDialect, Operation};
use crate::scrub::Scrubber;
use crate::sse;

/// How much of a non-JSON error body (an HTML page from a proxy, say) goes into the message.
const MAX_ERROR_TEXT: usize = 512;

/// One endpoint speaking the OpenAI wire protocol in some [`Dialect`].
///
/// Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct OpenAiBackend {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: EndpointId,
    client: reqwest::Client,
    dialect: Box<dyn Dialect>,
    credential: Credential,
    timeouts: Timeouts,
    /// The largest non-streamed answer body read.
    max_answer: usize,
    scrubber: Scrubber,
}

/// The largest non-streamed answer body read by default: 64 MiB (an embeddings answer for a
/// large batch runs to tens of megabytes).
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

impl OpenAiBackend {
    /// A builder for the endpoint `name` (used in errors, logs and metrics) serving the OpenAI
    /// API under `base_url` (for example `https://api.openai.com/v1`).
    pub fn builder(name: impl AsRef<str>, base_url: impl Into<String>) -> OpenAiBackendBuilder {
        OpenAiBackendBuilder {
            endpoint: EndpointId::new(name),
            base_url: Some(base_url.into()),
            dialect: None,
            credential: Credential::None,
            organization: None,
            project: None,
            timeouts: Timeouts::default(),
            max_answer: DEFAULT_MAX_ANSWER_BYTES,
            client: None,
        }
    }

    /// A builder for an endpoint in another dialect (`backend-azure` uses this).
    pub fn with_dialect(name: impl AsRef<str>, dialect: Box<dyn Dialect>) -> OpenAiBackendBuilder {
        OpenAiBackendBuilder {
            dialect: Some(dialect),
            base_url: None,
            ..Self::builder(name, String::new())
        }
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> Timeouts {
        self.inner.timeouts
    }

    async fn send<B: Serialize + Sync>(
        &self,
        operation: Operation,
        model: &str,
        body: &B,
        stream: bool,
        options: &CallOptions,
    ) -> Result<(reqwest::Response, Instant, ResponseMeta), Error> {
        let inner = &*self.inner;
        let url = inner.dialect.url(operation, model)?;
        let payload = serde_json::to_vec(body).map_err(|e| {
            Error::with_message(ErrorKind::InvalidRequest, format!("cannot serialize: {e}"))
                .with_endpoint(inner.endpoint.clone())
        })?;
        let request = inner
            .client
            .post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(payload);
        // Azure does not spill the Responses API over.
        let spill = operation != Operation::Responses;
        self.exchange(request, stream, spill, options).await
    }

    /// Sends `request` with the dialect's headers, the spillover deployment when `spill` and
    /// the dialect spills over, and the credential, and reads the answer's headers: its
    /// status, rate limits and identity, or the upstream's error.
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        stream: bool,
        spill: bool,
        options: &CallOptions,
    ) -> Result<(reqwest::Response, Instant, ResponseMeta), Error> {
        let inner = &*self.inner;
        let mut headers = inner.dialect.headers().clone();
        if let Some(deployment) = options.spillover_deployment.as_ref().filter(|_| spill)
            && inner.dialect.spills_over()
        {
            let value = HeaderValue::from_str(deployment).map_err(|_| {
                Error::with_message(
                    ErrorKind::InvalidRequest,
                    format!("spillover_deployment: `{deployment}` is not a valid header value"),
                )
            })?;
            headers.insert("x-ms-spillover-deployment", value);
        }
        // The caller's trace, continued: the attempt's own span id under the caller's trace.
        if let Some((trace, state)) = &options.trace {
            if let Ok(value) = HeaderValue::from_str(&trace.to_string()) {
                headers.insert("traceparent", value);
            }
            if let Some(value) = state.as_deref().and_then(|s| HeaderValue::from_str(s).ok()) {
                headers.insert("tracestate", value);
            }
        }
        self.authenticate(&mut headers).await?;

        let deadline = options.deadline.map(Instant::from_std);
        let first_byte = if stream {
            inner.timeouts.first_byte_stream
        } else {
            inner.timeouts.first_byte
        };
        let wait = bounded(first_byte, deadline);
        let sent_at = Instant::now();
        let request = request.headers(headers).send();
        let response = match tokio::time::timeout(wait, request).await {
            Err(_) => {
                return Err(Error::transport(
                    ErrorKind::Timeout,
                    inner.endpoint.clone(),
                    format!("no answer headers within {:.3}s", wait.as_secs_f64()),
                    None,
                ));
            }
            Ok(Err(e)) => return Err(self.map_transport(e)),
            Ok(Ok(response)) => response,
        };
        let time_to_headers = sent_at.elapsed();
        let status = response.status().as_u16();
        let rate_limits = RateLimitInfo::from_headers(
            response
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
            SystemTime::now(),
        );
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let mut meta = ResponseMeta::new(status);
        meta.rate_limits = rate_limits;
        meta.request_id = header("x-request-id").or_else(|| header("apim-request-id"));
        meta.region = header("x-ms-region");
        meta.model_session = header("azureml-model-session");
        meta.spilled_from = response.headers().keys().find_map(|name| {
            name.as_str()
                .strip_prefix("x-ms-spillover-from-")
                .map(str::to_owned)
        });
        meta.time_to_headers = time_to_headers;

        if !response.status().is_success() {
            let spilled = meta.spilled_from.is_some()
                || response.headers().contains_key("x-ms-spillover-error");
            let body = self.read_body(response, deadline).await.unwrap_or_default();
            let error = self.upstream_error(status, &body, &meta.rate_limits);
            return Err(if spilled { error.with_spilled() } else { error });
        }
        Ok((response, sent_at, meta))
    }

    async fn authenticate(&self, headers: &mut HeaderMap) -> Result<(), Error> {
        let (name, value) = match &self.inner.credential {
            Credential::None => return Ok(()),
            Credential::Bearer(key) => (AUTHORIZATION, bearer(key)),
            Credential::Header(name, key) => {
                (name.clone(), HeaderValue::from_str(key.expose_secret()))
            }
            Credential::TokenProvider(provider) => {
                let token = provider
                    .token()
                    .await
                    .map_err(|e| e.with_endpoint(self.inner.endpoint.clone()))?;
                (AUTHORIZATION, bearer(&token))
            }
        };
        let mut value = value.map_err(|_| {
            Error::config(format!(
                "endpoint `{}`: the credential is not a valid header value",
                self.inner.endpoint
            ))
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
        Ok(())
    }

    /// Reads a whole body, allowing `between_chunks` of silence between chunks.
    async fn read_body(
        &self,
        response: reqwest::Response,
        deadline: Option<Instant>,
    ) -> Result<Vec<u8>, Error> {
        let mut body = Vec::new();
        let mut chunks = response.bytes_stream();
        loop {
            let wait = bounded(self.inner.timeouts.between_chunks, deadline);
            match tokio::time::timeout(wait, chunks.next()).await {
                Err(_) => {
                    return Err(Error::transport(
                        ErrorKind::Timeout,
                        self.inner.endpoint.clone(),
                        format!("the body stalled for {:.3}s", wait.as_secs_f64()),
                        None,
                    ));
                }
                Ok(None) => return Ok(body),
                Ok(Some(Err(e))) => return Err(self.map_transport(e)),
                Ok(Some(Ok(chunk))) => {
                    if body.len() + chunk.len() > self.inner.max_answer {
                        return Err(Error::transport(
                            ErrorKind::Decode,
                            self.inner.endpoint.clone(),
                            format!(
                                "the answer is larger than {} bytes (the endpoint's max_answer_bytes)",
                                self.inner.max_answer
                            ),
                            None,
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
            }
        }
    }

    async fn call<B, T>(
        &self,
        operation: Operation,
        model: &str,
        request: &B,
        options: &CallOptions,
    ) -> Result<Reply<T>, Error>
    where
        B: Serialize + Sync,
        T: DeserializeOwned,
    {
        let (response, sent_at, mut meta) =
            self.send(operation, model, request, false, options).await?;
        let deadline = options.deadline.map(Instant::from_std);
        let bytes = self.read_body(response, deadline).await?;
        meta.elapsed = sent_at.elapsed();
        let body = serde_json::from_slice(&bytes).map_err(|e| {
            Error::transport(
                ErrorKind::Decode,
                self.inner.endpoint.clone(),
                format!("the answer is not valid JSON of the expected shape: {e}"),
                None,
            )
        })?;
        Ok(Reply::new(body, meta))
    }

    fn upstream_error(&self, status: u16, body: &[u8], rate_limits: &RateLimitInfo) -> Error {
        let parsed = serde_json::from_slice::<ErrorResponse>(body).map_or_else(
            |_| {
                let text = String::from_utf8_lossy(body);
                let text: String = text.trim().chars().take(MAX_ERROR_TEXT).collect();
                ErrorBody {
                    message: text,
                    ..ErrorBody::default()
                }
            },
            |response| response.error,
        );
        let mut parsed = parsed;
        parsed.message = self.inner.scrubber.scrub(&parsed.message);
        Error::upstream(
            self.inner.endpoint.clone(),
            status,
            Some(parsed),
            rate_limits,
        )
    }

    /// Sends `body` (asking for a stream) and decodes the answer's events as `T`.
    async fn stream<T, B>(
        &self,
        operation: Operation,
        model: &str,
        body: &B,
        options: &CallOptions,
    ) -> Result<EventStream<T>, Error>
    where
        T: router_core::StreamItem + DeserializeOwned + Send + 'static,
        B: Serialize + Sync,
    {
        let (response, sent_at, meta) = self.send(operation, model, body, true, options).await?;
        let events = sse::decode(
            response.bytes_stream(),
            self.inner.endpoint.clone(),
            self.inner.scrubber.clone(),
            self.inner.timeouts.between_chunks,
            options.deadline.map(Instant::from_std),
            self.inner.max_answer,
        );
        Ok(EventStream::with_data(
            events,
            meta,
            sent_at.into_std(),
            || Instant::now().into_std(),
        ))
    }

    fn map_transport(&self, error: reqwest::Error) -> Error {
        let endpoint = self.inner.endpoint.clone();
        let (kind, what) = if error.is_timeout() {
            (ErrorKind::Timeout, "timed out")
        } else if error.is_connect() {
            (ErrorKind::Connect, "cannot connect")
        } else if error.is_decode() {
            (ErrorKind::Decode, "cannot decode the answer")
        } else {
            (ErrorKind::Transport, "the connection broke")
        };
        // reqwest's error names the URL, which holds no secret (keys travel in headers).
        Error::transport(kind, endpoint, what, Some(Box::new(error.without_url())))
    }
}

/// The smaller of `timeout` and the time left until `deadline`.
fn bounded(timeout: Duration, deadline: Option<Instant>) -> Duration {
    deadline.map_or(timeout, |d| {
        timeout.min(d.saturating_duration_since(Instant::now()))
    })
}

fn bearer(secret: &SecretString) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    HeaderValue::from_str(&format!("Bearer {}", secret.expose_secret()))
}

#[async_trait]
impl Backend for OpenAiBackend {
    fn endpoint(&self) -> &EndpointId {
        &self.inner.endpoint
    }

    async fn chat(
        &self,
        request: &ChatCompletionRequest,
        options: &CallOptions,
    ) -> Result<Reply<ChatCompletionResponse>, Error> {
        if request.stream == Some(true) {
            let mut plain = request.clone();
            plain.stream = None;
            plain.stream_options = None;
            return self
                .call(Operation::Chat, &request.model, &plain, options)
                .await;
        }
        self.call(Operation::Chat, &request.model, request, options)
            .await
    }

    async fn chat_stream(
        &self,
        request: &ChatCompletionRequest,
        options: &CallOptions,
    ) -> Result<ChatStream, Error> {
        let streamed;
        let request = if request.stream == Some(true) {
            request
        } else {
            let mut copy = request.clone();
            copy.stream = Some(true);
            streamed = copy;
            &streamed
        };
        self.stream(Operation::Chat, &request.model, request, options)
            .await
    }

    async fn embeddings(
        &self,
        request: &EmbeddingRequest,
        options: &CallOptions,
    ) -> Result<Reply<EmbeddingResponse>, Error> {
        self.call(Operation::Embeddings, &request.model, request, options)
            .await
    }

    async fn completions(
        &self,
        request: &CompletionRequest,
        options: &CallOptions,
    ) -> Result<Reply<CompletionResponse>, Error> {
        if request.stream == Some(true) {
            let mut plain = request.clone();
            plain.stream = None;
            plain.stream_options = None;
            return self
                .call(Operation::Completions, &request.model, &plain, options)
                .await;
        }
        self.call(Operation::Completions, &request.model, request, options)
            .await
    }

    async fn completions_stream(
        &self,
        request: &CompletionRequest,
        options: &CallOptions,
    ) -> Result<CompletionStream, Error> {
        if request.stream == Some(true) {
            return self
                .stream(Operation::Completions, &request.model, request, options)
                .await;
        }
        let mut streamed = request.clone();
        streamed.stream = Some(true);
        self.stream(Operation::Completions, &request.model, &streamed, options)
            .await
    }

    async fn responses(
        &self,
        request: &CreateResponse,
        options: &CallOptions,
    ) -> Result<Reply<Response>, Error> {
        if request.stream == Some(true) {
            let mut plain = request.clone();
            plain.stream = None;
            return self
                .call(Operation::Responses, &request.model, &plain, options)
                .await;
        }
        self.call(Operation::Responses, &request.model, request, options)
            .await
    }

    async fn stored_response(
        &self,
        model: &str,
        id: &str,
        call: StoredCall,
        options: &CallOptions,
    ) -> Result<Reply<serde_json::Value>, Error> {
        let inner = &*self.inner;
        let mut url = inner.dialect.url(Operation::Responses, model)?;
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| Error::config("endpoint: cannot have a path"))?;
            path.pop_if_empty().push(id);
            match call {
                StoredCall::InputItems => {
                    path.push("input_items");
                }
                StoredCall::Cancel => {
                    path.push("cancel");
                }
                _ => {}
            }
        }
        let request = match call {
            StoredCall::Delete => inner.client.delete(url),
            StoredCall::Cancel => inner.client.post(url),
            _ => inner.client.get(url),
        };
        let (response, sent_at, mut meta) = self.exchange(request, false, false, options).await?;
        let bytes = self
            .read_body(response, options.deadline.map(Instant::from_std))
            .await?;
        meta.elapsed = sent_at.elapsed();
        let body = serde_json::from_slice(&bytes).map_err(|e| {
            Error::transport(
                ErrorKind::Decode,
                inner.endpoint.clone(),
                format!("the answer is not JSON: {e}"),
                None,
            )
        })?;
        Ok(Reply::new(body, meta))
    }

    async fn responses_stream(
        &self,
        request: &CreateResponse,
        options: &CallOptions,
    ) -> Result<ResponseStream, Error> {
        if request.stream == Some(true) {
            return self
                .stream(Operation::Responses, &request.model, request, options)
                .await;
        }
        let mut streamed = request.clone();
        streamed.stream = Some(true);
        self.stream(Operation::Responses, &request.model, &streamed, options)
            .await
    }
}

impl fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("endpoint", &self.inner.endpoint)
            .field("dialect", &self.inner.dialect)
            .field("credential", &self.inner.credential)
            .field("timeouts", &self.inner.timeouts)
            .finish_non_exhaustive()
    }
}

/// Builds an [`OpenAiBackend`]; `build()` checks everything once.
#[must_use]
pub struct OpenAiBackendBuilder {
    endpoint: EndpointId,
    base_url: Option<String>,
    dialect: Option<Box<dyn Dialect>>,
    credential: Credential,
    organization: Option<String>,
    project: Option<String>,
    timeouts: Timeouts,
    max_answer: usize,
    client: Option<HttpClient>,
}

impl OpenAiBackendBuilder {
    /// Authenticates with `Authorization: Bearer <key>`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.credential = Credential::Bearer(SecretString::from(key.into()));
        self
    }

    /// Authenticates with `credential`.
    pub fn credential(mut self, credential: Credential) -> Self {
        self.credential = credential;
        self
    }

    /// Sends `OpenAI-Organization` (OpenAI dialect only).
    pub fn organization(mut self, organization: impl Into<String>) -> Self {
        self.organization = Some(organization.into());
        self
    }

    /// Sends `OpenAI-Project` (OpenAI dialect only).
    pub fn project(mut self, project: impl Into<String>) -> Self {
        self.project = Some(project.into());
        self
    }

    /// Sets the timeouts.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The largest non-streamed answer body it reads, and the largest event of a stream
    /// (default [`DEFAULT_MAX_ANSWER_BYTES`]); a larger one is a `Decode` error naming the
    /// limit, read no further.
    pub fn max_answer_bytes(mut self, bytes: usize) -> Self {
        self.max_answer = bytes.max(1);
        self
    }

    /// Shares a connection pool with other backends. Its connect timeout replaces the one in
    /// [`timeouts`](Self::timeouts).
    pub fn http_client(mut self, client: HttpClient) -> Self {
        self.client = Some(client);
        self
    }

    /// Checks the settings and builds the backend.
    ///
    /// # Errors
    ///
    /// A [`Config`](ErrorKind::Config) error naming the endpoint and the field: a base URL that
    /// is not an http(s) URL, an organization or project that is not a header value, an empty
    /// endpoint name, or organization headers given to a dialect other than OpenAI's.
    pub fn build(self) -> Result<OpenAiBackend, Error> {
        let name = self.endpoint.clone();
        let context = |e: Error| e.in_context(format!("endpoint `{name}`"));
        if self.endpoint.as_str().trim().is_empty() {
            return Err(Error::config("endpoint name: must not be empty"));
        }
        let dialect: Box<dyn Dialect> = match (self.dialect, self.base_url) {
            (Some(dialect), _) => {
                if self.organization.is_some() || self.project.is_some() {
                    return Err(context(Error::config(
                        "organization/project: OpenAI headers apply to the OpenAI dialect only",
                    )));
                }
                dialect
            }
            (None, Some(base_url)) => {
                let mut dialect = OpenAiDialect::new(&base_url).map_err(context)?;
                if let Some(organization) = &self.organization {
                    dialect.set_organization(organization).map_err(context)?;
                }
                if let Some(project) = &self.project {
                    dialect.set_project(project).map_err(context)?;
                }
                Box::new(dialect)
            }
            (None, None) => return Err(context(Error::config("base_url: missing"))),
        };
        let client = match self.client {
            Some(client) => client,
            None => HttpClient::new(self.timeouts.connect)?,
        };
        Ok(OpenAiBackend {
            inner: Arc::new(Inner {
                scrubber: Scrubber::new(self.credential.fixed_secret()),
                endpoint: self.endpoint,
                client: client.inner,
                dialect,
                credential: self.credential,
                timeouts: self.timeouts,
                max_answer: self.max_answer,
            }),
        })
    }
}

impl fmt::Debug for OpenAiBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackendBuilder")
            .field("endpoint", &self.endpoint)
            .field("base_url", &self.base_url)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}
