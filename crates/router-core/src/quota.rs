//! Quotas: tokens and requests per minute, reserved before a call and reconciled after it.
//!
//! Each limited deployment has a [`Log`] of what it admitted over its last window (`window`,
//! default 10 s: Azure evaluates its limits over 1 s or 10 s windows). A window holds
//! `limit × window / 60 s`; a request fits while the window's total leaves room for it, and
//! holds its estimated cost until it is a window old (as Azure charges the estimated prompt
//! plus the output cap at admission). No upstream that counts per window, fixed, sliding or
//! provisioned, refuses what such a log admits, where a continuous token bucket lets two
//! windows' quota into one. When the answer comes, the difference to the real usage is given
//! back or taken; a failed request gives its whole reservation back. A request larger than a
//! whole window is admitted only into an empty one, and held for as many windows as it is
//! large, so that a big request is never refused forever. The upstream's own
//! `x-ratelimit-remaining-*` headers lower what a log thinks is left, and a 429 on a request
//! the log admitted teaches the store the share of the limits the upstream really admits
//! ([`Learning`]).
//!
//! The math is in [`Log`] and [`Learner`], with every timestamp passed in. Where the logs live
//! is a [`StateStore`]: [`MemoryStore`] in the process, or a shared store (`state-redis`) so
//! that replicas share one quota and one set of cooldowns. [`QuotaView`] is this process's
//! lock-free hint of each deployment's room, for choosing among deployments.

use std::collections::VecDeque;
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
    /// The window the upstream counts over: a window holds this much of the per-minute limit,
    /// and an admission holds its cost until it is this old. Default 10 s; set it to the
    /// upstream's (Azure: 1 s or 10 s).
    pub window: Duration,
    /// How the upstream meters the quota: per window (the default), or as provisioned
    /// throughput.
    pub model: QuotaModel,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tpm: None,
            rpm: None,
            window: Duration::from_secs(10),
            model: QuotaModel::Window,
        }
    }
}

/// How an upstream meters a deployment's quota, which decides what the router's [`Log`]
/// admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QuotaModel {
    /// Per window, fixed or sliding (pay-as-you-go deployments): a request is admitted while
    /// the window's total leaves room for it, and holds its cost until it is a window old.
    #[default]
    Window,
    /// Provisioned throughput (Azure PTU): utilisation is a leaky bucket that drains at the
    /// token limit's rate and holds a window's worth; a request is admitted while utilisation
    /// is under 100 % and may take it over. Requests per minute are not metered (an `rpm`
    /// limit is ignored). A request holds its cost until the bucket has drained it, in the
    /// order admitted, so that a steady load is served at the whole drain rate where a window
    /// log would admit only the whole requests a window holds.
    Provisioned,
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
            model: self.model,
        }
    }

    /// The token bucket's shape, if tokens are limited.
    pub fn tokens(&self) -> Option<Shape> {
        self.tpm.map(|limit| Shape::new(limit, self.window))
    }

    /// The request bucket's shape, if requests are limited (never under provisioned
    /// throughput).
    pub fn requests(&self) -> Option<Shape> {
        match self.model {
            QuotaModel::Window => self.rpm.map(|limit| Shape::new(limit, self.window)),
            QuotaModel::Provisioned => None,
        }
    }

    /// Whether utilisation is metered as provisioned throughput (with a token limit).
    pub fn is_provisioned(&self) -> bool {
        self.model == QuotaModel::Provisioned && self.tpm.is_some()
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
/// its log admitted.
///
/// A deployment's [`Log`] keeps to its configured limits per window, which no upstream that
/// counts its quota per window (fixed, sliding or provisioned) refuses. A 429 on a request the
/// log admitted therefore means the upstream admits less than configured: its quota is
/// smaller, other clients share it, or it counts a request as more than the router's
/// estimate. The refusal *measures* how much less: the share of its configured quota the log
/// holds when the upstream says it is full. The store keeps to that share ([`Learned`]),
/// cutting at least to [`cut`](Self::cut) of what it kept to and at most to
/// [`deepest_cut`](Self::deepest_cut), at most once per window (the 429s of one overshoot are
/// one lesson). Successes grow the share back, additively, in proportion to the time spent
/// serving (at most a window per success, so an idle hour teaches nothing). The share never
/// goes above one (the configured limits are a ceiling) nor below [`floor`](Self::floor)
/// (nothing is shut forever by learning).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learning {
    /// The most a refusal leaves of the share: a refusal always cuts. Default 0.95.
    pub cut: f64,
    /// The least a refusal leaves of the share, however little the log held. Default 0.5.
    pub deepest_cut: f64,
    /// The lowest the share goes. Default 0.05.
    pub floor: f64,
    /// Share regained per minute of successes. Default 0.2.
    pub regrow: f64,
}

impl Default for Learning {
    fn default() -> Self {
        Self {
            cut: 0.95,
            deepest_cut: 0.5,
            floor: 0.05,
            regrow: 0.2,
        }
    }
}

