//! The live state of one deployment (one model on one endpoint): in-flight requests, latency,
//! health and counters. Lock-free: atomics only.
//!
//! # Health
//!
//! What an outcome does is decided by the error's [`HealthEffect`]:
//!
//! - `Cooldown` (429): the deployment gets nothing until the upstream's wait has passed, exactly
//!   (capped at [`HealthPolicy::max_rate_limit_cooldown`]; [`HealthPolicy::rate_limit_cooldown`]
//!   when the upstream gave none). A later, longer wait extends it; a shorter one never shortens it.
//!   Then it is *half-open* until a request succeeds there: it takes one request at a time
//!   ([`DeploymentState::try_start`] claims the one slot; [`Availability::Probing`] while it is
//!   taken), so a deployment that has just said no is not sent a burst the moment its wait ends.
//! - `Failure` (5xx, timeouts, resets, cut streams): counts toward ejection. After
//!   [`HealthPolicy::failure_threshold`] consecutive failures the deployment is ejected for
//!   `base × 2^k` (k = ejections in a row), jittered, capped. A success resets both counts.
//! - `Disable` (401, 403, 404, `insufficient_quota`): out until a probe finds it serving again
//!   (or its configuration changes: a reconfiguration gives a changed deployment a new state).
//!
//! # Out until probed
//!
//! A disabled deployment, and one cooling or ejected for longer than
//! [`HealthPolicy::probe_after`], is *out*: no caller's request goes there, and its cooldown's
//! end does not bring it back. The router probes it instead, on a slow, jittered schedule with
//! backoff ([`HealthPolicy::probe_interval`] doubling to [`HealthPolicy::max_probe_interval`]):
//! [`DeploymentState::probe_due`] says when, [`DeploymentState::begin_probe`] books the next
//! one before the probe is sent, and [`DeploymentState::probe_succeeded`] or
//! [`DeploymentState::probe_failed`] record what it found. A probe that succeeds brings the
//! deployment back half-open (one request at a time until one succeeds) and ramping
//! ([`DeploymentState::ramp`]).
//!
//! Whether a cooled-down or ejected deployment may still be used when nothing else can serve
//! (panic mode) is the router's choice: [`DeploymentState::availability`] tells the three apart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, HealthEffect};
use crate::ewma::{PeakEwma, Typical};
use crate::quota::{Learned, Limits, QuotaView};
use crate::ratelimit::RateLimitInfo;
use crate::rng::Rng;

/// How outcomes move a deployment's health.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthPolicy {
    /// Consecutive failures that eject a deployment. Default 3.
    pub failure_threshold: u32,
    /// The first ejection's length. Default 5 s.
    pub base_ejection: Duration,
    /// The longest ejection. Default 120 s.
    pub max_ejection: Duration,
    /// Relative jitter on ejections, 0 to 1, so that replicas do not all return at once.
    /// Default 0.1.
    pub ejection_jitter: f64,
    /// A 429's cooldown when the upstream named no wait. Default 1 s.
    pub rate_limit_cooldown: Duration,
    /// The longest 429 cooldown; Azure's "retry after 86400 seconds" means "out for a long time",
    /// and the deployment is probed again after this. Default 300 s.
    pub max_rate_limit_cooldown: Duration,
    /// The latency penalty a failure records (at least; twice the estimate if that is more).
    /// Default 5 s.
    pub failure_penalty: Duration,
    /// A cooldown or ejection longer than this does not end by itself: the deployment is out
    /// until a probe finds it serving (see the module docs). Default 60 s.
    pub probe_after: Duration,
    /// The first probe of a deployment that went out comes this long after (jittered); each
    /// failed probe doubles the wait. Default 10 s.
    pub probe_interval: Duration,
    /// The longest wait between two probes. Default 300 s.
    pub max_probe_interval: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(120),
            ejection_jitter: 0.1,
            rate_limit_cooldown: Duration::from_secs(1),
            max_rate_limit_cooldown: Duration::from_secs(300),
            failure_penalty: Duration::from_secs(5),
            probe_after: Duration::from_secs(60),
            probe_interval: Duration::from_secs(10),
            max_probe_interval: Duration::from_secs(300),
        }
    }
}

impl HealthPolicy {
    /// Sets the ejection threshold and lengths.
    #[must_use]
    pub fn with_ejection(mut self, threshold: u32, base: Duration, max: Duration) -> Self {
        self.failure_threshold = threshold.max(1);
        self.base_ejection = base;
        self.max_ejection = max.max(base);
        self
    }

    /// Sets the 429 cooldown defaults.
    #[must_use]
    pub fn with_rate_limit_cooldown(mut self, default: Duration, max: Duration) -> Self {
        self.rate_limit_cooldown = default;
        self.max_rate_limit_cooldown = max.max(default);
        self
    }

    /// How long a 429 cools its deployment: the upstream's wait, else the default, capped.
    pub fn rate_limit_wait(&self, error: &Error) -> Duration {
        error
            .retry_after()
            .unwrap_or(self.rate_limit_cooldown)
            .min(self.max_rate_limit_cooldown)
    }

    /// Sets the jitter on ejections and probe times.
    #[must_use]
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.ejection_jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// Sets when a deployment is out until probed (a cooldown longer than `after`), and the
    /// probe schedule: the first probe `interval` after it went out, doubling after each
    /// failed one, to about `max` (jittered).
    #[must_use]
    pub fn with_probes(mut self, after: Duration, interval: Duration, max: Duration) -> Self {
        self.probe_after = after;
        self.probe_interval = interval.max(Duration::from_millis(10));
        self.max_probe_interval = max.max(self.probe_interval);
        self
    }

    /// The wait before the next probe after `failed` failed ones: the interval doubled per
    /// failure, capped, jittered.
    fn probe_wait(&self, failed: u32, rng: &mut Rng) -> Duration {
        let base = self
            .probe_interval
            .saturating_mul(1 << failed.min(16))
            .min(self.max_probe_interval);
        let jitter = 1.0 + self.ejection_jitter * (rng.unit() * 2.0 - 1.0);
        base.mul_f64(jitter.max(0.0))
    }
}

/// Which latency signal a request feeds and is routed on. Signals of different classes are not
/// comparable, so each has its own estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LatencyClass {
    /// Streams: time to the first content chunk.
    Stream,
    /// Non-streamed generations: time per output token (whole time / completion tokens).
    Generation,
    /// Embeddings and other single-shot calls: the whole time.
    Call,
}

