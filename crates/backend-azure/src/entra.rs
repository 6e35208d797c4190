//! Microsoft Entra ID tokens from the official `azure_identity` credentials (feature
//! `entra-id`).
//!
//! [`EntraId`] is a [`TokenProvider`] over any `azure_core` [`TokenCredential`]: a client
//! secret, a managed identity, workload identity (AKS), the Azure CLI, or one the caller built.
//! It keeps the token it was given and refreshes it in the last
//! [`refresh_ahead`](EntraOptions::refresh_ahead) of its life, in the background: requests go
//! on with the token that is still valid while one refresh, and only one, is in flight. Only
//! when no valid token is held do requests wait, for that one refresh. A refresh that fails
//! while the token is still valid is tried again after
//! [`retry_after_failure`](EntraOptions::retry_after_failure), and the token is used until it
//! expires; a token that cannot be had at all is an error naming the credential, the scope and
//! what Entra ID said (never the secret).
//!
//! The authority host (`https://login.microsoftonline.com` unless set) must be `https`, as
//! `azure_identity` requires, except on a loopback address, where `http` is allowed for local
//! token endpoints and tests.
//!
//! ```no_run
//! use std::sync::Arc;
//! use backend_azure::{AzureBackend, EntraId, EntraOptions};
//!
//! # fn run() -> Result<(), router_core::Error> {
//! // In AKS with workload identity: AZURE_TENANT_ID, AZURE_CLIENT_ID and
//! // AZURE_FEDERATED_TOKEN_FILE are set by the platform.
//! let entra = EntraId::workload_identity(EntraOptions::default())?;
//! let backend = AzureBackend::builder("azure-east", "https://my-resource.openai.azure.com")
//!     .api_version("2024-10-21")
//!     .token_provider(Arc::new(entra))
//!     .build()?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::{AsyncRawResponse, ClientOptions, HttpClient, Request, Transport};
use azure_core::time::OffsetDateTime;
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientAssertionCredentialOptions,
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use router_core::{Error, ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use url::Url;

use crate::TokenProvider;

/// The scope of Azure OpenAI (Cognitive Services) tokens.
pub const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// The longest [`EntraOptions::refresh_ahead`] takes effect: `azure_identity`'s own cache hands
/// out the token it holds until five minutes before it expires.
pub const MAX_REFRESH_AHEAD: Duration = Duration::from_secs(300);

/// How an [`EntraId`] provider gets and keeps its tokens.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraOptions {
    /// The scope asked for (default [`COGNITIVE_SERVICES_SCOPE`]).
    pub scope: String,
    /// The authority host (default: `azure_identity`'s, `https://login.microsoftonline.com`, or
    /// `AZURE_AUTHORITY_HOST`). `https`, or `http` on a loopback address.
    pub authority_host: Option<Url>,
    /// How long before a token expires it is refreshed (default and at most
    /// [`MAX_REFRESH_AHEAD`]; at most half of a token's life).
    pub refresh_ahead: Duration,
    /// How long after a failed refresh, while the token held is still valid, the next is tried
    /// (default 10 s).
    pub retry_after_failure: Duration,
}

impl Default for EntraOptions {
    fn default() -> Self {
        Self {
            scope: COGNITIVE_SERVICES_SCOPE.to_owned(),
            authority_host: None,
            refresh_ahead: MAX_REFRESH_AHEAD,
            retry_after_failure: Duration::from_secs(10),
        }
    }
}

impl EntraOptions {
    /// Asks for `scope` instead of [`COGNITIVE_SERVICES_SCOPE`].
    #[must_use]
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// Gets tokens from `host` (a sovereign cloud's, or a loopback token endpoint).
    #[must_use]
    pub fn with_authority_host(mut self, host: Url) -> Self {
        self.authority_host = Some(host);
        self
    }

    /// Refreshes tokens this long before they expire (at most [`MAX_REFRESH_AHEAD`]).
    #[must_use]
    pub fn with_refresh_ahead(mut self, ahead: Duration) -> Self {
        self.refresh_ahead = ahead;
        self
    }

    /// Waits this long after a failed refresh before the next, while the token is valid.
    #[must_use]
    pub fn with_retry_after_failure(mut self, wait: Duration) -> Self {
        self.retry_after_failure = wait;
        self
    }

