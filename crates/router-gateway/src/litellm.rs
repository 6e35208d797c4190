//! `openai-router check --litellm-config config.yaml`: a `LiteLLM` proxy configuration turned
//! into this gateway's TOML, with a list of what could not be carried over.
//!
//! Each `model_list` entry is one deployment: `model_name` is the model group,
//! `litellm_params.model` names the provider and the upstream's model (`azure/<deployment>`,
//! `openai/<model>` or a bare OpenAI model), `api_base`, `api_version`, `api_key`
//! (`os.environ/NAME` only: a key written into the file is not copied), `tpm`, `rpm`, `order`
//! and `weight` map to the endpoint's fields; Azure AD's `tenant_id`, `client_id` and
//! `client_secret` (`os.environ/NAME`) to `entra = { credential = "client-secret", … }`.
//! `router_settings` (or `litellm_settings`) give
//! the strategy, retries, timeout and fallbacks.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_norway::Value;

/// The parts of a `LiteLLM` proxy configuration that a router needs.
#[derive(Debug, Deserialize)]
struct LiteLlm {
    #[serde(default)]
    model_list: Vec<Entry>,
    #[serde(default)]
    router_settings: Option<Settings>,
    #[serde(default)]
    litellm_settings: Option<Settings>,
    #[serde(default)]
    general_settings: Option<BTreeMap<String, Value>>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    model_name: String,
    litellm_params: Params,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Params {
    model: String,
    api_base: Option<String>,
    api_version: Option<String>,
    api_key: Option<String>,
    tpm: Option<u64>,
    rpm: Option<u64>,
    order: Option<u32>,
    weight: Option<u32>,
    /// Azure AD (Entra ID) with a client secret: `LiteLLM`'s `tenant_id`, `client_id`,
    /// `client_secret`.
    tenant_id: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
struct Settings {
    routing_strategy: Option<String>,
    num_retries: Option<u32>,
    timeout: Option<f64>,
    request_timeout: Option<f64>,
    #[serde(default)]
    fallbacks: Vec<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    context_window_fallbacks: Vec<BTreeMap<String, Vec<String>>>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// The converted configuration, and what was left out (each line says why).
#[derive(Debug)]
pub(crate) struct Converted {
    pub(crate) toml: String,
    pub(crate) left_out: Vec<String>,
}

/// A TOML basic string, usable as a value or a key (the TOML library's own rendering may
/// choose a multi-line literal, which is no key: found by the `config` fuzz target).
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Converts the `LiteLLM` configuration `yaml`.
///
/// # Errors
///
/// When the text is not YAML of a `LiteLLM` configuration's shape (the message names where).
pub(crate) fn convert(yaml: &str) -> Result<Converted, String> {
    let config: LiteLlm =
        serde_norway::from_str(yaml).map_err(|e| format!("not a LiteLLM configuration: {e}"))?;
    let mut left_out = Vec::new();
    let mut out = String::from(
        "# Converted from a LiteLLM proxy configuration by `openai-router check --litellm-config`.\n\
         # Add [[keys]] for the gateway's callers (`openai-router hash-key`).\n\n\
         [server]\nlisten = \"127.0.0.1:8080\"\n\n[router]\n",
    );
    let mut settings = config.litellm_settings.unwrap_or_default();
    if let Some(router) = config.router_settings {
        // router_settings wins where both say something.
        settings = Settings {
            routing_strategy: router.routing_strategy.or(settings.routing_strategy),
            num_retries: router.num_retries.or(settings.num_retries),
            timeout: router.timeout.or(settings.timeout),
            request_timeout: router.request_timeout.or(settings.request_timeout),
            fallbacks: if router.fallbacks.is_empty() {
                settings.fallbacks
            } else {
                router.fallbacks
            },
            context_window_fallbacks: if router.context_window_fallbacks.is_empty() {
                settings.context_window_fallbacks
            } else {
                router.context_window_fallbacks
            },
            other: router.other.into_iter().chain(settings.other).collect(),
        };
    }
    // The endpoints first, so that fallbacks can keep to the groups that were converted.
    let mut names: BTreeMap<String, u32> = BTreeMap::new();
    let mut endpoints = String::new();
    let mut groups = std::collections::BTreeSet::new();
    for (index, entry) in config.model_list.iter().enumerate() {
        if endpoint(index, entry, &mut names, &mut endpoints, &mut left_out) {
            groups.insert(entry.model_name.clone());
        }
    }
    router_section(&settings, &groups, &mut out, &mut left_out);
    out.push_str(&endpoints);
    for name in config.other.keys() {
        left_out.push(format!("`{name}`: not a setting the router has"));
    }
    if config.general_settings.is_some() {
        left_out.push(
            "`general_settings` (master key, database, alerting): the gateway's keys are [[keys]] with a SHA-256 each"
                .to_owned(),
        );
    }
    if groups.is_empty() {
        // Nothing to route to: a file the gateway would refuse, so refuse it here, saying why.
        let why = if config.model_list.is_empty() {
            "`model_list` is empty or missing".to_owned()
        } else {
            left_out.join("; ")
        };
        return Err(format!(
            "no model in it could be converted, so there is no endpoint to route to: {why}"
        ));
    }
    Ok(Converted {
        toml: out,
        left_out,
    })
}

fn router_section(
    settings: &Settings,
    groups: &std::collections::BTreeSet<String>,
    out: &mut String,
    left_out: &mut Vec<String>,
) {
    if let Some(strategy) = &settings.routing_strategy {
        let ours = match strategy.as_str() {
            "simple-shuffle" => Some("weighted"),
            "least-busy" => Some("least-busy"),
            "latency-based-routing" => Some("least-latency"),
            "usage-based-routing" | "usage-based-routing-v2" => Some("usage-based"),
            _ => None,
        };
        match ours {
            Some(ours) => {
                let _ = writeln!(out, "strategy = {}", quoted(ours));
            }
            None => left_out.push(format!(
                "routing_strategy `{strategy}`: no such strategy here; least-latency (the default) is used"
            )),
        }
    }
    if let Some(retries) = settings.num_retries {
        let _ = writeln!(out, "max_attempts = {}", retries.saturating_add(1));
    }
    if let Some(seconds) = settings.timeout.or(settings.request_timeout) {
        if seconds.is_finite() && seconds > 0.0 {
            let _ = writeln!(
                out,
                "request_timeout_ms = {}",
                (seconds * 1000.0).round() as u64
            );
        } else {
            left_out.push(format!(
                "timeout `{seconds}`: not a positive number of seconds"
            ));
        }
    }
    // Fallbacks between groups that were converted; the rest are reported.
    let mut pairs =
        |list: &[BTreeMap<String, Vec<String>>], what: &str| -> Vec<(String, Vec<String>)> {
            let mut kept = Vec::new();
            for (model, to) in list.iter().flat_map(|map| map.iter()) {
                if !groups.contains(model) {
                    left_out.push(format!(
                        "{what} of `{model}`: no such model group was converted"
                    ));
                    continue;
                }
                let (known, unknown): (Vec<String>, Vec<String>) =
                    to.iter().cloned().partition(|m| groups.contains(m));
                for target in unknown {
                    left_out.push(format!(
                        "{what} of `{model}`: `{target}` is not a model group that was converted"
                    ));
                }
                if !known.is_empty() {
                    kept.push((model.clone(), known));
                }
            }
            kept
        };
    let fallbacks = pairs(&settings.fallbacks, "fallbacks");
    let larger = pairs(
        &settings.context_window_fallbacks,
        "context_window_fallbacks",
    );
    if !fallbacks.is_empty() {
        out.push_str("\n[router.fallbacks]\n");
        for (model, to) in &fallbacks {
            let to: Vec<String> = to.iter().map(|m| quoted(m)).collect();
            let _ = writeln!(out, "{} = [{}]", quoted(model), to.join(", "));
        }
    }
    if !larger.is_empty() {
        out.push_str("\n[router.context_window_fallbacks]\n");
        for (model, to) in &larger {
            let Some(first) = to.first() else { continue };
            let _ = writeln!(out, "{} = {}", quoted(model), quoted(first));
            if to.len() > 1 {
                left_out.push(format!(
                    "context_window_fallbacks of `{model}`: only the first, `{first}`, is kept (one larger group each)"
                ));
            }
        }
    }
    for name in settings.other.keys() {
        left_out.push(format!("`{name}`: not a setting the router has"));
    }
}

/// One `model_list` entry as an `[[endpoints]]` table.
fn endpoint(
    index: usize,
    entry: &Entry,
    names: &mut BTreeMap<String, u32>,
    out: &mut String,
    left_out: &mut Vec<String>,
) -> bool {
    let at = format!("model_list[{index}] (`{}`)", entry.model_name);
    let params = &entry.litellm_params;
    let (provider, upstream) = params
        .model
        .split_once('/')
        .unwrap_or(("openai", params.model.as_str()));
    let kind = match provider {
        "azure" => "azure",
        "openai" | "text-completion-openai" => "openai",
        _ => {
            left_out.push(format!(
                "{at}: provider `{provider}` is not served (only OpenAI, OpenAI-compatible servers and Azure OpenAI); left out"
            ));
            return false;
        }
    };
    let url = match (kind, &params.api_base) {
        (_, Some(base)) => base.clone(),
        ("openai", None) => "https://api.openai.com/v1".to_owned(),
        _ => {
            left_out.push(format!(
                "{at}: an Azure deployment needs `api_base`; left out"
            ));
            return false;
        }
    };
    let base: String = entry
        .model_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let n = names.entry(base.clone()).or_insert(0);
    *n += 1;
    let name = format!("{base}-{n}");
    out.push_str("\n[[endpoints]]\n");
    let _ = writeln!(out, "name = {}", quoted(&name));
    let _ = writeln!(out, "kind = {}", quoted(kind));
    let _ = writeln!(out, "url = {}", quoted(&url));
    if kind == "azure" {
        let version = params.api_version.as_deref().unwrap_or_else(|| {
            left_out.push(format!(
                "{at}: no `api_version`; 2024-10-21 is written, check it is the one you use"
            ));
            "2024-10-21"
        });
        let _ = writeln!(out, "api_version = {}", quoted(version));
    }
    let ad = entra_line(params, &at, left_out);
    if let Some(line) = &ad {
        out.push_str(line);
    }
    match params.api_key.as_deref() {
        _ if ad.is_some() => {}
        Some(key) => match key.strip_prefix("os.environ/") {
            Some(variable) => {
                let _ = writeln!(out, "api_key_env = {}", quoted(variable));
            }
            None => left_out.push(format!(
                "{at}: its `api_key` is written in the file and is not copied; put it in an environment variable and set api_key_env"
            )),
        },
        None if kind == "azure" => left_out.push(format!(
            "{at}: no `api_key`; set api_key_env, or entra = {{ credential = ... }} for Entra ID"
        )),
        None => {}
    }
    let _ = writeln!(
        out,
        "deployments = {{ {} = {} }}",
        quoted(&entry.model_name),
        quoted(upstream)
    );
    for (field, value) in [("tpm", params.tpm), ("rpm", params.rpm)] {
        if let Some(value) = value {
            let _ = writeln!(out, "{field} = {value}");
        }
    }
    if let Some(order) = params.order {
        // LiteLLM tries order 1 first; the router, priority 0.
        let _ = writeln!(out, "priority = {}", order.saturating_sub(1));
    }
    if let Some(weight) = params.weight {
        let _ = writeln!(out, "weight = {}", weight.max(1));
    }
    for field in params.other.keys() {
        left_out.push(format!(
            "{at}: `litellm_params.{field}` has no counterpart here"
        ));
    }
    for field in entry.other.keys() {
        left_out.push(format!("{at}: `{field}` has no counterpart here"));
    }
    true
}

/// `LiteLLM`'s Azure AD client secret (`tenant_id`, `client_id`, `client_secret` in
/// `litellm_params`) as an `entra = { credential = "client-secret", … }` line; what cannot be
/// converted is said in `left_out`.
fn entra_line(params: &Params, at: &str, left_out: &mut Vec<String>) -> Option<String> {
    let (tenant, client, secret) = match (
        &params.tenant_id,
        &params.client_id,
        &params.client_secret,
    ) {
        (None, None, None) => return None,
        (Some(tenant), Some(client), Some(secret)) => (tenant, client, secret),
        _ => {
            left_out.push(format!(
                "{at}: Azure AD needs `tenant_id`, `client_id` and `client_secret` together; set entra = {{ credential = ... }} yourself"
            ));
            return None;
        }
    };
    let literal = |value: &String, field: &str, left_out: &mut Vec<String>| {
        if value.starts_with("os.environ/") {
            left_out.push(format!(
                "{at}: `{field}` comes from the environment in LiteLLM; the router needs it written in entra.{field}"
            ));
            None
        } else {
            Some(value.clone())
        }
    };
    let tenant = literal(tenant, "tenant_id", left_out);
    let client = literal(client, "client_id", left_out);
    let Some(variable) = secret.strip_prefix("os.environ/") else {
        left_out.push(format!(
            "{at}: its `client_secret` is written in the file and is not copied; put it in an environment variable and set entra.client_secret_env"
        ));
        return None;
    };
    Some(format!(
        "entra = {{ credential = \"client-secret\", tenant_id = {}, client_id = {}, client_secret_env = {} }}\n",
        quoted(&tenant?),
        quoted(&client?),
        quoted(variable)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mixed_configuration_converts_and_says_what_it_left_out() {
        let yaml = r"
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt-4o-eastus
      api_base: https://eastus.example.openai.azure.com
      api_version: 2024-10-21
      api_key: os.environ/AZURE_EASTUS_KEY
      tpm: 300000
      rpm: 1800
      order: 1
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt-4o-westus
      api_base: https://westus.example.openai.azure.com
      api_key: sk-written-in-the-file
      order: 2
      weight: 3
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: os.environ/OPENAI_API_KEY
      max_parallel_requests: 10
  - model_name: claude
    litellm_params:
      model: anthropic/claude-3-5-sonnet
router_settings:
  routing_strategy: latency-based-routing
  num_retries: 2
  timeout: 30
  fallbacks: [{gpt-4o: [gpt-4o-mini]}]
  context_window_fallbacks: [{gpt-4o-mini: [gpt-4o]}]
general_settings:
  master_key: sk-1234
";
        let converted = convert(yaml).unwrap();
        let config = crate::config::Config::parse(&converted.toml)
            .unwrap_or_else(|e| panic!("{e}\n{}", converted.toml));
        assert_eq!(config.endpoints.len(), 3, "{}", converted.toml);
        assert_eq!(config.router.strategy.as_deref(), Some("least-latency"));
        assert_eq!(config.router.max_attempts, Some(3));
        assert_eq!(config.router.request_timeout_ms, Some(30_000));
        assert_eq!(config.router.fallbacks["gpt-4o"], ["gpt-4o-mini"]);
        assert_eq!(
            config.router.context_window_fallbacks["gpt-4o-mini"],
            "gpt-4o"
        );
        let east = &config.endpoints[0];
        assert_eq!(east.tpm, Some(300_000));
        assert_eq!(east.rpm, Some(1_800));
        assert_eq!(east.priority, Some(0));
        assert_eq!(east.api_key_env.as_deref(), Some("AZURE_EASTUS_KEY"));
        assert_eq!(east.deployments["gpt-4o"], "gpt-4o-eastus");
        let west = &config.endpoints[1];
        assert_eq!((west.priority, west.weight), (Some(1), Some(3)));
        assert!(west.api_key_env.is_none());
        assert_eq!(config.endpoints[2].url, "https://api.openai.com/v1");
        let left = converted.left_out.join("\n");
        for expected in [
            "anthropic",
            "written in the file",
            "2024-10-21 is written",
            "max_parallel_requests",
            "general_settings",
        ] {
            assert!(
                left.contains(expected),
                "`{expected}` not reported in:\n{left}"
            );
        }
        assert!(
            !converted.toml.contains("sk-written-in-the-file"),
            "a key was copied"
        );
        assert!(
            !converted.toml.contains("sk-1234"),
            "the master key was copied"
        );
    }

    #[test]
    fn settings_under_litellm_settings_and_the_documented_extras_are_read_or_reported() {
        // The shapes LiteLLM's documentation shows: settings under `litellm_settings`, YAML
        // 1.1 booleans, a bare OpenAI model, quoted versions, `model_info`, per-deployment
        // timeouts, Redis settings, top-level environment variables.
        let yaml = r#"
environment_variables:
  REDIS_HOST: localhost
model_list:
  - model_name: chat-large
    litellm_params:
      model: "gpt-4.1"
      api_key: os.environ/OPENAI_API_KEY
      rpm: 480
      timeout: 300
      stream_timeout: 60
    model_info:
      mode: chat
  - model_name: chat-small
    litellm_params:
      model: azure/small-deployment
      api_base: https://canada.example.openai.azure.com/
      api_version: "2024-06-01"
      api_key: os.environ/AZURE_CANADA_KEY
litellm_settings:
  drop_params: True
  num_retries: 0
  request_timeout: 600
  fallbacks:
    - chat-large: ["chat-small", "claude-2"]
router_settings:
  routing_strategy: simple-shuffle
  redis_host: localhost
  cooldown_time: 60
"#;
        let converted = convert(yaml).unwrap();
        let config = crate::config::Config::parse(&converted.toml)
            .unwrap_or_else(|e| panic!("{e}\n{}", converted.toml));
        assert_eq!(config.router.strategy.as_deref(), Some("weighted"));
        assert_eq!(config.router.max_attempts, Some(1));
        assert_eq!(config.router.request_timeout_ms, Some(600_000));
        assert_eq!(config.router.fallbacks["chat-large"], ["chat-small"]);
        assert_eq!(config.endpoints[0].deployments["chat-large"], "gpt-4.1");
        assert_eq!(config.endpoints[0].rpm, Some(480));
        assert_eq!(
            config.endpoints[1].api_version.as_deref(),
            Some("2024-06-01")
        );
        let left = converted.left_out.join("\n");
        for expected in [
            "environment_variables",
            "drop_params",
            "litellm_params.timeout",
            "litellm_params.stream_timeout",
            "model_info",
            "redis_host",
            "cooldown_time",
            "`claude-2` is not a model group",
        ] {
            assert!(
                left.contains(expected),
                "`{expected}` not reported in:\n{left}"
            );
        }
    }

    #[test]
    fn azure_ad_client_secrets_become_entra_and_what_cannot_is_said() {
        let yaml = r"
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt4o-east
      api_base: https://east.openai.azure.com
      api_version: 2024-10-21
      tenant_id: 72f988bf-86f1-41af-91ab-2d7cd011db47
      client_id: 0a1b2c3d
      client_secret: os.environ/AZURE_CLIENT_SECRET
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt4o-west
      api_base: https://west.openai.azure.com
      api_version: 2024-10-21
      tenant_id: os.environ/AZURE_TENANT_ID
      client_id: 0a1b2c3d
      client_secret: os.environ/AZURE_CLIENT_SECRET
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt4o-north
      api_base: https://north.openai.azure.com
      api_version: 2024-10-21
      tenant_id: t
      client_id: c
      client_secret: written-in-the-file
";
        let converted = convert(yaml).unwrap();
        assert!(
            converted.toml.contains(
                r#"entra = { credential = "client-secret", tenant_id = "72f988bf-86f1-41af-91ab-2d7cd011db47", client_id = "0a1b2c3d", client_secret_env = "AZURE_CLIENT_SECRET" }"#
            ),
            "{}",
            converted.toml
        );
        assert!(!converted.toml.contains("written-in-the-file"));
        let said = converted.left_out.join("\n");
        assert!(
            said.contains("`tenant_id` comes from the environment"),
            "{said}"
        );
        assert!(
            said.contains("`client_secret` is written in the file"),
            "{said}"
        );
        // The converted file passes the gateway's own check (the first endpoint uses Entra).
        let config = crate::config::Config::parse(&converted.toml).unwrap();
        assert!(config.endpoints[0].entra.is_some());
    }

    #[test]
    fn what_is_not_a_litellm_configuration_is_refused_with_where() {
        let error = convert("model_list: [{model_name: x}]").unwrap_err();
        assert!(error.contains("litellm_params"), "{error}");
        assert!(convert("- just\n- a list").is_err());
    }
}
