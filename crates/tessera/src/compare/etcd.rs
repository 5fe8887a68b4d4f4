//! etcd for `tessera bench compare`: a 3-member cluster of the Debian package's `etcd` (3.4)
//! on loopback, and Tessera's own load generator over etcd's gRPC KV API.
//!
//! etcd's `benchmark` tool is not packaged, and the `etcd-client` crate compiles etcd's
//! `.proto` files with `protoc` in a build script, which a fresh machine lacks. The load needs
//! two calls (`/etcdserverpb.KV/Put` and `/etcdserverpb.KV/Range`) and five messages, so those
//! are written here by hand with prost's derive, and sent with tonic's generic `Grpc` client:
//! no build script, no protoc.
//!
//! The generator mirrors redis-benchmark: `clients` closed loops, keys `key:<12 digits>` drawn
//! uniformly from `--keys`, values of `--value-size` bytes of `x`. Clients are spread over one
//! HTTP/2 connection per member (etcd's own benchmark shares connections among clients the same
//! way; a follower forwards a Put to the leader). With pipelining, each client sends `pipeline`
//! requests at once and waits for all of them before the next batch, as redis-benchmark -P
//! does; a request's latency runs from its batch's start to its own reply. It runs on one
//! thread, like redis-benchmark.

use super::{CompareArgs, Measurement, Operation, Workload};
use crate::bench::{key_bytes, on_load_runtime, SplitMix64};
use crate::histogram::Outcomes;
use crate::process::{find_program, refuse_port_in_use, remove_old_data, ChildGuard};
use anyhow::{anyhow, bail, Context};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// Members of the cluster.
pub const MEMBERS: u16 = 3;
/// Key length: redis-benchmark's `key:__rand_int__` with its 12-digit number.
const KEY_BYTES: usize = 16;
/// How long the cluster may take to elect a leader and accept a write.
const WRITABLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// etcd's KV messages, as far as this benchmark uses them. Fields it never sets are left out
/// (proto3 does not encode default values, so the bytes sent are the same), and so are
/// response fields beyond the header, the key-values and the count (prost skips unknown
/// fields when decoding). Tags are those of etcd's `rpc.proto` and
/// `kv.proto` (3.4).
pub mod messages {
    /// `etcdserverpb.PutRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// `etcdserverpb.PutResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }

    /// `etcdserverpb.RangeRequest`: one key (no `range_end`); linearizable, since
    /// `serializable` (tag 7) is left false.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
    }

    /// `etcdserverpb.RangeResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(message, repeated, tag = "2")]
        pub kvs: Vec<KeyValue>,
        #[prost(int64, tag = "4")]
        pub count: i64,
    }

    /// `etcdserverpb.ResponseHeader`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        #[prost(int64, tag = "3")]
        pub revision: i64,
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }

    /// `mvccpb.KeyValue`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "5")]
        pub value: Vec<u8>,
    }
}

use messages::{PutRequest, PutResponse, RangeRequest, RangeResponse};

const PUT_PATH: &str = "/etcdserverpb.KV/Put";
const RANGE_PATH: &str = "/etcdserverpb.KV/Range";

/// One Put.
async fn put(grpc: &mut tonic::client::Grpc<Channel>, request: PutRequest) -> anyhow::Result<()> {
    unary::<PutRequest, PutResponse>(grpc, PUT_PATH, request).await?;
    Ok(())
}

/// One Range of a single key.
async fn range(
    grpc: &mut tonic::client::Grpc<Channel>,
    request: RangeRequest,
) -> anyhow::Result<()> {
    unary::<RangeRequest, RangeResponse>(grpc, RANGE_PATH, request).await?;
    Ok(())
}

async fn unary<Request, Response>(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    request: Request,
) -> anyhow::Result<Response>
where
    Request: prost::Message + Send + Sync + 'static,
    Response: prost::Message + Default + Send + Sync + 'static,
{
    grpc.ready()
        .await
        .map_err(|error| anyhow!("the connection to etcd failed: {error}"))?;
    let codec = tonic::codec::ProstCodec::<Request, Response>::default();
    let mut request = tonic::Request::new(request);
    request.set_timeout(REQUEST_TIMEOUT);
    let response = grpc
        .unary(request, http::uri::PathAndQuery::from_static(path), codec)
        .await
        .map_err(|status| anyhow!("etcd answered {}: {}", status.code(), status.message()))?;
    Ok(response.into_inner())
}

