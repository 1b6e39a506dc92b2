//! Inputs of afo's whole-model benches (`cargo bench -p afo-benches`): the test model,
//! a loaded copy of it, token prompts, and a 12 MP photo.

use std::io::Cursor;

use afo_runtime::engine::LoadedModel;

pub use afo_examples::smollm2;

/// SmolLM2 loaded as stored (GGUF Q4_1).
///
/// # Errors
/// When the model is missing or does not load.
pub fn load_smollm2() -> anyhow::Result<LoadedModel> {
    Ok(LoadedModel::load(smollm2()?)?)
}

/// `len` token ids spread over the vocabulary, different for each `seed`: prompts of
/// an exact length, whatever the tokenizer makes of text.
pub fn prompt(len: usize, vocab: usize, seed: u32) -> Vec<u32> {
    let vocab = u32::try_from(vocab.max(1)).unwrap_or(u32::MAX);
    (0..len as u32)
        .map(|j| (seed.wrapping_mul(7919) + j.wrapping_mul(31) + 13) % vocab)
        .collect()
}

/// The sample photo shipped with afo (480x320), scaled to `width` x `height` and
/// encoded as a JPEG of quality 90: a camera-sized input with real image content.
///
/// # Errors
/// When the sample does not decode or the JPEG does not encode.
pub fn photo(width: u32, height: u32) -> anyhow::Result<Vec<u8>> {
    const SAMPLE: &[u8] = include_bytes!("../../crates/cli/assets/sample.jpg");
    let sample = image::load_from_memory(SAMPLE)?;
    let big = sample.resize_exact(width, height, image::imageops::FilterType::Triangle);
    let mut out = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut out), 90);
    big.to_rgb8().write_with_encoder(encoder)?;
    Ok(out)
}
