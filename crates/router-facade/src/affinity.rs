//! Prompt-cache affinity: requests that share a cache key go where the key was served last.
//!
//! OpenAI and Azure keep prompt caches per deployment: a request whose prompt starts as an
//! earlier one did is served faster and its cached tokens cost less, but only on the deployment
//! that served the earlier one. A request's cache key is its `prompt_cache_key`, else its
//! `user`, else what [`RequestOptions::with_cache_key`](crate::RequestOptions::with_cache_key)
//! set (the gateway: a configured header). The router remembers, per model group and key, the
//! deployment that served it last and up to three that served it before, each for
//! [`CacheAffinity::ttl`] after it did, and sends the key's next request to the last one while
//! that deployment can take it, does not look slow and is not much busier than an alternative
//! drawn at random. Otherwise the strategy picks among the earlier ones that are alternatives
//! (their caches may still hold the key's prefix; the pick, too, must not be much busier than
//! an alternative drawn at random), else among all the alternatives (among all the others when
//! there is none), and the deployment that serves becomes the key's last.
//!
//! - Slow: it typically answers more than [`CacheAffinity::slower`] times slower than the
//!   fastest deployment of the group that could take the request and has answered (typical:
//!   the running mean of about its last five answers, so that one tail answer does not cost a
//!   key its cache; a deployment that has not answered is never slow).
//! - Alternatives: the group's other deployments that the request has not tried and that do
//!   not look slow. A key never moves for load to where slowness would move it from again: the
//!   two rules would trade keys back and forth, a cache miss each time (in a group with one
//!   endpoint twice as slow, that cost a fifth of the cache hits).
//! - Much busier ([`CacheAffinity::tolerance`]): power of two choices with a preference, so
//!   that a deployment that recovers or joins gets keys back. While a key stays, the
//!   strategy's shadow probes still run beside it, so that a deployment keys left is measured
//!   and becomes an alternative again once it answers as fast as the rest.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// How requests with a cache key keep to the deployment that served the key; see the module
/// docs. On by default.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheAffinity {
    /// How much busier than an alternative drawn at random (another deployment of the group,
    /// not tried, not slow) the key's deployment may be for the key's request still to go
    /// there: more than `1 + tolerance` times the other's requests in flight, plus one, and it
    /// goes elsewhere (default 0.5).
    pub tolerance: f64,
    /// How long a key is remembered after its last request (default 10 minutes; prompt caches
    /// last five to ten minutes idle, up to an hour off-peak).
    pub ttl: Duration,
    /// How much slower than the fastest deployment of the group that could take the request the
    /// key's deployment may typically answer for the request still to go there (default 2);
    /// a deployment slower than that is no alternative for a key that moves for load either.
    /// Typical latency is the running mean of about the last five answers
    /// (`DeploymentState::typical_latency`), not the peak estimate the strategies read, so that
    /// one tail answer does not move a key. A difference within noise never counts: 50 ms for
    /// the request (to the first token, for a call, or over the tokens a generation expects),
    /// and never under 2 ms a generated token.
    pub slower: f64,
}

impl Default for CacheAffinity {
    fn default() -> Self {
        Self {
            tolerance: 0.5,
            ttl: Duration::from_secs(600),
            slower: 2.0,
        }
    }
}

impl CacheAffinity {
    /// Yields when the key's deployment carries more than `1 + tolerance` times the requests in
    /// flight of another deployment drawn at random, plus one (at least 0).
    #[must_use]
    pub fn with_tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance.max(0.0);
        self
    }

    /// Remembers keys this long after their last request.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Yields when the key's deployment looks more than `times` slower than the fastest.
    #[must_use]
    pub fn with_slower(mut self, times: f64) -> Self {
        self.slower = times.max(1.0);
        self
    }
}

/// The most keys remembered; beyond it, expired keys go, and new keys are not remembered until
/// some have.
const MAX_KEYS: usize = 200_000;

/// The most places remembered for one key: the deployment that served it last and the ones
/// before, each for [`CacheAffinity::ttl`] after it served the key (its prompt cache may still
/// hold the key's prefix).
pub(crate) const PLACES: usize = 4;

/// Where each (model group, cache key) was served, the last first, each until when.
#[derive(Debug, Default)]
pub(crate) struct Affinities {
    keys: DashMap<u64, [Option<Seen>; PLACES]>,
}

/// A deployment that served a key, until when it counts.
#[derive(Debug, Clone, Copy)]
struct Seen {
    place: u64,
    until: Instant,
}

/// A deployment as the table knows it: its endpoint and name, hashed.
pub(crate) fn place(endpoint: &str, deployment: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (endpoint, deployment).hash(&mut hasher);
    hasher.finish()
}

fn slot(model: &str, key: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (model, key).hash(&mut hasher);
    hasher.finish()
}

impl Affinities {
    /// The places ([`place`]) that served `key` of group `model` within their time, the last
    /// first.
    pub(crate) fn recall(&self, model: &str, key: &str, now: Instant) -> [Option<u64>; PLACES] {
        let mut out = [None; PLACES];
        if let Some(seen) = self.keys.get(&slot(model, key)) {
            let live = seen.iter().flatten().filter(|s| s.until > now);
            for (out, s) in out.iter_mut().zip(live) {
                *out = Some(s.place);
            }
        }
        out
    }

    /// `key` of group `model` was served by `place` at `now`: its last place, remembered until
    /// `until`; the places before it stay (the oldest goes when there are [`PLACES`]).
    pub(crate) fn remember(
        &self,
        model: &str,
        key: &str,
        place: u64,
        now: Instant,
        until: Instant,
    ) {
        let slot = slot(model, key);
        let first = Seen { place, until };
        if let Some(mut seen) = self.keys.get_mut(&slot) {
            let before = *seen;
            let kept = before
                .iter()
                .flatten()
                .filter(|s| s.place != place && s.until > now);
            *seen = [None; PLACES];
            seen[0] = Some(first);
            for (to, s) in seen[1..].iter_mut().zip(kept) {
                *to = Some(*s);
            }
            return;
        }
        if self.keys.len() >= MAX_KEYS {
            self.keys
                .retain(|_, seen| seen.iter().flatten().any(|s| s.until > now));
            if self.keys.len() >= MAX_KEYS {
                return;
            }
        }
        let mut seen = [None; PLACES];
        seen[0] = Some(first);
        self.keys.insert(slot, seen);
    }
}
