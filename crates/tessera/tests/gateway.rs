//! The RESP gateway in front of a real 3-replica cluster, driven by unmodified Redis tools:
//! `redis-cli` (one-shot, RESP3, and interactive through a pseudo-terminal, so its connection
//! handshake runs) and `redis-benchmark` (50 and 200 connections, pipelining), plus raw
//! sockets for pipelined ordering and for malformed and oversized frames.
//!
//! Needs `redis-cli`, `redis-benchmark` (Debian: `apt-get install redis-tools`) and `script`
//! (util-linux); CI installs them (`.ci/run`).

mod support;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{read_up_until_ready, ClusterDir, RunningCluster, BINARY};
use tessera_gateway::resp::{decode_reply, encode_request};
use tessera_gateway::{Reply, RespLimits};

/// How long a gateway may take to connect to the cluster and open its port.
const GATEWAY_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a raw-socket test waits for the gateway's answer.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// A `tessera gateway` process; killed when dropped.
struct GatewayProcess {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl GatewayProcess {
    fn start(cluster: &RunningCluster, port: u16) -> GatewayProcess {
        GatewayProcess::start_with(cluster, port, &[])
    }

    /// Starts `tessera gateway` with `options` added to its command line.
    fn start_with(cluster: &RunningCluster, port: u16, options: &[&str]) -> GatewayProcess {
        let log = cluster.dir.path.join("logs").join("gateway.log");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the gateway log");
        let child = Command::new(BINARY)
            .args(["gateway", "--listen", &format!("127.0.0.1:{port}"), "--dir"])
            .arg(&cluster.dir.path)
            .args(options)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone a log handle"))
            .stderr(file)
            .spawn()
            .expect("start tessera gateway");
        let mut gateway = GatewayProcess { child, port, log };
        let deadline = Instant::now() + GATEWAY_READY_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = gateway.child.try_wait() {
                panic!("the gateway exited with {status}: {}", gateway.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not open port {port}: {}",
                gateway.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `redis-cli -p PORT arguments...` and returns its output.
    fn cli(&self, arguments: &[&str]) -> Output {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(arguments)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli (install redis-tools)")
    }

    /// One-shot redis-cli; its stdout without the final newline (raw output, as stdout is not
    /// a terminal: values unquoted, nil as an empty line).
    fn cli_text(&self, arguments: &[&str]) -> String {
        let output = self.cli(arguments);
        let text = String::from_utf8_lossy(&output.stdout);
        text.strip_suffix('\n').unwrap_or(&text).to_string()
    }

    /// The gateway's INFO counters: envelopes sent and the commands they carried.
    fn sent(&self) -> (u64, u64) {
        let info = self.cli_text(&["INFO"]);
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|line| line.strip_prefix(&format!("{name}:")))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or_else(|| panic!("INFO has no {name}: {info}"))
        };
        (
            field("gateway_envelopes"),
            field("gateway_commands_replicated"),
        )
    }

    fn benchmark(&self, arguments: &[&str]) -> String {
        let output = Command::new("redis-benchmark")
            .args(["-p", &self.port.to_string(), "-q"])
            .args(arguments)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-benchmark (install redis-tools)");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "redis-benchmark {arguments:?} failed: {stdout}\n{stderr}\n{}",
            self.log_text()
        );
        assert!(
            !stdout.contains("ERR") && !stderr.contains("ERR") && !stderr.contains("WARNING"),
            "redis-benchmark {arguments:?} saw an error: {stdout}\n{stderr}"
        );
        stdout
    }

