//! From the configuration file to a router: endpoints, strategies, timeouts, per-key limits,
//! and the shared state store. Secrets are read from the environment variables the file names,
//! when the router is built (at start and on each reload).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use router_facade::{
    Endpoint, EntraId, EntraOptions, ProbeMode, QuotaModel, RateLimits, Router, RouterBuilder,
    StrategyKind,
};
use sha2::{Digest as _, Sha256};

use crate::config::{
    Config, EndpointConfig, EntraConfig, EntraCredential, Kind, ProbeModeConfig, QuotaModelConfig,
};
use crate::problem::{Context as _, Problem, bail};

impl Config {
    /// The router this configuration describes (secrets read from the environment now).
    pub(crate) async fn router(&self) -> Result<Router, Problem> {
        let mut builder = self.builder()?;
        let redis = match (&self.router.redis_url, &self.router.redis_url_env) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(var)) => Some(
                std::env::var(var)
                    .with_context(|| format!("router.redis_url_env: ${var} is not set"))?,
            ),
            (None, None) => None,
        };
        let learning = self.learning()?;
        if let Some(url) = redis {
            let mut options = state_redis::RedisOptions::default();
            if let Some(ms) = self.router.redis_lease_ms {
                options = options.with_lease_ttl(std::time::Duration::from_millis(ms));
            }
            if let Some(ms) = self.router.redis_slice_ms {
                options =
                    options.with_slices((ms > 0).then(|| std::time::Duration::from_millis(ms)));
            }
            if let Some(ms) = self.router.redis_timeout_ms {
                if ms == 0 {
                    bail!(
                        "router.redis_timeout_ms: 0 would answer every call locally; give a time in ms (default 100)"
                    );
                }
                options = options.with_timeout(std::time::Duration::from_millis(ms));
            }
            if let Some(learning) = learning {
                options = options.with_learning(learning);
            }
            let store = if self.router.redis_cluster == Some(true) {
                let nodes: Vec<String> = url
                    .split(',')
                    .map(|u| u.trim().to_owned())
                    .filter(|u| !u.is_empty())
                    .collect();
                state_redis::RedisStore::connect_cluster(&nodes, options).await
            } else {
                state_redis::RedisStore::connect(&url, options).await
            }
            .context("router.redis_url")?;
            builder = builder.state_store(std::sync::Arc::new(store));
        } else if let Some(learning) = learning {
            let store = router_facade::MemoryStore::with_learning(learning);
            builder = builder.state_store(std::sync::Arc::new(store));
        }
        Ok(builder.build()?)
    }

    pub(crate) fn builder(&self) -> Result<RouterBuilder, Problem> {
        // Checked here too, so that `check` reports a bad policy without connecting anywhere.
        self.learning()?;
        if self.router.redis_cluster == Some(true)
            && self.router.redis_url.is_none()
            && self.router.redis_url_env.is_none()
        {
            return Err(Problem::new(
                "router.redis_cluster: set, but no redis_url or redis_url_env names the nodes",
            ));
        }
        if let Some(ms) = self.router.redis_lease_ms
            && ms < 300
        {
            return Err(Problem::new(format!(
                "router.redis_lease_ms: {ms} is too short for a lease to be renewed (at least 300)"
            )));
        }
        if let Some(ms) = self.router.redis_slice_ms
            && (1..10).contains(&ms)
        {
            return Err(Problem::new(format!(
                "router.redis_slice_ms: {ms} is shorter than a Redis call takes to be worth it \
                 (0 for one call per request, else at least 10)"
            )));
        }
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
        if let Some(ms) = self.router.max_queue_wait_ms {
            builder = builder.max_queue_wait(Duration::from_millis(ms));
        }
        if let Some(ms) = self.router.probe_interval_ms {
            builder = builder.probe_interval(Duration::from_millis(ms));
        }
        if let Some(health) = &self.router.health {
            builder = builder.health_policy(health.policy().map_err(Problem::new)?);
        }
        if let Some(mode) = self.router.probe_mode {
            builder = builder.probe_mode(match mode {
                ProbeModeConfig::Shadow => ProbeMode::Shadow,
                ProbeModeConfig::Live => ProbeMode::Live,
            });
        }
        builder = self.cache_affinity(builder)?;
        for (model, fallbacks) in &self.router.fallbacks {
            builder = builder.fallbacks(model, fallbacks);
        }
        for (model, larger) in &self.router.context_window_fallbacks {
            builder = builder.context_window_fallback(model, larger);
        }
        let timeouts = self.timeouts();
        for (i, e) in self.endpoints.iter().enumerate() {
            builder = builder.endpoint(endpoint(i, e, timeouts, self.router.max_answer_bytes)?);
        }
        for key in &self.keys {
            builder =
                builder.caller_limits(&key.name, rate_limits(key.rpm, key.tpm, key.concurrency));
        }
        for (i, group) in self.groups.iter().enumerate() {
            let served = self.endpoints.iter().any(|e| {
                e.models.contains(&group.model) || e.deployments.contains_key(&group.model)
            });
            if !served {
                bail!(
                    "groups[{i}].model: no endpoint serves `{}` (list it in an endpoint's models \
                     or deployments)",
                    group.model
                );
            }
            let limits = rate_limits(group.rpm, group.tpm, group.concurrency);
            builder = builder.group_limits(&group.model, limits);
        }
        Ok(builder)
    }

    /// Prompt-cache affinity as `[router]` sets it; an error names the field out of range.
    fn cache_affinity(&self, builder: RouterBuilder) -> Result<RouterBuilder, Problem> {
        let r = &self.router;
        if r.cache_affinity == Some(false) {
            return Ok(builder.no_cache_affinity());
        }
        let mut affinity = router_facade::CacheAffinity::default();
        if let Some(tolerance) = r.cache_affinity_tolerance {
            if !(0.0..=100.0).contains(&tolerance) {
                bail!("router.cache_affinity_tolerance: {tolerance} is not between 0 and 100");
            }
            affinity = affinity.with_tolerance(tolerance);
        }
        if let Some(ms) = r.cache_affinity_ttl_ms {
            affinity = affinity.with_ttl(Duration::from_millis(ms));
        }
        self.affinity_header()?;
        Ok(builder.cache_affinity(affinity))
    }

    /// `router.cache_affinity_header`, lowercased, when set; an error when it is not a header
    /// name.
    pub(crate) fn affinity_header(&self) -> Result<Option<String>, Problem> {
        let Some(name) = &self.router.cache_affinity_header else {
            return Ok(None);
        };
        let lower = name.trim().to_ascii_lowercase();
        if axum::http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            bail!("router.cache_affinity_header: `{name}` is not a header name");
        }
        Ok(Some(lower))
    }

    /// `[router.learning]` as the library's policy, when configured; an error names the field.
    pub(crate) fn learning(&self) -> Result<Option<router_facade::Learning>, Problem> {
        self.router
            .learning
            .map(|l| l.policy().map_err(Problem::new))
            .transpose()
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
}

