//! Protocol messages and the exact bytes each USIG identifier certifies.
//!
//! MinBFT (paper 004 §4) certifies PREPARE, COMMIT, CHECKPOINT, VIEW-CHANGE and NEW-VIEW with a
//! unique identifier (UI) from the sender's USIG. A UI is created over the message's
//! *certified digest* (`certified_digest()` below), a domain-separated digest of every field that
//! gives the message its meaning. VIEW-CHANGE and NEW-VIEW certify a digest of their (large)
//! payload, so a log can quote them compactly (see [`LogEntry`]) and still be checked.

use crate::ids::{ClientId, ReplicaId, SeqNum, View};
use crate::limits;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tessera_crypto::{Digest, DigestBuilder};

/// A unique identifier produced by a USIG: an (epoch, counter) pair bound to one message. Its
/// canonical encoding is postcard's: epoch and counter as varints, then the certificate with its
/// length (bounded by [`limits::MAX_UI_CERTIFICATE_BYTES`]).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub struct Ui {
    /// The signer's USIG epoch: a replica that cannot continue its counter (after a crash or a
    /// rejuvenation) starts a new epoch and counts from 1 again. The certificate binds it, so
    /// `(epoch, counter)` names one UI; which epochs are acceptable from whom is the protocol
    /// core's decision, not the USIG's.
    pub epoch: u64,
    /// The USIG counter value; strictly sequential per sender within an epoch (1, 2, 3, ...).
    pub counter: u64,
    /// Backend-specific proof that `counter` was bound to the certified digest.
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
}

/// Length of the per-replica MAC in a client authenticator.
pub const REQUEST_MAC_LEN: usize = 16;

/// A client request (paper 004: `<REQUEST, c, seq, op>σc`).
///
/// A request is valid iff its Ed25519 signature is valid: every replica checks it before it
/// commits a batch containing the request, and the view change applies the same check, so all
/// correct replicas judge a request alike (`docs/PROTOCOL.md` §3). The per-replica MACs are only a
/// cheap first filter against garbage, checked before spending a signature verification.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Request {
    /// Who sent it.
    pub client: ClientId,
    /// Per-client request number; replicas execute each at most once and in increasing order.
    pub request_number: u64,
    /// The operation, opaque to the protocol and interpreted by the state machine.
    #[serde(with = "serde_bytes")]
    pub operation: Vec<u8>,
    /// Ed25519 signature over [`Request::digest`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// `macs[r]` is the MAC of [`Request::digest`] under the key shared by the client and replica `r`.
    pub macs: Vec<[u8; REQUEST_MAC_LEN]>,
}

impl Request {
    /// The digest clients sign and MAC, and batches are built from.
    pub fn digest(&self) -> Digest {
        request_digest(self.client, self.request_number, &self.operation)
    }

    /// Checks sizes only (no cryptography).
    pub fn check_shape(&self) -> Result<(), ShapeError> {
        if self.operation.len() > limits::MAX_OPERATION_BYTES {
            return Err(ShapeError::OperationTooLarge(self.operation.len()));
        }
        if self.signature.len() != 64 {
            return Err(ShapeError::BadSignatureLength(self.signature.len()));
        }
        if self.macs.len() > limits::MAX_REPLICAS {
            return Err(ShapeError::TooManyMacs(self.macs.len()));
        }
        Ok(())
    }
}

/// The digest of a request's content: what the client signs.
pub fn request_digest(client: ClientId, request_number: u64, operation: &[u8]) -> Digest {
    let mut builder = DigestBuilder::new("tessera.request.v1");
    builder.u64(client.0).u64(request_number).bytes(operation);
    builder.finish()
}

/// The digest of an ordered batch of requests: binds the order and every request.
pub fn batch_digest(batch: &[Request]) -> Digest {
    let mut builder = DigestBuilder::new("tessera.batch.v1");
    builder.u64(batch.len() as u64);
    for request in batch {
        builder.digest(&request.digest());
    }
    builder.finish()
}