    /// The `azure_identity` client options these options ask for: the authority host as a
    /// custom cloud, and, for an `http` host on a loopback address, a transport that speaks
    /// plain HTTP to it (`azure_identity` accepts only `https` hosts).
    fn client_options(&self) -> Result<ClientOptions, Error> {
        let mut client = ClientOptions::default();
        let Some(host) = &self.authority_host else {
            return Ok(client);
        };
        let mut https = host.clone();
        match host.scheme() {
            "https" => {}
            "http" if is_loopback(host) => {
                let _ = https.set_scheme("https");
                let inner = azure_core::http::new_http_client(None);
                client.transport = Some(Transport::new(Arc::new(LoopbackHttp {
                    inner,
                    host: host.host_str().unwrap_or_default().to_owned(),
                    port: host.port_or_known_default(),
                })));
            }
            _ => {
                return Err(Error::config(format!(
                    "entra authority_host `{host}`: must be https (http only on a loopback address)"
                )));
            }
        }
        let mut custom = CustomConfiguration::default();
        https
            .as_str()
            .trim_end_matches('/')
            .clone_into(&mut custom.authority_host);
        client.cloud = Some(Arc::new(CloudConfiguration::Custom(custom)));
        Ok(client)
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => {
            name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

/// `azure_identity`'s transport, speaking plain HTTP to one loopback host it is told is
/// `https` (see [`EntraOptions::client_options`]).
#[derive(Debug)]
struct LoopbackHttp {
    inner: Arc<dyn HttpClient>,
    host: String,
    port: Option<u16>,
}

#[async_trait]
impl HttpClient for LoopbackHttp {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let url = request.url();
        let ours = url.scheme() == "https"
            && url.host_str() == Some(self.host.as_str())
            && url.port_or_known_default() == self.port;
        if !ours {
            return self.inner.execute_request(request).await;
        }
        let mut plain = request.clone();
        let port = self.port;
        let url = plain.url_mut();
        let _ = url.set_scheme("http");
        let _ = url.set_port(port);
        self.inner.execute_request(&plain).await
    }
}

/// A [`TokenProvider`] over an `azure_identity` credential; see the module docs.
#[derive(Clone)]
pub struct EntraId {
    inner: Arc<Inner>,
}

struct Inner {
    credential: Arc<dyn TokenCredential>,
    /// What the credential is, for errors and logs ("client secret", …).
    kind: &'static str,
    options: EntraOptions,
    held: Mutex<Held>,
    /// Told when a fetch ends (whoever waits for one).
    fetched: tokio::sync::Notify,
}

#[derive(Default)]
struct Held {
    token: Option<Token>,
    /// A refresh failed: the next is not tried before this (while the token is valid).
    quiet_until: Option<Instant>,
    /// Tokens fetched so far.
    fetches: u64,
    /// A fetch is in flight: no other starts (one at a time).
    fetching: bool,
    /// Why the last fetch failed (kind and message), told again while `quiet_until` lasts
    /// when no valid token is held, rather than asking the token endpoint again at once.
    failed: Option<(ErrorKind, String)>,
}

struct Token {
    secret: SecretString,
    expires: Instant,
    refresh_at: Instant,
}

impl fmt::Debug for EntraId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraId")
            .field("credential", &self.inner.kind)
            .field("scope", &self.inner.options.scope)
            .finish_non_exhaustive()
    }
}

