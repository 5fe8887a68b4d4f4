//! USIG epochs: how a replica that cannot continue its counter speaks again, and how the group
//! agrees where its old epoch ends (docs/PROTOCOL.md §8).
//!
//! The switch is an ordered INSTALL entry: the replica's EPOCH-START (certified under counter 1
//! of its new epoch) travels as a request from a reserved client id, the primary orders it like
//! any request, and executing it at sequence number `σ` records `(epoch, σ)` in the epoch table,
//! which is replicated state (client table, state digest, every CHECKPOINT). Every replica then
//! processes that peer's stream in the new epoch only. A VIEW-CHANGE in a later epoch counts
//! only once its certificate is `L` past `σ` (`Verifier::check_view_change`): everything the old
//! epoch could have made a correct replica accept lies below that.

use tessera_types::{
    epoch_start_certified_digest, EpochStart, LogEntry, ReplicaId, ReplicaMessage, Request, SeqNum,
};
use tessera_usig::{Usig, UsigError};

use super::{PeerStream, Replica, RetiredEpoch};
use tessera_types::StateMachine;

/// Largest encoded EPOCH-START accepted inside an INSTALL entry (a UI certificate is at most
/// `MAX_UI_CERTIFICATE_BYTES`).
const EPOCH_START_BYTES_MAX: usize = tessera_types::limits::MAX_UI_CERTIFICATE_BYTES + 256;

/// The EPOCH-START an INSTALL entry carries, if the entry is well formed and its UI verifies.
/// Every replica decides this identically (no local state is consulted), which is what lets the
/// entry take the place of a client's signature.
pub fn install_entry(request: &Request, n: u32, usig: &dyn Usig) -> Option<EpochStart> {
    let replica = request.install_replica()?;
    if replica.0 >= n || !request.macs.is_empty() || request.signature != [0u8; 64] {
        return None;
    }
    let start: EpochStart =
        tessera_types::decode(&request.operation, EPOCH_START_BYTES_MAX).ok()?;
    let canonical = tessera_types::encode(&start) == request.operation;
    let valid = canonical
        && start.replica == replica
        && start.epoch > 0
        && start.epoch == request.request_number
        && epoch_start_shape_valid(&start)
        && usig
            .verify_ui(replica, &start.certified_digest(), &start.ui)
            .is_ok();
    valid.then_some(start)
}

/// An EPOCH-START opens its epoch: its UI is counter 1 of that very epoch.
fn epoch_start_shape_valid(start: &EpochStart) -> bool {
    start.ui.epoch == start.epoch
        && start.ui.counter == 1
        && start.ui.certificate.len() <= tessera_types::limits::MAX_UI_CERTIFICATE_BYTES
}

impl<S: StateMachine> Replica<S> {
    /// Moves this replica's USIG to a new epoch and asks the group to install it: for a replica
    /// that cannot continue its counter (its log is gone, or its USIG burned a value that no
    /// log recorded). Returns the new epoch. The EPOCH-START is repeated every heartbeat until
    /// the group has executed its INSTALL; until then peers do not process this replica's new
    /// messages, and its VIEW-CHANGEs count only once the checkpoint after the INSTALL is the
    /// new view's (docs/PROTOCOL.md §8).
    pub fn start_epoch(&mut self, now_ms: u64, wall_ms: u64) -> Result<u64, UsigError> {
        self.start_epoch_at_least(now_ms, wall_ms, 0)
    }

    /// [`Replica::start_epoch`] with the new epoch at least `at_least` where the USIG lets the
    /// caller choose (see `Usig::start_epoch_at_least`): a driver that logs `at_least` with the
    /// input replays to the same epoch.
    pub fn start_epoch_at_least(
        &mut self,
        now_ms: u64,
        wall_ms: u64,
        at_least: u64,
    ) -> Result<u64, UsigError> {
        self.advance_clock(now_ms, wall_ms);
        let epoch = self.begin_epoch(at_least)?;
        self.settle();
        Ok(epoch)
    }

