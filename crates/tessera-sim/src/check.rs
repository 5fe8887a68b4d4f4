//! Checkers: what must hold in every run, fed with observations while the run goes and
//! completed by end-of-run checks. Each failure is a [`Violation`] naming the values involved.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tessera_crypto::Digest;
use tessera_types::{ClientId, Reply, Request};

use crate::workload::Operation;

/// A broken property, with enough detail to start debugging from the seed's trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two replicas reported different states after executing up to the same sequence number.
    StateDivergence {
        seq: u64,
        first: (u32, Digest),
        second: (u32, Digest),
    },
    /// Two stable checkpoints at the same sequence number certify different digests.
    CheckpointDivergence {
        seq: u64,
        first: (u32, Digest),
        second: (u32, Digest),
    },
    /// A replica replied to a request number its client never issued.
    ReplyForUnissuedRequest {
        replica: u32,
        client: ClientId,
        request_number: u64,
        issued: u64,
    },
    /// Replies for one request carry different results (it was executed more than once, or
    /// differently by different replicas).
    ConflictingResults {
        client: ClientId,
        request_number: u64,
        first_replica: u32,
        second_replica: u32,
    },
    /// The agreed result does not decode as a key-value response.
    UndecodableResult {
        client: ClientId,
        request_number: u64,
    },
    /// A request did not complete within the liveness bound after the heal.
    NotLive {
        client: ClientId,
        request_number: u64,
        invoke_ms: u64,
        deadline_ms: u64,
        completed_ms: Option<u64>,
    },
    /// After the heal and the settling period, replicas still differ in progress or state.
    NotConverged { replicas: Vec<(u32, u64, Digest)> },
    /// The run hit `events_max` before finishing.
    EventLimit { events: u64, now_ms: u64 },
    /// Two correct replicas executed different batches at the same sequence number.
    BatchDivergence {
        seq: u64,
        first: (u32, Digest),
        second: (u32, Digest),
    },
    /// A correct replica executed a request no client issued (or one whose operation differs
    /// from what its client issued under that number).
    NotIssued {
        replica: u32,
        seq: u64,
        client: ClientId,
        request_number: u64,
    },
    /// A correct replica executed one request twice.
    ExecutedTwice {
        replica: u32,
        client: ClientId,
        request_number: u64,
    },
    /// The client history has no linearization (explanation from the checker).
    NotLinearizable { explanation: String },
    /// A correct replica rebuilt from its input log after a crash is not the replica that
    /// crashed (the core is not deterministic in its inputs, so a restart could contradict
    /// what the replica said before).
    ReplayDiverged {
        replica: u32,
        crashed: String,
        replayed: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::ReplayDiverged {
                replica,
                crashed,
                replayed,
            } => write!(
                f,
                "durability: replica {replica} replayed from its input log is {replayed}, \
                 but it crashed as {crashed}"
            ),
            Violation::StateDivergence { seq, first, second } => write!(
                f,
                "agreement: replica {} had state {} and replica {} had state {} after seq {seq}",
                first.0, first.1, second.0, second.1
            ),
            Violation::CheckpointDivergence { seq, first, second } => write!(
                f,
                "agreement: stable checkpoint at seq {seq} is {} at replica {} but {} at replica {}",
                first.1, first.0, second.1, second.0
            ),
            Violation::ReplyForUnissuedRequest {
                replica,
                client,
                request_number,
                issued,
            } => write!(
                f,
                "integrity: replica {replica} replied to {client:?} request {request_number}, \
                 but the client issued only up to {issued}"
            ),
            Violation::ConflictingResults {
                client,
                request_number,
                first_replica,
                second_replica,
            } => write!(
                f,
                "integrity: replicas {first_replica} and {second_replica} gave different results \
                 for {client:?} request {request_number}"
            ),
            Violation::UndecodableResult {
                client,
                request_number,
            } => write!(
                f,
                "validity: agreed result for {client:?} request {request_number} is not a kv response"
            ),
            Violation::NotLive {
                client,
                request_number,
                invoke_ms,
                deadline_ms,
                completed_ms,
            } => write!(
                f,
                "liveness: {client:?} request {request_number} invoked at {invoke_ms} ms, due by \
                 {deadline_ms} ms, completed at {completed_ms:?}"
            ),
            Violation::NotConverged { replicas } => {
                write!(f, "convergence: replicas differ at the end:")?;
                for (replica, seq, digest) in replicas {
                    write!(f, " r{replica}@{seq}={digest}")?;
                }
                Ok(())
            }
            Violation::EventLimit { events, now_ms } => write!(
                f,
                "limit: {events} events processed by {now_ms} ms without finishing (or the \
                 message_bytes_max bound was hit: runaway message growth)"
            ),
            Violation::BatchDivergence { seq, first, second } => write!(
                f,
                "agreement: replica {} executed batch {} at seq {seq} but replica {} executed {}",
                first.0, first.1, second.0, second.1
            ),
            Violation::NotIssued {
                replica,
                seq,
                client,
                request_number,
            } => write!(
                f,
                "validity: replica {replica} executed {client:?} request {request_number} at seq \
                 {seq}, which that client never issued"
            ),
            Violation::ExecutedTwice {
                replica,
                client,
                request_number,
            } => write!(
                f,
                "integrity: replica {replica} executed {client:?} request {request_number} twice"
            ),
            Violation::NotLinearizable { explanation } => {
                write!(f, "linearizability: {explanation}")
            }
        }
    }
}

