//! The vision-language path: Qwen3-VL (vision encoder + Qwen3 decoder with M-RoPE and
//! DeepStack), loaded from a Hugging Face directory and run on our decoder and KV
//! cache.
//!
//! A [`VisionLanguageModel`] holds the language model (a [`Model`], the same decoder
//! the text path runs), the [`VisionEncoder`], the tokenizer and the chat template.
//! [`VisionLanguageModel::prepare`] turns an instruction and preprocessed images
//! ([`VisionInput`]) into a [`VlmPrompt`]: the chat-formatted tokens with each image's
//! placeholder expanded to its token count, the input rows (token embeddings with the
//! image features in place of the placeholders), the three-axis M-RoPE positions,
//! and the DeepStack features. [`VisionLanguageModel::decoder`] wraps the prompt as a
//! [`Decode`] model, so the ordinary generation loop ([`crate::generate`]) samples,
//! streams and stops exactly as for text.
//!
//! # Positions
//!
//! Text tokens take one position on all three axes; an image's tokens take
//! `start + (t, row, column)` of their merged grid, and the text after it resumes at
//! one past the largest position used (Qwen2-VL's `get_rope_index`). Positions thus
//! run behind the token count; the decode steps keep that offset. Keys enter the
//! KV cache already rotated, so the cache itself is the ordinary one.
//!
//! candle-transformers' `qwen3_vl` is not used: it runs plain 1-D RoPE, masks only
//! single-token steps (the prompt runs without a causal mask) and keeps a private KV
//! cache. The encoder and decoder here follow the Hugging Face implementation.

mod config;
mod tiny;
mod vision;

use std::path::{Path, PathBuf};
use std::time::Instant;

use afo_kvcache::KvCache;
use candle_core::{DType, Tensor};

pub use config::{
    QWEN3_VL_NAMES, VisionActivation, VisionConfig, VisionFileConfig, VlmConfig, VlmFileConfig,
};
pub use tiny::TinyVlm;
pub use vision::{VisionEncoder, image_tokens};

use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::generate::Decode;
use crate::hf::{SafetensorsDir, gguf_to_hf_name};
use crate::model::{Logits, Model, RowInputs, WeightSource};
use crate::tokenizer::Tokenizer;

/// The text that stands for one image in a prompt, before expansion.
pub const IMAGE_PLACEHOLDER: &str = "<|vision_start|><|image_pad|><|vision_end|>";

/// One preprocessed image: `pixel_values` `[patches, C x T x P x P]` (f32, patches in
/// merge-window order) and its grid `[t, h, w]` in patches. A still image may also
/// come as `[patches, C x P x P]`, one frame standing for its `T` identical frames
/// (half the memory at `T = 2`; the encoder sums its kernel over the frames instead).
#[derive(Debug, Clone)]
pub struct VisionInput {
    /// The patches.
    pub pixel_values: Tensor,
    /// `[t, h, w]` in patches.
    pub grid_thw: [usize; 3],
}

/// A prepared multimodal prompt (see the module docs).
#[derive(Debug, Clone)]
pub struct VlmPrompt {
    /// The tokens, image placeholders expanded.
    pub tokens: Vec<u32>,
    /// Image tokens in the prompt.
    pub image_tokens: usize,
    rows: Tensor,
    positions: Vec<[i64; 3]>,
    visual: Vec<u32>,
    deepstack: Vec<Tensor>,
    next_position: i64,
    /// Time spent in the vision encoder, in milliseconds.
    pub vision_ms: f64,
}

/// A loaded Qwen3-VL model.
#[derive(Debug)]
pub struct VisionLanguageModel {
    id: String,
    path: PathBuf,
    config: VlmConfig,
    text: Model,
    vision: VisionEncoder,
    tokenizer: Tokenizer,
    chat: ChatTemplate,
    load_ms: f64,
}

/// The language model's weights: GGUF names mapped onto Qwen3-VL's Hugging Face names
/// (`model.language_model.*`, `lm_head.weight`).
struct LanguageWeights<'a> {
    dir: &'a SafetensorsDir,
}

