//! `tessera gateway`, and the gateway `tessera up` starts: the RESP gateway
//! (`tessera_gateway`) in front of a cluster directory.

use crate::kv::load_cluster;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tessera_client::{Client, ClientOptions};
use tessera_gateway::{ClusterInfo, Gateway, GatewayOptions};

/// Where `tessera up` and `tessera gateway` listen unless told otherwise (Redis's own port,
/// 6379, plus one, so a local Redis and the gateway can run side by side).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6380";
/// Where `tessera up` serves the gateway's Prometheus metrics unless told otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:6390";

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// Cluster directory written by `tessera init`.
    #[arg(long, default_value = ".tessera")]
    pub dir: PathBuf,
    /// Address to accept Redis connections on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Client credential id to use (default: the first client-<id>.secret.toml in --dir).
    #[arg(long)]
    pub client: Option<u32>,
    /// Signed requests in flight at once (each carries many Redis commands).
    #[arg(long, default_value_t = GatewayOptions::default().lanes)]
    pub lanes: usize,
    /// Most Redis connections open at once.
    #[arg(long, default_value_t = GatewayOptions::default().connections_max)]
    pub connections_max: usize,
    /// Also serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Front `tessera unreplicated` (replica 0 only, its single reply accepted) instead of a
    /// replicated cluster: the baseline of `tessera bench compare`.
    #[arg(long)]
    pub unreplicated: bool,
}

/// Serves `gateway`'s metrics on `listen` in a background task; returns the bound address.
pub async fn serve_metrics(gateway: &Gateway, listen: &str) -> anyhow::Result<SocketAddr> {
    let listener = tessera_node::metrics::bind_metrics(listen)
        .await
        .with_context(|| {
            format!("the gateway cannot serve metrics on {listen}; pick another address")
        })?;
    let address = listener.local_addr()?;
    let metrics = gateway.metrics();
    tokio::spawn(tessera_node::metrics::serve_metrics(
        listener,
        std::sync::Arc::new(move || metrics.render()),
    ));
    Ok(address)
}

/// Connects to the cluster in `dir` (to its unreplicated server if `unreplicated`) and binds
/// the gateway on `listen`.
pub async fn start(
    dir: &Path,
    listen: &str,
    client: Option<u32>,
    options: GatewayOptions,
    unreplicated: bool,
) -> anyhow::Result<Gateway> {
    let (cluster, secrets) = load_cluster(dir, client)?;
    let info = if unreplicated {
        ClusterInfo {
            replicas: 1,
            f: 0,
            protocol: "unreplicated".into(),
        }
    } else {
        ClusterInfo {
            replicas: cluster.protocol.n,
            f: cluster.protocol.f,
            protocol: format!("{:?}", cluster.protocol.protocol).to_lowercase(),
        }
    };
    let client_options = ClientOptions {
        unreplicated,
        ..ClientOptions::default()
    };
    let client = Client::connect(cluster, secrets, client_options)
        .await
        .context("the gateway cannot reach the cluster")?;
    Gateway::bind(listen, client, info, options)
        .await
        .with_context(|| {
            format!("the gateway cannot listen on {listen}; pick another address with --listen")
        })
}

/// The redis-cli command line that reaches a gateway on `address`.
pub fn redis_cli_line(address: SocketAddr) -> String {
    if address.ip().is_loopback() && address.ip().is_ipv4() {
        format!("redis-cli -p {}", address.port())
    } else {
        format!("redis-cli -h {} -p {}", address.ip(), address.port())
    }
}

/// `tessera gateway`: serves until Ctrl-C or SIGTERM.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let options = GatewayOptions {
        lanes: args.lanes,
        connections_max: args.connections_max,
        ..GatewayOptions::default()
    };
    let gateway = start(
        &args.dir,
        &args.listen,
        args.client,
        options,
        args.unreplicated,
    )
    .await?;
    let address = gateway.local_addr()?;
    println!(
        "Gateway for {} listening on {address}; try: {}",
        args.dir.display(),
        redis_cli_line(address)
    );
    if let Some(listen) = &args.metrics_listen {
        let metrics = serve_metrics(&gateway, listen).await?;
        println!("Gateway metrics: http://{metrics}/metrics");
    }
    gateway
        .run(crate::shutdown_signal())
        .await
        .context("the gateway failed")
}
