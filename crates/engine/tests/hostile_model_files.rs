//! Hostile model files (GGUF, safetensors folders, their index, `config.json` and the
//! tokenizer files) are refused with an error that names the problem, never a panic
//! and never an allocation sized by a forged count.
//!
//! Every file here is made from a small valid model (`hostile/mod.rs`) by changing
//! one thing.

#![allow(clippy::unwrap_used, clippy::panic)]

mod hostile;

use std::path::Path;

use afo_engine::{Error, GgufFile, HfConfig, LoadedModel, SafetensorsDir, Tokenizer};
use candle_core::quantized::gguf_file::Value;
use hostile::*;

/// Opens and loads a GGUF file the way `afo` does: the header, the description, the
/// configuration, the tokenizer and the decoder.
fn load_gguf(path: &Path) -> afo_engine::Result<()> {
    let mut gguf = GgufFile::open(path)?;
    let _ = gguf.describe();
    Tokenizer::from_gguf(gguf.content())?;
    gguf.load_model()?;
    LoadedModel::load(path)?;
    Ok(())
}

/// The error of loading `bytes` as a GGUF file, as text; fails the test when it loads.
fn gguf_error(name: &str, bytes: &[u8]) -> (Error, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, bytes);
    match load_gguf(&path) {
        Ok(()) => panic!("{name}: a hostile file loaded"),
        Err(e) => {
            let text = e.to_string();
            (e, text)
        }
    }
}

fn assert_mentions(what: &str, text: &str, needles: &[&str]) {
    eprintln!("{what}: {text}");
    for n in needles {
        assert!(text.contains(n), "{what}: `{n}` not in: {text}");
    }
}

#[test]
fn the_tiny_models_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "tiny.gguf", &tiny_gguf().bytes);
    load_gguf(&path).unwrap();
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    write_tiny_hf(&hf);
    SafetensorsDir::open(&hf).unwrap().load_model().unwrap();
    LoadedModel::load(&hf).unwrap();
}

