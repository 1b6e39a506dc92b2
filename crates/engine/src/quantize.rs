//! On-load quantization, and saving a (quantized) model as GGUF.
//!
//! [`QuantizingSource`] wraps any [`WeightSource`]: each linear weight is read from
//! the source, converted to the scheme the [`QuantPolicy`] gives its role, and the
//! source's copy dropped before the next one is read. Loading therefore never holds two
//! copies of the model: the peak is the quantized model so far, plus one source tensor,
//! plus the f32 rows of the blocks being converted ([`QLinear::requantize`]).
//!
//! [`save_gguf`] writes a model as GGUF. GGML types (Q8_0, Q4_0, Q4_K, F16, ...) are
//! written as themselves under their usual names, so llama.cpp reads them. afo's int8
//! and int4 weights are written as three tensors per weight, read back by
//! [`GgufFile`] without re-quantizing; the layout is in `docs/quantization.md`:
//!
//! | tensor | GGML type | shape | holds |
//! | --- | --- | --- | --- |
//! | `NAME.afo_quants` | F32 (a byte container) | `[n_out, row_bytes / 4]` | the quants, bytes as in [`IntWeights::quants`] |
//! | `NAME.afo_scales` | F32 | `[n_out, groups]` | the scales |
//! | `NAME.afo_mins` | F32 | `[n_out, groups]` | asymmetric int4 only: the minimums |
//!
//! with the metadata `afo.tensor.NAME.format` (`int8`, `int4-g32`, `int4-g128-asym`,
//! ...) and `afo.quantization.version = 1`.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use afo_quant::kernels::{DensePanels, IntFormat, IntWeights};
use afo_quant::{QLinear, QuantPolicy, QuantScheme, TensorRole, WeightData};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::gguf_write::{TensorEntry, WriteFn, bytes_writer, write_err, write_gguf};
use crate::model::{Model, WeightSource};

/// Version of afo's integer tensor layout in GGUF files.
pub const AFO_QUANT_VERSION: u32 = 1;

/// Suffix of the tensor holding an integer weight's quants.
pub(crate) const QUANTS_SUFFIX: &str = ".afo_quants";
/// Suffix of the tensor holding an integer weight's scales.
pub(crate) const SCALES_SUFFIX: &str = ".afo_scales";
/// Suffix of the tensor holding an asymmetric int4 weight's minimums.
pub(crate) const MINS_SUFFIX: &str = ".afo_mins";

/// The metadata key naming an integer weight's format.
pub(crate) fn format_key(name: &str) -> String {
    format!("afo.tensor.{name}.format")
}

/// One weight converted by a [`QuantizingSource`].
#[derive(Debug, Clone, Copy)]
pub struct QuantizeProgress<'a> {
    /// Linear weights done so far, this one included.
    pub done: usize,
    /// Linear weights in the model.
    pub total: usize,
    /// This weight's GGUF name.
    pub name: &'a str,
    /// The scheme it is now stored in.
    pub scheme: QuantScheme,
    /// Bytes it now takes.
    pub bytes: u64,
}

/// A [`WeightSource`] that quantizes every linear weight of another one by a policy.
pub struct QuantizingSource<'a> {
    inner: &'a mut dyn WeightSource,
    policy: QuantPolicy,
    total: usize,
    done: usize,
    progress: Box<dyn FnMut(QuantizeProgress<'_>) + 'a>,
}

