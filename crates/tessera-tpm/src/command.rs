//! TPM 2.0 command marshalling and the transports that carry it.
//!
//! Commands are built by hand (TPM 2.0 Part 3 layouts) and sent over one kept-open connection:
//! swtpm's raw TCP server socket or the kernel resource manager `/dev/tpmrm0`. Every response
//! is untrusted input: its size is bounded, every field is length-checked, and a malformed
//! response is a [`TpmError::Malformed`] naming the command, never a panic.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Largest response accepted from a TPM (the largest we expect, CreatePrimary's, is < 1 KiB).
pub const RESPONSE_LEN_MAX: usize = 4096;
/// How long a TPM command may take before the transport gives up.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

const ST_NO_SESSIONS: u16 = 0x8001;
const ST_SESSIONS: u16 = 0x8002;
/// `TPM_RS_PW`: the password session (all our hierarchy and object auths are empty).
pub const RS_PW: u32 = 0x4000_0009;
/// `TPM_RH_NULL`.
pub const RH_NULL: u32 = 0x4000_0007;
/// `TPM_RH_ENDORSEMENT` (the privacy administrator of GetSessionAuditDigest).
pub const RH_ENDORSEMENT: u32 = 0x4000_000b;
/// `TPM_ALG_NULL`.
pub const ALG_NULL: u16 = 0x0010;

/// TPM response codes the backend reacts to.
pub mod rc {
    /// `TPM_RC_EXCLUSIVE`: another command ran between the audited ones.
    pub const EXCLUSIVE: u32 = 0x121;
    /// `TPM_RC_NV_DEFINED`.
    pub const NV_DEFINED: u32 = 0x14c;
    /// `TPM_RC_RETRY` (a warning: try again).
    pub const RETRY: u32 = 0x922;
    /// `TPM_RC_YIELDED`.
    pub const YIELDED: u32 = 0x908;
    /// `TPM_RC_TESTING`.
    pub const TESTING: u32 = 0x90a;
    /// `TPM_RC_NV_RATE`: NV writes are being rate-limited (real chips wear).
    pub const NV_RATE: u32 = 0x920;

    /// Whether `code` is a format-one `TPM_RC_HANDLE` (the handle does not exist).
    pub fn is_handle(code: u32) -> bool {
        code & 0x80 != 0 && code & 0x3f == 0x0b
    }

    /// Whether the command may simply be sent again.
    pub fn is_transient(code: u32) -> bool {
        matches!(code, RETRY | YIELDED | TESTING | NV_RATE)
    }
}

/// A TPM operation failed.
#[derive(Debug, Error)]
pub enum TpmError {
    /// The connection to the TPM failed.
    #[error("TPM connection: {0}")]
    Io(#[from] io::Error),
    /// The TPM refused a command.
    #[error("TPM2_{command} failed with response code 0x{code:03x}")]
    Command {
        /// The command.
        command: &'static str,
        /// The TPM response code.
        code: u32,
    },
    /// The response does not parse.
    #[error("TPM2_{command} returned a malformed response: {what}")]
    Malformed {
        /// The command.
        command: &'static str,
        /// What was wrong.
        what: &'static str,
    },
    /// The TPM state does not match what provisioning or the enrolment expects.
    #[error("{0}")]
    Setup(String),
}

impl TpmError {
    /// The TPM response code, if the TPM refused a command.
    pub fn code(&self) -> Option<u32> {
        match self {
            TpmError::Command { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Where the TPM is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TpmTarget {
    /// swtpm's server socket (raw TPM commands over TCP).
    Swtpm(SocketAddr),
    /// A TPM character device, normally the resource manager `/dev/tpmrm0`.
    Device(PathBuf),
}

impl std::fmt::Display for TpmTarget {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TpmTarget::Swtpm(address) => write!(formatter, "swtpm:{address}"),
            TpmTarget::Device(path) => write!(formatter, "{}", path.display()),
        }
    }
}

impl std::str::FromStr for TpmTarget {
    type Err = String;

    /// `swtpm:HOST:PORT` or a device path such as `/dev/tpmrm0`.
    fn from_str(text: &str) -> Result<TpmTarget, String> {
        if let Some(address) = text.strip_prefix("swtpm:") {
            address.parse().map(TpmTarget::Swtpm).map_err(|error| {
                format!("`{text}`: {error}; expected swtpm:127.0.0.1:PORT or a device path")
            })
        } else if text.starts_with('/') {
            Ok(TpmTarget::Device(PathBuf::from(text)))
        } else {
            Err(format!(
                "`{text}` is neither swtpm:HOST:PORT nor a device path like /dev/tpmrm0"
            ))
        }
    }
}

enum Channel {
    Tcp(TcpStream),
    Device(File),
}

/// One open connection to a TPM.
pub struct Connection {
    channel: Channel,
}

impl Connection {
    /// Opens `target`.
    pub fn open(target: &TpmTarget) -> io::Result<Connection> {
        let channel = match target {
            TpmTarget::Swtpm(address) => {
                let stream = TcpStream::connect_timeout(address, COMMAND_TIMEOUT)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
                stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
                Channel::Tcp(stream)
            }
            TpmTarget::Device(path) => {
                Channel::Device(OpenOptions::new().read(true).write(true).open(path)?)
            }
        };
        Ok(Connection { channel })
    }

    /// Sends one command and returns the raw response (header-checked, size-bounded).
    pub fn transact(&mut self, command: &[u8]) -> io::Result<Vec<u8>> {
        match &mut self.channel {
            Channel::Tcp(stream) => {
                stream.write_all(command)?;
                let mut header = [0u8; 10];
                stream.read_exact(&mut header)?;
                let size = response_size(&header)?;
                let mut response = vec![0u8; size];
                response[..10].copy_from_slice(&header);
                stream.read_exact(&mut response[10..])?;
                Ok(response)
            }
            Channel::Device(file) => {
                // The kernel device takes one whole command per write and returns one whole
                // response per read.
                file.write_all(command)?;
                let mut buffer = vec![0u8; RESPONSE_LEN_MAX];
                let read = file.read(&mut buffer)?;
                if read < 10 || response_size(&buffer[..10])? != read {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TPM device returned a response whose size field disagrees with its length",
                    ));
                }
                buffer.truncate(read);
                Ok(buffer)
            }
        }
    }
}

fn response_size(header: &[u8]) -> io::Result<usize> {
    let size = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if !(10..=RESPONSE_LEN_MAX).contains(&size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TPM response size {size} outside 10..={RESPONSE_LEN_MAX}"),
        ));
    }
    Ok(size)
}