impl LanguageWeights<'_> {
    fn hf(name: &str) -> Option<String> {
        let hf = gguf_to_hf_name(name)?;
        Some(match hf.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => hf,
        })
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let hf = Self::hf(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_owned(),
        })?;
        self.dir.checked_hf(&hf, shape)
    }
}

impl WeightSource for LanguageWeights<'_> {
    fn contains(&self, name: &str) -> bool {
        Self::hf(name).is_some_and(|hf| self.dir.contains_hf(&hf))
    }

    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: Option<&str>,
    ) -> Result<afo_quant::QLinear> {
        let weight = self.get(name, &[out, inp])?;
        let bias = match bias {
            Some(b) => Some(self.get(b, &[out])?.to_dtype(DType::F32)?),
            None => None,
        };
        Ok(afo_quant::QLinear::dense(name, weight, bias)?)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        Ok(self.get(name, &[len])?.to_dtype(DType::F32)?)
    }
}

impl VisionLanguageModel {
    /// Whether `dir` holds a vision-language model this engine runs (its
    /// `config.json` names Qwen3-VL).
    pub fn is_vlm_dir(dir: &Path) -> bool {
        let config = dir.join("config.json");
        config.is_file() && VlmFileConfig::read(&config).is_ok_and(|c| c.is_qwen3_vl())
    }

