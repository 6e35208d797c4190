//! The router's configuration as one immutable value, swapped whole on reload.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use router_core::{
    Backend, DeploymentState, EndpointId, Error, Limits, MemoryStore, Slot, StateStore, Strategy,
};

use crate::builder::RouterBuilder;
use crate::endpoint::EndpointKind;
use crate::kick::Kick;
use crate::limits::Scope;
use crate::settings::Settings;

/// One model group's deployment on one endpoint.
#[derive(Debug)]
pub(crate) struct Deployment {
    pub(crate) endpoint: EndpointId,
    pub(crate) model: String,
    pub(crate) name: String,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) weight: u32,
    pub(crate) priority: u32,
    /// Configured limits (learned ones are in the state).
    pub(crate) limits: Limits,
    /// The deployment's name in the state store: `endpoint/model`.
    pub(crate) key: Arc<str>,
    /// Whether the upstream accepts `stream_options.include_usage` (the router asks for the
    /// usage chunk only where it may: Azure's dated API versions before 2024-09-01 refuse it).
    pub(crate) stream_usage: bool,
    pub(crate) state: Arc<DeploymentState>,
    /// The endpoint's fingerprint plus the deployment name: what must not change for the live
    /// state to carry over a reload.
    pub(crate) identity: (u64, String),
    /// The Azure resource it is on (`Endpoint::azure_resource`): where Azure spills over.
    pub(crate) resource: Option<String>,
    /// The router's prober, told when the deployment goes out.
    pub(crate) prober: Arc<Kick>,
    /// What the cache-affinity table and the waitlist's lent turns know it by
    /// ([`crate::affinity::place`]), computed once.
    pub(crate) place: u64,
}

impl Deployment {
    /// The quota the router keeps to: configured, else announced by the upstream's headers,
    /// times the shares the upstream was seen to admit.
    pub(crate) fn limits(&self) -> Limits {
        self.state.limits(&self.limits)
    }

    /// The quota as the store is given it: configured, else announced by the upstream (the
    /// store applies what it learned of the upstream's admissions itself).
    pub(crate) fn quota_limits(&self) -> Limits {
        self.state.quota_limits(&self.limits)
    }

    /// Its quota and what is left of it, when it has one.
    pub(crate) fn quota_stats(&self, now: std::time::Instant) -> Option<crate::QuotaStats> {
        let limits = self.quota_limits();
        if !limits.is_limited() {
            return None;
        }
        let kept = self.limits();
        let (tokens_left, requests_left) = self.state.quota.levels(&kept, now);
        Some(crate::QuotaStats {
            tpm: limits.tpm,
            rpm: limits.rpm,
            window: limits.window,
            share: self.state.admits().share,
            tokens_left,
            requests_left,
        })
    }

    /// Whether a request sent here is accounted (reserved in the store, then settled): when the
    /// deployment has a quota, or the store is shared (its cooldowns are then shared too).
    pub(crate) fn accounts(&self, store: &dyn StateStore) -> bool {
        self.limits().is_limited() || store.is_shared()
    }

    /// How the selector sees it.
    pub(crate) fn slot(&self) -> Slot<'_> {
        Slot {
            state: &self.state,
            weight: self.weight,
            priority: self.priority,
            limits: self.limits(),
        }
    }
}

/// A model group: its strategy and its deployments, sorted by priority tier.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) strategy: Box<dyn Strategy>,
    pub(crate) members: Vec<Arc<Deployment>>,
}

/// Everything a request needs, loaded once per request.
#[derive(Debug)]
pub(crate) struct RouterSnapshot {
    pub(crate) groups: HashMap<String, Group>,
    /// Every deployment in configuration order, for stats.
    pub(crate) deployments: Vec<Arc<Deployment>>,
    pub(crate) settings: Settings,
    pub(crate) store: Arc<dyn StateStore>,
    /// Whether requests may need token estimates (so the tokenizers are worth loading at
    /// build): a configured quota, a state store, or a router-side token limit. Limits learned
    /// later from headers load them on first use.
    pub(crate) may_count_tokens: bool,
    /// The router's prober (the same across reconfigurations).
    pub(crate) prober: Arc<Kick>,
}

impl Group {
    /// Whether a request to this group needs a token estimate: when any of its deployments is
    /// accounted, or a router-side limit that applies counts tokens.
    pub(crate) fn accounts(&self, store: &dyn StateStore, scopes: &[Scope]) -> bool {
        scopes.iter().any(|s| s.limits.counts_tokens())
            || self.members.iter().any(|d| d.accounts(store))
    }
}

