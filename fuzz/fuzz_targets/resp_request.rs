//! The gateway's request decoder against arbitrary bytes, delivered in arbitrary pieces as a
//! socket would: it must never panic, never consume more than it was given, and never hold
//! more than its limit for an incomplete request.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_gateway::{RequestDecoder, RespLimits};

fuzz_target!(|data: &[u8]| {
    // Small limits, so the fuzzer reaches every bound with short inputs.
    let limits = RespLimits {
        bulk_bytes_max: 64,
        array_length_max: 8,
        inline_bytes_max: 64,
        buffered_bytes_max: 256,
        nesting_depth_max: 4,
    };
    // The first byte picks the piece size; the rest is the stream.
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let mut decoder = RequestDecoder::new(limits);
    let mut buffer = Vec::new();
    for chunk in stream.chunks(piece) {
        buffer.extend_from_slice(chunk);
        loop {
            match decoder.decode(&buffer) {
                Ok((consumed, request)) => {
                    assert!(consumed <= buffer.len());
                    buffer.drain(..consumed);
                    match request {
                        Some(arguments) => {
                            assert!(arguments.len() <= limits.array_length_max);
                            assert!(arguments
                                .iter()
                                .all(|a| a.len()
                                    <= limits.bulk_bytes_max.max(limits.inline_bytes_max)));
                        }
                        None => break,
                    }
                }
                // The connection answers the error and closes: nothing more to decode.
                Err(_) => return,
            }
        }
        assert!(decoder.held_bytes() + buffer.len() <= limits.buffered_bytes_max);
    }
});
