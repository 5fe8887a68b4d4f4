//! The usigd wire format: small, versioned, length-bounded frames.
//!
//! A frame is a 4-byte big-endian body length followed by the body; the length is checked
//! against [`FRAME_BODY_LEN_MAX`] before anything is allocated. A body is
//! `[version u8][kind u8][payload]`, payload fields fixed-width big-endian, variable fields
//! prefixed by a u16 length with their own bound. Decoding never panics: every malformed body
//! is a [`WireError`] naming what was wrong, and trailing bytes are an error (one encoding per
//! value).
//!
//! This module owns encoding and decoding only; it does no IO beyond reading and writing one
//! frame on a stream it is handed.

use std::io::{self, Read, Write};
use tessera_types::{Digest, Ui};
use thiserror::Error;

/// Wire format version; a peer speaking another version gets [`WireError::UnsupportedVersion`].
/// Version 2: UIs carry their epoch, and [`Request::StartEpoch`] exists.
pub const VERSION: u8 = 2;

/// Largest frame body either side accepts. The largest legitimate body (a VerifyUi request with
/// a maximal certificate) is under 600 bytes.
pub const FRAME_BODY_LEN_MAX: usize = 1024;

/// Largest certificate carried in a frame.
pub const CERTIFICATE_LEN_MAX: usize = 512;

/// Largest error text carried in a frame, in bytes.
pub const TEXT_LEN_MAX: usize = 256;

const KIND_IDENTITY: u8 = 0x01;
const KIND_CREATE_UI: u8 = 0x02;
const KIND_VERIFY_UI: u8 = 0x03;
const KIND_START_EPOCH: u8 = 0x04;
const KIND_IDENTITY_REPLY: u8 = 0x81;
const KIND_UI_REPLY: u8 = 0x82;
const KIND_VERIFIED_REPLY: u8 = 0x83;
const KIND_EPOCH_STARTED_REPLY: u8 = 0x84;
const KIND_ERROR_REPLY: u8 = 0xFF;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Who the daemon speaks for and how far its counter is.
    Identity,
    /// Bind the next counter value to this message digest.
    CreateUi {
        /// Digest of the certified content.
        message: Digest,
    },
    /// Check a UI (verification needs no secret; offered so tools can ask the daemon).
    VerifyUi {
        /// Claimed creator.
        signer: u32,
        /// Digest of the certified content.
        message: Digest,
        /// The UI to check.
        ui: Ui,
    },
    /// Start the next epoch (one above the daemon's current epoch) with the counter at 0. The
    /// daemon names the epoch itself, so a client cannot ask for an old or the current one.
    StartEpoch,
}

/// Why a request failed, as sent on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The UI does not verify.
    Invalid = 1,
    /// The claimed signer is not in the cluster.
    UnknownSigner = 2,
    /// The counter cannot advance any more.
    Exhausted = 3,
    /// The daemon cannot serve (for example, persisting the counter failed).
    Unavailable = 4,
    /// The caller's uid is not the one allowed to use this daemon.
    PermissionDenied = 5,
    /// The request could not be decoded.
    BadRequest = 6,
}

impl ErrorCode {
    fn from_byte(byte: u8) -> Result<ErrorCode, WireError> {
        Ok(match byte {
            1 => ErrorCode::Invalid,
            2 => ErrorCode::UnknownSigner,
            3 => ErrorCode::Exhausted,
            4 => ErrorCode::Unavailable,
            5 => ErrorCode::PermissionDenied,
            6 => ErrorCode::BadRequest,
            other => return Err(WireError::UnknownErrorCode(other)),
        })
    }
}

/// What the daemon answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Answer to [`Request::Identity`].
    Identity {
        /// Replica the daemon speaks for.
        replica: u32,
        /// USIG instance number.
        epoch: u64,
        /// Last counter value issued (0 before the first).
        last_counter: u64,
        /// Ed25519 public key the daemon's UIs verify with.
        public_key: [u8; 32],
    },
    /// Answer to [`Request::CreateUi`]; the counter was persisted before this was sent.
    Ui(Ui),
    /// Answer to a [`Request::VerifyUi`] whose UI verifies.
    Verified,
    /// Answer to [`Request::StartEpoch`]; the new epoch was persisted before this was sent.
    EpochStarted {
        /// The epoch now in force; every later UI carries it.
        epoch: u64,
    },
    /// The request failed.
    Error {
        /// Category.
        code: ErrorCode,
        /// Human-readable detail (bounded by [`TEXT_LEN_MAX`]).
        text: String,
    },
}