/// A replica's answer to a client (paper 004: `<REPLY, s, seq, res>`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Reply {
    /// The replying replica.
    pub replica: ReplicaId,
    /// The client the reply is for.
    pub client: ClientId,
    /// The request this answers.
    pub request_number: u64,
    /// The view in which the request was executed (tells the client who the primary is).
    pub view: View,
    /// The state machine's result.
    #[serde(with = "serde_bytes")]
    pub result: Vec<u8>,
}

/// The part of a PREPARE a COMMIT refers to: enough to check the primary's UI without the batch.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub struct PrepareHeader {
    /// The primary that sent the PREPARE.
    pub primary: ReplicaId,
    /// The view it was sent in.
    pub view: View,
    /// The sequence number it assigns.
    pub seq: SeqNum,
    /// Digest of the ordered batch.
    pub batch_digest: Digest,
    /// The batch's agreed time, in milliseconds since the Unix epoch, as the primary proposed
    /// it (docs/PROTOCOL.md §4, *Agreed time*). Certified with the rest of the header, so a
    /// primary cannot show two times for one batch, and a re-proposal keeps it.
    pub time_ms: u64,
    /// The primary's UI over this header.
    pub ui: Ui,
}

impl PrepareHeader {
    /// What the primary's UI certifies.
    pub fn certified_digest(&self) -> Digest {
        prepare_certified_digest(
            self.primary,
            self.view,
            self.seq,
            &self.batch_digest,
            self.time_ms,
        )
    }
}

/// What a PREPARE's UI certifies.
pub fn prepare_certified_digest(
    primary: ReplicaId,
    view: View,
    seq: SeqNum,
    batch_digest: &Digest,
    time_ms: u64,
) -> Digest {
    let mut builder = DigestBuilder::new("tessera.prepare.v2");
    builder
        .u64(primary.0 as u64)
        .u64(view.0)
        .u64(seq.0)
        .digest(batch_digest)
        .u64(time_ms);
    builder.finish()
}

/// PREPARE: the primary assigns `seq` to a batch in `view`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Prepare {
    /// Header, including the primary's UI.
    pub header: PrepareHeader,
    /// The requests, in execution order.
    pub batch: Arc<Vec<Request>>,
}

/// COMMIT: replica `replica` vouches for a PREPARE it checked.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Commit {
    /// The committing replica.
    pub replica: ReplicaId,
    /// The PREPARE it commits to.
    pub prepare: PrepareHeader,
    /// The committing replica's UI.
    pub ui: Ui,
}

impl Commit {
    /// What the committing replica's UI certifies (binds the primary's UI too).
    pub fn certified_digest(&self) -> Digest {
        commit_certified_digest(self.replica, &self.prepare)
    }
}

/// What a COMMIT's UI certifies.
pub fn commit_certified_digest(replica: ReplicaId, prepare: &PrepareHeader) -> Digest {
    let mut builder = DigestBuilder::new("tessera.commit.v2");
    builder
        .u64(replica.0 as u64)
        .digest(&prepare.certified_digest())
        .u64(prepare.ui.epoch)
        .u64(prepare.ui.counter)
        .bytes(&prepare.ui.certificate);
    builder.finish()
}

/// CHECKPOINT: `replica` executed everything up to `seq` and its state digest is `state_digest`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Checkpoint {
    /// The replica that took the checkpoint.
    pub replica: ReplicaId,
    /// The last sequence number executed before the checkpoint.
    pub seq: SeqNum,
    /// Digest of the replicated state (application state and client table) after `seq`.
    pub state_digest: Digest,
    /// The sender's view when it took the checkpoint (lets a peer that resumes the sender's
    /// stream at this message know which views the sender had already left).
    pub view: View,
    /// The USIG epochs installed at `seq` (part of the replicated state, so matching CHECKPOINTs
    /// agree on it): every replica whose epoch is above 0, in replica order. A VIEW-CHANGE is
    /// judged against the table of its certificate (docs/PROTOCOL.md §8).
    pub epochs: Vec<EpochInstall>,
    /// The replica's UI.
    pub ui: Ui,
}

