//! Python pickle as data: the subset dispy 4.15 clients send and expect back.
//!
//! dispy serialises every message with `pickle.dumps(obj, HIGHEST_PROTOCOL)` and reads replies
//! with `pickle.loads`. The node must read `_Compute`, `_XferFile`, `_DispyJob_` and
//! `os.stat_result` records and write `_JobReply` records, but must never run anything a peer
//! sent. So this is a pickle *reader* that builds a [`Value`] tree instead of calling
//! constructors: a class is only its `(module, name)`, an instance is an [`Object`] record of
//! how it was built (`NEWOBJ`/`REDUCE` arguments, `BUILD` state). User arguments and results
//! are nested pickle bytes inside those records and stay opaque here.
//!
//! Reading accepts protocols 0–5 except the opcodes dispy never produces (persistent ids,
//! the copyreg extension registry, out-of-band buffers, protocol-0 `STRING`/`INST`/`OBJ`).
//! Writing produces protocol 4, which every Python 3.4+ client loads.
//!
//! Shared references are resolved while reading, so a value referenced twice appears twice in
//! the tree (identity is lost, equality is kept); a structure that contains itself is refused.
//! Because each reference becomes a copy, a small pickle can stand for a huge tree: the
//! decoder prices the tree ([`Value::materialized_size`]) before building it, and counts what
//! it holds while reading, against one [`Limits::budget`].

use std::cell::Cell;
use std::collections::HashMap;
use std::mem::size_of;

use crate::protocol::DEFAULT_MAX_FRAME;

/// A Python object as data. Nothing here refers to live Python objects.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    /// Any int that fits in 64 bits.
    Int(i64),
    /// An int outside the `i64` range, as minimal two's-complement little-endian bytes —
    /// exactly what `LONG1`/`LONG4` carry, so it round-trips without arithmetic.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    /// `bytes`, and Python 2 `str` (`BINSTRING`), whose text encoding is unknown.
    Bytes(Vec<u8>),
    ByteArray(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion order is kept; keys may be any hashable value.
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    FrozenSet(Vec<Value>),
    /// A reference to a class or function, e.g. a type passed as an argument.
    Global {
        module: String,
        name: String,
    },
    Object(Box<Object>),
}

/// A class instance (or any reduce call) recorded as the steps that rebuild it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub module: String,
    pub name: String,
    pub construct: Construct,
    /// Positional arguments of `cls.__new__` (`NEWOBJ`) or of the callable (`REDUCE`).
    pub args: Vec<Value>,
    /// Items appended after construction (list subclasses, `APPEND(S)` on the object).
    pub list_items: Vec<Value>,
    /// Items set after construction (dict subclasses such as `OrderedDict`).
    pub dict_items: Vec<(Value, Value)>,
    /// The `BUILD` argument: usually the instance `__dict__`, or `(dict, slots)`.
    pub state: Option<Value>,
}

/// How an [`Object`] was created, kept so that writing it back replays the same opcode.
#[derive(Debug, Clone, PartialEq)]
pub enum Construct {
    /// `cls.__new__(cls, *args)`: ordinary instances under protocol 2+.
    NewObj,
    /// `cls.__new__(cls, *args, **kwargs)`.
    NewObjEx { kwargs: Vec<(Value, Value)> },
    /// `callable(*args)`: `__reduce__` results such as `os.stat_result`.
    Reduce,
}

/// Bounds on what one pickle may make us allocate or recurse into. Every bound is checked
/// before the allocation it guards.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted pickle, in bytes.
    pub max_input: usize,
    /// Deepest nesting of containers and objects in the result.
    pub max_depth: usize,
    /// Most memo entries.
    pub max_memo: usize,
    /// Most items in one tuple, list, dict, set or object argument list.
    pub max_container_len: usize,
    /// Most values built, counting every copy a shared reference expands into. Guards against
    /// small pickles that reference one list from itself a billion times over.
    pub max_values: usize,
    /// Most bytes decoding may materialize beyond the input itself: the tree it returns
    /// ([`Value::materialized_size`], which counts a string once per reference to it) plus
    /// what the reader holds on the way there (one node per value read, each reference it
    /// fetches or copies). Guards against one large string memoized once and fetched a
    /// million times, and bounds a decode's memory to the input and a small multiple of this.
    pub budget: usize,
}

impl Default for Limits {
    /// Generous for dispy messages, whose bulk (code, arguments, results) is strings and bytes;
    /// the budget is what one default-sized frame may carry.
    fn default() -> Self {
        Limits {
            max_input: 256 << 20,
            max_depth: 256,
            max_memo: 1 << 20,
            max_container_len: 1 << 20,
            max_values: 4 << 20,
            budget: DEFAULT_MAX_FRAME,
        }
    }
}

impl Limits {
    /// The default limits with another budget, e.g. a few KiB for a peer not yet
    /// authenticated, or the node's `--max-frame` after.
    pub fn with_budget(budget: usize) -> Limits {
        Limits {
            budget,
            ..Limits::default()
        }
    }
}

