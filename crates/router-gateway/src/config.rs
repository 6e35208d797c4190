//! The gateway's configuration: one TOML file, secrets from environment variables.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:8080"
//!
//! # HTTPS instead of HTTP (PEM files, reread on SIGHUP):
//! # tls = { cert_file = "cert.pem", key_file = "key.pem" }
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
//! # or Entra ID tokens instead of a key (client-secret, workload-identity, managed-identity,
//! # azure-cli):
//! # entra = { credential = "client-secret", tenant_id = "…", client_id = "…",
//! #           client_secret_env = "AZURE_CLIENT_SECRET" }
//! deployments = { "gpt-4o-mini" = "mini-east" }
//! tpm = 300000
//!
//! [[keys]]
//! name = "team-a"
//! sha256 = "…"                         # `openai-router hash-key` prints it
//! models = ["gpt-4o-mini"]
//! tpm = 100000                         # the key's own limits: rpm, tpm, concurrency
//!
//! [[groups]]                           # a model group's limits, whoever calls
//! model = "gpt-4o-mini"
//! tpm = 250000
//! ```
//!
//! Every error names the file, the line (from the TOML parser) or the field, and the problem.
//! What the file becomes, a router, is the `assemble` module's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::{GatewayKey, parse_digest};
use crate::problem::{Context as _, Problem, bail};

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
    /// Limits on a model group, whoever calls (shared by replicas on one Redis).
    #[serde(default)]
    pub(crate) groups: Vec<GroupConfig>,
}

/// `[[groups]]`: a model group's own limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupConfig {
    /// The model group (a model name the endpoints serve).
    pub(crate) model: String,
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) concurrency: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerConfig {
    #[serde(default = "default_listen")]
    pub(crate) listen: SocketAddr,
    /// Request bodies above this are refused with 413.
    #[serde(default = "default_body_limit")]
    pub(crate) body_limit_bytes: usize,
    /// A request's headers must arrive within this (slow clients do not hold sockets).
    #[serde(default = "default_header_timeout_ms")]
    pub(crate) header_read_timeout_ms: u64,
    /// A kept-alive connection may idle this long between requests before it is closed
    /// (sooner when every place under `max_connections` is taken and a new client waits).
    #[serde(default = "default_idle_timeout_ms")]
    pub(crate) idle_timeout_ms: u64,
    /// A request's body must arrive within this after its headers (408 past it).
    #[serde(default = "default_body_timeout_ms")]
    pub(crate) body_read_timeout_ms: u64,
    /// The most connections open at once; more wait to be accepted.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: usize,
    /// The largest request head (request line and headers); larger: 431.
    #[serde(default = "default_max_header_bytes")]
    pub(crate) max_header_bytes: usize,
    /// After SIGTERM or Ctrl-C, how long requests and streams in flight may take to finish
    /// before the process exits anyway.
    #[serde(default = "default_drain_grace_ms")]
    pub(crate) drain_grace_ms: u64,
    /// HTTPS on the listener instead of plain HTTP.
    pub(crate) tls: Option<TlsConfig>,
    /// `GET /status` and `/status.json` (on unless `false`).
    #[serde(default = "default_status_page")]
    pub(crate) status_page: bool,
    /// The SHA-256 of the admin key that opens the status page to clients off loopback
    /// (without it, the page is served to loopback clients only).
    pub(crate) admin_key_sha256: Option<String>,
}

fn default_status_page() -> bool {
    true
}

/// `[server.tls]`: the certificate chain and its private key, PEM files, read at start and
/// again on SIGHUP. Relative paths are taken from the configuration file's folder.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    /// The certificate, then any intermediates.
    pub(crate) cert_file: PathBuf,
    /// The private key (PKCS #8, PKCS #1 or SEC 1).
    pub(crate) key_file: PathBuf,
}

fn default_drain_grace_ms() -> u64 {
    30_000
}

fn default_header_timeout_ms() -> u64 {
    10_000
}

/// Longer than the idle connections clients keep in their pools (reqwest and Go 90 s,
/// .NET up to two minutes), so they stop reusing a connection before the gateway closes it.
fn default_idle_timeout_ms() -> u64 {
    120_000
}

