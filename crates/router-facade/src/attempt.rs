//! One attempt of a request on one deployment, as one handle.
//!
//! An [`Attempt`] owns everything the attempt holds: the deployment's in-flight slot
//! ([`InFlightGuard`]), the quota it reserved ([`Reservation`]), and, once it is the attempt
//! that answers, the router-side limit slots of its request ([`Permit`]). It records the
//! outcome exactly once, however the attempt ends:
//!
//! | the attempt | latency sample | health | reservation |
//! |---|---|---|---|
//! | answered ([`Attempt::answered`]) | taken there | success | settled with the usage |
//! | failed ([`Attempt::failed`]) | the failure's penalty | the error's effect | released |
//! | stream finished ([`Attempt::finished`] with `Ok`) | at its first content ([`Attempt::opened`]) | success | settled |
//! | stream failed ([`Attempt::finished`] with `Err`) | at its first content, then the penalty | the error's effect | kept |
//! | stream dropped after it opened (`Drop`) | at its first content | none | kept |
//! | future dropped before an answer (`Drop`) | none | none | released |
//!
//! A stream that opened was admitted by the upstream, which counts it in its window whatever
//! becomes of it, so its estimate stays held until it leaves the router's window too ("kept";
//! releasing it would let the router admit what the upstream then refuses). Every slot is
//! released when the handle goes, whichever row applies. This is tower's
//! "completion by one handle" (`load::peak_ewma::Handle`) with the quota added.

use std::sync::Arc;
use std::time::Duration;

use router_core::{Error, HealthPolicy, InFlightGuard, LatencyClass, RateLimitInfo, Rng};

use crate::clock::now;
use crate::limits::Permit;
use crate::reservation::{Reservation, Used};
use crate::snapshot::Deployment;

/// One attempt's hold on a deployment; see the module docs.
#[derive(Debug)]
pub(crate) struct Attempt {
    deployment: Arc<Deployment>,
    class: LatencyClass,
    health: HealthPolicy,
    /// Drawn from the request's seeded generator, so that a seeded router replays exactly.
    rng: Rng,
    reservation: Option<Reservation>,
    permit: Option<Permit>,
    /// A stream opened: the upstream admitted the request and counts it.
    admitted: bool,
    /// The answer's remaining counts repeat the report before them
    /// (`DeploymentState::fresh_report`): they correct nothing, here or in the store.
    stale: bool,
    /// The request's Azure spillover deployment, when the router has it in the same group on
    /// the same endpoint: what serves when Azure spills the request over.
    spill_to: Option<Arc<Deployment>>,
    /// Azure spilled this stream over to `spill_to`'s deployment.
    spilled: bool,
    _slot: InFlightGuard,
}

impl Attempt {
    /// An attempt on `deployment`, holding its in-flight `slot` (from
    /// `DeploymentState::try_start`) until the handle goes.
    pub(crate) fn new(
        deployment: Arc<Deployment>,
        slot: InFlightGuard,
        class: LatencyClass,
        health: HealthPolicy,
        rng: Rng,
        reservation: Option<Reservation>,
    ) -> Self {
        Self {
            deployment,
            class,
            health,
            rng,
            reservation,
            permit: None,
            admitted: false,
            stale: false,
            spill_to: None,
            spilled: false,
            _slot: slot,
        }
    }

    pub(crate) fn deployment(&self) -> &Arc<Deployment> {
        &self.deployment
    }

    /// Where Azure spills the request over to, when the router has that deployment.
    pub(crate) fn spill_to(&mut self, deployment: Option<Arc<Deployment>>) {
        self.spill_to = deployment;
    }

    /// The deployment Azure spilled the request over to, when the router has it.
    pub(crate) fn spilled_to(&self) -> Option<&Arc<Deployment>> {
        self.spill_to.as_ref()
    }

    /// Where the quota of a request Azure spilled over is charged: the spillover deployment's
    /// store key and limits, when the router has it and counts its quota.
    fn spill_target(&self) -> Option<(Arc<str>, router_core::Limits)> {
        let to = self.spill_to.as_ref()?;
        let limits = to.quota_limits();
        limits.is_limited().then(|| (Arc::clone(&to.key), limits))
    }

    /// Azure spilled the request over (`x-ms-spillover-from-*`): the deployment it was sent
    /// to was full and did not serve it. That one is half-open until it serves one itself, its
    /// reservation goes back, and neither its latency nor its success are recorded; the
    /// spillover deployment, when the router has it, is credited with the latency, the success
    /// and the quota (the reservation moves there: [`Reservation::move_to`]).
    fn spilled_over(&mut self, sample: Option<Duration>) {
        self.deployment.state.spilled();
        tracing::debug!(from = %self.deployment.name, "azure spilled the request over");
        if let Some(to) = &self.spill_to {
            if let Some(sample) = sample {
                to.state.observe_latency(self.class, sample, now());
            }
            to.state.record_success();
        }
    }

    /// Whether the attempt is accounted (holds a reservation to settle).
    pub(crate) fn is_accounted(&self) -> bool {
        self.reservation.is_some()
    }

    /// Keeps the request's router-side limit slots until the attempt ends (a stream's end).
    pub(crate) fn hold(&mut self, permit: Option<Permit>) {
        self.permit = permit;
    }

