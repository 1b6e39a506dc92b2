//! A tiny Qwen3-VL checkpoint with seeded random weights, written as a real Hugging
//! Face directory (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, `preprocessor_config.json`).
//!
//! It exists so that the vision path (loading, preprocessing, the encoder, M-RoPE,
//! DeepStack, generation) runs end to end where no real vision-language weights are
//! at hand: in tests, and in `afo chain` when no model is given. Its text is noise;
//! the same seed always writes the same files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::chat::CHATML_TEMPLATE;
use crate::error::{Error, Result};

/// Special tokens after the 256 byte tokens, in id order.
const SPECIALS: [&str; 6] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
];

/// The tiny model's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinyVlm {
    /// Seed of the weights.
    pub seed: u64,
    /// Decoder width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Decoder MLP width.
    pub intermediate: usize,
    /// Encoder width.
    pub vision_hidden: usize,
    /// Encoder blocks.
    pub vision_depth: usize,
    /// Largest image, in pixels (the preprocessor's `max_pixels`).
    pub max_pixels: usize,
}

impl Default for TinyVlm {
    fn default() -> Self {
        Self {
            seed: 7,
            hidden: 64,
            layers: 2,
            intermediate: 96,
            vision_hidden: 32,
            vision_depth: 2,
            max_pixels: 512 * 512,
        }
    }
}

