//! Linearizability of the recorded client history: a Wing–Gong search with Lowe's memoization.
//!
//! Owns the decision "is there an order of the history's operations that respects real time and
//! the key-value semantics, starting from an empty store". Linearizability is compositional, so
//! the history is split into partitions of keys (one per key, merged by union-find where one
//! command names several keys) and each partition is searched alone with a small model of the
//! store holding only its keys. This module must never report a violation it has not proven:
//! when the search runs out of its state budget the answer is [`Outcome::Inconclusive`], not an
//! error.
//!
//! # Rules the search applies
//!
//! - Real time: operation A must precede B only if A completed strictly before B was invoked
//!   (`completion_ms < invoke_ms`); equal timestamps are concurrent, because logical
//!   milliseconds do not order two events of the same millisecond.
//! - An operation with no completion may have taken effect at any time after its invocation,
//!   or never. It imposes no result and no deadline, and the search succeeds once every
//!   *completed* operation is placed (an unknown one left over is one that never took effect).
//! - A completed operation refused for a configured limit (key, value or result size, key
//!   count, store full, malformed) changed nothing, and whether it should have been refused
//!   depends on limits and on keys outside its partition; it is counted in
//!   [`CheckStats::refusals_unchecked`] and otherwise ignored. Refusals that depend on the
//!   partition's state (`NotAnInteger`, `Overflow`) and `EmptyKeyList` are checked.
//!
//! # Search
//!
//! Completed operations' invocations and completions sit in one time-ordered linked list. The
//! invocations before the first completion in the list are the operations that may go next; one
//! is applied to the model, its result compared with the recorded one, and it is lifted out of
//! the list; a dead end pops it back (explicit stack: histories have thousands of operations
//! per key). Unknown operations are tried only after the completed candidates, so the search
//! first assumes they did nothing.
//!
//! A configuration is (completed operations placed, unknown operations applied, model state).
//! One is skipped if a configuration with the same placed operations and state was already
//! reached with a *subset* of its unknown operations applied: every completion of the larger
//! one is also a completion of the smaller one, whose extra unknown operations may simply never
//! take effect. Unknown operations are compared by command, not identity (see
//! `AppliedUnknown`): once invoked, a left-out one stays available forever, so which of two
//! equal commands was applied does not matter.
//!
//! # Limits
//!
//! Proving a violation explores every configuration before it. Each unknown write that could
//! explain a read multiplies them, so a key with many unknown writes (hundreds over a few
//! thousand operations) can exhaust the budget: the answer is then inconclusive, never a
//! violation. The simulator's histories have few unknown operations (those still outstanding
//! when the run stops), which the search handles in milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use tessera_kv::{Command, KvError, Response, SetCondition};

use crate::workload::Operation;

/// Default for the `states_max` budget of [`check_history_with_limit`]. Measured on one key
/// with many unknown writes: 2 million states take about 120 MB and 20 s in a debug build.
pub const DEFAULT_STATES_MAX: u64 = 2_000_000;

/// Lines of the longest prefix that [`NotLinearizable`]'s `Display` shows (its end).
const PREFIX_LINES_MAX: usize = 10;
/// Lines of operations left out of the prefix that [`NotLinearizable`]'s `Display` shows.
const LEFT_OUT_LINES_MAX: usize = 25;

/// The model state of one partition: the present keys and their values.
pub type State = BTreeMap<Vec<u8>, Vec<u8>>;

/// What a finished check looked at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Independent groups of keys searched separately.
    pub partitions: usize,
    /// Operations given to the search (unknown reads and limit refusals are left out).
    pub operations_checked: usize,
    /// Completed operations refused for a configured limit, accepted without a check.
    pub refusals_unchecked: usize,
    /// Configurations the search stored, over all partitions.
    pub states_explored: u64,
}

/// A check that did not find a violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every partition has an order that explains every completed result.
    Linearizable(CheckStats),
    /// Some partitions exhausted the state budget before an answer; no violation was found in
    /// the others. Not evidence of a bug: rerun with a larger budget or a shorter history.
    Inconclusive {
        stats: CheckStats,
        /// The keys of every partition that ran out of states.
        undecided_keys: Vec<Vec<u8>>,
    },
}

/// Proof that a partition of the history has no linearization.
#[derive(Clone, Debug)]
pub struct NotLinearizable {
    /// The partition's keys (empty for commands that name no key).
    pub keys: Vec<Vec<u8>>,
    /// The partition's checked operations, sorted by invocation.
    pub operations: Vec<Operation>,
    /// The longest sequence of `operations` (indices) the search could linearize.
    pub longest_prefix: Vec<usize>,
    /// The model state after `longest_prefix`.
    pub state_after_prefix: State,
}

/// Checks `history` with the [`DEFAULT_STATES_MAX`] budget per partition.
pub fn check_history(history: &[Operation]) -> Result<Outcome, NotLinearizable> {
    check_history_with_limit(history, DEFAULT_STATES_MAX)
}

/// Checks `history` (recorded from an empty store), exploring at most `states_max` (≥ 1)
/// states per partition, so a hard key cannot starve the others. A violation in any partition
/// is returned even if another one ran out of states.
///
/// # Panics
/// If `states_max` is 0, or an operation completed before it was invoked (a recorder bug).
pub fn check_history_with_limit(
    history: &[Operation],
    states_max: u64,
) -> Result<Outcome, NotLinearizable> {
    assert!(states_max >= 1, "states_max must be at least 1");
    for operation in history {
        if let Some((completion_ms, _)) = &operation.completion {
            assert!(
                *completion_ms >= operation.invoke_ms,
                "operation {} of client {:?} completed at {completion_ms} ms before its \
                 invocation at {} ms",
                operation.request_number,
                operation.client,
                operation.invoke_ms
            );
        }
    }
    let refusals_unchecked = history.iter().filter(|op| is_limit_refusal(op)).count();
    let checked: Vec<&Operation> = history.iter().filter(|op| is_checked(op)).collect();
    let partitions = partition(&checked);
    let mut stats = CheckStats {
        partitions: partitions.len(),
        operations_checked: checked.len(),
        refusals_unchecked,
        states_explored: 0,
    };
    let mut undecided_keys = Vec::new();
    for (keys, operations) in partitions {
        let mut search = Search::new(&operations, states_max);
        let end = search.run();
        stats.states_explored += search.states;
        match end {
            End::Linearizable => {}
            End::OutOfStates => undecided_keys.extend(keys),
            End::Violation => return Err(search.violation(keys)),
        }
    }
    if undecided_keys.is_empty() {
        Ok(Outcome::Linearizable(stats))
    } else {
        Ok(Outcome::Inconclusive {
            stats,
            undecided_keys,
        })
    }
}

