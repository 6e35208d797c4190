//! PeakEWMA: a latency estimate that jumps up at once and decays down slowly; and
//! [`Typical`], the running mean that decisions which must not follow one tail answer read.
//!
//! The estimator of Finagle and linkerd (and tower's `PeakEwma`), with every timestamp passed in:
//!
//! - a sample above the estimate replaces it at once (the peak), so an endpoint that turns slow
//!   loses traffic on its first slow answer;
//! - a sample below moves the estimate toward it with weight `1 - exp(-dt / decay)`, where `dt`
//!   is the time since the previous sample: a time constant, whatever the request rate;
//! - a sample below that comes [`STALE`] or more after the previous one, or at most half the
//!   estimate, replaces it: the estimate is old news, and the sample (a probe's, typically:
//!   see [`LeastLatency`](crate::LeastLatency)) says what the endpoint is like now (a
//!   recovered endpoint would otherwise need a dozen decay constants of probes to look fast);
//! - read at time `now`, the estimate has decayed toward zero by `exp(-dt / (6 × decay))` since
//!   the last sample, so an endpoint nobody tried for a long while looks cheaper and gets tried
//!   again (it cannot starve, unlike a lifetime mean), slowly enough that a slow endpoint
//!   between two probes does not look fast again.
//!
//! The state is one `AtomicU64` (the estimate as `f32` milliseconds and the time of the last
//! sample as `u32` milliseconds since the estimator's origin), updated with a CAS loop: reads
//! are one atomic load, and nothing ever locks. The `u32` clock wraps after 49 days without a
//! sample; a wrapped reading only makes an idle estimate look less decayed than it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A PeakEWMA latency estimate. Lock-free.
#[derive(Debug)]
pub struct PeakEwma {
    packed: AtomicU64,
    origin: Instant,
    decay_ms: f64,
}

fn pack(estimate_ms: f32, at_ms: u32) -> u64 {
    (u64::from(estimate_ms.to_bits()) << 32) | u64::from(at_ms)
}

fn unpack(packed: u64) -> (f32, u32) {
    (f32::from_bits((packed >> 32) as u32), packed as u32)
}

/// How old an estimate is when a lower sample replaces it, as a share of the decay.
pub const STALE: f64 = 0.25;

/// How much slower an unsampled estimate decays than a sampled one moves.
pub const IDLE_DECAY: f64 = 6.0;

/// `estimate` decayed toward zero over `dt_ms` with time constant `decay_ms`.
pub fn decayed(estimate_ms: f64, dt_ms: f64, decay_ms: f64) -> f64 {
    estimate_ms * (-dt_ms / decay_ms).exp()
}

/// The estimate after a `sample` arriving `dt_ms` after the previous one.
pub fn updated(estimate_ms: f64, sample_ms: f64, dt_ms: f64, decay_ms: f64) -> f64 {
    if sample_ms > estimate_ms || dt_ms >= decay_ms * STALE || sample_ms * 2.0 <= estimate_ms {
        return sample_ms;
    }
    let w = (-dt_ms / decay_ms).exp();
    estimate_ms * w + sample_ms * (1.0 - w)
}

impl PeakEwma {
    /// An estimator starting at `initial`, decaying with time constant `decay`, whose clock
    /// starts at `origin`.
    pub fn new(initial: Duration, decay: Duration, origin: Instant) -> Self {
        Self {
            packed: AtomicU64::new(pack(initial.as_secs_f32() * 1000.0, 0)),
            origin,
            decay_ms: (decay.as_secs_f64() * 1000.0).max(1.0),
        }
    }

    fn ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.origin).as_millis() as u32
    }

    /// The estimate at `now`, in seconds.
    pub fn get(&self, now: Instant) -> f64 {
        let (estimate, at) = unpack(self.packed.load(Ordering::Relaxed));
        let dt = self.ms(now).wrapping_sub(at);
        decayed(
            f64::from(estimate),
            f64::from(dt),
            self.decay_ms * IDLE_DECAY,
        ) / 1000.0
    }

    /// How long since the last sample (or since the start, when there was none).
    pub fn since_sample(&self, now: Instant) -> Duration {
        let (_, at) = unpack(self.packed.load(Ordering::Relaxed));
        Duration::from_millis(u64::from(self.ms(now).wrapping_sub(at)))
    }

    /// The time constant.
    pub fn decay(&self) -> Duration {
        Duration::from_secs_f64(self.decay_ms / 1000.0)
    }

    /// Records a sample taken at `now`.
    pub fn observe(&self, sample: Duration, now: Instant) {
        let sample_ms = sample.as_secs_f64() * 1000.0;
        let now_ms = self.ms(now);
        // Relaxed: a statistic; a lost race only means one sample weighs in a little late.
        let _ = self
            .packed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
                let (estimate, at) = unpack(packed);
                let dt = f64::from(now_ms.wrapping_sub(at));
                let next = updated(f64::from(estimate), sample_ms, dt, self.decay_ms);
                Some(pack(next as f32, now_ms))
            });
    }

    /// Records a failure: never a fast sample. The estimate jumps to at least `penalty`, and to
    /// twice its current value if that is more.
    pub fn penalize(&self, penalty: Duration, now: Instant) {
        let current = Duration::from_secs_f64(self.get(now).max(0.0));
        self.observe(penalty.max(current.saturating_mul(2)), now);
    }
}