/// One entry of a command's authorisation area.
#[derive(Clone, Debug)]
pub struct SessionEntry {
    /// Session handle (`RS_PW` for the password session).
    pub handle: u32,
    /// nonceCaller.
    pub nonce: Vec<u8>,
    /// TPMA_SESSION.
    pub attributes: u8,
    /// HMAC or password (empty here: every auth is empty, and an audit-only session
    /// authorises nothing, so it needs no HMAC).
    pub hmac: Vec<u8>,
}

impl SessionEntry {
    /// The empty-password session.
    pub fn password() -> SessionEntry {
        SessionEntry {
            handle: RS_PW,
            nonce: Vec::new(),
            attributes: 0,
            hmac: Vec::new(),
        }
    }
}

/// Appends a TPM2B (u16 size, then the bytes).
pub fn push_sized(bytes: &mut Vec<u8>, data: &[u8]) {
    debug_assert!(data.len() <= usize::from(u16::MAX));
    bytes.extend_from_slice(&(data.len() as u16).to_be_bytes());
    bytes.extend_from_slice(data);
}

/// A full command: header, handles, authorisation area (if any), parameters.
pub fn build(code: u32, handles: &[u32], sessions: &[SessionEntry], parameters: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + parameters.len());
    for handle in handles {
        body.extend_from_slice(&handle.to_be_bytes());
    }
    if !sessions.is_empty() {
        let mut area = Vec::new();
        for session in sessions {
            area.extend_from_slice(&session.handle.to_be_bytes());
            push_sized(&mut area, &session.nonce);
            area.push(session.attributes);
            push_sized(&mut area, &session.hmac);
        }
        body.extend_from_slice(&(area.len() as u32).to_be_bytes());
        body.extend_from_slice(&area);
    }
    body.extend_from_slice(parameters);
    let tag = if sessions.is_empty() {
        ST_NO_SESSIONS
    } else {
        ST_SESSIONS
    };
    let mut command = Vec::with_capacity(10 + body.len());
    command.extend_from_slice(&tag.to_be_bytes());
    command.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    command.extend_from_slice(&code.to_be_bytes());
    command.extend_from_slice(&body);
    command
}

