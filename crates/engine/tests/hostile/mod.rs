//! Small valid model files, and the hostile variants made from them, for the tests of
//! how the engine refuses bad model files.
//!
//! The GGUF writer here records where each field lies (`Gguf::marks`) so a test can
//! overwrite exactly the count, length, type or offset it means to corrupt.

#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;

/// Tiny model sizes. Every matrix row is 64 values, two blocks of the 32-value GGML
/// types: a mutated type id may turn any matrix into Q4_1/Q5_0/Q5_1, whose candle
/// kernels debug-assert an even number of blocks per row (the code itself handles an
/// odd one; the assertion only fires with debug assertions on, as in tests).
pub(crate) const HIDDEN: usize = 64;
pub(crate) const FFN: usize = 64;
pub(crate) const HEADS: usize = 4;
pub(crate) const KV_HEADS: usize = 2;
pub(crate) const HEAD_DIM: usize = 16;

/// The tiny vocabulary (SentencePiece style).
pub(crate) const TOKENS: [&str; 8] = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab"];

/// A GGUF file's bytes and where its fields lie.
#[derive(Debug, Clone)]
pub(crate) struct Gguf {
    pub(crate) bytes: Vec<u8>,
    /// Byte offsets by name: `tensor_count`, `kv_count`, `kv_start`, `kv.KEY` (the
    /// key's length prefix), `kv.KEY.type`, `kv.KEY.value`, `tensors_start`,
    /// `tensor.NAME` (the name's length prefix), `tensor.NAME.ndims`,
    /// `tensor.NAME.dims`, `tensor.NAME.type`, `tensor.NAME.offset`, `data_start`.
    pub(crate) marks: HashMap<String, usize>,
}

impl Gguf {
    pub(crate) fn mark(&self, name: &str) -> usize {
        *self
            .marks
            .get(name)
            .unwrap_or_else(|| panic!("no mark `{name}`"))
    }

    /// A copy with `bytes` written at `at`.
    pub(crate) fn patched(&self, at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut out = self.bytes.clone();
        out[at..at + bytes.len()].copy_from_slice(bytes);
        out
    }
}

/// One tensor to write: GGUF dims (innermost first), GGML type id, bytes.
#[derive(Debug, Clone)]
pub(crate) struct RawTensor {
    pub(crate) name: String,
    pub(crate) dims: Vec<u64>,
    pub(crate) type_id: u32,
    pub(crate) data: Vec<u8>,
}

fn value_type(v: &Value) -> u32 {
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

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let t = items.first().map_or(0, value_type);
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// Writes a GGUF v3 file with alignment 32, recording where each field lies.
pub(crate) fn write_gguf(metadata: &[(String, Value)], tensors: &[RawTensor]) -> Gguf {
    const ALIGN: usize = 32;
    let mut out = Vec::new();
    let mut marks = HashMap::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    marks.insert("tensor_count".into(), out.len());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    marks.insert("kv_count".into(), out.len());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    marks.insert("kv_start".into(), out.len());
    for (key, value) in metadata {
        marks.insert(format!("kv.{key}"), out.len());
        put_str(&mut out, key);
        marks.insert(format!("kv.{key}.type"), out.len());
        out.extend_from_slice(&value_type(value).to_le_bytes());
        marks.insert(format!("kv.{key}.value"), out.len());
        put_value(&mut out, value);
    }
    marks.insert("tensors_start".into(), out.len());
    let mut offset = 0usize;
    for t in tensors {
        let n = &t.name;
        marks.insert(format!("tensor.{n}"), out.len());
        put_str(&mut out, n);
        marks.insert(format!("tensor.{n}.ndims"), out.len());
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        marks.insert(format!("tensor.{n}.dims"), out.len());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        marks.insert(format!("tensor.{n}.type"), out.len());
        out.extend_from_slice(&t.type_id.to_le_bytes());
        marks.insert(format!("tensor.{n}.offset"), out.len());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.data.len().next_multiple_of(ALIGN);
    }
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    marks.insert("data_start".into(), out.len());
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(out.len().next_multiple_of(ALIGN), 0);
    }
    Gguf { bytes: out, marks }
}