impl LatencyClass {
    fn index(self) -> usize {
        match self {
            Self::Stream => 0,
            Self::Generation => 1,
            Self::Call => 2,
        }
    }

    /// The starting estimate of a deployment nobody has measured yet.
    pub fn initial(self) -> Duration {
        match self {
            Self::Stream => Duration::from_millis(500),
            Self::Generation => Duration::from_millis(30),
            Self::Call => Duration::from_millis(200),
        }
    }
}

/// Whether a deployment can take a request now.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Ready.
    Ready,
    /// Back from a 429's cooldown and not yet proven by a success: it takes one request at a
    /// time, and that one is in flight.
    Probing,
    /// Throttled by the upstream until the given time (for one out until probed: its next
    /// probe, the soonest it may be back).
    RateLimited(Instant),
    /// Ejected after consecutive failures until the given time (as for `RateLimited`, its
    /// next probe when it is out until probed).
    Ejected(Instant),
    /// Disabled for the error kind given (401, 403, 404, `insufficient_quota`): out until a
    /// probe finds it serving again, or it is reconfigured.
    Disabled(ErrorKind),
}

const REASON_NONE: u8 = 0;
const REASON_RATE_LIMITED: u8 = 1;
const REASON_EJECTED: u8 = 2;

/// The live state of one deployment.
#[derive(Debug)]
pub struct DeploymentState {
    origin: Instant,
    in_flight: AtomicU32,
    latency: [PeakEwma; 3],
    /// The typical latency per class: what one tail answer does not move (cache affinity).
    typical: [Typical; 3],
    /// Milliseconds since `origin` until which the deployment cools down; 0 for none.
    cooldown_until: AtomicU64,
    cooldown_reason: AtomicU8,
    /// `ErrorKind` index + 1 of the error that disabled it; 0 when enabled.
    disabled: AtomicU8,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// Throttled since its last success: one request at a time (half-open).
    half_open: AtomicBool,
    /// The half-open deployment's one request is in flight.
    probing: AtomicBool,
    successes: AtomicU64,
    failures: [AtomicU64; ErrorKind::COUNT],
    /// What this process last knew of the deployment's quota buckets.
    pub quota: QuotaView,
    /// Limits learned from `x-ratelimit-limit-*` headers; 0 when none.
    learned_tpm: AtomicU64,
    learned_rpm: AtomicU64,
    /// The share of the limits the upstream admits, as the store last said: its f64 bits.
    admits: AtomicU64,
    /// How the upstream counts a prompt against the router's count (its f64 bits; 1 until
    /// an answer reports its usage): see [`DeploymentState::observe_prompt`].
    prompt_ratio: AtomicU64,
    /// Milliseconds since `origin`, plus one, when a request last started; 0 for never.
    last_start: AtomicU64,
    /// Milliseconds since `origin`, plus one, when it came back from looking slow (a sample
    /// far below a stale estimate): it ramps back over [`DeploymentState::RAMP`]; 0 for never.
    ramp_from: AtomicU64,
    /// A fingerprint of the last `x-ratelimit-remaining-*` pair an answer reported (0 for
    /// none): what [`DeploymentState::fresh_report`] compares the next with.
    last_report: AtomicU64,
    /// Answers by the service tier they reported, in [`SERVICE_TIERS`]' order.
    tiers: [AtomicU64; SERVICE_TIERS.len()],
    /// Answers to requests that asked for `priority` and were served at another tier.
    tier_downgrades: AtomicU64,
    /// Requests Azure spilled over from it to their spillover deployment (it was full).
    spilled_over: AtomicU64,
    /// Out until a probe brings it back: the `ErrorKind` index + 1 of what put it out (or the
    /// last probe found); 0 when not out.
    out: AtomicU8,
    /// Milliseconds since `origin` when its health last changed (it went out or came back).
    since: AtomicU64,
    /// Milliseconds since `origin` of its next probe, while out.
    next_probe: AtomicU64,
    /// Failed probes since it went out: the backoff's exponent.
    failed_probes: AtomicU32,
    /// Probes sent, ever.
    probes: AtomicU64,
    /// The last probe: milliseconds since `origin` << 8 | its outcome (1 served, else the
    /// `ErrorKind` index + 2); 0 for none.
    last_probe: AtomicU64,
    /// Whether its going out has been told (logged) once.
    told: AtomicBool,
    /// Which call a probe makes ([`CallKind`] as u8): the kind of request last sent here.
    call: AtomicU8,
}

/// Which call a health probe makes: the kind of request a deployment was last sent (an
/// embeddings deployment is probed with an embeddings request), in the form it was sent.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CallKind {
    /// A one-token chat completion capped with `max_tokens`, the form every API version takes.
    #[default]
    Chat,
    /// A one-token chat completion capped with `max_completion_tokens`: the form reasoning
    /// models take (they refuse `max_tokens`), used when the last chat request sent there was
    /// capped so, or when a probe's `max_tokens` was refused.
    ChatMaxCompletionTokens,
    /// A one-input embeddings request.
    Embeddings,
    /// A one-token legacy completion.
    Completions,
    /// A short Responses API request, not stored.
    Responses,
}

impl CallKind {
    const ALL: [Self; 5] = [
        Self::Chat,
        Self::Embeddings,
        Self::Completions,
        Self::Responses,
        Self::ChatMaxCompletionTokens,
    ];

    fn index(self) -> u8 {
        match self {
            Self::Chat => 0,
            Self::Embeddings => 1,
            Self::Completions => 2,
            Self::Responses => 3,
            Self::ChatMaxCompletionTokens => 4,
        }
    }
}

/// Why a deployment is out and when it is probed next ([`StateStats::out`]).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    /// Since when it is out.
    pub since: Instant,
    /// What put it out, or what the last probe found.
    pub why: ErrorKind,
    /// When it is probed next.
    pub next_probe: Instant,
    /// Probes that failed since it went out.
    pub failed_probes: u32,
}

/// What a health probe found ([`StateStats::last_probe`]).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// When it was sent.
    pub at: Instant,
    /// `None`: the deployment served it; else what it failed with.
    pub failed: Option<ErrorKind>,
}

/// The service tiers answers report (`service_tier`), as [`StateStats::service_tiers`] counts
/// them: a tier not named here counts as `other`.
pub const SERVICE_TIERS: [&str; 6] = ["default", "priority", "flex", "scale", "auto", "other"];