impl std::fmt::Debug for QuantizingSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizingSource")
            .field("policy", &self.policy)
            .field("done", &self.done)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl<'a> QuantizingSource<'a> {
    /// Wraps `inner`. `total` is the number of linear weights the model will ask for
    /// (see [`linear_weight_count`]); `progress` is called after each.
    pub fn new(
        inner: &'a mut dyn WeightSource,
        policy: QuantPolicy,
        total: usize,
        progress: impl FnMut(QuantizeProgress<'_>) + 'a,
    ) -> Self {
        Self {
            inner,
            policy,
            total,
            done: 0,
            progress: Box::new(progress),
        }
    }
}

/// Linear weights a decoder of `layers` layers reads: seven per layer, the embedding,
/// and the head when it is not tied.
pub fn linear_weight_count(layers: usize, untied_head: bool) -> usize {
    7 * layers + 1 + usize::from(untied_head)
}

impl WeightSource for QuantizingSource<'_> {
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: Option<&str>,
    ) -> Result<QLinear> {
        let source = self.inner.linear(name, out, inp, bias)?;
        let scheme = TensorRole::of_gguf_name(name)
            .map_or(source.scheme(), |role| self.policy.scheme_for(role));
        let layer = source.requantize(name, scheme)?;
        drop(source);
        self.done += 1;
        (self.progress)(QuantizeProgress {
            done: self.done,
            total: self.total,
            name,
            scheme,
            bytes: layer.bytes(),
        });
        Ok(layer)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        self.inner.vector(name, len)
    }
}

/// What [`save_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub file_bytes: u64,
    /// Tensors written.
    pub tensors: usize,
}

fn export_err(reason: String) -> Error {
    Error::Export { reason }
}

/// Rows per block when writing a dense tensor.
const WRITE_ROWS: usize = 1024;

/// Writes `rows` rows to `w` a block of [`WRITE_ROWS`] at a time: `block(start, n)`
/// gives the bytes of rows `start..start + n`. Returns the bytes written.
fn write_row_blocks(
    w: &mut dyn Write,
    rows: usize,
    mut block: impl FnMut(usize, usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    let mut written = 0u64;
    for start in (0..rows).step_by(WRITE_ROWS) {
        let bytes = block(start, WRITE_ROWS.min(rows - start))?;
        w.write_all(&bytes).map_err(write_err)?;
        written += bytes.len() as u64;
    }
    Ok(written)
}

/// Writes an f32 weight held in panels as row-major f32, gathered a block of rows at
/// a time (no row-major copy of the whole matrix).
fn panels_writer(p: &DensePanels) -> WriteFn<'_> {
    Box::new(move |w: &mut dyn Write| {
        let k = p.k();
        let mut rows = vec![0f32; WRITE_ROWS.min(p.n_out()) * k];
        write_row_blocks(w, p.n_out(), |start, n| {
            let part = rows.get_mut(..n * k).unwrap_or_default();
            for (r, row) in part.chunks_exact_mut(k).enumerate() {
                p.row(start + r, row)
                    .map_err(|e| export_err(e.to_string()))?;
            }
            Ok(f32_bytes(part))
        })
    })
}

