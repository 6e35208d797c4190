//! Leased shares: a replica leases a slice of a window (tokens and requests) in one script
//! call and admits requests from it locally, so that a request costs no round trip.
//!
//! The bookkeeping here is plain data (no I/O, no clock of its own): [`KeySlices`] holds a
//! key's open slices, the slices closed and not yet given back, the settlements that came
//! after their slice closed, and the demand that sizes the next slice. The store
//! (`RedisStore`) runs the script and feeds the answer back.
//!
//! The bound: a slice is held in the shared log for its life plus a window, so whatever is
//! admitted from it is counted for a window after its admission; closed, it is given back and
//! keeps only what was spent, until a window after the last spend. The log's marks never sum
//! past the window's capacity, so replicas together admit no more than one store would.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use router_core::{Charge, Learned, Limits};

/// Tickets of admissions made from a slice carry this bit (the rest is the slice's ticket).
pub(crate) const SLICE_TICKET: u64 = 1 << 63;

/// At most this many settlements wait for the next call; past it the oldest give-backs are
/// dropped (the log then keeps more than was used: never less).
const MAX_PENDING: usize = 10_000;

/// How demand is measured: the rate over at least this long, blended with the last.
const DEMAND_SPAN: Duration = Duration::from_millis(250);

/// A key's slices on one replica.
#[derive(Debug, Default)]
pub(crate) struct KeySlices {
    pub(crate) state: Mutex<State>,
    /// One call at a time per key (requests that find no room wait for it, then look again).
    calling: AtomicBool,
    called: tokio::sync::Notify,
    /// Requests asking for room on this key now, admitted or not yet (the next slice is
    /// sized to serve them all).
    asking: AtomicUsize,
    /// A renewal ahead of need is running.
    pub(crate) ahead: AtomicBool,
}

impl KeySlices {
    /// The key's one call, if none is running.
    pub(crate) fn try_call(&self) -> Option<Calling<'_>> {
        // `then`, not `then_some`: a `Calling` made and dropped would end the running call.
        (!self.calling.swap(true, Ordering::AcqRel)).then(|| Calling(self))
    }

    /// Waits (at most `limit`) for the running call to end.
    pub(crate) async fn call_ended(&self, limit: Duration) {
        let ended = self.called.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if self.calling.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(limit, ended).await;
        }
    }

    /// One more request asks for room, until the guard drops.
    pub(crate) fn asking(&self) -> Asking<'_> {
        self.asking.fetch_add(1, Ordering::Relaxed);
        Asking(self)
    }

    /// Requests asking for room now.
    pub(crate) fn asking_now(&self) -> usize {
        self.asking.load(Ordering::Relaxed)
    }
}

/// A request asking for room on a key.
pub(crate) struct Asking<'a>(&'a KeySlices);

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.0.asking.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The running call: ends when dropped (a request dropped mid-call ends it too).
pub(crate) struct Calling<'a>(&'a KeySlices);

impl Drop for Calling<'_> {
    fn drop(&mut self) {
        self.0.calling.store(false, Ordering::Release);
        self.0.called.notify_waiters();
    }
}

/// What a call gives back and asks for.
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    pub(crate) returns: Vec<Return>,
    pub(crate) adjustments: Vec<Adjustment>,
    pub(crate) remaining: Option<(Option<u64>, Option<u64>, Duration)>,
    pub(crate) served: bool,
    /// Tokens and requests wanted, and needed at least (zero: none asked).
    pub(crate) wanted: (f64, f64),
    pub(crate) needed: (f64, f64),
}

/// A closed slice: what was spent from it, and when last.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Return {
    pub(crate) id: u64,
    pub(crate) tokens: f64,
    pub(crate) requests: f64,
    pub(crate) last_spend: Option<Instant>,
}

/// A settlement of an admission whose slice was already closed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Adjustment {
    pub(crate) id: u64,
    pub(crate) tokens_back: f64,
    pub(crate) requests_back: f64,
}

/// A slice being spent.
#[derive(Debug, Clone, Copy)]
struct Slice {
    id: u64,
    /// Granted (infinite: that dimension is not limited).
    tokens: f64,
    requests: f64,
    spent: (f64, f64),
    granted: Instant,
    last_spend: Option<Instant>,
}