/// Observes a run and collects violations.
#[derive(Default)]
pub struct Checker {
    /// seq -> the first (replica, state digest) seen right after executing up to seq.
    states: BTreeMap<u64, (u32, Digest)>,
    /// seq -> the first (replica, digest) of a stable checkpoint at seq.
    checkpoints: BTreeMap<u64, (u32, Digest)>,
    /// Per replica: the last (last_executed, stable checkpoint seq) observed, to sample changes.
    last_seen: BTreeMap<u32, (u64, u64)>,
    /// (client, request number) -> (first replying replica, result).
    results: BTreeMap<(ClientId, u64), (u32, Vec<u8>)>,
    /// (client, request number) -> digest of every validly signed request a client issued.
    issued: BTreeMap<(ClientId, u64), BTreeSet<Digest>>,
    /// seq -> the first (replica, batch digest) a correct replica executed there.
    batches: BTreeMap<u64, (u32, Digest)>,
    /// Per correct replica, the requests its current state holds as executed, and where.
    executed: BTreeMap<u32, BTreeMap<(ClientId, u64), u64>>,
    /// Linearizability checks that ran out of search budget (not violations).
    pub inconclusive_linearizability: u64,
    /// Everything found so far, in the order found.
    pub violations: Vec<Violation>,
}

impl Checker {
    /// A replica's progress after one of its steps; compares it with every other replica.
    pub fn observe_progress(
        &mut self,
        replica: u32,
        last_executed: u64,
        state: Digest,
        checkpoint: (u64, Digest),
    ) {
        let (seen_executed, seen_checkpoint) =
            self.last_seen.get(&replica).copied().unwrap_or((0, 0));
        if last_executed != seen_executed {
            if let Some(violation) = record(&mut self.states, last_executed, replica, state) {
                self.violations.push(Violation::StateDivergence {
                    seq: last_executed,
                    first: violation.0,
                    second: violation.1,
                });
            }
        }
        if checkpoint.0 != seen_checkpoint {
            if let Some(violation) =
                record(&mut self.checkpoints, checkpoint.0, replica, checkpoint.1)
            {
                self.violations.push(Violation::CheckpointDivergence {
                    seq: checkpoint.0,
                    first: violation.0,
                    second: violation.1,
                });
            }
        }
        self.last_seen
            .insert(replica, (last_executed, checkpoint.0));
    }

    /// `replica` restarted in a new USIG epoch from the state it had reached by executing up
    /// to `kept_seq`: the kept part of a damaged log, or nothing (`kept_seq` 0, a lost log). A
    /// new incarnation, whose executions from now on must agree with everyone's.
    ///
    /// Exactly-once holds per state, not per process. Forgetting everything the replica
    /// executed, which is right for an empty restart, would be too lenient for a kept prefix:
    /// the requests executed up to `kept_seq` are still in its state, and executing one again
    /// would apply it twice there, so they stay on its record. Those executed after are not
    /// in the kept state, and the new incarnation may execute them again (at the same sequence
    /// numbers: batch agreement still checks that), so they are forgotten. This relies on a
    /// replica executing in sequence order and on transfers only moving it forward, so that
    /// everything above `kept_seq` was executed after the cut. Its progress went back to
    /// `kept_seq`, so what was last seen of it is forgotten too: its next step compares its
    /// kept state with everyone's there.
    pub fn restart_replica(&mut self, replica: u32, kept_seq: u64) {
        if let Some(executed) = self.executed.get_mut(&replica) {
            executed.retain(|_, seq| *seq <= kept_seq);
        }
        self.last_seen.remove(&replica);
    }

    /// A client issued `request` (validly signed): only such requests may be executed.
    pub fn observe_issued(&mut self, request: &Request) {
        self.issued
            .entry((request.client, request.request_number))
            .or_default()
            .insert(request.digest());
    }

    /// A reply a correct replica emitted (before the network touches it).
    pub fn observe_reply(&mut self, reply: &Reply) {
        let key = (reply.client, reply.request_number);
        if !self.issued.contains_key(&key) {
            let issued = self
                .issued
                .range((reply.client, 0)..=(reply.client, u64::MAX))
                .next_back()
                .map_or(0, |((_, number), _)| *number);
            self.violations.push(Violation::ReplyForUnissuedRequest {
                replica: reply.replica.0,
                client: reply.client,
                request_number: reply.request_number,
                issued,
            });
            return;
        }
        match self.results.get(&key) {
            None => {
                self.results
                    .insert(key, (reply.replica.0, reply.result.clone()));
            }
            Some((first_replica, result)) if *result != reply.result => {
                self.violations.push(Violation::ConflictingResults {
                    client: reply.client,
                    request_number: reply.request_number,
                    first_replica: *first_replica,
                    second_replica: reply.replica.0,
                });
            }
            Some(_) => {}
        }
    }