/// The weight of each new sample in a [`Typical`] estimate from its fifth on: about the last
/// five answers.
pub const TYPICAL_WEIGHT: f64 = 0.2;

/// A deployment's typical latency: the running mean of its answers, the first few equally
/// weighted, then each new one weighing [`TYPICAL_WEIGHT`], whatever the time between them.
///
/// [`PeakEwma`] is pessimistic on purpose (one slow answer and the estimate is that answer),
/// which suits picking among interchangeable deployments. Where leaving a deployment costs
/// something (a key's prompt cache: see the facade's cache affinity), one tail answer must not
/// decide: an answer `x` times the typical moves it by `(x - 1) / 5`, so a deployment looks twice
/// as slow after one answer six times the typical, or after about four in a row at three times.
/// No idle decay: a deployment's typical latency does not change by nobody asking it; but a
/// sample after a gap of [`STALE`] of the peak estimate's decay starts it again
/// ([`restart`](Typical::restart), which [`DeploymentState::observe_latency`] calls), so that a
/// deployment that was slow and is asked again (by a probe, typically) is what it answers now.
///
/// [`DeploymentState::observe_latency`]: crate::DeploymentState::observe_latency
///
/// One `AtomicU64` (the estimate as `f32` milliseconds and the number of samples, saturating,
/// as `u32`), updated with a CAS loop.
#[derive(Debug)]
pub struct Typical {
    packed: AtomicU64,
}

impl Typical {
    /// An estimate that reads `initial` until its first sample, which replaces it.
    pub fn new(initial: Duration) -> Self {
        Self {
            packed: AtomicU64::new(pack(initial.as_secs_f32() * 1000.0, 0)),
        }
    }

    /// The estimate, in seconds.
    pub fn get(&self) -> f64 {
        f64::from(unpack(self.packed.load(Ordering::Relaxed)).0) / 1000.0
    }

    /// How many samples it has seen (saturating at `u32::MAX`).
    pub fn samples(&self) -> u32 {
        unpack(self.packed.load(Ordering::Relaxed)).1
    }

    /// Starts again from `sample`, as if it were the first: what came before is old news.
    pub fn restart(&self, sample: Duration) {
        let sample_ms = sample.as_secs_f64() * 1000.0;
        self.packed
            .store(pack(sample_ms as f32, 1), Ordering::Relaxed);
    }

    /// Records a sample.
    pub fn observe(&self, sample: Duration) {
        let sample_ms = sample.as_secs_f64() * 1000.0;
        // Relaxed: a statistic, as the peak estimate's.
        let _ = self
            .packed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
                let (estimate, count) = unpack(packed);
                let next = typical_updated(f64::from(estimate), sample_ms, count);
                Some(pack(next as f32, count.saturating_add(1)))
            });
    }
}