/// A reader over an untrusted response, naming the command in its errors.
pub struct Reader<'a> {
    command: &'static str,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `bytes` for errors about `command`.
    pub fn new(command: &'static str, bytes: &'a [u8]) -> Reader<'a> {
        Reader { command, bytes }
    }

    fn malformed(&self, what: &'static str) -> TpmError {
        TpmError::Malformed {
            command: self.command,
            what,
        }
    }

    /// The next `length` bytes.
    pub fn take(&mut self, length: usize, what: &'static str) -> Result<&'a [u8], TpmError> {
        if self.bytes.len() < length {
            return Err(self.malformed(what));
        }
        let (head, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Ok(head)
    }

    /// A big-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, TpmError> {
        let bytes = self.take(2, what)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, TpmError> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// A TPM2B's contents.
    pub fn sized(&mut self, what: &'static str) -> Result<&'a [u8], TpmError> {
        let length = usize::from(self.u16(what)?);
        self.take(length, what)
    }

    /// The bytes not yet read.
    pub fn rest(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Splits a response into its handles and its parameter area, turning a non-zero response
/// code into [`TpmError::Command`].
pub fn parse_response<'a>(
    command: &'static str,
    response: &'a [u8],
    handle_count: usize,
) -> Result<(Vec<u32>, &'a [u8]), TpmError> {
    let mut reader = Reader::new(command, response);
    let tag = reader.u16("tag")?;
    let size = reader.u32("size")? as usize;
    if size != response.len() {
        return Err(reader.malformed("size field disagrees with the response length"));
    }
    let code = reader.u32("response code")?;
    if code != 0 {
        return Err(TpmError::Command { command, code });
    }
    let mut handles = Vec::with_capacity(handle_count);
    for _ in 0..handle_count {
        handles.push(reader.u32("handle")?);
    }
    let parameters = match tag {
        ST_NO_SESSIONS => reader.rest(),
        ST_SESSIONS => {
            let length = reader.u32("parameter size")? as usize;
            reader.take(length, "parameters")?
        }
        _ => return Err(reader.malformed("unknown tag")),
    };
    Ok((handles, parameters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_header_and_authorisation_area() {
        let command = build(0x0000_017b, &[], &[], &[0, 8]);
        assert_eq!(
            command,
            vec![0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8]
        );
        let with_session = build(0x0000_0134, &[1, 2], &[SessionEntry::password()], &[]);
        // header 10 + handles 8 + area size 4 + area 9
        assert_eq!(with_session.len(), 31);
        assert_eq!(&with_session[18..22], &9u32.to_be_bytes());
    }

    #[test]
    fn parses_responses_and_refuses_malformed_ones() {
        let ok = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0, 0, 0xab, 0xcd];
        let (handles, parameters) = parse_response("Test", &ok, 0).expect("ok");
        assert!(handles.is_empty());
        assert_eq!(parameters, &[0xab, 0xcd]);
        let refused = [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x21];
        assert_eq!(
            parse_response("Test", &refused, 0).expect_err("rc").code(),
            Some(rc::EXCLUSIVE)
        );
        let lying_size = [0x80, 0x01, 0, 0, 0, 40, 0, 0, 0, 0];
        assert!(matches!(
            parse_response("Test", &lying_size, 0),
            Err(TpmError::Malformed { .. })
        ));
        let short_parameters = [0x80, 0x02, 0, 0, 0, 14, 0, 0, 0, 0, 0, 0, 0, 9];
        assert!(matches!(
            parse_response("Test", &short_parameters, 0),
            Err(TpmError::Malformed { .. })
        ));
        for cut in 0..ok.len() {
            assert!(parse_response("Test", &ok[..cut], 0).is_err());
        }
    }

    /// Arbitrary bytes (a cheap deterministic stand-in for fuzzing) never panic the response
    /// parser.
    #[test]
    fn arbitrary_responses_never_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut parsed = 0;
        for _ in 0..20_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let length = (state >> 58) as usize;
            let mut bytes: Vec<u8> = (0..length)
                .map(|index| (state.rotate_left(index as u32 * 5) >> 7) as u8)
                .collect();
            if bytes.len() >= 10 {
                // Make the header plausible so the body parsers get exercised too.
                bytes[0] = 0x80;
                bytes[1] = if state & 1 == 0 { 0x01 } else { 0x02 };
                bytes[2..6].copy_from_slice(&(length as u32).to_be_bytes());
                bytes[6..10].copy_from_slice(&0u32.to_be_bytes());
            }
            if let Ok((_, parameters)) = parse_response("Fuzz", &bytes, (state >> 3) as usize % 2) {
                parsed += 1;
                let mut reader = Reader::new("Fuzz", parameters);
                let _ = reader.sized("field").and_then(|_| reader.u32("field"));
            }
        }
        assert!(
            parsed > 0,
            "the generator never produced a parsable response"
        );
    }

    #[test]
    fn classifies_response_codes() {
        assert!(rc::is_handle(0x18b));
        assert!(rc::is_handle(0x28b));
        assert!(!rc::is_handle(rc::EXCLUSIVE));
        assert!(rc::is_transient(rc::RETRY));
        assert!(!rc::is_transient(rc::EXCLUSIVE));
    }

    #[test]
    fn parses_targets() {
        assert_eq!(
            "swtpm:127.0.0.1:2321".parse::<TpmTarget>(),
            Ok(TpmTarget::Swtpm("127.0.0.1:2321".parse().expect("address")))
        );
        assert_eq!(
            "/dev/tpmrm0".parse::<TpmTarget>(),
            Ok(TpmTarget::Device("/dev/tpmrm0".into()))
        );
        assert!("tpmrm0".parse::<TpmTarget>().is_err());
    }
}
