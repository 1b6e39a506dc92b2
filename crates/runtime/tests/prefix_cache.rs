//! The runtime's per-model prefix cache on the real SmolLM2 model: a chat that shares
//! its system prompt with an earlier one reuses its cached prefix, says so in the
//! response and the SSOT record, and answers exactly as without the prefix cache.

#![allow(clippy::unwrap_used)]

mod common;

use common::smollm2 as model;

use afo_runtime::engine::{GenerateOptions, Message, SamplingParams};
use afo_runtime::kvcache::PrefixCacheConfig;
use afo_runtime::ssot::{LogReader, ReadMode, Record};
use afo_runtime::{GenerateRequest, Prompt, Runtime};

const SYSTEM: &str = "You are a concise travel assistant. You answer in one sentence, \
    name one place only, and never invent opening hours or prices. When a question is \
    about food, you suggest a local dish; when it is about museums, you name the best \
    known one; when it is about walks, you name a park or a river bank.";

fn chat(question: &str) -> GenerateRequest {
    GenerateRequest::new(
        model(),
        Prompt::Chat(vec![Message::system(SYSTEM), Message::user(question)]),
    )
    .with_options(GenerateOptions {
        max_tokens: 20,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    })
}

#[test]
fn a_shared_system_prompt_hits_and_answers_as_without_the_cache() {
    let questions = [
        "What should I eat in Lyon?",
        "Which museum should I visit in Madrid?",
        "What should I eat in Lyon?",
    ];
    let off = Runtime::builder()
        .prefix_cache(PrefixCacheConfig {
            budget_bytes: 0,
            ..PrefixCacheConfig::default()
        })
        .build()
        .unwrap();
    let cold: Vec<String> = questions
        .iter()
        .map(|q| {
            let r = off.generate(&chat(q)).unwrap();
            assert_eq!(r.prefix_cache_hit_tokens, 0);
            r.text
        })
        .collect();
    assert!(off.prefix_cache_stats().is_empty());

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    let runtime = Runtime::builder().ssot_log(&log).build().unwrap();
    let runs: Vec<_> = questions
        .iter()
        .map(|q| runtime.generate(&chat(q)).unwrap())
        .collect();
    for (r, want) in runs.iter().zip(&cold) {
        assert_eq!(
            &r.text, want,
            "output with the prefix cache equals the cold run"
        );
    }
    let hits: Vec<u64> = runs.iter().map(|r| r.prefix_cache_hit_tokens).collect();
    assert_eq!(hits[0], 0);
    // The system prompt is several 16-token blocks; the repeated question hits more.
    assert!(hits[1] >= 48, "{hits:?}");
    assert!(hits[2] > hits[1], "{hits:?}");
    assert!((hits[2] as usize) < runs[2].prompt_tokens);

    let entries = LogReader::open(&log, ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap();
    let recorded: Vec<Option<u64>> = entries
        .iter()
        .map(|e| match &e.record {
            Record::V2(r) => r.prefix_cache_hit_tokens,
            _ => panic!("v2 expected"),
        })
        .collect();
    assert_eq!(recorded, hits.iter().map(|&h| Some(h)).collect::<Vec<_>>());

    let stats = runtime.prefix_cache_stats();
    assert_eq!(stats.len(), 1, "one cache for the one model");
    let s = stats[0].1;
    assert_eq!(s.hit_tokens, hits.iter().sum::<u64>());
    assert!(s.bytes > 0 && s.bytes <= PrefixCacheConfig::default().budget_bytes);
}

#[test]
fn a_zero_block_size_is_refused() {
    let err = Runtime::builder()
        .prefix_cache(PrefixCacheConfig {
            block_tokens: 0,
            ..PrefixCacheConfig::default()
        })
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("block size"), "{err}");
}