    /// Loads a Qwen3-VL Hugging Face directory: `config.json`, the safetensors weights,
    /// `tokenizer.json` (with `tokenizer_config.json` / `chat_template.jinja`).
    ///
    /// # Errors
    /// Configuration, weight and tokenizer errors, each naming the file or tensor;
    /// [`Error::InvalidConfig`] when the tokenizer lacks the image tokens.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let start = Instant::now();
        let path = dir.as_ref().to_path_buf();
        let config = VlmFileConfig::read(&path.join("config.json"))?.resolve()?;
        let tokenizer = Tokenizer::from_hf_dir(&path)?;
        for (what, id) in [
            ("image_token_id", config.image_token_id),
            ("vision_start_token_id", config.vision_start_token_id),
            ("vision_end_token_id", config.vision_end_token_id),
        ] {
            if tokenizer.id_to_token(id).is_none() {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "{}: {what} {id} is not in the tokenizer's vocabulary",
                        path.display()
                    ),
                });
            }
        }
        let dir = SafetensorsDir::open(&path)?;
        let text = Model::load(config.text.clone(), &mut LanguageWeights { dir: &dir })?;
        let vision = VisionEncoder::load(config.vision.clone(), &dir, "model.visual.")?;
        let chat = ChatTemplate::from_tokenizer(&tokenizer)?;
        // The plain-text copy that client content is encoded with, made now so that
        // its bytes are part of the load.
        tokenizer.encode_plain("")?;
        // And the longest token, which bounds a prompt's bytes before it is encoded.
        tokenizer.max_token_bytes();
        let id = path.file_name().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into(),
        );
        Ok(Self {
            id,
            path,
            config,
            text,
            vision,
            tokenizer,
            chat,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// A short id (the directory name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The directory it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration.
    pub fn config(&self) -> &VlmConfig {
        &self.config
    }

    /// The language model: also a text decoder on its own (the chain's summary stage
    /// can run on it, sharing the loaded weights).
    pub fn text_model(&self) -> &Model {
        &self.text
    }

    /// How the language model's KV caches hold keys and values: see
    /// [`Model::set_kv_format`].
    ///
    /// # Errors
    /// As [`Model::set_kv_format`].
    pub fn set_kv_format(&mut self, format: afo_kvcache::KvFormat) -> Result<()> {
        self.text.set_kv_format(format)
    }

    /// The vision encoder.
    pub fn vision(&self) -> &VisionEncoder {
        &self.vision
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat
    }

    /// How long loading took, in milliseconds.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// Bytes the weights keep resident (decoder and encoder).
    pub fn weight_bytes(&self) -> u64 {
        self.text.weight_bytes() + self.vision.weight_bytes()
    }

    /// Prepares a user turn of `images` followed by `instruction` (see the module
    /// docs): runs the vision encoder, renders the chat template, expands the image
    /// placeholders and lays out the rows and positions.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when an image does not fit the encoder or the
    /// instruction itself contains image tokens; encoder, template and tokenizer
    /// errors.
    pub fn prepare(&self, instruction: &str, images: &[VisionInput]) -> Result<VlmPrompt> {
        let mut content = IMAGE_PLACEHOLDER.repeat(images.len());
        content.push_str(instruction);
        self.prepare_chat(&[Message::user(content)], images)
    }

    /// Renders `messages` with the chat template (adding the assistant prompt) and
    /// encodes them: the messages' content as plain text except the
    /// [`IMAGE_PLACEHOLDER`]s in it ([`ChatTemplate::encode`]).
    ///
    /// # Errors
    /// Template and tokenizer errors.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.chat
            .encode(&self.tokenizer, messages, true, &[IMAGE_PLACEHOLDER])
    }

    /// Prepares a conversation whose messages hold [`IMAGE_PLACEHOLDER`] where each
    /// image goes, in order (an OpenAI-style request with `image_url` parts becomes
    /// this): the template is rendered with the generation prompt, then as
    /// [`VisionLanguageModel::prepare`].
    ///
    /// # Errors
    /// As [`VisionLanguageModel::prepare`]; [`Error::InvalidConfig`] when the
    /// placeholders and the images do not pair up.
    pub fn prepare_chat(&self, messages: &[Message], images: &[VisionInput]) -> Result<VlmPrompt> {
        let merge = self.config.vision.merge_size;
        let image_id = self.config.image_token_id;
        let raw = self.encode_chat(messages)?;
        let found = raw.iter().filter(|&&t| t == image_id).count();
        if found != images.len() {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the prompt holds {found} image tokens for {} images (does the \
                     instruction or the chat template contain `<|image_pad|>`?)",
                    images.len()
                ),
            });
        }
        let counts: Vec<usize> = images
            .iter()
            .map(|i| image_tokens(i.grid_thw, merge))
            .collect();

        // The vision encoder, over every image at once.
        let vision_start = Instant::now();
        let (features, deepstack) = if images.is_empty() {
            (None, Vec::new())
        } else {
            let pv = Tensor::cat(
                &images.iter().map(|i| &i.pixel_values).collect::<Vec<_>>(),
                0,
            )?;
            let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
            let (f, d) = rayon::scope(|_| self.vision.forward(&pv, &grids))?;
            (Some(f), d)
        };
        let vision_ms = vision_start.elapsed().as_secs_f64() * 1e3;

        // Tokens, rows and positions.
        let mut tokens = Vec::with_capacity(raw.len() + counts.iter().sum::<usize>());
        let mut positions: Vec<[i64; 3]> = Vec::with_capacity(tokens.capacity());
        let mut visual = Vec::new();
        let mut pieces = Vec::new();
        let mut text_run: Vec<u32> = Vec::new();
        let mut next: i64 = 0;
        let mut image = 0usize;
        let mut feature_row = 0usize;
        for &t in &raw {
            if t != image_id {
                text_run.push(t);
                tokens.push(t);
                positions.push([next; 3]);
                next += 1;
                continue;
            }
            if !text_run.is_empty() {
                pieces.push(self.text.embed_tokens(&text_run)?);
                text_run.clear();
            }
            let g = images[image].grid_thw;
            let (gt, gh, gw) = (g[0], g[1] / merge, g[2] / merge);
            let n = counts[image];
            if let Some(f) = &features {
                pieces.push(f.narrow(0, feature_row, n)?);
            }
            let start = next;
            for ti in 0..gt {
                for hi in 0..gh {
                    for wi in 0..gw {
                        visual.push(tokens.len() as u32);
                        tokens.push(image_id);
                        positions.push([start + ti as i64, start + hi as i64, start + wi as i64]);
                    }
                }
            }
            next = start + gt.max(gh).max(gw) as i64;
            feature_row += n;
            image += 1;
        }
        if !text_run.is_empty() {
            pieces.push(self.text.embed_tokens(&text_run)?);
        }
        let rows = Tensor::cat(&pieces, 0)?;
        Ok(VlmPrompt {
            tokens,
            image_tokens: feature_row,
            rows,
            positions,
            visual,
            deepstack,
            next_position: next,
            vision_ms,
        })
    }

    /// The prompt as a [`Decode`] model for [`crate::generate`]: give it
    /// `prompt.tokens` as the prompt.
    pub fn decoder<'a>(&'a self, prompt: &'a VlmPrompt) -> VlmDecoder<'a> {
        VlmDecoder {
            model: self,
            prompt,
        }
    }
}

