//! The tokenizer built from the real SmolLM2 GGUF metadata, checked against llama.cpp.

// Helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use afo_engine::{GgufTokenizerMetadata, Tokenizer};
use candle_core::quantized::gguf_file;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    let dir = std::env::var_os("AFO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join(MODEL);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set AFO_MODEL_DIR)",
        path.display()
    );
    path
}

fn smollm2() -> Tokenizer {
    let path = model_path();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Tokenizer::from_gguf(&content).unwrap()
}

fn metadata() -> GgufTokenizerMetadata {
    let mut file = std::fs::File::open(model_path()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    GgufTokenizerMetadata::from_gguf(&content).unwrap()
}

#[test]
fn metadata_is_read() {
    let md = metadata();
    assert_eq!(md.model, "gpt2");
    assert_eq!(md.pre.as_deref(), Some("smollm"));
    assert_eq!(md.tokens.len(), 49152);
    assert_eq!(md.merges.as_ref().map(Vec::len), Some(48900));
    assert_eq!(md.bos_token_id, Some(1));
    assert_eq!(md.eos_token_id, Some(2));
    assert_eq!(md.add_bos_token, Some(false));
    assert!(md.chat_template.is_some());
}

#[test]
fn capital_of_france() {
    let tok = smollm2();
    assert_eq!(
        tok.encode("The capital of France is", true).unwrap(),
        [504, 3575, 282, 4649, 314]
    );
    assert_eq!(tok.encode("The", false).unwrap(), [504]);
}

#[test]
fn special_ids() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids().first(), Some(&2));
    assert!(tok.is_eos(0), "<|endoftext|> also ends generation");
    assert!(!tok.add_bos_token());
    assert_eq!(tok.bos_token().as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token().as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(504).as_deref(), Some("The"));
}

#[test]
fn special_tokens_are_not_split() {
    let tok = smollm2();
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>"
    );
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

#[test]
fn digits_are_split_one_by_one() {
    let tok = smollm2();
    let ids = tok.encode("12345", false).unwrap();
    assert_eq!(ids.len(), 5);
    let digits: Vec<u32> = "12345"
        .chars()
        .map(|c| tok.token_to_id(&c.to_string()).unwrap())
        .collect();
    assert_eq!(ids, digits);
    // A space before a number stays its own token.
    let spaced = tok.encode("in 2024", false).unwrap();
    assert_eq!(spaced.len(), 6, "{spaced:?}");
}

#[test]
fn gpl3_matches_llama_cpp_count() {
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    let tok = smollm2();
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(ids.len(), 7639, "llama.cpp counts 7,639 tokens");
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

#[test]
fn unicode_round_trips() {
    let tok = smollm2();
    for text in [
        "안녕하세요, 세계! 한국어 텍스트입니다.",
        "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 done",
        "Accents: café naïve façade Ångström, décomposé: e\u{301}",
        "日本語と中文, Ελληνικά, русский, العربية",
        "  leading and trailing spaces \n\n\ttabs\r\n",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
}
