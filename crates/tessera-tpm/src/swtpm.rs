//! Starting and stopping swtpm (the software TPM) for tests, benchmarks and `tessera up`.
//!
//! swtpm is test-grade: the host can roll its state file back. Production uses `/dev/tpmrm0`.

use crate::command::TpmTarget;
use crate::ops::Tpm;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long to wait for a started swtpm to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running swtpm child process (killed when dropped, unless stopped first).
#[derive(Debug)]
pub struct Swtpm {
    child: Option<Child>,
    port: u16,
    state_dir: PathBuf,
}

/// A free pair of consecutive loopback ports (server, control), found by binding.
pub fn free_port_pair() -> std::io::Result<u16> {
    for _ in 0..64 {
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = probe.local_addr()?.port();
        if port < u16::MAX && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free pair of consecutive loopback ports",
    ))
}

impl Swtpm {
    /// Starts swtpm on `port` (and `port + 1` for control) with state in `state_dir`, and waits
    /// until it answers a command.
    pub fn start(state_dir: &Path, port: u16) -> std::io::Result<Swtpm> {
        std::fs::create_dir_all(state_dir)?;
        let child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--tpmstate")
            .arg(format!("dir={}", state_dir.display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| {
                std::io::Error::new(
                    error.kind(),
                    format!(
                        "cannot run swtpm ({error}); install it: apt-get install swtpm swtpm-tools"
                    ),
                )
            })?;
        let mut swtpm = Swtpm {
            child: Some(child),
            port,
            state_dir: state_dir.to_path_buf(),
        };
        swtpm.wait_ready()?;
        Ok(swtpm)
    }

    fn wait_ready(&mut self) -> std::io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(mut tpm) = Tpm::open(&self.target()) {
                if tpm.ping().is_ok() {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(std::io::Error::other(format!(
                        "swtpm on port {} exited at start ({status}); is the port taken?",
                        self.port
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "swtpm on port {} did not answer within {START_TIMEOUT:?}",
                        self.port
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where to reach it.
    pub fn target(&self) -> TpmTarget {
        TpmTarget::Swtpm(SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)))
    }

    /// Its state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Its server port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Graceful stop: TPM2_Shutdown(STATE), then the control channel's shutdown, which keeps
    /// the TPM state (counters included) exactly.
    pub fn stop(mut self) -> std::io::Result<()> {
        let mut tpm = Tpm::open(&self.target()).map_err(std::io::Error::other)?;
        tpm.shutdown_state().map_err(std::io::Error::other)?;
        drop(tpm);
        let status = Command::new("swtpm_ioctl")
            .arg("--tcp")
            .arg(format!("127.0.0.1:{}", self.port + 1))
            .arg("-s")
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!(
                "swtpm_ioctl -s failed: {status}"
            )));
        }
        if let Some(mut child) = self.child.take() {
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