    /// A correct replica executed `batch` at `seq`; `executed` lists the requests of it that
    /// ran (the others were duplicates). Checks agreement on the batch, validity of every
    /// request in it, and that nothing runs twice at this replica.
    pub fn observe_executed(
        &mut self,
        replica: u32,
        seq: u64,
        batch_digest: Digest,
        batch: &[Request],
        executed: &[(ClientId, u64)],
    ) {
        if let Some((first, second)) = record(&mut self.batches, seq, replica, batch_digest) {
            self.violations
                .push(Violation::BatchDivergence { seq, first, second });
        }
        for request in batch {
            let key = (request.client, request.request_number);
            let issued = self
                .issued
                .get(&key)
                .is_some_and(|digests| digests.contains(&request.digest()));
            if !issued {
                self.violations.push(Violation::NotIssued {
                    replica,
                    seq,
                    client: request.client,
                    request_number: request.request_number,
                });
            }
        }
        let done = self.executed.entry(replica).or_default();
        for &(client, request_number) in executed {
            if done.insert((client, request_number), seq).is_some() {
                self.violations.push(Violation::ExecutedTwice {
                    replica,
                    client,
                    request_number,
                });
            }
        }
    }

    /// End of run: the client history must be linearizable. Returns the search states explored.
    pub fn check_linearizability(&mut self, history: &[Operation]) -> u64 {
        use crate::linearizability::{check_history, Outcome};
        match check_history(history) {
            Ok(Outcome::Linearizable(stats)) => stats.states_explored,
            // Out of search budget is not evidence of a bug: counted, never reported as one.
            Ok(Outcome::Inconclusive { stats, .. }) => {
                self.inconclusive_linearizability += 1;
                stats.states_explored
            }
            Err(violation) => {
                self.violations.push(Violation::NotLinearizable {
                    explanation: violation.to_string(),
                });
                0
            }
        }
    }

    /// End of run: every operation completed within the bound after `max(invoke, heal)`.
    pub fn check_liveness(&mut self, history: &[Operation], heal_ms: u64, bound_ms: u64) {
        for operation in history {
            let deadline_ms = operation.invoke_ms.max(heal_ms) + bound_ms;
            let completed_ms = operation.completion.as_ref().map(|(at, _)| *at);
            if completed_ms.is_none_or(|at| at > deadline_ms) {
                self.violations.push(Violation::NotLive {
                    client: operation.client,
                    request_number: operation.request_number,
                    invoke_ms: operation.invoke_ms,
                    deadline_ms,
                    completed_ms,
                });
            }
        }
    }

    /// End of run: all replicas executed up to the same sequence number with the same state.
    pub fn check_convergence(&mut self, replicas: Vec<(u32, u64, Digest)>) {
        let first = replicas.first().map(|(_, seq, digest)| (*seq, *digest));
        if replicas
            .iter()
            .any(|(_, seq, digest)| Some((*seq, *digest)) != first)
        {
            self.violations.push(Violation::NotConverged { replicas });
        }
    }
}

/// Records `digest` for `seq` from `replica`; returns the conflicting pair if another replica
/// recorded a different digest there first.
fn record(
    map: &mut BTreeMap<u64, (u32, Digest)>,
    seq: u64,
    replica: u32,
    digest: Digest,
) -> Option<((u32, Digest), (u32, Digest))> {
    match map.get(&seq) {
        None => {
            map.insert(seq, (replica, digest));
            None
        }
        Some(first) if first.1 != digest => Some((*first, (replica, digest))),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executed_at(checker: &mut Checker, replica: u32, seq: u64, request: (ClientId, u64)) {
        let batch_digest = Digest::of("test batch", &seq.to_le_bytes());
        checker.observe_executed(replica, seq, batch_digest, &[], &[request]);
    }

    #[test]
    fn a_restarted_replica_answers_for_what_its_kept_state_executed() {
        let client = ClientId::new(0, 0);
        let mut checker = Checker::default();
        executed_at(&mut checker, 1, 3, (client, 1));
        executed_at(&mut checker, 1, 7, (client, 2));
        // Kept up to seq 5: request 2 is not in its state any more, request 1 is.
        checker.restart_replica(1, 5);
        executed_at(&mut checker, 1, 7, (client, 2));
        assert!(checker.violations.is_empty(), "{:?}", checker.violations);
        executed_at(&mut checker, 1, 8, (client, 1));
        assert_eq!(
            checker.violations,
            [Violation::ExecutedTwice {
                replica: 1,
                client,
                request_number: 1
            }]
        );
        // An empty restart keeps nothing.
        checker.restart_replica(1, 0);
        executed_at(&mut checker, 1, 3, (client, 1));
        assert_eq!(checker.violations.len(), 1);
    }
}