    /// Sends `request` on a fresh connection and returns everything read until the gateway
    /// closes it (or until `expected_bytes` arrived, for connections that stay open).
    fn raw(&self, request: &[u8], expected_bytes: Option<usize>) -> Vec<u8> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        stream
            .set_read_timeout(Some(SOCKET_TIMEOUT))
            .expect("set a read timeout");
        stream.write_all(request).expect("send the request");
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            if expected_bytes.is_some_and(|expected| answer.len() >= expected) {
                return answer;
            }
            match stream.read(&mut buffer) {
                Ok(0) => return answer,
                Ok(read) => answer.extend_from_slice(&buffer[..read]),
                Err(error) => panic!(
                    "no answer to {:?} (got {:?}): {error}",
                    String::from_utf8_lossy(&request[..request.len().min(80)]),
                    String::from_utf8_lossy(&answer)
                ),
            }
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- gateway log -----\n{}", self.log_text());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(base_port: u16, gateway_port: u16) -> (RunningCluster, GatewayProcess) {
    start_tuned(base_port, gateway_port, |_| {})
}

fn start_tuned(
    base_port: u16,
    gateway_port: u16,
    tune: impl FnOnce(&mut tessera_types::ProtocolConfig),
) -> (RunningCluster, GatewayProcess) {
    let cluster = RunningCluster::start(ClusterDir::create(base_port, tune));
    let gateway = GatewayProcess::start(&cluster, gateway_port);
    (cluster, gateway)
}

#[test]
fn redis_cli_runs_every_command_through_the_gateway() {
    let (_cluster, gateway) = start(22_000, 22_379);
    let cli = |arguments: &[&str]| gateway.cli_text(arguments);
    let script: &[(&[&str], &str)] = &[
        (&["PING"], "PONG"),
        (&["ECHO", "hi"], "hi"),
        (&["SET", "k", "v"], "OK"),
        (&["GET", "k"], "v"),
        (&["SET", "k", "w", "NX"], ""),
        (&["SET", "k", "w", "XX", "GET"], "v"),
        (&["GETSET", "k", "x"], "w"),
        (&["APPEND", "k", "yz"], "3"),
        (&["STRLEN", "k"], "3"),
        (&["TTL", "k"], "-1"),
        (&["PTTL", "missing"], "-2"),
        (&["INCR", "n"], "1"),
        (&["INCRBY", "n", "10"], "11"),
        (&["DECR", "n"], "10"),
        (&["DECRBY", "n", "4"], "6"),
        (&["MSET", "a", "1", "b", "2"], "OK"),
        (&["MGET", "a", "b", "c"], "1\n2\n"),
        (&["EXISTS", "a", "b", "c"], "2"),
        (&["DEL", "a", "c"], "1"),
        (&["GETDEL", "b"], "2"),
        (&["GET", "b"], ""),
        (&["DBSIZE"], "2"),
        // redis-cli prints an error reply followed by an empty line.
        (
            &["INCR", "k"],
            "ERR value is not an integer or out of range\n",
        ),
        (
            &["FOO", "bar", "baz"],
            "ERR unknown command 'FOO', with args beginning with: 'bar' 'baz' \n",
        ),
        (&["-n", "0", "GET", "n"], "6"),
        (&["FLUSHDB"], "OK"),
        (&["DBSIZE"], "0"),
    ];
    for (arguments, expected) in script {
        assert_eq!(cli(arguments), *expected, "redis-cli {arguments:?}");
    }

    assert_eq!(cli(&["SET", "k", "v", "EX", "100"]), "OK");
    assert_eq!(cli(&["TTL", "k"]), "100");
    assert_eq!(cli(&["PERSIST", "k"]), "1");
    assert_eq!(cli(&["TTL", "k"]), "-1");
    assert_eq!(
        cli(&["SET", "k", "v", "EX", "0"]),
        "ERR invalid expire time in 'set' command\n"
    );

    let info = cli(&["INFO"]);
    for field in [
        "replicas:3",
        "f:1",
        "reply_quorum:2",
        "protocol:minbft",
        "view:",
    ] {
        assert!(info.contains(field), "INFO lacks {field}: {info}");
    }
    // `-3` makes redis-cli open with HELLO 3; the gateway then answers in RESP3.
    let client = cli(&["-3", "CLIENT", "INFO"]);
    assert!(client.contains("resp=3"), "{client}");
    // redis-cli -n 1 sends SELECT 1 first and reports its failure on stderr.
    let select = gateway.cli(&["-n", "1", "PING"]);
    let stderr = String::from_utf8_lossy(&select.stderr);
    assert!(
        stderr.contains("SELECT 1 failed: ERR DB index is out of range"),
        "{stderr}"
    );
}

#[test]
fn interactive_redis_cli_completes_its_handshake() {
    let (_cluster, gateway) = start(22_200, 22_380);
    // A pseudo-terminal (util-linux `script`) makes redis-cli interactive: it then sends
    // COMMAND DOCS for its help hints, and with -3 opens with HELLO 3.
    // The pty `script` makes has no size, and redis-cli's line editor would then ask the
    // terminal for its cursor position and take the typed text as the answer: set a size.
    let command = format!("stty cols 200 rows 50; redis-cli -3 -p {}", gateway.port);
    let mut session = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script (util-linux)");
    let mut input = session.stdin.take().expect("piped stdin");
    let mut stdout = session.stdout.take().expect("piped stdout");
    let output = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let output = Arc::clone(&output);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(read @ 1..) = stdout.read(&mut buffer) {
                output.lock().unwrap().extend_from_slice(&buffer[..read]);
            }
        })
    };
    let prompt = format!("127.0.0.1:{}> ", gateway.port);
    // One line at a time, as a person types, each ended by Enter (CR in raw mode). redis-cli's
    // line editor flushes pending input when it switches the terminal to raw mode, so each line
    // waits for the prompt, which is printed once raw mode is on.
    let mut seen = 0;
    for line in [
        "CLIENT SETNAME operator",
        "CLIENT GETNAME",
        "CLIENT INFO",
        "SET greeting hello",
        "GET greeting",
        "INCRBY visits 41",
        "INCR visits",
        "SELECT 0",
        "QUIT",
    ] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = {
                let text = output.lock().unwrap();
                text.len() > seen && text.ends_with(prompt.as_bytes())
            };
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no prompt before {line:?}: {}",
                String::from_utf8_lossy(&output.lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        seen = output.lock().unwrap().len();
        input
            .write_all(format!("{line}\r").as_bytes())
            .expect("type a command");
    }
    drop(input);
    let deadline = Instant::now() + Duration::from_secs(20);
    while session.try_wait().expect("wait for script").is_none() {
        if Instant::now() > deadline {
            let _ = session.kill();
            panic!("interactive redis-cli did not exit after QUIT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("the output reader");
    let output = output.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&output);
    for expected in [
        "\"operator\"",
        "resp=3",
        "name=operator",
        "\"hello\"",
        "(integer) 42",
    ] {
        assert!(
            text.contains(expected),
            "interactive output lacks {expected}: {text}\n{}",
            gateway.log_text()
        );
    }
    assert!(!text.contains("ERR"), "an error in {text}");
    // The value is really stored, not just echoed by the interactive client.
    assert_eq!(gateway.cli_text(&["GET", "visits"]), "42");
}

#[test]
fn raw_connections_keep_pipelined_order_and_reject_bad_frames() {
    let (_cluster, gateway) = start(22_400, 22_381);
    // Pipelined in one write, mixing local and replicated commands and both encodings.
    let pipeline = b"SET p 1\r\nINCR p\r\n*2\r\n$4\r\nINCR\r\n$1\r\np\r\nGET p\r\nPING\r\n\
                     APPEND p x\r\nGET p\r\nHELLO 3\r\nGET nothing\r\nQUIT\r\nPING\r\n";
    let answer = gateway.raw(pipeline, None);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("+OK\r\n:2\r\n:3\r\n$1\r\n3\r\n+PONG\r\n:2\r\n$2\r\n3x\r\n%7\r\n"),
        "{text:?}"
    );
    assert!(
        text.ends_with("_\r\n+OK\r\n"),
        "RESP3 null, then QUIT's OK, then the connection closes: {text:?}"
    );

    // 200 commands in one write: one connection's replies stay in order.
    let mut many = Vec::new();
    let mut expected = Vec::new();
    for index in 1..=200 {
        many.extend_from_slice(b"INCR order\r\n");
        expected.extend_from_slice(format!(":{index}\r\n").as_bytes());
    }
    assert_eq!(
        String::from_utf8_lossy(&gateway.raw(&many, Some(expected.len()))),
        String::from_utf8_lossy(&expected)
    );

    // 100 GETs in one write: at up to 512 KiB per value, their results could pass the 16 MiB a
    // group may hold, so they run as several groups, still answered in order.
    let mut mset = b"MSET".to_vec();
    let mut gets = Vec::new();
    let mut expected = Vec::new();
    for index in 0..100 {
        mset.extend_from_slice(format!(" g{index} {index}").as_bytes());
        gets.extend_from_slice(format!("GET g{index}\r\n").as_bytes());
        expected
            .extend_from_slice(format!("${}\r\n{index}\r\n", index.to_string().len()).as_bytes());
    }
    mset.extend_from_slice(b"\r\n");
    assert_eq!(gateway.raw(&mset, Some(5)), b"+OK\r\n");
    assert_eq!(
        String::from_utf8_lossy(&gateway.raw(&gets, Some(expected.len()))),
        String::from_utf8_lossy(&expected)
    );

    let malformed: [(&[u8], &str); 4] = [
        (
            b"*1\r\n$2000000\r\n",
            "-ERR Protocol error: bulk string of 2000000 bytes exceeds the limit",
        ),
        (
            b"*100000\r\n",
            "-ERR Protocol error: array of 100000 elements exceeds the limit",
        ),
        (
            b"*1\r\n:1\r\n",
            "-ERR Protocol error: expected '$', got ':'",
        ),
        (b"*x\r\n", "-ERR Protocol error: invalid multibulk length"),
    ];
    for (request, expected) in malformed {
        let answer = String::from_utf8_lossy(&gateway.raw(request, None)).into_owned();
        assert!(
            answer.starts_with(expected) && answer.ends_with("\r\n"),
            "{request:?} answered {answer:?}"
        );
    }
    // An inline line that never ends: refused once it passes the limit, connection closed.
    let endless = vec![b'a'; 70_000];
    let answer = String::from_utf8_lossy(&gateway.raw(&endless, None)).into_owned();
    assert!(
        answer.starts_with("-ERR Protocol error: line longer than 65536 bytes"),
        "{answer}"
    );
    // The gateway serves on after every bad connection.
    assert_eq!(gateway.cli_text(&["GET", "p"]), "3x");
}

