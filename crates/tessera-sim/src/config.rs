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
    /// Upper bound on the bytes of replica messages delivered in a run: runaway message growth
    /// is a failure, and bounds the wall time of a run whose messages keep growing.
    pub message_bytes_max: u64,
    /// Keep a readable line per processed event.
    pub trace: bool,

    // --- random network faults (the "chaos" setting) ---
    /// Draw drops, duplicates and partitions at random during the fault phase. Off in the
    /// ByzzFuzz grid settings, whose network faults are confined to `network_fault_rounds`.
    pub random_network_faults: bool,
    /// Chance, at a network change, that a swizzle starts (links cut one by one, then healed one
    /// by one in another random order) instead of a group partition, per mille.
    pub swizzle_per_mille: u32,

    // --- ByzzFuzz rounds ---
    /// `c`: protocol rounds in which Byzantine replicas tamper with their messages.
    pub mutation_rounds: u32,
    /// `d`: protocol rounds whose messages are cut by a random partition.
    pub network_fault_rounds: u32,
    /// Sequence-number rounds are drawn from `1..=seq_rounds`.
    pub seq_rounds: u64,
    /// View rounds are drawn from `1..=view_rounds`.
    pub view_rounds: u64,

    // --- Byzantine replicas ---
    /// How many replicas the adversary controls (the seed picks which).
    pub byzantine_replicas: u32,
    /// Chance that the first Byzantine replica runs as Twins (two cores, one identity, one USIG),
    /// per mille.
    pub twins_per_mille: u32,
    /// Chance that the first Byzantine replica is slow but not silent during the fault phase:
    /// every message it sends is held back by 40–90% of the request timeout, per mille.
    pub slow_per_mille: u32,
    /// Byzantine replicas send the same forged result to clients (only meaningful, and only
    /// harmful, with more than f of them: the f+1 test).
    pub corrupt_replies: bool,

    // --- crashes and clients ---
    /// Chance of one crash of a random replica during the fault phase (it restarts before the
    /// heal with its durable state; in-flight messages to it and its timers are lost), per mille.
    pub crash_per_mille: u32,
    /// Chance that the crash is for good (the replica never restarts), per mille. Only drawn
    /// when no replica is Byzantine: the stopped replica is the run's one faulty replica.
    pub crash_stop_per_mille: u32,
    /// Chance that a crashed correct replica restarts without its log, per mille: it comes back
    /// empty in a new USIG epoch, which the group must install before it counts
    /// (docs/PROTOCOL.md §8), and fetches the state.
    pub amnesia_per_mille: u32,
    /// Chance that such a restart keeps the part of a damaged log before the damage instead,
    /// per mille: a prefix of its inputs, cut anywhere from none to all, from which it moves
    /// to a new USIG epoch all the same, as the node's fallback does.
    pub damaged_log_per_mille: u32,
    /// Chance that a Byzantine replica starts a new USIG epoch during the fault phase (grid
    /// settings), per mille: the group must install it while the adversary replays the old
    /// epoch's messages.
    pub byzantine_epoch_per_mille: u32,
    /// A rogue client session sends malformed, forged and duplicate requests during the fault
    /// phase.
    pub rogue_client: bool,

    /// The seed picks the replicas' state-transfer strategy (`(seed / 10) % 4` into
    /// [`tessera_types::TransferStrategy::ALL`], so every block of ten seeds, one per setting,
    /// shares one and any forty cover every pair); `false` keeps `protocol.state_transfer`.
    pub transfer_strategy_from_seed: bool,

    /// A deliberate protocol bug planted in every correct replica (proof the checkers can fail).
    #[cfg(feature = "planted-bugs")]
    pub planted_bug: Option<tessera_core::PlantedBug>,
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
            events_max: 200_000,
            message_bytes_max: 256 << 20,
            trace: false,
            random_network_faults: true,
            swizzle_per_mille: 250,
            mutation_rounds: 0,
            network_fault_rounds: 0,
            seq_rounds: 24,
            view_rounds: 3,
            byzantine_replicas: 0,
            twins_per_mille: 0,
            slow_per_mille: 0,
            corrupt_replies: false,
            crash_per_mille: 250,
            crash_stop_per_mille: 400,
            amnesia_per_mille: 500,
            damaged_log_per_mille: 500,
            byzantine_epoch_per_mille: 200,
            rogue_client: true,
            transfer_strategy_from_seed: true,
            #[cfg(feature = "planted-bugs")]
            planted_bug: None,
        }
    }
}

