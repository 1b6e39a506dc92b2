//! Bad GGUF files get clear errors naming the file and the problem, never panics.

#![allow(clippy::unwrap_used)]

mod common;

use afo_engine::{Error, GgufFile, LoadedModel};

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn real() -> Vec<u8> {
    std::fs::read(common::smollm2_path()).unwrap()
}

#[test]
fn a_missing_file() {
    let err = GgufFile::open("/nonexistent/dir/model.gguf").unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(
        err.to_string().contains("/nonexistent/dir/model.gguf"),
        "{err}"
    );
    let err = LoadedModel::load("/nonexistent/x.gguf").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.gguf"), "{err}");
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "notes.gguf", b"this is a text file, not a model\n");
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert!(err.contains("notes.gguf") && err.contains("GGUF"), "{err}");
    let empty = write(&dir, "empty.gguf", b"");
    assert!(
        GgufFile::open(&empty)
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
}

#[test]
fn a_truncated_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "cut.gguf", &real()[..4096]);
    let err = GgufFile::open(&path).unwrap_err();
    assert!(matches!(err, Error::Gguf { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("cut.gguf") && text.contains("truncated"),
        "{text}"
    );
}

#[test]
fn tensor_data_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = real();
    let path = write(&dir, "half.gguf", &bytes[..bytes.len() / 2]);
    let err = GgufFile::open(&path).unwrap_err();
    match &err {
        Error::TensorOutOfBounds {
            name,
            offset,
            bytes: size,
            file_len,
            ..
        } => {
            assert!(offset + size > *file_len);
            assert!(err.to_string().contains(name.as_str()));
            assert!(
                err.to_string().contains("past the end of the file"),
                "{err}"
            );
        }
        other => panic!("expected TensorOutOfBounds, got {other}"),
    }
}

#[test]
fn an_unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = real();
    // Rename the architecture value (same length, so every offset stays valid).
    let key = b"general.architecture";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    let value = bytes[at..].windows(5).position(|w| w == b"llama").unwrap() + at;
    bytes[value..value + 5].copy_from_slice(b"mamba");
    let path = write(&dir, "mamba.gguf", &bytes);
    let mut gguf = GgufFile::open(&path).unwrap();
    let err = gguf.load_model().unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::UnsupportedArchitecture { .. }),
        "{text}"
    );
    assert!(
        text.contains("mamba") && text.contains("llama") && text.contains("qwen3"),
        "{text}"
    );
}

#[test]
fn a_tensor_of_the_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = real();
    // Claim a hidden size the tensors do not have.
    let key = b"llama.embedding_length";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // The value follows its 4-byte type tag (u32 = 4).
    let value = at + 4;
    assert_eq!(
        u32::from_le_bytes(bytes[value..value + 4].try_into().unwrap()),
        576
    );
    bytes[value..value + 4].copy_from_slice(&640u32.to_le_bytes());
    let path = write(&dir, "wrong.gguf", &bytes);
    let err = GgufFile::open(&path).unwrap().load_model().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::TensorShape { .. }), "{text}");
    assert!(
        text.contains("token_embd.weight") && text.contains("640"),
        "{text}"
    );
}
