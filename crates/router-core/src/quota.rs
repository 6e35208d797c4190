//! Quotas: tokens and requests per minute, reserved before a call and reconciled after it.
//!
//! Each limited deployment has a token bucket for tokens and one for requests. A bucket holds
//! `window` worth of its per-minute limit (`limit × window / 60 s`, the burst the upstream
//! tolerates: Azure evaluates over 1 s or 10 s windows) and refills continuously at
//! `limit / 60 s`. A request takes its estimated cost when it is sent (as Azure charges the
//! estimated prompt plus the output cap at admission); when the answer comes, the difference to
//! the real usage is given back or taken; a failed request gives its whole reservation back.
//! A request larger than a whole bucket is admitted only when the bucket is full, and leaves it
//! in debt, so that a big request is never refused forever. The upstream's own
//! `x-ratelimit-remaining-*` headers lower a bucket that thinks it has more.
//!
//! The math is in [`Bucket`], with every timestamp passed in. Where the buckets live is a
//! [`StateStore`]: [`MemoryStore`] in the process, or a shared store (`state-redis`) so that
//! replicas share one quota and one set of cooldowns.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;

use crate::error::Error;

/// A deployment's quota. A limit of `None` is not enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// The burst window: a bucket holds this much of the per-minute limit. Default 10 s.
    pub window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tpm: None,
            rpm: None,
            window: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Tokens and requests per minute with the default 10 s window.
    pub fn per_minute(tpm: Option<u64>, rpm: Option<u64>) -> Self {
        Self {
            tpm,
            rpm,
            ..Self::default()
        }
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.tpm.is_some() || self.rpm.is_some()
    }

    /// The same limits scaled by `share` (a replica's share of a quota when it cannot reach
    /// the shared store), never below 1.
    #[must_use]
    pub fn scaled(&self, share: f64) -> Self {
        let scale = |limit: u64| ((limit as f64 * share).floor() as u64).max(1);
        Self {
            tpm: self.tpm.map(scale),
            rpm: self.rpm.map(scale),
            window: self.window,
        }
    }

    /// The token bucket's shape, if tokens are limited.
    pub fn tokens(&self) -> Option<Shape> {
        self.tpm.map(|limit| Shape::new(limit, self.window))
    }

    /// The request bucket's shape, if requests are limited.
    pub fn requests(&self) -> Option<Shape> {
        self.rpm.map(|limit| Shape::new(limit, self.window))
    }
}

/// What the upstream's `x-ratelimit-remaining-*` headers allow this router's buckets to hold.
///
/// Upstreams count over windows that reset: "R left, full again in T" (OpenAI sends T as
/// `x-ratelimit-reset-*`; Azure does not, and half a window is assumed). A continuous bucket
/// that holds R + rate × T is never more generous than the upstream will be, and is lowered
/// only when others use the same quota, not each time the upstream's window nears its end.
pub fn upstream_allowance(
    limits: &Limits,
    info: &crate::RateLimitInfo,
) -> (Option<u64>, Option<u64>) {
    let allowance = |remaining: Option<u64>, reset: Option<Duration>, shape: Option<Shape>| {
        let (remaining, shape) = (remaining?, shape?);
        let reset = reset.unwrap_or(limits.window / 2);
        Some(remaining.saturating_add((shape.rate * reset.as_secs_f64()) as u64))
    };
    (
        allowance(info.remaining_tokens, info.reset_tokens, limits.tokens()),
        allowance(
            info.remaining_requests,
            info.reset_requests,
            limits.requests(),
        ),
    )
}

/// A bucket's capacity and refill rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// What a full bucket holds.
    pub capacity: f64,
    /// Refill per second.
    pub rate: f64,
}

impl Shape {
    /// The shape of a per-minute `limit` with a burst `window`.
    pub fn new(limit: u64, window: Duration) -> Self {
        let rate = limit as f64 / 60.0;
        Self {
            capacity: (rate * window.as_secs_f64()).max(1.0),
            rate,
        }
    }

