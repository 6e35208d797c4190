//! From a model group's deployments to the one that takes a request: every eligibility rule in
//! one place.
//!
//! [`select`] decides, for each deployment, whether it can take this request now: not disabled,
//! not cooling down after a 429, not ejected after failures, not already tried by this request,
//! and with room in its quota for the request's [`Charge`] (by this process's [`QuotaView`] of
//! it, when the request is accounted). The best priority tier that has any such deployment is
//! offered to the strategy, and its choice mapped back.
//!
//! A half-open deployment (back from a 429's cooldown, not yet proven) whose one request is in
//! flight is not eligible ([`Reason::Probing`]).
//!
//! When none is ready it enters panic mode: deployments ejected for failures are offered again
//! rather than failing the request (an ejection must never take the last usable deployment
//! away), while throttled and disabled ones stay out (a throttled deployment would only answer
//! 429 again), and so do those whose quota has no room for the request now. When even that
//! leaves nothing, the answer is [`NothingEligible`]: "nothing until T, because R", the soonest
//! recovery among the deployments this request may still use and what it waits for.
//!
//! [`QuotaView`]: crate::QuotaView

use std::time::{Duration, Instant};

use crate::quota::{Charge, Limits};
use crate::rng::Rng;
use crate::state::{Availability, DeploymentState, LatencyClass};
use crate::strategy::{Candidate, Strategy};

/// One deployment as the selector sees it. Deployments must be given sorted by priority.
#[derive(Debug, Clone, Copy)]
pub struct Slot<'a> {
    /// Its live state (availability, load, latency, and this process's view of its quota).
    pub state: &'a DeploymentState,
    /// Its weight (at least 1).
    pub weight: u32,
    /// Its priority tier (lower is preferred).
    pub priority: u32,
    /// The quota in force (configured, else learned from the upstream's headers).
    pub limits: Limits,
}

/// What is being asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// The latency signal the request is routed on.
    pub class: LatencyClass,
    /// Its cost, when the request is accounted; `None` routes without looking at quotas.
    pub charge: Option<Charge>,
}

/// Reusable buffers, so that selecting does not allocate once warmed up.
#[derive(Debug, Default)]
pub struct Selection {
    candidates: Vec<Candidate>,
    map: Vec<usize>,
    probe: Option<usize>,
}

impl Selection {
    /// The slot the last [`select`] owes a shadow probe ([`Strategy::probe`]), if any: never
    /// the one it chose. Taking it clears it.
    pub fn take_probe(&mut self) -> Option<usize> {
        self.probe.take()
    }
}

/// What the soonest recovery waits for.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A deployment's quota to free room for the request (or another replica's use of it).
    Quota,
    /// A 429's cooldown to pass.
    RateLimited,
    /// An ejection after failures to end.
    Ejected,
    /// A half-open deployment's one request to come back (the time is an estimate: its
    /// latency).
    Probing,
    /// Nothing recovers by itself: every deployment this request may use is disabled.
    Disabled,
    /// Nothing is left: the request has tried every deployment it may use.
    Tried,
}

/// Why nothing could be selected: "nothing until `until`, because `reason`".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NothingEligible {
    /// When the soonest deployment this request may still use recovers, if any will.
    pub until: Option<Instant>,
    /// What that recovery waits for (`Disabled` or `Tried` when `until` is `None`).
    pub reason: Reason,
}

/// When the slot's quota has room for the request, if not now (never for a request that is
/// not accounted).
fn quota_at(slot: &Slot<'_>, ask: Ask, now: Instant) -> Option<Instant> {
    ask.charge
        .filter(|_| slot.limits.is_limited())
        .and_then(|charge| slot.state.quota.available_at(&slot.limits, charge, now))
}

/// When a slot can take the request, if not now, and why.
fn recovery(slot: &Slot<'_>, ask: Ask, now: Instant) -> Result<(), Option<(Instant, Reason)>> {
    let quota = quota_at(slot, ask, now);
    let cooling = match slot.state.availability(now) {
        Availability::Ready => None,
        Availability::RateLimited(at) => Some((at, Reason::RateLimited)),
        Availability::Ejected(at) => Some((at, Reason::Ejected)),
        Availability::Probing => {
            let back = Duration::from_secs_f64(slot.state.latency(ask.class, now).max(0.010));
            Some((now + back, Reason::Probing))
        }
        Availability::Disabled(_) => return Err(None),
    };
    match (cooling, quota) {
        (None, None) => Ok(()),
        (Some(c), None) => Err(Some(c)),
        (None, Some(q)) => Err(Some((q, Reason::Quota))),
        (Some((c, reason)), Some(q)) => Err(Some(if q > c {
            (q, Reason::Quota)
        } else {
            (c, reason)
        })),
    }
}

