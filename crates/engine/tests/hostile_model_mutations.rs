//! Mutation tests: a small valid GGUF file and a small valid safetensors model, with
//! bits flipped, bytes and fields overwritten by extreme values, and the file cut
//! anywhere, load or fail with a clear error, and never panic.
//!
//! A panic (caught with `catch_unwind`) fails the case with the mutations that caused
//! it; proptest then shrinks them.

#![allow(clippy::unwrap_used)]

mod hostile;

use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use afo_engine::{Decode, Error, GenerateOptions, GgufFile, LoadedModel, Tokenizer};
use proptest::prelude::*;
use proptest::sample::Index;

/// One change to a file.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip one bit.
    Flip { at: Index, header: bool, bit: u8 },
    /// Write one byte.
    Byte { at: Index, header: bool, value: u8 },
    /// Write `width` bytes of `value` (little-endian) anywhere.
    Word {
        at: Index,
        header: bool,
        width: u8,
        value: u64,
    },
    /// Write `value` over a field: a count, a length, a type, a dimension, an offset
    /// (GGUF), or a number in the JSON header (safetensors).
    Field { which: Index, value: u64 },
    /// Cut the file.
    Truncate { at: Index, header: bool },
}

fn extreme() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(3),
        Just(7),
        Just(8),
        Just(9),
        Just(31),
        Just(100),
        Just(u64::from(u32::MAX)),
        Just(u64::from(u32::MAX) + 1),
        Just(i32::MAX as u64),
        Just(1 << 40),
        Just(1 << 62),
        Just(1 << 63),
        Just(u64::MAX / 2),
        Just(u64::MAX - 31),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Most changes land in the header, where the parsing is.
    let header = prop::bool::weighted(0.9);
    prop_oneof![
        1 => (any::<Index>(), header, 0u8..8)
            .prop_map(|(at, header, bit)| Mutation::Flip { at, header, bit }),
        1 => (any::<Index>(), header, any::<u8>())
            .prop_map(|(at, header, value)| Mutation::Byte { at, header, value }),
        1 => (
            any::<Index>(),
            header,
            prop::sample::select(vec![1u8, 2, 4, 8]),
            extreme()
        )
            .prop_map(|(at, header, width, value)| Mutation::Word {
                at,
                header,
                width,
                value
            }),
        3 => (any::<Index>(), extreme()).prop_map(|(which, value)| Mutation::Field { which, value }),
        1 => (any::<Index>(), header).prop_map(|(at, header)| Mutation::Truncate { at, header }),
    ]
}

/// Writes `value`'s low `width` bytes at `at`, as far as the buffer goes.
fn put(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    for (i, b) in value.to_le_bytes().iter().take(width).enumerate() {
        if let Some(slot) = bytes.get_mut(at + i) {
            *slot = *b;
        }
    }
}

/// Where generic mutations land: `header` picks within the first `header_len` bytes.
fn position(at: &Index, header: bool, header_len: usize, len: usize) -> Option<usize> {
    let range = if header { header_len.min(len) } else { len };
    (range > 0).then(|| at.index(range))
}

/// Applies the byte-level mutations; `field` handles [`Mutation::Field`].
fn apply(
    bytes: &mut Vec<u8>,
    header_len: usize,
    mutations: &[Mutation],
    mut field: impl FnMut(&mut Vec<u8>, &Index, u64),
) {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Flip { at, header, bit } => {
                if let Some(p) = position(at, *header, header_len, len) {
                    bytes[p] ^= 1 << bit;
                }
            }
            Mutation::Byte { at, header, value } => {
                if let Some(p) = position(at, *header, header_len, len) {
                    bytes[p] = *value;
                }
            }
            Mutation::Word {
                at,
                header,
                width,
                value,
            } => {
                if let Some(p) = position(at, *header, header_len, len) {
                    put(bytes, p, usize::from(*width), *value);
                }
            }
            Mutation::Field { which, value } => field(bytes, which, *value),
            Mutation::Truncate { at, header } => {
                if let Some(p) = position(at, *header, header_len, len + 1) {
                    bytes.truncate(p);
                }
            }
        }
    }
}

