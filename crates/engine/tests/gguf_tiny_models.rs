//! Architectures with no real GGUF here, checked with tiny seeded random models
//! written as GGUF files and loaded through the same code as real ones, against
//! candle-transformers' quantized models on the same files: Qwen2 (q/k/v bias), Qwen3
//! (q/k RMSNorm), Llama with Q8_0 weights; and llama.cpp's form of Llama 3 RoPE
//! scaling (`rope_freqs.weight`) against the same scaling from the configuration.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use afo_engine::{GgufFile, Logits, Model, ModelConfig, Result, RopeScaling, WeightSource};
use afo_quant::{KernelChoice, QLinear};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

const VOCAB: usize = 96;
const HIDDEN: usize = 64;
const FFN: usize = 96;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;

/// Deterministic pseudo-random values in [-scale, scale) (+ offset).
fn seeded(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale + offset
        })
        .collect()
}

/// What the tiny model has besides the Llama layout.
#[derive(Clone, Copy)]
struct Extras {
    arch: &'static str,
    qkv_bias: bool,
    qk_norm: bool,
    /// Storage of the matrices (vectors are always f32).
    matrices: GgmlDType,
    /// Write llama.cpp's Llama 3 RoPE divisors.
    rope_freqs: bool,
}

/// The divisors llama.cpp's converter writes for Llama 3 scaling.
const LLAMA3: RopeScaling = RopeScaling::Llama3 {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position: 64,
};

