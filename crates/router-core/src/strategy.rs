//! Strategies: which eligible deployment takes a request.
//!
//! A [`Strategy`] is a pure, synchronous function of candidate snapshots, the time and a random
//! generator: no clock reads, no locks, no I/O, no allocation. The router builds the
//! candidates (eligible deployments only: not cooling down, not disabled, not already tried by
//! this request), asks the strategy, and maps the index back.
//!
//! # Why power of two choices
//!
//! Picking the global minimum (least busy, least latency) from shared, slightly stale numbers
//! makes every concurrent picker choose the same deployment until its numbers catch up, then
//! all move to the next one: herding. Sampling two candidates at random and taking the better
//! one ("the power of two choices", Mitzenmacher 2001; Finagle's and linkerd's balancers) keeps
//! most of the benefit, bounds the imbalance, and never starves a deployment: every one is
//! sampled now and then, so its estimate stays fresh.
//!
//! # Built in
//!
//! | name in config | type | picks |
//! |---|---|---|
//! | `round-robin` | [`RoundRobin`] | the next one in turn, per model group, atomically |
//! | `least-busy` (`least-connection`, `least-connections`) | [`LeastBusy`] | P2C on in-flight requests, random tie-break |
//! | `least-latency` | [`LeastLatency`] | P2C on PeakEWMA latency × (1 + in-flight above the pair's mean ÷ (that mean + 1)), a bounded probe of a starved deployment, slow start |
//! | `weighted` (`simple-shuffle`) | [`Weighted`] | at random, in proportion to weights |
//! | `usage-based` (`usage-based-routing`) | [`UsageBased`] | P2C on free quota share |
//!
//! Priority tiers compose with any of them: [`pick_tiered`] offers the strategy only the best
//! tier that has an eligible deployment.
//!
//! # Examples
//!
//! ```
//! use std::time::Instant;
//! use router_core::{Candidate, LeastBusy, Rng, Strategy};
//!
//! let candidates = [
//!     Candidate { in_flight: 9, ..Candidate::default() },
//!     Candidate { in_flight: 1, ..Candidate::default() },
//! ];
//! // With two candidates, P2C compares both: the idle one wins.
//! let pick = LeastBusy.pick(&candidates, Instant::now(), &mut Rng::with_seed(7));
//! assert_eq!(pick, Some(1));
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::rng::Rng;

/// What a strategy knows about one eligible deployment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Requests in flight (streams until they end).
    pub in_flight: u32,
    /// The latency estimate for this request's class, in seconds.
    pub latency: f64,
    /// The configured weight (at least 1).
    pub weight: u32,
    /// The priority tier; lower is preferred.
    pub priority: u32,
    /// The share of the deployment's quota still free, 0 to 1, when it has a quota.
    pub headroom: Option<f64>,
    /// Seconds since a request last started there; infinite when none has.
    pub idle: f64,
    /// How far it has ramped back after looking slow, 0 to 1 (1: not ramping).
    pub ramp: f64,
}

impl Default for Candidate {
    fn default() -> Self {
        Self {
            in_flight: 0,
            latency: 0.0,
            weight: 1,
            priority: 0,
            headroom: None,
            idle: 0.0,
            ramp: 1.0,
        }
    }
}

/// Chooses one of the eligible candidates.
pub trait Strategy: Send + Sync + fmt::Debug {
    /// The index of the chosen candidate; `None` only when `candidates` is empty.
    fn pick(&self, candidates: &[Candidate], now: Instant, rng: &mut Rng) -> Option<usize>;

    /// A candidate owed a *shadow probe* at this pick: the router sends a copy of the request
    /// there in the background, for its latency alone, while the caller's request goes where
    /// [`pick`](Self::pick) said. Asked after every pick; the default owes none.
    fn probe(&self, candidates: &[Candidate], now: Instant, rng: &mut Rng) -> Option<usize> {
        let _ = (candidates, now, rng);
        None
    }

    /// A request of the group went where something other than [`pick`](Self::pick) chose (its
    /// prompt-cache key's deployment); [`probe`](Self::probe) is asked next. A strategy that
    /// budgets probes by picks counts it; the default does nothing.
    fn picked_elsewhere(&self) {}

    /// A name for logs.
    fn name(&self) -> &'static str;
}

