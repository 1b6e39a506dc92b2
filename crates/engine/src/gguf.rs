//! GGUF model files: open with checks, read the configuration and weights, describe.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use afo_quant::{KernelChoice, QLinear, QuantScheme};
use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, meta_str};
use crate::error::{Error, Result};
use crate::model::{Model, WeightSource};

mod check;

/// An open GGUF file whose header and tensor table have been checked.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    file_len: u64,
    kernels: KernelChoice,
}

impl GgufFile {
    /// Opens and checks a GGUF file: the magic and version, the metadata and tensor
    /// table, and that every tensor's data lies inside the file.
    ///
    /// The header is checked with bounded reads before it is parsed: counts and
    /// lengths must fit in the file (and under sane caps), type ids must be known,
    /// `general.alignment` must be a power of two, tensors have at most four
    /// dimensions whose product fits in 64 bits, and their data is aligned. A hostile
    /// file is an error, never a panic or an allocation sized by a forged count.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened, [`Error::Gguf`] for a file that
    /// is not GGUF or has a corrupt or truncated header (naming the field and its
    /// byte offset), [`Error::TensorOutOfBounds`] naming the first tensor whose data
    /// is past the end.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        // Our own bounded check first: candle's reader trusts values it should not.
        let header = check::check_header(&path, &mut file, file_len)?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| Error::Gguf {
            path: path.clone(),
            reason: format!("corrupt or truncated header: {e}"),
        })?;
        if content.tensor_data_offset != header.tensor_data_offset {
            return Err(Error::Gguf {
                path,
                reason: format!(
                    "the tensor data starts at byte {} by the header's alignment {},                      the parse puts it at {}",
                    header.tensor_data_offset, header.alignment, content.tensor_data_offset
                ),
            });
        }
        let mut tensors: Vec<_> = content.tensor_infos.iter().collect();
        tensors.sort_by_key(|(_, info)| info.offset);
        for (name, info) in tensors {
            let dtype = info.ggml_dtype;
            let bytes = tensor_bytes(info).ok_or_else(|| Error::Gguf {
                path: path.clone(),
                reason: format!(
                    "tensor `{name}`: {:?} does not hold whole {dtype:?} blocks of {}",
                    info.shape.dims(),
                    dtype.block_size()
                ),
            })?;
            let offset = content.tensor_data_offset.checked_add(info.offset);
            if offset
                .and_then(|o| o.checked_add(bytes))
                .is_none_or(|end| end > file_len)
            {
                return Err(Error::TensorOutOfBounds {
                    path,
                    name: name.clone(),
                    offset: offset.unwrap_or(u64::MAX),
                    bytes,
                    file_len,
                });
            }
        }
        Ok(Self {
            path,
            content,
            reader,
            file_len,
            kernels: KernelChoice::default(),
        })
    }

    /// Which matmul runs the quantized weights of models loaded from now on. Default
    /// [`KernelChoice::Fastest`].
    pub fn set_kernels(&mut self, kernels: KernelChoice) {
        self.kernels = kernels;
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header: metadata and tensor table.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// The model configuration from the metadata.
    ///
    /// # Errors
    /// As [`ModelConfig::from_gguf_metadata`].
    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::from_gguf_metadata(&self.content.metadata)
    }

    /// Loads the decoder. Quantized tensors stay in their GGML type.
    ///
    /// # Errors
    /// A bad configuration, a missing tensor or one of the wrong shape.
    pub fn load_model(&mut self) -> Result<Model> {
        let config = self.config()?;
        Model::load(config, self)
    }

    /// Facts for `afo inspect`.
    pub fn describe(&self) -> GgufDescription {
        let mut by_type: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
        let mut parameters = 0u64;
        use crate::quantize::{MINS_SUFFIX, QUANTS_SUFFIX, SCALES_SUFFIX, format_key};
        // afo's int8/int4 weights are three tensors each: count them as one weight of
        // their scheme, with the parameters of the matrix they hold.
        let int_scheme = |base: &str| -> Option<String> {
            match self.content.metadata.get(&format_key(base)) {
                Some(candle_core::quantized::gguf_file::Value::String(f)) => Some(f.clone()),
                _ => None,
            }
        };
        for (name, info) in &self.content.tensor_infos {
            let t = info.ggml_dtype;
            // `open` checked every tensor's size, and that it lies inside the file.
            let bytes = tensor_bytes(info).unwrap_or(0);
            let elems = elem_count(info).unwrap_or(0);
            let part = |suffix: &str| {
                name.strip_suffix(suffix)
                    .and_then(|b| int_scheme(b).map(|f| (b, f)))
            };
            let (scheme, count, params) = if let Some((_, f)) = part(QUANTS_SUFFIX) {
                // Quant bytes per weight: 1 for int8, 1/2 for int4.
                let per_byte = if f == "int8" { 1 } else { 2 };
                (f, 1, bytes.saturating_mul(per_byte))
            } else if let Some((_, f)) = part(SCALES_SUFFIX).or_else(|| part(MINS_SUFFIX)) {
                (f, 0, 0)
            } else {
                (QuantScheme::from_ggml(t).to_string(), 1, elems)
            };
            let entry = by_type.entry(scheme).or_default();
            entry.0 += count;
            entry.1 = entry.1.saturating_add(params);
            entry.2 = entry.2.saturating_add(bytes);
            parameters = parameters.saturating_add(params);
        }
        GgufDescription {
            path: self.path.clone(),
            file_bytes: self.file_len,
            architecture: meta_str(&self.content.metadata, "general.architecture").ok(),
            name: meta_str(&self.content.metadata, "general.name").ok(),
            parameters,
            tensors: by_type.values().map(|e| e.0).sum(),
            by_type: by_type
                .into_iter()
                .map(|(scheme, (tensors, parameters, bytes))| TypeCount {
                    scheme,
                    tensors,
                    parameters,
                    bytes,
                })
                .collect(),
        }
    }

    fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_owned(),
            })
    }

    /// A tensor as stored, whatever its shape.
    pub(crate) fn read_raw(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(Error::MissingTensor {
                name: name.to_owned(),
            });
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::Gguf {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {e}"),
            })
    }

    /// Whether `name` is stored in afo's integer layout (see [`crate::save_gguf`]).
    fn is_int_weight(&self, name: &str) -> bool {
        self.content
            .tensor_infos
            .contains_key(&format!("{name}{}", crate::quantize::QUANTS_SUFFIX))
    }

    fn read(&mut self, name: &str, expected: &[usize]) -> Result<candle_core::quantized::QTensor> {
        let got = self.shape_of(name)?;
        if got != expected {
            return Err(Error::TensorShape {
                name: name.to_owned(),
                expected: expected.to_vec(),
                got,
            });
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::Gguf {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {e}"),
            })
    }
}

