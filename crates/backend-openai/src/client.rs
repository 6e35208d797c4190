//! The HTTP client and the timeouts.

use std::fmt;
use std::time::Duration;

use router_core::Error;

/// A pool of upstream connections, shared by any number of backends. Cheap to clone.
///
/// Built on reqwest with rustls, no redirects (an upstream that redirects is misconfigured, and
/// following it could leak a key), no retries of its own (the router decides every retry, on
/// another deployment; reqwest's default would resend on a protocol NACK), `TCP_NODELAY`, and the
/// connect timeout.
///
/// # Proxies
///
/// Upstream connections go through the proxy the environment names, as curl's do:
/// `HTTPS_PROXY` (or `https_proxy`) for `https://` endpoints, `HTTP_PROXY` (or `http_proxy`) for
/// `http://` ones, `ALL_PROXY` for both; hosts, domains and IP ranges in `NO_PROXY` (or
/// `no_proxy`; comma-separated, `*` for all) connect directly. Nothing set, no proxy. The
/// variables are read when the client is built (at router build and reconfiguration).
#[derive(Clone)]
pub struct HttpClient {
    pub(crate) inner: reqwest::Client,
}

impl HttpClient {
    /// A client whose connections time out after `connect_timeout` while connecting.
    pub fn new(connect_timeout: Duration) -> Result<Self, Error> {
        let inner = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("openai-router/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { inner })
    }
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

/// How long a backend waits. Every wait is also cut at the call's deadline, when it has one.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timeouts {
    /// Making the TCP (and TLS) connection. Default 5 s.
    pub connect: Duration,
    /// From sending a streamed request to the answer's headers. Default 60 s.
    pub first_byte_stream: Duration,
    /// From sending a non-streamed request to the answer's headers: the whole generation
    /// happens before them. Default 600 s, as in the official SDKs.
    pub first_byte: Duration,
    /// Between two chunks of a body or two events of a stream. Default 30 s.
    pub between_chunks: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_byte_stream: Duration::from_secs(60),
            first_byte: Duration::from_secs(600),
            between_chunks: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// Sets the connect timeout.
    #[must_use]
    pub fn with_connect(mut self, timeout: Duration) -> Self {
        self.connect = timeout;
        self
    }

    /// Sets the time to headers, for streams and for non-streamed requests.
    #[must_use]
    pub fn with_first_byte(mut self, stream: Duration, non_stream: Duration) -> Self {
        self.first_byte_stream = stream;
        self.first_byte = non_stream;
        self
    }

    /// Sets the idle time allowed between chunks.
    #[must_use]
    pub fn with_between_chunks(mut self, timeout: Duration) -> Self {
        self.between_chunks = timeout;
        self
    }
}