fn default_body_timeout_ms() -> u64 {
    30_000
}

fn default_max_connections() -> usize {
    10_000
}

fn default_max_header_bytes() -> usize {
    64 * 1024
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            body_limit_bytes: default_body_limit(),
            header_read_timeout_ms: default_header_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            body_read_timeout_ms: default_body_timeout_ms(),
            max_connections: default_max_connections(),
            max_header_bytes: default_max_header_bytes(),
            drain_grace_ms: default_drain_grace_ms(),
            tls: None,
            status_page: default_status_page(),
            admin_key_sha256: None,
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
    /// The longest a request may wait for its turn (default 2,000 ms); a request expected to
    /// wait longer is answered 429 with `Retry-After` at once.
    pub(crate) max_queue_wait_ms: Option<u64>,
    /// `least-latency`'s probe budget: one probe per this many milliseconds to a deployment
    /// that gets no traffic for being slower (default 5,000).
    pub(crate) probe_interval_ms: Option<u64>,
    /// How it probes: `shadow` (a copy of a caller's request, sent in the background; the
    /// default) or `live` (the caller's request itself).
    pub(crate) probe_mode: Option<ProbeModeConfig>,
    pub(crate) redis_url: Option<String>,
    pub(crate) redis_url_env: Option<String>,
    /// `redis_url` (or the variable `redis_url_env` names) lists the nodes of a Redis Cluster,
    /// comma-separated (default false: one server).
    pub(crate) redis_cluster: Option<bool>,
    /// How long a concurrency slot held in Redis lives unrenewed (default 30,000 ms): a
    /// replica that dies frees its slots within this.
    pub(crate) redis_lease_ms: Option<u64>,
    /// Leased shares: how long a slice of a window a replica leases from Redis and admits
    /// from locally lives (default 1,000 ms, at most a quarter of the window); 0: one Redis
    /// call per request instead.
    pub(crate) redis_slice_ms: Option<u64>,
    /// How long a Redis call may take before this replica answers from its local share of
    /// each limit instead (default 100 ms). Longer: fewer fallbacks (which admit up to the
    /// local share per replica) when Redis is slow rather than away, at the cost of that
    /// latency on a call that hangs.
    pub(crate) redis_timeout_ms: Option<u64>,
    /// How an upstream's refusals teach the share of its quota it really admits.
    pub(crate) learning: Option<LearningConfig>,
    /// When a deployment is out until probed, and how often it is probed.
    pub(crate) health: Option<HealthConfig>,
    /// Fallback model groups, in order, per model group.
    #[serde(default)]
    pub(crate) fallbacks: BTreeMap<String, Vec<String>>,
    /// The larger model group a prompt too long for its group goes to.
    #[serde(default)]
    pub(crate) context_window_fallbacks: BTreeMap<String, String>,
    /// Upstream timeouts, for every endpoint: connecting, to the first byte of a stream, to
    /// the answer of a non-streamed request, and between two chunks.
    pub(crate) connect_timeout_ms: Option<u64>,
    pub(crate) stream_first_byte_timeout_ms: Option<u64>,
    pub(crate) first_byte_timeout_ms: Option<u64>,
    pub(crate) between_chunks_timeout_ms: Option<u64>,
    /// Prompt-cache affinity (default on): requests with the same `prompt_cache_key`, `user`
    /// or `cache_affinity_header` value go to the deployment that served it last.
    pub(crate) cache_affinity: Option<bool>,
    /// How much busier than another deployment drawn at random a key's deployment may be and
    /// still take the key's requests (default 0.5: up to 1.5 times its requests in flight,
    /// plus one).
    pub(crate) cache_affinity_tolerance: Option<f64>,
    /// How long a key is remembered after its last request (default 600,000 ms).
    pub(crate) cache_affinity_ttl_ms: Option<u64>,
    /// A request header whose value is the cache key when the body names none.
    pub(crate) cache_affinity_header: Option<String>,
    /// The largest non-streamed upstream answer read, for every endpoint (default 64 MiB);
    /// larger: 502.
    pub(crate) max_answer_bytes: Option<usize>,
}

