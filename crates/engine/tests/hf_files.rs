//! Hugging Face directories and the cache layout: resolution offline, and bad files
//! with clear errors.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use afo_engine::{Error, HfCache, HfConfig, SafetensorsDir, gguf_to_hf_name};
use candle_core::{Device, Tensor};

fn tiny_safetensors(path: &Path) {
    let mut map = std::collections::HashMap::new();
    map.insert(
        "model.norm.weight".to_owned(),
        Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn the_cache_layout_resolves_refs_and_commits() {
    let root = tempfile::tempdir().unwrap();
    let repo = root
        .path()
        .join("models--HuggingFaceTB--SmolLM2-135M-Instruct");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for rev in ["aaaa1111", "bbbb2222"] {
        let snap = repo.join("snapshots").join(rev);
        std::fs::create_dir_all(&snap).unwrap();
        // Snapshots hold symlinks into blobs/, as the hub client writes them.
        let blob = repo.join("blobs").join(format!("config-{rev}"));
        std::fs::write(&blob, format!("{{\"rev\": \"{rev}\"}}")).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join("config.json")).unwrap();
    }
    std::fs::write(repo.join("refs/main"), "bbbb2222\n").unwrap();
    let cache = HfCache::new(root.path());
    let main = cache
        .resolve("HuggingFaceTB/SmolLM2-135M-Instruct", None)
        .unwrap();
    assert!(main.ends_with("snapshots/bbbb2222"));
    let text = std::fs::read_to_string(main.join("config.json")).unwrap();
    assert!(text.contains("bbbb2222"));
    let pinned = cache
        .resolve("HuggingFaceTB/SmolLM2-135M-Instruct", Some("aaaa1111"))
        .unwrap();
    assert!(pinned.ends_with("snapshots/aaaa1111"));
    let err = cache.resolve("Org/Missing", None).unwrap_err().to_string();
    assert!(
        err.contains("Org/Missing") && err.contains("models--Org--Missing"),
        "{err}"
    );
    let err = cache
        .resolve("HuggingFaceTB/SmolLM2-135M-Instruct", Some("cccc"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cccc"), "{err}");
}

#[test]
fn the_cache_root_follows_the_usual_variables() {
    let root = |a, b, c| HfCache::from_env_values(a, b, c).map(|c| format!("{c:?}"));
    assert!(
        root(Some("/x"), Some("/h"), Some("/home"))
            .unwrap()
            .contains("\"/x\"")
    );
    assert!(
        root(None, Some("/h"), Some("/home"))
            .unwrap()
            .contains("/h/hub")
    );
    assert!(
        root(None, None, Some("/home"))
            .unwrap()
            .contains("/home/.cache/huggingface/hub")
    );
    assert!(root(None, None, None).is_none());
}

#[test]
fn names_map_to_hugging_face() {
    assert_eq!(
        gguf_to_hf_name("token_embd.weight").unwrap(),
        "model.embed_tokens.weight"
    );
    assert_eq!(
        gguf_to_hf_name("blk.7.attn_q.bias").unwrap(),
        "model.layers.7.self_attn.q_proj.bias"
    );
    assert_eq!(
        gguf_to_hf_name("blk.0.ffn_norm.weight").unwrap(),
        "model.layers.0.post_attention_layernorm.weight"
    );
    assert_eq!(gguf_to_hf_name("blk.x.attn_q.weight"), None);
}

#[test]
fn bad_safetensors_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Missing weights.
    let err = SafetensorsDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    let good = dir.path().join("good.safetensors");
    tiny_safetensors(&good);
    let bytes = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", bytes[..5].to_vec(), "truncated"),
        (
            "huge header",
            {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            },
            "past the end",
        ),
        (
            "corrupt json",
            {
                let mut b = bytes.clone();
                b[8] = b'#';
                b
            },
            "corrupt header",
        ),
        (
            "data cut",
            bytes[..bytes.len() - 4].to_vec(),
            "past the end of the data",
        ),
        (
            "wrong dtype",
            String::from_utf8_lossy(&bytes)
                .replace("F32", "I64")
                .into_bytes(),
            "I64",
        ),
    ];
    for (what, content, expect) in cases {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("model.safetensors"), &content).unwrap();
        let err = SafetensorsDir::open(d.path()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(expect), "{what}: {text}");
        assert!(text.contains("model.safetensors"), "{what}: {text}");
    }
}

#[test]
fn a_shard_missing_from_the_index() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let err = SafetensorsDir::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("model-00001-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn config_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"architectures": ["MambaForCausalLM"]}"#).unwrap();
    let err = HfConfig::read(&path)
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("MambaForCausalLM") && err.contains("qwen2"),
        "{err}"
    );
    std::fs::write(&path, r#"{"model_type": "llama", "hidden_size": 8}"#).unwrap();
    let err = HfConfig::read(&path)
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_attention_heads"), "{err}");
    std::fs::write(&path, "{ not json").unwrap();
    let err = HfConfig::read(&path).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn sliding_windows_are_read_where_they_apply() {
    let sizes = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "sliding_window": 4096"#;
    let resolve = |json: String| serde_json::from_str::<HfConfig>(&json).unwrap().resolve();
    let mistral = resolve(format!(r#"{{"model_type": "mistral", {sizes}}}"#)).unwrap();
    assert_eq!(mistral.sliding_window, Some(4096));
    // Qwen2 checkpoints carry a window they do not use.
    let qwen = resolve(format!(r#"{{"model_type": "qwen2", {sizes}}}"#)).unwrap();
    assert_eq!(qwen.sliding_window, None);
    let err = resolve(format!(
        r#"{{"model_type": "qwen2", "use_sliding_window": true, {sizes}}}"#
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("use_sliding_window"), "{err}");
}

#[test]
fn a_snapshot_of_one_gguf_resolves_to_the_file() {
    let root = tempfile::tempdir().unwrap();
    let cache = HfCache::new(root.path());
    assert!(cache.repos().is_empty());
    let snap = cache.snapshot_path("Org/Single-GGUF", "c0ffee");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(cache.ref_path("Org/Single-GGUF", "main").parent().unwrap()).unwrap();
    std::fs::write(cache.ref_path("Org/Single-GGUF", "main"), "c0ffee").unwrap();
    std::fs::write(snap.join("model.Q4_1.gguf"), b"GGUF").unwrap();
    std::fs::write(snap.join("README.md"), b"readme").unwrap();
    assert_eq!(
        cache.resolve("Org/Single-GGUF", None).unwrap(),
        snap.join("model.Q4_1.gguf")
    );
    assert_eq!(cache.snapshot("Org/Single-GGUF", None).unwrap(), snap);
    // Two GGUF files: the folder, for the caller to choose.
    std::fs::write(snap.join("model.Q8_0.gguf"), b"GGUF").unwrap();
    assert_eq!(cache.resolve("Org/Single-GGUF", None).unwrap(), snap);
    // A config.json makes it a Hugging Face model folder.
    std::fs::remove_file(snap.join("model.Q8_0.gguf")).unwrap();
    std::fs::write(snap.join("config.json"), b"{}").unwrap();
    assert_eq!(cache.resolve("Org/Single-GGUF", None).unwrap(), snap);
    assert_eq!(cache.repos(), vec!["Org/Single-GGUF".to_owned()]);
    assert!(
        cache
            .repo_folder("Org/Single-GGUF")
            .ends_with("models--Org--Single-GGUF")
    );
}