#[test]
fn gguf_header_fields() {
    let g = tiny_gguf();
    let u64le = |v: u64| v.to_le_bytes();
    let u32le = |v: u32| v.to_le_bytes();
    let align = g.mark("kv.general.alignment.value");
    let embd = "tensor.token_embd.weight";
    let q = "tensor.blk.0.attn_q.weight";
    let last = "tensor.output_norm.weight";
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "alignment 0",
            g.patched(align, &u32le(0)),
            vec!["general.alignment", "alignment is 0", "power of two"],
        ),
        (
            "alignment 3",
            g.patched(align, &u32le(3)),
            vec!["general.alignment", "alignment is 3", "power of two"],
        ),
        (
            "alignment as an i32",
            g.patched(g.mark("kv.general.alignment.type"), &u32le(5)),
            vec!["general.alignment", "must be a u32"],
        ),
        ("bad magic", g.patched(0, b"GGUX"), vec!["magic"]),
        ("version 1", g.patched(4, &u32le(1)), vec!["version 1"]),
        ("version 99", g.patched(4, &u32le(99)), vec!["version 99"]),
        (
            "huge tensor count",
            g.patched(g.mark("tensor_count"), &u64le(u64::MAX)),
            vec!["18446744073709551615 tensors", "more than"],
        ),
        (
            "tensor count past the file",
            g.patched(g.mark("tensor_count"), &u64le(100_000)),
            vec!["100000 tensors", "truncated"],
        ),
        (
            "huge metadata count",
            g.patched(g.mark("kv_count"), &u64le(1 << 40)),
            vec!["1099511627776 metadata entries", "more than"],
        ),
        (
            "metadata count past the file",
            g.patched(g.mark("kv_count"), &u64le(900_000)),
            vec!["900000 metadata entries", "truncated"],
        ),
        (
            "key length past the end",
            g.patched(g.mark("kv_start"), &u64le(40_000))[..2000].to_vec(),
            vec!["key of metadata entry 0", "truncated", "needs 40000 bytes"],
        ),
        (
            "string value past the end",
            g.patched(g.mark("kv.general.name.value"), &u64le(1 << 20)),
            vec!["general.name", "truncated", "1048576"],
        ),
        (
            "string value of 2^64 - 1 bytes",
            g.patched(g.mark("kv.general.name.value"), &u64le(u64::MAX)),
            vec!["general.name", "18446744073709551615 bytes long"],
        ),
        (
            "array of 2^62 elements",
            g.patched(
                g.mark("kv.tokenizer.ggml.tokens.value") + 4,
                &u64le(1 << 62),
            ),
            vec!["tokenizer.ggml.tokens", "elements, more than"],
        ),
        (
            "array past the end",
            g.patched(
                g.mark("kv.tokenizer.ggml.scores.value") + 4,
                &u64le(1 << 20),
            ),
            vec!["tokenizer.ggml.scores", "truncated"],
        ),
        (
            "unknown value type",
            g.patched(g.mark("kv.general.name.type"), &u32le(99)),
            vec!["general.name", "unknown value type id 99"],
        ),
        (
            "unknown array element type",
            g.patched(g.mark("kv.tokenizer.ggml.scores.value"), &u32le(13)),
            vec!["tokenizer.ggml.scores", "unknown element type id 13"],
        ),
        (
            "a bool that is 7",
            g.patched(g.mark("kv.tokenizer.ggml.add_bos_token.value"), &[7]),
            vec!["add_bos_token", "not 0 or 1"],
        ),
        (
            "arrays nested three deep",
            // The inner array's element type becomes "array".
            g.patched(g.mark("kv.x.nested.value") + 12, &u32le(9)),
            vec!["x.nested", "nest deeper"],
        ),
        (
            "100 dimensions",
            g.patched(g.mark(&format!("{q}.ndims")), &u32le(100)),
            vec!["blk.0.attn_q.weight", "100 dimensions"],
        ),
        (
            "dimensions whose product overflows",
            {
                let mut b = g.patched(g.mark(&format!("{q}.dims")), &u64le(1 << 40));
                let at = g.mark(&format!("{q}.dims")) + 8;
                b[at..at + 8].copy_from_slice(&u64le(1 << 40));
                b
            },
            vec!["blk.0.attn_q.weight", "overflow"],
        ),
        (
            "a zero dimension beside huge ones",
            // Three dims [0, 2^40, 2^40]: the product is 0, but not in every order.
            {
                let at = g.mark(&format!("{q}.ndims"));
                let mut b = g.bytes[..at].to_vec();
                b.extend_from_slice(&u32le(3));
                for d in [0u64, 1 << 40, 1 << 40] {
                    b.extend_from_slice(&u64le(d));
                }
                b.extend_from_slice(&g.bytes[g.mark(&format!("{q}.type"))..]);
                b
            },
            vec!["blk.0.attn_q.weight", "overflow"],
        ),
        (
            "unknown ggml type",
            g.patched(g.mark(&format!("{q}.type")), &u32le(99)),
            vec!["blk.0.attn_q.weight", "ggml type id 99"],
        ),
        (
            "rows that are not whole blocks",
            g.patched(g.mark(&format!("{embd}.dims")), &u64le(65)),
            vec!["token_embd.weight", "blocks of 32"],
        ),
        (
            "a misaligned tensor offset",
            g.patched(g.mark(&format!("{q}.offset")), &u64le(1)),
            vec!["blk.0.attn_q.weight", "not a multiple of the alignment 32"],
        ),
        (
            "tensor data past the end",
            g.patched(g.mark(&format!("{last}.offset")), &u64le(1 << 30)),
            vec!["output_norm.weight", "past the end of the file"],
        ),
        (
            "tensor offset near 2^64",
            g.patched(g.mark(&format!("{last}.offset")), &u64le(u64::MAX - 31)),
            vec!["output_norm.weight", "past the end of the file"],
        ),
        (
            "a repeated tensor name",
            // Rename `blk.0.attn_k.weight` to `blk.0.attn_q.weight` (same length).
            {
                let at = g.mark("tensor.blk.0.attn_k.weight") + 8;
                g.patched(at, b"blk.0.attn_q.weight")
            },
            vec!["blk.0.attn_q.weight", "repeats"],
        ),
        (
            "a repeated key",
            {
                let mut md = tiny_metadata();
                md.push(("general.name".into(), Value::String("again".into())));
                write_gguf(&md, &tiny_tensors()).bytes
            },
            vec!["repeats the key"],
        ),
    ];
    for (what, bytes, needles) in cases {
        let (_, text) = gguf_error("hostile.gguf", &bytes);
        assert_mentions(what, &text, &needles);
        assert_mentions(what, &text, &["hostile.gguf"]);
    }
}

