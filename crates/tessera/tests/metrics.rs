//! The Prometheus endpoints of real replica processes and of a real gateway: each is scraped
//! over HTTP, its OpenMetrics text is parsed strictly, and the values must move with the load
//! (and stay put where nothing happened: view 0, no rejections, no drops).

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{connect, run_bounded, ClusterDir, RunningCluster, BINARY};
use tessera_client::KvClient;

/// Largest scrape answer accepted.
const SCRAPE_BYTES_MAX: usize = 1 << 20;
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// A strict parser of the OpenMetrics text format (the subset a scrape of Tessera produces:
// counters, gauges, histograms, no exemplars or timestamps).

/// One sample: its labels (sorted) and value.
type Labels = BTreeMap<String, String>;

#[derive(Debug, Default)]
struct Scrape {
    /// Metric family name → type.
    types: BTreeMap<String, String>,
    /// Sample name → samples.
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Scrape {
    /// Parses `text`, failing on anything the format does not allow.
    fn parse(text: &str) -> Result<Scrape, String> {
        let body = text
            .strip_suffix("# EOF\n")
            .ok_or("the exposition does not end with `# EOF`")?;
        let mut scrape = Scrape::default();
        let mut seen = std::collections::BTreeSet::new();
        for (number, line) in body.lines().enumerate() {
            let fail = |problem: &str| format!("line {}: {problem}: {line:?}", number + 1);
            if let Some(comment) = line.strip_prefix("# ") {
                let mut parts = comment.splitn(3, ' ');
                let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
                let name = name
                    .filter(|name| valid_name(name))
                    .ok_or_else(|| fail("bad name"))?;
                match (kind, rest) {
                    (Some("TYPE"), Some(kind)) => {
                        if !["counter", "gauge", "histogram", "info", "unknown"].contains(&kind) {
                            return Err(fail("unknown type"));
                        }
                        if scrape.types.insert(name.into(), kind.into()).is_some() {
                            return Err(fail("type declared twice"));
                        }
                    }
                    (Some("HELP" | "UNIT"), Some(_)) => {}
                    _ => return Err(fail("unknown comment")),
                }
                continue;
            }
            let (name, labels, value) = parse_sample(line).map_err(|problem| fail(&problem))?;
            let family = scrape
                .family_of(&name)
                .ok_or_else(|| fail("sample of an undeclared family"))?;
            let suffix_ok = match scrape.types[&family].as_str() {
                "counter" => name.ends_with("_total") || name.ends_with("_created"),
                "histogram" => ["_bucket", "_count", "_sum", "_created"]
                    .iter()
                    .any(|suffix| name == format!("{family}{suffix}")),
                _ => name == family,
            };
            if !suffix_ok {
                return Err(fail("sample name does not fit its family's type"));
            }
            if !seen.insert((name.clone(), labels.clone())) {
                return Err(fail("duplicate series"));
            }
            scrape
                .samples
                .entry(name)
                .or_default()
                .push((labels, value));
        }
        Ok(scrape)
    }

    fn family_of(&self, sample: &str) -> Option<String> {
        let mut candidates = vec![sample.to_string()];
        for suffix in ["_total", "_created", "_bucket", "_count", "_sum"] {
            if let Some(stem) = sample.strip_suffix(suffix) {
                candidates.push(stem.to_string());
            }
        }
        candidates
            .into_iter()
            .find(|name| self.types.contains_key(name))
    }

    /// The sum of the samples named `name` whose labels include `labels`; panics if there is
    /// none (a missing metric is a failure, not a zero).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let samples = self
            .samples
            .get(name)
            .unwrap_or_else(|| panic!("no sample named {name}"));
        let matching: Vec<f64> = samples
            .iter()
            .filter(|(sample_labels, _)| {
                labels
                    .iter()
                    .all(|(key, value)| sample_labels.get(*key).map(String::as_str) == Some(*value))
            })
            .map(|(_, value)| *value)
            .collect();
        assert!(!matching.is_empty(), "no {name} sample with {labels:?}");
        matching.iter().sum()
    }

