//! RESP2 and RESP3: a resumable request decoder, a reply encoder, and a general value decoder.
//!
//! Owns the bytes on the wire and nothing else: no IO, no clock, no knowledge of commands.
//! Every byte handed to [`RequestDecoder::decode`] or [`decode_reply`] may come from an
//! attacker, so both are bounded by [`RespLimits`] (bulk length, array length, inline line
//! length, nesting depth, bytes held per connection), answer a typed [`RespError`] instead of
//! panicking, and never allocate more than the bytes they were given justify.

use thiserror::Error;

/// Longest header line (`*<n>`, `$<n>`, `:<n>`, ...) accepted: an `i64` in decimal plus its
/// type byte. A longer line without CRLF is malformed, not incomplete.
const HEADER_LINE_BYTES_MAX: usize = 24;
/// Arguments preallocated for an array before any element arrived: a header alone must not
/// make the decoder reserve memory for `array_length_max` elements.
const ARGUMENTS_PREALLOCATED_MAX: usize = 16;

/// Size limits of the decoder. Checked before anything is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RespLimits {
    /// Largest bulk string, in bytes. Default 1 MiB: one operation of a Tessera request is at
    /// most 1 MiB (`tessera_types::limits::MAX_OPERATION_BYTES`), so nothing larger could run.
    pub bulk_bytes_max: usize,
    /// Most elements in one array (arguments of one command). Default 4096: an `MSET` of the
    /// store's 1024-pair limit needs 2049.
    pub array_length_max: usize,
    /// Longest inline command line, in bytes. Default 64 KiB (Redis uses the same).
    pub inline_bytes_max: usize,
    /// Most bytes of one incomplete request held per connection (decoded arguments plus
    /// undecoded input). Default 2 MiB.
    pub buffered_bytes_max: usize,
    /// Deepest nesting of aggregates [`decode_reply`] accepts. Default 8; requests are flat.
    pub nesting_depth_max: usize,
}

impl Default for RespLimits {
    fn default() -> RespLimits {
        RespLimits {
            bulk_bytes_max: 1 << 20,
            array_length_max: 4096,
            inline_bytes_max: 64 * 1024,
            buffered_bytes_max: 2 << 20,
            nesting_depth_max: 8,
        }
    }
}

/// Why bytes are not a valid (or acceptable) RESP frame. The texts follow Redis's
/// `Protocol error: ...` replies; the connection is closed after sending one.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RespError {
    /// An array header that is not a decimal integer.
    #[error("Protocol error: invalid multibulk length")]
    InvalidArrayLength,
    /// A bulk header that is not a non-negative decimal integer.
    #[error("Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// A header line (`:`, `*`, `$`, ...) whose number is not a decimal `i64`.
    #[error("Protocol error: invalid integer")]
    InvalidInteger,
    /// An array longer than `array_length_max`.
    #[error("Protocol error: array of {length} elements exceeds the limit of {limit}")]
    ArrayTooLong { length: i64, limit: usize },
    /// A bulk string longer than `bulk_bytes_max`.
    #[error("Protocol error: bulk string of {length} bytes exceeds the limit of {limit} bytes")]
    BulkTooLong { length: i64, limit: usize },
    /// An inline command (or simple string) line longer than `inline_bytes_max`.
    #[error("Protocol error: line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    /// An incomplete request holding more than `buffered_bytes_max` bytes.
    #[error("Protocol error: incomplete request of more than {limit} bytes")]
    BufferFull { limit: usize },
    /// An element of a request array that is not a bulk string.
    #[error("Protocol error: expected '$', got '{found}'")]
    ExpectedBulk { found: String },
    /// A bulk string whose data is not followed by CRLF.
    #[error("Protocol error: bulk string not terminated by CRLF")]
    MissingCrlf,
    /// An inline command with an unterminated quote.
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    /// A reply whose type byte is not one this decoder knows.
    #[error("Protocol error: unknown type byte '{found}'")]
    UnknownType { found: String },
    /// Aggregates nested deeper than `nesting_depth_max`.
    #[error("Protocol error: aggregates nested deeper than {limit}")]
    TooDeep { limit: usize },
    /// A simple string or error holding a CR or LF.
    #[error("Protocol error: CR or LF inside a simple string")]
    LineBreakInLine,
    /// A simple string or error that is not UTF-8.
    #[error("Protocol error: simple string is not UTF-8")]
    NotUtf8,
}

