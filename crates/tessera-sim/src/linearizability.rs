//! Linearizability of the recorded client history (placeholder, being written).