fn llama3_divisors() -> Vec<f32> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position,
    } = LLAMA3
    else {
        unreachable!()
    };
    let old = original_max_position as f64;
    (0..HEAD_DIM / 2)
        .map(|i| {
            let freq = 1.0 / 10_000f64.powf((2 * i) as f64 / HEAD_DIM as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / high_freq_factor {
                1.0
            } else if wavelen > old / low_freq_factor {
                factor as f32
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

fn write_gguf(dir: &Path, e: Extras) -> PathBuf {
    let dev = Device::Cpu;
    let mut tensors: BTreeMap<String, QTensor> = BTreeMap::new();
    let mut seed = 10u64;
    let mut add = |name: String, shape: &[usize], scale: f32, offset: f32| {
        seed += 1;
        let n = shape.iter().product();
        let t = Tensor::from_vec(seeded(n, seed, scale, offset), shape, &dev).unwrap();
        let dtype = if shape.len() == 2 {
            e.matrices
        } else {
            GgmlDType::F32
        };
        tensors.insert(name, QTensor::quantize(&t, dtype).unwrap());
    };
    add("token_embd.weight".into(), &[VOCAB, HIDDEN], 1.0, 0.0);
    for l in 0..LAYERS {
        let p = |s: &str| format!("blk.{l}.{s}");
        add(p("attn_norm.weight"), &[HIDDEN], 0.1, 1.0);
        add(p("ffn_norm.weight"), &[HIDDEN], 0.1, 1.0);
        add(p("attn_q.weight"), &[HEADS * HEAD_DIM, HIDDEN], 0.2, 0.0);
        add(p("attn_k.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN], 0.2, 0.0);
        add(p("attn_v.weight"), &[KV_HEADS * HEAD_DIM, HIDDEN], 0.2, 0.0);
        add(
            p("attn_output.weight"),
            &[HIDDEN, HEADS * HEAD_DIM],
            0.2,
            0.0,
        );
        add(p("ffn_gate.weight"), &[FFN, HIDDEN], 0.2, 0.0);
        add(p("ffn_up.weight"), &[FFN, HIDDEN], 0.2, 0.0);
        add(p("ffn_down.weight"), &[HIDDEN, FFN], 0.2, 0.0);
        if e.qkv_bias {
            add(p("attn_q.bias"), &[HEADS * HEAD_DIM], 0.5, 0.0);
            add(p("attn_k.bias"), &[KV_HEADS * HEAD_DIM], 0.5, 0.0);
            add(p("attn_v.bias"), &[KV_HEADS * HEAD_DIM], 0.5, 0.0);
        }
        if e.qk_norm {
            add(p("attn_q_norm.weight"), &[HEAD_DIM], 0.1, 1.0);
            add(p("attn_k_norm.weight"), &[HEAD_DIM], 0.1, 1.0);
        }
    }
    add("output_norm.weight".into(), &[HIDDEN], 0.1, 1.0);
    if e.rope_freqs {
        let t = Tensor::new(llama3_divisors(), &dev).unwrap();
        tensors.insert(
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        );
    }
    let a = e.arch;
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.dtype".into(), Value::U32(0)),
        (format!("{a}.embedding_length"), Value::U32(HIDDEN as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(FFN as u32)),
        (format!("{a}.block_count"), Value::U32(LAYERS as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            Value::U32(HEAD_DIM as u32),
        ),
        (
            format!("{a}.rope.dimension_count"),
            Value::U32(HEAD_DIM as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
        (format!("{a}.context_length"), Value::U32(256)),
        (format!("{a}.vocab_size"), Value::U32(VOCAB as u32)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let path = dir.join(format!("{a}.gguf"));
    let mut out = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut out, &md, &ts).unwrap();
    path
}

const PROMPT: [u32; 7] = [3, 17, 42, 5, 88, 61, 0];

/// Our last-position logits: after the prompt, then after each of `steps` (fed one
/// at a time through the KV cache).
fn ours(model: &Model, steps: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(64);
    let mut out = vec![flat(
        model.forward(&PROMPT, &mut cache, Logits::Last).unwrap(),
    )];
    for &t in steps {
        out.push(flat(model.forward(&[t], &mut cache, Logits::Last).unwrap()));
    }
    out
}

/// The same from a candle-transformers model's `forward(ids, position)`.
fn theirs(mut forward: impl FnMut(&Tensor, usize) -> Tensor, steps: &[u32]) -> Vec<Vec<f32>> {
    let row = |ids: &[u32]| {
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    let mut out = vec![flat(forward(&row(&PROMPT), 0))];
    for (i, &t) in steps.iter().enumerate() {
        out.push(flat(forward(&row(&[t]), PROMPT.len() + i)));
    }
    out
}

fn flat(t: Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn reader(path: &Path) -> (gguf_file::Content, std::fs::File) {
    let mut file = std::fs::File::open(path).unwrap();
    (gguf_file::Content::read(&mut file).unwrap(), file)
}

const STEPS: [u32; 5] = [9, 70, 33, 2, 95];

#[test]
fn qwen2_with_qkv_bias() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(
        dir.path(),
        Extras {
            arch: "qwen2",
            qkv_bias: true,
            qk_norm: false,
            matrices: GgmlDType::F32,
            rope_freqs: false,
        },
    );
    let model = GgufFile::open(&path).unwrap().load_model().unwrap();
    assert!(model.config().qkv_bias && !model.config().rope_interleaved);
    let (content, mut file) = reader(&path);
    let mut reference = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )
    .unwrap();
    let diff = max_diff(
        &ours(&model, &STEPS),
        &theirs(|x, p| reference.forward(x, p).unwrap(), &STEPS),
    );
    eprintln!("qwen2: max abs logit difference {diff:.2e}");
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn qwen3_with_qk_norm() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(
        dir.path(),
        Extras {
            arch: "qwen3",
            qkv_bias: false,
            qk_norm: true,
            matrices: GgmlDType::F32,
            rope_freqs: false,
        },
    );
    let model = GgufFile::open(&path).unwrap().load_model().unwrap();
    assert!(model.config().qk_norm);
    let (content, mut file) = reader(&path);
    let mut reference = candle_transformers::models::quantized_qwen3::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )
    .unwrap();
    let diff = max_diff(
        &ours(&model, &STEPS),
        &theirs(|x, p| reference.forward(x, p).unwrap(), &STEPS),
    );
    eprintln!("qwen3: max abs logit difference {diff:.2e}");
    // candle's Qwen3 computes RoPE frequencies in f64, we in f32 (as transformers
    // does): an ulp apart.
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn llama_with_q8_0_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(
        dir.path(),
        Extras {
            arch: "llama",
            qkv_bias: false,
            qk_norm: false,
            matrices: GgmlDType::Q8_0,
            rope_freqs: false,
        },
    );
    let reference = || {
        let (content, mut file) = reader(&path);
        candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )
        .unwrap()
    };
    let mut r = reference();
    let want = theirs(|x, p| r.forward(x, p).unwrap(), &STEPS);
    // candle's matmul under us: the same arithmetic, up to summation order.
    let mut gguf = GgufFile::open(&path).unwrap();
    gguf.set_kernels(KernelChoice::Candle);
    let same = max_diff(&ours(&gguf.load_model().unwrap(), &STEPS), &want);
    // Our kernels: another rounding of the 8-bit activations, as close to the exact
    // result (the dequantized weights in f32) as candle's.
    let model = GgufFile::open(&path).unwrap().load_model().unwrap();
    assert_eq!(
        model.quant_scheme(),
        Some(afo_quant::QuantScheme::Ggml(GgmlDType::Q8_0))
    );
    let got = ours(&model, &STEPS);
    let mut gguf = GgufFile::open(&path).unwrap();
    let config = gguf.config().unwrap();
    let exact = ours(
        &Model::load(config, &mut Dequantized(&mut gguf)).unwrap(),
        &STEPS,
    );
    let (ours_err, candle_err) = (max_diff(&got, &exact), max_diff(&want, &exact));
    eprintln!(
        "llama Q8_0: max abs logit difference to quantized_llama {same:.2e} with candle's \
         matmul; to exact f32: ours {ours_err:.2e}, candle {candle_err:.2e}"
    );
    assert!(same < 1e-4, "{same}");
    assert!(
        ours_err <= 1.5 * candle_err + 1e-2,
        "{ours_err} vs {candle_err}"
    );
}

/// Dequantizes every linear layer: the exact f32 result of the same weights.
struct Dequantized<'a>(&'a mut GgufFile);

impl WeightSource for Dequantized<'_> {
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: Option<&str>,
    ) -> Result<QLinear> {
        let q = self.0.linear(name, out, inp, bias)?;
        Ok(QLinear::dense(name, q.dequantize()?, None)?)
    }
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        self.0.vector(name, len)
    }
}

/// Hides `rope_freqs.weight`, so that the configuration's scaling applies instead.
struct WithoutRopeFreqs(GgufFile);

impl WeightSource for WithoutRopeFreqs {
    fn contains(&self, name: &str) -> bool {
        name != "rope_freqs.weight" && self.0.contains(name)
    }
    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: Option<&str>,
    ) -> Result<QLinear> {
        self.0.linear(name, out, inp, bias)
    }
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        self.0.vector(name, len)
    }
}

#[test]
fn llama3_rope_freqs_match_the_configured_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(
        dir.path(),
        Extras {
            arch: "llama",
            qkv_bias: false,
            qk_norm: false,
            matrices: GgmlDType::F32,
            rope_freqs: true,
        },
    );
    let mut gguf = GgufFile::open(&path).unwrap();
    let config: ModelConfig = gguf.config().unwrap();
    assert_eq!(config.rope_scaling, RopeScaling::None);
    let from_tensor = gguf.load_model().unwrap();
    let mut hidden = WithoutRopeFreqs(GgufFile::open(&path).unwrap());
    let plain = Model::load(config.clone(), &mut hidden).unwrap();
    let scaled = Model::load(
        ModelConfig {
            rope_scaling: LLAMA3,
            ..config
        },
        &mut hidden,
    )
    .unwrap();
    // Long enough for the scaled low frequencies to matter.
    let steps: Vec<u32> = (0..40).map(|i| (i * 7 + 1) % VOCAB as u32).collect();
    let (a, b, c) = (
        ours(&from_tensor, &steps),
        ours(&scaled, &steps),
        ours(&plain, &steps),
    );
    let same = max_diff(&a, &b);
    let unscaled = max_diff(&a, &c);
    eprintln!("rope_freqs vs configured Llama 3 scaling: {same:.2e}; vs none: {unscaled:.2e}");
    assert!(same < 1e-4, "{same}");
    assert!(unscaled > 1e-2, "the divisors change nothing: {unscaled}");
}

/// Quantizing while loading, saving as GGUF and loading the file again gives the same
/// model, for every scheme; GGML schemes stay readable by candle-transformers.
#[test]
fn quantize_save_load_round_trips() {
    use afo_engine::{QuantizingSource, linear_weight_count, save_gguf};
    use afo_quant::{QuantPolicy, QuantScheme, TensorRole};

    let dir = tempfile::tempdir().unwrap();
    for extras in [
        Extras {
            arch: "qwen2",
            qkv_bias: true,
            qk_norm: false,
            matrices: GgmlDType::F32,
            rope_freqs: false,
        },
        Extras {
            arch: "llama",
            qkv_bias: false,
            qk_norm: false,
            matrices: GgmlDType::F32,
            rope_freqs: true,
        },
    ] {
        let src = write_gguf(dir.path(), extras);
        let baseline = ours(&GgufFile::open(&src).unwrap().load_model().unwrap(), &STEPS);
        let mut drifts = BTreeMap::new();
        // Tolerances relative to the largest logit of the f32 model.
        for (name, tolerance) in [
            ("int8", 0.03),
            ("int4-g32", 0.25),
            ("int4-g32-asym", 0.25),
            ("q8_0", 0.03),
            ("q4_0", 0.25),
            ("f16", 0.002),
        ] {
            let scheme: QuantScheme = name.parse().unwrap();
            let policy = QuantPolicy::new(scheme);
            let mut gguf = GgufFile::open(&src).unwrap();
            let config = gguf.config().unwrap();
            let total = linear_weight_count(config.num_layers, gguf.contains("output.weight"));
            let mut seen = Vec::new();
            let model = {
                let mut q = QuantizingSource::new(&mut gguf, policy, total, |p| {
                    seen.push((p.done, p.total, p.name.to_owned(), p.scheme));
                });
                Model::load(config, &mut q).unwrap()
            };
            assert_eq!(seen.len(), total, "{name}");
            assert_eq!(seen.last().unwrap().0, total);
            for (tensor, layer) in model.linears() {
                let role = TensorRole::of_gguf_name(&tensor).unwrap();
                assert_eq!(layer.scheme(), policy.scheme_for(role), "{name} {tensor}");
            }
            let got = ours(&model, &STEPS);
            let drift = max_diff(&got, &baseline);
            eprintln!(
                "{} {name}: max abs logit difference to f32 {drift:.3}",
                extras.arch
            );
            let scale = baseline.iter().flatten().fold(0f32, |a, v| a.max(v.abs()));
            assert!(
                drift < tolerance * scale,
                "{name}: {drift} (logits up to {scale})"
            );
            drifts.insert(name, drift);

            let out = dir.path().join(format!("{}-{name}.gguf", extras.arch));
            let report = save_gguf(&model, &mut gguf, Some(&policy), &out).unwrap();
            assert_eq!(report.file_bytes, std::fs::metadata(&out).unwrap().len());
            // `afo inspect`: afo's three tensors per int weight count as one weight of
            // its scheme, with the matrix's parameters.
            let (before, after) = (
                GgufFile::open(&src).unwrap().describe(),
                GgufFile::open(&out).unwrap().describe(),
            );
            assert_eq!(after.parameters, before.parameters, "{name}");
            assert_eq!(after.tensors, before.tensors, "{name}");
            if name.starts_with("int") {
                assert!(
                    after.by_type.iter().any(|t| t.scheme == name),
                    "{name}: {:?}",
                    after.by_type
                );
            }
            let reloaded = GgufFile::open(&out).unwrap().load_model().unwrap();
            assert_eq!(reloaded.weight_bytes(), model.weight_bytes(), "{name}");
            assert_eq!(reloaded.config(), model.config(), "{name}");
            // The same weights, not re-quantized: the same logits, bit for bit.
            assert_eq!(max_diff(&ours(&reloaded, &STEPS), &got), 0.0, "{name}");

            if extras.arch == "qwen2" && name == "q8_0" {
                // Everything in the file is a GGML type: a reader that knows nothing
                // of afo runs it.
                let (content, mut file) = reader(&out);
                assert!(content.metadata.contains_key("afo.quantization.policy"));
                let mut r = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
                    content,
                    &mut file,
                    &Device::Cpu,
                )
                .unwrap();
                let theirs = theirs(|x, p| r.forward(x, p).unwrap(), &STEPS);
                // The same file through candle's matmul under our decoder.
                let mut same = GgufFile::open(&out).unwrap();
                same.set_kernels(KernelChoice::Candle);
                let diff = max_diff(&theirs, &ours(&same.load_model().unwrap(), &STEPS));
                eprintln!("exported Q8_0 in quantized_qwen2: {diff:.2e}");
                // (up to the f16 head, which each side multiplies in its own order)
                assert!(diff < 2e-2, "{diff}");
            }
        }
        // Our integer formats are as accurate as GGML's of the same width.
        assert!(drifts["int8"] <= 1.5 * drifts["q8_0"], "{drifts:?}");
        assert!(drifts["int4-g32"] <= 1.5 * drifts["q4_0"], "{drifts:?}");
        assert!(
            drifts["int4-g32-asym"] <= 1.5 * drifts["q4_0"],
            "{drifts:?}"
        );
    }
}

