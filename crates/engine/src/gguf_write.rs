//! Writing GGUF files (version 3), one tensor at a time.
//!
//! candle's writer wants every tensor as a `QTensor` at once, which would hold a second
//! copy of the model while saving it; this one asks each tensor to write itself when
//! its turn comes, so saving costs at most a block of rows of extra memory.

use std::io::{Seek, Write};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;

use crate::error::Result;

/// Alignment of the tensor data (GGUF's default; `general.alignment` is not written).
pub(crate) const ALIGNMENT: u64 = 32;

/// Writes a tensor's bytes and returns how many it wrote.
pub(crate) type WriteFn<'a> = Box<dyn Fn(&mut dyn Write) -> Result<u64> + 'a>;

/// A tensor to write: its name, GGML type, dimensions (outermost first, as candle
/// reports them) and a function that writes its bytes when their turn comes.
pub(crate) struct TensorEntry<'a> {
    pub(crate) name: String,
    pub(crate) dtype: GgmlDType,
    pub(crate) dims: Vec<usize>,
    pub(crate) write: WriteFn<'a>,
}

/// A [`WriteFn`] for bytes at hand.
pub(crate) fn bytes_writer<'a>(bytes: impl AsRef<[u8]> + 'a) -> WriteFn<'a> {
    Box::new(move |w| {
        let b = bytes.as_ref();
        w.write_all(b).map_err(write_err)?;
        Ok(b.len() as u64)
    })
}

pub(crate) fn write_err(e: std::io::Error) -> crate::error::Error {
    crate::error::Error::Export {
        reason: format!("writing failed: {e}"),
    }
}

impl TensorEntry<'_> {
    fn size(&self) -> u64 {
        let elems: usize = self.dims.iter().product();
        (elems / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// GGML's type ids (ggml.h), as written in GGUF tensor infos.
pub(crate) fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// GGUF metadata value type ids.
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_str<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::Array(items) => {
            // An empty array is written as an array of u8.
            let t = items.first().map_or(0, value_type_id);
            w.write_all(&t.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for item in items {
                write_value(w, item)?;
            }
            Ok(())
        }
    }
}

fn pad<W: Write>(w: &mut W, written: u64) -> std::io::Result<u64> {
    let padding = (ALIGNMENT - written % ALIGNMENT) % ALIGNMENT;
    w.write_all(&vec![0u8; padding as usize])?;
    Ok(padding)
}

/// Writes a GGUF v3 file: the metadata in the order given, then the tensor table and
/// the tensors, each aligned to [`ALIGNMENT`] bytes.
///
/// # Errors
/// I/O errors, a tensor whose bytes do not have the size its type and shape call for.
pub(crate) fn write_gguf<W: Write + Seek>(
    w: &mut W,
    metadata: &[(String, Value)],
    tensors: &[TensorEntry<'_>],
) -> Result<()> {
    let io = write_err;
    w.write_all(b"GGUF").map_err(io)?;
    w.write_all(&3u32.to_le_bytes()).map_err(io)?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&(metadata.len() as u64).to_le_bytes())
        .map_err(io)?;
    for (key, value) in metadata {
        write_str(w, key).map_err(io)?;
        w.write_all(&value_type_id(value).to_le_bytes())
            .map_err(io)?;
        write_value(w, value).map_err(io)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        write_str(w, &t.name).map_err(io)?;
        w.write_all(&(t.dims.len() as u32).to_le_bytes())
            .map_err(io)?;
        for &d in t.dims.iter().rev() {
            w.write_all(&(d as u64).to_le_bytes()).map_err(io)?;
        }
        w.write_all(&ggml_type_id(t.dtype).to_le_bytes())
            .map_err(io)?;
        w.write_all(&offset.to_le_bytes()).map_err(io)?;
        offset += t.size().next_multiple_of(ALIGNMENT);
    }
    let pos = w.stream_position().map_err(io)?;
    pad(w, pos).map_err(io)?;
    for t in tensors {
        let start = w.stream_position().map_err(io)?;
        let written = (t.write)(&mut *w)?;
        let end = w.stream_position().map_err(io)?;
        if written != t.size() || end - start != written {
            return Err(crate::error::Error::Export {
                reason: format!(
                    "tensor `{}`: {} bytes written, its type {:?} and shape {:?} call for {}",
                    t.name,
                    end - start,
                    t.dtype,
                    t.dims,
                    t.size()
                ),
            });
        }
        pad(w, written).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use candle_core::quantized::gguf_file::Content;
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn candle_reads_what_we_write() {
        let w = Tensor::arange(0f32, 64.0, &Device::Cpu).unwrap();
        let q8 = candle_core::quantized::QTensor::quantize(
            &w.reshape((2, 32)).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let q8_bytes = q8.data().unwrap().into_owned();
        let f32_bytes: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let metadata = vec![
            (
                "general.architecture".to_owned(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_owned(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
            ("x.empty".to_owned(), Value::Array(vec![])),
            ("x.f".to_owned(), Value::F64(0.5)),
        ];
        let tensors = vec![
            TensorEntry {
                name: "a".into(),
                dtype: GgmlDType::F32,
                dims: vec![2, 3],
                write: bytes_writer(&f32_bytes),
            },
            TensorEntry {
                name: "b".into(),
                dtype: GgmlDType::Q8_0,
                dims: vec![2, 32],
                write: bytes_writer(&q8_bytes),
            },
        ];
        let mut buf = Cursor::new(Vec::new());
        write_gguf(&mut buf, &metadata, &tensors).unwrap();
        buf.set_position(0);
        let content = Content::read(&mut buf).unwrap();
        assert_eq!(
            content.metadata["tokenizer.ggml.tokens"]
                .to_vec()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(content.metadata["x.f"].to_f64().unwrap(), 0.5);
        let a = content.tensor(&mut buf, "a", &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = a.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(v, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]);
        let b = content.tensor(&mut buf, "b", &Device::Cpu).unwrap();
        assert_eq!(b.data().unwrap().as_ref(), &q8_bytes[..]);
        // A tensor whose bytes do not fit its shape is refused.
        let bad = vec![TensorEntry {
            name: "c".into(),
            dtype: GgmlDType::F32,
            dims: vec![4],
            write: bytes_writer(vec![0u8; 3]),
        }];
        let err = write_gguf(&mut Cursor::new(Vec::new()), &[], &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor `c`"), "{err}");
    }
}
