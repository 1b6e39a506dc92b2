//! The Qwen3-VL path against Hugging Face transformers: the tiny seeded checkpoint
//! (`TinyVlm::default()`), the same pixel values and instruction, and the logits
//! transformers gave for the prompt and for three greedy steps
//! (`tests/fixtures/qwen3_vl_tiny_reference.json`, written by
//! `tests/fixtures/make_qwen3_vl_reference.py`, which also records the versions).

#![allow(clippy::unwrap_used)]

use afo_engine::{Decode, TinyVlm, VisionInput, VisionLanguageModel};
use candle_core::{Device, Tensor};
use serde_json::Value;

/// Largest difference allowed, relative to the largest reference value. Measured on
/// x86-64: about 3e-7 for the logits and 1.2e-6 for the vision features; swapping the
/// exact and tanh GELU in the encoder moves the features by 3e-4 to 8e-4 (about 1e-4
/// relative), which this bound catches.
const RELATIVE_TOLERANCE: f32 = 1e-5;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/qwen3_vl_tiny_reference.json"
    );
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("the reference fixture {path} cannot be read: {e}"))
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The seeded pixel values the reference script builds (same formula, f32).
fn image(grid: [usize; 3], seed: u32) -> VisionInput {
    let n = grid.iter().product::<usize>();
    let cols = 3 * 2 * 16 * 16;
    let data: Vec<f32> = (0..n * cols)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    VisionInput {
        pixel_values: Tensor::from_vec(data, (n, cols), &Device::Cpu).unwrap(),
        grid_thw: grid,
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

/// Max abs difference and the reference's scale (its largest magnitude), asserted
/// within the tolerance.
fn close(what: &str, ours: &[f32], reference: &[f32]) -> (f32, f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths");
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let scale = reference.iter().map(|x| x.abs()).fold(0.0, f32::max);
    assert!(
        diff <= RELATIVE_TOLERANCE * scale,
        "{what}: max |afo - transformers| = {diff:e} over values up to {scale} (allowed {:e})",
        RELATIVE_TOLERANCE * scale
    );
    (diff, scale)
}

/// Compares one step's logits; returns (max abs difference, logit scale). The decoder
/// may rule out the input-only vision tokens (`masked`) with -inf where transformers
/// gives their raw logits: those entries are left out of the comparison, and of the
/// reference's argmax.
fn compare(
    case: &str,
    step: usize,
    ours: &[f32],
    reference: &[f32],
    masked: &[usize],
) -> (f32, f32) {
    assert_eq!(ours.len(), reference.len(), "{case} step {step}: vocab");
    let kept: Vec<usize> = (0..ours.len())
        .filter(|&i| !(masked.contains(&i) && ours[i] == f32::NEG_INFINITY))
        .collect();
    let ours: Vec<f32> = kept.iter().map(|&i| ours[i]).collect();
    let reference: Vec<f32> = kept.iter().map(|&i| reference[i]).collect();
    let (diff, scale) = close(&format!("{case} step {step} logits"), &ours, &reference);
    assert_eq!(
        kept[argmax(&ours)],
        kept[argmax(&reference)],
        "{case} step {step}: greedy tokens differ (max diff {diff:e})"
    );
    (diff, scale)
}

fn check_case(vlm: &VisionLanguageModel, fx: &Value, name: &str) -> Vec<(f32, f32)> {
    let case = &fx["cases"][name];
    let images: Vec<VisionInput> = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let g: Vec<usize> = i["grid_thw"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            image([g[0], g[1], g[2]], i["seed"].as_u64().unwrap() as u32)
        })
        .collect();
    if !images.is_empty() {
        // The encoder alone: merged features and DeepStack features.
        let vision = &case["vision"];
        let pv = Tensor::cat(
            &images.iter().map(|i| &i.pixel_values).collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        let (merged, deepstack) = vlm.vision().forward(&pv, &grids).unwrap();
        let shape: Vec<usize> = vision["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(merged.dims(), &shape[..], "{name}: vision feature shape");
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (d, s) = close(
            "merged vision features",
            &flat(&merged),
            &floats(&vision["merged"]),
        );
        eprintln!("{name}: merged vision features max diff {d:e} (values up to {s})");
        let expect = vision["deepstack"].as_array().unwrap();
        assert_eq!(deepstack.len(), expect.len(), "{name}: DeepStack features");
        for (k, (ours, theirs)) in deepstack.iter().zip(expect).enumerate() {
            let (d, s) = close(
                &format!("DeepStack features {k}"),
                &flat(ours),
                &floats(theirs),
            );
            eprintln!("{name}: DeepStack features {k} max diff {d:e} (values up to {s})");
        }
    }
    let instruction = fx["instruction"].as_str().unwrap();
    let prompt = vlm.prepare(instruction, &images).unwrap();
    let expect_ids: Vec<u32> = case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(prompt.tokens, expect_ids, "{name}: prompt tokens");

    let tokens: Vec<u32> = case["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let steps: Vec<Vec<f32>> = case["step_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    assert_eq!(steps.len(), tokens.len());
    let dec = vlm.decoder(&prompt);
    let mut state = dec.new_state();
    let mut logits = dec.decode(&prompt.tokens, &mut state).unwrap();
    let c = vlm.config();
    let masked = [
        c.image_token_id as usize,
        c.vision_start_token_id as usize,
        c.vision_end_token_id as usize,
    ];
    let prompt_logits = floats(&case["prompt_logits"]);
    let mut found = vec![compare(name, 0, &logits, &prompt_logits, &masked)];
    for (k, reference) in steps.iter().enumerate() {
        found.push(compare(name, k, &logits, reference, &masked));
        assert_eq!(argmax(&logits) as u32, tokens[k], "{name} step {k}: token");
        if k + 1 < steps.len() {
            logits = dec.decode(&tokens[k..k + 1], &mut state).unwrap();
        }
    }
    found
}

#[test]
fn the_fixture_is_for_this_checkpoint_and_these_inputs() {
    let fx = fixture();
    assert_eq!(
        fx["vocab_size"].as_u64(),
        Some(TinyVlm::default().vocab_size() as u64)
    );
    let images = &fx["cases"]["images"]["images"];
    assert_eq!(images[0]["grid_thw"], serde_json::json!([1, 8, 8]));
    assert_eq!(images[1]["grid_thw"], serde_json::json!([1, 4, 6]));
    assert_eq!(images[0]["seed"], 5);
    assert_eq!(images[1]["seed"], 6);
    assert!(
        fx["transformers"].is_string() && fx["torch"].is_string(),
        "versions"
    );
}

#[test]
fn logits_match_transformers_with_images_and_for_text_alone() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    TinyVlm::default().write(dir.path()).unwrap();
    let vlm = VisionLanguageModel::load(dir.path()).unwrap();
    for name in ["images", "text"] {
        let found = check_case(&vlm, &fx, name);
        let worst = found.iter().map(|f| f.0).fold(0.0, f32::max);
        eprintln!(
            "{name}: max |afo - transformers {}| over {} steps = {worst:e} (logits up to {})",
            fx["transformers"].as_str().unwrap(),
            found.len(),
            found.iter().map(|f| f.1).fold(0.0, f32::max)
        );
    }
}
