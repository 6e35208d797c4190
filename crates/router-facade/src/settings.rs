//! The router's settings at run time: what a [`RouterBuilder`] checked, in the form requests
//! look things up in. Built once per configuration and kept in its snapshot.

use std::collections::HashMap;
use std::time::Duration;

use router_core::HealthPolicy;

use crate::builder::{QuotaAccounting, RetryPolicy, RouterBuilder};
use crate::limits::{RateLimits, Scope};

/// The settings a request reads.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) retry: RetryPolicy,
    pub(crate) health: HealthPolicy,
    pub(crate) request_timeout: Duration,
    pub(crate) expected_completion: u32,
    pub(crate) max_waiting: usize,
    pub(crate) max_queue_wait: Duration,
    pub(crate) accounting: QuotaAccounting,
    /// Only limits that limit something: a scope that limits nothing would cost an estimate and
    /// a lookup per request.
    group_limits: HashMap<String, RateLimits>,
    caller_limits: HashMap<String, RateLimits>,
    default_caller_limits: Option<RateLimits>,
    /// The groups a request falls back to, in order, when its own cannot serve it.
    fallbacks: HashMap<String, Vec<String>>,
    /// The larger group a request goes to when its prompt is too long for its group.
    context_fallbacks: HashMap<String, String>,
    /// Prompt-cache affinity, when on.
    pub(crate) cache_affinity: Option<crate::CacheAffinity>,
}

impl Settings {
    pub(crate) fn new(builder: &RouterBuilder) -> Self {
        // The last setting for a name wins.
        let limited = |list: &[(String, RateLimits)]| -> HashMap<String, RateLimits> {
            list.iter().cloned().collect()
        };
        Self {
            retry: builder.retry,
            health: builder.health,
            request_timeout: builder.request_timeout,
            expected_completion: builder.expected_completion,
            max_waiting: builder.max_waiting,
            max_queue_wait: builder.max_queue_wait,
            accounting: builder.accounting,
            group_limits: limited(&builder.group_limits),
            caller_limits: limited(&builder.caller_limits),
            default_caller_limits: builder.default_caller_limits,
            fallbacks: builder.fallbacks.iter().cloned().collect(),
            context_fallbacks: builder.context_fallbacks.iter().cloned().collect(),
            cache_affinity: builder.cache_affinity,
        }
    }

    /// The groups a request for `model` falls back to, in order.
    pub(crate) fn fallbacks(&self, model: &str) -> &[String] {
        if self.fallbacks.is_empty() {
            // No hashing of the model on every request of a router without fallbacks.
            return &[];
        }
        self.fallbacks.get(model).map_or(&[], Vec::as_slice)
    }

    /// The larger group a request for `model` goes to when its context window is exceeded.
    pub(crate) fn context_fallback(&self, model: &str) -> Option<&str> {
        self.context_fallbacks.get(model).map(String::as_str)
    }

    /// The router-side limits that apply to a request for `model` from `caller`.
    pub(crate) fn scopes(&self, model: &str, caller: Option<&str>) -> Vec<Scope> {
        let mut scopes = Vec::new();
        if let Some(limits) = self.group_limits.get(model).filter(|l| l.is_limited()) {
            scopes.push(Scope::new(format!("group:{model}"), *limits));
        }
        if let Some(caller) = caller {
            // Its own limits, even empty ones, override the default.
            let limits = self
                .caller_limits
                .get(caller)
                .copied()
                .or(self.default_caller_limits);
            if let Some(limits) = limits.filter(RateLimits::is_limited) {
                scopes.push(Scope::new(format!("caller:{caller}"), limits));
            }
        }
        scopes
    }

    /// Whether any router-side limit counts tokens (so requests may need estimates).
    pub(crate) fn limits_count_tokens(&self) -> bool {
        self.group_limits
            .values()
            .chain(self.caller_limits.values())
            .chain(&self.default_caller_limits)
            .any(RateLimits::counts_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_that_limit_nothing_are_left_out() {
        let builder = RouterBuilder::default()
            .group_limits("gpt-4o-mini", RateLimits::new())
            .caller_limits("open", RateLimits::new())
            .caller_limits("metered", RateLimits::new().with_tpm(1_000))
            .default_caller_limits(RateLimits::new().with_rpm(60));
        let settings = Settings::new(&builder);
        assert!(settings.scopes("gpt-4o-mini", None).is_empty());
        // Its own (empty) limits override the default: nothing to check.
        assert!(settings.scopes("gpt-4o-mini", Some("open")).is_empty());
        let metered = settings.scopes("gpt-4o-mini", Some("metered"));
        assert_eq!(metered.len(), 1);
        assert_eq!(metered[0].name, "caller:metered");
        assert!(metered[0].limits.counts_tokens());
        let other = settings.scopes("gpt-4o-mini", Some("someone"));
        assert_eq!(other.len(), 1);
        assert!(!other[0].limits.counts_tokens());
        assert!(settings.limits_count_tokens());
    }

    #[test]
    fn the_last_setting_for_a_name_wins() {
        let builder = RouterBuilder::default()
            .caller_limits("a", RateLimits::new().with_rpm(1))
            .caller_limits("a", RateLimits::new().with_rpm(2));
        let scopes = Settings::new(&builder).scopes("m", Some("a"));
        assert_eq!(scopes[0].limits.rpm, Some(2));
    }
}