/// A malformed body or frame. Every byte from a socket is untrusted; this is what they can earn.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// The frame announces a body longer than the bound.
    #[error("frame body of {length} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        length: usize,
        /// Bound.
        max: usize,
    },
    /// The body ended before a field was complete.
    #[error("body truncated: {field} needs {needed} more bytes, {available} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// The body speaks another wire version.
    #[error("wire version {0} is not supported (this build speaks version {VERSION})")]
    UnsupportedVersion(u8),
    /// The kind byte names no request or response.
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The error code names no error.
    #[error("unknown error code {0}")]
    UnknownErrorCode(u8),
    /// A length-prefixed field exceeds its bound.
    #[error("{field} of {length} bytes exceeds the {max}-byte limit")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Announced length.
        length: usize,
        /// Bound.
        max: usize,
    },
    /// Bytes left after a complete message.
    #[error("{0} trailing bytes after a complete message")]
    TrailingBytes(usize),
    /// Error text that is not UTF-8.
    #[error("error text is not UTF-8")]
    TextNotUtf8,
}

/// Reading a frame failed.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The stream failed or ended mid-frame.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream between frames.
    #[error("peer closed the connection")]
    Closed,
    /// The frame is malformed.
    #[error("{0}")]
    Wire(#[from] WireError),
}

/// Reads one frame body, refusing an announced length over [`FRAME_BODY_LEN_MAX`] before
/// allocating for it.
pub fn read_frame(stream: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut length_bytes = [0u8; 4];
    let mut filled = 0;
    while filled < length_bytes.len() {
        match stream.read(&mut length_bytes[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(FrameError::Io(error)),
        }
    }
    let length = u32::from_be_bytes(length_bytes) as usize;
    if length > FRAME_BODY_LEN_MAX {
        return Err(WireError::FrameTooLarge {
            length,
            max: FRAME_BODY_LEN_MAX,
        }
        .into());
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(body)
}

/// Writes one frame with `body` (which the encoders keep under the bound).
pub fn write_frame(stream: &mut impl Write, body: &[u8]) -> io::Result<()> {
    debug_assert!(
        body.len() <= FRAME_BODY_LEN_MAX,
        "encoder exceeded the frame bound"
    );
    let length = u32::try_from(body.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame)?;
    stream.flush()
}

/// A cursor over an untrusted body.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, needed: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < needed {
            return Err(WireError::Truncated {
                field,
                needed,
                available: self.bytes.len(),
            });
        }
        let (head, rest) = self.bytes.split_at(needed);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn bounded(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let length = usize::from(self.u16(field)?);
        if length > max {
            return Err(WireError::FieldTooLong { field, length, max });
        }
        self.take(field, length)
    }

    fn header(&mut self) -> Result<u8, WireError> {
        let version = self.u8("version")?;
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        self.u8("kind")
    }

    fn finish(self) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes(self.bytes.len()))
        }
    }
}

fn start(kind: u8) -> Vec<u8> {
    vec![VERSION, kind]
}

fn push_bounded(body: &mut Vec<u8>, bytes: &[u8], max: usize) {
    // Callers truncate or check first; the assertion guards the encoder, not the peer.
    assert!(bytes.len() <= max, "encoder given an over-long field");
    body.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    body.extend_from_slice(bytes);
}

fn push_ui(body: &mut Vec<u8>, ui: &Ui) {
    body.extend_from_slice(&ui.epoch.to_be_bytes());
    body.extend_from_slice(&ui.counter.to_be_bytes());
    push_bounded(body, &ui.certificate, CERTIFICATE_LEN_MAX);
}

fn read_ui(reader: &mut Reader) -> Result<Ui, WireError> {
    let epoch = reader.u64("epoch")?;
    let counter = reader.u64("counter")?;
    let certificate = reader.bounded("certificate", CERTIFICATE_LEN_MAX)?.to_vec();
    Ok(Ui {
        epoch,
        counter,
        certificate,
    })
}

