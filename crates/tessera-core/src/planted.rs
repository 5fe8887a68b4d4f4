//! Planted bugs: deliberate breaks of single MinBFT safety checks, for testing the checkers.
//!
//! # What it owns
//! The catalogue of bugs ([`PlantedBug`]) and the per-replica set of bugs switched on
//! ([`crate::minbft::Replica::plant_bug`]). Each bug breaks one rule of `docs/PROTOCOL.md` at a
//! few check sites, each marked `// PLANTED BUG (<name>)`. The deterministic simulator plants them
//! to prove that its agreement, validity and exactly-once checkers can fail: a checker that never
//! fires on a planted bug proves nothing when it stays silent on the real protocol.
//!
//! # What it must never do
//! Exist in a production build. The module, the enum and every check site are compiled only
//! under the cargo feature `planted-bugs`; without it the core contains no buggy code path. With
//! the feature but no bug planted, every check behaves exactly as without the feature.

/// One deliberate break of a protocol check. Planted per replica at run time; several may be
/// planted in one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PlantedBug {
    /// USIG certificates are not checked: a failing `verify_ui` counts as success.
    SkipUiVerification,
    /// A slot executes with one vote (the primary's PREPARE) instead of a quorum.
    ExecuteWithoutQuorum,
    /// The NEW-VIEW plan loses its entry with the highest sequence number.
    NewViewDropsLastEntry,
    /// The client table's exactly-once check is skipped at the primary and at execution.
    IgnoreClientTable,
    /// Client signatures are not checked (at the primary and in PREPAREs).
    SkipRequestSignature,
    /// A transferred snapshot is installed without comparing its digest to the certificate.
    TrustStateSnapshot,
    /// A NEW-VIEW needs one VIEW-CHANGE fewer than a quorum (f instead of f+1 when n = 2f+1).
    NewViewFromOneViewChange,
    /// A sender's certified messages are processed as they arrive, skipping counter gaps.
    SkipFifoOrder,
    /// Backups accept any batch at the sequence numbers the NEW-VIEW plan fixes.
    SkipPlanMatch,
    /// A PREPARE from an older view is accepted as if it were of the current view.
    AcceptOldViewPrepare,
    /// f matching CHECKPOINTs (instead of f+1) make a checkpoint stable and a certificate valid.
    StableCheckpointOnF,
}

impl PlantedBug {
    /// Every planted bug, in declaration order.
    pub const ALL: [PlantedBug; 11] = [
        PlantedBug::SkipUiVerification,
        PlantedBug::ExecuteWithoutQuorum,
        PlantedBug::NewViewDropsLastEntry,
        PlantedBug::IgnoreClientTable,
        PlantedBug::SkipRequestSignature,
        PlantedBug::TrustStateSnapshot,
        PlantedBug::NewViewFromOneViewChange,
        PlantedBug::SkipFifoOrder,
        PlantedBug::SkipPlanMatch,
        PlantedBug::AcceptOldViewPrepare,
        PlantedBug::StableCheckpointOnF,
    ];

