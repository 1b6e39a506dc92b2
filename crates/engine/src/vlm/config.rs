//! Qwen3-VL's `config.json`: the file as written (every field optional) and the
//! resolved configuration the model runs on.

use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;

use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::hf::HfConfig;

/// The model types and classes read as Qwen3-VL.
pub const QWEN3_VL_NAMES: &[&str] = &["qwen3_vl", "Qwen3VLForConditionalGeneration"];

/// `config.json` of a Qwen3-VL checkpoint, as written.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VlmFileConfig {
    /// `model_type`.
    pub model_type: Option<String>,
    /// `architectures`.
    pub architectures: Option<Vec<String>>,
    /// `text_config`: the language model's fields.
    pub text_config: Option<serde_json::Value>,
    /// `vision_config`.
    pub vision_config: Option<VisionFileConfig>,
    /// `image_token_id`.
    pub image_token_id: Option<u32>,
    /// `vision_start_token_id`.
    pub vision_start_token_id: Option<u32>,
    /// `vision_end_token_id`.
    pub vision_end_token_id: Option<u32>,
    /// `tie_word_embeddings` (top level; `text_config` may carry it too).
    pub tie_word_embeddings: Option<bool>,
}

/// `vision_config` in `config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VisionFileConfig {
    /// `depth`: transformer blocks.
    pub depth: Option<usize>,
    /// `hidden_size`.
    pub hidden_size: Option<usize>,
    /// `hidden_act`.
    pub hidden_act: Option<String>,
    /// `intermediate_size`.
    pub intermediate_size: Option<usize>,
    /// `num_heads`.
    pub num_heads: Option<usize>,
    /// `in_channels`.
    pub in_channels: Option<usize>,
    /// `patch_size`.
    pub patch_size: Option<usize>,
    /// `spatial_merge_size`.
    pub spatial_merge_size: Option<usize>,
    /// `temporal_patch_size`.
    pub temporal_patch_size: Option<usize>,
    /// `out_hidden_size`: the language model's hidden size.
    pub out_hidden_size: Option<usize>,
    /// `num_position_embeddings`: a square grid of learned positions.
    pub num_position_embeddings: Option<usize>,
    /// `deepstack_visual_indexes`: blocks whose output also feeds early decoder layers.
    pub deepstack_visual_indexes: Option<Vec<usize>>,
}

/// The activation of the vision blocks' MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionActivation {
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, Qwen3-VL's).
    GeluTanh,
    /// GELU, exact (`gelu`).
    Gelu,
    /// SiLU (`silu`).
    Silu,
}

impl FromStr for VisionActivation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::Gelu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(Error::InvalidConfig {
                reason: format!(
                    "vision_config.hidden_act `{other}` is not supported \
                     (gelu_pytorch_tanh, gelu, silu)"
                ),
            }),
        }
    }
}

impl std::fmt::Display for VisionActivation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::GeluTanh => "gelu_pytorch_tanh",
            Self::Gelu => "gelu",
            Self::Silu => "silu",
        })
    }
}

/// The vision encoder's resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Transformer blocks.
    pub depth: usize,
    /// Width of the blocks.
    pub hidden_size: usize,
    /// MLP activation.
    pub activation: VisionActivation,
    /// MLP width.
    pub intermediate_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Colour channels.
    pub in_channels: usize,
    /// Patch side, in pixels.
    pub patch_size: usize,
    /// Patches merged per side into one language-model token.
    pub merge_size: usize,
    /// Frames per patch.
    pub temporal_patch_size: usize,
    /// Output width (the language model's hidden size).
    pub out_hidden_size: usize,
    /// Learned positions (a square grid).
    pub num_position_embeddings: usize,
    /// Blocks whose output feeds the first decoder layers (DeepStack).
    pub deepstack_indexes: Vec<usize>,
}

impl VisionConfig {
    /// Values in one patch row of `pixel_values`: channels x frames x side x side.
    pub fn patch_values(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The side of the learned position grid.
    pub fn position_grid_side(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }
}

/// A Qwen3-VL checkpoint's resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VlmConfig {
    /// The language model (a Qwen3 decoder).
    pub text: ModelConfig,
    /// M-RoPE frequency sections (temporal, height, width).
    pub mrope_section: [usize; 3],
    /// The vision encoder.
    pub vision: VisionConfig,
    /// The placeholder token one image feature replaces.
    pub image_token_id: u32,
    /// The token opening an image.
    pub vision_start_token_id: u32,
    /// The token closing an image.
    pub vision_end_token_id: u32,
}

impl VlmFileConfig {
    /// Reads `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::Json`] naming the file, line and column.
    pub fn read(path: &Path) -> Result<Self> {
        crate::hf::read_config(path)
    }

    /// Whether the file describes a Qwen3-VL model.
    pub fn is_qwen3_vl(&self) -> bool {
        let class = self.architectures.as_ref().and_then(|a| a.first());
        class
            .into_iter()
            .chain(self.model_type.as_ref())
            .any(|n| QWEN3_VL_NAMES.contains(&n.as_str()))
    }

