//! Tests only: `tests/catalogue.rs` runs each of the core's planted bugs (the `planted-bugs`
//! feature of `tessera-core`) under the deterministic simulator and asserts that the checkers
//! catch it within a stated number of seeds. This crate exists so that the feature is enabled
//! only for those tests: no production binary depends on it.
#![forbid(unsafe_code)]