impl Learning {
    /// A policy with other cuts, floor and regrowth; each is clamped to (0, 1] (`regrow` to
    /// at least 0), and `deepest_cut` to at most `cut`.
    pub fn new(cut: f64, deepest_cut: f64, floor: f64, regrow: f64) -> Self {
        let unit = |x: f64| {
            if x.is_finite() {
                x.clamp(1e-3, 1.0)
            } else {
                1.0
            }
        };
        let cut = unit(cut);
        Self {
            cut,
            deepest_cut: unit(deepest_cut).min(cut),
            floor: unit(floor),
            regrow: if regrow.is_finite() {
                regrow.max(0.0)
            } else {
                0.0
            },
        }
    }

    /// The same policy, checked instead of clamped (for configuration files): a
    /// [`Config`](crate::ErrorKind::Config) error whose message starts with the field's name
    /// (`cut`, `deepest_cut` and `floor` are shares from 0.001 to 1, `deepest_cut` at most
    /// `cut`; `regrow` is at least 0).
    ///
    /// # Errors
    ///
    /// The first value out of range, named.
    pub fn checked(cut: f64, deepest_cut: f64, floor: f64, regrow: f64) -> Result<Self, Error> {
        for (name, value) in [("cut", cut), ("deepest_cut", deepest_cut), ("floor", floor)] {
            if !(value.is_finite() && (1e-3..=1.0).contains(&value)) {
                return Err(Error::config(format!(
                    "{name} = {value}: a share of the quota, from 0.001 to 1"
                )));
            }
        }
        if deepest_cut > cut {
            return Err(Error::config(format!(
                "deepest_cut = {deepest_cut} is above cut = {cut}: the deepest cut leaves at \
                 most what every cut leaves"
            )));
        }
        if !(regrow.is_finite() && regrow >= 0.0) {
            return Err(Error::config(format!(
                "regrow = {regrow}: a share per minute, at least 0"
            )));
        }
        Ok(Self::new(cut, deepest_cut, floor, regrow))
    }
}

/// The share of a deployment's configured limits its upstream has been seen to admit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learned {
    /// Share of the configured limits, 0 to 1.
    pub share: f64,
}

impl Default for Learned {
    fn default() -> Self {
        Self::FULL
    }
}

impl Learned {
    /// Nothing learned: the configured limits as they are.
    pub const FULL: Self = Self { share: 1.0 };

    /// Whether nothing has been learned.
    pub fn is_full(&self) -> bool {
        self.share >= 1.0
    }

    /// The limits the router keeps to: the per-minute limits times the share, over the same
    /// window.
    #[must_use]
    pub fn apply(&self, limits: &Limits) -> Limits {
        if self.is_full() {
            return *limits;
        }
        let share = self.share.clamp(1e-3, 1.0);
        let scale = |limit: u64| ((limit as f64 * share).floor() as u64).max(1);
        Limits {
            tpm: limits.tpm.map(scale),
            rpm: limits.rpm.map(scale),
            window: limits.window,
            model: limits.model,
        }
    }
}

/// What a store keeps per deployment to learn its upstream's admissions ([`Learning`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learner {
    /// The share learned so far.
    pub learned: Learned,
    /// When the share last grew or was cut.
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

    /// The upstream refused a request the log admitted while the log held `held` of the
    /// configured limits (the larger of the token and request shares). Cuts the share to
    /// `held`, within [`Learning::deepest_cut`] and [`Learning::cut`] of what it was, unless a
    /// cut happened within the last `window`; whether it cut.
    pub fn refused(
        &mut self,
        policy: &Learning,
        window: Duration,
        held: f64,
        now: Instant,
    ) -> bool {
        if self
            .cut_at
            .is_some_and(|at| now.saturating_duration_since(at) < window)
        {
            return false;
        }
        let share = self.learned.share;
        let held = if held.is_finite() { held } else { share };
        let cut = held.max(share * policy.deepest_cut).min(share * policy.cut);
        self.learned = Learned {
            share: cut.max(policy.floor).min(1.0),
        };
        self.cut_at = Some(now);
        self.grown_at = now;
        true
    }

    /// A request was served: the share grows back by the time served since the last change,
    /// counted up to one `window`.
    pub fn served(&mut self, policy: &Learning, window: Duration, now: Instant) {
        let minutes = now
            .saturating_duration_since(self.grown_at)
            .min(window)
            .as_secs_f64()
            / 60.0;
        self.learned = Learned {
            share: (self.learned.share + policy.regrow * minutes).min(1.0),
        };
        self.grown_at = now;
    }
}

/// Tokens and requests one admission holds in a [`Log`] until it leaves the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mark {
    /// Names the admission, to settle or release it.
    pub ticket: u64,
    /// When it leaves the window.
    pub until: Instant,
    /// Tokens held.
    pub tokens: f64,
    /// Requests held.
    pub requests: f64,
    /// What had left the window (tokens, requests) when it was admitted: what has left since
    /// is the log's [`freed`](Log::freed) less this.
    pub freed: (f64, f64),
    /// Whether it stands for what the upstream holds and the router did not admit (from its
    /// headers or a refusal), not for an admission: it does not count as freed when it leaves.
    pub unseen: bool,
    /// Under provisioned throughput, for the router's own admissions: when it arrived and when
    /// the utilisation began draining it (what a settlement redraws the drain from).
    pub drain: Option<Drain>,
}

