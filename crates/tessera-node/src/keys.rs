//! The keys a node needs, parsed once from the cluster files into typed values.

use std::collections::HashMap;
use tessera_crypto::{mac, Digest, VerifyingKey};
use tessera_types::cluster::{parse_key, ClusterConfig, ReplicaSecrets};
use tessera_types::{ReplicaId, Request};

use crate::NodeError;

/// What this node shares with each client credential: the MAC key and the public signature key.
#[derive(Debug)]
pub struct ClientKeys {
    mac_keys: HashMap<u32, [u8; 32]>,
    verifying_keys: HashMap<u32, VerifyingKey>,
}

impl ClientKeys {
    /// Builds the table from the cluster's public keys and this replica's client MAC keys.
    pub fn load(
        cluster: &ClusterConfig,
        secrets: &ReplicaSecrets,
    ) -> Result<ClientKeys, NodeError> {
        let mut verifying_keys = HashMap::new();
        for (index, client) in cluster.clients.iter().enumerate() {
            let field = format!("clients[{index}].public_key");
            let bytes = parse_key("cluster.toml", &field, &client.public_key)?;
            let key = VerifyingKey::from_bytes(&bytes).map_err(|error| {
                NodeError::Config(format!(
                    "cluster.toml `{field}` is not an Ed25519 key: {error}"
                ))
            })?;
            verifying_keys.insert(client.id, key);
        }
        let mut mac_keys = HashMap::new();
        for (index, client_key) in secrets.client_keys.iter().enumerate() {
            let field = format!("client_keys[{index}].key");
            let key = parse_key("replica secret file", &field, &client_key.key)?;
            if !verifying_keys.contains_key(&client_key.client) {
                return Err(NodeError::Config(format!(
                    "replica secret file `{field}` is for client credential {} which cluster.toml does not register; regenerate with `tessera init --force`",
                    client_key.client
                )));
            }
            mac_keys.insert(client_key.client, key);
        }
        Ok(ClientKeys {
            mac_keys,
            verifying_keys,
        })
    }

    /// Builds a table directly (tests, tools).
    pub fn from_parts(
        mac_keys: HashMap<u32, [u8; 32]>,
        verifying_keys: HashMap<u32, VerifyingKey>,
    ) -> ClientKeys {
        ClientKeys {
            mac_keys,
            verifying_keys,
        }
    }

    /// The MAC key this replica shares with `credential`.
    pub fn mac_key(&self, credential: u32) -> Option<&[u8; 32]> {
        self.mac_keys.get(&credential)
    }

    /// True if the credential is registered.
    pub fn knows(&self, credential: u32) -> bool {
        self.verifying_keys.contains_key(&credential)
    }

    /// Checks the request's Ed25519 signature against its credential's public key.
    pub fn verify_signature(&self, request: &Request, digest: &Digest) -> bool {
        match self.verifying_keys.get(&request.client.credential()) {
            Some(key) => key.verify(digest, &request.signature),
            None => false,
        }
    }

    /// Checks the MAC addressed to `replica`.
    pub fn verify_mac(&self, request: &Request, digest: &Digest, replica: ReplicaId) -> bool {
        let Some(key) = self.mac_key(request.client.credential()) else {
            return false;
        };
        match request.macs.get(replica.0 as usize) {
            Some(tag) => mac::verify_mac16(key, digest, tag),
            None => false,
        }
    }
}

/// Parses the 32-byte pairwise channel keys (index = peer id; the own entry is unused).
pub fn peer_keys(secrets: &ReplicaSecrets) -> Result<Vec<[u8; 32]>, NodeError> {
    secrets
        .peer_keys
        .iter()
        .enumerate()
        .map(|(index, text)| {
            parse_key("replica secret file", &format!("peer_keys[{index}]"), text)
                .map_err(NodeError::from)
        })
        .collect()
}