/// Deterministic values in [-0.5, 0.5).
pub(crate) fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tiny model's metadata: a Llama with a SentencePiece vocabulary.
pub(crate) fn tiny_metadata() -> Vec<(String, Value)> {
    let s = |x: &str| Value::String(x.to_owned());
    let u = |x: usize| Value::U32(x as u32);
    vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s("tiny hostile-test llama")),
        ("general.alignment".into(), Value::U32(32)),
        ("llama.embedding_length".into(), u(HIDDEN)),
        ("llama.feed_forward_length".into(), u(FFN)),
        ("llama.block_count".into(), u(1)),
        ("llama.attention.head_count".into(), u(HEADS)),
        ("llama.attention.head_count_kv".into(), u(KV_HEADS)),
        ("llama.rope.dimension_count".into(), u(HEAD_DIM)),
        ("llama.context_length".into(), u(64)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        ("tokenizer.ggml.model".into(), s("llama")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(TOKENS.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array((0..TOKENS.len()).map(|i| Value::F32(-(i as f32))).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                [2, 3, 3, 1, 1, 1, 1, 1]
                    .into_iter()
                    .map(Value::I32)
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        (
            "x.nested".into(),
            Value::Array(vec![Value::Array(vec![Value::U8(1), Value::U8(2)])]),
        ),
    ]
}

/// The tiny model's tensors: the embedding in Q8_0 (zero scales), the rest f32.
pub(crate) fn tiny_tensors() -> Vec<RawTensor> {
    let mut seed = 0;
    let mut f32_tensor = |name: &str, dims: &[usize]| {
        seed += 1;
        let n = dims.iter().product();
        RawTensor {
            name: name.into(),
            dims: dims.iter().map(|&d| d as u64).collect(),
            type_id: 0,
            data: f32_bytes(&seeded(n, seed)),
        }
    };
    // Q8_0: per block of 32 values, an f16 scale then 32 int8 quants (34 bytes).
    let embed = RawTensor {
        name: "token_embd.weight".into(),
        dims: vec![HIDDEN as u64, TOKENS.len() as u64],
        type_id: 8,
        data: (0..TOKENS.len() * HIDDEN / 32)
            .flat_map(|i| {
                let mut block = vec![0u8; 34];
                block[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                for (j, q) in block[2..].iter_mut().enumerate() {
                    *q = ((i * 7 + j * 3) % 17) as u8;
                }
                block
            })
            .collect(),
    };
    let (h, q, kv) = (HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    vec![
        embed,
        f32_tensor("blk.0.attn_norm.weight", &[h]),
        f32_tensor("blk.0.attn_q.weight", &[h, q]),
        f32_tensor("blk.0.attn_k.weight", &[h, kv]),
        f32_tensor("blk.0.attn_v.weight", &[h, kv]),
        f32_tensor("blk.0.attn_output.weight", &[q, h]),
        f32_tensor("blk.0.ffn_norm.weight", &[h]),
        f32_tensor("blk.0.ffn_gate.weight", &[h, FFN]),
        f32_tensor("blk.0.ffn_up.weight", &[h, FFN]),
        f32_tensor("blk.0.ffn_down.weight", &[FFN, h]),
        f32_tensor("output_norm.weight", &[h]),
    ]
}

/// The tiny valid GGUF model.
pub(crate) fn tiny_gguf() -> Gguf {
    write_gguf(&tiny_metadata(), &tiny_tensors())
}

/// The tiny metadata with `key` replaced (or added) by `value`.
pub(crate) fn with_meta(key: &str, value: Value) -> Gguf {
    let mut md = tiny_metadata();
    match md.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => md.push((key.to_owned(), value)),
    }
    write_gguf(&md, &tiny_tensors())
}

/// The tiny metadata without `key`.
pub(crate) fn without_meta(key: &str) -> Gguf {
    let mut md = tiny_metadata();
    md.retain(|(k, _)| k != key);
    write_gguf(&md, &tiny_tensors())
}

/// A safetensors file from a header JSON value and the data after it.
pub(crate) fn safetensors_bytes(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut text = header.to_string();
    // The format pads the header to 8 bytes with spaces.
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

/// The tiny model as Hugging Face tensors: (name, shape, values).
pub(crate) fn tiny_hf_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (h, q, kv, v) = (HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, TOKENS.len());
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("model.embed_tokens.weight", vec![v, h]),
        ("model.layers.0.input_layernorm.weight", vec![h]),
        ("model.layers.0.self_attn.q_proj.weight", vec![q, h]),
        ("model.layers.0.self_attn.k_proj.weight", vec![kv, h]),
        ("model.layers.0.self_attn.v_proj.weight", vec![kv, h]),
        ("model.layers.0.self_attn.o_proj.weight", vec![h, q]),
        ("model.layers.0.post_attention_layernorm.weight", vec![h]),
        ("model.layers.0.mlp.gate_proj.weight", vec![FFN, h]),
        ("model.layers.0.mlp.up_proj.weight", vec![FFN, h]),
        ("model.layers.0.mlp.down_proj.weight", vec![h, FFN]),
        ("model.norm.weight", vec![h]),
    ];
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            (name.to_owned(), shape, seeded(n, 100 + i as u64))
        })
        .collect()
}

/// The tiny model's `model.safetensors`: tensors in name order, contiguous.
pub(crate) fn tiny_safetensors() -> Vec<u8> {
    safetensors_from(&tiny_hf_tensors())
}

/// A `model.safetensors` of f32 tensors, contiguous in the order given.
pub(crate) fn safetensors_from(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let name = name.clone();
        let values = values.as_slice();
        let start = data.len();
        data.extend_from_slice(&f32_bytes(values));
        header.insert(
            name,
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    safetensors_bytes(&serde_json::Value::Object(header), &data)
}

/// The tiny model's `config.json`.
pub(crate) fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": TOKENS.len(),
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true
    })
}

/// A word-level `tokenizer.json` over the tiny vocabulary.
pub(crate) fn tiny_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_owned(), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

/// Writes the tiny Hugging Face model folder into `dir`.
pub(crate) fn write_tiny_hf(dir: &Path) {
    std::fs::write(dir.join("config.json"), tiny_config().to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    std::fs::write(dir.join("model.safetensors"), tiny_safetensors()).unwrap();
}

/// Writes `bytes` to `dir/name` and returns the path.
pub(crate) fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A sparse file of `len` bytes starting with `head`: large files cost no disk.
pub(crate) fn sparse(path: &Path, head: &[u8], len: u64) {
    let f = std::fs::File::create(path).unwrap();
    use std::io::Write;
    (&f).write_all(head).unwrap();
    f.set_len(len).unwrap();
}