/// When a provisioned-throughput admission arrived and when the upstream's utilisation began
/// draining it: at its arrival, or when the admissions before it had drained, if later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// When the router admitted it.
    pub arrived: Instant,
    /// When its utilisation began to drain.
    pub from: Instant,
}

/// What a deployment admitted in its last window, as the upstreams count it: an admission
/// holds its estimate until it is a window old, and a request fits only while the window's
/// total leaves room for it.
///
/// Whatever way an upstream counts per window (a fixed window that restarts at each edge, a
/// sliding log, or provisioned throughput's utilisation draining at the limit's rate), it
/// admits everything a log of the same window admits: no interval of a window's length ever
/// holds more than a window's quota. A continuous token bucket does not have that property (a
/// full bucket and its refill put two windows' quota into one), which is why it meets 429s
/// that the upstream's arithmetic makes certain.
///
/// An admission leaves the window a little after the upstream's does
/// ([`margin`]): the upstream counts it from when it arrived, later than the
/// router sent it, and the next request must not arrive before the upstream's slot frees. A
/// request larger than a whole window is admitted only into an empty log, and is held for as
/// many windows as it is large, so that a big request is never refused forever and the
/// average stays within the limit. Pure arithmetic, with every timestamp passed in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Log {
    /// Oldest leaving first.
    marks: VecDeque<Mark>,
    tokens: f64,
    requests: f64,
    /// What the router's own admissions have let go of so far (tokens, requests).
    freed: (f64, f64),
    /// Provisioned throughput: when the utilisation the router's admissions put in would have
    /// drained (each admission drains after those before it).
    drained: Option<Instant>,
}

/// The larger of `tokens` and `requests` as shares of a window under `limits` (0 when neither
/// is limited).
fn share_of(limits: &Limits, tokens: f64, requests: f64) -> f64 {
    [
        limits.tokens().map(|s| tokens / s.capacity),
        limits.requests().map(|s| requests / s.capacity),
    ]
    .into_iter()
    .flatten()
    .fold(0.0_f64, f64::max)
}

/// The most openings [`Log::openings`] walks to (a bound on the work of one answer).
pub const MAX_OPENINGS: usize = 4096;

/// In how many parts what a refusal leaves of a window is let go ([`Log::fill_paced`]).
pub const PACED_STEPS: u32 = 10;

/// How long utilisation takes to drain `tokens` at `rate` tokens a second.
fn drain_time(tokens: f64, rate: f64) -> Duration {
    Duration::from_secs_f64((tokens.max(0.0) / rate).min(1e9))
}

/// How long after the window an admission is still held: a hundredth of the window, at most
/// 50 ms.
pub fn margin(window: Duration) -> Duration {
    (window / 100).min(Duration::from_millis(50))
}

impl Log {
    /// A log holding `marks` (in any order), and, under provisioned throughput, when the
    /// utilisation already admitted drains (`drained`): what a store that keeps its log
    /// elsewhere (Redis) rebuilds to walk it ([`openings`](Self::openings)).
    pub fn from_marks(marks: impl IntoIterator<Item = Mark>, drained: Option<Instant>) -> Self {
        let mut log = Self {
            drained,
            ..Self::default()
        };
        for mark in marks {
            log.hold(
                mark.ticket,
                mark.until,
                (mark.tokens, mark.requests),
                mark.unseen,
                mark.drain,
            );
        }
        log
    }

    /// A log holding `marks` (in any order) and the totals `held` (tokens, requests), which
    /// count marks that are not among them: the [`prefix`](Self::prefix) a store that keeps its
    /// log elsewhere (Redis) reads to walk it ([`openings`](Self::openings)) without reading
    /// the whole. The totals are at least what `marks` hold.
    #[must_use]
    pub fn from_prefix(
        marks: impl IntoIterator<Item = Mark>,
        held: (f64, f64),
        drained: Option<Instant>,
    ) -> Self {
        let mut log = Self::from_marks(marks, drained);
        log.tokens = log.tokens.max(held.0);
        log.requests = log.requests.max(held.1);
        log
    }

    /// Lets go of every admission that has left the window by `now`.
    pub fn expire(&mut self, now: Instant) {
        while self.marks.front().is_some_and(|mark| mark.until <= now) {
            if let Some(mark) = self.marks.pop_front() {
                self.tokens -= mark.tokens;
                self.requests -= mark.requests;
                if !mark.unseen {
                    self.freed.0 += mark.tokens;
                    self.freed.1 += mark.requests;
                }
            }
        }
        if self.marks.is_empty() {
            // No drift from float sums: an empty log holds nothing.
            self.tokens = 0.0;
            self.requests = 0.0;
        }
    }

    /// Tokens and requests the window holds (after [`expire`](Self::expire)).
    pub fn held(&self) -> (f64, f64) {
        (self.tokens.max(0.0), self.requests.max(0.0))
    }

    /// What the router's own admissions have let go of so far, leaving the window (tokens,
    /// requests).
    pub fn freed(&self) -> (f64, f64) {
        self.freed
    }

