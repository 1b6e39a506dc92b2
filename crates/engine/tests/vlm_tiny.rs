//! The vision-language path on a tiny Qwen3-VL checkpoint with seeded random weights,
//! written as a real Hugging Face directory and loaded through the same code as a real
//! checkpoint: images of several sizes, chunked prompts, generation, bad inputs.

#![allow(clippy::unwrap_used)]

use std::ops::ControlFlow;

use afo_engine::{
    Decode, GenerateOptions, Logits, SamplingParams, TinyVlm, VisionInput, VisionLanguageModel,
    generate,
};
use candle_core::{Device, Tensor};

fn tiny() -> (tempfile::TempDir, VisionLanguageModel) {
    let dir = tempfile::tempdir().unwrap();
    TinyVlm::default().write(dir.path()).unwrap();
    let vlm = VisionLanguageModel::load(dir.path()).unwrap();
    (dir, vlm)
}

/// Seeded pixel values for a grid (in the normalised range [-1, 1]).
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

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn last_logits(vlm: &VisionLanguageModel, instruction: &str, images: &[VisionInput]) -> Vec<f32> {
    let prompt = vlm.prepare(instruction, images).unwrap();
    let dec = vlm.decoder(&prompt);
    let mut state = dec.new_state();
    dec.decode(&prompt.tokens, &mut state).unwrap()
}

