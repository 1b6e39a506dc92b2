//! The prefix cache on the real SmolLM2 model: a request sharing a prompt prefix with
//! an earlier one reuses its cached blocks, and its output equals a run without the
//! prefix cache, in the generation loop and in the batching scheduler.

#![allow(clippy::unwrap_used)]

mod common;

use std::ops::ControlFlow;

use afo_engine::{
    GenerateOptions, LoadedModel, Logits, Model, PrefixReuse, SamplingParams, Scheduler, generate,
    generate_with_prefix,
};
use afo_kvcache::{PrefixCache, PrefixCacheConfig, PrunePolicy, Salt};

/// A shared "system prompt" of well over ten 16-token blocks.
const SYSTEM: &str = "You are a careful assistant for a public library. Answer questions \
    about opening hours, borrowing rules and the catalog in one or two short sentences. \
    The library opens at nine in the morning and closes at six in the evening from Monday \
    to Friday, and at noon on Saturday. Members may borrow up to eight books for three \
    weeks and renew them twice, unless another member has reserved them. Films may be \
    borrowed for one week. Late returns cost ten cents a day per item.\n";

fn options(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    }
}

fn cold(loaded: &LoadedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let model = loaded.model();
    let mut cache = model.new_cache(prompt.len() + n);
    generate(
        model,
        loaded.tokenizer(),
        prompt,
        &options(n),
        &mut cache,
        |_| ControlFlow::Continue(()),
    )
    .unwrap()
    .tokens
}