    /// What a request of `cost` needs in the bucket: its cost, or a full bucket if it is larger.
    pub fn needed(&self, cost: f64) -> f64 {
        cost.min(self.capacity)
    }
}

/// A token bucket's level at a time. Pure arithmetic; levels can go below zero (debt).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Units available at `at` (negative: debt).
    pub level: f64,
    /// When `level` was true.
    pub at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(shape: Shape, at: Instant) -> Self {
        Self {
            level: shape.capacity,
            at,
        }
    }

    /// The level at `now`, refilled and capped.
    pub fn level_at(&self, shape: Shape, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        (self.level + shape.rate * dt).min(shape.capacity)
    }

    /// How long until the bucket holds what a request of `cost` needs; zero when it does now.
    pub fn wait_for(&self, shape: Shape, cost: f64, now: Instant) -> Duration {
        let missing = shape.needed(cost) - self.level_at(shape, now);
        if missing <= 1e-9 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / shape.rate.max(1e-9))
        }
    }

    /// Takes `cost` if the bucket holds what it needs; otherwise how long until it will.
    pub fn take(&mut self, shape: Shape, cost: f64, now: Instant) -> Result<f64, Duration> {
        let wait = self.wait_for(shape, cost, now);
        if !wait.is_zero() {
            return Err(wait);
        }
        self.level = self.level_at(shape, now) - cost;
        self.at = now;
        Ok(self.level)
    }

    /// Gives back (`amount > 0`) or takes more (`amount < 0`), capped at the capacity.
    pub fn adjust(&mut self, shape: Shape, amount: f64, now: Instant) {
        self.level = (self.level_at(shape, now) + amount).min(shape.capacity);
        self.at = now;
    }

    /// Lowers the level to `remaining` if it is higher.
    pub fn correct(&mut self, shape: Shape, remaining: f64, now: Instant) {
        self.level = self.level_at(shape, now).min(remaining);
        self.at = now;
    }
}

/// How a store learns what an upstream really admits, when the upstream refuses (429) requests
/// the configured limits allowed.
///
/// Configured limits say how much an upstream admits per minute, not how it counts: a sliding
/// window (nothing frees until the admission that used it is a window old), a fixed window, or
/// provisioned throughput's utilisation all refuse a burst that a continuous bucket allows. So a
/// 429 on a request the buckets admitted *cuts* what the router believes ([`Learned`]): the burst
/// a bucket holds by [`burst_cut`](Self::burst_cut), at most once per window (the 429s of one
/// overshoot are one lesson); and, when it happens again within [`REPEAT_WINDOWS`] windows of
/// the last cut (a smaller burst did not help: the rate is wrong), the rate it refills at by
/// [`rate_cut`](Self::rate_cut). A fixed window's first overshoot is the burst's fault alone,
/// and must not cost its rate. Successes grow both back, additively, in proportion to the time spent serving
/// (at most a window per success, so an idle hour teaches nothing). The shares never go above
/// one (the configured limits are a ceiling) nor below [`floor`](Self::floor) (nothing is shut
/// forever by learning).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learning {
    /// What a refusal leaves of the burst share. Default 0.5.
    pub burst_cut: f64,
    /// What a refusal leaves of the rate share. Default 0.95.
    pub rate_cut: f64,
    /// The lowest either share goes. Default 0.05.
    pub floor: f64,
    /// Burst share regained per minute of successes. Default 0.5.
    pub burst_regrow: f64,
    /// Rate share regained per minute of successes. Default 0.05.
    pub rate_regrow: f64,
}

impl Default for Learning {
    fn default() -> Self {
        Self {
            burst_cut: 0.5,
            rate_cut: 0.95,
            floor: 0.05,
            burst_regrow: 0.5,
            rate_regrow: 0.05,
        }
    }
}

/// A refusal within this many windows of the last cut also cuts the rate.
pub const REPEAT_WINDOWS: u32 = 6;

