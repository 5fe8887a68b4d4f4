//! The files that describe a cluster: one public `cluster.toml` everyone reads, one secret file per
//! replica, one secret file per client credential. Parsing is pure (`&str` in, typed value or an
//! error naming the field out); reading and writing the files is the IO crates' job.

use crate::config::ProtocolConfig;
use crate::ids::ReplicaId;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Which USIG backend the replicas use.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UsigKind {
    /// In-process HMAC-SHA256 (test/measurement only: every replica holds every key).
    #[default]
    Hmac,
    /// In-process Ed25519 (test/measurement only: the key lives in the replica process).
    Ed25519,
    /// Ed25519 certificates made by `tessera usigd`, a separate process that owns the key and a
    /// persisted counter; `usig_public_key` is the daemon's key.
    Usigd,
    /// TPM 2.0 (exclusive audit session over an NV counter, signed by a restricted P-256 key);
    /// `usig_public_key` is the enrolment printed by `tessera usig provision`.
    Tpm,
}

/// Public description of the cluster (`cluster.toml`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Protocol tunables.
    pub protocol: ProtocolConfig,
    /// USIG backend.
    pub usig: UsigKind,
    /// One entry per replica, in id order.
    pub replicas: Vec<ReplicaEndpoint>,
    /// Registered client credentials.
    pub clients: Vec<ClientPublic>,
    /// Limits of the replicated store. Optional (files written before it existed parse), and
    /// left out of the file while it holds the defaults, so such files read and write back
    /// byte for byte (a replica's write-ahead log is tied to the exact text).
    #[serde(default, skip_serializing_if = "StoreConfig::is_default")]
    pub store: StoreConfig,
}

/// Default of [`StoreConfig::total_bytes_max`]: 1 GiB.
pub const STORE_TOTAL_BYTES_DEFAULT: u64 = 1 << 30;
/// Smallest accepted [`StoreConfig::total_bytes_max`]: 1 KiB.
pub const STORE_TOTAL_BYTES_MIN: u64 = 1 << 10;
/// Largest accepted [`StoreConfig::total_bytes_max`]: 1 TiB. Every replica holds the whole
/// store in memory, and a replica fetching state stages what it receives in memory too, so a
/// limit beyond any machine's memory would only move the failure from config load to run time.
pub const STORE_TOTAL_BYTES_MAX: u64 = 1 << 40;

/// The `[store]` section: limits of the replicated key-value store.
///
/// Cluster-wide, not per replica: a write one replica refuses as over the limit and another
/// accepts would split their states, so every replica must read the same numbers.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Most bytes stored: the sum of the lengths of every key and value. A write that would
    /// exceed it is refused, and so is a transferred state that would.
    pub total_bytes_max: u64,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            total_bytes_max: STORE_TOTAL_BYTES_DEFAULT,
        }
    }
}

impl StoreConfig {
    /// True when every field holds its default (the section is then not written).
    pub fn is_default(&self) -> bool {
        *self == StoreConfig::default()
    }
}

/// Where a replica listens and how to check its USIG.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaEndpoint {
    /// Replica id; must equal its index in `replicas`.
    pub id: u32,
    /// `host:port` for replica-to-replica traffic.
    pub replica_address: String,
    /// `host:port` for clients.
    pub client_address: String,
    /// `host:port` for the Prometheus metrics endpoint (`GET /metrics`); empty: no endpoint.
    /// Optional so cluster files written before metrics existed still parse.
    #[serde(default)]
    pub metrics_address: String,
    /// How to check the replica's USIG: hex Ed25519 public key (ed25519, usigd), the TPM
    /// enrolment text (tpm), empty for the HMAC backend.
    #[serde(default)]
    pub usig_public_key: String,
}

/// A client credential the replicas accept.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPublic {
    /// Credential id (high 32 bits of every `ClientId` using it).
    pub id: u32,
    /// Hex Ed25519 public key that verifies its request signatures.
    pub public_key: String,
}

/// A replica's secrets (`replica-<id>.secret.toml`); readable only by that replica.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSecrets {
    /// Which replica these belong to.
    pub replica: u32,
    /// Hex 32-byte USIG secret: HMAC key or Ed25519 seed (empty for usigd and tpm, whose key
    /// the replica never holds).
    #[serde(default)]
    pub usig_secret: String,
    /// Where the replica reaches its USIG: usigd's socket path, or the TPM (`swtpm:HOST:PORT`
    /// or `/dev/tpmrm0`, optionally followed by `,ak-handle=0x81010101`). Empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub usig_endpoint: String,
    /// HMAC backend only: hex HMAC keys of every replica (index = replica id), to verify UIs.
    #[serde(default)]
    pub usig_hmac_keys: Vec<String>,
    /// Hex 32-byte channel key shared with each replica (index = replica id; own entry unused).
    pub peer_keys: Vec<String>,
    /// Hex 32-byte MAC key shared with each client credential (same order as `clients`).
    pub client_keys: Vec<ClientKey>,
}

