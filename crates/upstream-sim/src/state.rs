//! An endpoint's live state: its configuration, quota, faults, counters and recordings.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::Value;
use tokio::time::Instant;

use crate::config::{EndpointConfig, LatencyModel, Limits};
use crate::faults::Injected;
use crate::limiter::{Admission, Limiter};

/// How many requests an endpoint remembers for inspection.
const RECORDED: usize = 256;

/// A request as the endpoint received it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// `POST`, `GET`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query, without `?`.
    pub query: Option<String>,
    /// Headers by lowercase name; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The JSON body; `Null` when there was none or it was not JSON.
    pub body: Value,
}

impl RecordedRequest {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Cells {
    pub(crate) requests: Counter,
    pub(crate) ok: Counter,
    pub(crate) streams: Counter,
    pub(crate) rate_limited: Counter,
    pub(crate) faults: Counter,
    pub(crate) unauthorized: Counter,
    pub(crate) not_found: Counter,
    pub(crate) bad_request: Counter,
    pub(crate) tokens_charged: Counter,
    pub(crate) completion_tokens: Counter,
    pub(crate) cache_hits: Counter,
    pub(crate) cached_tokens: Counter,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// What an endpoint has served and refused since it started.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests received.
    pub requests: u64,
    /// Answered with 200 and a complete body or stream.
    pub ok: u64,
    /// Of those requests, how many asked for a stream and were admitted.
    pub streams: u64,
    /// Refused with 429 by the quota.
    pub rate_limited: u64,
    /// Given an injected fault.
    pub faults: u64,
    /// Refused with 401.
    pub unauthorized: u64,
    /// Refused with 404.
    pub not_found: u64,
    /// Refused with 400 or 413 by validation.
    pub bad_request: u64,
    /// Tokens charged against the quota at admission.
    pub tokens_charged: u64,
    /// Completion tokens generated.
    pub completion_tokens: u64,
    /// Requests being served now.
    pub in_flight: u64,
    /// The most requests served at once.
    pub max_in_flight: u64,
    /// Requests whose prompt prefix (1,024 tokens or more) was in the endpoint's prompt cache.
    pub cache_hits: u64,
    /// Prompt tokens served from the prompt cache.
    pub cached_tokens: u64,
}

pub(crate) struct EndpointState {
    config: Mutex<EndpointConfig>,
    limiter: Mutex<Limiter>,
    faults: Mutex<Vec<Injected>>,
    recorded: Mutex<VecDeque<RecordedRequest>>,
    /// Calls by the request body's `metadata.call_tag`.
    tallies: Mutex<std::collections::HashMap<String, u32>>,
    pub(crate) counters: Cells,
    seq: AtomicU64,
    seed: u64,
    /// Responses created without `store: false`, by id, with their input (at most
    /// `STORED`; the oldest go first).
    stored: Mutex<VecDeque<(String, serde_json::Value, serde_json::Value)>>,
    /// Prompt prefixes in the prompt cache, by hash, until when.
    prompt_cache: Mutex<std::collections::HashMap<u64, Instant>>,
    /// Full deployments spill requests over (`SimEndpoint::spill`).
    spill: Mutex<Option<crate::faults::Spill>>,
}

/// How many stored responses an endpoint keeps.
const STORED: usize = 10_000;

/// How long a prompt prefix stays cached after its last use (OpenAI: five to ten minutes).
const PROMPT_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// The most prefixes an endpoint caches.
const PROMPT_CACHE_SIZE: usize = 100_000;

/// Holds one in-flight slot; released on drop.
pub(crate) struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The critical sections cannot panic halfway; a poisoned lock's data is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EndpointState {
    pub(crate) fn new(config: EndpointConfig, seed: u64, origin: Instant) -> Self {
        Self {
            limiter: Mutex::new(Limiter::new(config.limits, origin)),
            config: Mutex::new(config),
            faults: Mutex::new(Vec::new()),
            recorded: Mutex::new(VecDeque::with_capacity(RECORDED)),
            tallies: Mutex::default(),
            counters: Cells::default(),
            seq: AtomicU64::new(0),
            seed,
            stored: Mutex::new(VecDeque::new()),
            prompt_cache: Mutex::new(std::collections::HashMap::new()),
            spill: Mutex::new(None),
        }
    }

    pub(crate) fn set_spill(&self, spill: Option<crate::faults::Spill>) {
        *lock(&self.spill) = spill;
    }

    pub(crate) fn spill(&self) -> Option<crate::faults::Spill> {
        *lock(&self.spill)
    }

