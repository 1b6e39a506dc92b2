//! Quantization of the real SmolLM2 model: quality against the f32 model within loose
//! bounds (the measured figures are in docs/benchmarks.md), and a quantize-save-load
//! round trip that gives back the same model.

#![allow(clippy::unwrap_used)]

mod common;

use afo_engine::{LoadedModel, Logits, compare_models, save_gguf};
use afo_quant::{QuantPolicy, QuantScheme};

fn sequences(loaded: &LoadedModel) -> Vec<Vec<u32>> {
    [
        "The capital of France is Paris, and the capital of Germany is",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
        "Water boils at one hundred degrees Celsius at sea level because",
    ]
    .iter()
    .map(|t| loaded.encode_text(t).unwrap())
    .collect()
}

#[test]
fn int8_and_int4_stay_close_to_f32_and_round_trip() {
    let path = common::smollm2_path();
    let base =
        LoadedModel::load_quantized(&path, QuantPolicy::uniform(QuantScheme::F32), |_| {}).unwrap();
    let seqs = sequences(&base);
    let mut seen = 0;
    let int8 = LoadedModel::load_quantized(&path, QuantPolicy::new(QuantScheme::INT8), |p| {
        seen = p.done;
        assert_eq!(p.total, 211);
    })
    .unwrap();
    assert_eq!(seen, 211);
    let load = |name: &str| {
        let scheme: QuantScheme = name.parse().unwrap();
        LoadedModel::load_quantized(&path, QuantPolicy::new(scheme), |_| {}).unwrap()
    };
    let int4 = load("int4-g32");
    // The source file is Q4_1: asymmetric groups of 32, the grid asymmetric int4-g32
    // reproduces, so it loses almost nothing more; symmetric int4 has to re-grid.
    let int4_asym = load("int4-g32-asym");

    // Four bytes a weight (the f32 model in memory may take less: its panels keep
    // exponents in four-bit codes where the AVX-512 kernel runs).
    let model = base.model();
    let f32_bytes = model.f32_weight_bytes() as f64;
    let held = model.weight_bytes() as f64;
    if afo_quant::kernels::Kernel::detect() == afo_quant::kernels::Kernel::Avx512Vnni {
        // 28 bits a weight and the few escaped exponents.
        assert!(held < 0.89 * f32_bytes, "{held} of {f32_bytes}");
    } else {
        println!("no AVX-512 here: the f32 panels stay plain (checked)");
        assert_eq!(held, f32_bytes);
    }
    assert!(model.weight_bytes() as f64 <= f32_bytes);
    let (b8, b4) = (
        int8.model().weight_bytes() as f64 / f32_bytes,
        int4.model().weight_bytes() as f64 / f32_bytes,
    );
    let a8 = compare_models(base.model(), int8.model(), &seqs).unwrap();
    let a4 = compare_models(base.model(), int4.model(), &seqs).unwrap();
    let a4a = compare_models(base.model(), int4_asym.model(), &seqs).unwrap();
    eprintln!("int8: {:.1}% of f32 bytes, {a8:?}", 100.0 * b8);
    eprintln!("int4-g32: {:.1}% of f32 bytes, {a4:?}", 100.0 * b4);
    eprintln!("int4-g32-asym: {a4a:?}");
    assert!(b8 < 0.32 && b4 < 0.19, "{b8} {b4}");
    assert!(a8.top1 >= 0.9 && a8.mean_kl < 0.05, "{a8:?}");
    // Top-1 over 47 positions moves by 2% with every near tie: the same weights gave
    // 44/47 through the register-tiled kernel and 41/47 through the packed one, with a
    // lower mean KL (0.0054 against 0.0058). The KL bound is the tight check.
    assert!(a4a.top1 >= 0.85 && a4a.mean_kl < 0.05, "{a4a:?}");
    // Loose: symmetric 4-bit re-gridding of a Q4_1 model costs real quality (the GGML
    // Q4_0 conversion of the same model measures about the same).
    assert!(a4.top1 >= 0.45 && a4.mean_kl < 1.0, "{a4:?}");
    assert!(a8.mean_kl < a4.mean_kl, "int8 {a8:?} vs int4 {a4:?}");

    // Saved and loaded again: the same weights, not re-quantized.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-int8.gguf");
    let mut source = afo_engine::GgufFile::open(&path).unwrap();
    save_gguf(int8.model(), &mut source, None, &out).unwrap();
    let reloaded = LoadedModel::load(&out).unwrap();
    assert_eq!(reloaded.model().weight_bytes(), int8.model().weight_bytes());
    let ids = &seqs[0];
    let logits = |m: &afo_engine::Model| -> Vec<f32> {
        let mut cache = m.new_cache(ids.len());
        m.forward(ids, &mut cache, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(logits(reloaded.model()), logits(int8.model()));
    // The tokenizer and chat template came along.
    assert_eq!(
        reloaded.encode_text("Hello").unwrap(),
        base.encode_text("Hello").unwrap()
    );
}
