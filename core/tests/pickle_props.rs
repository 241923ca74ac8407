//! Property tests of the pickle codec; they double as its fuzz target. Arbitrary and
//! opcode-shaped bytes must never panic the reader, whatever it reads fits its budget, and any
//! encodable tree must read back unchanged.

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
        budget: 8192,
    }
}

/// Reads `data` under the default limits, the tight ones and a budget that a few shared
/// references exhaust; whatever is read fits its budget.
fn read_within_budget(data: &[u8]) -> Result<(), TestCaseError> {
    for limits in [Limits::default(), tight(), Limits::with_budget(2000)] {
        if let Ok(v) = decode_with_limits(data, &limits) {
            let size = v.materialized_size();
            prop_assert!(
                size <= limits.budget,
                "read {size} over a budget of {}",
                limits.budget
            );
        }
    }
    Ok(())
}

/// Pickles that memoize, fetch and nest, with well-formed arguments, so that generated input
/// gets far enough to share values and meet the budget rather than stop at a bad length or a
/// missing memo key: eight strings are memoized first, and the opcodes run inside a list
/// that collects what they leave on the stack.
fn memo_heavy() -> impl Strategy<Value = Vec<u8>> {
    let op = prop_oneof![
        1 => (0u8..40).prop_map(|n| {
            let mut b = vec![0x8c, n];
            b.resize(2 + usize::from(n), b'x');
            b
        }),
        1 => (0u16..300).prop_map(|n| {
            let mut b = vec![b'B'];
            b.extend(u32::from(n).to_le_bytes());
            b.resize(5 + usize::from(n), 0);
            b
        }),
        1 => Just(vec![0x94]),
        8 => (0u8..8).prop_map(|k| vec![b'h', k]),
        1 => (0u32..8).prop_map(|k| [&b"j"[..], &k.to_le_bytes()].concat()),
        2 => proptest::sample::select(&b"\x85\x86\x87\x85\x86\x872N"[..]).prop_map(|b| vec![b]),
        1 => proptest::sample::select(&b"](ealt0"[..]).prop_map(|b| vec![b]),
    ];
    vec(op, 0..120).prop_map(|ops| {
        let mut data = vec![0x80, 4];
        for k in 0..8u8 {
            data.extend([0x8c, 10 * k]);
            data.resize(data.len() + usize::from(10 * k), b'a' + k);
            data.extend([0x94, b'0']);
        }
        data.extend(b"](");
        data.extend(ops.concat());
        data.extend(b"e.");
        data
    })
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
        read_within_budget(&data)?;
    }

    #[test]
    fn opcode_shaped_bytes_never_panic(
        proto in 0u8..6,
        body in vec(prop_oneof![3 => proptest::sample::select(OPCODES), 1 => any::<u8>()], 0..256),
    ) {
        let mut data = vec![0x80, proto];
        data.extend(body);
        read_within_budget(&data)?;
    }

    #[test]
    fn shared_references_never_read_past_the_budget(data in memo_heavy()) {
        read_within_budget(&data)?;
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
        read_within_budget(&data)?;
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