/// Fills `buffers` with the candidates among `slots` not `tried` that can take `ask` at `now`
/// (in panic mode, also an ejected one, as [`select`] says).
fn fill(
    slots: &[Slot<'_>],
    tried: &impl Fn(usize) -> bool,
    ask: Ask,
    now: Instant,
    buffers: &mut Selection,
    panic_mode: bool,
) {
    buffers.candidates.clear();
    buffers.map.clear();
    for (i, slot) in slots.iter().enumerate() {
        if tried(i) {
            continue;
        }
        let eligible = match recovery(slot, ask, now) {
            Ok(()) => true,
            // Panic mode: an ejection never takes the last usable deployment away, but a
            // quota with no room stays out (the upstream would refuse it), and so does a
            // deployment out until probed (ejected for long: only a probe brings it back).
            Err(Some((_, Reason::Ejected))) => {
                panic_mode && quota_at(slot, ask, now).is_none() && slot.state.out().is_none()
            }
            Err(_) => false,
        };
        if !eligible {
            continue;
        }
        buffers.candidates.push(Candidate {
            in_flight: slot.state.in_flight(),
            latency: slot.state.latency(ask.class, now),
            weight: slot.weight.max(1),
            priority: slot.priority,
            headroom: slot.state.quota.headroom(&slot.limits, now),
            idle: slot.state.idle(now),
            ramp: slot.state.ramp(now),
        });
        buffers.map.push(i);
    }
}

/// How many of the filled candidates are in the best tier (they come sorted by tier): the
/// strategy is offered those alone (as `pick_tiered` does), and a shadow probe goes only
/// within them.
fn best_tier(buffers: &Selection) -> usize {
    let best = buffers.candidates.first().map(|c| c.priority);
    buffers
        .candidates
        .iter()
        .take_while(|c| Some(c.priority) == best)
        .count()
}

/// Picks a slot index for `ask` at `now`, skipping those `tried(i)` says this request has
/// already tried.
pub fn select(
    slots: &[Slot<'_>],
    tried: impl Fn(usize) -> bool,
    ask: Ask,
    strategy: &dyn Strategy,
    now: Instant,
    rng: &mut Rng,
    buffers: &mut Selection,
) -> Result<usize, NothingEligible> {
    buffers.probe = None;
    fill(slots, &tried, ask, now, buffers, false);
    if buffers.candidates.is_empty() {
        fill(slots, &tried, ask, now, buffers, true);
    }
    let offered = &buffers.candidates[..best_tier(buffers)];
    if let Some(chosen) = strategy.pick(offered, now, rng) {
        buffers.probe = strategy
            .probe(offered, now, rng)
            .filter(|probe| *probe != chosen)
            .map(|probe| buffers.map[probe]);
        return Ok(buffers.map[chosen]);
    }
    Err(soonest(slots, tried, ask, now))
}

/// The shadow probe the strategy owes beside `chosen`, a slot picked by other means (a cache
/// key's deployment), among the slots not `tried`: left in `buffers` as [`select`] leaves
/// it, never `chosen`. So that a deployment no pick goes to (recovered, or new, while every
/// request has a cache key) is still measured, and can be chosen again.
#[expect(
    clippy::too_many_arguments,
    reason = "select's arguments and the pick it goes beside"
)]
pub fn probe_beside(
    slots: &[Slot<'_>],
    tried: impl Fn(usize) -> bool,
    chosen: usize,
    ask: Ask,
    strategy: &dyn Strategy,
    now: Instant,
    rng: &mut Rng,
    buffers: &mut Selection,
) {
    buffers.probe = None;
    fill(slots, &tried, ask, now, buffers, false);
    let offered = &buffers.candidates[..best_tier(buffers)];
    strategy.picked_elsewhere();
    buffers.probe = strategy
        .probe(offered, now, rng)
        .map(|probe| buffers.map[probe])
        .filter(|probe| *probe != chosen);
}

/// The soonest recovery among the slots not `tried`, and what it waits for.
pub fn soonest(
    slots: &[Slot<'_>],
    tried: impl Fn(usize) -> bool,
    ask: Ask,
    now: Instant,
) -> NothingEligible {
    let mut best: Option<(Instant, Reason)> = None;
    let mut untried = false;
    for (i, slot) in slots.iter().enumerate() {
        if tried(i) {
            continue;
        }
        untried = true;
        if let Err(Some((at, reason))) = recovery(slot, ask, now)
            && best.is_none_or(|(b, _)| at < b)
        {
            best = Some((at, reason));
        }
    }
    match best {
        Some((until, reason)) => NothingEligible {
            until: Some(until),
            reason,
        },
        None => NothingEligible {
            until: None,
            reason: if untried {
                Reason::Disabled
            } else {
                Reason::Tried
            },
        },
    }
}
