//! Our decoder against references on the real SmolLM2 GGUF.
//!
//! - Against candle-transformers' `quantized_llama`, with candle's quantized matmul
//!   under both (the same arithmetic for the weights): identical logits on short
//!   prompts, the same top-1 token after a 64-token prompt, and the same greedy tokens
//!   for the first steps. (Past the fourth position the two drift apart by up to ~1.5
//!   in logits: different float summation orders flip the rounding of 8-bit
//!   activations, see `token_by_token_agrees_with_prefill`; our perplexity is the
//!   closer of the two to llama.cpp's, see `perplexity_matches_llama_cpp`.)
//! - With our own kernels, logits as close to the exact (dequantized f32) result as
//!   candle's kernels are.
//! - Perplexity on GPL-3 (ctx 512) within 1% of llama.cpp's 18.3914 on the same file.

#![allow(clippy::unwrap_used)]

mod common;

use afo_engine::{GgufFile, Logits, Model, Result, Tokenizer, WeightSource, perplexity};
use afo_quant::{KernelChoice, QLinear};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(t: &Tensor) -> u32 {
    t.flatten_all()
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

fn reference(path: &std::path::Path) -> ModelWeights {
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap()
}

fn gpl3(tokenizer: &Tokenizer) -> Vec<u32> {
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    tokenizer.encode(&text, false).unwrap()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn matches_quantized_llama() {
    let path = common::smollm2_path();
    let mut gguf = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(gguf.content()).unwrap();
    gguf.set_kernels(KernelChoice::Candle);
    let model = gguf.load_model().unwrap();
    let prompt = gpl3(&tokenizer)[..64].to_vec();

    for n in 1..=4 {
        let ours = model
            .forward(&prompt[..n], &mut model.new_cache(64), Logits::Last)
            .unwrap();
        let theirs = reference(&path).forward(&row(&prompt[..n]), 0).unwrap();
        let diff = max_abs_diff(&ours, &theirs);
        assert!(
            diff < 1e-4,
            "{n}-token prompt: max abs logit difference {diff}"
        );
    }

    let mut reference = reference(&path);
    let mut cache = model.new_cache(512);
    let ours = model.forward(&prompt, &mut cache, Logits::Last).unwrap();
    let theirs = reference.forward(&row(&prompt), 0).unwrap();
    let diff = max_abs_diff(&ours, &theirs);
    eprintln!("64-token prompt: max abs logit difference {diff:.4}");
    assert!(
        diff < 2.0,
        "64-token prompt: max abs logit difference {diff}"
    );
    assert_eq!(argmax(&ours), argmax(&theirs));
    let mut next = argmax(&ours);
    for step in 0..8 {
        let ours = model.forward(&[next], &mut cache, Logits::Last).unwrap();
        let theirs = reference
            .forward(&row(&[next]), prompt.len() + step)
            .unwrap();
        assert_eq!(
            argmax(&ours),
            argmax(&theirs),
            "greedy step {step} diverged"
        );
        next = argmax(&ours);
    }
}

/// Token by token and one prefill are the same computation in a different order of
/// float summation (attention, matmul blocking). With 8-bit activation quantization
/// (ours and candle's alike, as llama.cpp's) a last-bit difference can flip the
/// rounding of one activation in a block that holds one of SmolLM2's huge outlier
/// channels, a jump of `max|x| / 127`; so logits drift by up to ~1.6 at some positions
/// while the quality is the same (first GPL-3 window: perplexity 16.5002 by prefill,
/// 16.4923 token by token). The bound below is that measured drift; the top-1 token
/// must agree everywhere.
#[test]
fn token_by_token_agrees_with_prefill() {
    let path = common::smollm2_path();
    let mut gguf = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(gguf.content()).unwrap();
    let model = gguf.load_model().unwrap();
    let prompt = gpl3(&tokenizer)[..40].to_vec();
    // Token by token through the cache equals one prefill, position for position.
    let all = model
        .forward(&prompt, &mut model.new_cache(64), Logits::All)
        .unwrap();
    let mut cache = model.new_cache(64);
    let mut worst = 0f32;
    for (i, &t) in prompt.iter().enumerate() {
        let step = model.forward(&[t], &mut cache, Logits::Last).unwrap();
        let want = all.narrow(0, i, 1).unwrap();
        let diff = max_abs_diff(&step, &want);
        worst = worst.max(diff);
        assert!(diff < 2.0, "position {i}: {diff}");
        assert_eq!(argmax(&step), argmax(&want), "position {i}");
    }
    assert_eq!(cache.len(), 40);
    eprintln!("token by token vs prefill: max abs logit difference {worst:.4}");
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

#[test]
fn our_kernels_are_as_close_to_exact_as_candles() {
    let path = common::smollm2_path();
    let mut gguf = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(gguf.content()).unwrap();
    let config = gguf.config().unwrap();
    let fast = gguf.load_model().unwrap();
    let exact = Model::load(config, &mut Dequantized(&mut gguf)).unwrap();
    gguf.set_kernels(KernelChoice::Candle);
    let slow = gguf.load_model().unwrap();
    let prompt = gpl3(&tokenizer)[..64].to_vec();
    let run = |m: &Model| {
        m.forward(&prompt, &mut m.new_cache(128), Logits::Last)
            .unwrap()
    };
    let (ours, theirs, want) = (run(&fast), run(&slow), run(&exact));
    let (ours_err, theirs_err) = (max_abs_diff(&ours, &want), max_abs_diff(&theirs, &want));
    eprintln!("max abs error vs exact f32: ours {ours_err:.4}, candle {theirs_err:.4}");
    assert!(
        ours_err <= 1.5 * theirs_err + 0.05,
        "ours {ours_err} vs candle {theirs_err}"
    );
    assert_eq!(argmax(&ours), argmax(&want));
}

#[test]
fn perplexity_matches_llama_cpp() {
    let path = common::smollm2_path();
    let mut gguf = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(gguf.content()).unwrap();
    let model = gguf.load_model().unwrap();
    let ids = gpl3(&tokenizer);
    assert_eq!(ids.len(), 7639);
    let p = perplexity(&model, &ids, 512, |_, _, _| {}).unwrap();
    eprintln!(
        "GPL-3 perplexity (ctx 512): {:.4} over {} tokens",
        p.ppl, p.tokens_scored
    );
    assert_eq!((p.windows, p.tokens_scored), (14, 14 * 256));
    // llama.cpp's perplexity tool on the same file: 18.3914.
    assert!((p.ppl / 18.3914 - 1.0).abs() < 0.01, "perplexity {}", p.ppl);
}

#[test]
fn the_capital_of_france_is_paris() {
    let path = common::smollm2_path();
    let mut gguf = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(gguf.content()).unwrap();
    let model = gguf.load_model().unwrap();
    let prompt = tokenizer.encode("The capital of France is", false).unwrap();
    assert_eq!(prompt, [504, 3575, 282, 4649, 314]);
    let logits = model
        .forward(&prompt, &mut model.new_cache(64), Logits::Last)
        .unwrap();
    assert_eq!(
        tokenizer.decode(&[argmax(&logits)], false).unwrap(),
        " Paris"
    );
    let all = model
        .forward(&prompt, &mut model.new_cache(64), Logits::All)
        .unwrap();
    assert_eq!(all.dims(), [5, 49152]);
    assert!(max_abs_diff(&all.narrow(0, 4, 1).unwrap(), &logits) < 1e-3);
}