/// Loads a model the way `afo` does, and runs two tokens through it when it loads.
fn load_and_run(path: &Path, gguf: bool) -> afo_engine::Result<()> {
    if gguf {
        let mut file = GgufFile::open(path)?;
        let _ = file.describe();
        let _ = file.config();
        let _ = Tokenizer::from_gguf(file.content());
        file.load_model()?;
    }
    let loaded = LoadedModel::load(path)?;
    let mut prompt = loaded.encode_text("a b ab").unwrap_or_default();
    if prompt.is_empty() {
        prompt.push(0);
    }
    let options = GenerateOptions {
        max_tokens: 2,
        ..GenerateOptions::default()
    };
    let mut state = loaded.model().new_state();
    afo_engine::generate(
        loaded.model(),
        loaded.tokenizer(),
        &prompt,
        &options,
        &mut state,
        |_| ControlFlow::Continue(()),
    )?;
    Ok(())
}

/// Runs `load_and_run`, turning a panic into a failed case that names the input.
fn never_panics(path: &Path, gguf: bool, what: &dyn std::fmt::Debug) -> Result<(), TestCaseError> {
    let outcome = catch_unwind(AssertUnwindSafe(|| load_and_run(path, gguf)));
    match outcome {
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(TestCaseError::fail(format!("panicked ({msg}) on {what:?}")))
        }
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let text = e.to_string();
            prop_assert!(!text.trim().is_empty(), "an empty error on {what:?}");
            if matches!(
                e,
                Error::Gguf { .. } | Error::Safetensors { .. } | Error::TensorOutOfBounds { .. }
            ) {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                prop_assert!(
                    text.contains(&name) || text.contains("model.safetensors"),
                    "the error does not name the file: {text} on {what:?}"
                );
            }
            Ok(())
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_gguf_files_never_panic(mutations in prop::collection::vec(mutation(), 1..5)) {
        let g = hostile::tiny_gguf();
        let mut fields: Vec<(usize, usize)> = g
            .marks
            .iter()
            .filter(|(name, _)| name.as_str() != "kv_start" && name.as_str() != "tensors_start")
            .map(|(name, &at)| {
                let width = if name.ends_with(".type") || name.ends_with(".ndims") { 4 } else { 8 };
                (at, width)
            })
            .collect();
        fields.sort_unstable();
        let mut bytes = g.bytes.clone();
        apply(&mut bytes, g.mark("data_start"), &mutations, |bytes, which, value| {
            let (at, width) = fields[which.index(fields.len())];
            put(bytes, at, width, value);
        });
        let dir = tempfile::tempdir().unwrap();
        let path = hostile::write(dir.path(), "mutated.gguf", &bytes);
        never_panics(&path, true, &mutations)?;
    }

    #[test]
    fn mutated_safetensors_models_never_panic(mutations in prop::collection::vec(mutation(), 1..5)) {
        let good = hostile::tiny_safetensors();
        let header_len = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let mut bytes = good.clone();
        apply(&mut bytes, header_len, &mutations, |bytes, which, value| {
            // Replace the n-th number of the JSON header with `value` (or its negation,
            // or a float), and fix the header length.
            let Some(len) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap())) else {
                return;
            };
            let end = usize::try_from(len).ok().and_then(|l| l.checked_add(8)).filter(|&e| e <= bytes.len());
            let Some(end) = end else { return };
            let text = String::from_utf8_lossy(&bytes[8..end]).into_owned();
            let numbers: Vec<(usize, usize)> = {
                let mut v = Vec::new();
                let b = text.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_alphanumeric() && b[i - 1] != b'_') {
                        let s = i;
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                        v.push((s, i));
                    } else {
                        i += 1;
                    }
                }
                v
            };
            if numbers.is_empty() {
                return;
            }
            let (s, e) = numbers[which.index(numbers.len())];
            let replacement = match value % 5 {
                0 => format!("-{value}"),
                1 => format!("{value}.5"),
                2 => format!("{value}0"),
                _ => value.to_string(),
            };
            let new_text = format!("{}{}{}", &text[..s], replacement, &text[e..]);
            let mut out = (new_text.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(new_text.as_bytes());
            out.extend_from_slice(&bytes[end..]);
            *bytes = out;
        });
        let dir = tempfile::tempdir().unwrap();
        hostile::write_tiny_hf(dir.path());
        hostile::write(dir.path(), "model.safetensors", &bytes);
        never_panics(dir.path(), false, &mutations)?;
    }
}