/// A completed operation refused for a configured limit (see the module docs).
fn is_limit_refusal(operation: &Operation) -> bool {
    matches!(
        &operation.completion,
        Some((
            _,
            Response::Error(
                KvError::Malformed(_)
                    | KvError::KeyTooLarge { .. }
                    | KvError::ValueTooLarge { .. }
                    | KvError::TooManyKeys { .. }
                    | KvError::StoreFull { .. }
                    | KvError::ResultTooLarge { .. }
            )
        ))
    )
}

/// Everything but limit refusals and unknown reads, which constrain nothing.
fn is_checked(operation: &Operation) -> bool {
    let unknown_read = operation.completion.is_none() && operation.command.is_read_only();
    !unknown_read && !is_limit_refusal(operation)
}

/// The keys a command names, repeats included. DBSIZE and FLUSHDB read or write every key,
/// which per-key partitioning cannot express; the simulator's workload does not generate them
/// (their semantics are tested against a model in tessera-kv/tests/model.rs).
fn command_keys(command: &Command) -> Vec<&[u8]> {
    command.keys()
}

/// Groups operations into partitions of keys (union-find over keys; commands naming no key
/// form a partition of their own), each with its sorted keys and its operations sorted by
/// invocation. Partitions come in the order their first key was seen.
fn partition<'a>(operations: &[&'a Operation]) -> Vec<(Vec<Vec<u8>>, Vec<&'a Operation>)> {
    let mut key_ids: BTreeMap<&[u8], usize> = BTreeMap::new();
    let mut parent: Vec<usize> = Vec::new();
    for operation in operations {
        let mut first = None;
        for key in command_keys(&operation.command) {
            let id = *key_ids.entry(key).or_insert_with(|| {
                parent.push(parent.len());
                parent.len() - 1
            });
            match first {
                None => first = Some(id),
                Some(first) => {
                    let (a, b) = (root(&mut parent, first), root(&mut parent, id));
                    parent[a.max(b)] = a.min(b);
                }
            }
        }
    }
    // Group id: the root key id, or `usize::MAX` for commands naming no key.
    let mut groups: BTreeMap<usize, (Vec<Vec<u8>>, Vec<&Operation>)> = BTreeMap::new();
    for (key, id) in &key_ids {
        let group = root(&mut parent, *id);
        groups.entry(group).or_default().0.push(key.to_vec());
    }
    for operation in operations {
        let group = command_keys(&operation.command)
            .first()
            .map_or(usize::MAX, |key| root(&mut parent, key_ids[key]));
        groups.entry(group).or_default().1.push(operation);
    }
    let mut partitions: Vec<_> = groups.into_values().collect();
    for (_, operations) in &mut partitions {
        operations.sort_by_key(|operation| operation.invoke_ms);
    }
    partitions
}

/// Union-find root of `id`, halving the path on the way.
fn root(parent: &mut [usize], mut id: usize) -> usize {
    while parent[id] != id {
        parent[id] = parent[parent[id]];
        id = parent[id];
    }
    id
}

/// Applies `command` to the model as `tessera_kv::KvStore::apply` does, without the configured
/// limits (their refusals are not checked, see the module docs).
fn apply(state: &mut State, command: &Command) -> Response {
    let names_no_key = match command {
        Command::Del { keys } | Command::Exists { keys } | Command::MGet { keys } => {
            keys.is_empty()
        }
        Command::MSet { pairs } => pairs.is_empty(),
        _ => false,
    };
    if names_no_key {
        return Response::Error(KvError::EmptyKeyList);
    }
    match command {
        Command::Get { key } => Response::Value(state.get(key).cloned()),
        Command::Set { key, value } => {
            state.insert(key.clone(), value.clone());
            Response::Ok
        }
        Command::Del { keys } => {
            let deleted = keys.iter().filter(|key| state.remove(*key).is_some());
            Response::Count(deleted.count() as u64)
        }
        Command::Exists { keys } => {
            let existing = keys.iter().filter(|key| state.contains_key(*key));
            Response::Count(existing.count() as u64)
        }
        Command::Incr { key, delta } => {
            let current = match state.get(key) {
                None => 0,
                Some(text) => match parse_integer(text) {
                    Some(value) => value,
                    None => return Response::Error(KvError::NotAnInteger),
                },
            };
            let Some(updated) = current.checked_add(*delta) else {
                return Response::Error(KvError::Overflow);
            };
            state.insert(key.clone(), updated.to_string().into_bytes());
            Response::Integer(updated)
        }
        Command::MGet { keys } => {
            Response::Values(keys.iter().map(|key| state.get(key).cloned()).collect())
        }
        Command::MSet { pairs } => {
            for (key, value) in pairs {
                state.insert(key.clone(), value.clone());
            }
            Response::Ok
        }
        Command::CompareAndSet { key, expected, new } => {
            let current = state.get(key);
            if current != expected.as_ref() {
                let current = current.cloned();
                return Response::CompareAndSet {
                    swapped: false,
                    current,
                };
            }
            match new {
                None => state.remove(key),
                Some(value) => state.insert(key.clone(), value.clone()),
            };
            Response::CompareAndSet {
                swapped: true,
                current: new.clone(),
            }
        }
        Command::SetIf {
            key,
            value,
            condition,
            get,
        } => {
            let previous = state.get(key).cloned();
            let write = match condition {
                SetCondition::Always => true,
                SetCondition::IfAbsent => previous.is_none(),
                SetCondition::IfPresent => previous.is_some(),
            };
            if write {
                state.insert(key.clone(), value.clone());
            }
            match (get, write) {
                (true, _) => Response::Value(previous),
                (false, true) => Response::Ok,
                (false, false) => Response::Value(None),
            }
        }
        Command::Append { key, value } => {
            let joined = state.entry(key.clone()).or_default();
            joined.extend_from_slice(value);
            Response::Count(joined.len() as u64)
        }
        Command::Strlen { key } => Response::Count(state.get(key).map_or(0, Vec::len) as u64),
        Command::GetDel { key } => Response::Value(state.remove(key)),
        Command::DbSize => Response::Count(state.len() as u64),
        Command::FlushDb => {
            let deleted = state.len() as u64;
            state.clear();
            Response::Count(deleted)
        }
        // The model has no agreed time, so it cannot say when a key expires: the simulator's
        // workload does not generate expiry commands (their semantics are tested against a
        // timed model in tessera-kv/tests/model.rs, and the agreed time they depend on by the
        // core's own tests, tessera-core/tests/agreed_time.rs). An answer no store gives makes
        // any history that contains one fail loudly rather than pass unchecked.
        Command::SetWithExpiry { .. }
        | Command::Expire { .. }
        | Command::Ttl { .. }
        | Command::Persist { .. }
        | Command::GetEx { .. }
        | Command::ExpireTime { .. } => {
            Response::Error(KvError::Malformed("expiry is not modelled".into()))
        }
    }
}