/// An error kind as the state's one-byte cells keep it: its index + 1 (0 is "none").
fn kind_code(kind: ErrorKind) -> u8 {
    u8::try_from(kind.index() + 1).unwrap_or(u8::MAX)
}

fn pack_learned(learned: Learned) -> u64 {
    learned.share.to_bits()
}

fn unpack_learned(packed: u64) -> Learned {
    Learned {
        share: f64::from_bits(packed),
    }
}

impl DeploymentState {
    /// A fresh state; `decay` is the latency estimate's time constant.
    pub fn new(origin: Instant, decay: Duration) -> Self {
        let class = |c: LatencyClass| PeakEwma::new(c.initial(), decay, origin);
        Self {
            origin,
            in_flight: AtomicU32::new(0),
            latency: [
                class(LatencyClass::Stream),
                class(LatencyClass::Generation),
                class(LatencyClass::Call),
            ],
            typical: [
                Typical::new(LatencyClass::Stream.initial()),
                Typical::new(LatencyClass::Generation.initial()),
                Typical::new(LatencyClass::Call.initial()),
            ],
            cooldown_until: AtomicU64::new(0),
            cooldown_reason: AtomicU8::new(REASON_NONE),
            disabled: AtomicU8::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            half_open: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            successes: AtomicU64::new(0),
            failures: std::array::from_fn(|_| AtomicU64::new(0)),
            quota: QuotaView::new(origin),
            learned_tpm: AtomicU64::new(0),
            learned_rpm: AtomicU64::new(0),
            admits: AtomicU64::new(pack_learned(Learned::FULL)),
            prompt_ratio: AtomicU64::new(1.0_f64.to_bits()),
            last_start: AtomicU64::new(0),
            ramp_from: AtomicU64::new(0),
            last_report: AtomicU64::new(0),
            tiers: std::array::from_fn(|_| AtomicU64::new(0)),
            tier_downgrades: AtomicU64::new(0),
            spilled_over: AtomicU64::new(0),
            out: AtomicU8::new(0),
            since: AtomicU64::new(0),
            next_probe: AtomicU64::new(0),
            failed_probes: AtomicU32::new(0),
            probes: AtomicU64::new(0),
            last_probe: AtomicU64::new(0),
            told: AtomicBool::new(true),
            call: AtomicU8::new(0),
        }
    }

    /// Azure spilled a request sent here over to its spillover deployment: this one was full.
    /// It takes one request at a time until it serves one itself (half-open, as after a 429).
    pub fn spilled(&self) {
        self.spilled_over.fetch_add(1, Ordering::Relaxed);
        self.hold_to_one();
    }

    /// An answer reported being served at tier `served`; the request asked for `asked`. A
    /// request that asked for `priority` served at another tier is a downgrade (Azure and
    /// OpenAI move priority traffic that grows too fast to the standard tier).
    pub fn record_tier(&self, asked: Option<&str>, served: &str) {
        let slot = SERVICE_TIERS
            .iter()
            .position(|tier| *tier == served)
            .unwrap_or(SERVICE_TIERS.len() - 1);
        self.tiers[slot].fetch_add(1, Ordering::Relaxed);
        if asked == Some("priority") && served != "priority" {
            self.tier_downgrades.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How long a deployment that came back from looking slow takes to ramp back to its
    /// whole share (slow start: [`ramp`](Self::ramp)).
    pub const RAMP: Duration = Duration::from_secs(3);

    /// Seconds since a request last started here; infinite when none has.
    pub fn idle(&self, now: Instant) -> f64 {
        match self.last_start.load(Ordering::Relaxed) {
            0 => f64::INFINITY,
            at => (self.ms(now) + 1).saturating_sub(at) as f64 / 1000.0,
        }
    }

    /// How far it has ramped back since it came back from looking slow: 0 just then, 1 after
    /// [`RAMP`](Self::RAMP) (and when it never looked slow).
    pub fn ramp(&self, now: Instant) -> f64 {
        match self.ramp_from.load(Ordering::Relaxed) {
            0 => 1.0,
            from => {
                let since = (self.ms(now) + 1).saturating_sub(from) as f64 / 1000.0;
                (since / Self::RAMP.as_secs_f64()).min(1.0)
            }
        }
    }

    /// The limits a quota store is given: the configured ones, else those the upstream
    /// announced (the store applies what it learned of the upstream's admissions itself).
    pub fn quota_limits(&self, configured: &Limits) -> Limits {
        let learned = |cell: &AtomicU64| Some(cell.load(Ordering::Relaxed)).filter(|n| *n > 0);
        Limits {
            tpm: configured.tpm.or_else(|| learned(&self.learned_tpm)),
            rpm: configured.rpm.or_else(|| learned(&self.learned_rpm)),
            window: configured.window,
            model: configured.model,
        }
    }

    /// The limits the router keeps to: [`quota_limits`](Self::quota_limits) with the share
    /// the upstream was seen to admit ([`admits`](Self::admits)) applied.
    pub fn limits(&self, configured: &Limits) -> Limits {
        self.admits().apply(&self.quota_limits(configured))
    }

    /// The share of its limits the upstream admits, as the quota store last said.
    pub fn admits(&self) -> Learned {
        unpack_learned(self.admits.load(Ordering::Relaxed))
    }

    /// How many tokens the upstream counts a prompt as, per token the router counted: what
    /// quota reservations scale the router's prompt estimate by, so that an upstream that
    /// counts differently (Azure estimates from characters) is charged as it charges itself.
    pub fn prompt_ratio(&self) -> f64 {
        f64::from_bits(self.prompt_ratio.load(Ordering::Relaxed))
    }

    /// An answer reported `reported` prompt tokens for a prompt the router counted as
    /// `counted`: the ratio moves a fifth of the way to it (prompts under 8 tokens teach
    /// nothing), within a quarter and four times.
    pub fn observe_prompt(&self, counted: u64, reported: u64) {
        if counted < 8 || reported == 0 {
            return;
        }
        let sample = (reported as f64 / counted as f64).clamp(0.25, 4.0);
        let _ = self
            .prompt_ratio
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let ratio = f64::from_bits(bits);
                Some((ratio + (sample - ratio) * 0.2).to_bits())
            });
    }

    /// Records what the quota store says the upstream admits.
    pub fn set_admits(&self, learned: Learned) {
        self.admits.store(pack_learned(learned), Ordering::Relaxed);
    }