    /// A prompt whose cacheable prefix (`key`, `tokens` long) arrived at `now`: the tokens
    /// served from the cache (0 on a miss; on a hit, the prefix in 128-token steps from 1,024,
    /// as OpenAI counts them), and the prefix cached for [`PROMPT_CACHE_TTL`] from now.
    pub(crate) fn prompt_cache(&self, key: u64, tokens: u64, now: Instant) -> u64 {
        let mut cache = lock(&self.prompt_cache);
        let hit = cache.get(&key).is_some_and(|until| *until > now);
        if cache.len() >= PROMPT_CACHE_SIZE {
            cache.retain(|_, until| *until > now);
        }
        if cache.len() < PROMPT_CACHE_SIZE {
            cache.insert(key, now + PROMPT_CACHE_TTL);
        }
        if !hit {
            return 0;
        }
        let cached = 1024 + (tokens - 1024) / 128 * 128;
        self.counters.cache_hits.inc();
        self.counters.cached_tokens.add(cached);
        cached
    }

    /// Keeps a response the request asked to store, with its input.
    pub(crate) fn store_response(&self, response: serde_json::Value, input: serde_json::Value) {
        let Some(id) = response["id"].as_str().map(str::to_owned) else {
            return;
        };
        let mut stored = lock(&self.stored);
        if stored.len() >= STORED {
            stored.pop_front();
        }
        stored.push_back((id, response, input));
    }

    /// A stored response and its input.
    pub(crate) fn stored_response(
        &self,
        id: &str,
    ) -> Option<(serde_json::Value, serde_json::Value)> {
        lock(&self.stored)
            .iter()
            .find(|(stored, _, _)| stored == id)
            .map(|(_, response, input)| (response.clone(), input.clone()))
    }

    /// Forgets a stored response; whether there was one.
    pub(crate) fn delete_response(&self, id: &str) -> bool {
        let mut stored = lock(&self.stored);
        let before = stored.len();
        stored.retain(|(stored, _, _)| stored != id);
        stored.len() < before
    }

    pub(crate) fn config(&self) -> EndpointConfig {
        lock(&self.config).clone()
    }

    pub(crate) fn set_latency(&self, latency: LatencyModel) {
        lock(&self.config).latency = latency;
    }

    pub(crate) fn set_api_key(&self, key: Option<String>) {
        lock(&self.config).api_key = key;
    }

    pub(crate) fn set_models(&self, models: Vec<String>) {
        lock(&self.config).models = models;
    }

    pub(crate) fn set_limits(&self, limits: Limits) {
        lock(&self.config).limits = limits;
        lock(&self.limiter).set_limits(limits);
    }

    pub(crate) fn limits(&self) -> Limits {
        lock(&self.limiter).limits()
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, Vec<Injected>> {
        lock(&self.faults)
    }

    pub(crate) fn limiter(&self) -> MutexGuard<'_, Limiter> {
        lock(&self.limiter)
    }

    pub(crate) fn admit(&self, cost: u64) -> Admission {
        self.limiter().admit(Instant::now(), cost)
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.counters.requests.inc();
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The random generator of request `seq`: the same for the same seed, endpoint and
    /// request number, whatever the interleaving with other requests.
    pub(crate) fn rng(&self, seq: u64) -> fastrand::Rng {
        let name_hash = lock(&self.config)
            .name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        fastrand::Rng::with_seed(self.seed ^ name_hash ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    pub(crate) fn enter(self: &Arc<Self>) -> InFlight {
        let now = self.counters.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.counters
            .max_in_flight
            .fetch_max(now, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    pub(crate) fn record(&self, request: RecordedRequest) {
        let mut recorded = lock(&self.recorded);
        if recorded.len() == RECORDED {
            recorded.pop_front();
        }
        recorded.push_back(request);
    }

    pub(crate) fn tally(&self, tag: &str) {
        *lock(&self.tallies).entry(tag.to_owned()).or_default() += 1;
    }

    pub(crate) fn tallies(&self) -> std::collections::HashMap<String, u32> {
        lock(&self.tallies).clone()
    }

    pub(crate) fn recorded(&self) -> Vec<RecordedRequest> {
        lock(&self.recorded).iter().cloned().collect()
    }

    pub(crate) fn snapshot(&self) -> Counters {
        let c = &self.counters;
        Counters {
            requests: c.requests.get(),
            ok: c.ok.get(),
            streams: c.streams.get(),
            rate_limited: c.rate_limited.get(),
            faults: c.faults.get(),
            unauthorized: c.unauthorized.get(),
            not_found: c.not_found.get(),
            bad_request: c.bad_request.get(),
            tokens_charged: c.tokens_charged.get(),
            completion_tokens: c.completion_tokens.get(),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            max_in_flight: c.max_in_flight.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.get(),
            cached_tokens: c.cached_tokens.get(),
        }
    }
}
