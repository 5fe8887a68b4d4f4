//! Counters of everything the driver drops or refuses, by reason.
//!
//! Plain relaxed atomics: they are read by humans and metrics exporters, never used to decide
//! anything, so no ordering between them is needed.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why the driver dropped a frame, a message or a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DropReason {
    /// A replica frame announced more than `MAX_FRAME_BYTES`.
    PeerFrameOversized,
    /// A replica frame's MAC (or sequence number) did not verify.
    PeerFrameBadMac,
    /// A replica frame authenticated but did not decode as a `ReplicaMessage`.
    PeerFrameMalformed,
    /// A replica connection failed its handshake.
    PeerHandshakeFailed,
    /// A message for a peer was dropped because its outgoing queue was full.
    PeerQueueFull,
    /// An event was dropped because the core's inbox was full.
    CoreQueueFull,
    /// A client frame was over the client frame limit.
    ClientFrameOversized,
    /// A client frame did not decode.
    ClientFrameMalformed,
    /// A `Hello` with an unknown credential or a bad MAC.
    ClientHelloRejected,
    /// A request with a bad shape.
    ClientRequestBadShape,
    /// A request whose credential is not registered.
    ClientUnknownCredential,
    /// A request whose signature (and MAC) did not verify.
    ClientRequestBadSignature,
    /// A reply for a client with no registered connection.
    ReplyClientUnknown,
    /// A reply dropped because the client connection's queue was full.
    ReplyQueueFull,
    /// A registration refused because the registry is full.
    ClientRegistryFull,
    /// A replica connection refused because too many are open.
    PeerConnectionLimit,
    /// A client connection refused because too many are open.
    ClientConnectionLimit,
}

impl DropReason {
    /// Every reason, in display order.
    pub const ALL: [DropReason; 17] = [
        DropReason::PeerFrameOversized,
        DropReason::PeerFrameBadMac,
        DropReason::PeerFrameMalformed,
        DropReason::PeerHandshakeFailed,
        DropReason::PeerQueueFull,
        DropReason::CoreQueueFull,
        DropReason::ClientFrameOversized,
        DropReason::ClientFrameMalformed,
        DropReason::ClientHelloRejected,
        DropReason::ClientRequestBadShape,
        DropReason::ClientUnknownCredential,
        DropReason::ClientRequestBadSignature,
        DropReason::ReplyClientUnknown,
        DropReason::ReplyQueueFull,
        DropReason::ClientRegistryFull,
        DropReason::PeerConnectionLimit,
        DropReason::ClientConnectionLimit,
    ];

    /// Stable snake_case name, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::PeerFrameOversized => "peer_frame_oversized",
            DropReason::PeerFrameBadMac => "peer_frame_bad_mac",
            DropReason::PeerFrameMalformed => "peer_frame_malformed",
            DropReason::PeerHandshakeFailed => "peer_handshake_failed",
            DropReason::PeerQueueFull => "peer_queue_full",
            DropReason::CoreQueueFull => "core_queue_full",
            DropReason::ClientFrameOversized => "client_frame_oversized",
            DropReason::ClientFrameMalformed => "client_frame_malformed",
            DropReason::ClientHelloRejected => "client_hello_rejected",
            DropReason::ClientRequestBadShape => "client_request_bad_shape",
            DropReason::ClientUnknownCredential => "client_unknown_credential",
            DropReason::ClientRequestBadSignature => "client_request_bad_signature",
            DropReason::ReplyClientUnknown => "reply_client_unknown",
            DropReason::ReplyQueueFull => "reply_queue_full",
            DropReason::ClientRegistryFull => "client_registry_full",
            DropReason::PeerConnectionLimit => "peer_connection_limit",
            DropReason::ClientConnectionLimit => "client_connection_limit",
        }
    }
}

/// Drop counters of one node, shared by all its tasks.
#[derive(Debug, Default)]
pub struct NodeCounters {
    drops: [AtomicU64; DropReason::ALL.len()],
    peer_frames_received: AtomicU64,
    peer_frames_sent: AtomicU64,
    client_requests_received: AtomicU64,
    replies_sent: AtomicU64,
    core_events_queued: AtomicU64,
    core_events_taken: AtomicU64,
}

impl NodeCounters {
    /// Counts one drop.
    pub fn dropped(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many times `reason` was counted.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }

    /// Every drop counter with its name.
    pub fn drop_snapshot(&self) -> Vec<(&'static str, u64)> {
        DropReason::ALL
            .iter()
            .map(|reason| (reason.name(), self.drops(*reason)))
            .collect()
    }

    pub(crate) fn peer_frame_received(&self) {
        self.peer_frames_received.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn peer_frames_sent(&self, frames: u64) {
        self.peer_frames_sent.fetch_add(frames, Ordering::Relaxed);
    }

    pub(crate) fn client_request_received(&self) {
        self.client_requests_received
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn replies_sent(&self, replies: u64) {
        self.replies_sent.fetch_add(replies, Ordering::Relaxed);
    }

    /// Authenticated frames received from peers.
    pub fn peer_frames_received_total(&self) -> u64 {
        self.peer_frames_received.load(Ordering::Relaxed)
    }

    /// Frames written to peers.
    pub fn peer_frames_sent_total(&self) -> u64 {
        self.peer_frames_sent.load(Ordering::Relaxed)
    }

    /// Requests received on the client port.
    pub fn client_requests_received_total(&self) -> u64 {
        self.client_requests_received.load(Ordering::Relaxed)
    }

    /// Replies written to clients.
    pub fn replies_sent_total(&self) -> u64 {
        self.replies_sent.load(Ordering::Relaxed)
    }

    pub(crate) fn core_event_queued(&self) {
        self.core_events_queued.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn core_event_taken(&self) {
        self.core_events_taken.fetch_add(1, Ordering::Relaxed);
    }

    /// Events in the core's inbox: queued minus taken. The two loads are not one snapshot, so
    /// the value is approximate (never negative).
    pub fn core_inbox_events(&self) -> u64 {
        let taken = self.core_events_taken.load(Ordering::Relaxed);
        self.core_events_queued
            .load(Ordering::Relaxed)
            .saturating_sub(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_counter() {
        let counters = NodeCounters::default();
        for (index, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(
                *reason as usize, index,
                "ALL must list reasons in declaration order"
            );
        }
        counters.dropped(DropReason::PeerFrameBadMac);
        counters.dropped(DropReason::PeerFrameBadMac);
        assert_eq!(counters.drops(DropReason::PeerFrameBadMac), 2);
        assert_eq!(counters.drops(DropReason::PeerQueueFull), 0);
        let names: Vec<_> = counters
            .drop_snapshot()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names.len(), DropReason::ALL.len());
    }
}
