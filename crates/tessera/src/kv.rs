//! `tessera kv`: one key-value command against a running cluster, printed like `redis-cli`.

use anyhow::{anyhow, bail, Context};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tessera_client::{CasOutcome, Client, ClientError, ClientOptions, KvClient};
use tessera_types::cluster::{ClientSecrets, ClusterConfig};

/// Arguments of `tessera kv`.
#[derive(clap::Args, Debug)]
#[command(about = "Run one key-value command against the cluster (output like redis-cli)")]
pub struct KvArgs {
    /// Cluster directory written by `tessera init`.
    #[arg(long, default_value = ".tessera")]
    pub dir: PathBuf,
    /// Client credential id to use (default: the first client-<id>.secret.toml in --dir).
    #[arg(long)]
    pub client: Option<u32>,
    /// Talk to a `tessera unreplicated` server (replica 0 only, one reply) instead of a cluster.
    #[arg(long)]
    pub unreplicated: bool,
    /// Give up after this long without f+1 matching replies (e.g. 500ms, 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The command.
    #[command(subcommand)]
    pub command: KvCommand,
}

/// One key-value command.
#[derive(clap::Subcommand, Debug)]
pub enum KvCommand {
    /// Print the value of KEY, or (nil).
    Get {
        /// The key.
        key: String,
    },
    /// Set KEY to VALUE.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Delete keys; prints how many existed.
    Del {
        /// Keys to delete.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Print how many of the keys exist (a repeated key counts each time).
    Exists {
        /// Keys to look up.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Add BY (default 1, may be negative) to the integer at KEY (absent: 0); prints the result.
    Incr {
        /// The key.
        key: String,
        /// The increment.
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
    /// Print the values of several keys.
    Mget {
        /// Keys to read.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Set several keys at once, atomically: mset K1 V1 [K2 V2]...
    Mset {
        /// Alternating keys and values.
        #[arg(required = true, num_args = 2.., value_names = ["KEY", "VALUE"])]
        pairs: Vec<String>,
    },
    /// Compare-and-set: replace KEY's value if it currently equals --expected (or is --absent).
    #[command(group(clap::ArgGroup::new("condition").required(true).args(["expected", "absent"])))]
    #[command(group(clap::ArgGroup::new("replacement").required(true).args(["new", "delete"])))]
    Cas {
        /// The key.
        key: String,
        /// Swap only if the current value equals this.
        #[arg(long, value_name = "V")]
        expected: Option<String>,
        /// Swap only if the key does not exist.
        #[arg(long)]
        absent: bool,
        /// The value to store.
        #[arg(long, value_name = "V")]
        new: Option<String>,
        /// Delete the key instead of storing a value.
        #[arg(long)]
        delete: bool,
    },
}

/// Runs `tessera kv`.
pub async fn run(args: KvArgs) -> anyhow::Result<()> {
    let (cluster, secrets) = load_cluster(&args.dir, args.client)?;
    let options = ClientOptions {
        request_timeout: args.timeout,
        retransmit_timeout: Duration::from_millis(500).min(args.timeout),
        unreplicated: args.unreplicated,
        ..ClientOptions::default()
    };
    let client = Client::connect(cluster, secrets, options)
        .await
        .map_err(|error| match error {
            ClientError::Unreachable { .. } => anyhow!("{error}"),
            other => anyhow!(other).context("cannot start the client"),
        })?;
    let mut kv = KvClient::new(client.session());
    let output = execute(&mut kv, args.command)
        .await
        .map_err(|error| match error {
            ClientError::Kv(kv_error) => anyhow!("the store refused the command: {kv_error}"),
            other => anyhow!(other),
        })?;
    println!("{output}");
    Ok(())
}

async fn execute(kv: &mut KvClient, command: KvCommand) -> Result<String, ClientError> {
    let bytes = |keys: Vec<String>| keys.into_iter().map(String::into_bytes).collect::<Vec<_>>();
    Ok(match command {
        KvCommand::Get { key } => format_value(kv.get(key).await?.as_deref()),
        KvCommand::Set { key, value } => {
            kv.set(key, value).await?;
            "OK".into()
        }
        KvCommand::Del { keys } => format_integer(kv.del(bytes(keys)).await? as i128),
        KvCommand::Exists { keys } => format_integer(kv.exists(bytes(keys)).await? as i128),
        KvCommand::Incr { key, by } => format_integer(kv.incr(key, by).await? as i128),
        KvCommand::Mget { keys } => format_list(&kv.mget(bytes(keys)).await?),
        KvCommand::Mset { pairs } => {
            if pairs.len() % 2 == 1 {
                return Err(ClientError::Config(format!(
                    "mset takes KEY VALUE pairs; got {} arguments (the last key has no value)",
                    pairs.len()
                )));
            }
            let mut pairs = pairs.into_iter().map(String::into_bytes);
            let mut list = Vec::new();
            while let (Some(key), Some(value)) = (pairs.next(), pairs.next()) {
                list.push((key, value));
            }
            kv.mset(list).await?;
            "OK".into()
        }
        KvCommand::Cas {
            key, expected, new, ..
        } => {
            // clap's groups guarantee exactly one of --expected/--absent and --new/--delete.
            let outcome = kv
                .compare_and_set(
                    key,
                    expected.map(String::into_bytes),
                    new.map(String::into_bytes),
                )
                .await?;
            format_cas(&outcome)
        }
    })
}

/// Reads `cluster.toml` and a client secret file from `dir`.
pub(crate) fn load_cluster(
    dir: &Path,
    client: Option<u32>,
) -> anyhow::Result<(ClusterConfig, ClientSecrets)> {
    let cluster_file = dir.join("cluster.toml");
    let text = std::fs::read_to_string(&cluster_file).with_context(|| {
        format!(
            "cannot read {}; create a cluster with `tessera init --dir {}` or pass --dir",
            cluster_file.display(),
            dir.display()
        )
    })?;
    let cluster = ClusterConfig::from_toml(&text)?;
    let client_file = match client {
        Some(id) => dir.join(format!("client-{id}.secret.toml")),
        None => first_client_file(dir)?,
    };
    let text = std::fs::read_to_string(&client_file).with_context(|| {
        format!(
            "cannot read the client secret file {}",
            client_file.display()
        )
    })?;
    let secrets = ClientSecrets::from_toml(&text, &cluster)?;
    Ok((cluster, secrets))
}

/// The client secret file with the lowest credential id in `dir`.
fn first_client_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let Some(id) = name
            .strip_prefix("client-")
            .and_then(|rest| rest.strip_suffix(".secret.toml"))
            .and_then(|id| id.parse::<u32>().ok())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(best_id, _)| id < *best_id) {
            best = Some((id, path));
        }
    }
    match best {
        Some((_, path)) => Ok(path),
        None => bail!(
            "no client-<id>.secret.toml in {}; create a cluster with `tessera init` or pass --dir",
            dir.display()
        ),
    }
}

/// Parses `250ms`, `10s`, `2m`, `1h`, or a plain number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|character: char| !(character.is_ascii_digit() || character == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; write e.g. 500ms, 10s or 2m"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1_000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3_600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use ms, s, m or h"
            ))
        }
    };
    if !(0.0..=86_400.0 * 365.0).contains(&seconds) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Quotes bytes the way redis-cli does: printable ASCII as is, the rest escaped.
