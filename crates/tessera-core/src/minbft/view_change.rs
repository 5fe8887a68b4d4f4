//! Checking VIEW-CHANGE and NEW-VIEW messages and computing the new-view set `S`.
//!
//! Everything here is a pure function of the message contents, the USIG verifier and the request
//! authenticator, so the new primary and every backup compute exactly the same `S` (paper 004 §4:
//! "all replicas also verify if S was computed properly doing the same computation as the
//! primary"). The argument for why this `S` preserves every accepted batch is in
//! `docs/PROTOCOL.md` ("View change"); the rules it relies on are marked *(rule)* below.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tessera_types::{
    batch_digest, new_view_certified_digest, view_change_certified_digest, CheckpointCertificate,
    Digest, EpochInstall, LogEntry, NewView, PrepareHeader, ReplicaId, Request, SeqNum, Ui, View,
    ViewChange,
};
use tessera_usig::{Usig, UsigError};

use crate::auth::RequestAuthenticator;
#[cfg(feature = "planted-bugs")]
use crate::planted::{PlantedBug, PlantedBugs};

/// The outcome of a view change: the checkpoint the new view starts from and, for every sequence
/// number after it up to the highest candidate, the batch the new primary must re-propose
/// (an empty batch where no candidate exists).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NewViewPlan {
    /// The most recent valid checkpoint certificate among the VIEW-CHANGE messages.
    pub checkpoint: CheckpointCertificate,
    /// The batch to re-propose for each of `checkpoint.seq + 1 ..= last`, in order, without gaps.
    pub entries: Vec<PlanEntry>,
}

/// What a NEW-VIEW plan fixes for one sequence number.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PlanEntry {
    /// The sequence number.
    pub seq: SeqNum,
    /// The batch digest.
    pub digest: Digest,
    /// The batch.
    pub batch: Arc<Vec<Request>>,
    /// The batch's agreed time, as its PREPARE carried it: a replica may already have executed
    /// the batch at that time, so a re-proposal must keep it. An empty batch filling a sequence
    /// number without a candidate has time 0 (it executes nothing, and the agreed clock takes
    /// the largest time so far, so 0 never moves it back).
    pub time_ms: u64,
}

impl NewViewPlan {
    /// The last sequence number the plan covers (the checkpoint's if the plan is empty).
    pub fn last_seq(&self) -> SeqNum {
        self.entries
            .last()
            .map(|entry| entry.seq)
            .unwrap_or(self.checkpoint.seq)
    }

    /// The batch digest and time the plan fixes for `seq`, if `seq` is in the plan.
    pub fn digest_at(&self, seq: SeqNum) -> Option<(Digest, u64)> {
        let first = self.checkpoint.seq.0 + 1;
        if seq.0 < first {
            return None;
        }
        self.entries.get((seq.0 - first) as usize).map(|entry| {
            debug_assert_eq!(entry.seq, seq);
            (entry.digest, entry.time_ms)
        })
    }

    /// The latest time among the plan's batches (0 for an empty plan): the view's first new
    /// batch may not be earlier.
    pub fn time_ms_max(&self) -> u64 {
        self.entries
            .iter()
            .map(|entry| entry.time_ms)
            .max()
            .unwrap_or(0)
    }
}

/// Why a VIEW-CHANGE or NEW-VIEW was refused.
pub type Reject = &'static str;

