//! Reply synthesis for clients (paper 004 §4: f+1 matching replies from distinct replicas).
//! Pure logic shared by the client library, the gateway and the simulator.

use std::collections::BTreeMap;
use tessera_types::{ReplicaId, Reply, View};

/// Collects replies for one outstanding request.
#[derive(Debug)]
pub struct ReplyCollector {
    request_number: u64,
    needed: usize,
    /// Result bytes each replica answered with (a replica's first answer counts; later ones
    /// from the same replica are ignored, so a faulty replica cannot vote twice).
    votes: BTreeMap<ReplicaId, (Vec<u8>, View)>,
}

/// What a new reply means for the request.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// Not enough matching replies yet.
    Pending,
    /// f+1 replicas agree on this result; the highest view among them tells who is primary.
    Complete {
        /// The agreed result.
        result: Vec<u8>,
        /// Highest view reported by the matching replies.
        view: View,
    },
    /// The reply was for another request or a duplicate vote; ignored.
    Ignored,
}

impl ReplyCollector {
    /// Starts collecting for `request_number`, completing on `needed` (= f+1) matching results.
    pub fn new(request_number: u64, needed: usize) -> ReplyCollector {
        assert!(needed >= 1, "at least one matching reply is needed");
        ReplyCollector {
            request_number,
            needed,
            votes: BTreeMap::new(),
        }
    }

    /// Adds one (already authenticated) reply.
    pub fn add(&mut self, reply: Reply) -> ReplyOutcome {
        if reply.request_number != self.request_number || self.votes.contains_key(&reply.replica) {
            return ReplyOutcome::Ignored;
        }
        self.votes
            .insert(reply.replica, (reply.result.clone(), reply.view));
        let matching: Vec<View> = self
            .votes
            .values()
            .filter(|(result, _)| *result == reply.result)
            .map(|(_, view)| *view)
            .collect();
        if matching.len() >= self.needed {
            let view = matching.into_iter().max().expect("non-empty");
            return ReplyOutcome::Complete {
                result: reply.result,
                view,
            };
        }
        ReplyOutcome::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_types::ClientId;

    fn reply(replica: u32, result: &[u8]) -> Reply {
        Reply {
            replica: ReplicaId(replica),
            client: ClientId(1),
            request_number: 7,
            view: View(replica as u64),
            result: result.to_vec(),
        }
    }

    #[test]
    fn completes_on_f_plus_one_matching_only() {
        let mut collector = ReplyCollector::new(7, 2);
        assert_eq!(collector.add(reply(0, b"bad")), ReplyOutcome::Pending);
        assert_eq!(collector.add(reply(1, b"ok")), ReplyOutcome::Pending);
        assert_eq!(
            collector.add(reply(2, b"ok")),
            ReplyOutcome::Complete {
                result: b"ok".to_vec(),
                view: View(2)
            }
        );
    }

    #[test]
    fn a_replica_cannot_vote_twice() {
        let mut collector = ReplyCollector::new(7, 2);
        assert_eq!(collector.add(reply(0, b"x")), ReplyOutcome::Pending);
        assert_eq!(collector.add(reply(0, b"x")), ReplyOutcome::Ignored);
    }
}