/// The shares of a deployment's configured limits its upstream has been seen to admit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learned {
    /// Share of the configured burst (a bucket's capacity), 0 to 1.
    pub burst: f64,
    /// Share of the configured rate (the per-minute limits), 0 to 1.
    pub rate: f64,
}

impl Default for Learned {
    fn default() -> Self {
        Self::FULL
    }
}

impl Learned {
    /// Nothing learned: the configured limits as they are.
    pub const FULL: Self = Self {
        burst: 1.0,
        rate: 1.0,
    };

    /// Whether nothing has been learned.
    pub fn is_full(&self) -> bool {
        self.burst >= 1.0 && self.rate >= 1.0
    }

    /// The limits the router keeps to: per-minute limits times the rate share, and a window
    /// that makes each bucket hold the burst share of its configured capacity.
    #[must_use]
    pub fn apply(&self, limits: &Limits) -> Limits {
        if self.is_full() {
            return *limits;
        }
        let (burst, rate) = (self.burst.clamp(1e-3, 1.0), self.rate.clamp(1e-3, 1.0));
        let scale = |limit: u64| ((limit as f64 * rate).round() as u64).max(1);
        Limits {
            tpm: limits.tpm.map(scale),
            rpm: limits.rpm.map(scale),
            window: limits.window.mul_f64(burst / rate),
        }
    }
}

/// What a store keeps per deployment to learn its upstream's admissions ([`Learning`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learner {
    /// The shares learned so far.
    pub learned: Learned,
    /// When the shares last grew or were cut.
    pub grown_at: Instant,
    /// When the last cut was.
    pub cut_at: Option<Instant>,
}

impl Learner {
    /// Nothing learned yet, as of `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            learned: Learned::FULL,
            grown_at: now,
            cut_at: None,
        }
    }

    /// The upstream refused a request the buckets admitted. Cuts the burst share unless a cut
    /// happened within the last `window`, and the rate share too when the last cut was within
    /// [`REPEAT_WINDOWS`] windows; whether it cut.
    pub fn refused(&mut self, policy: &Learning, window: Duration, now: Instant) -> bool {
        let since = self.cut_at.map(|at| now.saturating_duration_since(at));
        if since.is_some_and(|since| since < window) {
            return false;
        }
        let repeat = since.is_some_and(|since| since < window * REPEAT_WINDOWS);
        let floor = policy.floor.clamp(1e-3, 1.0);
        self.learned = Learned {
            burst: (self.learned.burst * policy.burst_cut).max(floor),
            rate: if repeat {
                (self.learned.rate * policy.rate_cut).max(floor)
            } else {
                self.learned.rate
            },
        };
        self.cut_at = Some(now);
        self.grown_at = now;
        true
    }

    /// A request was served: the shares grow back by the time served since the last change,
    /// counted up to one `window`.
    pub fn served(&mut self, policy: &Learning, window: Duration, now: Instant) {
        let minutes = now
            .saturating_duration_since(self.grown_at)
            .min(window)
            .as_secs_f64()
            / 60.0;
        self.learned = Learned {
            burst: (self.learned.burst + policy.burst_regrow * minutes).min(1.0),
            rate: (self.learned.rate + policy.rate_regrow * minutes).min(1.0),
        };
        self.grown_at = now;
    }
}

/// What one request takes from a deployment's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Charge {
    /// Estimated tokens: prompt plus output cap times choices.
    pub tokens: u64,
    /// Requests (1).
    pub requests: u64,
}

/// How a reservation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settlement {
    /// Tokens to give back (negative: to take more).
    pub tokens_back: i64,
    /// Requests to give back.
    pub requests_back: i64,
    /// The upstream's `x-ratelimit-remaining-tokens`, if it sent one.
    pub remaining_tokens: Option<u64>,
    /// The upstream's `x-ratelimit-remaining-requests`, if it sent one.
    pub remaining_requests: Option<u64>,
    /// Whether the upstream served the request (what a [`Learner`] grows back on).
    pub served: bool,
}