/// `[router.learning]`: each field optional, the library's default where absent.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LearningConfig {
    /// The most a refusal leaves of the share (default 0.95).
    pub(crate) cut: Option<f64>,
    /// The least a refusal leaves of the share (default 0.5).
    pub(crate) deepest_cut: Option<f64>,
    /// The lowest the share goes (default 0.05).
    pub(crate) floor: Option<f64>,
    /// Share regained per minute of successes (default 0.2).
    pub(crate) regrow: Option<f64>,
}

impl LearningConfig {
    /// The policy (the library's default for a field not given), or an error naming the field
    /// out of range (`Learning::checked`).
    pub(crate) fn policy(&self) -> Result<router_facade::Learning, String> {
        let default = router_facade::Learning::default();
        let cut = self.cut.unwrap_or(default.cut);
        router_facade::Learning::checked(
            cut,
            self.deepest_cut.unwrap_or(default.deepest_cut.min(cut)),
            self.floor.unwrap_or(default.floor),
            self.regrow.unwrap_or(default.regrow),
        )
        .map_err(|e| format!("router.learning.{}", e.message().unwrap_or_default()))
    }
}

/// `[router.health]`: each field optional, the library's default where absent.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(
    clippy::struct_field_names,
    reason = "the file's keys, in milliseconds as every other duration in it"
)]
pub(crate) struct HealthConfig {
    /// A cooldown or ejection longer than this does not end by itself: the deployment is out
    /// until a health probe finds it serving (default 60,000 ms). Disabled deployments (401,
    /// 403, 404, `insufficient_quota`) are always out until probed.
    pub(crate) probe_after_ms: Option<u64>,
    /// The first health probe of a deployment that went out comes this long after
    /// (jittered); each failed probe doubles the wait (default 10,000 ms).
    pub(crate) probe_interval_ms: Option<u64>,
    /// The longest wait between two health probes (default 300,000 ms).
    pub(crate) max_probe_interval_ms: Option<u64>,
}

impl HealthConfig {
    /// The policy (the library's default for a field not given), or an error naming the field.
    pub(crate) fn policy(&self) -> Result<router_facade::HealthPolicy, String> {
        let default = router_facade::HealthPolicy::default();
        let ms =
            |v: Option<u64>, d: std::time::Duration| v.map_or(d, std::time::Duration::from_millis);
        if let Some(ms) = self.probe_interval_ms
            && ms < 100
        {
            return Err(format!(
                "router.health.probe_interval_ms: {ms} would probe a broken upstream many times a \
                 second; give at least 100"
            ));
        }
        let interval = ms(self.probe_interval_ms, default.probe_interval);
        let max = ms(self.max_probe_interval_ms, default.max_probe_interval);
        if max < interval {
            return Err(format!(
                "router.health.max_probe_interval_ms: {} is shorter than probe_interval_ms ({})",
                max.as_millis(),
                interval.as_millis()
            ));
        }
        Ok(default.with_probes(ms(self.probe_after_ms, default.probe_after), interval, max))
    }
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
    /// Azure: Microsoft Entra ID tokens instead of a key.
    pub(crate) entra: Option<EntraConfig>,
    #[serde(default)]
    pub(crate) models: Vec<String>,
    #[serde(default)]
    pub(crate) deployments: BTreeMap<String, String>,
    pub(crate) weight: Option<u32>,
    pub(crate) priority: Option<u32>,
    pub(crate) tpm: Option<u64>,
    pub(crate) rpm: Option<u64>,
    pub(crate) quota_window_ms: Option<u64>,
    /// How the upstream meters the quota.
    #[serde(default)]
    pub(crate) quota_model: QuotaModelConfig,
}

/// `entra = { credential = "…", … }`: how an Azure endpoint gets Entra ID tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EntraConfig {
    pub(crate) credential: EntraCredential,
    /// The directory (tenant) id: required for `client-secret`; else from the environment.
    pub(crate) tenant_id: Option<String>,
    /// The application (client) id: required for `client-secret`; a user-assigned managed
    /// identity's; else from the environment.
    pub(crate) client_id: Option<String>,
    /// `client-secret`: the environment variable holding the secret.
    pub(crate) client_secret_env: Option<String>,
    /// `workload-identity`: the federated token file (else `AZURE_FEDERATED_TOKEN_FILE`).
    pub(crate) token_file: Option<std::path::PathBuf>,
    /// The authority host (a sovereign cloud's; `http` only on loopback).
    pub(crate) authority_host: Option<String>,
    /// The scope (default `https://cognitiveservices.azure.com/.default`).
    pub(crate) scope: Option<String>,
}

