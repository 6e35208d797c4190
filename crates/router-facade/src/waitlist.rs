//! The order in which waiting requests get their turn: the router's one waiting mechanism.
//!
//! A request waits when nothing can take it yet: no deployment of its model group has room or
//! is out of its cooldown, or a router-side limit (its caller's, its group's) has no room.
//! Each thing waited for is a *lane*: the model group's name for quotas and cooldowns, the
//! scope's name (`caller:team-a`) for router-side limits, so that one caller over its limit
//! never holds up another. Within a lane, waiters are served one at a time in order of
//! (priority class, arrival): only the first may try; when it leaves (served, failed, or
//! dropped), the others are woken to see who is first. A new request queues behind the
//! waiters of its lane rather than overtaking them. `max` bounds the waiters of all lanes.
//!
//! A request refused because its turn was too far off is told when to come back (its
//! `Retry-After`), and that is a *promise*: the lane keeps it (with the request's
//! fingerprint), later refusals are told to come back after it, and the same request arriving
//! when it is due ([`Waitlist::claim`]) takes the place it had when it was refused, ahead of
//! those who came after. So a client that comes back when told finds its turn instead of
//! queueing behind everyone who arrived meanwhile. Requests count the promises due before
//! their turn ([`Waitlist::promised`]) and leave a due promise's turn to its client for a
//! moment ([`Waitlist::held`], [`PROMISE_HOLD`]), but only as far as the lane's clients are
//! seen to come back on time: where they do not, nothing idles for a client that may not come
//! back. A promise nobody claims lapses [`PROMISE_GRACE`] after it was due.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::affinity::PLACES;

/// A place in one lane of the waitlist.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Place {
    lane: Arc<str>,
    priority: u8,
    seq: u64,
}

impl Place {
    /// The lane it waits in.
    pub(crate) fn lane(&self) -> &str {
        &self.lane
    }

    /// Its order in the lane: (priority class, arrival).
    pub(crate) fn order(&self) -> (u8, u64) {
        (self.priority, self.seq)
    }
}

impl Claim {
    /// The order the refused request had, and has again.
    pub(crate) fn order(self) -> (u8, u64) {
        (self.priority, self.seq)
    }
}

#[derive(Debug, Default)]
struct Queues {
    lanes: HashMap<Arc<str>, BTreeSet<(u8, u64)>>,
    total: usize,
    /// Where each waiter's cache key was served (places, [`crate::affinity::place`]), by
    /// arrival: whom a turn may be lent to.
    warm: HashMap<u64, [Option<u64>; PLACES]>,
    /// The turn lent in a lane, if any.
    lent: HashMap<Arc<str>, Lent>,
    /// Promised turns by lane, soonest first.
    promises: HashMap<Arc<str>, VecDeque<Promise>>,
    /// By lane, for first promises and for promises made to requests that came on one
    /// already: the share of recent ones whose client came back for them on time (a moving
    /// average over about the last ten, from [`HOLD_WHEN_RETURNS`]).
    returns: HashMap<Arc<str>, [f64; 2]>,
}

impl Queues {
    /// Counts `lane`'s promises whose hold ended by `now` unclaimed as clients that did not
    /// come back (in time), and drops those that lapsed.
    fn lapse(&mut self, lane: &Arc<str>, now: Instant) {
        let Some(queue) = self.promises.get_mut(lane) else {
            return;
        };
        let mut missed = Vec::new();
        for promise in queue.iter_mut() {
            if !promise.missed && promise.due + PROMISE_HOLD <= now {
                promise.missed = true;
                missed.push(promise.again);
            }
        }
        queue.retain(|p| p.due + PROMISE_GRACE >= now);
        for again in missed {
            self.returned(lane, again, false);
        }
    }

    fn returned(&mut self, lane: &Arc<str>, again: bool, came: bool) {
        let rates = self
            .returns
            .entry(Arc::clone(lane))
            .or_insert([HOLD_WHEN_RETURNS; 2]);
        let rate = &mut rates[usize::from(again)];
        *rate += RETURNS_WEIGHT * (f64::from(u8::from(came)) - *rate);
    }

