//! `tessera usig bench`: `create_ui` and `verify_ui` latency of every USIG backend, side by side
//! in one run (paper 004, Tables 3 and 4).
//!
//! Each backend signs as replica 0 and is verified as replica 1. `usigd` runs as a real daemon
//! process (`tessera usigd`, so every UI crosses a Unix socket and waits for an fdatasync of its
//! counter file); `tpm` runs against an swtpm process started here and provisioned fresh.
//! Verification of usigd UIs is the replica's local Ed25519 check, as in a cluster.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tessera_crypto::SigningKey;
use tessera_types::{Digest, ReplicaId, Ui};
use tessera_usig::{
    Ed25519Usig, Ed25519Verifier, HmacUsig, TpmVerifier, Usig, UsigError, UsigIdentity,
};

/// Options of `tessera usig bench`.
#[derive(clap::Args, Debug)]
pub struct UsigBenchArgs {
    /// Measured calls per operation and backend.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    iterations: u32,
    /// Backends to measure, in order (`usigd-reserve`: usigd with `--reserve-ahead 1024`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "hmac,ed25519,usigd,usigd-reserve,tpm"
    )]
    backends: Vec<String>,
    /// Directory for usigd's key and counter and swtpm's state (default: a fresh directory under
    /// the system temporary directory, removed after). The counter file's fsync cost depends on
    /// this file system.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Warm-up calls before measuring.
const WARMUP_CALLS: u32 = 50;

fn identity(replica: u32) -> UsigIdentity {
    UsigIdentity {
        replica: ReplicaId(replica),
        epoch: 0,
    }
}

fn seeds() -> Vec<[u8; 32]> {
    (0..3u8).map(|replica| [replica + 1; 32]).collect()
}

fn public_keys() -> Vec<[u8; 32]> {
    seeds()
        .iter()
        .map(|seed| SigningKey::from_seed(seed).verifying_key().to_bytes())
        .collect()
}

/// Verification side of a backend.
type Verify = Box<dyn Fn(&Digest, &Ui) -> Result<(), UsigError>>;

/// Processes a backend needs, stopped when dropped.
#[derive(Default)]
struct Helpers {
    daemon: Option<Child>,
    swtpm: Option<tessera_tpm::Swtpm>,
}