impl Slice {
    fn room(&self) -> (f64, f64) {
        (self.tokens - self.spent.0, self.requests - self.spent.1)
    }

    fn fits(&self, charge: Charge) -> bool {
        let (t, r) = self.room();
        charge.tokens as f64 <= t + 1e-9 && charge.requests as f64 <= r + 1e-9
    }

    fn closed(&self) -> Return {
        Return {
            id: self.id,
            tokens: self.spent.0.max(0.0),
            requests: self.spent.1.max(0.0),
            last_spend: self.last_spend,
        }
    }
}

/// The answer of a call, as the store parsed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Answer {
    /// A slice of `tokens` and `requests` (infinite: not limited), `room` left in the window
    /// after it.
    Granted {
        id: u64,
        tokens: f64,
        requests: f64,
        room: (Option<f64>, Option<f64>),
        learned: Learned,
    },
    /// No room for what was needed before `wait`.
    NoRoom { wait: Duration },
    /// The key cools down for `wait`.
    Cooling { wait: Duration },
    /// Half-open: one request at a time across the replicas, so per request.
    HalfOpen,
    /// Nothing was asked.
    Nothing,
}

/// An admission from a slice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Spent {
    pub(crate) ticket: u64,
    pub(crate) tokens_left: Option<f64>,
    pub(crate) requests_left: Option<f64>,
    pub(crate) learned: Learned,
}

/// What a reservation finds locally.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Local {
    Admitted(Spent),
    /// Wait (cooling: the key's shared cooldown).
    Wait {
        wait: Duration,
        cooling: bool,
    },
    /// Ask per request (half-open).
    Direct,
    /// No room in any slice: a call is needed.
    Call,
}

/// A key's slices and what waits to be said to the store.
#[derive(Debug, Default)]
pub(crate) struct State {
    open: VecDeque<Slice>,
    returns: Vec<Return>,
    adjustments: Vec<Adjustment>,
    remaining: Option<(Option<u64>, Option<u64>, Duration)>,
    served: bool,
    /// Demand: asked since `since`, and the blended rate (tokens, requests per second).
    asked: (f64, f64),
    since: Option<Instant>,
    rate: (f64, f64),
    last_charge: Charge,
    no_room_until: Option<Instant>,
    cooling_until: Option<Instant>,
    direct_until: Option<Instant>,
    last_call: Option<Instant>,
    room: (Option<f64>, Option<f64>),
    learned: Learned,
    last_grant: (f64, f64),
    /// The key's limits and slice life, as last asked (for the calls made off a request).
    limits: Option<(Limits, Duration)>,
}

impl State {
    /// Counts `charge` in the demand (under `limits`, slices living `life`).
    pub(crate) fn asked(&mut self, charge: Charge, limits: &Limits, life: Duration, now: Instant) {
        self.last_charge = charge;
        self.limits = Some((*limits, life));
        self.asked.0 += charge.tokens as f64;
        self.asked.1 += charge.requests as f64;
        let since = *self.since.get_or_insert(now);
        let span = now.saturating_duration_since(since);
        if span >= DEMAND_SPAN {
            let secs = span.as_secs_f64();
            let fresh = (self.asked.0 / secs, self.asked.1 / secs);
            self.rate = if self.rate == (0.0, 0.0) {
                fresh
            } else {
                (
                    f64::midpoint(self.rate.0, fresh.0),
                    f64::midpoint(self.rate.1, fresh.1),
                )
            };
            self.asked = (0.0, 0.0);
            self.since = Some(now);
        }
    }