/// The justifications a VIEW-CHANGE ships for the PREPAREs in its log: the NEW-VIEWs in
/// `new_views` and, transitively, every NEW-VIEW their VIEW-CHANGEs draw on, each once (by view
/// and primary counter), with the quoted VIEW-CHANGEs stripped of their own justifications
/// because those are in the pool too. Quoting recursively instead makes the message grow
/// exponentially with the number of views that pass without a stable checkpoint (each NEW-VIEW
/// quotes a quorum of VIEW-CHANGEs, each quoting the earlier NEW-VIEWs again). The UIs cover no
/// justification, so stripping leaves every signature intact.
pub fn justification_pool(new_views: impl IntoIterator<Item = Arc<NewView>>) -> Vec<Arc<NewView>> {
    let mut pool: BTreeMap<(View, u64, u64), Arc<NewView>> = BTreeMap::new();
    let mut pending: Vec<Arc<NewView>> = new_views.into_iter().collect();
    while let Some(new_view) = pending.pop() {
        let key = (new_view.view, new_view.ui.epoch, new_view.ui.counter);
        if pool.contains_key(&key) {
            continue;
        }
        let mut stripped = false;
        for view_change in &new_view.view_changes {
            pending.extend(view_change.new_views.iter().cloned());
            stripped |= !view_change.new_views.is_empty();
        }
        let new_view = if stripped {
            let view_changes = new_view
                .view_changes
                .iter()
                .map(|view_change| {
                    Arc::new(ViewChange {
                        new_views: Vec::new(),
                        ..(**view_change).clone()
                    })
                })
                .collect();
            Arc::new(NewView {
                view_changes,
                ..(*new_view).clone()
            })
        } else {
            new_view
        };
        pool.insert(key, new_view);
    }
    pool.into_values().collect()
}

/// The verdict for a VIEW-CHANGE whose anchor this replica has not yet seen in its sender's
/// stream: not a rejection, the message must wait (see [`AnchorCheck::NotYetSeen`]).
pub const ANCHOR_NOT_YET_SEEN: Reject = "view-change-anchor-not-yet-seen";

/// Answers whether the CHECKPOINT with `counter` from `sender` may anchor a VIEW-CHANGE log.
pub trait AnchorOracle {
    /// This replica's verdict on `sender`'s message `(epoch, counter)`.
    fn check_anchor(&self, sender: ReplicaId, epoch: u64, counter: u64) -> AnchorCheck;
}

/// What this replica knows about a CHECKPOINT used as a log anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnchorCheck {
    /// Seen in the sender's stream, and no earlier message of the sender spoke about a later
    /// sequence number: everything relevant after it is in the log.
    Valid,
    /// Seen, but out of order: it cannot anchor a log.
    Invalid,
    /// Older than the point where this replica resumed the sender's stream after a state
    /// transfer. Anything the log could leave out lies at or below this replica's stable
    /// checkpoint, so the anchor is accepted: refusing it would make every VIEW-CHANGE that
    /// quotes such an old one unverifiable here for good.
    Forgotten,
    /// This replica has not processed the sender's stream that far yet.
    NotYetSeen,
}

/// Borrowed context for checking view-change messages.
pub struct Verifier<'a> {
    /// Cluster size.
    pub n: u32,
    /// Faults tolerated.
    pub f: u32,
    /// Agreement quorum.
    pub quorum: usize,
    /// USIG (for `verify_ui` only).
    pub usig: &'a dyn Usig,
    /// Client signature checks.
    pub authenticator: &'a dyn RequestAuthenticator,
    /// Digest of the initial state (the genesis checkpoint).
    pub genesis_digest: Digest,
    /// Largest batch allowed.
    pub batch_requests_max: usize,
    /// The log size `L`: how far past its stable checkpoint a correct replica ever speaks.
    pub log_size: u64,
    /// The checkpoint interval: a correct replica agrees on nothing beyond the next multiple of
    /// it after what it executed (the barrier, docs/PROTOCOL.md §5).
    pub checkpoint_interval: u64,
    /// This replica's knowledge of anchors.
    pub anchors: &'a dyn AnchorOracle,
    /// Bugs planted in this replica (tests of the simulator's checkers only).
    #[cfg(feature = "planted-bugs")]
    pub(crate) planted: PlantedBugs,
}

/// A NEW-VIEW as the memo knows it: its view, its primary's (epoch, counter) and its payload.
type NewViewKey = (View, u64, u64, Digest);

/// Memoized NEW-VIEW checks within one top-level check (a NEW-VIEW may justify many entries).
#[derive(Default)]
pub struct Memo {
    new_views: HashMap<NewViewKey, Result<Arc<NewViewPlan>, Reject>>,
}