#[test]
fn gguf_truncated_at_every_byte_of_the_header_and_in_each_section() {
    let g = tiny_gguf();
    let dir = tempfile::tempdir().unwrap();
    let header_end = g.mark("data_start");
    let mut cuts: Vec<usize> = (0..header_end).collect();
    // And inside the data: mid-tensor, at a tensor boundary, one byte short.
    cuts.extend([header_end + 5, header_end + 320, g.bytes.len() - 1]);
    for cut in cuts {
        let path = write(dir.path(), "cut.gguf", &g.bytes[..cut]);
        let err = GgufFile::open(&path).map(|_| ()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("cut.gguf"), "cut at {cut}: {text}");
        assert!(
            matches!(err, Error::Gguf { .. } | Error::TensorOutOfBounds { .. }),
            "cut at {cut}: {text}"
        );
        assert!(
            text.contains("truncated") || text.contains("past the end") || text.contains("magic"),
            "cut at {cut}: {text}"
        );
    }
}

#[test]
fn gguf_metadata_values_that_cannot_run() {
    let cases: Vec<(&str, hostile::Gguf, Vec<&str>)> = vec![
        (
            "zero heads",
            with_meta("llama.attention.head_count", Value::U32(0)),
            vec!["at least 1"],
        ),
        (
            "a million layers",
            with_meta("llama.block_count", Value::U32(1_000_000)),
            vec!["layer count 1000000", "limit"],
        ),
        (
            "a huge hidden size",
            with_meta("llama.embedding_length", Value::U64(u64::MAX)),
            vec!["hidden size", "limit"],
        ),
        (
            "a negative hidden size",
            with_meta("llama.embedding_length", Value::I32(-64)),
            vec!["llama.embedding_length", "non-negative integer"],
        ),
        (
            "a NaN context length",
            with_meta("llama.context_length", Value::F32(f32::NAN)),
            vec!["llama.context_length", "non-negative integer"],
        ),
        (
            "a NaN RoPE base",
            with_meta("llama.rope.freq_base", Value::F32(f32::NAN)),
            vec!["RoPE base NaN"],
        ),
        (
            "a negative RoPE base",
            with_meta("llama.rope.freq_base", Value::F64(-1.0)),
            vec!["RoPE base -1.0"],
        ),
        (
            "a zero epsilon",
            with_meta("llama.attention.layer_norm_rms_epsilon", Value::F32(0.0)),
            vec!["epsilon"],
        ),
        (
            "heads that do not divide the hidden size",
            {
                let mut md = tiny_metadata();
                md.retain(|(k, _)| k != "llama.rope.dimension_count");
                for (k, v) in &mut md {
                    if k == "llama.attention.head_count" {
                        *v = Value::U32(3);
                    }
                    if k == "llama.attention.head_count_kv" {
                        *v = Value::U32(3);
                    }
                }
                write_gguf(&md, &tiny_tensors())
            },
            vec!["64 is not a multiple of the 3 attention heads"],
        ),
        (
            "a head dimension that is odd",
            with_meta("llama.rope.dimension_count", Value::U32(7)),
            vec!["head dim 7"],
        ),
        (
            "Llama 3 RoPE scaling with a negative factor",
            {
                let mut md = tiny_metadata();
                md.push((
                    "llama.rope.scaling.type".into(),
                    Value::String("llama3".into()),
                ));
                md.push(("llama.rope.scaling.factor".into(), Value::F32(-8.0)));
                md.push((
                    "llama.rope.scaling.original_context_length".into(),
                    Value::U32(64),
                ));
                write_gguf(&md, &tiny_tensors())
            },
            vec!["RoPE scaling factors"],
        ),
        (
            "an empty vocabulary",
            with_meta("tokenizer.ggml.tokens", Value::Array(vec![])),
            vec!["tokenizer.ggml.tokens"],
        ),
        (
            "token types for another vocabulary",
            with_meta(
                "tokenizer.ggml.token_type",
                Value::Array(vec![Value::I32(1); 3]),
            ),
            vec!["tokenizer.ggml.token_type", "3 entries for 8 tokens"],
        ),
        (
            "scores for another vocabulary",
            with_meta(
                "tokenizer.ggml.scores",
                Value::Array(vec![Value::F32(0.0); 100]),
            ),
            vec!["tokenizer.ggml.scores", "100 scores for 8 tokens"],
        ),
        (
            "a BOS id past the vocabulary",
            with_meta("tokenizer.ggml.bos_token_id", Value::U32(1000)),
            vec!["bos_token_id", "token id 1000 is past the end"],
        ),
        (
            "an EOS id past the vocabulary",
            with_meta("tokenizer.ggml.eos_token_id", Value::U64(1 << 40)),
            vec!["eos_token_id"],
        ),
        (
            "tokens that are not strings",
            with_meta(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::U32(1); 8]),
            ),
            vec!["tokenizer.ggml.tokens", "expected a string"],
        ),
        (
            "a token of 5000 bytes",
            {
                let mut tokens: Vec<Value> =
                    TOKENS.iter().map(|t| Value::String((*t).into())).collect();
                tokens[4] = Value::String("a".repeat(5000));
                with_meta("tokenizer.ggml.tokens", Value::Array(tokens))
            },
            vec!["token 4 is 5000 bytes long"],
        ),
        (
            "a gpt2 vocabulary with broken merges",
            {
                let mut md = tiny_metadata();
                for (k, v) in &mut md {
                    if k == "tokenizer.ggml.model" {
                        *v = Value::String("gpt2".into());
                    }
                }
                md.push((
                    "tokenizer.ggml.merges".into(),
                    Value::Array(vec![Value::String("nospace".into())]),
                ));
                write_gguf(&md, &tiny_tensors())
            },
            vec!["tokenizer.ggml.merges", "nospace"],
        ),
        (
            "a vocabulary size the embedding does not have",
            with_meta("llama.vocab_size", Value::U32(9)),
            vec!["token_embd.weight"],
        ),
        (
            "no architecture",
            without_meta("general.architecture"),
            vec!["general.architecture", "missing"],
        ),
    ];
    for (what, g, needles) in cases {
        let (_, text) = gguf_error("meta.gguf", &g.bytes);
        assert_mentions(what, &text, &needles);
    }
}

