//! Architectures with no real weights here, checked with tiny seeded random models
//! written as Hugging Face directories (config.json + model.safetensors) and loaded
//! through the same code as real checkpoints, against candle-transformers' models on
//! the same files: Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm), Llama 3 (rope scaling)
//! and Mistral-style grouped-query attention. Embeddings (pooled final hidden states)
//! are checked against the same references' hidden states, pooled here.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;

use afo_engine::{Architecture, EmbedOptions, Logits, Pooling, SafetensorsDir};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

const VOCAB: usize = 97;
const HIDDEN: usize = 64;
const FFN: usize = 96;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;

/// Deterministic pseudo-random values in [-scale, scale).
fn seeded(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn write_model(dir: &Path, config: serde_json::Value, bias: bool, qk_norm: bool, tied: bool) {
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut seed = 1u64;
    let mut add = |name: String, shape: &[usize], scale: f32, offset: f32| {
        seed += 1;
        let n: usize = shape.iter().product();
        let data: Vec<f32> = seeded(n, seed, scale)
            .into_iter()
            .map(|v| v + offset)
            .collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &dev).unwrap());
    };
    add(
        "model.embed_tokens.weight".into(),
        &[VOCAB, HIDDEN],
        1.0,
        0.0,
    );
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        add(p("input_layernorm.weight"), &[HIDDEN], 0.1, 1.0);
        add(p("post_attention_layernorm.weight"), &[HIDDEN], 0.1, 1.0);
        add(
            p("self_attn.q_proj.weight"),
            &[HEADS * HEAD_DIM, HIDDEN],
            0.2,
            0.0,
        );
        add(
            p("self_attn.k_proj.weight"),
            &[KV_HEADS * HEAD_DIM, HIDDEN],
            0.2,
            0.0,
        );
        add(
            p("self_attn.v_proj.weight"),
            &[KV_HEADS * HEAD_DIM, HIDDEN],
            0.2,
            0.0,
        );
        add(
            p("self_attn.o_proj.weight"),
            &[HIDDEN, HEADS * HEAD_DIM],
            0.2,
            0.0,
        );
        if bias {
            add(p("self_attn.q_proj.bias"), &[HEADS * HEAD_DIM], 0.2, 0.0);
            add(p("self_attn.k_proj.bias"), &[KV_HEADS * HEAD_DIM], 0.2, 0.0);
            add(p("self_attn.v_proj.bias"), &[KV_HEADS * HEAD_DIM], 0.2, 0.0);
        }
        if qk_norm {
            add(p("self_attn.q_norm.weight"), &[HEAD_DIM], 0.1, 1.0);
            add(p("self_attn.k_norm.weight"), &[HEAD_DIM], 0.1, 1.0);
        }
        add(p("mlp.gate_proj.weight"), &[FFN, HIDDEN], 0.2, 0.0);
        add(p("mlp.up_proj.weight"), &[FFN, HIDDEN], 0.2, 0.0);
        add(p("mlp.down_proj.weight"), &[HIDDEN, FFN], 0.2, 0.0);
    }
    add("model.norm.weight".into(), &[HIDDEN], 0.1, 1.0);
    if !tied {
        add("lm_head.weight".into(), &[VOCAB, HIDDEN], 0.5, 0.0);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
}

fn base_config(arch: &str, model_type: &str) -> serde_json::Value {
    serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 256,
        "max_window_layers": LAYERS,
        "sliding_window": 256,
        "use_sliding_window": false,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": false,
        "tie_word_embeddings": false
    })
}

const PROMPT: [u32; 7] = [3, 14, 15, 92, 65, 35, 8];

fn ours(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    let model = SafetensorsDir::open(dir).unwrap().load_model().unwrap();
    let mut cache = model.new_cache(64);
    let first = model.forward(&PROMPT, &mut cache, Logits::Last).unwrap();
    let next = model.forward(&[42], &mut cache, Logits::Last).unwrap();
    (
        first.flatten_all().unwrap().to_vec1().unwrap(),
        next.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

fn vb(dir: &Path) -> VarBuilder<'static> {
    // SAFETY: the file is written by this test and not modified while mapped.
    unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }
}

fn close(name: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "{name}: max abs logit difference {diff}");
}

