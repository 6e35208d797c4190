//! The request path: one request, possibly several attempts, top to bottom.
//!
//! ```text
//! run ─► Path::begin     the snapshot (loaded once, kept to the end), the model group, the
//!   │                    router-side scopes, the token estimate if anything counts tokens,
//!   │                    the deadline
//!   ├──► admit           router-side limits (caller, group): pass, wait in the scope's lane,
//!   │                    or throttled with retry_after
//!   └─┬► next            eligible + pick: router_core::select (every eligibility rule, the
//!     │                  strategy, or "nothing until T because R": wait in the group's lane,
//!     │                  in order, if T comes in time, else throttled);
//!     │                  reserve: the store admits (or refuses: the view learns, pick again);
//!     │                  Attempt::start (in-flight slot, reservation)
//!     ├► send            Operation::send within the deadline
//!     └► record          answered: Operation::complete (the attempt records and settles);
//!                        failed: Path::failed (the attempt records and releases; cooldown
//!                        shared; fail over to `next` while attempts, budget and deadline allow)
//! ```

use std::sync::Arc;
use std::time::Duration;

use router_core::{
    Admission, Ask, CallOptions, Charge, Error, ErrorKind, InFlightGuard, LatencyClass,
    NothingEligible, Reason, Rng, Selection, Slot, select,
};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::attempt::Attempt;
use crate::clock::now;
use crate::estimate::Estimate;
use crate::limits::Permit;
use crate::limits::Scope;
use crate::operation::Operation;
use crate::options::{QuotaLeft, RequestOptions, Served};
use crate::reservation::Reservation;
use crate::shared::Shared;
use crate::snapshot::{Deployment, Group, RouterSnapshot};
use crate::waitlist::{Claim, Place};

/// Serves one request of kind `O`: in its model group, then, when that group cannot serve it,
/// in its fallback groups in order, all within one deadline.
pub(crate) async fn run<O: Operation>(
    shared: &Shared,
    operation: O,
    options: &RequestOptions,
) -> Result<O::Output, Error> {
    // One span a request: what was asked, then who served it (or why not), the attempts, the
    // tokens and how long it took; each attempt's span is inside it.
    let span = tracing::info_span!(
        "request",
        model = operation.model(),
        caller = options.caller.as_deref(),
        trace_id = options.trace.as_ref().map(|(t, _)| t.trace_id()),
        outcome = tracing::field::Empty,
        attempts = tracing::field::Empty,
        endpoint = tracing::field::Empty,
        deployment = tracing::field::Empty,
        input_tokens = tracing::field::Empty,
        output_tokens = tracing::field::Empty,
        elapsed_ms = tracing::field::Empty,
    );
    let started = Instant::now();
    let result = route(shared, &operation, options)
        .instrument(span.clone())
        .await;
    match &result {
        Ok(output) => {
            let (endpoint, deployment, attempts, tokens) = O::served(output);
            span.record("outcome", "served");
            span.record("attempts", attempts);
            span.record("endpoint", endpoint.as_str());
            span.record("deployment", deployment);
            if let Some(tokens) = tokens {
                span.record("input_tokens", tokens.input);
                span.record("output_tokens", tokens.output);
            }
        }
        Err(error) => {
            span.record("outcome", error.kind().as_str());
            span.record("attempts", error.attempts());
            if let Some(endpoint) = error.endpoint() {
                span.record("endpoint", endpoint.as_str());
            }
        }
    }
    span.record(
        "elapsed_ms",
        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    );
    result
}

/// [`run`], inside the request's span.
async fn route<O: Operation>(
    shared: &Shared,
    operation: &O,
    options: &RequestOptions,
) -> Result<O::Output, Error> {
    let live = shared.snapshot.load_full();
    let requested = operation.model();
    let timeout = options.timeout.unwrap_or(live.settings.request_timeout);
    let deadline = Instant::now() + timeout;
    let pinned = pin(&live, operation).await?;
    // A continuation stays with the deployment that stored what it continues: no fallback.
    let fallbacks = if pinned.is_some() {
        &[][..]
    } else {
        live.settings.fallbacks(requested)
    };
    let mut leg = Leg {
        model: requested,
        deadline,
        first: true,
        waits: fallbacks.is_empty(),
        before: 0,
        pinned,
    };
    let mut next_fallback = 0;
    let mut context_fallback_taken = false;
    loop {
        let error = match serve(shared, &live, operation, options, leg).await {
            Ok(output) => return Ok(output),
            Err(Unserved::Final(error)) => return Err(error.with_attempts(leg.before)),
            Err(Unserved::Group(error, attempts)) => {
                leg.before += attempts;
                error
            }
        };
        if let Some(index) = pinned {
            return Err(pinned_error(&live, requested, index, &error).with_attempts(leg.before));
        }
        let larger = (error.kind() == ErrorKind::ContextLengthExceeded && !context_fallback_taken)
            .then(|| live.settings.context_fallback(leg.model))
            .flatten();
        let next = if let Some(larger) = larger {
            // A larger context window is where the request goes, and where it stays.
            context_fallback_taken = true;
            next_fallback = fallbacks.len();
            Some((larger, true))
        } else if falls_back(&error) && next_fallback < fallbacks.len() {
            next_fallback += 1;
            Some((
                fallbacks[next_fallback - 1].as_str(),
                next_fallback == fallbacks.len(),
            ))
        } else {
            None
        };
        match next {
            Some((model, last)) if Instant::now() < deadline => {
                tracing::debug!(from = leg.model, to = model, %error, "falling back");
                leg = Leg {
                    model,
                    first: false,
                    waits: last,
                    ..leg
                };
            }
            _ => return Err(error.with_attempts(leg.before)),
        }
    }
}

/// A W3C trace position and the caller's `tracestate`.
type Trace = (router_core::TraceContext, Option<String>);

/// How long a deployment one replica disabled (401, 403, 404, `insufficient_quota`) is kept
/// away from the others, through a shared store, at least (and at least twice `probe_after`,
/// so that it puts the deployment out for them): the probe that finds it serving ends it
/// sooner, one that fails extends it.
pub(crate) const DISABLED_SHARED_FOR: Duration = Duration::from_secs(300);

/// How long the router remembers which deployment stored a response (OpenAI keeps stored
/// responses 30 days).
pub(crate) const RESPONSE_AFFINITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The name a stored response's deployment is remembered under.
fn stored_name(id: &str) -> String {
    format!("response:{id}")
}

/// Where a request that continues stored state must go: the index, in its group, of the
/// deployment that stored it (`None`: it continues nothing, or its group has one deployment
/// anyway); an error naming the field when the router cannot tell.
async fn pin<O: Operation>(live: &RouterSnapshot, operation: &O) -> Result<Option<usize>, Error> {
    let Some(id) = operation.continues() else {
        return Ok(None);
    };
    let model = operation.model();
    let Some(group) = live.groups.get(model) else {
        return Ok(None); // The unknown model's own error follows.
    };
    let stored = live
        .store
        .recall(&stored_name(id), now())
        .await
        .ok()
        .flatten();
    let found = stored.as_deref().and_then(|place| {
        let (endpoint, deployment) = place.split_once('\n')?;
        group
            .members
            .iter()
            .position(|d| d.endpoint.as_str() == endpoint && d.name == deployment)
            .map(|i| (i, endpoint, deployment))
    });
    match (found, stored.as_deref()) {
        (Some((index, _, _)), _) => Ok(Some(index)),
        (None, _) if group.members.len() == 1 => Ok(None),
        (None, Some(place)) => Err(Error::with_message(
            ErrorKind::InvalidRequest,
            format!(
                "previous_response_id: `{id}` is stored on `{}`, which `{model}` no longer has",
                place.replace('\n', "/")
            ),
        )),
        (None, None) => Err(Error::with_message(
            ErrorKind::InvalidRequest,
            format!(
                "previous_response_id: `{id}` is not one this router placed (made elsewhere, \
                 or with `store: false`, or over 30 days ago), and `{model}` has {} \
                 deployments: it cannot tell which one stored it",
                group.members.len()
            ),
        )),
    }
}