impl Checkpoint {
    /// What the UI certifies.
    pub fn certified_digest(&self) -> Digest {
        checkpoint_certified_digest(
            self.replica,
            self.seq,
            &self.state_digest,
            self.view,
            &self.epochs,
        )
    }
}

/// A replica's USIG epoch as the replicated state records it: the epoch and the sequence
/// number whose INSTALL entry switched to it (docs/PROTOCOL.md §8).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct EpochInstall {
    /// Whose epoch.
    pub replica: ReplicaId,
    /// The epoch its messages are processed in.
    pub epoch: u64,
    /// The sequence number at which it was installed.
    pub installed_at: SeqNum,
}

/// The first message of a USIG epoch (certified under counter 1 of `epoch`): asks the group to
/// order the switch to it. docs/PROTOCOL.md §8.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct EpochStart {
    /// Whose epoch.
    pub replica: ReplicaId,
    /// The new epoch.
    pub epoch: u64,
    /// Its UI: epoch `epoch`, counter 1.
    pub ui: Ui,
}

impl EpochStart {
    /// What the UI certifies.
    pub fn certified_digest(&self) -> Digest {
        epoch_start_certified_digest(self.replica, self.epoch)
    }

    /// The INSTALL entry that carries this EPOCH-START through agreement: a request from the
    /// replica's reserved client id ([`install_client`]) whose number is the epoch and whose
    /// operation is this message. It has no client signature; replicas check the UI instead.
    pub fn to_install_request(&self) -> Request {
        Request {
            client: install_client(self.replica),
            request_number: self.epoch,
            operation: crate::encoding::encode(self),
            signature: vec![0; 64],
            macs: Vec::new(),
        }
    }
}

/// What an EPOCH-START's UI certifies.
pub fn epoch_start_certified_digest(replica: ReplicaId, epoch: u64) -> Digest {
    let mut builder = DigestBuilder::new("tessera.epoch-start.v1");
    builder.u64(replica.0 as u64).u64(epoch);
    builder.finish()
}

/// Client ids from this one up are reserved for INSTALL entries (one per replica); no client
/// may use them (`ClusterConfig` refuses them).
pub const INSTALL_CLIENT_BASE: u64 = u64::MAX - limits::MAX_REPLICAS as u64 + 1;

/// The reserved client id of `replica`'s INSTALL entries.
pub fn install_client(replica: ReplicaId) -> ClientId {
    ClientId(INSTALL_CLIENT_BASE + replica.0 as u64)
}

impl Request {
    /// If this is an INSTALL entry, the replica it installs an epoch for.
    pub fn install_replica(&self) -> Option<ReplicaId> {
        (self.client.0 >= INSTALL_CLIENT_BASE)
            .then(|| ReplicaId((self.client.0 - INSTALL_CLIENT_BASE) as u32))
    }
}

/// What a CHECKPOINT's UI certifies.
pub fn checkpoint_certified_digest(
    replica: ReplicaId,
    seq: SeqNum,
    state_digest: &Digest,
    view: View,
    epochs: &[EpochInstall],
) -> Digest {
    let mut builder = DigestBuilder::new("tessera.checkpoint.v2");
    builder
        .u64(replica.0 as u64)
        .u64(seq.0)
        .digest(state_digest)
        .u64(view.0)
        .u64(epochs.len() as u64);
    for install in epochs {
        builder
            .u64(install.replica.0 as u64)
            .u64(install.epoch)
            .u64(install.installed_at.0);
    }
    builder.finish()
}

/// A checkpoint certificate: f+1 matching CHECKPOINT messages from distinct replicas, or the
/// genesis certificate (sequence 0, no messages) that every replica starts from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct CheckpointCertificate {
    /// The checkpointed sequence number.
    pub seq: SeqNum,
    /// The agreed state digest.
    pub state_digest: Digest,
    /// The matching CHECKPOINT messages (empty only for genesis).
    pub checkpoints: Vec<Checkpoint>,
}