/// The error of opening and loading a folder holding the tiny Hugging Face model with
/// `model.safetensors` replaced by `bytes`.
fn safetensors_error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(dir.path());
    write(dir.path(), "model.safetensors", bytes);
    let err = SafetensorsDir::open(dir.path())
        .and_then(|mut d| d.load_model())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let again = LoadedModel::load(dir.path()).map(|_| ()).unwrap_err();
    assert_eq!(again.to_string(), err);
    err
}

#[test]
fn safetensors_headers() {
    let good = tiny_safetensors();
    let with_len = |len: u64| {
        let mut b = good.clone();
        b[..8].copy_from_slice(&len.to_le_bytes());
        b
    };
    let one = |entry: serde_json::Value, data: &[u8]| {
        safetensors_bytes(&serde_json::json!({ "model.norm.weight": entry }), data)
    };
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("empty", vec![], vec!["truncated"]),
        ("seven bytes", good[..7].to_vec(), vec!["truncated"]),
        (
            "header length past the end",
            with_len(good.len() as u64),
            vec!["header length", "past the end of the file"],
        ),
        (
            "header length 2^64 - 1",
            with_len(u64::MAX),
            vec!["header length 18446744073709551615", "past the end"],
        ),
        (
            "not JSON",
            {
                let mut b = good.clone();
                b[8..16].copy_from_slice(b"\x00\xffnot{]]");
                b
            },
            vec!["corrupt header JSON"],
        ),
        (
            "a JSON array",
            safetensors_bytes(&serde_json::json!([1, 2, 3]), &[]),
            vec!["corrupt header JSON"],
        ),
        (
            "an overflowing shape",
            one(
                serde_json::json!({"dtype": "F32", "shape": [1u64 << 40, 1u64 << 40, 1u64 << 40], "data_offsets": [0, 4]}),
                &[0; 4],
            ),
            vec!["model.norm.weight", "overflows"],
        ),
        (
            "a shape whose bytes overflow",
            one(
                serde_json::json!({"dtype": "F32", "shape": [1u64 << 62, 2], "data_offsets": [0, 4]}),
                &[0; 4],
            ),
            vec!["model.norm.weight", "overflows"],
        ),
        (
            "reversed offsets",
            one(
                serde_json::json!({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}),
                &[0; 16],
            ),
            vec!["model.norm.weight", "data_offsets 16..0"],
        ),
        (
            "offsets too short for the shape",
            one(
                serde_json::json!({"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}),
                &[0; 12],
            ),
            vec!["model.norm.weight", "do not hold"],
        ),
        (
            "overlapping tensors",
            safetensors_bytes(
                &serde_json::json!({
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                }),
                &[0; 24],
            ),
            vec!["tensor `b`", "data_offsets 8..24", "(byte 16)", "overlap"],
        ),
        (
            "data past the end",
            one(
                serde_json::json!({"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}),
                &[0; 16],
            ),
            vec!["model.norm.weight", "past the end of the data"],
        ),
        (
            "offsets near 2^64",
            one(
                serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [u64::MAX - 4, u64::MAX]}),
                &[0; 4],
            ),
            vec!["model.norm.weight", "(byte 0)", "leave a gap"],
        ),
        (
            "trailing bytes",
            one(
                serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
                &[0; 12],
            ),
            vec!["8 trailing bytes"],
        ),
        (
            "an unknown dtype",
            one(
                serde_json::json!({"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}),
                &[0; 4],
            ),
            vec!["model.norm.weight", "unknown variant `Q4`"],
        ),
        (
            "an unsupported dtype",
            one(
                serde_json::json!({"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}),
                &[0; 8],
            ),
            vec!["model.norm.weight", "I64 is not supported"],
        ),
        (
            "a negative dimension",
            one(
                serde_json::json!({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}),
                &[0; 4],
            ),
            vec!["model.norm.weight", "malformed entry"],
        ),
        (
            "metadata that is not strings",
            safetensors_bytes(&serde_json::json!({"__metadata__": {"format": 7}}), &[]),
            vec!["__metadata__"],
        ),
        (
            "a tensor of the wrong shape",
            {
                let mut tensors = tiny_hf_tensors();
                for (name, shape, values) in &mut tensors {
                    if name == "model.norm.weight" {
                        *shape = vec![3];
                        values.truncate(3);
                    }
                }
                safetensors_from(&tensors)
            },
            vec!["model.norm.weight", "[3]"],
        ),
    ];
    for (what, bytes, needles) in cases {
        let text = safetensors_error(&bytes);
        assert_mentions(what, &text, &needles);
        if !what.contains("wrong shape") {
            assert_mentions(what, &text, &["model.safetensors"]);
        }
    }
}

#[test]
fn a_safetensors_header_past_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(dir.path());
    let path = dir.path().join("model.safetensors");
    // A 150 MB header in a 200 MB (sparse) file.
    sparse(&path, &150_000_000u64.to_le_bytes(), 200_000_000);
    let err = SafetensorsDir::open(dir.path()).unwrap_err().to_string();
    assert_mentions(
        "huge header",
        &err,
        &["model.safetensors", "header length 150000000", "limit"],
    );
}

fn write_index(dir: &Path, shard: &str) {
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"model.norm.weight": shard}}).to_string(),
    )
    .unwrap();
}

