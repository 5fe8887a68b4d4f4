//! [`KvClient`]: typed calls to Tessera's key-value service over one [`Session`].

use crate::client::Session;
use crate::error::ClientError;
use tessera_kv::{Command, Response};

/// Outcome of [`KvClient::compare_and_set`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CasOutcome {
    /// True if the value was replaced.
    pub swapped: bool,
    /// The value of the key after the command (`None`: absent).
    pub current: Option<Vec<u8>>,
}

/// A key-value client: each call is one replicated command.
pub struct KvClient {
    session: Session,
}

impl KvClient {
    /// Wraps a session.
    pub fn new(session: Session) -> KvClient {
        KvClient { session }
    }

    /// The underlying session.
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Runs one command and returns its response; a [`Response::Error`] becomes
    /// [`ClientError::Kv`].
    pub async fn execute(&mut self, command: &Command) -> Result<Response, ClientError> {
        let result = self.session.invoke(command.encode()).await?;
        match Response::decode(&result) {
            Ok(Response::Error(error)) => Err(ClientError::Kv(error)),
            Ok(response) => Ok(response),
            Err(error) => Err(ClientError::UnexpectedResult {
                command: command_name(command),
                detail: error.to_string(),
            }),
        }
    }

    /// The value of `key`, or `None` if it is absent.
    pub async fn get(&mut self, key: impl Into<Vec<u8>>) -> Result<Option<Vec<u8>>, ClientError> {
        let command = Command::Get { key: key.into() };
        match self.execute(&command).await? {
            Response::Value(value) => Ok(value),
            other => Err(unexpected(&command, &other)),
        }
    }

    /// Sets `key` to `value`.
    pub async fn set(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<(), ClientError> {
        let command = Command::Set {
            key: key.into(),
            value: value.into(),
        };
        match self.execute(&command).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&command, &other)),
        }
    }

    /// Deletes `keys`; returns how many existed.
    pub async fn del(&mut self, keys: Vec<Vec<u8>>) -> Result<u64, ClientError> {
        let command = Command::Del { keys };
        match self.execute(&command).await? {
            Response::Count(count) => Ok(count),
            other => Err(unexpected(&command, &other)),
        }
    }

    /// How many of `keys` exist (a repeated key counts each time).
    pub async fn exists(&mut self, keys: Vec<Vec<u8>>) -> Result<u64, ClientError> {
        let command = Command::Exists { keys };
        match self.execute(&command).await? {
            Response::Count(count) => Ok(count),
            other => Err(unexpected(&command, &other)),
        }
    }

    /// Adds `delta` to the integer at `key` (absent: 0); returns the new value.
    pub async fn incr(&mut self, key: impl Into<Vec<u8>>, delta: i64) -> Result<i64, ClientError> {
        let command = Command::Incr {
            key: key.into(),
            delta,
        };
        match self.execute(&command).await? {
            Response::Integer(value) => Ok(value),
            other => Err(unexpected(&command, &other)),
        }
    }

    /// The values of `keys`, in order (`None`: absent).
    pub async fn mget(&mut self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let expected = keys.len();
        let command = Command::MGet { keys };
        match self.execute(&command).await? {
            Response::Values(values) if values.len() == expected => Ok(values),
            other => Err(unexpected(&command, &other)),
        }
    }

    /// Sets every pair, atomically.
    pub async fn mset(&mut self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), ClientError> {
        let command = Command::MSet { pairs };
        match self.execute(&command).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&command, &other)),
        }
    }

    /// Replaces `key`'s value by `new` (`None`: delete) if it equals `expected`
    /// (`None`: the key must be absent).
    pub async fn compare_and_set(
        &mut self,
        key: impl Into<Vec<u8>>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<CasOutcome, ClientError> {
        let command = Command::CompareAndSet {
            key: key.into(),
            expected,
            new,
        };
        match self.execute(&command).await? {
            Response::CompareAndSet { swapped, current } => Ok(CasOutcome { swapped, current }),
            other => Err(unexpected(&command, &other)),
        }
    }
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Get { .. } => "GET",
        Command::Set { .. } => "SET",
        Command::Del { .. } => "DEL",
        Command::Exists { .. } => "EXISTS",
        Command::Incr { .. } => "INCR",
        Command::MGet { .. } => "MGET",
        Command::MSet { .. } => "MSET",
        Command::CompareAndSet { .. } => "CAS",
        Command::SetIf { .. } => "SET",
        Command::Append { .. } => "APPEND",
        Command::Strlen { .. } => "STRLEN",
        Command::GetDel { .. } => "GETDEL",
        Command::DbSize => "DBSIZE",
        Command::FlushDb => "FLUSHDB",
        Command::SetWithExpiry { .. } => "SET",
        Command::Expire { .. } => "PEXPIRE",
        Command::Ttl { .. } => "PTTL",
        Command::Persist { .. } => "PERSIST",
        Command::GetEx { .. } => "GETEX",
        Command::ExpireTime { .. } => "PEXPIRETIME",
    }
}

fn unexpected(command: &Command, response: &Response) -> ClientError {
    let mut detail = format!("{response:?}");
    detail.truncate(200);
    ClientError::UnexpectedResult {
        command: command_name(command),
        detail,
    }
}