/// A PREPARE candidate for a sequence number, from some replica's log.
struct Candidate {
    view: View,
    /// The primary's UI as (epoch, counter): its place in the primary's stream.
    primary_position: (u64, u64),
    digest: Digest,
    batch: Arc<Vec<Request>>,
    time_ms: u64,
}

impl<'a> Verifier<'a> {
    #[cfg(feature = "planted-bugs")]
    fn planted(&self, bug: PlantedBug) -> bool {
        self.planted.contains(bug)
    }

    /// Checks that `ui` binds `message` to `signer`'s USIG. Every UI this replica accepts, in a
    /// message of its own or quoted in another, is checked here.
    pub fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        let verdict = self.usig.verify_ui(signer, message, ui);
        #[cfg(feature = "planted-bugs")]
        if self.planted(PlantedBug::SkipUiVerification) {
            // PLANTED BUG (skip-ui-verification): a certificate that does not verify counts as
            // valid, so one counter value can vouch for two different messages.
            return Ok(());
        }
        verdict
    }

    /// A checkpoint certificate is the genesis certificate or f+1 matching, validly certified
    /// CHECKPOINT messages from distinct replicas.
    pub fn check_checkpoint_certificate(
        &self,
        certificate: &CheckpointCertificate,
    ) -> Result<(), Reject> {
        if certificate.seq == SeqNum(0) {
            if certificate.state_digest != self.genesis_digest
                || !certificate.checkpoints.is_empty()
            {
                return Err("bad-genesis-certificate");
            }
            return Ok(());
        }
        let mut signers = BTreeSet::new();
        let epochs = certificate
            .checkpoints
            .first()
            .map(|checkpoint| &checkpoint.epochs)
            .ok_or("checkpoint-certificate-too-small")?;
        self.check_epoch_table(epochs, certificate.seq)?;
        for checkpoint in &certificate.checkpoints {
            if checkpoint.seq != certificate.seq
                || checkpoint.state_digest != certificate.state_digest
                || checkpoint.epochs != *epochs
            {
                return Err("checkpoint-certificate-mismatch");
            }
            if checkpoint.replica.0 >= self.n || !signers.insert(checkpoint.replica) {
                return Err("checkpoint-certificate-signer");
            }
            let digest = checkpoint.certified_digest();
            self.verify_ui(checkpoint.replica, &digest, &checkpoint.ui)
                .map_err(|_| "checkpoint-certificate-ui")?;
        }
        let signers_needed = self.f as usize + 1;
        #[cfg(feature = "planted-bugs")]
        // PLANTED BUG (stable-checkpoint-on-f): f CHECKPOINTs may all come from faulty replicas.
        let signers_needed = if self.planted(PlantedBug::StableCheckpointOnF) {
            (signers_needed - 1).max(1)
        } else {
            signers_needed
        };
        if signers.len() < signers_needed {
            return Err("checkpoint-certificate-too-small");
        }
        Ok(())
    }

    fn check_prepare_header(&self, header: &PrepareHeader, to_view: View) -> Result<(), Reject> {
        if header.view >= to_view {
            // (rule) A VIEW-CHANGE for v' can only report what happened in views before v'.
            return Err("log-entry-from-future-view");
        }
        if header.primary != header.view.primary(self.n) {
            return Err("log-prepare-not-from-primary");
        }
        self.verify_ui(header.primary, &header.certified_digest(), &header.ui)
            .map_err(|_| "log-prepare-ui")
    }

    fn check_batch(&self, header: &PrepareHeader, batch: &[Request]) -> Result<(), Reject> {
        if batch.len() > self.batch_requests_max || batch_digest(batch) != header.batch_digest {
            return Err("log-batch-mismatch");
        }
        Ok(())
    }

    /// Checks a VIEW-CHANGE completely: its UI, its checkpoint certificate, that its log is the
    /// sender's complete, contiguous history from a valid anchor, and that every PREPARE it
    /// reports from a view after the first is justified by a valid NEW-VIEW of that view.
    ///
    /// Justifying NEW-VIEWs are looked up in the VIEW-CHANGE's own `new_views` and in `pool`,
    /// the justifications of the message that quotes it (empty at the top level). A correct
    /// sender ships one flat, closed pool (see [`justification_pool`]) whose quoted VIEW-CHANGEs
    /// carry none of their own, so a message grows with the number of views, not exponentially.
    pub fn check_view_change(
        &self,
        view_change: &ViewChange,
        pool: &[Arc<NewView>],
        memo: &mut Memo,
    ) -> Result<(), Reject> {
        let sender = view_change.replica;
        if sender.0 >= self.n {
            return Err("view-change-unknown-sender");
        }
        let payload = view_change.payload_digest();
        let certified = view_change_certified_digest(sender, view_change.to_view, &payload);
        self.verify_ui(sender, &certified, &view_change.ui)
            .map_err(|_| "view-change-ui")?;
        self.check_checkpoint_certificate(&view_change.checkpoint)?;
        self.check_log_shape(view_change)?;
        // The justifications this log draws on: its own and the quoting message's.
        let combined: Vec<Arc<NewView>>;
        let pool = if view_change.new_views.is_empty() {
            pool
        } else if pool.is_empty() {
            &view_change.new_views
        } else {
            combined = view_change.new_views.iter().chain(pool).cloned().collect();
            &combined
        };
        for entry in &view_change.log {
            let (header, batch) = match entry {
                LogEntry::Prepare(prepare) => (&prepare.header, &prepare.batch),
                LogEntry::Commit { commit, batch } => (&commit.prepare, batch),
                _ => continue,
            };
            self.check_prepare_header(header, view_change.to_view)?;
            self.check_batch(header, batch)?;
            if header.seq <= view_change.checkpoint.seq || header.view == View(0) {
                continue;
            }
            self.check_justified(header, pool, memo)?;
        }
        Ok(())
    }

    /// (rule) The log `O` starts at an anchor (the sender's very first message, or one of its
    /// CHECKPOINTs at or below the certificate) and runs without a gap up to the VIEW-CHANGE.
    /// Because a replica never sends a message about a sequence number beyond its last
    /// checkpoint plus one interval, nothing that matters above the certificate precedes the
    /// anchor, so the USIG makes the log complete: the sender cannot leave out a COMMIT.
    fn check_log_shape(&self, view_change: &ViewChange) -> Result<(), Reject> {
        let sender = view_change.replica;
        let Some(first) = view_change.log.first() else {
            return if view_change.ui.counter == 1 {
                Ok(())
            } else {
                Err("view-change-log-missing")
            };
        };
        // (rule) The anchor must be an in-order CHECKPOINT: one that, when this replica processed
        // it in the sender's stream, was at least every sequence number the sender had spoken
        // about before it. A stale CHECKPOINT certified later would otherwise let a faulty sender
        // start its log after a COMMIT and hide it. Only the stream can tell, so this check uses
        // this replica's stream knowledge; a NEW-VIEW waits until its VIEW-CHANGEs are seen.
        match first {
            _ if first.ui().counter == 1 => {}
            LogEntry::Checkpoint(checkpoint) if checkpoint.seq <= view_change.checkpoint.seq => {
                match self
                    .anchors
                    .check_anchor(sender, first.ui().epoch, first.ui().counter)
                {
                    AnchorCheck::Valid | AnchorCheck::Forgotten => {}
                    AnchorCheck::Invalid => return Err("view-change-anchor-out-of-order"),
                    AnchorCheck::NotYetSeen => return Err(ANCHOR_NOT_YET_SEEN),
                }
            }
            _ => return Err("view-change-log-anchor"),
        }
        let mut expected = first.ui().counter;
        let epoch = view_change.ui.epoch;
        // (rule) A correct replica never sends anything about a sequence number beyond its stable
        // checkpoint plus `L` (its high water mark), and the certificate is its latest stable
        // checkpoint, so every entry lies within it. This also bounds every plan to `L` entries.
        let high_water_mark = view_change.checkpoint.seq.0.saturating_add(self.log_size);
        for entry in &view_change.log {
            if entry.sender() != sender {
                return Err("view-change-log-foreign-entry");
            }
            let seq = match entry {
                LogEntry::Prepare(prepare) => prepare.header.seq,
                LogEntry::Commit { commit, .. } => commit.prepare.seq,
                LogEntry::Checkpoint(checkpoint) => checkpoint.seq,
                _ => SeqNum(0),
            };
            if seq.0 > high_water_mark {
                return Err("view-change-entry-beyond-high-water-mark");
            }
            if entry.ui().epoch != epoch {
                // (rule) A log runs within one epoch: counters of two epochs are not one chain.
                return Err("view-change-log-epoch");
            }
            if entry.ui().counter != expected {
                return Err("view-change-log-gap");
            }
            self.verify_ui(sender, &entry.certified_digest(), entry.ui())
                .map_err(|_| "view-change-log-ui")?;
            expected = expected.checked_add(1).ok_or("view-change-log-counter")?;
        }
        if view_change.ui.counter != expected {
            return Err("view-change-counter-not-next");
        }
        Ok(())
    }

    /// (rule) A PREPARE of view `w > 0` above the checkpoint counts only if the NEW-VIEW that
    /// started `w` is supplied and valid, the PREPARE comes after it in the primary's stream, and
    /// it re-proposes exactly what that NEW-VIEW's `S` fixes for its sequence number. A Byzantine
    /// primary's PREPARE that correct replicas refused therefore never becomes a candidate.
    fn check_justified(
        &self,
        header: &PrepareHeader,
        pool: &[Arc<NewView>],
        memo: &mut Memo,
    ) -> Result<(), Reject> {
        let justification = pool
            .iter()
            .filter(|new_view| {
                new_view.view == header.view
                    && new_view.ui.epoch == header.ui.epoch
                    && new_view.ui.counter < header.ui.counter
            })
            .max_by_key(|new_view| new_view.ui.counter)
            .ok_or("log-entry-unjustified")?;
        // The quoted NEW-VIEW's own VIEW-CHANGEs draw on the same pool.
        let plan = self.check_new_view(justification, pool, memo)?;
        match plan.digest_at(header.seq) {
            Some((digest, time_ms))
                if digest != header.batch_digest || time_ms != header.time_ms =>
            {
                Err("log-entry-contradicts-new-view")
            }
            _ if header.seq <= plan.checkpoint.seq => Err("log-entry-below-new-view-checkpoint"),
            _ => Ok(()),
        }
    }

    /// Checks a NEW-VIEW completely (recursively through its VIEW-CHANGE messages, whose
    /// justifications come from their own `new_views` and from `pool`) and returns the plan `S`
    /// it implies.
    pub fn check_new_view(
        &self,
        new_view: &NewView,
        pool: &[Arc<NewView>],
        memo: &mut Memo,
    ) -> Result<Arc<NewViewPlan>, Reject> {
        let key = (
            new_view.view,
            new_view.ui.epoch,
            new_view.ui.counter,
            new_view.payload_digest(),
        );
        if let Some(result) = memo.new_views.get(&key) {
            return result.clone();
        }
        let result = self
            .check_new_view_uncached(new_view, &key.3, pool, memo)
            .map(Arc::new);
        memo.new_views.insert(key, result.clone());
        result
    }

    fn check_new_view_uncached(
        &self,
        new_view: &NewView,
        payload: &Digest,
        pool: &[Arc<NewView>],
        memo: &mut Memo,
    ) -> Result<NewViewPlan, Reject> {
        if new_view.view == View(0) || new_view.primary != new_view.view.primary(self.n) {
            return Err("new-view-not-from-primary");
        }
        let certified = new_view_certified_digest(new_view.primary, new_view.view, payload);
        self.verify_ui(new_view.primary, &certified, &new_view.ui)
            .map_err(|_| "new-view-ui")?;
        let mut senders = BTreeSet::new();
        for view_change in &new_view.view_changes {
            if view_change.to_view != new_view.view || !senders.insert(view_change.replica) {
                return Err("new-view-certificate-mismatch");
            }
            self.check_view_change(view_change, pool, memo)?;
        }
        let senders_needed = self.quorum;
        #[cfg(feature = "planted-bugs")]
        // PLANTED BUG (new-view-from-one-view-change): a NEW-VIEW one VIEW-CHANGE short of a
        // quorum need not intersect the quorum that accepted a batch.
        let senders_needed = if self.planted(PlantedBug::NewViewFromOneViewChange) {
            (senders_needed - 1).max(1)
        } else {
            senders_needed
        };
        if senders.len() < senders_needed {
            return Err("new-view-certificate-too-small");
        }
        let view_changes: Vec<&ViewChange> =
            new_view.view_changes.iter().map(|vc| vc.as_ref()).collect();
        let plan = self.compute_plan(&view_changes);
        let misfits = self.epoch_misfits(&plan, &view_changes);
        if let Some((_, reason)) = misfits.first() {
            return Err(*reason);
        }
        Ok(plan)
    }

    /// The epoch table the new view starts from: the certificate's table, then every INSTALL
    /// entry of the plan in sequence order.
    pub fn plan_epochs(&self, plan: &NewViewPlan) -> BTreeMap<ReplicaId, EpochInstall> {
        let mut table: BTreeMap<ReplicaId, EpochInstall> = plan
            .checkpoint
            .checkpoints
            .first()
            .map(|checkpoint| checkpoint.epochs.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|install| (install.replica, *install))
            .collect();
        for entry in &plan.entries {
            for request in entry.batch.iter() {
                let Some(start) = super::install_entry(request, self.n, self.usig) else {
                    continue;
                };
                let current = table.get(&start.replica).map_or(0, |install| install.epoch);
                if start.epoch > current {
                    table.insert(
                        start.replica,
                        EpochInstall {
                            replica: start.replica,
                            epoch: start.epoch,
                            installed_at: entry.seq,
                        },
                    );
                }
            }
        }
        table
    }

    /// (rule) The VIEW-CHANGEs of a NEW-VIEW that do not fit the epoch table the new view
    /// starts from ([`Verifier::plan_epochs`]), with the reason: each must be in its sender's
    /// epoch there, and a later epoch counts only once the plan's checkpoint reaches the first
    /// checkpoint at or after its INSTALL. Whatever a sender's older epoch made a correct
    /// replica accept lies at or below that checkpoint (the barrier), so a log that cannot show
    /// those messages hides nothing; and a VIEW-CHANGE certified in an epoch the group has
    /// since left cannot speak for its sender (docs/PROTOCOL.md §8).
    pub fn epoch_misfits(
        &self,
        plan: &NewViewPlan,
        view_changes: &[&ViewChange],
    ) -> Vec<(ReplicaId, Reject)> {
        let table = self.plan_epochs(plan);
        let cp = self.checkpoint_interval.max(1);
        view_changes
            .iter()
            .filter_map(|view_change| {
                let (epoch, installed_at) = table
                    .get(&view_change.replica)
                    .map_or((0, SeqNum(0)), |install| {
                        (install.epoch, install.installed_at)
                    });
                let settled_at = installed_at.0.div_ceil(cp).saturating_mul(cp);
                let reason = if view_change.ui.epoch != epoch {
                    "new-view-epoch-mismatch"
                } else if epoch > 0 && plan.checkpoint.seq.0 < settled_at {
                    "new-view-epoch-too-recent"
                } else {
                    return None;
                };
                Some((view_change.replica, reason))
            })
            .collect()
    }

    /// Computes `S` from a quorum of already-checked VIEW-CHANGE messages: start from the most
    /// recent checkpoint; for every later sequence number take the candidate from the highest
    /// view, and within one view the one with the lowest primary counter (correct replicas accept
    /// the first PREPARE for a sequence number in the primary's stream and stop at the first
    /// invalid one, so a later one for the same number was never accepted). Candidates whose
    /// requests are not all validly signed are dropped: no correct replica commits them.
    pub fn compute_plan(&self, view_changes: &[&ViewChange]) -> NewViewPlan {
        assert!(
            !view_changes.is_empty(),
            "a plan needs at least one VIEW-CHANGE"
        );
        let checkpoint = view_changes
            .iter()
            .map(|view_change| &view_change.checkpoint)
            .max_by_key(|certificate| certificate.seq)
            .expect("non-empty")
            .clone();
        let mut best: BTreeMap<SeqNum, Candidate> = BTreeMap::new();
        for view_change in view_changes {
            for entry in &view_change.log {
                let (header, batch) = match entry {
                    LogEntry::Prepare(prepare) => (&prepare.header, &prepare.batch),
                    LogEntry::Commit { commit, batch } => (&commit.prepare, batch),
                    _ => continue,
                };
                if header.seq <= checkpoint.seq {
                    continue;
                }
                let position = (header.ui.epoch, header.ui.counter);
                let better = match best.get(&header.seq) {
                    None => true,
                    Some(current) => {
                        (header.view, std::cmp::Reverse(position))
                            > (current.view, std::cmp::Reverse(current.primary_position))
                    }
                };
                if better && self.batch_is_authentic(batch) {
                    best.insert(
                        header.seq,
                        Candidate {
                            view: header.view,
                            primary_position: position,
                            digest: header.batch_digest,
                            batch: batch.clone(),
                            time_ms: header.time_ms,
                        },
                    );
                }
            }
        }
        let last = best.keys().next_back().copied().unwrap_or(checkpoint.seq);
        let empty: Arc<Vec<Request>> = Arc::new(Vec::new());
        let empty_digest = batch_digest(&empty);
        let entries: Vec<_> = (checkpoint.seq.0 + 1..=last.0)
            .map(|seq| match best.remove(&SeqNum(seq)) {
                Some(candidate) => PlanEntry {
                    seq: SeqNum(seq),
                    digest: candidate.digest,
                    batch: candidate.batch,
                    time_ms: candidate.time_ms,
                },
                None => PlanEntry {
                    seq: SeqNum(seq),
                    digest: empty_digest,
                    batch: empty.clone(),
                    time_ms: 0,
                },
            })
            .collect();
        #[cfg(feature = "planted-bugs")]
        let entries = {
            let mut entries = entries;
            if self.planted(PlantedBug::NewViewDropsLastEntry) {
                // PLANTED BUG (new-view-drops-last-entry): the highest sequence number is left
                // out of S, and with it a batch that may have been accepted there.
                entries.pop();
            }
            entries
        };
        NewViewPlan {
            checkpoint,
            entries,
        }
    }

    fn batch_is_authentic(&self, batch: &[Request]) -> bool {
        batch.iter().all(|request| {
            request.check_shape().is_ok()
                && if request.install_replica().is_some() {
                    super::install_entry(request, self.n, self.usig).is_some()
                } else {
                    self.authenticator.verify_signature(request)
                }
        })
    }

    /// An epoch table as a CHECKPOINT carries it: replicas in order, each known, at an epoch
    /// above 0 installed no later than the checkpoint.
    pub(crate) fn check_epoch_table(
        &self,
        epochs: &[EpochInstall],
        seq: SeqNum,
    ) -> Result<(), Reject> {
        let mut previous: Option<ReplicaId> = None;
        for install in epochs {
            if install.replica.0 >= self.n
                || previous.is_some_and(|previous| previous >= install.replica)
                || install.epoch == 0
                || install.installed_at > seq
            {
                return Err("checkpoint-epoch-table-malformed");
            }
            previous = Some(install.replica);
        }
        Ok(())
    }
}
