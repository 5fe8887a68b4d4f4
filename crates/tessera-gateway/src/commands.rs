//! Redis commands: what each one means for Tessera.
//!
//! [`plan`] turns one request's arguments into a [`Step`]: a reply the gateway gives by itself
//! (connection commands such as `HELLO`, `PING`, `CLIENT`, and every error it can detect
//! without the cluster), or a key-value [`Command`] to order through the replicas with the
//! [`Shape`] that turns its agreed [`Response`] into a Redis reply. Every command that reads or
//! writes keys is replicated — reads included, so they are linearizable. Pure: no IO, no clock.
//!
//! Expiry: relative times (`EX`, `PX`, `EXPIRE`, ...) travel as they are, in milliseconds, and
//! the store makes them absolute at the agreed time of the batch that executes them; a gateway
//! that did it with its own clock would make the expiry depend on which gateway sent it.

use crate::resp::{Protocol, Reply};
use tessera_kv::{Command, ExpireCondition, Expiry, KvError, KvLimits, Response, SetCondition};

/// What the gateway knows of the cluster, for `INFO`.
#[derive(Clone, Debug)]
pub struct ClusterInfo {
    /// Number of replicas.
    pub replicas: u32,
    /// Byzantine replicas tolerated; a reply needs f+1 matching replica replies.
    pub f: u32,
    /// The agreement protocol, e.g. `minbft`.
    pub protocol: String,
}

/// What changes while the gateway runs, read when a request is planned (for `INFO`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    /// The view the gateway's client believes current.
    pub view: u64,
    /// Connections open now.
    pub connections: u64,
    /// Signed requests (envelopes) sent so far.
    pub envelopes: u64,
    /// Replicated commands those envelopes carried.
    pub commands: u64,
}

/// Per-connection state the commands change.
#[derive(Clone, Debug)]
pub struct ConnectionState {
    /// Connection id (`CLIENT ID`), unique per gateway process.
    pub id: u64,
    /// The peer's address, for `CLIENT INFO`.
    pub peer: String,
    /// Reply protocol (`HELLO`).
    pub protocol: Protocol,
    /// `CLIENT SETNAME`.
    pub name: Option<String>,
}

impl ConnectionState {
    /// A fresh connection speaking RESP2.
    pub fn new(id: u64, peer: String) -> ConnectionState {
        ConnectionState {
            id,
            peer,
            protocol: Protocol::Resp2,
            name: None,
        }
    }
}

/// What to do with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Answer this without the cluster.
    Reply(Reply),
    /// Order and execute `command`, then answer with its response shaped by `shape`.
    Replicated { command: Command, shape: Shape },
    /// Answer this, then close the connection (`QUIT`).
    Close(Reply),
}

/// How an agreed [`Response`] becomes a Redis reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The natural mapping: `Ok` → `+OK`, values → bulk strings or nulls, counts → integers.
    Direct,
    /// `TTL`: the store's milliseconds rounded to seconds as Redis does (-1 and -2 unchanged).
    TtlSeconds,
    /// `EXPIRETIME`: the store's milliseconds truncated to seconds (-1 and -2 unchanged).
    Seconds,
    /// `FLUSHDB`: the deleted count becomes `+OK`.
    Ok,
}

/// Every command name [`plan`] knows, for `COMMAND COUNT`/`COMMAND LIST`.
pub const COMMAND_NAMES: &[&str] = &[
    "append",
    "client",
    "command",
    "config",
    "dbsize",
    "decr",
    "decrby",
    "del",
    "echo",
    "exists",
    "expire",
    "expireat",
    "expiretime",
    "flushall",
    "flushdb",
    "get",
    "getdel",
    "getex",
    "getset",
    "hello",
    "incr",
    "incrby",
    "info",
    "mget",
    "mset",
    "persist",
    "pexpire",
    "pexpireat",
    "pexpiretime",
    "ping",
    "psetex",
    "pttl",
    "quit",
    "select",
    "set",
    "setex",
    "strlen",
    "ttl",
    "unlink",
];

