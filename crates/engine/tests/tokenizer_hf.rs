//! The Hugging Face file path: a `tokenizer.json` written from the SmolLM2 GGUF
//! tokenizer, with a `tokenizer_config.json` and a `generation_config.json`, reads
//! back into the same tokenizer.

// Helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

mod common;

use afo_engine::{ChatTemplate, Message, Tokenizer};

use common::smollm2_tokenizer as smollm2;

#[test]
fn tokenizer_json_dir_round_trip() {
    let gguf = smollm2();
    let dir = tempfile::tempdir().unwrap();
    gguf.inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "pad_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": [
            {"name": "default", "template": gguf.chat_template().unwrap()},
            {"name": "tool_use", "template": "{{ tools | length }}"},
        ],
    });
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        br#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#,
    )
    .unwrap();

    let hf = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(hf.bos_id(), Some(1));
    assert_eq!(hf.eos_ids().first(), Some(&2));
    assert!(hf.is_eos(0));
    assert_eq!(hf.pad_id(), Some(2));
    assert_eq!(hf.vocab_size(), gguf.vocab_size());
    assert_eq!(hf.chat_template(), gguf.chat_template());
    assert_eq!(
        hf.chat_template_named("tool_use"),
        Some("{{ tools | length }}")
    );

    let gpl = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    for text in ["The capital of France is", "12345 한국어 😀", &gpl] {
        assert_eq!(
            hf.encode(text, true).unwrap(),
            gguf.encode(text, true).unwrap()
        );
    }
    let template = ChatTemplate::from_tokenizer(&hf).unwrap();
    assert!(
        template
            .render(&[Message::user("Hi")], true)
            .unwrap()
            .ends_with("<|im_start|>assistant\n")
    );
}

#[test]
fn malformed_config_is_a_clear_error() {
    let gguf = smollm2();
    let dir = tempfile::tempdir().unwrap();
    gguf.inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        br#"{"eos_token": "<|no such token|>"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("<|no such token|>"),
        "{err}"
    );

    std::fs::write(dir.path().join("tokenizer_config.json"), b"{ not json").unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");

    let missing = Tokenizer::from_hf_dir(&dir.path().join("nowhere")).unwrap_err();
    assert!(missing.to_string().contains("tokenizer.json"), "{missing}");
}