/// Shows an untrusted byte in an error text without control characters.
fn shown(byte: u8) -> String {
    [byte].escape_ascii().to_string()
}

/// Where a line ends: the index of its CR in `input[start..]`'s CRLF, searched within
/// `max` bytes. `Ok(None)`: more input may complete it.
fn find_crlf(input: &[u8], start: usize, max: usize) -> Result<Option<usize>, ()> {
    let window_end = input.len().min(start.saturating_add(max).saturating_add(2));
    let window = &input[start..window_end];
    match window.windows(2).position(|pair| pair == b"\r\n") {
        Some(offset) => Ok(Some(start + offset)),
        None if window_end - start >= max.saturating_add(2) => Err(()),
        None => Ok(None),
    }
}

/// Parses a decimal `i64` the way Redis does: optional `-`, digits, nothing else.
fn parse_i64(text: &[u8]) -> Option<i64> {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// A header line starting at `start`: its number and the index after its CRLF.
fn header(
    input: &[u8],
    start: usize,
    invalid: RespError,
) -> Result<Option<(i64, usize)>, RespError> {
    let Some(end) = find_crlf(input, start, HEADER_LINE_BYTES_MAX).map_err(|()| invalid.clone())?
    else {
        return Ok(None);
    };
    let number = parse_i64(&input[start + 1..end]).ok_or(invalid)?;
    Ok(Some((number, end + 2)))
}

/// A command's arguments, as the client sent them.
pub type Arguments = Vec<Vec<u8>>;

/// Decodes requests — arrays of bulk strings, or inline command lines — from a byte stream
/// delivered in arbitrary pieces. Resumable: the bulk strings of a long array are taken out of
/// the input as they complete, so a request trickling in byte by byte costs linear time.
#[derive(Debug)]
pub struct RequestDecoder {
    limits: RespLimits,
    partial: Option<PartialArray>,
}

#[derive(Debug)]
struct PartialArray {
    remaining: usize,
    arguments: Arguments,
    bytes: usize,
}

impl RequestDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: RespLimits) -> RequestDecoder {
        RequestDecoder {
            limits,
            partial: None,
        }
    }

    /// Bytes of arguments held for a request not complete yet.
    pub fn held_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |partial| partial.bytes)
    }

    /// True while the decoder holds part of an array request (its header at least). Its bytes
    /// are out of the caller's input by then, so an empty input alone does not mean "between
    /// requests".
    pub fn is_mid_request(&self) -> bool {
        self.partial.is_some()
    }

    /// Decodes at most one request from the front of `input`. Returns how many bytes were
    /// consumed (drop them before the next call) and the request's arguments if one is
    /// complete; an empty request (`*0`, a blank line) comes back as an empty list. After an
    /// error the stream cannot be resynchronised: answer the error and close the connection.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Arguments>), RespError> {
        let result = self.decode_unbounded(input);
        if let Ok((consumed, None)) = &result {
            let held = self.held_bytes().saturating_add(input.len() - consumed);
            if held > self.limits.buffered_bytes_max {
                return Err(RespError::BufferFull {
                    limit: self.limits.buffered_bytes_max,
                });
            }
        }
        result
    }

    fn decode_unbounded(&mut self, input: &[u8]) -> Result<(usize, Option<Arguments>), RespError> {
        let mut position = 0;
        if self.partial.is_none() {
            match input.first() {
                None => return Ok((0, None)),
                Some(b'*') => {}
                Some(_) => return self.decode_inline(input),
            }
            let Some((length, next)) = header(input, 0, RespError::InvalidArrayLength)? else {
                return Ok((0, None));
            };
            if length <= 0 {
                // Redis ignores `*0` and `*-1` requests; so does the caller.
                return Ok((next, Some(Vec::new())));
            }
            if length as u64 > self.limits.array_length_max as u64 {
                return Err(RespError::ArrayTooLong {
                    length,
                    limit: self.limits.array_length_max,
                });
            }
            let remaining = length as usize;
            self.partial = Some(PartialArray {
                remaining,
                arguments: Vec::with_capacity(remaining.min(ARGUMENTS_PREALLOCATED_MAX)),
                bytes: 0,
            });
            position = next;
        }
        while let Some(partial) = self.partial.as_mut() {
            if partial.remaining == 0 {
                let done = self.partial.take().map(|partial| partial.arguments);
                return Ok((position, done));
            }
            match input.get(position) {
                None => return Ok((position, None)),
                Some(b'$') => {}
                Some(&other) => {
                    return Err(RespError::ExpectedBulk {
                        found: shown(other),
                    })
                }
            }
            let Some((length, data)) = header(input, position, RespError::InvalidBulkLength)?
            else {
                return Ok((position, None));
            };
            let length = bulk_length(length, &self.limits)?;
            // Everything up to the header is consumed; the header is read again once the
            // data has arrived (a few bytes, so trickled data costs linear time overall).
            let Some(end) = data
                .checked_add(length)
                .filter(|end| end + 2 <= input.len())
            else {
                let needed = data.saturating_add(length).saturating_add(2) - position;
                if partial.bytes.saturating_add(needed) > self.limits.buffered_bytes_max {
                    return Err(RespError::BufferFull {
                        limit: self.limits.buffered_bytes_max,
                    });
                }
                return Ok((position, None));
            };
            if &input[end..end + 2] != b"\r\n" {
                return Err(RespError::MissingCrlf);
            }
            partial.arguments.push(input[data..end].to_vec());
            partial.bytes += length;
            partial.remaining -= 1;
            position = end + 2;
        }
        Ok((position, None))
    }

    fn decode_inline(&mut self, input: &[u8]) -> Result<(usize, Option<Arguments>), RespError> {
        let limit = self.limits.inline_bytes_max;
        let window = &input[..input.len().min(limit.saturating_add(1))];
        let Some(newline) = window.iter().position(|&byte| byte == b'\n') else {
            if input.len() > limit {
                return Err(RespError::LineTooLong { limit });
            }
            return Ok((0, None));
        };
        let line = input[..newline]
            .strip_suffix(b"\r")
            .unwrap_or(&input[..newline]);
        let arguments = split_inline(line)?;
        if arguments.len() > self.limits.array_length_max {
            return Err(RespError::ArrayTooLong {
                length: arguments.len() as i64,
                limit: self.limits.array_length_max,
            });
        }
        Ok((newline + 1, Some(arguments)))
    }
}

