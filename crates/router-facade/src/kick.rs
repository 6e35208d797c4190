//! The handle that starts and wakes a router's prober (the `prober` module): held by the
//! router's snapshots and by each deployment, so that a failure can say "something went out"
//! without those depending on the prober itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

/// Starts the prober's task (given what wakes it) on the current runtime.
pub(crate) type Start = Box<dyn Fn(Arc<Notify>) + Send + Sync>;

/// Whether a router's prober task runs, what wakes it, and how to start it.
#[derive(Default)]
pub(crate) struct Kick {
    running: AtomicBool,
    wake: Arc<Notify>,
    start: OnceLock<Start>,
}

impl std::fmt::Debug for Kick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kick")
            .field("running", &self.running.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Kick {
    /// Says how to start the task (once, when the router is made).
    pub(crate) fn set_start(&self, start: Start) {
        let _ = self.start.set(start);
    }

    /// Something went out, or was offered a probe now: makes sure the task runs, and wakes
    /// it. Outside a tokio runtime nothing starts (the next failure or reload starts it).
    pub(crate) fn kick(&self) {
        if self.running.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
            return;
        }
        match (tokio::runtime::Handle::try_current(), self.start.get()) {
            (Ok(_), Some(start)) => start(Arc::clone(&self.wake)),
            _ => self.running.store(false, Ordering::Release),
        }
    }

    /// The task is ending: `true` when it may (no kick came meanwhile that found it running;
    /// `still_needed` says whether anything is still out).
    pub(crate) fn stop(&self, still_needed: impl FnOnce() -> bool) -> bool {
        self.running.store(false, Ordering::Release);
        // A kick between the last look and the store above found the task running and only
        // woke it: look once more, and run on if something is out and no other task started.
        !still_needed() || self.running.swap(true, Ordering::AcqRel)
    }
}