    /// How long until a request of `charge` fits under `limits`; zero when it fits now.
    pub fn wait_for(&mut self, limits: &Limits, charge: Charge, now: Instant) -> Duration {
        self.expire(now);
        let dims = [
            (limits.tokens(), charge.tokens as f64, self.tokens, 0),
            (limits.requests(), charge.requests as f64, self.requests, 1),
        ];
        // Under provisioned throughput a request fits while utilisation is under 100 %,
        // whatever its size; in a window, while the window has room for it.
        let (provisioned, slack) = if limits.is_provisioned() {
            (true, -1e-9)
        } else {
            (false, 1e-9)
        };
        let mut wait = Duration::ZERO;
        for (shape, cost, held, dim) in dims {
            let Some(shape) = shape else { continue };
            let need = if provisioned { 0.0 } else { shape.needed(cost) };
            let mut over = held + need - shape.capacity;
            if over <= slack {
                continue;
            }
            // Walk the admissions in the order they leave until enough has left.
            for mark in &self.marks {
                over -= if dim == 0 { mark.tokens } else { mark.requests };
                if over <= slack {
                    wait = wait.max(mark.until.saturating_duration_since(now));
                    break;
                }
            }
        }
        wait
    }

    /// Admits `charge` as `ticket` if it fits under `limits` now: the tokens and requests left
    /// (where limited); otherwise how long until it fits.
    pub fn admit(
        &mut self,
        limits: &Limits,
        charge: Charge,
        ticket: u64,
        now: Instant,
    ) -> Result<(Option<f64>, Option<f64>), Duration> {
        let wait = self.wait_for(limits, charge, now);
        if !wait.is_zero() {
            return Err(wait);
        }
        let (tokens, requests) = (charge.tokens as f64, charge.requests as f64);
        let (until, drain) =
            if let Some(shape) = limits.tokens().filter(|_| limits.is_provisioned()) {
                // Utilisation drains at the limit's rate, this admission after those before it.
                let from = self.drained.map_or(now, |d| d.max(now));
                let drained = from + drain_time(tokens, shape.rate);
                self.drained = Some(drained);
                let drain = Drain { arrived: now, from };
                (drained + margin(limits.window), Some(drain))
            } else {
                // A request larger than the window is held for as many windows as it is large.
                let windows = share_of(limits, tokens, requests).max(1.0);
                let until = now + limits.window.mul_f64(windows.min(1e6)) + margin(limits.window);
                (until, None)
            };
        self.hold(ticket, until, (tokens, requests), false, drain);
        Ok(self.left(limits))
    }

    /// When each of the next `n` requests of `charge` would be admitted under `limits`, from
    /// `now`, if nothing else were admitted or given back meanwhile: each at the first moment
    /// it fits, after those before it, until `by` (fewer than `n` when some would come
    /// later). The admissions are walked as they leave, so a window that frees in bursts (a
    /// sliding log, a fixed window's edge) gives bursts of openings, not an even rate.
    /// At most [`MAX_OPENINGS`].
    pub fn openings(
        &self,
        limits: &Limits,
        charge: Charge,
        n: usize,
        now: Instant,
        by: Instant,
    ) -> Vec<Instant> {
        let n = n.min(MAX_OPENINGS);
        let mut log = self.prefix(limits, charge, n, now);
        let mut at = now;
        let mut openings = Vec::with_capacity(n);
        while openings.len() < n {
            at += log.wait_for(limits, charge, at);
            if at > by || log.admit(limits, charge, 0, at).is_err() {
                break;
            }
            openings.push(at);
        }
        openings
    }

    /// A copy of the log for walking to the `n`-th opening of `charge` from `from`
    /// ([`openings`](Self::openings)): its totals, and only the marks that walk can reach, in
    /// the order they leave. Those are the marks that have left by `from`, then as many as
    /// must leave for `n + 1` more such requests to fit (each opening needs at most what the
    /// log holds, plus one more request, less the capacity, to have left; admissions the
    /// walk makes itself leave only later), the marks leaving together with the last of them,
    /// and one that leaves after, so that the copy never runs empty while the walk lasts. A
    /// full log under a waiting queue holds thousands of marks; the walk needs a few.
    #[must_use]
    pub fn prefix(&self, limits: &Limits, charge: Charge, n: usize, from: Instant) -> Log {
        let reach = self.reach(limits, charge, n, from);
        Self {
            marks: self.marks.iter().take(reach).copied().collect(),
            tokens: self.tokens,
            requests: self.requests,
            freed: self.freed,
            drained: self.drained,
        }
    }

    /// How many marks [`prefix`](Self::prefix) keeps.
    pub fn reach(&self, limits: &Limits, charge: Charge, n: usize, from: Instant) -> usize {
        let more = n.min(MAX_OPENINGS) as f64 + 1.0;
        let needed = |shape: Option<Shape>, held: f64, cost: u64| {
            shape.map_or(f64::NEG_INFINITY, |shape| {
                held + more * cost as f64 - shape.capacity + 1e-6
            })
        };
        let needed = (
            needed(limits.tokens(), self.tokens, charge.tokens),
            needed(limits.requests(), self.requests, charge.requests),
        );
        let len = self.marks.len();
        let mut left = (0.0, 0.0);
        let mut reach = 0;
        while let Some(mark) = self.marks.get(reach) {
            if mark.until > from && left.0 >= needed.0 && left.1 >= needed.1 {
                break;
            }
            left.0 += mark.tokens;
            left.1 += mark.requests;
            reach += 1;
        }
        while reach > 0 && reach < len && self.marks[reach].until == self.marks[reach - 1].until {
            reach += 1;
        }
        (reach + 1).min(len)
    }

