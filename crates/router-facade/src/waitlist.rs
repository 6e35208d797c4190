//! The order in which requests waiting for quota get their turn.
//!
//! A request that finds no deployment with room waits until the soonest recovery. Waiters are
//! served one at a time in order of (priority class, arrival): only the first may choose a
//! deployment; when it leaves (served, failed, or dropped), the next is woken. A new request
//! queues behind waiters rather than overtaking them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;

/// A place in the waitlist.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Place {
    priority: u8,
    seq: u64,
}

/// The router's waitlist.
#[derive(Debug, Default)]
pub(crate) struct Waitlist {
    waiting: Mutex<BTreeSet<(u8, u64)>>,
    seq: AtomicU64,
    turn: Notify,
}

impl Waitlist {
    fn waiting(&self) -> MutexGuard<'_, BTreeSet<(u8, u64)>> {
        // Held for a set operation, never across an await.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiting().is_empty()
    }

    /// A place at the back of `priority`'s class; `None` when `max` are waiting already.
    pub(crate) fn join(&self, priority: u8, max: usize) -> Option<Place> {
        let mut waiting = self.waiting();
        if waiting.len() >= max {
            return None;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        waiting.insert((priority, seq));
        Some(Place { priority, seq })
    }

    /// Gives the place up and wakes the others to see who is first now.
    #[expect(clippy::needless_pass_by_value, reason = "leaving uses the place up")]
    pub(crate) fn leave(&self, place: Place) {
        let Place { priority, seq } = place;
        self.waiting().remove(&(priority, seq));
        self.turn.notify_waiters();
    }

    fn is_first(&self, place: &Place) -> bool {
        self.waiting().first() == Some(&(place.priority, place.seq))
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
        let a = list.join(1, 3).unwrap();
        let b = list.join(0, 3).unwrap();
        let c = list.join(1, 3).unwrap();
        assert!(list.join(0, 3).is_none(), "full");
        assert!(list.is_first(&b), "a lower class goes first");
        list.leave(b);
        assert!(
            list.is_first(&a) && !list.is_first(&c),
            "then arrival order"
        );
        list.leave(a);
        assert!(list.is_first(&c));
        list.leave(c);
        assert!(list.is_empty());
    }
}
