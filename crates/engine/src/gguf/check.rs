//! A streaming check of a GGUF header, run before candle parses it.
//!
//! candle's reader trusts parts of the header it should not (a `general.alignment` of
//! 0 divides by zero; tensor dimensions whose product overflows panic in its shape
//! arithmetic). This pass reads the header once with bounded reads and refuses such a
//! file with an error naming the field and the byte where it lies. It keeps no more
//! than the key and tensor names it reads (to refuse duplicates), so what it allocates
//! is bounded by the file's size, never by a count the file declares.
//!
//! What it accepts, candle parses the same way: version 2 or 3, known value and GGML
//! type ids, strings and arrays inside the file, arrays nested at most
//! [`MAX_ARRAY_NESTING`] deep, `general.alignment` (when present) a `u32` power of two,
//! at most four dimensions per tensor with a product that fits in 64 bits, rows of
//! whole blocks, and every tensor's data aligned and inside the file.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// The most tensors a header may declare.
pub(crate) const MAX_TENSORS: u64 = 1 << 20;
/// The most metadata entries a header may declare.
pub(crate) const MAX_METADATA_ENTRIES: u64 = 1 << 20;
/// The longest metadata key, in bytes.
pub(crate) const MAX_KEY_BYTES: u64 = 1 << 16;
/// The longest tensor name, in bytes.
pub(crate) const MAX_TENSOR_NAME_BYTES: u64 = 1 << 12;
/// The longest string value, in bytes (a chat template is a few tens of KiB).
pub(crate) const MAX_STRING_BYTES: u64 = 1 << 26;
/// The most elements of one array (a vocabulary has a few hundred thousand).
pub(crate) const MAX_ARRAY_ELEMENTS: u64 = 1 << 24;
/// The most array elements in the whole header, all arrays together: candle holds
/// each in a 32-byte value, so this bounds what its parse allocates.
pub(crate) const MAX_TOTAL_ARRAY_ELEMENTS: u64 = 1 << 25;
/// How deep arrays may nest: an array of arrays of values, no deeper.
pub(crate) const MAX_ARRAY_NESTING: u32 = 2;
/// The most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub(crate) const MAX_DIMS: u32 = 4;
/// The alignment of tensor data when `general.alignment` is absent.
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;

/// What the check learnt of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckedHeader {
    /// Where tensor data starts: the end of the tensor table, aligned.
    pub(crate) tensor_data_offset: u64,
    /// `general.alignment`, or the default.
    pub(crate) alignment: u64,
}

/// Metadata value types, by their GGUF id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// Bytes of one value of a fixed-size type; `None` for strings and arrays.
    fn fixed_size(self) -> Option<u64> {
        match self {
            Self::U8 | Self::I8 | Self::Bool => Some(1),
            Self::U16 | Self::I16 => Some(2),
            Self::U32 | Self::I32 | Self::F32 => Some(4),
            Self::U64 | Self::I64 | Self::F64 => Some(8),
            Self::String | Self::Array => None,
        }
    }

    /// The fewest bytes one value of this type takes.
    fn min_size(self) -> u64 {
        match self {
            Self::String => 8,
            Self::Array => 12,
            other => other.fixed_size().unwrap_or(1),
        }
    }
}

/// The GGML type of a stored type id, when candle reads it.
pub(crate) fn ggml_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Why the check stopped: an I/O error, or what is wrong with the file.
enum Fault {
    Io(std::io::Error),
    Bad(String),
    OutOfBounds {
        name: String,
        offset: u64,
        bytes: u64,
    },
}

type Checked<T> = std::result::Result<T, Fault>;

fn bad<T>(reason: String) -> Checked<T> {
    Err(Fault::Bad(reason))
}

/// Reads the header with every read checked against the file's length first.
struct HeaderReader<'f> {
    reader: BufReader<&'f mut File>,
    pos: u64,
    len: u64,
}

