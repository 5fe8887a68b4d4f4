//! The general RESP2/RESP3 value decoder against arbitrary bytes: no panic, no over-read, and
//! whatever decodes re-encodes to a value that decodes the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_gateway::resp::decode_reply;
use tessera_gateway::{Protocol, RespLimits};

fuzz_target!(|data: &[u8]| {
    let limits = RespLimits {
        bulk_bytes_max: 64,
        array_length_max: 8,
        inline_bytes_max: 64,
        buffered_bytes_max: 256,
        nesting_depth_max: 4,
    };
    if let Ok(Some((reply, consumed))) = decode_reply(data, &limits) {
        assert!(consumed <= data.len());
        let mut encoded = Vec::new();
        reply.encode(Protocol::Resp3, &mut encoded);
        let again = decode_reply(&encoded, &RespLimits::default());
        assert_eq!(again, Ok(Some((reply, encoded.len()))));
    }
});
