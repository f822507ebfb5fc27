//! The state dict in a `torch.save` pickle, read without running it.
//!
//! Unpickling calls whatever the pickle names, so Python loaders must trust the file. This reader is a
//! pickle machine that knows only the opcodes a state dict uses and only the globals it names
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` with or
//! without state, and the typed storages); any other global is refused before anything is built, and
//! nothing is ever called. What it yields is each tensor's description (storage, dtype, offset, shape,
//! strides); the bytes stay in the file.

use std::collections::HashMap;

use anyhow::{bail, ensure, Result};
use safetensors::Dtype;

/// One tensor of the state dict, as `_rebuild_tensor_v2` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickledTensor {
    /// The storage's key: its bytes are the archive's `data/<key>`.
    pub storage: String,
    pub dtype: Dtype,
    /// Where the tensor starts in its storage, in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// In elements.
    pub stride: Vec<usize>,
}

/// What a global names, among those a state dict may.
#[derive(Clone, Debug)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    /// A parameter with attributes (transformers sets some on its models' parameters), which are dropped.
    RebuildParameterWithState,
    Storage(Dtype),
}

#[derive(Clone, Debug)]
enum Value {
    Mark,
    /// None, a bool or a float: held in its place on the stack, never read (`requires_grad`, say).
    Scalar,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage {
        dtype: Dtype,
        key: String,
    },
    Tensor(PickledTensor),
    /// What the memo keeps of a value over [`MAX_MEMO_NODES`] items.
    Oversized,
}

/// The global `module.name`, if a state dict may name it.
fn global(module: &str, name: &str) -> Result<Global> {
    let storage = |dtype| Ok(Global::Storage(dtype));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => Ok(Global::RebuildParameterWithState),
        ("torch", "FloatStorage") => storage(Dtype::F32),
        ("torch", "HalfStorage") => storage(Dtype::F16),
        ("torch", "BFloat16Storage") => storage(Dtype::BF16),
        ("torch", "DoubleStorage") => storage(Dtype::F64),
        ("torch", "LongStorage") => storage(Dtype::I64),
        ("torch", "IntStorage") => storage(Dtype::I32),
        ("torch", "ShortStorage") => storage(Dtype::I16),
        ("torch", "CharStorage") => storage(Dtype::I8),
        ("torch", "ByteStorage") => storage(Dtype::U8),
        ("torch", "BoolStorage") => storage(Dtype::BOOL),
        _ => bail!(
            "the pickle names {module}.{name}, which no state dict of tensors holds: refused (the engine runs no \
             code from a pickle)"
        ),
    }
}

/// A non-negative integer argument.
fn index(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => bail!("{what}: expected a non-negative integer, found {other:?}"),
    }
}

fn indices(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(items) => items.iter().map(|i| index(i, what)).collect(),
        other => bail!("{what}: expected a tuple of integers, found {other:?}"),
    }
}

/// What calling `callable` with `args` would have built, for the callables a state dict uses.
fn reduce(callable: Value, args: Value) -> Result<Value> {
    let Value::Tuple(args) = args else { bail!("REDUCE with arguments {args:?}, not a tuple") };
    match callable {
        Value::Global(Global::OrderedDict) if args.is_empty() => Ok(Value::Dict(Vec::new())),
        Value::Global(Global::RebuildTensor) if (6..=7).contains(&args.len()) => {
            let Value::Storage { dtype, key } = &args[0] else { bail!("a tensor whose storage is {:?}", args[0]) };
            let (shape, stride) = (indices(&args[2], "a tensor's size")?, indices(&args[3], "a tensor's stride")?);
            ensure!(shape.len() == stride.len(), "a tensor of size {shape:?} with strides {stride:?}");
            Ok(Value::Tensor(PickledTensor {
                storage: key.clone(),
                dtype: *dtype,
                offset: index(&args[1], "a tensor's storage offset")?,
                shape,
                stride,
            }))
        }
        Value::Global(Global::RebuildParameter) if args.len() == 3 => match &args[0] {
            Value::Tensor(_) => Ok(args[0].clone()),
            other => bail!("a parameter of {other:?}, not a tensor"),
        },
        Value::Global(Global::RebuildParameterWithState) if args.len() == 4 => match &args[0] {
            Value::Tensor(_) => Ok(args[0].clone()),
            other => bail!("a parameter of {other:?}, not a tensor"),
        },
        other => bail!("REDUCE of {other:?} with {} arguments: not how a state dict is built", args.len()),
    }
}

/// A little-endian cursor over the pickle's bytes.
struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.data.len() - self.at >= n, "the pickle ends inside an opcode's argument (byte {})", self.at);
        self.at += n;
        Ok(&self.data[self.at - n..self.at])
    }

    fn uint(&mut self, n: usize) -> Result<u64> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// LONG1's argument: a length byte, then that many bytes of a little-endian two's complement integer.
    fn long1(&mut self) -> Result<i64> {
        let n = self.uint(1)? as usize;
        ensure!(n <= 8, "an integer of {n} bytes");
        let raw = self.uint(n)?;
        let negative = n > 0 && n < 8 && (raw >> (8 * n - 1)) & 1 == 1;
        Ok(if negative { raw as i64 - (1i64 << (8 * n)) } else { raw as i64 })
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.at..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow::anyhow!("GLOBAL without its newline"))?;
        self.at += end + 1;
        Ok(std::str::from_utf8(&rest[..end])?)
    }

    fn text(&mut self, n: usize) -> Result<String> {
        Ok(std::str::from_utf8(self.take(n)?)?.to_string())
    }
}

/// The most items a memoized value may hold (a state dict memoizes globals, names, small tuples, and its
/// dicts while still empty). The memo keeps copies, so a bound on what is copied keeps a crafted pickle (a
/// list put in the memo after every append, or doubled through it) from growing time and memory past linear.
const MAX_MEMO_NODES: usize = 4096;

/// The items of `v`, counted up to a little past `cap`.
fn nodes(v: &Value, cap: usize) -> usize {
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Tuple(items) | Value::List(items) => Box::new(items.iter()),
        Value::Dict(entries) => Box::new(entries.iter().flat_map(|(k, v)| [k, v])),
        _ => return 1,
    };
    let mut n = 1;
    for c in children {
        if n > cap {
            break;
        }
        n += nodes(c, cap - n);
    }
    n
}

/// The tensors of the state dict pickled in `data` (a `torch.save` archive's `data.pkl`), by name.
pub fn read_state_dict(data: &[u8]) -> Result<Vec<(String, PickledTensor)>> {
    let mut b = Bytes { data, at: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| anyhow::anyhow!("the pickle pops an empty stack"));
    // Everything above the topmost mark, which is removed.
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>> {
        let mark = stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or_else(|| anyhow::anyhow!("no MARK"))?;
        let items = stack.split_off(mark + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let at = b.at;
        let op = b.take(1).map_err(|_| anyhow::anyhow!("the pickle ends without STOP"))?[0];
        match op {
            0x80 => {
                b.take(1)?; // PROTO
            }
            0x95 => {
                b.take(8)?; // FRAME
            }
            b'.' => break,
            b'(' => stack.push(Value::Mark),
            b'N' | 0x88 | 0x89 => stack.push(Value::Scalar), // None, True, False
            b'K' => stack.push(Value::Int(b.uint(1)? as i64)),
            b'M' => stack.push(Value::Int(b.uint(2)? as i64)),
            b'J' => stack.push(Value::Int(b.uint(4)? as u32 as i32 as i64)),
            0x8a => stack.push(Value::Int(b.long1()?)),
            b'G' => {
                b.take(8)?; // BINFLOAT
                stack.push(Value::Scalar);
            }
            b'X' => {
                let n = b.uint(4)? as usize;
                stack.push(Value::Str(b.text(n)?));
            }
            0x8c => {
                let n = b.uint(1)? as usize;
                stack.push(Value::Str(b.text(n)?));
            }
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                ensure!(stack.len() >= n, "TUPLE{n} on a stack of {}", stack.len());
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => b.uint(1)?,
                    b'r' => b.uint(4)?,
                    _ => memo.len() as u64,
                };
                let top = stack.last().ok_or_else(|| anyhow::anyhow!("PUT of an empty stack"))?;
                let kept = if nodes(top, MAX_MEMO_NODES) <= MAX_MEMO_NODES { top.clone() } else { Value::Oversized };
                memo.insert(key, kept);
            }
            b'h' | b'j' => {
                let key = if op == b'h' { b.uint(1)? } else { b.uint(4)? };
                let value = memo.get(&key).ok_or_else(|| anyhow::anyhow!("GET of memo {key}, never put"))?;
                ensure!(!matches!(value, Value::Oversized), "GET of a value of over {MAX_MEMO_NODES} items");
                stack.push(value.clone());
            }
            b'c' => {
                let (module, name) = (b.line()?, b.line()?);
                stack.push(Value::Global(global(module, name)?));
            }
            0x93 => {
                let (name, module) = (pop(&mut stack)?, pop(&mut stack)?);
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    bail!("STACK_GLOBAL of non-strings")
                };
                stack.push(Value::Global(global(&module, &name)?));
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                let Value::Tuple(pid) = pid else { bail!("a persistent id {pid:?}, not a tuple") };
                match pid.as_slice() {
                    [Value::Str(kind), Value::Global(Global::Storage(dtype)), Value::Str(key), _, _]
                        if kind == "storage" =>
                    {
                        stack.push(Value::Storage { dtype: *dtype, key: key.clone() })
                    }
                    other => bail!("a persistent id {other:?}: not a storage"),
                }
            }
            b'R' => {
                let (args, callable) = (pop(&mut stack)?, pop(&mut stack)?);
                stack.push(reduce(callable, args)?);
            }
            b'b' => {
                // BUILD: a state dict's OrderedDict gets its `_metadata` (module versions), not needed here.
                let _state = pop(&mut stack)?;
                ensure!(matches!(stack.last(), Some(Value::Dict(_))), "BUILD of {:?}", stack.last());
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let (v, k) = (pop(&mut stack)?, pop(&mut stack)?);
                    vec![k, v]
                } else {
                    pop_mark(&mut stack)?
                };
                ensure!(items.len() % 2 == 0, "SETITEMS with an odd number of items");
                let Some(Value::Dict(dict)) = stack.last_mut() else { bail!("SETITEM on {:?}", stack.last()) };
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    dict.push((k, v));
                }
            }
            b'a' | b'e' => {
                let items = if op == b'a' { vec![pop(&mut stack)?] } else { pop_mark(&mut stack)? };
                let Some(Value::List(list)) = stack.last_mut() else { bail!("APPEND on {:?}", stack.last()) };
                list.extend(items);
            }
            b'0' => {
                pop(&mut stack)?;
            }
            _ => bail!("pickle opcode 0x{op:02x} at byte {at}: not one a state dict uses"),
        }
    }
    let Some(Value::Dict(entries)) = stack.pop() else { bail!("the pickle holds no dict of tensors") };
    let mut tensors = Vec::new();
    for (key, value) in entries {
        match (key, value) {
            (Value::Str(name), Value::Tensor(t)) => tensors.push((name, t)),
            (Value::Str(_), _) => {} // a non-tensor entry (an `_extra_state`, say): no weight
            (key, _) => bail!("a state dict entry under {key:?}, not a string"),
        }
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pickled_global_outside_the_list_is_refused_before_anything_runs() {
        // `pickle.dumps(os.system)` at protocol 2 names posix.system.
        let evil = b"\x80\x02cposix\nsystem\nq\x00.";
        let err = read_state_dict(evil).unwrap_err().to_string();
        assert!(err.contains("posix.system") && err.contains("refused"), "{err}");
        let err = read_state_dict(b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01u").unwrap_err().to_string();
        assert!(err.contains("without STOP"), "{err}");
        assert!(read_state_dict(b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01u.").unwrap().is_empty(), "no tensors");
        // LONG1 integers are little-endian two's complement: -1, 256, as a storage offset must not be.
        let err = read_state_dict(b"\x80\x02cstorage_offset\n").unwrap_err().to_string();
        assert!(err.contains("GLOBAL without its newline"), "{err}");
        // A list appended to a copy of itself, again and again (2^k items after k times): the memo keeps no
        // copy past 4096 items, and a GET of it is refused.
        let mut doubling = b"\x80\x02]q\x00".to_vec();
        for _ in 0..16 {
            doubling.extend(b"h\x00h\x00aq\x00");
        }
        doubling.push(b'.');
        let err = read_state_dict(&doubling).unwrap_err().to_string();
        assert!(err.contains("GET of a value of over 4096 items"), "{err}");
        let mut b = Bytes { data: b"\x01\xff\x02\x00\x01\x00", at: 0 };
        assert_eq!((b.long1().unwrap(), b.long1().unwrap(), b.long1().unwrap()), (-1, 256, 0));
    }
}