impl Settlement {
    /// The whole reservation back (the request failed or was dropped).
    pub fn release(charge: Charge) -> Self {
        Self {
            tokens_back: i64::try_from(charge.tokens).unwrap_or(i64::MAX),
            requests_back: i64::try_from(charge.requests).unwrap_or(i64::MAX),
            ..Self::default()
        }
    }
}

/// A store's answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Reserved; the levels left (where limited).
    Admitted {
        /// Tokens left in the bucket.
        tokens_left: Option<f64>,
        /// Requests left in the bucket.
        requests_left: Option<f64>,
        /// The shares of the limits the store keeps to ([`Learned::FULL`] until a refusal).
        learned: Learned,
    },
    /// Not now: how long until the buckets allow it, or until a shared cooldown ends.
    Denied {
        /// The wait.
        retry_after: Duration,
        /// Whether a cooldown (a 429 seen by any replica), not the quota, refused it.
        cooling: bool,
    },
}

/// Where quota use, cooldowns and what was learned of the upstreams' admissions live: in the
/// process, or shared by replicas.
///
/// `key` names a deployment (stable across replicas: endpoint and model). `limits` travel with
/// every call (the configured ones; a store applies what it learned itself), so a store needs
/// no configuration of its own. Implementations must be atomic per call: two replicas
/// reserving at once never both get the last tokens.
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug {
    /// Reserves `charge` if the deployment's buckets allow it and no cooldown is shared.
    async fn reserve(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        now: Instant,
    ) -> Result<Admission, Error>;

    /// Settles a reservation: gives `tokens` and `requests` back (negative: takes more, when
    /// the real usage exceeded the estimate), then lowers the buckets to what the upstream
    /// said is left, if it said.
    async fn settle(
        &self,
        key: &str,
        limits: &Limits,
        settlement: Settlement,
        now: Instant,
    ) -> Result<(), Error>;

    /// Shares a cooldown of `wait` from now.
    async fn cool_down(&self, key: &str, wait: Duration, now: Instant) -> Result<(), Error>;

    /// The upstream refused (429) a request these buckets admitted, and said to wait `wait`:
    /// shares the cooldown, empties the buckets until it ends (what freed upstream meanwhile is
    /// what the refill brings, not a burst), and cuts what the store believes the upstream
    /// admits ([`Learner::refused`]). Returns the shares now in force.
    ///
    /// The default only cools down: a store that does not learn keeps to the configured limits.
    async fn refused(
        &self,
        key: &str,
        limits: &Limits,
        wait: Duration,
        now: Instant,
    ) -> Result<Learned, Error> {
        let _ = limits;
        self.cool_down(key, wait, now).await?;
        Ok(Learned::FULL)
    }

    /// Whether the store is shared right now (a shared store that fell back to local
    /// accounting answers `false`).
    fn is_shared(&self) -> bool {
        false
    }
}

#[derive(Debug, Default)]
struct Entry {
    tokens: Option<Bucket>,
    requests: Option<Bucket>,
    cooling_until: Option<Instant>,
    learner: Option<Learner>,
}

impl Entry {
    /// The configured limits with what was learned applied.
    fn effective(&self, limits: &Limits) -> Limits {
        self.learner
            .map_or(*limits, |learner| learner.learned.apply(limits))
    }

    fn learned(&self) -> Learned {
        self.learner
            .map_or(Learned::FULL, |learner| learner.learned)
    }

    fn tokens(&mut self, shape: Shape, now: Instant) -> &mut Bucket {
        self.tokens.get_or_insert_with(|| Bucket::full(shape, now))
    }

    fn requests(&mut self, shape: Shape, now: Instant) -> &mut Bucket {
        self.requests
            .get_or_insert_with(|| Bucket::full(shape, now))
    }
}