    /// Learns limits from an answer's `x-ratelimit-limit-*` headers.
    pub fn learn(&self, info: &RateLimitInfo) {
        if let Some(tpm) = info.limit_tokens {
            self.learned_tpm.store(tpm, Ordering::Relaxed);
        }
        if let Some(rpm) = info.limit_requests {
            self.learned_rpm.store(rpm, Ordering::Relaxed);
        }
    }

    /// Whether an answer's `x-ratelimit-remaining-*` pair tells something new: `false` when it
    /// repeats the pair the answer before it reported.
    ///
    /// An upstream that counts truthfully reports each admission's own charge (its remaining
    /// counts fall by it, less what left its window meanwhile), so two answers in a row
    /// reporting the same pair are, but for an exact balance, one count reported twice: a
    /// proxy's cached or stale snapshot. Read as fresh, a snapshot up to a window old would
    /// count the router's own admissions that have left since as use the router did not see,
    /// and hold room the upstream has. The first report of a pair is used; its repeats are
    /// not (an exact balance repeats what was already said, so nothing is lost). An answer
    /// with no remaining counts is fresh (it reports nothing to judge).
    pub fn fresh_report(&self, info: &RateLimitInfo) -> bool {
        if info.remaining_tokens.is_none() && info.remaining_requests.is_none() {
            return true;
        }
        let part = |value: Option<u64>| value.map_or(u64::MAX, |v| v);
        let print = part(info.remaining_tokens)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(31)
            ^ part(info.remaining_requests).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        // 0 means "none yet".
        let print = print.max(1);
        self.last_report.swap(print, Ordering::Relaxed) != print
    }

    /// A cooldown another replica shared: this one honours it too, and is half-open after it.
    /// One longer than [`HealthPolicy::probe_after`] puts it out until probed (another
    /// replica found it disabled, or cooling for long).
    pub fn cool_down_shared(
        &self,
        wait: Duration,
        policy: &HealthPolicy,
        now: Instant,
        rng: &mut Rng,
    ) {
        self.cool_down(now + wait, REASON_RATE_LIMITED);
        self.half_open.store(true, Ordering::Release);
        if wait > policy.probe_after {
            self.go_out(ErrorKind::RateLimited, policy, now, rng);
        }
    }

    /// Makes it half-open until its next success without a cooldown: the upstream said (in
    /// its `x-ratelimit-remaining-*` headers) that the next request will not fit.
    pub fn hold_to_one(&self) {
        self.half_open.store(true, Ordering::Release);
    }

    /// Whether it is half-open: throttled since its last success, one request at a time.
    pub fn is_half_open(&self) -> bool {
        self.half_open.load(Ordering::Acquire)
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// Requests being served now (streams until they end).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency estimate of `class` at `now`, in seconds.
    pub fn latency(&self, class: LatencyClass, now: Instant) -> f64 {
        self.latency[class.index()].get(now)
    }

    /// The typical latency of `class` in seconds: the running mean of about its last five
    /// answers ([`Typical`]), which one tail answer does not move much, unlike
    /// [`latency`](Self::latency)'s peak estimate. `None` until it has answered one of the
    /// class: a guess says nothing of whether it is slow.
    pub fn typical_latency(&self, class: LatencyClass) -> Option<f64> {
        let typical = &self.typical[class.index()];
        (typical.samples() > 0).then(|| typical.get())
    }

    /// Whether the deployment can take a request at `now`.
    pub fn availability(&self, now: Instant) -> Availability {
        let disabled = self.disabled.load(Ordering::Relaxed);
        if disabled != 0 {
            return Availability::Disabled(ErrorKind::from_index(usize::from(disabled - 1)));
        }
        let until = self.cooldown_until.load(Ordering::Relaxed);
        let out = self.out.load(Ordering::Acquire) != 0;
        if self.ms(now) < until || out {
            // Out until probed: back no sooner than its next probe.
            let until = if out {
                until.max(self.next_probe.load(Ordering::Relaxed).max(self.ms(now)))
            } else {
                until
            };
            let at = self.origin + Duration::from_millis(until);
            return match self.cooldown_reason.load(Ordering::Relaxed) {
                REASON_RATE_LIMITED => Availability::RateLimited(at),
                _ => Availability::Ejected(at),
            };
        }
        if self.is_half_open() && self.probing.load(Ordering::Acquire) {
            return Availability::Probing;
        }
        Availability::Ready
    }

    /// Starts a request: the in-flight count goes up until the guard drops. Takes no notice of
    /// half-open; the router starts requests with [`try_start`](Self::try_start).
    pub fn start(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            state: Arc::clone(self),
            probe: false,
        }
    }

    /// Starts a request at `now` unless the deployment is half-open and its one request is in
    /// flight already; a half-open deployment's request holds that one slot until its guard
    /// drops.
    pub fn try_start(self: &Arc<Self>, now: Instant) -> Option<InFlightGuard> {
        let probe = self.is_half_open();
        // AcqRel: the claim is the single-flight rule itself; of two racing requests exactly
        // one sees `false`.
        if probe
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_start.store(self.ms(now) + 1, Ordering::Relaxed);
        Some(InFlightGuard {
            state: Arc::clone(self),
            probe,
        })
    }

