//! What one Redis connection may hold, and for how long: the idle, frame and write timeouts and
//! the connection cap, observed from raw sockets and the gateway's metrics.
//!
//! The gateway runs in-process in front of Tessera's unreplicated key-value server (also
//! in-process): the backend's protocol does not matter here, only what the gateway does with
//! its sockets. Timeouts are a few hundred milliseconds, so each test takes about a second.
//! Each test's server uses its own fixed client port in 25100–25104 (below the ephemeral range); the gateway takes a free
//! port.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tessera_client::{Client, ClientOptions};
use tessera_gateway::{ClusterInfo, Gateway, GatewayMetrics, GatewayOptions};
use tessera_node::setup::{generate_cluster, ClusterSpec};
use tessera_types::cluster::UsigKind;
use tessera_types::ProtocolConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

/// Longest a test waits for something that should happen within a timeout or two.
const PATIENCE: Duration = Duration::from_secs(10);

/// A gateway and the server behind it; both stop when this is dropped (their runtime ends
/// with the test).
struct Harness {
    address: SocketAddr,
    metrics: GatewayMetrics,
    _stop_server: oneshot::Sender<()>,
    _stop_gateway: oneshot::Sender<()>,
}

impl Harness {
    async fn start(server_port: u16, options: GatewayOptions) -> Harness {
        let spec = ClusterSpec {
            protocol: ProtocolConfig {
                n: 3,
                f: 1,
                ..ProtocolConfig::default()
            },
            usig: UsigKind::Hmac,
            host: "127.0.0.1".into(),
            base_port: 25_000,
            clients: 1,
        };
        let mut files = generate_cluster(&spec, &mut rand::rngs::OsRng).expect("a cluster");
        // Only replica 0's client port is used: the unreplicated server answers as replica 0.
        files.cluster.replicas[0].client_address = format!("127.0.0.1:{server_port}");
        let (stop_server, server_stopped) = oneshot::channel::<()>();
        tokio::spawn(tessera_node::run_unreplicated(
            files.cluster.clone(),
            files.replicas[0].clone(),
            async move {
                let _ = server_stopped.await;
            },
        ));
        let client_options = ClientOptions {
            unreplicated: true,
            ..ClientOptions::default()
        };
        let client = Client::connect(files.cluster, files.clients[0].clone(), client_options)
            .await
            .expect("the gateway's client connects to the server");
        let info = ClusterInfo {
            replicas: 1,
            f: 0,
            protocol: "unreplicated".into(),
        };
        let gateway = Gateway::bind("127.0.0.1:0", client, info, options)
            .await
            .expect("the gateway binds");
        let address = gateway.local_addr().expect("the gateway's address");
        let metrics = gateway.metrics();
        let (stop_gateway, gateway_stopped) = oneshot::channel::<()>();
        tokio::spawn(gateway.run(async move {
            let _ = gateway_stopped.await;
        }));
        Harness {
            address,
            metrics,
            _stop_server: stop_server,
            _stop_gateway: stop_gateway,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.address).await.expect("connect")
    }

    /// The value of one sample, e.g. `tessera_gateway_connections` or
    /// `tessera_gateway_errors_total{kind="timeout"}`.
    fn metric(&self, sample: &str) -> u64 {
        let text = self.metrics.render();
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
    }