/// Quota, cooldowns and learned admissions in this process. The default store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: DashMap<String, Mutex<Entry>>,
    learning: Learning,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that learns by `learning` instead of the default.
    pub fn with_learning(learning: Learning) -> Self {
        Self {
            learning,
            ..Self::default()
        }
    }

    fn with<T>(&self, key: &str, f: impl FnOnce(&mut Entry) -> T) -> T {
        if !self.entries.contains_key(key) {
            self.entries.entry(key.to_owned()).or_default();
        }
        // The entry exists now; the shard guard is held only for this short, await-free call.
        match self.entries.get(key) {
            Some(entry) => f(&mut entry.lock().unwrap_or_else(PoisonError::into_inner)),
            None => f(&mut Entry::default()),
        }
    }

    /// Reserves synchronously (the async trait methods call this).
    pub fn reserve_now(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        now: Instant,
    ) -> Admission {
        self.with(key, |entry| {
            if let Some(until) = entry.cooling_until.filter(|until| *until > now) {
                return Admission::Denied {
                    retry_after: until - now,
                    cooling: true,
                };
            }
            let limits = entry.effective(limits);
            let (tokens, requests) = (limits.tokens(), limits.requests());
            // Check both before taking from either.
            let mut wait = Duration::ZERO;
            if let Some(shape) = tokens {
                let mut probe = *entry.tokens(shape, now);
                if let Err(w) = probe.take(shape, charge.tokens as f64, now) {
                    wait = wait.max(w);
                }
            }
            if let Some(shape) = requests {
                let mut probe = *entry.requests(shape, now);
                if let Err(w) = probe.take(shape, charge.requests as f64, now) {
                    wait = wait.max(w);
                }
            }
            if !wait.is_zero() {
                return Admission::Denied {
                    retry_after: wait,
                    cooling: false,
                };
            }
            let tokens_left = tokens.and_then(|shape| {
                entry
                    .tokens(shape, now)
                    .take(shape, charge.tokens as f64, now)
                    .ok()
            });
            let requests_left = requests.and_then(|shape| {
                entry
                    .requests(shape, now)
                    .take(shape, charge.requests as f64, now)
                    .ok()
            });
            Admission::Admitted {
                tokens_left,
                requests_left,
                learned: entry.learned(),
            }
        })
    }

    /// Adjusts synchronously.
    pub fn adjust_now(&self, key: &str, limits: &Limits, tokens: i64, requests: i64, now: Instant) {
        self.with(key, |entry| {
            let limits = entry.effective(limits);
            if let Some(shape) = limits.tokens() {
                entry.tokens(shape, now).adjust(shape, tokens as f64, now);
            }
            if let Some(shape) = limits.requests() {
                entry
                    .requests(shape, now)
                    .adjust(shape, requests as f64, now);
            }
        });
    }

    /// Corrects synchronously.
    pub fn correct_now(
        &self,
        key: &str,
        limits: &Limits,
        tokens: Option<u64>,
        requests: Option<u64>,
        now: Instant,
    ) {
        self.with(key, |entry| {
            let limits = entry.effective(limits);
            if let (Some(shape), Some(remaining)) = (limits.tokens(), tokens) {
                entry
                    .tokens(shape, now)
                    .correct(shape, remaining as f64, now);
            }
            if let (Some(shape), Some(remaining)) = (limits.requests(), requests) {
                entry
                    .requests(shape, now)
                    .correct(shape, remaining as f64, now);
            }
        });
    }

    /// Settles synchronously.
    pub fn settle_now(&self, key: &str, limits: &Limits, settlement: Settlement, now: Instant) {
        self.adjust_now(
            key,
            limits,
            settlement.tokens_back,
            settlement.requests_back,
            now,
        );
        self.correct_now(
            key,
            limits,
            settlement.remaining_tokens,
            settlement.remaining_requests,
            now,
        );
        if settlement.served {
            self.with(key, |entry| {
                if let Some(learner) = &mut entry.learner {
                    learner.served(&self.learning, limits.window, now);
                }
            });
        }
    }

    /// Takes a refusal synchronously ([`StateStore::refused`]).
    pub fn refused_now(&self, key: &str, limits: &Limits, wait: Duration, now: Instant) -> Learned {
        self.cool_down_now(key, wait, now);
        self.with(key, |entry| {
            entry
                .learner
                .get_or_insert_with(|| Learner::new(now))
                .refused(&self.learning, limits.window, now);
            let limits = entry.effective(limits);
            let empty_until = |bucket: &mut Bucket, shape: Shape| {
                let level = bucket
                    .level_at(shape, now)
                    .min(-shape.rate * wait.as_secs_f64());
                *bucket = Bucket { level, at: now };
            };
            if let Some(shape) = limits.tokens() {
                empty_until(entry.tokens(shape, now), shape);
            }
            if let Some(shape) = limits.requests() {
                empty_until(entry.requests(shape, now), shape);
            }
            entry.learned()
        })
    }

    /// What the store has learned of `key`'s upstream, for tests and stats.
    pub fn learned(&self, key: &str) -> Learned {
        self.with(key, |entry| entry.learned())
    }

    /// Cools down synchronously (only ever extends).
    pub fn cool_down_now(&self, key: &str, wait: Duration, now: Instant) {
        self.with(key, |entry| {
            let until = now + wait;
            entry.cooling_until = Some(entry.cooling_until.map_or(until, |u| u.max(until)));
        });
    }

    /// The request level of `key` at `now`, for tests and stats.
    pub fn requests_level(&self, key: &str, limits: &Limits, now: Instant) -> Option<f64> {
        self.with(key, |entry| {
            let shape = entry.effective(limits).requests()?;
            Some(entry.requests(shape, now).level_at(shape, now))
        })
    }

    /// The token level of `key` at `now`, for tests and stats.
    pub fn tokens_level(&self, key: &str, limits: &Limits, now: Instant) -> Option<f64> {
        self.with(key, |entry| {
            let shape = entry.effective(limits).tokens()?;
            Some(entry.tokens(shape, now).level_at(shape, now))
        })
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn reserve(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        now: Instant,
    ) -> Result<Admission, Error> {
        Ok(self.reserve_now(key, limits, charge, now))
    }

    async fn settle(
        &self,
        key: &str,
        limits: &Limits,
        settlement: Settlement,
        now: Instant,
    ) -> Result<(), Error> {
        self.settle_now(key, limits, settlement, now);
        Ok(())
    }

    async fn cool_down(&self, key: &str, wait: Duration, now: Instant) -> Result<(), Error> {
        self.cool_down_now(key, wait, now);
        Ok(())
    }

    async fn refused(
        &self,
        key: &str,
        limits: &Limits,
        wait: Duration,
        now: Instant,
    ) -> Result<Learned, Error> {
        Ok(self.refused_now(key, limits, wait, now))
    }
}

