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
    /// Most Redis connections open at once; more get `-ERR max number of clients reached`.
    #[arg(long, default_value_t = GatewayOptions::default().connections_max)]
    pub connections_max: usize,
    /// Close a connection that sends no request for this long after its last reply: seconds
    /// (`300`, `300s`) or milliseconds (`500ms`); 0 never closes one.
    #[arg(long, default_value_t = Timeout(GatewayOptions::default().idle_timeout_ms))]
    pub idle_timeout: Timeout,
    /// Answer a request begun but not complete after this long with an error, and close its
    /// connection (slow senders); 0 disables.
    #[arg(long, default_value_t = Timeout(GatewayOptions::default().frame_timeout_ms))]
    pub frame_timeout: Timeout,
    /// Reset a connection whose replies make no progress for this long (a client that stopped
    /// reading); 0 disables.
    #[arg(long, default_value_t = Timeout(GatewayOptions::default().write_timeout_ms))]
    pub write_timeout: Timeout,
    /// Also serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Front `tessera unreplicated` (replica 0 only, its single reply accepted) instead of a
    /// replicated cluster: the baseline of `tessera bench compare`.
    #[arg(long)]
    pub unreplicated: bool,
}

/// A gateway timeout on the command line, in milliseconds: `300`/`300s` (seconds), `500ms`,
/// or 0 (disabled). Its range is checked by `GatewayOptions::validate`, which names the flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeout(pub u64);

impl std::str::FromStr for Timeout {
    type Err = String;

    fn from_str(text: &str) -> Result<Timeout, String> {
        let text = text.trim();
        let (number, unit_ms) = if let Some(number) = text.strip_suffix("ms") {
            (number, 1)
        } else if let Some(number) = text.strip_suffix('s') {
            (number, 1000)
        } else {
            (text, 1000)
        };
        number
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|value| value.checked_mul(unit_ms))
            .map(Timeout)
            .ok_or_else(|| {
                format!("`{text}` is not a timeout; write e.g. 300s or 500ms, or 0 to disable it")
            })
    }
}

impl std::fmt::Display for Timeout {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(formatter, "{}s", self.0 / 1000)
        } else {
            write!(formatter, "{}ms", self.0)
        }
    }
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
    // Before connecting: a bad option is the operator's to fix, whatever the cluster's state.
    options.validate().map_err(anyhow::Error::msg)?;
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
        idle_timeout_ms: args.idle_timeout.0,
        frame_timeout_ms: args.frame_timeout.0,
        write_timeout_ms: args.write_timeout.0,
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

#[cfg(test)]
mod tests {
    use super::Timeout;

    #[test]
    fn timeouts_parse_with_units_and_print_back() {
        assert_eq!("300".parse(), Ok(Timeout(300_000)));
        assert_eq!("300s".parse(), Ok(Timeout(300_000)));
        assert_eq!("250ms".parse(), Ok(Timeout(250)));
        assert_eq!("0".parse(), Ok(Timeout(0)));
        for bad in ["", "soon", "-1s", "1h", "99999999999999999999s"] {
            assert!(bad.parse::<Timeout>().is_err(), "{bad}");
        }
        assert_eq!(Timeout(30_000).to_string(), "30s");
        assert_eq!(Timeout(1_500).to_string(), "1500ms");
        assert_eq!(Timeout(0).to_string(), "0s");
    }
}
