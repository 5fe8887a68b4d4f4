use super::*;

fn info() -> ClusterInfo {
    ClusterInfo {
        replicas: 3,
        f: 1,
        protocol: "minbft".into(),
    }
}

fn run(state: &mut ConnectionState, words: &[&str]) -> Step {
    let arguments: Vec<Vec<u8>> = words.iter().map(|word| word.as_bytes().to_vec()).collect();
    let live = Live {
        view: 7,
        connections: 2,
        envelopes: 5,
        commands: 40,
    };
    plan(&arguments, state, &info(), &live)
}

fn fresh() -> ConnectionState {
    ConnectionState::new(42, "127.0.0.1:5000".into())
}

fn error_text(step: Step) -> String {
    match step {
        Step::Reply(Reply::Error(text)) => text,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn replicated(step: Step) -> (Command, Shape) {
    match step {
        Step::Replicated { command, shape } => (command, shape),
        other => panic!("expected a replicated command, got {other:?}"),
    }
}

#[test]
fn unknown_commands_are_named_like_redis() {
    let text = error_text(run(&mut fresh(), &["FOO", "a", "b"]));
    assert_eq!(
        text,
        "ERR unknown command 'FOO', with args beginning with: 'a' 'b' "
    );
    let text = error_text(run(&mut fresh(), &["nope"]));
    assert_eq!(
        text,
        "ERR unknown command 'nope', with args beginning with: "
    );
}

#[test]
fn unknown_command_text_is_bounded() {
    let long = "x".repeat(10_000);
    let words: Vec<&str> = std::iter::repeat_n(long.as_str(), 100).collect();
    let text = error_text(run(&mut fresh(), &words));
    assert!(text.len() < 600, "{} bytes", text.len());
}

#[test]
fn wrong_arity_names_the_command() {
    assert_eq!(
        error_text(run(&mut fresh(), &["GET"])),
        "ERR wrong number of arguments for 'get' command"
    );
    assert_eq!(
        error_text(run(&mut fresh(), &["mset", "a", "1", "b"])),
        "ERR wrong number of arguments for 'mset' command"
    );
}

#[test]
fn handshake_commands_are_answered_locally() {
    let mut state = fresh();
    assert_eq!(
        run(&mut state, &["PING"]),
        Step::Reply(Reply::Simple("PONG".into()))
    );
    assert_eq!(
        run(&mut state, &["echo", "hi"]),
        Step::Reply(Reply::Bulk(b"hi".to_vec()))
    );
    assert_eq!(run(&mut state, &["SELECT", "0"]), Step::Reply(Reply::ok()));
    assert!(error_text(run(&mut state, &["SELECT", "1"])).contains("DB index is out of range"));
    assert_eq!(
        run(&mut state, &["COMMAND", "DOCS"]),
        Step::Reply(Reply::Map(vec![]))
    );
    assert_eq!(
        run(&mut state, &["client", "setname", "me"]),
        Step::Reply(Reply::ok())
    );
    assert_eq!(
        run(&mut state, &["CLIENT", "GETNAME"]),
        Step::Reply(Reply::text("me"))
    );
    assert_eq!(
        run(&mut state, &["CLIENT", "ID"]),
        Step::Reply(Reply::Integer(42))
    );
    assert!(error_text(run(&mut state, &["client", "setname", "a b"])).contains("spaces"));
    assert_eq!(run(&mut state, &["QUIT"]), Step::Close(Reply::ok()));
}

#[test]
fn hello_switches_the_protocol_only_when_valid() {
    let mut state = fresh();
    let Step::Reply(Reply::Map(fields)) = run(&mut state, &["HELLO", "3", "SETNAME", "cli"]) else {
        panic!("HELLO answers a map");
    };
    assert!(fields.contains(&(Reply::text("proto"), Reply::Integer(3))));
    assert_eq!(state.protocol, Protocol::Resp3);
    assert_eq!(state.name.as_deref(), Some("cli"));
    assert_eq!(
        run(&mut state, &["HELLO", "4"]),
        Step::Reply(Reply::Error("NOPROTO unsupported protocol version".into()))
    );
    assert!(error_text(run(&mut state, &["HELLO", "2", "AUTH", "u", "p"])).contains("AUTH"));
    assert_eq!(
        state.protocol,
        Protocol::Resp3,
        "failed HELLOs change nothing"
    );
    run(&mut state, &["HELLO", "2"]);
    assert_eq!(state.protocol, Protocol::Resp2);
}

#[test]
fn info_carries_tessera_fields() {
    let Step::Reply(Reply::Bulk(text)) = run(&mut fresh(), &["INFO"]) else {
        panic!("INFO answers a bulk string");
    };
    let text = String::from_utf8(text).unwrap();
    for field in [
        "replicas:3",
        "f:1",
        "view:7",
        "protocol:minbft",
        "primary:1",
    ] {
        assert!(
            text.contains(&format!("{field}\r\n")),
            "{field} missing in {text}"
        );
    }
}

#[test]
fn set_options_map_onto_store_commands() {
    let key = b"k".to_vec();
    let value = b"v".to_vec();
    assert_eq!(
        replicated(run(&mut fresh(), &["SET", "k", "v"])).0,
        Command::Set {
            key: key.clone(),
            value: value.clone()
        }
    );
    assert_eq!(
        replicated(run(&mut fresh(), &["set", "k", "v", "nx", "get"])).0,
        Command::SetIf {
            key: key.clone(),
            value: value.clone(),
            condition: SetCondition::IfAbsent,
            get: true
        }
    );
    assert_eq!(
        replicated(run(&mut fresh(), &["GETSET", "k", "v"])).0,
        Command::SetIf {
            key,
            value,
            condition: SetCondition::Always,
            get: true
        }
    );
    assert_eq!(
        error_text(run(&mut fresh(), &["SET", "k", "v", "NX", "XX"])),
        "ERR syntax error"
    );
    assert_eq!(
        error_text(run(&mut fresh(), &["SET", "k", "v", "EX"])),
        "ERR syntax error"
    );
}

#[test]
fn expiry_options_map_to_relative_or_absolute_times_in_milliseconds() {
    let set_with = |words: &[&str]| match replicated(run(&mut fresh(), words)).0 {
        Command::SetWithExpiry {
            expiry,
            condition,
            get,
            ..
        } => (expiry, condition, get),
        other => panic!("{words:?}: {other:?}"),
    };
    assert_eq!(
        set_with(&["SET", "k", "v", "EX", "10"]),
        (Expiry::InMs(10_000), SetCondition::Always, false)
    );
    assert_eq!(
        set_with(&["SET", "k", "v", "px", "300"]).0,
        Expiry::InMs(300)
    );
    assert_eq!(
        set_with(&["SET", "k", "v", "EXAT", "1700000000"]).0,
        Expiry::AtMs(1_700_000_000_000)
    );
    assert_eq!(
        set_with(&["SET", "k", "v", "PXAT", "1700000000001"]).0,
        Expiry::AtMs(1_700_000_000_001)
    );
    assert_eq!(
        set_with(&["SET", "k", "v", "NX", "GET", "EX", "10"]),
        (Expiry::InMs(10_000), SetCondition::IfAbsent, true)
    );
    assert_eq!(set_with(&["SET", "k", "v", "KEEPTTL"]).0, Expiry::Keep);
    assert_eq!(set_with(&["SETEX", "k", "10", "v"]).0, Expiry::InMs(10_000));
    assert_eq!(set_with(&["psetex", "k", "10", "v"]).0, Expiry::InMs(10));
    // A plain SET is a plain write, which clears any expiry in the store.
    assert_eq!(
        replicated(run(&mut fresh(), &["SET", "k", "v"])).0,
        Command::Set {
            key: b"k".to_vec(),
            value: b"v".to_vec()
        }
    );
    let expire = |words: &[&str]| match replicated(run(&mut fresh(), words)).0 {
        Command::Expire {
            expiry, condition, ..
        } => (expiry, condition),
        other => panic!("{words:?}: {other:?}"),
    };
    assert_eq!(
        expire(&["EXPIRE", "k", "10"]),
        (Expiry::InMs(10_000), ExpireCondition::Always)
    );
    assert_eq!(
        expire(&["PEXPIRE", "k", "-5", "NX"]),
        (Expiry::InMs(-5), ExpireCondition::IfNone)
    );
    assert_eq!(
        expire(&["EXPIREAT", "k", "1700000000", "GT"]),
        (Expiry::AtMs(1_700_000_000_000), ExpireCondition::IfLater)
    );
    assert_eq!(
        expire(&["PEXPIREAT", "k", "1700000000000", "XX", "LT"]),
        (
            Expiry::AtMs(1_700_000_000_000),
            ExpireCondition::IfEarlierWithExpiry
        )
    );
    assert_eq!(
        expire(&["EXPIRE", "k", "1", "lt"]).1,
        ExpireCondition::IfEarlier
    );
    assert_eq!(
        expire(&["EXPIRE", "k", "1", "xx"]).1,
        ExpireCondition::IfSome
    );
    assert_eq!(
        replicated(run(&mut fresh(), &["GETEX", "k", "PERSIST"])).0,
        Command::GetEx {
            key: b"k".to_vec(),
            expiry: Expiry::Persist
        }
    );
    assert_eq!(
        replicated(run(&mut fresh(), &["GETEX", "k", "EX", "2"])).0,
        Command::GetEx {
            key: b"k".to_vec(),
            expiry: Expiry::InMs(2_000)
        }
    );
}

#[test]
fn invalid_expiry_arguments_get_the_redis_errors() {
    for (words, text) in [
        (
            &["SET", "k", "v", "EX", "0"][..],
            "ERR invalid expire time in 'set' command",
        ),
        (
            &["SET", "k", "v", "PX", "-1"],
            "ERR invalid expire time in 'set' command",
        ),
        (
            &["SET", "k", "v", "EX", "9223372036854775807"],
            "ERR invalid expire time in 'set' command",
        ),
        (
            &["SET", "k", "v", "EX", "soon"],
            "ERR value is not an integer or out of range",
        ),
        (&["SET", "k", "v", "EX"], "ERR syntax error"),
        (&["SET", "k", "v", "EX", "1", "PX", "1"], "ERR syntax error"),
        (&["SET", "k", "v", "KEEPTTL", "EX", "1"], "ERR syntax error"),
        (
            &["SETEX", "k", "0", "v"],
            "ERR invalid expire time in 'setex' command",
        ),
        (
            &["SETEX", "k", "1"],
            "ERR wrong number of arguments for 'setex' command",
        ),
        (
            &["GETEX", "k", "EX", "0"],
            "ERR invalid expire time in 'getex' command",
        ),
        (&["GETEX", "k", "EX"], "ERR syntax error"),
        (
            &["EXPIRE", "k", "9223372036854775807"],
            "ERR invalid expire time in 'expire' command",
        ),
        (
            &["EXPIRE", "k", "1", "NX", "GT"],
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        ),
        (
            &["EXPIRE", "k", "1", "GT", "LT"],
            "ERR GT and LT options at the same time are not compatible",
        ),
        (&["EXPIRE", "k", "1", "SOON"], "ERR Unsupported option SOON"),
        (&["TTL"], "ERR wrong number of arguments for 'ttl' command"),
    ] {
        assert_eq!(error_text(run(&mut fresh(), words)), text, "{words:?}");
    }
}

#[test]
fn ttl_replies_are_shaped_like_redis() {
    assert_eq!(
        replicated(run(&mut fresh(), &["TTL", "k"])),
        (Command::Ttl { key: b"k".to_vec() }, Shape::TtlSeconds)
    );
    assert_eq!(
        replicated(run(&mut fresh(), &["PTTL", "k"])),
        (Command::Ttl { key: b"k".to_vec() }, Shape::Direct)
    );
    let ttl = |ms| shape_reply(Shape::TtlSeconds, Response::Integer(ms));
    assert_eq!(ttl(-2), Reply::Integer(-2));
    assert_eq!(ttl(-1), Reply::Integer(-1));
    assert_eq!(ttl(1_499), Reply::Integer(1));
    assert_eq!(ttl(1_500), Reply::Integer(2));
    assert_eq!(ttl(300), Reply::Integer(0));
    assert_eq!(
        shape_reply(Shape::Direct, Response::Integer(300)),
        Reply::Integer(300)
    );
    assert_eq!(
        shape_reply(Shape::Seconds, Response::Integer(1_700_000_000_999)),
        Reply::Integer(1_700_000_000)
    );
    assert_eq!(
        shape_reply(Shape::Seconds, Response::Integer(-1)),
        Reply::Integer(-1)
    );
}

#[test]
fn counters_parse_and_negate_their_delta() {
    assert_eq!(
        replicated(run(&mut fresh(), &["DECRBY", "n", "5"])).0,
        Command::Incr {
            key: b"n".to_vec(),
            delta: -5
        }
    );
    assert_eq!(
        error_text(run(&mut fresh(), &["DECRBY", "n", &i64::MIN.to_string()])),
        "ERR decrement would overflow"
    );
    for bad in ["1.5", "+1", "01", " 1", "99999999999999999999"] {
        assert_eq!(
            error_text(run(&mut fresh(), &["INCRBY", "n", bad])),
            "ERR value is not an integer or out of range",
            "{bad:?}"
        );
    }
}

#[test]
fn flush_and_reads_are_replicated() {
    assert_eq!(
        replicated(run(&mut fresh(), &["FLUSHDB", "ASYNC"])),
        (Command::FlushDb, Shape::Ok)
    );
    assert_eq!(
        replicated(run(&mut fresh(), &["DBSIZE"])).0,
        Command::DbSize
    );
    assert_eq!(
        replicated(run(&mut fresh(), &["MSET", "a", "1", "b", "2"])).0,
        Command::MSet {
            pairs: vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        }
    );
}

#[test]
fn responses_become_redis_replies() {
    assert_eq!(shape_reply(Shape::Ok, Response::Count(9)), Reply::ok());
    assert_eq!(
        shape_reply(Shape::Direct, Response::Value(None)),
        Reply::Null
    );
    assert_eq!(
        shape_reply(
            Shape::Direct,
            Response::Values(vec![Some(b"1".to_vec()), None])
        ),
        Reply::Array(vec![Reply::Bulk(b"1".to_vec()), Reply::Null])
    );
    assert_eq!(
        shape_reply(Shape::Direct, Response::Error(KvError::NotAnInteger)),
        Reply::error("value is not an integer or out of range")
    );
    let refused = shape_reply(
        Shape::Direct,
        Response::Error(KvError::KeyTooLarge {
            size: 2000,
            limit: 1024,
        }),
    );
    assert!(matches!(refused, Reply::Error(text) if text.starts_with("ERR key of 2000 bytes")));
}

#[test]
fn config_get_answers_what_redis_benchmark_asks() {
    assert_eq!(
        run(&mut fresh(), &["CONFIG", "GET", "save"]),
        Step::Reply(Reply::Map(vec![(Reply::text("save"), Reply::text(""))]))
    );
    assert_eq!(
        run(&mut fresh(), &["CONFIG", "GET", "nothing"]),
        Step::Reply(Reply::Map(vec![]))
    );
}

#[test]
fn every_listed_command_is_known() {
    for name in COMMAND_NAMES {
        let step = run(&mut fresh(), &[name]);
        if let Step::Reply(Reply::Error(text)) = step {
            assert!(!text.contains("unknown command"), "{name}: {text}");
        }
    }
    assert!(COMMAND_NAMES.windows(2).all(|pair| pair[0] < pair[1]));
}

#[test]
fn response_bounds_follow_the_store_limits() {
    let value_max = KvLimits::default().value_bytes_max;
    let get = Command::Get { key: b"k".to_vec() };
    assert!(response_bytes_max(&get) > value_max);
    let incr = Command::Incr {
        key: b"k".to_vec(),
        delta: 1,
    };
    assert!(response_bytes_max(&incr) < 1024);
    let mget = Command::MGet {
        keys: vec![b"k".to_vec(); 1024],
    };
    assert!(response_bytes_max(&mget) <= tessera_types::limits::MAX_RESULT_BYTES + 1024);
}