/// The canonical decimal `i64` text `tessera_kv` accepts for `Incr`: what `i64::to_string`
/// produces, nothing else (no `+`, no leading zero, no `-0`).
fn parse_integer(text: &[u8]) -> Option<i64> {
    let value: i64 = std::str::from_utf8(text).ok()?.parse().ok()?;
    (value.to_string().as_bytes() == text).then_some(value)
}

/// The state after `operation` from `state`, if its recorded result (when it has one) matches.
fn step(state: &State, operation: &Operation) -> Option<State> {
    let mut next = state.clone();
    let response = apply(&mut next, &operation.command);
    match &operation.completion {
        Some((_, recorded)) if *recorded != response => None,
        _ => Some(next),
    }
}

/// How a partition's search ended.
enum End {
    Linearizable,
    Violation,
    OutOfStates,
}

/// An operation placed by the search: a completed one (position in `Search::completed`) or an
/// unknown one (position in `Search::unknown`).
#[derive(Clone, Copy)]
enum Choice {
    Completed(usize),
    Unknown(usize),
}

/// Where the scan for the next candidate stands: at a node of the event list, or among the
/// unknown operations invoked no later than `frontier_ms` (the earliest pending completion).
#[derive(Clone, Copy)]
enum Cursor {
    Events(usize),
    Unknown { position: usize, frontier_ms: u64 },
}

/// One placed operation, with what is needed to undo it and to resume the scan after it.
struct Frame {
    choice: Choice,
    previous: State,
    resume: Cursor,
}

/// The list head of [`Events`]; the list is circular, so reaching it again means the end.
const HEAD: usize = 0;

/// Invocations and completions of the completed operations in time order, invocations first
/// at equal times (equal times are concurrent), as a circular doubly linked list from which a
/// placed operation is lifted and restored in stack order.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Per node: its time, whether it is a completion, and its completed operation (the
    /// position in [`Search::completed`]). `HEAD`'s time is `u64::MAX`.
    node: Vec<(u64, bool, usize)>,
    /// Per completed operation: its invocation and completion nodes.
    call_node: Vec<usize>,
    return_node: Vec<usize>,
}

impl Events {
    /// `completion_ms[position]` closes the interval of the completed operation `position`.
    fn new(invoke_ms: &[u64], completion_ms: &[u64]) -> Events {
        let calls = invoke_ms
            .iter()
            .enumerate()
            .map(|(at, ms)| (*ms, false, at));
        let returns = completion_ms
            .iter()
            .enumerate()
            .map(|(at, ms)| (*ms, true, at));
        let mut node: Vec<(u64, bool, usize)> = calls.chain(returns).collect();
        // `false` (invocation) sorts before `true` (completion) at equal times.
        node.sort_unstable();
        node.insert(HEAD, (u64::MAX, true, usize::MAX));
        let nodes = node.len();
        let (mut call_node, mut return_node) = (vec![0; nodes / 2], vec![0; nodes / 2]);
        for (index, &(_, is_return, position)) in node.iter().enumerate().skip(1) {
            let slot = if is_return {
                &mut return_node
            } else {
                &mut call_node
            };
            slot[position] = index;
        }
        Events {
            next: (1..=nodes).map(|index| index % nodes).collect(),
            prev: (0..nodes)
                .map(|index| (index + nodes - 1) % nodes)
                .collect(),
            node,
            call_node,
            return_node,
        }
    }

    fn lift(&mut self, position: usize) {
        for node in [self.call_node[position], self.return_node[position]] {
            self.next[self.prev[node]] = self.next[node];
            self.prev[self.next[node]] = self.prev[node];
        }
    }

    /// Undoes the latest [`Events::lift`], restoring nodes in reverse order.
    fn unlift(&mut self, position: usize) {
        for node in [self.return_node[position], self.call_node[position]] {
            self.next[self.prev[node]] = node;
            self.prev[self.next[node]] = node;
        }
    }
}

/// Configurations reached: per (placed completed operations, state), the sets of unknown
/// operations applied. The completed set is stored as its count of leading full words and the
/// words after them up to the last set bit: a completed operation must be placed before any
/// operation invoked after its completion, so the placed set is a prefix plus a short window.
type Memo = HashMap<(u32, Box<[u64]>, State), Vec<Box<[u64]>>>;

/// The search over one partition.
struct Search<'a> {
    /// The partition's operations, sorted by invocation.
    operations: &'a [&'a Operation],
    /// Indices in `operations` of the completed and of the unknown ones.
    completed: Vec<usize>,
    unknown: Vec<usize>,
    events: Events,
    state: State,
    placed_completed: Vec<u64>,
    applied_unknown: AppliedUnknown,
    /// Completed operations not placed yet; zero means the partition is linearizable.
    remaining: usize,
    stack: Vec<Frame>,
    memo: Memo,
    states: u64,
    states_max: u64,
    /// The longest stack seen, as indices in `operations`; `best[..low_water]` equals the
    /// stack's bottom, so a new best copies only what changed.
    best: Vec<usize>,
    low_water: usize,
}

