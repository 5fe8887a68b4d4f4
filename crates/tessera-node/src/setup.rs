//! Generating a new cluster: the public description and every party's secrets, with fresh keys.
//!
//! Each key shared by two parties is drawn once and written into both parties' secrets: one
//! channel key per pair of replicas, one MAC key per (client credential, replica) pair. Signing
//! seeds (clients, Ed25519 USIGs) stay with their owner; only public keys go into the cluster.
//! Randomness comes from the caller (`OsRng` in the CLI), so this module does no IO.

use rand::{CryptoRng, RngCore};
use std::collections::BTreeMap;
use tessera_crypto::SigningKey;
use tessera_types::cluster::{
    ClientKey, ClientPublic, ClientSecrets, ClusterConfig, ReplicaEndpoint, ReplicaSecrets,
    UsigKind,
};
use tessera_types::ProtocolConfig;

use crate::NodeError;

/// Most client credentials one cluster is generated with.
pub const CLIENTS_MAX: u32 = 10_000;
/// Client ports are `base_port + CLIENT_PORT_OFFSET + replica id`.
pub const CLIENT_PORT_OFFSET: u16 = 100;
/// Metrics ports are `base_port + METRICS_PORT_OFFSET + replica id`. 150, not a multiple of
/// 100: clusters are often laid out 100 or 200 ports apart (replica, client and swtpm ports
/// at offsets 0, 100 and 200), and an offset of 150 stays clear of every neighbour's ports.
pub const METRICS_PORT_OFFSET: u16 = 150;

/// What cluster to generate.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Protocol settings (`n`, `f` and the tunables).
    pub protocol: ProtocolConfig,
    /// USIG backend.
    pub usig: UsigKind,
    /// Host every replica listens on.
    pub host: String,
    /// Replica `i` listens for replicas on `base_port + i`, for clients on
    /// `base_port + CLIENT_PORT_OFFSET + i` and for metrics scrapes on
    /// `base_port + METRICS_PORT_OFFSET + i`.
    pub base_port: u16,
    /// Number of client credentials (ids `0..clients`).
    pub clients: u32,
}

/// A generated cluster: everything `tessera init` writes.
#[derive(Clone, Debug)]
pub struct ClusterFiles {
    /// `cluster.toml`.
    pub cluster: ClusterConfig,
    /// `replica-<id>.secret.toml`, by id.
    pub replicas: Vec<ReplicaSecrets>,
    /// `client-<id>.secret.toml`, by id.
    pub clients: Vec<ClientSecrets>,
}

fn random_key<R: RngCore + CryptoRng>(rng: &mut R) -> [u8; 32] {
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    key
}