/// The typical estimate after its `count + 1`-th sample.
pub fn typical_updated(estimate_ms: f64, sample_ms: f64, count: u32) -> f64 {
    let weight = (1.0 / (f64::from(count) + 1.0)).max(TYPICAL_WEIGHT);
    estimate_ms + (sample_ms - estimate_ms) * weight
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);

    #[test]
    fn peaks_at_once_and_decays_slowly() {
        let t0 = Instant::now();
        let ewma = PeakEwma::new(Duration::from_millis(100), DECAY, t0);
        assert!((ewma.get(t0) - 0.1).abs() < 1e-6);
        ewma.observe(Duration::from_millis(500), t0 + Duration::from_millis(10));
        assert!(
            (ewma.get(t0 + Duration::from_millis(10)) - 0.5).abs() < 1e-6,
            "peak"
        );
        // A faster sample 1 s later moves it only part of the way.
        ewma.observe(Duration::from_millis(300), t0 + Duration::from_millis(1010));
        let after = ewma.get(t0 + Duration::from_millis(1010));
        assert!(after > 0.45 && after < 0.5, "{after}");
        // Fast samples over 60 s (six time constants) bring it down near them.
        for i in 1..=600 {
            ewma.observe(
                Duration::from_millis(100),
                t0 + Duration::from_millis(1010 + i * 100),
            );
        }
        let settled = ewma.get(t0 + Duration::from_millis(61_010));
        assert!((settled - 0.1).abs() < 0.01, "{settled}");
    }

    #[test]
    fn idle_estimates_decay_toward_zero_six_times_slower() {
        let t0 = Instant::now();
        let ewma = PeakEwma::new(Duration::from_secs(1), DECAY, t0);
        ewma.observe(Duration::from_secs(2), t0);
        let later = ewma.get(t0 + DECAY * 6);
        assert!((later - 2.0 / std::f64::consts::E).abs() < 1e-3, "{later}");
    }

    #[test]
    fn a_lower_sample_after_a_stale_estimate_replaces_it() {
        let t0 = Instant::now();
        let ewma = PeakEwma::new(Duration::from_millis(100), DECAY, t0);
        ewma.observe(Duration::from_secs(2), t0);
        // 2 s later (under a quarter of the decay), somewhat lower: smoothed.
        ewma.observe(Duration::from_millis(1500), t0 + Duration::from_secs(2));
        let smoothed = ewma.get(t0 + Duration::from_secs(2));
        assert!(smoothed > 1.6 && smoothed < 2.0, "{smoothed}");
        // 3 s after that: the estimate is old news; the sample is the endpoint now.
        ewma.observe(Duration::from_millis(1500), t0 + Duration::from_secs(5));
        assert!((ewma.get(t0 + Duration::from_secs(5)) - 1.5).abs() < 1e-6);
        // At most half the estimate, at once: the endpoint recovered.
        ewma.observe(Duration::from_millis(200), t0 + Duration::from_secs(6));
        assert!((ewma.get(t0 + Duration::from_secs(6)) - 0.2).abs() < 1e-6);
        assert_eq!(
            ewma.since_sample(t0 + Duration::from_secs(7)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn a_failure_never_lowers_the_estimate() {
        let t0 = Instant::now();
        let ewma = PeakEwma::new(Duration::from_millis(100), DECAY, t0);
        ewma.observe(Duration::from_millis(300), t0);
        ewma.penalize(Duration::from_millis(50), t0);
        assert!(ewma.get(t0) >= 0.6 - 1e-6, "doubled: {}", ewma.get(t0));
    }

    #[test]
    fn update_math() {
        assert!(
            (updated(100.0, 200.0, 5.0, 1000.0) - 200.0).abs() < f64::EPSILON,
            "peak"
        );
        let w = (-0.2_f64).exp();
        assert!(
            (updated(100.0, 60.0, 200.0, 1000.0) - (100.0 * w + 60.0 * (1.0 - w))).abs() < 1e-9
        );
        assert!((decayed(100.0, 1000.0, 1000.0) - 100.0 / std::f64::consts::E).abs() < 1e-9);
        assert!(
            (updated(100.0, 60.0, 250.0, 1000.0) - 60.0).abs() < f64::EPSILON,
            "stale"
        );
        assert!(
            (updated(100.0, 50.0, 10.0, 1000.0) - 50.0).abs() < f64::EPSILON,
            "half"
        );
    }
    #[test]
    fn a_typical_estimate_takes_its_first_sample_and_shrugs_off_one_tail_answer() {
        let typical = Typical::new(Duration::from_millis(30));
        assert!((typical.get() - 0.03).abs() < 1e-9);
        assert_eq!(typical.samples(), 0);
        typical.observe(Duration::from_millis(10));
        assert!((typical.get() - 0.01).abs() < 1e-6, "the guess is gone");
        for _ in 0..20 {
            typical.observe(Duration::from_millis(10));
        }
        // One answer five times the typical: under twice the typical after it.
        typical.observe(Duration::from_millis(50));
        let after = typical.get();
        assert!((after - 0.018).abs() < 1e-6, "{after}");
        // Three times the typical, again and again: twice the typical within four answers.
        let typical = Typical::new(Duration::from_millis(30));
        for _ in 0..20 {
            typical.observe(Duration::from_millis(10));
        }
        let mut answers = 0;
        while typical.get() < 0.02 {
            typical.observe(Duration::from_millis(30));
            answers += 1;
        }
        assert_eq!(answers, 4);
        assert_eq!(typical.samples(), 24);
    }

    #[test]
    fn typical_update_math() {
        // The first samples are a plain mean.
        assert!((typical_updated(30.0, 10.0, 0) - 10.0).abs() < 1e-12);
        assert!((typical_updated(10.0, 20.0, 1) - 15.0).abs() < 1e-12);
        assert!((typical_updated(15.0, 30.0, 2) - 20.0).abs() < 1e-12);
        // From the fifth on, a fifth of the difference.
        assert!((typical_updated(10.0, 60.0, 4) - 20.0).abs() < 1e-12);
        assert!((typical_updated(10.0, 60.0, 1000) - 20.0).abs() < 1e-12);
    }
}