impl<'a> Search<'a> {
    fn new(operations: &'a [&'a Operation], states_max: u64) -> Search<'a> {
        let (completed, unknown): (Vec<usize>, Vec<usize>) =
            (0..operations.len()).partition(|&index| operations[index].completion.is_some());
        let invoke_ms: Vec<u64> = completed.iter().map(|&i| operations[i].invoke_ms).collect();
        let completion = |index: &usize| operations[*index].completion.as_ref().map(|(ms, _)| *ms);
        let completion_ms: Vec<u64> = completed.iter().filter_map(completion).collect();
        let unknown_commands: Vec<&Command> = unknown
            .iter()
            .map(|&index| &operations[index].command)
            .collect();
        Search {
            operations,
            events: Events::new(&invoke_ms, &completion_ms),
            placed_completed: vec![0; completed.len().div_ceil(64)],
            applied_unknown: AppliedUnknown::new(&unknown_commands),
            remaining: completed.len(),
            completed,
            unknown,
            state: State::new(),
            stack: Vec::new(),
            memo: Memo::new(),
            states: 0,
            states_max,
            best: Vec::new(),
            low_water: 0,
        }
    }

    fn run(&mut self) -> End {
        let mut cursor = Cursor::Events(self.events.next[HEAD]);
        loop {
            if self.remaining == 0 {
                return End::Linearizable;
            }
            let Some((choice, resume)) = self.next_candidate(cursor) else {
                match self.backtrack() {
                    Some(resume) => cursor = resume,
                    None => return End::Violation,
                }
                continue;
            };
            cursor = resume;
            if self.try_place(choice, resume) {
                if self.states > self.states_max {
                    return End::OutOfStates;
                }
                cursor = Cursor::Events(self.events.next[HEAD]);
            }
        }
    }

    /// The next operation that may go now, from `cursor` on, and where to resume after it.
    fn next_candidate(&self, cursor: Cursor) -> Option<(Choice, Cursor)> {
        let (from, frontier_ms) = match cursor {
            Cursor::Events(node) if !self.events.node[node].1 => {
                let position = self.events.node[node].2;
                let resume = Cursor::Events(self.events.next[node]);
                return Some((Choice::Completed(position), resume));
            }
            Cursor::Events(node) => (0, self.events.node[node].0),
            Cursor::Unknown {
                position,
                frontier_ms,
            } => (position, frontier_ms),
        };
        (from..self.unknown.len())
            .take_while(|&position| {
                self.operations[self.unknown[position]].invoke_ms <= frontier_ms
            })
            .find(|&position| !self.applied_unknown.contains(position))
            .map(|position| {
                let resume = Cursor::Unknown {
                    position: position + 1,
                    frontier_ms,
                };
                (Choice::Unknown(position), resume)
            })
    }

    /// Places `choice` if its result matches and the configuration is new; true if placed.
    fn try_place(&mut self, choice: Choice, resume: Cursor) -> bool {
        let Some(next) = step(&self.state, self.operations[self.index(choice)]) else {
            return false;
        };
        self.mark(choice, true);
        if !self.remember(&next) {
            self.mark(choice, false);
            return false;
        }
        self.states += 1;
        let previous = std::mem::replace(&mut self.state, next);
        self.stack.push(Frame {
            choice,
            previous,
            resume,
        });
        if let Choice::Completed(position) = choice {
            self.events.lift(position);
            self.remaining -= 1;
        }
        if self.stack.len() > self.best.len() {
            self.best.truncate(self.low_water);
            let new = self.stack[self.low_water..]
                .iter()
                .map(|frame| frame.choice);
            let indices: Vec<usize> = new.map(|choice| self.index(choice)).collect();
            self.best.extend(indices);
            self.low_water = self.stack.len();
        }
        true
    }

    /// Stores the configuration reached with `next`; false if it, or one it is dominated by
    /// (same placed completed operations and state, a subset of the unknown ones), was seen.
    fn remember(&mut self, next: &State) -> bool {
        let full = self
            .placed_completed
            .iter()
            .take_while(|word| **word == u64::MAX);
        let full = full.count();
        let end = self.placed_completed.iter().rposition(|word| *word != 0);
        let end = end.map_or(full, |last| (last + 1).max(full));
        let window: Box<[u64]> = self.placed_completed[full..end].into();
        let seen = self
            .memo
            .entry((full as u32, window, next.clone()))
            .or_default();
        let applied = &self.applied_unknown.canonical;
        let dominated = seen.iter().any(|earlier| {
            let mut pairs = earlier.iter().zip(applied.iter());
            pairs.all(|(earlier, now)| earlier & !now == 0)
        });
        if !dominated {
            seen.push(applied.as_slice().into());
        }
        !dominated
    }

    /// Undoes the latest placement; `None` once nothing is left to undo.
    fn backtrack(&mut self) -> Option<Cursor> {
        let frame = self.stack.pop()?;
        self.low_water = self.low_water.min(self.stack.len());
        if let Choice::Completed(position) = frame.choice {
            self.events.unlift(position);
            self.remaining += 1;
        }
        self.mark(frame.choice, false);
        self.state = frame.previous;
        Some(frame.resume)
    }

    fn mark(&mut self, choice: Choice, placed: bool) {
        match (choice, placed) {
            (Choice::Completed(position), _) => {
                set_bit(&mut self.placed_completed, position, placed)
            }
            (Choice::Unknown(position), true) => self.applied_unknown.apply(position),
            (Choice::Unknown(position), false) => self.applied_unknown.unapply(position),
        }
    }

    fn index(&self, choice: Choice) -> usize {
        match choice {
            Choice::Completed(position) => self.completed[position],
            Choice::Unknown(position) => self.unknown[position],
        }
    }

    /// The report for a search that ended in [`End::Violation`].
    fn violation(&self, keys: Vec<Vec<u8>>) -> NotLinearizable {
        let operations = self.operations;
        let mut state_after_prefix = State::new();
        for &index in &self.best {
            apply(&mut state_after_prefix, &operations[index].command);
        }
        NotLinearizable {
            keys,
            operations: operations
                .iter()
                .map(|operation| (*operation).clone())
                .collect(),
            longest_prefix: self.best.clone(),
            state_after_prefix,
        }
    }
}

