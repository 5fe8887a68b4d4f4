//! [`TpmUsig`]: the USIG over a TPM 2.0 (swtpm or `/dev/tpmrm0`).
//!
//! `create_ui(m)` runs, on one kept-open connection and one audit session kept for the life of
//! the instance: `NV_Increment` (audit reset), `NV_Read` (audit exclusive), then
//! `GetSessionAuditDigest` with qualifying data bound to `m`, signed by the AK. If another TPM
//! user runs a command in between, the read fails with TPM_RC_EXCLUSIVE (or the attestation
//! says exclusiveSession = NO); the whole sequence is retried up to [`ATTEMPTS_MAX`] times.
//! Each failed attempt has already advanced the TPM counter, so the next UI's counter jumps:
//! a gap the protocol must accept (see the crate docs).
//!
//! Epochs: UI `(epoch, counter)` is raw NV counter value `counter_base + epoch + counter`
//! ([`tessera_usig::tpm::raw_counter`]). [`Usig::start_epoch`] does one `NV_Increment` (so the
//! new epoch is strictly greater even if no UI was issued since the last switch), reads the
//! counter `R`, and sets `epoch = R - counter_base`: the new epoch's UI `k` is raw `R + k`.
//! Why this is safe:
//! - No (epoch, counter) pair can get two valid certificates. A valid certificate for
//!   `(e, k)` proves an exclusive audit chain `[NV_Increment, NV_Read → counter_base + e + k]`,
//!   and the TPM's counter produces each raw value by exactly one increment, whose exclusive
//!   chain is signed at most once with exclusiveSession = YES. So each raw value backs at most
//!   one certificate, and two certificates for one pair would need the same raw value. This
//!   holds whatever the host does: it is the TPM's guarantee, not this code's.
//! - Epochs strictly increase. `R` comes after an increment, so `R` is above every raw value
//!   the TPM ever produced for this index, including every UI of every earlier epoch (of this
//!   instance or of an earlier process of this replica); hence `R - counter_base` is above
//!   every earlier epoch `e` (whose UIs had raw values `> counter_base + e`). The TPM counter
//!   only goes forward, including the jump an swtpm kill -9 can cause, which only makes `R`
//!   larger.
//! - Every UI of the new epoch has a raw value above `R`, so none of them can be confused with
//!   one made before the switch. What the TPM cannot stop is a compromised host certifying a
//!   *later* raw value under an older epoch's qualifying data: that gives a pair of the old
//!   epoch with a counter far beyond anything issued in it (never a repeated pair). Closing old
//!   epochs at an agreed point is therefore the protocol core's job; this code never does it.
//!
//! When the TPM counter has moved past this instance's expected value (swtpm was killed -9 and
//! its counter jumped, or the replica restarted while its TPM kept counting), the next UI of the
//! current epoch would skip counter values. [`TpmUsig::pending_gap`] reports that, and
//! [`Usig::start_epoch`] is the way out: the new epoch counts from 1 again.
//!
//! Verification is [`tessera_usig::TpmVerifier`], pure and outside the TPM.

use crate::command::{rc, TpmError, TpmTarget};
use crate::ops::{Tpm, AUDIT_EXCLUSIVE, AUDIT_RESET};
use tessera_types::{Digest, ReplicaId, Ui};
use tessera_usig::tpm::{encode_certificate, parse_session_audit, qualifying_data};
use tessera_usig::{TpmEnrollment, TpmVerifier, Usig, UsigError, UsigIdentity};

/// Attempts per `create_ui` before reporting that another TPM user keeps breaking exclusivity.
pub const ATTEMPTS_MAX: u32 = 8;

/// Where this replica's USIG lives in its TPM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmLocation {
    /// The TPM.
    pub target: TpmTarget,
    /// Persistent handle of the AK.
    pub ak_handle: u32,
}

impl std::str::FromStr for TpmLocation {
    type Err = String;

    /// `TARGET` or `TARGET,ak-handle=0xHHHHHHHH` (the replica secret file's `usig_endpoint`);
    /// the AK handle defaults to [`crate::DEFAULT_AK_HANDLE`].
    fn from_str(text: &str) -> Result<TpmLocation, String> {
        let (target, handle) = match text.split_once(',') {
            None => (text, None),
            Some((target, option)) => {
                let digits = option
                    .strip_prefix("ak-handle=0x")
                    .ok_or_else(|| format!("`{option}`: expected ak-handle=0xHHHHHHHH"))?;
                let handle = u32::from_str_radix(digits, 16)
                    .map_err(|error| format!("`{option}`: {error}"))?;
                (target, Some(handle))
            }
        };
        Ok(TpmLocation {
            target: target.parse()?,
            ak_handle: handle.unwrap_or(crate::DEFAULT_AK_HANDLE),
        })
    }
}

