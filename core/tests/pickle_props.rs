//! Property tests of the pickle codec; they double as its fuzz target. Arbitrary and
//! opcode-shaped bytes must never panic the reader, and any encodable tree must read back
//! unchanged.

use dispy_core::pickle::{decode, decode_with_limits, encode, Construct, Limits, Object, Value};
use proptest::collection::vec;
use proptest::prelude::*;

/// Every opcode byte the reader knows, so generated input gets past the first byte often.
const OPCODES: &[u8] = b"(.012FIJKLMNPQRSTUVXabcd}eghijl]opqrst)uGBC\
    \x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\
    \x90\x91\x92\x93\x94\x95\x96\x97\x98";

fn tight() -> Limits {
    Limits {
        max_input: 4096,
        max_depth: 16,
        max_memo: 64,
        max_container_len: 64,
        max_values: 2048,
    }
}

fn hashable_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        vec(any::<u8>(), 9..24).prop_map(|b| Value::int_from_le_bytes(&b)),
        any::<f64>()
            .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
            .prop_map(Value::Float),
        "\\PC{0,12}".prop_map(Value::Str),
        vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
        ("mod_[a-z]{1,4}", "[A-Za-z_]{1,6}")
            .prop_map(|(module, name)| Value::Global { module, name }),
    ]
}

fn hashable() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => hashable_leaf(),
        1 => vec(hashable_leaf(), 0..4).prop_map(Value::Tuple),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        8 => hashable_leaf(),
        1 => vec(any::<u8>(), 0..16).prop_map(Value::ByteArray),
    ];
    leaf.prop_recursive(5, 96, 6, |inner| {
        let pairs = vec((hashable(), inner.clone()), 0..5);
        let attrs = vec(("[a-z_]{1,8}".prop_map(Value::Str), inner.clone()), 0..5);
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Tuple),
            vec(inner.clone(), 0..6).prop_map(Value::List),
            pairs.prop_map(Value::Dict),
            vec(hashable(), 0..5).prop_map(Value::Set),
            vec(hashable(), 0..5).prop_map(Value::FrozenSet),
            (
                "mod_[a-z]{1,4}",
                "[A-Z][a-z]{0,6}",
                prop_oneof![
                    Just(Construct::NewObj),
                    Just(Construct::Reduce),
                    attrs
                        .clone()
                        .prop_map(|kwargs| Construct::NewObjEx { kwargs }),
                ],
                vec(inner.clone(), 0..3),
                vec(inner.clone(), 0..2),
                vec((hashable(), inner), 0..2),
                proptest::option::of(attrs.prop_map(Value::Dict)),
            )
                .prop_map(
                    |(module, name, construct, args, list_items, dict_items, state)| {
                        Value::Object(Box::new(Object {
                            module,
                            name,
                            construct,
                            args,
                            list_items,
                            dict_items,
                            state,
                        }))
                    }
                ),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..512)) {
        let _ = decode(&data);
        let _ = decode_with_limits(&data, &tight());
    }

    #[test]
    fn opcode_shaped_bytes_never_panic(
        proto in 0u8..6,
        body in vec(prop_oneof![3 => proptest::sample::select(OPCODES), 1 => any::<u8>()], 0..256),
    ) {
        let mut data = vec![0x80, proto];
        data.extend(body);
        let _ = decode(&data);
        let _ = decode_with_limits(&data, &tight());
    }

    #[test]
    fn damaged_pickles_never_panic(
        v in value(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut data = encode(&v).unwrap();
        for (at, byte, how) in edits {
            let i = at.index(data.len());
            match how {
                0 => data[i] = byte,
                1 => data.insert(i, byte),
                _ => data.truncate(i),
            }
            if data.is_empty() {
                break;
            }
        }
        let _ = decode(&data);
        let _ = decode_with_limits(&data, &tight());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn values_round_trip(v in value()) {
        let bytes = encode(&v).unwrap();
        prop_assert_eq!(decode(&bytes).unwrap(), v);
    }
}

#[test]
fn many_repeated_strings_use_long_memo_keys() {
    let words: Vec<Value> = (0..600).map(|i| Value::Str(format!("w{i}"))).collect();
    let v = Value::List(words.iter().chain(words.iter()).cloned().collect());
    let bytes = encode(&v).unwrap();
    assert!(bytes.contains(&b'j'), "LONG_BINGET expected");
    assert_eq!(decode(&bytes).unwrap(), v);
}

#[test]
fn long_containers_are_written_in_batches() {
    let v = Value::Tuple(vec![
        Value::List((0..2500).map(Value::Int).collect()),
        Value::Dict((0..2500).map(|i| (Value::Int(i), Value::None)).collect()),
        Value::Set((0..2500).map(Value::Int).collect()),
        Value::Str("s".repeat(70_000)),
        Value::Bytes(vec![7; 300]),
    ]);
    assert_eq!(decode(&encode(&v).unwrap()).unwrap(), v);
}