    /// [`Replica::start_epoch`] without the clock and the settling: also used in the middle of
    /// certifying a message, when the USIG turned out to have skipped counter values.
    pub(super) fn begin_epoch(&mut self, at_least: u64) -> Result<u64, UsigError> {
        let epoch = self.usig.start_epoch_at_least(at_least)?;
        // Past this point the USIG speaks only in the new epoch: a replica that could not
        // announce it would be mute for good, like one whose USIG cannot certify at all.
        let ui = self
            .usig
            .create_ui(&epoch_start_certified_digest(self.id, epoch))
            .expect("the USIG must certify the first message of its new epoch");
        assert!(
            ui.epoch == epoch && ui.counter == 1,
            "a new USIG epoch starts at counter 1 of that epoch"
        );
        let start = EpochStart {
            replica: self.id,
            epoch,
            ui,
        };
        tracing::info!(replica = self.id.0, epoch, "started a new USIG epoch");
        // The old epoch's messages can no longer be retransmitted as this replica's stream:
        // peers process it in the new epoch from the INSTALL on.
        self.own_log.clear();
        self.own_log.push_back(LogEntry::EpochStart(start.clone()));
        self.retransmit.clear();
        self.retransmit
            .insert(1, ReplicaMessage::EpochStart(start.clone()));
        let n = self.config.n as usize;
        self.peer_acknowledged = vec![1; n];
        for row in &mut self.peer_processed {
            row[self.id.0 as usize] = 1;
        }
        self.announced_epoch = Some(start.clone());
        self.broadcast(ReplicaMessage::EpochStart(start));
        // Anchor the new epoch at the latest own checkpoint, so peers accept this replica's
        // votes (the anchor rule, docs/PROTOCOL.md §5) as soon as they install the epoch. A
        // replica without a state sends one after its state transfer.
        let latest = self
            .own_checkpoints
            .iter()
            .next_back()
            .map(|(seq, state)| (*seq, state.digest, state.epochs.clone()))
            .or_else(|| {
                (self.stable_state_seq.0 > 0).then(|| {
                    (
                        self.stable_state_seq,
                        self.stable_state.digest,
                        self.stable_state.epochs.clone(),
                    )
                })
            });
        if let Some((seq, digest, epochs)) = latest {
            self.send_checkpoint(seq, digest, epochs);
        }
        Ok(epoch)
    }

    /// An EPOCH-START from any replica (its sender, or a peer relaying it): a request to order
    /// that replica's INSTALL entry.
    pub(super) fn on_epoch_start(&mut self, start: EpochStart) {
        if start.replica == self.id || start.replica.0 >= self.config.n {
            return;
        }
        if start.epoch <= self.clients.epoch_of(start.replica).epoch {
            self.reject("epoch-start-stale");
            return;
        }
        let request = start.to_install_request();
        if install_entry(&request, self.config.n, self.usig.as_ref()).is_none() {
            self.reject("epoch-start-invalid");
            return;
        }
        // Like a client request sent straight to this replica: the primary queues it, a backup
        // forwards it and times the primary with it.
        self.on_request(request, true);
    }

    /// Executes an INSTALL entry at `seq` (inside `execute_batch`).
    pub(super) fn execute_install(&mut self, request: &Request, seq: SeqNum) {
        let Some(start) = install_entry(request, self.config.n, self.usig.as_ref()) else {
            // Batches are checked before they are committed, so this is a batch a faulty
            // primary re-proposed unchanged from a plan: a no-op everywhere alike.
            self.reject("install-entry-invalid");
            return;
        };
        if !self.clients.install_epoch(start.replica, start.epoch, seq) {
            return; // an older epoch than the one installed: a no-op everywhere alike
        }
        tracing::info!(
            replica = self.id.0,
            installed = start.replica.0,
            epoch = start.epoch,
            seq = seq.0,
            "USIG epoch installed"
        );
        self.follow_install(start.replica, start.epoch, seq);
    }