fn bulk_length(length: i64, limits: &RespLimits) -> Result<usize, RespError> {
    if length < 0 {
        return Err(RespError::InvalidBulkLength);
    }
    if length as u64 > limits.bulk_bytes_max as u64 {
        return Err(RespError::BulkTooLong {
            length,
            limit: limits.bulk_bytes_max,
        });
    }
    Ok(length as usize)
}

/// Splits an inline command line into arguments: words separated by spaces or tabs, with
/// `"..."` (backslash escapes `\n \r \t \b \a \\ \" \xHH`) and `'...'` (only `\'`) quoting.
fn split_inline(line: &[u8]) -> Result<Arguments, RespError> {
    let mut arguments = Vec::new();
    let mut rest = line;
    loop {
        rest = trim_start(rest);
        let Some(&first) = rest.first() else {
            return Ok(arguments);
        };
        let (argument, after) = match first {
            b'"' => double_quoted(&rest[1..])?,
            b'\'' => single_quoted(&rest[1..])?,
            _ => {
                let end = rest
                    .iter()
                    .position(|byte| is_inline_space(*byte))
                    .unwrap_or(rest.len());
                (rest[..end].to_vec(), &rest[end..])
            }
        };
        // A closing quote must end the argument (`"a"b` is malformed, as in Redis).
        if after.first().is_some_and(|byte| !is_inline_space(*byte)) {
            return Err(RespError::UnbalancedQuotes);
        }
        arguments.push(argument);
        rest = after;
    }
}

fn is_inline_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c)
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|byte| !is_inline_space(*byte))
        .unwrap_or(bytes.len());
    &bytes[start..]
}