/// A MAC key shared between this replica and one client credential.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKey {
    /// Credential id.
    pub client: u32,
    /// Hex 32-byte key.
    pub key: String,
}

/// A client credential's secrets (`client-<id>.secret.toml`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSecrets {
    /// Credential id.
    pub id: u32,
    /// Hex 32-byte Ed25519 seed.
    pub signing_key: String,
    /// Hex 32-byte MAC key shared with each replica (index = replica id).
    pub replica_keys: Vec<String>,
}

/// A cluster file that cannot be used, naming the field and the fix.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClusterFileError {
    /// Not valid TOML or wrong types.
    #[error("cannot parse {file}: {message}")]
    Parse {
        /// Which file.
        file: String,
        /// Parser message (names the field and line).
        message: String,
    },
    /// Parsed but inconsistent.
    #[error("invalid {file}: `{field}` {problem}; {fix}")]
    Invalid {
        /// Which file.
        file: String,
        /// The offending field.
        field: String,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
}

/// Decodes a hex string of exactly 32 bytes.
pub fn parse_key(file: &str, field: &str, hex_text: &str) -> Result<[u8; 32], ClusterFileError> {
    let bytes = hex::decode(hex_text.trim()).map_err(|error| ClusterFileError::Invalid {
        file: file.into(),
        field: field.into(),
        problem: format!("is not hex ({error})"),
        fix: "regenerate the cluster with `tessera init --force`".into(),
    })?;
    bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| ClusterFileError::Invalid {
            file: file.into(),
            field: field.into(),
            problem: format!("has {} bytes, expected 32", bytes.len()),
            fix: "regenerate the cluster with `tessera init --force`".into(),
        })
}

fn invalid(file: &str, field: &str, problem: String, fix: &str) -> ClusterFileError {
    ClusterFileError::Invalid {
        file: file.into(),
        field: field.into(),
        problem,
        fix: fix.into(),
    }
}