    fn closed(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "tessera_gateway_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    }

    /// Waits until `sample` reads `expected`.
    async fn wait_for_metric(&self, sample: &str, expected: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.metric(sample) != expected {
            assert!(
                Instant::now() < deadline,
                "{sample} stayed at {} (expected {expected})",
                self.metric(sample)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn options() -> GatewayOptions {
    GatewayOptions::default()
}

/// Sends `request` and reads exactly `expected.len()` bytes, which must be `expected`.
async fn exchange(stream: &mut TcpStream, request: &[u8], expected: &[u8]) {
    stream.write_all(request).await.expect("send");
    let mut answer = vec![0u8; expected.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    assert_eq!(
        String::from_utf8_lossy(&answer),
        String::from_utf8_lossy(expected)
    );
}

/// Reads until the gateway closes the connection; returns what came and when it closed.
async fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buffer)).await {
            Err(_) => panic!(
                "the gateway kept the connection open (got {:?})",
                String::from_utf8_lossy(&answer)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (answer, Instant::now()),
            Ok(Ok(read)) => answer.extend_from_slice(&buffer[..read]),
        }
    }
}

#[test]
fn timeouts_out_of_range_are_refused_naming_the_flag() {
    assert_eq!(options().validate(), Ok(()));
    let disabled = GatewayOptions {
        idle_timeout_ms: 0,
        frame_timeout_ms: 0,
        write_timeout_ms: 0,
        ..options()
    };
    assert_eq!(disabled.validate(), Ok(()), "0 disables each timeout");
    let cases = [
        (
            GatewayOptions {
                idle_timeout_ms: 50,
                ..options()
            },
            "idle_timeout_ms (--idle-timeout) is 50 ms",
        ),
        (
            GatewayOptions {
                frame_timeout_ms: 2 * 3600 * 1000,
                ..options()
            },
            "frame_timeout_ms (--frame-timeout) is 7200000 ms",
        ),
        (
            GatewayOptions {
                write_timeout_ms: 99,
                ..options()
            },
            "write_timeout_ms (--write-timeout) is 99 ms",
        ),
        (
            GatewayOptions {
                connections_max: 0,
                ..options()
            },
            "connections_max (--connections-max) is 0",
        ),
    ];
    for (bad, expected) in cases {
        let error = bad.validate().expect_err(expected);
        assert!(error.contains(expected), "{error}");
        assert!(error.contains("set it between"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(400);
    let harness = Harness::start(
        25_101,
        GatewayOptions {
            idle_timeout_ms: 400,
            ..options()
        },
    )
    .await;
    // One client connects and says nothing; another keeps asking meanwhile.
    let mut silent = harness.connect().await;
    let mut busy = harness.connect().await;
    let connected = Instant::now();
    let silent = tokio::spawn(async move { read_until_closed(&mut silent).await });
    while connected.elapsed() < idle * 3 {
        exchange(&mut busy, b"PING\r\n", b"+PONG\r\n").await;
        tokio::time::sleep(idle / 4).await;
    }
    // The silent one was closed without a word: it asked nothing, and an unsolicited error
    // would be taken as the reply to its next command.
    let (answer, closed) = silent.await.expect("the silent reader");
    assert_eq!(answer, b"", "an idle close sends nothing");
    let waited = closed - connected;
    assert!(
        waited >= idle - Duration::from_millis(50) && waited < idle * 3,
        "closed after {waited:?} with an idle timeout of {idle:?}"
    );
    // The busy one outlived the timeout: each reply restarts its idle clock.
    exchange(&mut busy, b"PING\r\n", b"+PONG\r\n").await;
    assert_eq!(harness.closed("idle_timeout"), 1);
    // Quiet now, it goes the same way.
    let (answer, _) = read_until_closed(&mut busy).await;
    assert_eq!(answer, b"");
    harness
        .wait_for_metric(
            "tessera_gateway_connections_closed_total{reason=\"idle_timeout\"}",
            2,
        )
        .await;
    assert_eq!(harness.metric("tessera_gateway_connections"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dribbled_request_gets_an_error_after_the_frame_timeout() {
    let frame = Duration::from_millis(300);
    let harness = Harness::start(
        25_102,
        GatewayOptions {
            idle_timeout_ms: 60_000,
            frame_timeout_ms: 300,
            ..options()
        },
    )
    .await;
    // A request in two halves, 150 ms apart, several times over: the frame clock restarts
    // with every request, so a pipeline slower in total than the timeout is served.
    let mut steady = harness.connect().await;
    for _ in 0..4 {
        steady.write_all(b"PI").await.expect("send");
        tokio::time::sleep(frame / 2).await;
        exchange(&mut steady, b"NG\r\n", b"+PONG\r\n").await;
    }
    // Slowloris, two ways, a piece every 50 ms: an array request whose arguments each arrive
    // whole (the decoder takes every one at once, so the input is empty at each wait), and an
    // inline command a byte at a time. Neither ever completes.
    let array: Vec<Vec<u8>> = std::iter::once(b"*100\r\n".to_vec())
        .chain(std::iter::repeat_n(b"$1\r\na\r\n".to_vec(), 99))
        .collect();
    let inline: Vec<Vec<u8>> = b"PING PING PING".iter().map(|byte| vec![*byte]).collect();
    for (index, pieces) in [array, inline].into_iter().enumerate() {
        let stream = harness.connect().await;
        let (mut reader, mut writer) = stream.into_split();
        let started = Instant::now();
        let dribble = tokio::spawn(async move {
            for piece in pieces {
                if writer.write_all(&piece).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Hold the connection open without completing the request.
            tokio::time::sleep(PATIENCE).await;
        });
        let mut answer = Vec::new();
        let read = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut answer)).await;
        let waited = started.elapsed();
        dribble.abort();
        assert!(
            read.is_ok(),
            "request {index}: the gateway kept a dribbling connection open"
        );
        assert_eq!(
            String::from_utf8_lossy(&answer),
            "-ERR request not complete within the gateway's frame timeout of 300 ms; closing \
             the connection\r\n",
            "request {index}"
        );
        assert!(
            waited >= frame - Duration::from_millis(50) && waited < frame * 10,
            "request {index}: closed after {waited:?} with a frame timeout of {frame:?}"
        );
        // Counted once the close's drain is over, a moment after the client saw it.
        harness
            .wait_for_metric(
                "tessera_gateway_connections_closed_total{reason=\"frame_timeout\"}",
                index as u64 + 1,
            )
            .await;
    }
    assert_eq!(
        harness.metric("tessera_gateway_errors_total{kind=\"timeout\"}"),
        2
    );
    // The steady connection was never cut.
    exchange(&mut steady, b"PING\r\n", b"+PONG\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_bounded_and_reset_after_the_write_timeout() {
    const VALUE_BYTES: usize = 500_000;
    const GETS: usize = 200;
    let write_timeout = Duration::from_millis(500);
    let defaults = options();
    let harness = Harness::start(
        25_103,
        GatewayOptions {
            write_timeout_ms: 500,
            ..options()
        },
    )
    .await;
    let mut other = harness.connect().await;
    let mut set = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${VALUE_BYTES}\r\n").into_bytes();
    set.extend(std::iter::repeat_n(b'v', VALUE_BYTES));
    set.extend_from_slice(b"\r\n");
    exchange(&mut other, &set, b"+OK\r\n").await;
    exchange(&mut other, b"SET small 1\r\n", b"+OK\r\n").await;

    // 200 pipelined GETs of a 500 kB value ask for 100 MB of replies; the client's receive
    // buffer is made tiny and it never reads.
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small buffer");
    let mut slow = socket.connect(harness.address).await.expect("connect");
    let requested = GETS * (VALUE_BYTES + 16);
    slow.write_all(&b"GET big\r\n".repeat(GETS))
        .await
        .expect("send the GETs");
    let deadline = Instant::now() + PATIENCE;
    while harness.metric("tessera_gateway_reply_backlog_bytes") == 0 {
        assert!(Instant::now() < deadline, "the gateway never got stuck");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Stuck on one group: what it holds is bounded by one group's results, and it read no
    // further requests from the connection.
    let backlog = harness.metric("tessera_gateway_reply_backlog_bytes") as usize;
    let bound = defaults.group_result_bytes_max + (1 << 20);
    assert!(
        backlog <= bound,
        "{backlog} bytes of replies held for one connection (bound {bound}; {requested} asked)"
    );
    let read = harness.metric("tessera_gateway_requests_total") as usize;
    assert!(
        read < 2 + GETS / 2,
        "the gateway decoded {read} requests while its replies could not go out"
    );
    // Other clients are served meanwhile.
    let started = Instant::now();
    exchange(&mut other, b"GET small\r\n", b"$1\r\n1\r\n").await;
    assert!(
        started.elapsed() < write_timeout,
        "another client waited {:?}",
        started.elapsed()
    );
    // No progress for the write timeout: reset, and the replies it held are gone.
    harness
        .wait_for_metric(
            "tessera_gateway_connections_closed_total{reason=\"write_timeout\"}",
            1,
        )
        .await;
    assert_eq!(harness.metric("tessera_gateway_reply_backlog_bytes"), 0);
    let (received, _) = read_until_closed(&mut slow).await;
    assert!(
        received.len() < requested / 4,
        "the slow client could still read {} bytes",
        received.len()
    );
    exchange(&mut other, b"PING\r\n", b"+PONG\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_with_the_redis_error() {
    let harness = Harness::start(
        25_104,
        GatewayOptions {
            connections_max: 2,
            ..options()
        },
    )
    .await;
    let mut first = harness.connect().await;
    let mut second = harness.connect().await;
    // Answered, so both hold their slot.
    exchange(&mut first, b"PING\r\n", b"+PONG\r\n").await;
    exchange(&mut second, b"PING\r\n", b"+PONG\r\n").await;
    // The third sends its command at once, as redis-cli does, and still gets the error.
    let mut third = harness.connect().await;
    third.write_all(b"PING\r\n").await.expect("send");
    let (answer, _) = read_until_closed(&mut third).await;
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "-ERR max number of clients reached\r\n"
    );
    assert_eq!(
        harness.metric("tessera_gateway_connections_refused_total"),
        1
    );
    assert_eq!(harness.metric("tessera_gateway_connections"), 2);
    // A slot freed is a slot usable again.
    drop(first);
    harness
        .wait_for_metric("tessera_gateway_connections", 1)
        .await;
    assert_eq!(harness.closed("client_closed"), 1);
    let mut fourth = harness.connect().await;
    exchange(&mut fourth, b"PING\r\n", b"+PONG\r\n").await;
    exchange(&mut second, b"QUIT\r\n", b"+OK\r\n").await;
    harness
        .wait_for_metric(
            "tessera_gateway_connections_closed_total{reason=\"quit\"}",
            1,
        )
        .await;
}