pub(crate) fn quote(bytes: &[u8]) -> String {
    let mut quoted = String::with_capacity(bytes.len() + 2);
    quoted.push('"');
    for &byte in bytes {
        match byte {
            b'"' => quoted.push_str("\\\""),
            b'\\' => quoted.push_str("\\\\"),
            b'\n' => quoted.push_str("\\n"),
            b'\r' => quoted.push_str("\\r"),
            b'\t' => quoted.push_str("\\t"),
            0x20..=0x7e => quoted.push(byte as char),
            other => quoted.push_str(&format!("\\x{other:02x}")),
        }
    }
    quoted.push('"');
    quoted
}

fn format_value(value: Option<&[u8]>) -> String {
    match value {
        Some(bytes) => quote(bytes),
        None => "(nil)".into(),
    }
}

fn format_integer(value: i128) -> String {
    format!("(integer) {value}")
}

fn format_list(values: &[Option<Vec<u8>>]) -> String {
    if values.is_empty() {
        return "(empty array)".into();
    }
    let width = values.len().to_string().len();
    values
        .iter()
        .enumerate()
        .map(|(index, value)| format!("{:>width$}) {}", index + 1, format_value(value.as_deref())))
        .collect::<Vec<_>>()
        .join("\n")
}

fn format_cas(outcome: &CasOutcome) -> String {
    if outcome.swapped {
        "OK".into()
    } else {
        format!(
            "(not swapped) current value: {}",
            format_value(outcome.current.as_deref())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        kv: KvArgs,
    }

    fn parse(arguments: &[&str]) -> Result<KvArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("kv").chain(arguments.iter().copied()))
            .map(|cli| cli.kv)
    }

    #[test]
    fn quotes_like_redis_cli() {
        assert_eq!(quote(b"plain"), "\"plain\"");
        assert_eq!(quote(b"a\"b\\c\n\x01"), "\"a\\\"b\\\\c\\n\\x01\"");
        assert_eq!(format_value(None), "(nil)");
        assert_eq!(format_integer(-3), "(integer) -3");
        assert_eq!(
            format_list(&[Some(b"x".to_vec()), None]),
            "1) \"x\"\n2) (nil)"
        );
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 weeks").is_err());
    }

    #[test]
    fn parses_every_command() {
        assert!(matches!(
            parse(&["get", "k"]).unwrap().command,
            KvCommand::Get { .. }
        ));
        assert!(matches!(
            parse(&["incr", "k", "-5"]).unwrap().command,
            KvCommand::Incr { by: -5, .. }
        ));
        assert!(matches!(
            parse(&["incr", "k"]).unwrap().command,
            KvCommand::Incr { by: 1, .. }
        ));
        assert!(matches!(
            parse(&["mset", "a", "1", "b", "2"]).unwrap().command,
            KvCommand::Mset { .. }
        ));
        assert!(parse(&["del"]).is_err());
        let args = parse(&[
            "--dir", "/tmp/x", "--client", "2", "cas", "k", "--absent", "--new", "v",
        ])
        .unwrap();
        assert_eq!(args.client, Some(2));
        assert!(matches!(
            args.command,
            KvCommand::Cas {
                expected: None,
                absent: true,
                new: Some(_),
                delete: false,
                ..
            }
        ));
        assert!(
            parse(&["cas", "k", "--new", "v"]).is_err(),
            "a condition is required"
        );
        assert!(parse(&["cas", "k", "--absent", "--expected", "x", "--new", "v"]).is_err());
        assert!(
            parse(&["cas", "k", "--expected", "x"]).is_err(),
            "a replacement is required"
        );
    }

    #[test]
    fn cas_output_says_what_happened() {
        let swapped = CasOutcome {
            swapped: true,
            current: Some(b"n".to_vec()),
        };
        assert_eq!(format_cas(&swapped), "OK");
        let refused = CasOutcome {
            swapped: false,
            current: None,
        };
        assert_eq!(format_cas(&refused), "(not swapped) current value: (nil)");
    }

    #[test]
    fn finds_the_lowest_client_file() {
        let dir = std::env::temp_dir().join(format!("tessera-kv-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "client-7.secret.toml",
            "client-3.secret.toml",
            "replica-0.secret.toml",
        ] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        assert_eq!(
            first_client_file(&dir).unwrap(),
            dir.join("client-3.secret.toml")
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let error = load_cluster(&dir, None).unwrap_err().to_string();
        assert!(error.contains("tessera init"), "{error}");
    }
}