fn double_quoted(body: &[u8]) -> Result<(Vec<u8>, &[u8]), RespError> {
    let mut argument = Vec::new();
    let mut index = 0;
    while index < body.len() {
        match body[index] {
            b'"' => return Ok((argument, &body[index + 1..])),
            b'\\' if index + 1 < body.len() => {
                let escaped = body[index + 1];
                let hex = body.get(index + 2..index + 4).and_then(hex_byte);
                match (escaped, hex) {
                    (b'x', Some(byte)) => {
                        argument.push(byte);
                        index += 4;
                        continue;
                    }
                    (b'n', _) => argument.push(b'\n'),
                    (b'r', _) => argument.push(b'\r'),
                    (b't', _) => argument.push(b'\t'),
                    (b'b', _) => argument.push(0x08),
                    (b'a', _) => argument.push(0x07),
                    (other, _) => argument.push(other),
                }
                index += 2;
            }
            byte => {
                argument.push(byte);
                index += 1;
            }
        }
    }
    Err(RespError::UnbalancedQuotes)
}

fn hex_byte(digits: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(digits).ok()?;
    u8::from_str_radix(text, 16).ok()
}

fn single_quoted(body: &[u8]) -> Result<(Vec<u8>, &[u8]), RespError> {
    let mut argument = Vec::new();
    let mut index = 0;
    while index < body.len() {
        match (body[index], body.get(index + 1)) {
            (b'\'', _) => return Ok((argument, &body[index + 1..])),
            (b'\\', Some(b'\'')) => {
                argument.push(b'\'');
                index += 2;
            }
            (byte, _) => {
                argument.push(byte);
                index += 1;
            }
        }
    }
    Err(RespError::UnbalancedQuotes)
}

/// Encodes a request as clients do: an array of bulk strings.
pub fn encode_request(arguments: &[Vec<u8>], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", arguments.len()).as_bytes());
    for argument in arguments {
        out.extend_from_slice(format!("${}\r\n", argument.len()).as_bytes());
        out.extend_from_slice(argument);
        out.extend_from_slice(b"\r\n");
    }
}

/// The protocol version a connection speaks (`HELLO 2` / `HELLO 3`; RESP2 until then).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    /// RESP2: nulls are `$-1`, maps are flat arrays.
    #[default]
    Resp2,
    /// RESP3: `_` nulls and `%` maps.
    Resp3,
}

/// A reply value. Everything the gateway answers is one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+text`: a status such as `OK` or `PONG`.
    Simple(String),
    /// `-CODE text`: the text starts with the error code (`ERR`, `NOPROTO`, ...).
    Error(String),
    /// `:n`.
    Integer(i64),
    /// `$len` then the bytes.
    Bulk(Vec<u8>),
    /// A missing value: `$-1` in RESP2, `_` in RESP3.
    Null,
    /// `*n` then the elements.
    Array(Vec<Reply>),
    /// `%n` then key-value pairs in RESP3; a flat array of `2n` elements in RESP2.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    /// The `OK` status.
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    /// An error reply with the `ERR` code.
    pub fn error(text: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {text}"))
    }

    /// A bulk string from text.
    pub fn text(text: impl Into<String>) -> Reply {
        Reply::Bulk(text.into().into_bytes())
    }

    /// Appends the encoding in `protocol` to `out`.
    pub fn encode(&self, protocol: Protocol, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(text) => line(out, b'+', text),
            Reply::Error(text) => line(out, b'-', text),
            Reply::Integer(value) => out.extend_from_slice(format!(":{value}\r\n").as_bytes()),
            Reply::Bulk(bytes) => {
                out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
                out.extend_from_slice(bytes);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Null => match protocol {
                Protocol::Resp2 => out.extend_from_slice(b"$-1\r\n"),
                Protocol::Resp3 => out.extend_from_slice(b"_\r\n"),
            },
            Reply::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    item.encode(protocol, out);
                }
            }
            Reply::Map(pairs) => {
                match protocol {
                    Protocol::Resp2 => {
                        out.extend_from_slice(format!("*{}\r\n", 2 * pairs.len()).as_bytes())
                    }
                    Protocol::Resp3 => {
                        out.extend_from_slice(format!("%{}\r\n", pairs.len()).as_bytes())
                    }
                }
                for (key, value) in pairs {
                    key.encode(protocol, out);
                    value.encode(protocol, out);
                }
            }
        }
    }
}