/// A prepared prompt over its model, as the generation loop drives it.
#[derive(Debug)]
pub struct VlmDecoder<'a> {
    model: &'a VisionLanguageModel,
    prompt: &'a VlmPrompt,
}

impl VlmDecoder<'_> {
    fn step(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let text = &self.model.text;
        let p = self.prompt;
        let sections = self.model.config.mrope_section;
        let at = cache.position();
        let n = tokens.len();
        if at < p.tokens.len() {
            // Inside the prompt: its rows, positions and DeepStack features.
            if at + n > p.tokens.len() || tokens != &p.tokens[at..at + n] {
                return Err(Error::InvalidConfig {
                    reason: format!("tokens {at}..{} are not the prepared prompt's", at + n),
                });
            }
            let rope = text.mrope_tables(&p.positions[at..at + n], sections)?;
            let lo = p.visual.partition_point(|&r| (r as usize) < at);
            let hi = p.visual.partition_point(|&r| (r as usize) < at + n);
            let rows_here: Vec<u32> = p.visual[lo..hi].iter().map(|&r| r - at as u32).collect();
            let features = p
                .deepstack
                .iter()
                .map(|d| d.narrow(0, lo, hi - lo))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let index = Tensor::from_vec(rows_here, hi - lo, p.rows.device())?;
            let inject = (hi > lo && !features.is_empty()).then_some((&index, &features[..]));
            let inputs = RowInputs {
                x: p.rows.narrow(0, at, n)?,
                rope: Some(rope),
                inject,
            };
            text.forward_embeds(inputs, cache, Logits::Last)
        } else {
            // After the prompt: one position per token on all axes, behind the count.
            let start = p.next_position + (at - p.tokens.len()) as i64;
            let positions: Vec<[i64; 3]> = (0..n as i64).map(|i| [start + i; 3]).collect();
            let rope = text.mrope_tables(&positions, sections)?;
            let inputs = RowInputs {
                x: text.embed_tokens(tokens)?,
                rope: Some(rope),
                inject: None,
            };
            text.forward_embeds(inputs, cache, Logits::Last)
        }
    }
}

impl Decode for VlmDecoder<'_> {
    type State = KvCache;

    fn new_state(&self) -> KvCache {
        let c = &self.model.config.text;
        self.model.text.new_cache(c.max_position)
    }

    /// Logits of the next token. The image tokens (`<|image_pad|>`, the vision start
    /// and end markers) are input-only: their logits are set to -inf, so no sampler
    /// can emit them.
    fn decode(&self, tokens: &[u32], state: &mut KvCache) -> Result<Vec<f32>> {
        let mut logits = self.step(tokens, state)?.flatten_all()?.to_vec1::<f32>()?;
        let c = &self.model.config;
        for id in [
            c.image_token_id,
            c.vision_start_token_id,
            c.vision_end_token_id,
        ] {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(logits)
    }
}

impl crate::cache::CacheWeight for VisionLanguageModel {
    fn resident_bytes(&self) -> u64 {
        self.weight_bytes()
    }
}