    /// The share of `lane`'s promises of `promise`'s kind whose clients come back for them on
    /// time.
    fn return_rate(&self, lane: &str, promise: &Promise) -> f64 {
        self.returns
            .get(lane)
            .map_or(HOLD_WHEN_RETURNS, |rates| rates[usize::from(promise.again)])
    }

    /// Whether `promise` holds its turn: clients of its kind are seen to come back.
    fn holds(&self, lane: &str, promise: &Promise) -> bool {
        self.return_rate(lane, promise) >= HOLD_WHEN_RETURNS
    }
}

/// The weight of each promise's outcome (claimed or lapsed) in its lane's return rate.
const RETURNS_WEIGHT: f64 = 0.1;

/// The return rate under which a lane's promises stop holding their turns: capacity is kept
/// only for clients that are seen to come back for it.
const HOLD_WHEN_RETURNS: f64 = 0.5;

/// How long after it was due a promise may still be claimed (a client that rounds its
/// `Retry-After` up to whole seconds comes up to a second late).
pub(crate) const PROMISE_GRACE: Duration = Duration::from_millis(1500);

/// How early a request may claim a promise.
const PROMISE_EARLY: Duration = Duration::from_millis(250);

/// How early a claim still counts as a client coming back when told (its lane's return
/// rate): one that comes back on time is at most a network's delay off its `Retry-After`.
const ON_TIME_EARLY: Duration = Duration::from_millis(50);

/// How long a promise due and not yet claimed holds its turn against the requests behind it
/// (from [`PROMISE_EARLY`] before it is due): long enough for a client that comes back when
/// told (`retry-after-ms`), short enough that a client that does not come back idles little.
pub(crate) const PROMISE_HOLD: Duration = Duration::from_millis(100);

/// A turn promised to a refused request.
#[derive(Debug, Clone, Copy)]
struct Promise {
    due: Instant,
    priority: u8,
    /// Its order when refused.
    seq: u64,
    /// The refused request's fingerprint.
    fingerprint: u64,
    /// Its hold ended with nobody back for it (counted in its lane's return rate).
    missed: bool,
    /// Made to a request that came on a promise already: a client that retries once does
    /// not come back for it, one that retries again does; its kind has its own return rate.
    again: bool,
}

/// A turn lent: the first waiter of a lane could take room only at a deployment that never
/// served its cache key, and a waiter close behind it has that deployment among its key's
/// places; that waiter may take the room instead.
#[derive(Debug, Clone, Copy)]
struct Lent {
    /// The borrower's arrival.
    seq: u64,
    /// The deployment the turn is for.
    place: u64,
}

/// A promised turn claimed: the order the refused request had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    priority: u8,
    seq: u64,
}

/// The router's waitlist.
#[derive(Debug, Default)]
pub(crate) struct Waitlist {
    waiting: Mutex<Queues>,
    /// Waiters in all lanes, readable without the lock: while nobody waits (the common case),
    /// a request checks the waitlist without taking it.
    count: AtomicUsize,
    /// Promises in all lanes, readable without the lock.
    promised: AtomicUsize,
    seq: AtomicU64,
    turn: Notify,
}

impl Waitlist {
    fn waiting(&self) -> MutexGuard<'_, Queues> {
        // Held for a map operation, never across an await.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether anyone waits in `lane`.
    pub(crate) fn is_busy(&self, lane: &str) -> bool {
        // Relaxed: a waiter that joins a moment later is behind this request anyway.
        self.count.load(Ordering::Relaxed) > 0 && self.waiting().lanes.contains_key(lane)
    }