/// One of a replica's own certified messages, as quoted in the log `O` of its VIEW-CHANGE.
///
/// PREPAREs and COMMITs carry the batch, because the new primary must re-propose it; earlier
/// VIEW-CHANGE and NEW-VIEW messages are quoted by their header and payload digest only, which
/// is what their UI certifies, so logs never nest.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum LogEntry {
    /// A PREPARE the replica sent as primary.
    Prepare(Prepare),
    /// A COMMIT the replica sent, with the batch of the PREPARE it committed to.
    Commit {
        /// The COMMIT.
        commit: Commit,
        /// The batch whose digest the commit's PREPARE header carries.
        batch: Arc<Vec<Request>>,
    },
    /// A CHECKPOINT the replica sent.
    Checkpoint(Checkpoint),
    /// A VIEW-CHANGE the replica sent, by reference.
    ViewChange(ViewChangeRef),
    /// A NEW-VIEW the replica sent, by reference.
    NewView(NewViewRef),
    /// The EPOCH-START that opened the replica's current USIG epoch (counter 1 of it: the first
    /// anchor of the epoch's logs).
    EpochStart(EpochStart),
}

impl LogEntry {
    /// The UI of the quoted message.
    pub fn ui(&self) -> &Ui {
        match self {
            LogEntry::Prepare(prepare) => &prepare.header.ui,
            LogEntry::Commit { commit, .. } => &commit.ui,
            LogEntry::Checkpoint(checkpoint) => &checkpoint.ui,
            LogEntry::ViewChange(reference) => &reference.ui,
            LogEntry::NewView(reference) => &reference.ui,
            LogEntry::EpochStart(start) => &start.ui,
        }
    }

    /// The replica whose USIG certified the quoted message.
    pub fn sender(&self) -> ReplicaId {
        match self {
            LogEntry::Prepare(prepare) => prepare.header.primary,
            LogEntry::Commit { commit, .. } => commit.replica,
            LogEntry::Checkpoint(checkpoint) => checkpoint.replica,
            LogEntry::ViewChange(reference) => reference.replica,
            LogEntry::NewView(reference) => reference.primary,
            LogEntry::EpochStart(start) => start.replica,
        }
    }

    /// What the quoted message's UI certifies.
    pub fn certified_digest(&self) -> Digest {
        match self {
            LogEntry::Prepare(prepare) => prepare.header.certified_digest(),
            LogEntry::Commit { commit, .. } => commit.certified_digest(),
            LogEntry::Checkpoint(checkpoint) => checkpoint.certified_digest(),
            LogEntry::ViewChange(reference) => reference.certified_digest(),
            LogEntry::NewView(reference) => reference.certified_digest(),
            LogEntry::EpochStart(start) => start.certified_digest(),
        }
    }
}

/// A VIEW-CHANGE quoted by reference.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ViewChangeRef {
    /// Sender.
    pub replica: ReplicaId,
    /// The view it asked to move to.
    pub to_view: View,
    /// Digest of its checkpoint certificate and log.
    pub payload_digest: Digest,
    /// Its UI.
    pub ui: Ui,
}

impl ViewChangeRef {
    /// What the UI certifies.
    pub fn certified_digest(&self) -> Digest {
        view_change_certified_digest(self.replica, self.to_view, &self.payload_digest)
    }
}

/// A NEW-VIEW quoted by reference.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct NewViewRef {
    /// Sender (the primary of `view`).
    pub primary: ReplicaId,
    /// The view it starts.
    pub view: View,
    /// Digest of its VIEW-CHANGE set.
    pub payload_digest: Digest,
    /// Its UI.
    pub ui: Ui,
}

impl NewViewRef {
    /// What the UI certifies.
    pub fn certified_digest(&self) -> Digest {
        new_view_certified_digest(self.primary, self.view, &self.payload_digest)
    }
}