/// The unknown operations applied so far, also in a canonical form for the memo. Once
/// invoked, an unknown operation left out stays available for the rest of the search, so the
/// future depends only on how many of each distinct command are applied, not on which ones:
/// the canonical form marks, for each class of equal commands, its earliest members. Without
/// it, every read that two equal unknown writes could explain doubles the configurations.
struct AppliedUnknown {
    bits: Vec<u64>,
    canonical: Vec<u64>,
    /// Per unknown operation: its class. Per class: its members by invocation, how many applied.
    class: Vec<usize>,
    members: Vec<Vec<usize>>,
    applied: Vec<usize>,
}

impl AppliedUnknown {
    fn new(unknown: &[&Command]) -> AppliedUnknown {
        let mut classes: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut class = Vec::with_capacity(unknown.len());
        for (position, command) in unknown.iter().enumerate() {
            let next = members.len();
            let id = *classes.entry(command.encode()).or_insert(next);
            if id == next {
                members.push(Vec::new());
            }
            members[id].push(position);
            class.push(id);
        }
        AppliedUnknown {
            bits: vec![0; unknown.len().div_ceil(64)],
            canonical: vec![0; unknown.len().div_ceil(64)],
            applied: vec![0; members.len()],
            class,
            members,
        }
    }

    fn contains(&self, position: usize) -> bool {
        self.bits[position / 64] & (1u64 << (position % 64)) != 0
    }

    fn apply(&mut self, position: usize) {
        let class = self.class[position];
        set_bit(&mut self.bits, position, true);
        let representative = self.members[class][self.applied[class]];
        set_bit(&mut self.canonical, representative, true);
        self.applied[class] += 1;
    }

    /// Undoes an [`AppliedUnknown::apply`] of `position`.
    fn unapply(&mut self, position: usize) {
        let class = self.class[position];
        set_bit(&mut self.bits, position, false);
        self.applied[class] -= 1;
        let representative = self.members[class][self.applied[class]];
        set_bit(&mut self.canonical, representative, false);
    }
}

fn set_bit(bits: &mut [u64], position: usize, value: bool) {
    let mask = 1u64 << (position % 64);
    if value {
        bits[position / 64] |= mask;
    } else {
        bits[position / 64] &= !mask;
    }
}