    /// Closes the slices whose life has ended.
    fn close_expired(&mut self, now: Instant, life: Duration) {
        while self
            .open
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.granted) >= life)
        {
            if let Some(slice) = self.open.pop_front() {
                self.returns.push(slice.closed());
            }
        }
    }

    /// Closes every open slice (a cooldown began).
    pub(crate) fn close_all(&mut self) {
        for slice in self.open.drain(..) {
            self.returns.push(slice.closed());
        }
    }

    /// Admits `charge` from an open slice if one has room, else says what to do.
    pub(crate) fn spend(&mut self, charge: Charge, now: Instant, life: Duration) -> Local {
        if self.direct_until.is_some_and(|until| until > now) {
            return Local::Direct;
        }
        if let Some(until) = self.cooling_until.filter(|until| *until > now) {
            return Local::Wait {
                wait: until - now,
                cooling: true,
            };
        }
        self.close_expired(now, life);
        let (room, learned) = (self.room, self.learned);
        if let Some(slice) = self.open.iter_mut().find(|s| s.fits(charge)) {
            slice.spent.0 += charge.tokens as f64;
            slice.spent.1 += charge.requests as f64;
            slice.last_spend = Some(now);
            let id = slice.id;
            let left = self.open_room();
            let level = |shared: Option<f64>, mine: f64| shared.map(|s| s + mine);
            return Local::Admitted(Spent {
                ticket: SLICE_TICKET | id,
                tokens_left: level(room.0, left.0).filter(|v| v.is_finite()),
                requests_left: level(room.1, left.1).filter(|v| v.is_finite()),
                learned,
            });
        }
        if let Some(until) = self.no_room_until.filter(|until| *until > now) {
            return Local::Wait {
                wait: until - now,
                cooling: false,
            };
        }
        Local::Call
    }

    /// Whether to renew before the open slices run out: a third or less of the last grant is
    /// left, or the newest slice has lived two thirds of its life.
    pub(crate) fn renew_ahead(&self, now: Instant, life: Duration) -> bool {
        if self.no_room_until.is_some_and(|until| until > now) {
            return false;
        }
        let Some(newest) = self.open.back() else {
            return true;
        };
        let left = self.open_room();
        let low = |left: f64, granted: f64| granted.is_finite() && left * 3.0 <= granted;
        low(left.0, self.last_grant.0)
            || low(left.1, self.last_grant.1)
            || now.saturating_duration_since(newest.granted) * 3 >= life * 2
    }

    /// A settlement of an admission from slice `id`: counted in the slice while it is open,
    /// else kept for the next call.
    pub(crate) fn settle(&mut self, id: u64, tokens_back: f64, requests_back: f64) {
        if let Some(slice) = self.open.iter_mut().find(|s| s.id == id) {
            slice.spent.0 = (slice.spent.0 - tokens_back).max(0.0);
            slice.spent.1 = (slice.spent.1 - requests_back).max(0.0);
            return;
        }
        if self.adjustments.len() >= MAX_PENDING {
            // Drop the oldest give-back (the log keeps more than was used); a take is kept.
            if let Some(at) = self
                .adjustments
                .iter()
                .position(|a| a.tokens_back >= 0.0 && a.requests_back >= 0.0)
            {
                self.adjustments.remove(at);
            } else {
                return;
            }
        }
        self.adjustments.push(Adjustment {
            id,
            tokens_back,
            requests_back,
        });
    }

    /// What the upstream said (kept for the next call) and whether it served.
    pub(crate) fn heard(
        &mut self,
        remaining: Option<(Option<u64>, Option<u64>, Duration)>,
        served: bool,
    ) {
        if remaining.is_some() {
            self.remaining = remaining;
        }
        self.served |= served;
    }

    /// Whether anything waits to be said to the store, or a slice's life has ended.
    pub(crate) fn pending(&self, now: Instant, life: Duration) -> bool {
        !self.returns.is_empty()
            || !self.adjustments.is_empty()
            || self
                .open
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.granted) >= life)
    }

    /// The room left in the open slices (infinite where a dimension is not limited).
    fn open_room(&self) -> (f64, f64) {
        self.open.iter().fold((0.0, 0.0), |(t, r), s| {
            let (a, b) = s.room();
            (t + a, r + b)
        })
    }

    /// Closes the open slices nobody has spent from for a while, so that their room goes back
    /// to the other replicas at the next call rather than at the end of their life (a burst
    /// that ended leaves its last slice unspent). A while: a quarter of a life, or four of
    /// the gaps between this key's requests when they come slower (a slow, steady key keeps
    /// its slice). Called when no request on this replica is asking for room on the key.
    pub(crate) fn close_idle(&mut self, now: Instant, life: Duration) {
        let gap = if self.rate.1 > 0.0 {
            Duration::from_secs_f64((4.0 / self.rate.1).min(life.as_secs_f64()))
        } else {
            Duration::ZERO
        };
        let idle = (life / 4).max(gap);
        for slice in std::mem::take(&mut self.open) {
            let active = slice.last_spend.unwrap_or(slice.granted);
            if now.saturating_duration_since(active) >= idle {
                self.returns.push(slice.closed());
            } else {
                self.open.push_back(slice);
            }
        }
    }

    /// When the last call was made.
    pub(crate) fn last_call(&self) -> Option<Instant> {
        self.last_call
    }

    /// Takes what the next call says: closes the expired slices and those with no room for
    /// `need`, and sizes the slice asked for by demand (`need` zero: none is asked).
    pub(crate) fn outgoing(
        &mut self,
        need: Charge,
        waiting: usize,
        limits: &Limits,
        now: Instant,
        life: Duration,
    ) -> Outgoing {
        self.close_expired(now, life);
        if need.tokens > 0 || need.requests > 0 {
            // A slice with no room for the request that needs the call is given back now.
            for slice in std::mem::take(&mut self.open) {
                if slice.fits(need) {
                    self.open.push_back(slice);
                } else {
                    self.returns.push(slice.closed());
                }
            }
        }
        self.last_call = Some(now);
        let wanted = if need.tokens > 0 || need.requests > 0 {
            let open = self.open_room();
            wanted(
                self.rate,
                need,
                waiting,
                open,
                &self.learned.apply(limits),
                life,
            )
        } else {
            (0.0, 0.0)
        };
        Outgoing {
            returns: std::mem::take(&mut self.returns),
            adjustments: std::mem::take(&mut self.adjustments),
            remaining: self.remaining.take(),
            served: std::mem::take(&mut self.served),
            wanted,
            needed: (need.tokens as f64, need.requests as f64),
        }
    }

    /// The call failed: what it was to say waits for the next.
    pub(crate) fn restore(&mut self, outgoing: Outgoing) {
        let mut returns = outgoing.returns;
        returns.append(&mut self.returns);
        self.returns = returns;
        let mut adjustments = outgoing.adjustments;
        adjustments.append(&mut self.adjustments);
        adjustments.truncate(MAX_PENDING);
        self.adjustments = adjustments;
        if self.remaining.is_none() {
            self.remaining = outgoing.remaining;
        }
        self.served |= outgoing.served;
    }

    /// The store answered a call made at `at` that asked for `wanted`.
    pub(crate) fn answered(
        &mut self,
        answer: Answer,
        wanted: (f64, f64),
        at: Instant,
        life: Duration,
    ) {
        match answer {
            Answer::Granted {
                id,
                tokens,
                requests,
                room,
                learned,
            } => {
                self.open.push_back(Slice {
                    id,
                    tokens,
                    requests,
                    spent: (0.0, 0.0),
                    // Its life counts from before the call: the store counts it from later.
                    granted: at,
                    last_spend: None,
                });
                self.last_grant = (tokens, requests);
                self.room = room;
                self.learned = learned;
                // Less than wanted: the window is the limit, and what frees in it is asked
                // for again no sooner than half a life (two calls a life under overload, not
                // one a request).
                let short = tokens + 1e-9 < wanted.0 || requests + 1e-9 < wanted.1;
                self.no_room_until = short.then(|| at + life / 2);
                self.cooling_until = None;
                self.direct_until = None;
            }
            Answer::NoRoom { wait } => {
                // Asked again no sooner than half a slice's life, as above.
                self.no_room_until = Some(at + wait.max(life / 2));
            }
            Answer::Cooling { wait } => {
                self.cooling_until = Some(at + wait);
                self.close_all();
            }
            Answer::HalfOpen => {
                self.direct_until = Some(at + life);
                self.close_all();
            }
            Answer::Nothing => {}
        }
    }

    /// The key cools down for `wait` (a refusal or a shared cooldown this replica made).
    pub(crate) fn cool(&mut self, wait: Duration, now: Instant) {
        self.cooling_until = Some(self.cooling_until.map_or(now + wait, |u| u.max(now + wait)));
        self.close_all();
    }

    /// A probe found the deployment serving: its cooldown ends.
    pub(crate) fn recovered(&mut self) {
        self.cooling_until = None;
    }

    /// The key's limits and slice life, as last asked.
    pub(crate) fn limits(&self) -> Option<(Limits, Duration)> {
        self.limits
    }

    /// The next renewal's need: the last request's charge.
    pub(crate) fn last_charge(&self) -> Charge {
        self.last_charge
    }
}