/// Why a pickle was refused. Offsets are of the opcode byte, from the start of the input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("pickle of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("pickle truncated: {opcode} at offset {offset} needs {needed} more bytes")]
    Truncated {
        opcode: &'static str,
        offset: usize,
        needed: usize,
    },
    #[error("pickle ended at offset {offset} without STOP")]
    NoStop { offset: usize },
    #[error("unknown pickle opcode 0x{byte:02x} at offset {offset}")]
    UnknownOpcode { byte: u8, offset: usize },
    #[error("pickle protocol {proto} at offset {offset} is not supported (0 to 5 are)")]
    UnsupportedProtocol { proto: u8, offset: usize },
    #[error("{opcode} at offset {offset} is not supported: {why}")]
    Unsupported {
        opcode: &'static str,
        offset: usize,
        why: &'static str,
    },
    #[error("{opcode} at offset {offset}: stack underflow")]
    StackUnderflow { opcode: &'static str, offset: usize },
    #[error("{opcode} at offset {offset}: no MARK to pop")]
    NoMark { opcode: &'static str, offset: usize },
    #[error("{opcode} at offset {offset}: memo key {key} was never stored")]
    MemoMissing {
        opcode: &'static str,
        offset: usize,
        key: u64,
    },
    #[error("{opcode} at offset {offset}: memo exceeds {limit} entries")]
    MemoFull {
        opcode: &'static str,
        offset: usize,
        limit: usize,
    },
    #[error("{opcode} at offset {offset}: container exceeds {limit} items")]
    ContainerTooLong {
        opcode: &'static str,
        offset: usize,
        limit: usize,
    },
    #[error("pickle nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("pickle expands to more than {limit} values")]
    TooManyValues { limit: usize },
    #[error("pickle too large: it would materialize more than {budget} bytes (the decode budget)")]
    OverBudget { budget: usize },
    #[error("pickle contains a structure that refers to itself, which cannot be represented")]
    Recursive,
    #[error("{opcode} at offset {offset}: {what}")]
    Invalid {
        opcode: &'static str,
        offset: usize,
        what: String,
    },
}

/// Why a [`Value`] could not be written as a pickle Python would load.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("value nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("a {kind} cannot be a dict key or set item: Python would refuse it as unhashable")]
    Unhashable { kind: &'static str },
}

/// Reads one pickle with [`Limits::default`]. Bytes after `STOP` are ignored, as
/// `pickle.loads` does.
pub fn decode(data: &[u8]) -> Result<Value, DecodeError> {
    decode_with_limits(data, &Limits::default())
}

/// Reads one pickle with the default limits but `budget` ([`Limits::budget`]).
pub fn decode_within(data: &[u8], budget: usize) -> Result<Value, DecodeError> {
    decode_with_limits(data, &Limits::with_budget(budget))
}

/// Reads one pickle within `limits`.
pub fn decode_with_limits(data: &[u8], limits: &Limits) -> Result<Value, DecodeError> {
    if data.len() > limits.max_input {
        return Err(DecodeError::TooLarge {
            size: data.len(),
            limit: limits.max_input,
        });
    }
    let mut m = Machine {
        limits,
        data,
        pos: 0,
        op: 0,
        at: 0,
        proto: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        spent: Cell::new(0),
    };
    let root = m.run()?;
    let mut costs = vec![None; m.nodes.len()];
    let mut on_path = vec![false; m.nodes.len()];
    m.measure(root, 0, &mut costs, &mut on_path)?;
    Ok(m.materialize(root))
}

/// A hostile pickle, for tests of the decoder's budget: a list of `refs` references to one
/// memoized string of `len` bytes (each after the first a `BINGET`), `len × refs` bytes
/// once every reference is a copy, in about `len + 2 × refs` bytes of input.
pub fn memo_bomb(len: usize, refs: usize) -> Vec<u8> {
    memo_bomb_with(op::BINUNICODE, len, refs, &[op::BINGET, 0])
}

/// [`memo_bomb`] with the leaf's opcode (`X` str, `B` bytes) and the reference's (`h\0`,
/// `j\0\0\0\0`) given.
fn memo_bomb_with(leaf: u8, len: usize, refs: usize, get: &[u8]) -> Vec<u8> {
    let mut p = vec![op::PROTO, 4, op::EMPTY_LIST, op::MARK, leaf];
    p.extend(
        u32::try_from(len)
            .expect("a leaf under 4 GiB")
            .to_le_bytes(),
    );
    p.resize(p.len() + len, b'a');
    p.push(op::MEMOIZE);
    for _ in 1..refs {
        p.extend(get);
    }
    p.extend([op::APPENDS, op::STOP]);
    p
}

/// Writes `value` as a protocol-4 pickle (without frames, which are optional).
pub fn encode(value: &Value) -> Result<Vec<u8>, EncodeError> {
    let mut e = Encoder {
        out: vec![op::PROTO, 4],
        memo: HashMap::new(),
        memo_len: 0,
    };
    e.value(value, 0)?;
    e.out.push(op::STOP);
    Ok(e.out)
}

// ---------------------------------------------------------------------------------------------
// Helpers for building and reading records.

impl Value {
    /// An instance as Python's default `__reduce_ex__(2+)` writes it: `cls.__new__(cls)`, then
    /// `BUILD` with the attribute dict. This is how `dispy._JobReply` travels.
    pub fn instance<K: Into<String>>(
        module: &str,
        name: &str,
        attrs: impl IntoIterator<Item = (K, Value)>,
    ) -> Value {
        let state = attrs
            .into_iter()
            .map(|(k, v)| (Value::Str(k.into()), v))
            .collect();
        Value::Object(Box::new(Object {
            module: module.to_owned(),
            name: name.to_owned(),
            construct: Construct::NewObj,
            args: Vec::new(),
            list_items: Vec::new(),
            dict_items: Vec::new(),
            state: Some(Value::Dict(state)),
        }))
    }

    /// An int from two's-complement little-endian bytes (any length), as `Int` when it fits.
    pub fn int_from_le_bytes(bytes: &[u8]) -> Value {
        let mut b = bytes.to_vec();
        trim_twos_complement(&mut b);
        if b.len() <= 8 {
            let fill = if b.last().is_some_and(|x| x & 0x80 != 0) {
                0xff
            } else {
                0
            };
            let mut buf = [fill; 8];
            buf[..b.len()].copy_from_slice(&b);
            Value::Int(i64::from_le_bytes(buf))
        } else {
            Value::BigInt(b)
        }
    }

    pub fn bytes(b: impl Into<Vec<u8>>) -> Value {
        Value::Bytes(b.into())
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Value::None)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Ints and bools (a Python bool is an int); `None` for big ints.
    pub fn as_int(&self) -> Option<i64> {
        match *self {
            Value::Int(n) => Some(n),
            Value::Bool(b) => Some(b as i64),
            _ => None,
        }
    }

    /// Floats and ints, as Python's arithmetic would mix them.
    pub fn as_float(&self) -> Option<f64> {
        match *self {
            Value::Float(f) => Some(f),
            Value::Int(n) => Some(n as f64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// `bytes`, `bytearray` and Python 2 `str`.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) | Value::ByteArray(b) => Some(b),
            _ => None,
        }
    }

    /// Items of a list or tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The value under a str key of a dict.
    pub fn as_dict_get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// An attribute of an [`Object`] from its `BUILD` state (a dict, or the dict/slots pair
    /// that classes with `__slots__` produce), or a key of a plain dict.
    pub fn attr(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Dict(_) => self.as_dict_get(name),
            Value::Object(o) => match o.state.as_ref()? {
                d @ Value::Dict(_) => d.as_dict_get(name),
                Value::Tuple(t) if t.len() == 2 => {
                    t[0].as_dict_get(name).or_else(|| t[1].as_dict_get(name))
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// `module.name` of an object's class or of a global.
    pub fn class_path(&self) -> Option<(&str, &str)> {
        match self {
            Value::Object(o) => Some((&o.module, &o.name)),
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// The bytes this tree takes in memory, as [`Limits::budget`] counts them: every value's
    /// own size plus what it keeps on the heap (text, bytes, names, an object's record). A
    /// tree holds each shared reference as a full copy, and each copy counts.
    pub fn materialized_size(&self) -> usize {
        let mut size = 0usize;
        // A work list, not recursion: a value built in Rust may be deeper than the stack.
        let mut todo = vec![self];
        while let Some(v) = todo.pop() {
            size = size.saturating_add(size_of::<Value>() + v.payload_len());
            match v {
                Value::Tuple(items)
                | Value::List(items)
                | Value::Set(items)
                | Value::FrozenSet(items) => todo.extend(items),
                Value::Dict(pairs) => todo.extend(pairs.iter().flat_map(|(k, v)| [k, v])),
                Value::Object(o) => {
                    todo.extend(&o.args);
                    todo.extend(&o.list_items);
                    todo.extend(o.dict_items.iter().flat_map(|(k, v)| [k, v]));
                    if let Construct::NewObjEx { kwargs } = &o.construct {
                        todo.extend(kwargs.iter().flat_map(|(k, v)| [k, v]));
                    }
                    todo.extend(&o.state);
                }
                _ => {}
            }
        }
        size
    }

    /// The heap bytes this value holds itself, apart from the values it contains.
    fn payload_len(&self) -> usize {
        match self {
            Value::Str(s) => s.len(),
            Value::Bytes(b) | Value::ByteArray(b) | Value::BigInt(b) => b.len(),
            Value::Global { module, name } => module.len() + name.len(),
            Value::Object(o) => size_of::<Object>() + o.module.len() + o.name.len(),
            _ => 0,
        }
    }

    /// Python's name for the type, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::ByteArray(_) => "bytearray",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
            Value::FrozenSet(_) => "frozenset",
            Value::Global { .. } => "class",
            Value::Object(_) => "object",
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::None, Into::into)
    }
}

/// Drops redundant sign-extension bytes; an empty result means zero.
fn trim_twos_complement(b: &mut Vec<u8>) {
    while let Some(&last) = b.last() {
        let below = if b.len() >= 2 { b[b.len() - 2] } else { 0 };
        let redundant = (last == 0 && below & 0x80 == 0 && b.len() >= 2)
            || (last == 0xff && below & 0x80 != 0 && b.len() >= 2)
            || (last == 0 && b.len() == 1);
        if !redundant {
            break;
        }
        b.pop();
    }
}

/// Most digits in a protocol-0 `INT`/`LONG` literal: CPython's own
/// `sys.int_info.default_max_str_digits` (3.11+), past which `pickle.loads` raises too.
/// Conversion is quadratic in the digits, so this is also what keeps one literal cheap.
const MAX_DECIMAL_DIGITS: usize = 4300;

/// A decimal literal (protocol-0 `INT`/`LONG`) of up to [`MAX_DECIMAL_DIGITS`] digits.
fn parse_decimal_int(text: &str) -> Option<Value> {
    if let Ok(n) = text.parse::<i64>() {
        return Some(Value::Int(n));
    }
    let (neg, digits) = match text.as_bytes() {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        rest => (false, rest),
    };
    if digits.is_empty()
        || digits.len() > MAX_DECIMAL_DIGITS
        || !digits.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    // The magnitude in little-endian 64-bit limbs, taking 19 digits (< 2^64) at a time.
    let mut limbs: Vec<u64> = Vec::new();
    for chunk in digits.chunks(19) {
        let scale = 10u128.pow(chunk.len() as u32);
        let mut carry = chunk.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        for limb in limbs.iter_mut() {
            let x = u128::from(*limb) * scale + u128::from(carry);
            *limb = x as u64;
            carry = (x >> 64) as u64;
        }
        if carry > 0 {
            limbs.push(carry);
        }
    }
    let mut mag: Vec<u8> = limbs.iter().flat_map(|l| l.to_le_bytes()).collect();
    mag.push(0);
    if neg {
        let mut carry = 1u16;
        for byte in mag.iter_mut() {
            let x = u16::from(!*byte) + carry;
            *byte = x as u8;
            carry = x >> 8;
        }
    }
    Some(Value::int_from_le_bytes(&mag))
}

/// Python's `raw-unicode-escape`, which protocol-0 `UNICODE` uses: `\uXXXX` and `\UXXXXXXXX`
/// escapes, every other byte a Latin-1 character.
fn raw_unicode_escape(b: &[u8]) -> Option<String> {
    let mut s = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let width = match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if width > 0 && i + 2 + width <= b.len() {
            let hex = std::str::from_utf8(&b[i + 2..i + 2 + width]).ok()?;
            s.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
            i += 2 + width;
        } else {
            s.push(char::from(b[i]));
            i += 1;
        }
    }
    Some(s)
}

// ---------------------------------------------------------------------------------------------
// Opcodes.

mod op {
    /// Defines each opcode constant and the name errors report for it.
    macro_rules! opcodes {
        ($($name:ident = $byte:expr,)*) => {
            $(pub const $name: u8 = $byte;)*

            pub fn name(op: u8) -> &'static str {
                match op {
                    $($name => stringify!($name),)*
                    _ => "unknown opcode",
                }
            }
        };
    }

    opcodes! {
        MARK = b'(',
        STOP = b'.',
        POP = b'0',
        POP_MARK = b'1',
        DUP = b'2',
        FLOAT = b'F',
        INT = b'I',
        BININT = b'J',
        BININT1 = b'K',
        LONG = b'L',
        BININT2 = b'M',
        NONE = b'N',
        PERSID = b'P',
        BINPERSID = b'Q',
        REDUCE = b'R',
        STRING = b'S',
        BINSTRING = b'T',
        SHORT_BINSTRING = b'U',
        UNICODE = b'V',
        BINUNICODE = b'X',
        APPEND = b'a',
        BUILD = b'b',
        GLOBAL = b'c',
        DICT = b'd',
        EMPTY_DICT = b'}',
        APPENDS = b'e',
        GET = b'g',
        BINGET = b'h',
        INST = b'i',
        LONG_BINGET = b'j',
        LIST = b'l',
        EMPTY_LIST = b']',
        OBJ = b'o',
        PUT = b'p',
        BINPUT = b'q',
        LONG_BINPUT = b'r',
        SETITEM = b's',
        TUPLE = b't',
        EMPTY_TUPLE = b')',
        SETITEMS = b'u',
        BINFLOAT = b'G',
        PROTO = 0x80,
        NEWOBJ = 0x81,
        EXT1 = 0x82,
        EXT2 = 0x83,
        EXT4 = 0x84,
        TUPLE1 = 0x85,
        TUPLE2 = 0x86,
        TUPLE3 = 0x87,
        NEWTRUE = 0x88,
        NEWFALSE = 0x89,
        LONG1 = 0x8a,
        LONG4 = 0x8b,
        BINBYTES = b'B',
        SHORT_BINBYTES = b'C',
        SHORT_BINUNICODE = 0x8c,
        BINUNICODE8 = 0x8d,
        BINBYTES8 = 0x8e,
        EMPTY_SET = 0x8f,
        ADDITEMS = 0x90,
        FROZENSET = 0x91,
        NEWOBJ_EX = 0x92,
        STACK_GLOBAL = 0x93,
        MEMOIZE = 0x94,
        FRAME = 0x95,
        BYTEARRAY8 = 0x96,
        NEXT_BUFFER = 0x97,
        READONLY_BUFFER = 0x98,
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder.
//
// Pickle mutates containers after memoizing them (`EMPTY_LIST MEMOIZE ... APPENDS`), so a
// memo entry must see later appends. The machine therefore builds an arena of nodes that refer
// to each other by index; memo and stack hold indices; the tree is copied out at `STOP`.

type Id = usize;

enum Node {
    /// Leaves: never refer to other nodes.
    Leaf(Value),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    FrozenSet(Vec<Id>),
    Object(Box<ObjNode>),
}

struct ObjNode {
    module: String,
    name: String,
    construct: NodeConstruct,
    args: Vec<Id>,
    list_items: Vec<Id>,
    dict_items: Vec<(Id, Id)>,
    state: Option<Id>,
}

enum NodeConstruct {
    NewObj,
    NewObjEx(Vec<(Id, Id)>),
    Reduce,
}

struct Machine<'a> {
    limits: &'a Limits,
    data: &'a [u8],
    pos: usize,
    /// Opcode being executed and its offset, for error messages.
    op: u8,
    at: usize,
    proto: u8,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    /// Stack heights at each MARK; items above the top mark belong to it.
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// Bytes the reader has taken so far (nodes, references, copies), against
    /// [`Limits::budget`]. A `Cell` so that lookups can pay while they borrow the nodes they
    /// copy from.
    spent: Cell<usize>,
}

/// What a node costs once copied out as a tree; see [`Machine::measure`].
#[derive(Clone, Copy)]
struct Cost {
    /// Bytes, as [`Value::materialized_size`] counts them.
    size: usize,
    /// Values in the tree, against [`Limits::max_values`].
    values: usize,
    /// Levels of nesting below the node: 0 for a leaf or an empty container.
    height: usize,
}

impl<'a> Machine<'a> {
    fn opname(&self) -> &'static str {
        op::name(self.op)
    }

    fn underflow(&self) -> DecodeError {
        DecodeError::StackUnderflow {
            opcode: self.opname(),
            offset: self.at,
        }
    }

    fn truncated(&self, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            opcode: self.opname(),
            offset: self.at,
            needed,
        }
    }

    fn too_long(&self) -> DecodeError {
        DecodeError::ContainerTooLong {
            opcode: self.opname(),
            offset: self.at,
            limit: self.limits.max_container_len,
        }
    }

    fn invalid(&self, what: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            opcode: self.opname(),
            offset: self.at,
            what: what.into(),
        }
    }

    fn unsupported(&self, why: &'static str) -> DecodeError {
        DecodeError::Unsupported {
            opcode: self.opname(),
            offset: self.at,
            why,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(self.truncated(n - left));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    /// A length prefix that must fit in what is left of the input.
    fn take_len(&mut self, width: usize) -> Result<usize, DecodeError> {
        let mut buf = [0u8; 8];
        buf[..width].copy_from_slice(self.take(width)?);
        let n = u64::from_le_bytes(buf);
        usize::try_from(n).map_err(|_| self.invalid(format!("length {n} does not fit in memory")))
    }

    /// A newline-terminated argument of the protocol-0 opcodes.
    fn raw_line(&mut self) -> Result<&'a [u8], DecodeError> {
        let data = self.data;
        let rest = &data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.truncated(1));
        };
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn int_literal(&self, text: &str) -> Result<Value, DecodeError> {
        parse_decimal_int(text).ok_or_else(|| {
            let digits = text.trim_start_matches(['-', '+']).len();
            if digits > MAX_DECIMAL_DIGITS {
                self.invalid(format!(
                    "int literal of {digits} digits; Python itself reads at most \
                     {MAX_DECIMAL_DIGITS}"
                ))
            } else {
                self.invalid("bad int literal")
            }
        })
    }

    fn line(&mut self) -> Result<&'a str, DecodeError> {
        let raw = self.raw_line()?;
        std::str::from_utf8(raw).map_err(|_| self.invalid("argument is not ASCII text"))
    }

    fn alloc(&mut self, node: Node) -> Result<Id, DecodeError> {
        if self.nodes.len() >= self.limits.max_values {
            return Err(DecodeError::TooManyValues {
                limit: self.limits.max_values,
            });
        }
        let record = match node {
            Node::Object(_) => size_of::<ObjNode>(),
            _ => 0,
        };
        self.spend(size_of::<Node>() + record)?;
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, node: Node) -> Result<(), DecodeError> {
        let id = self.alloc(node)?;
        self.stack.push(id);
        Ok(())
    }

    fn push_leaf(&mut self, v: Value) -> Result<(), DecodeError> {
        self.push(Node::Leaf(v))
    }

    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id, DecodeError> {
        if self.stack.len() <= self.base() {
            return Err(self.underflow());
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> Result<Id, DecodeError> {
        if self.stack.len() <= self.base() {
            return Err(self.underflow());
        }
        Ok(*self.stack.last().expect("checked above"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, DecodeError> {
        let Some(m) = self.marks.pop() else {
            return Err(DecodeError::NoMark {
                opcode: self.opname(),
                offset: self.at,
            });
        };
        let items = self.stack.split_off(m);
        self.check_len(items.len())?;
        Ok(items)
    }

    fn check_len(&self, n: usize) -> Result<(), DecodeError> {
        if n > self.limits.max_container_len {
            return Err(self.too_long());
        }
        Ok(())
    }

    fn pairs(&self, items: Vec<Id>) -> Result<Vec<(Id, Id)>, DecodeError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.invalid("odd number of items for key/value pairs"));
        }
        Ok(items.chunks(2).map(|c| (c[0], c[1])).collect())
    }

    fn memo_put(&mut self, key: u64) -> Result<(), DecodeError> {
        let id = self.top()?;
        if !self.memo.contains_key(&key) {
            if self.memo.len() >= self.limits.max_memo {
                return Err(DecodeError::MemoFull {
                    opcode: self.opname(),
                    offset: self.at,
                    limit: self.limits.max_memo,
                });
            }
            self.spend(size_of::<(u64, Id)>())?;
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), DecodeError> {
        let Some(&id) = self.memo.get(&key) else {
            return Err(DecodeError::MemoMissing {
                opcode: self.opname(),
                offset: self.at,
                key,
            });
        };
        self.spend(size_of::<Id>())?;
        self.stack.push(id);
        Ok(())
    }

    fn leaf_str(&self, id: Id) -> Option<&str> {
        match &self.nodes[id] {
            Node::Leaf(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// Pays `n` bytes for what the reader is about to hold. Every opcode may add a node or
    /// copy references, so without this a pickle could copy one large memoized value once
    /// per opcode and never reach the tree's own price at `STOP`.
    fn spend(&self, n: usize) -> Result<(), DecodeError> {
        let spent = self.spent.get().saturating_add(n);
        if spent > self.limits.budget {
            return Err(DecodeError::OverBudget {
                budget: self.limits.budget,
            });
        }
        self.spent.set(spent);
        Ok(())
    }

    fn tuple_items(&self, id: Id, what: &str) -> Result<Vec<Id>, DecodeError> {
        match &self.nodes[id] {
            Node::Tuple(items) => {
                self.spend(items.len() * size_of::<Id>())?;
                Ok(items.clone())
            }
            _ => Err(self.invalid(format!("{what} is not a tuple"))),
        }
    }

    fn class_of(&self, id: Id) -> Result<(String, String), DecodeError> {
        match &self.nodes[id] {
            Node::Leaf(Value::Global { module, name }) => Ok((module.clone(), name.clone())),
            _ => Err(self.unsupported("the callable is not a global class or function")),
        }
    }

    /// Python 3 reads protocol 0–2 pickles with `fix_imports`, renaming Python 2 modules;
    /// this is the part of `_compat_pickle.IMPORT_MAPPING` Python 3 itself writes.
    fn global(&mut self, module: &str, name: &str) -> Result<(), DecodeError> {
        let module = match module {
            "__builtin__" if self.proto < 3 => "builtins",
            "copy_reg" if self.proto < 3 => "copyreg",
            m => m,
        };
        self.push_leaf(Value::Global {
            module: module.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Reductions that Python uses for plain data under older protocols (sets and bytes under
    /// protocol 2–3, bytearray under 2–4, `copyreg._reconstructor` under 0–1), turned back
    /// into data so the tree does not depend on the sender's protocol. `None`: not data.
    fn reduce_to_data(
        &self,
        module: &str,
        name: &str,
        args: &[Id],
    ) -> Result<Option<Node>, DecodeError> {
        let leaf = |id: Id| match &self.nodes[id] {
            Node::Leaf(v) => Some(v),
            _ => None,
        };
        // Each copy below is paid for before it is made.
        let list = |id: Id| match &self.nodes[id] {
            Node::List(items) => self
                .spend(items.len() * size_of::<Id>())
                .map(|()| Some(items.clone())),
            _ => Ok(None),
        };
        let latin1 = |id: Id, enc: Id| {
            let s = leaf(id).and_then(Value::as_str);
            let enc = leaf(enc).and_then(Value::as_str);
            let (Some(s), Some("latin1" | "latin-1")) = (s, enc) else {
                return Ok(None);
            };
            self.spend(s.len())?;
            Ok(s.chars()
                .map(|c| u8::try_from(c).ok())
                .collect::<Option<Vec<u8>>>())
        };
        let node = match (module, name, args) {
            ("builtins", "set", []) => Some(Node::Set(Vec::new())),
            ("builtins", "set", [l]) => list(*l)?.map(Node::Set),
            ("builtins", "frozenset", []) => Some(Node::FrozenSet(Vec::new())),
            ("builtins", "frozenset", [l]) => list(*l)?.map(Node::FrozenSet),
            ("builtins", "bytes", []) => Some(Node::Leaf(Value::Bytes(Vec::new()))),
            ("_codecs", "encode", [s, enc]) => {
                latin1(*s, *enc)?.map(|b| Node::Leaf(Value::Bytes(b)))
            }
            ("builtins", "bytearray", []) => Some(Node::Leaf(Value::ByteArray(Vec::new()))),
            ("builtins", "bytearray", [b]) => match leaf(*b) {
                Some(Value::Bytes(b)) => {
                    self.spend(b.len())?;
                    Some(Node::Leaf(Value::ByteArray(b.clone())))
                }
                _ => None,
            },
            ("builtins", "bytearray", [s, enc]) => {
                latin1(*s, *enc)?.map(|b| Node::Leaf(Value::ByteArray(b)))
            }
            ("copyreg", "_reconstructor", [cls, base, st]) => self.reconstructor(*cls, *base, *st),
            _ => None,
        };
        Ok(node)
    }

    /// `copyreg._reconstructor(cls, object, None)`: protocol 0–1's `cls.__new__(cls)`.
    fn reconstructor(&self, cls: Id, base: Id, state: Id) -> Option<Node> {
        let (module, name) = self.class_of(cls).ok()?;
        let leaf = |id: Id| match &self.nodes[id] {
            Node::Leaf(v) => Some(v),
            _ => None,
        };
        let base_is_object = matches!(leaf(base)?,
            Value::Global { module, name } if module == "builtins" && name == "object");
        if !base_is_object || !leaf(state)?.is_none() {
            return None;
        }
        Some(Node::Object(Box::new(ObjNode {
            module,
            name,
            construct: NodeConstruct::NewObj,
            args: Vec::new(),
            list_items: Vec::new(),
            dict_items: Vec::new(),
            state: None,
        })))
    }

    fn new_object(
        &mut self,
        cls: Id,
        construct: NodeConstruct,
        args: Vec<Id>,
    ) -> Result<(), DecodeError> {
        let (module, name) = self.class_of(cls)?;
        if matches!(construct, NodeConstruct::Reduce) {
            if let Some(node) = self.reduce_to_data(&module, &name, &args)? {
                return self.push(node);
            }
        }
        self.push(Node::Object(Box::new(ObjNode {
            module,
            name,
            construct,
            args,
            list_items: Vec::new(),
            dict_items: Vec::new(),
            state: None,
        })))
    }

    fn append(&mut self, items: Vec<Id>) -> Result<(), DecodeError> {
        let target = self.top()?;
        let (max, too_long) = (self.limits.max_container_len, self.too_long());
        let list = match &mut self.nodes[target] {
            Node::List(l) => l,
            Node::Object(o) => &mut o.list_items,
            _ => return Err(self.invalid("target is not a list")),
        };
        if list.len() + items.len() > max {
            return Err(too_long);
        }
        list.extend(items);
        Ok(())
    }

    fn set_items(&mut self, pairs: Vec<(Id, Id)>) -> Result<(), DecodeError> {
        let target = self.top()?;
        let (max, too_long) = (self.limits.max_container_len, self.too_long());
        let dict = match &mut self.nodes[target] {
            Node::Dict(d) => d,
            Node::Object(o) => &mut o.dict_items,
            _ => return Err(self.invalid("target is not a dict")),
        };
        if dict.len() + pairs.len() > max {
            return Err(too_long);
        }
        dict.extend(pairs);
        Ok(())
    }

    /// Runs opcodes until `STOP`; returns the node it leaves on top.
    fn run(&mut self) -> Result<Id, DecodeError> {
        loop {
            if self.pos >= self.data.len() {
                return Err(DecodeError::NoStop { offset: self.pos });
            }
            self.at = self.pos;
            self.op = self.data[self.pos];
            self.pos += 1;
            match self.op {
                op::PROTO => {
                    let [p] = self.take_array()?;
                    if p > 5 {
                        return Err(DecodeError::UnsupportedProtocol {
                            proto: p,
                            offset: self.at,
                        });
                    }
                    self.proto = p;
                }
                op::FRAME => {
                    // Frames only group reads; the length must still fit in the input.
                    let n = self.take_len(8)?;
                    if n > self.data.len() - self.pos {
                        return Err(self.truncated(n - (self.data.len() - self.pos)));
                    }
                }
                op::STOP => return self.pop(),
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    if self.stack.len() > self.base() {
                        self.stack.pop();
                    } else {
                        self.pop_mark()?;
                    }
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let id = self.top()?;
                    self.spend(size_of::<Id>())?;
                    self.stack.push(id);
                }
                op::MEMOIZE => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?;
                }
                op::PUT => {
                    let key = self
                        .line()?
                        .parse()
                        .map_err(|_| self.invalid("bad memo key"))?;
                    self.memo_put(key)?;
                }
                op::BINPUT => {
                    let [k] = self.take_array()?;
                    self.memo_put(k.into())?;
                }
                op::LONG_BINPUT => {
                    let k = u32::from_le_bytes(self.take_array()?);
                    self.memo_put(k.into())?;
                }
                op::GET => {
                    let key = self
                        .line()?
                        .parse()
                        .map_err(|_| self.invalid("bad memo key"))?;
                    self.memo_get(key)?;
                }
                op::BINGET => {
                    let [k] = self.take_array()?;
                    self.memo_get(k.into())?;
                }
                op::LONG_BINGET => {
                    let k = u32::from_le_bytes(self.take_array()?);
                    self.memo_get(k.into())?;
                }
                op::NONE => self.push_leaf(Value::None)?,
                op::NEWTRUE => self.push_leaf(Value::Bool(true))?,
                op::NEWFALSE => self.push_leaf(Value::Bool(false))?,
                op::INT => {
                    let v = match self.line()? {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        t => self.int_literal(t)?,
                    };
                    self.push_leaf(v)?;
                }
                op::LONG => {
                    let t = self.line()?;
                    let t = t.strip_suffix('L').unwrap_or(t);
                    let v = self.int_literal(t)?;
                    self.push_leaf(v)?;
                }
                op::BININT => {
                    let n = i32::from_le_bytes(self.take_array()?);
                    self.push_leaf(Value::Int(n.into()))?;
                }
                op::BININT1 => {
                    let [n] = self.take_array()?;
                    self.push_leaf(Value::Int(n.into()))?;
                }
                op::BININT2 => {
                    let n = u16::from_le_bytes(self.take_array()?);
                    self.push_leaf(Value::Int(n.into()))?;
                }
                op::LONG1 | op::LONG4 => {
                    let n = if self.op == op::LONG1 {
                        self.take_len(1)?
                    } else {
                        let n = i32::from_le_bytes(self.take_array()?);
                        usize::try_from(n).map_err(|_| self.invalid("negative length"))?
                    };
                    let v = Value::int_from_le_bytes(self.take(n)?);
                    self.push_leaf(v)?;
                }
                op::FLOAT => {
                    let f = self
                        .line()?
                        .parse()
                        .map_err(|_| self.invalid("bad float"))?;
                    self.push_leaf(Value::Float(f))?;
                }
                op::BINFLOAT => {
                    let f = f64::from_be_bytes(self.take_array()?);
                    self.push_leaf(Value::Float(f))?;
                }
                op::SHORT_BINUNICODE | op::BINUNICODE | op::BINUNICODE8 => {
                    let width = match self.op {
                        op::SHORT_BINUNICODE => 1,
                        op::BINUNICODE => 4,
                        _ => 8,
                    };
                    let n = self.take_len(width)?;
                    let s = std::str::from_utf8(self.take(n)?)
                        .map(str::to_owned)
                        .map_err(|_| {
                            self.invalid("string is not valid UTF-8 (lone surrogates are refused)")
                        })?;
                    self.push_leaf(Value::Str(s))?;
                }
                op::UNICODE => {
                    let raw = self.raw_line()?;
                    let s = raw_unicode_escape(raw).ok_or_else(|| self.invalid("bad escape"))?;
                    self.push_leaf(Value::Str(s))?;
                }
                op::SHORT_BINBYTES | op::BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                    let width = match self.op {
                        op::SHORT_BINBYTES => 1,
                        op::BINBYTES => 4,
                        _ => 8,
                    };
                    let n = self.take_len(width)?;
                    let b = self.take(n)?.to_vec();
                    if self.op == op::BYTEARRAY8 {
                        self.push_leaf(Value::ByteArray(b))?;
                    } else {
                        self.push_leaf(Value::Bytes(b))?;
                    }
                }
                op::SHORT_BINSTRING | op::BINSTRING => {
                    let n = if self.op == op::SHORT_BINSTRING {
                        self.take_len(1)?
                    } else {
                        let n = i32::from_le_bytes(self.take_array()?);
                        usize::try_from(n).map_err(|_| self.invalid("negative length"))?
                    };
                    let b = self.take(n)?.to_vec();
                    self.push_leaf(Value::Bytes(b))?;
                }
                op::EMPTY_TUPLE => self.push(Node::Tuple(Vec::new()))?,
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = usize::from(self.op - op::TUPLE1 + 1);
                    if self.stack.len() < self.base() + n {
                        return Err(self.underflow());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Node::Tuple(items))?;
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))?;
                }
                op::EMPTY_LIST => self.push(Node::List(Vec::new()))?,
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?;
                }
                op::APPEND => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                op::EMPTY_DICT => self.push(Node::Dict(Vec::new()))?,
                op::DICT => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Node::Dict(pairs))?;
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.set_items(pairs)?;
                }
                op::EMPTY_SET => self.push(Node::Set(Vec::new()))?,
                op::ADDITEMS => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    let (max, too_long) = (self.limits.max_container_len, self.too_long());
                    let Node::Set(set) = &mut self.nodes[target] else {
                        return Err(self.invalid("target is not a set"));
                    };
                    if set.len() + items.len() > max {
                        return Err(too_long);
                    }
                    set.extend(items);
                }
                op::FROZENSET => {
                    let items = self.pop_mark()?;
                    self.push(Node::FrozenSet(items))?;
                }
                op::GLOBAL => {
                    let module = self.line()?.to_owned();
                    let name = self.line()?.to_owned();
                    self.global(&module, &name)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(module), Some(name)) = (self.leaf_str(module), self.leaf_str(name))
                    else {
                        return Err(self.invalid("module and name must be str"));
                    };
                    let (module, name) = (module.to_owned(), name.to_owned());
                    self.global(&module, &name)?;
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let args = self.tuple_items(args, "REDUCE argument")?;
                    self.new_object(callable, NodeConstruct::Reduce, args)?;
                }
                op::NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let args = self.tuple_items(args, "NEWOBJ argument")?;
                    self.new_object(cls, NodeConstruct::NewObj, args)?;
                }
                op::NEWOBJ_EX => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let args = self.tuple_items(args, "NEWOBJ_EX argument")?;
                    let Node::Dict(kwargs) = &self.nodes[kwargs] else {
                        return Err(self.invalid("NEWOBJ_EX keywords are not a dict"));
                    };
                    self.spend(kwargs.len() * size_of::<(Id, Id)>())?;
                    let kwargs = kwargs.clone();
                    self.new_object(cls, NodeConstruct::NewObjEx(kwargs), args)?;
                }
                op::BUILD => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    let Node::Object(obj) = &mut self.nodes[target] else {
                        return Err(self.invalid("BUILD target is not a class instance"));
                    };
                    if obj.state.is_some() {
                        return Err(self.invalid("instance state set twice"));
                    }
                    obj.state = Some(state);
                }
                op::STRING => return Err(self.unsupported("protocol-0 quoted strings")),
                op::INST | op::OBJ => {
                    return Err(self.unsupported("protocol-0/1 instances; use protocol 2+"))
                }
                op::PERSID | op::BINPERSID => {
                    return Err(self.unsupported("persistent ids need the sender's resolver"))
                }
                op::EXT1 | op::EXT2 | op::EXT4 => {
                    return Err(self.unsupported("the copyreg extension registry is not shared"))
                }
                op::NEXT_BUFFER | op::READONLY_BUFFER => {
                    return Err(self.unsupported("out-of-band buffers are never sent by dispy"))
                }
                byte => {
                    return Err(DecodeError::UnknownOpcode {
                        byte,
                        offset: self.at,
                    })
                }
            }
        }
    }

    /// Prices the tree under `id` before [`Machine::materialize`] builds it: refuses cycles,
    /// nesting past `max_depth`, more than `max_values` values and a size that, with what the
    /// reader already holds, exceeds the budget. Each node is priced once and its cost
    /// kept, so a node referenced a million times costs a million additions, not a million
    /// walks. Costs are taken here at `STOP`, not while reading, because a container can still
    /// grow after it has been referenced (`EMPTY_LIST MEMOIZE ... BINGET ... APPENDS`).
    fn measure(
        &self,
        id: Id,
        depth: usize,
        costs: &mut [Option<Cost>],
        on_path: &mut [bool],
    ) -> Result<Cost, DecodeError> {
        // Deeper than allowed is refused before recursing, which bounds the recursion.
        if depth > self.limits.max_depth {
            return Err(DecodeError::TooDeep {
                limit: self.limits.max_depth,
            });
        }
        let cost = match costs[id] {
            Some(cost) => cost,
            None => {
                if on_path[id] {
                    return Err(DecodeError::Recursive);
                }
                on_path[id] = true;
                let cost = self.price(id, depth, costs, on_path)?;
                on_path[id] = false;
                costs[id] = Some(cost);
                cost
            }
        };
        if depth + cost.height > self.limits.max_depth {
            return Err(DecodeError::TooDeep {
                limit: self.limits.max_depth,
            });
        }
        Ok(cost)
    }

    /// The cost of one node from its children's, checked against the limits.
    fn price(
        &self,
        id: Id,
        depth: usize,
        costs: &mut [Option<Cost>],
        on_path: &mut [bool],
    ) -> Result<Cost, DecodeError> {
        // As Value::materialized_size counts the value this node becomes.
        let own = match &self.nodes[id] {
            Node::Leaf(v) => v.payload_len(),
            Node::Object(o) => size_of::<Object>() + o.module.len() + o.name.len(),
            _ => 0,
        };
        let mut cost = Cost {
            size: size_of::<Value>() + own,
            values: 1,
            height: 0,
        };
        for child in self.children(id) {
            let c = self.measure(child, depth + 1, costs, on_path)?;
            cost.size = cost.size.saturating_add(c.size);
            cost.values = cost.values.saturating_add(c.values);
            cost.height = cost.height.max(c.height + 1);
        }
        if cost.values > self.limits.max_values {
            return Err(DecodeError::TooManyValues {
                limit: self.limits.max_values,
            });
        }
        if cost.size.saturating_add(self.spent.get()) > self.limits.budget {
            return Err(DecodeError::OverBudget {
                budget: self.limits.budget,
            });
        }
        Ok(cost)
    }

    /// The nodes a node contains, in no particular order.
    fn children(&self, id: Id) -> Box<dyn Iterator<Item = Id> + '_> {
        fn pairs(p: &[(Id, Id)]) -> impl Iterator<Item = Id> + '_ {
            p.iter().flat_map(|&(k, v)| [k, v])
        }
        match &self.nodes[id] {
            Node::Leaf(_) => Box::new(std::iter::empty()),
            Node::Tuple(ids) | Node::List(ids) | Node::Set(ids) | Node::FrozenSet(ids) => {
                Box::new(ids.iter().copied())
            }
            Node::Dict(p) => Box::new(pairs(p)),
            Node::Object(o) => {
                let kwargs = match &o.construct {
                    NodeConstruct::NewObjEx(kwargs) => &kwargs[..],
                    _ => &[],
                };
                Box::new(
                    o.args
                        .iter()
                        .chain(&o.list_items)
                        .copied()
                        .chain(pairs(&o.dict_items))
                        .chain(pairs(kwargs))
                        .chain(o.state),
                )
            }
        }
    }

    /// Copies the node graph out as a tree, expanding shared references. Only after
    /// [`Machine::measure`] accepted `id`: that is what bounds this copy and its recursion.
    fn materialize(&self, id: Id) -> Value {
        let seq = |ids: &[Id]| ids.iter().map(|&i| self.materialize(i)).collect();
        let pairs = |ids: &[(Id, Id)]| {
            ids.iter()
                .map(|&(k, v)| (self.materialize(k), self.materialize(v)))
                .collect()
        };
        match &self.nodes[id] {
            Node::Leaf(v) => v.clone(),
            Node::Tuple(ids) => Value::Tuple(seq(ids)),
            Node::List(ids) => Value::List(seq(ids)),
            Node::Set(ids) => Value::Set(seq(ids)),
            Node::FrozenSet(ids) => Value::FrozenSet(seq(ids)),
            Node::Dict(ids) => Value::Dict(pairs(ids)),
            Node::Object(o) => Value::Object(Box::new(Object {
                module: o.module.clone(),
                name: o.name.clone(),
                construct: match &o.construct {
                    NodeConstruct::NewObj => Construct::NewObj,
                    NodeConstruct::Reduce => Construct::Reduce,
                    NodeConstruct::NewObjEx(kw) => Construct::NewObjEx { kwargs: pairs(kw) },
                },
                args: seq(&o.args),
                list_items: seq(&o.list_items),
                dict_items: pairs(&o.dict_items),
                state: o.state.map(|s| self.materialize(s)),
            })),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoder.

/// Deeper trees are refused rather than risking the stack; Python's own pickler stops near 1000.
const MAX_ENCODE_DEPTH: usize = 1000;
/// Pickle's own batch size for APPENDS/SETITEMS/ADDITEMS.
const BATCH: usize = 1000;
/// Strings longer than this are not deduplicated: hashing them costs more than it saves.
const MEMO_STR_MAX: usize = 256;

#[derive(PartialEq, Eq, Hash)]
enum MemoKey {
    Str(String),
    Global(String, String),
}

struct Encoder {
    out: Vec<u8>,
    /// Immutable values already written, by content. Equal strings and classes are written
    /// once and fetched with `BINGET`, as Python's pickler does for shared references.
    memo: HashMap<MemoKey, u32>,
    memo_len: u32,
}

fn is_hashable(v: &Value) -> bool {
    match v {
        Value::List(_) | Value::Dict(_) | Value::Set(_) | Value::ByteArray(_) => false,
        Value::Tuple(items) => items.iter().all(is_hashable),
        _ => true,
    }
}

fn check_hashable(v: &Value) -> Result<(), EncodeError> {
    if is_hashable(v) {
        Ok(())
    } else {
        Err(EncodeError::Unhashable { kind: v.kind() })
    }
}

impl Encoder {
    fn len_prefixed(&mut self, short: u8, long: u8, long8: u8, data: &[u8]) {
        let n = data.len();
        if n < 256 {
            self.out.extend([short, n as u8]);
        } else if let Ok(n) = u32::try_from(n) {
            self.out.push(long);
            self.out.extend(n.to_le_bytes());
        } else {
            self.out.push(long8);
            self.out.extend((n as u64).to_le_bytes());
        }
        self.out.extend_from_slice(data);
    }

    fn get(&mut self, idx: u32) {
        if let Ok(i) = u8::try_from(idx) {
            self.out.extend([op::BINGET, i]);
        } else {
            self.out.push(op::LONG_BINGET);
            self.out.extend(idx.to_le_bytes());
        }
    }

    fn memoize(&mut self, key: MemoKey) {
        if self.memo_len < u32::MAX {
            self.out.push(op::MEMOIZE);
            self.memo.insert(key, self.memo_len);
            self.memo_len += 1;
        }
    }

    fn str(&mut self, s: &str) {
        if s.len() > MEMO_STR_MAX {
            self.len_prefixed(
                op::SHORT_BINUNICODE,
                op::BINUNICODE,
                op::BINUNICODE8,
                s.as_bytes(),
            );
            return;
        }
        let key = MemoKey::Str(s.to_owned());
        if let Some(&idx) = self.memo.get(&key) {
            return self.get(idx);
        }
        self.len_prefixed(
            op::SHORT_BINUNICODE,
            op::BINUNICODE,
            op::BINUNICODE8,
            s.as_bytes(),
        );
        self.memoize(key);
    }

    fn global(&mut self, module: &str, name: &str) {
        let key = MemoKey::Global(module.to_owned(), name.to_owned());
        if let Some(&idx) = self.memo.get(&key) {
            return self.get(idx);
        }
        self.str(module);
        self.str(name);
        self.out.push(op::STACK_GLOBAL);
        self.memoize(key);
    }

    fn long(&mut self, le: &[u8]) {
        if let Ok(n) = u8::try_from(le.len()) {
            self.out.extend([op::LONG1, n]);
        } else {
            self.out.push(op::LONG4);
            self.out.extend((le.len() as u32).to_le_bytes());
        }
        self.out.extend_from_slice(le);
    }

    fn int(&mut self, n: i64) {
        match n {
            0..=0xff => self.out.extend([op::BININT1, n as u8]),
            0x100..=0xffff => {
                self.out.push(op::BININT2);
                self.out.extend((n as u16).to_le_bytes());
            }
            _ if i32::try_from(n).is_ok() => {
                self.out.push(op::BININT);
                self.out.extend((n as i32).to_le_bytes());
            }
            _ => {
                let mut b = n.to_le_bytes().to_vec();
                trim_twos_complement(&mut b);
                self.long(&b);
            }
        }
    }

    fn tuple(&mut self, items: &[Value], depth: usize) -> Result<(), EncodeError> {
        match items.len() {
            0 => self.out.push(op::EMPTY_TUPLE),
            n @ 1..=3 => {
                for v in items {
                    self.value(v, depth)?;
                }
                self.out.push(op::TUPLE1 + (n as u8 - 1));
            }
            _ => {
                self.out.push(op::MARK);
                for v in items {
                    self.value(v, depth)?;
                }
                self.out.push(op::TUPLE);
            }
        }
        Ok(())
    }

    /// Batches of `MARK items op`, after the empty container is on the stack.
    fn batched(&mut self, items: &[Value], op: u8, depth: usize) -> Result<(), EncodeError> {
        for chunk in items.chunks(BATCH) {
            self.out.push(op::MARK);
            for v in chunk {
                self.value(v, depth)?;
            }
            self.out.push(op);
        }
        Ok(())
    }

    fn batched_pairs(&mut self, pairs: &[(Value, Value)], depth: usize) -> Result<(), EncodeError> {
        for chunk in pairs.chunks(BATCH) {
            self.out.push(op::MARK);
            for (k, v) in chunk {
                check_hashable(k)?;
                self.value(k, depth)?;
                self.value(v, depth)?;
            }
            self.out.push(op::SETITEMS);
        }
        Ok(())
    }

    fn dict(&mut self, pairs: &[(Value, Value)], depth: usize) -> Result<(), EncodeError> {
        self.out.push(op::EMPTY_DICT);
        self.batched_pairs(pairs, depth)
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), EncodeError> {
        if depth > MAX_ENCODE_DEPTH {
            return Err(EncodeError::TooDeep {
                limit: MAX_ENCODE_DEPTH,
            });
        }
        let d = depth + 1;
        match v {
            Value::None => self.out.push(op::NONE),
            Value::Bool(true) => self.out.push(op::NEWTRUE),
            Value::Bool(false) => self.out.push(op::NEWFALSE),
            Value::Int(n) => self.int(*n),
            Value::BigInt(le) => self.long(le),
            Value::Float(f) => {
                self.out.push(op::BINFLOAT);
                self.out.extend(f.to_be_bytes());
            }
            Value::Str(s) => self.str(s),
            Value::Bytes(b) => {
                self.len_prefixed(op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8, b);
            }
            Value::ByteArray(b) => {
                // BYTEARRAY8 is protocol 5; under 4 Python itself reduces to bytearray(bytes).
                self.global("builtins", "bytearray");
                self.len_prefixed(op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8, b);
                self.out.extend([op::TUPLE1, op::REDUCE]);
            }
            Value::Tuple(items) => self.tuple(items, d)?,
            Value::List(items) => {
                self.out.push(op::EMPTY_LIST);
                self.batched(items, op::APPENDS, d)?;
            }
            Value::Dict(pairs) => self.dict(pairs, d)?,
            Value::Set(items) => {
                items.iter().try_for_each(check_hashable)?;
                self.out.push(op::EMPTY_SET);
                self.batched(items, op::ADDITEMS, d)?;
            }
            Value::FrozenSet(items) => {
                items.iter().try_for_each(check_hashable)?;
                self.out.push(op::MARK);
                for v in items {
                    self.value(v, d)?;
                }
                self.out.push(op::FROZENSET);
            }
            Value::Global { module, name } => self.global(module, name),
            Value::Object(o) => {
                self.global(&o.module, &o.name);
                self.tuple(&o.args, d)?;
                match &o.construct {
                    Construct::NewObj => self.out.push(op::NEWOBJ),
                    Construct::Reduce => self.out.push(op::REDUCE),
                    Construct::NewObjEx { kwargs } => {
                        self.dict(kwargs, d)?;
                        self.out.push(op::NEWOBJ_EX);
                    }
                }
                self.batched(&o.list_items, op::APPENDS, d)?;
                self.batched_pairs(&o.dict_items, d)?;
                if let Some(state) = &o.state {
                    self.value(state, d)?;
                    self.out.push(op::BUILD);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    fn list(items: Vec<Value>) -> Value {
        Value::List(items)
    }

    #[test]
    fn framed_protocol_4_dict() {
        let v =
            decode(b"\x80\x04\x95\n\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.").unwrap();
        assert_eq!(v, Value::Dict(vec![(s("a"), Value::Int(1))]));
        assert_eq!(v.as_dict_get("a").and_then(Value::as_int), Some(1));
        assert!(v.as_dict_get("b").is_none());
    }

    #[test]
    fn memo_sees_appends_made_after_memoizing() {
        // a = [1]; [a, a]: the inner list is memoized empty, filled, then fetched again.
        let v = decode(b"\x80\x02]q\x00(]q\x01K\x01ah\x01e.").unwrap();
        let inner = list(vec![Value::Int(1)]);
        assert_eq!(v, list(vec![inner.clone(), inner]));
    }

    #[test]
    fn self_referencing_list_is_refused() {
        assert_eq!(
            decode(b"\x80\x02]q\x00h\x00a."),
            Err(DecodeError::Recursive)
        );
    }

    #[test]
    fn long1_and_long_text_keep_big_ints_exact() {
        let v = decode(b"\x80\x02\x8a\t\x00\x00\x00\x00\x00\x00\x00\x00\x01.").unwrap();
        assert_eq!(v, Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 1]));
        assert_eq!(decode(b"\x80\x02\x8a\x01\xff.").unwrap(), Value::Int(-1));
        assert_eq!(decode(b"\x80\x02\x8a\x00.").unwrap(), Value::Int(0));
        // -2**70
        let v = decode(b"L-1180591620717411303424L\n.").unwrap();
        assert_eq!(v, Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0xc0]));
        assert_eq!(decode(&encode(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn protocol_0_text_opcodes() {
        let v =
            decode(b"(lp0\nI1\naI01\naL12345678901234567890123L\naF1.5\naVab\xe9\\u20ac\np1\na.")
                .unwrap();
        let Value::List(items) = v else {
            panic!("{v:?}")
        };
        assert_eq!(items[0], Value::Int(1));
        assert_eq!(items[1], Value::Bool(true));
        assert!(matches!(items[2], Value::BigInt(_)));
        assert_eq!(items[3], Value::Float(1.5));
        assert_eq!(items[4], s("ab\u{e9}\u{20ac}"));
    }

    #[test]
    fn class_instance_is_a_record() {
        let v =
            decode(b"\x80\x02c__main__\nFoo\nq\x00)\x81q\x01}q\x02X\x01\x00\x00\x00aq\x03K\x01sb.")
                .unwrap();
        assert_eq!(
            v,
            Value::instance("__main__", "Foo", [("a", Value::Int(1))])
        );
        assert_eq!(v.class_path(), Some(("__main__", "Foo")));
        assert_eq!(v.attr("a"), Some(&Value::Int(1)));
    }

    #[test]
    fn protocol_2_reductions_become_data() {
        let set = decode(b"\x80\x02c__builtin__\nset\nq\x00]q\x01K\x01a\x85q\x02Rq\x03.").unwrap();
        assert_eq!(set, Value::Set(vec![Value::Int(1)]));
        let bytes = decode(b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00\xc3\xbf\x00q\x01X\x06\x00\x00\x00latin1q\x02\x86q\x03Rq\x04.").unwrap();
        assert_eq!(bytes, Value::bytes(vec![0xff, 0]));
        let ba = decode(b"\x80\x02c__builtin__\nbytearray\nq\x00c_codecs\nencode\nq\x01X\x02\x00\x00\x00abq\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05\x85q\x06Rq\x07.").unwrap();
        assert_eq!(ba, Value::ByteArray(b"ab".to_vec()));
    }

    #[test]
    fn errors_name_opcode_and_offset() {
        assert_eq!(
            decode(b"\x80\x04\x8c\x05ab"),
            Err(DecodeError::Truncated {
                opcode: "SHORT_BINUNICODE",
                offset: 2,
                needed: 3
            })
        );
        assert_eq!(
            decode(b"\xff"),
            Err(DecodeError::UnknownOpcode {
                byte: 0xff,
                offset: 0
            })
        );
        assert_eq!(
            decode(b"\x80\x04a."),
            Err(DecodeError::StackUnderflow {
                opcode: "APPEND",
                offset: 2
            })
        );
        assert_eq!(
            decode(b"]e."),
            Err(DecodeError::NoMark {
                opcode: "APPENDS",
                offset: 1
            })
        );
        assert_eq!(
            decode(b"h\x05."),
            Err(DecodeError::MemoMissing {
                opcode: "BINGET",
                offset: 0,
                key: 5
            })
        );
        assert_eq!(decode(b"N"), Err(DecodeError::NoStop { offset: 1 }));
        assert_eq!(decode(b""), Err(DecodeError::NoStop { offset: 0 }));
        assert!(matches!(
            decode(b"\x80\x06N."),
            Err(DecodeError::UnsupportedProtocol { proto: 6, .. })
        ));
        assert!(matches!(
            decode(b"\x80\x05\x97."),
            Err(DecodeError::Unsupported {
                opcode: "NEXT_BUFFER",
                ..
            })
        ));
        // A MARK hides what is below it.
        assert_eq!(
            decode(b"N(a."),
            Err(DecodeError::StackUnderflow {
                opcode: "APPEND",
                offset: 2
            })
        );
        assert!(matches!(
            decode(b"NNb."),
            Err(DecodeError::Invalid {
                opcode: "BUILD",
                ..
            })
        ));
        assert!(matches!(
            decode(b"(K\x01K\x02K\x03d."),
            Err(DecodeError::Invalid { opcode: "DICT", .. })
        ));
        let msg = decode(b"\x80\x04\x8c\x05ab").unwrap_err().to_string();
        assert_eq!(
            msg,
            "pickle truncated: SHORT_BINUNICODE at offset 2 needs 3 more bytes"
        );
    }

    #[test]
    fn limits_are_enforced() {
        let tight = Limits {
            max_input: 64,
            max_depth: 3,
            max_memo: 2,
            max_container_len: 3,
            max_values: 100,
            budget: 1000,
        };
        let big = vec![b'N'; 65];
        assert_eq!(
            decode_with_limits(&big, &tight),
            Err(DecodeError::TooLarge {
                size: 65,
                limit: 64
            })
        );
        // [[[[[]]]]]
        let deep = b"]]]]]aaaa.";
        assert_eq!(
            decode_with_limits(deep, &tight),
            Err(DecodeError::TooDeep { limit: 3 })
        );
        assert!(decode_with_limits(b"]]]]aaa.", &tight).is_ok());
        assert!(matches!(
            decode_with_limits(b"N\x94\x94\x94.", &tight),
            Err(DecodeError::MemoFull {
                opcode: "MEMOIZE",
                offset: 3,
                limit: 2
            })
        ));
        assert!(matches!(
            decode_with_limits(b"(NNNNl.", &tight),
            Err(DecodeError::ContainerTooLong { opcode: "LIST", .. })
        ));
        assert!(matches!(
            decode_with_limits(b"](NNNeNa.", &tight),
            Err(DecodeError::ContainerTooLong {
                opcode: "APPEND",
                ..
            })
        ));
        // l = [l0, l0] repeated: tiny input, exponential expansion.
        let mut laughs = b"\x80\x04]\x94".to_vec();
        for i in 0..40u8 {
            laughs.extend([b'h', i, b'h', i, 0x86, 0x94]);
        }
        laughs.push(b'.');
        assert_eq!(
            decode_with_limits(
                &laughs,
                &Limits {
                    max_values: 100,
                    ..Limits::default()
                }
            ),
            Err(DecodeError::TooManyValues { limit: 100 })
        );
    }

    #[test]
    fn memo_bomb_is_refused_by_the_budget() {
        // 1 MB fetched 100,000 times would be 100 GB; the pickle itself is 1.2 MB.
        for (leaf, get) in [(op::BINUNICODE, &b"h\0"[..]), (op::BINBYTES, b"j\0\0\0\0")] {
            let bomb = memo_bomb_with(leaf, 1 << 20, 100_000, get);
            let started = std::time::Instant::now();
            let err = decode_within(&bomb, 16 << 20).unwrap_err();
            assert_eq!(err, DecodeError::OverBudget { budget: 16 << 20 });
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
        }
        let msg = DecodeError::OverBudget { budget: 16 << 20 }.to_string();
        assert_eq!(
            msg,
            "pickle too large: it would materialize more than 16777216 bytes (the decode budget)"
        );
        // The default budget is a default frame's worth.
        let bomb = memo_bomb_with(op::BINUNICODE, 1 << 20, 100, b"h\0");
        assert_eq!(
            decode(&bomb),
            Err(DecodeError::OverBudget {
                budget: DEFAULT_MAX_FRAME
            })
        );
    }

    #[test]
    fn repeated_small_memo_refs_within_the_budget_decode() {
        let pickle = memo_bomb_with(op::BINUNICODE, 3, 1000, b"h\0");
        let v = decode_within(&pickle, 1 << 20).unwrap();
        assert_eq!(v, list(vec![s("aaa"); 1000]));
        // The list, and 1000 strs of 3 bytes.
        let size = 1001 * size_of::<Value>() + 1000 * 3;
        assert_eq!(v.materialized_size(), size);
        // Reading holds less than the tree it builds, here.
        assert_eq!(decode_within(&pickle, 2 * size).as_ref(), Ok(&v));
        assert_eq!(
            decode_within(&pickle, size - 1),
            Err(DecodeError::OverBudget { budget: size - 1 })
        );
    }

    #[test]
    fn shared_containers_cost_their_whole_contents() {
        // inner = ["aaa..." (100 bytes)], memoized before it is filled; [inner] * 50.
        let mut p = vec![
            op::PROTO,
            4,
            op::EMPTY_LIST,
            op::MARK,
            op::EMPTY_LIST,
            op::MEMOIZE,
        ];
        p.extend([op::SHORT_BINUNICODE, 100]);
        p.extend([b'a'; 100]);
        p.push(op::APPEND);
        for _ in 1..50 {
            p.extend([op::BINGET, 0]);
        }
        p.extend([op::APPENDS, op::STOP]);
        let v = decode(&p).unwrap();
        let size = size_of::<Value>() + 50 * (2 * size_of::<Value>() + 100);
        assert_eq!(v.materialized_size(), size);
        assert_eq!(
            decode_within(&p, size - 1),
            Err(DecodeError::OverBudget { budget: size - 1 })
        );
    }

    #[test]
    fn what_reading_holds_counts_even_when_dropped() {
        // set(l) for a memoized l of 1000 items, `rounds` times, each result popped: the
        // answer is None, but every REDUCE copied l's 1000 references.
        let reduce_sets = |rounds: usize| {
            let mut p = b"\x80\x02c__builtin__\nset\n\x94]\x94(N".to_vec();
            p.extend([op::DUP].repeat(999));
            p.push(op::APPENDS);
            p.extend([op::TUPLE1, op::MEMOIZE, op::POP]);
            for _ in 0..rounds {
                p.extend([op::BINGET, 0, op::BINGET, 2, op::REDUCE, op::POP]);
            }
            p.extend([op::NONE, op::STOP]);
            p
        };
        assert_eq!(decode_within(&reduce_sets(5), 60_000), Ok(Value::None));
        assert_eq!(
            decode_within(&reduce_sets(20), 60_000),
            Err(DecodeError::OverBudget { budget: 60_000 })
        );
        // A million DUPs of None hold 8 MB of references, though the pickle is 1 MB.
        let mut dups = b"\x80\x04N".to_vec();
        dups.extend([op::DUP].repeat(1 << 20));
        dups.push(op::STOP);
        assert_eq!(
            decode_within(&dups, 1 << 20),
            Err(DecodeError::OverBudget { budget: 1 << 20 })
        );
    }

    #[test]
    fn materialized_size_counts_every_payload() {
        let v = Value::Object(Box::new(Object {
            module: "os".into(),
            name: "stat_result".into(),
            construct: Construct::NewObjEx {
                kwargs: vec![(s("k"), Value::Bytes(vec![0; 4]))],
            },
            args: vec![Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 1])],
            list_items: vec![Value::None],
            dict_items: vec![(Value::Int(1), Value::ByteArray(vec![0; 2]))],
            state: Some(Value::Global {
                module: "m".into(),
                name: "n".into(),
            }),
        }));
        // Eight values; the record and "os" "stat_result"; "k", 4, 9, 2 and "m" "n" bytes.
        let size = 8 * size_of::<Value>() + size_of::<Object>() + 13 + 1 + 4 + 9 + 2 + 2;
        assert_eq!(v.materialized_size(), size);
        assert_eq!(
            decode(&encode(&v).unwrap()).unwrap().materialized_size(),
            size
        );
    }

    #[test]
    fn decimal_literals_are_exact_up_to_pythons_digit_limit() {
        for n in [
            i128::MAX,
            i128::MIN,
            10i128.pow(19),
            10i128.pow(19) - 1,
            -(10i128.pow(38)),
            u64::MAX as i128 + 1,
            i64::MIN as i128 - 1,
        ] {
            assert_eq!(
                parse_decimal_int(&n.to_string()),
                Some(Value::int_from_le_bytes(&n.to_le_bytes())),
                "{n}"
            );
        }
        // 2**14000 (4215 digits), written out by doubling a decimal digit string.
        let mut digits = vec![1u8];
        for _ in 0..14000 {
            let mut carry = 0;
            for d in digits.iter_mut() {
                let x = *d * 2 + carry;
                *d = x % 10;
                carry = x / 10;
            }
            if carry > 0 {
                digits.push(carry);
            }
        }
        let text: String = digits.iter().rev().map(|d| char::from(b'0' + d)).collect();
        let mut power = vec![0u8; 1750];
        power.push(1);
        assert_eq!(parse_decimal_int(&text), Some(Value::BigInt(power.clone())));
        *power.last_mut().unwrap() = 0xff;
        assert_eq!(
            parse_decimal_int(&format!("-{text}")),
            Some(Value::BigInt(power))
        );
        let longest = format!("L{}L\n.", "9".repeat(MAX_DECIMAL_DIGITS));
        assert!(matches!(decode(longest.as_bytes()), Ok(Value::BigInt(_))));
        let err = decode(format!("L{}L\n.", "9".repeat(MAX_DECIMAL_DIGITS + 1)).as_bytes())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "LONG at offset 0: int literal of 4301 digits; Python itself reads at most 4300"
        );
    }

    #[test]
    fn ints_encode_at_every_width() {
        for n in [
            0,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            -129,
            i32::MAX as i64,
            i32::MIN as i64,
            i32::MAX as i64 + 1,
            i64::MAX,
            i64::MIN,
        ] {
            let v = Value::Int(n);
            assert_eq!(decode(&encode(&v).unwrap()).unwrap(), v, "{n}");
        }
        assert_eq!(encode(&Value::Int(1)).unwrap(), b"\x80\x04K\x01.");
        assert_eq!(Value::int_from_le_bytes(&[0xff, 0xff]), Value::Int(-1));
        assert_eq!(Value::int_from_le_bytes(&[0x80, 0x00]), Value::Int(128));
        assert_eq!(Value::int_from_le_bytes(&[]), Value::Int(0));
        assert_eq!(
            parse_decimal_int("-9223372036854775809"),
            Some(Value::BigInt(vec![
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff
            ]))
        );
    }

    #[test]
    fn encoding_reuses_strings_and_classes() {
        let reply = |n| Value::instance("dispy", "_JobReply", [("uid", Value::Int(n))]);
        let v = list(vec![reply(1), reply(2)]);
        let bytes = encode(&v).unwrap();
        let count = |needle: &[u8]| bytes.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"_JobReply"), 1);
        assert_eq!(count(b"uid"), 1);
        assert_eq!(decode(&bytes).unwrap(), v);
    }

    #[test]
    fn bytearray_and_sets_round_trip() {
        let v = Value::Tuple(vec![
            Value::ByteArray(b"xy".to_vec()),
            Value::Set(vec![Value::Int(1), s("a")]),
            Value::FrozenSet(vec![]),
            Value::Set(vec![]),
            Value::Global {
                module: "os".into(),
                name: "stat_result".into(),
            },
        ]);
        assert_eq!(decode(&encode(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn unhashable_keys_are_refused() {
        let v = Value::Dict(vec![(list(vec![]), Value::None)]);
        assert_eq!(encode(&v), Err(EncodeError::Unhashable { kind: "list" }));
        let v = Value::Set(vec![Value::Tuple(vec![Value::Dict(vec![])])]);
        assert_eq!(encode(&v), Err(EncodeError::Unhashable { kind: "tuple" }));
    }

    #[test]
    fn deep_values_are_refused_when_encoding() {
        let mut v = Value::None;
        for _ in 0..MAX_ENCODE_DEPTH + 5 {
            v = list(vec![v]);
        }
        assert_eq!(
            encode(&v),
            Err(EncodeError::TooDeep {
                limit: MAX_ENCODE_DEPTH
            })
        );
    }

    #[test]
    fn slots_state_is_searched_by_attr() {
        let mut v = Value::instance("dispy", "_DispyJob_", Vec::<(String, Value)>::new());
        if let Value::Object(o) = &mut v {
            o.state = Some(Value::Tuple(vec![
                Value::None,
                Value::Dict(vec![(s("uid"), Value::Int(7))]),
            ]));
        }
        assert_eq!(v.attr("uid").and_then(Value::as_int), Some(7));
    }
}