    /// What is left under `limits` (where limited; negative: a large request's debt).
    pub fn left(&self, limits: &Limits) -> (Option<f64>, Option<f64>) {
        (
            limits.tokens().map(|s| s.capacity - self.tokens),
            limits.requests().map(|s| s.capacity - self.requests),
        )
    }

    /// Holds `amount` (tokens, requests) as `ticket` until `until`, in the order marks leave.
    fn hold(
        &mut self,
        ticket: u64,
        until: Instant,
        amount: (f64, f64),
        unseen: bool,
        drain: Option<Drain>,
    ) {
        let at = self.marks.partition_point(|m| m.until <= until);
        self.tokens += amount.0;
        self.requests += amount.1;
        let mark = Mark {
            ticket,
            until,
            tokens: amount.0,
            requests: amount.1,
            freed: self.freed,
            unseen,
            drain,
        };
        self.marks.insert(at, mark);
    }

    /// Gives back (`> 0`) or takes more (`< 0`) of admission `ticket`, never below nothing, and
    /// says what the router's admissions have let go of since it was admitted (what
    /// [`correct`](Self::correct) needs); `None`, changing nothing, when it has left the window.
    /// Under provisioned throughput (`limits`), the drain is redrawn from it on: it drains
    /// sooner (or later) by what it gives back (or takes), and each admission after it begins
    /// draining when the one before it has drained or when it arrived, whichever is later, so
    /// that an idle stretch between them absorbs what is given back, as the upstream's does.
    pub fn adjust(
        &mut self,
        limits: &Limits,
        ticket: u64,
        tokens_back: f64,
        requests_back: f64,
    ) -> Option<(f64, f64)> {
        let at = self.marks.iter().rposition(|m| m.ticket == ticket)?;
        let mark = &mut self.marks[at];
        let tokens = (mark.tokens - tokens_back).max(0.0);
        let requests = (mark.requests - requests_back).max(0.0);
        self.tokens += tokens - mark.tokens;
        self.requests += requests - mark.requests;
        mark.tokens = tokens;
        mark.requests = requests;
        let since = (self.freed.0 - mark.freed.0, self.freed.1 - mark.freed.1);
        if let Some(shape) = limits.tokens().filter(|_| limits.is_provisioned()) {
            self.redrain(at, shape.rate, margin(limits.window));
        }
        Some(since)
    }

    /// Redraws the drain of the router's provisioned admissions from the one at `at` on, in
    /// the order they arrived (the order they leave), at `rate` tokens a second; each leaves
    /// `margin` after it has drained.
    fn redrain(&mut self, at: usize, rate: f64, margin: Duration) {
        let mut end: Option<Instant> = None;
        let mut moved = false;
        for mark in self.marks.iter_mut().skip(at) {
            let Some(drain) = mark.drain.as_mut() else {
                continue;
            };
            if let Some(end) = end {
                drain.from = end.max(drain.arrived);
            }
            let drained = drain.from + drain_time(mark.tokens, rate);
            moved |= mark.until != drained + margin;
            mark.until = drained + margin;
            end = Some(drained);
        }
        if let Some(end) = end {
            self.drained = Some(end);
        }
        if moved {
            // Marks stay in the order they leave (a stable sort keeps ties as they were).
            self.marks.make_contiguous().sort_by_key(|mark| mark.until);
        }
    }

    /// Lowers what is left under `limits` to what the upstream said is left when it admitted a
    /// request, plus `since`, what the router's admissions have let go of since then (the
    /// upstream's window let go of the same; [`adjust`](Self::adjust) says it), if that is
    /// less: the difference, the upstream's own admissions that the router did not see, is
    /// held as `ticket` until `until` (they leave the upstream's window some time within it).
    pub fn correct(
        &mut self,
        limits: &Limits,
        remaining: (Option<u64>, Option<u64>),
        since: (f64, f64),
        ticket: u64,
        until: Instant,
    ) {
        let (left_tokens, left_requests) = self.left(limits);
        let excess = |left: Option<f64>, remaining: Option<u64>, since: f64| match (left, remaining)
        {
            (Some(left), Some(remaining)) => (left - remaining as f64 - since).max(0.0),
            _ => 0.0,
        };
        let excess = (
            excess(left_tokens, remaining.0, since.0),
            excess(left_requests, remaining.1, since.1),
        );
        if excess.0 > 0.0 || excess.1 > 0.0 {
            self.hold(ticket, until, excess, true, None);
        }
    }

