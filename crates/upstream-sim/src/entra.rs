//! A loopback Microsoft Entra ID token endpoint: `POST /{tenant}/oauth2/v2.0/token`, as the
//! client-credentials flow uses it (a client secret, or a client assertion as workload
//! identity sends it), answering as Entra ID does (`access_token`, `expires_in`, or an
//! `error` with an `AADSTS` description).
//!
//! Its tokens carry their expiry and a check value derived from the issuer's seed, so an
//! Azure endpoint configured with [`EndpointConfig::with_entra`](crate::EndpointConfig)
//! accepts exactly the tokens it issued, until they expire.

use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the issuer accepts and how long its tokens live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIssuerConfig {
    /// The tenant in the path.
    pub tenant_id: String,
    /// The client (application) id.
    pub client_id: String,
    /// The client secret accepted.
    pub client_secret: String,
    /// A client assertion accepted in place of the secret (workload identity's token file).
    pub client_assertion: Option<String>,
    /// Tokens' lifetime (`expires_in`).
    pub lifetime: Duration,
    /// The managed-identity endpoint's secret (App Service's `IDENTITY_HEADER`): with it, `GET
    /// /msi/token?resource=…` answers as App Service's identity endpoint does.
    pub identity_header: Option<String>,
}

impl TokenIssuerConfig {
    /// Accepts `client_id` with `client_secret` in `tenant_id`; tokens live an hour.
    pub fn new(
        tenant_id: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            client_assertion: None,
            lifetime: Duration::from_secs(3600),
            identity_header: None,
        }
    }

    /// Also answers as a managed-identity endpoint (App Service's), for requests carrying
    /// `x-identity-header: secret`.
    #[must_use]
    pub fn with_managed_identity(mut self, secret: impl Into<String>) -> Self {
        self.identity_header = Some(secret.into());
        self
    }

    /// Also accepts `assertion` as a client assertion (workload identity).
    #[must_use]
    pub fn with_client_assertion(mut self, assertion: impl Into<String>) -> Self {
        self.client_assertion = Some(assertion.into());
        self
    }

    /// Tokens live `lifetime`.
    #[must_use]
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }
}