impl HeaderReader<'_> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes lie inside the file.
    fn need(&self, n: u64, what: &dyn Fn() -> String) -> Checked<()> {
        if n > self.remaining() {
            return bad(format!(
                "truncated: {} at byte {} needs {n} bytes, only {} remain in the file ({} bytes)",
                what(),
                self.pos,
                self.remaining(),
                self.len
            ));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Checked<[u8; N]> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.reader.read_exact(&mut buf).map_err(Fault::Io)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Checked<u32> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Checked<u64> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    fn skip(&mut self, n: u64, what: &dyn Fn() -> String) -> Checked<()> {
        self.need(n, what)?;
        let step = i64::try_from(n).map_err(|_| Fault::Bad(format!("{} is too long", what())))?;
        self.reader.seek_relative(step).map_err(Fault::Io)?;
        self.pos += n;
        Ok(())
    }

    /// A string's length prefix, checked against `max` and the bytes left.
    fn string_len(&mut self, max: u64, what: &dyn Fn() -> String) -> Checked<u64> {
        let at = self.pos;
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > max {
            return bad(format!(
                "{} at byte {at} is {len} bytes long, more than the {max} allowed",
                what()
            ));
        }
        self.need(len, what)?;
        Ok(len)
    }

    /// A name (key or tensor name): bounded, read whole, trailing NULs dropped as
    /// candle drops them, and UTF-8.
    fn name(&mut self, max: u64, what: &dyn Fn() -> String) -> Checked<String> {
        let at = self.pos;
        let len = self.string_len(max, what)?;
        let Ok(n) = usize::try_from(len) else {
            return bad(format!("{} at byte {at} is too long", what()));
        };
        let mut bytes = vec![0u8; n];
        self.reader.read_exact(&mut bytes).map_err(Fault::Io)?;
        self.pos += len;
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        String::from_utf8(bytes)
            .or_else(|e| bad(format!("{} at byte {at} is not UTF-8 ({e})", what())))
    }
}

/// Checks the header of the GGUF file `file` (of `file_len` bytes) at `path`, then
/// puts the file's position back at its start.
///
/// # Errors
/// [`Error::Gguf`] naming what is wrong and where, [`Error::TensorOutOfBounds`] for a
/// tensor whose data is past the end of the file, [`Error::Io`].
pub(crate) fn check_header(path: &Path, file: &mut File, file_len: u64) -> Result<CheckedHeader> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let result = {
        let mut r = HeaderReader {
            reader: BufReader::with_capacity(1 << 16, &mut *file),
            pos: 0,
            len: file_len,
        };
        check(&mut r)
    };
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    result.map_err(|fault| match fault {
        Fault::Io(source) => io(source),
        Fault::Bad(reason) => Error::Gguf {
            path: path.to_path_buf(),
            reason,
        },
        Fault::OutOfBounds {
            name,
            offset,
            bytes,
        } => Error::TensorOutOfBounds {
            path: path.to_path_buf(),
            name,
            offset,
            bytes,
            file_len,
        },
    })
}

