//! Protocol configuration shared by every replica, with validation that names the field and the fix.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Which agreement protocol the cluster runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// MinBFT (paper 004 §4): 2f+1 replicas with a USIG.
    #[default]
    Minbft,
}

/// How a lagging replica fetches the partitions (blocks) of the state that differ from the agreed
/// ones (docs/STATE.md §2, paper 001 §IV-D). Every strategy checks each partition against its
/// digest in the certified checkpoint; they differ in how many copies of a partition they ask
/// for, from whom, and what they do after a copy fails.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, Default)]
pub enum TransferStrategy {
    /// One copy per partition from the least-loaded source, checked against the agreed Merkle
    /// leaf (the leaf level arrives, proven by the certified root, in the STATE-SUMMARY); a
    /// copy that fails goes to the next least-loaded source.
    #[default]
    #[serde(rename = "merkle")]
    Merkle,
    /// Paper 001's latency-first strategy: f+1 copies of each partition from distinct sources
    /// at once, plus digest-only answers from up to f others; the first copy that checks wins,
    /// so f faulty or slow sources never cost a round, at up to f+1 times the bytes.
    #[serde(rename = "latency-first")]
    LatencyFirst,
    /// Paper 001's bandwidth-first strategy, variant 1: one copy plus digest-only answers from
    /// up to f others; after a copy fails, one more copy from a replica not asked about this
    /// partition yet (any remaining source if none is left), and so on.
    #[serde(rename = "bandwidth-first-1")]
    BandwidthFirst1,
    /// Bandwidth-first, variant 2: like variant 1 until a copy fails, then f more copies at once
    /// from distinct sources, so a partition takes at most two rounds.
    #[serde(rename = "bandwidth-first-2")]
    BandwidthFirst2,
}

impl TransferStrategy {
    /// Every strategy, in the order benchmarks report them.
    pub const ALL: [TransferStrategy; 4] = [
        TransferStrategy::Merkle,
        TransferStrategy::LatencyFirst,
        TransferStrategy::BandwidthFirst1,
        TransferStrategy::BandwidthFirst2,
    ];

    /// The name used in cluster.toml and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TransferStrategy::Merkle => "merkle",
            TransferStrategy::LatencyFirst => "latency-first",
            TransferStrategy::BandwidthFirst1 => "bandwidth-first-1",
            TransferStrategy::BandwidthFirst2 => "bandwidth-first-2",
        }
    }
}

/// Parses [`TransferStrategy::name`]; the error lists the names (clap uses it for every
/// command-line option of this type).
impl std::str::FromStr for TransferStrategy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|strategy| strategy.name() == text)
            .ok_or_else(|| {
                format!(
                    "unknown strategy {text:?}: use merkle, latency-first, bandwidth-first-1 or \
                     bandwidth-first-2"
                )
            })
    }
}

impl std::fmt::Display for TransferStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Tunables of the agreement protocol. Every field has a default, a unit in its name and a bound
/// checked by [`ProtocolConfig::validate`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolConfig {
    /// The agreement protocol.
    pub protocol: Protocol,
    /// Number of replicas.
    pub n: u32,
    /// Number of Byzantine replicas tolerated.
    pub f: u32,
    /// A checkpoint is taken every this many sequence numbers (each orders one batch).
    pub checkpoint_interval: u64,
    /// Log size `L`: a replica accepts sequence numbers up to `stable checkpoint + L`.
    pub log_size: u64,
    /// Maximum number of sequence numbers the primary has in agreement at once.
    pub window: u64,
    /// Maximum requests in one batch.
    pub batch_requests_max: usize,
    /// Maximum operation bytes in one batch.
    pub batch_bytes_max: usize,
    /// Requests waiting for a sequence number, per replica; more are refused.
    pub pending_requests_max: usize,
    /// A backup that knows of a request not executed within this time suspects the primary.
    pub request_timeout_ms: u64,
    /// Base wait for a NEW-VIEW after sending VIEW-CHANGE; doubles per failed view change.
    pub view_change_timeout_ms: u64,
    /// Period of heartbeats (progress beacons that trigger retransmission).
    pub heartbeat_interval_ms: u64,
    /// Clients remembered for exactly-once execution; the least recently served is evicted.
    pub client_table_max: usize,
    /// How far ahead of a backup's own wall clock the agreed time a primary proposes for a batch
    /// may be (docs/PROTOCOL.md §4, *Agreed time*). It bounds how far a faulty primary can move
    /// time forward, and must exceed the clock differences between correct replicas (plus a
    /// PREPARE's transit time), or a correct primary's batches are refused.
    pub clock_skew_max_ms: u64,
    /// How a lagging replica fetches state: `merkle` (default), `latency-first`,
    /// `bandwidth-first-1` or `bandwidth-first-2` ([`TransferStrategy`]). A local choice: replicas
    /// of one cluster may differ, and every replica serves every strategy.
    pub state_transfer: TransferStrategy,
}