/// The running members; dropping this kills them.
pub struct EtcdCluster {
    members: Vec<ChildGuard>,
    endpoints: Vec<String>,
}

/// The command of member `index`, with its data in `dir/member-<index>`.
pub fn member_command(
    etcd: &Path,
    dir: &Path,
    index: u16,
    client_base: u16,
    peer_base: u16,
) -> Command {
    let peer = |member: u16| format!("http://127.0.0.1:{}", peer_base + member);
    let client = format!("http://127.0.0.1:{}", client_base + index);
    let initial_cluster: Vec<String> = (0..MEMBERS)
        .map(|member| format!("member-{member}={}", peer(member)))
        .collect();
    let mut command = Command::new(etcd);
    command
        .args(["--name", &format!("member-{index}")])
        .arg("--data-dir")
        .arg(dir.join(format!("member-{index}")))
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer(index)])
        .args(["--initial-advertise-peer-urls", &peer(index)])
        .args(["--initial-cluster", &initial_cluster.join(",")])
        // Unique per run: members of an earlier run cannot join this one by mistake.
        .args([
            "--initial-cluster-token",
            &format!("tessera-bench-{}", std::process::id()),
        ])
        .args(["--initial-cluster-state", "new"])
        .args(["--logger", "zap", "--log-level", "warn"]);
    command
}

impl EtcdCluster {
    /// Starts the members (clients on `client_base`+i, peers on `peer_base`+i) and waits until
    /// the cluster accepts a write.
    pub async fn start(
        dir: &Path,
        client_base: u16,
        peer_base: u16,
    ) -> anyhow::Result<EtcdCluster> {
        let etcd = find_program("etcd").context(
            "`etcd` is not on PATH: install it with `sudo apt-get install -y etcd-server`",
        )?;
        let endpoints: Vec<String> = (0..MEMBERS)
            .map(|index| format!("127.0.0.1:{}", client_base + index))
            .collect();
        for index in 0..MEMBERS {
            refuse_port_in_use(&endpoints[index as usize], "etcd").await?;
            refuse_port_in_use(
                &format!("127.0.0.1:{}", peer_base + index),
                "etcd's peer port",
            )
            .await?;
        }
        let mut members = Vec::with_capacity(MEMBERS as usize);
        for index in 0..MEMBERS {
            remove_old_data(&dir.join(format!("member-{index}")))?;
            members.push(ChildGuard::spawn(
                &mut member_command(&etcd, dir, index, client_base, peer_base),
                &format!("etcd member {index}"),
                &dir.join(format!("member-{index}.log")),
            )?);
        }
        let mut cluster = EtcdCluster { members, endpoints };
        for (member, endpoint) in cluster.members.iter_mut().zip(&cluster.endpoints) {
            member
                .wait_listening(endpoint, super::READY_TIMEOUT)
                .await?;
        }
        cluster.wait_writable().await?;
        Ok(cluster)
    }

    /// Client addresses (`host:port`), one per member.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The members, for exit reports.
    pub fn members(&mut self) -> Vec<&mut ChildGuard> {
        self.members.iter_mut().collect()
    }

    /// Retries a Put through member 0 until one succeeds: the members listen before they have
    /// elected a leader.
    async fn wait_writable(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + WRITABLE_TIMEOUT;
        let mut last_error = anyhow!("no attempt");
        while Instant::now() < deadline {
            for member in &mut self.members {
                if let Some(report) = member.exit_report()? {
                    bail!("{report} before the cluster accepted a write");
                }
            }
            let attempt = async {
                let channel = connect(&self.endpoints[0]).await?;
                let request = PutRequest {
                    key: b"tessera-bench-ready".to_vec(),
                    value: b"1".to_vec(),
                };
                put(&mut tonic::client::Grpc::new(channel), request).await
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(error) => last_error = error,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last_error.context(format!(
            "the etcd cluster did not accept a write within {WRITABLE_TIMEOUT:?}"
        )))
    }
}

async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{endpoint}"))
        .with_context(|| format!("bad etcd endpoint {endpoint}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to etcd at {endpoint}"))
}

