use super::*;
use proptest::prelude::*;

fn small_limits() -> RespLimits {
    RespLimits {
        bulk_bytes_max: 16,
        array_length_max: 4,
        inline_bytes_max: 32,
        buffered_bytes_max: 64,
        nesting_depth_max: 3,
    }
}

/// Feeds `input` to a decoder in pieces cut at `cuts`, as a connection would (keeping the
/// unconsumed bytes), and returns every request decoded, or the first error.
fn decode_in_pieces(
    limits: RespLimits,
    input: &[u8],
    cuts: &[usize],
) -> Result<Vec<Arguments>, RespError> {
    let mut decoder = RequestDecoder::new(limits);
    let mut buffer = Vec::new();
    let mut requests = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|cut| cut % (input.len() + 1)).collect();
    bounds.push(input.len());
    bounds.sort_unstable();
    let mut fed = 0;
    for bound in bounds {
        buffer.extend_from_slice(&input[fed..bound]);
        fed = bound;
        loop {
            let (consumed, request) = decoder.decode(&buffer)?;
            assert!(consumed <= buffer.len());
            buffer.drain(..consumed);
            match request {
                Some(arguments) => requests.push(arguments),
                None => break,
            }
        }
        assert!(decoder.held_bytes() + buffer.len() <= limits.buffered_bytes_max);
    }
    Ok(requests)
}

fn arguments(words: &[&str]) -> Arguments {
    words.iter().map(|word| word.as_bytes().to_vec()).collect()
}

#[test]
fn decodes_pipelined_arrays_and_inline_commands() {
    let input = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*1\r\n$4\r\nPING\r\n";
    let requests = decode_in_pieces(RespLimits::default(), input, &[]).unwrap();
    assert_eq!(
        requests,
        [
            arguments(&["GET", "k"]),
            arguments(&["PING"]),
            arguments(&["PING"])
        ]
    );
}

#[test]
fn empty_requests_come_back_empty() {
    let requests = decode_in_pieces(RespLimits::default(), b"*0\r\n\r\n*-1\r\n", &[]).unwrap();
    assert_eq!(requests, [Vec::<Vec<u8>>::new(), vec![], vec![]]);
}

#[test]
fn inline_quotes_and_escapes() {
    let input = b"SET \"a b\" 'it\\'s' \"\\x41\\n\"\r\n";
    let requests = decode_in_pieces(RespLimits::default(), input, &[]).unwrap();
    assert_eq!(
        requests,
        [vec![
            b"SET".to_vec(),
            b"a b".to_vec(),
            b"it's".to_vec(),
            b"A\n".to_vec()
        ]]
    );
    for malformed in [&b"GET \"k\r\n"[..], b"GET 'k\n", b"GET \"a\"b\n"] {
        assert_eq!(
            decode_in_pieces(RespLimits::default(), malformed, &[]),
            Err(RespError::UnbalancedQuotes)
        );
    }
}

#[test]
fn oversized_frames_are_refused_before_they_arrive() {
    let limits = small_limits();
    let cases: [(&[u8], RespError); 6] = [
        (
            b"*5\r\n",
            RespError::ArrayTooLong {
                length: 5,
                limit: 4,
            },
        ),
        (
            b"*1\r\n$17\r\n",
            RespError::BulkTooLong {
                length: 17,
                limit: 16,
            },
        ),
        (
            b"*1\r\n$99999999999999999999\r\n",
            RespError::InvalidBulkLength,
        ),
        (b"*1\r\n$-1\r\n", RespError::InvalidBulkLength),
        (
            b"*1\r\n:1\r\n",
            RespError::ExpectedBulk { found: ":".into() },
        ),
        (&[b'x'; 33], RespError::LineTooLong { limit: 32 }),
    ];
    for (input, expected) in cases {
        assert_eq!(
            decode_in_pieces(limits, input, &[]),
            Err(expected),
            "{input:?}"
        );
    }
}

#[test]
fn a_header_without_crlf_is_malformed_not_incomplete() {
    let input = [b"*1".as_slice(), &[b'1'; 40]].concat();
    assert_eq!(
        decode_in_pieces(RespLimits::default(), &input, &[]),
        Err(RespError::InvalidArrayLength)
    );
}

#[test]
fn buffered_bytes_are_bounded_across_arguments() {
    // Four 16-byte arguments are each within the bulk limit, but together exceed the 64 bytes
    // one incomplete request may hold.
    let mut input = b"*4\r\n".to_vec();
    for _ in 0..4 {
        input.extend_from_slice(b"$16\r\n0123456789abcdef\r\n");
    }
    let error = decode_in_pieces(small_limits(), &input[..input.len() - 1], &[]).unwrap_err();
    assert_eq!(error, RespError::BufferFull { limit: 64 });
}

#[test]
fn bulk_data_must_end_with_crlf() {
    assert_eq!(
        decode_in_pieces(RespLimits::default(), b"*1\r\n$1\r\nab\r\n", &[]),
        Err(RespError::MissingCrlf)
    );
}

#[test]
fn error_texts_follow_redis() {
    assert_eq!(
        RespError::InvalidBulkLength.to_string(),
        "Protocol error: invalid bulk length"
    );
    assert_eq!(
        RespError::ExpectedBulk {
            found: "\\x00".into()
        }
        .to_string(),
        "Protocol error: expected '$', got '\\x00'"
    );
}