/// GPT-2's byte-to-character table (printable bytes stand for themselves).
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// Deterministic values in `[-scale, scale)` (a 64-bit LCG).
fn seeded(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Adds one seeded tensor: name, shape, scale, offset.
type AddTensor<'a> = dyn FnMut(String, &[usize], f32, f32) -> Result<()> + 'a;

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl TinyVlm {
    /// Writes the checkpoint's language model alone, as a text-only Qwen3 checkpoint
    /// (`Qwen3ForCausalLM`, the same weights and tokenizer): a second, separate copy
    /// of the model the VLM already holds, for measuring what sharing one instance
    /// saves.
    ///
    /// # Errors
    /// As [`TinyVlm::write`].
    pub fn write_language_model(&self, dir: &Path) -> Result<()> {
        self.write(dir)?;
        let st = dir.join("model.safetensors");
        let all = candle_core::safetensors::load(&st, &Device::Cpu)?;
        let text: HashMap<String, Tensor> = all
            .into_iter()
            .filter_map(|(name, t)| {
                name.strip_prefix("model.language_model.")
                    .map(|rest| (format!("model.{rest}"), t))
            })
            .collect();
        candle_core::safetensors::save(&text, &st)?;
        let config_path = dir.join("config.json");
        let text_config = std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("text_config").cloned());
        let Some(serde_json::Value::Object(mut config)) = text_config else {
            return Err(Error::InvalidConfig {
                reason: format!("{}: no text_config written", config_path.display()),
            });
        };
        config.insert("architectures".into(), json!(["Qwen3ForCausalLM"]));
        config.insert("model_type".into(), json!("qwen3"));
        config.remove("rope_scaling");
        write(
            &config_path,
            serde_json::Value::Object(config).to_string().as_bytes(),
        )?;
        let pre = dir.join("preprocessor_config.json");
        std::fs::remove_file(&pre).map_err(|source| Error::Io { path: pre, source })
    }

    /// The vocabulary: 256 byte tokens and the specials.
    pub fn vocab_size(&self) -> usize {
        256 + SPECIALS.len()
    }

    /// Writes the checkpoint into `dir` (created if missing).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file that could not be written; tensor errors.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let id = |name: &str| 256 + SPECIALS.iter().position(|s| *s == name).unwrap_or(0) as u32;
        let (h, heads, kv_heads, head_dim, ffn) =
            (self.hidden, 4usize, 2usize, 16usize, self.intermediate);
        let (vh, v_heads, v_ffn, patch, merge) = (self.vision_hidden, 2usize, 64usize, 16usize, 2);
        // No `video_token_id`: the vocabulary has no video token, and naming the image
        // token there makes transformers 4.57 read every image as a video too. The
        // tie is stated in `text_config` as well, where transformers 4.x looks for it
        // (5.x reads the top level).
        let config = json!({
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "image_token_id": id("<|image_pad|>"),
            "vision_start_token_id": id("<|vision_start|>"),
            "vision_end_token_id": id("<|vision_end|>"),
            "tie_word_embeddings": true,
            "text_config": {
                "model_type": "qwen3_vl_text",
                "tie_word_embeddings": true,
                "vocab_size": self.vocab_size(),
                "hidden_size": h,
                "intermediate_size": ffn,
                "num_hidden_layers": self.layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "head_dim": head_dim,
                "rms_norm_eps": 1e-6,
                "rope_theta": 5_000_000.0,
                "max_position_embeddings": 4096,
                "hidden_act": "silu",
                "rope_scaling": {"rope_type": "default", "mrope_interleaved": true,
                                 "mrope_section": [4, 2, 2]},
            },
            "vision_config": {
                "depth": self.vision_depth,
                "hidden_size": vh,
                "hidden_act": "gelu_pytorch_tanh",
                "intermediate_size": v_ffn,
                "num_heads": v_heads,
                "in_channels": 3,
                "patch_size": patch,
                "spatial_merge_size": merge,
                "temporal_patch_size": 2,
                "out_hidden_size": h,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": [0],
            },
        });
        write(&dir.join("config.json"), config.to_string().as_bytes())?;

        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut seed = self.seed;
        let dev = Device::Cpu;
        let mut add = |name: String, shape: &[usize], scale: f32, offset: f32| -> Result<()> {
            seed += 1;
            let n: usize = shape.iter().product();
            let data: Vec<f32> = seeded(n, seed, scale)
                .into_iter()
                .map(|v| v + offset)
                .collect();
            tensors.insert(name, Tensor::from_vec(data, shape, &dev)?);
            Ok(())
        };
        let lm = "model.language_model";
        add(
            format!("{lm}.embed_tokens.weight"),
            &[self.vocab_size(), h],
            1.0,
            0.0,
        )?;
        for l in 0..self.layers {
            let p = |s: &str| format!("{lm}.layers.{l}.{s}");
            add(p("input_layernorm.weight"), &[h], 0.1, 1.0)?;
            add(p("post_attention_layernorm.weight"), &[h], 0.1, 1.0)?;
            add(
                p("self_attn.q_proj.weight"),
                &[heads * head_dim, h],
                0.2,
                0.0,
            )?;
            add(
                p("self_attn.k_proj.weight"),
                &[kv_heads * head_dim, h],
                0.2,
                0.0,
            )?;
            add(
                p("self_attn.v_proj.weight"),
                &[kv_heads * head_dim, h],
                0.2,
                0.0,
            )?;
            add(
                p("self_attn.o_proj.weight"),
                &[h, heads * head_dim],
                0.2,
                0.0,
            )?;
            add(p("self_attn.q_norm.weight"), &[head_dim], 0.1, 1.0)?;
            add(p("self_attn.k_norm.weight"), &[head_dim], 0.1, 1.0)?;
            add(p("mlp.gate_proj.weight"), &[ffn, h], 0.2, 0.0)?;
            add(p("mlp.up_proj.weight"), &[ffn, h], 0.2, 0.0)?;
            add(p("mlp.down_proj.weight"), &[h, ffn], 0.2, 0.0)?;
        }
        add(format!("{lm}.norm.weight"), &[h], 0.1, 1.0)?;

        let v = "model.visual";
        add(
            format!("{v}.patch_embed.proj.weight"),
            &[vh, 3, 2, patch, patch],
            0.05,
            0.0,
        )?;
        add(format!("{v}.patch_embed.proj.bias"), &[vh], 0.1, 0.0)?;
        add(format!("{v}.pos_embed.weight"), &[16, vh], 0.5, 0.0)?;
        let linear =
            |add: &mut AddTensor<'_>, name: String, out: usize, inp: usize| -> Result<()> {
                add(format!("{name}.weight"), &[out, inp], 0.2, 0.0)?;
                add(format!("{name}.bias"), &[out], 0.05, 0.0)
            };
        let norm = |add: &mut AddTensor<'_>, name: String, dim: usize| -> Result<()> {
            add(format!("{name}.weight"), &[dim], 0.1, 1.0)?;
            add(format!("{name}.bias"), &[dim], 0.05, 0.0)
        };
        for b in 0..self.vision_depth {
            let p = |s: &str| format!("{v}.blocks.{b}.{s}");
            norm(&mut add, p("norm1"), vh)?;
            norm(&mut add, p("norm2"), vh)?;
            linear(&mut add, p("attn.qkv"), 3 * vh, vh)?;
            linear(&mut add, p("attn.proj"), vh, vh)?;
            linear(&mut add, p("mlp.linear_fc1"), v_ffn, vh)?;
            linear(&mut add, p("mlp.linear_fc2"), vh, v_ffn)?;
        }
        let merged = vh * merge * merge;
        for (prefix, norm_dim) in [
            (format!("{v}.merger"), vh),
            (format!("{v}.deepstack_merger_list.0"), merged),
        ] {
            norm(&mut add, format!("{prefix}.norm"), norm_dim)?;
            linear(&mut add, format!("{prefix}.linear_fc1"), merged, merged)?;
            linear(&mut add, format!("{prefix}.linear_fc2"), h, merged)?;
        }
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;

        // A byte-level BPE with no merges: every byte is a token.
        let chars = byte_chars();
        let vocab: serde_json::Map<String, serde_json::Value> = chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), json!(i)))
            .collect();
        let added: Vec<serde_json::Value> = SPECIALS
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": true, "use_regex": true});
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []},
        });
        write(
            &dir.join("tokenizer.json"),
            tokenizer.to_string().as_bytes(),
        )?;
        let tokenizer_config = json!({
            "add_bos_token": false,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": CHATML_TEMPLATE,
        });
        write(
            &dir.join("tokenizer_config.json"),
            tokenizer_config.to_string().as_bytes(),
        )?;
        let min_pixels = (patch * merge).pow(2) * 4;
        let preprocessor = json!({
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": true,
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "patch_size": patch,
            "merge_size": merge,
            "temporal_patch_size": 2,
            "min_pixels": min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": min_pixels, "longest_edge": self.max_pixels},
        });
        write(
            &dir.join("preprocessor_config.json"),
            preprocessor.to_string().as_bytes(),
        )?;
        Ok(())
    }
}
