//! Mutation tests of the text files a model comes with: `config.json` with its values
//! replaced by extreme or wrong-typed ones, `tokenizer.json` cut or with bytes
//! changed, and chat templates built from random Jinja pieces. Each loads (and runs)
//! or fails with an error; none panics, and a template's output is bounded (its
//! instructions are, by fuel: see `runaway_templates_are_bounded`).

#![allow(clippy::unwrap_used)]

mod hostile;

use std::panic::{AssertUnwindSafe, catch_unwind};

use afo_engine::{ChatTemplate, LoadedModel, Message, SafetensorsDir, Tokenizer};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `f`, turning a panic into a failed case that names the input.
fn no_panic<T>(what: &dyn std::fmt::Debug, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        TestCaseError::fail(format!("panicked ({msg}) on {what:?}"))
    })
}

/// Values a hostile `config.json` may hold.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e308)),
        Just(json!(-1e-308)),
        Just(json!(0.5)),
        Just(json!(null)),
        Just(json!("12")),
        Just(json!([])),
        Just(json!({})),
        Just(json!(true)),
        (1u64..1 << 40).prop_map(|n| json!(n)),
    ]
}

/// Runs an Ok model briefly: two tokens.
fn run_two(loaded: &LoadedModel) {
    let prompt = loaded.encode_text("a b").unwrap_or_else(|_| vec![0]);
    let prompt = if prompt.is_empty() { vec![0] } else { prompt };
    let options = afo_engine::GenerateOptions {
        max_tokens: 2,
        ..afo_engine::GenerateOptions::default()
    };
    let mut cache = loaded.model().new_cache(prompt.len() + 2);
    let _ = afo_engine::generate(
        loaded.model(),
        loaded.tokenizer(),
        &prompt,
        &options,
        &mut cache,
        |_| std::ops::ControlFlow::Continue(()),
    );
}

/// Jinja pieces a template is assembled from: loops, recursion, string growth, filters,
/// undefined names, bad syntax.
fn jinja_piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        "{% for i in range(100000) %}{{ i }}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{{ messages[0].content * 1000000 }}",
        "{{ messages | tojson }}",
        "{{ undefined_name.attr }}",
        "{{ raise_exception('no') }}",
        "{{ messages[99].content }}",
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "{{ bos_token }}{{ eos_token }}",
        "{{ strftime_now('%Y-%m-%d') }}",
        "{{ messages[0].content.split('a') | join('b') }}",
        "{% for",
        "{{ 1 / 0 }}",
        "{{ 'x' | indent(100000000) }}",
        "{{ range(10) | list | tojson(indent=100000000) }}",
    ])
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_config_json_never_panics(
        changes in prop::collection::vec((any::<Index>(), hostile_value(), any::<bool>()), 1..4)
    ) {
        let dir = tempfile::tempdir().unwrap();
        hostile::write_tiny_hf(dir.path());
        let mut config = hostile::tiny_config();
        let keys: Vec<String> = config.as_object().unwrap().keys().cloned().collect();
        for (which, value, remove) in &changes {
            let key = &keys[which.index(keys.len())];
            let map = config.as_object_mut().unwrap();
            if *remove {
                map.remove(key);
            } else {
                map.insert(key.clone(), value.clone());
            }
        }
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let result = no_panic(&changes, || {
            let loaded = LoadedModel::load(dir.path());
            if let Ok(l) = &loaded {
                run_two(l);
            }
            loaded.map(drop)
        })?;
        if let Err(e) = result {
            prop_assert!(!e.to_string().trim().is_empty());
        }
        let _ = no_panic(&changes, || SafetensorsDir::open(dir.path()).and_then(|m| m.config()).map(drop))?;
    }

    #[test]
    fn mutated_tokenizer_json_never_panics(
        cut in any::<Index>(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        truncate in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = hostile::tiny_tokenizer_json().into_bytes();
        for (at, value) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, &bytes).unwrap();
        let what = (truncate, &flips);
        let result = no_panic(&what, || {
            Tokenizer::from_hf_files(&path, None).map(|t| {
                let ids = t.encode("a b ab <unk>", true).unwrap_or_default();
                let _ = t.decode(&ids, false);
                let _ = t.encode_plain("a <unk>");
                t.max_token_bytes()
            })
        })?;
        if let Err(e) = result {
            prop_assert!(e.to_string().contains("tokenizer.json"), "the error names the file: {e}");
        }
    }

    #[test]
    fn random_templates_are_bounded_and_never_panic(
        pieces in prop::collection::vec(jinja_piece(), 1..5),
        content in "[a-z<|>_ ]{0,40}",
    ) {
        let source: String = pieces.concat();
        let tok = {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tokenizer.json");
            std::fs::write(&path, hostile::tiny_tokenizer_json()).unwrap();
            Tokenizer::from_hf_files(&path, None).unwrap()
        };
        let messages = [Message::system("s"), Message::user(content.clone())];
        let what = (&source, &content);
        let outcome = no_panic(&what, || {
            ChatTemplate::new(source.clone(), "<s>", "</s>").and_then(|t| {
                let text = t.render(&messages, true)?;
                t.encode(&tok, &messages, true, &[])?;
                Ok(text.len())
            })
        })?;
        if let Ok(len) = outcome {
            // Output is bounded by 1 MiB plus 4x the messages' bytes.
            prop_assert!(len <= (1 << 20) + 4 * (content.len() + 20), "{len} bytes from {what:?}");
        }
    }
}