/// The largest `clock_skew_max_ms` accepted: one hour. A larger bound would let a faulty
/// primary expire keys an hour early, which defeats the purpose of bounding it.
pub const CLOCK_SKEW_MAX_MS_LIMIT: u64 = 3_600_000;

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            protocol: Protocol::Minbft,
            n: 3,
            f: 1,
            checkpoint_interval: 128,
            log_size: 256,
            window: 32,
            batch_requests_max: 512,
            batch_bytes_max: 1 << 20,
            pending_requests_max: 20_000,
            request_timeout_ms: 2_000,
            view_change_timeout_ms: 2_000,
            heartbeat_interval_ms: 200,
            client_table_max: 100_000,
            clock_skew_max_ms: 2_000,
            state_transfer: TransferStrategy::Merkle,
        }
    }
}

/// A configuration the cluster must refuse, naming the field and the fix.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid protocol config: `{field}` {problem}; {fix}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

fn refuse(field: &'static str, problem: String, fix: String) -> Result<(), ConfigError> {
    Err(ConfigError {
        field,
        problem,
        fix,
    })
}

impl ProtocolConfig {
    /// The smallest `n` that tolerates `f` Byzantine replicas with this protocol (DESIGN §1:
    /// MinBFT needs n ≥ 2f+1 because the USIG prevents equivocation; see docs/PROTOCOL.md).
    pub fn minimum_replicas(protocol: Protocol, f: u32) -> u32 {
        match protocol {
            Protocol::Minbft => 2 * f + 1,
        }
    }

    /// Size of every agreement quorum: ⌈(n+1)/2⌉, so any two quorums share a replica.
    pub fn quorum(&self) -> usize {
        (self.n as usize + 2) / 2
    }

    /// Matching replies a client needs, and matching CHECKPOINTs for a stable checkpoint: f+1,
    /// so at least one comes from a correct replica.
    pub fn weak_quorum(&self) -> usize {
        self.f as usize + 1
    }