    /// The upstream said it is full: holds what is left under `limits` and lets it go in
    /// [`PACED_STEPS`] equal parts over one window from `from` (when the upstream's wait
    /// ends), at no more than the limit's rate, as the upstream's own admissions that the
    /// router did not see would leave its window. Wake-ups after a refusal are paced, not
    /// released together. `ticket` names each part.
    pub fn fill_paced(&mut self, limits: &Limits, from: Instant, mut ticket: impl FnMut() -> u64) {
        let (tokens, requests) = self.left(limits);
        let (tokens, requests) = (
            tokens.unwrap_or(0.0).max(0.0),
            requests.unwrap_or(0.0).max(0.0),
        );
        if tokens <= 0.0 && requests <= 0.0 {
            return;
        }
        let steps = f64::from(PACED_STEPS);
        for step in 1..=PACED_STEPS {
            let until = from + limits.window.mul_f64(f64::from(step) / steps);
            self.hold(
                ticket(),
                until,
                (tokens / steps, requests / steps),
                true,
                None,
            );
        }
    }

    /// The share of `limits` the window holds: the larger of the token and request shares.
    pub fn share_held(&self, limits: &Limits) -> f64 {
        let (tokens, requests) = self.held();
        share_of(limits, tokens, requests)
    }
}

/// How long what the upstream holds beyond the log is held: until the upstream's budgets are
/// full again, if it said, within a window; else half a window.
pub fn phantom_hold(limits: &Limits, reset: Option<Duration>) -> Duration {
    reset.map_or(limits.window / 2, |reset| reset.min(limits.window))
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
    /// The admission settled ([`Admission::Admitted::ticket`]).
    pub ticket: u64,
    /// Tokens to give back (negative: to take more).
    pub tokens_back: i64,
    /// Requests to give back.
    pub requests_back: i64,
    /// The upstream's `x-ratelimit-remaining-tokens` when it admitted the request, if it sent
    /// one.
    pub remaining_tokens: Option<u64>,
    /// The upstream's `x-ratelimit-remaining-requests`, if it sent one.
    pub remaining_requests: Option<u64>,
    /// Until the upstream's budgets are full again (`x-ratelimit-reset-*`), if it said: what
    /// it holds beyond the log leaves within this (half a window when not said).
    pub reset: Option<Duration>,
    /// Whether the upstream served the request (what a [`Learner`] grows back on).
    pub served: bool,
}

impl Settlement {
    /// The whole reservation `ticket` back (the request failed or was dropped).
    pub fn release(ticket: u64, charge: Charge) -> Self {
        Self {
            ticket,
            tokens_back: i64::try_from(charge.tokens).unwrap_or(i64::MAX),
            requests_back: i64::try_from(charge.requests).unwrap_or(i64::MAX),
            ..Self::default()
        }
    }
}

/// A store's answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Reserved; what is left (where limited).
    Admitted {
        /// Tokens left in the window.
        tokens_left: Option<f64>,
        /// Requests left in the window.
        requests_left: Option<f64>,
        /// The share of the limits the store keeps to ([`Learned::FULL`] until a refusal).
        learned: Learned,
        /// Names the admission: settle it with this.
        ticket: u64,
    },
    /// Not now: how long until the window has room, or until a shared cooldown ends.
    Denied {
        /// The wait.
        retry_after: Duration,
        /// Whether a cooldown (a 429 seen by any replica), not the quota, refused it.
        cooling: bool,
    },
}

/// One of a concurrency limit's slots, held in a [`StateStore`] that [`leases`](StateStore::leases)
/// until [`released`](StateStore::release), or until the store's lease expiry passes without
/// the holder renewing it (a replica that crashed frees its slots that way).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    key: String,
    id: String,
}

impl Lease {
    /// A lease on the slots under `key`, named `id` (unique among the leases of all replicas).
    pub fn new(key: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            id: id.into(),
        }
    }

    /// The concurrency limit's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease's name.
    pub fn id(&self) -> &str {
        &self.id
    }
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
    /// Reserves `charge` if the deployment's window has room and no cooldown is shared.
    async fn reserve(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        now: Instant,
    ) -> Result<Admission, Error>;

    /// Settles a reservation: gives `tokens` and `requests` back (negative: takes more, when
    /// the real usage exceeded the estimate), then lowers what is left to what the upstream
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

    /// A health probe found the deployment serving again after it was out: ends the cooldown
    /// shared for it (the only call that shortens one), so that no replica keeps it out on
    /// that account. What the store learned of its admissions stays. Every replica that
    /// learns the deployment is back calls it (the probing one, then those that take its
    /// outcome), so that what each keeps of the cooldown in its own process goes too.
    ///
    /// The default does nothing: the shared cooldown then ends when it runs out.
    async fn recovered(&self, key: &str, now: Instant) -> Result<(), Error> {
        let _ = (key, now);
        Ok(())
    }

    /// The upstream refused (429) a request this store admitted (and that was released), and
    /// said to wait `wait`: shares the cooldown, cuts the share of the limits the store keeps
    /// to, to what its window holds ([`Learner::refused`]), and holds what is left of the
    /// window, letting it go at the limit's pace once the wait ends ([`Log::fill_paced`]).
    /// Returns the share now in force.
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

    /// When each of the next `n` requests of `charge` would fit in the deployment's window
    /// ([`Log::openings`], under what the store learned, after any shared cooldown), until
    /// `by`; `None` when the store cannot tell, and the caller estimates from the limits'
    /// rates. Nothing is reserved.
    ///
    /// The default cannot tell.
    async fn openings(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        n: usize,
        now: Instant,
        by: Instant,
    ) -> Result<Option<Vec<Instant>>, Error> {
        let _ = (key, limits, charge, n, now, by);
        Ok(None)
    }

    /// Whether the store keeps concurrency limits ([`lease`](Self::lease)). A store that does
    /// not (the default, and [`MemoryStore`]) leaves them to each process's own count.
    fn leases(&self) -> bool {
        false
    }

    /// Takes one of the `max` slots under `key` if one is free, held until
    /// [`release`](Self::release)d or until it expires unrenewed; `None` when all are held.
    ///
    /// # Errors
    ///
    /// The default, for a store that does not [`lease`](Self::leases), always fails.
    async fn lease(&self, key: &str, max: u32, now: Instant) -> Result<Option<Lease>, Error> {
        let _ = (max, now);
        Err(Error::config(format!(
            "this state store keeps no concurrency limits (asked for `{key}`)"
        )))
    }

    /// Gives a slot back.
    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let _ = lease;
        Ok(())
    }

    /// Calls a shared store answered from its local share because the shared one failed or
    /// was slow, since it started (0 for a store that is not shared).
    fn fallbacks(&self) -> u64 {
        0
    }

    /// Whether the store is shared right now (a shared store that fell back to local
    /// accounting answers `false`).
    fn is_shared(&self) -> bool {
        false
    }

    /// Keeps `value` under `name` until `now + ttl`: where a stored response lives, for the
    /// requests that continue it (read back with [`recall`](Self::recall), by every replica
    /// when the store is shared). The default keeps nothing.
    async fn remember(
        &self,
        name: &str,
        value: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<(), Error> {
        let _ = (name, value, ttl, now);
        Ok(())
    }

    /// What [`remember`](Self::remember) kept under `name`, if it has not expired.
    async fn recall(&self, name: &str, now: Instant) -> Result<Option<String>, Error> {
        let _ = (name, now);
        Ok(None)
    }
}

