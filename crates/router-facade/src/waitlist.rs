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

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;

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
}

#[derive(Debug, Default)]
struct Lanes {
    lanes: HashMap<Arc<str>, BTreeSet<(u8, u64)>>,
    total: usize,
}

/// The router's waitlist.
#[derive(Debug, Default)]
pub(crate) struct Waitlist {
    waiting: Mutex<Lanes>,
    /// Waiters in all lanes, readable without the lock: while nobody waits (the common case),
    /// a request checks the waitlist without taking it.
    count: AtomicUsize,
    seq: AtomicU64,
    turn: Notify,
}

impl Waitlist {
    fn waiting(&self) -> MutexGuard<'_, Lanes> {
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

    /// A place at the back of `priority`'s class in `lane`; `None` when `max` are waiting
    /// already, in all lanes together.
    pub(crate) fn join(&self, lane: &str, priority: u8, max: usize) -> Option<Place> {
        let mut waiting = self.waiting();
        if waiting.total >= max {
            return None;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
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
        let Lanes { lanes, total } = &mut *waiting;
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

    fn is_first(&self, place: &Place) -> bool {
        self.waiting()
            .lanes
            .get(&place.lane)
            .and_then(BTreeSet::first)
            == Some(&(place.priority, place.seq))
    }

    /// Returns when `place` is first, or at `deadline`.
    pub(crate) async fn until_first(&self, place: &Place, deadline: Instant) {
        loop {
            let turn = self.turn.notified();
            tokio::pin!(turn);
            turn.as_mut().enable();
            if self.is_first(place) || Instant::now() >= deadline {
                return;
            }
            if tokio::time::timeout_at(deadline, turn).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_class_then_arrival_and_bounded() {
        let list = Waitlist::default();
        let a = list.join("m", 1, 3).unwrap();
        let b = list.join("m", 0, 3).unwrap();
        let c = list.join("m", 1, 3).unwrap();
        assert!(list.join("m", 0, 3).is_none(), "full");
        assert!(
            list.join("other", 0, 3).is_none(),
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
    fn ahead_counts_who_is_served_first() {
        let list = Waitlist::default();
        assert_eq!(list.ahead("m", 0, None), 0);
        let a = list.join("m", 1, 10).unwrap();
        let b = list.join("m", 0, 10).unwrap();
        let c = list.join("m", 1, 10).unwrap();
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
        let a = list.join("caller:a", 0, 10).unwrap();
        let b = list.join("caller:b", 1, 10).unwrap();
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
}
