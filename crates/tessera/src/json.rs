//! The few JSON pieces the benchmarks print with `--json`. Hand-written: the objects are small
//! and flat, and this keeps serde_json out of the binary.

/// A JSON string literal.
pub fn json_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for character in text.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            control if (control as u32) < 0x20 => {
                quoted.push_str(&format!("\\u{:04x}", control as u32))
            }
            other => quoted.push(other),
        }
    }
    quoted.push('"');
    quoted
}

/// A JSON number with `decimals` decimals, or `null` for a value JSON cannot hold (NaN, ±∞).
pub fn json_number(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "null".into()
    }
}

/// `json_number` of a value that may be missing.
pub fn json_optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "null".into(), |value| json_number(value, decimals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_and_numbers_stay_valid() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        assert_eq!(json_number(1.23456, 2), "1.23");
        assert_eq!(json_number(f64::NAN, 2), "null");
        assert_eq!(json_number(f64::INFINITY, 0), "null");
        assert_eq!(json_optional(None, 1), "null");
        assert_eq!(json_optional(Some(2.0), 1), "2.0");
    }
}