/// The slice to ask for: the demand over a life, at least four of `need`, at most three
/// lives' worth of the window (so that no replica holds much of a window unspent); but room
/// at once for the request and the `waiting` ones like it (a burst spends its slice as soon as
/// it is granted), beyond what the `open` slices still hold for them, up to the whole window.
fn wanted(
    rate: (f64, f64),
    need: Charge,
    waiting: usize,
    open: (f64, f64),
    limits: &Limits,
    life: Duration,
) -> (f64, f64) {
    let window = limits.window.as_secs_f64().max(1e-3);
    let part = (3.0 * life.as_secs_f64() / window).min(1.0);
    let asking = (waiting + 1) as f64;
    let size = |rate: f64, need: u64, open: f64, per_minute: Option<u64>| {
        let need = need as f64;
        let want = (rate * life.as_secs_f64()).max(need * 4.0);
        // Those asking now that the open slices cannot serve (a renewal ahead of need is
        // made while the open slice still serves the requests waiting for it).
        let burst = need * asking - open;
        match per_minute {
            Some(limit) => {
                let cap = limit as f64 / 60.0 * window;
                want.min(cap * part).max(burst).min(cap).max(need)
            }
            None => want.max(burst),
        }
    };
    (
        size(rate.0, need.tokens, open.0, limits.tpm),
        size(
            rate.1,
            need.requests,
            open.1,
            limits.requests().and(limits.rpm),
        ),
    )
}

