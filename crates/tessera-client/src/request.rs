//! Pure request building and reply checking: what bytes a client puts on the wire and which
//! replies it believes. No IO here, so the authenticator layout is testable on its own.

use crate::error::ClientError;
use tessera_crypto::{mac16, verify_mac16, SigningKey};
use tessera_types::cluster::{parse_key, ClientSecrets, ClusterConfig};
use tessera_types::limits::{MAX_OPERATION_BYTES, MAX_RESULT_BYTES};
use tessera_types::wire::{hello_digest, reply_digest, ClientToReplica, REPLY_MAC_LEN};
use tessera_types::{encode, ClientId, ReplicaId, Reply, Request};

/// Largest reply frame a client reads: the largest result plus room for the reply's other
/// fields and its MAC. A longer frame marks the replica that sent it as faulty.
pub const REPLY_FRAME_BYTES_MAX: usize = MAX_RESULT_BYTES + 1024;

/// Bytes of the big-endian length prefix of every frame.
pub const FRAME_PREFIX_BYTES: usize = 4;

/// A client credential, parsed: its id, its signing key and the MAC key it shares with each
/// replica (index = replica id).
pub struct Credential {
    id: u32,
    signing_key: SigningKey,
    replica_keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(
            formatter,
            "Credential {{ id: {}, replicas: {} }}",
            self.id,
            self.replica_keys.len()
        )
    }
}

impl Credential {
    /// Parses the secret file contents and checks them against the cluster.
    pub fn new(
        cluster: &ClusterConfig,
        secrets: &ClientSecrets,
    ) -> Result<Credential, ClientError> {
        const FILE: &str = "client secret file";
        let config_error = |error: tessera_types::cluster::ClusterFileError| {
            ClientError::Config(error.to_string())
        };
        if secrets.replica_keys.len() != cluster.replicas.len() {
            return Err(ClientError::Config(format!(
                "the client secret file has {} replica keys but the cluster has {} replicas; \
                 regenerate the cluster with `tessera init --force`",
                secrets.replica_keys.len(),
                cluster.replicas.len()
            )));
        }
        if !cluster.clients.iter().any(|client| client.id == secrets.id) {
            return Err(ClientError::Config(format!(
                "client credential {} is not registered in cluster.toml; use a client file \
                 written by `tessera init` for this cluster",
                secrets.id
            )));
        }
        let seed = parse_key(FILE, "signing_key", &secrets.signing_key).map_err(config_error)?;
        let replica_keys = secrets
            .replica_keys
            .iter()
            .enumerate()
            .map(|(index, key)| parse_key(FILE, &format!("replica_keys[{index}]"), key))
            .collect::<Result<Vec<_>, _>>()
            .map_err(config_error)?;
        Ok(Credential {
            id: secrets.id,
            signing_key: SigningKey::from_seed(&seed),
            replica_keys,
        })
    }

    /// The credential id (high 32 bits of every session's `ClientId`).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Number of replicas this credential has keys for.
    pub fn replica_count(&self) -> usize {
        self.replica_keys.len()
    }

    /// Builds a signed request carrying one MAC per replica (`macs[r]` for replica `r`).
    ///
    /// Costs one Ed25519 signature (~21 µs) plus n keyed hashes; callers run it on the
    /// session's own task, never under a lock shared by sessions.
    pub fn build_request(
        &self,
        client: ClientId,
        request_number: u64,
        operation: Vec<u8>,
    ) -> Result<Request, ClientError> {
        debug_assert_eq!(
            client.credential(),
            self.id,
            "session of another credential"
        );
        if operation.len() > MAX_OPERATION_BYTES {
            return Err(ClientError::OperationTooLarge {
                length: operation.len(),
                limit: MAX_OPERATION_BYTES,
            });
        }
        let mut request = Request {
            client,
            request_number,
            operation,
            signature: Vec::new(),
            macs: Vec::new(),
        };
        let digest = request.digest();
        request.signature = self.signing_key.sign(&digest).to_vec();
        request.macs = self
            .replica_keys
            .iter()
            .map(|key| mac16(key, &digest))
            .collect();
        debug_assert!(request.check_shape().is_ok());
        Ok(request)
    }