/// Measures `workload` against the members at `endpoints`: warm-up, then the measured window.
pub async fn measure(
    endpoints: &[String],
    workload: Workload,
    args: &CompareArgs,
) -> anyhow::Result<Measurement> {
    let endpoints = endpoints.to_vec();
    let plan = Plan {
        workload,
        keys: args.keys,
        value: vec![b'x'; args.value_size as usize],
        warmup: args.warmup,
        duration: args.duration,
        seed: args.seed,
    };
    on_load_runtime(1, move || drive(endpoints, plan)).await
}

/// What the generator does, fixed before it starts.
#[derive(Clone)]
struct Plan {
    workload: Workload,
    keys: u64,
    value: Vec<u8>,
    warmup: Duration,
    duration: Duration,
    seed: u64,
}

async fn drive(endpoints: Vec<String>, plan: Plan) -> anyhow::Result<Measurement> {
    let mut channels = Vec::with_capacity(endpoints.len());
    for endpoint in &endpoints {
        channels.push(connect(endpoint).await?);
    }
    let measure_from = Instant::now() + plan.warmup;
    let end = measure_from + plan.duration;
    // One tally for all clients: a lock taken once per request, uncontended on the
    // single-threaded load runtime.
    let tally = Arc::new(Mutex::new(Outcomes::new()));
    let plan = Arc::new(plan);
    let mut clients = Vec::with_capacity(plan.workload.clients as usize);
    for index in 0..plan.workload.clients {
        let grpc = tonic::client::Grpc::new(channels[index as usize % channels.len()].clone());
        let random = SplitMix64::for_session(plan.seed, index);
        clients.push(tokio::spawn(run_client(
            grpc,
            random,
            Arc::clone(&plan),
            (measure_from, end),
            Arc::clone(&tally),
        )));
    }
    for client in clients {
        client
            .await
            .map_err(|error| anyhow!("an etcd load client panicked: {error}"))?;
    }
    let tally = tally
        .lock()
        .map_err(|_| anyhow!("an etcd load client panicked"))?;
    let requests = tally.successes(&format!("the measured {:?}", plan.duration))?;
    Ok(Measurement {
        ops_per_sec: requests as f64 / plan.duration.as_secs_f64(),
        p50_ms: tally.latency.quantile(0.5) as f64 / 1000.0,
        p99_ms: tally.latency.quantile(0.99) as f64 / 1000.0,
        requests,
        errors: tally.errors,
    })
}

