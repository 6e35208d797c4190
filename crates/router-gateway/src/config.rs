//! The gateway's configuration: one TOML file, secrets from environment variables.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:8080"
//!
//! [router]
//! strategy = "least-latency"
//!
//! [[endpoints]]
//! name = "azure-east"
//! kind = "azure"                       # or "openai"
//! url = "https://east.openai.azure.com"
//! api_version = "2024-10-21"           # Azure deployments form (or `v1 = true`)
//! api_key_env = "AZURE_EAST_KEY"       # the key is read from this variable, never the file
//! deployments = { "gpt-4o-mini" = "mini-east" }
//! tpm = 300000
//!
//! [[keys]]
//! name = "team-a"
//! sha256 = "…"                         # `openai-router hash-key` prints it
//! models = ["gpt-4o-mini"]
//! ```
//!
//! Every error names the file, the line (from the TOML parser) or the field, and the problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use router_facade::{Endpoint, RateLimits, Router, RouterBuilder, StrategyKind};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    #[serde(default)]
    pub(crate) server: ServerConfig,
    #[serde(default)]
    pub(crate) router: RouterConfig,
    #[serde(default)]
    pub(crate) endpoints: Vec<EndpointConfig>,
    #[serde(default)]
    pub(crate) keys: Vec<KeyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerConfig {
    #[serde(default = "default_listen")]
    pub(crate) listen: SocketAddr,
    /// Request bodies above this are refused with 413.
    #[serde(default = "default_body_limit")]
    pub(crate) body_limit_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            body_limit_bytes: default_body_limit(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_body_limit() -> usize {
    16 * 1024 * 1024
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouterConfig {
    pub(crate) strategy: Option<String>,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) request_timeout_ms: Option<u64>,
    pub(crate) expected_completion: Option<u32>,
    pub(crate) redis_url: Option<String>,
    pub(crate) redis_url_env: Option<String>,
    /// Upstream timeouts, for every endpoint: connecting, to the first byte of a stream, to
    /// the answer of a non-streamed request, and between two chunks.
    pub(crate) connect_timeout_ms: Option<u64>,
    pub(crate) stream_first_byte_timeout_ms: Option<u64>,
    pub(crate) first_byte_timeout_ms: Option<u64>,
    pub(crate) between_chunks_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    OpenAi,
    Azure,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndpointConfig {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) url: String,
    pub(crate) api_version: Option<String>,
    #[serde(default)]
    pub(crate) v1: bool,
    /// The environment variable holding the key.
    pub(crate) api_key_env: Option<String>,
    #[serde(default)]
    pub(crate) models: Vec<String>,
    #[serde(default)]
    pub(crate) deployments: BTreeMap<String, String>,
    pub(crate) weight: Option<u32>,
    pub(crate) priority: Option<u32>,
    pub(crate) tpm: Option<u64>,
    pub(crate) rpm: Option<u64>,
    pub(crate) quota_window_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyConfig {
    pub(crate) name: String,
    /// Hex SHA-256 of the key.
    pub(crate) sha256: String,
    /// Models this key may use; empty: all.
    #[serde(default)]
    pub(crate) models: Vec<String>,
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) concurrency: Option<u32>,
}

/// A gateway key as the server holds it: its name, the digest, what it may do.
#[derive(Debug, Clone)]
pub(crate) struct GatewayKey {
    pub(crate) name: String,
    pub(crate) digest: [u8; 32],
    pub(crate) models: Vec<String>,
}

impl Config {
    /// Reads and checks `path`.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if config.endpoints.is_empty() {
            bail!("endpoints: none configured; add an [[endpoints]] table");
        }
        Ok(config)
    }

    /// The router this configuration describes (secrets read from the environment now).
    pub(crate) async fn router(&self) -> anyhow::Result<Router> {
        let mut builder = self.builder()?;
        let redis = match (&self.router.redis_url, &self.router.redis_url_env) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(var)) => Some(
                std::env::var(var)
                    .with_context(|| format!("router.redis_url_env: ${var} is not set"))?,
            ),
            (None, None) => None,
        };
        if let Some(url) = redis {
            let store =
                state_redis::RedisStore::connect(&url, state_redis::RedisOptions::default())
                    .await?;
            builder = builder.state_store(std::sync::Arc::new(store));
        }
        Ok(builder.build()?)
    }

    pub(crate) fn builder(&self) -> anyhow::Result<RouterBuilder> {
        let mut builder = Router::builder();
        if let Some(strategy) = &self.router.strategy {
            let kind: StrategyKind = strategy.parse().context("router.strategy")?;
            builder = builder.strategy(kind);
        }
        if let Some(attempts) = self.router.max_attempts {
            builder = builder.max_attempts(attempts);
        }
        if let Some(ms) = self.router.request_timeout_ms {
            builder = builder.request_timeout(Duration::from_millis(ms));
        }
        if let Some(tokens) = self.router.expected_completion {
            builder = builder.expected_completion(tokens);
        }
        let timeouts = self.timeouts();
        for (i, e) in self.endpoints.iter().enumerate() {
            let at = format!("endpoints[{i}] (`{}`)", e.name);
            let mut endpoint = match e.kind {
                Kind::OpenAi => Endpoint::openai(&e.name, &e.url),
                Kind::Azure => {
                    let endpoint = Endpoint::azure(&e.name, &e.url);
                    match (&e.api_version, e.v1) {
                        (Some(version), false) => endpoint.api_version(version),
                        (None, true) => endpoint.v1(),
                        (Some(_), true) => {
                            bail!("{at}: api_version and v1 = true exclude each other")
                        }
                        (None, false) => {
                            bail!("{at}: api_version is required for Azure (or v1 = true)")
                        }
                    }
                }
            };
            if let Some(var) = &e.api_key_env {
                let key = std::env::var(var)
                    .with_context(|| format!("{at}: api_key_env: ${var} is not set"))?;
                endpoint = endpoint.api_key(key);
            } else if e.kind == Kind::Azure {
                bail!(
                    "{at}: api_key_env is required for Azure (the key is read from the environment)"
                );
            }
            if e.models.is_empty() && e.deployments.is_empty() {
                bail!(
                    "{at}: serves no model; set models = [...] or deployments = {{ model = \"deployment\" }}"
                );
            }
            for model in &e.models {
                endpoint = endpoint.model(model);
            }
            for (model, deployment) in &e.deployments {
                endpoint = endpoint.deployment(model, deployment);
            }
            if let Some(weight) = e.weight {
                endpoint = endpoint.weight(weight);
            }
            if let Some(priority) = e.priority {
                endpoint = endpoint.priority(priority);
            }
            if let Some(tpm) = e.tpm {
                endpoint = endpoint.tpm(tpm);
            }
            if let Some(rpm) = e.rpm {
                endpoint = endpoint.rpm(rpm);
            }
            if let Some(ms) = e.quota_window_ms {
                endpoint = endpoint.quota_window(Duration::from_millis(ms));
            }
            if let Some(timeouts) = timeouts {
                endpoint = endpoint.timeouts(timeouts);
            }
            builder = builder.endpoint(endpoint);
        }
        for key in &self.keys {
            let mut limits = RateLimits::new();
            if let Some(rpm) = key.rpm {
                limits = limits.with_rpm(rpm);
            }
            if let Some(tpm) = key.tpm {
                limits = limits.with_tpm(tpm);
            }
            if let Some(concurrency) = key.concurrency {
                limits = limits.with_concurrency(concurrency);
            }
            builder = builder.caller_limits(&key.name, limits);
        }
        Ok(builder)
    }

    /// The upstream timeouts, when any is configured.
    fn timeouts(&self) -> Option<router_facade::Timeouts> {
        let r = &self.router;
        let any = r.connect_timeout_ms.is_some()
            || r.stream_first_byte_timeout_ms.is_some()
            || r.first_byte_timeout_ms.is_some()
            || r.between_chunks_timeout_ms.is_some();
        if !any {
            return None;
        }
        let defaults = router_facade::Timeouts::default();
        let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
        Some(
            defaults
                .with_connect(ms(r.connect_timeout_ms, defaults.connect))
                .with_first_byte(
                    ms(r.stream_first_byte_timeout_ms, defaults.first_byte_stream),
                    ms(r.first_byte_timeout_ms, defaults.first_byte),
                )
                .with_between_chunks(ms(r.between_chunks_timeout_ms, defaults.between_chunks)),
        )
    }

    /// The gateway keys, checked.
    pub(crate) fn keys(&self) -> anyhow::Result<Vec<GatewayKey>> {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let digest = parse_digest(&key.sha256).with_context(|| {
                    format!("keys[{i}] (`{}`): sha256 must be 64 hex digits", key.name)
                })?;
                Ok(GatewayKey {
                    name: key.name.clone(),
                    digest,
                    models: key.models.clone(),
                })
            })
            .collect()
    }
}