/// The model group and deployment that stored response `id`, as the store remembers it.
pub(crate) async fn locate(live: &RouterSnapshot, id: &str) -> Option<(String, Arc<Deployment>)> {
    let place = live.store.recall(&stored_name(id), now()).await.ok()??;
    let (endpoint, name) = place.split_once('\n')?;
    live.groups.iter().find_map(|(model, group)| {
        group
            .members
            .iter()
            .find(|d| d.endpoint.as_str() == endpoint && d.name == name)
            .map(|d| (model.clone(), Arc::clone(d)))
    })
}

/// A call on stored response `id`, sent to the deployment that stored it, within `timeout`.
pub(crate) async fn stored_call(
    live: &RouterSnapshot,
    id: &str,
    call: router_core::StoredCall,
    timeout: Duration,
) -> Result<crate::options::Routed<serde_json::Value>, Error> {
    let Some((model, deployment)) = locate(live, id).await else {
        return Err(Error::with_message(
            ErrorKind::InvalidRequest,
            format!(
                "response `{id}`: not one this router placed (made elsewhere, with \
                 `store: false`, or over 30 days ago), so it cannot tell which deployment \
                 stored it"
            ),
        ));
    };
    let deadline = Instant::now() + timeout;
    let options = CallOptions::default().with_deadline(deadline.into_std());
    let reply = tokio::time::timeout_at(
        deadline,
        deployment
            .backend
            .stored_response(&deployment.name, id, call, &options),
    )
    .await
    .map_err(|_| {
        Error::with_message(
            ErrorKind::DeadlineExceeded,
            format!("no answer about response `{id}` within the request's deadline"),
        )
    })??;
    Ok(crate::options::Routed {
        body: reply.body,
        endpoint: deployment.endpoint.clone(),
        deployment: deployment.name.clone(),
        model,
        attempts: 1,
        meta: reply.meta,
        caller_quota: None,
        tokens: None,
        waited: Duration::ZERO,
    })
}

/// A continuation's failure, naming the deployment it had to go to.
fn pinned_error(live: &RouterSnapshot, model: &str, index: usize, error: &Error) -> Error {
    let Some(deployment) = live.groups.get(model).and_then(|g| g.members.get(index)) else {
        return Error::with_message(error.kind(), error.to_string());
    };
    let mut pinned = Error::with_message(
        error.kind(),
        format!(
            "the response this continues is stored on `{}`/`{}`, and only it can serve the \
             request: {error}",
            deployment.endpoint, deployment.name
        ),
    );
    if let Some(wait) = error.retry_after() {
        pinned = pinned.with_retry_after(wait);
    }
    pinned
}

/// Remembers where a stored response lives, for the requests that continue it.
async fn remember_stored(live: &RouterSnapshot, id: &str, endpoint: &str, deployment: &str) {
    let place = format!("{endpoint}\n{deployment}");
    let stored = live
        .store
        .remember(&stored_name(id), &place, RESPONSE_AFFINITY, now())
        .await;
    if let Err(error) = stored {
        tracing::debug!(%error, response = id, "cannot remember where a response is stored");
    }
}

/// A shadow probe on its way: the deployment's in-flight slot, and what its attempt needs.
struct ShadowProbe {
    live: Arc<RouterSnapshot>,
    estimate: Option<Estimate>,
    deadline: Instant,
    rng: Rng,
    class: LatencyClass,
    deployment: Arc<Deployment>,
    slot: InFlightGuard,
}

impl ShadowProbe {
    /// Reserves its quota and sends `operation`, the request's copy
    /// ([`operation::shadow`](crate::operation::shadow)); a refused reservation ends it.
    async fn start<O: Operation>(self, operation: O) {
        let Ok(reservation) = reserve(&self.live, self.estimate, &self.deployment, now()).await
        else {
            return;
        };
        let health = self.live.settings.health;
        let attempt = Attempt::new(
            self.deployment,
            self.slot,
            self.class,
            health,
            self.rng,
            reservation,
        );
        let call = CallOptions::default().with_deadline(self.deadline.into_std());
        crate::operation::shadow(operation, attempt, call, self.deadline).await;
    }
}

/// Whether a group's failure sends the request on to a fallback group: the group could not
/// serve it (no room in time, nothing usable, or its attempts failed for the upstream's
/// reasons), not the request's own fault and not its deadline.
fn falls_back(error: &Error) -> bool {
    matches!(error.kind(), ErrorKind::Throttled | ErrorKind::Unavailable)
        || (error.is_retryable() && error.kind() != ErrorKind::DeadlineExceeded)
}

/// One model group's turn at a request.
#[derive(Debug, Clone, Copy)]
struct Leg<'r> {
    model: &'r str,
    deadline: Instant,
    /// The group asked for (the caller's limits apply, the retry budget is credited).
    first: bool,
    /// Whether the request may wait in this group's queue (not when a fallback follows).
    waits: bool,
    /// Attempts made in the groups before this one.
    before: u32,
    /// The one deployment of the group it may go to (where the response it continues is
    /// stored), by index.
    pinned: Option<usize>,
}

/// Why a group did not serve a request: `Group` when a fallback may (its deployments could
/// not; with the attempts made there), `Final` when none may (the router-side limits refused
/// it).
enum Unserved {
    Group(Error, u32),
    Final(Error),
}

/// Serves the request in one group.
async fn serve<O: Operation>(
    shared: &Shared,
    live: &Arc<RouterSnapshot>,
    operation: &O,
    options: &RequestOptions,
    leg: Leg<'_>,
) -> Result<O::Output, Unserved> {
    let began = Instant::now();
    let mut path = Path::begin(shared, live, operation, options, leg).map_err(Unserved::Final)?;
    path.admit().await.map_err(Unserved::Final)?;
    // When its first attempt in this group left: the time before it was its wait for a turn.
    let mut first_sent = None;
    loop {
        let mut attempt = match path.next().await {
            Ok(attempt) => attempt,
            Err(error) => return Err(Unserved::Group(error, path.count)),
        };
        if let Some(probe) = operation.copyable().then(|| path.shadow_probe()).flatten() {
            let span = path.span(&probe.deployment, None);
            tokio::spawn(probe.start(operation.owned()).instrument(span));
        }
        let trace = path.attempt_trace();
        let span = path.span(attempt.deployment(), trace.as_ref());
        let place = (
            attempt.deployment().endpoint.clone(),
            attempt.deployment().name.clone(),
            attempt.deployment().place,
        );
        let started = Instant::now();
        let first_sent = *first_sent.get_or_insert(started);
        let sent = path
            .within_deadline(
                operation
                    .send(&attempt, path.call_options(trace))
                    .instrument(span.clone()),
            )
            .await;
        match &sent {
            Ok(_) => span.record("outcome", "answered"),
            Err(error) => span.record("outcome", error.kind().as_str()),
        };
        if let Some(status) = sent.as_ref().err().and_then(Error::status) {
            span.record("status", status);
        }
        span.record(
            "elapsed_ms",
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        );
        match sent {
            Ok(sent) => {
                attempt.hold(path.permit.take());
                let served = Served {
                    attempts: leg.before + path.count,
                    caller: path.caller_quota(),
                    waited: first_sent.saturating_duration_since(began),
                };
                let output = operation
                    .complete(sent, attempt, served, started.elapsed())
                    .instrument(span)
                    .await;
                path.served(place.2);
                if let Some(id) = operation.stored(&output) {
                    remember_stored(live, &id, place.0.as_str(), &place.1).await;
                }
                return Ok(output);
            }
            Err(error) => {
                if let Err(error) = path.failed(attempt, error).await {
                    return Err(Unserved::Group(error, path.count));
                }
            }
        }
    }
}