/// A slice's life for a window: the configured life, at most a twentieth of the window.
///
/// What a replica holds and has not spent yet is room no other replica can use: about half a
/// life's demand per replica, so about `life / 2W` of the window under full demand. A
/// twentieth keeps that near 2.5 % (for a 10 s window, half-second slices).
pub(crate) fn life(configured: Duration, limits: &Limits) -> Duration {
    configured
        .min(limits.window / 20)
        .max(Duration::from_millis(10))
}

/// A window must hold at least this many of a charge for it to go through slices: a slice
/// then holds several requests, and what replicas hold unspent at once is a small part of the
/// window (small limits are kept exactly, one call a request).
pub(crate) const MIN_CHARGES_PER_WINDOW: f64 = 64.0;

/// Whether `charge` under `limits` goes through slices: a window (not provisioned
/// throughput), a charge of something, and a window that holds [`MIN_CHARGES_PER_WINDOW`]
/// of it.
pub(crate) fn sliced(limits: &Limits, charge: Charge) -> bool {
    if limits.is_provisioned() || (charge.tokens == 0 && charge.requests == 0) {
        return false;
    }
    let window = limits.window.as_secs_f64();
    let small = |cost: u64, per_minute: Option<u64>| {
        per_minute.is_none_or(|limit| {
            cost as f64 * MIN_CHARGES_PER_WINDOW <= limit as f64 / 60.0 * window
        })
    };
    small(charge.tokens, limits.tpm) && small(charge.requests, limits.requests().and(limits.rpm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            tpm: Some(60_000),
            rpm: Some(600),
            window: Duration::from_secs(10),
            ..Limits::default()
        }
    }

    fn charge(tokens: u64) -> Charge {
        Charge {
            tokens,
            requests: 1,
        }
    }

    fn granted(state: &mut State, id: u64, tokens: f64, requests: f64, at: Instant) {
        state.answered(
            Answer::Granted {
                id,
                tokens,
                requests,
                room: (Some(0.0), Some(0.0)),
                learned: Learned::FULL,
            },
            (tokens, requests),
            at,
            Duration::from_secs(1),
        );
    }

    #[test]
    fn spends_from_a_slice_until_it_is_short_then_asks_for_a_call() {
        let t0 = Instant::now();
        let life = Duration::from_secs(1);
        let mut state = State::default();
        assert_eq!(state.spend(charge(100), t0, life), Local::Call);
        granted(&mut state, 7, 250.0, 10.0, t0);
        let Local::Admitted(spent) = state.spend(charge(100), t0, life) else {
            panic!("room for two");
        };
        assert_eq!(spent.ticket, SLICE_TICKET | 7);
        assert!(matches!(
            state.spend(charge(100), t0, life),
            Local::Admitted(_)
        ));
        assert_eq!(state.spend(charge(100), t0, life), Local::Call);
        // A settlement while the slice is open gives back into it.
        state.settle(7, 60.0, 0.0);
        assert!(matches!(
            state.spend(charge(100), t0, life),
            Local::Admitted(_)
        ));
    }

    #[test]
    fn a_slice_closes_at_the_end_of_its_life_and_is_given_back_with_what_was_spent() {
        let t0 = Instant::now();
        let life = Duration::from_secs(1);
        let mut state = State::default();
        granted(&mut state, 3, 1_000.0, 10.0, t0);
        let at = t0 + Duration::from_millis(300);
        assert!(matches!(
            state.spend(charge(200), at, life),
            Local::Admitted(_)
        ));
        let later = t0 + life;
        assert!(state.pending(later, life));
        assert_eq!(state.spend(charge(200), later, life), Local::Call);
        // Settled after its slice closed: carried by the next call.
        state.settle(3, 150.0, 0.0);
        let out = state.outgoing(charge(200), 0, &limits(), later, life);
        assert_eq!(
            out.returns,
            vec![Return {
                id: 3,
                tokens: 200.0,
                requests: 1.0,
                last_spend: Some(at)
            }]
        );
        assert_eq!(
            out.adjustments,
            vec![Adjustment {
                id: 3,
                tokens_back: 150.0,
                requests_back: 0.0
            }]
        );
        assert!(out.needed == (200.0, 1.0));
        assert!(!state.pending(later, life));
    }

    #[test]
    fn what_a_failed_call_carried_waits_for_the_next() {
        let t0 = Instant::now();
        let life = Duration::from_secs(1);
        let mut state = State::default();
        granted(&mut state, 1, 100.0, 1.0, t0);
        state.settle(9, 5.0, 0.0);
        let out = state.outgoing(charge(10), 0, &limits(), t0 + life, life);
        assert_eq!((out.returns.len(), out.adjustments.len()), (1, 1));
        state.restore(out);
        let again = state.outgoing(Charge::default(), 0, &limits(), t0 + life, life);
        assert_eq!((again.returns.len(), again.adjustments.len()), (1, 1));
        assert_eq!(again.wanted, (0.0, 0.0));
    }

    #[test]
    fn no_room_and_cooling_answer_locally_until_they_end() {
        let t0 = Instant::now();
        let life = Duration::from_secs(1);
        let mut state = State::default();
        state.answered(
            Answer::NoRoom {
                wait: Duration::from_millis(10),
            },
            (100.0, 1.0),
            t0,
            life,
        );
        // At least half a life before asking again.
        assert_eq!(
            state.spend(charge(1), t0, life),
            Local::Wait {
                wait: life / 2,
                cooling: false
            }
        );
        assert_eq!(state.spend(charge(1), t0 + life / 2, life), Local::Call);
        granted(&mut state, 2, 100.0, 5.0, t0 + life / 2);
        state.cool(Duration::from_secs(2), t0 + life / 2);
        assert!(matches!(
            state.spend(charge(1), t0 + life * 3 / 4, life),
            Local::Wait { cooling: true, .. }
        ));
        // The open slice was closed, unspent, to be given back.
        let out = state.outgoing(Charge::default(), 0, &limits(), t0 + life * 3 / 4, life);
        assert_eq!(out.returns[0].last_spend, None);
    }

    #[test]
    fn slices_follow_demand_within_a_part_of_the_window() {
        let t0 = Instant::now();
        let life = Duration::from_secs(1);
        let mut state = State::default();
        // 40 requests of 100 tokens over a second: 4,000 tokens a second.
        for i in 0..=40 {
            state.asked(
                charge(100),
                &limits(),
                life,
                t0 + Duration::from_millis(25 * i),
            );
        }
        let out = state.outgoing(charge(100), 0, &limits(), t0 + life, life);
        // 1.5 lives of demand: ~6,000 tokens, under the cap of 3 lives of a 10 s window of
        // 10,000 tokens (3,000)... so the cap holds it.
        assert!((out.wanted.0 - 3_000.0).abs() < 1e-6, "{:?}", out.wanted);
        // A quiet key asks for four requests' worth.
        let mut quiet = State::default();
        quiet.asked(charge(100), &limits(), life, t0);
        let out = quiet.outgoing(charge(100), 0, &limits(), t0, life);
        assert!((out.wanted.0 - 400.0).abs() < 1e-6, "{:?}", out.wanted);
        // Forty requests waiting for the call: room for all of them at once, past the part a
        // replica holds for its demand (3,000 tokens), up to the window (10,000).
        let out = quiet.outgoing(charge(100), 39, &limits(), t0, life);
        assert!((out.wanted.0 - 4_000.0).abs() < 1e-6, "{:?}", out.wanted);
        let out = quiet.outgoing(charge(100), 500, &limits(), t0, life);
        assert!((out.wanted.0 - 10_000.0).abs() < 1e-6, "{:?}", out.wanted);
    }

    #[test]
    fn a_renewal_asks_only_for_those_the_open_slices_cannot_serve() {
        let t0 = Instant::now();
        let life = Duration::from_secs(1);
        let mut state = State::default();
        state.asked(charge(100), &limits(), life, t0);
        granted(&mut state, 1, 3_600.0, 36.0, t0);
        for _ in 0..24 {
            assert!(matches!(
                state.spend(charge(100), t0, life),
                Local::Admitted(_)
            ));
        }
        // Thirteen asking, twelve left open: a renewal ahead asks for the demand's floor (four
        // requests), not for twelve more (they would sit unspent while others wait).
        let out = state.outgoing(charge(100), 12, &limits(), t0, life);
        assert!((out.wanted.1 - 4.0).abs() < 1e-9, "{:?}", out.wanted);
        // Twenty more waiting besides the one calling: the nine the open slice cannot serve.
        let out = state.outgoing(charge(100), 20, &limits(), t0, life);
        assert!((out.wanted.1 - 9.0).abs() < 1e-9, "{:?}", out.wanted);
    }

    #[test]
    fn a_slice_nobody_spends_from_goes_back_before_its_life_ends() {
        let t0 = Instant::now();
        let life = Duration::from_secs(1);
        let mut state = State::default();
        granted(&mut state, 1, 1_000.0, 10.0, t0);
        let spent = t0 + Duration::from_millis(100);
        assert!(matches!(
            state.spend(charge(100), spent, life),
            Local::Admitted(_)
        ));
        // Spent from a tenth of a life ago: kept.
        state.close_idle(spent + life / 10, life);
        assert!(!state.pending(spent + life / 10, life));
        // Idle for a quarter of a life: closed, with what was spent, well before its life ends.
        let idle = spent + life / 4;
        state.close_idle(idle, life);
        assert!(state.pending(idle, life));
        let out = state.outgoing(Charge::default(), 0, &limits(), idle, life);
        assert_eq!(
            out.returns,
            vec![Return {
                id: 1,
                tokens: 100.0,
                requests: 1.0,
                last_spend: Some(spent)
            }]
        );
        // A slow, steady key (a request every 200 ms) keeps its slice between requests.
        let mut slow = State::default();
        for i in 0..=10 {
            slow.asked(
                charge(100),
                &limits(),
                life,
                t0 + Duration::from_millis(200 * i),
            );
        }
        let at = t0 + Duration::from_secs(2);
        granted(&mut slow, 2, 1_000.0, 10.0, at);
        slow.close_idle(at + Duration::from_millis(300), life);
        assert!(!slow.pending(at + Duration::from_millis(300), life));
    }

    #[test]
    fn large_charges_and_provisioned_quotas_go_per_request() {
        // 10,000 tokens and 100 requests a window.
        assert!(sliced(&limits(), charge(156)));
        assert!(!sliced(&limits(), charge(157)));
        let few = Limits {
            rpm: Some(60),
            ..limits()
        };
        assert!(
            !sliced(&few, charge(1)),
            "ten requests a window: kept exactly"
        );
        assert!(!sliced(&limits(), Charge::default()));
        let ptu = Limits {
            model: router_core::QuotaModel::Provisioned,
            ..limits()
        };
        assert!(!sliced(&ptu, charge(10)));
        assert_eq!(
            life(
                Duration::from_secs(1),
                &Limits {
                    window: Duration::from_secs(1),
                    ..limits()
                }
            ),
            Duration::from_millis(50),
            "a twentieth of a 1 s window"
        );
        assert_eq!(
            life(Duration::from_secs(1), &limits()),
            Duration::from_millis(500)
        );
        assert_eq!(
            life(
                Duration::from_secs(1),
                &Limits {
                    window: Duration::from_secs(60),
                    ..limits()
                }
            ),
            Duration::from_secs(1),
            "the configured life when the window is long"
        );
    }
}
