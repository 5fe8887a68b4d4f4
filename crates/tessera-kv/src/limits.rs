//! The size limits of a key-value store and the bounds they must respect.
//!
//! Owns the numbers only; the store checks commands against them.

use tessera_types::limits::MAX_OPERATION_BYTES;
use thiserror::Error;

/// Longest decimal text of an `i64` (`-9223372036854775808`), so `Incr` results always fit.
const INTEGER_TEXT_BYTES_MAX: usize = 20;

/// Size limits of a [`crate::KvStore`]. Every command is checked against them before it changes
/// anything; a command over a limit changes nothing and returns the matching [`crate::KvError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLimits {
    /// Largest key, in bytes. Default 1024 (1 KiB).
    pub key_bytes_max: usize,
    /// Largest value, in bytes. Default 524 288 (512 KiB).
    pub value_bytes_max: usize,
    /// Most keys (or key-value pairs) named by one `Del`, `Exists`, `MGet` or `MSet`.
    /// Default 1024.
    pub keys_per_command_max: usize,
    /// Most bytes stored: the sum of the lengths of every key and every value.
    /// Default 1 073 741 824 (1 GiB).
    pub total_bytes_max: u64,
}

impl Default for KvLimits {
    fn default() -> KvLimits {
        KvLimits {
            key_bytes_max: 1024,
            value_bytes_max: 512 * 1024,
            keys_per_command_max: 1024,
            total_bytes_max: 1 << 30,
        }
    }
}

/// A [`KvLimits`] field outside its bound.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("invalid key-value limit {field}: {reason}")]
pub struct InvalidKvLimits {
    /// The offending field, e.g. `"key_bytes_max"`.
    pub field: &'static str,
    /// What is wrong and which values are accepted.
    pub reason: String,
}

impl KvLimits {
    /// Checks every field against its bound. Keys, values and key lists must fit in one client
    /// operation of at most `tessera_types::limits::MAX_OPERATION_BYTES` bytes, and a value
    /// must hold any `Incr` result.
    pub fn validate(&self) -> Result<(), InvalidKvLimits> {
        check_range("key_bytes_max", self.key_bytes_max, 1, MAX_OPERATION_BYTES)?;
        check_range(
            "value_bytes_max",
            self.value_bytes_max,
            INTEGER_TEXT_BYTES_MAX,
            MAX_OPERATION_BYTES,
        )?;
        // Each key takes at least one byte of the operation, so more could never arrive.
        check_range(
            "keys_per_command_max",
            self.keys_per_command_max,
            1,
            MAX_OPERATION_BYTES,
        )
    }
}

fn check_range(
    field: &'static str,
    value: usize,
    minimum: usize,
    maximum: usize,
) -> Result<(), InvalidKvLimits> {
    if (minimum..=maximum).contains(&value) {
        return Ok(());
    }
    Err(InvalidKvLimits {
        field,
        reason: format!("is {value} but must be between {minimum} and {maximum}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(KvLimits::default().validate(), Ok(()));
    }

    #[test]
    fn each_field_is_bounded() {
        let zero_key = KvLimits {
            key_bytes_max: 0,
            ..KvLimits::default()
        };
        assert_eq!(zero_key.validate().unwrap_err().field, "key_bytes_max");
        let tiny_value = KvLimits {
            value_bytes_max: 19,
            ..KvLimits::default()
        };
        assert_eq!(tiny_value.validate().unwrap_err().field, "value_bytes_max");
        let huge_value = KvLimits {
            value_bytes_max: MAX_OPERATION_BYTES + 1,
            ..KvLimits::default()
        };
        assert_eq!(huge_value.validate().unwrap_err().field, "value_bytes_max");
        let no_keys = KvLimits {
            keys_per_command_max: 0,
            ..KvLimits::default()
        };
        let error = no_keys.validate().unwrap_err();
        assert_eq!(error.field, "keys_per_command_max");
        assert!(error.to_string().contains("is 0 but must be between 1 and"));
    }
}