/// The most turns one request lends while first in its lane ([`Path::lend`]).
const MAX_LENDS: u8 = 2;
/// How far behind the first waiter a turn may be lent: within this many of its class.
const LEND_WITHIN: usize = 8;
/// How long the first waiter waits for a lent turn to be used before it takes it back.
const LEND_WAIT: Duration = Duration::from_millis(50);

/// A turn lent to a request ([`Path::turn_lent`]).
enum Lent {
    /// None: it picks as usual.
    None,
    /// It takes this deployment.
    Take(usize),
    /// Lent, but that deployment cannot take it now: the turn went back; wait again.
    Gone,
}

/// One request's way through the router: the snapshot it started with, its deadline, what it
/// tried, what it reserves, and its place when it waits.
struct Path<'r> {
    shared: &'r Shared,
    live: Arc<RouterSnapshot>,
    model: &'r str,
    class: LatencyClass,
    deadline: Instant,
    /// No wait for a turn may end after this: the start plus the max queue wait.
    wait_limit: Instant,
    max_queue_wait: Duration,
    tried: Vec<bool>,
    /// The one deployment it may go to ([`Leg::pinned`]).
    pinned: Option<usize>,
    /// The Azure deployment it may spill over to ([`RequestOptions::spillover_deployment`]).
    spillover: Option<String>,
    /// The caller's trace, continued by each attempt.
    trace: Option<Trace>,
    /// Its prompt-cache key, when affinity is on ([`crate::CacheAffinity`]).
    cache_key: Option<&'r str>,
    /// The deployments that served its cache key, by index, the last first (`None` where
    /// none, or one is no longer in the group).
    places: [Option<usize>; crate::affinity::PLACES],
    /// The same, as the affinity table names them ([`crate::affinity::place`]): what the
    /// waitlist knows it by, to lend it a turn at one of them.
    place_ids: [Option<u64>; crate::affinity::PLACES],
    /// Turns it lent while first in its lane (at most [`MAX_LENDS`]).
    lends: u8,
    /// Attempts made.
    count: u32,
    /// Attempts that count against `max_attempts` and the retry budget.
    charged: u32,
    rng: Rng,
    buffers: Selection,
    last_error: Option<Error>,
    /// The request's cost, when anything counts its tokens.
    estimate: Option<Estimate>,
    /// Output tokens the request expects (its cap), to estimate how long it takes.
    output_hint: u32,
    priority: u8,
    place: Option<Place>,
    /// A turn promised to an earlier refusal, claimed by this request (its place in the
    /// group's lane until it joins it).
    claim: Option<Claim>,
    /// Whether this request came on a promise (it does not leave turns to promises).
    promised: bool,
    /// The request's fingerprint, once known (only promises need it).
    fingerprint: Option<u64>,
    /// The request, for its fingerprint.
    operation: &'r dyn Fingerprinted,
    /// The last attempt was refused with a 429.
    after_rate_limit: bool,
    /// The router-side limits that apply, and the slots they granted.
    scopes: Vec<Scope>,
    permit: Option<Permit>,
    /// What the caller's own limits had left when the request was admitted.
    caller_quota: Option<QuotaLeft>,
}

impl<'r> Path<'r> {
    fn begin<O: Operation>(
        shared: &'r Shared,
        live: &Arc<RouterSnapshot>,
        operation: &'r O,
        options: &'r RequestOptions,
        leg: Leg<'r>,
    ) -> Result<Self, Error> {
        let live = Arc::clone(live);
        let model = leg.model;
        let Some(group) = live.groups.get(model) else {
            return Err(Error::with_message(
                ErrorKind::UnknownModel,
                format!(
                    "model `{model}` is not served here; known models: {}",
                    live.models().join(", ")
                ),
            ));
        };
        let settings = &live.settings;
        // A fallback group's own limits apply; the caller's were passed once already.
        let caller = options.caller.as_deref().filter(|_| leg.first);
        let scopes = settings.scopes(model, caller);
        let expected = settings.expected_completion;
        let estimate = group
            .accounts(live.store.as_ref(), &scopes)
            .then(|| operation.estimate(expected));
        let max_queue_wait = if leg.waits {
            options.max_queue_wait.unwrap_or(settings.max_queue_wait)
        } else {
            Duration::ZERO
        };
        if leg.first {
            shared.budget().deposit(crate::clock::now());
        }
        let start = Instant::now();
        let fingerprint = shared
            .waitlist
            .has_promises()
            .then(|| operation.fingerprint());
        let claim =
            fingerprint.and_then(|fingerprint| shared.waitlist.claim(model, start, fingerprint));
        let cache_key = settings
            .cache_affinity
            .and(operation.cache_key().or(options.cache_key.as_deref()))
            .filter(|_| leg.pinned.is_none() && group.members.len() > 1);
        let mut places = [None; crate::affinity::PLACES];
        let mut place_ids = [None; crate::affinity::PLACES];
        if let Some(key) = cache_key {
            let recalled = shared.affinities.recall(model, key, now());
            place_ids = recalled;
            if recalled[0].is_some() {
                for (index, d) in group.members.iter().enumerate() {
                    if let Some(at) = recalled.iter().position(|p| *p == Some(d.place)) {
                        places[at] = Some(index);
                    }
                }
            }
        }
        Ok(Self {
            deadline: leg.deadline,
            wait_limit: (start + max_queue_wait).min(leg.deadline),
            max_queue_wait,
            tried: vec![false; group.members.len()],
            pinned: leg.pinned,
            spillover: options.spillover_deployment.clone(),
            trace: options.trace.clone(),
            cache_key,
            places,
            place_ids,
            lends: 0,
            class: operation.class(),
            output_hint: operation.output_hint(expected),
            count: 0,
            charged: 0,
            rng: shared.rng(),
            buffers: Selection::default(),
            last_error: None,
            estimate,
            priority: options.priority,
            place: None,
            claim,
            promised: claim.is_some(),
            fingerprint,
            operation,
            after_rate_limit: false,
            scopes,
            permit: None,
            caller_quota: None,
            shared,
            model,
            live,
        })
    }

    fn group(&self) -> &Group {
        // `begin` checked that the group exists in this snapshot, which never changes.
        &self.live.groups[self.model]
    }

    fn charge(&self) -> Option<Charge> {
        self.estimate.map(|e| e.charge)
    }

