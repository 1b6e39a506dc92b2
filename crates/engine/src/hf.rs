//! Hugging Face model directories (`config.json` + `*.safetensors`, sharded or not,
//! read tensor by tensor) and the Hugging Face cache layout.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use afo_quant::QLinear;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::config::{Architecture, ModelConfig, RopeScaling, derived_head_dim};
use crate::error::{Error, Result};
use crate::model::{Model, WeightSource};

/// `config.json` as written, every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfConfig {
    /// `model_type`.
    pub model_type: Option<String>,
    /// `architectures`.
    pub architectures: Option<Vec<String>>,
    /// `vocab_size`.
    pub vocab_size: Option<usize>,
    /// `hidden_size`.
    pub hidden_size: Option<usize>,
    /// `intermediate_size`.
    pub intermediate_size: Option<usize>,
    /// `num_hidden_layers`.
    pub num_hidden_layers: Option<usize>,
    /// `num_attention_heads`.
    pub num_attention_heads: Option<usize>,
    /// `num_key_value_heads`.
    pub num_key_value_heads: Option<usize>,
    /// `head_dim`.
    pub head_dim: Option<usize>,
    /// `rms_norm_eps`.
    pub rms_norm_eps: Option<f64>,
    /// `rope_theta`.
    pub rope_theta: Option<f64>,
    /// `rope_scaling`.
    pub rope_scaling: Option<HfRopeScaling>,
    /// `max_position_embeddings`.
    pub max_position_embeddings: Option<usize>,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: Option<bool>,
    /// `sliding_window` (Mistral; Qwen2/3 only with `use_sliding_window`).
    pub sliding_window: Option<usize>,
    /// `use_sliding_window` (Qwen2/3; off in every released checkpoint).
    pub use_sliding_window: Option<bool>,
}

/// `rope_scaling` in `config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfRopeScaling {
    /// `rope_type` (or `type`).
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    /// `factor`.
    pub factor: Option<f64>,
    /// `low_freq_factor`.
    pub low_freq_factor: Option<f64>,
    /// `high_freq_factor`.
    pub high_freq_factor: Option<f64>,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: Option<usize>,
}

impl HfConfig {
    /// Reads `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::Json`] naming the file, line and column.
    pub fn read(path: &Path) -> Result<Self> {
        read_config(path)
    }

    /// The resolved configuration.
    ///
    /// # Errors
    /// [`Error::UnsupportedArchitecture`], or [`Error::InvalidConfig`] naming a
    /// missing field.
    pub fn resolve(&self) -> Result<ModelConfig> {
        let name = self
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| self.model_type.clone())
            .ok_or_else(|| missing("model_type"))?;
        let arch = Architecture::from_hf(&name)?;
        let info = arch.info();
        let need = |v: Option<usize>, f: &'static str| v.ok_or_else(|| missing(f));
        let hidden = need(self.hidden_size, "hidden_size")?;
        let heads = need(self.num_attention_heads, "num_attention_heads")?;
        let rope_scaling = match &self.rope_scaling {
            Some(s) if s.rope_type.as_deref() == Some("llama3") => RopeScaling::Llama3 {
                factor: s.factor.ok_or_else(|| missing("rope_scaling.factor"))?,
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position: s
                    .original_max_position_embeddings
                    .ok_or_else(|| missing("rope_scaling.original_max_position_embeddings"))?,
            },
            _ => RopeScaling::None,
        };
        let config = ModelConfig {
            arch,
            vocab_size: need(self.vocab_size, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: need(self.intermediate_size, "intermediate_size")?,
            num_layers: need(self.num_hidden_layers, "num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: match self.head_dim {
                Some(d) => d,
                None => derived_head_dim(hidden, heads, "config.json: hidden_size")?,
            },
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_interleaved: false,
            max_position: self.max_position_embeddings.unwrap_or(4096),
            tie_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: info.qkv_bias,
            qk_norm: info.qk_norm,
            sliding_window: match arch {
                Architecture::Mistral => self.sliding_window,
                _ if self.use_sliding_window == Some(true) => {
                    // Qwen's windowed variant applies the window to some layers only
                    // (`max_window_layers`); running it with full attention everywhere
                    // would silently change the model.
                    return Err(Error::InvalidConfig {
                        reason: format!(
                            "{name}: use_sliding_window is not supported (only Mistral's \
                             window applied to every layer is)"
                        ),
                    });
                }
                _ => None,
            },
        };
        config.validate()?;
        Ok(config)
    }
}