/// What this process last knew of a deployment's buckets, for choosing among deployments
/// without asking the store: lock-free, refilled on read.
#[derive(Debug)]
pub struct QuotaView {
    origin: Instant,
    /// f32 level of the token bucket and u32 milliseconds since `origin`; NaN level: unknown.
    tokens: AtomicU64,
    requests: AtomicU64,
    /// Milliseconds since `origin` before which the store said no.
    blocked_until: AtomicU64,
}

fn pack(level: f32, at_ms: u32) -> u64 {
    (u64::from(level.to_bits()) << 32) | u64::from(at_ms)
}

fn unpack(packed: u64) -> (f32, u32) {
    (f32::from_bits((packed >> 32) as u32), packed as u32)
}

impl QuotaView {
    /// A view that knows nothing yet (treated as full).
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            tokens: AtomicU64::new(pack(f32::NAN, 0)),
            requests: AtomicU64::new(pack(f32::NAN, 0)),
            blocked_until: AtomicU64::new(0),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// The bucket a cell holds (full at `now` when nothing is known yet): the same
    /// [`Bucket`] arithmetic as the stores', from a packed level and timestamp.
    fn bucket(&self, cell: &AtomicU64, shape: Shape, now: Instant) -> Bucket {
        let (level, at) = unpack(cell.load(Ordering::Relaxed));
        if level.is_nan() {
            return Bucket::full(shape, now);
        }
        Bucket {
            level: f64::from(level),
            at: self.origin + Duration::from_millis(u64::from(at)),
        }
    }