/// The USIG of one replica over its TPM. See the module docs.
pub struct TpmUsig {
    identity: UsigIdentity,
    location: TpmLocation,
    own: TpmEnrollment,
    verifier: TpmVerifier,
    tpm: Option<Tpm>,
    session: Option<u32>,
    last_raw: u64,
    interference: u32,
}

impl std::fmt::Debug for TpmUsig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TpmUsig")
            .field("identity", &self.identity)
            .field("target", &self.location.target.to_string())
            .field("last_raw", &self.last_raw)
            .finish()
    }
}

/// One attempt's outcome when it did not produce a UI.
enum Failure {
    /// Exclusivity was broken by another TPM user: try the whole sequence again.
    Interleaved(&'static str),
    /// Anything else: report it.
    Fatal(UsigError),
}

impl TpmUsig {
    /// A USIG for `identity` using the TPM at `location`, for the cluster enrolled as
    /// `enrollments` (index = replica). The TPM is contacted at the first `create_ui` (and again
    /// after a connection failure); call [`TpmUsig::connect`] to find problems at start.
    pub fn new(
        identity: UsigIdentity,
        location: TpmLocation,
        enrollments: Vec<TpmEnrollment>,
    ) -> Result<TpmUsig, UsigError> {
        let verifier = TpmVerifier::new(identity, enrollments.clone())?;
        let own = enrollments[identity.replica.0 as usize];
        // UI (epoch, k) is raw `counter_base + epoch + k`: before the first UI of the epoch the
        // instance stands at `counter_base + epoch`.
        let last_raw =
            tessera_usig::tpm::raw_counter(&own, identity.epoch, 0).ok_or_else(|| {
                UsigError::Unavailable(format!(
                    "epoch {} is beyond the TPM counter's range for base {}",
                    identity.epoch, own.counter_base
                ))
            })?;
        Ok(TpmUsig {
            identity,
            location,
            own,
            verifier,
            tpm: None,
            session: None,
            last_raw,
            interference: 0,
        })
    }

    fn unavailable(&self, what: impl std::fmt::Display) -> UsigError {
        UsigError::Unavailable(format!("TPM at {}: {what}", self.location.target))
    }

    /// Connects now and checks that the AK and counter index match this replica's enrolment.
    pub fn connect(&mut self) -> Result<(), UsigError> {
        self.ensure_session()?;
        let own = self.own;
        let ak_handle = self.location.ak_handle;
        let tpm = self
            .tpm
            .as_mut()
            .ok_or_else(|| UsigError::Unavailable("not connected".into()))?;
        let ak = tpm.read_public(ak_handle);
        let nv = tpm.nv_read_public(own.nv_index);
        let ak = ak.map_err(|error| self.unavailable(format!("AK 0x{ak_handle:08x}: {error}")))?;
        if ak.point != own.ak_public {
            return Err(self.unavailable(format!(
                "the AK at 0x{ak_handle:08x} is not the one enrolled for replica {}; \
                 wrong TPM, or re-run `tessera usig provision` and re-enrol",
                self.identity.replica.0
            )));
        }
        let (attributes, _) =
            nv.map_err(|error| self.unavailable(format!("index 0x{:08x}: {error}", own.nv_index)))?;
        if attributes & !tessera_usig::tpm::nv_attributes::WRITTEN != own.nv_attributes {
            return Err(self.unavailable(format!(
                "index 0x{:08x} has attributes 0x{attributes:08x}, enrolled 0x{:08x}",
                own.nv_index, own.nv_attributes
            )));
        }
        Ok(())
    }

    fn ensure_session(&mut self) -> Result<u32, UsigError> {
        if self.tpm.is_none() {
            let tpm = Tpm::open(&self.location.target).map_err(|error| self.unavailable(error))?;
            self.tpm = Some(tpm);
            self.session = None;
        }
        if let Some(session) = self.session {
            return Ok(session);
        }
        let started = match self.tpm.as_mut() {
            Some(tpm) => tpm.start_audit_session(),
            None => return Err(self.unavailable("not connected")),
        };
        match started {
            Ok(session) => {
                self.session = Some(session);
                Ok(session)
            }
            Err(error) => {
                self.drop_connection_on_io(&error);
                Err(self.unavailable(error))
            }
        }
    }