impl fmt::Display for NotLinearizable {
    /// At most about 40 lines: the end of the longest linearizable prefix, the state it leaves,
    /// and the earliest operations that could not follow it, where the violation is.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> = self.keys.iter().map(|key| show_bytes(key)).collect();
        writeln!(
            formatter,
            "no order of the {} operations on key(s) {} respects both real time and the \
             key-value semantics (from an empty store)",
            self.operations.len(),
            keys.join(", ")
        )?;
        let prefix = &self.longest_prefix;
        let hidden = prefix.len().saturating_sub(PREFIX_LINES_MAX);
        writeln!(
            formatter,
            "longest linearizable prefix found: {} operations{}",
            prefix.len(),
            if hidden > 0 { ", ending with" } else { "" }
        )?;
        for &index in &prefix[hidden..] {
            writeln!(formatter, "  {}", show_operation(&self.operations[index]))?;
        }
        let state = self.keys.iter().map(|key| {
            let value = self.state_after_prefix.get(key);
            format!("{} = {}", show_bytes(key), show_value(value))
        });
        writeln!(
            formatter,
            "state after it: {}",
            state.collect::<Vec<_>>().join(", ")
        )?;
        let mut in_prefix = vec![false; self.operations.len()];
        for &index in prefix {
            in_prefix[index] = true;
        }
        let left_out: Vec<&Operation> = (self.operations.iter().zip(&in_prefix))
            .filter(|(_, placed)| !**placed)
            .map(|(operation, _)| operation)
            .collect();
        writeln!(
            formatter,
            "operations left out of it, by invocation ({} in all):",
            left_out.len()
        )?;
        for operation in left_out.iter().take(LEFT_OUT_LINES_MAX) {
            writeln!(formatter, "  {}", show_operation(operation))?;
        }
        if left_out.len() > LEFT_OUT_LINES_MAX {
            writeln!(
                formatter,
                "  ... {} more",
                left_out.len() - LEFT_OUT_LINES_MAX
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for NotLinearizable {}

/// `c<session> #<request> [invoke, completion] <command> -> <result>`.
fn show_operation(operation: &Operation) -> String {
    let (completion, result) = match &operation.completion {
        Some((at_ms, response)) => (at_ms.to_string(), show_response(response)),
        None => ("?".to_string(), "unknown".to_string()),
    };
    format!(
        "c{} #{} [{}, {}] {} -> {}",
        operation.client.session(),
        operation.request_number,
        operation.invoke_ms,
        completion,
        show_command(&operation.command),
        result
    )
}

fn show_command(command: &Command) -> String {
    let list = |keys: &[Vec<u8>]| {
        let keys: Vec<String> = keys.iter().map(|key| show_bytes(key)).collect();
        keys.join(" ")
    };
    match command {
        Command::Get { key } => format!("get {}", show_bytes(key)),
        Command::Set { key, value } => format!("set {} {}", show_bytes(key), show_bytes(value)),
        Command::Del { keys } => format!("del {}", list(keys)),
        Command::Exists { keys } => format!("exists {}", list(keys)),
        Command::Incr { key, delta } => format!("incr {} by {delta}", show_bytes(key)),
        Command::MGet { keys } => format!("mget {}", list(keys)),
        Command::MSet { pairs } => {
            let pairs = pairs
                .iter()
                .map(|(key, value)| format!("{} {}", show_bytes(key), show_bytes(value)));
            format!("mset {}", pairs.collect::<Vec<_>>().join(" "))
        }
        Command::CompareAndSet { key, expected, new } => format!(
            "cas {} from {} to {}",
            show_bytes(key),
            show_value(expected.as_ref()),
            show_value(new.as_ref())
        ),
        Command::SetIf {
            key,
            value,
            condition,
            get,
        } => format!(
            "set {} {} if {condition:?}{}",
            show_bytes(key),
            show_bytes(value),
            if *get { " and get" } else { "" }
        ),
        Command::Append { key, value } => {
            format!("append {} {}", show_bytes(key), show_bytes(value))
        }
        Command::Strlen { key } => format!("strlen {}", show_bytes(key)),
        Command::GetDel { key } => format!("getdel {}", show_bytes(key)),
        Command::DbSize => "dbsize".to_string(),
        Command::FlushDb => "flushdb".to_string(),
        expiring => format!("{expiring:?}"),
    }
}

fn show_response(response: &Response) -> String {
    match response {
        Response::Value(value) => show_value(value.as_ref()),
        Response::Ok => "ok".to_string(),
        Response::Count(count) => count.to_string(),
        Response::Integer(value) => value.to_string(),
        Response::Values(values) => {
            let values: Vec<String> = values.iter().map(|v| show_value(v.as_ref())).collect();
            format!("[{}]", values.join(", "))
        }
        Response::CompareAndSet { swapped, current } => format!(
            "{}, now {}",
            if *swapped { "swapped" } else { "not swapped" },
            show_value(current.as_ref())
        ),
        Response::Error(error) => format!("error: {error}"),
    }
}

fn show_value(value: Option<&Vec<u8>>) -> String {
    value.map_or_else(|| "absent".to_string(), |value| show_bytes(value))
}

fn show_bytes(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tessera_kv::{KvStore, StateMachine};
    use tessera_types::ClientId;

    use super::*;
    use crate::rng::SimRng;
    use crate::workload::random_command;

    fn bytes(text: &str) -> Vec<u8> {
        text.as_bytes().to_vec()
    }

    fn get(key: &str) -> Command {
        Command::Get { key: bytes(key) }
    }

    fn set(key: &str, value: &str) -> Command {
        let (key, value) = (bytes(key), bytes(value));
        Command::Set { key, value }
    }

    fn incr(key: &str) -> Command {
        Command::Incr {
            key: bytes(key),
            delta: 1,
        }
    }

    fn value(text: &str) -> Response {
        Response::Value(Some(bytes(text)))
    }

    /// A completed operation over `[invoke_ms, completion_ms]`.
    fn done(invoke_ms: u64, completion_ms: u64, command: Command, result: Response) -> Operation {
        Operation {
            client: ClientId::new(1, 0),
            request_number: invoke_ms,
            command,
            invoke_ms,
            completion: Some((completion_ms, result)),
        }
    }

    fn unknown(invoke_ms: u64, command: Command) -> Operation {
        Operation {
            completion: None,
            ..done(invoke_ms, invoke_ms, command, Response::Ok)
        }
    }

    /// True for linearizable, false for a violation; an inconclusive answer fails the test.
    fn linearizable(history: &[Operation]) -> bool {
        match check_history(history) {
            Ok(Outcome::Linearizable(_)) => true,
            Ok(inconclusive) => panic!("unexpected {inconclusive:?}"),
            Err(_) => false,
        }
    }

    #[test]
    fn sequential_histories() {
        assert!(linearizable(&[]));
        let write_then_read = [
            done(0, 10, set("k", "1"), Response::Ok),
            done(20, 30, get("k"), value("1")),
        ];
        assert!(linearizable(&write_then_read));
        let never_written = [done(0, 10, get("k"), value("1"))];
        assert!(!linearizable(&never_written));
        let stale_read = [
            done(0, 10, set("k", "1"), Response::Ok),
            done(20, 30, set("k", "2"), Response::Ok),
            done(40, 50, get("k"), value("1")),
        ];
        assert!(!linearizable(&stale_read));
        let lost_increment = [
            done(0, 10, incr("k"), Response::Integer(1)),
            done(20, 30, incr("k"), Response::Integer(1)),
        ];
        assert!(!linearizable(&lost_increment));
    }

    #[test]
    fn concurrent_histories_need_the_right_order() {
        // Only set 2, read 2, set 1, read 1 explains the reads, against the invocation order.
        let mut history = vec![
            done(0, 50, set("k", "1"), Response::Ok),
            done(0, 50, set("k", "2"), Response::Ok),
            done(10, 20, get("k"), value("2")),
            done(30, 40, get("k"), value("1")),
        ];
        assert!(linearizable(&history));
        // 2, then 1, then 2 again needs a third write.
        history.push(done(45, 60, get("k"), value("2")));
        assert!(!linearizable(&history));
        let overlapping_increments = [
            done(0, 30, incr("k"), Response::Integer(2)),
            done(10, 20, incr("k"), Response::Integer(1)),
        ];
        assert!(linearizable(&overlapping_increments));
        let both_saw_one = [
            done(0, 30, incr("k"), Response::Integer(1)),
            done(10, 20, incr("k"), Response::Integer(1)),
        ];
        assert!(!linearizable(&both_saw_one));
    }

    #[test]
    fn unknown_operations_may_or_may_not_take_effect() {
        let explains_read = [
            unknown(0, set("k", "7")),
            done(50, 60, get("k"), value("7")),
        ];
        assert!(linearizable(&explains_read));
        let never_took_effect = [
            unknown(0, set("k", "7")),
            done(50, 60, get("k"), Response::Value(None)),
            done(70, 80, set("k", "1"), Response::Ok),
        ];
        assert!(linearizable(&never_took_effect));
        let invoked_after_read = [
            done(50, 60, get("k"), value("7")),
            unknown(100, set("k", "7")),
        ];
        assert!(!linearizable(&invoked_after_read));
        // Took effect between two reads, then was overwritten.
        let late_increment = [
            unknown(0, incr("k")),
            done(10, 20, get("k"), Response::Value(None)),
            done(30, 40, incr("k"), Response::Integer(2)),
            done(50, 60, set("k", "5"), Response::Ok),
        ];
        assert!(linearizable(&late_increment));
        // Either unknown write explains the first read, but only the set can explain the
        // second: the configuration reached with the set applied must not hide the one
        // reached with the compare-and-set applied.
        let create = Command::CompareAndSet {
            key: bytes("k"),
            expected: None,
            new: Some(bytes("1")),
        };
        let needs_the_set_last = [
            unknown(0, set("k", "1")),
            unknown(0, create),
            done(10, 20, get("k"), value("1")),
            done(30, 40, set("k", "2"), Response::Ok),
            done(50, 60, get("k"), value("1")),
        ];
        assert!(linearizable(&needs_the_set_last));
    }

    #[test]
    fn equal_timestamps_are_concurrent() {
        let touching = [
            done(0, 10, set("k", "1"), Response::Ok),
            done(10, 20, get("k"), Response::Value(None)),
        ];
        assert!(linearizable(&touching));
        let ordered = [
            done(0, 10, set("k", "1"), Response::Ok),
            done(11, 20, get("k"), Response::Value(None)),
        ];
        assert!(!linearizable(&ordered));
    }

    #[test]
    fn compare_and_set_and_increment_semantics() {
        let cas = |expected: Option<&str>, new: Option<&str>| Command::CompareAndSet {
            key: bytes("k"),
            expected: expected.map(bytes),
            new: new.map(bytes),
        };
        let swap = |swapped: bool, current: Option<&str>| Response::CompareAndSet {
            swapped,
            current: current.map(bytes),
        };
        let history = [
            done(0, 10, cas(None, Some("1")), swap(true, Some("1"))),
            done(20, 30, cas(Some("2"), Some("3")), swap(false, Some("1"))),
            done(40, 50, cas(Some("1"), None), swap(true, None)),
            done(60, 70, get("k"), Response::Value(None)),
        ];
        assert!(linearizable(&history));
        let mut wrong = history.clone();
        wrong[1] = done(20, 30, cas(Some("2"), Some("3")), swap(true, Some("3")));
        assert!(!linearizable(&wrong));
        let not_an_integer = Response::Error(KvError::NotAnInteger);
        let mut increments = vec![
            done(0, 10, set("k", "07"), Response::Ok),
            done(20, 30, incr("k"), not_an_integer.clone()),
            done(40, 50, set("k", &i64::MAX.to_string()), Response::Ok),
            done(60, 70, incr("k"), Response::Error(KvError::Overflow)),
        ];
        assert!(linearizable(&increments));
        increments[1] = done(20, 30, incr("k"), Response::Integer(8));
        assert!(!linearizable(&increments));
        let refused_on_empty = [done(0, 10, incr("k"), not_an_integer)];
        assert!(!linearizable(&refused_on_empty));
    }

    #[test]
    fn multi_key_commands_merge_partitions() {
        let mset = Command::MSet {
            pairs: vec![(bytes("a"), bytes("1")), (bytes("b"), bytes("1"))],
        };
        let mget = Command::MGet {
            keys: vec![bytes("a"), bytes("b")],
        };
        // Each key alone is fine; together the read saw half of an atomic write.
        let torn = [
            done(0, 10, mset, Response::Ok),
            done(0, 20, mget, Response::Values(vec![Some(bytes("1")), None])),
            done(0, 5, set("c", "1"), Response::Ok),
        ];
        let Err(violation) = check_history(&torn) else {
            panic!("a torn read passed")
        };
        assert_eq!(violation.keys, [bytes("a"), bytes("b")]);
        let without_read = &[torn[0].clone(), torn[2].clone()];
        let Ok(Outcome::Linearizable(stats)) = check_history(without_read) else {
            panic!("expected linearizable")
        };
        assert_eq!((stats.partitions, stats.operations_checked), (2, 2));
        let no_keys = Command::Del { keys: vec![] };
        let empty = Response::Error(KvError::EmptyKeyList);
        assert!(linearizable(&[done(0, 1, no_keys.clone(), empty)]));
        assert!(!linearizable(&[done(0, 1, no_keys, Response::Count(0))]));
    }

    #[test]
    fn limit_refusals_are_not_checked() {
        let full = Response::Error(KvError::StoreFull {
            needed: 10,
            limit: 9,
        });
        let history = [
            done(0, 10, set("k", "1"), full),
            done(20, 30, get("k"), Response::Value(None)),
        ];
        let Ok(Outcome::Linearizable(stats)) = check_history(&history) else {
            panic!("expected linearizable")
        };
        assert_eq!((stats.refusals_unchecked, stats.operations_checked), (1, 1));
    }

    /// `operations` commands executed one by one on a real `KvStore` at 10 ms apart; each gets
    /// an interval around its execution point (up to `jitter_ms` each side), and about
    /// `unknown_per_mille` lose their completion (half of those never executed at all).
    fn generated_history(
        seed: u64,
        operations: u64,
        jitter_ms: u64,
        unknown_per_mille: u32,
    ) -> Vec<Operation> {
        let mut rng = SimRng::new(seed, 0);
        let mut store = KvStore::default();
        let mut history = Vec::new();
        for index in 0..operations {
            let command = random_command(&mut rng, 3);
            let point_ms = jitter_ms + 10 * index;
            let invoke_ms = point_ms - rng.below(jitter_ms + 1);
            let completion_ms = point_ms + rng.below(jitter_ms + 1);
            let lost = rng.chance(unknown_per_mille);
            let completion = if lost && rng.chance(500) {
                None
            } else {
                let response = store.apply(command.clone());
                (!lost).then_some((completion_ms, response))
            };
            let client = ClientId::new(1, (index % 8) as u32);
            history.push(Operation {
                client,
                request_number: index,
                command,
                invoke_ms,
                completion,
            });
        }
        history
    }

    #[test]
    fn thousands_of_generated_operations_check_quickly() {
        let history = generated_history(7, 6000, 30, 10);
        let started = Instant::now();
        let outcome = check_history(&history);
        let elapsed = started.elapsed();
        let Ok(Outcome::Linearizable(stats)) = outcome else {
            panic!("a real execution was rejected: {outcome:?}")
        };
        eprintln!("6000 operations: {stats:?} in {elapsed:?}");
        assert_eq!(stats.partitions, 3);
        assert!(stats.states_explored < 2 * 6000, "{stats:?}");
        assert!(elapsed.as_millis() < 1000, "took {elapsed:?}");
        // Corrupt one result from the middle on: a read of a value no operation wrote, or an
        // increment that returns what an earlier one already returned (a lost update).
        let first_completed = |wanted: fn(&Response) -> bool| {
            (3000..).find(|&index| {
                let completion = history[index].completion.as_ref();
                completion.is_some_and(|(_, response)| wanted(response))
            })
        };
        let read = first_completed(|response| matches!(response, Response::Value(Some(_))));
        let read = read.expect("a completed read");
        let increment = first_completed(|response| matches!(response, Response::Integer(2..)));
        let increment = increment.expect("a completed increment");
        let Some((_, Response::Integer(result))) = history[increment].completion else {
            unreachable!("chosen for its integer result")
        };
        let corruptions = [
            (read, value("never written")),
            (increment, Response::Integer(result - 1)),
        ];
        for (index, wrong) in corruptions {
            let mut corrupted = history.clone();
            corrupted[index].completion.as_mut().expect("completed").1 = wrong;
            assert_rejected(&corrupted, index);
        }
    }

    /// The check rejects `history`, whose operation `index` was corrupted, naming its key.
    fn assert_rejected(history: &[Operation], index: usize) {
        let started = Instant::now();
        let Err(violation) = check_history(history) else {
            panic!("corrupted operation {index} passed")
        };
        eprintln!(
            "corrupted operation {index}: rejected in {:?}",
            started.elapsed()
        );
        assert_eq!(violation.keys, command_keys(&history[index].command));
        let report = violation.to_string();
        assert!(report.lines().count() <= 40, "{report}");
        let line = show_operation(&history[index]);
        assert!(report.contains(&line), "{line} missing from {report}");
    }

    #[test]
    fn state_budget_gives_inconclusive_not_violation() {
        let history = generated_history(3, 300, 30, 30);
        let outcome = check_history_with_limit(&history, 10);
        let Ok(Outcome::Inconclusive { undecided_keys, .. }) = outcome else {
            panic!("expected inconclusive, got {outcome:?}")
        };
        assert!(!undecided_keys.is_empty());
        assert!(linearizable(&history));
        // A violation elsewhere is still reported.
        let mut broken = history;
        broken.push(done(0, 1, get("elsewhere"), value("1")));
        assert!(check_history_with_limit(&broken, 10).is_err());
    }

    fn pick(rng: &mut SimRng, from: &[&str]) -> Vec<u8> {
        bytes(from[rng.below(from.len() as u64) as usize])
    }

    /// A random command over keys `a`, `b` and the empty key, with values that are and are not
    /// canonical integers, deltas that overflow, and empty key lists.
    fn random_any_command(rng: &mut SimRng) -> Command {
        const KEYS: [&str; 3] = ["a", "b", ""];
        const VALUES: [&str; 8] = ["0", "1", "07", "-0", "x", "", "9223372036854775807", "-5"];
        let key = pick(rng, &KEYS);
        let keys = |rng: &mut SimRng| (0..rng.below(4)).map(|_| pick(rng, &KEYS)).collect();
        let maybe = |rng: &mut SimRng| rng.chance(700).then(|| pick(rng, &VALUES));
        match rng.below(8) {
            0 => Command::Get { key },
            1 => Command::Set {
                key,
                value: pick(rng, &VALUES),
            },
            2 => Command::Del { keys: keys(rng) },
            3 => Command::Exists { keys: keys(rng) },
            4 => Command::Incr {
                key,
                delta: [1, -1, i64::MAX, i64::MIN][rng.below(4) as usize],
            },
            5 => Command::MGet { keys: keys(rng) },
            6 => {
                let keys: Vec<Vec<u8>> = keys(rng);
                let pairs = keys
                    .into_iter()
                    .map(|key| (key, pick(rng, &VALUES)))
                    .collect();
                Command::MSet { pairs }
            }
            _ => Command::CompareAndSet {
                key,
                expected: maybe(rng),
                new: maybe(rng),
            },
        }
    }

    #[test]
    fn model_agrees_with_kv_store() {
        let mut rng = SimRng::new(11, 0);
        for run in 0..50 {
            let (mut store, mut model) = (KvStore::default(), State::new());
            for _ in 0..200 {
                let command = random_any_command(&mut rng);
                let expected = Response::decode(&store.execute(&command.encode(), 0));
                let got = apply(&mut model, &command);
                assert_eq!(Ok(got), expected, "run {run}: {command:?}");
            }
            for key in [&b"a"[..], b"b", b""] {
                assert_eq!(
                    store.get(key),
                    model.get(key).map(Vec::as_slice),
                    "run {run}"
                );
            }
        }
    }

    /// Every order of a subset of `operations` that keeps every completed one and respects
    /// real time, tried by brute force: the definition, with none of the search's shortcuts.
    fn brute_force(operations: &[Operation], placed: &mut [bool], state: &State) -> bool {
        let pending: Vec<Option<u64>> = (operations.iter().zip(placed.iter()))
            .map(|(operation, placed)| match &operation.completion {
                Some((at_ms, _)) if !placed => Some(*at_ms),
                _ => None,
            })
            .collect();
        if pending.iter().all(Option::is_none) {
            return true;
        }
        for index in 0..operations.len() {
            let invoke_ms = operations[index].invoke_ms;
            let completed_before = pending.iter().flatten().any(|at_ms| *at_ms < invoke_ms);
            if placed[index] || completed_before {
                continue;
            }
            if let Some(next) = step(state, &operations[index]) {
                placed[index] = true;
                if brute_force(operations, placed, &next) {
                    return true;
                }
                placed[index] = false;
            }
        }
        false
    }

    #[test]
    fn search_agrees_with_brute_force_on_small_histories() {
        let mut rng = SimRng::new(5, 0);
        let (mut linearizable_count, mut violations) = (0, 0);
        for run in 0..5000 {
            let (mut state, mut history) = (State::new(), Vec::new());
            for index in 0..rng.between(1, 8) {
                let command = random_any_command(&mut rng);
                // A wrong but plausible result: the one after one more, unrecorded command.
                let mut other = state.clone();
                apply(&mut other, &random_any_command(&mut rng));
                let wrong = apply(&mut other, &command);
                let mut response = apply(&mut state, &command);
                if rng.chance(400) {
                    response = wrong;
                }
                let invoke_ms = 3 * index + rng.below(8);
                let completion_ms = invoke_ms + rng.below(8);
                let mut operation = done(invoke_ms, completion_ms, command, response);
                if rng.chance(300) {
                    operation.completion = None;
                }
                history.push(operation);
            }
            let expected = brute_force(&history, &mut vec![false; history.len()], &State::new());
            assert_eq!(linearizable(&history), expected, "run {run}: {history:#?}");
            (linearizable_count, violations) = match expected {
                true => (linearizable_count + 1, violations),
                false => (linearizable_count, violations + 1),
            };
        }
        // Both answers must be well represented for the comparison to mean anything.
        assert!(
            linearizable_count > 500 && violations > 300,
            "{linearizable_count} {violations}"
        );
    }
}