    /// Records a success: resets the failure and ejection counts. The latency sample is
    /// [`observe_latency`](Self::observe_latency)'s (a stream's comes at its first token, its
    /// success at its end).
    pub fn record_success(&self) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        // Proven: open for as many as come.
        self.half_open.store(false, Ordering::Release);
    }

    /// Records a latency sample of `class` taken at `now`. A sample at most half an estimate
    /// that answers made (the deployment looked slow and is not any more; a probe's answer,
    /// typically) starts the ramp back.
    pub fn observe_latency(&self, class: LatencyClass, sample: Duration, now: Instant) {
        let ewma = &self.latency[class.index()];
        // Not from the initial guess: only an estimate that answers made can look slow.
        let measured = self.successes.load(Ordering::Relaxed) > 0;
        if measured && sample.as_secs_f64() * 2.0 <= ewma.get(now) {
            self.ramp_from.store(self.ms(now) + 1, Ordering::Relaxed);
        }
        // After a gap, the typical latency is old news too: it starts again from this sample.
        let typical = &self.typical[class.index()];
        if ewma.since_sample(now) >= ewma.decay().mul_f64(crate::ewma::STALE) {
            typical.restart(sample);
        } else {
            typical.observe(sample);
        }
        ewma.observe(sample, now);
    }

    /// Records a failure and applies its health effect. A disabling error, and a cooldown or
    /// ejection longer than [`HealthPolicy::probe_after`], put the deployment out until a
    /// probe brings it back ([`out`](Self::out)).
    pub fn record_failure(
        &self,
        error: &Error,
        class: LatencyClass,
        policy: &HealthPolicy,
        now: Instant,
        rng: &mut Rng,
    ) {
        self.failures[error.kind().index()].fetch_add(1, Ordering::Relaxed);
        let long = match error.health_effect() {
            HealthEffect::Cooldown => {
                let wait = policy.rate_limit_wait(error);
                self.cool_down(now + wait, REASON_RATE_LIMITED);
                self.half_open.store(true, Ordering::Release);
                wait > policy.probe_after
            }
            HealthEffect::Failure => {
                self.latency[class.index()].penalize(policy.failure_penalty, now);
                let mut longest = Duration::ZERO;
                if let Some(wait) = error.retry_after() {
                    // A 503 that says when to come back.
                    let wait = wait.min(policy.max_rate_limit_cooldown);
                    self.cool_down(now + wait, REASON_EJECTED);
                    longest = wait;
                }
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures >= policy.failure_threshold {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                    let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
                    let base = policy
                        .base_ejection
                        .saturating_mul(1 << k)
                        .min(policy.max_ejection);
                    let jitter = 1.0 + policy.ejection_jitter * (rng.unit() * 2.0 - 1.0);
                    let wait = base.mul_f64(jitter.max(0.0)).min(policy.max_ejection);
                    self.cool_down(now + wait, REASON_EJECTED);
                    longest = longest.max(wait);
                }
                longest > policy.probe_after
            }
            HealthEffect::Disable => {
                self.disable(error.kind());
                true
            }
            HealthEffect::None => false,
        };
        if long {
            self.go_out(error.kind(), policy, now, rng);
        }
    }

    fn disable(&self, kind: ErrorKind) {
        self.disabled.store(kind_code(kind), Ordering::Relaxed);
    }

    /// Puts it out until a probe brings it back, for `why`, unless it is out already; the
    /// first probe comes [`HealthPolicy::probe_interval`] from now, jittered.
    fn go_out(&self, why: ErrorKind, policy: &HealthPolicy, now: Instant, rng: &mut Rng) {
        if self
            .out
            .compare_exchange(0, kind_code(why), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.failed_probes.store(0, Ordering::Relaxed);
            self.next_probe
                .store(self.ms(now + policy.probe_wait(0, rng)), Ordering::Relaxed);
            self.since.store(self.ms(now), Ordering::Relaxed);
            self.told.store(false, Ordering::Release);
        }
    }

    /// Notes the kind of call being sent here: what a probe of it will make.
    pub fn note_call(&self, kind: CallKind) {
        self.call.store(kind.index(), Ordering::Relaxed);
    }

    /// The kind of call a probe of it makes: that of the last request sent here.
    pub fn probe_call(&self) -> CallKind {
        CallKind::ALL
            .get(usize::from(self.call.load(Ordering::Relaxed)))
            .copied()
            .unwrap_or_default()
    }

    /// Why it is out and when it is probed next; `None` when it is not out.
    pub fn out(&self) -> Option<Out> {
        let code = self.out.load(Ordering::Acquire);
        (code != 0).then(|| Out {
            since: self.origin + Duration::from_millis(self.since.load(Ordering::Relaxed)),
            why: ErrorKind::from_index(usize::from(code - 1)),
            next_probe: self.origin
                + Duration::from_millis(self.next_probe.load(Ordering::Relaxed)),
            failed_probes: self.failed_probes.load(Ordering::Relaxed),
        })
    }

    /// Its going out, the first time this is asked after it went out: so that it is told (in
    /// the log) once, however many requests saw it.
    pub fn tell_out(&self) -> Option<Out> {
        let out = self.out()?;
        (!self.told.swap(true, Ordering::AcqRel)).then_some(out)
    }

    /// When it is to be probed, when it is out.
    pub fn probe_due(&self) -> Option<Instant> {
        self.out().map(|out| out.next_probe)
    }

    /// A probe is being sent at `now`: books the next one as if this one will fail (so that
    /// it stays out meanwhile, and a second prober does not send one too). `false` when it
    /// is not out, or not due yet.
    pub fn begin_probe(&self, policy: &HealthPolicy, now: Instant, rng: &mut Rng) -> bool {
        if self.out.load(Ordering::Acquire) == 0 {
            return false;
        }
        let due = self.next_probe.load(Ordering::Relaxed);
        if self.ms(now) < due {
            return false;
        }
        let failed = self.failed_probes.load(Ordering::Relaxed);
        let next = self.ms(now + policy.probe_wait(failed, rng));
        if self
            .next_probe
            .compare_exchange(due, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        true
    }

    /// Probe it at once (an operator said "look again"): its next probe is now. `false` when
    /// it is not out.
    pub fn probe_now(&self, now: Instant) -> bool {
        if self.out.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.next_probe.store(self.ms(now), Ordering::Relaxed);
        true
    }

    /// Another replica's probe (or this one's) found it still out for `why`, and the next
    /// probe comes at `next`: it stays out until then.
    pub fn stay_out(&self, why: ErrorKind, next: Instant, now: Instant) {
        if self.out.load(Ordering::Acquire) == 0 {
            return;
        }
        self.out.store(kind_code(why), Ordering::Release);
        self.next_probe
            .store(self.ms(next.max(now)), Ordering::Relaxed);
    }

    /// A probe sent at `at` failed with `error`: it stays out, and the next probe waits
    /// longer (doubling, capped, jittered; no sooner than the upstream's own wait, capped
    /// too). A disabling error disables it (it was only cooling); a 429 shows the key and the
    /// deployment work again, so it is no longer disabled but cooling. Returns when the next
    /// probe comes.
    pub fn probe_failed(
        &self,
        error: &Error,
        at: Instant,
        policy: &HealthPolicy,
        now: Instant,
        rng: &mut Rng,
    ) -> Instant {
        let failed = self.failed_probes.fetch_add(1, Ordering::Relaxed) + 1;
        self.probes.fetch_add(1, Ordering::Relaxed);
        self.last_probe.store(
            self.ms(at) << 8 | (error.kind().index() as u64 + 2),
            Ordering::Relaxed,
        );
        match error.health_effect() {
            HealthEffect::Disable => self.disable(error.kind()),
            HealthEffect::Cooldown => {
                self.disabled.store(0, Ordering::Relaxed);
                self.cool_down(now + policy.rate_limit_wait(error), REASON_RATE_LIMITED);
            }
            HealthEffect::Failure | HealthEffect::None => {}
        }
        let upstream = error
            .retry_after()
            .unwrap_or_default()
            .min(policy.max_probe_interval);
        let next = now + policy.probe_wait(failed, rng).max(upstream);
        self.stay_out(error.kind(), next, now);
        next
    }

    /// A probe sent at `at` was served (or refused for the request's own fault, which the
    /// upstream checks after the key and the deployment): it is back, half-open (one request
    /// at a time until one succeeds) and ramping up. `false` when it was not out.
    pub fn probe_succeeded(&self, at: Instant, now: Instant) -> bool {
        self.probes.fetch_add(1, Ordering::Relaxed);
        self.last_probe
            .store(self.ms(at) << 8 | 1, Ordering::Relaxed);
        self.back(now)
    }

    /// Brings it back from being out (a probe found it serving): its cooldown, ejection and
    /// disabling end, and it is half-open and ramping. `false` when it was not out.
    pub fn back(&self, now: Instant) -> bool {
        if self.out.swap(0, Ordering::AcqRel) == 0 {
            return false;
        }
        self.disabled.store(0, Ordering::Relaxed);
        self.cooldown_until.store(0, Ordering::Relaxed);
        self.cooldown_reason.store(REASON_NONE, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        self.failed_probes.store(0, Ordering::Relaxed);
        self.quota.forget();
        self.half_open.store(true, Ordering::Release);
        self.ramp_from.store(self.ms(now) + 1, Ordering::Relaxed);
        self.since.store(self.ms(now), Ordering::Relaxed);
        self.told.store(true, Ordering::Release);
        true
    }

    /// The last probe's outcome, if one was sent.
    pub fn last_probe(&self) -> Option<ProbeOutcome> {
        let packed = self.last_probe.load(Ordering::Relaxed);
        (packed != 0).then(|| {
            let code = (packed & 0xff) as usize;
            ProbeOutcome {
                at: self.origin + Duration::from_millis(packed >> 8),
                failed: (code >= 2).then(|| ErrorKind::from_index(code - 2)),
            }
        })
    }

    /// Probes this process sent to it (and recorded what they found), ever.
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    fn cool_down(&self, until: Instant, reason: u8) {
        let until = self.ms(until).max(1);
        let previous = self.cooldown_until.fetch_max(until, Ordering::Relaxed);
        if until > previous {
            self.cooldown_reason.store(reason, Ordering::Relaxed);
        }
    }

    /// A snapshot for `stats()`.
    pub fn stats(&self, now: Instant) -> StateStats {
        StateStats {
            in_flight: self.in_flight(),
            latency_stream: self.latency(LatencyClass::Stream, now),
            latency_generation: self.latency(LatencyClass::Generation, now),
            latency_call: self.latency(LatencyClass::Call, now),
            availability: self.availability(now),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            successes: self.successes.load(Ordering::Relaxed),
            failures: ErrorKind::ALL
                .iter()
                .filter_map(|kind| {
                    let n = self.failures[kind.index()].load(Ordering::Relaxed);
                    (n > 0).then_some((*kind, n))
                })
                .collect(),
            learned_tpm: Some(self.learned_tpm.load(Ordering::Relaxed)).filter(|n| *n > 0),
            learned_rpm: Some(self.learned_rpm.load(Ordering::Relaxed)).filter(|n| *n > 0),
            admits: self.admits(),
            service_tiers: SERVICE_TIERS
                .iter()
                .zip(&self.tiers)
                .filter_map(|(tier, n)| {
                    let n = n.load(Ordering::Relaxed);
                    (n > 0).then_some((*tier, n))
                })
                .collect(),
            tier_downgrades: self.tier_downgrades.load(Ordering::Relaxed),
            spilled_over: self.spilled_over.load(Ordering::Relaxed),
            since: self.origin + Duration::from_millis(self.since.load(Ordering::Relaxed)),
            out: self.out(),
            last_probe: self.last_probe(),
            probes: self.probes(),
        }
    }
}

/// Holds one in-flight slot of a deployment (and, on a half-open one, its one slot); the count
/// goes down when it drops, whether the request finished, failed, or its future was dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    state: Arc<DeploymentState>,
    probe: bool,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe {
            self.state.probing.store(false, Ordering::Release);
        }
    }
}