/// A named campaign setting: the chaos network, or one cell of ByzzFuzz's grid.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Setting {
    /// Random drops, duplicates, delays, partitions and swizzles during the fault phase, crashes,
    /// a rogue client; every replica correct.
    Chaos,
    /// ByzzFuzz cell: f Byzantine replicas (sometimes Twins, sometimes slow) tampering in `c`
    /// rounds, `d` rounds cut by partitions, crashes, a rogue client; reordering delays only.
    Grid {
        /// Mutation rounds.
        c: u32,
        /// Network-fault rounds.
        d: u32,
    },
}

impl Setting {
    /// The nine grid cells (c, d ∈ {0, 1, 2}) and the chaos setting, in campaign order.
    pub const ALL: [Setting; 10] = [
        Setting::Chaos,
        Setting::Grid { c: 0, d: 0 },
        Setting::Grid { c: 0, d: 1 },
        Setting::Grid { c: 0, d: 2 },
        Setting::Grid { c: 1, d: 0 },
        Setting::Grid { c: 1, d: 1 },
        Setting::Grid { c: 1, d: 2 },
        Setting::Grid { c: 2, d: 0 },
        Setting::Grid { c: 2, d: 1 },
        Setting::Grid { c: 2, d: 2 },
    ];

    /// The setting a campaign over the whole grid gives `seed` (seeds cycle through
    /// [`Setting::ALL`], so any 10 consecutive seeds cover every cell).
    pub fn for_seed(seed: u64) -> Setting {
        Setting::ALL[(seed % Setting::ALL.len() as u64) as usize]
    }

    /// Parses `chaos` or `cXdY`.
    pub fn parse(text: &str) -> Option<Setting> {
        if text == "chaos" {
            return Some(Setting::Chaos);
        }
        let rest = text.strip_prefix('c')?;
        let (c, d) = rest.split_once('d')?;
        let (c, d) = (c.parse().ok()?, d.parse().ok()?);
        (c <= 2 && d <= 2).then_some(Setting::Grid { c, d })
    }

    /// Applies this setting to `base` (which supplies the cluster size, workload and timing).
    pub fn apply(self, base: &SimConfig) -> SimConfig {
        let mut config = base.clone();
        match self {
            Setting::Chaos => {
                config.random_network_faults = true;
                config.mutation_rounds = 0;
                config.network_fault_rounds = 0;
                config.byzantine_replicas = 0;
            }
            Setting::Grid { c, d } => {
                config.random_network_faults = false;
                config.mutation_rounds = c;
                config.network_fault_rounds = d;
                config.byzantine_replicas = config.protocol.f;
                config.twins_per_mille = 250;
                config.slow_per_mille = 250;
                // A reordering network, but no random loss: loss is what the d rounds are for.
                config.drop_per_mille = 0;
                config.duplicate_per_mille = 20;
            }
        }
        config
    }
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Chaos => write!(f, "chaos"),
            Setting::Grid { c, d } => write!(f, "c{c}d{d}"),
        }
    }
}

impl SimConfig {
    /// Checks every bound; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        self.protocol
            .validate()
            .map_err(|error| format!("protocol: {error}"))?;
        let checks: [(bool, &str); 13] = [
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
            (
                self.byzantine_replicas < self.protocol.n,
                "byzantine_replicas must leave at least one correct replica",
            ),
            (
                self.swizzle_per_mille <= 1000
                    && self.twins_per_mille <= 1000
                    && self.slow_per_mille <= 1000
                    && self.crash_per_mille <= 1000
                    && self.crash_stop_per_mille <= 1000
                    && self.amnesia_per_mille <= 1000
                    && self.damaged_log_per_mille <= 1000
                    && self.byzantine_epoch_per_mille <= 1000,
                "per-mille chances must be at most 1000",
            ),
            (
                self.mutation_rounds <= 16 && self.network_fault_rounds <= 16,
                "mutation_rounds and network_fault_rounds must be at most 16",
            ),
            (
                self.seq_rounds >= 1 && self.view_rounds >= 1,
                "seq_rounds and view_rounds must be at least 1",
            ),
        ];
        for (holds, message) in checks {
            if !holds {
                return Err(message.to_string());
            }
        }
        Ok(())
    }
}