    /// The sum of every sample named `name` (zero if the family has no series yet, as a
    /// labelled family has before its first event).
    fn total(&self, name: &str) -> f64 {
        self.samples
            .get(name)
            .map_or(0.0, |samples| samples.iter().map(|(_, value)| value).sum())
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<(String, Labels, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err("bad sample name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = Labels::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut key = String::new();
        loop {
            let Some((index, c)) = chars.next() else {
                return Err("unterminated labels".into());
            };
            match c {
                '}' if key.is_empty() => {
                    rest = &inner[index + 1..];
                    break;
                }
                '=' => {
                    if !valid_name(&key) || chars.next().map(|(_, c)| c) != Some('"') {
                        return Err("bad label".into());
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().map(|(_, c)| c) {
                            Some('"') => break,
                            Some('\\') => match chars.next().map(|(_, c)| c) {
                                Some('n') => value.push('\n'),
                                Some(escaped @ ('\\' | '"')) => value.push(escaped),
                                _ => return Err("bad escape in a label value".into()),
                            },
                            Some(c) => value.push(c),
                            None => return Err("unterminated label value".into()),
                        }
                    }
                    if labels.insert(std::mem::take(&mut key), value).is_some() {
                        return Err("duplicate label".into());
                    }
                    match chars.next().map(|(_, c)| c) {
                        Some(',') => {}
                        Some('}') => {
                            let after = chars.peek().map_or(inner.len(), |(index, _)| *index);
                            rest = &inner[after..];
                            break;
                        }
                        _ => return Err("expected , or } after a label".into()),
                    }
                }
                c => key.push(c),
            }
        }
    }
    let value_text = rest
        .strip_prefix(' ')
        .ok_or("expected one space before the value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        text => text
            .parse::<f64>()
            .map_err(|_| format!("bad value {text:?}"))?,
    };
    Ok((name.to_string(), labels, value))
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// GETs `path` from `address`; returns the status code, content type and body.
fn http_get(address: &str, path: &str) -> (u16, String, String) {
    let mut stream =
        TcpStream::connect(address).unwrap_or_else(|error| panic!("{address}: {error}"));
    stream
        .set_read_timeout(Some(SOCKET_TIMEOUT))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").expect("send");
    let mut answer = Vec::new();
    stream
        .take(SCRAPE_BYTES_MAX as u64 + 1)
        .read_to_end(&mut answer)
        .expect("read the answer");
    assert!(answer.len() <= SCRAPE_BYTES_MAX, "answer too large");
    let answer = String::from_utf8(answer).expect("UTF-8 answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a header and a body");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let header = |name: &str| {
        lines
            .clone()
            .find_map(|line| {
                let (key, value) = line.split_once(": ")?;
                key.eq_ignore_ascii_case(name).then(|| value.to_string())
            })
            .unwrap_or_default()
    };
    let length: usize = header("content-length").parse().expect("a Content-Length");
    assert_eq!(length, body.len(), "Content-Length matches the body");
    (status, header("content-type"), body.to_string())
}

fn scrape(address: &str) -> Scrape {
    let (status, content_type, body) = http_get(address, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    Scrape::parse(&body).unwrap_or_else(|problem| panic!("{address}: {problem}\n{body}"))
}

/// Scrapes until `done` holds (values reach replicas at slightly different times).
fn scrape_until(address: &str, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let scrape = scrape(address);
        if done(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "{address}: {what} never held: {scrape:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// The test

const OPERATIONS: usize = 60;

#[test]
fn replica_and_gateway_metrics_move_with_load() {
    let dir = ClusterDir::create(23_600, |protocol| {
        protocol.checkpoint_interval = 8;
        protocol.log_size = 16;
        protocol.window = 8;
    });
    let cluster = RunningCluster::start(dir);
    let metrics: Vec<String> = cluster
        .dir
        .config
        .replicas
        .iter()
        .map(|replica| replica.metrics_address.clone())
        .collect();
    assert_eq!(
        metrics[1], "127.0.0.1:23751",
        "init assigns base + 150 + id"
    );

    let before: Vec<Scrape> = metrics.iter().map(|address| scrape(address)).collect();
    for (id, scrape) in before.iter().enumerate() {
        let replica = id.to_string();
        assert_eq!(scrape.value("tessera_view", &[("replica", &replica)]), 0.0);
        assert_eq!(scrape.value("tessera_requests_executed_total", &[]), 0.0);
    }
    let (status, _, _) = http_get(&metrics[0], "/");
    assert_eq!(status, 404, "only /metrics is served");

    run_bounded(Duration::from_secs(40), async {
        let client = connect(&cluster.dir, 0).await;
        let mut kv = KvClient::new(client.session());
        for index in 0..OPERATIONS {
            kv.set(format!("key-{index}").into_bytes(), b"value".to_vec())
                .await
                .expect("SET");
        }
    });

    for (id, address) in metrics.iter().enumerate() {
        scrape_until(address, "every request executed", |scrape| {
            scrape.value("tessera_requests_executed_total", &[]) >= OPERATIONS as f64
        });
        // The gauges copied from the core's status (USIG counter, pending, primary) are
        // refreshed every 100 ms: give them two periods.
        std::thread::sleep(Duration::from_millis(250));
        let after = scrape(address);
        let value = |name: &str| after.value(name, &[]);
        assert_eq!(value("tessera_view"), 0.0, "replica {id}: no view change");
        assert_eq!(value("tessera_view_changing"), 0.0);
        assert_eq!(value("tessera_view_changes_started_total"), 0.0);
        assert_eq!(value("tessera_primary"), 0.0);
        let batches = value("tessera_batches_executed_total");
        assert!(batches >= 1.0 && batches <= OPERATIONS as f64, "{batches}");
        assert_eq!(
            value("tessera_batch_requests_count"),
            batches,
            "one histogram observation per batch"
        );
        assert!(value("tessera_batch_requests_sum") >= OPERATIONS as f64);
        assert!(value("tessera_last_executed_seq") >= batches);
        assert!(
            value("tessera_stable_checkpoint_seq") >= 8.0,
            "checkpoints every 8"
        );
        assert!(value("tessera_checkpoints_stable_total") >= 1.0);
        assert!(value("tessera_usig_counter") > 0.0);
        assert!(value("tessera_usig_create_ui_seconds_count") > 0.0);
        assert!(value("tessera_usig_verify_ui_seconds_count") > 0.0);
        assert_eq!(after.total("tessera_usig_failures_total"), 0.0);
        assert!(value("tessera_peer_frames_received_total") > 0.0);
        assert_eq!(
            after.total("tessera_rejected_messages_total"),
            0.0,
            "replica {id}: nothing rejected in a fault-free run"
        );
        // Nothing forged, malformed or refused. Other drops are benign and timing-dependent
        // (a full queue while a peer connects at start, a reply for a client connected to
        // another replica); the protocol and the client retransmit, so they are only shown.
        for (labels, count) in &after.samples["tessera_dropped_total"] {
            let reason = &labels["reason"];
            let forged_or_malformed = reason.contains("oversized")
                || reason.contains("malformed")
                || reason.contains("bad_")
                || reason.contains("rejected")
                || reason.contains("unknown_credential");
            if forged_or_malformed {
                assert_eq!(*count, 0.0, "replica {id} dropped for {reason}");
            } else if *count > 0.0 {
                eprintln!("replica {id}: {count} dropped for {reason} (benign)");
            }
        }
        assert_eq!(value("tessera_state_transfer_active"), 0.0);
        // The client sends each request to the primary; every replica counts it once executed.
        let requests = value("tessera_client_requests_received_total");
        if id == 0 {
            assert!(requests >= OPERATIONS as f64, "{requests}");
        }
    }

    gateway_metrics_move_with_commands(&cluster);
}

/// A `tessera gateway` process, killed on drop.
struct GatewayProcess(Child);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(address: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {address}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn gateway_metrics_move_with_commands(cluster: &RunningCluster) {
    const LISTEN: &str = "127.0.0.1:23590";
    const METRICS: &str = "127.0.0.1:23591";
    let _gateway = GatewayProcess(
        Command::new(BINARY)
            .args([
                "gateway",
                "--listen",
                LISTEN,
                "--metrics-listen",
                METRICS,
                "--dir",
            ])
            .arg(Path::new(&cluster.dir.path))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the gateway"),
    );
    wait_for_port(LISTEN);
    wait_for_port(METRICS);
    let before = scrape(METRICS);
    assert_eq!(before.value("tessera_gateway_commands_total", &[]), 0.0);
    assert_eq!(before.total("tessera_gateway_errors_total"), 0.0);

    let mut redis = TcpStream::connect(LISTEN).expect("connect to the gateway");
    redis
        .set_read_timeout(Some(SOCKET_TIMEOUT))
        .expect("timeout");
    let mut pipeline = Vec::new();
    for index in 0..10 {
        let key = format!("gw-{index}");
        write!(
            pipeline,
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$1\r\nv\r\n",
            key.len()
        )
        .expect("encode");
    }
    redis.write_all(&pipeline).expect("send");
    let mut answers = Vec::new();
    let mut buffer = [0u8; 1024];
    while answers.len() < 10 * "+OK\r\n".len() {
        let read = redis.read(&mut buffer).expect("read the replies");
        assert!(read > 0, "the gateway closed the connection");
        answers.extend_from_slice(&buffer[..read]);
    }
    assert_eq!(answers, "+OK\r\n".repeat(10).into_bytes());

    // Input that is not RESP is answered with an error, counted, and the connection closed.
    let mut bad = TcpStream::connect(LISTEN).expect("connect to the gateway");
    bad.set_read_timeout(Some(SOCKET_TIMEOUT)).expect("timeout");
    bad.write_all(b"*x\r\n").expect("send");
    let mut reply = Vec::new();
    let _ = bad.read_to_end(&mut reply);
    assert!(
        reply.starts_with(b"-"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    drop(bad);

    let after = scrape_until(
        METRICS,
        "the error counted and its connection gone",
        |scrape| {
            scrape.value("tessera_gateway_errors_total", &[("kind", "protocol")]) == 1.0
                && scrape.value("tessera_gateway_connections", &[]) == 1.0
        },
    );
    assert_eq!(after.value("tessera_gateway_commands_total", &[]), 10.0);
    let envelopes = after.value("tessera_gateway_envelopes_total", &[]);
    assert!((1.0..=10.0).contains(&envelopes), "{envelopes}");
    assert_eq!(after.value("tessera_gateway_requests_total", &[]), 10.0);
    assert!(after.value("tessera_gateway_connections_accepted_total", &[]) >= 2.0);
    assert_eq!(after.value("tessera_gateway_view", &[]), 0.0);
    assert_eq!(
        after.value("tessera_gateway_errors_total", &[("kind", "unconfirmed")]),
        0.0
    );
    drop(redis);
}

#[test]
fn the_parser_refuses_what_the_format_forbids() {
    let good = "# TYPE a counter\n# HELP a help\na_total{x=\"1\"} 3\n# EOF\n";
    assert_eq!(
        Scrape::parse(good).unwrap().value("a_total", &[("x", "1")]),
        3.0
    );
    for bad in [
        "# TYPE a counter\na_total 3\n",                 // no EOF
        "a_total 3\n# EOF\n",                            // undeclared family
        "# TYPE a counter\na 3\n# EOF\n",                // counter without _total
        "# TYPE a gauge\na 3\na 4\n# EOF\n",             // duplicate series
        "# TYPE a gauge\na{x=\"1\" 3\n# EOF\n",          // unterminated labels
        "# TYPE a gauge\na  3\n# EOF\n",                 // two spaces
        "# TYPE a gauge\na three\n# EOF\n",              // not a number
        "# TYPE a gauge\n# TYPE a gauge\na 3\n# EOF\n",  // type twice
        "# TYPE a histogram\na_total 3\n# EOF\n",        // wrong suffix
        "# TYPE a gauge\na{x=\"1\",x=\"2\"} 3\n# EOF\n", // duplicate label
        "# TYPE 1a gauge\n# EOF\n",                      // bad name
    ] {
        assert!(Scrape::parse(bad).is_err(), "accepted {bad:?}");
    }
}

/// Killing the primary shows a view change in the others' metrics: started, completed, and
/// the new view.
#[test]
fn a_view_change_shows_in_the_metrics() {
    let dir = ClusterDir::create(23_800, |protocol| {
        protocol.request_timeout_ms = 1_000;
        protocol.view_change_timeout_ms = 1_000;
    });
    let _logs = support::LogsOnPanic(&dir);
    let metrics: Vec<String> = dir
        .config
        .replicas
        .iter()
        .map(|replica| replica.metrics_address.clone())
        .collect();
    // Separate process sets, so the primary can be killed alone (dropping kills).
    let primary = support::ReplicaProcesses::start(&dir, &[0]);
    let _backups = support::ReplicaProcesses::start(&dir, &[1, 2]);
    run_bounded(Duration::from_secs(60), async {
        let client = connect(&dir, 0).await;
        let mut kv = KvClient::new(client.session());
        kv.set(b"before".to_vec(), b"1".to_vec())
            .await
            .expect("SET in view 0");
        for address in &metrics {
            let scrape = scrape(address);
            assert_eq!(scrape.value("tessera_view_changes_started_total", &[]), 0.0);
        }
        // Replica 0 is the primary of view 0; without it the other two change view.
        drop(primary);
        kv.set(b"after".to_vec(), b"2".to_vec())
            .await
            .expect("SET after the primary died");
    });
    for address in &metrics[1..] {
        let after = scrape_until(address, "a completed view change", |scrape| {
            scrape.value("tessera_view_changes_completed_total", &[]) >= 1.0
                && scrape.value("tessera_primary", &[]) != 0.0
        });
        assert!(after.value("tessera_view", &[]) >= 1.0);
        assert_eq!(after.value("tessera_view_changing", &[]), 0.0);
        assert!(after.value("tessera_view_changes_started_total", &[]) >= 1.0);
        assert!(after.value("tessera_requests_executed_total", &[]) >= 2.0);
    }
}