/// Two distinct indices in `0..n` at random (the same index twice when `n == 1`).
pub fn sample_two(n: usize, rng: &mut Rng) -> (usize, usize) {
    let a = rng.below(n);
    if n < 2 {
        return (a, a);
    }
    let mut b = rng.below(n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// Power of two choices on `cost`: samples two candidates, returns the cheaper; ties are broken
/// at random.
pub fn p2c(
    candidates: &[Candidate],
    rng: &mut Rng,
    cost: impl Fn(&Candidate) -> f64,
) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    let (a, b) = sample_two(candidates.len(), rng);
    let (cost_a, cost_b) = (cost(&candidates[a]), cost(&candidates[b]));
    let chosen = if cost_a < cost_b {
        a
    } else if cost_b < cost_a {
        b
    } else if rng.coin() {
        a
    } else {
        b
    };
    Some(chosen)
}

/// Offers `strategy` only the best priority tier present in `candidates`, which must be sorted
/// by priority (lowest first). The router keeps deployments in that order.
pub fn pick_tiered(
    strategy: &dyn Strategy,
    candidates: &[Candidate],
    now: Instant,
    rng: &mut Rng,
) -> Option<usize> {
    let best = candidates.first()?.priority;
    let tier = candidates.iter().take_while(|c| c.priority == best).count();
    debug_assert!(
        candidates
            .windows(2)
            .all(|w| w[0].priority <= w[1].priority)
    );
    strategy.pick(&candidates[..tier], now, rng)
}

/// Each deployment in turn. One counter per instance: the router makes one per model group.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Strategy for RoundRobin {
    fn pick(&self, candidates: &[Candidate], _now: Instant, _rng: &mut Rng) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        // Relaxed: only the counter's own increments must be atomic.
        Some(self.next.fetch_add(1, Ordering::Relaxed) % candidates.len())
    }

    fn name(&self) -> &'static str {
        "round-robin"
    }
}

/// P2C on in-flight requests.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastBusy;

impl Strategy for LeastBusy {
    fn pick(&self, candidates: &[Candidate], _now: Instant, rng: &mut Rng) -> Option<usize> {
        p2c(candidates, rng, |c| f64::from(c.in_flight))
    }

    fn name(&self) -> &'static str {
        "least-busy"
    }
}

/// How [`LeastLatency`] probes a deployment that gets nothing by cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeMode {
    /// A caller's request goes there ([`Strategy::pick`] picks it): no extra upstream
    /// traffic, but that caller waits as long as the deployment is slow.
    #[default]
    Live,
    /// The router sends a copy of a caller's request there in the background
    /// ([`Strategy::probe`] names it) and the caller's request goes to the better of the pair:
    /// one extra upstream request per probe, no caller waits on a slow deployment.
    Shadow,
}

/// P2C on a latency cost, with a bounded probe budget and slow start.
///
/// - **Cost**: the PeakEWMA latency estimate × (1 + in-flight above the pair's mean ÷ (that
///   mean + 1)), for the two candidates P2C compares. An LLM endpoint serves concurrent
///   requests in parallel until it saturates, so in-flight is not a queue: a deployment
///   carrying no more than the other costs its latency, whatever the concurrency, and one
///   carrying more costs more (which keeps P2C's balance among equals). A slower deployment is
///   therefore not chosen just because the faster ones are busy.
/// - **Probe budget**: a slower deployment gets nothing by cost, so its estimate would never
///   learn that it recovered. When P2C's pair holds one that has had no request for
///   [`probe_interval`](Self::probe_interval) longer than the other, while the other is in use
///   (a request started there within the last second), it gets the request, at most once per
///   [`probe_every`](Self::probe_every) picks of the group: one live request per interval per
///   starved deployment and never more than that share of the traffic. A deployment never
///   tried gets the next request it is paired for. The probe's answer replaces a stale or
///   doubled estimate ([`crate::ewma`]). With [`ProbeMode::Shadow`] the probe is a copy of
///   the request, sent by the router in the background ([`Strategy::probe`]), so that no
///   caller's latency pays for exploring a slow deployment.
/// - **Slow start**: a deployment whose answer came in far below its estimate (it recovered)
///   ramps back over [`DeploymentState::RAMP`](crate::DeploymentState::RAMP): when P2C chooses
///   it, the choice stands with a probability of its ramp (0 to 1), else the other of the two
///   is taken, so its share grows with the time since it came back rather than all the
///   requests that had piled onto the others moving to it at once.
///
/// Constant time: two candidates are read per pick, whatever the group's size.
#[derive(Debug)]
pub struct LeastLatency {
    /// How long a starved deployment waits between probes. Default 5 s.
    pub probe_interval: Duration,
    /// The fewest picks of the group between two probes. Default 150 (at most 0.67 % of the
    /// requests are probes).
    pub probe_every: u64,
    /// Live (the default) or shadow probes.
    pub probe_mode: ProbeMode,
    picks: AtomicU64,
    last_probe: AtomicU64,
}