impl EntraId {
    /// Tokens from `credential`, named `kind` in errors and logs.
    pub fn from_credential(
        credential: Arc<dyn TokenCredential>,
        kind: &'static str,
        options: EntraOptions,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                credential,
                kind,
                options,
                held: Mutex::new(Held::default()),
                fetched: tokio::sync::Notify::new(),
            }),
        }
    }

    /// A service principal's client secret (`ClientSecretCredential`).
    ///
    /// # Errors
    /// A tenant, client id or secret that is empty or malformed, or a bad authority host.
    pub fn client_secret(
        tenant_id: &str,
        client_id: impl Into<String>,
        secret: &SecretString,
        options: EntraOptions,
    ) -> Result<Self, Error> {
        let credential = ClientSecretCredential::new(
            tenant_id,
            client_id.into(),
            secret.expose_secret().to_owned().into(),
            Some(ClientSecretCredentialOptions {
                client_options: options.client_options()?,
            }),
        )
        .map_err(|e| setup("client secret", &e))?;
        Ok(Self::from_credential(credential, "client secret", options))
    }

    /// Workload identity (AKS): the tenant, client id and federated token file from
    /// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and `AZURE_FEDERATED_TOKEN_FILE` unless given.
    ///
    /// # Errors
    /// What is neither given nor in the environment, or a bad authority host.
    pub fn workload_identity_with(
        tenant_id: Option<String>,
        client_id: Option<String>,
        token_file: Option<PathBuf>,
        options: EntraOptions,
    ) -> Result<Self, Error> {
        let credential = WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
            credential_options: ClientAssertionCredentialOptions {
                client_options: options.client_options()?,
            },
            client_id,
            tenant_id,
            token_file_path: token_file,
        }))
        .map_err(|e| setup("workload identity", &e))?;
        Ok(Self::from_credential(
            credential,
            "workload identity",
            options,
        ))
    }

    /// Workload identity with everything from the environment (see
    /// [`workload_identity_with`](Self::workload_identity_with)).
    ///
    /// # Errors
    /// As [`workload_identity_with`](Self::workload_identity_with).
    pub fn workload_identity(options: EntraOptions) -> Result<Self, Error> {
        Self::workload_identity_with(None, None, None, options)
    }

    /// A managed identity (App Service, Functions, virtual machines): the system-assigned one,
    /// or the user-assigned one with `client_id`.
    ///
    /// # Errors
    /// A bad authority host.
    pub fn managed_identity(
        client_id: Option<String>,
        options: EntraOptions,
    ) -> Result<Self, Error> {
        let credential = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
            user_assigned_id: client_id.map(UserAssignedId::ClientId),
            client_options: options.client_options()?,
        }))
        .map_err(|e| setup("managed identity", &e))?;
        Ok(Self::from_credential(
            credential,
            "managed identity",
            options,
        ))
    }

    /// The Azure CLI's signed-in account (`az account get-access-token`), for development.
    ///
    /// # Errors
    /// Never in practice; `az` missing or signed out is an error of the first token.
    pub fn azure_cli(tenant_id: Option<String>, options: EntraOptions) -> Result<Self, Error> {
        let cli = AzureCliCredentialOptions {
            tenant_id,
            ..AzureCliCredentialOptions::default()
        };
        let credential = AzureCliCredential::new(Some(cli)).map_err(|e| setup("Azure CLI", &e))?;
        Ok(Self::from_credential(credential, "Azure CLI", options))
    }

    /// Tokens fetched from the credential so far (for tests and stats).
    pub fn fetches(&self) -> u64 {
        self.inner.lock().fetches
    }

    /// Fetches a token and holds it; the caller has marked the fetch in flight (`Fetching`).
    async fn fetch(inner: &Inner) -> Result<SecretString, Error> {
        let scope = inner.options.scope.as_str();
        let fetched = inner.credential.get_token(&[scope], None).await;
        let mut held = inner.lock();
        held.fetches += 1;
        let token = match fetched {
            Ok(token) => token,
            Err(error) => {
                let now = Instant::now();
                held.quiet_until = Some(now + inner.options.retry_after_failure);
                let (kind, message) = fetch_error(inner.kind, scope, &error);
                held.failed = Some((kind, message.clone()));
                return Err(Error::with_message(kind, message));
            }
        };
        let now = Instant::now();
        let life = token.expires_on - OffsetDateTime::now_utc();
        let life = Duration::try_from(life).unwrap_or(Duration::ZERO);
        let ahead = inner
            .options
            .refresh_ahead
            .min(MAX_REFRESH_AHEAD)
            .min(life / 2);
        let expires = now + life;
        // The credential's own cache may hand back the token already held: then the next
        // refresh is not tried at once again.
        let mut refresh_at = expires - ahead;
        if held
            .token
            .as_ref()
            .is_some_and(|old| expires <= old.expires + Duration::from_secs(1))
        {
            refresh_at = refresh_at.max(now + inner.options.retry_after_failure);
        }
        let secret = SecretString::from(token.token.secret().to_owned());
        held.token = Some(Token {
            secret: secret.clone(),
            expires,
            refresh_at,
        });
        held.quiet_until = None;
        held.failed = None;
        Ok(secret)
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a credential that could not be built says, as a configuration error.
fn setup(kind: &str, error: &azure_core::Error) -> Error {
    Error::config(format!("entra ({kind}): {error}"))
}

/// A token that could not be had: `Unauthorized` when Entra ID refused the credential (or it
/// could not be used at all), a transient kind when the token endpoint could not answer.
fn fetch_error(kind: &str, scope: &str, error: &azure_core::Error) -> (ErrorKind, String) {
    let mut status = None;
    let mut io = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(azure) = current.downcast_ref::<azure_core::Error>() {
            match azure.kind() {
                azure_core::error::ErrorKind::HttpResponse { status: s, .. } => {
                    status = Some(u16::from(*s));
                }
                azure_core::error::ErrorKind::Io | azure_core::error::ErrorKind::Connection => {
                    io = true;
                }
                _ => {}
            }
        }
        source = current.source();
    }
    let error_kind = match status {
        Some(500..) => ErrorKind::ServerError,
        None if io => ErrorKind::Connect,
        // Refused (4xx), or not usable at all (no `az`, no token file): the configuration's.
        _ => ErrorKind::Unauthorized,
    };
    (
        error_kind,
        format!("entra ({kind}): no token for scope `{scope}`: {error}"),
    )
}

