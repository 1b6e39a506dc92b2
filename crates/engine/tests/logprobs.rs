//! Log-probabilities on the real SmolLM2 model: what `generate` and the batching
//! scheduler report equals the log-softmax of the model's logits, computed here
//! independently, step by step.

#![allow(clippy::unwrap_used)]

mod common;

use std::ops::ControlFlow;

use afo_engine::{
    Decode, FinishReason, GenerateOptions, LoadedModel, SamplingParams, Scheduler, TokenLogprobs,
    generate,
};

const PROMPT: &str = "The capital of France is";
const TOKENS: usize = 4;
const TOP: usize = 5;

fn options(logprobs: Option<usize>) -> GenerateOptions {
    GenerateOptions {
        max_tokens: TOKENS,
        sampling: SamplingParams::greedy(),
        logprobs,
        ..GenerateOptions::default()
    }
}

/// The log-softmax of `logits`, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    logits
        .iter()
        .map(|&l| f64::from(l - max) - z.ln())
        .collect()
}

fn check_sorted_and_greedy(t: &TokenLogprobs) {
    assert_eq!(t.top.len(), TOP, "{t:?}");
    assert!(
        t.top.windows(2).all(|w| w[0].1 >= w[1].1),
        "top_logprobs must be sorted, most likely first: {t:?}"
    );
    // Greedy: the chosen token is the most likely one, so it leads the alternatives.
    assert_eq!(t.top[0].0, t.token, "{t:?}");
    assert_eq!(t.top[0].1, t.logprob, "{t:?}");
    assert!(t.logprob <= 0.0, "{t:?}");
}

#[test]
fn generate_and_scheduler_report_the_models_log_softmax() {
    let loaded = LoadedModel::load(common::smollm2_path()).unwrap();
    let (model, tok) = (loaded.model(), loaded.tokenizer());
    let prompt = loaded.encode_text(PROMPT).unwrap();

    let mut cache = model.new_cache(prompt.len() + TOKENS);
    let g = generate(model, tok, &prompt, &options(Some(TOP)), &mut cache, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(g.finish, FinishReason::Length);
    assert_eq!(g.tokens.len(), TOKENS);
    assert_eq!(g.logprobs.len(), TOKENS);

    // The same steps, computed here: the prompt's logits, then each generated token's.
    let mut state = model.new_cache(prompt.len() + TOKENS);
    let mut logits = model.decode(&prompt, &mut state).unwrap();
    for (step, (t, &id)) in g.logprobs.iter().zip(&g.tokens).enumerate() {
        assert_eq!(t.token, id, "step {step}");
        let want = log_softmax(&logits);
        assert!(
            (f64::from(t.logprob) - want[id as usize]).abs() < 1e-4,
            "step {step}: token {id} reported {} but the model gives {}",
            t.logprob,
            want[id as usize]
        );
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
        let ids: Vec<u32> = t.top.iter().map(|c| c.0).collect();
        let expected: Vec<u32> = order[..TOP].iter().map(|&i| i as u32).collect();
        assert_eq!(ids, expected, "step {step}");
        for &(alt, lp) in &t.top {
            assert!(
                (f64::from(lp) - want[alt as usize]).abs() < 1e-4,
                "step {step}: alternative {alt}"
            );
        }
        check_sorted_and_greedy(t);
        logits = model.decode(&[id], &mut state).unwrap();
    }
    // Greedy on this prompt is " Paris": a confident first token.
    assert!(g.text.starts_with(" Paris"), "{}", g.text);
    assert!(g.logprobs[0].logprob > -1.0, "{:?}", g.logprobs[0]);

    // Not asked for: none computed.
    let mut cache = model.new_cache(prompt.len() + TOKENS);
    let plain = generate(model, tok, &prompt, &options(None), &mut cache, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(plain.logprobs.is_empty());
    assert_eq!(plain.tokens, g.tokens);

    // The scheduler reports the same, step by step, beside a request that asks none.
    let mut s = Scheduler::new(model, tok, 2);
    let with = s.add_request(prompt.clone(), options(Some(TOP))).unwrap();
    let without = s.add_request(prompt.clone(), options(None)).unwrap();
    let mut batched = Vec::new();
    while s.has_unfinished() {
        for o in s.step().unwrap() {
            if o.id == without {
                assert!(o.logprobs.is_none(), "{o:?}");
            } else if o.id == with && o.token.is_some() {
                batched.push(o.logprobs.clone().unwrap());
            }
        }
    }
    assert_eq!(batched.len(), TOKENS);
    for (b, t) in batched.iter().zip(&g.logprobs) {
        assert_eq!(b.token, t.token);
        assert!((b.logprob - t.logprob).abs() < 1e-3, "{b:?} vs {t:?}");
        check_sorted_and_greedy(b);
    }

    // More alternatives than OpenAI allows is an error naming the field.
    let e = s
        .add_request(prompt.clone(), options(Some(21)))
        .unwrap_err();
    assert!(e.to_string().contains("top_logprobs"), "{e}");
}