fn check(r: &mut HeaderReader<'_>) -> Checked<CheckedHeader> {
    let mut magic = [0u8; 4];
    if r.len >= 8 {
        magic = r.array::<4>(&|| "the magic".into())?;
    }
    if &magic != b"GGUF" {
        return bad(format!(
            "missing the `GGUF` magic at the start ({} bytes, starts with {magic:02x?})",
            r.len
        ));
    }
    let version = r.u32(&|| "the version".into())?;
    if !(2..=3).contains(&version) {
        return bad(format!(
            "version {version} is not supported (versions 2 and 3 are)"
        ));
    }
    let tensor_count = r.u64(&|| "the tensor count".into())?;
    let kv_count = r.u64(&|| "the metadata entry count".into())?;
    if tensor_count > MAX_TENSORS {
        return bad(format!(
            "the header declares {tensor_count} tensors, more than the {MAX_TENSORS} allowed"
        ));
    }
    if kv_count > MAX_METADATA_ENTRIES {
        return bad(format!(
            "the header declares {kv_count} metadata entries, more than the \
             {MAX_METADATA_ENTRIES} allowed"
        ));
    }
    // A metadata entry takes at least a key length, a type and one byte; a tensor
    // entry a name length, a dimension count, a type and an offset.
    let needed = kv_count
        .saturating_mul(8 + 4 + 1)
        .saturating_add(tensor_count.saturating_mul(8 + 4 + 4 + 8));
    if needed > r.remaining() {
        return bad(format!(
            "truncated or corrupt: the header declares {tensor_count} tensors and {kv_count} \
             metadata entries, which need at least {needed} bytes, but only {} follow",
            r.remaining()
        ));
    }

    let mut keys = HashSet::new();
    let mut alignment = None;
    let mut budget = MAX_TOTAL_ARRAY_ELEMENTS;
    for index in 0..kv_count {
        let at = r.pos;
        let key = r.name(MAX_KEY_BYTES, &|| {
            format!("the key of metadata entry {index}")
        })?;
        let place = |key: &str, at: u64| format!("metadata entry {index} (`{key}`, at byte {at})");
        let type_id = r.u32(&|| format!("the value type of {}", place(&key, at)))?;
        let Some(vt) = ValueType::from_id(type_id) else {
            return bad(format!(
                "{}: unknown value type id {type_id}",
                place(&key, at)
            ));
        };
        if key == "general.alignment" {
            if vt != ValueType::U32 {
                return bad(format!(
                    "{}: the alignment must be a u32, found a {vt:?}",
                    place(&key, at)
                ));
            }
            let value = r.u32(&|| place(&key, at))?;
            if !value.is_power_of_two() {
                return bad(format!(
                    "{}: the alignment is {value}, it must be a non-zero power of two",
                    place(&key, at)
                ));
            }
            alignment = Some(u64::from(value));
        } else {
            value(r, vt, 0, &mut budget, &|| place(&key, at))?;
        }
        if !keys.insert(key) {
            return bad(format!(
                "metadata entry {index} (at byte {at}) repeats the key of an earlier entry"
            ));
        }
    }
    drop(keys);
    let alignment = alignment.unwrap_or(DEFAULT_ALIGNMENT);

    let mut names = HashSet::new();
    let mut tensors = Vec::new();
    for index in 0..tensor_count {
        let at = r.pos;
        let name = r.name(MAX_TENSOR_NAME_BYTES, &|| {
            format!("the name of tensor {index}")
        })?;
        let place = |name: &str| format!("tensor {index} `{name}` (at byte {at})");
        let n_dims = r.u32(&|| format!("the dimension count of {}", place(&name)))?;
        if n_dims > MAX_DIMS {
            return bad(format!(
                "{}: {n_dims} dimensions, at most {MAX_DIMS} are allowed",
                place(&name)
            ));
        }
        let mut dims = [0u64; MAX_DIMS as usize];
        for d in dims.iter_mut().take(n_dims as usize) {
            *d = r.u64(&|| format!("the dimensions of {}", place(&name)))?;
        }
        let dims = &dims[..n_dims as usize];
        // Every product of the dimensions must fit (candle multiplies them in its own
        // order, before any zero), so the product of the non-zero ones must.
        let nonzero = dims
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let Some(nonzero) = nonzero.filter(|&p| usize::try_from(p).is_ok()) else {
            return bad(format!(
                "{}: the dimensions {dims:?} overflow (their product does not fit in 64 bits)",
                place(&name)
            ));
        };
        let elems = if dims.contains(&0) { 0 } else { nonzero };
        let type_id = r.u32(&|| format!("the type of {}", place(&name)))?;
        let Some(dtype) = ggml_type(type_id) else {
            return bad(format!(
                "{}: unknown or unsupported ggml type id {type_id}",
                place(&name)
            ));
        };
        let block = dtype.block_size() as u64;
        let row = dims.first().copied().unwrap_or(1);
        if row % block != 0 || elems % block != 0 {
            return bad(format!(
                "{}: rows of {row} elements (dimensions {dims:?}) are not whole {dtype:?} \
                 blocks of {block}",
                place(&name)
            ));
        }
        let Some(bytes) = (elems / block).checked_mul(dtype.type_size() as u64) else {
            return bad(format!(
                "{}: the dimensions {dims:?} of {dtype:?} overflow in bytes",
                place(&name)
            ));
        };
        let offset = r.u64(&|| format!("the data offset of {}", place(&name)))?;
        if offset % alignment != 0 {
            return bad(format!(
                "{}: data offset {offset} is not a multiple of the alignment {alignment}",
                place(&name)
            ));
        }
        if !names.insert(name.clone()) {
            return bad(format!(
                "{}: the name repeats an earlier tensor's",
                place(&name)
            ));
        }
        tensors.push((name, offset, bytes));
    }
    drop(names);
    let Some(tensor_data_offset) = r.pos.checked_next_multiple_of(alignment) else {
        return bad(format!(
            "the tensor data offset ({} aligned to {alignment}) overflows",
            r.pos
        ));
    };
    tensors.sort_by_key(|&(_, offset, _)| offset);
    for (name, offset, bytes) in tensors {
        let start = tensor_data_offset.checked_add(offset);
        match start.and_then(|s| s.checked_add(bytes)) {
            Some(end) if end <= r.len => {}
            _ => {
                return Err(Fault::OutOfBounds {
                    name,
                    offset: start.unwrap_or(u64::MAX),
                    bytes,
                });
            }
        }
    }
    Ok(CheckedHeader {
        tensor_data_offset,
        alignment,
    })
}