    /// The pick its cache key makes ([`crate::CacheAffinity`]): the key's deployment while
    /// it can take the request, does not look slow and is not much busier than an
    /// alternative drawn at random; when it looks slow or is that busy, the strategy's pick
    /// among the alternatives (else among all the others); `None` for the strategy's pick
    /// among all.
    ///
    /// Slow: its typical latency is more than the affinity's times the fastest ready
    /// deployment's, by more than noise for this request. Alternatives: the other deployments
    /// not tried and not slow, so that a key never moves where the slowness rule would move
    /// it from again (the two rules would trade keys back and forth, each move a cache miss).
    /// Much busier: more than `1 + tolerance` times the alternative's requests in flight,
    /// plus one.
    fn affine_pick(
        &mut self,
        slots: &[Slot<'_>],
        ask: Ask,
        strategy: &dyn router_core::Strategy,
        at: std::time::Instant,
    ) -> Option<usize> {
        let affinity = self.live.settings.cache_affinity?;
        let places = self.places;
        if places.iter().all(Option::is_none) {
            return None;
        }
        let Self {
            live,
            model,
            class,
            output_hint,
            tried,
            rng,
            buffers,
            ..
        } = self;
        let members = &live.groups[*model].members;
        let class = *class;
        let home = places[0].filter(|&i| !tried[i]);
        // Typical, not peak, latencies: one tail answer at the key's deployment must not cost
        // the key its cache. Only deployments that could take the request and have answered
        // (a guess is not a measure) compare.
        let typical = |j: usize| members[j].state.typical_latency(class);
        let fastest = members
            .iter()
            .enumerate()
            .filter(|&(j, d)| {
                Some(j) == home || d.state.availability(at) == router_core::Availability::Ready
            })
            .filter_map(|(j, _)| typical(j))
            .fold(f64::INFINITY, f64::min);
        // Slower by the factor and by more than noise: 50 ms for this request (to the first
        // token, for a call, or over the tokens it expects, for a generation), and never under
        // 2 ms a token (fast upstreams differ by more than twice in fractions of a
        // millisecond).
        let noise = match class {
            LatencyClass::Generation => (0.05 / f64::from((*output_hint).max(1))).max(0.002),
            LatencyClass::Stream | LatencyClass::Call => 0.05,
        };
        let slow = |j: usize| {
            typical(j).is_some_and(|latency| {
                latency > fastest * affinity.slower && latency - fastest > noise
            })
        };
        let alternative = |j: usize| Some(j) != home && !tried[j] && !slow(j);
        // Whether `j` carries at most `1 + tolerance` times the requests in flight of another
        // alternative drawn uniformly, plus one.
        let light = |j: usize, rng: &mut Rng| {
            let others = || (0..members.len()).filter(|&k| k != j && alternative(k));
            let n = others().count();
            if n == 0 {
                return true;
            }
            let drawn = (rng.unit() * n as f64) as usize % n;
            let other = others().nth(drawn).unwrap_or(j);
            let ours = f64::from(members[j].state.in_flight());
            let theirs = f64::from(members[other].state.in_flight());
            ours <= (1.0 + affinity.tolerance) * theirs + 1.0
        };
        if let Some(home) = home
            && !slow(home)
            && light(home, rng)
            && let Ok(picked) = select(slots, |j| j != home, ask, strategy, at, rng, buffers)
        {
            // The strategy's probe budget runs beside the key's pick: a deployment that keys
            // left (slow then, recovered since) or that joined is still measured by shadow
            // copies, and becomes an alternative again once it answers as fast as the rest.
            router_core::probe_beside(slots, |j| tried[j], picked, ask, strategy, at, rng, buffers);
            return Some(picked);
        }
        // The key's deployment cannot take it (no quota room, cooling), looks slow or is much
        // busier: the places that served the key before it may still hold its prefix.
        let warm = |j: usize| places[1..].contains(&Some(j)) && alternative(j);
        if (0..members.len()).any(warm)
            && let Ok(picked) = select(slots, |j| !warm(j), ask, strategy, at, rng, buffers)
            && light(picked, rng)
        {
            router_core::probe_beside(slots, |j| tried[j], picked, ask, strategy, at, rng, buffers);
            return Some(picked);
        }
        let home = home?;
        select(slots, |j| !alternative(j), ask, strategy, at, rng, buffers)
            .or_else(|_| {
                select(
                    slots,
                    |j| j == home || tried[j],
                    ask,
                    strategy,
                    at,
                    rng,
                    buffers,
                )
            })
            .ok()
    }

    /// A turn lent to this request (it waits behind the first of its lane, and a deployment
    /// its cache key was served at has room the first would take without a cache): the pick,
    /// that deployment; or, when that deployment cannot take the request after all, the turn
    /// goes back.
    fn turn_lent(&mut self, slots: &[Slot<'_>], ask: Ask, at: std::time::Instant) -> Lent {
        let waitlist = &self.shared.waitlist;
        let Some(place) = &self.place else {
            return Lent::None;
        };
        let Some(lent) = waitlist.lent_to(place) else {
            return Lent::None;
        };
        let group = &self.live.groups[self.model];
        let tried = &self.tried;
        let target = group
            .members
            .iter()
            .enumerate()
            .position(|(j, d)| !tried[j] && d.place == lent);
        let strategy = group.strategy.as_ref();
        let picked = target.and_then(|i| {
            select(
                slots,
                |j| j != i,
                ask,
                strategy,
                at,
                &mut self.rng,
                &mut self.buffers,
            )
            .ok()
        });
        if let Some(index) = picked {
            Lent::Take(index)
        } else {
            waitlist.end_lend(place.lane());
            Lent::Gone
        }
    }

    /// Turns lent, to this request or by it: the deployment to go on with (`picked`, or the
    /// one a turn lent to it is for), or `None` to choose again (it lent its turn, or the turn
    /// lent to it went back and it waited again).
    async fn lent_turns(
        &mut self,
        picked: usize,
        slots: &[Slot<'_>],
        ask: Ask,
        at: std::time::Instant,
    ) -> Result<Option<usize>, Error> {
        match self.turn_lent(slots, ask, at) {
            Lent::Take(index) => Ok(Some(index)),
            Lent::Gone => {
                let model = self.model;
                self.wait_in(model, None).await?;
                Ok(None)
            }
            Lent::None if self.lend(picked).await => Ok(None),
            Lent::None => Ok(Some(picked)),
        }
    }

    /// First in its lane, about to take room at a deployment that never served its cache key
    /// (or it has none): lends the turn to a waiter close behind whose key that deployment
    /// served, and waits for it to be used (briefly); whether it lent. At most [`MAX_LENDS`]
    /// times a request, so that lending delays nobody for long.
    async fn lend(&mut self, index: usize) -> bool {
        if self.lends >= MAX_LENDS
            || self.live.settings.cache_affinity.is_none()
            || self.places.contains(&Some(index))
        {
            return false;
        }
        let Some(place) = &self.place else {
            return false;
        };
        let at = self.live.groups[self.model].members[index].place;
        let waitlist = &self.shared.waitlist;
        if !waitlist.lend(place, at, LEND_WITHIN) {
            return false;
        }
        self.lends += 1;
        let lane = place.lane();
        waitlist
            .until_returned(lane, (Instant::now() + LEND_WAIT).min(self.deadline))
            .await;
        // Used, or nobody came for it in time: the turn is this request's again.
        waitlist.end_lend(lane);
        true
    }

    /// The request was served by the deployment `place` ([`crate::snapshot::Deployment::place`]): its cache
    /// key's last place is that deployment now.
    fn served(&self, place: u64) {
        let (Some(key), Some(affinity)) = (self.cache_key, self.live.settings.cache_affinity)
        else {
            return;
        };
        let at = now();
        self.shared
            .affinities
            .remember(self.model, key, place, at, at + affinity.ttl);
    }

    /// Passes the router-side limits: at once, after waiting its turn in the refusing scope's
    /// lane when that comes before the deadline, or throttled with when to retry.
    async fn admit(&mut self) -> Result<(), Error> {
        if self.scopes.is_empty() {
            return Ok(());
        }
        let charge = self.charge().unwrap_or(Charge {
            tokens: 0,
            requests: 1,
        });
        let waitlist = &self.shared.waitlist;
        // Someone waits already in one of its scopes: queue behind them.
        if let Some(busy) = self.scopes.iter().find(|s| waitlist.is_busy(&s.name)) {
            let lane = busy.name.clone();
            self.wait_in(&lane, None).await?;
        }
        loop {
            let refusal = match self
                .shared
                .limiters
                .try_admit(&self.live.store, &self.scopes, charge, Instant::now())
                .await
            {
                Ok(permit) => {
                    self.caller_quota = permit.caller_quota(&self.scopes);
                    self.permit = Some(permit);
                    self.leave_waitlist();
                    return Ok(());
                }
                Err(refusal) => refusal,
            };
            let now = Instant::now();
            let until = now + refusal.retry_after;
            // Its turn comes after the requests ahead of it in the scope's lane, each taking
            // what the scope frees at its rate.
            let ahead =
                self.shared
                    .waitlist
                    .ahead(&refusal.scope, self.priority, self.place.as_ref());
            let scope = self.scopes.iter().find(|s| s.name == refusal.scope);
            let interval =
                scope.map_or(Duration::ZERO, |s| interval(&[s.limits.windows()], charge));
            let expected =
                until + interval.saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX));
            if refusal.concurrency || expected > self.deadline || expected > self.wait_limit {
                self.leave_waitlist();
                let error = refusal.error().with_retry_after(expected - now);
                return Err(if expected > self.wait_limit && expected <= self.deadline {
                    self.over_max_queue_wait(&error, expected - now, expected - now)
                } else {
                    error
                });
            }
            if !self.wait_in(&refusal.scope, Some(until)).await? {
                self.leave_waitlist();
                return Err(refusal.error());
            }
        }
    }

    /// What the caller's own limits had left when the request was admitted.
    fn caller_quota(&self) -> Option<QuotaLeft> {
        self.caller_quota
    }

    /// The error of a request refused because its expected wait is over its max queue wait.
    /// `error` is why it must wait: the router's throttling, or an upstream's failure after
    /// which the others had no room (named as the last attempt's).
    fn over_max_queue_wait(&self, error: &Error, expected: Duration, retry: Duration) -> Error {
        let wait = format!(
            "expected to wait {:.1}s for its turn, over its max queue wait of {:.1}s",
            expected.as_secs_f64(),
            self.max_queue_wait.as_secs_f64(),
        );
        let message = if error.kind() == ErrorKind::Throttled {
            format!("{}; {wait}", error.message().unwrap_or_default())
        } else {
            format!(
                "no other deployment of `{}` has room for the request now; {wait} (its last \
                 attempt failed: {error})",
                self.model
            )
        };
        Error::with_message(ErrorKind::Throttled, message).with_retry_after(retry)
    }

    /// Waits in `lane` until `until` (if given) and then until first in it; `Ok(false)` when
    /// the waitlist is full.
    async fn wait_in(&mut self, lane: &str, until: Option<Instant>) -> Result<bool, Error> {
        let waitlist = &self.shared.waitlist;
        if self.place.as_ref().is_some_and(|p| p.lane() != lane) {
            self.leave_waitlist();
        }
        if self.place.is_none() {
            let claim = if lane == self.model {
                self.claim.take()
            } else {
                None
            };
            self.place = waitlist.join(lane, self.priority, self.live.settings.max_waiting, claim);
            let Some(place) = &self.place else {
                return Ok(false);
            };
            if lane == self.model {
                waitlist.mark_warm(place, self.place_ids);
            }
        }
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
        if let Some(place) = &self.place {
            waitlist
                .until_first(place, self.wait_limit.min(self.deadline))
                .await;
        }
        Ok(true)
    }

    fn leave_waitlist(&mut self) {
        if let Some(place) = self.place.take() {
            self.shared.waitlist.leave(place);
        }
    }

    /// Picks the next deployment, reserves its quota and starts an attempt on it; waits (in
    /// order) when nothing can take the request yet but something will before the deadline;
    /// the error when there is nothing, the attempts are spent, the budget is, or the deadline
    /// has passed.
    async fn next(&mut self) -> Result<Attempt, Error> {
        if Instant::now() >= self.deadline {
            if self.last_error.is_none() {
                return Err(self.out_of_time());
            }
            return Err(self.give_up());
        }
        let settings = &self.live.settings;
        // A failover after a 429 is free: the throttled deployment cools down, so it cannot
        // storm, and the request must not fail while another deployment (or this one, later)
        // has room.
        if self.count > 0 && !self.after_rate_limit {
            let spent = self.charged >= settings.retry.max_attempts;
            if spent || !self.shared.budget().try_withdraw() {
                return Err(self.give_up());
            }
        }
        if !self.after_rate_limit || self.count == 0 {
            self.charged += 1;
        }
        // Someone waits for this group already: queue behind them, first come first served
        // within a class (a request on a promise stands where it stood when refused).
        if self.place.is_none() && self.count == 0 && self.shared.waitlist.is_busy(self.model) {
            // Only if its turn behind them is expected in time.
            let mut nothing = self.soonest();
            let usable = self.group().members.iter().any(|d| {
                !matches!(
                    d.state.availability(now()),
                    router_core::Availability::Disabled(_)
                )
            });
            if nothing.until.is_none() && usable {
                // Room now, but others are queued for it: the wait is their turns, for quota
                // (not "all disabled or tried", which `soonest` says when none is out of room).
                nothing.until = Some(now());
                nothing.reason = Reason::Quota;
            }
            let until = nothing.until.map_or_else(Instant::now, Instant::from_std);
            self.may_wait_for(until, nothing).await?;
            let model = self.model;
            self.wait_in(model, None).await?;
        }
        let live = Arc::clone(&self.live);
        let group = &live.groups[self.model];
        let ask = Ask {
            class: self.class,
            charge: self.charge(),
        };
        loop {
            if self.count == 0 {
                self.leave_held_turns().await;
            }
            let at = now();
            let slots: Vec<Slot<'_>> = group.members.iter().map(|d| d.slot()).collect();
            // The deployment that served the request's cache key, while it can take it, is
            // not carrying too much of the group's load and does not look slow.
            let affine = self.affine_pick(&slots, ask, group.strategy.as_ref(), at);
            let (tried, pinned) = (&self.tried, self.pinned);
            let picked = match affine {
                Some(index) => Ok(index),
                None => select(
                    &slots,
                    |i| tried[i] || pinned.is_some_and(|p| p != i),
                    ask,
                    group.strategy.as_ref(),
                    at,
                    &mut self.rng,
                    &mut self.buffers,
                ),
            };
            let index = match picked {
                Ok(index) => index,
                Err(nothing) => {
                    if self.may_wait(nothing).await? {
                        continue;
                    }
                    return Err(self.nothing_eligible(nothing));
                }
            };
            let Some(index) = self.lent_turns(index, &slots, ask, at).await? else {
                continue;
            };
            let deployment = Arc::clone(&group.members[index]);
            let Some(slot) = deployment.state.try_start(at) else {
                // Half-open, and another request took its one slot since the choice: it shows
                // as probing now, so choosing again cannot pick it.
                continue;
            };
            let Ok(reservation) = self.reserve(&deployment, at).await else {
                // The store said no (another replica used the quota, or shares a cooldown);
                // the deployment's view now knows until when: choose again (the slot goes).
                continue;
            };
            self.tried[index] = true;
            self.count += 1;
            self.leave_waitlist();
            tracing::trace!(
                model = self.model,
                endpoint = %deployment.endpoint,
                strategy = group.strategy.name(),
                attempt = self.count,
                "picked"
            );
            return Ok(self.attempt(deployment, slot, reservation));
        }
    }

    /// An attempt of this request on `deployment`, holding its `slot` and `reservation`, with
    /// a generator forked from the request's (so that a seeded router replays exactly).
    fn attempt(
        &mut self,
        deployment: Arc<Deployment>,
        slot: InFlightGuard,
        reservation: Option<Reservation>,
    ) -> Attempt {
        let rng = Rng::with_seed(self.rng.fork_seed());
        // The spillover deployment Azure would send it to (on the same resource), when the
        // router has it.
        let spill_to = self
            .spillover
            .as_deref()
            .filter(|_| deployment.resource.is_some())
            .and_then(|name| {
                self.group()
                    .members
                    .iter()
                    .find(|d| {
                        d.resource == deployment.resource
                            && d.name == name
                            && d.name != deployment.name
                    })
                    .cloned()
            });
        let mut attempt = Attempt::new(
            deployment,
            slot,
            self.class,
            self.live.settings.health,
            rng,
            reservation,
        );
        attempt.spill_to(spill_to);
        attempt
    }

    /// The shadow probe the last selection owed (a copy of this request, sent in the
    /// background, [`Strategy::probe`](router_core::Strategy::probe)), holding the
    /// deployment's in-flight slot: `None` when none is owed, or its one half-open slot is
    /// taken. Its quota is reserved in the background too ([`ShadowProbe::start`]), so that
    /// the caller's request waits for no store on its account.
    fn shadow_probe(&mut self) -> Option<ShadowProbe> {
        let index = self.buffers.take_probe()?;
        let deployment = Arc::clone(&self.group().members[index]);
        let slot = deployment.state.try_start(now())?;
        tracing::debug!(
            model = self.model,
            endpoint = %deployment.endpoint,
            "probing a starved deployment with a copy of the request"
        );
        Some(ShadowProbe {
            live: Arc::clone(&self.live),
            estimate: self.estimate,
            deadline: Instant::now() + self.live.settings.request_timeout,
            rng: Rng::with_seed(self.rng.fork_seed()),
            class: self.class,
            deployment,
            slot,
        })
    }

    /// Reserves the request's cost on `deployment` when it is accounted; `Err` when the store
    /// refused (and the deployment's view has learned until when).
    async fn reserve(
        &self,
        deployment: &Deployment,
        at: std::time::Instant,
    ) -> Result<Option<Reservation>, ()> {
        reserve(&self.live, self.estimate, deployment, at).await
    }

    /// Waits in the group's lane for the soonest recovery when the request could still be
    /// served before its deadline and the waitlist has room; `false` when it should fail now.
    async fn may_wait(&mut self, nothing: NothingEligible) -> Result<bool, Error> {
        // Only quota and cooldowns recover by themselves. A failure that reaches here is the
        // upstream's (retryable: the request's own faults were answered at once), so the
        // request waits for room on another deployment as it would have before its first
        // attempt, within its deadline and its max queue wait.
        let waitable = self
            .last_error
            .as_ref()
            .is_none_or(|e| e.is_rate_limited() || e.is_retryable());
        let Some(until) = nothing.until.filter(|_| waitable) else {
            return Ok(false);
        };
        let until = self.may_wait_for(Instant::from_std(until), nothing).await?;
        let model = self.model;
        self.wait_in(model, Some(until)).await
    }

    /// Its order in the group's lane: where it waits, where it stood when refused (a claimed
    /// promise), or behind everyone of its class (a newcomer).
    fn order(&self) -> (u8, u64) {
        match (&self.place, self.claim) {
            (Some(place), _) => place.order(),
            (None, Some(claim)) => claim.order(),
            (None, None) => (self.priority, u64::MAX),
        }
    }

    /// Leaves the turns of promises due now to their clients: while promises ahead of this
    /// request hold their turns ([`Waitlist::held`](crate::waitlist::Waitlist)) and the
    /// group has no room beyond theirs, waits (until a hold ends, a promise is claimed, or
    /// room opens for it too), no longer than its max queue wait.
    async fn leave_held_turns(&mut self) {
        loop {
            let now = Instant::now();
            if now >= self.wait_limit {
                return;
            }
            let waitlist = &self.shared.waitlist;
            let Some((held, ends)) = waitlist.held(self.model, self.order(), now) else {
                return;
            };
            // Room now for the held turns and this one, or a store that cannot tell: go on.
            let Some(openings) = self.openings(held + 1).await else {
                return;
            };
            let room = openings.get(held).copied();
            if room.is_some_and(|at| at <= now) {
                return;
            }
            let wake = room.map_or(ends, |at| at.min(ends)).min(self.wait_limit);
            self.shared.waitlist.changed(wake).await;
        }
    }

    /// How many wait in the group's lane ahead of this request.
    fn ahead(&self) -> usize {
        let waitlist = &self.shared.waitlist;
        match (&self.place, self.claim) {
            (None, Some(claim)) => waitlist.ahead_of_claim(self.model, claim),
            (place, _) => waitlist.ahead(self.model, self.priority, place.as_ref()),
        }
    }

    /// How long `n` requests like this one take to be admitted, at the rate the group's
    /// quota frees (when the store cannot walk the windows).
    fn turns(&self, n: usize) -> Duration {
        let pinned = self.pinned;
        let limits: Vec<router_core::Limits> = self
            .group()
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| pinned.is_none_or(|p| p == *i))
            .map(|(_, d)| d.limits())
            .collect();
        let interval = self
            .charge()
            .map_or(Duration::ZERO, |c| interval(&limits, c));
        interval.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// When the group's next `n` requests like this one would be admitted, soonest first,
    /// from the store's own windows ([`StateStore::openings`](router_core::StateStore)): a
    /// sliding window frees what it admitted a window ago, in the bursts it admitted it, not
    /// at an even rate. `None` when a deployment's store cannot tell (or counts nothing).
    async fn openings(&self, n: usize) -> Option<Vec<Instant>> {
        let estimate = self.estimate?;
        let store = &self.live.store;
        let now_std = now();
        let by = now_std + MAX_PROMISE + self.max_queue_wait;
        let mut asks = Vec::new();
        for (index, deployment) in self.group().members.iter().enumerate() {
            // A pinned request's turn comes only from its one deployment.
            if self.pinned.is_some_and(|p| p != index) {
                continue;
            }
            let ready = match deployment.state.availability(now_std) {
                // Half-open with its one request in flight: it takes no other, whatever its
                // window says.
                router_core::Availability::Disabled(_) | router_core::Availability::Probing => {
                    continue;
                }
                router_core::Availability::RateLimited(until)
                | router_core::Availability::Ejected(until) => until,
                _ => now_std,
            };
            if !deployment.accounts(store.as_ref()) {
                return None;
            }
            let charge = estimate.scaled(deployment.state.prompt_ratio()).charge;
            let limits = deployment.quota_limits();
            asks.push(async move {
                let openings = store
                    .openings(&deployment.key, &limits, charge, n, now_std, by)
                    .await;
                (deployment, charge, ready, openings)
            });
        }
        // The deployments are asked together: a shared store answers in one round trip's
        // time, not one per deployment.
        let answers = futures_util::future::join_all(asks).await;
        let mut all = Vec::new();
        for (deployment, charge, ready, openings) in answers {
            let openings = openings.ok()??;
            // The store's walk is the truth the view approximates: a settlement may have given
            // back what an earlier refusal's block counted on, and a window frees in bursts
            // where the view's buckets refill evenly.
            let asked = Charge {
                tokens: charge.tokens.max(estimate.charge.tokens),
                ..charge
            };
            deployment.state.quota.open_at(
                &deployment.limits(),
                asked,
                openings.first().copied().unwrap_or(by),
                now_std,
            );
            all.extend(
                openings
                    .into_iter()
                    .map(|at| Instant::from_std(at.max(ready))),
            );
        }
        all.sort_unstable();
        Some(all)
    }

    /// The `k`-th (from 0) of `openings`, or, past their end, the last and the turns after it
    /// at the group's rate; without openings, `k` turns after `until`.
    fn turn(&self, openings: Option<&[Instant]>, k: usize, until: Instant) -> Instant {
        let until = until.max(Instant::now());
        let Some(openings) = openings.filter(|o| !o.is_empty()) else {
            return until + self.turns(k);
        };
        if let Some(at) = openings.get(k) {
            return (*at).max(until);
        }
        let last = openings[openings.len() - 1].max(until);
        last + self.turns(k + 1 - openings.len())
    }

    /// The soonest recovery (`until`, as the store's windows correct it) when this request's
    /// turn, the queue ahead of it served first, comes within the max queue wait and leaves
    /// time to serve the request before its deadline; else the caller's error, with a
    /// promised turn as its `retry_after` ([`promise`](Self::promise)).
    async fn may_wait_for(
        &mut self,
        until: Instant,
        nothing: NothingEligible,
    ) -> Result<Instant, Error> {
        let now = Instant::now();
        let ahead = self.ahead();
        // Turns promised to refusals before this one come before its own promised turn.
        let before = if self.promised {
            0
        } else {
            self.shared.waitlist.promised(
                self.model,
                self.order(),
                now,
                now + MAX_PROMISE + MAX_PROMISE,
            )
        };
        let openings = self.openings(ahead + before + 1).await;
        let openings = openings.as_deref();
        // The walk corrected the deployments' views: the soonest recovery is asked again (an
        // earlier refusal's block may have counted on what a settlement has given back since;
        // none: one has room now).
        let until = if openings.is_some() {
            self.soonest().until.map_or(now, Instant::from_std)
        } else {
            until
        };
        // Its turn comes after those waiting ahead of it and the promised turns that fall
        // before it (their clients come back for them).
        let mut expected = self.turn(openings, ahead, until);
        if !self.promised {
            for _ in 0..4 {
                let due = self
                    .shared
                    .waitlist
                    .promised(self.model, self.order(), now, expected);
                let next = self.turn(openings, ahead + due.min(before), until);
                if next <= expected {
                    break;
                }
                expected = next;
            }
        }
        let service = self.expected_service().mul_f64(1.5);
        let over_deadline = expected + service > self.deadline;
        if !over_deadline && expected <= self.wait_limit {
            return Ok(until);
        }
        let error = self.nothing_eligible(nothing);
        let retry_at = self.promise(self.turn(openings, ahead + before, until));
        Err(if over_deadline {
            error.with_retry_after(retry_at - now)
        } else {
            self.over_max_queue_wait(&error, expected - now, retry_at - now)
        })
    }

    /// Promises the turn `at` to this request, refused now, for when it comes back (when
    /// within [`MAX_PROMISE`]), and returns it (the refusal's `Retry-After`).
    fn promise(&self, at: Instant) -> Instant {
        let now = Instant::now();
        if at > now && at - now <= MAX_PROMISE {
            let fingerprint = self
                .fingerprint
                .unwrap_or_else(|| self.operation.fingerprint());
            self.shared
                .waitlist
                .promise(self.model, self.priority, at, fingerprint, self.promised);
        }
        at
    }

    /// How long the fastest deployment is expected to take to serve this request.
    fn expected_service(&self) -> Duration {
        let at = now();
        let tokens = match self.class {
            LatencyClass::Generation => f64::from(self.output_hint.max(1)),
            LatencyClass::Stream | LatencyClass::Call => 1.0,
        };
        let fastest = self
            .group()
            .members
            .iter()
            .map(|d| d.state.latency(self.class, at))
            .fold(f64::INFINITY, f64::min);
        if fastest.is_finite() {
            Duration::from_secs_f64((fastest * tokens).max(0.0))
        } else {
            Duration::ZERO
        }
    }

    /// An attempt's span: where it went, its span id in the caller's trace, and, once it is
    /// known, its outcome (`answered`, or the error's kind), the upstream's status when it
    /// failed with one, and how long it took to its answer's headers.
    fn span(&self, deployment: &Deployment, trace: Option<&Trace>) -> tracing::Span {
        tracing::debug_span!(
            "attempt",
            model = self.model,
            endpoint = %deployment.endpoint,
            deployment = %deployment.name,
            attempt = self.count,
            span_id = trace.map(|(t, _)| t.span_id()),
            outcome = tracing::field::Empty,
            status = tracing::field::Empty,
            elapsed_ms = tracing::field::Empty,
        )
    }

    /// The caller's trace with a span id of this attempt's own, when the caller sent one.
    fn attempt_trace(&self) -> Option<Trace> {
        self.trace.as_ref().map(|(context, state)| {
            (
                context.child(router_core::Rng::new().fork_seed()),
                state.clone(),
            )
        })
    }

    fn call_options(&self, trace: Option<Trace>) -> CallOptions {
        let mut call = CallOptions::default().with_deadline(self.deadline.into_std());
        call.spillover_deployment.clone_from(&self.spillover);
        call.trace = trace;
        call
    }

    async fn within_deadline<T>(
        &self,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout_at(self.deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(Error::with_message(
                ErrorKind::DeadlineExceeded,
                format!(
                    "no answer for `{}` within the request's deadline",
                    self.model
                ),
            )),
        }
    }

    /// Records a failed attempt; `Ok` when another may follow.
    async fn failed(&mut self, attempt: Attempt, error: Error) -> Result<(), Error> {
        let late = Instant::now() >= self.deadline;
        if error.kind() == ErrorKind::DeadlineExceeded || (late && !error.is_rate_limited()) {
            // The request's own budget ran out (a wait cut at the deadline says so as a
            // timeout): not the endpoint's fault.
            attempt.cancelled().await;
            return Err(match error.kind() {
                ErrorKind::DeadlineExceeded => error,
                _ => Error::with_message(
                    ErrorKind::DeadlineExceeded,
                    format!("the request's deadline passed; last attempt: {error}"),
                ),
            });
        }
        let deployment = Arc::clone(attempt.deployment());
        let reserved = attempt.is_accounted();
        // Azure spilled it over and its spillover deployment failed too: that one is tried.
        if error.spilled()
            && let Some(to) = attempt.spilled_to()
            && let Some(index) = self.group().members.iter().position(|d| Arc::ptr_eq(d, to))
        {
            self.tried[index] = true;
        }
        attempt.failed(&error).await;
        let health = self.live.settings.health;
        if error.is_rate_limited() {
            let wait = health.rate_limit_wait(&error);
            let store = &self.live.store;
            if reserved {
                // Refused although the buckets admitted it: the store (shared with the other
                // replicas) learns what the upstream really admits, and keeps to it.
                if let Ok(learned) = store
                    .refused(&deployment.key, &deployment.quota_limits(), wait, now())
                    .await
                {
                    deployment.state.set_admits(learned);
                }
                deployment
                    .state
                    .quota
                    .empty_until(&deployment.limits(), wait, now());
            } else {
                // Tell the other replicas, through a shared store.
                let _ = store.cool_down(&deployment.key, wait, now()).await;
            }
        }
        // An ejection is shared as a cooldown of its length: the other replicas stop sending
        // there too, and come back through the same half-open path.
        if let router_core::Availability::Ejected(until) = deployment.state.availability(now())
            && self.live.store.is_shared()
        {
            let at = now();
            let _ = self
                .live
                .store
                .cool_down(&deployment.key, until.saturating_duration_since(at), at)
                .await;
        }
        if matches!(
            deployment.state.availability(now()),
            router_core::Availability::Disabled(_)
        ) {
            // Told once in the log (when the attempt recorded it), and probed back by the
            // router's prober. The other replicas would each find out with a failed request
            // of their own: they are told through the shared store, as a cooldown longer than
            // `probe_after`, which puts it out for them too until a probe (one between them)
            // finds it serving.
            if self.live.store.is_shared() {
                let _ = self
                    .live
                    .store
                    .cool_down(
                        &deployment.key,
                        DISABLED_SHARED_FOR.max(health.probe_after * 2),
                        now(),
                    )
                    .await;
            }
        }
        if !error.is_retryable() {
            return Err(error);
        }
        if late {
            // A 429 that came as the deadline passed: recorded above (it teaches the store like
            // any other), and no attempt may follow. It becomes the router's throttling with
            // when to retry, as it would have a moment earlier; an upstream 429 never reaches
            // the caller.
            self.last_error = Some(error);
            return Err(self.give_up());
        }
        tracing::debug!(endpoint = %deployment.endpoint, attempt = self.count, %error, "failing over");
        self.after_rate_limit = error.is_rate_limited();
        if self.after_rate_limit {
            // Its cooldown keeps it out until it has room again; then it may be tried again.
            if let Some(index) = self
                .group()
                .members
                .iter()
                .position(|d| Arc::ptr_eq(d, &deployment))
            {
                self.tried[index] = false;
            }
        }
        self.last_error = Some(error);
        Ok(())
    }

    /// The error when the deadline passed before any attempt was made: the request waited for
    /// room that came too late (a wake-up later than its turn, on a machine short of CPU). The
    /// router's throttling with when to retry, when something is still out of room; else the
    /// deadline's error. Never "no attempt left", which would say every deployment was tried.
    fn out_of_time(&mut self) -> Error {
        let nothing = self.soonest();
        if nothing.until.is_some() {
            return self.nothing_eligible(nothing);
        }
        self.leave_waitlist();
        Error::with_message(
            ErrorKind::DeadlineExceeded,
            format!(
                "the request's deadline passed before an attempt on `{}` could start",
                self.model
            ),
        )
    }

    /// The soonest recovery among all the group's deployments, tried or not, for this request.
    fn soonest(&self) -> NothingEligible {
        let slots: Vec<Slot<'_>> = self.group().members.iter().map(|d| d.slot()).collect();
        let ask = Ask {
            class: self.class,
            charge: self.charge(),
        };
        let pinned = self.pinned;
        router_core::soonest(&slots, |i| pinned.is_some_and(|p| p != i), ask, now())
    }

    /// The error when no attempt may follow.
    fn give_up(&mut self) -> Error {
        if self.last_error.as_ref().is_some_and(Error::is_rate_limited) {
            // Every deployment this request may still use, and when the soonest recovers.
            let nothing = self.soonest();
            return self.nothing_eligible(nothing);
        }
        self.leave_waitlist();
        self.last_error.take().unwrap_or_else(|| {
            Error::with_message(
                ErrorKind::Unavailable,
                format!("no attempt left for `{}`", self.model),
            )
        })
    }

    /// The caller's error when nothing can take the request in time: the last failure when it
    /// was the request's fault or the upstream's, else throttled with the soonest recovery.
    fn nothing_eligible(&mut self, nothing: NothingEligible) -> Error {
        self.leave_waitlist();
        let mut until = nothing.until;
        if let Some(error) = self.last_error.take() {
            if !error.is_rate_limited() {
                return error;
            }
            // An upstream's 429 never reaches the caller: the router throttles instead.
            until = until.or_else(|| Some(now() + error.retry_after().unwrap_or_default()));
        }
        let members = self.group().members.len();
        let Some(at) = until else {
            let why = match nothing.reason {
                Reason::Tried => "all tried",
                _ => "all disabled or tried",
            };
            return Error::with_message(
                ErrorKind::Unavailable,
                format!(
                    "no deployment of `{}` can serve the request ({why}; {members} configured)",
                    self.model
                ),
            );
        };
        let why = match nothing.reason {
            Reason::Quota => "out of quota",
            Reason::RateLimited => "cooling down after 429s",
            Reason::Ejected => "ejected after failures",
            Reason::Probing => "back from a 429, one request at a time",
            _ => "out of quota or cooling down",
        };
        Error::with_message(
            ErrorKind::Throttled,
            format!(
                "no deployment of `{}` has room for the request before its deadline (all {members} {why})",
                self.model
            ),
        )
        .with_retry_after(at.saturating_duration_since(now()))
    }
}

/// Reserves a request's `estimate` on `deployment` when it is accounted: `Ok(None)` when it is
/// not (or the store failed: the request must not fail for it), `Err` when the store refused
/// (and the deployment's view has learned until when).
async fn reserve(
    live: &RouterSnapshot,
    estimate: Option<Estimate>,
    deployment: &Deployment,
    at: std::time::Instant,
) -> Result<Option<Reservation>, ()> {
    let store = &live.store;
    let Some(estimate) = estimate
        .filter(|_| deployment.accounts(store.as_ref()))
        .map(|estimate| estimate.scaled(deployment.state.prompt_ratio()))
    else {
        return Ok(None);
    };
    let limits = deployment.quota_limits();
    match store
        .reserve(&deployment.key, &limits, estimate.charge, at)
        .await
    {
        Ok(Admission::Admitted {
            tokens_left,
            requests_left,
            learned,
            ticket,
        }) => {
            deployment.state.set_admits(learned);
            deployment
                .state
                .quota
                .update(tokens_left, requests_left, at);
            Ok(Some(Reservation::new(
                Arc::clone(store),
                Arc::clone(&deployment.key),
                limits,
                ticket,
                estimate,
                live.settings.accounting,
            )))
        }
        Ok(Admission::Denied {
            retry_after,
            cooling,
        }) => {
            // At least a millisecond, so that selecting again cannot pick it at once.
            let wait = retry_after.max(Duration::from_millis(1));
            if cooling {
                let mut rng = Rng::new();
                let health = &live.settings.health;
                deployment
                    .state
                    .cool_down_shared(wait, health, at, &mut rng);
                crate::prober::went_out(deployment);
            } else {
                deployment.state.quota.block(wait, at);
            }
            Err(())
        }
        Err(error) => {
            // A store that fails must not fail the request: route on the local view.
            tracing::debug!(key = %deployment.key, %error, "quota store unavailable; not reserving");
            Ok(None)
        }
    }
}

/// A request's fingerprint, behind a reference that does not name the operation's type.
pub(crate) trait Fingerprinted: Sync {
    fn fingerprint(&self) -> u64;
}

impl<O: Operation> Fingerprinted for O {
    fn fingerprint(&self) -> u64 {
        Operation::fingerprint(self)
    }
}

/// The furthest turn the router promises: a longer `Retry-After` is advice, not a booking.
const MAX_PROMISE: Duration = Duration::from_secs(60);

/// The time one more request takes to be admitted, at the rate `limits` free quota for a
/// request of `charge` (zero when nothing limits it).
fn interval(limits: &[router_core::Limits], charge: Charge) -> Duration {
    let (mut tokens, mut requests) = (0.0_f64, 0.0_f64);
    for l in limits {
        tokens += l.tpm.map_or(0.0, |tpm| tpm as f64 / 60.0);
        requests += l.rpm.map_or(0.0, |rpm| rpm as f64 / 60.0);
    }
    let by_tokens = if tokens > 0.0 {
        charge.tokens as f64 / tokens
    } else {
        0.0
    };
    let by_requests = if requests > 0.0 {
        charge.requests as f64 / requests
    } else {
        0.0
    };
    Duration::from_secs_f64(by_tokens.max(by_requests))
}

impl Drop for Path<'_> {
    fn drop(&mut self) {
        self.leave_waitlist();
    }
}