#[test]
fn shards_must_stay_in_the_model_folder() {
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "x.safetensors", &tiny_safetensors());
    let cases = [
        ("/etc/passwd", "absolute path"),
        ("../x.safetensors", "goes up"),
        ("sub/../../x.safetensors", "goes up"),
        ("", "empty"),
    ];
    for (shard, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf(dir.path());
        write_index(dir.path(), shard);
        let err = SafetensorsDir::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, Error::ShardOutsideModel { .. }),
            "{shard}: {err}"
        );
        let text = err.to_string();
        assert_mentions(shard, &text, &[expect, "model.safetensors.index.json"]);
        assert!(text.contains(&format!("`{shard}`")), "{shard}: {text}");
    }

    // A symlink in the folder that points out of it.
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(dir.path());
    std::os::unix::fs::symlink(
        outside.path().join("x.safetensors"),
        dir.path().join("link.safetensors"),
    )
    .unwrap();
    write_index(dir.path(), "link.safetensors");
    let err = SafetensorsDir::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::ShardOutsideModel { .. }), "{err}");
    assert_mentions(
        "symlink",
        &err.to_string(),
        &["link.safetensors", "outside the model folder"],
    );

    // A shard in a subfolder, and one linked inside the folder, are fine.
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(dir.path());
    std::fs::create_dir(dir.path().join("weights")).unwrap();
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join("weights/model-1.safetensors"),
    )
    .unwrap();
    write_index(dir.path(), "./weights/model-1.safetensors");
    SafetensorsDir::open(dir.path()).unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("weights/model-1.safetensors"),
        dir.path().join("inside.safetensors"),
    )
    .unwrap();
    write_index(dir.path(), "inside.safetensors");
    SafetensorsDir::open(dir.path()).unwrap();
}