#[test]
fn redis_benchmark_runs_against_the_gateway() {
    let (_cluster, gateway) = start(22_600, 22_382);
    let sent_before = gateway.sent();
    let concurrent = gateway.benchmark(&["-t", "set,get,incr,mset", "-n", "2000", "-c", "50"]);
    let sent_after = gateway.sent();
    let envelopes = sent_after.0 - sent_before.0;
    let commands = sent_after.1 - sent_before.1;
    eprintln!("-c 50: {commands} commands in {envelopes} envelopes");
    // Without pipelining each connection has one command in flight: fewer envelopes than
    // commands means commands of different connections shared signed requests.
    assert!(
        commands > envelopes,
        "{commands} commands in {envelopes} envelopes"
    );
    for command in ["SET", "GET", "INCR", "MSET (10 keys)"] {
        assert!(
            concurrent.contains(&format!("{command}: "))
                && concurrent.contains("requests per second"),
            "{command} missing in {concurrent}"
        );
    }
    let sent_before = gateway.sent();
    let pipelined =
        gateway.benchmark(&["-t", "set,get,incr", "-n", "4000", "-c", "50", "-P", "16"]);
    let sent_after = gateway.sent();
    let envelopes = sent_after.0 - sent_before.0;
    let commands = sent_after.1 - sent_before.1;
    eprintln!("-P 16: {commands} commands in {envelopes} envelopes");
    assert!(commands >= 12_000, "{commands} commands replicated");
    // Pipelines of 16 travel as groups that share envelopes (INFO counts what was sent).
    assert!(
        commands >= 4 * envelopes,
        "{commands} commands in {envelopes} envelopes: the pipelines were not batched"
    );
    assert!(pipelined.contains("INCR: "), "{pipelined}");
    let many_clients = gateway.benchmark(&["-t", "set,incr", "-n", "2000", "-c", "200"]);
    assert!(many_clients.contains("INCR: "), "{many_clients}");

    // Every INCR of the three runs counted exactly once on the one hot key, and the values
    // redis-benchmark wrote are there.
    assert_eq!(gateway.cli_text(&["GET", "counter:__rand_int__"]), "8000");
    // redis-benchmark writes 3-byte random payloads (-d 3).
    assert_eq!(gateway.cli_text(&["STRLEN", "key:__rand_int__"]), "3");
}