/// Generates a cluster with fresh keys; refuses specs the protocol or the port range cannot
/// support, saying which bound and what to change.
pub fn generate_cluster<R: RngCore + CryptoRng>(
    spec: &ClusterSpec,
    rng: &mut R,
) -> Result<ClusterFiles, NodeError> {
    spec.protocol.validate()?;
    if spec.clients == 0 || spec.clients > CLIENTS_MAX {
        return Err(NodeError::Config(format!(
            "the number of clients is {} but must be between 1 and {CLIENTS_MAX}",
            spec.clients
        )));
    }
    let n = spec.protocol.n as usize;
    let highest_offset = u32::from(CLIENT_PORT_OFFSET.max(METRICS_PORT_OFFSET));
    let highest_port = u32::from(spec.base_port) + highest_offset + spec.protocol.n - 1;
    if highest_port > u32::from(u16::MAX) {
        return Err(NodeError::Config(format!(
            "base port {} is too high: replica ports would reach {highest_port}; use at most {}",
            spec.base_port,
            u32::from(u16::MAX) + 1 - highest_offset - spec.protocol.n
        )));
    }

    let mut pair_keys = BTreeMap::new();
    for low in 0..n {
        for high in (low + 1)..n {
            pair_keys.insert((low, high), random_key(rng));
        }
    }
    let usig_secrets: Vec<[u8; 32]> = (0..n).map(|_| random_key(rng)).collect();
    // client_mac_keys[c][r] is shared by client credential c and replica r.
    let client_mac_keys: Vec<Vec<[u8; 32]>> = (0..spec.clients)
        .map(|_| (0..n).map(|_| random_key(rng)).collect())
        .collect();
    let client_seeds: Vec<[u8; 32]> = (0..spec.clients).map(|_| random_key(rng)).collect();
    let public_key_of =
        |seed: &[u8; 32]| hex::encode(SigningKey::from_seed(seed).verifying_key().to_bytes());

    let port = |offset: u32, id: usize| u32::from(spec.base_port) + offset + id as u32;
    let cluster = ClusterConfig {
        protocol: spec.protocol.clone(),
        usig: spec.usig,
        replicas: (0..n)
            .map(|id| ReplicaEndpoint {
                id: id as u32,
                replica_address: format!("{}:{}", spec.host, port(0, id)),
                client_address: format!(
                    "{}:{}",
                    spec.host,
                    port(u32::from(CLIENT_PORT_OFFSET), id)
                ),
                metrics_address: format!(
                    "{}:{}",
                    spec.host,
                    port(u32::from(METRICS_PORT_OFFSET), id)
                ),
                usig_public_key: match spec.usig {
                    // usigd keys and TPM enrolments are made by whoever sets those up.
                    UsigKind::Hmac | UsigKind::Usigd | UsigKind::Tpm => String::new(),
                    UsigKind::Ed25519 => public_key_of(&usig_secrets[id]),
                },
            })
            .collect(),
        clients: client_seeds
            .iter()
            .enumerate()
            .map(|(id, seed)| ClientPublic {
                id: id as u32,
                public_key: public_key_of(seed),
            })
            .collect(),
        store: Default::default(),
    };
    let replicas = (0..n)
        .map(|replica| ReplicaSecrets {
            replica: replica as u32,
            usig_secret: match spec.usig {
                UsigKind::Hmac | UsigKind::Ed25519 => hex::encode(usig_secrets[replica]),
                UsigKind::Usigd | UsigKind::Tpm => String::new(),
            },
            usig_endpoint: String::new(),
            usig_hmac_keys: match spec.usig {
                UsigKind::Hmac => usig_secrets.iter().map(hex::encode).collect(),
                UsigKind::Ed25519 | UsigKind::Usigd | UsigKind::Tpm => Vec::new(),
            },
            peer_keys: (0..n)
                .map(
                    |peer| match pair_keys.get(&(replica.min(peer), replica.max(peer))) {
                        Some(key) => hex::encode(key),
                        None => hex::encode([0u8; 32]), // own entry: unused
                    },
                )
                .collect(),
            client_keys: client_mac_keys
                .iter()
                .enumerate()
                .map(|(client, keys)| ClientKey {
                    client: client as u32,
                    key: hex::encode(keys[replica]),
                })
                .collect(),
        })
        .collect();
    let clients = client_mac_keys
        .iter()
        .zip(&client_seeds)
        .enumerate()
        .map(|(id, (keys, seed))| ClientSecrets {
            id: id as u32,
            signing_key: hex::encode(seed),
            replica_keys: keys.iter().map(hex::encode).collect(),
        })
        .collect();
    Ok(ClusterFiles {
        cluster,
        replicas,
        clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ClientKeys;
    use tessera_types::ReplicaId;

    fn spec(usig: UsigKind) -> ClusterSpec {
        ClusterSpec {
            protocol: ProtocolConfig {
                n: 4,
                f: 1,
                ..ProtocolConfig::default()
            },
            usig,
            host: "127.0.0.1".into(),
            base_port: 7000,
            clients: 3,
        }
    }

    #[test]
    fn shared_keys_match_and_files_validate() {
        for usig in [UsigKind::Hmac, UsigKind::Ed25519] {
            let files = generate_cluster(&spec(usig), &mut rand::rngs::OsRng).unwrap();
            let text = files.cluster.to_toml();
            let cluster = ClusterConfig::from_toml(&text).unwrap();
            assert_eq!(cluster, files.cluster);
            for (id, secrets) in files.replicas.iter().enumerate() {
                let text = toml::to_string(secrets).unwrap();
                let parsed = ReplicaSecrets::from_toml(&text, &cluster).unwrap();
                ClientKeys::load(&cluster, &parsed).unwrap();
                crate::build_usig(&cluster, &parsed, ReplicaId(id as u32)).unwrap();
            }
            for client in &files.clients {
                let text = toml::to_string(client).unwrap();
                ClientSecrets::from_toml(&text, &cluster).unwrap();
            }
            assert_eq!(
                files.replicas[1].peer_keys[3],
                files.replicas[3].peer_keys[1]
            );
            assert_ne!(
                files.replicas[1].peer_keys[3],
                files.replicas[1].peer_keys[2]
            );
            assert_eq!(
                files.clients[2].replica_keys[3],
                files.replicas[3].client_keys[2].key
            );
            assert_eq!(cluster.replicas[3].client_address, "127.0.0.1:7103");
        }
    }

    #[test]
    fn external_usigs_leave_no_usig_secret_with_the_replica() {
        let files = generate_cluster(&spec(UsigKind::Tpm), &mut rand::rngs::OsRng).unwrap();
        for secrets in &files.replicas {
            assert!(secrets.usig_secret.is_empty() && secrets.usig_hmac_keys.is_empty());
            // The endpoint is whoever deploys the USIG's to fill in; until then the file is
            // refused with the field named.
            let text = toml::to_string(secrets).unwrap();
            let error = ReplicaSecrets::from_toml(&text, &files.cluster).unwrap_err();
            assert!(error.to_string().contains("usig_endpoint"), "{error}");
            let mut placed = secrets.clone();
            placed.usig_endpoint = "swtpm:127.0.0.1:2321".into();
            let text = toml::to_string(&placed).unwrap();
            ReplicaSecrets::from_toml(&text, &files.cluster).unwrap();
        }
        // A TPM replica without an enrolment in cluster.toml says what to run.
        let mut placed = files.replicas[0].clone();
        placed.usig_endpoint = "swtpm:127.0.0.1:2321".into();
        let error = crate::build_usig(&files.cluster, &placed, ReplicaId(0))
            .err()
            .expect("no enrolment");
        assert!(
            error.to_string().contains("tessera usig provision"),
            "{error}"
        );
    }

    #[test]
    fn refuses_what_cannot_work() {
        let mut too_few = spec(UsigKind::Hmac);
        too_few.protocol.n = 2;
        let error = generate_cluster(&too_few, &mut rand::rngs::OsRng).unwrap_err();
        assert!(error.to_string().contains("2f+1"), "{error}");
        let mut high_port = spec(UsigKind::Hmac);
        high_port.base_port = 65_500;
        assert!(generate_cluster(&high_port, &mut rand::rngs::OsRng).is_err());
        let mut no_clients = spec(UsigKind::Hmac);
        no_clients.clients = 0;
        assert!(generate_cluster(&no_clients, &mut rand::rngs::OsRng).is_err());
    }
}