impl RouterSnapshot {
    /// Builds the backends and groups of `config`, reusing from `previous` the backend and the
    /// live state of every deployment whose endpoint and deployment name did not change.
    pub(crate) fn build(
        config: &RouterBuilder,
        previous: Option<&RouterSnapshot>,
        origin: Instant,
    ) -> Result<Self, Error> {
        config.validate()?;
        let prober = previous.map_or_else(Arc::default, |p| Arc::clone(&p.prober));
        let mut reusable: HashMap<(&str, &str), &Arc<Deployment>> = HashMap::new();
        let mut backends: HashMap<&str, (u64, &Arc<dyn Backend>)> = HashMap::new();
        if let Some(previous) = previous {
            for d in &previous.deployments {
                reusable.insert((d.endpoint.as_str(), d.model.as_str()), d);
                backends.insert(d.endpoint.as_str(), (d.identity.0, &d.backend));
            }
        }
        #[cfg(feature = "openai")]
        let client = backend_openai::HttpClient::new(std::time::Duration::from_secs(5))?;
        let mut deployments = Vec::new();
        for (i, endpoint) in config.endpoints.iter().enumerate() {
            let fingerprint = endpoint.fingerprint();
            let backend: Arc<dyn Backend> = match backends.get(endpoint.name.as_str()) {
                Some((old, backend)) if *old == fingerprint => Arc::clone(backend),
                _ => {
                    #[cfg(feature = "openai")]
                    let built = build_backend(endpoint, &client);
                    #[cfg(not(feature = "openai"))]
                    let built = build_backend(endpoint);
                    built.map_err(|e| e.in_context(format!("endpoints[{i}]")))?
                }
            };
            for spec in &endpoint.deployments {
                let identity = (fingerprint, spec.deployment.clone());
                let state = reusable
                    .get(&(endpoint.name.as_str(), spec.model.as_str()))
                    .filter(|old| old.identity == identity)
                    .map_or_else(
                        || Arc::new(DeploymentState::new(origin, config.latency_decay)),
                        |old| Arc::clone(&old.state),
                    );
                deployments.push(Arc::new(Deployment {
                    endpoint: EndpointId::new(&endpoint.name),
                    model: spec.model.clone(),
                    name: spec.deployment.clone(),
                    backend: Arc::clone(&backend),
                    weight: spec.weight.unwrap_or(endpoint.weight).max(1),
                    priority: spec.priority.unwrap_or(endpoint.priority),
                    limits: Limits {
                        tpm: spec.tpm.or(endpoint.limits.tpm),
                        rpm: spec.rpm.or(endpoint.limits.rpm),
                        window: endpoint.limits.window,
                        model: endpoint.limits.model,
                    },
                    key: Arc::from(format!("{}/{}", endpoint.name, spec.model)),
                    stream_usage: endpoint.accepts_stream_usage(),
                    state,
                    identity,
                    resource: endpoint.azure_resource(),
                    prober: Arc::clone(&prober),
                    place: crate::affinity::place(&endpoint.name, &spec.deployment),
                }));
            }
        }
        let mut members: BTreeMap<&str, Vec<Arc<Deployment>>> = BTreeMap::new();
        for d in &deployments {
            members
                .entry(d.model.as_str())
                .or_default()
                .push(Arc::clone(d));
        }
        let mut groups = HashMap::new();
        for (model, mut list) in members {
            list.sort_by_key(|d| d.priority); // stable: configuration order within a tier
            let choice = config
                .group_strategies
                .iter()
                .rev()
                .find(|(m, _)| m == model)
                .map_or(&config.strategy, |(_, choice)| choice);
            groups.insert(
                model.to_owned(),
                Group {
                    strategy: choice.build(config.probe_interval, config.probe_mode),
                    members: list,
                },
            );
        }
        let store = config
            .store
            .clone()
            .or_else(|| previous.map(|p| Arc::clone(&p.store)))
            .unwrap_or_else(|| Arc::new(MemoryStore::new()));
        let settings = Settings::new(config);
        let may_count_tokens = deployments.iter().any(|d| d.limits.is_limited())
            || config.store.is_some()
            || settings.limits_count_tokens();
        Ok(Self {
            groups,
            deployments,
            settings,
            store,
            may_count_tokens,
            prober,
        })
    }

    /// The known model groups, sorted, for error messages and `/v1/models`.
    pub(crate) fn models(&self) -> Vec<&str> {
        let mut models: Vec<&str> = self.groups.keys().map(String::as_str).collect();
        models.sort_unstable();
        models
    }
}

/// Builds the backend of a configured endpoint.
fn build_backend(
    endpoint: &crate::endpoint::Endpoint,
    #[cfg(feature = "openai")] client: &backend_openai::HttpClient,
) -> Result<Arc<dyn Backend>, Error> {
    match &endpoint.kind {
        #[cfg(feature = "openai")]
        EndpointKind::OpenAi {
            base_url,
            key,
            organization,
            project,
        } => {
            use secrecy::ExposeSecret as _;
            let mut builder =
                backend_openai::OpenAiBackend::builder(&endpoint.name, base_url.as_str());
            if let Some(key) = key {
                builder = builder.api_key(key.expose_secret());
            }
            if let Some(organization) = organization {
                builder = builder.organization(organization.as_str());
            }
            if let Some(project) = project {
                builder = builder.project(project.as_str());
            }
            if let Some(bytes) = endpoint.max_answer_bytes {
                builder = builder.max_answer_bytes(bytes);
            }
            // An endpoint with its own timeouts gets its own pool (for its connect timeout).
            builder = match endpoint.timeouts {
                Some(timeouts) => builder.timeouts(timeouts),
                None => builder.http_client(client.clone()),
            };
            Ok(Arc::new(builder.build()?))
        }
        #[cfg(feature = "azure")]
        EndpointKind::Azure {
            url,
            api,
            key,
            token_provider,
        } => {
            use secrecy::ExposeSecret as _;
            let mut builder = backend_azure::AzureBackend::builder(&endpoint.name, url.as_str());
            if let Some(api) = api {
                builder = builder.api(api.clone());
            }
            if let Some(key) = key {
                builder = builder.api_key(key.expose_secret());
            }
            if let Some(provider) = token_provider {
                builder = builder.token_provider(Arc::clone(provider));
            }
            if let Some(bytes) = endpoint.max_answer_bytes {
                builder = builder.max_answer_bytes(bytes);
            }
            // An endpoint with its own timeouts gets its own pool (for its connect timeout).
            builder = match endpoint.timeouts {
                Some(timeouts) => builder.timeouts(timeouts),
                None => builder.http_client(client.clone()),
            };
            Ok(Arc::new(builder.build()?))
        }
        EndpointKind::Custom(backend) => Ok(Arc::clone(backend)),
    }
}
