//! Client tunables. Every one has a default, a unit in its name and a bound checked by
//! [`ClientOptions::validate`] when the client starts.

use crate::error::ClientError;
use std::time::Duration;

/// How a [`crate::Client`] talks to the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// First wait for replies before the request is sent again, to every replica. Doubles on
    /// each retransmission up to `retransmit_timeout_max`.
    pub retransmit_timeout: Duration,
    /// Cap on the doubling retransmission timeout.
    pub retransmit_timeout_max: Duration,
    /// Total time a request may take before it fails with [`ClientError::Timeout`].
    pub request_timeout: Duration,
    /// How long [`crate::Client::connect`] waits for enough replicas to accept a connection.
    pub connect_timeout: Duration,
    /// Talk to replica 0 only and accept its single reply (`tessera unreplicated`, the baseline).
    pub unreplicated: bool,
    /// Requests waiting for replies across all sessions of one client.
    pub pending_requests_max: usize,
    /// Frames queued per replica connection; when full, frames are dropped (retransmission
    /// recovers them) rather than blocking a session on a slow or dead replica.
    pub send_queue_frames_max: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retransmit_timeout: Duration::from_millis(500),
            retransmit_timeout_max: Duration::from_secs(4),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            unreplicated: false,
            pending_requests_max: 65_536,
            send_queue_frames_max: 16_384,
        }
    }
}

const TIMEOUT_MIN: Duration = Duration::from_millis(1);
const TIMEOUT_MAX: Duration = Duration::from_secs(3_600);

impl ClientOptions {
    /// Checks every bound; the error names the option and the allowed range.
    pub fn validate(&self) -> Result<(), ClientError> {
        let durations = [
            ("retransmit_timeout", self.retransmit_timeout),
            ("retransmit_timeout_max", self.retransmit_timeout_max),
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
        ];
        for (name, value) in durations {
            if !(TIMEOUT_MIN..=TIMEOUT_MAX).contains(&value) {
                return Err(ClientError::Config(format!(
                    "{name} is {value:?}; it must be between {TIMEOUT_MIN:?} and {TIMEOUT_MAX:?}"
                )));
            }
        }
        if self.retransmit_timeout_max < self.retransmit_timeout {
            return Err(ClientError::Config(format!(
                "retransmit_timeout_max ({:?}) is below retransmit_timeout ({:?}); raise it",
                self.retransmit_timeout_max, self.retransmit_timeout
            )));
        }
        if !(1..=1 << 20).contains(&self.pending_requests_max) {
            return Err(ClientError::Config(format!(
                "pending_requests_max is {}; it must be between 1 and {}",
                self.pending_requests_max,
                1 << 20
            )));
        }
        if !(16..=1 << 20).contains(&self.send_queue_frames_max) {
            return Err(ClientError::Config(format!(
                "send_queue_frames_max is {}; it must be between 16 and {}",
                self.send_queue_frames_max,
                1 << 20
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ClientOptions::default()
            .validate()
            .expect("defaults validate");
    }

    #[test]
    fn refuses_a_cap_below_the_first_timeout() {
        let options = ClientOptions {
            retransmit_timeout_max: Duration::from_millis(100),
            ..ClientOptions::default()
        };
        let error = options.validate().expect_err("cap below base");
        assert!(
            error.to_string().contains("retransmit_timeout_max"),
            "{error}"
        );
    }

    #[test]
    fn refuses_a_zero_timeout() {
        let options = ClientOptions {
            request_timeout: Duration::ZERO,
            ..ClientOptions::default()
        };
        assert!(options.validate().is_err());
    }
}