/// One client's closed loop of batches of `pipeline` requests. Requests that complete inside
/// the measured window count.
async fn run_client(
    grpc: tonic::client::Grpc<Channel>,
    mut random: SplitMix64,
    plan: Arc<Plan>,
    (measure_from, end): (Instant, Instant),
    tally: Arc<Mutex<Outcomes>>,
) {
    let mut batch = tokio::task::JoinSet::new();
    while Instant::now() < end {
        let started = Instant::now();
        for _ in 0..plan.workload.pipeline {
            let key = key_bytes(random.next() % plan.keys, KEY_BYTES);
            let mut grpc = grpc.clone();
            let plan = Arc::clone(&plan);
            batch.spawn(async move {
                let outcome = match plan.workload.operation {
                    Operation::Set => {
                        let value = plan.value.clone();
                        put(&mut grpc, PutRequest { key, value }).await
                    }
                    Operation::Get => range(&mut grpc, RangeRequest { key }).await,
                };
                (outcome, Instant::now())
            });
        }
        while let Some(joined) = batch.join_next().await {
            let (outcome, done) = joined.unwrap_or_else(|error| {
                (Err(anyhow!("request task failed: {error}")), Instant::now())
            });
            let measured = measure_from <= done && done <= end;
            let Ok(mut tally) = tally.lock() else { return };
            let outcome = outcome
                .map(|()| (done - started).as_micros() as u64)
                .map_err(|error| format!("{error:#}"));
            tally.record(outcome, measured);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::messages::*;
    use super::*;
    use prost::Message;

    #[test]
    fn requests_encode_to_etcds_wire_bytes() {
        let put = PutRequest {
            key: b"foo".to_vec(),
            value: b"bar".to_vec(),
        };
        // Field 1 (key), wire type 2 (length-delimited): 0x0a; field 2 (value): 0x12.
        let bytes = [0x0a, 3, b'f', b'o', b'o', 0x12, 3, b'b', b'a', b'r'];
        assert_eq!(put.encode_to_vec(), bytes);
        assert_eq!(PutRequest::decode(&bytes[..]).unwrap(), put);
        let key = key_bytes(42, KEY_BYTES);
        let range = RangeRequest { key: key.clone() };
        let mut expected = vec![0x0a, 16];
        expected.extend_from_slice(b"key:000000000042");
        assert_eq!(range.encode_to_vec(), expected);
        // Empty values are not encoded at all (proto3), so leaving fields out changes nothing.
        let empty = PutRequest {
            key: b"k".to_vec(),
            value: Vec::new(),
        };
        assert_eq!(empty.encode_to_vec(), [0x0a, 1, b'k']);
    }

    #[test]
    fn responses_decode_from_etcds_wire_bytes() {
        // ResponseHeader { cluster_id: 0x1234, member_id: 2, revision: 300, raft_term: 5 }.
        let header = [0x08, 0xb4, 0x24, 0x10, 0x02, 0x18, 0xac, 0x02, 0x20, 0x05];
        let mut put_response = vec![0x0a, header.len() as u8];
        put_response.extend_from_slice(&header);
        let decoded = PutResponse::decode(&put_response[..]).unwrap();
        let expected_header = ResponseHeader {
            cluster_id: 0x1234,
            member_id: 2,
            revision: 300,
            raft_term: 5,
        };
        assert_eq!(decoded.header.as_ref(), Some(&expected_header));
        assert_eq!(decoded.encode_to_vec(), put_response);
        // RangeResponse { header, kvs: [KeyValue { key: "foo", create_revision: 7 (not
        // modelled, skipped), value: "bar" }], more: true (skipped), count: 1 }.
        let mut range_response = put_response.clone();
        range_response.extend_from_slice(&[
            0x12, 12, 0x0a, 3, b'f', b'o', b'o', 0x10, 7, 0x2a, 3, b'b', b'a', b'r',
        ]);
        range_response.extend_from_slice(&[0x18, 0x01, 0x20, 0x01]);
        let decoded = RangeResponse::decode(&range_response[..]).unwrap();
        assert_eq!(decoded.header, Some(expected_header));
        assert_eq!(decoded.count, 1);
        assert_eq!(
            decoded.kvs,
            [KeyValue {
                key: b"foo".to_vec(),
                value: b"bar".to_vec()
            }]
        );
    }

    #[test]
    fn members_know_each_other_and_stay_on_loopback() {
        let command = member_command(
            Path::new("/usr/bin/etcd"),
            Path::new("/tmp/e"),
            1,
            40_010,
            40_020,
        );
        let arguments: Vec<String> = command
            .get_args()
            .map(|argument| argument.to_string_lossy().into_owned())
            .collect();
        let value = |flag: &str| {
            let position = arguments
                .iter()
                .position(|argument| argument == flag)
                .unwrap();
            arguments[position + 1].clone()
        };
        assert_eq!(value("--name"), "member-1");
        assert_eq!(value("--data-dir"), "/tmp/e/member-1");
        assert_eq!(value("--listen-client-urls"), "http://127.0.0.1:40011");
        assert_eq!(value("--listen-peer-urls"), "http://127.0.0.1:40021");
        assert_eq!(
            value("--initial-cluster"),
            "member-0=http://127.0.0.1:40020,member-1=http://127.0.0.1:40021,member-2=http://127.0.0.1:40022"
        );
    }
}