    /// After a state transfer: the installed state's epoch table may be ahead of the streams.
    pub(super) fn apply_epoch_table(&mut self) {
        for install in self.clients.epochs() {
            let behind = install.replica == self.id
                || self
                    .streams
                    .get(install.replica.0 as usize)
                    .is_some_and(|stream| install.epoch > stream.epoch);
            if behind {
                self.follow_install(install.replica, install.epoch, install.installed_at);
            }
        }
    }

    /// What this replica does once its epoch table holds `epoch` for `replica`, installed at
    /// `seq` (by executing the INSTALL, or by installing a transferred state): its own
    /// announcement is answered; a peer's stream moves to the new epoch, and a primary that
    /// restarted is suspected, as it cannot go on ordering this view (it may not even know it)
    /// and its PREPAREs of this view would straddle two epochs.
    fn follow_install(&mut self, replica: ReplicaId, epoch: u64, seq: SeqNum) {
        if replica == self.id {
            if self
                .announced_epoch
                .as_ref()
                .is_some_and(|announced| announced.epoch <= epoch)
            {
                self.announced_epoch = None;
            }
            return;
        }
        self.switch_stream(replica, epoch, seq);
        if replica == self.view.primary(self.config.n) && self.view_active {
            self.suspect_primary();
        }
    }

    /// Restarts `replica`'s stream in `epoch`, installed at `seq`: its EPOCH-START (counter 1)
    /// counts as processed and anchors the epoch; everything of the old epoch is dropped except
    /// what judging old VIEW-CHANGEs still needs.
    fn switch_stream(&mut self, replica: ReplicaId, epoch: u64, seq: SeqNum) {
        let index = replica.0 as usize;
        let old = std::mem::take(&mut self.streams[index]);
        debug_assert!(epoch > old.epoch, "epochs only move forward");
        self.streams[index] = PeerStream {
            epoch,
            epoch_installed_at: seq,
            retired: Some(RetiredEpoch {
                epoch: old.epoch,
                next_counter: old.next_counter,
                valid_anchors: old.valid_anchors,
                history_floor: old.history_floor,
                history_floor_seq: old.history_floor_seq,
            }),
            next_counter: 2,
            history_floor: 1,
            // The views it left stay left: a new epoch cannot reopen them.
            view: old.view,
            last_view_change: old.last_view_change,
            last_new_view: old.last_new_view,
            ..PeerStream::default()
        };
        self.store.retain(|(sender, _), _| *sender != replica);
        // Votes of the old epoch not yet counted are not counted any more (they were received
        // before the INSTALL, but counting them now would count them after it).
        for votes in self.early_votes.values_mut() {
            votes.remove(&replica);
        }
        for row in &mut self.peer_processed {
            row[index] = 1;
        }
    }

    /// Repeats this replica's EPOCH-START until the group has installed it.
    pub(super) fn repeat_epoch_start(&mut self) {
        if let Some(start) = self.announced_epoch.clone() {
            if self.clients.epoch_of(self.id).epoch < start.epoch {
                self.broadcast(ReplicaMessage::EpochStart(start));
            } else {
                self.announced_epoch = None;
            }
        }
    }

    /// Whether a USIG that skipped counter values (a `usigd` daemon or TPM that restarted)
    /// moves this replica to a new epoch (default on). The simulator turns it off for the
    /// replicas its adversary controls: they share their USIG with the adversary on purpose and
    /// need not cooperate with recovery.
    pub fn set_restart_on_usig_gap(&mut self, on: bool) {
        self.restart_on_usig_gap = on;
    }

    /// This replica's current USIG epoch.
    pub fn epoch(&self) -> u64 {
        self.usig.identity().epoch
    }

    /// `replica`'s epoch as this replica's epoch table (replicated state) records it.
    pub fn installed_epoch(&self, replica: ReplicaId) -> tessera_types::EpochInstall {
        self.clients.epoch_of(replica)
    }
}
