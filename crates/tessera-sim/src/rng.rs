//! The simulator's only source of randomness: ChaCha8 streams derived from the run's seed.
//!
//! Each purpose (network, workload) draws from its own stream of the same seed, so a change in
//! how many numbers one part draws does not shift the other part's choices.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Stream for network delays, drops, duplicates and partitions.
pub const STREAM_NETWORK: u64 = 1;
/// Stream for the client workload.
pub const STREAM_WORKLOAD: u64 = 2;
/// Stream for the fault plan: Byzantine replicas, Twins, rounds, crashes.
pub const STREAM_FAULTS: u64 = 3;
/// Stream for the adversary's choices.
pub const STREAM_ADVERSARY: u64 = 4;
/// Stream for the rogue client.
pub const STREAM_ROGUE: u64 = 5;
/// Whether the planned crash is for good (its own stream, so adding it changed no other draw).
pub const STREAM_CRASH_STOP: u64 = 6;
/// Stream for each node's wall-clock skew (its own stream, so adding it changed no other draw).
pub const STREAM_CLOCK: u64 = 7;
/// Whether the planned crash loses the replica's log (its own stream, so adding it changed no
/// other draw).
pub const STREAM_AMNESIA: u64 = 8;
/// Whether a restart without the log keeps a prefix of a damaged one, and where the log is cut
/// (its own stream, so adding it changed no other draw).
pub const STREAM_DAMAGED_LOG: u64 = 9;

/// A seeded random stream with the few draws the simulator needs.
#[derive(Clone, Debug)]
pub struct SimRng {
    inner: ChaCha8Rng,
}

impl SimRng {
    /// The stream `stream` of `seed`.
    pub fn new(seed: u64, stream: u64) -> SimRng {
        let mut inner = ChaCha8Rng::seed_from_u64(seed);
        inner.set_stream(stream);
        SimRng { inner }
    }

    /// A uniform number in `0..bound` (`bound` > 0). The modulo bias is negligible for the small
    /// bounds used here and does not affect determinism.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "empty range");
        self.inner.next_u64() % bound
    }

    /// A uniform number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high, "empty range {low}..={high}");
        low + self.below(high - low + 1)
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.below(1000) < u64::from(per_mille)
    }
}
