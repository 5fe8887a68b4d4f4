//! The knobs of one simulated run. Every tunable has a default, a unit in its name and a bound
//! checked by [`SimConfig::validate`].

use tessera_types::ProtocolConfig;

/// Parameters of one run (the seed is passed separately).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The protocol configuration every replica runs (its `n` and `f` size the cluster).
    pub protocol: ProtocolConfig,
    /// Client sessions, each with one outstanding request.
    pub clients: u32,
    /// Operations each client issues.
    pub operations_per_client: u32,
    /// Distinct keys the workload touches.
    pub keys: u32,
    /// Longest pause of a client between a completion and its next invocation.
    pub think_ms_max: u64,
    /// A client retransmits to every replica after this long without f+1 matching replies.
    pub client_retry_ms: u64,
    /// Length of the fault phase; the network is reliable afterwards.
    pub fault_phase_ms: u64,
    /// One-way delay of a message during the fault phase: uniform in `min..=max`.
    pub delay_ms_min: u64,
    /// See `delay_ms_min`.
    pub delay_ms_max: u64,
    /// One-way delay after the heal: uniform in `1..=healed_delay_ms_max`.
    pub healed_delay_ms_max: u64,
    /// Chance that a message is dropped during the fault phase, per mille.
    pub drop_per_mille: u32,
    /// Chance that a message is delivered twice during the fault phase, per mille.
    pub duplicate_per_mille: u32,
    /// Chance that a partition is in force after each network change, per mille.
    pub partition_per_mille: u32,
    /// Time between network changes (partition on or off) during the fault phase.
    pub partition_change_ms_min: u64,
    /// See `partition_change_ms_min`.
    pub partition_change_ms_max: u64,
    /// Every request completes within this long after the later of its invocation and the heal.
    pub liveness_bound_ms: u64,
    /// After the last completion, the run continues this long so lagging replicas catch up.
    pub settle_ms: u64,
    /// Upper bound on processed events per run (a runaway run is a failure, not a hang).
    pub events_max: u64,
    /// Keep a readable line per processed event.
    pub trace: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            protocol: ProtocolConfig {
                n: 3,
                f: 1,
                checkpoint_interval: 8,
                log_size: 16,
                window: 4,
                batch_requests_max: 16,
                request_timeout_ms: 500,
                view_change_timeout_ms: 500,
                heartbeat_interval_ms: 100,
                ..ProtocolConfig::default()
            },
            clients: 3,
            operations_per_client: 12,
            keys: 3,
            think_ms_max: 50,
            client_retry_ms: 400,
            fault_phase_ms: 3_000,
            delay_ms_min: 1,
            delay_ms_max: 40,
            healed_delay_ms_max: 5,
            drop_per_mille: 100,
            duplicate_per_mille: 50,
            partition_per_mille: 400,
            partition_change_ms_min: 100,
            partition_change_ms_max: 1_000,
            liveness_bound_ms: 30_000,
            settle_ms: 2_000,
            events_max: 2_000_000,
            trace: false,
        }
    }
}

impl SimConfig {
    /// Checks every bound; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        self.protocol
            .validate()
            .map_err(|error| format!("protocol: {error}"))?;
        let checks: [(bool, &str); 9] = [
            (
                (1..=64).contains(&self.clients),
                "clients must be in 1..=64",
            ),
            (
                (1..=10_000).contains(&self.operations_per_client),
                "operations_per_client must be in 1..=10000",
            ),
            ((1..=64).contains(&self.keys), "keys must be in 1..=64"),
            (
                self.client_retry_ms >= 1,
                "client_retry_ms must be at least 1",
            ),
            (
                1 <= self.delay_ms_min && self.delay_ms_min <= self.delay_ms_max,
                "need 1 <= delay_ms_min <= delay_ms_max",
            ),
            (
                self.healed_delay_ms_max >= 1,
                "healed_delay_ms_max must be at least 1",
            ),
            (
                self.drop_per_mille <= 1000
                    && self.duplicate_per_mille <= 1000
                    && self.partition_per_mille <= 1000,
                "per-mille chances must be at most 1000",
            ),
            (
                1 <= self.partition_change_ms_min
                    && self.partition_change_ms_min <= self.partition_change_ms_max,
                "need 1 <= partition_change_ms_min <= partition_change_ms_max",
            ),
            (self.events_max >= 1, "events_max must be at least 1"),
        ];
        for (holds, message) in checks {
            if !holds {
                return Err(message.to_string());
            }
        }
        Ok(())
    }
}