/// What a VIEW-CHANGE's UI certifies.
pub fn view_change_certified_digest(replica: ReplicaId, to_view: View, payload: &Digest) -> Digest {
    let mut builder = DigestBuilder::new("tessera.view-change.v1");
    builder.u64(replica.0 as u64).u64(to_view.0).digest(payload);
    builder.finish()
}

/// What a NEW-VIEW's UI certifies.
pub fn new_view_certified_digest(primary: ReplicaId, view: View, payload: &Digest) -> Digest {
    let mut builder = DigestBuilder::new("tessera.new-view.v1");
    builder.u64(primary.0 as u64).u64(view.0).digest(payload);
    builder.finish()
}

/// VIEW-CHANGE (paper 004: `<VIEW-CHANGE, s_i, v', C_latest, O, UI_i>`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ViewChange {
    /// Sender.
    pub replica: ReplicaId,
    /// The view it moves to.
    pub to_view: View,
    /// Its latest stable checkpoint certificate (`C_latest`).
    pub checkpoint: CheckpointCertificate,
    /// Its own certified messages (`O`), contiguous in counter, from an anchor to this message.
    pub log: Vec<LogEntry>,
    /// Justification, not certified by the sender: the NEW-VIEW of every view `w > 0` in which
    /// `log` has a PREPARE or COMMIT. Each is checked on its own (recursively), so a Byzantine
    /// primary's PREPARE that correct replicas rejected can never pass as a candidate for `S`.
    pub new_views: Vec<Arc<NewView>>,
    /// Its UI; `ui.counter` is one more than the last entry of `log`.
    pub ui: Ui,
}

impl ViewChange {
    /// Digest of the payload (checkpoint and log), which the UI certifies through the header.
    pub fn payload_digest(&self) -> Digest {
        view_change_payload_digest(&self.checkpoint, &self.log)
    }

    /// The compact reference form, as quoted in later logs.
    pub fn to_ref(&self) -> ViewChangeRef {
        ViewChangeRef {
            replica: self.replica,
            to_view: self.to_view,
            payload_digest: self.payload_digest(),
            ui: self.ui.clone(),
        }
    }
}

/// Digest of a VIEW-CHANGE payload.
pub fn view_change_payload_digest(checkpoint: &CheckpointCertificate, log: &[LogEntry]) -> Digest {
    let mut builder = DigestBuilder::new("tessera.view-change-payload.v1");
    builder.bytes(&crate::encoding::encode(checkpoint));
    builder.u64(log.len() as u64);
    for entry in log {
        builder
            .u64(entry.ui().counter)
            .digest(&entry.certified_digest());
    }
    builder.finish()
}

/// NEW-VIEW (paper 004: `<NEW-VIEW, s_i, v', V_vc, S, UI_i>`). `S` is not sent: every replica
/// recomputes it from `view_changes` with the same deterministic function as the primary.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct NewView {
    /// Sender (the primary of `view`).
    pub primary: ReplicaId,
    /// The view it starts.
    pub view: View,
    /// The new-view certificate `V_vc`: a quorum of VIEW-CHANGE messages for `view`.
    pub view_changes: Vec<Arc<ViewChange>>,
    /// The primary's UI.
    pub ui: Ui,
}

impl NewView {
    /// Digest of the payload.
    pub fn payload_digest(&self) -> Digest {
        new_view_payload_digest(&self.view_changes)
    }

    /// The compact reference form.
    pub fn to_ref(&self) -> NewViewRef {
        NewViewRef {
            primary: self.primary,
            view: self.view,
            payload_digest: self.payload_digest(),
            ui: self.ui.clone(),
        }
    }
}

/// Digest of a NEW-VIEW payload.
pub fn new_view_payload_digest(view_changes: &[Arc<ViewChange>]) -> Digest {
    let mut builder = DigestBuilder::new("tessera.new-view-payload.v2");
    builder.u64(view_changes.len() as u64);
    for view_change in view_changes {
        builder
            .u64(view_change.ui.epoch)
            .u64(view_change.ui.counter)
            .digest(&view_change.to_ref().certified_digest());
    }
    builder.finish()
}