impl Request {
    /// The frame body. A VerifyUi whose certificate exceeds [`CERTIFICATE_LEN_MAX`] cannot be
    /// sent; the caller rejects it first.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Identity => start(KIND_IDENTITY),
            Request::CreateUi { message } => {
                let mut body = start(KIND_CREATE_UI);
                body.extend_from_slice(message.as_bytes());
                body
            }
            Request::VerifyUi {
                signer,
                message,
                ui,
            } => {
                let mut body = start(KIND_VERIFY_UI);
                body.extend_from_slice(&signer.to_be_bytes());
                body.extend_from_slice(message.as_bytes());
                push_ui(&mut body, ui);
                body
            }
            Request::StartEpoch => start(KIND_START_EPOCH),
        }
    }

    /// Parses a body; see [`WireError`] for what is refused.
    pub fn decode(body: &[u8]) -> Result<Request, WireError> {
        let mut reader = Reader { bytes: body };
        let request = match reader.header()? {
            KIND_IDENTITY => Request::Identity,
            KIND_CREATE_UI => Request::CreateUi {
                message: Digest(reader.array("message")?),
            },
            KIND_VERIFY_UI => Request::VerifyUi {
                signer: reader.u32("signer")?,
                message: Digest(reader.array("message")?),
                ui: read_ui(&mut reader)?,
            },
            KIND_START_EPOCH => Request::StartEpoch,
            other => return Err(WireError::UnknownKind(other)),
        };
        reader.finish()?;
        Ok(request)
    }
}