    /// The `Hello` that registers a connection to `replica` as the reply path for `client`.
    pub fn hello(&self, client: ClientId, replica: ReplicaId) -> ClientToReplica {
        let key = &self.replica_keys[replica.0 as usize];
        ClientToReplica::Hello {
            client,
            mac: mac16(key, &hello_digest(client, replica)),
        }
    }

    /// Checks a reply that arrived on the connection to `connection_replica`: it must claim to
    /// come from that replica and carry a valid MAC under the key shared with it.
    pub fn check_reply(
        &self,
        connection_replica: ReplicaId,
        reply: &Reply,
        mac: &[u8; REPLY_MAC_LEN],
    ) -> Result<(), ReplyRejection> {
        if reply.replica != connection_replica {
            return Err(ReplyRejection::WrongReplica);
        }
        if reply.client.credential() != self.id {
            return Err(ReplyRejection::WrongCredential);
        }
        let Some(key) = self.replica_keys.get(connection_replica.0 as usize) else {
            return Err(ReplyRejection::WrongReplica);
        };
        if !verify_mac16(key, &reply_digest(reply), mac) {
            return Err(ReplyRejection::BadMac);
        }
        Ok(())
    }
}

/// Why a reply was not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyRejection {
    /// The reply names a replica other than the one at the end of the connection.
    WrongReplica,
    /// The reply is for a session of another credential.
    WrongCredential,
    /// The MAC does not verify.
    BadMac,
}