/// Checks (and skips) one value of type `vt`; `depth` counts the arrays around it.
fn value(
    r: &mut HeaderReader<'_>,
    vt: ValueType,
    depth: u32,
    budget: &mut u64,
    what: &dyn Fn() -> String,
) -> Checked<()> {
    match vt {
        ValueType::Bool => {
            let at = r.pos;
            let [b] = r.array::<1>(what)?;
            if b > 1 {
                return bad(format!(
                    "{}: the bool at byte {at} is {b}, not 0 or 1",
                    what()
                ));
            }
            Ok(())
        }
        ValueType::String => {
            let len = r.string_len(MAX_STRING_BYTES, &|| format!("a string of {}", what()))?;
            r.skip(len, what)
        }
        ValueType::Array => array(r, depth, budget, what),
        fixed => r.skip(fixed.fixed_size().unwrap_or(1), what),
    }
}

fn array(
    r: &mut HeaderReader<'_>,
    depth: u32,
    budget: &mut u64,
    what: &dyn Fn() -> String,
) -> Checked<()> {
    let at = r.pos;
    if depth >= MAX_ARRAY_NESTING {
        return bad(format!(
            "{}: arrays nest deeper than {MAX_ARRAY_NESTING} levels (at byte {at})",
            what()
        ));
    }
    let type_id = r.u32(&|| format!("the element type of an array of {}", what()))?;
    let Some(vt) = ValueType::from_id(type_id) else {
        return bad(format!(
            "{}: the array at byte {at} has unknown element type id {type_id}",
            what()
        ));
    };
    let len = r.u64(&|| format!("the length of an array of {}", what()))?;
    if len > MAX_ARRAY_ELEMENTS {
        return bad(format!(
            "{}: the array at byte {at} has {len} elements, more than the \
             {MAX_ARRAY_ELEMENTS} allowed",
            what()
        ));
    }
    if len > *budget {
        return bad(format!(
            "{}: the array at byte {at} has {len} elements, past the limit of \
             {MAX_TOTAL_ARRAY_ELEMENTS} array elements in a header",
            what()
        ));
    }
    *budget -= len;
    let min = len.saturating_mul(vt.min_size());
    r.need(min, &|| {
        format!("the array of {len} {vt:?} values of {}", what())
    })?;
    match vt.fixed_size() {
        Some(size) if vt != ValueType::Bool => r.skip(len * size, what),
        _ => {
            for _ in 0..len {
                value(r, vt, depth + 1, budget, what)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_match_the_writer() {
        for id in 0..64 {
            if let Some(t) = ggml_type(id) {
                assert_eq!(crate::gguf_write::ggml_type_id(t), id);
            }
        }
    }
}