/// Marks a fetch in flight until dropped (finished, or its future dropped): then the next may
/// start, and those waiting look again.
struct Fetching(Arc<Inner>);

impl Fetching {
    /// Marks a fetch in flight, if none is.
    fn start(inner: &Arc<Inner>, held: &mut Held) -> Option<Self> {
        if held.fetching {
            return None;
        }
        held.fetching = true;
        Some(Self(Arc::clone(inner)))
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.0.lock().fetching = false;
        self.0.fetched.notify_waiters();
    }
}

/// What a request does next, decided under the lock.
enum Next {
    Done(Result<SecretString, Error>),
    Fetch(Fetching),
    Wait,
}

#[async_trait]
impl TokenProvider for EntraId {
    async fn token(&self) -> Result<SecretString, Error> {
        let inner = &self.inner;
        loop {
            let notified = inner.fetched.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the lock is let go, so that a fetch ending meanwhile wakes it.
            notified.as_mut().enable();
            match self.next() {
                Next::Done(result) => return result,
                Next::Fetch(fetching) => {
                    let fetched = Self::fetch(inner).await;
                    drop(fetching);
                    return fetched;
                }
                Next::Wait => notified.await,
            }
        }
    }
}

impl EntraId {
    /// Under the lock: the valid token (starting a background refresh when due), the last
    /// failure again, a fetch to make, or one in flight to wait for.
    fn next(&self) -> Next {
        let inner = &self.inner;
        let now = Instant::now();
        let mut held = inner.lock();
        if let Some(token) = &held.token
            && now < token.expires
        {
            let due = now >= token.refresh_at && held.quiet_until.is_none_or(|until| now >= until);
            let secret = token.secret.clone();
            if due && let Some(fetching) = Fetching::start(inner, &mut held) {
                // Refreshed in the background; this request goes on with the valid token.
                let background = Arc::clone(inner);
                tokio::spawn(async move {
                    if let Err(error) = Self::fetch(&background).await {
                        tracing::warn!(%error, "entra token refresh failed; the token held is used until it expires");
                    }
                    drop(fetching);
                });
            }
            return Next::Done(Ok(secret));
        }
        // The last fetch just failed: its error again, not another fetch at once.
        if let (Some((kind, message)), Some(until)) = (&held.failed, held.quiet_until)
            && now < until
        {
            return Next::Done(Err(Error::with_message(*kind, message.clone())));
        }
        // No valid token: make the fetch, or wait for the one in flight and look again.
        match Fetching::start(inner, &mut held) {
            Some(fetching) => Next::Fetch(fetching),
            None => Next::Wait,
        }
    }
}

#[cfg(test)]
mod tests;