/// Entra ID providers by their description and the SHA-256 of their secret.
type Providers = HashMap<(EntraConfig, [u8; 32]), Arc<EntraId>>;

/// The Entra ID token provider `entra` describes. Providers are kept for the life of the
/// process, one per description (and secret): endpoints sharing a credential share its token,
/// and a reload keeps the token held (and the endpoints' state, which a new provider would
/// reset).
fn entra_provider(
    at: &str,
    entra: &EntraConfig,
) -> Result<Arc<dyn router_facade::TokenProvider>, Problem> {
    static PROVIDERS: OnceLock<Mutex<Providers>> = OnceLock::new();
    let mut options = EntraOptions::default();
    if let Some(host) = &entra.authority_host {
        let url = url::Url::parse(host)
            .with_context(|| format!("{at}: entra.authority_host `{host}`"))?;
        options = options.with_authority_host(url);
    }
    if let Some(scope) = &entra.scope {
        options = options.with_scope(scope);
    }
    let secret = match (entra.credential, &entra.client_secret_env) {
        (EntraCredential::ClientSecret, Some(var)) => Some(
            std::env::var(var)
                .with_context(|| format!("{at}: entra.client_secret_env: ${var} is not set"))?,
        ),
        (EntraCredential::ClientSecret, None) => {
            bail!("{at}: entra.client_secret_env is required for credential = \"client-secret\"")
        }
        (_, Some(_)) => {
            bail!("{at}: entra.client_secret_env is only for credential = \"client-secret\"")
        }
        (_, None) => None,
    };
    let digest: [u8; 32] = Sha256::digest(secret.as_deref().unwrap_or_default()).into();
    let key = (entra.clone(), digest);
    let mut providers = PROVIDERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(provider) = providers.get(&key) {
        return Ok(Arc::clone(provider) as Arc<dyn router_facade::TokenProvider>);
    }
    let required = |field: &Option<String>, name: &str| {
        field.clone().with_context(|| {
            format!("{at}: entra.{name} is required for credential = \"client-secret\"")
        })
    };
    let built = match entra.credential {
        EntraCredential::ClientSecret => EntraId::client_secret(
            &required(&entra.tenant_id, "tenant_id")?,
            required(&entra.client_id, "client_id")?,
            &secrecy::SecretString::from(secret.unwrap_or_default()),
            options,
        ),
        EntraCredential::WorkloadIdentity => EntraId::workload_identity_with(
            entra.tenant_id.clone(),
            entra.client_id.clone(),
            entra.token_file.clone(),
            options,
        ),
        EntraCredential::ManagedIdentity => {
            EntraId::managed_identity(entra.client_id.clone(), options)
        }
        EntraCredential::AzureCli => EntraId::azure_cli(entra.tenant_id.clone(), options),
    }
    .with_context(|| format!("{at}: entra"))?;
    let provider = Arc::new(built);
    providers.insert(key, Arc::clone(&provider));
    Ok(provider as Arc<dyn router_facade::TokenProvider>)
}