    /// Waiters in every lane.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting().total
    }

    /// Waiters in every lane, without the lock (a moment's view).
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Waiters by lane and priority class (lanes in name order, classes in order).
    pub(crate) fn by_lane(&self) -> Vec<(String, u8, usize)> {
        if self.count() == 0 {
            return Vec::new();
        }
        let queues = self.waiting();
        let mut out = Vec::new();
        for (lane, set) in &queues.lanes {
            let mut classes: Vec<(u8, usize)> = Vec::new();
            for (priority, _) in set {
                match classes.last_mut() {
                    Some((p, n)) if p == priority => *n += 1,
                    _ => classes.push((*priority, 1)),
                }
            }
            out.extend(classes.into_iter().map(|(p, n)| (lane.to_string(), p, n)));
        }
        out.sort();
        out
    }

    /// A place at the back of `priority`'s class in `lane` (or, with a claimed promise, where
    /// the refused request stood); `None` when `max` are waiting already, in all lanes
    /// together.
    pub(crate) fn join(
        &self,
        lane: &str,
        priority: u8,
        max: usize,
        claim: Option<Claim>,
    ) -> Option<Place> {
        let mut waiting = self.waiting();
        if waiting.total >= max {
            return None;
        }
        let (priority, seq) = match claim {
            Some(claim) => (claim.priority.min(priority), claim.seq),
            None => (priority, self.seq.fetch_add(1, Ordering::Relaxed)),
        };
        let lane: Arc<str> = match waiting.lanes.get_key_value(lane) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(lane),
        };
        waiting
            .lanes
            .entry(Arc::clone(&lane))
            .or_default()
            .insert((priority, seq));
        waiting.total += 1;
        self.count.store(waiting.total, Ordering::Relaxed);
        Some(Place {
            lane,
            priority,
            seq,
        })
    }

    /// Gives the place up and wakes the others to see who is first now.
    #[expect(clippy::needless_pass_by_value, reason = "leaving uses the place up")]
    pub(crate) fn leave(&self, place: Place) {
        let mut waiting = self.waiting();
        let Queues {
            lanes,
            total,
            warm,
            lent,
            ..
        } = &mut *waiting;
        warm.remove(&place.seq);
        if lent.get(&place.lane).is_some_and(|l| l.seq == place.seq) {
            lent.remove(&place.lane);
        }
        if let Some(set) = lanes.get_mut(&place.lane) {
            if set.remove(&(place.priority, place.seq)) {
                *total -= 1;
            }
            if set.is_empty() {
                lanes.remove(&place.lane);
            }
        }
        self.count.store(*total, Ordering::Relaxed);
        drop(waiting);
        self.turn.notify_waiters();
    }

    /// How many wait ahead of a request of class `priority` in `lane`: ahead of `place` when
    /// it has one there, else everyone a newcomer of that class would queue behind.
    pub(crate) fn ahead(&self, lane: &str, priority: u8, place: Option<&Place>) -> usize {
        if self.count.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let waiting = self.waiting();
        let Some(set) = waiting.lanes.get(lane) else {
            return 0;
        };
        match place.filter(|p| &*p.lane == lane) {
            Some(place) => set.range(..(place.priority, place.seq)).count(),
            None => set.range(..=(priority, u64::MAX)).count(),
        }
    }

    /// Notes where the cache key of the request waiting at `place` was served (places, the
    /// last first), so that a turn at one of them may be lent to it.
    pub(crate) fn mark_warm(&self, place: &Place, warm: [Option<u64>; PLACES]) {
        if warm.iter().any(Option::is_some) {
            self.waiting().warm.insert(place.seq, warm);
        }
    }

    /// Lends the turn of `head`, first in its lane, for one pick at the deployment `at` to the
    /// first of the next `within` waiters of its class whose cache key `at` served; whether
    /// one was found. One lend at a time in a lane.
    pub(crate) fn lend(&self, head: &Place, at: u64, within: usize) -> bool {
        let mut waiting = self.waiting();
        let queues = &mut *waiting;
        if queues.lent.contains_key(&head.lane) {
            return false;
        }
        let Some(set) = queues.lanes.get(&head.lane) else {
            return false;
        };
        if set.first() != Some(&(head.priority, head.seq)) {
            return false;
        }
        let borrower = set
            .range((head.priority, head.seq)..)
            .skip(1)
            .take(within)
            .take_while(|(priority, _)| *priority == head.priority)
            .map(|(_, seq)| *seq)
            .find(|seq| {
                queues
                    .warm
                    .get(seq)
                    .is_some_and(|warm| warm.contains(&Some(at)))
            });
        let Some(seq) = borrower else {
            return false;
        };
        queues
            .lent
            .insert(Arc::clone(&head.lane), Lent { seq, place: at });
        drop(waiting);
        self.turn.notify_waiters();
        true
    }

    /// The deployment whose turn is lent to the request waiting at `place`, if any.
    pub(crate) fn lent_to(&self, place: &Place) -> Option<u64> {
        self.waiting()
            .lent
            .get(&place.lane)
            .filter(|l| l.seq == place.seq)
            .map(|l| l.place)
    }

    /// Ends `lane`'s lend, if any: its borrower could not use it, or nobody came for it.
    pub(crate) fn end_lend(&self, lane: &str) {
        let ended = self.waiting().lent.remove(lane).is_some();
        if ended {
            self.turn.notify_waiters();
        }
    }

    /// Returns when `lane` has no turn lent, or at `until`.
    pub(crate) async fn until_returned(&self, lane: &str, until: Instant) {
        self.until(|| !self.waiting().lent.contains_key(lane), until)
            .await;
    }

    /// Returns when `done` holds (checked again each time someone leaves, a promise is
    /// claimed or a lend ends), or at `deadline`.
    async fn until(&self, done: impl Fn() -> bool, deadline: Instant) {
        loop {
            let turn = self.turn.notified();
            tokio::pin!(turn);
            // Registered before the check, so that a change between the two is not missed.
            turn.as_mut().enable();
            if done() || Instant::now() >= deadline {
                return;
            }
            if tokio::time::timeout_at(deadline, turn).await.is_err() {
                return;
            }
        }
    }

    /// Whether any turn is promised, in any lane (without the lock).
    pub(crate) fn has_promises(&self) -> bool {
        self.promised.load(Ordering::Relaxed) > 0
    }

    /// Promises a turn in `lane` at `due` to the request of class `priority` and `fingerprint`
    /// refused now (`again`: when it came on a promise already).
    pub(crate) fn promise(
        &self,
        lane: &str,
        priority: u8,
        due: Instant,
        fingerprint: u64,
        again: bool,
    ) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut waiting = self.waiting();
        let lanes = &mut *waiting;
        let key: Arc<str> = match lanes.promises.get_key_value(lane) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(lane),
        };
        lanes.lapse(&key, now);
        let queue = lanes.promises.entry(key).or_default();
        let index = queue.partition_point(|p| p.due <= due);
        queue.insert(
            index,
            Promise {
                due,
                priority,
                seq,
                fingerprint,
                missed: false,
                again,
            },
        );
        self.recount(lanes);
    }

    fn recount(&self, lanes: &mut Queues) {
        lanes.promises.retain(|_, queue| !queue.is_empty());
        let total = lanes.promises.values().map(VecDeque::len).sum();
        self.promised.store(total, Ordering::Relaxed);
    }

    /// Takes the promise of `lane` made to the request of `fingerprint`, when it is due at
    /// `now` (a little early, or within its grace): that request stands where it stood.
    pub(crate) fn claim(&self, lane: &str, now: Instant, fingerprint: u64) -> Option<Claim> {
        if !self.has_promises() {
            return None;
        }
        let mut waiting = self.waiting();
        let lanes = &mut *waiting;
        let key = Arc::clone(lanes.promises.get_key_value(lane)?.0);
        lanes.lapse(&key, now);
        let queue = lanes.promises.get_mut(lane)?;
        let found = queue
            .iter()
            .position(|p| p.fingerprint == fingerprint && p.due <= now + PROMISE_EARLY);
        let claimed = found.and_then(|i| queue.remove(i));
        if let Some(promise) = claimed.filter(|p| !p.missed && p.due <= now + ON_TIME_EARLY) {
            lanes.returned(&key, promise.again, true);
        }
        let claim = claimed.map(|p| Claim {
            priority: p.priority,
            seq: p.seq,
        });
        self.recount(lanes);
        drop(waiting);
        if claim.is_some() {
            // Whoever its hold kept back sees again who is first.
            self.turn.notify_waiters();
        }
        claim
    }

    /// The promises of `lane` that hold their turns at `now` against `order` (a waiter's, a
    /// claim's, or `(priority, u64::MAX)` for a newcomer): due, within [`PROMISE_HOLD`], not
    /// yet claimed, and ahead of it. How many, and when the first of their holds ends; `None`
    /// when none does, or the lane's clients are not seen to come back for their promises.
    pub(crate) fn held(
        &self,
        lane: &str,
        order: (u8, u64),
        now: Instant,
    ) -> Option<(usize, Instant)> {
        if !self.has_promises() {
            return None;
        }
        let waiting = self.waiting();
        let mut holding = waiting
            .promises
            .get(lane)?
            .iter()
            .filter(|p| waiting.holds(lane, p))
            .filter(|p| (p.priority, p.seq) < order)
            .filter(|p| p.due <= now && now < p.due + PROMISE_HOLD)
            .map(|p| p.due + PROMISE_HOLD);
        let first = holding.next()?;
        let (count, ends) = holding.fold((1, first), |(n, end), e| (n + 1, end.min(e)));
        Some((count, ends))
    }

    /// The turns of `lane`'s promises ahead of `order` (as in [`held`](Self::held)), due by
    /// `by` and not yet passed on (their hold has not ended), that their clients are expected
    /// to come back for: each counts as its kind's return rate. The turns a request must be
    /// told to come after.
    pub(crate) fn promised(
        &self,
        lane: &str,
        order: (u8, u64),
        now: Instant,
        by: Instant,
    ) -> usize {
        if !self.has_promises() {
            return 0;
        }
        let waiting = self.waiting();
        let expected: f64 = waiting.promises.get(lane).map_or(0.0, |queue| {
            queue
                .iter()
                .filter(|p| (p.priority, p.seq) < order)
                .filter(|p| now < p.due + PROMISE_HOLD && p.due <= by)
                .map(|p| waiting.return_rate(lane, p))
                .sum()
        });
        expected.round() as usize
    }

    /// How many wait in `lane` ahead of where a claimed promise stands.
    pub(crate) fn ahead_of_claim(&self, lane: &str, claim: Claim) -> usize {
        if self.count.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.waiting()
            .lanes
            .get(lane)
            .map_or(0, |set| set.range(..(claim.priority, claim.seq)).count())
    }

    fn is_first(&self, place: &Place) -> bool {
        self.waiting()
            .lanes
            .get(&place.lane)
            .and_then(BTreeSet::first)
            == Some(&(place.priority, place.seq))
    }

    /// Returns when `place` is first or has a turn lent to it, or at `deadline`.
    pub(crate) async fn until_first(&self, place: &Place, deadline: Instant) {
        self.until(
            || self.is_first(place) || self.lent_to(place).is_some(),
            deadline,
        )
        .await;
    }

    /// Returns when someone leaves a lane or claims a promise, or at `until`.
    pub(crate) async fn changed(&self, until: Instant) {
        let _ = tokio::time::timeout_at(until, self.turn.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_class_then_arrival_and_bounded() {
        let list = Waitlist::default();
        let a = list.join("m", 1, 3, None).unwrap();
        let b = list.join("m", 0, 3, None).unwrap();
        let c = list.join("m", 1, 3, None).unwrap();
        assert!(list.join("m", 0, 3, None).is_none(), "full");
        assert!(
            list.join("other", 0, 3, None).is_none(),
            "the bound is across lanes"
        );
        assert!(list.is_first(&b), "a lower class goes first");
        list.leave(b);
        assert!(
            list.is_first(&a) && !list.is_first(&c),
            "then arrival order"
        );
        list.leave(a);
        assert!(list.is_first(&c));
        list.leave(c);
        assert_eq!(list.len(), 0);
        assert!(!list.is_busy("m"));
    }

    #[test]
    fn a_turn_is_lent_close_behind_to_a_key_the_deployment_served() {
        let list = Waitlist::default();
        let head = list.join("g", 1, 100, None).unwrap();
        let cold = list.join("g", 1, 100, None).unwrap();
        let warm = list.join("g", 1, 100, None).unwrap();
        list.mark_warm(&warm, [Some(7), Some(9), None, None]);
        let urgent_elsewhere = list.join("g", 0, 100, None).unwrap();
        // The urgent one is first now; only the first lends.
        assert!(!list.lend(&head, 9, 8));
        list.leave(urgent_elsewhere);
        // Beyond `within`, nobody; within it, the one whose key the deployment served.
        assert!(!list.lend(&head, 9, 1));
        assert!(!list.lend(&head, 5, 8), "nobody's key was served at 5");
        assert!(list.lend(&head, 9, 8));
        assert_eq!(list.lent_to(&warm), Some(9));
        assert_eq!(list.lent_to(&cold), None);
        assert!(!list.lend(&head, 7, 8), "one lend at a time");
        // The borrower takes the turn (leaves): the lend ends with it.
        list.leave(warm);
        assert!(list.waiting().lent.is_empty());
        assert!(!list.lend(&head, 9, 8), "its warm places left with it");
        let again = list.join("g", 1, 100, None).unwrap();
        list.mark_warm(&again, [Some(9), None, None, None]);
        assert!(list.lend(&head, 9, 8));
        list.end_lend("g");
        assert_eq!(list.lent_to(&again), None);
        for place in [head, cold, again] {
            list.leave(place);
        }
        assert!(list.waiting().warm.is_empty());
    }

    #[test]
    fn ahead_counts_who_is_served_first() {
        let list = Waitlist::default();
        assert_eq!(list.ahead("m", 0, None), 0);
        let a = list.join("m", 1, 10, None).unwrap();
        let b = list.join("m", 0, 10, None).unwrap();
        let c = list.join("m", 1, 10, None).unwrap();
        assert_eq!(list.ahead("m", 0, Some(&b)), 0);
        assert_eq!(list.ahead("m", 1, Some(&a)), 1, "b, of a lower class");
        assert_eq!(list.ahead("m", 1, Some(&c)), 2);
        assert_eq!(
            list.ahead("m", 0, None),
            1,
            "a newcomer of class 0 queues behind b only"
        );
        assert_eq!(list.ahead("m", 2, None), 3);
        assert_eq!(list.ahead("other", 2, None), 0);
        for place in [a, b, c] {
            list.leave(place);
        }
    }

    #[test]
    fn lanes_do_not_hold_each_other_up() {
        let list = Waitlist::default();
        let a = list.join("caller:a", 0, 10, None).unwrap();
        let b = list.join("caller:b", 1, 10, None).unwrap();
        assert!(
            list.is_first(&a) && list.is_first(&b),
            "first in its own lane"
        );
        assert!(list.is_busy("caller:a") && !list.is_busy("gpt-4o"));
        assert_eq!(list.len(), 2);
        list.leave(a);
        list.leave(b);
        assert_eq!(list.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_promise_is_kept_for_who_comes_back_when_told() {
        let list = Waitlist::default();
        let t0 = Instant::now();
        let due = t0 + Duration::from_secs(3);
        // Refused at t0, told to come back at 3 s.
        list.promise("m", 1, due, 42, false);
        // A newcomer whose turn would come after 3 s leaves that turn to the promise.
        let newcomer = (1, u64::MAX);
        assert_eq!(
            list.promised("m", newcomer, t0, t0 + Duration::from_secs(4)),
            1
        );
        assert_eq!(
            list.promised("m", newcomer, t0, t0 + Duration::from_secs(2)),
            0
        );
        assert_eq!(list.promised("other", newcomer, t0, due), 0);
        assert_eq!(
            list.promised("m", (0, u64::MAX), t0, t0 + Duration::from_secs(4)),
            0,
            "a newcomer of a lower class goes before it"
        );
        assert_eq!(list.claim("m", t0, 42), None, "not due yet");
        // Someone else arrives meanwhile and waits.
        let meanwhile = list.join("m", 1, 10, None).unwrap();
        tokio::time::advance(Duration::from_millis(2_900)).await;
        assert_eq!(
            list.claim("m", Instant::now(), 7),
            None,
            "kept for the request it was promised to"
        );
        let claim = list
            .claim("m", Instant::now(), 42)
            .expect("due (a little early is fine)");
        let back = list.join("m", 1, 10, Some(claim)).unwrap();
        assert!(
            list.is_first(&back),
            "it stands where it stood when refused"
        );
        assert_eq!(list.ahead("m", 1, Some(&meanwhile)), 1);
        assert_eq!(
            list.claim("m", Instant::now(), 42),
            None,
            "one claim per promise"
        );
        list.leave(back);
        list.leave(meanwhile);
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_promise_holds_its_turn_while_its_clients_come_back_on_time() {
        let list = Waitlist::default();
        let t0 = Instant::now();
        let earlier = list.join("m", 1, 10, None).unwrap();
        let due = t0 + Duration::from_secs(1);
        list.promise("m", 1, due, 42, false);
        let newcomer = (1, u64::MAX);
        assert_eq!(list.held("m", newcomer, t0), None, "not due yet");
        tokio::time::advance(Duration::from_millis(1_050)).await;
        let now = Instant::now();
        assert_eq!(list.held("m", newcomer, now), Some((1, due + PROMISE_HOLD)));
        assert_eq!(
            list.held("m", earlier.order(), now),
            None,
            "who waited before it was refused goes first"
        );
        assert_eq!(
            list.held("m", (0, u64::MAX), now),
            None,
            "so does a lower class"
        );
        // Nobody comes back for it: its hold ends, and the lane learns its clients may not.
        tokio::time::advance(PROMISE_HOLD).await;
        assert_eq!(list.held("m", newcomer, Instant::now()), None);
        list.promise("m", 1, Instant::now() + Duration::from_secs(1), 7, false);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            list.held("m", newcomer, Instant::now()),
            None,
            "the last client did not come back: nothing is held"
        );
        // One comes back on time: promises hold their turns again.
        assert!(list.claim("m", Instant::now(), 7).is_some());
        list.promise("m", 1, Instant::now() + Duration::from_secs(1), 9, false);
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        assert!(list.held("m", newcomer, now).is_some());
        assert!(list.claim("m", now, 9).is_some());
        assert_eq!(
            list.held("m", newcomer, now),
            None,
            "claimed: its client has it"
        );
        list.leave(earlier);
    }

    #[tokio::test(start_paused = true)]
    async fn a_promise_nobody_claims_lapses() {
        let list = Waitlist::default();
        let t0 = Instant::now();
        list.promise("m", 0, t0 + Duration::from_secs(1), 1, false);
        tokio::time::advance(Duration::from_secs(1) + PROMISE_GRACE + Duration::from_millis(1))
            .await;
        let now = Instant::now();
        assert_eq!(
            list.promised("m", (u8::MAX, u64::MAX), now, now + Duration::from_secs(10)),
            0
        );
        assert_eq!(list.claim("m", now, 1), None);
        assert_eq!(list.promised.load(Ordering::Relaxed), 0, "nothing kept");
    }
}