    fn store(&self, cell: &AtomicU64, level: f64, at: Instant) {
        cell.store(pack(level as f32, self.ms(at) as u32), Ordering::Relaxed);
    }

    /// Records levels a store reported at `now`.
    pub fn update(&self, tokens: Option<f64>, requests: Option<f64>, now: Instant) {
        if let Some(level) = tokens {
            self.store(&self.tokens, level, now);
        }
        if let Some(level) = requests {
            self.store(&self.requests, level, now);
        }
    }

    /// Lowers the view to what the upstream said is left.
    pub fn correct(
        &self,
        limits: &Limits,
        tokens: Option<u64>,
        requests: Option<u64>,
        now: Instant,
    ) {
        let lower = |cell: &AtomicU64, shape: Option<Shape>, remaining: Option<u64>| {
            if let (Some(shape), Some(remaining)) = (shape, remaining) {
                let mut bucket = self.bucket(cell, shape, now);
                bucket.correct(shape, remaining as f64, now);
                self.store(cell, bucket.level, now);
            }
        };
        lower(&self.tokens, limits.tokens(), tokens);
        lower(&self.requests, limits.requests(), requests);
    }

    /// The upstream refused and said to wait `wait`: the view's buckets are empty when the
    /// wait ends, as the store's are ([`StateStore::refused`]). `limits` are the ones in force.
    pub fn empty_until(&self, limits: &Limits, wait: Duration, now: Instant) {
        for (cell, shape) in [
            (&self.tokens, limits.tokens()),
            (&self.requests, limits.requests()),
        ] {
            if let Some(shape) = shape {
                let level = self
                    .bucket(cell, shape, now)
                    .level_at(shape, now)
                    .min(-shape.rate * wait.as_secs_f64());
                self.store(cell, level, now);
            }
        }
        self.block(wait, now);
    }

    /// The store said no until `now + wait`.
    pub fn block(&self, wait: Duration, now: Instant) {
        // Rounded up, so that a wait shorter than a millisecond still blocks.
        let until = (now + wait)
            .saturating_duration_since(self.origin)
            .as_micros()
            .div_ceil(1000) as u64;
        self.blocked_until
            .fetch_max(until.max(1), Ordering::Relaxed);
    }

    /// When a request of `charge` could be admitted: `None` for now, else the time.
    pub fn available_at(&self, limits: &Limits, charge: Charge, now: Instant) -> Option<Instant> {
        let now_ms = self.ms(now);
        let blocked = self.blocked_until.load(Ordering::Relaxed);
        let mut wait = Duration::from_millis(blocked.saturating_sub(now_ms));
        for (cell, shape, cost) in [
            (&self.tokens, limits.tokens(), charge.tokens as f64),
            (&self.requests, limits.requests(), charge.requests as f64),
        ] {
            if let Some(shape) = shape {
                wait = wait.max(self.bucket(cell, shape, now).wait_for(shape, cost, now));
            }
        }
        (!wait.is_zero()).then(|| now + wait)
    }

    /// The free share of the token bucket (of the request bucket when tokens are not limited),
    /// 0 to 1; `None` when the deployment has no limit.
    pub fn headroom(&self, limits: &Limits, now: Instant) -> Option<f64> {
        let (cell, shape) = match (limits.tokens(), limits.requests()) {
            (Some(shape), _) => (&self.tokens, shape),
            (None, Some(shape)) => (&self.requests, shape),
            (None, None) => return None,
        };
        let level = self.bucket(cell, shape, now).level_at(shape, now);
        Some((level / shape.capacity).clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests;