    fn drop_connection_on_io(&mut self, error: &TpmError) {
        if matches!(error, TpmError::Io(_)) {
            self.tpm = None;
            self.session = None;
        }
    }

    fn attempt(&mut self, message: &Digest) -> Result<Ui, Failure> {
        let session = self.ensure_session().map_err(Failure::Fatal)?;
        let index = self.own.nv_index;
        let ak = self.location.ak_handle;
        let qualifying = qualifying_data(self.identity, message);
        let Some(tpm) = self.tpm.as_mut() else {
            return Err(Failure::Fatal(self.unavailable("not connected")));
        };
        let interfere = self.interference > 0;
        self.interference = self.interference.saturating_sub(1);
        let outcome = tpm
            .nv_increment(index, Some((session, AUDIT_RESET)))
            .and_then(|()| if interfere { tpm.ping() } else { Ok(()) })
            .and_then(|()| tpm.nv_read_counter(index, Some((session, AUDIT_EXCLUSIVE))))
            .and_then(|raw| {
                tpm.get_session_audit_digest(ak, session, &qualifying)
                    .map(|signed| (raw, signed))
            });
        let (raw, signed) = match outcome {
            Ok(done) => done,
            Err(error) if error.code() == Some(rc::EXCLUSIVE) => {
                return Err(Failure::Interleaved("the audited NV_Read lost exclusivity"))
            }
            Err(error) if error.code().is_some_and(rc::is_transient) => {
                return Err(Failure::Interleaved("the TPM asked to retry"))
            }
            Err(error) => {
                self.drop_connection_on_io(&error);
                // A TPM refusal may mean the session is gone (TPM restarted): start a new one
                // next time rather than failing forever.
                self.session = None;
                return Err(Failure::Fatal(self.unavailable(error)));
            }
        };
        let audit = parse_session_audit(&signed.attest)
            .map_err(|what| Failure::Fatal(self.unavailable(what)))?;
        if !audit.exclusive {
            return Err(Failure::Interleaved(
                "a command ran between NV_Read and GetSessionAuditDigest",
            ));
        }
        if raw <= self.last_raw {
            return Err(Failure::Fatal(self.unavailable(format!(
                "counter read {raw}, not above the last value {} (wrong TPM or index?)",
                self.last_raw
            ))));
        }
        self.last_raw = raw;
        let counter = self.counter_of(raw);
        Ok(Ui {
            epoch: self.identity.epoch,
            counter,
            certificate: encode_certificate(&signed.attest, &signed.r, &signed.s),
        })
    }

    /// The UI counter of raw value `raw` in the current epoch. Callers only pass values at or
    /// above `last_raw`, which starts at `counter_base + epoch`, so this never underflows.
    fn counter_of(&self, raw: u64) -> u64 {
        raw - self.own.counter_base - self.identity.epoch
    }

    /// How many counter values the next UI of the current epoch would skip: the TPM counter's
    /// distance past this instance's last UI (0 when they agree). Non-zero after swtpm was
    /// killed -9 (its counter can jump) or when a restarted replica's TPM kept counting; call
    /// [`Usig::start_epoch`] to continue from counter 1 in a new epoch instead of leaving a
    /// gap. Reads the counter outside the audit session.
    pub fn pending_gap(&mut self) -> Result<u64, UsigError> {
        self.ensure_session()?;
        let index = self.own.nv_index;
        let Some(tpm) = self.tpm.as_mut() else {
            return Err(self.unavailable("not connected"));
        };
        let read = tpm.nv_read_counter(index, None);
        let raw = match read {
            Ok(raw) => raw,
            Err(error) => {
                self.drop_connection_on_io(&error);
                return Err(self.unavailable(error));
            }
        };
        raw.checked_sub(self.last_raw).ok_or_else(|| {
            self.unavailable(format!(
                "counter reads {raw}, below this instance's last value {} (wrong TPM or index?)",
                self.last_raw
            ))
        })
    }

    /// What a compromised host can do: ask the TPM to sign the current audit chain again, for
    /// another message. Exists so tests can show the verifier rejects it (exclusiveSession =
    /// NO); it returns the UI a cheating replica would send.
    pub fn resign_current_chain(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        let session = self
            .session
            .ok_or_else(|| self.unavailable("no audit chain yet"))?;
        let qualifying = qualifying_data(self.identity, message);
        let ak = self.location.ak_handle;
        let Some(tpm) = self.tpm.as_mut() else {
            return Err(self.unavailable("not connected"));
        };
        let signed = tpm
            .get_session_audit_digest(ak, session, &qualifying)
            .map_err(|error| UsigError::Unavailable(error.to_string()))?;
        Ok(Ui {
            epoch: self.identity.epoch,
            counter: self.counter_of(self.last_raw),
            certificate: encode_certificate(&signed.attest, &signed.r, &signed.s),
        })
    }