#[test]
fn replies_encode_per_protocol() {
    let reply = Reply::Map(vec![(Reply::text("proto"), Reply::Integer(3))]);
    let mut resp2 = Vec::new();
    reply.encode(Protocol::Resp2, &mut resp2);
    assert_eq!(resp2, b"*2\r\n$5\r\nproto\r\n:3\r\n");
    let mut resp3 = Vec::new();
    reply.encode(Protocol::Resp3, &mut resp3);
    assert_eq!(resp3, b"%1\r\n$5\r\nproto\r\n:3\r\n");
    let mut nulls = Vec::new();
    Reply::Null.encode(Protocol::Resp2, &mut nulls);
    Reply::Null.encode(Protocol::Resp3, &mut nulls);
    assert_eq!(nulls, b"$-1\r\n_\r\n");
}

#[test]
fn status_lines_cannot_smuggle_a_second_reply() {
    let mut out = Vec::new();
    Reply::error("bad\r\n+OK").encode(Protocol::Resp2, &mut out);
    assert_eq!(out, b"-ERR bad  +OK\r\n");
}

fn simple_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _:-]{0,12}"
}

fn reply() -> impl Strategy<Value = Reply> {
    let leaf = prop_oneof![
        simple_text().prop_map(Reply::Simple),
        simple_text().prop_map(|text| Reply::Error(format!("ERR {text}"))),
        any::<i64>().prop_map(Reply::Integer),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(Reply::Bulk),
        Just(Reply::Null),
    ];
    leaf.prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Reply::Array),
            prop::collection::vec((inner.clone(), inner), 0..3).prop_map(Reply::Map),
        ]
    })
}

/// What a RESP2 reader sees: maps are flat arrays.
fn as_resp2(reply: Reply) -> Reply {
    match reply {
        Reply::Array(items) => Reply::Array(items.into_iter().map(as_resp2).collect()),
        Reply::Map(pairs) => Reply::Array(
            pairs
                .into_iter()
                .flat_map(|(key, value)| [as_resp2(key), as_resp2(value)])
                .collect(),
        ),
        other => other,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn requests_round_trip_in_any_pieces(
        requests in prop::collection::vec(
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut input = Vec::new();
        for request in &requests {
            encode_request(request, &mut input);
        }
        let decoded = decode_in_pieces(RespLimits::default(), &input, &cuts);
        prop_assert_eq!(decoded, Ok(requests));
    }

    #[test]
    fn inline_words_round_trip(words in prop::collection::vec("[!-~&&[^\"']]{1,8}", 1..6)) {
        // A line starting with `*` is an array header, so the command name is fixed.
        let line = format!("CMD {}\r\n", words.join(" "));
        let decoded = decode_in_pieces(RespLimits::default(), line.as_bytes(), &[]);
        let mut expected = vec![b"CMD".to_vec()];
        expected.extend(words.iter().map(|word| word.as_bytes().to_vec()));
        let expected: Vec<Arguments> = vec![expected];
        prop_assert_eq!(decoded, Ok(expected));
    }

    #[test]
    fn replies_round_trip_in_both_protocols(reply in reply()) {
        let limits = RespLimits::default();
        let mut resp3 = Vec::new();
        reply.encode(Protocol::Resp3, &mut resp3);
        prop_assert_eq!(decode_reply(&resp3, &limits), Ok(Some((reply.clone(), resp3.len()))));
        let mut resp2 = Vec::new();
        reply.encode(Protocol::Resp2, &mut resp2);
        prop_assert_eq!(decode_reply(&resp2, &limits), Ok(Some((as_resp2(reply), resp2.len()))));
        // Every strict prefix is incomplete, never an error or a different value.
        for end in 0..resp3.len() {
            prop_assert_eq!(decode_reply(&resp3[..end], &limits), Ok(None));
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics_and_stays_bounded(
        input in prop::collection::vec(any::<u8>(), 0..256),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        // Errors are expected; panics, runaway memory and over-consumption are not (checked
        // inside `decode_in_pieces`).
        let _ = decode_in_pieces(small_limits(), &input, &cuts);
        if let Ok(Some((_, consumed))) = decode_reply(&input, &small_limits()) {
            prop_assert!(consumed <= input.len());
        }
    }

    #[test]
    fn resp_shaped_noise_never_panics(
        pieces in prop::collection::vec(prop_oneof![
            Just(b"*".to_vec()), Just(b"$".to_vec()), Just(b"%".to_vec()), Just(b"\r\n".to_vec()),
            Just(b"-1".to_vec()), Just(b"3".to_vec()), Just(b"17".to_vec()), Just(b"\"".to_vec()),
            Just(b"_".to_vec()), Just(b":".to_vec()), Just(b"abc".to_vec()), Just(b" ".to_vec()),
        ], 0..64),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let input = pieces.concat();
        let _ = decode_in_pieces(small_limits(), &input, &cuts);
        let _ = decode_reply(&input, &small_limits());
    }
}

#[test]
fn simple_strings_with_line_breaks_are_refused() {
    // It would decode to a value the encoder cannot write back (it replaces CR and LF).
    assert_eq!(
        decode_reply(b"+a\nb\r\n", &RespLimits::default()),
        Err(RespError::LineBreakInLine)
    );
}

#[test]
fn a_consumed_array_header_leaves_the_decoder_mid_request() {
    // The connection's frame timeout starts from this state: the input is empty, yet a
    // request has begun.
    let mut decoder = RequestDecoder::new(RespLimits::default());
    assert!(!decoder.is_mid_request());
    let (consumed, request) = decoder.decode(b"*2\r\n$3\r\nGET\r\n").unwrap();
    assert_eq!((consumed, request), (13, None));
    assert!(decoder.is_mid_request());
    let (_, request) = decoder.decode(b"$1\r\nk\r\n").unwrap();
    assert_eq!(request, Some(arguments(&["GET", "k"])));
    assert!(!decoder.is_mid_request());
    // An inline command is never held: its bytes stay in the caller's input until complete.
    assert_eq!(decoder.decode(b"PIN").unwrap(), (0, None));
    assert!(!decoder.is_mid_request());
}