impl Default for LeastLatency {
    fn default() -> Self {
        Self::with_probe_interval(Duration::from_secs(5))
    }
}

impl LeastLatency {
    /// Least latency probing a starved deployment every `interval` (at least 100 ms).
    pub fn with_probe_interval(interval: Duration) -> Self {
        Self {
            probe_interval: interval.max(Duration::from_millis(100)),
            probe_every: 150,
            probe_mode: ProbeMode::Live,
            picks: AtomicU64::new(0),
            last_probe: AtomicU64::new(0),
        }
    }

    /// The same, probing by `mode`.
    #[must_use]
    pub fn with_probe_mode(mut self, mode: ProbeMode) -> Self {
        self.probe_mode = mode;
        self
    }

    /// Of a pair, the one idle longer, with the other: only it can be owed a request.
    fn owed(
        candidates: &[Candidate],
        a: usize,
        b: usize,
    ) -> Option<(&Candidate, &Candidate, usize)> {
        let (ca, cb) = (&candidates[a], &candidates[b]);
        if ca.idle > cb.idle {
            Some((ca, cb, a))
        } else if cb.idle > ca.idle {
            Some((cb, ca, b))
        } else {
            None
        }
    }

    /// The cost compared: latency × (1 + in-flight above `mean_in_flight` ÷
    /// (`mean_in_flight` + 1)).
    pub fn cost(candidate: &Candidate, mean_in_flight: f64) -> f64 {
        let above = (f64::from(candidate.in_flight) - mean_in_flight).max(0.0);
        candidate.latency * (1.0 + above / (mean_in_flight + 1.0))
    }

    /// Whether `starved` is owed a probe next to `busy`: `busy` is in use and `starved` has
    /// gone a probe interval longer without a request.
    pub fn is_starved(&self, starved: &Candidate, busy: &Candidate) -> bool {
        let interval = self.probe_interval;
        // Seconds without the division `as_secs_f64` makes.
        let interval = interval.as_secs() as f64 + f64::from(interval.subsec_nanos()) * 1e-9;
        busy.idle < 1.0 && starved.idle - busy.idle >= interval
    }

    /// Claims the group's next probe if `probe_every` picks have passed since the last one.
    /// A budget that accumulates: a deployment that becomes starved after a quiet spell is
    /// probed at its next pairing, not after `probe_every` more picks.
    fn claim_probe(&self, pick: u64) -> bool {
        let last = self.last_probe.load(Ordering::Relaxed);
        pick.saturating_sub(last) >= self.probe_every
            && self
                .last_probe
                .compare_exchange(last, pick, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl Strategy for LeastLatency {
    fn pick(&self, candidates: &[Candidate], _now: Instant, rng: &mut Rng) -> Option<usize> {
        if candidates.len() < 2 {
            return (!candidates.is_empty()).then_some(0);
        }
        // Relaxed: a counter of picks; only its own increments must be atomic.
        let pick = self.picks.fetch_add(1, Ordering::Relaxed) + 1;
        let (a, b) = sample_two(candidates.len(), rng);
        let (ca, cb) = (&candidates[a], &candidates[b]);
        if let Some((starved, busy, index)) = Self::owed(candidates, a, b) {
            // A deployment never tried is tried at once (its estimate is only a guess); others
            // within the probe budget, when probes are live.
            let untried = starved.idle.is_infinite() && busy.idle.is_finite();
            let live = self.probe_mode == ProbeMode::Live;
            if untried || (live && self.is_starved(starved, busy) && self.claim_probe(pick)) {
                return Some(index);
            }
        }
        // `cost` for both, times 2 × (the pair's mean + 1), which is positive and shared, so
        // the order is the same: in whole numbers, with no division on the hot path.
        let (ia, ib) = (u64::from(ca.in_flight), u64::from(cb.in_flight));
        let base = ia + ib + 2;
        let cost_a = ca.latency * (base + ia.saturating_sub(ib)) as f64;
        let cost_b = cb.latency * (base + ib.saturating_sub(ia)) as f64;
        let (better, other) = if cost_a < cost_b || (cost_a <= cost_b && rng.coin()) {
            (a, b)
        } else {
            (b, a)
        };
        // Slow start: a ramping deployment's win stands with the probability of its ramp.
        let ramp = candidates[better].ramp;
        if ramp < 1.0 && rng.unit() >= ramp {
            return Some(other);
        }
        Some(better)
    }

    fn picked_elsewhere(&self) {
        // Relaxed: a counter of picks, as in `pick`.
        self.picks.fetch_add(1, Ordering::Relaxed);
    }

    fn probe(&self, candidates: &[Candidate], _now: Instant, rng: &mut Rng) -> Option<usize> {
        if self.probe_mode != ProbeMode::Shadow || candidates.len() < 2 {
            return None;
        }
        let (a, b) = sample_two(candidates.len(), rng);
        let (starved, busy, index) = Self::owed(candidates, a, b)?;
        let pick = self.picks.load(Ordering::Relaxed);
        (starved.idle.is_finite() && self.is_starved(starved, busy) && self.claim_probe(pick))
            .then_some(index)
    }

    fn name(&self) -> &'static str {
        "least-latency"
    }
}

/// P2C on quota headroom: the deployment with more of its quota free wins; deployments without
/// a quota count as entirely free. Ties go to the less busy.
#[derive(Debug, Default, Clone, Copy)]
pub struct UsageBased;

impl Strategy for UsageBased {
    fn pick(&self, candidates: &[Candidate], _now: Instant, rng: &mut Rng) -> Option<usize> {
        // Lower cost wins: used share first, in-flight as a small tie-breaker.
        p2c(candidates, rng, |c| {
            (1.0 - c.headroom.unwrap_or(1.0)) + f64::from(c.in_flight) * 1e-6
        })
    }

    fn name(&self) -> &'static str {
        "usage-based"
    }
}

/// At random, in proportion to the weights.
#[derive(Debug, Default, Clone, Copy)]
pub struct Weighted;

impl Strategy for Weighted {
    fn pick(&self, candidates: &[Candidate], _now: Instant, rng: &mut Rng) -> Option<usize> {
        let weight = |c: &Candidate| u64::from(c.weight.max(1));
        let total: u64 = candidates.iter().map(weight).sum();
        if total == 0 {
            return None;
        }
        let ticket = ((rng.unit() * total as f64) as u64).min(total - 1);
        // The candidate whose span of the weights holds the ticket is the count of spans that
        // end at or before it: counted without a branch within each run of eight, and the
        // walk stops after the run that holds it (one branch a run, not one a candidate).
        let mut end = 0;
        let mut before = 0;
        for run in candidates.chunks(8) {
            for candidate in run {
                end += weight(candidate);
                before += usize::from(end <= ticket);
            }
            if end > ticket {
                break;
            }
        }
        Some(before)
    }

