//! Whole-model benches on SmolLM2-135M (GGUF Q4_1) with the threads rayon gives
//! (`RAYON_NUM_THREADS`): prefill of a 128-token prompt, one decode step at position
//! 64, one batched decode step of 8 sequences, and the time to first token of a
//! 256-token prompt cold and with its first 240 tokens in the prefix cache, and 64
//! greedy tokens generated free against the same under a JSON schema (the cost of
//! constrained decoding per token).
//!
//! `cargo bench -p afo-benches --bench model`; the model comes from
//! `scripts/fetch-models.sh`.

#![allow(clippy::panic)] // a bench aborts when its inputs are missing

use std::hint::black_box;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use afo_benches::{load_smollm2, prompt};
use afo_runtime::engine::{
    Constraint, FinishReason, GenerateOptions, LoadedModel, Logits, PrefixReuse, SamplingParams,
    Scheduler, generate, generate_with_prefix,
};
use afo_runtime::kvcache::{PrefixCache, PrefixCacheConfig, Salt};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn loaded() -> LoadedModel {
    load_smollm2().unwrap_or_else(|e| panic!("{e}"))
}

fn check<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn prefill_and_decode(c: &mut Criterion) {
    let loaded = loaded();
    let model = loaded.model();
    let vocab = model.config().vocab_size;
    let mut group = c.benchmark_group("smollm2-q4_1");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));

    let tokens = prompt(128, vocab, 1);
    group.throughput(Throughput::Elements(tokens.len() as u64));
    group.bench_function("prefill/128", |b| {
        b.iter(|| {
            let mut cache = model.new_cache(tokens.len() + 1);
            check(model.forward(black_box(&tokens), &mut cache, Logits::Last))
        });
    });

    // Decode steps after a 64-token prompt: each timed step appends one token; a
    // fresh prefilled cache every 64 steps keeps the position near 64-128.
    let context = prompt(64, vocab, 2);
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode/at-64", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let mut cache = model.new_cache(context.len() + 65);
                check(model.forward(&context, &mut cache, Logits::Last));
                for step in 0..64.min(iters - done) {
                    let token = [(step as u32 * 97 + 5) % vocab as u32];
                    let t = Instant::now();
                    black_box(check(model.forward(&token, &mut cache, Logits::Last)));
                    total += t.elapsed();
                    done += 1;
                }
            }
            total
        });
    });
    group.finish();
}

fn batched_step(c: &mut Criterion) {
    let loaded = loaded();
    let model = loaded.model();
    let vocab = model.config().vocab_size;
    let sequences = 8;
    let mut group = c.benchmark_group("smollm2-q4_1");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(sequences as u64));
    group.bench_function("batched-step/8", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let mut s = Scheduler::new(model, loaded.tokenizer(), sequences);
                for i in 0..sequences as u32 {
                    check(s.add_request(
                        prompt(16, vocab, i + 10),
                        GenerateOptions {
                            max_tokens: 48,
                            sampling: SamplingParams::greedy(),
                            ignore_eos: true,
                            ..GenerateOptions::default()
                        },
                    ));
                }
                // Admission and the prompts (in chunks, over several steps): not
                // timed; every timed step decodes one token of each sequence.
                check(s.step());
                while s.waiting() + s.prefilling() > 0 {
                    check(s.step());
                }
                while s.has_unfinished() && done < iters {
                    let t = Instant::now();
                    black_box(check(s.step()));
                    total += t.elapsed();
                    done += 1;
                }
            }
            total
        });
    });
    group.finish();
}

fn prefix_reuse(c: &mut Criterion) {
    let loaded = loaded();
    let model = loaded.model();
    let vocab = model.config().vocab_size;
    let options = GenerateOptions {
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let shared = prompt(240, vocab, 3);
    let with_question = |q: u32| {
        let mut p = shared.clone();
        p.extend(prompt(16, vocab, 100 + q));
        p
    };
    let mut group = c.benchmark_group("smollm2-q4_1");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("ttft/256-cold", |b| {
        let p = with_question(0);
        b.iter(|| {
            let mut cache = model.new_cache(p.len() + 1);
            check(generate(
                model,
                loaded.tokenizer(),
                &p,
                &options,
                &mut cache,
                |_| ControlFlow::Continue(()),
            ))
        });
    });
    let prefixes = check(PrefixCache::new(PrefixCacheConfig::default()));
    let reuse = PrefixReuse {
        cache: &prefixes,
        salt: Salt::new(b"bench"),
    };
    // Publish the shared 240 tokens once; each timed run then reuses them.
    let first = with_question(0);
    let mut cache = model.new_cache(first.len() + 1);
    check(generate_with_prefix(
        model,
        loaded.tokenizer(),
        &first,
        &options,
        &mut cache,
        reuse,
        |_| ControlFlow::Continue(()),
    ));
    group.bench_function("ttft/256-240-cached", |b| {
        let p = with_question(1);
        b.iter(|| {
            let mut cache = model.new_cache(p.len() + 1);
            let g = check(generate_with_prefix(
                model,
                loaded.tokenizer(),
                &p,
                &options,
                &mut cache,
                reuse,
                |_| ControlFlow::Continue(()),
            ));
            assert!(
                g.prefix_hit_tokens >= 224,
                "prefix not reused: {}",
                g.prefix_hit_tokens
            );
            g
        });
    });
    group.finish();
}

/// 64 tokens after a short chat prompt, free and under a JSON schema whose one
/// string must be longer than 64 tokens (so both runs make exactly 64 tokens): the
/// difference is the grammar's cost (its masks are computed during the forward
/// passes, on a helper thread).
fn constrained_decode(c: &mut Criterion) {
    let loaded = loaded();
    let model = loaded.model();
    let chat = [afo_runtime::engine::Message::new(
        "user",
        "Write a long story about the sea, as JSON.",
    )];
    let prompt = check(loaded.encode_chat(&chat));
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 400, "maxLength": 800}},
        "required": ["story"]
    });
    let free = GenerateOptions {
        max_tokens: 64,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let constrained = GenerateOptions {
        constraint: Some(Constraint::json_schema(schema)),
        ..free.clone()
    };
    let mut group = c.benchmark_group("smollm2-q4_1");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(64));
    for (name, options) in [
        ("generate-64/free", &free),
        ("generate-64/json-schema", &constrained),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut cache = model.new_cache(prompt.len() + 65);
                let g = check(generate(
                    model,
                    loaded.tokenizer(),
                    &prompt,
                    options,
                    &mut cache,
                    |_| ControlFlow::Continue(()),
                ));
                assert!(
                    g.finish == FinishReason::Length && g.tokens.len() == 64,
                    "{name}: {:?} after {} tokens",
                    g.finish,
                    g.tokens.len()
                );
                g
            });
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    prefill_and_decode,
    batched_step,
    prefix_reuse,
    constrained_decode
);
criterion_main!(benches);
