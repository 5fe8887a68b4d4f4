//! Tessera's deterministic simulator (issue 3): real protocol cores, a seeded adversary.
//!
//! One `u64` seed fixes everything in a run: the client workload, every message delay, drop,
//! duplicate and reorder, the partitions, and therefore the order in which the **real**
//! [`tessera_core::Replica`] cores (over [`tessera_kv::KvStore`], with
//! [`tessera_usig::hmac::HmacUsig`] and Ed25519-signed client requests) see their inputs.
//! Logical time is advanced by an event queue; the cores' `SetTimer`/`CancelTimer` actions
//! become queue entries. The same seed replays the same run: every processed event is folded
//! into a trace hash, and a test runs seeds twice and compares the hashes.
//!
//! # Driving loop
//!
//! 1. [`Simulation::new`] builds `n` replicas and the simulated clients, and schedules the first
//!    invocations and the fault schedule.
//! 2. [`Simulation::run`] pops the earliest event (ties broken by insertion order), hands it to
//!    a replica (`handle_message`, `handle_request`, `handle_timer`) or a client, carries out the
//!    actions the replica produced through the simulated network, and feeds every observation
//!    to the [`check::Checker`].
//! 3. A run has two phases: a **fault phase** (`fault_phase_ms`) with a lossy, reordering,
//!    partitioned network, then a **heal phase** with a reliable network. The run stops when
//!    every client finished its workload and a settling period passed, or at a hard deadline.
//! 4. The checkers run at the end and the [`Report`] lists every violation.
//!
//! # Faults
//!
//! - **Network** ([`Setting::Chaos`]): per-message random delay (which also reorders), drop,
//!   duplicate, group partitions that come and go, and swizzles (links cut one by one, healed one
//!   by one in another random order) during the fault phase. Client links suffer delays, drops
//!   and duplicates but are never partitioned.
//! - **ByzzFuzz rounds** ([`Setting::Grid`]): `c` protocol rounds (a sequence number or a view,
//!   see [`adversary::Round`]) in which Byzantine replicas tamper with their messages, and `d`
//!   rounds whose messages are cut by a random partition; c, d ∈ {0, 1, 2}.
//! - **Byzantine replicas** ([`adversary`]): f replicas run the real core behind an adversary
//!   that, per receiver, passes, withholds, replays, forges (mutated under the old UI) or
//!   re-certifies (mutated under a fresh UI from the replica's own USIG) each message of a
//!   mutation round: small-scope mutations of view, sequence number, counter, digests, batch
//!   contents, VIEW-CHANGE logs, NEW-VIEW certificates and state snapshots, and lies in
//!   heartbeats. Sometimes the Byzantine replica is slow but not silent (every message held
//!   back by 40–90% of the request timeout), sometimes it runs as **Twins**: two cores with one
//!   identity sharing one USIG, each peer talking to one of them.
//! - **Crashes**: a replica (any) stops for a while and restarts with its durable state; messages
//!   to it meanwhile are lost, timers that expired fire on restart. Within the fault budget a
//!   correct replica may instead come back without its log, or with the part of a damaged log
//!   before the damage, in a new USIG epoch (docs/TESTING.md).
//! - **A rogue client** sends requests forged in honest sessions' names, badly signed requests,
//!   validly signed garbage, far-future request numbers and replays of its own requests.
//!
//! # Checkers (every run; see [`check`] and [`linearizability`])
//!
//! Agreement (no two correct replicas execute different batches at one sequence number, via the
//! core's `Action::Executed`; equal state digests at equal progress and at every stable
//! checkpoint), validity (correct replicas execute only validly signed requests some client
//! issued), integrity (no correct replica executes a request twice; replies for one request
//! agree), linearizability of the client history (per key, Wing–Gong/Lowe search), bounded
//! liveness (every request completes within `liveness_bound_ms` of the later of its invocation
//! and the heal), convergence of all replicas at the end when every replica is correct, and no
//! runaway runs (`events_max`).
//!
//! # Proof the checkers can fail
//!
//! The core's planted-bug catalogue (`tessera-core` feature `planted-bugs`, never enabled in a
//! production build) is run by the `tessera-planted` test crate: each bug must be caught within
//! a stated number of seeds. `tests/campaign.rs` shows that f+1 colluding Byzantine replicas are
//! caught on every seed.

#![forbid(unsafe_code)]

pub mod adversary;
pub mod check;
pub mod config;
pub mod linearizability;
pub mod rng;
mod sim;
pub mod workload;

pub use check::Violation;
pub use config::{Setting, SimConfig};
pub use sim::{FaultPlan, NodeSummary, Report, Role, Simulation};

/// Runs one seed with `config` and returns its report.
pub fn run_seed(config: &SimConfig, seed: u64) -> Report {
    Simulation::new(config.clone(), seed).run()
}