/// `tessera up` and the replica processes it reported; all are killed if the test fails.
struct UpProcess {
    up: Child,
    replica_pids: Vec<i32>,
}

impl Drop for UpProcess {
    fn drop(&mut self) {
        if matches!(self.up.try_wait(), Ok(None)) {
            let _ = self.up.kill();
            let _ = self.up.wait();
        }
        // The replicas run in their own process group, so killing `up` does not reach them.
        for &pid in &self.replica_pids {
            // SAFETY: `kill` has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn up_starts_a_gateway_and_prints_the_redis_cli_line() {
    let temp = tempfile::tempdir().expect("create a temporary directory");
    let dir = temp.path().join("cluster");
    let up = Command::new(BINARY)
        .args([
            "up",
            "--base-port",
            "22800",
            "--gateway-listen",
            "127.0.0.1:22383",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tessera up");
    let mut process = UpProcess {
        up,
        replica_pids: Vec::new(),
    };
    let stdout = process.up.stdout.take().expect("piped stdout");
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let printed = read_up_until_ready(&lines, Duration::from_secs(30), &mut process.replica_pids);
    assert!(
        printed
            .iter()
            .any(|line| line.contains("redis-cli -p 22383")),
        "no redis-cli line in {printed:#?}"
    );
    let cli = |arguments: &[&str]| {
        let output = Command::new("redis-cli")
            .args(["-p", "22383"])
            .args(arguments)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_string()
    };
    assert_eq!(cli(&["SET", "started", "by-up"]), "OK");
    assert_eq!(cli(&["GET", "started"]), "by-up");

    // SAFETY: `kill` has no memory-safety preconditions.
    unsafe {
        libc::kill(process.up.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = process.up.try_wait().expect("wait for up") {
            break status;
        }
        assert!(Instant::now() < deadline, "`up` ignored SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "`up` exited with {status}");
}

#[test]
fn the_gateway_answers_through_a_crashed_primary() {
    let (mut cluster, gateway) = start_tuned(23_000, 22_384, |protocol| {
        // Short timers, so the view change takes about a second, well within the client's
        // request timeout.
        protocol.request_timeout_ms = 1_000;
        protocol.view_change_timeout_ms = 1_000;
    });
    assert_eq!(gateway.cli_text(&["SET", "survivor", "1"]), "OK");
    // Replica 0 is the primary of view 0. With it gone, f+1 = 2 replicas remain: enough to
    // change view and to vote on every reply.
    cluster.local.kill_replica(0).expect("kill the primary");
    assert_eq!(gateway.cli_text(&["INCR", "survivor"]), "2");
    assert_eq!(gateway.cli_text(&["MSET", "a", "x", "b", "y"]), "OK");
    assert_eq!(gateway.cli_text(&["MGET", "survivor", "a", "b"]), "2\nx\ny");
    let info = gateway.cli_text(&["INFO"]);
    let view: u64 = info
        .lines()
        .find_map(|line| line.strip_prefix("view:"))
        .and_then(|view| view.trim().parse().ok())
        .unwrap_or_else(|| panic!("no view in {info}"));
    assert!(view >= 1, "the replicas changed view: {info}");
}

/// Expiry through the gateway on a real cluster: the replicas decide it from the agreed time of
/// the batches, so a key set with `PX 300` is gone about a second later on every replica, and
/// their states (expiries and the agreed clock included) still have equal digests.
#[test]
fn keys_expire_at_the_agreed_time_and_replicas_stay_equal() {
    let (cluster, gateway) = start_tuned(23_400, 22_386, |protocol| {
        // Small checkpoints, so a stable checkpoint soon covers the commands below.
        protocol.checkpoint_interval = 4;
        protocol.log_size = 8;
        protocol.window = 4;
    });
    let cli = |arguments: &[&str]| gateway.cli_text(arguments);
    assert_eq!(cli(&["SET", "short", "v", "PX", "300"]), "OK");
    assert_eq!(cli(&["SET", "long", "v", "EX", "100"]), "OK");
    let pttl: i64 = cli(&["PTTL", "short"])
        .trim()
        .parse()
        .expect("PTTL is a number");
    assert!((1..=300).contains(&pttl), "PTTL of a PX 300 key: {pttl}");
    // TTL rounds to the nearest second as Redis does, so a key with under 500 ms left says 0.
    let ttl: i64 = cli(&["TTL", "long"])
        .trim()
        .parse()
        .expect("TTL is a number");
    assert!((99..=100).contains(&ttl), "TTL of an EX 100 key: {ttl}");
    assert_eq!(cli(&["GET", "short"]), "v");
    assert_eq!(cli(&["EXISTS", "short", "long"]), "2");
    std::thread::sleep(Duration::from_millis(1_000));
    assert_eq!(cli(&["GET", "short"]), "", "expired after about a second");
    assert_eq!(cli(&["PTTL", "short"]), "-2");
    assert_eq!(cli(&["EXISTS", "short", "long"]), "1");
    assert_eq!(cli(&["DBSIZE"]), "1");
    // EXPIRE with a past time deletes; PEXPIRE sets a fresh expiry.
    assert_eq!(cli(&["SET", "gone", "v"]), "OK");
    assert_eq!(cli(&["EXPIRE", "gone", "-1"]), "1");
    assert_eq!(cli(&["GET", "gone"]), "");
    assert_eq!(cli(&["PEXPIRE", "long", "200", "LT"]), "1");
    assert_eq!(cli(&["GETEX", "long", "PERSIST"]), "v");
    assert_eq!(cli(&["TTL", "long"]), "-1");
    // More batches, so the replicas checkpoint past everything above; then every replica must
    // report the same stable checkpoint with the same state digest.
    for index in 0..12 {
        assert_eq!(cli(&["SET", &format!("pad{index}"), "x", "PX", "50"]), "OK");
    }
    support::run_bounded(Duration::from_secs(60), async {
        let statuses =
            support::wait_for_agreement(&cluster.dir, &[0, 1, 2], Duration::from_secs(30)).await;
        assert!(statuses[0].stable_checkpoint.0 >= 20, "{statuses:#?}");
    });
}

/// Sends `request` on a fresh connection and decodes `count` replies.
fn replies(gateway: &GatewayProcess, request: &[u8], count: usize) -> Vec<Reply> {
    let mut stream = TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    stream
        .set_read_timeout(Some(SOCKET_TIMEOUT))
        .expect("set a read timeout");
    stream.write_all(request).expect("send the request");
    let limits = RespLimits::default();
    let mut input = Vec::new();
    let mut decoded = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    while decoded.len() < count {
        match decode_reply(&input, &limits).expect("a valid reply") {
            Some((reply, used)) => {
                input.drain(..used);
                decoded.push(reply);
            }
            None => {
                let read = stream.read(&mut buffer).expect("read replies");
                assert!(read > 0, "closed after {} replies", decoded.len());
                input.extend_from_slice(&buffer[..read]);
            }
        }
    }
    decoded
}

#[test]
fn results_past_the_reply_limit_continue_in_another_envelope() {
    let (_cluster, gateway) = start(23_200, 22_385);
    // Ten 500,000-byte values: a pipeline of ten SETs is split into envelopes of at most
    // 1 MiB of operations, so it needs several rounds, all answered in order.
    let value = vec![b'v'; 500_000];
    let mut sets = Vec::new();
    for index in 0..10 {
        encode_request(
            &[
                b"SET".to_vec(),
                format!("big{index}").into_bytes(),
                value.clone(),
            ],
            &mut sets,
        );
    }
    assert_eq!(replies(&gateway, &sets, 10), vec![Reply::ok(); 10]);

    // Ten GETs in one group: eight results fit the 4 MiB reply limit of one envelope; the
    // replicas cut the envelope at the ninth, and the gateway sends the ninth and tenth again.
    let request = |commands: &[(&str, usize)]| {
        let mut request = Vec::new();
        for (command, index) in commands {
            encode_request(
                &[
                    command.as_bytes().to_vec(),
                    format!("big{index}").into_bytes(),
                ],
                &mut request,
            );
        }
        request
    };
    let gets: Vec<(&str, usize)> = (0..10).map(|index| ("GET", index)).collect();
    let answered = replies(&gateway, &request(&gets), 10);
    assert!(
        answered
            .iter()
            .all(|reply| *reply == Reply::Bulk(value.clone())),
        "{:?}",
        answered
            .iter()
            .map(|reply| format!("{reply:?}").chars().take(80).collect::<String>())
            .collect::<Vec<_>>()
    );
    // A write cut the same way ran, and must not run twice: its connection is told that its
    // result was dropped (docs/GATEWAY.md, "Results larger than one reply").
    let mut mixed: Vec<(&str, usize)> = (0..8).map(|index| ("GET", index)).collect();
    mixed.push(("GETDEL", 8));
    mixed.push(("STRLEN", 9));
    let answered = replies(&gateway, &request(&mixed), 10);
    assert!(answered[..8]
        .iter()
        .all(|reply| *reply == Reply::Bulk(value.clone())));
    assert!(
        matches!(&answered[8], Reply::Error(text) if text.contains("its result was dropped")),
        "{:?}",
        answered[8]
    );
    assert_eq!(answered[9], Reply::Integer(500_000));
    assert_eq!(
        gateway.cli_text(&["EXISTS", "big8"]),
        "0",
        "the GETDEL ran once"
    );
    assert_eq!(gateway.cli_text(&["STRLEN", "big9"]), "500000");
}

/// The gateway's Prometheus text from `GET /metrics` on `address`.
fn gateway_metrics(address: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(SOCKET_TIMEOUT))
        .expect("set a read timeout");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {address}\r\n\r\n").expect("send");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("read the metrics");
    answer
}

/// The value of `sample` (a name with its labels) in a metrics text, 0 if absent.
fn sample(text: &str, sample: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads until the gateway closes the connection (or resets it); returns what arrived and
/// how long it took.
fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    stream
        .set_read_timeout(Some(SOCKET_TIMEOUT))
        .expect("set a read timeout");
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (answer, started.elapsed()),
            Ok(read) => answer.extend_from_slice(&buffer[..read]),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the gateway kept the connection open for {SOCKET_TIMEOUT:?}")
            }
            Err(_) => return (answer, started.elapsed()),
        }
    }
}

/// `tessera gateway --idle-timeout --frame-timeout --write-timeout --connections-max` reach
/// the gateway and bound what a connection holds (the in-process tests of
/// `tessera-gateway/tests/connection_limits.rs` cover the behaviour in detail).
#[test]
fn gateway_timeouts_and_connection_cap_come_from_the_command_line() {
    const METRICS: &str = "127.0.0.1:25391";
    let cluster = RunningCluster::start(ClusterDir::create(25_200, |_| {}));
    let gateway = GatewayProcess::start_with(
        &cluster,
        25_390,
        &[
            "--idle-timeout",
            "400ms",
            "--frame-timeout",
            "300ms",
            "--write-timeout",
            "400ms",
            "--connections-max",
            "3",
            "--metrics-listen",
            METRICS,
        ],
    );
    let connect = || TcpStream::connect(("127.0.0.1", gateway.port)).expect("connect");
    // Connections just dropped (the readiness probe, a finished redis-cli) hold their slot
    // until the gateway reads their end; each step starts once none is left.
    let wait_until_no_connections = || {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while sample(&gateway_metrics(METRICS), "tessera_gateway_connections") != 0 {
            assert!(Instant::now() < deadline, "connections stay open");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // Says nothing: closed silently after the idle timeout.
    let (answer, waited) = read_until_closed(&mut connect());
    assert_eq!(answer, b"");
    assert!(
        (Duration::from_millis(350)..Duration::from_secs(5)).contains(&waited),
        "an idle connection closed after {waited:?}"
    );

    // Half a request: an error after the frame timeout.
    let mut half = connect();
    half.write_all(b"*2\r\n$3\r\nGET\r\n").expect("send");
    let (answer, _) = read_until_closed(&mut half);
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "-ERR request not complete within the gateway's frame timeout of 300 ms; closing the \
         connection\r\n"
    );

    // Pipelined GETs of a 500,000-byte value, never read: about 15 MB of replies in the
    // first group, more than the sockets' buffers take, so the writes stop; the connection is
    // reset after the write timeout while another client is served.
    let mut set = Vec::new();
    encode_request(
        &[b"SET".to_vec(), b"big".to_vec(), vec![b'v'; 500_000]],
        &mut set,
    );
    assert_eq!(replies(&gateway, &set, 1), vec![Reply::ok()]);
    wait_until_no_connections();
    let mut slow = connect();
    slow.write_all(&b"GET big\r\n".repeat(100))
        .expect("send the GETs");
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while sample(
        &gateway_metrics(METRICS),
        "tessera_gateway_connections_closed_total{reason=\"write_timeout\"}",
    ) == 0
    {
        assert!(
            Instant::now() < deadline,
            "the slow reader was not cut off: {}",
            gateway_metrics(METRICS)
        );
        assert_eq!(gateway.cli_text(&["PING"]), "PONG");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The cap: three connections held, a fourth refused with Redis's error.
    wait_until_no_connections();
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect()).collect();
    for stream in &mut held {
        stream
            .set_read_timeout(Some(SOCKET_TIMEOUT))
            .expect("set a read timeout");
        stream.write_all(b"PING\r\n").expect("send");
        let mut pong = [0u8; 7];
        stream.read_exact(&mut pong).expect("read PONG");
        assert_eq!(&pong, b"+PONG\r\n");
    }
    let mut refused = connect();
    refused.write_all(b"PING\r\n").expect("send");
    let (answer, _) = read_until_closed(&mut refused);
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "-ERR max number of clients reached\r\n"
    );
    let metrics = gateway_metrics(METRICS);
    for (name, minimum) in [
        (
            "tessera_gateway_connections_closed_total{reason=\"idle_timeout\"}",
            1,
        ),
        (
            "tessera_gateway_connections_closed_total{reason=\"frame_timeout\"}",
            1,
        ),
        ("tessera_gateway_errors_total{kind=\"timeout\"}", 1),
        ("tessera_gateway_connections_refused_total", 1),
    ] {
        assert!(sample(&metrics, name) >= minimum, "{name} in {metrics}");
    }
}
