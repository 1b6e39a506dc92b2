//! Hugging Face model directories (`config.json` + `*.safetensors`, sharded or not,
//! read tensor by tensor) and the Hugging Face cache layout.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use afo_quant::QLinear;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::config::{Architecture, ModelConfig, RopeScaling};
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
            head_dim: self
                .head_dim
                .unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
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

/// Reads a JSON configuration file into its serde mirror.
///
/// # Errors
/// [`Error::Io`], or [`Error::Json`] naming the file, line and column.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
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
    /// # Errors
    /// Missing files, corrupt headers, data past the end of a file, unsupported dtypes,
    /// a shard or tensor missing from the index: each names the file and tensor.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            #[derive(Deserialize)]
            struct Index {
                weight_map: HashMap<String, String>,
            }
            let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
                path: index.clone(),
                source,
            })?;
            let parsed: Index = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index.clone(),
                source,
            })?;
            let mut files: Vec<String> = parsed.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for file in &files {
            for entry in check_header(file)? {
                tensors.insert(entry.name.clone(), entry);
            }
        }
        Ok(Self { dir, tensors })
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

/// Checks one safetensors file's header: length, JSON, dtypes, data ranges.
fn check_header(path: &Path) -> Result<Vec<TensorEntry>> {
    let bad = |reason: String| Error::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_len = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| {
        bad(format!(
            "truncated: {file_len} bytes, no safetensors header"
        ))
    })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(bad(format!(
            "header length {header_len} is past the end of the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("cannot read the header: {e}")))?;
    #[derive(Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let map: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("corrupt header JSON: {e}")))?;
    let data_len = file_len - 8 - header_len;
    let mut out = Vec::new();
    for (name, value) in map {
        if name == "__metadata__" {
            continue;
        }
        let entry: Entry = serde_json::from_value(value)
            .map_err(|e| bad(format!("tensor `{name}`: malformed entry: {e}")))?;
        let (dtype, size) = match entry.dtype.as_str() {
            "F32" => (DType::F32, 4),
            "F16" => (DType::F16, 2),
            "BF16" => (DType::BF16, 2),
            other => {
                return Err(bad(format!(
                    "tensor `{name}`: dtype {other} is not supported (F32, F16, BF16)"
                )));
            }
        };
        let (start, end) = entry.data_offsets;
        let want = entry.shape.iter().product::<usize>() as u64 * size;
        if end < start || end - start != want {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets {start}..{end} do not hold {:?} x {size} bytes",
                entry.shape
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "tensor `{name}`: data ends at byte {end}, past the end of the data ({data_len} bytes)"
            )));
        }
        let len = usize::try_from(end - start).map_err(|_| {
            bad(format!(
                "tensor `{name}`: {} bytes do not fit in memory",
                end - start
            ))
        })?;
        out.push(TensorEntry {
            name,
            file: path.to_path_buf(),
            dtype,
            shape: entry.shape,
            offset: 8 + header_len + start,
            len,
        });
    }
    Ok(out)
}

/// The Hugging Face hub cache, read offline.
#[derive(Debug, Clone)]
pub struct HfCache {
    root: PathBuf,
}

impl HfCache {
    /// A cache rooted at `root` (the folder holding `models--ORG--NAME`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache root from the usual environment values, passed in by the binary:
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `HOME/.cache/huggingface/hub`.
    pub fn from_env_values(
        hf_hub_cache: Option<&str>,
        hf_home: Option<&str>,
        home: Option<&str>,
    ) -> Option<Self> {
        hf_hub_cache
            .map(PathBuf::from)
            .or_else(|| hf_home.map(|h| Path::new(h).join("hub")))
            .or_else(|| home.map(|h| Path::new(h).join(".cache/huggingface/hub")))
            .map(Self::new)
    }

    /// The snapshot folder of `repo` (`ORG/NAME`) at `revision` (a ref such as `main`,
    /// or a commit hash; default `main`).
    ///
    /// # Errors
    /// [`Error::ModelNotCached`] naming what was looked for and where.
    pub fn resolve(&self, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
        let not_cached = |reason: String| Error::ModelNotCached {
            repo: repo.to_owned(),
            reason,
        };
        let folder = self
            .root
            .join(format!("models--{}", repo.replace('/', "--")));
        if !folder.is_dir() {
            return Err(not_cached(format!("{} does not exist", folder.display())));
        }
        let revision = revision.unwrap_or("main");
        let ref_file = folder.join("refs").join(revision);
        let commit = if ref_file.is_file() {
            std::fs::read_to_string(&ref_file)
                .map_err(|source| Error::Io {
                    path: ref_file.clone(),
                    source,
                })?
                .trim()
                .to_owned()
        } else {
            revision.to_owned()
        };
        let snapshot = folder.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(not_cached(format!(
                "no snapshot {} (revision `{revision}`)",
                snapshot.display()
            )));
        }
        Ok(snapshot)
    }
}
