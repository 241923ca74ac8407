//! Cross-checks the pickle codec against the real CPython `pickle` module: Python pickles a
//! corpus with protocols 2–5, Rust reads each, checks the shape of several, writes them back,
//! and Python checks that `pickle.loads` of our bytes equals the original.
//!
//! Needs `python3` on PATH; set `DISPY_SKIP_PYTHON_TESTS=1` to skip where there is none.

use dispy_core::pickle::{decode, encode, Construct, Value};
use std::io::Write;
use std::process::{Command, Stdio};

/// The corpus lives in one script, so the checking side rebuilds exactly what was dumped.
/// `_JobReply` sits in a stand-in `dispy` module, as the real one is not installed here.
const SCRIPT: &str = r#"
import math, os, pickle, sys, types

dispy = types.ModuleType("dispy")
sys.modules["dispy"] = dispy

class _JobReply:
    def __init__(self, **kw):
        self.__dict__.update(kw)

_JobReply.__module__ = "dispy"
dispy._JobReply = _JobReply

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

shared = [1, 2]
STAT = os.stat_result((0o100644, 2, 3, 1, 1000, 1000, 4096, 1, 2, 3),
                      {"st_atime": 1.5, "st_mtime": 2.5, "st_ctime": 3.5,
                       "st_atime_ns": 1500000000, "st_mtime_ns": 2500000000,
                       "st_ctime_ns": 3500000000, "st_blksize": 4096, "st_blocks": 8,
                       "st_rdev": 0})

CORPUS = {
    "none": None,
    "bools": [True, False],
    "ints": [0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**31, 2**63 - 1, -2**63,
             2**63, -2**63 - 1, 2**64, 2**100, -2**100, 10**300],
    "floats": [0.0, -0.0, 1.5, 1e308, -1e308, 5e-324, math.inf, -math.inf],
    "strs": ["", "a", "héllo wörld €", "日本語", "\U0001f600", "x" * 300],
    "bytes": [b"", b"\x00\xff", bytes(range(256)), b"y" * 70000],
    "bytearray": bytearray(b"abc\x00\xff"),
    "empty_bytearray": bytearray(),
    "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
    "dict_keys": {1: "one", (1, "a"): [1], "k": {"nested": (None,)}, -5: 2**70, 1.5: b"x",
                  None: True, frozenset({1}): 0},
    "set": {1, "a", (2, 3)},
    "frozenset": frozenset({"x", 4}),
    "empty_set": set(),
    "empty_frozenset": frozenset(),
    "nested": {"a": [{"b": [(1, [2, {"c": None}])]}]},
    "shared": [shared, shared, {"s": shared}],
    "point": Point(1, [2, 3]),
    "stat": STAT,
    "job_reply": _JobReply(uid=140234567890123, hash="9f3a1c", ip_addr="10.0.0.2", status=7,
                           result=pickle.dumps(42), stdout="out\n", stderr="", exception=None,
                           start_time=1.25, end_time=2.5),
    "class_ref": Point,
    "builtin_ref": len,
    "big_list": list(range(2500)),
    "big_dict": {i: str(i) for i in range(1200)},
}

# Built by the Rust side with Value::instance, checked here.
RUST_JOB_REPLY = dict(uid=140234567890123, hash="abc", ip_addr="127.0.0.1", status=7,
                      result=pickle.dumps(42, protocol=4), stdout="out", stderr=b"err",
                      exception=None, start_time=1.5, end_time=2.5)

def same(a, b):
    if isinstance(b, (Point, _JobReply)):
        return type(a).__name__ == type(b).__name__ and a.__dict__ == b.__dict__
    if isinstance(b, os.stat_result):
        return (type(a) is os.stat_result and a == b
                and all(getattr(a, k) == getattr(b, k) for k in
                        ("st_mtime", "st_mtime_ns", "st_blksize", "st_blocks")))
    if isinstance(b, type) or callable(b):
        return a is b
    if isinstance(b, dict):
        return a == b and list(a) == list(b)
    if type(a) is not type(b):
        return False
    return a == b and (not isinstance(b, list) or repr(a) == repr(b) or "set" in repr(b))

def main():
    if sys.argv[1] == "dump":
        for name, obj in CORPUS.items():
            for proto in (2, 3, 4, 5):
                print(name, proto, pickle.dumps(obj, protocol=proto).hex())
        return
    failed = 0
    checked = 0
    for line in sys.stdin:
        name, proto, data = line.split()
        got = pickle.loads(bytes.fromhex(data))
        if name == "rust_job_reply":
            ok = type(got) is _JobReply and got.__dict__ == RUST_JOB_REPLY \
                and pickle.loads(got.result) == 42
        else:
            ok = same(got, CORPUS[name])
        checked += 1
        if not ok:
            failed += 1
            print(f"MISMATCH {name} protocol {proto}: {got!r:.200}")
    print(f"checked {checked}")
    sys.exit(1 if failed else 0)

main()
"#;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn python_available() -> bool {
    if Command::new("python3").arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("DISPY_SKIP_PYTHON_TESTS").is_some(),
        "python3 is not on PATH; install it or set DISPY_SKIP_PYTHON_TESTS=1"
    );
    false
}