/// Sends each endpoint, alone, a one-token request for each model it serves (an embeddings
/// request for models named like embeddings), and prints what happened. `true` when all
/// answered.
pub(crate) async fn probe(config: &Config) -> anyhow::Result<bool> {
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
                router.chat(&request).await.map(|_| ())
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
            crate::demo::say(&line);
        }
    }
    Ok(all_ok)
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The hex SHA-256 of a key, as the configuration stores it.
pub(crate) fn hash_key(key: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest.iter().fold(String::with_capacity(64), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// The digest of a presented key.
pub(crate) fn digest(key: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_line_and_field() {
        let unknown = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 2\n").unwrap_err();
        let text = format!("{unknown:#}");
        assert!(text.contains("lisen") && text.contains("line 3"), "{text}");
        let none = Config::parse("").unwrap_err();
        assert!(format!("{none:#}").contains("endpoints"));
    }

    #[test]
    fn azure_needs_a_version_and_a_key_from_the_environment() {
        let config = Config::parse(
            "[[endpoints]]\nname = \"az\"\nkind = \"azure\"\nurl = \"https://r.openai.azure.com\"\nmodels = [\"m\"]\n",
        )
        .unwrap();
        let error = format!("{:#}", config.builder().unwrap_err());
        assert!(
            error.contains("endpoints[0] (`az`): api_version"),
            "{error}"
        );
        let config = Config::parse(
            "[[endpoints]]\nname = \"az\"\nkind = \"azure\"\nurl = \"https://r.openai.azure.com\"\napi_version = \"2024-10-21\"\napi_key_env = \"SURELY_NOT_SET_4711\"\nmodels = [\"m\"]\n",
        )
        .unwrap();
        let error = format!("{:#}", config.builder().unwrap_err());
        assert!(error.contains("SURELY_NOT_SET_4711 is not set"), "{error}");
    }

    #[test]
    fn the_example_configurations_check() {
        for (file, vars) in [
            (
                "examples/sim.toml",
                &["SIM_OPENAI_KEY", "SIM_AZURE_KEY"][..],
            ),
            (
                "examples/azure-openai.toml",
                &["AZURE_EAST_KEY", "AZURE_WEST_KEY", "OPENAI_API_KEY"][..],
            ),
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let config = Config::load(&path).unwrap();
            config.keys().unwrap();
            // The keys come from the environment; a missing one is named.
            let missing = format!("{:#}", config.builder().unwrap_err());
            assert!(missing.contains(vars[0]), "{file}: {missing}");
            // With the variables set, the router builds.
            let mut set = config.clone();
            for e in &mut set.endpoints {
                e.api_key_env = Some("PATH".to_owned()); // any variable that is set
            }
            set.builder().unwrap().build().unwrap();
        }
    }

    #[test]
    fn upstream_timeouts() {
        let config = Config::parse(
            "[router]\nstream_first_byte_timeout_ms = 1500\nbetween_chunks_timeout_ms = 900\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n",
        )
        .unwrap();
        let timeouts = config.timeouts().unwrap();
        assert_eq!(timeouts.first_byte_stream, Duration::from_millis(1500));
        assert_eq!(timeouts.between_chunks, Duration::from_millis(900));
        assert_eq!(timeouts.connect, router_facade::Timeouts::default().connect);
        config.builder().unwrap().build().unwrap();
    }

    #[test]
    fn key_digests() {
        let hex = hash_key("sk-gw-test");
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_digest(&hex), Some(digest("sk-gw-test")));
        assert_eq!(parse_digest("xyz"), None);
    }
}