/// REQ-VIEW-CHANGE: `replica` suspects the primary of `from_view` and asks to move to `to_view`.
/// Not USIG-certified (paper 004); authenticated by the channel it arrives on.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ReqViewChange {
    /// Sender.
    pub replica: ReplicaId,
    /// The view the sender is in.
    pub from_view: View,
    /// The view the sender asks for.
    pub to_view: View,
}

/// Asks for a replica's certified messages with counters in `from_counter..=to_counter`
/// (retransmission; any replica that kept them may answer, since they certify themselves).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Fetch {
    /// Who asks.
    pub replica: ReplicaId,
    /// Whose messages.
    pub stream: ReplicaId,
    /// The USIG epoch of that stream the counters belong to.
    pub epoch: u64,
    /// First counter wanted.
    pub from_counter: u64,
    /// Last counter wanted.
    pub to_counter: u64,
}

/// Periodic liveness and progress beacon; lets peers notice messages they never received.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Heartbeat {
    /// Sender.
    pub replica: ReplicaId,
    /// Sender's current view.
    pub view: View,
    /// The sender's USIG epoch (`head_counter` counts in it).
    pub epoch: u64,
    /// Highest USIG counter the sender has used.
    pub head_counter: u64,
    /// Last sequence number the sender executed.
    pub last_executed: SeqNum,
    /// Sender's latest stable checkpoint.
    pub stable_checkpoint: SeqNum,
    /// For each replica (by id), the next USIG counter the sender expects from it: an
    /// acknowledgement that lets each replica drop its own messages everyone has processed.
    pub processed: Vec<u64>,
    /// For each replica (by id), the USIG epoch `processed` counts in.
    pub epochs: Vec<u64>,
}

/// Asks for the state at the sender's latest stable checkpoint (at least `min_seq`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StateRequest {
    /// Who asks.
    pub replica: ReplicaId,
    /// The oldest checkpoint that is of any use to the asker.
    pub min_seq: SeqNum,
}

/// What a replica needs to fetch the state at a stable checkpoint, all of it checkable against
/// the checkpoint certificate: the partition digests (their Merkle root and the client table's
/// digest give the certified state digest) and the client table itself.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct StateSummary {
    /// Who answers.
    pub replica: ReplicaId,
    /// The stable checkpoint the state belongs to.
    pub certificate: CheckpointCertificate,
    /// The digest of every partition of the application state at that checkpoint, in order.
    pub partitions: Vec<Digest>,
    /// The encoded client table at that checkpoint.
    #[serde(with = "serde_bytes")]
    pub clients: Vec<u8>,
    /// The answering replica's own latest CHECKPOINT messages per replica, which let the receiver
    /// resume every peer's message stream after the checkpoint.
    pub anchors: Vec<Checkpoint>,
}

/// Asks for one chunk of one partition of the state at a stable checkpoint.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct PartitionRequest {
    /// Who asks.
    pub replica: ReplicaId,
    /// The checkpoint whose state is fetched.
    pub seq: SeqNum,
    /// Its certified state digest: a replica serves any state of its own at `seq` with this
    /// digest, stable or not yet (a faulty replica may complete a certificate that the others
    /// have not seen yet; the state is the same).
    pub state_digest: Digest,
    /// Which partition.
    pub partition: u32,
    /// Where the chunk starts (`None`: at the beginning), as the previous reply said.
    #[serde(with = "serde_bytes")]
    pub cursor: Option<Vec<u8>>,
    /// Asks only for the partition's digest, not its bytes (the digest votes of paper 001's
    /// latency-first and bandwidth-first strategies).
    pub digest_only: bool,
}

