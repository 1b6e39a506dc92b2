//! `afo inspect` and `afo generate` on hostile model files: one `error:` line that
//! names the file, and a plain failure exit status (never a panic's 101).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn afo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afo"));
    c.env("TMPDIR", std::env::temp_dir());
    c.env_remove("RUST_LOG");
    c
}

/// A GGUF header whose `general.alignment` is 0 (it used to divide by zero).
fn alignment_zero_gguf(dir: &Path) -> PathBuf {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    let key = b"general.alignment";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&4u32.to_le_bytes()); // u32
    b.extend_from_slice(&0u32.to_le_bytes());
    let path = dir.join("align0.gguf");
    std::fs::write(&path, b).unwrap();
    path
}

/// A Hugging Face folder with a valid configuration and tokenizer.
fn hf_folder(dir: &Path) -> PathBuf {
    let folder = dir.join("model");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(
        folder.join("config.json"),
        r#"{"model_type": "llama", "vocab_size": 4, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}"#,
    )
    .unwrap();
    std::fs::write(
        folder.join("tokenizer.json"),
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1, "b": 2, "c": 3},
                      "unk_token": "<unk>"}}"#,
    )
    .unwrap();
    folder
}

/// A safetensors header (padded to 8 bytes) and its data.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut text = header.to_owned();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A folder whose `model.safetensors` declares a shape whose size overflows.
fn overflow_shape_folder(dir: &Path) -> PathBuf {
    let folder = hf_folder(dir);
    let header = r#"{"model.norm.weight": {"dtype": "F32",
        "shape": [1099511627776, 1099511627776, 1099511627776], "data_offsets": [0, 4]}}"#;
    std::fs::write(
        folder.join("model.safetensors"),
        safetensors(header, &[0; 4]),
    )
    .unwrap();
    folder
}

/// A folder whose index names a shard outside it.
fn escaping_index_folder(dir: &Path) -> PathBuf {
    let folder = hf_folder(dir);
    std::fs::write(
        dir.join("outside.safetensors"),
        safetensors(
            r#"{"model.norm.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#,
            &[0; 4],
        ),
    )
    .unwrap();
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "../outside.safetensors"}}"#,
    )
    .unwrap();
    folder
}

/// Runs `afo ARGS` and checks the failure: not a panic, one `error:` line naming
/// `names`.
fn fails_with_one_line(args: &[&std::ffi::OsStr], names: &str) {
    let out = afo().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    assert_ne!(code, Some(101), "{args:?} panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
    assert!(
        errors[0].contains(names),
        "{args:?}: `{names}` not in {stderr}"
    );
    eprintln!("{args:?}: {}", errors[0]);
}

#[test]
fn hostile_files_are_one_clear_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = alignment_zero_gguf(dir.path());
    fails_with_one_line(&["inspect".as_ref(), gguf.as_os_str()], "align0.gguf");
    fails_with_one_line(
        &[
            "--threads".as_ref(),
            "2".as_ref(),
            "generate".as_ref(),
            "--max-tokens".as_ref(),
            "1".as_ref(),
            "--model".as_ref(),
            gguf.as_os_str(),
            "hi".as_ref(),
        ],
        "align0.gguf",
    );
    let gguf_err = afo().arg("inspect").arg(&gguf).output().unwrap();
    let text = String::from_utf8_lossy(&gguf_err.stderr);
    assert!(text.contains("general.alignment"), "{text}");

    let overflow = tempfile::tempdir().unwrap();
    let folder = overflow_shape_folder(overflow.path());
    fails_with_one_line(
        &[
            "generate".as_ref(),
            "--max-tokens".as_ref(),
            "1".as_ref(),
            "--model".as_ref(),
            folder.as_os_str(),
            "hi".as_ref(),
        ],
        "model.safetensors",
    );

    let escaping = tempfile::tempdir().unwrap();
    let folder = escaping_index_folder(escaping.path());
    fails_with_one_line(
        &[
            "generate".as_ref(),
            "--max-tokens".as_ref(),
            "1".as_ref(),
            "--model".as_ref(),
            folder.as_os_str(),
            "hi".as_ref(),
        ],
        "model.safetensors.index.json",
    );
    fails_with_one_line(&["inspect".as_ref(), folder.as_os_str()], "model");
}