    /// The bug's stable kebab-case name (as marked at its check sites).
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::SkipUiVerification => "skip-ui-verification",
            PlantedBug::ExecuteWithoutQuorum => "execute-without-quorum",
            PlantedBug::NewViewDropsLastEntry => "new-view-drops-last-entry",
            PlantedBug::IgnoreClientTable => "ignore-client-table",
            PlantedBug::SkipRequestSignature => "skip-request-signature",
            PlantedBug::TrustStateSnapshot => "trust-state-snapshot",
            PlantedBug::NewViewFromOneViewChange => "new-view-from-one-view-change",
            PlantedBug::SkipFifoOrder => "skip-fifo-order",
            PlantedBug::SkipPlanMatch => "skip-plan-match",
            PlantedBug::AcceptOldViewPrepare => "accept-old-view-prepare",
            PlantedBug::StableCheckpointOnF => "stable-checkpoint-on-f",
        }
    }

    /// One sentence: which check is broken and why it matters.
    pub fn description(self) -> &'static str {
        match self {
            PlantedBug::SkipUiVerification => {
                "Certified messages (and those quoted in VIEW-CHANGE, NEW-VIEW and checkpoint \
                 certificates) are accepted although verify_ui fails, so a Byzantine primary can \
                 give one UI to two different PREPAREs and split the backups."
            }
            PlantedBug::ExecuteWithoutQuorum => {
                "A slot is accepted with a single vote (the primary's PREPARE), so the primary \
                 executes and replies before any backup committed, and a view change can then \
                 order another batch at that sequence number."
            }
            PlantedBug::NewViewDropsLastEntry => {
                "The NEW-VIEW plan drops the entry with the highest sequence number, so the new \
                 view can re-propose something else (or nothing) where a batch was accepted."
            }
            PlantedBug::IgnoreClientTable => {
                "The exactly-once check is skipped when the primary admits a request and when a \
                 batch executes, so a retransmitted request that already executed runs again."
            }
            PlantedBug::SkipRequestSignature => {
                "The client signature verdict is ignored at the primary and for the requests in a \
                 PREPARE, so requests no client signed are ordered and executed."
            }
            PlantedBug::TrustStateSnapshot => {
                "A fetched partition is accepted without checking that its digest matches the \
                 agreed one (the summary and its certificate are still checked), so one faulty \
                 replica serving state can plant any content."
            }
            PlantedBug::NewViewFromOneViewChange => {
                "A NEW-VIEW is built and accepted with one VIEW-CHANGE fewer than a quorum (f \
                 instead of f+1 when n = 2f+1), so it need not include any replica that voted for \
                 an accepted batch and the new view can lose it."
            }
            PlantedBug::SkipFifoOrder => {
                "A sender's certified message with a counter past the next expected one is \
                 processed at once and the gap is skipped, so a faulty sender can hide messages \
                 and show different histories to different replicas."
            }
            PlantedBug::SkipPlanMatch => {
                "Backups no longer check that the new primary's re-proposals match the NEW-VIEW \
                 plan, so a faulty new primary can replace a batch accepted in an earlier view."
            }
            PlantedBug::AcceptOldViewPrepare => {
                "A PREPARE from a view older than the current one is accepted as if it were of the \
                 current view, so the old primary keeps ordering batches after it was replaced."
            }
            PlantedBug::StableCheckpointOnF => {
                "A checkpoint becomes stable, and a checkpoint certificate is valid, with f \
                 matching CHECKPOINTs instead of f+1, so one faulty replica can certify a state \
                 no correct replica has."
            }
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

// Every bug must fit in the bit set below.
const _: () = assert!(PlantedBug::ALL.len() <= u32::BITS as usize);

/// The bugs planted in one replica (a bit set, so the checkers can copy it cheaply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PlantedBugs {
    bits: u32,
}

impl PlantedBugs {
    pub(crate) fn insert(&mut self, bug: PlantedBug) {
        self.bits |= bug.bit();
    }

    pub(crate) fn contains(self, bug: PlantedBug) -> bool {
        self.bits & bug.bit() != 0
    }

    pub(crate) fn is_empty(self) -> bool {
        self.bits == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn all_lists_every_bug_once_in_declaration_order() {
        for (index, bug) in PlantedBug::ALL.iter().enumerate() {
            assert_eq!(*bug as usize, index, "{bug:?} is out of place in ALL");
        }
    }

    #[test]
    fn names_are_unique_kebab_case_and_descriptions_are_sentences() {
        let mut names = BTreeSet::new();
        for bug in PlantedBug::ALL {
            let name = bug.name();
            assert!(names.insert(name), "duplicate name {name}");
            assert!(
                !name.is_empty()
                    && !name.starts_with('-')
                    && !name.ends_with('-')
                    && !name.contains("--")
                    && name.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
                "{name} is not kebab-case"
            );
            let description = bug.description();
            assert!(
                description.ends_with('.') && !description.contains("  "),
                "{name}: {description}"
            );
        }
    }

    #[test]
    fn a_set_holds_exactly_the_bugs_planted() {
        let mut set = PlantedBugs::default();
        assert!(set.is_empty());
        assert!(PlantedBug::ALL.iter().all(|bug| !set.contains(*bug)));
        set.insert(PlantedBug::SkipFifoOrder);
        assert!(!set.is_empty());
        set.insert(PlantedBug::SkipUiVerification);
        set.insert(PlantedBug::SkipFifoOrder);
        for bug in PlantedBug::ALL {
            assert_eq!(
                set.contains(bug),
                matches!(
                    bug,
                    PlantedBug::SkipFifoOrder | PlantedBug::SkipUiVerification
                ),
                "{bug:?}"
            );
        }
    }
}
