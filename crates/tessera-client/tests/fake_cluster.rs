//! The client against fake replicas on loopback: honest ones that "agree" by sharing every
//! request they receive, one that forges replies, dead ones and silent ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tessera_client::request::REPLY_FRAME_BYTES_MAX;
use tessera_client::{Client, ClientError, ClientOptions};
use tessera_crypto::{mac16, SigningKey};
use tessera_types::cluster::{
    ClientPublic, ClientSecrets, ClusterConfig, ReplicaEndpoint, UsigKind,
};
use tessera_types::wire::{reply_digest, ClientToReplica, ReplicaStatus, ReplicaToClient};
use tessera_types::{decode, encode, ClientId, ProtocolConfig, ReplicaId, Reply, Request, View};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

const SEED: [u8; 32] = [3u8; 32];
const CREDENTIAL: u32 = 1;

fn replica_key(replica: u32) -> [u8; 32] {
    [replica as u8 + 10; 32]
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Replies `ok:<operation>` to every request any replica received, in `view`.
    Honest,
    /// Replies `forged` with a MAC under the wrong key.
    BadMac,
    /// Accepts connections, never replies.
    Silent,
    /// Nothing listens on its port.
    Dead,
    /// Answers every request with an `Error`.
    Refuse,
    /// Answers every request with a frame longer than any legitimate reply.
    Oversized,
}

struct FakeCluster {
    cluster: ClusterConfig,
    /// Requests each replica received directly from the client.
    direct_requests: Vec<Arc<AtomicU64>>,
}

impl FakeCluster {
    async fn start(behaviours: &[Behaviour], view: u64) -> FakeCluster {
        FakeCluster::start_with_views(behaviours, &vec![view; behaviours.len()]).await
    }

    async fn start_with_views(behaviours: &[Behaviour], views: &[u64]) -> FakeCluster {
        let n = behaviours.len() as u32;
        let (agreed, _) = broadcast::channel::<Request>(1024);
        let mut replicas = Vec::new();
        let mut direct_requests = Vec::new();
        for (index, &behaviour) in behaviours.iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = listener.local_addr().expect("address").to_string();
            let counter = Arc::new(AtomicU64::new(0));
            direct_requests.push(Arc::clone(&counter));
            if behaviour == Behaviour::Dead {
                drop(listener);
            } else {
                let replica = ReplicaId(index as u32);
                let view = View(views[index]);
                let agreed = agreed.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            return;
                        };
                        let agreed = agreed.clone();
                        let counter = Arc::clone(&counter);
                        tokio::spawn(serve(stream, replica, behaviour, view, agreed, counter));
                    }
                });
            }
            replicas.push(ReplicaEndpoint {
                id: index as u32,
                replica_address: "127.0.0.1:1".into(),
                client_address: address,
                metrics_address: String::new(),
                usig_public_key: String::new(),
            });
        }
        let public_key = hex::encode(SigningKey::from_seed(&SEED).verifying_key().to_bytes());
        let cluster = ClusterConfig {
            protocol: ProtocolConfig {
                n,
                f: (n - 1) / 2,
                ..ProtocolConfig::default()
            },
            usig: UsigKind::Hmac,
            replicas,
            clients: vec![ClientPublic {
                id: CREDENTIAL,
                public_key,
            }],
            store: Default::default(),
        };
        FakeCluster {
            cluster,
            direct_requests,
        }
    }

    fn secrets(&self) -> ClientSecrets {
        ClientSecrets {
            id: CREDENTIAL,
            signing_key: hex::encode(SEED),
            replica_keys: (0..self.cluster.replicas.len() as u32)
                .map(|replica| hex::encode(replica_key(replica)))
                .collect(),
        }
    }

    async fn client(&self, options: ClientOptions) -> Result<Client, ClientError> {
        Client::connect(self.cluster.clone(), self.secrets(), options).await
    }
}

fn fast_options() -> ClientOptions {
    ClientOptions {
        retransmit_timeout: Duration::from_millis(50),
        retransmit_timeout_max: Duration::from_millis(200),
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }
}

async fn read_frame(stream: &mut tokio::net::tcp::OwnedReadHalf) -> Option<ClientToReplica> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some(decode(&body, 1 << 24).expect("client frames decode"))
}

fn framed(message: &ReplicaToClient) -> Vec<u8> {
    let body = encode(message);
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&body);
    framed
}