#[test]
fn schemes_that_do_not_fit_the_model_are_named_errors() {
    use afo_engine::{QuantizingSource, linear_weight_count};
    use afo_quant::{QuantPolicy, QuantScheme};

    let dir = tempfile::tempdir().unwrap();
    let src = write_gguf(
        dir.path(),
        Extras {
            arch: "llama",
            qkv_bias: false,
            qk_norm: false,
            matrices: GgmlDType::F32,
            rope_freqs: false,
        },
    );
    // The MLP's down projection has 96 inputs: not a multiple of 64.
    let scheme: QuantScheme = "int4-g64".parse().unwrap();
    let mut gguf = GgufFile::open(&src).unwrap();
    let config = gguf.config().unwrap();
    let total = linear_weight_count(config.num_layers, false);
    let mut q = QuantizingSource::new(&mut gguf, QuantPolicy::new(scheme), total, |_| {});
    let err = Model::load(config, &mut q).unwrap_err().to_string();
    assert!(
        err.contains("blk.0.ffn_down.weight") && err.contains("64") && err.contains("96"),
        "{err}"
    );
}

/// An f32 file whose matrices hold bf16 values (a bf16 checkpoint converted to f32, as
/// most f32 files are) loads at half the bytes where the dense kernels run, computes
/// the same logits, bit for bit, as the bf16 file it came from, and matches candle's
/// f32 reference on the f32 file; and saving it writes f32 again.
#[test]
fn f32_files_of_bf16_values_load_at_half_the_bytes_with_the_same_logits() {
    use afo_engine::{QuantizingSource, linear_weight_count, save_gguf};
    use afo_quant::{QuantPolicy, QuantScheme};

    let dir = tempfile::tempdir().unwrap();
    let src = write_gguf(
        dir.path(),
        Extras {
            arch: "llama",
            qkv_bias: false,
            qk_norm: false,
            matrices: GgmlDType::BF16,
            rope_freqs: false,
        },
    );
    let bf16 = GgufFile::open(&src).unwrap().load_model().unwrap();
    let policy = QuantPolicy::new(QuantScheme::F32);
    let mut gguf = GgufFile::open(&src).unwrap();
    let config = gguf.config().unwrap();
    let total = linear_weight_count(config.num_layers, gguf.contains("output.weight"));
    let converted = {
        let mut q = QuantizingSource::new(&mut gguf, policy, total, |_| {});
        Model::load(config, &mut q).unwrap()
    };
    let f32_path = dir.path().join("llama-f32.gguf");
    save_gguf(&converted, &mut gguf, Some(&policy), &f32_path).unwrap();
    let described = GgufFile::open(&f32_path).unwrap().describe();
    assert!(
        described.by_type.iter().all(|t| t.scheme == "F32"),
        "{:?}",
        described.by_type
    );

    let model = GgufFile::open(&f32_path).unwrap().load_model().unwrap();
    let narrow = afo_quant::kernels::dense_packed_available();
    for (name, layer) in model.linears() {
        assert_eq!(layer.scheme(), QuantScheme::F32, "{name}");
        let path = layer.kernel_path(1);
        assert_eq!(path.starts_with("f32 as bf16 "), narrow, "{name}: {path}");
    }
    let f32_bytes = 2 * bf16.weight_bytes() - norms_bytes(&bf16);
    if narrow {
        assert_eq!(model.weight_bytes(), bf16.weight_bytes());
    } else {
        println!("f32 files of bf16 values: no AVX2/FMA/F16C here, so they stay f32 (checked)");
        assert_eq!(model.weight_bytes(), f32_bytes);
    }
    let got = ours(&model, &STEPS);
    if narrow {
        assert_eq!(max_diff(&got, &ours(&bf16, &STEPS)), 0.0);
    }
    let (content, mut file) = reader(&f32_path);
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )
    .unwrap();
    let diff = max_diff(
        &got,
        &theirs(|x, p| reference.forward(x, p).unwrap(), &STEPS),
    );
    eprintln!("f32 file of bf16 values: max abs logit difference to candle {diff:.2e}");
    assert!(diff < 1e-4, "{diff}");
}

/// The bytes of a model's vectors (norms), which are f32 in every file.
fn norms_bytes(model: &Model) -> u64 {
    let matrices: u64 = model.linears().iter().map(|(_, l)| l.bytes()).sum();
    model.weight_bytes() - matrices
}
