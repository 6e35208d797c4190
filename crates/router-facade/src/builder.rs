//! What a router is made of: its endpoints, strategies and policies, checked once by
//! [`RouterBuilder::build`](crate::RouterBuilder::build).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use router_core::{
    Error, HealthPolicy, LeastLatency, ProbeMode, QuotaModel, StateStore, Strategy, StrategyKind,
};

use crate::endpoint::Endpoint;

/// Makes a fresh strategy for each model group.
pub type StrategyFactory = Arc<dyn Fn() -> Box<dyn Strategy> + Send + Sync>;

/// How a group picks its deployment.
#[derive(Clone)]
pub(crate) enum StrategyChoice {
    Kind(StrategyKind),
    Custom(&'static str, StrategyFactory),
}

impl StrategyChoice {
    /// A fresh strategy; least latency probes starved deployments every `probe_interval`, by
    /// `probe_mode`.
    pub(crate) fn build(
        &self,
        probe_interval: Duration,
        probe_mode: ProbeMode,
    ) -> Box<dyn Strategy> {
        match self {
            Self::Kind(StrategyKind::LeastLatency) => Box::new(
                LeastLatency::with_probe_interval(probe_interval).with_probe_mode(probe_mode),
            ),
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
    /// Retries allowed as a share of requests (0.2 = 20 %): the budget saves at most this
    /// share of the last ten seconds' requests, or 100 retries (or `budget_min`) when that
    /// is more. Default 0.2.
    pub budget_ratio: f64,
    /// Retries a new router may make before any request has paid into the budget. Default 10.
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
    pub(crate) max_queue_wait: Duration,
    pub(crate) probe_interval: Duration,
    pub(crate) probe_mode: ProbeMode,
    pub(crate) accounting: QuotaAccounting,
    pub(crate) group_limits: Vec<(String, crate::RateLimits)>,
    pub(crate) caller_limits: Vec<(String, crate::RateLimits)>,
    pub(crate) default_caller_limits: Option<crate::RateLimits>,
    pub(crate) fallbacks: Vec<(String, Vec<String>)>,
    pub(crate) context_fallbacks: Vec<(String, String)>,
    pub(crate) cache_affinity: Option<crate::CacheAffinity>,
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
            max_queue_wait: Duration::from_secs(2),
            probe_interval: LeastLatency::default().probe_interval,
            probe_mode: ProbeMode::Shadow,
            accounting: QuotaAccounting::default(),
            group_limits: Vec::new(),
            caller_limits: Vec::new(),
            default_caller_limits: None,
            fallbacks: Vec::new(),
            context_fallbacks: Vec::new(),
            cache_affinity: Some(crate::CacheAffinity::default()),
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

    /// The longest a request may wait for its turn (quota to free, a cooldown to pass, a
    /// router-side limit to have room), default 2 s; separate from, and never longer than,
    /// its deadline. A request whose expected wait (the soonest recovery, and the requests
    /// queued ahead of it at the rate the quota frees) is longer is refused at once with
    /// [`Throttled`](router_core::ErrorKind::Throttled) and a `retry_after` of that
    /// expected wait, rather than held until its deadline. `RequestOptions::max_queue_wait`
    /// sets it per request.
    pub fn max_queue_wait(mut self, wait: Duration) -> Self {
        self.max_queue_wait = wait;
        self
    }

    /// Prompt-cache affinity (on by default): requests with the same cache key
    /// (`prompt_cache_key`, else `user`, else [`RequestOptions::with_cache_key`]) go to the
    /// deployment that served the key last, where the upstream's prompt cache holds their
    /// prefix, while it can take them, is not much busier than an alternative drawn at random
    /// (`affinity.tolerance`; alternatives are the other deployments that do not look slow)
    /// and typically answers at most `affinity.slower` times slower than the fastest
    /// deployment that could take the request ([`crate::CacheAffinity`]).
    ///
    /// [`RequestOptions::with_cache_key`]: crate::RequestOptions::with_cache_key
    pub fn cache_affinity(mut self, affinity: crate::CacheAffinity) -> Self {
        self.cache_affinity = Some(affinity);
        self
    }

    /// No prompt-cache affinity: the strategy picks for every request.
    pub fn no_cache_affinity(mut self) -> Self {
        self.cache_affinity = None;
        self
    }

    /// The probe budget of `least-latency`: a deployment that gets no traffic because it is
    /// slower than the others (or was, and nobody has looked since) is probed once per
    /// `interval` while the group is in use (default 5 s, at least 100 ms), so that the
    /// router learns when it has recovered; it then ramps back over 3 s. Shorter finds a
    /// recovery sooner and sends more requests to a slow endpoint: one per interval each.
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// How `least-latency` probes (default [`ProbeMode::Shadow`]): with a copy of a caller's
    /// request, sent in the background while the caller's request goes to a faster
    /// deployment (one extra upstream request per probe; its answer is dropped, its tokens
    /// count against that deployment's quota), or with the caller's request itself
    /// ([`ProbeMode::Live`]: no extra traffic, and that caller waits as long as the
    /// deployment is slow).
    pub fn probe_mode(mut self, mode: ProbeMode) -> Self {
        self.probe_mode = mode;
        self
    }

    /// Fallback model groups for `model`, tried in order when none of its deployments can
    /// serve a request: all out of quota or cooling down (now: with fallbacks, a group that
    /// has no room does not make the request wait in its queue), ejected, disabled, or failing
    /// until its attempts run out. Within the request's one deadline and retry budget; the
    /// answer names the group that served ([`Routed::model`](crate::Routed::model),
    /// [`RouterStream::model`](crate::RouterStream::model)). A request the caller caused to
    /// fail (a 400, a content filter) does not fall back, nor one refused by the router-side
    /// limits of its caller or group, and a fallback's own fallbacks are not followed. The
    /// last group of the list waits for its turn as any group does. Setting it again for
    /// `model` replaces the list.
    pub fn fallbacks<I, S>(mut self, model: impl Into<String>, fallbacks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let model = model.into();
        let list = fallbacks.into_iter().map(Into::into).collect();
        self.fallbacks.retain(|(m, _)| *m != model);
        self.fallbacks.push((model, list));
        self
    }

    /// A request for `model` whose prompt the upstream refuses as too long for its context
    /// window (`context_length_exceeded`) goes to `larger` instead of back to the caller, within
    /// the same deadline.
    pub fn context_window_fallback(
        mut self,
        model: impl Into<String>,
        larger: impl Into<String>,
    ) -> Self {
        let model = model.into();
        self.context_fallbacks.retain(|(m, _)| *m != model);
        self.context_fallbacks.push((model, larger.into()));
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
            let provisioned = endpoint.limits.model == QuotaModel::Provisioned;
            if provisioned
                && (endpoint.limits.rpm.is_some()
                    || endpoint.deployments.iter().any(|d| d.rpm.is_some()))
            {
                return Err(Error::config(format!(
                    "{at}: rpm is not metered under provisioned throughput (quota_model \
                     provisioned); remove it, or use a router-side limit"
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
        self.validate_fallbacks()?;
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

    /// Fallbacks name groups some endpoint serves, and never the group itself.
    fn validate_fallbacks(&self) -> Result<(), Error> {
        let served = |model: &str| {
            self.endpoints
                .iter()
                .any(|e| e.deployments.iter().any(|d| d.model == model))
        };
        let pairs = self
            .fallbacks
            .iter()
            .flat_map(|(model, list)| list.iter().map(move |to| ("fallbacks", model, to)))
            .chain(
                self.context_fallbacks
                    .iter()
                    .map(|(model, to)| ("context_window_fallback", model, to)),
            );
        for (what, model, to) in pairs {
            if !served(model) {
                return Err(Error::config(format!(
                    "{what}: no endpoint serves model `{model}`"
                )));
            }
            if !served(to) {
                return Err(Error::config(format!(
                    "{what}: `{model}` falls back to `{to}`, which no endpoint serves"
                )));
            }
            if model == to {
                return Err(Error::config(format!(
                    "{what}: `{model}` falls back to itself"
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