    /// Checks every bound; the first violation is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let minimum = Self::minimum_replicas(self.protocol, self.f);
        if self.n < minimum {
            return refuse(
                "n",
                format!(
                    "is {} but {:?} needs n ≥ 2f+1 = {minimum} replicas to tolerate f = {}",
                    self.n, self.protocol, self.f
                ),
                format!("set n to at least {minimum} or lower f"),
            );
        }
        if self.n as usize > crate::limits::MAX_REPLICAS {
            return refuse(
                "n",
                format!(
                    "is {} but at most {} replicas are supported",
                    self.n,
                    crate::limits::MAX_REPLICAS
                ),
                "use fewer replicas".into(),
            );
        }
        if self.n - self.f < self.quorum() as u32 {
            return refuse(
                "f",
                format!(
                    "is {} so n − f = {} correct replicas cannot form a quorum of {}",
                    self.f,
                    self.n - self.f,
                    self.quorum()
                ),
                "lower f or add replicas".into(),
            );
        }
        if self.checkpoint_interval == 0 || self.checkpoint_interval > 1 << 20 {
            return refuse(
                "checkpoint_interval",
                format!("is {}", self.checkpoint_interval),
                "use a value between 1 and 1048576 (default 128)".into(),
            );
        }
        if self.log_size < 2 * self.checkpoint_interval
            || !self.log_size.is_multiple_of(self.checkpoint_interval)
        {
            return refuse(
                "log_size",
                format!("is {} with checkpoint_interval {}", self.log_size, self.checkpoint_interval),
                "use a multiple of checkpoint_interval that is at least twice it, so a new checkpoint can become stable before the log fills".into(),
            );
        }
        if self.window == 0 || self.window > self.checkpoint_interval {
            return refuse(
                "window",
                format!("is {} with checkpoint_interval {}", self.window, self.checkpoint_interval),
                "use a value between 1 and checkpoint_interval (replicas never run agreement past their next checkpoint)".into(),
            );
        }
        if self.batch_requests_max == 0
            || self.batch_requests_max > crate::limits::MAX_BATCH_REQUESTS
        {
            return refuse(
                "batch_requests_max",
                format!("is {}", self.batch_requests_max),
                format!(
                    "use a value between 1 and {}",
                    crate::limits::MAX_BATCH_REQUESTS
                ),
            );
        }
        // A VIEW-CHANGE carries at most one checkpoint interval of batches (docs/PROTOCOL.md);
        // it must fit in a frame.
        let view_change_bytes = (self.checkpoint_interval as u128 + self.window as u128)
            * (self.batch_bytes_max as u128 + self.batch_requests_max as u128 * 512);
        if self.batch_bytes_max < crate::limits::MAX_OPERATION_BYTES
            || view_change_bytes > crate::limits::MAX_FRAME_BYTES as u128
        {
            return refuse(
                "batch_bytes_max",
                format!("is {}", self.batch_bytes_max),
                format!(
                    "use at least {} (one maximal operation) and keep checkpoint_interval × batch_bytes_max within a few hundred MiB",
                    crate::limits::MAX_OPERATION_BYTES
                ),
            );
        }
        if self.clock_skew_max_ms == 0 || self.clock_skew_max_ms > CLOCK_SKEW_MAX_MS_LIMIT {
            return refuse(
                "clock_skew_max_ms",
                format!("is {}", self.clock_skew_max_ms),
                format!(
                    "use a value between 1 and {CLOCK_SKEW_MAX_MS_LIMIT} (default 2000): larger than the clock difference between any two correct replicas plus a message's delay, so correct primaries are not refused, and as small as that allows, since it is how far a faulty primary can move time forward"
                ),
            );
        }
        for (field, value) in [
            ("pending_requests_max", self.pending_requests_max as u64),
            ("client_table_max", self.client_table_max as u64),
            ("request_timeout_ms", self.request_timeout_ms),
            ("view_change_timeout_ms", self.view_change_timeout_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
        ] {
            if value == 0 {
                return refuse(field, "is 0".into(), "use a positive value".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        ProtocolConfig::default().validate().unwrap();
    }

    #[test]
    fn refuses_a_clock_skew_bound_of_zero_or_over_an_hour_and_names_the_field() {
        for clock_skew_max_ms in [0, CLOCK_SKEW_MAX_MS_LIMIT + 1] {
            let config = ProtocolConfig {
                clock_skew_max_ms,
                ..ProtocolConfig::default()
            };
            let error = config.validate().unwrap_err();
            assert_eq!(error.field, "clock_skew_max_ms");
            assert!(error.to_string().contains("default 2000"), "{error}");
        }
        let config = ProtocolConfig {
            clock_skew_max_ms: CLOCK_SKEW_MAX_MS_LIMIT,
            ..ProtocolConfig::default()
        };
        config.validate().unwrap();
    }

    #[test]
    fn refuses_n_below_two_f_plus_one_and_names_the_bound() {
        let config = ProtocolConfig {
            n: 4,
            f: 2,
            ..ProtocolConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert_eq!(error.field, "n");
        assert!(error.to_string().contains("2f+1 = 5"), "{error}");
    }

    #[test]
    fn quorum_is_majority_and_intersects() {
        for n in 1..=20u32 {
            let config = ProtocolConfig {
                n,
                f: (n - 1) / 2,
                ..ProtocolConfig::default()
            };
            config.validate().unwrap();
            let quorum = config.quorum();
            assert!(
                2 * quorum > n as usize,
                "two quorums of {quorum} out of {n} must intersect"
            );
            assert!(
                n as usize - config.f as usize >= quorum,
                "correct replicas alone form a quorum"
            );
        }
    }
}