/// A running token endpoint on 127.0.0.1, until dropped.
#[derive(Debug)]
pub struct TokenIssuer {
    state: Arc<IssuerState>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct IssuerState {
    config: TokenIssuerConfig,
    seed: String,
    issued: AtomicU64,
    refused: AtomicU64,
}

impl TokenIssuer {
    /// Starts it on a free port.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(config: TokenIssuerConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let seed = format!("{}:{}:{addr}", config.tenant_id, config.client_id);
        let state = Arc::new(IssuerState {
            config,
            seed,
            issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let serving = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&serving);
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(Arc::clone(&state), request));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { state, addr, task })
    }

    /// `http://127.0.0.1:PORT`: the authority host to give a credential.
    pub fn authority_host(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/msi/token`: what App Service sets `IDENTITY_ENDPOINT` to.
    pub fn identity_endpoint(&self) -> String {
        format!("http://{}/msi/token", self.addr)
    }

    /// What an endpoint checks tokens against ([`EndpointConfig::with_entra`]).
    ///
    /// [`EndpointConfig::with_entra`]: crate::EndpointConfig::with_entra
    pub fn verifier(&self) -> String {
        self.state.seed.clone()
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> u64 {
        self.state.issued.load(Ordering::Relaxed)
    }

    /// Token requests refused so far.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::Relaxed)
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn check_value(seed: &str, expires: u64, serial: u64) -> u64 {
    let mut hasher = DefaultHasher::new();
    (seed, expires, serial).hash(&mut hasher);
    hasher.finish()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `token` was issued by the issuer whose verifier is `seed`, and has not expired.
pub(crate) fn verify(seed: &str, token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some("sim-entra"), Some(expires), Some(serial), Some(check), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Ok(expires), Ok(serial), Ok(check)) = (
        expires.parse::<u64>(),
        serial.parse::<u64>(),
        u64::from_str_radix(check, 16),
    ) else {
        return false;
    };
    expires > unix_now() && check == check_value(seed, expires, serial)
}

fn reply(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

fn refusal(
    state: &IssuerState,
    status: StatusCode,
    error: &str,
    description: &str,
) -> Response<Full<Bytes>> {
    state.refused.fetch_add(1, Ordering::Relaxed);
    reply(
        status,
        &json!({
            "error": error,
            "error_description": description,
            "error_codes": [],
            "timestamp": "2026-01-01 00:00:00Z",
        }),
    )
}

async fn answer(
    state: Arc<IssuerState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let config = &state.config;
    let path = request.uri().path().to_owned();
    if path == "/msi/token" {
        return Ok(managed_identity(&state, &request));
    }
    let wanted = format!("/{}/oauth2/v2.0/token", config.tenant_id);
    if request.method() != http::Method::POST || !path.ends_with("/oauth2/v2.0/token") {
        return Ok(refusal(
            &state,
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route",
        ));
    }
    if path != wanted {
        let tenant = path.split('/').nth(1).unwrap_or_default();
        return Ok(refusal(
            &state,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("AADSTS90002: Tenant '{tenant}' not found."),
        ));
    }
    let body = request
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let form: Vec<(String, String)> = url_decode(&body);
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if field("grant_type") != Some("client_credentials") {
        return Ok(refusal(
            &state,
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.",
        ));
    }
    if field("client_id") != Some(config.client_id.as_str()) {
        return Ok(refusal(
            &state,
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "AADSTS700016: Application not found in the directory.",
        ));
    }
    let by_secret = field("client_secret") == Some(config.client_secret.as_str());
    let by_assertion = config.client_assertion.as_deref().is_some_and(|expected| {
        field("client_assertion_type")
            == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            && field("client_assertion") == Some(expected)
    });
    if !by_secret && !by_assertion {
        return Ok(refusal(
            &state,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided.",
        ));
    }
    if !field("scope").is_some_and(|scope| scope.ends_with("/.default")) {
        return Ok(refusal(
            &state,
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "AADSTS1002012: The provided value for scope is not valid.",
        ));
    }
    let life = config.lifetime.as_secs();
    let (token, _) = issue(&state);
    Ok(reply(
        StatusCode::OK,
        &json!({
            "token_type": "Bearer",
            "expires_in": life,
            "ext_expires_in": life,
            "access_token": token,
        }),
    ))
}

/// A new token for `state`'s issuer: the token and its expiry (Unix seconds).
fn issue(state: &IssuerState) -> (String, u64) {
    let serial = state.issued.fetch_add(1, Ordering::Relaxed);
    let expires = unix_now() + state.config.lifetime.as_secs();
    let token = format!(
        "sim-entra.{expires}.{serial}.{:016x}",
        check_value(&state.seed, expires, serial)
    );
    (token, expires)
}

/// `GET /msi/token?api-version=…&resource=…`, as App Service's managed-identity endpoint
/// answers it: the secret in `x-identity-header`, the token's expiry as a string of Unix
/// seconds.
fn managed_identity(state: &IssuerState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let secret = request
        .headers()
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok());
    if secret.is_none() || secret != state.config.identity_header.as_deref() {
        return refusal(
            state,
            StatusCode::UNAUTHORIZED,
            "invalid_request",
            "the identity header is missing or wrong",
        );
    }
    let query = url_decode(request.uri().query().unwrap_or_default().as_bytes());
    let Some(resource) = query
        .iter()
        .find(|(k, _)| k == "resource")
        .map(|(_, v)| v.clone())
    else {
        return refusal(
            state,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "resource is required",
        );
    };
    let (token, expires) = issue(state);
    reply(
        StatusCode::OK,
        &json!({
            "access_token": token,
            "expires_on": expires.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
    )
}

/// `application/x-www-form-urlencoded` pairs.
fn url_decode(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..=i + 2]).unwrap_or("");
                if let Ok(byte) = u8::from_str_radix(hex, 16) {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_are_decoded() {
        let form = url_decode(
            b"grant_type=client_credentials&scope=https%3A%2F%2Fx%2F.default&a=b+c&bad=%zz",
        );
        assert_eq!(form[0], ("grant_type".into(), "client_credentials".into()));
        assert_eq!(form[1].1, "https://x/.default");
        assert_eq!(form[2].1, "b c");
        assert_eq!(form[3].1, "%zz");
    }

    #[test]
    fn tokens_verify_only_with_their_seed_and_before_they_expire() {
        let later = unix_now() + 60;
        let token = format!("sim-entra.{later}.7.{:016x}", check_value("s", later, 7));
        assert!(verify("s", &token));
        assert!(!verify("other", &token));
        let old = unix_now() - 1;
        let past = format!("sim-entra.{old}.7.{:016x}", check_value("s", old, 7));
        assert!(!verify("s", &past));
        assert!(!verify("s", "sim-entra.1.2"));
    }
}