/// A deployment's state at one moment.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct StateStats {
    /// Requests being served.
    pub in_flight: u32,
    /// Time-to-first-token estimate, seconds.
    pub latency_stream: f64,
    /// Time-per-output-token estimate, seconds.
    pub latency_generation: f64,
    /// Whole-call estimate (embeddings), seconds.
    pub latency_call: f64,
    /// Ready, cooling down (and until when), or disabled.
    pub availability: Availability,
    /// Failures since the last success or ejection.
    pub consecutive_failures: u32,
    /// Successful requests.
    pub successes: u64,
    /// Failed attempts by kind (kinds with none left out).
    pub failures: Vec<(ErrorKind, u64)>,
    /// Tokens per minute the upstream announced (`x-ratelimit-limit-tokens`), if it did.
    pub learned_tpm: Option<u64>,
    /// Requests per minute the upstream announced, if it did.
    pub learned_rpm: Option<u64>,
    /// The share of its limits the upstream was seen to admit ([`Learned::FULL`] until it
    /// refused what the limits allowed).
    pub admits: Learned,
    /// Answers by the service tier they reported (tiers with none left out).
    pub service_tiers: Vec<(&'static str, u64)>,
    /// Answers to requests that asked for `priority`, served at another tier.
    pub tier_downgrades: u64,
    /// Requests Azure spilled over from it to their spillover deployment (it was full).
    pub spilled_over: u64,
    /// When its health last changed: it went out, or came back (the router's start when
    /// neither happened).
    pub since: Instant,
    /// Why it is out until probed, since when, and when the next probe comes; `None` when it
    /// is not out.
    pub out: Option<Out>,
    /// What the last health probe found, if one was sent.
    pub last_probe: Option<ProbeOutcome>,
    /// Health probes sent to it.
    pub probes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::EndpointId;
    use crate::ratelimit::RateLimitInfo;

    fn upstream(status: u16, retry_after: Option<Duration>) -> Error {
        let limits = RateLimitInfo {
            retry_after,
            ..RateLimitInfo::default()
        };
        Error::upstream(EndpointId::new("e"), status, None, &limits)
    }

    #[test]
    fn rate_limit_cools_exactly_and_only_extends() {
        let t0 = Instant::now();
        let state = DeploymentState::new(t0, Duration::from_secs(10));
        let policy = HealthPolicy::default();
        let mut rng = Rng::with_seed(1);
        let class = LatencyClass::Stream;
        state.record_failure(
            &upstream(429, Some(Duration::from_secs(3))),
            class,
            &policy,
            t0,
            &mut rng,
        );
        assert!(matches!(
            state.availability(t0 + Duration::from_millis(2999)),
            Availability::RateLimited(_)
        ));
        assert_eq!(
            state.availability(t0 + Duration::from_secs(3)),
            Availability::Ready
        );
        // A shorter second cooldown does not shorten the first.
        state.record_failure(
            &upstream(429, Some(Duration::from_secs(1))),
            class,
            &policy,
            t0,
            &mut rng,
        );
        assert!(matches!(
            state.availability(t0 + Duration::from_secs(2)),
            Availability::RateLimited(_)
        ));
        // Capped (with probes only past the cap, the cap ends it by itself).
        let patient = policy.with_probes(
            Duration::from_secs(400),
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        state.record_failure(
            &upstream(429, Some(Duration::from_secs(86_400))),
            class,
            &patient,
            t0,
            &mut rng,
        );
        assert_eq!(state.out(), None);
        assert_eq!(
            state.availability(t0 + Duration::from_secs(301)),
            Availability::Ready
        );
    }

    /// Out after 60 s; probes from 10 s, doubling to 40 s, no jitter.
    fn probing() -> HealthPolicy {
        HealthPolicy::default()
            .with_probes(
                Duration::from_secs(60),
                Duration::from_secs(10),
                Duration::from_secs(40),
            )
            .with_jitter(0.0)
    }

    #[test]
    fn out_until_a_probe_serves_on_a_doubling_jittered_schedule() {
        let t0 = Instant::now();
        let state = DeploymentState::new(t0, Duration::from_secs(10));
        let policy = probing();
        let mut rng = Rng::with_seed(3);
        // A day-long 429: capped at 300 s, and out past the cap until probed.
        state.record_failure(
            &upstream(429, Some(Duration::from_secs(86_400))),
            LatencyClass::Call,
            &policy,
            t0,
            &mut rng,
        );
        let out = state.out().unwrap();
        assert_eq!(out.why, ErrorKind::RateLimited);
        assert_eq!(out.next_probe, t0 + Duration::from_secs(10));
        assert!(state.tell_out().is_some(), "told once");
        assert!(state.tell_out().is_none(), "only once");
        let late = t0 + Duration::from_secs(1000);
        assert!(matches!(
            state.availability(late),
            Availability::RateLimited(_)
        ));
        // Not due yet: no probe.
        assert!(!state.begin_probe(&policy, t0 + Duration::from_secs(9), &mut rng));
        // Failed probes double the wait to the cap; one probe per due time.
        let mut at = t0 + Duration::from_secs(10);
        for wait in [20, 40, 40] {
            assert!(state.begin_probe(&policy, at, &mut rng));
            assert!(!state.begin_probe(&policy, at, &mut rng), "booked");
            let next = state.probe_failed(&upstream(401, None), at, &policy, at, &mut rng);
            assert_eq!(next, at + Duration::from_secs(wait));
            at = next;
        }
        assert_eq!(
            state.availability(at),
            Availability::Disabled(ErrorKind::Unauthorized),
            "a probe's 401 disables it"
        );
        assert_eq!(
            state.last_probe().unwrap().failed,
            Some(ErrorKind::Unauthorized)
        );
        // A 429 shows the key works again: cooling, not disabled; and the upstream's wait
        // (capped at the longest interval) comes before the next probe.
        assert!(state.begin_probe(&policy, at, &mut rng));
        let next = state.probe_failed(
            &upstream(429, Some(Duration::from_secs(50))),
            at,
            &policy,
            at,
            &mut rng,
        );
        assert_eq!(next, at + Duration::from_secs(40));
        assert!(matches!(
            state.availability(at),
            Availability::RateLimited(_)
        ));
        // Served: back, half-open, ramping, the quota view forgotten.
        assert!(state.probe_now(at));
        assert!(state.begin_probe(&policy, at, &mut rng));
        assert!(state.probe_succeeded(at, at));
        assert_eq!(state.out(), None);
        assert_eq!(state.availability(at), Availability::Ready);
        assert!(state.is_half_open());
        assert!(state.ramp(at) < 0.01);
        assert_eq!(state.last_probe().unwrap().failed, None);
        assert_eq!(state.probes(), 5);
        assert!(!state.probe_succeeded(at, at), "not out any more");
    }

    #[test]
    fn a_long_ejection_is_out_until_probed_and_a_short_one_is_not() {
        let t0 = Instant::now();
        let policy = probing().with_ejection(1, Duration::from_secs(30), Duration::from_secs(120));
        let mut rng = Rng::with_seed(3);
        let state = DeploymentState::new(t0, Duration::from_secs(10));
        let fail = |rng: &mut Rng| {
            state.record_failure(&upstream(500, None), LatencyClass::Call, &policy, t0, rng);
        };
        fail(&mut rng); // 30 s
        assert_eq!(state.out(), None);
        fail(&mut rng); // 60 s: not longer than probe_after
        assert_eq!(state.out(), None);
        fail(&mut rng); // 120 s
        assert_eq!(state.out().unwrap().why, ErrorKind::ServerError);
        assert!(matches!(
            state.availability(t0 + Duration::from_secs(500)),
            Availability::Ejected(_)
        ));
        // A shared cooldown longer than probe_after puts it out too.
        let other = DeploymentState::new(t0, Duration::from_secs(10));
        other.cool_down_shared(Duration::from_secs(30), &policy, t0, &mut rng);
        assert_eq!(other.out(), None);
        other.cool_down_shared(Duration::from_secs(300), &policy, t0, &mut rng);
        assert_eq!(other.out().unwrap().why, ErrorKind::RateLimited);
    }

    #[test]
    fn consecutive_failures_eject_exponentially() {
        let t0 = Instant::now();
        let state = DeploymentState::new(t0, Duration::from_secs(10));
        let policy = HealthPolicy::default()
            .with_ejection(2, Duration::from_secs(1), Duration::from_secs(3))
            .with_jitter(0.0);
        let mut rng = Rng::with_seed(1);
        let fail = |at: Instant, rng: &mut Rng| {
            state.record_failure(&upstream(500, None), LatencyClass::Call, &policy, at, rng);
        };
        fail(t0, &mut rng);
        assert_eq!(
            state.availability(t0),
            Availability::Ready,
            "one failure is not enough"
        );
        fail(t0, &mut rng);
        assert!(matches!(state.availability(t0), Availability::Ejected(_)));
        assert_eq!(
            state.availability(t0 + Duration::from_secs(1)),
            Availability::Ready
        );
        let t1 = t0 + Duration::from_secs(1);
        fail(t1, &mut rng);
        fail(t1, &mut rng);
        assert!(
            matches!(
                state.availability(t1 + Duration::from_millis(1999)),
                Availability::Ejected(_)
            ),
            "doubled"
        );
        let t2 = t1 + Duration::from_secs(2);
        fail(t2, &mut rng);
        fail(t2, &mut rng);
        assert_eq!(
            state.availability(t2 + Duration::from_secs(3)),
            Availability::Ready,
            "capped at 3 s"
        );
        // A success resets the doubling.
        state.record_success();
        let t3 = t2 + Duration::from_secs(4);
        fail(t3, &mut rng);
        fail(t3, &mut rng);
        assert_eq!(
            state.availability(t3 + Duration::from_secs(1)),
            Availability::Ready
        );
    }

    #[test]
    fn misconfiguration_disables_and_bad_requests_do_nothing() {
        let t0 = Instant::now();
        let state = DeploymentState::new(t0, Duration::from_secs(10));
        let policy = HealthPolicy::default();
        let mut rng = Rng::with_seed(1);
        state.record_failure(
            &upstream(400, None),
            LatencyClass::Call,
            &policy,
            t0,
            &mut rng,
        );
        assert_eq!(state.availability(t0), Availability::Ready);
        state.record_failure(
            &upstream(401, None),
            LatencyClass::Call,
            &policy,
            t0,
            &mut rng,
        );
        assert_eq!(
            state.availability(t0 + Duration::from_secs(3600)),
            Availability::Disabled(ErrorKind::Unauthorized)
        );
        let failures = state.stats(t0).failures;
        assert_eq!(failures.len(), 2);
        assert!(failures.contains(&(ErrorKind::Unauthorized, 1)));
        assert!(failures.contains(&(ErrorKind::BadRequest, 1)));
    }

    #[test]
    fn after_a_429_one_request_at_a_time_until_one_succeeds() {
        let t0 = Instant::now();
        let state = Arc::new(DeploymentState::new(t0, Duration::from_secs(10)));
        let policy = HealthPolicy::default();
        let mut rng = Rng::with_seed(1);
        let open: Vec<InFlightGuard> = (0..3)
            .map(|_| state.try_start(Instant::now()).unwrap())
            .collect();
        assert_eq!(state.in_flight(), 3, "not half-open: as many as come");
        drop(open);
        state.record_failure(
            &upstream(429, Some(Duration::from_secs(2))),
            LatencyClass::Call,
            &policy,
            t0,
            &mut rng,
        );
        let after = t0 + Duration::from_secs(2);
        assert_eq!(state.availability(after), Availability::Ready);
        let probe = state.try_start(Instant::now()).expect("one request may go");
        assert!(state.try_start(Instant::now()).is_none(), "only one");
        assert_eq!(state.availability(after), Availability::Probing);
        drop(probe);
        // Cancelled or failed: the slot is free again, still half-open.
        let probe = state.try_start(Instant::now()).unwrap();
        assert!(state.try_start(Instant::now()).is_none());
        state.record_success();
        drop(probe);
        let open: Vec<InFlightGuard> = (0..3)
            .map(|_| state.try_start(Instant::now()).unwrap())
            .collect();
        assert_eq!(open.len(), 3, "proven: open again");
    }

    #[test]
    fn racing_threads_never_hold_two_half_open_slots() {
        let t0 = Instant::now();
        let state = Arc::new(DeploymentState::new(t0, Duration::from_secs(10)));
        state.cool_down_shared(
            Duration::ZERO,
            &HealthPolicy::default(),
            t0,
            &mut Rng::with_seed(1),
        );
        assert!(state.is_half_open());
        let holders = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (state, holders, most) =
                    (Arc::clone(&state), Arc::clone(&holders), Arc::clone(&most));
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        if let Some(guard) = state.try_start(Instant::now()) {
                            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            holders.fetch_sub(1, Ordering::SeqCst);
                            drop(guard);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert_eq!(state.in_flight(), 0);
    }

    #[test]
    fn guards_release_on_drop() {
        let state = Arc::new(DeploymentState::new(
            Instant::now(),
            Duration::from_secs(10),
        ));
        let a = state.start();
        let b = state.start();
        assert_eq!(state.in_flight(), 2);
        drop(a);
        assert_eq!(state.in_flight(), 1);
        drop(b);
        assert_eq!(state.in_flight(), 0);
    }

    #[test]
    fn remaining_counts_that_repeat_the_last_report_are_stale() {
        let state = DeploymentState::new(Instant::now(), Duration::from_secs(10));
        let said = |tokens: Option<u64>, requests: Option<u64>| RateLimitInfo {
            remaining_tokens: tokens,
            remaining_requests: requests,
            ..RateLimitInfo::default()
        };
        assert!(state.fresh_report(&said(Some(900), Some(9))));
        assert!(!state.fresh_report(&said(Some(900), Some(9))), "a repeat");
        assert!(state.fresh_report(&said(Some(800), Some(9))));
        assert!(state.fresh_report(&said(Some(800), Some(8))));
        assert!(
            state.fresh_report(&said(Some(800), None)),
            "a count went missing"
        );
        assert!(!state.fresh_report(&said(Some(800), None)));
        // No counts report nothing, and leave the last report standing.
        assert!(state.fresh_report(&said(None, None)));
        assert!(!state.fresh_report(&said(Some(800), None)));
        assert!(
            state.fresh_report(&said(Some(900), Some(9))),
            "an older pair, anew"
        );
    }
}
