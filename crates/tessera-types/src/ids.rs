//! Identifiers. Newtypes, so a view can never be passed where a sequence number is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A replica's index in the cluster, `0..n`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct ReplicaId(pub u32);

/// A client identity. The high 32 bits name the registered credential (whose keys the replicas
/// know); the low 32 bits are a session chosen by the client process, so one credential can drive
/// many independent clients, each with its own request numbering (paper 004's `V_req`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct ClientId(pub u64);

/// A view number; the primary of view `v` is replica `v mod n`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct View(pub u64);

/// An execution sequence number. Each sequence number orders one batch of requests.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct SeqNum(pub u64);

impl ClientId {
    /// Builds a client id from a credential index and a session number.
    pub fn new(credential: u32, session: u32) -> ClientId {
        ClientId(((credential as u64) << 32) | session as u64)
    }

    /// The registered credential whose keys authenticate this client.
    pub fn credential(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The session within the credential.
    pub fn session(self) -> u32 {
        self.0 as u32
    }
}

impl View {
    /// The primary of this view in a cluster of `n` replicas.
    pub fn primary(self, n: u32) -> ReplicaId {
        assert!(n > 0, "a cluster has at least one replica");
        ReplicaId((self.0 % n as u64) as u32)
    }

    /// The next view. Views never wrap: u64 view numbers are not exhausted in practice, and a
    /// saturated view would stop view changes rather than silently reuse a view.
    pub fn next(self) -> View {
        View(self.0.saturating_add(1))
    }
}

impl SeqNum {
    /// The next sequence number.
    pub fn next(self) -> SeqNum {
        SeqNum(
            self.0
                .checked_add(1)
                .expect("sequence numbers never reach u64::MAX"),
        )
    }
}

macro_rules! display_newtype {
    ($type:ident, $prefix:literal) => {
        impl fmt::Debug for $type {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, concat!($prefix, "{}"), self.0)
            }
        }
        impl fmt::Display for $type {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "{}", self.0)
            }
        }
    };
}

display_newtype!(ReplicaId, "r");
display_newtype!(ClientId, "c");
display_newtype!(View, "v");
display_newtype!(SeqNum, "s");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_round_trips_credential_and_session() {
        let id = ClientId::new(7, 0xdead_beef);
        assert_eq!(id.credential(), 7);
        assert_eq!(id.session(), 0xdead_beef);
    }

    #[test]
    fn primary_rotates_round_robin() {
        assert_eq!(View(0).primary(3), ReplicaId(0));
        assert_eq!(View(4).primary(3), ReplicaId(1));
    }
}
