//! What a router is made of: endpoints, the models they serve, strategies and policies.

use std::collections::HashSet;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use router_core::{Backend, Error, HealthPolicy, Limits, StateStore, Strategy, StrategyKind};
#[cfg(feature = "openai")]
use secrecy::{ExposeSecret, SecretString};

#[cfg(feature = "openai")]
use backend_openai::Timeouts;

/// One upstream endpoint and the models it serves.
///
/// A *model group* is the name callers use (`"gpt-4o-mini"`); each endpoint maps it to its own
/// *deployment* name (Azure deployments are named per resource). The pair is a *deployment*,
/// the unit the router tracks: its load, latency, cooldowns and failures.
#[must_use]
#[derive(Clone)]
pub struct Endpoint {
    pub(crate) name: String,
    pub(crate) kind: EndpointKind,
    pub(crate) deployments: Vec<DeploymentSpec>,
    pub(crate) weight: u32,
    pub(crate) priority: u32,
    pub(crate) limits: Limits,
    #[cfg(feature = "openai")]
    pub(crate) timeouts: Option<Timeouts>,
}

#[derive(Clone)]
pub(crate) enum EndpointKind {
    #[cfg(feature = "openai")]
    OpenAi {
        base_url: String,
        key: Option<SecretString>,
        organization: Option<String>,
        project: Option<String>,
    },
    #[cfg(feature = "azure")]
    Azure {
        url: String,
        api: Option<backend_azure::AzureApi>,
        key: Option<SecretString>,
        token_provider: Option<Arc<dyn backend_azure::TokenProvider>>,
    },
    Custom(Arc<dyn Backend>),
}

/// A model group served by an endpoint under its own deployment name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeploymentSpec {
    /// The model group callers ask for.
    pub model: String,
    /// The name this endpoint knows it by.
    pub deployment: String,
    /// Overrides the endpoint's weight.
    pub weight: Option<u32>,
    /// Overrides the endpoint's priority tier.
    pub priority: Option<u32>,
    /// Overrides the endpoint's tokens per minute.
    pub tpm: Option<u64>,
    /// Overrides the endpoint's requests per minute.
    pub rpm: Option<u64>,
}

impl Endpoint {
    fn new(name: impl Into<String>, kind: EndpointKind) -> Self {
        Self {
            name: name.into(),
            kind,
            deployments: Vec::new(),
            weight: 1,
            priority: 0,
            limits: Limits::default(),
            #[cfg(feature = "openai")]
            timeouts: None,
        }
    }

    /// OpenAI, or any OpenAI-compatible server, at `base_url` (for example
    /// `https://api.openai.com/v1`).
    #[cfg(feature = "openai")]
    pub fn openai(name: impl Into<String>, base_url: impl Into<String>) -> Self {
        Self::new(
            name,
            EndpointKind::OpenAi {
                base_url: base_url.into(),
                key: None,
                organization: None,
                project: None,
            },
        )
    }

    /// An Azure OpenAI resource at `url` (`https://{resource}.openai.azure.com`). Choose the URL
    /// form with [`api_version`](Self::api_version) or [`v1`](Self::v1).
    #[cfg(feature = "azure")]
    pub fn azure(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self::new(
            name,
            EndpointKind::Azure {
                url: url.into(),
                api: None,
                key: None,
                token_provider: None,
            },
        )
    }

    /// Your own [`Backend`].
    pub fn custom(name: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        Self::new(name, EndpointKind::Custom(backend))
    }

    /// Serves the model group `model` under the same name.
    pub fn model(self, model: impl Into<String>) -> Self {
        let model = model.into();
        self.deployment(model.clone(), model)
    }

    /// Serves the model group `model` as this endpoint's `deployment`.
    pub fn deployment(mut self, model: impl Into<String>, deployment: impl Into<String>) -> Self {
        self.deployments.push(DeploymentSpec {
            model: model.into(),
            deployment: deployment.into(),
            weight: None,
            priority: None,
            tpm: None,
            rpm: None,
        });
        self
    }

    /// Serves a deployment with its own weight or priority.
    pub fn deployment_spec(mut self, spec: DeploymentSpec) -> Self {
        self.deployments.push(spec);
        self
    }