    /// Learns from an answer's rate-limit headers: the limits announced, and how much is left.
    /// When nothing is left, the deployment is half-open until its next success: one request
    /// at a time, not a burst into a 429. Remaining counts that repeat the last report are
    /// stale (`DeploymentState::fresh_report`) and teach nothing.
    fn upstream_said(&mut self, info: &RateLimitInfo) {
        let state = &self.deployment.state;
        state.learn(info);
        self.stale = !state.fresh_report(info);
        if self.stale {
            return;
        }
        let limits = self.deployment.limits();
        let (tokens, requests) = router_core::upstream_allowance(&limits, info);
        state.quota.correct(&limits, tokens, requests, now());
        if info.remaining_requests == Some(0) || info.remaining_tokens == Some(0) {
            state.hold_to_one();
        }
    }

    /// The headers a settlement reads: without the remaining counts when they are stale
    /// (copied only then).
    fn heard<'i>(&self, info: &'i RateLimitInfo) -> std::borrow::Cow<'i, RateLimitInfo> {
        if !self.stale {
            return std::borrow::Cow::Borrowed(info);
        }
        let mut info = info.clone();
        info.remaining_tokens = None;
        info.remaining_requests = None;
        std::borrow::Cow::Owned(info)
    }

    /// Learns how the upstream counts a prompt from the usage an answer reported.
    fn counted(&self, reservation: &Reservation, used: Option<Used>) {
        if let Some(used) = used {
            self.deployment
                .state
                .observe_prompt(reservation.counted_prompt(), used.prompt);
        }
    }

    /// A non-streamed answer: records `sample` and the success, learns from the headers, and
    /// settles the reservation with what the answer used (an answer Azure spilled over:
    /// [`spilled_over`](Self::spilled_over), and the reservation released).
    pub(crate) async fn answered(
        mut self,
        sample: Duration,
        used: Option<Used>,
        meta: &router_core::ResponseMeta,
    ) {
        if meta.spilled_from.is_some() {
            self.spilled_over(Some(sample));
            if let Some(reservation) = self.reservation.take() {
                // Charged where it was served, when the router has that deployment.
                match self.spill_target() {
                    Some((key, limits)) => {
                        if let Some(moved) = reservation.move_to(key, limits).await {
                            moved.settle(used, &meta.rate_limits).await;
                        }
                    }
                    None => reservation.release().await,
                }
            }
            return;
        }
        let info = &meta.rate_limits;
        let state = &self.deployment.state;
        state.observe_latency(self.class, sample, now());
        state.record_success();
        self.upstream_said(info);
        if let Some(reservation) = self.reservation.take() {
            self.counted(&reservation, used);
            reservation.settle(used, &self.heard(info)).await;
        }
    }

    /// A stream opened: records its time to first content and learns from the headers (a
    /// stream Azure spilled over: [`spilled_over`](Self::spilled_over), and the reservation
    /// released). Its outcome comes with [`finished`](Self::finished).
    pub(crate) fn opened(&mut self, ttft: Duration, meta: &router_core::ResponseMeta) {
        self.admitted = true;
        if meta.spilled_from.is_some() {
            self.spilled = true;
            self.spilled_over(Some(ttft));
            if let Some(reservation) = self.reservation.take() {
                match self.spill_target() {
                    // Charged where it streams, and kept there (as an opened stream's is).
                    Some((key, limits)) => {
                        if let Ok(handle) = tokio::runtime::Handle::try_current() {
                            handle.spawn(async move {
                                if let Some(moved) = reservation.move_to(key, limits).await {
                                    moved.keep();
                                }
                            });
                        }
                    }
                    // Dropped unsettled: released in the background.
                    None => drop(reservation),
                }
            }
            return;
        }
        self.deployment
            .state
            .observe_latency(self.class, ttft, now());
        self.upstream_said(&meta.rate_limits);
    }

    /// A stream ended (from `poll_next`, so nothing is awaited): success, settled with `used`,
    /// or the error's effect and the reservation kept (the upstream counts what it admitted).
    pub(crate) fn finished(
        mut self,
        outcome: Result<(), &Error>,
        used: Option<Used>,
        info: &RateLimitInfo,
    ) {
        if self.spilled {
            // Served (or not) by the spillover deployment: credited when it opened.
            return;
        }
        match outcome {
            Ok(()) => {
                self.deployment.state.record_success();
                if let Some(reservation) = self.reservation.take() {
                    self.counted(&reservation, used);
                    reservation.settle_detached(used, &self.heard(info));
                }
            }
            Err(error) => {
                self.record_failure(error);
                if let Some(reservation) = self.reservation.take() {
                    reservation.keep();
                }
            }
        }
    }

    /// The attempt failed before the caller got anything: the error's health effect, the
    /// reservation released.
    pub(crate) async fn failed(mut self, error: &Error) {
        self.record_failure(error);
        if let Some(reservation) = self.reservation.take() {
            reservation.release().await;
        }
    }

    /// The request ran out of time, not the deployment: nothing recorded, everything back.
    pub(crate) async fn cancelled(mut self) {
        if let Some(reservation) = self.reservation.take() {
            reservation.release().await;
        }
    }

    fn record_failure(&mut self, error: &Error) {
        self.deployment
            .state
            .record_failure(error, self.class, &self.health, now(), &mut self.rng);
        crate::prober::went_out(&self.deployment);
    }
}

impl Drop for Attempt {
    /// A stream dropped after it opened keeps its reservation (the upstream counts it); any
    /// other attempt dropped unfinished releases it (the reservation's own `Drop`).
    fn drop(&mut self) {
        if self.admitted
            && let Some(reservation) = self.reservation.take()
        {
            reservation.keep();
        }
    }
}