/// The largest `config.json` (or other model configuration file) read.
pub(crate) const CONFIG_JSON_LIMIT: u64 = 1 << 20;
/// The largest `model.safetensors.index.json` read.
pub(crate) const INDEX_JSON_LIMIT: u64 = 16 << 20;
/// The largest `tokenizer.json` read.
pub(crate) const TOKENIZER_JSON_LIMIT: u64 = 64 << 20;
/// The largest `tokenizer_config.json` read.
pub(crate) const TOKENIZER_CONFIG_LIMIT: u64 = 16 << 20;
/// The largest safetensors header read (the `safetensors` crate's own limit).
const SAFETENSORS_HEADER_LIMIT: u64 = 100_000_000;

/// Reads a whole file of at most `limit` bytes, refusing a larger one before reading
/// it (and a file that grows past the limit while it is read).
///
/// # Errors
/// [`Error::Io`], [`Error::FileTooLarge`] naming the file, its size and the limit.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let too_large = |bytes| Error::FileTooLarge {
        path: path.to_path_buf(),
        bytes,
        limit,
    };
    if len > limit {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Reads a JSON configuration file (at most [`CONFIG_JSON_LIMIT`] bytes) into its
/// serde mirror.
///
/// # Errors
/// [`Error::Io`], [`Error::FileTooLarge`], or [`Error::Json`] naming the file, line
/// and column.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    read_json_bounded(path, CONFIG_JSON_LIMIT)
}