/// The `i`th `[[endpoints]]` table as the library's endpoint; an error names it.
/// A key's or a group's limits as the file sets them.
fn rate_limits(rpm: Option<u64>, tpm: Option<u64>, concurrency: Option<u32>) -> RateLimits {
    let mut limits = RateLimits::new();
    if let Some(rpm) = rpm {
        limits = limits.with_rpm(rpm);
    }
    if let Some(tpm) = tpm {
        limits = limits.with_tpm(tpm);
    }
    if let Some(concurrency) = concurrency {
        limits = limits.with_concurrency(concurrency);
    }
    limits
}

fn endpoint(
    i: usize,
    e: &EndpointConfig,
    timeouts: Option<router_facade::Timeouts>,
    max_answer_bytes: Option<usize>,
) -> Result<Endpoint, Problem> {
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
    match (&e.api_key_env, &e.entra) {
        (Some(_), Some(_)) => bail!("{at}: api_key_env and entra exclude each other"),
        (_, Some(_)) if e.kind != Kind::Azure => {
            bail!("{at}: entra is for Azure endpoints (kind = \"azure\")")
        }
        (Some(var), None) => {
            let key = std::env::var(var)
                .with_context(|| format!("{at}: api_key_env: ${var} is not set"))?;
            endpoint = endpoint.api_key(key);
        }
        (None, Some(entra)) => endpoint = endpoint.token_provider(entra_provider(&at, entra)?),
        (None, None) if e.kind == Kind::Azure => bail!(
            "{at}: Azure needs api_key_env (the key is read from the environment) or entra = {{ credential = ... }}"
        ),
        (None, None) => {}
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
    if e.quota_model == QuotaModelConfig::Provisioned {
        endpoint = endpoint.quota_model(QuotaModel::Provisioned);
    }
    if let Some(timeouts) = timeouts {
        endpoint = endpoint.timeouts(timeouts);
    }
    if let Some(bytes) = max_answer_bytes {
        endpoint = endpoint.max_answer_bytes(bytes);
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

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
    fn entra_is_for_azure_instead_of_a_key_and_names_what_is_missing() {
        let error = |endpoint: &str| {
            let config = Config::parse(&format!(
                "[[endpoints]]\nname = \"az\"\nurl = \"https://r.openai.azure.com\"\nmodels = [\"m\"]\n{endpoint}\n"
            ))
            .unwrap();
            config.builder().err().map(|e| format!("{e:#}"))
        };
        let azure = "kind = \"azure\"\napi_version = \"2024-10-21\"";
        let cases = [
            (
                format!(
                    "{azure}\napi_key_env = \"PATH\"\nentra = {{ credential = \"managed-identity\" }}"
                ),
                "api_key_env and entra exclude each other",
            ),
            (
                "kind = \"openai\"\nentra = { credential = \"azure-cli\" }".to_owned(),
                "entra is for Azure endpoints",
            ),
            (
                format!(
                    "{azure}\nentra = {{ credential = \"client-secret\", tenant_id = \"t\", client_id = \"c\" }}"
                ),
                "entra.client_secret_env is required",
            ),
            (
                format!(
                    "{azure}\nentra = {{ credential = \"client-secret\", client_id = \"c\", client_secret_env = \"PATH\" }}"
                ),
                "entra.tenant_id is required",
            ),
            (
                format!(
                    "{azure}\nentra = {{ credential = \"managed-identity\", client_secret_env = \"PATH\" }}"
                ),
                "client_secret_env is only for",
            ),
            (
                format!(
                    "{azure}\nentra = {{ credential = \"managed-identity\", authority_host = \"http://login.example.com\" }}"
                ),
                "must be https",
            ),
            (
                azure.to_owned(),
                "api_key_env (the key is read from the environment) or entra",
            ),
        ];
        for (endpoint, expected) in cases {
            let error = error(&endpoint).unwrap_or_default();
            assert!(error.contains(expected), "{endpoint}: {error}");
            assert!(error.contains("endpoints[0] (`az`)"), "{error}");
        }
        let unknown = Config::parse(&format!(
            "[[endpoints]]\nname = \"az\"\nurl = \"https://r\"\nmodels = [\"m\"]\n{azure}\nentra = {{ credential = \"password\" }}\n"
        ))
        .unwrap_err();
        assert!(format!("{unknown:#}").contains("password"), "{unknown:#}");
        // Configured well, the router builds, and a second endpoint with the same credential
        // shares its provider (one token).
        assert!(
            error(&format!(
                "{azure}\nentra = {{ credential = \"managed-identity\" }}"
            ))
            .is_none()
        );
        assert!(error(&format!("{azure}\nentra = {{ credential = \"client-secret\", tenant_id = \"72f988bf-86f1-41af-91ab-2d7cd011db47\", client_id = \"c\", client_secret_env = \"PATH\" }}")).is_none());
        let shared = EntraConfig {
            credential: EntraCredential::ManagedIdentity,
            tenant_id: None,
            client_id: Some("c".to_owned()),
            client_secret_env: None,
            token_file: None,
            authority_host: None,
            scope: None,
        };
        let a = entra_provider("a", &shared).unwrap();
        let b = entra_provider("b", &shared).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn cache_affinity_settings_are_checked() {
        let error = |router: &str| {
            let config = Config::parse(&format!(
                "[router]\n{router}\n[[endpoints]]\nname = \"o\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\n"
            ))
            .unwrap();
            config.builder().err().map(|e| format!("{e:#}"))
        };
        assert!(
            error("cache_affinity_tolerance = -1.0")
                .unwrap()
                .contains("cache_affinity_tolerance")
        );
        assert!(
            error("cache_affinity_header = \"not a header\"")
                .unwrap()
                .contains("cache_affinity_header")
        );
        assert!(error("cache_affinity = false").is_none());
        assert!(error("max_answer_bytes = 1000000").is_none());
        assert!(error("cache_affinity_tolerance = 0.25\ncache_affinity_ttl_ms = 60000\ncache_affinity_header = \"X-Session-Id\"").is_none());
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
    fn provisioned_throughput_is_set_per_endpoint_and_refuses_an_rpm() {
        let endpoint = |extra: &str| {
            format!(
                "[[endpoints]]\nname = \"ptu\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1/v1\"\nmodels = [\"m\"]\ntpm = 30000\n{extra}"
            )
        };
        let config = Config::parse(&endpoint("quota_model = \"provisioned\"\n")).unwrap();
        assert_eq!(
            config.endpoints[0].quota_model,
            QuotaModelConfig::Provisioned
        );
        config.builder().unwrap().build().unwrap();
        let config =
            Config::parse(&endpoint("quota_model = \"provisioned\"\nrpm = 180\n")).unwrap();
        let error = format!("{:#}", config.builder().unwrap().build().unwrap_err());
        assert!(
            error.contains("endpoints[0] (`ptu`): rpm is not metered under provisioned"),
            "{error}"
        );
        let error = Config::parse(&endpoint("quota_model = \"ptu\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("quota_model") && error.contains("provisioned"),
            "{error}"
        );
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
}