    /// The weight of its deployments for the `weighted` strategy (default 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Its priority tier (default 0; lower is preferred): traffic spills to a higher tier only
    /// when no deployment of a lower one can take it.
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// Tokens per minute of each deployment on this endpoint: the router keeps each below it
    /// (reserving each request's estimate, reconciling with the real usage). Limits not set
    /// are learned from the upstream's `x-ratelimit-limit-*` headers when it sends them.
    pub fn tpm(mut self, tpm: u64) -> Self {
        self.limits.tpm = Some(tpm);
        self
    }

    /// Requests per minute of each deployment on this endpoint.
    pub fn rpm(mut self, rpm: u64) -> Self {
        self.limits.rpm = Some(rpm);
        self
    }

    /// The burst window of the quotas: a deployment may use this much of its per-minute limit
    /// at once (default 10 s; Azure evaluates over 1 s or 10 s).
    pub fn quota_window(mut self, window: Duration) -> Self {
        self.limits.window = window;
        self
    }

    /// The key: `Authorization: Bearer` for OpenAI, `api-key` for Azure. Ignored for custom
    /// backends.
    #[cfg(feature = "openai")]
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        let secret = SecretString::from(key.into());
        match &mut self.kind {
            EndpointKind::OpenAi { key, .. } => *key = Some(secret),
            #[cfg(feature = "azure")]
            EndpointKind::Azure { key, .. } => *key = Some(secret),
            EndpointKind::Custom(_) => {}
        }
        self
    }

    /// OpenAI: sends `OpenAI-Organization`.
    #[cfg(feature = "openai")]
    pub fn organization(mut self, value: impl Into<String>) -> Self {
        if let EndpointKind::OpenAi { organization, .. } = &mut self.kind {
            *organization = Some(value.into());
        }
        self
    }

    /// OpenAI: sends `OpenAI-Project`.
    #[cfg(feature = "openai")]
    pub fn project(mut self, value: impl Into<String>) -> Self {
        if let EndpointKind::OpenAi { project, .. } = &mut self.kind {
            *project = Some(value.into());
        }
        self
    }

    /// Azure: the deployments URL form with this dated API version (`2024-10-21`).
    #[cfg(feature = "azure")]
    pub fn api_version(mut self, version: impl Into<String>) -> Self {
        if let EndpointKind::Azure { api, .. } = &mut self.kind {
            *api = Some(backend_azure::AzureApi::Deployments {
                api_version: version.into(),
            });
        }
        self
    }

    /// Azure: the `/openai/v1` URL form.
    #[cfg(feature = "azure")]
    pub fn v1(mut self) -> Self {
        if let EndpointKind::Azure { api, .. } = &mut self.kind {
            *api = Some(backend_azure::AzureApi::V1 { api_version: None });
        }
        self
    }

    /// Azure: Entra ID bearer tokens from `provider` instead of a key.
    #[cfg(feature = "azure")]
    pub fn token_provider(mut self, provider: Arc<dyn backend_azure::TokenProvider>) -> Self {
        if let EndpointKind::Azure { token_provider, .. } = &mut self.kind {
            *token_provider = Some(provider);
        }
        self
    }

    /// Connect, first-byte and between-chunk timeouts (built-in backends).
    #[cfg(feature = "openai")]
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = Some(timeouts);
        self
    }

    /// The endpoint's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the upstream accepts `stream_options` (for the usage chunk). OpenAI and Azure's
    /// v1 form do; Azure's dated API versions do from `2024-09-01-preview` (GA `2024-10-21`);
    /// a custom backend is not assumed to.
    pub(crate) fn accepts_stream_usage(&self) -> bool {
        match &self.kind {
            #[cfg(feature = "openai")]
            EndpointKind::OpenAi { .. } => true,
            #[cfg(feature = "azure")]
            EndpointKind::Azure { api, .. } => match api {
                Some(backend_azure::AzureApi::Deployments { api_version }) => api_version
                    .get(..10)
                    .is_some_and(|date| date >= "2024-09-01"),
                _ => true,
            },
            EndpointKind::Custom(_) => false,
        }
    }

    /// A hash of everything that makes this endpoint's backend what it is (URL, credential,
    /// dialect, timeouts): a reconfiguration keeps the live state of a deployment only when it
    /// is unchanged. Secrets are hashed in memory, never shown.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.name.hash(&mut h);
        match &self.kind {
            #[cfg(feature = "openai")]
            EndpointKind::OpenAi {
                base_url,
                key,
                organization,
                project,
            } => {
                ("openai", base_url, organization, project).hash(&mut h);
                key.as_ref().map(ExposeSecret::expose_secret).hash(&mut h);
            }
            #[cfg(feature = "azure")]
            EndpointKind::Azure {
                url,
                api,
                key,
                token_provider,
            } => {
                ("azure", url, format!("{api:?}")).hash(&mut h);
                key.as_ref().map(ExposeSecret::expose_secret).hash(&mut h);
                token_provider
                    .as_ref()
                    .map(|p| Arc::as_ptr(p).cast::<()>() as usize)
                    .hash(&mut h);
            }
            EndpointKind::Custom(backend) => {
                ("custom", Arc::as_ptr(backend).cast::<()>() as usize).hash(&mut h);
            }
        }
        #[cfg(feature = "openai")]
        format!("{:?}", self.timeouts).hash(&mut h);
        h.finish()
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            #[cfg(feature = "openai")]
            EndpointKind::OpenAi { base_url, .. } => format!("openai {base_url}"),
            #[cfg(feature = "azure")]
            EndpointKind::Azure { url, .. } => format!("azure {url}"),
            EndpointKind::Custom(backend) => format!("custom {backend:?}"),
        };
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("kind", &kind)
            .field("deployments", &self.deployments)
            .field("weight", &self.weight)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

