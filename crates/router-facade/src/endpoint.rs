//! Endpoints: the upstreams a router sends to, the model groups each serves under its own
//! deployment names, their weights, tiers, quotas and timeouts.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use router_core::{Backend, Limits, QuotaModel};
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
    /// The largest non-streamed answer body read (built-in backends).
    #[cfg(feature = "openai")]
    pub(crate) max_answer_bytes: Option<usize>,
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
    /// The Azure resource it is (its URL, without a trailing slash, in lowercase): deployments
    /// of one resource are where Azure spills requests over. `None` for other endpoints.
    pub(crate) fn azure_resource(&self) -> Option<String> {
        match &self.kind {
            #[cfg(feature = "azure")]
            EndpointKind::Azure { url, .. } => Some(url.trim_end_matches('/').to_ascii_lowercase()),
            _ => None,
        }
    }

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
            #[cfg(feature = "openai")]
            max_answer_bytes: None,
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

    /// How the upstream meters the quota: per window (the default: pay-as-you-go, fixed or
    /// sliding windows) or as provisioned throughput (Azure PTU: utilisation that drains at
    /// the token limit's rate, admitting while under 100 %). Under provisioned throughput set
    /// [`tpm`](Self::tpm) to the throughput the deployment is sized for and
    /// [`quota_window`](Self::quota_window) to how much utilisation it holds (Azure: 1 s or
    /// 10 s worth); requests per minute are not metered, and setting `rpm` is an error.
    pub fn quota_model(mut self, model: QuotaModel) -> Self {
        self.limits.model = model;
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

    /// The largest non-streamed answer body read from it (built-in backends; default 64 MiB):
    /// a larger answer is a `Decode` error, read no further.
    #[cfg(feature = "openai")]
    pub fn max_answer_bytes(mut self, bytes: usize) -> Self {
        self.max_answer_bytes = Some(bytes);
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

    /// Whether the upstream accepts `stream_options` (for the usage chunk). OpenAI does; Azure
    /// says per API version ([`AzureApi::accepts_stream_options`](backend_azure::AzureApi));
    /// a custom backend is not assumed to.
    pub(crate) fn accepts_stream_usage(&self) -> bool {
        match &self.kind {
            #[cfg(feature = "openai")]
            EndpointKind::OpenAi { .. } => true,
            #[cfg(feature = "azure")]
            EndpointKind::Azure { api, .. } => api
                .as_ref()
                .is_none_or(backend_azure::AzureApi::accepts_stream_options),
            EndpointKind::Custom(_) => false,
        }
    }

    /// A hash of everything that makes this endpoint's backend what it is (name, URL,
    /// credential, dialect, timeouts): a reconfiguration keeps the live state of a deployment
    /// only when it is unchanged. Secrets are hashed in memory, never shown.
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
                ("azure", url, api).hash(&mut h);
                key.as_ref().map(ExposeSecret::expose_secret).hash(&mut h);
                // A provider is the same only when it is the same object.
                token_provider.as_ref().map(Arc::as_ptr).hash(&mut h);
            }
            EndpointKind::Custom(backend) => {
                ("custom", Arc::as_ptr(backend)).hash(&mut h);
            }
        }
        #[cfg(feature = "openai")]
        self.timeouts.hash(&mut h);
        #[cfg(feature = "openai")]
        self.max_answer_bytes.hash(&mut h);
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