impl Drop for Helpers {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

fn build(name: &str, dir: &Path) -> anyhow::Result<(Box<dyn Usig>, Verify, Helpers)> {
    let mut helpers = Helpers::default();
    let (signer, verify): (Box<dyn Usig>, Verify) = match name {
        "hmac" => {
            let verifier = HmacUsig::new(identity(1), seeds());
            (
                Box::new(HmacUsig::new(identity(0), seeds())),
                Box::new(move |message, ui| verifier.verify_ui(ReplicaId(0), message, ui)),
            )
        }
        "ed25519" => {
            let verifier = Ed25519Usig::new(identity(1), seeds()[1], public_keys())?;
            (
                Box::new(Ed25519Usig::new(identity(0), seeds()[0], public_keys())?),
                Box::new(move |message, ui| verifier.verify_ui(ReplicaId(0), message, ui)),
            )
        }
        "usigd" | "usigd-reserve" => {
            let reserve = if name == "usigd" { 1 } else { 1024 };
            let (daemon, client) = start_usigd(dir, reserve)?;
            helpers.daemon = Some(daemon);
            let verifier = Ed25519Verifier::new(identity(1), public_keys())?;
            (
                Box::new(client),
                Box::new(move |message, ui| verifier.verify_ui(ReplicaId(0), message, ui)),
            )
        }
        "tpm" => {
            let port = tessera_tpm::swtpm::free_port_pair()?;
            let swtpm = tessera_tpm::Swtpm::start(&dir.join("tpm"), port)
                .context("cannot start swtpm (apt-get install swtpm swtpm-tools)")?;
            let enrollment = tessera_tpm::provision(
                &swtpm.target(),
                tessera_tpm::DEFAULT_NV_INDEX,
                tessera_tpm::DEFAULT_AK_HANDLE,
            )?;
            let location = tessera_tpm::TpmLocation {
                target: swtpm.target(),
                ak_handle: tessera_tpm::DEFAULT_AK_HANDLE,
            };
            // Replica 1 only verifies; it is enrolled with replica 0's data to fill its slot.
            let enrollments = vec![enrollment, enrollment];
            let mut signer = tessera_tpm::TpmUsig::new(identity(0), location, enrollments.clone())?;
            signer.connect()?;
            helpers.swtpm = Some(swtpm);
            let verifier = TpmVerifier::new(identity(1), enrollments)?;
            (
                Box::new(signer),
                Box::new(move |message, ui| verifier.verify_ui(ReplicaId(0), message, ui)),
            )
        }
        other => {
            bail!("unknown backend `{other}`; choose from hmac, ed25519, usigd, usigd-reserve, tpm")
        }
    };
    Ok((signer, verify, helpers))
}

fn start_usigd(
    dir: &Path,
    reserve_ahead: u64,
) -> anyhow::Result<(Child, tessera_usigd::UsigdClient)> {
    use std::os::unix::fs::PermissionsExt;
    let key_file = dir.join("usigd.key");
    std::fs::write(&key_file, hex::encode(seeds()[0]))?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    let socket = dir.join("usigd.sock");
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("usigd")
        .arg("--socket")
        .arg(&socket)
        .arg("--key-file")
        .arg(&key_file)
        .arg("--counter-file")
        .arg(dir.join("usigd.counter"))
        .args(["--replica", "0"])
        .arg("--reserve-ahead")
        .arg(reserve_ahead.to_string());
    for key in public_keys() {
        command.arg("--public-key").arg(hex::encode(key));
    }
    let daemon = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start tessera usigd")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tessera_usigd::UsigdClient::connect(&socket, identity(0), public_keys()) {
            Ok(client) => return Ok((daemon, client)),
            Err(error) if Instant::now() > deadline => bail!("usigd did not come up: {error}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// p50, p99 and mean of `samples`, in microseconds.
fn summary(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort_unstable();
    let at = |quantile: f64| {
        let index = ((samples.len() as f64 * quantile).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index].as_secs_f64() * 1e6
    };
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64;
    (at(0.50), at(0.99), mean * 1e6)
}

fn measure(name: &str, iterations: u32, dir: &Path) -> anyhow::Result<[(f64, f64, f64); 2]> {
    let backend_dir = dir.join(name);
    std::fs::create_dir_all(&backend_dir)?;
    let (mut signer, verify, _helpers) = build(name, &backend_dir)?;
    let message = |index: u32| Digest::of("tessera.bench.usig.v1", &index.to_le_bytes());
    for index in 0..WARMUP_CALLS {
        let ui = signer.create_ui(&message(index))?;
        verify(&message(index), &ui)?;
    }
    let mut created = Vec::with_capacity(iterations as usize);
    let mut create_times = Vec::with_capacity(iterations as usize);
    for index in 0..iterations {
        let content = message(WARMUP_CALLS + index);
        let start = Instant::now();
        let ui = signer.create_ui(&content)?;
        create_times.push(start.elapsed());
        created.push((content, ui));
    }
    let mut verify_times = Vec::with_capacity(iterations as usize);
    for (content, ui) in &created {
        let start = Instant::now();
        verify(content, ui).with_context(|| format!("{name}: a genuine UI did not verify"))?;
        verify_times.push(start.elapsed());
    }
    Ok([summary(&mut create_times), summary(&mut verify_times)])
}

/// Runs `tessera usig bench`.
pub fn run(args: UsigBenchArgs) -> anyhow::Result<()> {
    let (dir, remove) = match &args.dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("tessera-usig-bench-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rows = Vec::new();
    let mut failure = None;
    for name in &args.backends {
        match measure(name, args.iterations, &dir) {
            Ok(row) => rows.push((name.clone(), row)),
            Err(error) => {
                failure = Some(error.context(format!("backend {name}")));
                break;
            }
        }
    }
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Some(error) = failure {
        return Err(error);
    }
    println!(
        "USIG latency, {} calls each (µs; usigd counter file in {})",
        args.iterations,
        dir.display()
    );
    println!(
        "{:<14} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "backend",
        "create p50",
        "create p99",
        "create avg",
        "verify p50",
        "verify p99",
        "verify avg"
    );
    for (name, [create, verify]) in rows {
        println!(
            "{name:<14} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>11.1}",
            create.0, create.1, create.2, verify.0, verify.1, verify.2
        );
    }
    Ok(())
}
