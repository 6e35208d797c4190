//! From a model group's deployments to the one that takes a request.
//!
//! [`select`] builds the candidates (deployments that are ready and that this request has not
//! tried yet), offers the best priority tier to the strategy, and maps its choice back. When no
//! deployment is ready it enters panic mode: deployments ejected for failures are offered again
//! rather than failing the request (an ejection must never take the last usable deployment
//! away), while throttled and disabled ones stay out (a throttled deployment would only answer
//! 429 again), and so do those whose quota has no room for the request now (`ready_at`). When
//! even that leaves nothing, it says when the soonest one recovers.

use std::time::Instant;

use crate::rng::Rng;
use crate::state::{Availability, DeploymentState, LatencyClass};
use crate::strategy::{Candidate, Strategy, pick_tiered};

/// One deployment as the selector sees it. Deployments must be given sorted by priority.
#[derive(Debug, Clone, Copy)]
pub struct Slot<'a> {
    /// Its live state.
    pub state: &'a DeploymentState,
    /// Its weight (at least 1).
    pub weight: u32,
    /// Its priority tier (lower is preferred).
    pub priority: u32,
    /// The share of its quota still free, when it has a quota.
    pub headroom: Option<f64>,
    /// When its quota will have room for this request, if not now.
    pub ready_at: Option<Instant>,
}

/// Reusable buffers, so that selecting does not allocate once warmed up.
#[derive(Debug, Default)]
pub struct Selection {
    candidates: Vec<Candidate>,
    map: Vec<usize>,
}

/// Why nothing could be selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NothingEligible {
    /// When the soonest throttled or ejected deployment recovers, if any will.
    pub soonest: Option<Instant>,
    /// Whether every deployment was already tried by this request.
    pub all_tried: bool,
}

/// Picks a slot index for a request of `class` at `now`, skipping those `tried(i)` says this
/// request has already tried.
pub fn select(
    slots: &[Slot<'_>],
    tried: impl Fn(usize) -> bool,
    class: LatencyClass,
    strategy: &dyn Strategy,
    now: Instant,
    rng: &mut Rng,
    buffers: &mut Selection,
) -> Result<usize, NothingEligible> {
    let fill = |buffers: &mut Selection, accept: &dyn Fn(Availability) -> bool| {
        buffers.candidates.clear();
        buffers.map.clear();
        for (i, slot) in slots.iter().enumerate() {
            if tried(i) || slot.ready_at.is_some() || !accept(slot.state.availability(now)) {
                continue;
            }
            buffers.candidates.push(Candidate {
                in_flight: slot.state.in_flight(),
                latency: slot.state.latency(class, now),
                weight: slot.weight.max(1),
                priority: slot.priority,
                headroom: slot.headroom,
            });
            buffers.map.push(i);
        }
    };
    fill(buffers, &|a| a == Availability::Ready);
    if buffers.candidates.is_empty() {
        // Panic mode: an ejection never takes the last usable deployment away.
        fill(buffers, &|a| {
            matches!(a, Availability::Ready | Availability::Ejected(_))
        });
    }
    if let Some(chosen) = pick_tiered(strategy, &buffers.candidates, now, rng) {
        return Ok(buffers.map[chosen]);
    }
    let soonest = slots
        .iter()
        .filter_map(|slot| match slot.state.availability(now) {
            Availability::RateLimited(at) | Availability::Ejected(at) => {
                Some(slot.ready_at.map_or(at, |r| r.max(at)))
            }
            Availability::Ready => slot.ready_at,
            Availability::Disabled(_) => None,
        })
        .min();
    Err(NothingEligible {
        soonest,
        all_tried: (0..slots.len()).all(&tried),
    })
}