/// Makes a fresh strategy for each model group.
pub type StrategyFactory = Arc<dyn Fn() -> Box<dyn Strategy> + Send + Sync>;

/// How a group picks its deployment.
#[derive(Clone)]
pub(crate) enum StrategyChoice {
    Kind(StrategyKind),
    Custom(&'static str, StrategyFactory),
}

impl StrategyChoice {
    pub(crate) fn build(&self) -> Box<dyn Strategy> {
        match self {
            Self::Kind(kind) => kind.build(),
            Self::Custom(_, factory) => factory(),
        }
    }
}

impl fmt::Debug for StrategyChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kind(kind) => write!(f, "{kind}"),
            Self::Custom(name, _) => write!(f, "custom({name})"),
        }
    }
}

/// How a reservation is reconciled once the answer says what the request used.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuotaAccounting {
    /// As Azure and OpenAI count against their limits: the prompt plus the whole output cap,
    /// at admission. The prompt estimate is corrected to the upstream's count; the unused
    /// part of the cap is not given back (the upstream does not give it back either).
    #[default]
    Admission,
    /// The real usage: the prompt and the tokens generated. For upstreams whose limits count
    /// what was generated.
    Usage,
}

/// Retries across deployments.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per request, each on a different deployment. Default 3.
    pub max_attempts: u32,
    /// Retries allowed as a share of requests (0.2 = 20 %). Default 0.2.
    pub budget_ratio: f64,
    /// Retries allowed when the router is quiet (the budget's floor and start). Default 10.
    pub budget_min: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            budget_ratio: 0.2,
            budget_min: 10,
        }
    }
}

/// Builds a [`Router`](crate::Router); `build()` checks everything once.
#[must_use]
#[derive(Clone)]
pub struct RouterBuilder {
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) strategy: StrategyChoice,
    pub(crate) group_strategies: Vec<(String, StrategyChoice)>,
    pub(crate) retry: RetryPolicy,
    pub(crate) health: HealthPolicy,
    pub(crate) request_timeout: Duration,
    pub(crate) latency_decay: Duration,
    pub(crate) seed: Option<u64>,
    pub(crate) store: Option<Arc<dyn StateStore>>,
    pub(crate) expected_completion: u32,
    pub(crate) max_waiting: usize,
    pub(crate) accounting: QuotaAccounting,
    pub(crate) group_limits: Vec<(String, crate::RateLimits)>,
    pub(crate) caller_limits: Vec<(String, crate::RateLimits)>,
    pub(crate) default_caller_limits: Option<crate::RateLimits>,
}

impl Default for RouterBuilder {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            strategy: StrategyChoice::Kind(StrategyKind::default()),
            group_strategies: Vec::new(),
            retry: RetryPolicy::default(),
            health: HealthPolicy::default(),
            request_timeout: Duration::from_secs(600),
            latency_decay: Duration::from_secs(10),
            seed: None,
            store: None,
            expected_completion: 256,
            max_waiting: 1024,
            accounting: QuotaAccounting::default(),
            group_limits: Vec::new(),
            caller_limits: Vec::new(),
            default_caller_limits: None,
        }
    }
}