#[test]
fn hugging_face_cache_snapshots_may_link_into_their_blobs() {
    let root = tempfile::tempdir().unwrap();
    let repo = root.path().join("models--Org--Tiny");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    let blob = repo.join("blobs/0123456789abcdef");
    std::fs::write(&blob, tiny_safetensors()).unwrap();
    std::os::unix::fs::symlink(
        "../../blobs/0123456789abcdef",
        snap.join("model-1.safetensors"),
    )
    .unwrap();
    write_index(&snap, "model-1.safetensors");
    SafetensorsDir::open(&snap).unwrap();

    // Another repository's blobs are outside.
    let other = root.path().join("models--Org--Other/blobs");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("ffff"), tiny_safetensors()).unwrap();
    std::os::unix::fs::symlink(other.join("ffff"), snap.join("model-2.safetensors")).unwrap();
    write_index(&snap, "model-2.safetensors");
    let err = SafetensorsDir::open(&snap).unwrap_err().to_string();
    assert_mentions("other repo", &err, &["model-2.safetensors", "outside"]);
}

#[test]
fn a_tensor_in_two_shards() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(dir.path());
    write(dir.path(), "b.safetensors", &tiny_safetensors());
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"x": "model.safetensors", "y": "b.safetensors"}}"#,
    )
    .unwrap();
    let err = SafetensorsDir::open(dir.path()).unwrap_err().to_string();
    assert_mentions("duplicate", &err, &["is also in", "model.safetensors"]);
}

#[test]
fn an_oversized_index() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(dir.path());
    sparse(
        &dir.path().join("model.safetensors.index.json"),
        b"{\"weight_map\": {",
        17 << 20,
    );
    let err = SafetensorsDir::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::FileTooLarge { .. }), "{err}");
    assert_mentions(
        "index",
        &err.to_string(),
        &[
            "model.safetensors.index.json",
            "17825792 bytes",
            "too large",
        ],
    );
}

/// The error of resolving `config.json` with `key` set to `value`.
fn config_error(key: &str, value: serde_json::Value) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(dir.path());
    let mut config = tiny_config();
    config[key] = value;
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = SafetensorsDir::open(dir.path())
        .and_then(|d| d.config())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let again = LoadedModel::load(dir.path()).map(|_| ()).unwrap_err();
    assert_eq!(again.to_string(), err);
    err
}