/// `entra.credential`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum EntraCredential {
    ClientSecret,
    WorkloadIdentity,
    ManagedIdentity,
    AzureCli,
}

/// `probe_mode`: `shadow` or `live`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ProbeModeConfig {
    Shadow,
    Live,
}

/// `quota_model`: `window` (pay-as-you-go, the default) or `provisioned` (Azure PTU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum QuotaModelConfig {
    #[default]
    Window,
    Provisioned,
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
    /// This key's longest wait for a turn, instead of the router's.
    pub(crate) max_queue_wait_ms: Option<u64>,
    /// This key's waiting class when requests queue for a turn: lower is served first (0,
    /// the default, is the most urgent).
    pub(crate) priority: Option<u8>,
}

impl Config {
    /// Reads and checks `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, Problem> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut config = Self::parse(&text).with_context(|| format!("{}", path.display()))?;
        if let (Some(tls), Some(folder)) = (&mut config.server.tls, path.parent()) {
            tls.cert_file = folder.join(&tls.cert_file);
            tls.key_file = folder.join(&tls.key_file);
        }
        Ok(config)
    }

    pub(crate) fn parse(text: &str) -> Result<Self, Problem> {
        let config: Self = toml::from_str(text).map_err(|e| Problem::new(e.to_string()))?;
        if config.endpoints.is_empty() {
            bail!("endpoints: none configured; add an [[endpoints]] table");
        }
        Ok(config)
    }

    /// Who may see the status page; an error names the field.
    pub(crate) fn status_access(&self) -> Result<crate::status::Access, Problem> {
        let admin = match &self.server.admin_key_sha256 {
            Some(text) => Some(parse_digest(text).with_context(|| {
                "server.admin_key_sha256 must be 64 hex digits (`openai-router hash-key` prints them)".to_owned()
            })?),
            None => None,
        };
        Ok(crate::status::Access {
            enabled: self.server.status_page,
            admin,
        })
    }

    /// The gateway keys, checked.
    pub(crate) fn keys(&self) -> Result<Vec<GatewayKey>, Problem> {
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
                    max_queue_wait: key.max_queue_wait_ms.map(std::time::Duration::from_millis),
                    priority: key.priority,
                })
            })
            .collect()
    }
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
    fn a_groups_limits_are_read_and_its_model_must_be_served() {
        let config = |model: &str| {
            Config::parse(&format!(
                "[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n[[groups]]\nmodel = \"{model}\"\ntpm = 1000\nconcurrency = 2\n"
            ))
            .unwrap()
        };
        let served = config("m");
        assert_eq!(served.groups[0].tpm, Some(1000));
        assert_eq!(served.groups[0].concurrency, Some(2));
        assert!(served.builder().is_ok());
        let error = config("n").builder().err().unwrap().to_string();
        assert!(
            error.contains("groups[0].model") && error.contains("`n`"),
            "{error}"
        );
        let unknown = Config::parse(
            "[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n[[groups]]\nmodel = \"m\"\ntokens = 5\n",
        )
        .unwrap_err();
        assert!(format!("{unknown:#}").contains("tokens"), "{unknown:#}");
    }

    #[test]
    fn a_lease_too_short_to_renew_is_refused_naming_the_field() {
        let config = |ms: u64| {
            Config::parse(&format!(
                "[router]\nredis_lease_ms = {ms}\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n"
            ))
            .unwrap()
        };
        assert_eq!(config(5_000).router.redis_lease_ms, Some(5_000));
        let cluster = Config::parse(
            "[router]\nredis_cluster = true\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n",
        )
        .unwrap();
        let error = cluster.builder().err().unwrap().to_string();
        assert!(error.contains("router.redis_cluster"), "{error}");
        assert!(config(5_000).builder().is_ok());
        let error = config(100).builder().err().unwrap().to_string();
        assert!(error.contains("router.redis_lease_ms: 100"), "{error}");
        let slices = |ms: u64| {
            Config::parse(&format!(
                "[router]\nredis_slice_ms = {ms}\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n"
            ))
            .unwrap()
        };
        assert!(slices(0).builder().is_ok() && slices(250).builder().is_ok());
        let error = slices(5).builder().err().unwrap().to_string();
        assert!(error.contains("router.redis_slice_ms: 5"), "{error}");
    }

    #[test]
    fn the_learning_policy_is_read_and_checked_field_by_field() {
        let parse = |table: &str| {
            toml::from_str::<Config>(&format!(
                "[router.learning]\n{table}\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n"
            ))
            .unwrap()
            .router
            .learning
            .unwrap()
            .policy()
        };
        let policy = parse("deepest_cut = 0.8\nregrow = 0.5").unwrap();
        assert_eq!(policy, router_facade::Learning::new(0.95, 0.8, 0.05, 0.5));
        let error = parse("floor = 0").unwrap_err();
        assert!(error.contains("router.learning.floor = 0"), "{error}");
        let error = parse("cut = 0.6\ndeepest_cut = 0.7").unwrap_err();
        assert!(
            error.contains("deepest_cut = 0.7 is above cut = 0.6"),
            "{error}"
        );
        let error = parse("regrow = -1").unwrap_err();
        assert!(error.contains("router.learning.regrow"), "{error}");
    }

    #[test]
    fn the_health_probe_schedule_is_read_and_checked() {
        let parse = |table: &str| {
            toml::from_str::<Config>(&format!(
                "[router.health]\n{table}\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n"
            ))
            .unwrap()
            .router
            .health
            .unwrap()
            .policy()
        };
        let policy = parse("probe_after_ms = 5000\nprobe_interval_ms = 1000").unwrap();
        let default = router_facade::HealthPolicy::default();
        assert_eq!(
            policy,
            default.with_probes(
                std::time::Duration::from_secs(5),
                std::time::Duration::from_secs(1),
                default.max_probe_interval
            )
        );
        let error = parse("probe_interval_ms = 5").unwrap_err();
        assert!(
            error.contains("router.health.probe_interval_ms: 5"),
            "{error}"
        );
        let error = parse("probe_interval_ms = 2000\nmax_probe_interval_ms = 1000").unwrap_err();
        assert!(
            error.contains("router.health.max_probe_interval_ms: 1000 is shorter"),
            "{error}"
        );
        let unknown = toml::from_str::<Config>(
            "[router.health]\nprobe_every_ms = 1\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("probe_every_ms"), "{unknown}");
    }

    #[test]
    fn max_queue_wait_per_router_and_per_key() {
        let digest = crate::auth::hash_key("k");
        let config = Config::parse(&format!(
            "[router]\nmax_queue_wait_ms = 500\nprobe_interval_ms = 3000\nprobe_mode = \"live\"\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n[[keys]]\nname = \"patient\"\nsha256 = \"{digest}\"\nmax_queue_wait_ms = 10000\n",
        ))
        .unwrap();
        assert_eq!(config.router.max_queue_wait_ms, Some(500));
        assert_eq!(config.router.probe_interval_ms, Some(3000));
        assert_eq!(config.router.probe_mode, Some(ProbeModeConfig::Live));
        let keys = config.keys().unwrap();
        assert_eq!(
            keys[0].max_queue_wait,
            Some(std::time::Duration::from_secs(10))
        );
        config.builder().unwrap().build().unwrap();
    }

    #[test]
    fn key_digests_are_checked() {
        let config = Config::parse(
            "[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n[[keys]]\nname = \"k\"\nsha256 = \"xyz\"\n",
        )
        .unwrap();
        let error = config.keys().unwrap_err().to_string();
        assert!(error.contains("keys[0] (`k`): sha256"), "{error}");
        let admin = Config::parse(
            "[server]\nadmin_key_sha256 = \"abc\"\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n",
        )
        .unwrap()
        .status_access()
        .unwrap_err()
        .to_string();
        assert!(admin.contains("server.admin_key_sha256"), "{admin}");
    }
}