impl RouterBuilder {
    /// Adds an endpoint.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// The strategy of every model group (default: least latency).
    pub fn strategy(mut self, kind: StrategyKind) -> Self {
        self.strategy = StrategyChoice::Kind(kind);
        self
    }

    /// The strategy by its config name (`round-robin`, `least-busy`, `least-connection`,
    /// `least-latency`, `weighted`).
    ///
    /// # Errors
    ///
    /// A [`Config`](router_core::ErrorKind::Config) error for an unknown name.
    pub fn strategy_name(self, name: &str) -> Result<Self, Error> {
        Ok(self.strategy(name.parse()?))
    }

    /// Your own strategy for every group; `factory` is called once per group.
    pub fn custom_strategy(
        mut self,
        name: &'static str,
        factory: impl Fn() -> Box<dyn Strategy> + Send + Sync + 'static,
    ) -> Self {
        self.strategy = StrategyChoice::Custom(name, Arc::new(factory));
        self
    }

    /// A different strategy for one model group.
    pub fn group_strategy(mut self, model: impl Into<String>, kind: StrategyKind) -> Self {
        self.group_strategies
            .push((model.into(), StrategyChoice::Kind(kind)));
        self
    }

    /// Retries across deployments.
    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Attempts per request, each on a different deployment (default 3).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.retry.max_attempts = attempts;
        self
    }

    /// Cooldowns and ejections.
    pub fn health_policy(mut self, health: HealthPolicy) -> Self {
        self.health = health;
        self
    }

    /// One deadline per request, across all its attempts (default 600 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The latency estimate's time constant (default 10 s).
    pub fn latency_decay(mut self, decay: Duration) -> Self {
        self.latency_decay = decay;
        self
    }

    /// Where quota use and shared cooldowns live (default: this process's memory). A shared
    /// store (`state-redis`) makes replicas stay within one quota together.
    pub fn state_store(mut self, store: Arc<dyn StateStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// How reservations are reconciled with what requests used (default: as the upstream
    /// counts at admission).
    pub fn quota_accounting(mut self, accounting: QuotaAccounting) -> Self {
        self.accounting = accounting;
        self
    }

    /// Limits the router enforces on a model group, whoever calls.
    pub fn group_limits(mut self, model: impl Into<String>, limits: crate::RateLimits) -> Self {
        self.group_limits.push((model.into(), limits));
        self
    }

    /// Limits the router enforces on one caller (`RequestOptions::caller`).
    pub fn caller_limits(mut self, caller: impl Into<String>, limits: crate::RateLimits) -> Self {
        self.caller_limits.push((caller.into(), limits));
        self
    }

    /// Limits for callers without limits of their own.
    pub fn default_caller_limits(mut self, limits: crate::RateLimits) -> Self {
        self.default_caller_limits = Some(limits);
        self
    }

    /// The router-side limits that apply to a request for `model` from `caller`.
    pub(crate) fn scopes(
        &self,
        model: &str,
        caller: Option<&str>,
    ) -> Vec<(String, crate::RateLimits)> {
        let mut scopes = Vec::new();
        // A scope that limits nothing is left out: it would cost an estimate and a lookup.
        if let Some((_, limits)) = self.group_limits.iter().rev().find(|(m, _)| m == model)
            && limits.is_limited()
        {
            scopes.push((format!("group:{model}"), *limits));
        }
        if let Some(caller) = caller {
            let own = self
                .caller_limits
                .iter()
                .rev()
                .find(|(c, _)| c == caller)
                .map(|(_, l)| *l);
            if let Some(limits) = own.or(self.default_caller_limits)
                && limits.is_limited()
            {
                scopes.push((format!("caller:{caller}"), limits));
            }
        }
        scopes
    }

    /// Output tokens reserved for a request that sets no cap (default 256).
    pub fn expected_completion(mut self, tokens: u32) -> Self {
        self.expected_completion = tokens;
        self
    }

    /// How many requests may wait, per router, for a deployment's quota or cooldown to free
    /// up (default 1024; 0 never waits). A request waits only when the soonest recovery comes
    /// before its deadline; otherwise it fails at once with a rate-limit error whose
    /// `retry_after` is that recovery.
    pub fn max_waiting(mut self, requests: usize) -> Self {
        self.max_waiting = requests;
        self
    }

    /// Seeds the router's random choices, to replay a run exactly.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks the whole configuration; errors name the field and the value.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.endpoints.is_empty() {
            return Err(Error::config(
                "endpoints: none configured; add one with .endpoint(...)",
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::config("retry.max_attempts: must be at least 1"));
        }
        if !(0.0..=10.0).contains(&self.retry.budget_ratio) {
            return Err(Error::config(format!(
                "retry.budget_ratio: {} is outside 0 to 10",
                self.retry.budget_ratio
            )));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::config("request_timeout: must be more than zero"));
        }
        if self.latency_decay.is_zero() {
            return Err(Error::config("latency_decay: must be more than zero"));
        }
        let mut names = HashSet::new();
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let at = format!("endpoints[{i}] (`{}`)", endpoint.name);
            if endpoint.name.trim().is_empty() {
                return Err(Error::config(format!(
                    "endpoints[{i}]: name must not be empty"
                )));
            }
            if !names.insert(endpoint.name.as_str()) {
                return Err(Error::config(format!("{at}: the name is used twice")));
            }
            if endpoint.deployments.is_empty() {
                return Err(Error::config(format!(
                    "{at}: serves no model; add .model(...) or .deployment(model, deployment)"
                )));
            }
            if endpoint.weight == 0 {
                return Err(Error::config(format!("{at}: weight must be at least 1")));
            }
            if endpoint.limits.tpm == Some(0) || endpoint.limits.rpm == Some(0) {
                return Err(Error::config(format!(
                    "{at}: tpm/rpm must be at least 1 (leave unset for no limit)"
                )));
            }
            if endpoint.limits.window.is_zero() {
                return Err(Error::config(format!(
                    "{at}: quota_window must be more than zero"
                )));
            }
            let mut models = HashSet::new();
            for spec in &endpoint.deployments {
                if spec.model.trim().is_empty() || spec.deployment.trim().is_empty() {
                    return Err(Error::config(format!(
                        "{at}: a model or deployment name is empty"
                    )));
                }
                if spec.tpm == Some(0) || spec.rpm == Some(0) {
                    return Err(Error::config(format!(
                        "{at}: deployment `{}` tpm/rpm must be at least 1 (leave unset for no limit)",
                        spec.deployment
                    )));
                }
                if spec.weight == Some(0) {
                    return Err(Error::config(format!(
                        "{at}: deployment `{}` weight must be at least 1",
                        spec.deployment
                    )));
                }
                if !models.insert(spec.model.as_str()) {
                    return Err(Error::config(format!(
                        "{at}: model `{}` is served twice by the same endpoint",
                        spec.model
                    )));
                }
            }
        }
        for (model, _) in &self.group_strategies {
            if !self
                .endpoints
                .iter()
                .any(|e| e.deployments.iter().any(|d| &d.model == model))
            {
                return Err(Error::config(format!(
                    "group_strategy: no endpoint serves model `{model}`"
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RouterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterBuilder")
            .field("endpoints", &self.endpoints)
            .field("strategy", &self.strategy)
            .field("retry", &self.retry)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RateLimits;

    #[test]
    fn scopes_that_limit_nothing_are_left_out() {
        let builder = RouterBuilder::default()
            .group_limits("gpt-4o-mini", RateLimits::new())
            .caller_limits("open", RateLimits::new())
            .caller_limits("metered", RateLimits::new().with_tpm(1_000))
            .default_caller_limits(RateLimits::new().with_rpm(60));
        assert!(builder.scopes("gpt-4o-mini", None).is_empty());
        // Its own (empty) limits override the default: nothing to check.
        assert!(builder.scopes("gpt-4o-mini", Some("open")).is_empty());
        let metered = builder.scopes("gpt-4o-mini", Some("metered"));
        assert_eq!(metered.len(), 1);
        assert_eq!(metered[0].0, "caller:metered");
        assert!(metered[0].1.counts_tokens());
        let other = builder.scopes("gpt-4o-mini", Some("someone"));
        assert_eq!(other.len(), 1);
        assert!(!other[0].1.counts_tokens());
    }
}