fn input(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn flat(t: Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn qwen2_with_qkv_bias() {
    use candle_transformers::models::qwen2;
    let dir = tempfile::tempdir().unwrap();
    let config = base_config("Qwen2ForCausalLM", "qwen2");
    write_model(dir.path(), config.clone(), true, false, false);
    let cfg: qwen2::Config = serde_json::from_value(config).unwrap();
    let mut reference = qwen2::ModelForCausalLM::new(&cfg, vb(dir.path())).unwrap();
    let want_first = flat(reference.forward(&input(&PROMPT), 0).unwrap());
    let want_next = flat(reference.forward(&input(&[42]), PROMPT.len()).unwrap());
    let (first, next) = ours(dir.path());
    close("qwen2 prompt", &first, &want_first);
    close("qwen2 next", &next, &want_next);
}

#[test]
fn qwen3_with_qk_norm() {
    use candle_transformers::models::qwen3;
    let dir = tempfile::tempdir().unwrap();
    let config = base_config("Qwen3ForCausalLM", "qwen3");
    write_model(dir.path(), config.clone(), false, true, false);
    let cfg: qwen3::Config = serde_json::from_value(config).unwrap();
    let mut reference = qwen3::ModelForCausalLM::new(&cfg, vb(dir.path())).unwrap();
    let want_first = flat(reference.forward(&input(&PROMPT), 0).unwrap());
    let want_next = flat(reference.forward(&input(&[42]), PROMPT.len()).unwrap());
    let (first, next) = ours(dir.path());
    close("qwen3 prompt", &first, &want_first);
    close("qwen3 next", &next, &want_next);
}

#[test]
fn llama3_with_rope_scaling_and_tied_embeddings() {
    use candle_transformers::models::llama;
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config("LlamaForCausalLM", "llama");
    config["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32
    });
    config["tie_word_embeddings"] = true.into();
    config["rope_theta"] = 500000.0.into();
    write_model(dir.path(), config.clone(), false, false, true);
    let cfg: llama::LlamaConfig = serde_json::from_value(config).unwrap();
    let cfg = cfg.into_config(false);
    let reference = llama::Llama::load(vb(dir.path()), &cfg).unwrap();
    let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    let want_first = flat(reference.forward(&input(&PROMPT), 0, &mut cache).unwrap());
    let want_next = flat(
        reference
            .forward(&input(&[42]), PROMPT.len(), &mut cache)
            .unwrap(),
    );
    let (first, next) = ours(dir.path());
    close("llama3 prompt", &first, &want_first);
    close("llama3 next", &next, &want_next);
}

/// A seeded input of `n` token ids.
fn long_input(n: usize) -> Vec<u32> {
    seeded(n, 77, 1.0)
        .into_iter()
        .map(|v| ((v + 1.0) / 2.0 * (VOCAB - 1) as f32) as u32)
        .collect()
}

/// `v` divided by its L2 norm.
fn unit(v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Pools a reference's final hidden states `[1, tokens, hidden]` without the engine:
/// the last row, and the mean of the rows, each L2-normalised.
fn reference_pooled(hidden: &Tensor) -> [(Pooling, Vec<f32>); 2] {
    let rows: Vec<Vec<f32>> = hidden.squeeze(0).unwrap().to_vec2().unwrap();
    let n = rows.len() as f32;
    let mean = (0..HIDDEN)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f32>() / n)
        .collect();
    [
        (Pooling::Last, unit(rows[rows.len() - 1].clone())),
        (Pooling::Mean, unit(mean)),
    ]
}

/// Our embeddings of `ids` against the reference's pooled hidden states.
fn embeddings_agree(name: &str, dir: &Path, ids: &[u32], hidden: &Tensor) {
    let model = SafetensorsDir::open(dir).unwrap().load_model().unwrap();
    for (pooling, want) in reference_pooled(hidden) {
        let options = EmbedOptions {
            pooling,
            dimensions: None,
        };
        let got = afo_engine::embed(&model, ids, &options).unwrap();
        assert_eq!(got.len(), HIDDEN);
        let cos = cosine(&got, &want);
        eprintln!(
            "{name} {pooling} pooling, {} tokens: cosine {cos}",
            ids.len()
        );
        assert!(cos >= 0.9999, "{name} {pooling} pooling: cosine {cos}");
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{name} {pooling}: norm {norm}");
    }
}

#[test]
fn embeddings_match_qwen2_hidden_states() {
    use candle_transformers::models::qwen2;
    let dir = tempfile::tempdir().unwrap();
    let config = base_config("Qwen2ForCausalLM", "qwen2");
    write_model(dir.path(), config.clone(), true, false, false);
    let cfg: qwen2::Config = serde_json::from_value(config).unwrap();
    for ids in [PROMPT.to_vec(), long_input(150)] {
        let mut reference = qwen2::Model::new(&cfg, vb(dir.path())).unwrap();
        let hidden = reference.forward(&input(&ids), 0, None).unwrap();
        embeddings_agree("qwen2", dir.path(), &ids, &hidden);
    }
}

#[test]
fn embeddings_match_qwen3_hidden_states() {
    use candle_transformers::models::qwen3;
    let dir = tempfile::tempdir().unwrap();
    let config = base_config("Qwen3ForCausalLM", "qwen3");
    write_model(dir.path(), config.clone(), false, true, false);
    let cfg: qwen3::Config = serde_json::from_value(config).unwrap();
    let ids = long_input(60);
    let mut reference = qwen3::Model::new(&cfg, vb(dir.path())).unwrap();
    let hidden = reference.forward(&input(&ids), 0).unwrap();
    embeddings_agree("qwen3", dir.path(), &ids, &hidden);
}

#[test]
fn the_registry_knows_the_hf_names() {
    assert_eq!(
        Architecture::from_hf("MistralForCausalLM").unwrap(),
        Architecture::Mistral
    );
    let err = Architecture::from_hf("MambaForCausalLM")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("MambaForCausalLM") && err.contains("llama"),
        "{err}"
    );
}