/// A `+` or `-` line. CR and LF would end the line early and let a value smuggle a second
/// reply into the stream, so they become spaces (Redis does the same for error texts).
fn line(out: &mut Vec<u8>, kind: u8, text: &str) {
    out.push(kind);
    out.extend(text.bytes().map(|byte| match byte {
        b'\r' | b'\n' => b' ',
        byte => byte,
    }));
    out.extend_from_slice(b"\r\n");
}

/// Decodes one reply (RESP2 or RESP3: `+ - : $ * _ %`, and the RESP2 nulls `$-1`, `*-1`) from
/// the front of `input`. `Ok(None)`: incomplete, call again with more input. Used by tests,
/// tools and the fuzz target; the gateway itself only decodes requests.
pub fn decode_reply(
    input: &[u8],
    limits: &RespLimits,
) -> Result<Option<(Reply, usize)>, RespError> {
    decode_reply_at(input, 0, limits, 0)
}

fn decode_reply_at(
    input: &[u8],
    start: usize,
    limits: &RespLimits,
    depth: usize,
) -> Result<Option<(Reply, usize)>, RespError> {
    let Some(&kind) = input.get(start) else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' => {
            let Some(end) = find_crlf(input, start, limits.inline_bytes_max).map_err(|()| {
                RespError::LineTooLong {
                    limit: limits.inline_bytes_max,
                }
            })?
            else {
                return Ok(None);
            };
            let line = &input[start + 1..end];
            // The encoder cannot produce these (it replaces them), and a reader that split
            // lines at LF would see a different reply.
            if line.iter().any(|byte| matches!(byte, b'\r' | b'\n')) {
                return Err(RespError::LineBreakInLine);
            }
            let text = std::str::from_utf8(line)
                .map_err(|_| RespError::NotUtf8)?
                .to_string();
            let reply = if kind == b'+' {
                Reply::Simple(text)
            } else {
                Reply::Error(text)
            };
            Ok(Some((reply, end + 2)))
        }
        b'_' => match input.get(start + 1..start + 3) {
            None => Ok(None),
            Some(b"\r\n") => Ok(Some((Reply::Null, start + 3))),
            Some(_) => Err(RespError::MissingCrlf),
        },
        b':' => Ok(header(input, start, RespError::InvalidInteger)?
            .map(|(value, next)| (Reply::Integer(value), next))),
        b'$' => {
            let Some((length, data)) = header(input, start, RespError::InvalidBulkLength)? else {
                return Ok(None);
            };
            if length == -1 {
                return Ok(Some((Reply::Null, data)));
            }
            let length = bulk_length(length, limits)?;
            let end = data + length;
            if end + 2 > input.len() {
                return Ok(None);
            }
            if &input[end..end + 2] != b"\r\n" {
                return Err(RespError::MissingCrlf);
            }
            Ok(Some((Reply::Bulk(input[data..end].to_vec()), end + 2)))
        }
        b'*' | b'%' => {
            let Some((length, mut next)) = header(input, start, RespError::InvalidArrayLength)?
            else {
                return Ok(None);
            };
            if kind == b'*' && length == -1 {
                return Ok(Some((Reply::Null, next)));
            }
            if length < 0 {
                return Err(RespError::InvalidArrayLength);
            }
            if length as u64 > limits.array_length_max as u64 {
                return Err(RespError::ArrayTooLong {
                    length,
                    limit: limits.array_length_max,
                });
            }
            if depth >= limits.nesting_depth_max {
                return Err(RespError::TooDeep {
                    limit: limits.nesting_depth_max,
                });
            }
            let elements = if kind == b'%' {
                2 * length as usize
            } else {
                length as usize
            };
            let mut items = Vec::with_capacity(elements.min(ARGUMENTS_PREALLOCATED_MAX));
            for _ in 0..elements {
                let Some((item, after)) = decode_reply_at(input, next, limits, depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                next = after;
            }
            let reply = if kind == b'*' {
                Reply::Array(items)
            } else {
                let mut pairs = Vec::with_capacity(items.len() / 2);
                let mut items = items.into_iter();
                while let (Some(key), Some(value)) = (items.next(), items.next()) {
                    pairs.push((key, value));
                }
                Reply::Map(pairs)
            };
            Ok(Some((reply, next)))
        }
        other => Err(RespError::UnknownType {
            found: shown(other),
        }),
    }
}

#[cfg(test)]
mod tests;