impl ClusterConfig {
    /// Parses and validates `cluster.toml` text.
    pub fn from_toml(text: &str) -> Result<ClusterConfig, ClusterFileError> {
        let config: ClusterConfig =
            toml::from_str(text).map_err(|error| ClusterFileError::Parse {
                file: "cluster.toml".into(),
                message: error.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Serializes to TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("cluster config serializes")
    }

    /// Checks the protocol bounds and that the replica list matches `n`.
    pub fn validate(&self) -> Result<(), ClusterFileError> {
        const FILE: &str = "cluster.toml";
        self.protocol
            .validate()
            .map_err(|error| ClusterFileError::Invalid {
                file: FILE.into(),
                field: format!("protocol.{}", error.field),
                problem: error.problem,
                fix: error.fix,
            })?;
        let total = self.store.total_bytes_max;
        if !(STORE_TOTAL_BYTES_MIN..=STORE_TOTAL_BYTES_MAX).contains(&total) {
            return Err(invalid(
                FILE,
                "store.total_bytes_max",
                format!("is {total}"),
                &format!(
                    "give between {STORE_TOTAL_BYTES_MIN} and {STORE_TOTAL_BYTES_MAX} bytes \
                     (every replica holds the whole store in memory)"
                ),
            ));
        }
        if self.replicas.len() != self.protocol.n as usize {
            return Err(invalid(
                FILE,
                "replicas",
                format!(
                    "lists {} replicas but protocol.n is {}",
                    self.replicas.len(),
                    self.protocol.n
                ),
                "list exactly n [[replicas]] entries",
            ));
        }
        for (index, replica) in self.replicas.iter().enumerate() {
            if replica.id as usize != index {
                return Err(invalid(
                    FILE,
                    &format!("replicas[{index}].id"),
                    format!("is {} but must equal its position {index}", replica.id),
                    "order [[replicas]] by id starting at 0",
                ));
            }
            check_metrics_address(index, replica)?;
            if matches!(self.usig, UsigKind::Ed25519 | UsigKind::Usigd) {
                parse_key(
                    FILE,
                    &format!("replicas[{index}].usig_public_key"),
                    &replica.usig_public_key,
                )?;
            }
        }
        for (index, client) in self.clients.iter().enumerate() {
            if client.id == u32::MAX {
                // Its sessions include the client ids reserved for INSTALL entries.
                return Err(invalid(
                    FILE,
                    &format!("clients[{index}].id"),
                    format!("is {} (reserved for the replicas' own entries)", client.id),
                    "use a smaller credential id (`tessera init` numbers them from 0)",
                ));
            }
            parse_key(
                FILE,
                &format!("clients[{index}].public_key"),
                &client.public_key,
            )?;
        }
        Ok(())
    }

    /// The endpoint of a replica.
    pub fn replica(&self, id: ReplicaId) -> &ReplicaEndpoint {
        &self.replicas[id.0 as usize]
    }
}

/// An optional metrics address must be `host:port` with a port, and must not share the
/// replica's other ports (the replica would fail to start with a less helpful error).
fn check_metrics_address(index: usize, replica: &ReplicaEndpoint) -> Result<(), ClusterFileError> {
    let address = replica.metrics_address.trim();
    if address.is_empty() {
        return Ok(());
    }
    let field = format!("replicas[{index}].metrics_address");
    let port = address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok());
    if port.is_none() {
        return Err(invalid(
            "cluster.toml",
            &field,
            format!("is `{address}`, not host:port"),
            "write it as host:port (for example \"127.0.0.1:7150\"), or \"\" for no metrics endpoint",
        ));
    }
    if address == replica.replica_address || address == replica.client_address {
        return Err(invalid(
            "cluster.toml",
            &field,
            format!("is `{address}`, which this replica already uses for other traffic"),
            "give the metrics endpoint a port of its own, or \"\" for none",
        ));
    }
    Ok(())
}

impl ReplicaSecrets {
    /// Parses and checks a replica secret file against the cluster.
    pub fn from_toml(
        text: &str,
        cluster: &ClusterConfig,
    ) -> Result<ReplicaSecrets, ClusterFileError> {
        const FILE: &str = "replica secret file";
        let secrets: ReplicaSecrets =
            toml::from_str(text).map_err(|error| ClusterFileError::Parse {
                file: FILE.into(),
                message: error.to_string(),
            })?;
        if matches!(cluster.usig, UsigKind::Hmac | UsigKind::Ed25519) {
            parse_key(FILE, "usig_secret", &secrets.usig_secret)?;
        } else if secrets.usig_endpoint.is_empty() {
            return Err(invalid(
                FILE,
                "usig_endpoint",
                "is empty but this cluster's USIG is outside the replica".into(),
                "set it to usigd's socket path or the TPM (swtpm:HOST:PORT or /dev/tpmrm0)",
            ));
        }
        if secrets.peer_keys.len() != cluster.replicas.len() {
            return Err(invalid(
                FILE,
                "peer_keys",
                format!(
                    "has {} keys for {} replicas",
                    secrets.peer_keys.len(),
                    cluster.replicas.len()
                ),
                "regenerate the cluster with `tessera init --force`",
            ));
        }
        if cluster.usig == UsigKind::Hmac && secrets.usig_hmac_keys.len() != cluster.replicas.len()
        {
            return Err(invalid(
                FILE,
                "usig_hmac_keys",
                format!(
                    "has {} keys for {} replicas",
                    secrets.usig_hmac_keys.len(),
                    cluster.replicas.len()
                ),
                "regenerate the cluster with `tessera init --force`",
            ));
        }
        Ok(secrets)
    }
}

impl ClientSecrets {
    /// Parses and checks a client secret file against the cluster.
    pub fn from_toml(
        text: &str,
        cluster: &ClusterConfig,
    ) -> Result<ClientSecrets, ClusterFileError> {
        const FILE: &str = "client secret file";
        let secrets: ClientSecrets =
            toml::from_str(text).map_err(|error| ClusterFileError::Parse {
                file: FILE.into(),
                message: error.to_string(),
            })?;
        parse_key(FILE, "signing_key", &secrets.signing_key)?;
        if secrets.replica_keys.len() != cluster.replicas.len() {
            return Err(invalid(
                FILE,
                "replica_keys",
                format!(
                    "has {} keys for {} replicas",
                    secrets.replica_keys.len(),
                    cluster.replicas.len()
                ),
                "regenerate the cluster with `tessera init --force`",
            ));
        }
        if !cluster.clients.iter().any(|client| client.id == secrets.id) {
            return Err(invalid(
                FILE,
                "id",
                format!(
                    "credential {} is not registered in cluster.toml",
                    secrets.id
                ),
                "use a client file written by `tessera init` for this cluster",
            ));
        }
        Ok(secrets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(metrics_address: &str) -> ClusterConfig {
        let protocol = ProtocolConfig::default();
        ClusterConfig {
            replicas: (0..protocol.n)
                .map(|id| ReplicaEndpoint {
                    id,
                    replica_address: format!("127.0.0.1:{}", 7000 + id),
                    client_address: format!("127.0.0.1:{}", 7100 + id),
                    metrics_address: metrics_address.replace("ID", &id.to_string()),
                    usig_public_key: String::new(),
                })
                .collect(),
            protocol,
            usig: UsigKind::Hmac,
            clients: Vec::new(),
            store: StoreConfig::default(),
        }
    }

    #[test]
    fn the_store_section_is_optional_bounded_and_written_only_when_changed() {
        let default = cluster("");
        let text = default.to_toml();
        assert!(!text.contains("[store]"), "{text}");
        assert_eq!(ClusterConfig::from_toml(&text).unwrap(), default);
        let mut raised = cluster("");
        raised.store.total_bytes_max = 3 << 30;
        let text = raised.to_toml();
        assert!(
            text.contains("[store]\ntotal_bytes_max = 3221225472"),
            "{text}"
        );
        assert_eq!(ClusterConfig::from_toml(&text).unwrap(), raised);
        for bad in [0, STORE_TOTAL_BYTES_MIN - 1, STORE_TOTAL_BYTES_MAX + 1] {
            let mut config = cluster("");
            config.store.total_bytes_max = bad;
            let error = config.validate().unwrap_err().to_string();
            assert!(
                error.contains("store.total_bytes_max") && error.contains(&format!("is {bad}")),
                "{error}"
            );
        }
        let unknown = format!("{}\n[store]\ntotal_bytes = 5\n", cluster("").to_toml());
        assert!(ClusterConfig::from_toml(&unknown).is_err());
    }

    #[test]
    fn the_transfer_strategy_is_named_in_the_protocol_section() {
        let text = cluster("").to_toml();
        assert!(text.contains("state_transfer = \"merkle\""), "{text}");
        for strategy in crate::TransferStrategy::ALL {
            let chosen = text.replace(
                "state_transfer = \"merkle\"",
                &format!("state_transfer = \"{strategy}\""),
            );
            let parsed = ClusterConfig::from_toml(&chosen).expect("a known strategy");
            assert_eq!(parsed.protocol.state_transfer, strategy);
        }
        let absent = text.replace("state_transfer = \"merkle\"\n", "");
        let parsed = ClusterConfig::from_toml(&absent).expect("the field is optional");
        assert_eq!(
            parsed.protocol.state_transfer,
            crate::TransferStrategy::Merkle
        );
        let unknown = text.replace(
            "state_transfer = \"merkle\"",
            "state_transfer = \"fastest\"",
        );
        let error = ClusterFileError::to_string(&ClusterConfig::from_toml(&unknown).unwrap_err());
        assert!(
            error.contains("state_transfer") && error.contains("latency-first"),
            "{error}"
        );
    }

    #[test]
    fn metrics_address_is_optional_and_old_files_parse() {
        let mut text = cluster("").to_toml();
        text = text.replace("metrics_address = \"\"\n", "");
        assert!(!text.contains("metrics_address"), "{text}");
        let parsed = ClusterConfig::from_toml(&text).expect("a file without the field parses");
        assert!(parsed
            .replicas
            .iter()
            .all(|replica| replica.metrics_address.is_empty()));
        cluster("127.0.0.1:715ID")
            .validate()
            .expect("host:port is valid");
        cluster("[::1]:715ID")
            .validate()
            .expect("IPv6 host:port is valid");
    }

    #[test]
    fn bad_metrics_addresses_name_the_field_and_the_fix() {
        for (address, problem) in [
            ("7150", "not host:port"),
            ("127.0.0.1:http", "not host:port"),
            (":7150", "not host:port"),
            ("127.0.0.1:710ID", "already uses"),
        ] {
            let error = cluster(address).validate().unwrap_err().to_string();
            assert!(
                error.contains("replicas[0].metrics_address") && error.contains(problem),
                "{address}: {error}"
            );
            assert!(error.contains("\"\" for"), "the fix is given: {error}");
        }
    }
}