/// At most this many remembered names in a [`MemoryStore`]; past it, expired ones are dropped,
/// then the ones that expire soonest.
pub const MAX_REMEMBERED: usize = 100_000;

#[derive(Debug, Default)]
struct Entry {
    log: Log,
    next_ticket: u64,
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

    fn ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.next_ticket
    }
}

/// Quota, cooldowns and learned admissions in this process. The default store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: DashMap<String, Mutex<Entry>>,
    learning: Learning,
    /// Names kept by [`StateStore::remember`]: the value and when it expires.
    remembered: DashMap<String, (String, Instant)>,
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
            let ticket = entry.ticket();
            match entry.log.admit(&limits, charge, ticket, now) {
                Ok((tokens_left, requests_left)) => Admission::Admitted {
                    tokens_left,
                    requests_left,
                    learned: entry.learned(),
                    ticket,
                },
                Err(retry_after) => Admission::Denied {
                    retry_after,
                    cooling: false,
                },
            }
        })
    }

    /// Settles synchronously.
    pub fn settle_now(&self, key: &str, limits: &Limits, settlement: Settlement, now: Instant) {
        self.with(key, |entry| {
            entry.log.expire(now);
            let effective = entry.effective(limits);
            let since = entry.log.adjust(
                &effective,
                settlement.ticket,
                settlement.tokens_back as f64,
                settlement.requests_back as f64,
            );
            let remaining = (settlement.remaining_tokens, settlement.remaining_requests);
            // Nothing is corrected for an admission that has left the window already.
            if let Some(since) = since.filter(|_| remaining.0.is_some() || remaining.1.is_some()) {
                let ticket = entry.ticket();
                let until = now + phantom_hold(&effective, settlement.reset);
                entry
                    .log
                    .correct(&effective, remaining, since, ticket, until);
            }
            if let Some(learner) = entry.learner.as_mut().filter(|_| settlement.served) {
                learner.served(&self.learning, limits.window, now);
            }
        });
    }

    /// Takes a refusal synchronously ([`StateStore::refused`]).
    pub fn refused_now(&self, key: &str, limits: &Limits, wait: Duration, now: Instant) -> Learned {
        self.cool_down_now(key, wait, now);
        self.with(key, |entry| {
            entry.log.expire(now);
            let held = entry.log.share_held(limits);
            entry
                .learner
                .get_or_insert_with(|| Learner::new(now))
                .refused(&self.learning, limits.window, held, now);
            let effective = entry.effective(limits);
            let mut next = entry.next_ticket;
            entry.log.fill_paced(&effective, now + wait, || {
                next += 1;
                next
            });
            entry.next_ticket = next;
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

    /// Openings synchronously ([`StateStore::openings`]).
    pub fn openings_now(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        n: usize,
        now: Instant,
        by: Instant,
    ) -> Vec<Instant> {
        let (log, limits, from) = self.with(key, |entry| {
            entry.log.expire(now);
            let from = entry.cooling_until.map_or(now, |until| until.max(now));
            let limits = entry.effective(limits);
            (entry.log.prefix(&limits, charge, n, from), limits, from)
        });
        // Walked outside the lock: the copy (of the marks the walk can reach) is this call's.
        log.openings(&limits, charge, n, from, by)
    }

    /// What `key`'s window holds at `now` (tokens, requests), for tests and stats.
    pub fn held(&self, key: &str, now: Instant) -> (f64, f64) {
        self.with(key, |entry| {
            entry.log.expire(now);
            entry.log.held()
        })
    }

    /// The requests `key`'s window has left at `now` under `limits`, for tests and stats.
    pub fn requests_level(&self, key: &str, limits: &Limits, now: Instant) -> Option<f64> {
        self.with(key, |entry| {
            entry.log.expire(now);
            entry.log.left(&entry.effective(limits)).1
        })
    }

    /// The tokens `key`'s window has left at `now` under `limits`, for tests and stats.
    pub fn tokens_level(&self, key: &str, limits: &Limits, now: Instant) -> Option<f64> {
        self.with(key, |entry| {
            entry.log.expire(now);
            entry.log.left(&entry.effective(limits)).0
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

    async fn recovered(&self, key: &str, now: Instant) -> Result<(), Error> {
        let _ = now;
        self.with(key, |entry| entry.cooling_until = None);
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

    async fn openings(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        n: usize,
        now: Instant,
        by: Instant,
    ) -> Result<Option<Vec<Instant>>, Error> {
        Ok(Some(self.openings_now(key, limits, charge, n, now, by)))
    }

    async fn remember(
        &self,
        name: &str,
        value: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<(), Error> {
        self.remember_now(name, value, ttl, now);
        Ok(())
    }

    async fn recall(&self, name: &str, now: Instant) -> Result<Option<String>, Error> {
        Ok(self.recall_now(name, now))
    }
}

impl MemoryStore {
    /// Keeps `value` under `name` synchronously ([`StateStore::remember`]).
    pub fn remember_now(&self, name: &str, value: &str, ttl: Duration, now: Instant) {
        if self.remembered.len() >= MAX_REMEMBERED {
            self.remembered.retain(|_, (_, until)| *until > now);
        }
        if self.remembered.len() >= MAX_REMEMBERED {
            // Still full of live names: the ones that expire soonest make room.
            let mut untils: Vec<Instant> = self.remembered.iter().map(|e| e.value().1).collect();
            let cut = untils.len() / 10;
            let (_, nth, _) = untils.select_nth_unstable(cut);
            let nth = *nth;
            self.remembered.retain(|_, (_, until)| *until > nth);
        }
        let until = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(1 << 30));
        self.remembered
            .insert(name.to_owned(), (value.to_owned(), until));
    }

    /// What was kept under `name`, synchronously ([`StateStore::recall`]).
    pub fn recall_now(&self, name: &str, now: Instant) -> Option<String> {
        let entry = self.remembered.get(name)?;
        (entry.1 > now).then(|| entry.0.clone())
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

    /// What the view holds at `now` under `limits`, tokens and requests (`None` where not
    /// limited): what the store last said was left, refilled at the limits' rates since.
    pub fn levels(&self, limits: &Limits, now: Instant) -> (Option<f64>, Option<f64>) {
        let level = |cell: &AtomicU64, shape: Option<Shape>| {
            shape.map(|shape| self.bucket(cell, shape, now).level_at(shape, now))
        };
        (
            level(&self.tokens, limits.tokens()),
            level(&self.requests, limits.requests()),
        )
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

    /// The store walked its window and said when the next request of `charge` fits under
    /// `limits` (`at`; now or earlier: it fits now). The view gives way to that, earlier or
    /// later: a settlement may have given back what an earlier refusal's block counted on,
    /// and the view's buckets, an even-rate picture of a window that frees in bursts, may
    /// not have room when the window has. The block moves to `at`, and each bucket holds
    /// at least enough to have room for the charge by then.
    pub fn open_at(&self, limits: &Limits, charge: Charge, at: Instant, now: Instant) {
        let until = at
            .max(now)
            .saturating_duration_since(self.origin)
            .as_micros()
            .div_ceil(1000) as u64;
        self.blocked_until.store(until, Ordering::Relaxed);
        let tokens = if limits.is_provisioned() {
            1e-6
        } else {
            charge.tokens as f64
        };
        let ahead = at.saturating_duration_since(now).as_secs_f64();
        for (cell, shape, cost) in [
            (&self.tokens, limits.tokens(), tokens),
            (&self.requests, limits.requests(), charge.requests as f64),
        ] {
            let Some(shape) = shape else { continue };
            let enough = shape.needed(cost) - shape.rate * ahead;
            if self.bucket(cell, shape, now).level_at(shape, now) < enough {
                // A little over, so that the level's rounding to f32 leaves room.
                self.store(cell, enough + 0.01, now);
            }
        }
    }

    /// Forgets what it knew (a probe found the deployment serving again after it was out):
    /// full and unblocked, until the next answer or store call says otherwise.
    pub fn forget(&self) {
        self.tokens.store(pack(f32::NAN, 0), Ordering::Relaxed);
        self.requests.store(pack(f32::NAN, 0), Ordering::Relaxed);
        self.blocked_until.store(0, Ordering::Relaxed);
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
        // Provisioned throughput admits any request while utilisation is under 100 %.
        let tokens = if limits.is_provisioned() {
            1e-6
        } else {
            charge.tokens as f64
        };
        for (cell, shape, cost) in [
            (&self.tokens, limits.tokens(), tokens),
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