/// Checks the shape Rust sees for a few corpus entries, for every protocol.
fn check_shape(name: &str, proto: u32, v: &Value) {
    let ctx = format!("{name} protocol {proto}: {v:?}");
    match name {
        "ints" => {
            let items = v.as_seq().expect(&ctx);
            assert_eq!(items[2], Value::Int(-1), "{ctx}");
            assert_eq!(items[10], Value::Int(i64::MAX), "{ctx}");
            assert_eq!(items[11], Value::Int(i64::MIN), "{ctx}");
            assert_eq!(items[12], Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0x80, 0]));
            assert_eq!(
                items[13],
                Value::BigInt(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff])
            );
        }
        "floats" => {
            let items = v.as_seq().expect(&ctx);
            assert_eq!(
                items[1].as_float().map(f64::to_bits),
                Some((-0.0f64).to_bits())
            );
            assert_eq!(items[3], Value::Float(1e308));
        }
        "strs" => assert_eq!(v.as_seq().unwrap()[2].as_str(), Some("héllo wörld €")),
        "bytes" => assert_eq!(v.as_seq().unwrap()[1].as_bytes(), Some(&[0u8, 0xff][..])),
        "bytearray" => assert_eq!(v, &Value::ByteArray(b"abc\x00\xff".to_vec()), "{ctx}"),
        "tuples" => {
            let lens: Vec<usize> = v
                .as_seq()
                .unwrap()
                .iter()
                .map(|t| match t {
                    Value::Tuple(items) => items.len(),
                    _ => panic!("{ctx}"),
                })
                .collect();
            assert_eq!(lens, [0, 1, 2, 3, 4]);
        }
        "set" => assert!(matches!(v, Value::Set(s) if s.len() == 3), "{ctx}"),
        "frozenset" => assert!(matches!(v, Value::FrozenSet(s) if s.len() == 2), "{ctx}"),
        "dict_keys" => {
            let d = v.as_dict().expect(&ctx);
            assert_eq!(d[0], (Value::Int(1), Value::from("one")));
            assert_eq!(d[1].0, Value::Tuple(vec![Value::Int(1), Value::from("a")]));
        }
        "shared" => {
            let items = v.as_seq().unwrap();
            assert_eq!(items[0], items[1]);
            assert_eq!(items[2].as_dict_get("s"), Some(&items[0]));
        }
        "point" => {
            let o = v.as_object().expect(&ctx);
            assert_eq!((o.module.as_str(), o.name.as_str()), ("__main__", "Point"));
            assert_eq!(o.construct, Construct::NewObj);
            assert!(o.args.is_empty());
            assert_eq!(v.attr("x"), Some(&Value::Int(1)));
        }
        "stat" => {
            let o = v.as_object().expect(&ctx);
            assert_eq!((o.module.as_str(), o.name.as_str()), ("os", "stat_result"));
            assert_eq!(o.construct, Construct::Reduce);
            assert!(
                matches!(&o.args[0], Value::Tuple(t) if t.len() == 10),
                "{ctx}"
            );
            assert_eq!(
                o.args[1].as_dict_get("st_mtime_ns"),
                Some(&Value::Int(2_500_000_000))
            );
        }
        "job_reply" => {
            assert_eq!(v.class_path(), Some(("dispy", "_JobReply")));
            assert_eq!(v.attr("uid"), Some(&Value::Int(140234567890123)));
            assert_eq!(v.attr("hash").and_then(Value::as_str), Some("9f3a1c"));
            let result = v.attr("result").and_then(Value::as_bytes).expect(&ctx);
            assert_eq!(decode(result).unwrap(), Value::Int(42));
        }
        "class_ref" => assert_eq!(
            v,
            &Value::Global {
                module: "__main__".into(),
                name: "Point".into()
            }
        ),
        "builtin_ref" => assert_eq!(
            v,
            &Value::Global {
                module: "builtins".into(),
                name: "len".into()
            }
        ),
        _ => {}
    }
}

#[test]
fn python_pickles_round_trip_through_rust() {
    if !python_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dispy-pickle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("corpus.py");
    std::fs::write(&script, SCRIPT).unwrap();

    let dump = Command::new("python3")
        .arg(&script)
        .arg("dump")
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let mut ours = String::new();
    let mut count = 0;
    for line in String::from_utf8(dump.stdout).unwrap().lines() {
        let mut parts = line.split(' ');
        let (name, proto, data) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let proto: u32 = proto.parse().unwrap();
        let v = decode(&unhex(data)).unwrap_or_else(|e| panic!("{name} protocol {proto}: {e}"));
        check_shape(name, proto, &v);
        let encoded = encode(&v).unwrap_or_else(|e| panic!("{name} protocol {proto}: {e}"));
        assert_eq!(
            decode(&encoded).unwrap(),
            v,
            "{name} protocol {proto}: not an identity"
        );
        ours.push_str(&format!("{name} {proto} {}\n", hex(&encoded)));
        count += 1;
    }
    assert_eq!(count, 23 * 4);

    let result = decode(&encode(&Value::Int(42)).unwrap()).unwrap();
    assert_eq!(result, Value::Int(42));
    let reply = Value::instance(
        "dispy",
        "_JobReply",
        [
            ("uid", Value::Int(140234567890123)),
            ("hash", "abc".into()),
            ("ip_addr", "127.0.0.1".into()),
            ("status", Value::Int(7)),
            ("result", Value::bytes(encode(&Value::Int(42)).unwrap())),
            ("stdout", "out".into()),
            ("stderr", Value::bytes(*b"err")),
            ("exception", Value::None),
            ("start_time", Value::Float(1.5)),
            ("end_time", Value::Float(2.5)),
        ],
    );
    ours.push_str(&format!(
        "rust_job_reply 4 {}\n",
        hex(&encode(&reply).unwrap())
    ));

    let mut check = Command::new("python3")
        .arg(&script)
        .arg("check")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(ours.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python rejected our pickles:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("checked {}", count + 1)),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
