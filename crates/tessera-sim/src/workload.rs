//! Simulated clients: a seeded random key-value workload and the recorded history.

use tessera_core::ReplyCollector;
use tessera_kv::{Command, Response};
use tessera_types::{ClientId, Request};

use crate::rng::SimRng;

/// The credential every simulated client session signs with.
pub const CLIENT_CREDENTIAL: u32 = 1;

/// One operation in the history: its invocation and, if it completed, its result.
#[derive(Clone, Debug)]
pub struct Operation {
    /// Who issued it.
    pub client: ClientId,
    /// The client's request number.
    pub request_number: u64,
    /// What it asked.
    pub command: Command,
    /// When it was invoked (logical ms).
    pub invoke_ms: u64,
    /// When f+1 matching replies arrived, and the agreed response.
    pub completion: Option<(u64, Response)>,
}

/// A client session with at most one outstanding request.
pub struct Client {
    /// The session's identity.
    pub id: ClientId,
    /// Request numbers issued so far (the last one is the outstanding or last completed one).
    pub issued: u64,
    /// Operations left to issue after the current one.
    pub remaining: u32,
    /// The outstanding request, its collector, and its index in the history.
    pub outstanding: Option<(Request, ReplyCollector, usize)>,
    /// Bumped on each invocation, so a stale retry timer is ignored.
    pub retry_generation: u64,
    /// The view the latest completed reply reported; its primary gets the first transmission.
    pub view: u64,
}

impl Client {
    /// A fresh session `session` that will issue `operations` operations.
    pub fn new(session: u32, operations: u32) -> Client {
        Client {
            id: ClientId::new(CLIENT_CREDENTIAL, session),
            issued: 0,
            remaining: operations,
            outstanding: None,
            retry_generation: 0,
            view: 0,
        }
    }

    /// True once every operation completed.
    pub fn done(&self) -> bool {
        self.remaining == 0 && self.outstanding.is_none()
    }
}

/// Draws one operation over `keys` keys: get, set, incr or compare-and-set.
pub fn random_command(rng: &mut SimRng, keys: u32) -> Command {
    let key = format!("k{}", rng.below(u64::from(keys))).into_bytes();
    // Values are small decimal numbers so `incr` and `set` interleave meaningfully.
    let value = |rng: &mut SimRng| rng.below(10).to_string().into_bytes();
    match rng.below(4) {
        0 => Command::Get { key },
        1 => Command::Set {
            key,
            value: value(rng),
        },
        2 => Command::Incr { key, delta: 1 },
        _ => {
            let expected = if rng.chance(200) {
                None
            } else {
                Some(value(rng))
            };
            Command::CompareAndSet {
                key,
                expected,
                new: Some(value(rng)),
            }
        }
    }
}