#[test]
fn images_of_several_sizes_become_their_token_counts_and_generate() {
    let (_dir, vlm) = tiny();
    assert_eq!(vlm.config().vision.patch_size, 16);
    let images = [
        image([1, 16, 16], 1),
        image([1, 8, 12], 2),
        image([1, 4, 4], 3),
    ];
    let prompt = vlm.prepare("Describe the images.", &images).unwrap();
    assert_eq!(prompt.image_tokens, 64 + 24 + 4);
    let image_id = vlm.config().image_token_id;
    let pads = prompt.tokens.iter().filter(|&&t| t == image_id).count();
    assert_eq!(pads, 92);
    let options = GenerateOptions {
        max_tokens: 12,
        ignore_eos: true,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let dec = vlm.decoder(&prompt);
    let mut state = dec.new_state();
    let out = generate(
        &dec,
        vlm.tokenizer(),
        &prompt.tokens,
        &options,
        &mut state,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(out.tokens.len(), 12);
    assert_eq!(state.len(), prompt.tokens.len() + 11);
    // The same again gives the same tokens (greedy, deterministic weights).
    let mut again = dec.new_state();
    let out2 = generate(
        &dec,
        vlm.tokenizer(),
        &prompt.tokens,
        &options,
        &mut again,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(out.tokens, out2.tokens);
}

#[test]
fn a_prompt_in_chunks_equals_one_pass_even_inside_an_image() {
    let (_dir, vlm) = tiny();
    let images = [image([1, 8, 8], 5), image([1, 4, 6], 6)];
    let prompt = vlm.prepare("What is shown?", &images).unwrap();
    let dec = vlm.decoder(&prompt);
    let mut whole = dec.new_state();
    let expect = dec.decode(&prompt.tokens, &mut whole).unwrap();
    // Cut inside the first image's tokens and again inside the second's.
    let first_pad = prompt
        .tokens
        .iter()
        .position(|&t| t == vlm.config().image_token_id)
        .unwrap();
    let cuts = [first_pad + 5, first_pad + 16 + 3 + 7];
    let mut state = dec.new_state();
    let mut start = 0;
    let mut last = Vec::new();
    for end in cuts.into_iter().chain([prompt.tokens.len()]) {
        last = dec.decode(&prompt.tokens[start..end], &mut state).unwrap();
        start = end;
    }
    assert!(
        max_diff(&last, &expect) < 1e-4,
        "{}",
        max_diff(&last, &expect)
    );
    // Tokens that are not the prompt's are refused, not silently mixed in.
    let mut fresh = dec.new_state();
    let mut wrong = prompt.tokens.clone();
    wrong[1] = wrong[1].wrapping_add(1) % 256;
    assert!(dec.decode(&wrong, &mut fresh).is_err());
}

#[test]
fn text_alone_runs_as_the_plain_decoder() {
    // With no image all three M-RoPE axes agree: the multimodal path must give the
    // text decoder's own logits.
    let (_dir, vlm) = tiny();
    let with_path = last_logits(&vlm, "Hello there, how are you?", &[]);
    let prompt = vlm.prepare("Hello there, how are you?", &[]).unwrap();
    let model = vlm.text_model();
    let mut cache = model.new_cache(prompt.tokens.len());
    let plain: Vec<f32> = model
        .forward(&prompt.tokens, &mut cache, Logits::Last)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // The image tokens are masked out of the VLM's logits (never sampled); compare
    // the rest.
    let c = vlm.config();
    let masked = [
        c.image_token_id,
        c.vision_start_token_id,
        c.vision_end_token_id,
    ];
    for id in masked {
        assert_eq!(with_path[id as usize], f32::NEG_INFINITY);
    }
    let keep = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| !masked.contains(&(*i as u32)))
            .map(|(_, x)| *x)
            .collect()
    };
    let (a, b) = (keep(&with_path), keep(&plain));
    assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
}

#[test]
fn the_image_and_its_layout_change_the_answer() {
    let (_dir, vlm) = tiny();
    let a = last_logits(&vlm, "Describe.", &[image([1, 8, 8], 1)]);
    let b = last_logits(&vlm, "Describe.", &[image([1, 8, 8], 2)]);
    assert!(max_diff(&a, &b) > 1e-3);
    // The same pixels as a 4x16 grid are another image (positions differ).
    let mut tall = image([1, 8, 8], 1);
    tall.grid_thw = [1, 4, 16];
    let c = last_logits(&vlm, "Describe.", &[tall]);
    assert!(max_diff(&a, &c) > 1e-5);
}

#[test]
fn inconsistent_images_are_refused_with_a_reason() {
    let (_dir, vlm) = tiny();
    let mut bad = image([1, 8, 8], 1);
    bad.grid_thw = [1, 8, 6];
    let err = vlm.prepare("x", &[bad]).unwrap_err().to_string();
    assert!(err.contains("patches"), "{err}");
    let mut odd = image([1, 3, 4], 1);
    odd.grid_thw = [1, 3, 4];
    let err = vlm.prepare("x", &[odd]).unwrap_err().to_string();
    assert!(err.contains("merge size"), "{err}");
    let narrow = VisionInput {
        pixel_values: Tensor::zeros((4, 10), candle_core::DType::F32, &Device::Cpu).unwrap(),
        grid_thw: [1, 2, 2],
    };
    let err = vlm.prepare("x", &[narrow]).unwrap_err().to_string();
    assert!(err.contains("1536") && err.contains("768"), "{err}");
    // An instruction smuggling a whole image placeholder does not line up with the
    // images.
    let smuggled = afo_engine::IMAGE_PLACEHOLDER;
    let err = vlm
        .prepare(smuggled, &[image([1, 2, 2], 1)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("image tokens"), "{err}");
    // A bare control token in the instruction is text, not an image slot: the prompt
    // holds exactly the image's tokens.
    let prompt = vlm
        .prepare("<|image_pad|><|vision_end|>", &[image([1, 2, 2], 1)])
        .unwrap();
    let image_id = vlm.config().image_token_id;
    let slots = prompt.tokens.iter().filter(|&&t| t == image_id).count();
    assert_eq!(slots, 1, "one 2x2 image merged 2x2 is one token");
}

#[test]
fn broken_checkpoints_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    TinyVlm::default().write(dir.path()).unwrap();
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    // A section list that does not fit the head size.
    std::fs::write(&config, text.replace("[4,2,2]", "[4,2,3]")).unwrap();
    let err = VisionLanguageModel::load(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("mrope_section"), "{err}");
    std::fs::write(&config, &text).unwrap();
    // A weight missing from the safetensors file.
    let st = dir.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let mut kept = tensors.clone();
    kept.remove("model.visual.blocks.1.attn.qkv.weight");
    candle_core::safetensors::save(&kept, &st).unwrap();
    let err = VisionLanguageModel::load(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.visual.blocks.1.attn.qkv.weight"),
        "{err}"
    );
    // Not a VLM at all.
    std::fs::write(&config, r#"{"architectures": ["LlamaForCausalLM"]}"#).unwrap();
    assert!(!VisionLanguageModel::is_vlm_dir(dir.path()));
    assert!(VisionLanguageModel::load(dir.path()).is_err());
}

#[test]
fn the_language_model_alone_is_the_same_decoder() {
    // The text-only copy loads as a plain Qwen3 and gives the VLM's text logits.
    let (_dir, vlm) = tiny();
    let text_dir = tempfile::tempdir().unwrap();
    TinyVlm::default()
        .write_language_model(text_dir.path())
        .unwrap();
    let loaded = afo_engine::LoadedModel::load(text_dir.path()).unwrap();
    assert_eq!(
        loaded.model().config().arch,
        afo_engine::Architecture::Qwen3
    );
    let ids = vlm.tokenizer().encode("Hello, world", false).unwrap();
    assert_eq!(
        loaded.tokenizer().encode("Hello, world", false).unwrap(),
        ids
    );
    let run = |m: &afo_engine::Model| -> Vec<f32> {
        let mut cache = m.new_cache(ids.len());
        m.forward(&ids, &mut cache, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (run(vlm.text_model()), run(loaded.model()));
    assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
    assert!(!VisionLanguageModel::is_vlm_dir(text_dir.path()));
}

#[test]
fn a_still_image_in_one_frame_encodes_as_its_repeated_frames() {
    // Rows of C x T x P x P whose frames are equal, against the same rows with one
    // frame: the same features (the kernel summed over frames).
    let (_dir, vlm) = tiny();
    let (patches, c, p) = (64usize, 3usize, 16usize);
    let frame: Vec<f32> = (0..patches * c * p * p)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut full = Vec::with_capacity(frame.len() * 2);
    for row in frame.chunks(c * p * p) {
        for ch in row.chunks(p * p) {
            full.extend_from_slice(ch); // t = 0
            full.extend_from_slice(ch); // t = 1
        }
    }
    let full = Tensor::from_vec(full, (patches, c * 2 * p * p), &Device::Cpu).unwrap();
    let still = Tensor::from_vec(frame, (patches, c * p * p), &Device::Cpu).unwrap();
    let (a, da) = vlm.vision().forward(&full, &[[1, 8, 8]]).unwrap();
    let (b, db) = vlm.vision().forward(&still, &[[1, 8, 8]]).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        max_diff(&flat(&a), &flat(&b)) < 1e-4,
        "{}",
        max_diff(&flat(&a), &flat(&b))
    );
    assert!(max_diff(&flat(&da[0]), &flat(&db[0])) < 1e-4);
    // And a prompt from the one-frame rows gives the full rows' logits.
    let x = last_logits(
        &vlm,
        "Describe.",
        &[VisionInput {
            pixel_values: full,
            grid_thw: [1, 8, 8],
        }],
    );
    let y = last_logits(
        &vlm,
        "Describe.",
        &[VisionInput {
            pixel_values: still,
            grid_thw: [1, 8, 8],
        }],
    );
    let finite = |v: &[f32]| {
        v.iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect::<Vec<_>>()
    };
    assert!(max_diff(&finite(&x), &finite(&y)) < 1e-4);
}

#[test]
fn a_conversation_with_images_in_its_turns_prepares_like_one_turn() {
    use afo_engine::{IMAGE_PLACEHOLDER, Message};
    let (_dir, vlm) = tiny();
    let images = [image([1, 4, 4], 1), image([1, 4, 8], 2)];
    let one = vlm.prepare("Compare.", &images).unwrap();
    let chat = vlm
        .prepare_chat(
            &[Message::user(format!(
                "{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}Compare."
            ))],
            &images,
        )
        .unwrap();
    assert_eq!(one.tokens, chat.tokens);
    // Two turns, one image each: both images' tokens are there, in order.
    let two = vlm
        .prepare_chat(
            &[
                Message::user(format!("{IMAGE_PLACEHOLDER}What is this?")),
                Message::assistant("A square."),
                Message::user(format!("And this? {IMAGE_PLACEHOLDER}")),
            ],
            &images,
        )
        .unwrap();
    assert_eq!(two.image_tokens, 4 + 8);
    // Placeholders that do not match the images are refused.
    assert!(
        vlm.prepare_chat(&[Message::user("no image here")], &images)
            .is_err()
    );
}