async fn serve(
    stream: TcpStream,
    replica: ReplicaId,
    behaviour: Behaviour,
    view: View,
    agreed: broadcast::Sender<Request>,
    counter: Arc<AtomicU64>,
) {
    let (mut read_half, mut write_half) = stream.into_split();
    let mut registered = std::collections::HashSet::<ClientId>::new();
    // Requests agreed before their session's Hello reached this replica (the Hello and the
    // request travel on different connections); answered once the Hello arrives.
    let mut waiting = Vec::<Request>::new();
    let mut executed = agreed.subscribe();
    loop {
        let mut answer = Vec::new();
        tokio::select! {
            message = read_frame(&mut read_half) => match message {
                None => return,
                Some(ClientToReplica::Hello { client, .. }) => {
                    registered.insert(client);
                    let (ready, still_waiting) = waiting.drain(..).partition(|request: &Request| request.client == client);
                    waiting = still_waiting;
                    answer = ready;
                }
                Some(ClientToReplica::Request(request)) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let refusal = match behaviour {
                        Behaviour::Refuse => framed(&ReplicaToClient::Error("replica overloaded".into())),
                        Behaviour::Oversized => ((REPLY_FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec(),
                        _ => Vec::new(),
                    };
                    if !refusal.is_empty() {
                        if write_half.write_all(&refusal).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let _ = agreed.send(request);
                }
                Some(ClientToReplica::Status) => {
                    if behaviour != Behaviour::Silent {
                        let status = ReplicaToClient::Status(ReplicaStatus { replica, view, ..ReplicaStatus::default() });
                        if write_half.write_all(&framed(&status)).await.is_err() {
                            return;
                        }
                    }
                }
            },
            request = executed.recv() => {
                let Ok(request) = request else { continue };
                if registered.contains(&request.client) {
                    answer.push(request);
                } else {
                    waiting.push(request);
                }
            }
        }
        if behaviour == Behaviour::Silent {
            continue;
        }
        for request in answer {
            // Replicas serve envelopes (tessera_core::envelope): one echo per inner operation.
            let operations: Vec<Vec<u8>> =
                tessera_types::decode(&request.operation, 1 << 20).expect("an envelope");
            let echoes: Vec<Vec<u8>> = operations
                .iter()
                .map(|operation| [b"ok:".as_slice(), operation].concat())
                .collect();
            let result = tessera_types::encode(&Ok::<_, String>(echoes));
            let mut reply = Reply {
                replica,
                client: request.client,
                request_number: request.request_number,
                view,
                result,
            };
            let key = if behaviour == Behaviour::BadMac {
                reply.result = b"forged".to_vec();
                [0u8; 32]
            } else {
                replica_key(replica.0)
            };
            let mac = mac16(&key, &reply_digest(&reply));
            if write_half
                .write_all(&framed(&ReplicaToClient::Reply { reply, mac }))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[tokio::test]
async fn many_sessions_get_agreed_results_without_retransmission() {
    let cluster = FakeCluster::start(&[Behaviour::Honest; 3], 0).await;
    let client = cluster.client(fast_options()).await.expect("connects");
    let mut tasks = Vec::new();
    for task in 0..8u8 {
        let mut session = client.session();
        tasks.push(tokio::spawn(async move {
            for round in 0..20u8 {
                let result = session.invoke(vec![task, round]).await.expect("answered");
                assert_eq!(result, [b'o', b'k', b':', task, round]);
            }
        }));
    }
    for task in tasks {
        task.await.expect("session task");
    }
    let stats = client.stats();
    assert_eq!(stats.retransmissions, 0, "{stats:?}");
    assert_eq!(stats.pending_requests, 0);
    assert_eq!(stats.replies_bad_mac, 0);
    // Only the primary of view 0 was sent requests.
    assert_eq!(cluster.direct_requests[0].load(Ordering::Relaxed), 160);
    assert_eq!(cluster.direct_requests[1].load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn forged_replies_are_dropped_and_counted() {
    let cluster = FakeCluster::start(
        &[Behaviour::Honest, Behaviour::BadMac, Behaviour::Honest],
        0,
    )
    .await;
    let client = cluster.client(fast_options()).await.expect("connects");
    let mut session = client.session();
    for round in 0..5u8 {
        assert_eq!(
            session.invoke(vec![round]).await.expect("answered"),
            [b'o', b'k', b':', round]
        );
    }
    // Give the forger's last reply time to arrive.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(client.stats().replies_bad_mac >= 4, "{:?}", client.stats());
}

#[tokio::test]
async fn a_dead_primary_costs_one_retransmission() {
    let cluster =
        FakeCluster::start(&[Behaviour::Dead, Behaviour::Honest, Behaviour::Honest], 0).await;
    let client = cluster
        .client(fast_options())
        .await
        .expect("f+1 replicas are enough to connect");
    let mut session = client.session();
    assert_eq!(
        session.invoke(b"x".to_vec()).await.expect("answered"),
        b"ok:x"
    );
    assert!(client.stats().retransmissions >= 1);
}

#[tokio::test]
async fn the_client_learns_the_view_and_follows_the_new_primary() {
    let cluster = FakeCluster::start(&[Behaviour::Honest; 3], 4).await;
    let client = cluster.client(fast_options()).await.expect("connects");
    // The replicas reported view 4 when the connections opened.
    assert_eq!(client.view(), View(4));
    let mut session = client.session();
    session.invoke(b"a".to_vec()).await.expect("answered");
    session.invoke(b"b".to_vec()).await.expect("answered");
    // View 4 of 3 replicas: replica 1 is primary and got both requests directly.
    assert_eq!(cluster.direct_requests[1].load(Ordering::Relaxed), 2);
    assert_eq!(cluster.direct_requests[0].load(Ordering::Relaxed), 0);
    assert_eq!(client.stats().retransmissions, 0);
}

#[tokio::test]
async fn a_single_replica_cannot_move_the_client_to_another_view() {
    // Replica 2 alone claims view 7 (a lie or a replica ahead of the others): f+1 = 2
    // replicas must report a view before the client follows it.
    let cluster = FakeCluster::start_with_views(&[Behaviour::Honest; 3], &[0, 0, 7]).await;
    let client = cluster.client(fast_options()).await.expect("connects");
    tokio::time::sleep(Duration::from_millis(50)).await; // every status has arrived
    assert_eq!(client.view(), View(0));
}

#[tokio::test]
async fn silent_replicas_end_in_a_timeout() {
    let cluster = FakeCluster::start(&[Behaviour::Silent; 3], 0).await;
    let options = ClientOptions {
        request_timeout: Duration::from_millis(300),
        ..fast_options()
    };
    let client = cluster.client(options).await.expect("connects");
    let mut session = client.session();
    let error = session.invoke(b"x".to_vec()).await.expect_err("no replies");
    assert!(
        matches!(error, ClientError::Timeout { needed: 2, .. }),
        "{error}"
    );
    assert!(client.stats().retransmissions >= 1);
    assert_eq!(client.stats().pending_requests, 0);
}

#[tokio::test]
async fn an_unreachable_cluster_is_reported_with_what_to_do() {
    let cluster = FakeCluster::start(&[Behaviour::Dead; 3], 0).await;
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(200),
        ..fast_options()
    };
    let Err(error) = cluster.client(options).await else {
        panic!("nothing listens");
    };
    let text = error.to_string();
    assert!(
        matches!(
            error,
            ClientError::Unreachable {
                reachable: 0,
                needed: 2,
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains("tessera up") && text.contains("replica 0"),
        "{text}"
    );
}

#[tokio::test]
async fn unreplicated_mode_needs_one_reply_from_replica_zero() {
    let cluster =
        FakeCluster::start(&[Behaviour::Honest, Behaviour::Dead, Behaviour::Dead], 0).await;
    let options = ClientOptions {
        unreplicated: true,
        ..fast_options()
    };
    let client = cluster.client(options).await.expect("replica 0 is enough");
    let mut session = client.session();
    assert_eq!(
        session.invoke(b"u".to_vec()).await.expect("answered"),
        b"ok:u"
    );
    assert_eq!(client.stats().retransmissions, 0);
}

#[tokio::test]
async fn a_dropped_invoke_leaves_nothing_pending() {
    let cluster = FakeCluster::start(&[Behaviour::Silent; 3], 0).await;
    let client = cluster.client(fast_options()).await.expect("connects");
    let mut session = client.session();
    let abandoned =
        tokio::time::timeout(Duration::from_millis(20), session.invoke(b"x".to_vec())).await;
    assert!(abandoned.is_err());
    assert_eq!(client.stats().pending_requests, 0);
    // The session stays usable and numbers keep increasing.
    let before = session.last_request_number();
    let _ = tokio::time::timeout(Duration::from_millis(20), session.invoke(b"y".to_vec())).await;
    assert_eq!(session.last_request_number(), before + 1);
}

#[tokio::test]
async fn a_refusal_is_reported_when_no_quorum_answers() {
    let cluster = FakeCluster::start(&[Behaviour::Refuse], 0).await;
    let options = ClientOptions {
        unreplicated: true,
        request_timeout: Duration::from_millis(200),
        ..fast_options()
    };
    let client = cluster.client(options).await.expect("connects");
    let error = client
        .session()
        .invoke(b"x".to_vec())
        .await
        .expect_err("refused");
    match error {
        ClientError::Rejected(reason) => assert_eq!(reason, "replica 0: replica overloaded"),
        other => panic!("expected a rejection, got {other}"),
    }
}

#[tokio::test]
async fn an_oversized_reply_resets_the_connection_and_is_reported() {
    let cluster = FakeCluster::start(&[Behaviour::Oversized], 0).await;
    let options = ClientOptions {
        unreplicated: true,
        request_timeout: Duration::from_millis(200),
        ..fast_options()
    };
    let client = cluster.client(options).await.expect("connects");
    let error = client
        .session()
        .invoke(b"x".to_vec())
        .await
        .expect_err("too large");
    assert!(
        matches!(error, ClientError::ResultTooLarge { .. }),
        "{error}"
    );
    assert!(client.stats().disconnects >= 1);
}
