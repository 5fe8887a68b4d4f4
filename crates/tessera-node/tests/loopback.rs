//! Whole nodes on loopback: real sockets, real keys, the real client library.

use std::time::Duration;
use tessera_client::{Client, ClientOptions, KvClient};
use tessera_node::setup::{generate_cluster, ClusterFiles, ClusterSpec};
use tessera_types::cluster::UsigKind;
use tessera_types::wire::{ClientToReplica, ReplicaToClient};
use tessera_types::ProtocolConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A cluster on loopback ports from `base_port`: every test its own range, below Linux's
/// ephemeral ports (32768 and up), where a port released by a test could be taken as the local
/// port of some other connection before the replica binds it (seen as "address in use").
fn cluster(n: u32, usig: UsigKind, base_port: u16) -> ClusterFiles {
    let spec = ClusterSpec {
        protocol: ProtocolConfig {
            n,
            f: (n - 1) / 2,
            ..ProtocolConfig::default()
        },
        usig,
        host: "127.0.0.1".into(),
        base_port,
        clients: 2,
    };
    generate_cluster(&spec, &mut rand::rngs::OsRng).unwrap()
}

type Node = (
    oneshot::Sender<()>,
    JoinHandle<Result<(), tessera_node::NodeError>>,
);

fn start_unreplicated(files: &ClusterFiles) -> Node {
    let (stop, stopped) = oneshot::channel::<()>();
    let node = tokio::spawn(tessera_node::run_unreplicated(
        files.cluster.clone(),
        files.replicas[0].clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    (stop, node)
}

fn start_replica(files: &ClusterFiles, id: usize) -> Node {
    let (stop, stopped) = oneshot::channel::<()>();
    let node = tokio::spawn(tessera_node::run_replica(
        files.cluster.clone(),
        files.replicas[id].clone(),
        None,
        async move {
            let _ = stopped.await;
        },
    ));
    (stop, node)
}

async fn stop(node: Node) {
    let (stop, handle) = node;
    let _ = stop.send(());
    let result = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("node stops promptly")
        .expect("node task does not panic");
    result.expect("node stops cleanly");
}

async fn kv_client(files: &ClusterFiles, unreplicated: bool) -> (Client, KvClient) {
    let options = ClientOptions {
        unreplicated,
        request_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    let client = Client::connect(files.cluster.clone(), files.clients[1].clone(), options)
        .await
        .unwrap();
    let kv = KvClient::new(client.session());
    (client, kv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreplicated_baseline_serves_the_kv_client() {
    let files = cluster(3, UsigKind::Hmac, 24_000);
    let node = start_unreplicated(&files);
    let (_client, mut kv) = kv_client(&files, true).await;
    kv.set("hello", "world").await.unwrap();
    assert_eq!(kv.get("hello").await.unwrap(), Some(b"world".to_vec()));
    for expected in 1..=20 {
        assert_eq!(kv.incr("counter", 1).await.unwrap(), expected);
    }
    stop(node).await;
}

/// Sends raw bytes to a client port and returns what comes back before the port closes.
async fn exchange_raw(address: &str, bytes: &[u8]) -> Vec<ReplicaToClient> {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
    let mut messages = Vec::new();
    let mut rest = &received[..];
    while rest.len() >= 4 {
        let length = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        messages.push(tessera_types::decode(&rest[4..4 + length], 1 << 20).unwrap());
        rest = &rest[4 + length..];
    }
    messages
}

fn frame(message: &ClientToReplica) -> Vec<u8> {
    let payload = tessera_types::encode(message);
    let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_port_refuses_bad_input_with_an_error_and_closes() {
    let files = cluster(3, UsigKind::Hmac, 24_200);
    let address = files.cluster.replicas[0].client_address.clone();
    let node = start_unreplicated(&files);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Status works without authentication.
    let mut status_then_close = frame(&ClientToReplica::Status);
    status_then_close.extend_from_slice(&[0, 0, 0, 1, 0xff]); // then garbage
    let answers = exchange_raw(&address, &status_then_close).await;
    assert!(
        matches!(answers[0], ReplicaToClient::Status(_)),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1], ReplicaToClient::Error(_)),
        "{answers:?}"
    );

    let oversized = ((3u32 << 20).to_be_bytes()).to_vec();
    let answers = exchange_raw(&address, &oversized).await;
    assert!(
        matches!(&answers[..], [ReplicaToClient::Error(message)] if message.contains("limit")),
        "{answers:?}"
    );

    let forged_hello = frame(&ClientToReplica::Hello {
        client: tessera_types::ClientId::new(1, 1),
        mac: [0u8; 16],
    });
    let answers = exchange_raw(&address, &forged_hello).await;
    assert!(
        matches!(&answers[..], [ReplicaToClient::Error(_)]),
        "{answers:?}"
    );
    stop(node).await;
}

async fn replicated_round_trip(usig: UsigKind, base_port: u16) {
    let files = cluster(3, usig, base_port);
    let nodes: Vec<Node> = (0..3).map(|id| start_replica(&files, id)).collect();
    let (_client, mut kv) = kv_client(&files, false).await;
    kv.set("hello", "world").await.unwrap();
    assert_eq!(kv.get("hello").await.unwrap(), Some(b"world".to_vec()));
    for expected in 1..=50 {
        assert_eq!(kv.incr("counter", 1).await.unwrap(), expected);
    }
    for node in nodes {
        stop(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_cluster_serves_the_kv_client_with_hmac_usig() {
    replicated_round_trip(UsigKind::Hmac, 24_400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_cluster_serves_the_kv_client_with_ed25519_usig() {
    replicated_round_trip(UsigKind::Ed25519, 24_600).await;
}