/// Writes `t` a block of rows at a time as `dtype` (f16, bf16, or f32 for any other).
fn dense_writer<'a>(t: Tensor, dtype: DType) -> WriteFn<'a> {
    Box::new(move |w: &mut dyn Write| {
        let rows = t.dims().first().copied().unwrap_or(1);
        let t2 = t.reshape((rows, ()))?;
        write_row_blocks(w, rows, |start, n| {
            let block = t2.narrow(0, start, n)?.flatten_all()?;
            Ok(match dtype {
                DType::F16 => block
                    .to_dtype(DType::F16)?
                    .to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                DType::BF16 => block
                    .to_dtype(DType::BF16)?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                _ => f32_bytes(&block.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            })
        })
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Saves `model` as a GGUF file at `path`, with the metadata (tokenizer, chat template,
/// architecture) of the GGUF file it was loaded from and `afo.quantization.policy`
/// describing `policy`. Tensors of `source` the model does not hold (such as
/// `rope_freqs.weight`) are copied. The file is written next to `path` and renamed
/// into place, so a failed save leaves no partial file.
///
/// # Errors
/// [`Error::Export`] for write failures, [`Error::Io`] for the file itself.
pub fn save_gguf(
    model: &Model,
    source: &mut GgufFile,
    policy: Option<&QuantPolicy>,
    path: impl AsRef<Path>,
) -> Result<SaveReport> {
    let path = path.as_ref().to_path_buf();
    let linears = model.linears();
    let vectors = model.vectors();
    let mut metadata: Vec<(String, Value)> = source
        .content()
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("afo.") && k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // `general.file_type` names the scheme of most weights (llama.cpp's ftype): set
    // it from the layers as saved, or drop it for schemes it has no number for.
    metadata.retain(|(k, _)| k != "general.file_type");
    if let Some(ftype) = model.quant_scheme().and_then(llama_ftype) {
        metadata.push(("general.file_type".into(), Value::U32(ftype)));
    }
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    metadata.push((
        "afo.quantization.version".into(),
        Value::U32(AFO_QUANT_VERSION),
    ));
    if let Some(p) = policy {
        metadata.push((
            "afo.quantization.policy".into(),
            Value::String(p.to_string()),
        ));
    }

    let mut entries: Vec<TensorEntry<'_>> = Vec::new();
    let mut written: HashSet<String> = HashSet::new();
    for (name, layer) in &linears {
        let (out, inp) = (layer.out_features(), layer.in_features());
        match layer.weight_data()? {
            data @ (WeightData::Dense(t) | WeightData::Narrowed(t)) => {
                // A narrowed f32 weight is written as the f32 it declares.
                let dtype = match (&data, t.dtype()) {
                    (WeightData::Narrowed(_), _) => DType::F32,
                    (_, dtype) => dtype,
                };
                entries.push(TensorEntry {
                    name: name.clone(),
                    dtype: match dtype {
                        DType::F16 => GgmlDType::F16,
                        DType::BF16 => GgmlDType::BF16,
                        _ => GgmlDType::F32,
                    },
                    dims: vec![out, inp],
                    write: dense_writer(t.clone(), dtype),
                });
            }
            WeightData::Panels(p) => {
                entries.push(TensorEntry {
                    name: name.clone(),
                    dtype: GgmlDType::F32,
                    dims: vec![out, inp],
                    write: panels_writer(p),
                });
            }
            WeightData::Ggml { dtype, .. } => {
                let l: &QLinear = layer;
                let n = name.clone();
                entries.push(TensorEntry {
                    name: name.clone(),
                    dtype,
                    dims: vec![out, inp],
                    write: Box::new(move |w: &mut dyn Write| match l.weight_data()? {
                        WeightData::Ggml { bytes, .. } => {
                            w.write_all(&bytes).map_err(write_err)?;
                            Ok(bytes.len() as u64)
                        }
                        _ => Err(export_err(format!("tensor `{n}` changed while saving"))),
                    }),
                });
            }
            WeightData::Int(w) => {
                metadata.push((format_key(name), Value::String(w.format().to_string())));
                let row_bytes = w.format().quant_bytes_per_row(inp);
                let groups = w.format().groups_per_row(inp);
                entries.push(TensorEntry {
                    name: format!("{name}{QUANTS_SUFFIX}"),
                    dtype: GgmlDType::F32,
                    dims: vec![out, row_bytes / 4],
                    // Row-major again if in panels, one matrix at a time as it is
                    // written.
                    write: Box::new(move |out: &mut dyn Write| {
                        let q = w.quants().map_err(|e| export_err(e.to_string()))?;
                        out.write_all(&q).map_err(write_err)?;
                        Ok(q.len() as u64)
                    }),
                });
                entries.push(TensorEntry {
                    name: format!("{name}{SCALES_SUFFIX}"),
                    dtype: GgmlDType::F32,
                    dims: vec![out, groups],
                    write: Box::new(move |out: &mut dyn Write| {
                        let b = f32_bytes(w.scales());
                        out.write_all(&b).map_err(write_err)?;
                        Ok(b.len() as u64)
                    }),
                });
                if w.format().has_mins() {
                    entries.push(TensorEntry {
                        name: format!("{name}{MINS_SUFFIX}"),
                        dtype: GgmlDType::F32,
                        dims: vec![out, groups],
                        write: Box::new(move |out: &mut dyn Write| {
                            let b = f32_bytes(w.mins());
                            out.write_all(&b).map_err(write_err)?;
                            Ok(b.len() as u64)
                        }),
                    });
                }
            }
        }
        written.insert(name.clone());
        if let Some(b) = layer.bias() {
            let bias_name = format!("{}.bias", name.trim_end_matches(".weight"));
            entries.push(TensorEntry {
                name: bias_name.clone(),
                dtype: GgmlDType::F32,
                dims: vec![out],
                write: dense_writer(b.to_dtype(DType::F32)?, DType::F32),
            });
            written.insert(bias_name);
        }
    }
    for (name, t) in &vectors {
        entries.push(TensorEntry {
            name: name.clone(),
            dtype: GgmlDType::F32,
            dims: t.dims().to_vec(),
            write: dense_writer(t.to_dtype(DType::F32)?, DType::F32),
        });
        written.insert(name.clone());
    }
    // What the model folded away (RoPE factors) or does not use, copied as it is.
    let mut leftovers: Vec<String> = source
        .content()
        .tensor_infos
        .keys()
        .filter(|n| !written.contains(*n) && !is_afo_part(n))
        .cloned()
        .collect();
    leftovers.sort();
    for name in leftovers {
        let q = source.read_raw(&name)?;
        let bytes = q.data()?.into_owned();
        entries.push(TensorEntry {
            name,
            dtype: q.dtype(),
            dims: q.shape().dims().to_vec(),
            write: bytes_writer(bytes),
        });
    }

    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.gguf".into());
    let tmp = path.with_file_name(format!(".{file_name}.partial"));
    let io = |source| Error::Io {
        path: tmp.clone(),
        source,
    };
    let result = (|| {
        let mut w = BufWriter::new(File::create(&tmp).map_err(io)?);
        write_gguf(&mut w, &metadata, &entries)?;
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    let file_bytes = std::fs::metadata(&path)
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?
        .len();
    Ok(SaveReport {
        path,
        file_bytes,
        tensors: entries.len(),
    })
}

/// llama.cpp's `general.file_type` number of a scheme, where it has one.
fn llama_ftype(scheme: QuantScheme) -> Option<u32> {
    match scheme {
        QuantScheme::F32 => Some(0),
        QuantScheme::F16 => Some(1),
        QuantScheme::BF16 => Some(32),
        QuantScheme::Ggml(GgmlDType::Q4_0) => Some(2),
        QuantScheme::Ggml(GgmlDType::Q4_1) => Some(3),
        QuantScheme::Ggml(GgmlDType::Q8_0) => Some(7),
        QuantScheme::Ggml(GgmlDType::Q5_0) => Some(8),
        QuantScheme::Ggml(GgmlDType::Q5_1) => Some(9),
        _ => None,
    }
}

fn is_afo_part(name: &str) -> bool {
    [QUANTS_SUFFIX, SCALES_SUFFIX, MINS_SUFFIX]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Reads an integer weight saved by [`save_gguf`] back from its three tensors.
pub(crate) fn read_int_weight(
    file: &mut GgufFile,
    name: &str,
    out: usize,
    inp: usize,
) -> Result<IntWeights> {
    let path = file.path().to_path_buf();
    let bad = |reason: String| Error::Gguf {
        path: path.clone(),
        reason: format!("tensor `{name}`: {reason}"),
    };
    let format: IntFormat = match file.content().metadata.get(&format_key(name)) {
        Some(Value::String(s)) => s.parse().map_err(|e| bad(format!("format `{s}`: {e}")))?,
        _ => return Err(bad(format!("metadata `{}` is missing", format_key(name)))),
    };
    let quants = file.read_raw(&format!("{name}{QUANTS_SUFFIX}"))?;
    let quant_bytes = quants.data()?.into_owned();
    let floats = |q: candle_core::quantized::QTensor| -> Result<Vec<f32>> {
        Ok(q.dequantize(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let scales = floats(file.read_raw(&format!("{name}{SCALES_SUFFIX}"))?)?;
    let mins = if format.has_mins() {
        floats(file.read_raw(&format!("{name}{MINS_SUFFIX}"))?)?
    } else {
        Vec::new()
    };
    IntWeights::from_parts(format, out, inp, quant_bytes, scales, mins)
        .map_err(|e| bad(format!("{format} [{out}, {inp}]: {e}")))
}
