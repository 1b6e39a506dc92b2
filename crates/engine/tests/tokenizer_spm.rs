//! The SentencePiece (`tokenizer.ggml.model = llama`) path, on a small vocabulary
//! built here from metadata only, checked against a direct implementation of
//! llama.cpp's SPM merge loop.

// Helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use afo_engine::{GgufTokenizerMetadata, StreamDecoder, Tokenizer};

/// (text, score) of the normal pieces, after `<unk>`, `<s>`, `</s>` and 256 bytes.
const PIECES: &[(&str, f32)] = &[
    ("▁", -50.0),
    ("h", -60.0),
    ("e", -60.0),
    ("l", -60.0),
    ("o", -60.0),
    ("w", -60.0),
    ("r", -60.0),
    ("d", -60.0),
    ("ll", -1.0),
    ("he", -2.0),
    ("▁he", -3.0),
    ("llo", -4.0),
    ("▁hello", -5.0),
    ("or", -6.0),
    ("▁w", -7.0),
    ("▁wor", -8.0),
    ("ld", -9.0),
    ("▁world", -10.0),
    ("lo", -11.0),
];

fn metadata() -> GgufTokenizerMetadata {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    let mut scores = vec![0.0, 0.0, 0.0];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(6);
    }
    for (text, score) in PIECES {
        tokens.push((*text).to_owned());
        scores.push(*score);
        types.push(1);
    }
    GgufTokenizerMetadata {
        model: "llama".into(),
        tokens,
        scores: Some(scores),
        token_types: Some(types),
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        unknown_token_id: Some(0),
        add_bos_token: Some(true),
        ..GgufTokenizerMetadata::default()
    }
}

/// llama.cpp's SPM tokenizer, written plainly: start from characters, merge the
/// adjacent pair whose joined text has the highest score (leftmost on ties), then
/// spell out pieces that are not in the vocabulary as byte tokens.
fn reference(md: &GgufTokenizerMetadata, text: &str) -> Vec<u32> {
    let find = |s: &str| md.tokens.iter().position(|t| t == s);
    let scores = md.scores.as_ref().unwrap();
    if text.is_empty() {
        return Vec::new();
    }
    let escaped = format!(" {text}").replace(' ', "▁");
    let mut symbols: Vec<String> = escaped.chars().map(String::from).collect();
    loop {
        let mut best: Option<(f32, usize)> = None;
        for i in 0..symbols.len().saturating_sub(1) {
            let joined = format!("{}{}", symbols[i], symbols[i + 1]);
            if let Some(id) = find(&joined) {
                if md.token_types.as_ref().unwrap()[id] != 1 {
                    continue;
                }
                let score = scores[id];
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, i));
                }
            }
        }
        let Some((_, i)) = best else { break };
        let right = symbols.remove(i + 1);
        symbols[i].push_str(&right);
    }
    let mut ids = Vec::new();
    for s in symbols {
        match find(&s) {
            Some(id) => ids.push(id as u32),
            None => {
                for b in s.bytes() {
                    ids.push(find(&format!("<0x{b:02X}>")).unwrap() as u32);
                }
            }
        }
    }
    ids
}

fn ids_of(md: &GgufTokenizerMetadata, pieces: &[&str]) -> Vec<u32> {
    pieces
        .iter()
        .map(|p| md.tokens.iter().position(|t| t == p).unwrap() as u32)
        .collect()
}

#[test]
fn known_segmentations() {
    let md = metadata();
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    assert_eq!(
        tok.encode("hello world", false).unwrap(),
        ids_of(&md, &["▁hello", "▁world"])
    );
    // BOS is added because add_bos_token is true.
    let with_bos = tok.encode("hello", true).unwrap();
    assert_eq!(with_bos, [1, ids_of(&md, &["▁hello"])[0]]);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), [2]);
    assert!(tok.add_bos_token());
}

#[test]
fn byte_fallback() {
    let md = metadata();
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    let ids = tok.encode("hé", false).unwrap();
    assert_eq!(ids, ids_of(&md, &["▁", "h", "<0xC3>", "<0xA9>"]));
    assert_eq!(tok.decode(&ids, false).unwrap(), "hé");
    let emoji = tok.encode("😀", false).unwrap();
    assert_eq!(
        emoji,
        ids_of(&md, &["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"])
    );
    assert_eq!(tok.decode(&emoji, true).unwrap(), "😀");
}

#[test]
fn matches_the_reference_merge_loop() {
    let md = metadata();
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    for text in [
        "hello world",
        "hello  world",
        "world hello",
        "hellohello",
        "helloworld hell low",
        "wow llo ll lll llll",
        "dér hello 한국 😀 world",
        "h e l l o",
        "",
    ] {
        assert_eq!(
            tok.encode(text, false).unwrap(),
            reference(&md, text),
            "text {text:?}"
        );
    }
}

#[test]
fn round_trips() {
    let md = metadata();
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    for text in ["hello world", "a  b c", "dér hello 한국 😀 world", "x\ny"] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
}

#[test]
fn stream_keeps_the_leading_space_after_a_prompt() {
    let md = metadata();
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    let prompt = tok.encode("hello", true).unwrap();
    let generated = tok.encode("hello world hé", false).unwrap();
    let mut dec = StreamDecoder::with_prompt(&tok, &prompt, true);
    let mut out = String::new();
    for &id in &generated {
        out.push_str(&dec.step(id).unwrap());
    }
    out.push_str(&dec.finish().unwrap());
    assert_eq!(out, " hello world hé");
}

#[test]
fn bad_metadata_is_a_clear_error() {
    let mut md = metadata();
    md.scores.as_mut().unwrap().pop();
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.scores"), "{err}");

    let mut md = metadata();
    md.model = "bert".into();
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.ggml.model") && err.contains("bert"),
        "{err}"
    );

    let mut md = metadata();
    md.model = "gpt2".into();
    md.pre = Some("mystery".into());
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.ggml.pre") && err.contains("mystery"),
        "{err}"
    );

    let mut md = metadata();
    md.bos_token_id = Some(100_000);
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(
        err.contains("bos_token_id") && err.contains("100000"),
        "{err}"
    );
}
