//! Request authentication for the core, with signature checks moved off the core thread.
//!
//! Client connection tasks verify Ed25519 signatures in parallel before a request reaches the
//! core and record each success in a [`VerifiedCache`]; the core's
//! [`RequestAuthenticator::verify_signature`] then costs a hash and a lookup instead of ~40 µs.
//! The cache key binds the request digest *and* the signature bytes, so a cached verdict only
//! ever answers for the exact signature that was checked: a request carrying the same content
//! with a different (bad) signature misses the cache and is verified for real.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use tessera_core::RequestAuthenticator;
use tessera_crypto::{Digest, DigestBuilder};
use tessera_types::{ReplicaId, Request};

use crate::keys::ClientKeys;

/// Number of independently locked shards, so parallel connection tasks rarely contend.
const CACHE_SHARDS: usize = 16;

/// Default number of remembered verdicts (well above the core's default pending-request bound).
pub const VERIFIED_CACHE_ENTRIES_DEFAULT: usize = 65_536;

/// A bounded set of (request digest, signature) pairs whose signature verified.
/// Oldest entries are evicted first within each shard.
pub struct VerifiedCache {
    shards: Vec<Mutex<CacheShard>>,
    entries_per_shard_max: usize,
}

#[derive(Default)]
struct CacheShard {
    members: HashSet<Digest>,
    order: VecDeque<Digest>,
}

impl VerifiedCache {
    /// A cache holding at most `entries_max` verdicts (at least one per shard).
    pub fn new(entries_max: usize) -> VerifiedCache {
        let entries_per_shard_max = entries_max.div_ceil(CACHE_SHARDS).max(1);
        VerifiedCache {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(CacheShard::default()))
                .collect(),
            entries_per_shard_max,
        }
    }

    /// The cache key of a request's signature.
    pub fn key(request_digest: &Digest, signature: &[u8]) -> Digest {
        let mut builder = DigestBuilder::new("tessera.node.verified-signature.v1");
        builder.digest(request_digest).bytes(signature);
        builder.finish()
    }

    fn shard(&self, key: &Digest) -> &Mutex<CacheShard> {
        &self.shards[key.0[0] as usize % CACHE_SHARDS]
    }

    /// Records that the signature behind `key` verified.
    pub fn insert(&self, key: Digest) {
        let mut shard = lock(self.shard(&key));
        if !shard.members.insert(key) {
            return;
        }
        shard.order.push_back(key);
        while shard.order.len() > self.entries_per_shard_max {
            if let Some(evicted) = shard.order.pop_front() {
                shard.members.remove(&evicted);
            }
        }
    }

    /// True if the signature behind `key` was verified and is still remembered.
    pub fn contains(&self, key: &Digest) -> bool {
        lock(self.shard(key)).members.contains(key)
    }

    /// Number of remembered verdicts.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).order.len())
            .sum()
    }

    /// True if nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Locks a mutex, recovering from poisoning: a panicking holder cannot leave a `CacheShard`
/// or a registry half-updated in a way that matters (at worst an entry is missing).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The [`RequestAuthenticator`] a replica's core uses.
pub struct NodeAuthenticator {
    replica: ReplicaId,
    clients: Arc<ClientKeys>,
    cache: Arc<VerifiedCache>,
}

impl NodeAuthenticator {
    /// An authenticator for `replica`, consulting `cache` before verifying signatures.
    pub fn new(
        replica: ReplicaId,
        clients: Arc<ClientKeys>,
        cache: Arc<VerifiedCache>,
    ) -> NodeAuthenticator {
        NodeAuthenticator {
            replica,
            clients,
            cache,
        }
    }

    /// Verifies a signature and records a success in the cache (used by connection tasks).
    pub fn verify_and_remember(
        clients: &ClientKeys,
        cache: &VerifiedCache,
        request: &Request,
    ) -> bool {
        let digest = request.digest();
        let key = VerifiedCache::key(&digest, &request.signature);
        if cache.contains(&key) {
            return true;
        }
        let valid = clients.verify_signature(request, &digest);
        if valid {
            cache.insert(key);
        }
        valid
    }
}

impl RequestAuthenticator for NodeAuthenticator {
    fn verify_signature(&self, request: &Request) -> bool {
        NodeAuthenticator::verify_and_remember(&self.clients, &self.cache, request)
    }

    fn verify_mac(&self, request: &Request) -> bool {
        self.clients
            .verify_mac(request, &request.digest(), self.replica)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tessera_crypto::{mac, SigningKey};
    use tessera_types::ClientId;

    fn setup() -> (SigningKey, [u8; 32], Arc<ClientKeys>) {
        let signing = SigningKey::from_seed(&[5u8; 32]);
        let mac_key = [6u8; 32];
        let clients = ClientKeys::from_parts(
            HashMap::from([(1, mac_key)]),
            HashMap::from([(1, signing.verifying_key())]),
        );
        (signing, mac_key, Arc::new(clients))
    }

    fn request(signing: &SigningKey, mac_key: &[u8; 32], credential: u32) -> Request {
        let mut request = Request {
            client: ClientId::new(credential, 9),
            request_number: 1,
            operation: b"op".to_vec(),
            signature: Vec::new(),
            macs: Vec::new(),
        };
        let digest = request.digest();
        request.signature = signing.sign(&digest).to_vec();
        request.macs = vec![[0u8; 16], mac::mac16(mac_key, &digest)];
        request
    }

    #[test]
    fn checks_signature_and_own_mac() {
        let (signing, mac_key, clients) = setup();
        let cache = Arc::new(VerifiedCache::new(64));
        let authenticator = NodeAuthenticator::new(ReplicaId(1), clients.clone(), cache.clone());
        let good = request(&signing, &mac_key, 1);
        assert!(authenticator.verify_mac(&good));
        assert!(authenticator.verify_signature(&good));
        assert_eq!(cache.len(), 1, "a verified signature is remembered");

        let other = NodeAuthenticator::new(ReplicaId(0), clients.clone(), cache.clone());
        assert!(!other.verify_mac(&good), "replica 0's MAC slot is garbage");
        let unknown = NodeAuthenticator::new(ReplicaId(7), clients, cache);
        assert!(!unknown.verify_mac(&good), "no MAC slot for replica 7");
    }

    #[test]
    fn unknown_credential_and_bad_signature_fail() {
        let (signing, mac_key, clients) = setup();
        let cache = Arc::new(VerifiedCache::new(64));
        let authenticator = NodeAuthenticator::new(ReplicaId(1), clients, cache.clone());
        let stranger = request(&signing, &mac_key, 2);
        assert!(!authenticator.verify_mac(&stranger));
        assert!(!authenticator.verify_signature(&stranger));

        let good = request(&signing, &mac_key, 1);
        assert!(authenticator.verify_signature(&good));
        let mut forged = good.clone();
        forged.signature[10] ^= 1;
        assert!(
            !authenticator.verify_signature(&forged),
            "a cached verdict must not vouch for a different signature over the same content"
        );
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn cache_is_bounded_and_evicts_oldest() {
        let cache = VerifiedCache::new(CACHE_SHARDS * 2);
        let keys: Vec<Digest> = (0..1000u32)
            .map(|index| Digest::of("tessera.test", &index.to_be_bytes()))
            .collect();
        for key in &keys {
            cache.insert(*key);
            cache.insert(*key);
        }
        assert!(cache.len() <= CACHE_SHARDS * 2);
        assert!(cache.contains(keys.last().unwrap()));
        assert!(!cache.contains(&keys[0]));
    }
}