    fn name(&self) -> &'static str {
        "weighted"
    }
}

/// A built-in strategy, by name.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StrategyKind {
    /// [`RoundRobin`].
    RoundRobin,
    /// [`LeastBusy`].
    LeastBusy,
    /// [`LeastLatency`] (the default).
    #[default]
    LeastLatency,
    /// [`Weighted`].
    Weighted,
    /// [`UsageBased`].
    UsageBased,
}

impl StrategyKind {
    /// Every built-in kind.
    pub const ALL: [Self; 5] = [
        Self::RoundRobin,
        Self::LeastBusy,
        Self::LeastLatency,
        Self::Weighted,
        Self::UsageBased,
    ];

    /// The canonical config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::LeastBusy => "least-busy",
            Self::LeastLatency => "least-latency",
            Self::Weighted => "weighted",
            Self::UsageBased => "usage-based",
        }
    }

    /// A fresh instance (round robin gets its own counter).
    pub fn build(self) -> Box<dyn Strategy> {
        match self {
            Self::RoundRobin => Box::new(RoundRobin::default()),
            Self::LeastBusy => Box::new(LeastBusy),
            Self::LeastLatency => Box::new(LeastLatency::default()),
            Self::Weighted => Box::new(Weighted),
            Self::UsageBased => Box::new(UsageBased),
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StrategyKind {
    type Err = Error;

    /// Accepts the canonical names and the seed's (`least-connection`), case-insensitively,
    /// with `_` for `-`.
    fn from_str(name: &str) -> Result<Self, Error> {
        let normal = name.trim().to_ascii_lowercase().replace('_', "-");
        match normal.as_str() {
            "round-robin" | "roundrobin" | "rr" => Ok(Self::RoundRobin),
            "least-busy" | "least-connection" | "least-connections" | "least-requests" => {
                Ok(Self::LeastBusy)
            }
            "least-latency" | "latency" | "latency-based-routing" => Ok(Self::LeastLatency),
            "weighted" | "weighted-random" | "simple-shuffle" => Ok(Self::Weighted),
            "usage-based" | "usage-based-routing" | "usage-based-routing-v2" | "least-usage" => {
                Ok(Self::UsageBased)
            }
            _ => Err(Error::config(format!(
                "strategy: unknown name `{name}`; known: round-robin, least-busy \
                 (least-connection), least-latency, weighted, usage-based"
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