    /// The resolved configuration.
    ///
    /// # Errors
    /// [`Error::UnsupportedArchitecture`] for another model, [`Error::InvalidConfig`]
    /// naming a missing or inconsistent field.
    pub fn resolve(&self) -> Result<VlmConfig> {
        if !self.is_qwen3_vl() {
            let name = self
                .architectures
                .as_ref()
                .and_then(|a| a.first().cloned())
                .or_else(|| self.model_type.clone())
                .unwrap_or_else(|| "(none)".into());
            return Err(Error::UnsupportedArchitecture {
                name,
                supported: QWEN3_VL_NAMES.join(", "),
            });
        }
        let text_value = self
            .text_config
            .clone()
            .ok_or_else(|| missing("text_config"))?;
        let mut text: HfConfig =
            serde_json::from_value(text_value.clone()).map_err(|e| Error::InvalidConfig {
                reason: format!("config.json: text_config: {e}"),
            })?;
        // The language model is a Qwen3 decoder; its own type names (`qwen3_vl_text`)
        // are not decoder architectures of their own.
        text.architectures = None;
        text.model_type = Some(Architecture::Qwen3.info().name.to_owned());
        // M-RoPE positions are the rope scaling here, not Llama 3's.
        text.rope_scaling = None;
        if text.tie_word_embeddings.is_none() {
            text.tie_word_embeddings = self.tie_word_embeddings;
        }
        let text_cfg = text.resolve()?;
        let mrope_section = mrope_section(&text_value)?;
        let half = text_cfg.head_dim / 2;
        if mrope_section.iter().sum::<usize>() != half {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "config.json: mrope_section {mrope_section:?} does not add up to head_dim / 2 = {half}"
                ),
            });
        }
        let v = self
            .vision_config
            .as_ref()
            .ok_or_else(|| missing("vision_config"))?;
        let need = |x: Option<usize>, f: &'static str| x.ok_or_else(|| missing(f));
        let vision = VisionConfig {
            depth: need(v.depth, "vision_config.depth")?,
            hidden_size: need(v.hidden_size, "vision_config.hidden_size")?,
            activation: v
                .hidden_act
                .as_deref()
                .unwrap_or("gelu_pytorch_tanh")
                .parse()?,
            intermediate_size: need(v.intermediate_size, "vision_config.intermediate_size")?,
            num_heads: need(v.num_heads, "vision_config.num_heads")?,
            in_channels: v.in_channels.unwrap_or(3),
            patch_size: v.patch_size.unwrap_or(16),
            merge_size: v.spatial_merge_size.unwrap_or(2),
            temporal_patch_size: v.temporal_patch_size.unwrap_or(2),
            out_hidden_size: v.out_hidden_size.unwrap_or(text_cfg.hidden_size),
            num_position_embeddings: v.num_position_embeddings.unwrap_or(2304),
            deepstack_indexes: v.deepstack_visual_indexes.clone().unwrap_or_default(),
        };
        vision_checks(&vision, &text_cfg)?;
        Ok(VlmConfig {
            text: text_cfg,
            mrope_section,
            vision,
            image_token_id: self.image_token_id.unwrap_or(151_655),
            vision_start_token_id: self.vision_start_token_id.unwrap_or(151_652),
            vision_end_token_id: self.vision_end_token_id.unwrap_or(151_653),
        })
    }
}

/// `mrope_section` from `text_config.rope_scaling` or `text_config.rope_parameters`;
/// Qwen3-VL's published `[24, 20, 20]` when neither has it.
fn mrope_section(text: &serde_json::Value) -> Result<[usize; 3]> {
    let found = ["rope_scaling", "rope_parameters"]
        .iter()
        .find_map(|k| text.get(k).and_then(|r| r.get("mrope_section")));
    let Some(value) = found else {
        return Ok([24, 20, 20]);
    };
    let bad = || Error::InvalidConfig {
        reason: format!("config.json: mrope_section {value} is not three non-negative integers"),
    };
    let list: Vec<usize> = serde_json::from_value(value.clone()).map_err(|_| bad())?;
    <[usize; 3]>::try_from(list).map_err(|_| bad())
}

fn vision_checks(v: &VisionConfig, text: &ModelConfig) -> Result<()> {
    let bad = |reason: String| Err(Error::InvalidConfig { reason });
    if v.num_heads == 0 || !v.hidden_size.is_multiple_of(v.num_heads) {
        return bad(format!(
            "vision_config: hidden_size {} is not a multiple of num_heads {}",
            v.hidden_size, v.num_heads
        ));
    }
    if !(v.hidden_size / v.num_heads).is_multiple_of(4) {
        return bad(format!(
            "vision_config: head size {} is not a multiple of 4 (2-D rotary halves)",
            v.hidden_size / v.num_heads
        ));
    }
    let side = v.position_grid_side();
    if side * side != v.num_position_embeddings || side == 0 {
        return bad(format!(
            "vision_config: num_position_embeddings {} is not a square",
            v.num_position_embeddings
        ));
    }
    if v.out_hidden_size != text.hidden_size {
        return bad(format!(
            "vision_config.out_hidden_size {} differs from the language model's hidden_size {}",
            v.out_hidden_size, text.hidden_size
        ));
    }
    if let Some(&i) = v.deepstack_indexes.iter().find(|&&i| i >= v.depth) {
        return bad(format!(
            "vision_config: deepstack index {i} is past the last block ({})",
            v.depth
        ));
    }
    if v.deepstack_indexes.len() > text.num_layers {
        return bad(format!(
            "vision_config: {} DeepStack features for {} decoder layers",
            v.deepstack_indexes.len(),
            text.num_layers
        ));
    }
    if v.patch_size == 0 || v.merge_size == 0 || v.temporal_patch_size == 0 {
        return bad("vision_config: patch, merge and temporal sizes must be positive".into());
    }
    Ok(())
}

fn missing(field: &str) -> Error {
    Error::InvalidConfig {
        reason: format!("config.json: `{field}` is missing"),
    }
}