impl Response {
    /// An error response whose text is cut to [`TEXT_LEN_MAX`] bytes at a character boundary.
    pub fn error(code: ErrorCode, text: &str) -> Response {
        let mut end = text.len().min(TEXT_LEN_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Response::Error {
            code,
            text: text[..end].to_string(),
        }
    }

    /// The frame body.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Identity {
                replica,
                epoch,
                last_counter,
                public_key,
            } => {
                let mut body = start(KIND_IDENTITY_REPLY);
                body.extend_from_slice(&replica.to_be_bytes());
                body.extend_from_slice(&epoch.to_be_bytes());
                body.extend_from_slice(&last_counter.to_be_bytes());
                body.extend_from_slice(public_key);
                body
            }
            Response::Ui(ui) => {
                let mut body = start(KIND_UI_REPLY);
                push_ui(&mut body, ui);
                body
            }
            Response::Verified => start(KIND_VERIFIED_REPLY),
            Response::EpochStarted { epoch } => {
                let mut body = start(KIND_EPOCH_STARTED_REPLY);
                body.extend_from_slice(&epoch.to_be_bytes());
                body
            }
            Response::Error { code, text } => {
                let mut body = start(KIND_ERROR_REPLY);
                body.push(*code as u8);
                push_bounded(&mut body, text.as_bytes(), TEXT_LEN_MAX);
                body
            }
        }
    }

    /// Parses a body; see [`WireError`] for what is refused.
    pub fn decode(body: &[u8]) -> Result<Response, WireError> {
        let mut reader = Reader { bytes: body };
        let response = match reader.header()? {
            KIND_IDENTITY_REPLY => Response::Identity {
                replica: reader.u32("replica")?,
                epoch: reader.u64("epoch")?,
                last_counter: reader.u64("last counter")?,
                public_key: reader.array("public key")?,
            },
            KIND_UI_REPLY => Response::Ui(read_ui(&mut reader)?),
            KIND_VERIFIED_REPLY => Response::Verified,
            KIND_EPOCH_STARTED_REPLY => Response::EpochStarted {
                epoch: reader.u64("epoch")?,
            },
            KIND_ERROR_REPLY => {
                let code = ErrorCode::from_byte(reader.u8("error code")?)?;
                let text = reader.bounded("error text", TEXT_LEN_MAX)?;
                let text = std::str::from_utf8(text)
                    .map_err(|_| WireError::TextNotUtf8)?
                    .to_string();
                Response::Error { code, text }
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        reader.finish()?;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> (Vec<Request>, Vec<Response>) {
        let ui = Ui {
            epoch: 4,
            counter: 7,
            certificate: vec![9; 64],
        };
        let requests = vec![
            Request::Identity,
            Request::CreateUi {
                message: Digest([3; 32]),
            },
            Request::VerifyUi {
                signer: 2,
                message: Digest([4; 32]),
                ui: ui.clone(),
            },
            Request::StartEpoch,
        ];
        let responses = vec![
            Response::Identity {
                replica: 1,
                epoch: 2,
                last_counter: 3,
                public_key: [5; 32],
            },
            Response::Ui(ui),
            Response::Verified,
            Response::EpochStarted { epoch: 9 },
            Response::error(ErrorCode::Exhausted, "counter exhausted"),
        ];
        (requests, responses)
    }

    #[test]
    fn round_trips() {
        let (requests, responses) = samples();
        for request in requests {
            assert_eq!(Request::decode(&request.encode()), Ok(request));
        }
        for response in responses {
            assert_eq!(Response::decode(&response.encode()), Ok(response));
        }
    }

    #[test]
    fn every_truncation_and_extension_is_a_typed_error() {
        let (requests, responses) = samples();
        let bodies: Vec<(Vec<u8>, bool)> = requests
            .iter()
            .map(|request| (request.encode(), true))
            .chain(responses.iter().map(|response| (response.encode(), false)))
            .collect();
        for (body, is_request) in bodies {
            let decode = |bytes: &[u8]| {
                if is_request {
                    Request::decode(bytes).map(|_| ())
                } else {
                    Response::decode(bytes).map(|_| ())
                }
            };
            for cut in 0..body.len() {
                assert!(
                    matches!(decode(&body[..cut]), Err(WireError::Truncated { .. })),
                    "cut at {cut} of {body:?}"
                );
            }
            let mut extended = body.clone();
            extended.push(0);
            assert_eq!(decode(&extended), Err(WireError::TrailingBytes(1)));
        }
    }

    #[test]
    fn refuses_bad_version_kind_lengths_and_text() {
        assert_eq!(
            Request::decode(&[1, KIND_IDENTITY]),
            Err(WireError::UnsupportedVersion(1))
        );
        assert_eq!(
            Request::decode(&[VERSION, 0x7f]),
            Err(WireError::UnknownKind(0x7f))
        );
        assert_eq!(
            Request::decode(&[VERSION, KIND_UI_REPLY]),
            Err(WireError::UnknownKind(KIND_UI_REPLY))
        );
        let mut long_certificate = vec![VERSION, KIND_UI_REPLY];
        long_certificate.extend_from_slice(&0u64.to_be_bytes());
        long_certificate.extend_from_slice(&1u64.to_be_bytes());
        long_certificate.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            Response::decode(&long_certificate),
            Err(WireError::FieldTooLong {
                field: "certificate",
                length: usize::from(u16::MAX),
                max: CERTIFICATE_LEN_MAX
            })
        );
        let bad_text = [VERSION, KIND_ERROR_REPLY, 1, 0, 2, 0xff, 0xfe];
        assert_eq!(Response::decode(&bad_text), Err(WireError::TextNotUtf8));
        let bad_code = [VERSION, KIND_ERROR_REPLY, 99, 0, 0];
        assert_eq!(
            Response::decode(&bad_code),
            Err(WireError::UnknownErrorCode(99))
        );
    }

    #[test]
    fn frames_over_the_bound_are_refused_before_allocation() {
        let mut stream: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut stream),
            Err(FrameError::Wire(WireError::FrameTooLarge { .. }))
        ));
        let mut empty: &[u8] = &[];
        assert!(matches!(read_frame(&mut empty), Err(FrameError::Closed)));
        let mut partial: &[u8] = &[0, 0, 0, 4, 1];
        assert!(matches!(read_frame(&mut partial), Err(FrameError::Io(_))));
        let mut written = Vec::new();
        write_frame(&mut written, &[1, 2, 3]).expect("vec write");
        let mut reading: &[u8] = &written;
        assert_eq!(read_frame(&mut reading).expect("frame"), vec![1, 2, 3]);
    }

    #[test]
    fn error_text_is_cut_at_a_character_boundary() {
        let long = "é".repeat(TEXT_LEN_MAX);
        let Response::Error { text, .. } = Response::error(ErrorCode::Unavailable, &long) else {
            unreachable!("Response::error builds an Error");
        };
        assert!(text.len() <= TEXT_LEN_MAX && text.chars().all(|c| c == 'é'));
    }

    /// Arbitrary bytes (a cheap deterministic stand-in for fuzzing) never panic the decoders.
    #[test]
    fn arbitrary_bodies_never_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut accepted = 0;
        for _ in 0..20_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let length = (state >> 56) as usize % 80;
            let mut body: Vec<u8> = (0..length)
                .map(|index| (state.rotate_left(index as u32 * 7) >> 3) as u8)
                .collect();
            if body.len() >= 2 && (state >> 8) & 3 == 0 {
                body[0] = VERSION;
            }
            accepted += usize::from(Request::decode(&body).is_ok());
            accepted += usize::from(Response::decode(&body).is_ok());
        }
        assert!(accepted < 20_000, "random bytes should mostly be refused");
    }
}