    /// What the broken construction would give: NV_Certify of the current counter value with
    /// this message's qualifying data. Exists so tests can show the verifier rejects it.
    pub fn certify_current_value(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        self.ensure_session()?;
        let qualifying = qualifying_data(self.identity, message);
        let (ak, index) = (self.location.ak_handle, self.own.nv_index);
        let Some(tpm) = self.tpm.as_mut() else {
            return Err(self.unavailable("not connected"));
        };
        let signed = tpm
            .nv_certify(ak, index, &qualifying)
            .map_err(|error| UsigError::Unavailable(error.to_string()))?;
        Ok(Ui {
            epoch: self.identity.epoch,
            counter: self.counter_of(self.last_raw),
            certificate: encode_certificate(&signed.attest, &signed.r, &signed.s),
        })
    }

    /// Makes the next `attempts` attempts run a command outside the audit session between
    /// NV_Increment and NV_Read, exactly as another TPM user would; for tests of the retry
    /// bound (the TPM cannot tell who sent the command).
    pub fn interfere_with_next_attempts(&mut self, attempts: u32) {
        self.interference = attempts;
    }

    /// The raw TPM counter value this instance last used: its last UI's, or the value read by
    /// the last `start_epoch`, or `counter_base + epoch` before either.
    pub fn last_raw_counter(&self) -> u64 {
        self.last_raw
    }

    /// Closes the connection (flushing the session), e.g. before the TPM is stopped.
    pub fn disconnect(&mut self) {
        if let (Some(tpm), Some(session)) = (self.tpm.as_mut(), self.session) {
            // Best effort: swtpm has few session slots, but a dead TPM needs no flush.
            let _ = tpm.flush(session);
        }
        self.session = None;
        self.tpm = None;
    }
}

impl Drop for TpmUsig {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl Usig for TpmUsig {
    fn identity(&self) -> UsigIdentity {
        self.identity
    }

    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        let mut last_reason = "";
        for _attempt in 0..ATTEMPTS_MAX {
            match self.attempt(message) {
                Ok(ui) => return Ok(ui),
                Err(Failure::Interleaved(reason)) => {
                    tracing::debug!(reason, "TPM audit chain interrupted; retrying");
                    last_reason = reason;
                }
                Err(Failure::Fatal(error)) => return Err(error),
            }
        }
        Err(self.unavailable(format!(
            "{ATTEMPTS_MAX} attempts in a row were interrupted by another TPM user (last: \
             {last_reason}); find the process using this TPM and stop it, or give the USIG a \
             TPM of its own"
        )))
    }

    /// See the module docs for why the epoch this returns is above every earlier one and why
    /// no (epoch, counter) pair can be certified twice.
    fn start_epoch(&mut self) -> Result<u64, UsigError> {
        self.ensure_session()?;
        let index = self.own.nv_index;
        let Some(tpm) = self.tpm.as_mut() else {
            return Err(self.unavailable("not connected"));
        };
        // Not audited: nothing is certified here. The increment burns a value so that the new
        // epoch is above the current one even if no UI was issued in it.
        let outcome = tpm
            .nv_increment(index, None)
            .and_then(|()| tpm.nv_read_counter(index, None));
        let raw = match outcome {
            Ok(raw) => raw,
            Err(error) => {
                self.drop_connection_on_io(&error);
                return Err(self.unavailable(error));
            }
        };
        if raw <= self.last_raw {
            return Err(self.unavailable(format!(
                "counter read {raw} after an increment, not above the last value {} (wrong TPM \
                 or index?)",
                self.last_raw
            )));
        }
        // raw > last_raw >= counter_base + epoch, so this is above the current epoch.
        let epoch = raw - self.own.counter_base;
        debug_assert!(epoch > self.identity.epoch, "epochs only increase");
        tracing::info!(
            epoch,
            raw,
            replica = self.identity.replica.0,
            "TPM USIG started a new epoch"
        );
        self.identity.epoch = epoch;
        self.last_raw = raw;
        Ok(epoch)
    }

    fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        self.verifier.verify_ui(signer, message, ui)
    }
}