fn cached(
    loaded: &LoadedModel,
    prefixes: &PrefixCache,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, usize) {
    let model = loaded.model();
    let mut cache = model.new_cache(prompt.len() + n);
    let reuse = PrefixReuse {
        cache: prefixes,
        salt: Salt::new(b"SmolLM2-135M-Instruct.Q4_1"),
    };
    let g = generate_with_prefix(
        model,
        loaded.tokenizer(),
        prompt,
        &options(n),
        &mut cache,
        reuse,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    (g.tokens, g.prefix_hit_tokens)
}

fn prompts(loaded: &LoadedModel) -> (Vec<u32>, Vec<u32>, usize) {
    let a = loaded
        .encode_text(&format!(
            "{SYSTEM}Question: When does the library open on Saturday?\nAnswer:"
        ))
        .unwrap();
    let b = loaded
        .encode_text(&format!(
            "{SYSTEM}Question: How long may I keep a film?\nAnswer:"
        ))
        .unwrap();
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(shared >= 80, "the prompts share {shared} tokens");
    (a, b, shared)
}

fn last_logits(model: &Model, cache: &mut afo_kvcache::KvCache, ids: &[u32]) -> Vec<f32> {
    let mut last = Vec::new();
    for chunk in ids.chunks(afo_engine::PREFILL_CHUNK) {
        last = model
            .forward(chunk, cache, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    last
}

#[test]
fn a_shared_prefix_hits_and_the_output_equals_the_cold_run() {
    let loaded = LoadedModel::load(common::smollm2_path()).unwrap();
    let (a, b, shared) = prompts(&loaded);
    let n = 24;
    let (cold_a, cold_b) = (cold(&loaded, &a, n), cold(&loaded, &b, n));
    assert!(!cold_a.is_empty() && cold_a != cold_b);

    let prefixes = PrefixCache::new(PrefixCacheConfig::default()).unwrap();
    let bt = prefixes.config().block_tokens;
    let (first, hit) = cached(&loaded, &prefixes, &a, n);
    assert_eq!(hit, 0, "nothing is cached before the first request");
    assert_eq!(first, cold_a);
    assert_eq!(prefixes.stats().blocks, a.len() / bt);

    // Another question after the same system prompt: the shared blocks hit.
    let (second, hit) = cached(&loaded, &prefixes, &b, n);
    assert_eq!(hit, shared / bt * bt, "shared {shared} tokens");
    assert_eq!(
        second, cold_b,
        "output with a prefix hit equals the cold run"
    );

    // The same prompt again: all of it but the last token's block.
    let (third, hit) = cached(&loaded, &prefixes, &a, n);
    assert_eq!(hit, (a.len() - 1) / bt * bt);
    assert_eq!(third, cold_a);
    let s = prefixes.stats();
    assert_eq!(
        s.hit_tokens as usize,
        shared / bt * bt + (a.len() - 1) / bt * bt
    );
    assert!(s.bytes <= prefixes.config().budget_bytes);

    // The logits themselves: equal up to float rounding of other chunk shapes.
    let model = loaded.model();
    let mut fresh = model.new_cache(b.len());
    let want = last_logits(model, &mut fresh, &b);
    let hit = prefixes.lookup(Salt::new(b"SmolLM2-135M-Instruct.Q4_1"), &b[..b.len() - 1]);
    let mut seeded = model.new_cache(b.len());
    hit.seed(&mut seeded).unwrap();
    let got = last_logits(model, &mut seeded, &b[hit.tokens()..]);
    let diff = want
        .iter()
        .zip(&got)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "largest logit difference {diff}");
}

#[test]
fn the_scheduler_reuses_prefixes_and_matches_single_runs() {
    let loaded = LoadedModel::load(common::smollm2_path()).unwrap();
    let (model, tok) = (loaded.model(), loaded.tokenizer());
    let (a, b, shared) = prompts(&loaded);
    let n = 12;
    let alone = [cold(&loaded, &a, n), cold(&loaded, &b, n)];

    let prefixes = PrefixCache::new(PrefixCacheConfig::default()).unwrap();
    let bt = prefixes.config().block_tokens;
    let mut s = Scheduler::new(model, tok, 4);
    s.set_prefix_cache(PrefixReuse {
        cache: &prefixes,
        salt: Salt::new(b"smollm2"),
    });
    let ids = [
        s.add_request(a.clone(), options(n)).unwrap(),
        s.add_request(b.clone(), options(n)).unwrap(),
        s.add_request(a.clone(), options(n)).unwrap(),
    ];
    let mut tokens = vec![Vec::new(); 3];
    let mut hits = [None; 3];
    while s.has_unfinished() {
        for o in s.step().unwrap() {
            let i = ids.iter().position(|&id| id == o.id).unwrap();
            if let Some(h) = o.prefix_hit_tokens {
                assert!(hits[i].is_none(), "reported once");
                hits[i] = Some(h);
            }
            // An end-of-sequence token ends a request without being part of it.
            if o.finish != Some(afo_engine::FinishReason::Eos) {
                tokens[i].extend(o.token);
            }
        }
    }
    // Admitted in one step, in order: each request sees what the earlier published.
    assert_eq!(
        hits,
        [
            Some(0),
            Some(shared / bt * bt),
            Some((a.len() - 1) / bt * bt)
        ]
    );
    assert_eq!(tokens[0], alone[0]);
    assert_eq!(tokens[1], alone[1]);
    assert_eq!(tokens[2], alone[0]);
}

#[test]
fn pruning_caches_neither_publish_nor_reuse() {
    let loaded = LoadedModel::load(common::smollm2_path()).unwrap();
    let model = loaded.model();
    let (a, _, _) = prompts(&loaded);
    let prefixes = PrefixCache::new(PrefixCacheConfig::default()).unwrap();
    let reuse = PrefixReuse {
        cache: &prefixes,
        salt: Salt::new(b"m"),
    };
    let run = |cache: &mut afo_kvcache::KvCache| {
        generate_with_prefix(
            model,
            loaded.tokenizer(),
            &a,
            &options(4),
            cache,
            reuse,
            |_| ControlFlow::Continue(()),
        )
        .unwrap()
        .prefix_hit_tokens
    };
    // A budget below a prompt of two prefill chunks: the second chunk prunes, and
    // nothing is published.
    let long = loaded.encode_text(&SYSTEM.repeat(7)).unwrap();
    assert!(
        long.len() > afo_engine::PREFILL_CHUNK + 64,
        "{}",
        long.len()
    );
    let budget = long.len() - 32;
    let window = PrunePolicy::SlidingWindow { window: budget };
    let mut small = model.new_pruned_cache(long.len() + 4, Some(budget), window);
    let g = generate_with_prefix(
        model,
        loaded.tokenizer(),
        &long,
        &options(4),
        &mut small,
        reuse,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(g.prefix_hit_tokens, 0);
    assert!(small.evicted_tokens() > 0);
    assert_eq!(prefixes.stats().blocks, 0);
    // A full cache publishes; a heavy-hitters cache does not reuse (its seeded tokens
    // would have no attention scores), a window holding the prompt does.
    assert_eq!(run(&mut model.new_cache(a.len() + 4)), 0);
    assert!(prefixes.stats().blocks > 0);
    let h2o = PrunePolicy::HeavyHitters {
        budget: a.len() + 8,
        recent: 16,
    };
    let mut heavy = model.new_pruned_cache(a.len() + 4, Some(a.len() + 8), h2o);
    assert_eq!(run(&mut heavy), 0);
    let roomy = PrunePolicy::SlidingWindow { window: a.len() };
    let mut windowed = model.new_pruned_cache(a.len() + 4, Some(a.len() + 8), roomy);
    assert!(run(&mut windowed) > 0);
}