/// Decides what one request means. Changes `state` for connection commands.
pub fn plan(
    arguments: &[Vec<u8>],
    state: &mut ConnectionState,
    info: &ClusterInfo,
    live: &Live,
) -> Step {
    let Some(first) = arguments.first() else {
        return Step::Reply(Reply::error("empty command"));
    };
    let name = String::from_utf8_lossy(first).to_ascii_lowercase();
    let arguments = &arguments[1..];
    match plan_known(&name, arguments, state, info, live) {
        Some(Ok(step)) => step,
        Some(Err(reply)) => Step::Reply(reply),
        None => Step::Reply(unknown_command(first, arguments)),
    }
}

type Planned = Result<Step, Reply>;

fn plan_known(
    name: &str,
    arguments: &[Vec<u8>],
    state: &mut ConnectionState,
    info: &ClusterInfo,
    live: &Live,
) -> Option<Planned> {
    let replicated = |command| {
        Ok(Step::Replicated {
            command,
            shape: Shape::Direct,
        })
    };
    let planned = match name {
        // Connection commands, answered by the gateway.
        "ping" => match arguments {
            [] => Ok(Step::Reply(Reply::Simple("PONG".into()))),
            [message] => Ok(Step::Reply(Reply::Bulk(message.clone()))),
            _ => Err(wrong_arity(name)),
        },
        "echo" => {
            exactly(name, arguments, 1).map(|()| Step::Reply(Reply::Bulk(arguments[0].clone())))
        }
        "quit" => Ok(Step::Close(Reply::ok())),
        "select" => exactly(name, arguments, 1).and_then(|()| select(&arguments[0])),
        "hello" => hello(arguments, state),
        "command" => command(arguments).map(Step::Reply),
        "client" => client(arguments, state),
        "config" => config(arguments),
        "info" => Ok(Step::Reply(Reply::Bulk(
            info_text(info, live, state).into_bytes(),
        ))),
        // Key-value commands, ordered through the replicas.
        "get" => exactly(name, arguments, 1).and_then(|()| {
            replicated(Command::Get {
                key: arguments[0].clone(),
            })
        }),
        "set" => set(arguments),
        "getset" => exactly(name, arguments, 2).and_then(|()| {
            replicated(Command::SetIf {
                key: arguments[0].clone(),
                value: arguments[1].clone(),
                condition: SetCondition::Always,
                get: true,
            })
        }),
        "getdel" => exactly(name, arguments, 1).and_then(|()| {
            replicated(Command::GetDel {
                key: arguments[0].clone(),
            })
        }),
        "del" | "unlink" => at_least(name, arguments, 1).and_then(|()| {
            replicated(Command::Del {
                keys: arguments.to_vec(),
            })
        }),
        "exists" => at_least(name, arguments, 1).and_then(|()| {
            replicated(Command::Exists {
                keys: arguments.to_vec(),
            })
        }),
        "incr" | "decr" => exactly(name, arguments, 1).and_then(|()| {
            replicated(Command::Incr {
                key: arguments[0].clone(),
                delta: if name == "incr" { 1 } else { -1 },
            })
        }),
        "incrby" | "decrby" => exactly(name, arguments, 2).and_then(|()| {
            let delta = integer_argument(&arguments[1])?;
            let delta = if name == "incrby" {
                delta
            } else {
                delta
                    .checked_neg()
                    .ok_or_else(|| Reply::error("decrement would overflow"))?
            };
            replicated(Command::Incr {
                key: arguments[0].clone(),
                delta,
            })
        }),
        "mget" => at_least(name, arguments, 1).and_then(|()| {
            replicated(Command::MGet {
                keys: arguments.to_vec(),
            })
        }),
        "mset" => {
            if arguments.is_empty() || !arguments.len().is_multiple_of(2) {
                Err(wrong_arity(name))
            } else {
                let pairs = arguments
                    .chunks_exact(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect();
                replicated(Command::MSet { pairs })
            }
        }
        "append" => exactly(name, arguments, 2).and_then(|()| {
            replicated(Command::Append {
                key: arguments[0].clone(),
                value: arguments[1].clone(),
            })
        }),
        "strlen" => exactly(name, arguments, 1).and_then(|()| {
            replicated(Command::Strlen {
                key: arguments[0].clone(),
            })
        }),
        "ttl" | "pttl" => exactly(name, arguments, 1).map(|()| Step::Replicated {
            command: Command::Ttl {
                key: arguments[0].clone(),
            },
            shape: if name == "ttl" {
                Shape::TtlSeconds
            } else {
                Shape::Direct
            },
        }),
        "expiretime" | "pexpiretime" => exactly(name, arguments, 1).map(|()| Step::Replicated {
            command: Command::ExpireTime {
                key: arguments[0].clone(),
            },
            shape: if name == "expiretime" {
                Shape::Seconds
            } else {
                Shape::Direct
            },
        }),
        "persist" => exactly(name, arguments, 1).and_then(|()| {
            replicated(Command::Persist {
                key: arguments[0].clone(),
            })
        }),
        "expire" | "pexpire" | "expireat" | "pexpireat" => expire(name, arguments),
        "setex" | "psetex" => exactly(name, arguments, 3).and_then(|()| {
            let unit_ms = if name == "setex" { 1000 } else { 1 };
            let ms = positive_expiry_ms(name, &arguments[1], unit_ms)?;
            replicated(Command::SetWithExpiry {
                key: arguments[0].clone(),
                value: arguments[2].clone(),
                condition: SetCondition::Always,
                get: false,
                expiry: Expiry::InMs(ms),
            })
        }),
        "getex" => getex(arguments),
        "dbsize" => exactly(name, arguments, 0).and_then(|()| replicated(Command::DbSize)),
        "flushdb" | "flushall" => match arguments {
            [] => Ok(()),
            [mode] if is_one_of(mode, &["async", "sync"]) => Ok(()),
            [_] => Err(Reply::error("syntax error")),
            _ => Err(wrong_arity(name)),
        }
        .map(|()| Step::Replicated {
            command: Command::FlushDb,
            shape: Shape::Ok,
        }),
        _ => return None,
    };
    Some(planned)
}

fn exactly(name: &str, arguments: &[Vec<u8>], count: usize) -> Result<(), Reply> {
    if arguments.len() == count {
        Ok(())
    } else {
        Err(wrong_arity(name))
    }
}

fn at_least(name: &str, arguments: &[Vec<u8>], count: usize) -> Result<(), Reply> {
    if arguments.len() >= count {
        Ok(())
    } else {
        Err(wrong_arity(name))
    }
}

fn wrong_arity(name: &str) -> Reply {
    Reply::error(format!("wrong number of arguments for '{name}' command"))
}

fn is_one_of(argument: &[u8], options: &[&str]) -> bool {
    options
        .iter()
        .any(|option| argument.eq_ignore_ascii_case(option.as_bytes()))
}

fn integer_argument(argument: &[u8]) -> Result<i64, Reply> {
    let text = std::str::from_utf8(argument).ok();
    // Redis accepts exactly the canonical decimal text (no `+`, no spaces, no leading zeros
    // except "0" itself); i64 parsing plus a round trip gives the same set.
    text.and_then(|text| {
        text.parse::<i64>()
            .ok()
            .filter(|value| value.to_string() == text)
    })
    .ok_or_else(|| Reply::error("value is not an integer or out of range"))
}

/// `ERR unknown command 'X', with args beginning with: 'a' 'b' ` as Redis words it.
fn unknown_command(name: &[u8], arguments: &[Vec<u8>]) -> Reply {
    const SHOWN_BYTES_MAX: usize = 128;
    let clip = |bytes: &[u8]| {
        String::from_utf8_lossy(&bytes[..bytes.len().min(SHOWN_BYTES_MAX)]).into_owned()
    };
    let mut shown = String::new();
    for argument in arguments {
        if shown.len() >= SHOWN_BYTES_MAX {
            break;
        }
        shown.push_str(&format!("'{}' ", clip(argument)));
    }
    Reply::error(format!(
        "unknown command '{}', with args beginning with: {shown}",
        clip(name)
    ))
}

fn select(index: &[u8]) -> Planned {
    match integer_argument(index)? {
        0 => Ok(Step::Reply(Reply::ok())),
        _ => Err(Reply::error(
            "DB index is out of range (Tessera serves one database, 0)",
        )),
    }
}

fn hello(arguments: &[Vec<u8>], state: &mut ConnectionState) -> Planned {
    let mut protocol = state.protocol;
    let mut name = None;
    if let Some((version, mut options)) = arguments.split_first() {
        protocol = match integer_argument(version) {
            Ok(2) => Protocol::Resp2,
            Ok(3) => Protocol::Resp3,
            Ok(_) => return Err(Reply::Error("NOPROTO unsupported protocol version".into())),
            Err(_) => {
                return Err(Reply::error(
                    "Protocol version is not an integer or out of range",
                ))
            }
        };
        while let Some((option, rest)) = options.split_first() {
            match rest {
                [value, rest @ ..] if is_one_of(option, &["setname"]) => {
                    name = Some(client_name(value)?);
                    options = rest;
                }
                [_, _, ..] if is_one_of(option, &["auth"]) => {
                    return Err(Reply::error(
                        "the Tessera gateway has no users or passwords; connect without AUTH",
                    ))
                }
                _ => {
                    return Err(Reply::error(format!(
                        "syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(option)
                    )))
                }
            }
        }
    }
    // Nothing changes unless the whole command is valid.
    state.protocol = protocol;
    if name.is_some() {
        state.name = name;
    }
    Ok(Step::Reply(Reply::Map(vec![
        (Reply::text("server"), Reply::text("tessera")),
        (
            Reply::text("version"),
            Reply::text(env!("CARGO_PKG_VERSION")),
        ),
        (
            Reply::text("proto"),
            Reply::Integer(if protocol == Protocol::Resp3 { 3 } else { 2 }),
        ),
        (Reply::text("id"), Reply::Integer(state.id as i64)),
        (Reply::text("mode"), Reply::text("standalone")),
        (Reply::text("role"), Reply::text("master")),
        (Reply::text("modules"), Reply::Array(Vec::new())),
    ])))
}

fn client_name(name: &[u8]) -> Result<String, Reply> {
    if name.iter().any(|byte| !(b'!'..=b'~').contains(byte)) {
        return Err(Reply::error(
            "Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// `COMMAND` and its subcommands. Clients use it for hints and help only, so minimal valid
/// answers are enough: no command documents, and the list of names.
fn command(arguments: &[Vec<u8>]) -> Result<Reply, Reply> {
    let Some((subcommand, rest)) = arguments.split_first() else {
        return Ok(Reply::Array(Vec::new()));
    };
    let subcommand = String::from_utf8_lossy(subcommand).to_ascii_lowercase();
    match subcommand.as_str() {
        "docs" => Ok(Reply::Map(Vec::new())),
        "count" => Ok(Reply::Integer(COMMAND_NAMES.len() as i64)),
        "list" => Ok(Reply::Array(
            COMMAND_NAMES
                .iter()
                .map(|name| Reply::text(*name))
                .collect(),
        )),
        "info" => Ok(Reply::Array(rest.iter().map(|_| Reply::Null).collect())),
        _ => Err(Reply::error(format!(
            "unknown subcommand '{subcommand}'. Try COMMAND HELP."
        ))),
    }
}

fn client(arguments: &[Vec<u8>], state: &mut ConnectionState) -> Planned {
    let Some((subcommand, rest)) = arguments.split_first() else {
        return Err(wrong_arity("client"));
    };
    let subcommand = String::from_utf8_lossy(subcommand).to_ascii_lowercase();
    let reply = match (subcommand.as_str(), rest) {
        ("setname", [name]) => {
            let name = client_name(name)?;
            state.name = (!name.is_empty()).then_some(name);
            Reply::ok()
        }
        ("getname", []) => state
            .name
            .as_ref()
            .map_or(Reply::Null, |name| Reply::text(name.clone())),
        ("id", []) => Reply::Integer(state.id as i64),
        ("info", []) | ("list", []) => Reply::text(client_info(state)),
        // Client libraries announce themselves; there is nothing to record.
        ("setinfo", [_, _]) => Reply::ok(),
        ("setname" | "getname" | "id" | "info" | "setinfo", _) => {
            return Err(Reply::error(format!(
                "wrong number of arguments for 'client|{subcommand}' command"
            )))
        }
        _ => {
            return Err(Reply::error(format!(
                "unknown subcommand '{subcommand}'. Try CLIENT HELP."
            )))
        }
    };
    Ok(Step::Reply(reply))
}

fn client_info(state: &ConnectionState) -> String {
    format!(
        "id={} addr={} name={} db=0 resp={}\n",
        state.id,
        state.peer,
        state.name.as_deref().unwrap_or(""),
        if state.protocol == Protocol::Resp3 {
            3
        } else {
            2
        }
    )
}

/// `CONFIG GET`: the few parameters clients ask for (redis-benchmark reads `save` and
/// `appendonly`); unknown ones are left out, as Redis does.
fn config(arguments: &[Vec<u8>]) -> Planned {
    match arguments.split_first() {
        Some((subcommand, parameters)) if is_one_of(subcommand, &["get"]) && !parameters.is_empty() => {
            let known = [("save", ""), ("appendonly", "no"), ("databases", "1")];
            let pairs = known
                .iter()
                .filter(|(name, _)| parameters.iter().any(|parameter| is_one_of(parameter, &[name])))
                .map(|(name, value)| (Reply::text(*name), Reply::text(*value)))
                .collect();
            Ok(Step::Reply(Reply::Map(pairs)))
        }
        _ => Err(Reply::error(
            "only CONFIG GET is supported by the Tessera gateway; configure the cluster in cluster.toml",
        )),
    }
}

fn info_text(info: &ClusterInfo, live: &Live, state: &ConnectionState) -> String {
    let view = live.view;
    let lines = [
        "# Server".to_string(),
        "redis_version:7.0.0".to_string(),
        "redis_mode:standalone".to_string(),
        format!("tessera_version:{}", env!("CARGO_PKG_VERSION")),
        String::new(),
        "# Tessera".to_string(),
        format!("replicas:{}", info.replicas),
        format!("f:{}", info.f),
        format!("reply_quorum:{}", info.f + 1),
        format!("view:{view}"),
        format!("primary:{}", view % u64::from(info.replicas.max(1))),
        format!("protocol:{}", info.protocol),
        "expiry:agreed-time".to_string(),
        String::new(),
        "# Gateway".to_string(),
        format!("connected_clients:{}", live.connections),
        format!("gateway_envelopes:{}", live.envelopes),
        format!("gateway_commands_replicated:{}", live.commands),
        format!("connection_id:{}", state.id),
    ];
    let mut text = lines.join("\r\n");
    text.push_str("\r\n");
    text
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
fn set(arguments: &[Vec<u8>]) -> Planned {
    let [key, value, options @ ..] = arguments else {
        return Err(wrong_arity("set"));
    };
    let mut condition = SetCondition::Always;
    let mut get = false;
    // A plain SET removes any expiry (Redis semantics); KEEPTTL or a time say otherwise.
    let mut expiry: Option<Expiry> = None;
    let mut rest = options;
    while let Some((option, after)) = rest.split_first() {
        let option = String::from_utf8_lossy(option).to_ascii_lowercase();
        rest = after;
        match option.as_str() {
            "nx" | "xx" if condition != SetCondition::Always => {
                return Err(Reply::error("syntax error"))
            }
            "nx" => condition = SetCondition::IfAbsent,
            "xx" => condition = SetCondition::IfPresent,
            "get" => get = true,
            "keepttl" | "ex" | "px" | "exat" | "pxat" if expiry.is_some() => {
                return Err(Reply::error("syntax error"))
            }
            "keepttl" => expiry = Some(Expiry::Keep),
            "ex" | "px" | "exat" | "pxat" => {
                let Some((time, after)) = rest.split_first() else {
                    return Err(Reply::error("syntax error"));
                };
                rest = after;
                expiry = Some(timed_expiry("set", &option, time)?);
            }
            _ => return Err(Reply::error("syntax error")),
        }
    }
    if let Some(expiry) = expiry {
        return Ok(Step::Replicated {
            command: Command::SetWithExpiry {
                key: key.clone(),
                value: value.clone(),
                condition,
                get,
                expiry,
            },
            shape: Shape::Direct,
        });
    }
    let command = if condition == SetCondition::Always && !get {
        Command::Set {
            key: key.clone(),
            value: value.clone(),
        }
    } else {
        Command::SetIf {
            key: key.clone(),
            value: value.clone(),
            condition,
            get,
        }
    };
    Ok(Step::Replicated {
        command,
        shape: Shape::Direct,
    })
}

/// The expiry an `EX`/`PX`/`EXAT`/`PXAT` option with argument `time` gives, for `SET` and
/// `GETEX`: like Redis, the time must be a positive integer, and in milliseconds fit 64 bits.
fn timed_expiry(command: &str, option: &str, time: &[u8]) -> Result<Expiry, Reply> {
    let unit_ms = if matches!(option, "ex" | "exat") {
        1000
    } else {
        1
    };
    let ms = positive_expiry_ms(command, time, unit_ms)?;
    Ok(if matches!(option, "ex" | "px") {
        Expiry::InMs(ms)
    } else {
        Expiry::AtMs(ms)
    })
}

/// A positive integer time argument in `unit_ms`, in milliseconds.
fn positive_expiry_ms(command: &str, time: &[u8], unit_ms: i64) -> Result<i64, Reply> {
    let time = integer_argument(time)?;
    if time <= 0 {
        return Err(invalid_expire_time(command));
    }
    time.checked_mul(unit_ms)
        .ok_or_else(|| invalid_expire_time(command))
}

fn invalid_expire_time(command: &str) -> Reply {
    Reply::error(format!("invalid expire time in '{command}' command"))
}

/// `EXPIRE`/`PEXPIRE key time` and `EXPIREAT`/`PEXPIREAT key timestamp`, with `NX`, `XX`,
/// `GT`, `LT` (Redis 7). A time of 0 or less, or a timestamp already past, deletes the key.
fn expire(name: &str, arguments: &[Vec<u8>]) -> Planned {
    let [key, time, options @ ..] = arguments else {
        return Err(wrong_arity(name));
    };
    let time = integer_argument(time)?;
    let unit_ms = if matches!(name, "expire" | "expireat") {
        1000
    } else {
        1
    };
    let ms = time
        .checked_mul(unit_ms)
        .ok_or_else(|| invalid_expire_time(name))?;
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for option in options {
        match String::from_utf8_lossy(option)
            .to_ascii_lowercase()
            .as_str()
        {
            "nx" => nx = true,
            "xx" => xx = true,
            "gt" => gt = true,
            "lt" => lt = true,
            _ => {
                return Err(Reply::error(format!(
                    "Unsupported option {}",
                    String::from_utf8_lossy(option)
                )))
            }
        }
    }
    if nx && (xx || gt || lt) {
        return Err(Reply::error(
            "NX and XX, GT or LT options at the same time are not compatible",
        ));
    }
    if gt && lt {
        return Err(Reply::error(
            "GT and LT options at the same time are not compatible",
        ));
    }
    // XX with GT or LT: GT/LT already need an expiry (GT) or accept any key (LT); Redis
    // applies both, so XX+LT means "has one, and the new one is earlier".
    let condition = match (nx, xx, gt, lt) {
        (true, ..) => ExpireCondition::IfNone,
        (_, _, true, _) => ExpireCondition::IfLater,
        (_, true, _, true) => ExpireCondition::IfEarlierWithExpiry,
        (_, _, _, true) => ExpireCondition::IfEarlier,
        (_, true, ..) => ExpireCondition::IfSome,
        _ => ExpireCondition::Always,
    };
    let expiry = if matches!(name, "expire" | "pexpire") {
        Expiry::InMs(ms)
    } else {
        Expiry::AtMs(ms)
    };
    Ok(Step::Replicated {
        command: Command::Expire {
            key: key.clone(),
            expiry,
            condition,
        },
        shape: Shape::Direct,
    })
}

/// `GETEX key [EX s|PX ms|EXAT s|PXAT ms|PERSIST]`.
fn getex(arguments: &[Vec<u8>]) -> Planned {
    let [key, options @ ..] = arguments else {
        return Err(wrong_arity("getex"));
    };
    let expiry = match options {
        [] => Expiry::Keep,
        [option] if option.eq_ignore_ascii_case(b"persist") => Expiry::Persist,
        [option, time] => {
            let option = String::from_utf8_lossy(option).to_ascii_lowercase();
            if !matches!(option.as_str(), "ex" | "px" | "exat" | "pxat") {
                return Err(Reply::error("syntax error"));
            }
            timed_expiry("getex", &option, time)?
        }
        _ => return Err(Reply::error("syntax error")),
    };
    Ok(Step::Replicated {
        command: Command::GetEx {
            key: key.clone(),
            expiry,
        },
        shape: Shape::Direct,
    })
}

/// Largest encoded response other than a value: `Ok`, counts, integers, and errors (whose
/// texts are a few hundred bytes at most).
const SMALL_RESPONSE_BYTES_MAX: usize = 512;
/// Bytes a `Value` or `Values` response adds around one value (tags and a varint length).
const VALUE_FRAMING_BYTES: usize = 8;

/// The most bytes the encoded response to `command` can take. Replicas build their store with
/// [`KvLimits::default`]'s value bound (tessera-node), so a value is at most that long; the
/// store caps an `MGet` result at the reply limit.
pub fn response_bytes_max(command: &Command) -> usize {
    let value_bytes_max = KvLimits::default().value_bytes_max + VALUE_FRAMING_BYTES;
    let values = match command {
        Command::Get { .. }
        | Command::GetDel { .. }
        | Command::GetEx { .. }
        | Command::SetIf { get: true, .. }
        | Command::SetWithExpiry { get: true, .. } => value_bytes_max,
        Command::MGet { keys } => keys
            .len()
            .saturating_mul(value_bytes_max)
            .min(tessera_types::limits::MAX_RESULT_BYTES),
        _ => 0,
    };
    values.saturating_add(SMALL_RESPONSE_BYTES_MAX)
}

/// The Redis reply for an agreed response.
pub fn shape_reply(shape: Shape, response: Response) -> Reply {
    match (shape, response) {
        (_, Response::Error(error)) => kv_error(&error),
        // Redis rounds a remaining time to the nearest second; -1 and -2 are not times.
        (Shape::TtlSeconds, Response::Integer(ms)) if ms >= 0 => {
            Reply::Integer(ms.saturating_add(500) / 1000)
        }
        (Shape::Seconds, Response::Integer(ms)) if ms >= 0 => Reply::Integer(ms / 1000),
        (Shape::Ok, Response::Count(_)) | (_, Response::Ok) => Reply::ok(),
        (_, Response::Value(value)) => value.map_or(Reply::Null, Reply::Bulk),
        (_, Response::Count(count)) => Reply::Integer(i64::try_from(count).unwrap_or(i64::MAX)),
        (_, Response::Integer(value)) => Reply::Integer(value),
        (_, Response::Values(values)) => Reply::Array(
            values
                .into_iter()
                .map(|value| value.map_or(Reply::Null, Reply::Bulk))
                .collect(),
        ),
        (_, other @ Response::CompareAndSet { .. }) => {
            Reply::error(format!("unexpected response from the cluster: {other:?}"))
        }
    }
}

fn kv_error(error: &KvError) -> Reply {
    match error {
        KvError::NotAnInteger => Reply::error("value is not an integer or out of range"),
        KvError::Overflow => Reply::error("increment or decrement would overflow"),
        KvError::InvalidExpireTime => Reply::error("invalid expire time"),
        other => Reply::error(other),
    }
}

#[cfg(test)]
mod tests;