impl WeightSource for GgufFile {
    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name) || self.is_int_weight(name)
    }

    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: Option<&str>,
    ) -> Result<QLinear> {
        let bias = match bias {
            Some(b) => Some(self.vector(b, out)?),
            None => None,
        };
        if !self.content.tensor_infos.contains_key(name) && self.is_int_weight(name) {
            let w = crate::quantize::read_int_weight(self, name, out, inp)?;
            return Ok(QLinear::from_int(name, w, bias)?);
        }
        let weight = self.read(name, &[out, inp])?;
        Ok(QLinear::from_qtensor_with(
            name,
            weight,
            bias,
            self.kernels,
        )?)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let q = self.read(name, &[len])?;
        Ok(q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
    }
}

/// A tensor's element count, `None` when it overflows.
fn elem_count(info: &TensorInfo) -> Option<u64> {
    info.shape
        .dims()
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
}

/// A tensor's bytes in its GGML type, `None` when its elements are not whole blocks or
/// the size overflows.
fn tensor_bytes(info: &TensorInfo) -> Option<u64> {
    let elems = elem_count(info)?;
    let block = info.ggml_dtype.block_size() as u64;
    if block == 0 || elems % block != 0 {
        return None;
    }
    (elems / block).checked_mul(info.ggml_dtype.type_size() as u64)
}

/// What a GGUF file holds, for people.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufDescription {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub file_bytes: u64,
    /// `general.architecture`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// Total parameters.
    pub parameters: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensors, parameters and bytes per storage type.
    pub by_type: Vec<TypeCount>,
}

/// Tensors of one storage type.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeCount {
    /// The scheme (`Q4_1`, `F32`, ...).
    pub scheme: String,
    /// Tensors.
    pub tensors: usize,
    /// Parameters.
    pub parameters: u64,
    /// Bytes.
    pub bytes: u64,
}