/// Reads a JSON file of at most `limit` bytes.
///
/// # Errors
/// [`Error::Io`], [`Error::FileTooLarge`], or [`Error::Json`].
pub(crate) fn read_json_bounded<T: serde::de::DeserializeOwned>(
    path: &Path,
    limit: u64,
) -> Result<T> {
    let bytes = read_bounded(path, limit)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn missing(field: &str) -> Error {
    Error::InvalidConfig {
        reason: format!("config.json: `{field}` is missing"),
    }
}

/// The Hugging Face name of a GGUF-named tensor.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, kind) = tail.rsplit_once('.')?;
    let hf = match stem {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// A Hugging Face model directory's weights, read tensor by tensor after their headers
/// were checked.
///
/// Not memory-mapped: every tensor is copied into its own buffer anyway (converted to
/// the dtype the layer keeps), and the mapped pages a copy touches stay in the
/// process's resident set until the map goes, so a map would hold the file twice while
/// a model loads. Reading each tensor's bytes with a positioned read keeps the load's
/// peak at the weights plus one tensor.
pub struct SafetensorsDir {
    dir: PathBuf,
    tensors: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for SafetensorsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsDir")
            .field("dir", &self.dir)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl SafetensorsDir {
    /// Opens `model.safetensors`, or the shards named by
    /// `model.safetensors.index.json`, checking every header first.
    ///
    /// A shard must lie inside the model folder: a name with `..`, a root or an
    /// absolute path is refused, and so is one whose real path (symlinks followed)
    /// leaves the folder, except into the `blobs/` of a Hugging Face cache repository
    /// when the folder is one of its snapshots.
    ///
    /// # Errors
    /// Missing files, corrupt headers, data past the end of a file, unsupported dtypes,
    /// a shard or tensor missing from the index, a shard outside the folder
    /// ([`Error::ShardOutsideModel`]), a tensor in two shards: each names the file and
    /// tensor.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            #[derive(Deserialize)]
            struct Index {
                weight_map: HashMap<String, String>,
            }
            let parsed: Index = read_json_bounded(&index, INDEX_JSON_LIMIT)?;
            let mut names: Vec<String> = parsed.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            let folder = ModelFolder::new(&dir)?;
            names
                .iter()
                .map(|name| folder.shard(&index, name))
                .collect::<Result<_>>()?
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors: HashMap<String, TensorEntry> = HashMap::new();
        for file in &files {
            for entry in check_header(file)? {
                if let Some(other) = tensors.get(&entry.name) {
                    return Err(Error::Safetensors {
                        path: file.clone(),
                        reason: format!(
                            "tensor `{}` is also in `{}`",
                            entry.name,
                            other.file.display()
                        ),
                    });
                }
                tensors.insert(entry.name.clone(), entry);
            }
        }
        Ok(Self { dir, tensors })
    }

    /// Parameters: the elements of every tensor.
    pub fn parameters(&self) -> u64 {
        self.tensors
            .values()
            .map(|e| e.shape.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }

    /// The stored dtype of the tensor of this Hugging Face name, when there is one.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor by its Hugging Face name, as f32 or its stored dtype.
    ///
    /// # Errors
    /// [`Error::MissingTensor`].
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let Some(e) = self.tensors.get(name) else {
            return Err(Error::MissingTensor {
                name: format!("{name} (in {})", self.dir.display()),
            });
        };
        let io = |source| Error::Io {
            path: e.file.clone(),
            source,
        };
        let mut file = std::fs::File::open(&e.file).map_err(io)?;
        file.seek(SeekFrom::Start(e.offset)).map_err(io)?;
        let mut bytes = vec![0u8; e.len];
        file.read_exact(&mut bytes).map_err(io)?;
        Ok(Tensor::from_raw_buffer(
            &bytes,
            e.dtype,
            &e.shape,
            &Device::Cpu,
        )?)
    }

    fn checked(&self, gguf_name: &str, shape: &[usize]) -> Result<Tensor> {
        let hf = gguf_to_hf_name(gguf_name).ok_or_else(|| Error::MissingTensor {
            name: gguf_name.to_owned(),
        })?;
        self.checked_hf(&hf, shape)
    }

    /// Whether the directory holds a tensor of this Hugging Face name.
    pub(crate) fn contains_hf(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor by its Hugging Face name, checked to have `shape`.
    pub(crate) fn checked_hf(&self, hf: &str, shape: &[usize]) -> Result<Tensor> {
        let entry = self.tensors.get(hf).ok_or_else(|| Error::MissingTensor {
            name: format!("{hf} (in {})", self.dir.display()),
        })?;
        if entry.shape != shape {
            return Err(Error::TensorShape {
                name: hf.to_owned(),
                expected: shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        self.tensor(hf)
    }

    /// Loads the decoder described by `config.json`.
    ///
    /// # Errors
    /// Configuration and tensor errors.
    pub fn load_model(&mut self) -> Result<Model> {
        let config = self.config()?;
        Model::load(config, self)
    }

    /// The resolved `config.json`.
    ///
    /// # Errors
    /// Reading or resolving the configuration.
    pub fn config(&self) -> Result<crate::config::ModelConfig> {
        HfConfig::read(&self.dir.join("config.json"))?.resolve()
    }
}

impl WeightSource for SafetensorsDir {
    fn contains(&self, name: &str) -> bool {
        gguf_to_hf_name(name).is_some_and(|hf| self.tensors.contains_key(&hf))
    }

    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: Option<&str>,
    ) -> Result<QLinear> {
        let weight = self.checked(name, &[out, inp])?;
        let bias = match bias {
            Some(b) => Some(self.checked(b, &[out])?.to_dtype(DType::F32)?),
            None => None,
        };
        Ok(QLinear::dense(name, weight, bias)?)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        Ok(self.checked(name, &[len])?.to_dtype(DType::F32)?)
    }
}

/// Where one tensor's bytes lie.
#[derive(Debug, Clone)]
struct TensorEntry {
    name: String,
    file: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset of the data in the file.
    offset: u64,
    /// Bytes of data.
    len: usize,
}

/// The model folder, for checking where the shards an index names lie.
struct ModelFolder<'a> {
    dir: &'a Path,
    /// The folder's real path.
    real: PathBuf,
    /// The repository's `blobs/` when the folder is a Hugging Face cache snapshot
    /// (`models--ORG--NAME/snapshots/REV`), whose files are symlinks into it.
    blobs: Option<PathBuf>,
}

impl<'a> ModelFolder<'a> {
    fn new(dir: &'a Path) -> Result<Self> {
        let real = dir.canonicalize().map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let blobs = real.parent().and_then(|snapshots| {
            let repo = snapshots.parent()?;
            let is_snapshot = snapshots.file_name()? == "snapshots"
                && repo.file_name()?.to_str()?.starts_with("models--");
            is_snapshot.then(|| repo.join("blobs"))
        });
        Ok(Self { dir, real, blobs })
    }

    /// The path of the shard `name` from `index`, refused when it leaves the folder.
    fn shard(&self, index: &Path, name: &str) -> Result<PathBuf> {
        use std::path::Component;
        let refuse = |reason: &str| Error::ShardOutsideModel {
            index: index.to_path_buf(),
            shard: name.to_owned(),
            reason: reason.to_owned(),
        };
        if name.is_empty() {
            return Err(refuse("is empty"));
        }
        let relative = Path::new(name);
        if relative.is_absolute() {
            return Err(refuse(
                "is an absolute path, not a file in the model folder",
            ));
        }
        for component in relative.components() {
            match component {
                Component::Normal(_) | Component::CurDir => {}
                Component::ParentDir => {
                    return Err(refuse("goes up (`..`) out of the model folder"));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(refuse("names a root, not a file in the model folder"));
                }
            }
        }
        let path = self.dir.join(relative);
        // A shard that does not exist is reported when it is opened.
        if let Ok(real) = path.canonicalize() {
            let inside = real.starts_with(&self.real)
                || self.blobs.as_ref().is_some_and(|b| real.starts_with(b));
            if !inside {
                return Err(Error::ShardOutsideModel {
                    index: index.to_path_buf(),
                    shard: name.to_owned(),
                    reason: format!(
                        "resolves to `{}`, outside the model folder `{}`",
                        real.display(),
                        self.real.display()
                    ),
                });
            }
        }
        Ok(path)
    }
}

/// Checks one safetensors file's header: length, JSON, dtypes, shapes, data ranges.
///
/// The header is read on its own (bounded by the file and by the `safetensors`
/// crate's 100 MB limit) and validated with that crate's [`Metadata`], which wants
/// every tensor's data to follow the previous one's with no gap or overlap, up to the
/// end of the file; the data itself is read later, tensor by tensor.
///
/// [`Metadata`]: safetensors::tensor::Metadata
fn check_header(path: &Path) -> Result<Vec<TensorEntry>> {
    use safetensors::tensor::{Dtype, Metadata, TensorInfo};
    let bad = |reason: String| Error::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    if file_len < 8 || file.read_exact(&mut len_bytes).is_err() {
        return Err(bad(format!(
            "truncated: {file_len} bytes, no safetensors header"
        )));
    }
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > file_len - 8 {
        return Err(bad(format!(
            "header length {header_len} is past the end of the file ({file_len} bytes)"
        )));
    }
    if header_len > SAFETENSORS_HEADER_LIMIT {
        return Err(bad(format!(
            "header length {header_len} is past the limit of {SAFETENSORS_HEADER_LIMIT} bytes"
        )));
    }
    let mut header = vec![0u8; usize::try_from(header_len).unwrap_or(0)];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("cannot read the header: {e}")))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("corrupt header JSON: {e}")))?;
    drop(header);
    let mut user_metadata = None;
    let mut infos: Vec<(String, TensorInfo)> = Vec::with_capacity(map.len());
    for (name, value) in map {
        if name == "__metadata__" {
            user_metadata = Some(
                serde_json::from_value::<HashMap<String, String>>(value)
                    .map_err(|e| bad(format!("`__metadata__` is not a map of strings: {e}")))?,
            );
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value)
            .map_err(|e| bad(format!("tensor `{name}`: malformed entry: {e}")))?;
        let size: usize = match info.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(bad(format!(
                    "tensor `{name}`: dtype {other} is not supported (F32, F16, BF16)"
                )));
            }
        };
        let bytes = info
            .shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}`: shape {:?} overflows (its size in bytes does not fit in \
                     64 bits)",
                    info.shape
                ))
            })?;
        let (start, end) = info.data_offsets;
        if end < start || end - start != bytes {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets {start}..{end} do not hold {:?} x {size} bytes",
                info.shape
            )));
        }
        infos.push((name, info));
    }
    infos.sort_by_key(|(_, info)| info.data_offsets);
    // The data of each tensor starts where the previous one's ends (the `safetensors`
    // rule, checked again by `Metadata::new`; here with the offsets in the message).
    let mut expected = 0;
    for (name, info) in &infos {
        let (start, end) = info.data_offsets;
        if start != expected {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets {start}..{end} do not start where the data \
                 before them ends (byte {expected}): tensors overlap or leave a gap"
            )));
        }
        expected = end;
    }
    let metadata = Metadata::new(user_metadata, infos).map_err(|e| match e {
        safetensors::SafeTensorError::InvalidOffset(name) => bad(format!(
            "tensor `{name}`: its data_offsets overlap the previous tensor's data, or leave a \
             gap after it"
        )),
        other => bad(format!("invalid header: {other}")),
    })?;
    let data_len = file_len - 8 - header_len;
    let data_end = metadata.data_len() as u64;
    let tensors = metadata.tensors();
    if data_end > data_len {
        let (name, end) = tensors
            .iter()
            .map(|(name, info)| (name.as_str(), info.data_offsets.1))
            .filter(|&(_, end)| end as u64 > data_len)
            .min_by_key(|&(_, end)| end)
            .unwrap_or(("?", metadata.data_len()));
        return Err(bad(format!(
            "tensor `{name}`: data ends at byte {end}, past the end of the data ({data_len} \
             bytes)"
        )));
    }
    if data_end < data_len {
        return Err(bad(format!(
            "the tensors' data ends at byte {data_end} of the {data_len} bytes after the \
             header: {} trailing bytes",
            data_len - data_end
        )));
    }
    let base = 8 + header_len;
    let mut out = Vec::with_capacity(tensors.len());
    for (name, info) in tensors {
        let dtype = match info.dtype {
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            _ => DType::F32,
        };
        let (start, end) = info.data_offsets;
        out.push(TensorEntry {
            name,
            file: path.to_path_buf(),
            dtype,
            shape: info.shape.clone(),
            // Inside the file: the data ends at `file_len`, checked above.
            offset: base + start as u64,
            len: end - start,
        });
    }
    Ok(out)
}