#[test]
fn config_json_values_that_cannot_run() {
    use serde_json::json;
    let cases: Vec<(&str, serde_json::Value, Vec<&str>)> = vec![
        ("hidden_size", json!(0), vec!["positive"]),
        (
            "hidden_size",
            json!(1u64 << 40),
            vec!["hidden size 1099511627776", "limit"],
        ),
        ("hidden_size", json!(-8), vec!["config.json"]),
        (
            "hidden_size",
            json!(30),
            vec![
                "hidden_size",
                "30 is not a multiple of the 4 attention heads",
            ],
        ),
        (
            "num_hidden_layers",
            json!(5_000_000),
            vec!["layer count 5000000", "limit"],
        ),
        ("num_attention_heads", json!(0), vec!["at least 1"]),
        (
            "num_key_value_heads",
            json!(3),
            vec!["not a multiple of 3 kv heads"],
        ),
        ("vocab_size", json!(0), vec!["positive"]),
        ("vocab_size", json!(u64::MAX), vec!["vocab size", "limit"]),
        (
            "intermediate_size",
            json!(1u64 << 30),
            vec!["intermediate size", "limit"],
        ),
        (
            "head_dim",
            json!(1u64 << 20),
            vec!["head dim 1048576", "limit"],
        ),
        ("max_position_embeddings", json!(0), vec!["context length"]),
        (
            "max_position_embeddings",
            json!(u64::MAX),
            vec!["context length", "limit"],
        ),
        ("rope_theta", json!(-1.0), vec!["RoPE base -1.0"]),
        ("rope_theta", json!(0.0), vec!["RoPE base 0.0"]),
        ("rms_norm_eps", json!(0.0), vec!["epsilon"]),
        ("rms_norm_eps", json!(1e300), vec!["epsilon"]),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": -2.0, "original_max_position_embeddings": 64}),
            vec!["RoPE scaling factors"],
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                   "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
            vec!["high-frequency factor"],
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 0}),
            vec!["original context length 0"],
        ),
        (
            "architectures",
            json!("LlamaForCausalLM"),
            vec!["config.json"],
        ),
    ];
    for (key, value, needles) in cases {
        let text = config_error(key, value.clone());
        assert_mentions(&format!("{key} = {value}"), &text, &needles);
    }
}

#[test]
fn an_oversized_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let mut text = " ".repeat(2 << 20);
    text.push_str(&tiny_config().to_string());
    std::fs::write(&path, text).unwrap();
    let err = HfConfig::read(&path).unwrap_err();
    assert!(matches!(err, Error::FileTooLarge { .. }), "{err}");
    assert_mentions(
        "config",
        &err.to_string(),
        &[
            "config.json",
            "2097",
            "limit for this file is 1048576 bytes",
        ],
    );
}

#[test]
fn tokenizer_files_garbage_and_oversized() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(dir.path());
    let tok = dir.path().join("tokenizer.json");

    std::fs::write(&tok, b"\x00\x01garbage{{{").unwrap();
    let err = LoadedModel::load(dir.path())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert_mentions("garbage", &err, &["tokenizer.json"]);

    std::fs::write(&tok, "[".repeat(100_000)).unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert_mentions("deep nesting", &err, &["tokenizer.json"]);

    sparse(&tok, b"{", 65 << 20);
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::FileTooLarge { .. }), "{err}");
    assert_mentions(
        "oversized",
        &err.to_string(),
        &["tokenizer.json", "68157440 bytes"],
    );

    std::fs::write(&tok, tiny_tokenizer_json()).unwrap();
    Tokenizer::from_hf_dir(dir.path()).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    sparse(&config, b"{", 17 << 20);
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert_mentions(
        "config oversized",
        &err,
        &["tokenizer_config.json", "too large"],
    );
    std::fs::write(&config, "{\"bos_token\": 7").unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert_mentions("config garbage", &err, &["tokenizer_config.json"]);
    std::fs::write(&config, r#"{"bos_token": "<nope>"}"#).unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert_mentions("config token", &err, &["tokenizer_config.json", "<nope>"]);
}
