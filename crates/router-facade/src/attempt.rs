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
            _slot: slot,
        }
    }

    pub(crate) fn deployment(&self) -> &Arc<Deployment> {
        &self.deployment
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

    /// The headers a settlement reads: without the remaining counts when they are stale.
    fn heard(&self, info: &RateLimitInfo) -> RateLimitInfo {
        let mut info = info.clone();
        if self.stale {
            info.remaining_tokens = None;
            info.remaining_requests = None;
        }
        info
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
    /// settles the reservation with what the answer used.
    pub(crate) async fn answered(
        mut self,
        sample: Duration,
        used: Option<Used>,
        info: &RateLimitInfo,
    ) {
        let state = &self.deployment.state;
        state.observe_latency(self.class, sample, now());
        state.record_success();
        self.upstream_said(info);
        if let Some(reservation) = self.reservation.take() {
            self.counted(&reservation, used);
            reservation.settle(used, &self.heard(info)).await;
        }
    }

    /// A stream opened: records its time to first content and learns from the headers. Its
    /// outcome comes with [`finished`](Self::finished).
    pub(crate) fn opened(&mut self, ttft: Duration, info: &RateLimitInfo) {
        self.admitted = true;
        self.deployment
            .state
            .observe_latency(self.class, ttft, now());
        self.upstream_said(info);
    }

    /// A stream ended (from `poll_next`, so nothing is awaited): success, settled with `used`,
    /// or the error's effect and the reservation kept (the upstream counts what it admitted).
    pub(crate) fn finished(
        mut self,
        outcome: Result<(), &Error>,
        used: Option<Used>,
        info: &RateLimitInfo,
    ) {
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
