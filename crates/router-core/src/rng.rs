//! The random generator strategies draw from.

use std::fmt;

/// A small, fast, seedable random generator for routing decisions (not for cryptography).
///
/// Strategies take it as an argument, never make their own, so that tests and simulations
/// replay exactly with a seed.
pub struct Rng(fastrand::Rng);

impl Rng {
    /// A generator seeded from the process's entropy.
    pub fn new() -> Self {
        Self(fastrand::Rng::new())
    }

    /// A generator that yields the same sequence for the same seed.
    pub fn with_seed(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    /// A uniform index in `0..n`; `n` must be at least 1 (0 is returned for 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.0.usize(..n) }
    }

    /// A uniform float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0.f64()
    }

    /// A fair coin.
    pub fn coin(&mut self) -> bool {
        self.0.bool()
    }

    /// A fresh seed, for a generator derived from this one.
    pub fn fork_seed(&mut self) -> u64 {
        self.0.u64(..)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Rng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rng").finish_non_exhaustive()
    }
}