/// Encodes a message as one frame: a big-endian u32 length, then the canonical encoding.
pub fn frame(message: &ClientToReplica) -> Vec<u8> {
    let body = encode(message);
    let length = u32::try_from(body.len()).expect("client frames are far below 4 GiB");
    let mut framed = Vec::with_capacity(FRAME_PREFIX_BYTES + body.len());
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(&body);
    framed
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tessera_crypto::{Digest, VerifyingKey};
    use tessera_types::cluster::{ClientPublic, ReplicaEndpoint, UsigKind};
    use tessera_types::{decode, ProtocolConfig, View};

    pub(crate) const SEED: [u8; 32] = [9u8; 32];

    pub(crate) fn replica_key(replica: u32) -> [u8; 32] {
        [replica as u8 + 1; 32]
    }

    pub(crate) fn cluster(n: u32) -> ClusterConfig {
        let public_key = hex::encode(SigningKey::from_seed(&SEED).verifying_key().to_bytes());
        ClusterConfig {
            protocol: ProtocolConfig {
                n,
                f: (n - 1) / 2,
                ..ProtocolConfig::default()
            },
            usig: UsigKind::Hmac,
            replicas: (0..n)
                .map(|id| ReplicaEndpoint {
                    id,
                    replica_address: format!("127.0.0.1:{}", 17_000 + id),
                    client_address: format!("127.0.0.1:{}", 18_000 + id),
                    metrics_address: String::new(),
                    usig_public_key: String::new(),
                })
                .collect(),
            clients: vec![ClientPublic { id: 5, public_key }],
            store: Default::default(),
        }
    }

    pub(crate) fn secrets(n: u32) -> ClientSecrets {
        ClientSecrets {
            id: 5,
            signing_key: hex::encode(SEED),
            replica_keys: (0..n)
                .map(|replica| hex::encode(replica_key(replica)))
                .collect(),
        }
    }

    pub(crate) fn credential(n: u32) -> Credential {
        Credential::new(&cluster(n), &secrets(n)).expect("valid credential")
    }

    pub(crate) fn signed_reply(
        replica: u32,
        client: ClientId,
        request_number: u64,
        result: &[u8],
    ) -> (Reply, [u8; 16]) {
        let reply = Reply {
            replica: ReplicaId(replica),
            client,
            request_number,
            view: View(0),
            result: result.to_vec(),
        };
        let mac = mac16(&replica_key(replica), &reply_digest(&reply));
        (reply, mac)
    }

    #[test]
    fn request_carries_a_valid_signature_and_one_mac_per_replica_in_replica_order() {
        let credential = credential(3);
        let client = ClientId::new(5, 17);
        let request = credential
            .build_request(client, 42, b"op".to_vec())
            .expect("builds");
        assert_eq!(request.client, client);
        assert_eq!(request.request_number, 42);
        request.check_shape().expect("well-formed");
        let digest: Digest = request.digest();
        let verifying_key =
            VerifyingKey::from_bytes(&SigningKey::from_seed(&SEED).verifying_key().to_bytes())
                .expect("key");
        assert!(verifying_key.verify(&digest, &request.signature));
        assert_eq!(request.macs.len(), 3);
        for (replica, mac) in request.macs.iter().enumerate() {
            assert!(
                verify_mac16(&replica_key(replica as u32), &digest, mac),
                "mac {replica}"
            );
            // Each MAC is under its own replica's key, not another's.
            let other = (replica as u32 + 1) % 3;
            assert!(!verify_mac16(&replica_key(other), &digest, mac));
        }
    }

    #[test]
    fn oversized_operation_is_refused_before_signing() {
        let credential = credential(3);
        let error = credential
            .build_request(ClientId::new(5, 0), 1, vec![0; MAX_OPERATION_BYTES + 1])
            .expect_err("too large");
        assert!(matches!(error, ClientError::OperationTooLarge { .. }));
    }

    #[test]
    fn hello_mac_is_bound_to_client_and_replica() {
        let credential = credential(3);
        let client = ClientId::new(5, 1);
        let ClientToReplica::Hello { client: sent, mac } = credential.hello(client, ReplicaId(2))
        else {
            panic!("not a hello");
        };
        assert_eq!(sent, client);
        assert!(verify_mac16(
            &replica_key(2),
            &hello_digest(client, ReplicaId(2)),
            &mac
        ));
        assert!(!verify_mac16(
            &replica_key(2),
            &hello_digest(client, ReplicaId(1)),
            &mac
        ));
    }

    #[test]
    fn replies_are_checked_for_replica_credential_and_mac() {
        let credential = credential(3);
        let client = ClientId::new(5, 1);
        let (reply, mac) = signed_reply(1, client, 3, b"ok");
        assert_eq!(credential.check_reply(ReplicaId(1), &reply, &mac), Ok(()));
        assert_eq!(
            credential.check_reply(ReplicaId(0), &reply, &mac),
            Err(ReplyRejection::WrongReplica)
        );
        let mut tampered = reply.clone();
        tampered.result = b"no".to_vec();
        assert_eq!(
            credential.check_reply(ReplicaId(1), &tampered, &mac),
            Err(ReplyRejection::BadMac)
        );
        let (foreign, foreign_mac) = signed_reply(1, ClientId::new(6, 1), 3, b"ok");
        assert_eq!(
            credential.check_reply(ReplicaId(1), &foreign, &foreign_mac),
            Err(ReplyRejection::WrongCredential)
        );
    }

    #[test]
    fn frames_are_length_prefixed_canonical_encodings() {
        let credential = credential(3);
        let message = ClientToReplica::Request(
            credential
                .build_request(ClientId::new(5, 0), 1, b"x".to_vec())
                .expect("builds"),
        );
        let framed = frame(&message);
        let length = u32::from_be_bytes(framed[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(length, framed.len() - 4);
        let decoded: ClientToReplica = decode(&framed[4..], length).expect("decodes");
        assert_eq!(decoded, message);
    }

    #[test]
    fn refuses_secrets_that_do_not_match_the_cluster() {
        let error = Credential::new(&cluster(3), &secrets(4)).expect_err("key count mismatch");
        assert!(
            error.to_string().contains("tessera init --force"),
            "{error}"
        );
        let mut unregistered = secrets(3);
        unregistered.id = 99;
        assert!(Credential::new(&cluster(3), &unregistered).is_err());
    }
}