/// One chunk of a partition, or word that the checkpoint is no longer kept.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct PartitionReply {
    /// Who answers.
    pub replica: ReplicaId,
    /// The checkpoint asked about.
    pub seq: SeqNum,
    /// The partition asked about.
    pub partition: u32,
    /// The cursor asked for (so the asker matches the reply to its request).
    #[serde(with = "serde_bytes")]
    pub cursor: Option<Vec<u8>>,
    /// The chunk, or `None` if the replier no longer keeps that checkpoint's state or was asked
    /// for the digest only.
    pub chunk: Option<ChunkBytes>,
    /// The partition's digest at the checkpoint, answering a digest-only request (`None`: the
    /// replier no longer keeps that checkpoint's state, or was asked for bytes).
    pub digest: Option<Digest>,
}

/// A chunk on the wire.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct ChunkBytes {
    /// The chunk's bytes (the service's encoding).
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// Where the next chunk starts; `None` after the last.
    #[serde(with = "serde_bytes")]
    pub next: Option<Vec<u8>>,
}

/// Everything a replica sends to another replica.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum ReplicaMessage {
    /// A client request forwarded to the primary.
    Request(Request),
    /// PREPARE.
    Prepare(Prepare),
    /// COMMIT.
    Commit(Commit),
    /// CHECKPOINT.
    Checkpoint(Checkpoint),
    /// REQ-VIEW-CHANGE.
    ReqViewChange(ReqViewChange),
    /// VIEW-CHANGE.
    ViewChange(Arc<ViewChange>),
    /// NEW-VIEW.
    NewView(Arc<NewView>),
    /// Retransmission request.
    Fetch(Fetch),
    /// Progress beacon.
    Heartbeat(Heartbeat),
    /// State transfer request.
    StateRequest(StateRequest),
    /// State transfer answer: what to fetch.
    StateSummary(StateSummary),
    /// Asks for a chunk of a partition.
    PartitionRequest(PartitionRequest),
    /// A chunk of a partition.
    PartitionReply(PartitionReply),
    /// The first message of a new USIG epoch of its sender.
    EpochStart(EpochStart),
    /// Asks for the NEW-VIEW that started `view` (a replica that missed it cannot join the view).
    FetchNewView {
        /// Who asks.
        replica: ReplicaId,
        /// Which view.
        view: View,
    },
}

impl ReplicaMessage {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ReplicaMessage::Request(_) => "request",
            ReplicaMessage::Prepare(_) => "prepare",
            ReplicaMessage::Commit(_) => "commit",
            ReplicaMessage::Checkpoint(_) => "checkpoint",
            ReplicaMessage::ReqViewChange(_) => "req-view-change",
            ReplicaMessage::ViewChange(_) => "view-change",
            ReplicaMessage::NewView(_) => "new-view",
            ReplicaMessage::Fetch(_) => "fetch",
            ReplicaMessage::Heartbeat(_) => "heartbeat",
            ReplicaMessage::StateRequest(_) => "state-request",
            ReplicaMessage::StateSummary(_) => "state-summary",
            ReplicaMessage::PartitionRequest(_) => "partition-request",
            ReplicaMessage::PartitionReply(_) => "partition-reply",
            ReplicaMessage::EpochStart(_) => "epoch-start",
            ReplicaMessage::FetchNewView { .. } => "fetch-new-view",
        }
    }
}

/// A size or shape violation found before any cryptography or protocol logic runs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// Operation bytes over [`limits::MAX_OPERATION_BYTES`].
    #[error("operation of {0} bytes exceeds the limit")]
    OperationTooLarge(usize),
    /// A signature that is not 64 bytes.
    #[error("signature of {0} bytes (Ed25519 signatures are 64)")]
    BadSignatureLength(usize),
    /// More MACs than replicas can exist.
    #[error("authenticator with {0} MACs exceeds the replica limit")]
    TooManyMacs(usize),
    /// A UI certificate over [`limits::MAX_UI_CERTIFICATE_BYTES`].
    #[error("UI certificate of {0} bytes exceeds the limit")]
    CertificateTooLarge(usize),
    /// A batch over [`limits::MAX_BATCH_REQUESTS`].
    #[error("batch of {0} requests exceeds the limit")]
    BatchTooLarge(usize),
}
